"""A 16550 UART, behaving like the Linux ``mtty`` sample (samples/vfio-mdev/mtty.c), with a host side.

The bundled definition is ``devices/uart.toml`` (PCI 4348:3253 rev 0x10, class 07/00 prog-if 02,
subsystem 4348:3253, INTA, one MSI vector, BAR0 = 8 bytes of I/O space). One port lives in BAR0;
this model handles every BAR0 access itself (the definition declares no registers).

BAR0 (one byte per register; a wider access is taken as consecutive byte accesses in address
order, so a 2-byte read at 0 reads RBR then IER):

======  =========================================  ==========================================
offset  read                                       write
======  =========================================  ==========================================
0       RBR: next byte of the RX FIFO (0 if none)  THR: transmit a byte
        DLL when LCR.DLAB                          DLL when LCR.DLAB
1       IER & 0x0f (DLM when LCR.DLAB)             IER (DLM when LCR.DLAB)
2       IIR (| 0xC0 while FCR.FIFOE is set)        FCR: bit0 FIFOs on, bit1 clear RX, bit2 clear TX
3       LCR                                        LCR (bit 7 = DLAB)
4       MCR                                        MCR (bit 4 LOOP, bit 5 AFE)
5       LSR: DR 0x01, OE 0x02, THRE 0x20, TEMT 0x40  ignored
6       MSR: DCD|DSR|DDSR, plus CTS|DCTS unless    ignored
        MCR.AFE is set and the RX FIFO is full
7       SCR                                        SCR
======  =========================================  ==========================================

* **Transmit** is instantaneous: THRE and TEMT are always set. A THR write goes to the host
  side (:meth:`Uart16550.host_read`), or, with MCR.LOOP, into the RX FIFO. In loopback the
  line is disconnected both ways, as on a real 16550: nothing reaches the host and
  :meth:`Uart16550.host_write` takes nothing.
* **Receive**: a 16-byte FIFO, whatever FCR.FIFOE says (mtty always buffers 16 bytes; FIFOE
  only changes IIR's top bits). A byte that arrives by loopback into a full FIFO is dropped
  and sets LSR.OE (an overrun); reading LSR clears OE. The host side is flow-controlled
  instead: it only hands over what fits.
* **Trigger level**: always 1 byte. FCR's trigger-level bits are accepted and ignored, as
  in mtty, whose code decodes them and then overwrites the level with 1.
* **Interrupts** (IIR, highest priority first; each only when enabled in IER):
  receiver line status 0x06 (overrun; ELSI 0x04), received data 0x04 (RX FIFO non-empty;
  ERBFI 0x01), THR empty 0x02 (ETBEI 0x02), modem status 0x00 (EDSSI 0x08); 0x01 = none.
  THR empty is a latch, as on a 16550: set by a THR write and by turning ETBEI on (the
  holding register is always empty here), cleared by the IIR read that reports it.
  Modem status is a latch too: mtty raises it when MCR is written with OUT2 or RTS/DTR
  set; reading MSR clears it. (mtty's MSR reports DDSR and DCTS permanently, so the delta
  bits themselves cannot be the condition: that would interrupt forever.)
* **Interrupt output**: INTx is a level, asserted while IIR shows an interrupt, deasserted
  when it goes back to none; every none → pending transition also sends MSI vector 0. The
  core delivers whichever of the two the driver enabled. (mtty does not gate the line with
  MCR.OUT2, so neither does this model.)
* **Power-on state** (also after reset and after the bound handle closes): IER, LCR,
  MCR, SCR, FCR and the divisor latch 0, FIFOs empty, no overrun, no latched interrupt,
  INTx deasserted. What was already transmitted to the host stays in the host buffer: it
  is on the wire, not in the device.

The host side (the other end of the serial line; the FUSE layer serves it as
``<mnt>/ports/vfioN``): :meth:`~Uart16550.host_read` takes what the driver transmitted (kept
in a buffer of at most :attr:`~Uart16550.host_buffer_limit` bytes, the oldest dropped
first), :meth:`~Uart16550.host_write` feeds bytes to the driver. The model reports news
for the host side through its context (:meth:`~vfiofs.models.api.ModelContext.host_port_changed`)
when transmitted bytes arrive, and when the RX FIFO gets room again after being full.
"""

from __future__ import annotations

from vfiofs import abi
from vfiofs.models.api import DeviceModel, ModelContext
from vfiofs.models.spec import DeviceSpec

FIFO_SIZE = 16
TRIGGER_LEVEL = 1  # mtty overwrites the FCR-decoded level with 1; so does this model
HOST_BUFFER_LIMIT = 64 * 1024

# register offsets
UART_RX = UART_TX = UART_DLL = 0
UART_IER = UART_DLM = 1
UART_IIR = UART_FCR = 2
UART_LCR = 3
UART_MCR = 4
UART_LSR = 5
UART_MSR = 6
UART_SCR = 7

# IER
UART_IER_RDI = 0x01  # ERBFI: received data available
UART_IER_THRI = 0x02  # ETBEI: transmitter holding register empty
UART_IER_RLSI = 0x04  # ELSI: receiver line status
UART_IER_MSI = 0x08  # EDSSI: modem status
UART_IER_MASK = 0x0F

# IIR
UART_IIR_NO_INT = 0x01
UART_IIR_MSI = 0x00
UART_IIR_THRI = 0x02
UART_IIR_RDI = 0x04
UART_IIR_RLSI = 0x06
UART_IIR_FIFO_BITS = 0xC0

# FCR
UART_FCR_ENABLE_FIFO = 0x01
UART_FCR_CLEAR_RCVR = 0x02
UART_FCR_CLEAR_XMIT = 0x04

# LCR
UART_LCR_DLAB = 0x80

# MCR
UART_MCR_DTR = 0x01
UART_MCR_RTS = 0x02
UART_MCR_OUT2 = 0x08
UART_MCR_LOOP = 0x10
UART_MCR_AFE = 0x20

# LSR
UART_LSR_DR = 0x01
UART_LSR_OE = 0x02
UART_LSR_THRE = 0x20
UART_LSR_TEMT = 0x40

# MSR
UART_MSR_DCTS = 0x01
UART_MSR_DDSR = 0x02
UART_MSR_CTS = 0x10
UART_MSR_DSR = 0x20
UART_MSR_DCD = 0x80


class Uart16550(DeviceModel):
    """One 16550 port in I/O BAR0, mtty's register behaviour, and a host side for the other end."""

    has_host_port = True
    #: the most transmitted bytes kept for the host side; older ones are dropped first
    host_buffer_limit: int = HOST_BUFFER_LIMIT

    def __init__(self, spec: DeviceSpec, context: ModelContext | None = None) -> None:
        super().__init__(spec, context)
        self.host_dropped = 0  # transmitted bytes lost because the host side did not read them
        self._to_host = bytearray()
        self._intx_level = False
        self._power_on()

    def _power_on(self) -> None:
        self.ier = 0
        self.lcr = 0
        self.mcr = 0
        self.scr = 0
        self.fcr = 0
        self.dll = 0
        self.dlm = 0
        self.rx = bytearray()  # the receive FIFO, oldest byte first
        self.overrun = False
        self.thri_pending = False
        self.msi_pending = False

    def reset(self) -> None:
        room_before = self.host_room()
        super().reset()
        self._power_on()
        if self._intx_level:
            self._intx_level = False
            self.deassert_intx()
        if room_before == 0:
            self.context.host_port_changed()  # the FIFO is empty and the loop open again

    # -- BAR0 ---------------------------------------------------------------------------------
    def bar_read(self, index: int, offset: int, size: int) -> bytes:
        if index != 0:
            return super().bar_read(index, offset, size)
        room_before = self.host_room()
        data = bytes(self._read(reg) for reg in range(offset, offset + size))
        self._after_access(room_before)
        return data

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        if index != 0:
            return super().bar_write(index, offset, data)
        room_before = self.host_room()
        for reg, value in enumerate(data, offset):
            self._write(reg, value)
        self._after_access(room_before)

    def _after_access(self, room_before: int) -> None:
        self._update_irq()
        if room_before == 0 and self.host_room() > 0:
            self.context.host_port_changed()  # room for the host side again

    def _read(self, reg: int) -> int:
        dlab = self.lcr & UART_LCR_DLAB
        if reg == UART_RX:
            if dlab:
                return self.dll
            if not self.rx:
                return 0
            value = self.rx.pop(0)
            self._update_irq()
            return value
        if reg == UART_IER:
            return self.dlm if dlab else self.ier & UART_IER_MASK
        if reg == UART_IIR:
            iir = self._iir()
            if iir == UART_IIR_THRI:
                self.thri_pending = False  # 16550: reading IIR clears a THR-empty interrupt
                self._update_irq()
            return iir | (UART_IIR_FIFO_BITS if self.fcr & UART_FCR_ENABLE_FIFO else 0)
        if reg == UART_LCR:
            return self.lcr
        if reg == UART_MCR:
            return self.mcr
        if reg == UART_LSR:
            return self._read_lsr()
        if reg == UART_MSR:
            value = self.msr()
            self.msi_pending = False
            self._update_irq()
            return value
        if reg == UART_SCR:
            return self.scr
        return 0xFF  # outside the 8 registers: cannot happen in an 8-byte BAR

    def _read_lsr(self) -> int:
        value = self.lsr()
        if self.overrun:
            self.overrun = False  # reading LSR clears OE and with it the line-status interrupt
            self._update_irq()
        return value

    def msr(self) -> int:
        """The modem status register (reading it through BAR0 also clears a modem-status interrupt)."""
        value = UART_MSR_DCD | UART_MSR_DSR | UART_MSR_DDSR
        if not (self.mcr & UART_MCR_AFE and len(self.rx) >= FIFO_SIZE):
            value |= UART_MSR_CTS | UART_MSR_DCTS
        return value

    def lsr(self) -> int:
        """LSR as the driver would read it, without the read's side effect (OE stays)."""
        value = UART_LSR_THRE | UART_LSR_TEMT
        if self.rx:
            value |= UART_LSR_DR
        if self.overrun:
            value |= UART_LSR_OE
        return value

    def _write(self, reg: int, value: int) -> None:
        dlab = self.lcr & UART_LCR_DLAB
        if reg == UART_TX:
            if dlab:
                self.dll = value
            else:
                self._transmit(value)
        elif reg == UART_IER:
            if dlab:
                self.dlm = value
            else:
                if value & UART_IER_THRI and not self.ier & UART_IER_THRI:
                    self.thri_pending = True  # THR is always empty: enabling ETBEI interrupts at once
                self.ier = value & UART_IER_MASK
        elif reg == UART_FCR:
            # The trigger-level bits (6-7) are stored but ignored: the level is always 1, as in mtty.
            self.fcr = value
            if value & UART_FCR_CLEAR_RCVR:
                self.rx.clear()
            # UART_FCR_CLEAR_XMIT: the transmitter is always empty (transmission is instantaneous);
            # what already went to the host side is on the wire and stays there.
        elif reg == UART_LCR:
            self.lcr = value
        elif reg == UART_MCR:
            self.mcr = value
            # mtty: writing MCR with OUT2, or with RTS/DTR, raises a modem-status interrupt
            if value & (UART_MCR_OUT2 | UART_MCR_RTS | UART_MCR_DTR):
                self.msi_pending = True
        elif reg == UART_SCR:
            self.scr = value
        # LSR and MSR are read-only

    def _transmit(self, value: int) -> None:
        self.thri_pending = True  # the byte leaves at once: THR is empty again
        if self.mcr & UART_MCR_LOOP:
            if len(self.rx) < FIFO_SIZE:
                self.rx.append(value)
            else:
                self.overrun = True  # the byte is lost
            return
        self._to_host.append(value)
        excess = len(self._to_host) - self.host_buffer_limit
        if excess > 0:
            del self._to_host[:excess]
            self.host_dropped += excess
        self.context.host_port_changed()  # bytes for the host side

    # -- interrupts ---------------------------------------------------------------------------
    def _iir(self) -> int:
        """The highest-priority pending, enabled interrupt (IIR without the FIFO bits)."""
        ier = self.ier
        if ier & UART_IER_RLSI and self.overrun:
            return UART_IIR_RLSI
        if ier & UART_IER_RDI and len(self.rx) >= TRIGGER_LEVEL:
            return UART_IIR_RDI
        if ier & UART_IER_THRI and self.thri_pending:
            return UART_IIR_THRI
        if ier & UART_IER_MSI and self.msi_pending:
            return UART_IIR_MSI
        return UART_IIR_NO_INT

    def _update_irq(self) -> None:
        """Drive INTx from IIR; send MSI vector 0 on each none → pending transition."""
        pending = self._iir() != UART_IIR_NO_INT
        if pending == self._intx_level:
            return
        self._intx_level = pending
        if pending:
            self.assert_intx()
            self.raise_irq(abi.VFIO_PCI_MSI_IRQ_INDEX, 0)
        else:
            self.deassert_intx()

    # -- the host side (the other end of the line) ------------------------------------------------
    def host_pending(self) -> int:
        """How many transmitted bytes :meth:`host_read` would return."""
        return len(self._to_host)

    def host_room(self) -> int:
        """How many bytes :meth:`host_write` would take now (0 while in loopback)."""
        if self.mcr & UART_MCR_LOOP:
            return 0
        return FIFO_SIZE - len(self.rx)

    def host_read(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` of what the driver transmitted, oldest first; consumed."""
        if max_bytes <= 0:
            return b""
        data = bytes(self._to_host[:max_bytes])
        del self._to_host[:max_bytes]
        return data

    def host_write(self, data: bytes) -> int:
        """Feed ``data`` to the driver's RX FIFO while it has room; returns how many bytes it took."""
        taken = min(len(data), self.host_room())
        if taken:
            self.rx += data[:taken]
            self._update_irq()
        return taken
