"""Device models' timers and background tasks on the daemon's trio loop.

The daemon connects one :class:`TrioScheduler` to every model's context
(:meth:`vfiofs.models.api.ModelContext.connect_scheduler`); the pure parts — the
:class:`~vfiofs.models.timers.Timer` handle and the scheduler tests drive by hand — live in
:mod:`vfiofs.models.timers`. Exceptions in model callbacks are logged, never fatal.
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

import trio

from vfiofs.models.timers import Timer, run_guarded

log = logging.getLogger(__name__)


class TrioScheduler:
    """Runs model timers and tasks in a nursery of the daemon's trio loop."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> Timer:
        async def later() -> None:
            await trio.sleep(delay)
            run_guarded(getattr(fn, "__name__", "timer"), fn, *args)

        return self.spawn(later)

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Timer:
        """Run ``await fn(*args)`` until it returns or the timer is cancelled."""
        timer = Timer()

        async def run() -> None:
            with trio.CancelScope() as scope:
                timer.on_cancel(scope.cancel)
                if timer.cancelled:
                    return
                try:
                    await fn(*args)
                except Exception:
                    log.exception("device model task %s failed", getattr(fn, "__name__", fn))

        self.nursery.start_soon(run)
        return timer
