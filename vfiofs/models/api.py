"""The interface between vfiofs's generic VFIO layer and a device model.

The kernel separates vfio_main.c from its drivers through ``struct vfio_device_ops``;
vfiofs separates its core from device models the same way. :class:`DeviceModel` is
both the interface and the data-driven implementation every definition gets: BARs are
memory (:class:`~vfiofs.models.regions.BarMemory`) overlaid by the registers the definition
declares. A Python model subclasses it and overrides what it needs — any hook, or
``bar_read``/``bar_write`` for any BAR, calling ``super()`` for the rest. Models know
nothing about FUSE, handles or ioctls: the core decides *whether* an access may happen
(bound handle, region bounds, memory decoding), the model decides *what* it does.

Hooks run on the daemon's event loop and must not block; they raise
:class:`vfiofs.errors.VfioError` to fail with a specific errno. Any other exception is
logged and reported to the caller as EIO — it never takes the daemon down.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Awaitable, Callable

from vfiofs.models.regions import BarMemory, RegisterFile
from vfiofs.host.tasks import ManualScheduler, Timer
from vfiofs.models.spec import BarSpec, DeviceSpec, PciIdentity

MSIX_ENTRY_SIZE = 16
MSIX_VECTOR_CTRL_MASKBIT = 1

__all__ = ["DeviceModel", "PciIdentity", "BarSpec"]


class InterruptSink:
    """Where a model's interrupts go; the core replaces it with the device's interrupt controller."""

    irq_type = "none"

    def raise_irq(self, index: int, vector: int = 0) -> None:
        """An edge interrupt: MSI/MSI-X ``vector``, or the single ERR/REQ trigger."""

    def set_intx(self, asserted: bool) -> None:
        """The level of the INTx line."""


class DmaFault(Exception):
    """A DMA the IOMMU refused: unmapped IOVA, a write to a read-only mapping, a mapping that
    went away mid-transfer. The model decides what the device does about it."""

    def __init__(self, iova: int, size: int, reason: str) -> None:
        super().__init__(f"DMA fault at IOVA {iova:#x} (+{size:#x}): {reason}")
        self.iova, self.size, self.reason = iova, size, reason


class DmaPort:
    """The device's view of the address space it is attached to; the core replaces it."""

    def read(self, iova: int, size: int) -> bytes:
        raise DmaFault(iova, size, "the device is not attached to an IOAS")

    def write(self, iova: int, data: bytes) -> None:
        raise DmaFault(iova, len(data), "the device is not attached to an IOAS")


class DeviceModel:
    """A device built from its definition; subclass it for behaviour beyond registers."""

    #: True if :meth:`reset` resets the function (reported as VFIO_DEVICE_FLAGS_RESET).
    reset_works: bool = True
    #: Set by the core: interrupts raised through it reach the binder's eventfds.
    interrupts: InterruptSink = InterruptSink()
    #: Set by the daemon: runs timers and tasks on its trio loop (see :mod:`vfiofs.host.tasks`).
    scheduler: Any = None
    #: Set by the core: DMA through the IOAS the bound handle attached the device to.
    dma: DmaPort = DmaPort()

    def __init__(self, spec: DeviceSpec, state_dir: Path | None = None) -> None:
        self.spec = spec
        self.identity = spec.identity
        self.bars = spec.bars
        self.memory: dict[int, BarMemory] = {}
        try:
            for bar in spec.bars:
                state_file = None
                if bar.persist:
                    if state_dir is None:
                        raise ValueError(f"{spec.name}: BAR {bar.index} persists but no state directory was given")
                    state_file = state_dir / f"{spec.name}.bar{bar.index}"
                self.memory[bar.index] = BarMemory(f"{spec.name}.bar{bar.index}", bar.size, state_file)
        except BaseException:
            self.shutdown()  # release the BARs already built
            raise
        self.registers = {bar.index: RegisterFile(bar.registers) for bar in spec.bars}
        self.scheduler = ManualScheduler()
        self._timers: list[Timer] = []
        self._init_msix_table()

    # -- interrupts (the model's side) ---------------------------------------------------------------
    def raise_irq(self, index: int, vector: int = 0) -> None:
        """Send MSI/MSI-X message ``vector`` (index 1/2), or trigger ERR (3) / REQ (4)."""
        self.interrupts.raise_irq(index, vector)

    def assert_intx(self) -> None:
        """Drive INTx active (level-triggered: stays asserted until :meth:`deassert_intx`)."""
        self.interrupts.set_intx(True)

    def deassert_intx(self) -> None:
        self.interrupts.set_intx(False)

    def msi_enabled(self) -> bool:
        """True while the driver has MSI enabled (VFIO_DEVICE_SET_IRQS on the MSI index)."""
        return self.interrupts.irq_type == "msi"

    # -- DMA (the model's side) ------------------------------------------------------------------------
    def dma_read(self, iova: int, size: int) -> bytes:
        """Read ``size`` bytes at ``iova`` of the attached IOAS; raises :class:`DmaFault`."""
        return self.dma.read(iova, size)

    def dma_write(self, iova: int, data: bytes) -> None:
        """Write ``data`` at ``iova`` of the attached IOAS; raises :class:`DmaFault`."""
        self.dma.write(iova, data)

    # -- asynchronous work ------------------------------------------------------------------------------
    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> Timer:
        """Run ``fn(*args)`` on the daemon's loop after ``delay`` seconds (cancelled by reset)."""
        self._timers = [t for t in self._timers if not t.cancelled]
        timer = self.scheduler.call_later(delay, fn, *args)
        self._timers.append(timer)
        return timer

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Timer:
        """Run ``await fn(*args)`` in the background (cancelled by reset)."""
        timer = self.scheduler.spawn(fn, *args)
        self._timers.append(timer)
        return timer

    def cancel_timers(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers = []

    # -- lifecycle hooks (vfio_device_ops) -----------------------------------------------------------
    def open(self) -> None:
        """Called when a handle binds (the kernel's ``open_device``); raise to refuse the bind."""

    def close(self) -> None:
        """Called when the bound handle is closed (``close_device``); the core resets afterwards."""

    def reset(self) -> None:
        """Power-on state: registers, non-persistent memory, no pending timers; revokes mappings."""
        self.cancel_timers()
        for bar in self.bars:
            self.memory[bar.index].reset(keep=bar.persist)
            self.registers[bar.index].reset()
        self._init_msix_table()

    def sync(self) -> None:
        """Make persistent BAR contents durable (fsync on the bound handle)."""
        for memory in self.memory.values():
            memory.sync()

    def shutdown(self) -> None:
        """The daemon is stopping: persist and release everything."""
        for memory in self.memory.values():
            memory.close()

    # -- BAR access ----------------------------------------------------------------------------------
    def bar_read(self, index: int, offset: int, size: int) -> bytes:
        """Read ``size`` bytes at ``offset`` of BAR ``index``; the core has checked the bounds."""
        registers = self.registers[index]
        if not registers.registers:
            return self.memory[index].read(offset, size)
        data = bytearray(self.memory[index].read(offset, size))
        registers.overlay_read(offset, data)
        return bytes(data)

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` of BAR ``index``; the core has checked the bounds."""
        self.memory[index].write(offset, data)
        registers = self.registers[index]
        if registers.registers:
            registers.apply_write(offset, data)

    def register(self, index: int, offset: int) -> int:
        """The current value of the register at ``offset`` of BAR ``index`` (the device's view)."""
        return self.registers[index].values[offset]

    def set_register(self, index: int, offset: int, value: int) -> None:
        """Set a register from the device side, whatever its access kind says about the driver."""
        self.registers[index].values[offset] = value

    def _init_msix_table(self) -> None:
        """Every MSI-X vector starts masked (PCI spec); the table itself is BAR memory."""
        cap = self.spec.capability("msix")
        if cap is None:
            return
        ctrl = MSIX_VECTOR_CTRL_MASKBIT.to_bytes(4, "little")
        memory = self.memory[cap.table_bar]
        for vector in range(cap.vectors):
            memory.write(cap.table_offset + vector * MSIX_ENTRY_SIZE + 12, ctrl)
