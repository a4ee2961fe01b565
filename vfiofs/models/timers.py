"""Time for device models: the Timer handle, the scheduler interface, and a scheduler tests drive.

A model must never block a handler (the kernel serializes writes to a node), so slow work —
a DMA that completes after 100 ms, a periodic timer — is scheduled through its context
instead. The daemon connects a trio-based scheduler (:mod:`vfiofs.host.tasks`); a model
built without a daemon gets a :class:`ManualScheduler`, whose time moves only when a test
calls :meth:`ManualScheduler.advance`. Exceptions in model callbacks are logged, never fatal.
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable, Protocol

log = logging.getLogger(__name__)

_SAME_TIME = 1e-9  # seconds: ManualScheduler treats closer times as equal


class Timer:
    """A scheduled callback or task; ``cancel()`` is idempotent and safe after it ran."""

    def __init__(self) -> None:
        self.cancelled = False
        self._stop: Callable[[], None] | None = None

    def cancel(self) -> None:
        self.cancelled = True
        if self._stop is not None:
            self._stop()

    def on_cancel(self, stop: Callable[[], None]) -> None:
        """For schedulers: how to stop the work once it runs (called at once if already cancelled)."""
        self._stop = stop
        if self.cancelled:
            stop()


class Scheduler(Protocol):
    """What a :class:`~vfiofs.models.api.ModelContext` needs to run a model's asynchronous work."""

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> Timer: ...

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Timer: ...


def run_guarded(what: str, fn: Callable[..., Any], *args: Any) -> None:
    """Run a model callback; its exception is logged, never raised into the scheduler."""
    try:
        fn(*args)
    except Exception:
        log.exception("device model failed in %s", what)


class ManualScheduler:
    """For tests and for models used outside a daemon: time advances only when told to."""

    def __init__(self) -> None:
        self.now = 0.0
        self._due: list[tuple[float, int, Timer, Callable[..., Any], tuple[Any, ...]]] = []
        self._seq = 0

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> Timer:
        timer = Timer()
        self._seq += 1
        self._due.append((self.now + delay, self._seq, timer, fn, args))
        return timer

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Timer:
        raise RuntimeError("background tasks need the daemon's trio loop")

    def advance(self, seconds: float) -> int:
        """Move time forward and run every timer that falls due, in order; returns how many ran.

        Each callback runs with :attr:`now` at its own due time, so a timer it starts counts
        from there (a chain of 1 ms ticks advances 3 times in ``advance(0.003)``). Times
        within a nanosecond count as equal, so sums of decimal fractions behave.
        """
        target = self.now + seconds
        ran = 0
        while True:
            due = [d for d in self._due if d[0] <= target + _SAME_TIME]
            if not due:
                self.now = max(self.now, target)
                return ran
            entry = min(due, key=lambda d: (d[0], d[1]))
            self._due.remove(entry)
            self.now = max(self.now, entry[0])
            if not entry[2].cancelled:
                run_guarded("timer", entry[3], *entry[4])
                ran += 1
