"""The sysfs-like tree under ``<mnt>/sys``: what ``lspci -A linux-sysfs`` and friends read.

Sans-I/O: :func:`build_tree` turns the mounted devices into a flat list of
:class:`Entry` (directories, read-only files with their bytes, relative symlinks); the
FUSE adapter only serves that list. Nothing here changes while the filesystem is mounted.

Layout (paths relative to the mount root; ``BDF`` is ``dddd:bb:dd.f``)::

    sys/bus/pci/devices/BDF/                  one directory per device
        vendor device subsystem_vendor subsystem_device class revision irq
        resource config modalias uevent numa_node enable          (all 0444)
        iommu_group -> ../../../../kernel/iommu_groups/N
        driver      -> ../../../../bus/pci/drivers/vfio-pci
        subsystem   -> ../../../../bus/pci
        vfio-dev/vfioN/{dev,uevent}, vfio-dev/vfioN/device -> ../../../BDF
    sys/bus/pci/drivers/vfio-pci/BDF          -> ../../devices/BDF
    sys/kernel/iommu_groups/N/devices/BDF     -> ../../../../bus/pci/devices/BDF
    sys/kernel/iommu_groups/N/{type,reserved_regions}
    sys/class/vfio-dev/vfioN                  -> ../../bus/pci/devices/BDF/vfio-dev/vfioN

Rules (all made up, but stable and consistent with each other):

- **Address.** Device ``index`` (``vfio/devices/vfioN``, N = index) sits in slot
  ``n = index + 1``: domain ``n // 8192``, bus ``(n // 32) % 256``, device ``n % 32``,
  function 0. So vfio0 is ``0000:00:01.0``, vfio30 ``0000:00:1f.0``, vfio31 ``0000:01:00.0``.
- **IOMMU group** N = the definition's ``iommu_group``, by default the device's index. **vfio-dev** ``dev`` is
  ``511:index`` (a fixed fake character major).
- **Host addresses.** BARs are placed device by device in index order, BAR 0..5 then the
  ROM, each naturally aligned, in three fake host windows shared by all devices:
  64-bit prefetchable memory upward from 32 GiB (``0x800000000``); all other memory and
  the ROM downward from ``0xfec00000`` (the IOAPIC) to ``0x80000000``; I/O ports upward
  from ``0xc000`` to ``0xffff`` (holes left by alignment are reused). A BAR that does not
  fit its window stays unassigned, as in the kernel: start 0, end size-1,
  ``IORESOURCE_UNSET``, address 0 in ``config``.
- **resource** has the kernel's 13 lines ``0x%016x 0x%016x 0x%016x`` (start, end, flags):
  BARs 0-5, the ROM, 6 zero lines for SR-IOV BARs. Flags are the kernel's IORESOURCE_*
  bits plus the BAR's own low type bits (``0x40200`` 32-bit memory, ``0x14220c`` 64-bit
  prefetchable, ``0x40101`` I/O, ``0x46200`` ROM), which is what pciutils takes them from.
- **config** is the power-on config space (:class:`~vfiofs.pci.config.PciConfigSpace`)
  with the assigned addresses in the BAR and ROM registers (ROM left disabled, as firmware
  leaves it) and the interrupt line set to ``irq``, as the kernel shows it.
- **irq** is 0 without an interrupt pin, otherwise a fake GSI ``16 + (device + pin - 1) % 4``
  (the usual INTx swizzle onto GSIs 16-19).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from vfiofs.pci.config import (
    PCI_BASE_ADDRESS_0,
    PCI_BASE_ADDRESS_MEM_PREFETCH,
    PCI_BASE_ADDRESS_MEM_TYPE_64,
    PCI_BASE_ADDRESS_SPACE_IO,
    PCI_INTERRUPT_LINE,
    PCI_ROM_ADDRESS,
    PciConfigSpace,
    rom_bar_size,
)
from vfiofs.models.spec import BarSpec, DeviceSpec

# include/linux/ioport.h
IORESOURCE_IO = 0x0000_0100
IORESOURCE_MEM = 0x0000_0200
IORESOURCE_PREFETCH = 0x0000_2000
IORESOURCE_READONLY = 0x0000_4000
IORESOURCE_SIZEALIGN = 0x0004_0000
IORESOURCE_MEM_64 = 0x0010_0000
IORESOURCE_UNSET = 0x2000_0000

#: Flags of an expansion ROM resource (drivers/pci/probe.c, pci_read_bases).
ROM_FLAGS = IORESOURCE_MEM | IORESOURCE_PREFETCH | IORESOURCE_READONLY | IORESOURCE_SIZEALIGN

#: Lines of ``resource``: 6 BARs, the ROM, 6 SR-IOV BARs (PCI_BRIDGE_RESOURCES).
RESOURCE_LINES = 13
ROM_RESOURCE = 6

# The fake host windows.
MEM32_TOP = 0xFEC0_0000  # allocated downward from here ...
MEM32_BOTTOM = 0x8000_0000  # ... to here
MEM64_BASE = 0x8_0000_0000  # 64-bit prefetchable BARs, upward
MEM64_LIMIT = 1 << 48
IO_BASE = 0xC000  # I/O ports, upward ...
IO_LIMIT = 0x1_0000  # ... to the end of the port space

VFIO_DEV_MAJOR = 511  # fake major of the vfio-dev character devices
ATTRIBUTE_SIZE = 4096  # st_size sysfs reports for an attribute file
DRIVER = "vfio-pci"

MSI_WINDOW = (0xFEE0_0000, 0xFEEF_FFFF)  # x86 interrupt window, every group's reserved region


@dataclass(frozen=True)
class Entry:
    """One node of the tree. ``path`` is relative to the mount root, '/'-separated."""

    path: str
    kind: str  # "dir", "file" or "symlink"
    content: bytes = b""  # files: the whole contents
    target: str = ""  # symlinks: the (relative) target
    size: int = 0  # files: st_size (sysfs reports 4096 for attributes, not the length)


@dataclass(frozen=True)
class Resource:
    start: int = 0
    end: int = 0
    flags: int = 0

    @property
    def size(self) -> int:
        return self.end - self.start + 1 if self.end > self.start else 0

    @property
    def assigned(self) -> bool:
        return self.flags != 0 and not self.flags & IORESOURCE_UNSET

    def line(self) -> str:
        return f"0x{self.start:016x} 0x{self.end:016x} 0x{self.flags:016x}"


UNUSED = Resource()


def bar_flags(bar: BarSpec) -> int:
    """The kernel's resource flags for a BAR: IORESOURCE_* plus the BAR's low type bits."""
    if bar.io:
        return IORESOURCE_IO | IORESOURCE_SIZEALIGN | PCI_BASE_ADDRESS_SPACE_IO
    flags = IORESOURCE_MEM | IORESOURCE_SIZEALIGN
    if bar.is_64bit:
        flags |= IORESOURCE_MEM_64 | PCI_BASE_ADDRESS_MEM_TYPE_64
    if bar.prefetchable:
        flags |= IORESOURCE_PREFETCH | PCI_BASE_ADDRESS_MEM_PREFETCH
    return flags


def pci_address(index: int) -> tuple[int, int, int, int]:
    """(domain, bus, device, function) of the device with this index."""
    slot = index + 1
    return slot // (32 * 256), (slot // 32) % 256, slot % 32, 0


def bdf(index: int) -> str:
    domain, bus, device, function = pci_address(index)
    return f"{domain:04x}:{bus:02x}:{device:02x}.{function:x}"


def irq_of(index: int, spec: DeviceSpec) -> int:
    pin = spec.identity.interrupt_pin
    if not pin:
        return 0
    return 16 + (pci_address(index)[2] + pin - 1) % 4


class Window:
    """A fake host address range handing out naturally aligned blocks.

    ``downward``: each block goes as high as it fits (the 32-bit window grows down from
    below the IOAPIC); otherwise as low as it fits. Holes left by alignment are reused.
    """

    def __init__(self, base: int, limit: int, downward: bool = False) -> None:
        self.free = [(base, limit)]  # [start, end) ranges, sorted
        self.downward = downward

    def take(self, size: int) -> int | None:
        ranges = reversed(range(len(self.free))) if self.downward else range(len(self.free))
        for i in ranges:
            lo, hi = self.free[i]
            if self.downward:
                start = (hi - size) & ~(size - 1)
            else:
                start = (lo + size - 1) & ~(size - 1)
            if lo <= start and start + size <= hi:
                self.free[i : i + 1] = [r for r in ((lo, start), (start + size, hi)) if r[0] < r[1]]
                return start
        return None


class HostWindows:
    """The three fake host address windows, shared by all devices of a mount."""

    def __init__(self) -> None:
        self.mem32 = Window(MEM32_BOTTOM, MEM32_TOP, downward=True)
        self.mem64 = Window(MEM64_BASE, MEM64_LIMIT)
        self.io = Window(IO_BASE, IO_LIMIT)

    def place_bar(self, bar: BarSpec) -> Resource:
        if bar.io:
            window = self.io
        elif bar.is_64bit and bar.prefetchable:
            window = self.mem64
        else:  # 32-bit and 64-bit non-prefetchable BARs live below 4 GiB, as behind a bridge
            window = self.mem32
        return _resource(window.take(bar.size), bar.size, bar_flags(bar))

    def place_rom(self, size: int) -> Resource:
        return _resource(self.mem32.take(size), size, ROM_FLAGS)


def _resource(start: int | None, size: int, flags: int) -> Resource:
    if start is None:  # no room: unassigned, as the kernel reports it
        return Resource(0, size - 1, flags | IORESOURCE_UNSET)
    return Resource(start, start + size - 1, flags)


@dataclass(frozen=True)
class SysfsDevice:
    """Everything the tree says about one device."""

    index: int
    spec: DeviceSpec
    resources: tuple[Resource, ...]  # RESOURCE_LINES entries
    config: bytes

    @property
    def bdf(self) -> str:
        return bdf(self.index)

    @property
    def irq(self) -> int:
        return irq_of(self.index, self.spec)

    @property
    def vfio_name(self) -> str:
        return f"vfio{self.index}"

    @property
    def iommu_group(self) -> int:
        return self.index if self.spec.iommu_group is None else self.spec.iommu_group

    def attributes(self) -> dict[str, bytes]:
        ident = self.spec.identity
        cls = ident.class_code
        modalias = (f"pci:v{ident.vendor:08X}d{ident.device:08X}sv{ident.subsystem_vendor:08X}"
                    f"sd{ident.subsystem_device:08X}bc{cls >> 16:02X}sc{cls >> 8 & 0xFF:02X}i{cls & 0xFF:02X}")
        uevent = (f"DRIVER={DRIVER}\nPCI_CLASS={cls:X}\nPCI_ID={ident.vendor:04X}:{ident.device:04X}\n"
                  f"PCI_SUBSYS_ID={ident.subsystem_vendor:04X}:{ident.subsystem_device:04X}\n"
                  f"PCI_SLOT_NAME={self.bdf}\nMODALIAS={modalias}\n")
        text = {
            "vendor": f"0x{ident.vendor:04x}\n",
            "device": f"0x{ident.device:04x}\n",
            "subsystem_vendor": f"0x{ident.subsystem_vendor:04x}\n",
            "subsystem_device": f"0x{ident.subsystem_device:04x}\n",
            "class": f"0x{cls:06x}\n",
            "revision": f"0x{ident.revision:02x}\n",
            "irq": f"{self.irq}\n",
            "resource": "".join(r.line() + "\n" for r in self.resources),
            "modalias": modalias + "\n",
            "uevent": uevent,
            "numa_node": "-1\n",
            "enable": "1\n",
        }
        return {name: value.encode() for name, value in text.items()}

    def vfio_dev_attributes(self) -> dict[str, bytes]:
        return {
            "dev": f"{VFIO_DEV_MAJOR}:{self.index}\n".encode(),
            "uevent": f"MAJOR={VFIO_DEV_MAJOR}\nMINOR={self.index}\nDEVNAME=vfio/devices/{self.vfio_name}\n".encode(),
        }


def host_config(spec: DeviceSpec, resources: Sequence[Resource], irq: int) -> bytes:
    """Power-on config space with the host addresses in the BAR and ROM registers."""
    data = bytearray(PciConfigSpace(spec).data)

    def put32(offset: int, value: int) -> None:
        data[offset : offset + 4] = (value & 0xFFFF_FFFF).to_bytes(4, "little")

    def get32(offset: int) -> int:
        return int.from_bytes(data[offset : offset + 4], "little")

    for bar in spec.bars:
        res = resources[bar.index]
        if not res.assigned:
            continue
        offset = PCI_BASE_ADDRESS_0 + 4 * bar.index
        low_mask = 0x3 if bar.io else 0xF
        put32(offset, (get32(offset) & low_mask) | (res.start & ~low_mask))
        if bar.is_64bit:
            put32(offset + 4, res.start >> 32)
    rom = resources[ROM_RESOURCE]
    if spec.rom is not None and rom.assigned:
        put32(PCI_ROM_ADDRESS, (get32(PCI_ROM_ADDRESS) & 0x7FF) | (rom.start & 0xFFFF_F800))
    if spec.identity.interrupt_pin:
        data[PCI_INTERRUPT_LINE] = irq & 0xFF
    return bytes(data)


def layout_devices(devices: Iterable[tuple[int, DeviceSpec]]) -> list[SysfsDevice]:
    """Resources and config for each (index, spec), in index order."""
    windows = HostWindows()
    out = []
    for index, spec in sorted(devices, key=lambda pair: pair[0]):
        resources = [UNUSED] * RESOURCE_LINES
        for bar in sorted(spec.bars, key=lambda b: b.index):
            resources[bar.index] = windows.place_bar(bar)
        if spec.rom is not None:
            resources[ROM_RESOURCE] = windows.place_rom(rom_bar_size(spec.rom))
        config = host_config(spec, resources, irq_of(index, spec))
        out.append(SysfsDevice(index, spec, tuple(resources), config))
    return out


def build_tree(devices: Iterable[tuple[int, DeviceSpec]]) -> list[Entry]:
    """Every entry of ``sys/``, parents before children, directories in listing order."""
    laid_out = layout_devices(devices)
    entries: list[Entry] = []

    def directory(path: str) -> None:
        entries.append(Entry(path, "dir"))

    def file(path: str, content: bytes, size: int = ATTRIBUTE_SIZE) -> None:
        entries.append(Entry(path, "file", content=content, size=size))

    def link(path: str, target: str) -> None:
        entries.append(Entry(path, "symlink", target=target))

    for path in ("sys", "sys/bus", "sys/bus/pci", "sys/bus/pci/devices"):
        directory(path)
    for dev in laid_out:
        base = f"sys/bus/pci/devices/{dev.bdf}"
        directory(base)
        for name, content in dev.attributes().items():
            file(f"{base}/{name}", content)
        file(f"{base}/config", dev.config, size=len(dev.config))
        link(f"{base}/iommu_group", f"../../../../kernel/iommu_groups/{dev.iommu_group}")
        link(f"{base}/driver", f"../../../../bus/pci/drivers/{DRIVER}")
        link(f"{base}/subsystem", "../../../../bus/pci")
        directory(f"{base}/vfio-dev")
        directory(f"{base}/vfio-dev/{dev.vfio_name}")
        for name, content in dev.vfio_dev_attributes().items():
            file(f"{base}/vfio-dev/{dev.vfio_name}/{name}", content)
        link(f"{base}/vfio-dev/{dev.vfio_name}/device", f"../../../{dev.bdf}")
        link(f"{base}/vfio-dev/{dev.vfio_name}/subsystem", "../../../../../../class/vfio-dev")
    directory("sys/bus/pci/drivers")
    directory(f"sys/bus/pci/drivers/{DRIVER}")
    for dev in laid_out:
        link(f"sys/bus/pci/drivers/{DRIVER}/{dev.bdf}", f"../../devices/{dev.bdf}")
    directory("sys/kernel")
    directory("sys/kernel/iommu_groups")
    for number in sorted({dev.iommu_group for dev in laid_out}):
        group = f"sys/kernel/iommu_groups/{number}"
        directory(group)
        directory(f"{group}/devices")
        for dev in laid_out:
            if dev.iommu_group == number:
                link(f"{group}/devices/{dev.bdf}", f"../../../../bus/pci/devices/{dev.bdf}")
        file(f"{group}/type", b"DMA\n")
        file(f"{group}/reserved_regions", f"0x{MSI_WINDOW[0]:016x} 0x{MSI_WINDOW[1]:016x} msi\n".encode())
    directory("sys/class")
    directory("sys/class/vfio-dev")
    for dev in laid_out:
        link(f"sys/class/vfio-dev/{dev.vfio_name}", f"../../bus/pci/devices/{dev.bdf}/vfio-dev/{dev.vfio_name}")
    return entries
