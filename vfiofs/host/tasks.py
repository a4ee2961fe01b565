"""Asynchronous work for device models: timers and background tasks on the daemon's trio loop.

A model must never block a handler (the kernel serializes writes to a node), so slow
work — a DMA that completes after 100 ms, a periodic timer — is scheduled instead. The
daemon gives every model a :class:`TrioScheduler`; unit tests use :class:`ManualScheduler`
and advance time themselves. Exceptions in model callbacks are logged, never fatal.
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

import trio

log = logging.getLogger(__name__)


class Timer:
    """A scheduled callback; ``cancel()`` is idempotent and safe after it ran."""

    def __init__(self) -> None:
        self.cancelled = False
        self._scope: trio.CancelScope | None = None

    def cancel(self) -> None:
        self.cancelled = True
        if self._scope is not None:
            self._scope.cancel()


def _guarded(what: str, fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except Exception:
        log.exception("device model failed in %s", what)


class TrioScheduler:
    """Runs model timers and tasks in a nursery of the daemon's trio loop."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> Timer:
        async def later() -> None:
            await trio.sleep(delay)
            _guarded(getattr(fn, "__name__", "timer"), fn, *args)

        return self.spawn(later)

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Timer:
        """Run ``await fn(*args)`` until it returns or the handle is cancelled."""
        timer = Timer()

        async def run() -> None:
            with trio.CancelScope() as scope:
                timer._scope = scope
                if timer.cancelled:
                    return
                try:
                    await fn(*args)
                except Exception:
                    log.exception("device model task %s failed", getattr(fn, "__name__", fn))

        self.nursery.start_soon(run)
        return timer


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
        """Move time forward and run every timer that fell due; returns how many ran."""
        self.now += seconds
        ran = 0
        while True:
            due = sorted((d for d in self._due if d[0] <= self.now), key=lambda d: (d[0], d[1]))
            if not due:
                return ran
            entry = due[0]
            self._due.remove(entry)
            if not entry[2].cancelled:
                _guarded("timer", entry[3], *entry[4])
                ran += 1
