"""A function's virtualized PCI configuration space, as vfio-pci presents it.

Every byte has a write mask: writes to read-only bits are dropped while the write still
reports its full length (vfio_pci_config.c). BAR and ROM registers keep only the bits
above their size, which is what makes the standard sizing sequence work (write all
ones, read back the size mask with the type bits). Capabilities (PM, MSI, MSI-X,
PCI Express) are laid out from 0x40 in definition order unless an offset is given, and
chained through their NEXT bytes from the capability pointer at 0x34.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Callable

from vfiofs.errors import VfioError
from vfiofs.models.spec import Capability, DeviceSpec

PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_REVISION_ID = 0x08
PCI_CLASS_PROG = 0x09
PCI_CACHE_LINE_SIZE = 0x0C
PCI_LATENCY_TIMER = 0x0D
PCI_HEADER_TYPE = 0x0E
PCI_BASE_ADDRESS_0 = 0x10
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_ROM_ADDRESS = 0x30
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D

PCI_COMMAND_IO = 0x1
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_INTX_DISABLE = 0x400
COMMAND_WRITE_MASK = 0x0547  # I/O, memory, bus master, parity, SERR, INTx disable
PCI_STATUS_CAP_LIST = 0x10

PCI_BASE_ADDRESS_SPACE_IO = 0x01
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x04
PCI_BASE_ADDRESS_MEM_PREFETCH = 0x08
PCI_ROM_ADDRESS_ENABLE = 0x01
ROM_MIN_SIZE = 2048

PCI_CAP_ID_PM = 0x01
PCI_CAP_ID_MSI = 0x05
PCI_CAP_ID_EXP = 0x10
PCI_CAP_ID_MSIX = 0x11

PCI_EXP_DEVCTL = 0x08
PCI_EXP_DEVCTL_BCR_FLR = 0x8000

FIRST_CAPABILITY = 0x40
PCI_CFG_SPACE_SIZE = 0x100  # conventional config space; a PCIe function's extended space follows


def capability_length(cap: Capability) -> int:
    if cap.kind == "pm":
        return 8
    if cap.kind == "msi":
        return (14 if cap.address64 else 10) + (10 if cap.maskable else 0)
    if cap.kind == "msix":
        return 12
    return 0x3C  # PCI Express capability, version 2, endpoint


@dataclass(frozen=True)
class PlacedCapability:
    cap: Capability
    offset: int
    length: int


def layout_capabilities(spec: DeviceSpec) -> list[PlacedCapability]:
    """Offsets for every capability; ValueError if they overlap or leave the 256-byte space."""
    placed: list[PlacedCapability] = []
    cursor = FIRST_CAPABILITY
    for cap in spec.capabilities:
        length = capability_length(cap)
        offset = cap.offset if cap.offset is not None else cursor
        if offset + length > PCI_CFG_SPACE_SIZE:
            raise ValueError(f"{cap.kind} at {offset:#x} ({length} bytes) does not fit below 0x100")
        for other in placed:
            if offset < other.offset + other.length and other.offset < offset + length:
                raise ValueError(f"{cap.kind} at {offset:#x} overlaps {other.cap.kind} at {other.offset:#x}")
        placed.append(PlacedCapability(cap, offset, length))
        cursor = max(cursor, (offset + length + 3) & ~3)
    return placed


def rom_bar_size(image: bytes) -> int:
    size = ROM_MIN_SIZE
    while size < len(image):
        size <<= 1
    return size


class PciConfigSpace:
    """Config space bytes plus a per-bit write mask; ``on_flr`` runs on a function-level reset."""

    def __init__(self, spec: DeviceSpec, on_flr: Callable[[], None] | None = None) -> None:
        self.size = spec.config_size
        self.data = bytearray(self.size)
        self.wmask = bytearray(self.size)
        self.on_flr = on_flr
        self._flr_offset: int | None = None
        ident = spec.identity
        self._put(PCI_VENDOR_ID, 2, ident.vendor)
        self._put(PCI_DEVICE_ID, 2, ident.device)
        self._put(PCI_REVISION_ID, 1, ident.revision)
        self._put(PCI_CLASS_PROG, 3, ident.class_code)
        self._put(PCI_SUBSYSTEM_VENDOR_ID, 2, ident.subsystem_vendor)
        self._put(PCI_SUBSYSTEM_ID, 2, ident.subsystem_device)
        self._put(PCI_INTERRUPT_PIN, 1, ident.interrupt_pin)
        command = 0
        for bar in spec.bars:
            command |= PCI_COMMAND_IO if bar.io else PCI_COMMAND_MEMORY
            self._init_bar(bar.index, bar.size, bar.io, bar.is_64bit, bar.prefetchable)
        if spec.rom is not None:
            mask = ~(rom_bar_size(spec.rom) - 1) & 0xFFFF_F800
            self._put(PCI_ROM_ADDRESS, 4, 0, wmask=mask | PCI_ROM_ADDRESS_ENABLE)
        # pci_enable_device() during open turns decoding on for the BARs the function has.
        self._put(PCI_COMMAND, 2, command, wmask=COMMAND_WRITE_MASK)
        self._put(PCI_CACHE_LINE_SIZE, 1, 0, wmask=0xFF)
        self._put(PCI_LATENCY_TIMER, 1, 0, wmask=0xFF)
        self._put(PCI_INTERRUPT_LINE, 1, 0, wmask=0xFF)
        self.capabilities = layout_capabilities(spec)
        self._init_capabilities()

    def _put(self, offset: int, width: int, value: int, wmask: int = 0) -> None:
        self.data[offset : offset + width] = value.to_bytes(width, "little")
        self.wmask[offset : offset + width] = wmask.to_bytes(width, "little")

    def _init_bar(self, index: int, size: int, io: bool, is_64bit: bool, prefetchable: bool) -> None:
        offset = PCI_BASE_ADDRESS_0 + 4 * index
        if io:
            type_bits, low_mask = PCI_BASE_ADDRESS_SPACE_IO, 0x3
        else:
            type_bits = (PCI_BASE_ADDRESS_MEM_TYPE_64 if is_64bit else 0) | (
                PCI_BASE_ADDRESS_MEM_PREFETCH if prefetchable else 0)
            low_mask = 0xF
        address_mask = ~(size - 1) & ((1 << 64) - 1)
        self._put(offset, 4, type_bits, wmask=address_mask & 0xFFFF_FFFF & ~low_mask)
        if is_64bit:
            self._put(offset + 4, 4, 0, wmask=address_mask >> 32)

    def _init_capabilities(self) -> None:
        if not self.capabilities:
            return
        self._put(PCI_STATUS, 2, PCI_STATUS_CAP_LIST)
        self._put(PCI_CAPABILITY_LIST, 1, self.capabilities[0].offset)
        for i, placed in enumerate(self.capabilities):
            nxt = self.capabilities[i + 1].offset if i + 1 < len(self.capabilities) else 0
            self._init_capability(placed.cap, placed.offset, nxt)

    def _init_capability(self, cap: Capability, at: int, nxt: int) -> None:
        if cap.kind == "pm":
            self._put(at, 2, PCI_CAP_ID_PM | nxt << 8)
            self._put(at + 2, 2, 0x0003)  # PMC: version 3, D0/D3hot only
            self._put(at + 4, 2, 0x0008, wmask=0x0003)  # PMCSR: NoSoftReset, power state writable
        elif cap.kind == "msi":
            mmc = (cap.vectors.bit_length() - 1) << 1
            control = mmc | (0x80 if cap.address64 else 0) | (0x100 if cap.maskable else 0)
            self._put(at, 2, PCI_CAP_ID_MSI | nxt << 8)
            # Enable is set through VFIO_DEVICE_SET_IRQS, not config writes; MME is writable.
            self._put(at + 2, 2, control, wmask=0x0070)
            self._put(at + 4, 4, 0, wmask=0xFFFF_FFFC)
            data_at = at + (12 if cap.address64 else 8)
            if cap.address64:
                self._put(at + 8, 4, 0, wmask=0xFFFF_FFFF)
            self._put(data_at, 2, 0, wmask=0xFFFF)
            if cap.maskable:
                self._put(data_at + 4, 4, 0, wmask=(1 << cap.vectors) - 1)
                self._put(data_at + 8, 4, 0)
        elif cap.kind == "msix":
            self._put(at, 2, PCI_CAP_ID_MSIX | nxt << 8)
            # read-only, as in vfio-pci: ENABLE follows SET_IRQS, the function mask is the host's
            self._put(at + 2, 2, cap.vectors - 1)
            self._put(at + 4, 4, cap.table_offset | cap.table_bar)
            self._put(at + 8, 4, cap.pba_offset | cap.pba_bar)
        else:
            self._put(at, 2, PCI_CAP_ID_EXP | nxt << 8)
            self._put(at + 2, 2, 0x0002)  # version 2, PCI Express endpoint
            self._put(at + 4, 4, 0x1000_0000)  # DevCap: function-level reset capable
            self._put(at + PCI_EXP_DEVCTL, 2, 0x2810, wmask=0x7DFF)  # phantom RO; FLR handled below
            self._flr_offset = at + PCI_EXP_DEVCTL
            self._put(at + 0x0C, 4, 0x0000_0011)  # LinkCap: 2.5 GT/s, x1
            self._put(at + 0x10, 2, 0, wmask=0x0FFB)
            self._put(at + 0x12, 2, 0x0011)  # LinkSta: 2.5 GT/s, x1
            self._put(at + 0x28, 2, 0, wmask=0xFFDF)  # DevCtl2: ARI forwarding RO

    # -- state the driver needs ---------------------------------------------------------------
    @property
    def command(self) -> int:
        return int.from_bytes(self.data[PCI_COMMAND : PCI_COMMAND + 2], "little")

    def capability_offset(self, kind: str) -> int | None:
        for placed in self.capabilities:
            if placed.cap.kind == kind:
                return placed.offset
        return None

    # -- access --------------------------------------------------------------------------------------
    def _check(self, pos: int, count: int) -> None:
        if pos < 0 or pos >= self.size or pos + count > self.size:
            raise VfioError(errno.EFAULT, "config space access past its end")

    def read(self, pos: int, count: int) -> bytes:
        self._check(pos, count)
        return bytes(self.data[pos : pos + count])

    def write(self, pos: int, data: bytes) -> int:
        """Merge ``data`` under the write mask, in aligned pieces; read-only bits keep their value."""
        self._check(pos, len(data))
        for i, byte in enumerate(data):
            mask = self.wmask[pos + i]
            self.data[pos + i] = (self.data[pos + i] & ~mask) | (byte & mask)
        flr_byte = None if self._flr_offset is None else self._flr_offset + 1  # DEVCTL's high byte: BCR_FLR
        flr = flr_byte is not None and pos <= flr_byte < pos + len(data)
        if flr and data[flr_byte - pos] << 8 & PCI_EXP_DEVCTL_BCR_FLR:
            if self.on_flr is not None:
                self.on_flr()  # the FLR bit itself always reads 0
        return len(data)
