"""A function's virtualized PCI configuration space (type 0 header).

vfio-pci never lets userspace write the real header: every byte has a write mask, and
writes to read-only bits are dropped while the write still reports its full length.
BAR registers keep only the bits above their size, which is what makes the standard
sizing sequence (write all ones, read back the mask) work. This covers the header;
capabilities are not emulated yet (STATUS.CAP_LIST is clear).
"""

from __future__ import annotations

import errno
from typing import Sequence

from .errors import VfioError
from .model import Bar, PciIdentity

CONFIG_SIZE = 256

PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_REVISION_ID = 0x08
PCI_CLASS_PROG = 0x09
PCI_CACHE_LINE_SIZE = 0x0C
PCI_LATENCY_TIMER = 0x0D
PCI_BASE_ADDRESS_0 = 0x10
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D

PCI_COMMAND_IO = 0x1
PCI_COMMAND_MEMORY = 0x2
# Writable COMMAND bits: I/O, memory, bus master, parity, SERR, INTx disable.
COMMAND_WRITE_MASK = 0x0547

PCI_BASE_ADDRESS_SPACE_IO = 0x01
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x04
PCI_BASE_ADDRESS_MEM_PREFETCH = 0x08


class PciConfigSpace:
    """256 bytes of config space plus a per-bit write mask."""

    def __init__(self, identity: PciIdentity, bars: Sequence[Bar]) -> None:
        self.size = CONFIG_SIZE
        self.data = bytearray(CONFIG_SIZE)
        self.wmask = bytearray(CONFIG_SIZE)
        self._put(PCI_VENDOR_ID, 2, identity.vendor)
        self._put(PCI_DEVICE_ID, 2, identity.device)
        self._put(PCI_REVISION_ID, 1, identity.revision)
        self._put(PCI_CLASS_PROG, 3, identity.class_code)
        self._put(PCI_SUBSYSTEM_VENDOR_ID, 2, identity.subsystem_vendor)
        self._put(PCI_SUBSYSTEM_ID, 2, identity.subsystem_device)
        self._put(PCI_INTERRUPT_PIN, 1, identity.interrupt_pin)
        command = 0
        for bar in bars:
            command |= PCI_COMMAND_IO if bar.io else PCI_COMMAND_MEMORY
            self._init_bar(bar)
        # pci_enable_device() during open turns decoding on for the BARs the function has.
        self._put(PCI_COMMAND, 2, command, wmask=COMMAND_WRITE_MASK)
        self._put(PCI_CACHE_LINE_SIZE, 1, 0, wmask=0xFF)
        self._put(PCI_LATENCY_TIMER, 1, 0, wmask=0xFF)
        self._put(PCI_INTERRUPT_LINE, 1, 0, wmask=0xFF)

    def _put(self, offset: int, width: int, value: int, wmask: int = 0) -> None:
        self.data[offset : offset + width] = value.to_bytes(width, "little")
        self.wmask[offset : offset + width] = wmask.to_bytes(width, "little")

    def _init_bar(self, bar: Bar) -> None:
        offset = PCI_BASE_ADDRESS_0 + 4 * bar.index
        if bar.io:
            type_bits = PCI_BASE_ADDRESS_SPACE_IO
        else:
            type_bits = (PCI_BASE_ADDRESS_MEM_TYPE_64 if bar.is_64bit else 0) | (
                PCI_BASE_ADDRESS_MEM_PREFETCH if bar.prefetchable else 0
            )
        address_mask = ~(bar.size - 1) & ((1 << 64) - 1)
        low_type_mask = 0x3 if bar.io else 0xF
        self._put(offset, 4, type_bits, wmask=address_mask & 0xFFFF_FFFF & ~low_type_mask)
        if bar.is_64bit:
            self._put(offset + 4, 4, 0, wmask=address_mask >> 32)

    @property
    def command(self) -> int:
        return int.from_bytes(self.data[PCI_COMMAND : PCI_COMMAND + 2], "little")

    def _check(self, pos: int, count: int) -> None:
        if pos < 0 or pos >= self.size or pos + count > self.size:
            raise VfioError(errno.EFAULT, "config space access past its end")

    def read(self, pos: int, count: int) -> bytes:
        self._check(pos, count)
        return bytes(self.data[pos : pos + count])

    def write(self, pos: int, data: bytes) -> int:
        """Merge ``data`` under the write mask; read-only bits keep their value."""
        self._check(pos, len(data))
        for i, byte in enumerate(data):
            mask = self.wmask[pos + i]
            self.data[pos + i] = (self.data[pos + i] & ~mask) | (byte & mask)
        return len(data)
