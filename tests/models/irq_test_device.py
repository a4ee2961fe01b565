"""A device for the interrupt tests: register writes make it raise interrupts on demand.

BAR0 (trapped): 0x00 raise MSI-X vector <value>; 0x04 INTx level (1 asserts, 0
deasserts); 0x08 raise MSI vector <value>; 0x0c raise MSI-X vector 0 <value> times;
0x10 raise ERR; 0x14 raise REQ; 0x18 raise MSI-X vector 0 after <value> milliseconds
(a trio timer, as a device that completes work asynchronously).

DMA: 0x20 IOVA, 0x28 size, 0x30 command (1: read IOVA into BAR2, 2: write BAR2 to IOVA);
0x38 reads 0 after a good transfer, 1 after a DMA fault (whose text is in ``self.faults``).
"""

from vfiofs import abi
from vfiofs.models.api import DeviceModel, DmaFault


class IrqTestDevice(DeviceModel):
    def bar_write(self, index, offset, data):
        value = int.from_bytes(data, "little")
        if index != 0:
            return super().bar_write(index, offset, data)
        if offset == 0x00:
            self.raise_irq(abi.VFIO_PCI_MSIX_IRQ_INDEX, value)
        elif offset == 0x04:
            self.assert_intx() if value else self.deassert_intx()
        elif offset == 0x08:
            self.raise_irq(abi.VFIO_PCI_MSI_IRQ_INDEX, value)
        elif offset == 0x0C:
            for _ in range(value):
                self.raise_irq(abi.VFIO_PCI_MSIX_IRQ_INDEX, 0)
        elif offset == 0x10:
            self.raise_irq(abi.VFIO_PCI_ERR_IRQ_INDEX)
        elif offset == 0x14:
            self.raise_irq(abi.VFIO_PCI_REQ_IRQ_INDEX)
        elif offset == 0x18:
            self.call_later(value / 1000, self.raise_irq, abi.VFIO_PCI_MSIX_IRQ_INDEX, 0)
        elif offset == 0x30:
            self._dma(value)
        else:
            super().bar_write(index, offset, data)

    faults: list = []

    def _dma(self, command: int) -> None:
        iova = int.from_bytes(super().bar_read(0, 0x20, 8), "little")
        size = int.from_bytes(super().bar_read(0, 0x28, 8), "little")
        try:
            if command == 1:
                self.context.memory[2].write(0, self.dma_read(iova, size))
            elif command == 2:
                self.dma_write(iova, self.context.memory[2].read(0, size))
            status = 0
        except DmaFault as fault:
            self.faults = self.faults + [str(fault)]
            status = 1
        super().bar_write(0, 0x38, status.to_bytes(4, "little"))
