"""QEMU's ``edu`` teaching device (hw/misc/edu.c, docs/specs/edu.rst) as a vfiofs model.

The register behaviour follows QEMU exactly; the bundled definition is
``devices/vedu.toml`` (PCI 1234:11e8 rev 0x10, class 0x00ff00, BAR0 1 MiB trapped,
one 64-bit MSI vector without masking, INTA).

BAR0 (all little-endian):

======  ====  ================================================================================
offset  R/W   behaviour
======  ====  ================================================================================
0x00    RO    identification 0x010000ED
0x04    RW    liveness: a write stores ``~value`` (32 bits), a read returns it (0 at power-on)
0x08    RW    factorial: a write starts computing ``value!`` mod 2^32 (ignored while busy);
              a read returns the input until the result replaces it
0x20    RW    status: 0x01 computing (read-only), 0x80 raise interrupt 0x1 when the
              factorial is done; a write keeps only bit 0x80
0x24    RO    interrupt status
0x60    WO    raise: ``irq_status |= value``; if it is then non-zero, MSI vector 0 is sent
              (every such write) when MSI is enabled, else INTx is asserted
0x64    WO    acknowledge: ``irq_status &= ~value``; INTx is deasserted when it becomes 0
              and MSI is disabled
0x80    RW    DMA source address (64 bits)
0x88    RW    DMA destination address (64 bits)
0x90    RW    DMA transfer count (64 bits)
0x98    RW    DMA command: 0x01 start, 0x02 direction (0 RAM→EDU, 1 EDU→RAM), 0x04 raise
              interrupt 0x100 when done; a write without 0x01 is ignored
======  ====  ================================================================================

Access rules: below 0x80 only 4-byte accesses are handled, from 0x80 on 4- or 8-byte
accesses. Any other access (1, 2, 3, 16 bytes, an 8-byte access below 0x80, an offset
not listed, such as 0x84 — the upper half of a DMA register) reads all-ones, truncated to
the access size, and a write to it is ignored. A 4-byte write to a DMA register replaces
the whole 64-bit register with the zero-extended value. While the command's start bit is
set, writes to all four DMA registers are ignored.

DMA: the device has a 4 KiB buffer at the device-side address 0x40000 (it is *not*
visible through BAR0). Writing the command with 0x01 schedules the transfer
:attr:`EduDevice.dma_delay` seconds later (QEMU: 100 ms of virtual time). On completion
``count`` bytes go from ``src & dma_mask`` in the driver's memory (through the IOMMU,
:meth:`~vfiofs.models.api.DeviceModel.dma_read`) to ``buffer[dst - 0x40000]`` (direction 0),
or from ``buffer[src - 0x40000]`` to ``dst & dma_mask`` (direction 1). Then the start
bit clears and, if the command asked for it, interrupt 0x100 is raised.

Where vfiofs differs from QEMU, on purpose:

* **A device-side range outside the buffer** ``[0x40000, 0x41000)`` is refused: nothing is
  copied, a warning is logged and a line is appended to :attr:`EduDevice.dma_errors`.
  QEMU's newest code only logs a guest error and then copies anyway (out of bounds of its
  buffer); older QEMU aborted the whole VM. The command still **completes** (start bit
  cleared, interrupt 0x100 raised if requested), so a driver polling the start bit or
  waiting for the interrupt never hangs.
* **A DMA fault** (unmapped IOVA, read-only mapping, device not attached — the
  :class:`~vfiofs.models.api.DmaFault` the IOMMU raises) is recorded the same way in
  :attr:`EduDevice.dma_errors` and the command completes as well. A real edu in QEMU has
  no IOMMU faults to report; completing is what a driver can cope with.
* **Reset.** QEMU's edu registers no reset handler, so liveness, factorial, status, the
  interrupt status, the DMA registers and the buffer survive a device reset there. vfiofs
  resets a device whenever its bound handle closes, so that every binder starts from a
  clean device; :meth:`EduDevice.reset` therefore restores the power-on state (all of the
  above zero, INTx deasserted, pending factorial and DMA cancelled, ``dma_errors``
  emptied). ``VFIO_DEVICE_RESET`` does the same.
* **Timing.** The factorial is computed by a timer :attr:`EduDevice.factorial_delay`
  seconds after the write (default 0: on the daemon's next loop iteration, so the busy
  bit is observable but short), not by a worker thread. The definition format has no
  model parameters, so the delays and :attr:`EduDevice.dma_mask` are class attributes:
  subclass :class:`EduDevice` to change them and name the subclass in a definition's
  ``model = "package.module:Class"``.
"""

from __future__ import annotations

import logging
from vfiofs import abi
from vfiofs.models.api import DeviceModel, DmaFault, ModelContext
from vfiofs.models.spec import DeviceSpec

log = logging.getLogger(__name__)

EDU_ID = 0x010000ED

REG_ID = 0x00
REG_LIVENESS = 0x04
REG_FACTORIAL = 0x08
REG_STATUS = 0x20
REG_IRQ_STATUS = 0x24
REG_IRQ_RAISE = 0x60
REG_IRQ_ACK = 0x64
REG_DMA_SRC = 0x80
REG_DMA_DST = 0x88
REG_DMA_COUNT = 0x90
REG_DMA_CMD = 0x98

STATUS_COMPUTING = 0x01
STATUS_IRQFACT = 0x80

DMA_START = 0x01
DMA_DIR_TO_RAM = 0x02  # 0: RAM → EDU buffer, 1: EDU buffer → RAM
DMA_IRQ = 0x04

FACT_IRQ = 0x00000001
DMA_DONE_IRQ = 0x00000100

BUFFER_ADDR = 0x40000
BUFFER_SIZE = 0x1000

MASK32 = 0xFFFF_FFFF
MASK64 = 0xFFFF_FFFF_FFFF_FFFF

_DMA_REGS = {REG_DMA_SRC: "dma_src", REG_DMA_DST: "dma_dst", REG_DMA_COUNT: "dma_count", REG_DMA_CMD: "dma_cmd"}


def factorial32(n: int) -> int:
    """``n!`` in 32-bit unsigned arithmetic (wraps mod 2^32; 0! = 1).

    From 34! on the product holds 2^32 and stays 0, so at most 34 multiplications run
    whatever the input (QEMU loops ``n`` times to the same result).
    """
    result = 1
    for i in range(2, n + 1):
        result = (result * i) & MASK32
        if result == 0:
            break
    return result


class EduDevice(DeviceModel):
    """QEMU's edu device: identification, liveness, factorial, interrupts and a DMA engine."""

    #: seconds from a DMA start to its completion (QEMU: 100 ms of virtual time)
    dma_delay: float = 0.1
    #: seconds from a factorial write to the result (0: the daemon's next loop iteration)
    factorial_delay: float = 0.0
    #: the RAM-side address mask (QEMU's ``dma_mask`` property, 28 bits)
    dma_mask: int = (1 << 28) - 1

    def __init__(self, spec: DeviceSpec, context: ModelContext | None = None) -> None:
        super().__init__(spec, context)
        #: refused transfers and DMA faults, one line each, oldest first (emptied by reset)
        self.dma_errors: list[str] = []
        self._power_on()

    def _power_on(self) -> None:
        self.liveness = 0
        self.fact = 0
        self.status = 0
        self.irq_status = 0
        self.dma_src = self.dma_dst = self.dma_count = self.dma_cmd = 0
        self.buffer = bytearray(BUFFER_SIZE)
        self.dma_errors = []

    def reset(self) -> None:
        """Power-on state (unlike QEMU, where edu state survives a reset; see the module doc)."""
        super().reset()  # cancels a pending factorial or DMA
        self._power_on()
        self.deassert_intx()

    # -- interrupts ------------------------------------------------------------------------------
    def _raise(self, value: int) -> None:
        self.irq_status = (self.irq_status | value) & MASK32
        if self.irq_status:
            if self.msi_enabled():
                self.raise_irq(abi.VFIO_PCI_MSI_IRQ_INDEX, 0)
            else:
                self.assert_intx()

    def _lower(self, value: int) -> None:
        self.irq_status &= ~value & MASK32
        if not self.irq_status and not self.msi_enabled():
            self.deassert_intx()

    # -- BAR0 --------------------------------------------------------------------------------------
    @staticmethod
    def _handled(offset: int, size: int) -> bool:
        return size == 4 if offset < 0x80 else size in (4, 8)

    def bar_read(self, index: int, offset: int, size: int) -> bytes:
        if index != 0:
            return super().bar_read(index, offset, size)
        value = self._read(offset) if self._handled(offset, size) else None
        if value is None:
            return b"\xff" * size
        return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def _read(self, offset: int) -> int | None:
        if offset == REG_ID:
            return EDU_ID
        if offset == REG_LIVENESS:
            return self.liveness
        if offset == REG_FACTORIAL:
            return self.fact
        if offset == REG_STATUS:
            return self.status
        if offset == REG_IRQ_STATUS:
            return self.irq_status
        if offset in _DMA_REGS:
            return getattr(self, _DMA_REGS[offset])
        return None  # unlisted, including the write-only 0x60/0x64: all-ones

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        if index != 0:
            return super().bar_write(index, offset, data)
        if not self._handled(offset, len(data)):
            return
        value = int.from_bytes(data, "little")
        if offset == REG_LIVENESS:
            self.liveness = ~value & MASK32
        elif offset == REG_FACTORIAL:
            if self.status & STATUS_COMPUTING:
                return
            self.fact = value & MASK32
            self.status |= STATUS_COMPUTING
            self.call_later(self.factorial_delay, self._factorial_done)
        elif offset == REG_STATUS:
            self.status = (self.status & STATUS_COMPUTING) | (value & STATUS_IRQFACT)
        elif offset == REG_IRQ_RAISE:
            self._raise(value & MASK32)
        elif offset == REG_IRQ_ACK:
            self._lower(value & MASK32)
        elif offset in _DMA_REGS:
            if self.dma_cmd & DMA_START:
                return  # the engine is busy: all four registers are frozen
            if offset == REG_DMA_CMD:
                if not value & DMA_START:
                    return
                self.dma_cmd = value
                self.call_later(self.dma_delay, self._dma_done)
            else:
                setattr(self, _DMA_REGS[offset], value & MASK64)
        # anything else (0x00, 0x24, unlisted offsets) ignores writes

    # -- the factorial unit ----------------------------------------------------------------------
    def _factorial_done(self) -> None:
        self.fact = factorial32(self.fact)
        self.status &= ~STATUS_COMPUTING
        if self.status & STATUS_IRQFACT:
            self._raise(FACT_IRQ)

    # -- the DMA engine --------------------------------------------------------------------------
    def _dma_error(self, message: str) -> None:
        log.warning("%s: %s", self.spec.name, message)
        self.dma_errors.append(message)

    def _clamp(self, addr: int) -> int:
        clamped = addr & self.dma_mask
        if clamped != addr:
            log.info("%s: DMA address %#x clamped to %#x by dma_mask %#x", self.spec.name, addr, clamped,
                     self.dma_mask)
        return clamped

    def _dma_done(self) -> None:
        cmd, count = self.dma_cmd, self.dma_count
        to_ram = bool(cmd & DMA_DIR_TO_RAM)
        device_addr = self.dma_src if to_ram else self.dma_dst
        try:
            if not (BUFFER_ADDR <= device_addr and device_addr + count <= BUFFER_ADDR + BUFFER_SIZE):
                self._dma_error(f"DMA refused: device range {device_addr:#x}+{count:#x} is outside the buffer "
                                f"[{BUFFER_ADDR:#x}, {BUFFER_ADDR + BUFFER_SIZE:#x})")
            elif count:
                at = device_addr - BUFFER_ADDR
                try:
                    if to_ram:
                        self.dma_write(self._clamp(self.dma_dst), bytes(self.buffer[at : at + count]))
                    else:
                        data = self.dma_read(self._clamp(self.dma_src), count)
                        if len(data) != count:  # never resize the buffer, whatever the port returns
                            raise DmaFault(self.dma_src, count, f"short read of {len(data)} bytes")
                        self.buffer[at : at + count] = data
                except DmaFault as fault:
                    self._dma_error(f"DMA fault ({'EDU to RAM' if to_ram else 'RAM to EDU'}): {fault}")
        finally:  # the command completes whatever happened to the copy
            self.dma_cmd &= ~DMA_START
            if cmd & DMA_IRQ:
                self._raise(DMA_DONE_IRQ)
