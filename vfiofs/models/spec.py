"""What a device definition describes, parsed and checked: identity, BARs, ROM, capabilities.

A :class:`DeviceSpec` is pure data. The TOML loader (:mod:`vfiofs.host.definitions`) builds it;
the config space, the region backing, the sysfs tree and device models read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


ACCESS_KINDS = ("ro", "rw", "wo", "w1c", "rc")
CAPABILITY_KINDS = ("pm", "msi", "msix", "pcie")


@dataclass(frozen=True)
class PciIdentity:
    """What the config-space header says about the function."""

    vendor: int
    device: int
    subsystem_vendor: int = 0x1AF4
    subsystem_device: int = 0x1100
    class_code: int = 0xFF0000  # 24 bits: base class, subclass, prog-if
    revision: int = 0
    interrupt_pin: int = 0  # 0 none, 1..4 INTA..INTD


@dataclass(frozen=True)
class Register:
    """One register of a trapped BAR. ``access``: ro, rw, wo (reads 0), w1c, rc (read clears)."""

    offset: int
    width: int  # 1, 2, 4 or 8 bytes
    reset: int = 0
    access: str = "rw"
    name: str = ""


@dataclass(frozen=True)
class BarSpec:
    """One implemented BAR. Its bytes are memory unless a register covers them.

    ``mmap``: the memory may be mapped by the binder — all of it, or only ``mmap_areas``
    (offset, size pairs; page-aligned) when the BAR is part RAM, part registers.
    ``persist``: the memory survives reset, close and a daemon restart.
    """

    index: int
    size: int
    io: bool = False
    is_64bit: bool = False
    prefetchable: bool = False
    mmap: bool = False
    mmap_areas: tuple[tuple[int, int], ...] = ()
    registers: tuple[Register, ...] = ()
    persist: bool = False

    @property
    def mappable_areas(self) -> tuple[tuple[int, int], ...]:
        if not self.mmap:
            return ()
        return self.mmap_areas or ((0, self.size),)

    @property
    def sparse(self) -> bool:
        return self.mmap and bool(self.mmap_areas)


@dataclass(frozen=True)
class Capability:
    """A PCI capability. MSI uses vectors/address64/maskable; MSI-X vectors and table/PBA placement."""

    kind: str
    offset: int | None = None  # None: placed automatically
    vectors: int = 1
    address64: bool = True
    maskable: bool = False
    table_bar: int = 0
    table_offset: int = 0
    pba_bar: int = 0
    pba_offset: int = 0


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    model: str
    identity: PciIdentity
    bars: tuple[BarSpec, ...] = ()
    rom: bytes | None = None
    capabilities: tuple[Capability, ...] = ()
    source: Path | None = field(default=None, compare=False)
    #: the IOMMU group (legacy vfio/<N> node); devices may share one. None until the
    #: directory is loaded, which gives every device without one a group of its own.
    iommu_group: int | None = None

    @property
    def express(self) -> bool:
        return any(cap.kind == "pcie" for cap in self.capabilities)

    @property
    def config_size(self) -> int:
        return 4096 if self.express else 256

    def bar(self, index: int) -> BarSpec | None:
        for bar in self.bars:
            if bar.index == index:
                return bar
        return None

    def capability(self, kind: str) -> Capability | None:
        for cap in self.capabilities:
            if cap.kind == kind:
                return cap
        return None
