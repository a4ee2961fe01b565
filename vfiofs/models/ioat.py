"""An Intel I/OAT (Crystal Beach) DMA engine, one channel, as a vfiofs model.

Modelled on the Skylake-SP CBDMA function (PCI 8086:2021, I/OAT version 3.3) from the public
register descriptions in Linux (``drivers/dma/ioat/registers.h``, ``hw.h``), far enough for
the drivers that use one channel for memcpy — above all the VFIO selftests' ioat driver
(``tools/testing/selftests/vfio/lib/drivers/ioat/ioat.c``). The bundled definition is
``devices/vioat.toml``: BAR0 16 KiB (64-bit, mappable), MSI-X with one vector whose table
and PBA are in BAR0 at 0x2000 and 0x3000, PCI Express (4 KiB config space), PM, INTA.

The register file is BAR0 [0, 0x100): the device registers at 0, channel 0 at 0x80. Its
values live in the BAR memory itself, so a mapping of BAR0 reads what pread reads; but only
an access that reaches :meth:`IoatDevice.bar_write` (pwrite, or a trapped store) has an
effect. All little-endian; any access size, partial accesses work on the bytes they cover.

=========  ==========  =====  ====  ===================================================
offset     name        width  R/W   behaviour
=========  ==========  =====  ====  ===================================================
0x00       CHANCNT     1      RO    1 (one channel)
0x01       XFERCAP     1      RO    log2 of the largest transfer,
                                    :attr:`IoatDevice.xfercap` (12: 4 KiB)
0x02       GENCTRL     1      RW    stored, no effect
0x03       INTRCTRL    1      RW    bit 0 MASTER_INT_EN and bit 3 MSIX_VECTOR_CONTROL
                                    are stored; bit 1 INT_STATUS (ATTNSTATUS != 0) and
                                    bit 2 INT (INT_STATUS and MASTER_INT_EN) read-only
0x04       ATTNSTATUS  4      RC    bit 0: channel 0 interrupted; a read clears it
0x08       VER         1      RO    0x33 (I/OAT 3.3), :attr:`IoatDevice.version`
0x0C       INTRDELAY   2      RW    bits 0-13 stored, no effect (no coalescing)
0x0E       DEVSTS      2      RO    0
0x10       DMACAP      4      RO    0: plain copy only (no fill, XOR, P+Q, DCA)
0x80+0x00  CHANCTRL    2      RW    stored; writing bit 0 INT_REARM arms the channel
                                    interrupt (one interrupt per arm); 0x04
                                    ERR_COMPLETION_EN, 0x10 ERR_INT_EN act on errors
0x80+0x02  DMACOMP     2      RO    0x0002 (version 2 compatible)
0x80+0x04  CHANCMD     1      RW    0x20 RESET (reads back set until the reset is done,
                                    :attr:`IoatDevice.reset_delay`), 0x04 SUSPEND,
                                    0x10 RESUME; other bits are ignored
0x80+0x06  DMACOUNT    2      RW    the doorbell: the channel runs descriptors until
                                    it has completed this many since CHAINADDR was
                                    loaded (mod 2^16)
0x80+0x08  CHANSTS     8      RO    bits 0-2: 0 ACTIVE, 1 DONE, 2 SUSPENDED, 3 HALTED;
                                    bits 6-63: the last completed descriptor's address
0x80+0x10  CHAINADDR   8      RW    the first descriptor (also as two 4-byte halves);
                                    loaded when written while the channel is not
                                    ACTIVE (completed count := 0)
0x80+0x18  CHANCMP     8      RW    where CHANSTS is written back (below)
0x80+0x20  CDAR        8      RO    the descriptor being (or last) processed
0x80+0x28  CHANERR     4      W1C   error bits (below)
0x80+0x2C  ERRMASK     4      RW    stored, no effect
=========  ==========  =====  ====  ===================================================

Every other offset in [0, 0x100) reads 0 and ignores writes; BAR0 from 0x100 on is memory
(the MSI-X table at 0x2000 and the PBA at 0x3000 live there).

Power-on and channel reset leave the channel HALTED with everything else 0; so does
CHANCMD.RESET, which also clears CHANERR and ATTNSTATUS. SUSPEND stops a running channel
between two descriptors (or a DONE one) as SUSPENDED; a HALTED channel stays HALTED. RESUME
continues a SUSPENDED channel. A DMACOUNT write starts the channel from any state but
HALTED-with-CHANERR-set (an error must be cleared first, and a real driver resets too).

**Descriptors** are 64 bytes, 64-byte aligned, fetched by DMA from CHAINADDR and then from
each descriptor's ``next``: ``u32 size; u32 ctl; u64 src; u64 dst; u64 next; u64 rsv[4]``.
``ctl``: bit 0 ``int_en``, bit 3 ``compl_write``, bit 5 ``null`` (no transfer), bits 24-31
``op``. Only ``op`` 0 (COPY) is implemented: ``size`` bytes are DMA-read at ``src`` and
DMA-written at ``dst``. A descriptor whose ``next`` is itself runs once per count, so one
kick of DMACOUNT = N repeats it N times. After each descriptor: CHANSTS takes its address
(and DONE when the count is reached); with ``compl_write`` and a non-zero CHANCMP, the 8
bytes of CHANSTS are DMA-written to CHANCMP; with ``int_en`` the channel interrupt fires —
if INT_REARM armed it (which it consumes) and INTRCTRL has MASTER_INT_EN or
MSIX_VECTOR_CONTROL: ATTNSTATUS bit 0 is set and MSI-X vector 0 is sent (with INTx enabled
instead of MSI-X and MASTER_INT_EN, INTA is asserted until ATTNSTATUS is read).

**Errors** stop the channel HALTED at the failing descriptor, set CHANERR and raise nothing:
0x1 SRC_ADDR_ERR and 0x2 DEST_ADDR_ERR (a :class:`~vfiofs.models.api.DmaFault` on the
copy), 0x4 NEXT_ADDR_ERR / 0x10 CHAIN_ADDR_VALUE_ERR (a descriptor fetch that faults, after
/ from CHAINADDR), 0x8 NEXT_DESC_ALIGN_ERR / 0x10 (a misaligned descriptor address), 0x400
CONTROL_ERR (an op other than COPY), 0x800 LENGTH_ERR (``size`` above 1 << XFERCAP), 0x1000
COMPLETION_ADDR_ERR (the write-back faulted). With CHANCTRL ERR_COMPLETION_EN the status
is written back to CHANCMP; with ERR_INT_EN the channel interrupt fires as above.

Where vfiofs differs from the hardware, on purpose:

* **Extended config space.** The real function reports errors in config space too
  (DMAUNCERRSTS at 0x148, CHANERR_INT at 0x180, both W1C). This model does not implement
  them: the inherited ``config_read`` / ``config_write`` make both read 0 and writes change nothing.
* **Timing.** Descriptors run on the daemon's loop :attr:`IoatDevice.start_delay` seconds
  after the kick (default 0: the next loop iteration, so ACTIVE is observable), at most
  :attr:`IoatDevice.batch` per loop iteration (:attr:`IoatDevice.batch_delay` apart) so
  that a storm of 65535 copies never blocks the daemon. Subclass to change these, :attr:`IoatDevice.xfercap` or :attr:`IoatDevice.version`.
* **Not modelled:** more than one channel, fill/XOR/P+Q/DCA descriptors, ABORT, interrupt
  coalescing (INTRDELAY), CHANERR_MASK, MSI (the real function has MSI-X and INTx).
"""

from __future__ import annotations

import logging
import struct

from vfiofs import abi
from vfiofs.models.api import DeviceModel, DmaFault, ModelContext, Timer
from vfiofs.models.spec import DeviceSpec

log = logging.getLogger(__name__)

# -- device registers (BAR0) -------------------------------------------------------------------------
CHANCNT = 0x00
XFERCAP = 0x01
GENCTRL = 0x02
INTRCTRL = 0x03
ATTNSTATUS = 0x04
VER = 0x08
INTRDELAY = 0x0C
DEVICE_STATUS = 0x0E
DMA_CAP = 0x10

INTRCTRL_MASTER_INT_EN = 0x01
INTRCTRL_INT_STATUS = 0x02
INTRCTRL_INT = 0x04
INTRCTRL_MSIX_VECTOR_CONTROL = 0x08

# -- channel 0 registers ---------------------------------------------------------------------------------
CHANNEL = 0x80
CHANCTRL = CHANNEL + 0x00
DMA_COMP = CHANNEL + 0x02
CHANCMD = CHANNEL + 0x04
DMACOUNT = CHANNEL + 0x06
CHANSTS = CHANNEL + 0x08
CHAINADDR = CHANNEL + 0x10
CHANCMP = CHANNEL + 0x18
CDAR = CHANNEL + 0x20
CHANERR = CHANNEL + 0x28
CHANERR_MASK = CHANNEL + 0x2C

REGISTER_PAGE = 0x100  # BAR0 [0, 0x100) is the register file; the rest is memory

CHANCTRL_INT_REARM = 0x0001
CHANCTRL_ERR_COMPLETION_EN = 0x0004
CHANCTRL_ANY_ERR_ABORT_EN = 0x0008
CHANCTRL_ERR_INT_EN = 0x0010

CHANCMD_START = 0x01
CHANCMD_APPEND = 0x02
CHANCMD_SUSPEND = 0x04
CHANCMD_ABORT = 0x08
CHANCMD_RESUME = 0x10
CHANCMD_RESET = 0x20

CHANSTS_STATUS = 0x7
ACTIVE, DONE, SUSPENDED, HALTED = 0, 1, 2, 3
CHANSTS_ADDR = ~0x3F & 0xFFFF_FFFF_FFFF_FFFF

ERR_SRC_ADDR = 0x0001
ERR_DEST_ADDR = 0x0002
ERR_NEXT_ADDR = 0x0004
ERR_NEXT_DESC_ALIGN = 0x0008
ERR_CHAIN_ADDR_VALUE = 0x0010
ERR_CONTROL = 0x0400
ERR_LENGTH = 0x0800
ERR_COMPLETION_ADDR = 0x1000

# -- descriptors -----------------------------------------------------------------------------------------
DESCRIPTOR_SIZE = 64
DESCRIPTOR = struct.Struct("<IIQQQ")  # size, ctl, src_addr, dst_addr, next (then 32 reserved/user bytes)
CTL_INT_EN = 1 << 0
CTL_COMPL_WRITE = 1 << 3
CTL_NULL = 1 << 5
OP_COPY = 0x00

#: the register file, offset → width; everything else in [0, REGISTER_PAGE) is reserved
REGISTERS: dict[int, int] = {
    CHANCNT: 1, XFERCAP: 1, GENCTRL: 1, INTRCTRL: 1, ATTNSTATUS: 4, VER: 1, INTRDELAY: 2,
    DEVICE_STATUS: 2, DMA_CAP: 4,
    CHANCTRL: 2, DMA_COMP: 2, CHANCMD: 1, DMACOUNT: 2, CHANSTS: 8, CHAINADDR: 8, CHANCMP: 8, CDAR: 8,
    CHANERR: 4, CHANERR_MASK: 4,
}

MSIX = abi.VFIO_PCI_MSIX_IRQ_INDEX


class IoatDevice(DeviceModel):
    """One I/OAT DMA channel: descriptor chains, memcpy by DMA, status, errors, MSI-X."""

    #: log2 of the largest transfer (XFERCAP; 12 = 4 KiB, so 65535 copies stay small)
    xfercap: int = 12
    #: the VER register (0x33: I/OAT 3.3, Skylake)
    version: int = 0x33
    #: seconds from a DMACOUNT kick to the first descriptor (0: the daemon's next loop iteration)
    start_delay: float = 0.0
    #: seconds from CHANCMD.RESET to the reset being done (RESET reads back set until then)
    reset_delay: float = 0.0
    #: descriptors processed per loop iteration before yielding to the daemon
    batch: int = 256
    #: seconds between two batches (0: the next loop iteration)
    batch_delay: float = 0.0

    def __init__(self, spec: DeviceSpec, context: ModelContext | None = None) -> None:
        super().__init__(spec, context)
        self._worker: Timer | None = None
        self._intx = False  # the INTx level this model drives
        self._resetting: Timer | None = None
        self._power_on()

    # -- register storage: the values live in BAR0 memory ------------------------------------------
    def _get(self, offset: int) -> int:
        return int.from_bytes(self.memory[0].read(offset, REGISTERS[offset]), "little")

    def _set(self, offset: int, value: int) -> None:
        width = REGISTERS[offset]
        self.memory[0].write(offset, (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little"))

    def _power_on(self) -> None:
        self._set(CHANCNT, 1)
        self._set(XFERCAP, self.xfercap)
        self._set(VER, self.version)
        self._set(DMA_COMP, 0x0002)
        self._channel_reset()

    def _channel_reset(self) -> None:
        """What CHANCMD.RESET leaves: the channel HALTED, its registers and errors cleared."""
        for offset in (CHANCTRL, CHANCMD, DMACOUNT, CHAINADDR, CHANCMP, CDAR, CHANERR, CHANERR_MASK):
            self._set(offset, 0)
        self._set(CHANSTS, HALTED)
        self._next = 0  # the next descriptor's address
        self._completed = 0  # descriptors completed since CHAINADDR was loaded (mod 2^16)
        self._armed = False  # INT_REARM written and no channel interrupt since
        self._set_attention(0)

    def reset(self) -> None:
        """Power-on state: memory zeroed, timers cancelled, then the registers' power-on values."""
        super().reset()
        self._worker = self._resetting = None
        self._intx = False
        self.deassert_intx()
        self._power_on()

    # -- interrupts ------------------------------------------------------------------------------------
    def _set_attention(self, value: int) -> None:
        self._set(ATTNSTATUS, value)
        ctrl = self._get(INTRCTRL) & (INTRCTRL_MASTER_INT_EN | INTRCTRL_MSIX_VECTOR_CONTROL)
        if value:
            ctrl |= INTRCTRL_INT_STATUS | (INTRCTRL_INT if ctrl & INTRCTRL_MASTER_INT_EN else 0)
        self._set(INTRCTRL, ctrl)
        level = self.context.irq_type == "intx" and bool(ctrl & INTRCTRL_INT)
        if level != self._intx:
            self._intx = level
            self.context.set_intx(level)

    def _channel_interrupt(self) -> None:
        """The channel's interrupt: one per INT_REARM, when INTRCTRL lets it out."""
        if not self._armed:
            return
        self._armed = False
        self._set_attention(self._get(ATTNSTATUS) | 1)
        if self._get(INTRCTRL) & (INTRCTRL_MASTER_INT_EN | INTRCTRL_MSIX_VECTOR_CONTROL):
            self.raise_irq(MSIX, 0)  # dropped by the driver unless MSI-X is enabled

    # -- BAR0 ------------------------------------------------------------------------------------------
    def bar_read(self, index: int, offset: int, size: int) -> bytes:
        data = super().bar_read(index, offset, size)  # the register values are in the memory
        if index == 0 and offset < ATTNSTATUS + 4 and ATTNSTATUS < offset + size and self._get(ATTNSTATUS):
            self._set_attention(0)  # read-to-clear
        return data

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        if index != 0 or offset >= REGISTER_PAGE:
            return super().bar_write(index, offset, data)
        end = offset + len(data)
        if end > REGISTER_PAGE:
            super().bar_write(index, REGISTER_PAGE, data[REGISTER_PAGE - offset :])
            end = REGISTER_PAGE
        for reg, width in sorted(REGISTERS.items()):
            lo, hi = max(offset, reg), min(end, reg + width)
            if lo >= hi:
                continue
            merged = bytearray(self.memory[0].read(reg, width))
            merged[lo - reg : hi - reg] = data[lo - offset : hi - offset]
            written = int.from_bytes(bytes(0xFF if lo <= reg + i < hi else 0 for i in range(width)), "little")
            self._write_register(reg, int.from_bytes(merged, "little"), written)

    def _write_register(self, reg: int, value: int, written: int) -> None:
        """A driver write of ``value`` (the old bytes merged in) to ``reg``; ``written``: its byte mask."""
        if reg == GENCTRL or reg == CHANERR_MASK:
            self._set(reg, value)
        elif reg == INTRCTRL:
            keep = value & (INTRCTRL_MASTER_INT_EN | INTRCTRL_MSIX_VECTOR_CONTROL)
            self._set(INTRCTRL, keep)
            self._set_attention(self._get(ATTNSTATUS))  # recompute INT_STATUS / INT
        elif reg == INTRDELAY:
            self._set(reg, value & 0x3FFF)
        elif reg == CHANCTRL:
            self._set(reg, value)
            if value & written & CHANCTRL_INT_REARM:
                self._armed = True
        elif reg == CHANCMD:
            self._command(value)
        elif reg == DMACOUNT:
            self._set(reg, value)
            self._kick()
        elif reg == CHAINADDR:
            self._set(reg, value)
            if self._status() != ACTIVE:
                self._next, self._completed = value, 0
        elif reg == CHANCMP:
            self._set(reg, value)
        elif reg == CHANERR:
            self._set(reg, self._get(CHANERR) & ~(value & written))
        # read-only registers ignore writes

    # -- the channel -----------------------------------------------------------------------------------
    def _status(self) -> int:
        return self._get(CHANSTS) & CHANSTS_STATUS

    def _set_status(self, status: int, completed_addr: int | None = None) -> None:
        addr = self._get(CHANSTS) & CHANSTS_ADDR if completed_addr is None else completed_addr & CHANSTS_ADDR
        self._set(CHANSTS, addr | status)

    def _stop_worker(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            self._worker = None

    def _start(self) -> None:
        self._set_status(ACTIVE)
        if self._worker is None:
            self._worker = self.call_later(self.start_delay, self._work)

    def _command(self, value: int) -> None:
        if self._resetting is not None:
            return  # a reset is in progress: the channel takes no commands
        if value & CHANCMD_RESET:
            self._stop_worker()
            self._set(CHANCMD, CHANCMD_RESET)
            self._resetting = self.call_later(self.reset_delay, self._reset_done)
            return
        status = self._status()
        if value & CHANCMD_SUSPEND:
            if status in (ACTIVE, DONE):
                self._stop_worker()
                self._set_status(SUSPENDED)
        elif value & CHANCMD_RESUME:
            if status == SUSPENDED:
                self._start()
        # START and APPEND (I/OAT 1.x) and ABORT are not modelled; the register reads back 0

    def _reset_done(self) -> None:
        self._resetting = None
        self._channel_reset()

    def _kick(self) -> None:
        if self._resetting is not None:
            return
        status = self._status()
        if status == ACTIVE or (status == HALTED and self._get(CHANERR)):
            return  # running: it sees the new count; halted by an error: clear and reset first
        self._start()

    def _work(self) -> None:
        """Run up to :attr:`batch` descriptors, then yield to the loop and come back."""
        self._worker = None
        for _ in range(self.batch):
            if self._completed == self._get(DMACOUNT):
                self._set_status(DONE)
                return
            if not self._step():
                return
        self._worker = self.call_later(self.batch_delay, self._work)

    def _step(self) -> bool:
        """Fetch and run one descriptor; False if the channel halted."""
        addr = self._next
        first = self._completed == 0 and addr == self._get(CHAINADDR)
        self._set(CDAR, addr)
        if addr % DESCRIPTOR_SIZE:
            return self._halt(ERR_CHAIN_ADDR_VALUE if first else ERR_NEXT_DESC_ALIGN, f"descriptor at {addr:#x}")
        try:
            raw = self.dma_read(addr, DESCRIPTOR_SIZE)
            if len(raw) != DESCRIPTOR_SIZE:
                raise DmaFault(addr, DESCRIPTOR_SIZE, f"short read of {len(raw)} bytes")
        except DmaFault as fault:
            return self._halt(ERR_CHAIN_ADDR_VALUE if first else ERR_NEXT_ADDR, f"descriptor fetch: {fault}")
        size, ctl, src, dst, nxt = DESCRIPTOR.unpack_from(raw)
        if not ctl & CTL_NULL:
            op = ctl >> 24
            if op != OP_COPY:
                return self._halt(ERR_CONTROL, f"descriptor at {addr:#x}: op {op:#x} is not COPY")
            if self.xfercap and size > 1 << self.xfercap:
                return self._halt(ERR_LENGTH, f"descriptor at {addr:#x}: size {size:#x} above XFERCAP")
            if size:
                try:
                    data = self.dma_read(src, size)
                    if len(data) != size:
                        raise DmaFault(src, size, f"short read of {len(data)} bytes")
                except DmaFault as fault:
                    return self._halt(ERR_SRC_ADDR, f"copy source: {fault}")
                try:
                    self.dma_write(dst, data)
                except DmaFault as fault:
                    return self._halt(ERR_DEST_ADDR, f"copy destination: {fault}")
        self._completed = (self._completed + 1) & 0xFFFF
        self._next = nxt
        self._set_status(DONE if self._completed == self._get(DMACOUNT) else ACTIVE, completed_addr=addr)
        if ctl & CTL_COMPL_WRITE and not self._write_back():
            return self._halt(ERR_COMPLETION_ADDR, "completion write-back faulted")
        if ctl & CTL_INT_EN:
            self._channel_interrupt()
        return True

    def _write_back(self) -> bool:
        """CHANSTS to the completion address in CHANCMP (if any); False if that faults."""
        where = self._get(CHANCMP)
        if not where:
            return True
        try:
            self.dma_write(where, self._get(CHANSTS).to_bytes(8, "little"))
        except DmaFault as fault:
            log.warning("%s: %s", self.spec.name, fault)
            return False
        return True

    def _halt(self, error: int, message: str) -> bool:
        log.warning("%s: channel halted (CHANERR %#x): %s", self.spec.name, error, message)
        self._set(CHANERR, self._get(CHANERR) | error)
        self._set_status(HALTED)
        ctrl = self._get(CHANCTRL)
        if ctrl & CHANCTRL_ERR_COMPLETION_EN and error != ERR_COMPLETION_ADDR:
            self._write_back()
        if ctrl & CHANCTRL_ERR_INT_EN:
            self._channel_interrupt()
        return False
