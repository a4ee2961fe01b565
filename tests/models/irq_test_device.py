"""A device for the interrupt tests: register writes make it raise interrupts on demand.

BAR0 (trapped): 0x00 raise MSI-X vector <value>; 0x04 INTx level (1 asserts, 0
deasserts); 0x08 raise MSI vector <value>; 0x0c raise MSI-X vector 0 <value> times;
0x10 raise ERR; 0x14 raise REQ; 0x18 raise MSI-X vector 0 after <value> milliseconds
(a trio timer, as a device that completes work asynchronously).
"""

from vfiofs import abi
from vfiofs.model import DeviceModel


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
        else:
            super().bar_write(index, offset, data)
