"""The 16550 UART (vfiofs/models/uart.py, devices/uart.toml): the model without FUSE, then its
BAR0 and its host port (<mnt>/ports/vfio3) through a real mount."""

from __future__ import annotations

import errno
import os
import select
import threading
import time

import pyfuse3
import pytest

from support import REPO, errno_of
from vfiofs.client import IommuFd, VfioDevice
from vfiofs.host.daemon import build_server
from vfiofs.models.definitions import bundled_directory, load_definition, load_directory
from vfiofs.models.api import InterruptSink
from vfiofs.models.uart import Uart16550

RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR, MCR, LSR, MSR, SCR = 3, 4, 5, 6, 7

DLAB = 0x80
LOOP, AFE = 0x10, 0x20
DTR, RTS, OUT2 = 0x01, 0x02, 0x08
ERBFI, ETBEI, ELSI, EDSSI = 0x01, 0x02, 0x04, 0x08
DR, OE, THRE, TEMT = 0x01, 0x02, 0x20, 0x40
NO_INT, IIR_MSI, IIR_THRI, IIR_RDI, IIR_RLSI = 0x01, 0x00, 0x02, 0x04, 0x06
MSR_BASE = 0x80 | 0x20 | 0x02  # DCD | DSR | DDSR
MSR_CTS = 0x10 | 0x01  # CTS | DCTS
UART = 3  # devices/uart.toml sorts after showcase.toml: vfio3


class RecordingSink(InterruptSink):
    """Records what the model drives: INTx levels and MSI/MSI-X messages, in order."""

    irq_type = "msi"

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.level = False

    def raise_irq(self, index: int, vector: int = 0) -> None:
        self.events.append(("irq", index, vector))

    def set_intx(self, asserted: bool) -> None:
        self.level = asserted
        self.events.append(("intx", asserted))

    def take(self) -> list[tuple]:
        events, self.events = self.events, []
        return events


@pytest.fixture
def uart() -> Uart16550:
    model = load_definition(REPO / "devices" / "uart.toml").build()
    assert isinstance(model, Uart16550)
    model.interrupts = RecordingSink()
    yield model
    model.shutdown()


def rd(model: Uart16550, reg: int) -> int:
    return model.bar_read(0, reg, 1)[0]


def wr(model: Uart16550, reg: int, value: int) -> None:
    model.bar_write(0, reg, bytes([value]))


# -- the definition ------------------------------------------------------------------------------

def test_definition():
    definition = load_definition(REPO / "devices" / "uart.toml")
    spec = definition.spec
    assert definition.model == "uart16550" and definition.name == "uart"
    ident = spec.identity
    assert (ident.vendor, ident.device, ident.class_code, ident.revision) == (0x4348, 0x3253, 0x070002, 0x10)
    assert (ident.subsystem_vendor, ident.subsystem_device, ident.interrupt_pin) == (0x4348, 0x3253, 1)
    assert [(bar.index, bar.size, bar.io, bar.registers) for bar in spec.bars] == [(0, 8, True, ())]
    msi = spec.capability("msi")
    assert (msi.vectors, msi.address64) == (1, False)
    assert [cap.kind for cap in spec.capabilities] == ["msi"]


# -- registers -----------------------------------------------------------------------------------

def test_power_on_registers(uart):
    assert list(uart.bar_read(0, 0, 8)) == [0, 0, NO_INT, 0, 0, THRE | TEMT, MSR_BASE | MSR_CTS, 0]
    assert uart.interrupts.events == []


def test_dlab_switches_offsets_0_and_1_to_the_divisor_latch(uart):
    wr(uart, IER, 0x05)
    wr(uart, LCR, DLAB | 0x03)
    assert (rd(uart, DLL), rd(uart, DLM)) == (0, 0)
    wr(uart, DLL, 0x0C)
    wr(uart, DLM, 0x01)
    assert (rd(uart, DLL), rd(uart, DLM), rd(uart, LCR)) == (0x0C, 0x01, DLAB | 0x03)
    assert uart.host_read(100) == b""  # a DLL write transmits nothing
    wr(uart, LCR, 0x03)
    assert (rd(uart, RBR), rd(uart, IER)) == (0, 0x05)  # IER kept, RBR empty
    wr(uart, LCR, DLAB)
    assert (rd(uart, DLL), rd(uart, DLM)) == (0x0C, 0x01)  # the latch is kept


def test_ier_reads_masked_to_low_nibble(uart):
    wr(uart, IER, 0xF0)
    assert rd(uart, IER) == 0x00
    wr(uart, IER, 0xFA)
    assert rd(uart, IER) == 0x0A


def test_scr_lcr_mcr_read_back(uart):
    wr(uart, SCR, 0x5A)
    wr(uart, LCR, 0x1B)
    wr(uart, MCR, 0x03)
    assert (rd(uart, SCR), rd(uart, LCR), rd(uart, MCR)) == (0x5A, 0x1B, 0x03)


def test_lsr_and_msr_ignore_writes(uart):
    wr(uart, LSR, 0xFF)
    wr(uart, MSR, 0x00)
    assert (rd(uart, LSR), rd(uart, MSR)) == (THRE | TEMT, MSR_BASE | MSR_CTS)


def test_fcr_fifo_enable_sets_iir_top_bits(uart):
    assert rd(uart, IIR) == NO_INT
    wr(uart, FCR, 0x01)
    assert rd(uart, IIR) == 0xC0 | NO_INT
    wr(uart, FCR, 0xC1)  # trigger level 14 is accepted but the level stays 1
    uart.host_write(b"x")
    wr(uart, IER, ERBFI)
    assert rd(uart, IIR) == 0xC0 | IIR_RDI
    wr(uart, FCR, 0x00)
    assert rd(uart, IIR) == IIR_RDI


def test_fcr_clears_rx_fifo(uart):
    assert uart.host_write(b"abc") == 3
    wr(uart, FCR, 0x01 | 0x04)  # clearing TX leaves RX alone
    assert rd(uart, LSR) == DR | THRE | TEMT
    wr(uart, FCR, 0x01 | 0x02)
    assert rd(uart, LSR) == THRE | TEMT
    assert rd(uart, RBR) == 0


def test_fcr_clear_tx_keeps_what_was_transmitted(uart):
    wr(uart, THR, ord("A"))
    wr(uart, FCR, 0x05)
    assert uart.host_read(10) == b"A"


# -- transmit, loopback, overrun ----------------------------------------------------------------

def test_loopback_tx_to_rx(uart):
    wr(uart, FCR, 0x07)
    wr(uart, MCR, LOOP)
    assert rd(uart, LSR) == THRE | TEMT
    for byte in b"hi!":
        wr(uart, THR, byte)
    assert rd(uart, LSR) == DR | THRE | TEMT
    assert bytes(rd(uart, RBR) for _ in range(3)) == b"hi!"
    assert rd(uart, LSR) == THRE | TEMT
    assert rd(uart, RBR) == 0  # empty FIFO
    assert uart.host_read(100) == b""  # loopback disconnects the line
    assert uart.host_room() == 0 and uart.host_write(b"zz") == 0


def test_overrun_sets_oe_and_drops_the_byte(uart):
    wr(uart, MCR, LOOP)
    for i in range(16):
        wr(uart, THR, 0x30 + i)
    assert rd(uart, LSR) == DR | THRE | TEMT
    wr(uart, THR, 0x99)  # the 17th byte
    assert rd(uart, LSR) == OE | DR | THRE | TEMT
    assert rd(uart, LSR) == DR | THRE | TEMT  # OE clears when LSR is read
    assert bytes(rd(uart, RBR) for _ in range(16)) == bytes(range(0x30, 0x40))
    assert rd(uart, LSR) == THRE | TEMT


def test_overrun_interrupt_has_priority_over_received_data(uart):
    sink = uart.interrupts
    wr(uart, MCR, LOOP)
    for i in range(17):
        wr(uart, THR, i)
    wr(uart, IER, ERBFI | ELSI)
    assert sink.take() == [("intx", True), ("irq", 1, 0)]
    assert rd(uart, IIR) == IIR_RLSI
    assert rd(uart, IIR) == IIR_RLSI  # reading IIR does not clear line status
    assert rd(uart, LSR) == OE | DR | THRE | TEMT
    assert rd(uart, IIR) == IIR_RDI
    assert sink.take() == []  # still pending: the line stays up, no new MSI
    wr(uart, IER, ERBFI)  # without ELSI an overrun does not interrupt
    wr(uart, THR, 0xEE)
    assert rd(uart, IIR) == IIR_RDI


# -- interrupt identification ------------------------------------------------------------------

def test_iir_priority_order(uart):
    sink = uart.interrupts
    wr(uart, MCR, LOOP | DTR)  # modem-status condition (mtty: DTR/RTS written)
    for i in range(17):
        wr(uart, THR, i)  # RX full + overrun; the THR writes arm THR empty
    assert rd(uart, IIR) == NO_INT  # nothing enabled yet
    assert sink.events == []
    wr(uart, IER, ERBFI | ETBEI | ELSI | EDSSI)
    assert rd(uart, IIR) == IIR_RLSI
    rd(uart, LSR)  # clears the overrun
    assert rd(uart, IIR) == IIR_RDI
    wr(uart, FCR, 0x02)  # RX emptied
    assert rd(uart, IIR) == IIR_THRI  # and this read clears THR empty
    assert rd(uart, IIR) == IIR_MSI
    assert rd(uart, MSR) == MSR_BASE | MSR_CTS  # clears the modem-status interrupt
    assert rd(uart, IIR) == NO_INT
    assert sink.take() == [("intx", True), ("irq", 1, 0), ("intx", False)]


def test_thri_cleared_by_iir_read_and_rearmed_by_thr_write(uart):
    sink = uart.interrupts
    wr(uart, IER, ETBEI)  # enabling ETBEI with THR empty interrupts at once
    assert sink.take() == [("intx", True), ("irq", 1, 0)]
    assert rd(uart, IIR) == IIR_THRI
    assert sink.take() == [("intx", False)]
    assert rd(uart, IIR) == NO_INT
    wr(uart, THR, ord("x"))
    assert sink.take() == [("intx", True), ("irq", 1, 0)]
    assert rd(uart, IIR) == IIR_THRI
    assert rd(uart, IIR) == NO_INT
    wr(uart, IER, ETBEI)  # writing IER with ETBEI already on does not re-arm it
    assert rd(uart, IIR) == NO_INT
    wr(uart, IER, 0)
    wr(uart, IER, ETBEI)  # turning it off and on again does
    assert rd(uart, IIR) == IIR_THRI
    assert uart.host_read(10) == b"x"


def test_mcr_writes_raise_modem_status_interrupt(uart):
    sink = uart.interrupts
    wr(uart, IER, EDSSI)
    wr(uart, MCR, 0x00)
    assert rd(uart, IIR) == NO_INT and sink.events == []
    for bits in (OUT2, RTS, DTR):
        wr(uart, MCR, bits)
        assert sink.take() == [("intx", True), ("irq", 1, 0)]
        assert rd(uart, IIR) == IIR_MSI
        assert rd(uart, MSR) == MSR_BASE | MSR_CTS
        assert sink.take() == [("intx", False)]
        assert rd(uart, IIR) == NO_INT
    wr(uart, IER, 0)
    wr(uart, MCR, DTR)
    assert rd(uart, IIR) == NO_INT and sink.events == []  # not enabled: no interrupt


def test_msr_cts_follows_afe_and_a_full_fifo(uart):
    assert rd(uart, MSR) == MSR_BASE | MSR_CTS
    assert uart.host_write(bytes(16)) == 16
    assert rd(uart, MSR) == MSR_BASE | MSR_CTS  # full, but AFE off
    wr(uart, MCR, AFE)
    assert rd(uart, MSR) == MSR_BASE  # AFE and full: CTS and DCTS drop
    rd(uart, RBR)
    assert rd(uart, MSR) == MSR_BASE | MSR_CTS
    assert MSR_BASE | MSR_CTS == 0xB3 and MSR_BASE == 0xA2


def test_wide_access_is_byte_accesses_in_order(uart):
    wr(uart, LCR, DLAB)
    uart.bar_write(0, 0, b"\x34\x12")
    assert uart.bar_read(0, 0, 2) == b"\x34\x12"
    assert uart.bar_read(0, 3, 1) == bytes([DLAB])
    wr(uart, LCR, 0)
    uart.bar_write(0, 4, b"\x00\xff\xff\x77")  # MCR, LSR (ignored), MSR (ignored), SCR
    assert uart.bar_read(0, 4, 4) == bytes([0, THRE | TEMT, MSR_BASE | MSR_CTS, 0x77])


# -- host side ---------------------------------------------------------------------------------

def test_host_write_fills_rx_fifo_and_raises_rdi(uart):
    sink = uart.interrupts
    wr(uart, IER, ERBFI)
    assert sink.events == []
    assert uart.host_write(b"world") == 5
    assert sink.take() == [("intx", True), ("irq", 1, 0)]
    assert sink.level is True
    assert rd(uart, IIR) == IIR_RDI
    assert uart.host_write(b"!") == 1  # already pending: no new edge
    assert sink.take() == []
    received = b""
    while rd(uart, LSR) & DR:
        assert sink.level is True
        received += bytes([rd(uart, RBR)])
    assert received == b"world!"
    assert sink.take() == [("intx", False)]  # reading RBR until empty deasserts
    assert sink.level is False
    assert rd(uart, IIR) == NO_INT
    assert uart.host_write(b"?") == 1  # a new edge: MSI again
    assert sink.take() == [("intx", True), ("irq", 1, 0)]


def test_host_write_takes_only_what_fits(uart):
    assert uart.host_room() == 16
    assert uart.host_write(bytes(range(20))) == 16
    assert uart.host_room() == 0
    assert uart.host_write(b"more") == 0
    assert rd(uart, LSR) == DR | THRE | TEMT  # the host side never overruns
    assert rd(uart, RBR) == 0 and uart.host_room() == 1


def test_host_read_returns_transmitted_bytes(uart):
    readable = []
    uart.on_host_readable = lambda: readable.append(uart.host_pending())
    for byte in b"hello":
        wr(uart, THR, byte)
    assert readable == [1, 2, 3, 4, 5]
    assert rd(uart, LSR) == THRE | TEMT  # transmission is instantaneous
    assert uart.host_read(2) == b"he"
    assert uart.host_read(100) == b"llo"
    assert uart.host_read(100) == b""
    assert uart.host_pending() == 0


def test_host_buffer_is_capped_oldest_dropped(uart):
    uart.host_buffer_limit = 8
    uart.bar_write(0, 0, b"A")
    for byte in b"0123456789":
        wr(uart, THR, byte)
    assert uart.host_pending() == 8
    assert uart.host_dropped == 3
    assert uart.host_read(100) == b"23456789"


def test_host_writable_notified_when_a_full_fifo_drains(uart):
    writable = []
    uart.on_host_writable = lambda: writable.append(uart.host_room())
    uart.host_write(bytes(16))
    rd(uart, RBR)
    rd(uart, RBR)  # room was already there: no second notification
    assert writable == [1]


def test_a_failing_listener_does_not_break_the_driver(uart):
    def boom():
        raise RuntimeError("listener bug")

    uart.on_host_readable = boom
    wr(uart, THR, ord("z"))
    assert uart.host_read(1) == b"z"


def test_reset_restores_power_on_state(uart):
    sink = uart.interrupts
    wr(uart, LCR, DLAB)
    wr(uart, DLL, 0x0C)
    wr(uart, LCR, 0x03)
    wr(uart, SCR, 0x42)
    wr(uart, FCR, 0x01)
    wr(uart, IER, ERBFI | ELSI)
    wr(uart, MCR, LOOP | DTR)
    for i in range(17):
        wr(uart, THR, i)
    assert sink.level is True
    sink.take()
    wr(uart, MCR, DTR)
    wr(uart, THR, ord("k"))  # transmitted before the reset: it stays with the host
    uart.reset()
    assert sink.take() == [("intx", False)]
    assert list(uart.bar_read(0, 0, 8)) == [0, 0, NO_INT, 0, 0, THRE | TEMT, MSR_BASE | MSR_CTS, 0]
    wr(uart, LCR, DLAB)
    assert (rd(uart, DLL), rd(uart, DLM)) == (0, 0)
    assert uart.host_room() == 16
    assert uart.host_read(10) == b"k"
    wr(uart, LCR, 0)
    wr(uart, IER, ETBEI)  # ETBEI after reset: THR empty interrupts as at power-on
    assert rd(uart, IIR) == IIR_THRI


# -- through a real mount --------------------------------------------------------------------------

@pytest.fixture
def bound_uart(mount):
    iommu = IommuFd(mount.iommu)
    dev = VfioDevice(mount.device(UART))
    dev.bind_iommufd(iommu)
    yield dev
    dev.close()
    iommu.close()


def port_path(mount, index: int = UART) -> str:
    return mount.node(f"ports/vfio{index}")


def wait_for(fd: int, events: int, timeout_ms: int = 5000) -> int:
    poller = select.poll()
    poller.register(fd, events)
    ready = poller.poll(timeout_ms)
    return ready[0][1] if ready else 0


def test_mount_uart_region_info(bound_uart):
    dev = bound_uart
    bar0 = dev.get_region_info(0)
    assert (bar0.size, bar0.offset) == (8, 0)
    assert dev.read(7, 0, 4) == (0x32534348).to_bytes(4, "little")
    assert dev.read(7, 0x0B, 1) == b"\x07" and dev.read(7, 0x0A, 1) == b"\x00" and dev.read(7, 0x09, 1) == b"\x02"


def test_mount_transmit_hello_to_the_port(mount, bound_uart):
    dev = bound_uart
    dev.write(0, FCR, b"\x07")  # FIFOs on, both cleared
    assert dev.read(0, IIR, 1) == bytes([0xC0 | NO_INT])
    port = os.open(port_path(mount), os.O_RDWR | os.O_NONBLOCK)
    try:
        assert errno_of(os.read, port, 100) == errno.EAGAIN  # nothing transmitted yet
        assert wait_for(port, select.POLLIN, 0) == 0
        for byte in b"hello":
            dev.write(0, THR, bytes([byte]))
            assert dev.read(0, LSR, 1) == bytes([THRE | TEMT])
        assert wait_for(port, select.POLLIN) & select.POLLIN
        assert os.read(port, 100) == b"hello"
        assert errno_of(os.read, port, 100) == errno.EAGAIN
    finally:
        os.close(port)


def test_mount_poll_wakes_when_the_driver_transmits(mount, bound_uart):
    """A poller that is already asleep is woken by the THR write (poll_handle.notify)."""
    dev = bound_uart
    port = os.open(port_path(mount), os.O_RDWR | os.O_NONBLOCK)
    try:
        result = {}

        def waiter_thread() -> None:
            start = time.monotonic()
            result["revents"] = wait_for(port, select.POLLIN, 10000)
            result["waited"] = time.monotonic() - start

        waiter = threading.Thread(target=waiter_thread)
        waiter.start()
        time.sleep(0.2)  # let it fall asleep in the kernel: the wake-up is what is tested
        dev.write(0, THR, b"Q")
        waiter.join(15)
        assert not waiter.is_alive()
        assert result["revents"] & select.POLLIN
        # woken by the notification, not by the timeout (poll re-checks once when it expires)
        assert result["waited"] < 5
        assert os.read(port, 10) == b"Q"
    finally:
        os.close(port)


def test_mount_port_write_reaches_rbr(mount, bound_uart):
    dev = bound_uart
    dev.write(0, FCR, b"\x07")
    assert dev.read(0, LSR, 1) == bytes([THRE | TEMT])
    port = os.open(port_path(mount), os.O_RDWR | os.O_NONBLOCK)
    try:
        assert wait_for(port, select.POLLOUT, 0) & select.POLLOUT
        assert os.write(port, b"world") == 5
        dev.write(0, IER, bytes([ERBFI]))
        assert dev.read(0, IIR, 1) == bytes([0xC0 | IIR_RDI])
        received = b""
        while dev.read(0, LSR, 1)[0] & DR:
            received += dev.read(0, RBR, 1)
        assert received == b"world"
        assert dev.read(0, LSR, 1) == bytes([THRE | TEMT])
        assert dev.read(0, IIR, 1) == bytes([0xC0 | NO_INT])
        # a full FIFO: a short write, then EAGAIN, and no POLLOUT until the driver reads
        assert os.write(port, bytes(20)) == 16
        assert errno_of(os.write, port, b"x") == errno.EAGAIN
        assert wait_for(port, select.POLLOUT, 0) == 0
        dev.read(0, RBR, 1)
        assert wait_for(port, select.POLLOUT, 0) & select.POLLOUT
        assert os.write(port, b"xy") == 1
    finally:
        os.close(port)


def test_mount_ports_tree(mount):
    assert os.listdir(mount.node("ports")) == [f"vfio{UART}"]
    st = os.stat(port_path(mount))
    assert (oct(st.st_mode), st.st_uid) == (oct(0o100600), os.getuid())
    assert oct(os.stat(mount.node("ports")).st_mode) == oct(0o40755)
    for index in (0, 1, 2):  # devices without a host side have no port
        assert not os.path.exists(port_path(mount, index))
        assert errno_of(os.open, port_path(mount, index), os.O_RDWR) == errno.ENOENT


def test_mount_port_works_without_a_binder(mount):
    port = os.open(port_path(mount), os.O_RDWR | os.O_NONBLOCK)
    try:
        assert errno_of(os.read, port, 10) == errno.EAGAIN
        assert os.write(port, b"early") == 5  # the line is there even while no driver is bound
        # a device node's poll is the kernel's default (a vfio device fd has no poll method)
        fd = os.open(mount.device(0), os.O_RDWR)
        try:
            assert wait_for(fd, select.POLLIN | select.POLLOUT, 0) == select.POLLIN | select.POLLOUT
        finally:
            os.close(fd)
        assert wait_for(port, select.POLLIN, 0) == 0  # and the port's own poll still works
    finally:
        os.close(port)
