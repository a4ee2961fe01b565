"""The 16550 UART model (vfiofs/models/uart.py, devices/uart.toml) without a mount: its
registers, interrupts and host port, on a standalone context with a recording interrupt sink.
Through a real mount: tests/mount/test_uart.py."""

from __future__ import annotations

import pytest

from support import RecordingSink
from vfiofs.host.definitions import bundled_directory, load_definition
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


DEFINITION = load_definition(bundled_directory() / "uart.toml")


class SmallBufferUart(Uart16550):
    host_buffer_limit = 8


@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink("msi")


@pytest.fixture
def uart(sink) -> Uart16550:
    model = DEFINITION.build()
    assert isinstance(model, Uart16550)
    model.context.connect_interrupts(sink)
    yield model
    model.shutdown()


def rd(model: Uart16550, reg: int) -> int:
    return model.bar_read(0, reg, 1)[0]


def wr(model: Uart16550, reg: int, value: int) -> None:
    model.bar_write(0, reg, bytes([value]))


# -- the definition ------------------------------------------------------------------------------

def test_definition():
    definition = DEFINITION
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

def test_power_on_registers(uart, sink):
    assert list(uart.bar_read(0, 0, 8)) == [0, 0, NO_INT, 0, 0, THRE | TEMT, MSR_BASE | MSR_CTS, 0]
    assert sink.events == []


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


def test_overrun_interrupt_has_priority_over_received_data(uart, sink):
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

def test_iir_priority_order(uart, sink):
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


def test_thri_cleared_by_iir_read_and_rearmed_by_thr_write(uart, sink):
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


def test_mcr_writes_raise_modem_status_interrupt(uart, sink):
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

def test_host_write_fills_rx_fifo_and_raises_rdi(uart, sink):
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
    uart.context.watch_host_port(lambda: readable.append(uart.host_pending()))
    for byte in b"hello":
        wr(uart, THR, byte)
    assert readable == [1, 2, 3, 4, 5]
    assert rd(uart, LSR) == THRE | TEMT  # transmission is instantaneous
    assert uart.host_read(2) == b"he"
    assert uart.host_read(100) == b"llo"
    assert uart.host_read(100) == b""
    assert uart.host_pending() == 0


def test_host_buffer_is_capped_oldest_dropped():
    uart = SmallBufferUart(DEFINITION.spec)
    uart.bar_write(0, 0, b"A")
    for byte in b"0123456789":
        wr(uart, THR, byte)
    assert uart.host_pending() == 8
    assert uart.host_dropped == 3
    assert uart.host_read(100) == b"23456789"


def test_host_writable_notified_when_a_full_fifo_drains(uart):
    writable = []
    uart.context.watch_host_port(lambda: writable.append(uart.host_room()))
    uart.host_write(bytes(16))
    rd(uart, RBR)
    rd(uart, RBR)  # room was already there: no second notification
    assert writable == [1]


def test_a_failing_listener_does_not_break_the_driver(uart):
    def boom():
        raise RuntimeError("listener bug")

    uart.context.watch_host_port(boom)
    wr(uart, THR, ord("z"))
    assert uart.host_read(1) == b"z"


def test_reset_restores_power_on_state(uart, sink):
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
