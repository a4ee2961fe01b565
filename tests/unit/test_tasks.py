"""Unit tests of model timers: the manual scheduler (vfiofs.models.timers), the context's
bookkeeping, and the trio scheduler (vfiofs.host.tasks) on trio's virtual clock."""

from __future__ import annotations

import pytest
import trio

from vfiofs.host.tasks import TrioScheduler
from vfiofs.models.api import DeviceModel, ModelContext
from vfiofs.models.spec import BarSpec, DeviceSpec, PciIdentity
from vfiofs.models.timers import ManualScheduler

SPEC = DeviceSpec(name="t", model="generic", identity=PciIdentity(vendor=1, device=2), bars=(BarSpec(0, 4096),))


def test_manual_scheduler_runs_due_timers_in_order():
    scheduler = ManualScheduler()
    ran: list[str] = []
    scheduler.call_later(0.2, ran.append, "b")
    scheduler.call_later(0.1, ran.append, "a")
    late = scheduler.call_later(0.3, ran.append, "never")
    assert scheduler.advance(0.05) == 0 and ran == []
    late.cancel()
    assert scheduler.advance(1) == 2 and ran == ["a", "b"]


def test_a_timer_started_by_a_timer_counts_from_its_own_due_time():
    scheduler = ManualScheduler()
    ticks: list[float] = []

    def tick() -> None:
        ticks.append(scheduler.now)
        if len(ticks) < 5:
            scheduler.call_later(0.001, tick)

    scheduler.call_later(0.001, tick)
    assert scheduler.advance(0.003) == 3
    assert ticks == pytest.approx([0.001, 0.002, 0.003]) and scheduler.now == pytest.approx(0.003)
    assert scheduler.advance(1) == 2 and scheduler.now == pytest.approx(1.003)


def test_a_failing_timer_is_logged_not_raised(caplog):
    scheduler = ManualScheduler()
    scheduler.call_later(0, lambda: 1 / 0)
    assert scheduler.advance(0) == 1
    assert "device model failed" in caplog.text


def test_reset_cancels_the_models_timers():
    clock = ManualScheduler()
    model = DeviceModel(SPEC, ModelContext.standalone(SPEC, clock))
    fired: list[int] = []
    model.call_later(1, fired.append, 1)
    model.reset()
    model.call_later(1, fired.append, 2)
    clock.advance(2)
    assert fired == [2]
    model.shutdown()


def test_a_connected_scheduler_takes_over():
    model = DeviceModel(SPEC)
    clock = ManualScheduler()
    model.context.connect_scheduler(clock)
    fired: list[str] = []
    model.call_later(0.5, fired.append, "tick")
    assert clock.advance(0.5) == 1 and fired == ["tick"]


async def test_trio_scheduler_runs_timers_and_tasks(autojump_clock):
    """On the virtual clock: each sleep ends exactly when due, and no real time passes."""
    ran: list[tuple[str, float]] = []
    async with trio.open_nursery() as nursery:
        scheduler = TrioScheduler(nursery)
        start = trio.current_time()
        scheduler.call_later(1, lambda: ran.append(("timer", trio.current_time() - start)))
        cancelled = scheduler.call_later(1, ran.append, ("cancelled", 0))
        cancelled.cancel()

        async def task(tag: str) -> None:
            await trio.sleep(2)
            ran.append((tag, trio.current_time() - start))

        scheduler.spawn(task, "task")
        forever = scheduler.spawn(trio.sleep_forever)
        await trio.sleep(3)
        forever.cancel()
    assert sorted(ran) == [("task", 2), ("timer", 1)]
    assert trio.current_time() - start == 3  # the nursery closed: "forever" was cancelled


async def test_trio_timer_cancelled_before_it_starts(autojump_clock):
    ran: list[str] = []
    async with trio.open_nursery() as nursery:
        scheduler = TrioScheduler(nursery)
        scheduler.spawn(trio.sleep_forever).cancel()  # cancelled before the nursery started it
        scheduler.call_later(1, ran.append, "ran")
    assert ran == ["ran"]


def test_the_context_holds_only_pending_timers():
    """Timers that ran or were cancelled are let go: a model that starts a timer per register
    write (edu's factorial) must not make every later call_later slower, nor grow for ever."""
    clock = ManualScheduler()
    context = ModelContext.standalone(SPEC, clock)
    fired: list[int] = []
    for i in range(1000):
        context.call_later(0, fired.append, i)
        clock.advance(0)
    dropped = context.call_later(5, fired.append, -1)
    dropped.cancel()
    pending = context.call_later(1, fired.append, -2)
    assert fired == list(range(1000)) and context._timers == {pending}
    context.cancel_timers()
    assert pending.cancelled and context._timers == set()
    assert clock.advance(10) == 0 and fired == list(range(1000))


async def test_a_finished_task_leaves_the_context(autojump_clock):
    done: list[str] = []
    async with trio.open_nursery() as nursery:
        context = ModelContext.standalone(SPEC, TrioScheduler(nursery))

        async def task() -> None:
            await trio.sleep(1)
            done.append("task")

        running = context.spawn(task)
        assert context._timers == {running}
        await trio.sleep(2)
        assert done == ["task"] and context._timers == set()
