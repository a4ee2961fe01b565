"""A driver for the bundled 16550 UART (vfio3) that works purely by interrupts.

The driver thread sleeps in epoll on its interrupt eventfd; every byte it receives and
sends is handled in response to an interrupt (IIR tells which), never by polling
registers. The far end is the host port file ``ports/vfio3``.
"""

from __future__ import annotations

import os
import select
import threading

import pytest

from vfiofs.client import (
    VFIO_PCI_INTX_IRQ_INDEX,
    VFIO_PCI_MSI_IRQ_INDEX,
    IommuFd,
    VfioDevice,
)

RBR = THR = 0
IER, IIR, FCR, LSR = 1, 2, 2, 5
IER_RDI, IER_THRI = 0x01, 0x02
IIR_NO_INT, IIR_ID = 0x01, 0x0E
IIR_RDI, IIR_THRI = 0x04, 0x02
LSR_DR = 0x01


class InterruptDrivenUart:
    """Receives everything into ``received`` and transmits ``outgoing``, one byte per THRI."""

    def __init__(self, dev: VfioDevice, irq_index: int, efd: int, outgoing: bytes) -> None:
        self.dev, self.irq_index, self.efd = dev, irq_index, efd
        self.outgoing = bytearray(outgoing)
        self.received = bytearray()
        self.irq_count = 0

    def reg(self, offset: int) -> int:
        return self.dev.read(0, offset, 1)[0]

    def set_reg(self, offset: int, value: int) -> None:
        self.dev.write(0, offset, bytes([value]))

    def start(self) -> None:
        self.set_reg(FCR, 0x07)  # FIFOs on and cleared
        self.set_reg(IER, IER_RDI | (IER_THRI if self.outgoing else 0))

    def service(self) -> None:
        """The interrupt handler: run until the device reports nothing pending."""
        while True:
            iir = self.reg(IIR)
            if iir & IIR_NO_INT:
                break
            cause = iir & IIR_ID
            if cause == IIR_RDI:
                while self.reg(LSR) & LSR_DR:
                    self.received.append(self.reg(RBR))
            elif cause == IIR_THRI:
                if self.outgoing:
                    self.set_reg(THR, self.outgoing.pop(0))
                else:
                    self.set_reg(IER, IER_RDI)  # nothing more to send
        if self.irq_index == VFIO_PCI_INTX_IRQ_INDEX:
            self.dev.unmask_intx()  # INTx is automasked until the driver is done

    def run(self, want: int, stop: threading.Event) -> None:
        ep = select.epoll()
        ep.register(self.efd, select.EPOLLIN)
        try:
            while (len(self.received) < want or self.outgoing) and not stop.is_set():
                for _ in ep.poll(0.5):
                    self.irq_count += os.eventfd_read(self.efd)
                    self.service()
        finally:
            ep.close()


@pytest.mark.parametrize("irq_index", [VFIO_PCI_MSI_IRQ_INDEX, VFIO_PCI_INTX_IRQ_INDEX], ids=["msi", "intx"])
def test_uart_sends_and_receives_by_interrupts(mount, irq_index):
    message_out = b"driver says hello through THR, one interrupt at a time"
    message_in = bytes(range(32, 127))  # more than the 16-byte FIFO: refilled as the driver drains it
    port = os.open(mount.node("ports/vfio3"), os.O_RDWR | os.O_NONBLOCK)
    with IommuFd(mount.iommu) as iommu, VfioDevice(mount.device(3)) as dev:
        dev.bind_iommufd(iommu)
        efd = os.eventfd(0, os.EFD_CLOEXEC)
        dev.enable_irq_eventfds(irq_index, [efd])
        driver = InterruptDrivenUart(dev, irq_index, efd, message_out)
        stop = threading.Event()
        thread = threading.Thread(target=driver.run, args=(len(message_in), stop))
        driver.start()
        thread.start()
        # the host side: feed bytes in as the FIFO has room, collect what the driver sends
        to_send, got = bytearray(message_in), bytearray()
        poller = select.poll()
        poller.register(port, select.POLLIN | select.POLLOUT)
        while (to_send or len(got) < len(message_out)) and thread.is_alive():
            for _, events in poller.poll(1000):
                if events & select.POLLOUT and to_send:
                    try:
                        del to_send[: os.write(port, bytes(to_send))]
                    except BlockingIOError:
                        pass
                if events & select.POLLIN:
                    try:
                        got += os.read(port, 4096)
                    except BlockingIOError:
                        pass
            if not to_send:
                poller.modify(port, select.POLLIN)
        thread.join(20)
        stop.set()
        os.close(efd)
    os.close(port)
    assert not thread.is_alive()
    assert bytes(driver.received) == message_in
    assert bytes(got) == message_out
    assert driver.irq_count >= 1  # it only ever touched the device in response to one
