"""A PCI function whose BAR0 is plain memory: the simplest useful device.

Writes stick, reads return what was written; the contents start zeroed and are zeroed
again by reset (VFIO_DEVICE_RESET and the reset that follows every close), so each
binder starts from a clean device.
"""

from __future__ import annotations

from ..model import Bar, DeviceModel, PciIdentity


class RamModel(DeviceModel):
    def __init__(self, identity: PciIdentity, size: int) -> None:
        self.identity = identity
        self.bars = (Bar(index=0, size=size, is_64bit=False, prefetchable=False),)
        self.memory = bytearray(size)

    def reset(self) -> None:
        self.memory[:] = bytes(len(self.memory))

    def bar_read(self, index: int, offset: int, size: int) -> bytes:
        return bytes(self.memory[offset : offset + size])

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        self.memory[offset : offset + len(data)] = data
