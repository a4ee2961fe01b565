"""The two-sided boundary between vfio-pci and a device model (docs/models.md).

The kernel separates vfio_main.c from its drivers through ``struct vfio_device_ops``;
vfiofs separates its driver from device models the same way, in both directions:

* :class:`ModelOps` is what the driver calls on a model: lifecycle (open, close, reset,
  sync, shutdown), BAR accesses, and optionally the host port (the other end of a line).
* :class:`ModelContext` is what the model calls: its BAR memory, interrupts, DMA, timers,
  and "my host port has news". The model gets it at construction and owns nothing else of
  the outside world; the driver and the daemon connect the context's far side
  (``connect_*``, ``watch_host_port``). Nothing is ever set on a model from outside.

:class:`DeviceModel` is the one implementation of :class:`ModelOps` every definition gets
(BARs are memory overlaid by the registers the definition declares; the MSI-X table starts
masked) and the base class every Python model subclasses, overriding what it needs and
calling ``super()`` for the rest. Models know nothing about FUSE, handles or ioctls: the
driver decides *whether* an access may happen (bound handle, bounds, memory decoding), the
model decides *what* it does.

Ops run on the daemon's event loop and must not block; they raise
:class:`vfiofs.errors.VfioError` to fail with a specific errno. Any other exception is
logged and reported to the caller as EIO — it never takes the daemon down.
"""

from __future__ import annotations

import errno
import functools
import logging
from typing import Any, Awaitable, Callable, ClassVar, Mapping, Protocol

from vfiofs.errors import VfioError
from vfiofs.models.registers import RegisterFile
from vfiofs.models.spec import BarSpec, DeviceSpec, PciIdentity
from vfiofs.models.timers import ManualScheduler, Scheduler, Timer

log = logging.getLogger(__name__)

MSIX_ENTRY_SIZE = 16
MSIX_VECTOR_CTRL_MASKBIT = 1

__all__ = ["BarSpec", "DeviceModel", "DmaFault", "DmaPort", "HostPortOps", "InterruptSink", "LocalMemory",
           "Memory", "ModelContext", "ModelOps", "PciIdentity", "Timer"]


# -- what the context connects a model to -------------------------------------------------------------

class Memory(Protocol):
    """The memory of one BAR, as a model and the driver see it."""

    size: int

    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...

    def reset(self, keep: bool) -> None:
        """Power-on contents, in place: zeroed unless ``keep``. Mappings the binder holds stay
        valid and show the new contents (the kernel keeps BAR mmaps across a reset)."""

    def revoke(self) -> None:
        """The bound handle closed: mappings handed out fault from now on; contents are kept."""

    def sync(self) -> None:
        """Make persistent contents durable."""

    def close(self) -> None:
        """Persist and release (idempotent)."""


class LocalMemory:
    """BAR memory in a bytearray: what a model built without a daemon gets (never persisted)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._data = bytearray(size)

    def read(self, offset: int, size: int) -> bytes:
        data = bytes(self._data[offset : offset + size])
        return data if len(data) == size else data + bytes(size - len(data))

    def write(self, offset: int, data: bytes) -> None:
        end = min(offset + len(data), self.size)
        if offset < end:
            self._data[offset:end] = data[: end - offset]

    def share(self) -> int:
        raise VfioError(errno.EINVAL, "the BAR memory of a model built without a daemon cannot be mapped")

    def reset(self, keep: bool) -> None:
        if not keep:
            self._data[:] = bytes(self.size)

    def revoke(self) -> None:
        pass  # never shared

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass


class InterruptSink:
    """Where a model's interrupts go; the driver connects the device's interrupt controller.

    This default (nothing connected) drops them and says interrupts are off.
    """

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
    """The device's view of the address space it is attached to.

    This base class is the detached port (every access faults); the driver connects the
    port of the IOAS the bound handle attached the device to.
    """

    def read(self, iova: int, size: int) -> bytes:
        raise DmaFault(iova, size, "the device is not attached to an IOAS")

    def write(self, iova: int, data: bytes) -> None:
        raise DmaFault(iova, len(data), "the device is not attached to an IOAS")


class ModelContext:
    """Everything outside a model that the model may use, and the plugs the host side fills.

    Model side: :attr:`memory`, :meth:`raise_irq`, :meth:`set_intx`, :attr:`irq_type`,
    :meth:`dma_read`, :meth:`dma_write`, :meth:`call_later`, :meth:`spawn`,
    :meth:`cancel_timers`, :meth:`host_port_changed`. Host side (models never call these):
    :meth:`connect_interrupts`, :meth:`connect_dma`, :meth:`connect_scheduler`,
    :meth:`watch_host_port`.
    """

    def __init__(self, memory: Mapping[int, Memory], scheduler: Scheduler | None = None) -> None:
        #: BAR index → its memory (the same memory a binder maps)
        self.memory: Mapping[int, Memory] = memory
        self._interrupts: InterruptSink = InterruptSink()
        self._dma: DmaPort = DmaPort()
        self._scheduler: Scheduler = scheduler if scheduler is not None else ManualScheduler()
        self._timers: set[Timer] = set()  # pending: a timer leaves when it runs or is cancelled
        self._host_watchers: list[Callable[[], None]] = []

    @classmethod
    def standalone(cls, spec: DeviceSpec, scheduler: Scheduler | None = None) -> "ModelContext":
        """A context without a daemon: in-memory BARs, nothing connected, a ManualScheduler."""
        return cls({bar.index: LocalMemory(bar.size) for bar in spec.bars}, scheduler)

    # -- interrupts (model side) --------------------------------------------------------------------
    def raise_irq(self, index: int, vector: int = 0) -> None:
        """Send MSI/MSI-X message ``vector`` (index 1/2), or trigger ERR (3) / REQ (4)."""
        self._interrupts.raise_irq(index, vector)

    def set_intx(self, asserted: bool) -> None:
        """Drive the INTx line (a level: it stays as set)."""
        self._interrupts.set_intx(asserted)

    @property
    def irq_type(self) -> str:
        """What the driver enabled: "none", "intx", "msi" or "msix"."""
        return self._interrupts.irq_type

    # -- DMA (model side) ---------------------------------------------------------------------------
    def dma_read(self, iova: int, size: int) -> bytes:
        """Read ``size`` bytes at ``iova`` of the attached IOAS; raises :class:`DmaFault`."""
        return self._dma.read(iova, size)

    def dma_write(self, iova: int, data: bytes) -> None:
        """Write ``data`` at ``iova`` of the attached IOAS; raises :class:`DmaFault`."""
        self._dma.write(iova, data)

    # -- time (model side) --------------------------------------------------------------------------
    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> Timer:
        """Run ``fn(*args)`` after ``delay`` seconds, until :meth:`cancel_timers`."""
        @functools.wraps(fn)
        def fire(*args: Any) -> None:
            self._timers.discard(timer)
            fn(*args)

        timer = self._scheduler.call_later(delay, fire, *args)
        self._track(timer)
        return timer

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Timer:
        """Run ``await fn(*args)`` in the background (needs the daemon's loop), until :meth:`cancel_timers`."""
        @functools.wraps(fn)
        async def run(*args: Any) -> None:
            try:
                await fn(*args)
            finally:
                self._timers.discard(timer)

        timer = self._scheduler.spawn(run, *args)
        self._track(timer)
        return timer

    def _track(self, timer: Timer) -> None:
        """Hold ``timer`` for :meth:`cancel_timers` (and let go of those cancelled one by one)."""
        self._timers = {t for t in self._timers if not t.cancelled}
        self._timers.add(timer)

    def cancel_timers(self) -> None:
        """Cancel every timer and task started through this context."""
        timers, self._timers = self._timers, set()
        for timer in timers:
            timer.cancel()

    # -- host port (model side) ---------------------------------------------------------------------
    def host_port_changed(self) -> None:
        """Bytes arrived for the host side, or room appeared for it: wake whoever watches."""
        for watcher in list(self._host_watchers):
            try:
                watcher()
            except Exception:  # the listener's problem must not become the driver's
                log.exception("host-side notification failed")

    # -- the host side connects (never called by models) ---------------------------------------------
    def connect_interrupts(self, sink: InterruptSink) -> None:
        """Where interrupts go: anything with ``raise_irq``, ``set_intx`` and ``irq_type``."""
        self._interrupts = sink

    def connect_dma(self, port: DmaPort | None) -> None:
        """The IOAS the device is attached to; None detaches it (every DMA faults)."""
        self._dma = DmaPort() if port is None else port

    def connect_scheduler(self, scheduler: Scheduler) -> None:
        """Who runs timers and tasks from now on (the daemon's trio loop)."""
        self._scheduler = scheduler

    def watch_host_port(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (no arguments) whenever the model reports host-port news."""
        self._host_watchers.append(callback)


# -- what the driver calls on a model ----------------------------------------------------------------

class ModelOps(Protocol):
    """The ops vfio-pci calls on a model (the model's half of ``struct vfio_device_ops``).

    :class:`DeviceModel` implements all of them; this Protocol is what the driver relies on.
    """

    #: True if :meth:`reset` resets the function (reported as VFIO_DEVICE_FLAGS_RESET).
    reset_works: ClassVar[bool]
    #: True if the model implements :class:`HostPortOps` (the FUSE layer serves ports/vfioN).
    has_host_port: ClassVar[bool]
    spec: DeviceSpec
    context: ModelContext

    def open(self) -> None: ...

    def close(self) -> None: ...

    def reset(self) -> None: ...

    def sync(self) -> None: ...

    def shutdown(self) -> None: ...

    def bar_read(self, index: int, offset: int, size: int) -> bytes: ...

    def bar_write(self, index: int, offset: int, data: bytes) -> None: ...

    def config_read(self, offset: int, size: int) -> bytes: ...

    def config_write(self, offset: int, data: bytes) -> None: ...


class HostPortOps(Protocol):
    """The optional host port: the other end of the device's line (``has_host_port = True``)."""

    def host_read(self, size: int) -> bytes: ...

    def host_write(self, data: bytes) -> int: ...

    def host_pending(self) -> int: ...

    def host_room(self) -> int: ...


class DeviceModel:
    """A device built from its definition; subclass it for behaviour beyond registers.

    ``DeviceModel(spec)`` works without a daemon (a standalone context: in-memory BARs,
    a ManualScheduler). The daemon passes a context whose BARs are shareable memfds.
    """

    reset_works: ClassVar[bool] = True
    has_host_port: ClassVar[bool] = False

    def __init__(self, spec: DeviceSpec, context: ModelContext | None = None) -> None:
        if context is None:
            context = ModelContext.standalone(spec)
        elif not isinstance(context, ModelContext):
            raise TypeError(f"{spec.name}: a model takes (spec, context: ModelContext | None), got {context!r} "
                            "(the daemon builds BAR memory and state files; see docs/models.md)")
        missing = {bar.index for bar in spec.bars} - set(context.memory)
        if missing:
            raise ValueError(f"{spec.name}: the context has no memory for BAR {min(missing)}")
        self.spec = spec
        self.identity = spec.identity
        self.bars = spec.bars
        #: the model's view of the outside world (docs/models.md)
        self.context = context
        self.registers = {bar.index: RegisterFile(bar.registers) for bar in spec.bars}
        self._init_msix_table()

    @property
    def memory(self) -> Mapping[int, Memory]:
        """BAR index → its memory; shorthand for ``self.context.memory``."""
        return self.context.memory

    # -- shorthands for the context ------------------------------------------------------------------
    def raise_irq(self, index: int, vector: int = 0) -> None:
        """Send MSI/MSI-X message ``vector`` (index 1/2), or trigger ERR (3) / REQ (4)."""
        self.context.raise_irq(index, vector)

    def assert_intx(self) -> None:
        """Drive INTx active (level-triggered: stays asserted until :meth:`deassert_intx`)."""
        self.context.set_intx(True)

    def deassert_intx(self) -> None:
        self.context.set_intx(False)

    def msi_enabled(self) -> bool:
        """True while the driver has MSI enabled (VFIO_DEVICE_SET_IRQS on the MSI index)."""
        return self.context.irq_type == "msi"

    def dma_read(self, iova: int, size: int) -> bytes:
        """Read ``size`` bytes at ``iova`` of the attached IOAS; raises :class:`DmaFault`."""
        return self.context.dma_read(iova, size)

    def dma_write(self, iova: int, data: bytes) -> None:
        """Write ``data`` at ``iova`` of the attached IOAS; raises :class:`DmaFault`."""
        self.context.dma_write(iova, data)

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> Timer:
        """Run ``fn(*args)`` on the daemon's loop after ``delay`` seconds (cancelled by reset)."""
        return self.context.call_later(delay, fn, *args)

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Timer:
        """Run ``await fn(*args)`` in the background (cancelled by reset)."""
        return self.context.spawn(fn, *args)

    # -- lifecycle ops ---------------------------------------------------------------------------------
    def open(self) -> None:
        """Called when a handle binds (the kernel's ``open_device``); raise to refuse the bind."""

    def close(self) -> None:
        """Called when the bound handle is closed (``close_device``); the driver resets afterwards."""

    def reset(self) -> None:
        """Power-on state: registers, non-persistent memory, no pending timers. Mappings of the
        BARs stay valid (closing the bound handle revokes them, not a reset)."""
        self.context.cancel_timers()
        for bar in self.bars:
            self.context.memory[bar.index].reset(keep=bar.persist)
            self.registers[bar.index].reset()
        self._init_msix_table()

    def sync(self) -> None:
        """Make persistent BAR contents durable (fsync on the bound handle)."""
        for memory in self.context.memory.values():
            memory.sync()

    def shutdown(self) -> None:
        """The daemon is stopping: persist and release everything."""
        for memory in self.context.memory.values():
            memory.close()

    # -- BAR access ----------------------------------------------------------------------------------
    def bar_read(self, index: int, offset: int, size: int) -> bytes:
        """Read ``size`` bytes at ``offset`` of BAR ``index``; the driver has checked the bounds."""
        registers = self.registers[index]
        if not registers.registers:
            return self.context.memory[index].read(offset, size)
        data = bytearray(self.context.memory[index].read(offset, size))
        registers.overlay_read(offset, data)
        return bytes(data)

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` of BAR ``index``; the driver has checked the bounds."""
        self.context.memory[index].write(offset, data)
        registers = self.registers[index]
        if registers.registers:
            registers.apply_write(offset, data)

    # -- extended config space (PCI Express functions) ------------------------------------------------
    def config_read(self, offset: int, size: int) -> bytes:
        """Extended config space of a PCI Express function (``0x100 <= offset < 0x1000``), in
        aligned pieces of 1, 2 or 4 bytes within one dword. Unimplemented space reads zeros."""
        return bytes(size)

    def config_write(self, offset: int, data: bytes) -> None:
        """A write to extended config space (pieces as :meth:`config_read`); ignored unless a
        model implements registers there (e.g. write-1-to-clear error status)."""

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
        memory = self.context.memory[cap.table_bar]
        for vector in range(cap.vectors):
            memory.write(cap.table_offset + vector * MSIX_ENTRY_SIZE + 12, ctrl)
