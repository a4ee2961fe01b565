"""Benchmark device: raises MSI-X vector 0 on a timer and stamps the raise time in mappable memory.

Writing N to BAR0+0 starts N raises, ``interval_us`` apart (BAR0+4, default 2000). Before
each raise the device stores ``time.monotonic_ns()`` at BAR2+0, so a driver woken by the
eventfd can read, through its mapping and without a FUSE round trip, when the interrupt
was raised.

DMA: BAR0+0x10 IOVA, +0x18 size, +0x20 command (1 read from IOVA, 2 write to IOVA); the
device times the transfer itself and stores the nanoseconds at BAR0+0x28.
"""

import time

import trio

from vfiofs import abi
from vfiofs.models.api import DeviceModel


class IrqBenchDevice(DeviceModel):
    def bar_write(self, index, offset, data):
        if index == 0 and offset == 0:
            self.spawn(self._raise_many, int.from_bytes(data, "little"))
            return
        if index == 0 and offset == 0x20:
            self._dma(int.from_bytes(data, "little"))
            return
        super().bar_write(index, offset, data)

    def _dma(self, command: int) -> None:
        iova = int.from_bytes(self.bar_read(0, 0x10, 8), "little")
        size = int.from_bytes(self.bar_read(0, 0x18, 8), "little")
        payload = bytes(size) if command == 2 else b""
        start = time.perf_counter_ns()
        if command == 1:
            self.dma_read(iova, size)
        else:
            self.dma_write(iova, payload)
        elapsed = time.perf_counter_ns() - start
        super().bar_write(0, 0x28, elapsed.to_bytes(8, "little"))

    async def _raise_many(self, count: int) -> None:
        interval = (int.from_bytes(self.bar_read(0, 4, 4), "little") or 2000) / 1e6
        for _ in range(count):
            await trio.sleep(interval)
            self.context.memory[2].write(0, time.monotonic_ns().to_bytes(8, "little"))
            self.raise_irq(abi.VFIO_PCI_MSIX_IRQ_INDEX, 0)
