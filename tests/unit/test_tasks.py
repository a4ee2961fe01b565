"""Unit tests of model timers (vfiofs.host.tasks) with the manual scheduler, and of the trio one."""

from __future__ import annotations

import trio

from vfiofs.models.api import DeviceModel
from vfiofs.models.spec import BarSpec, DeviceSpec, PciIdentity
from vfiofs.host.tasks import ManualScheduler, TrioScheduler

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


def test_a_failing_timer_is_logged_not_raised(caplog):
    scheduler = ManualScheduler()
    scheduler.call_later(0, lambda: 1 / 0)
    assert scheduler.advance(0) == 1
    assert "device model failed" in caplog.text


def test_reset_cancels_the_models_timers():
    model = DeviceModel(SPEC)
    fired: list[int] = []
    model.call_later(1, fired.append, 1)
    model.reset()
    model.call_later(1, fired.append, 2)
    model.scheduler.advance(2)
    assert fired == [2]
    model.shutdown()


async def test_trio_scheduler_runs_timers_and_tasks():
    ran: list[str] = []
    async with trio.open_nursery() as nursery:
        scheduler = TrioScheduler(nursery)
        scheduler.call_later(0.01, ran.append, "timer")
        cancelled = scheduler.call_later(0.01, ran.append, "cancelled")
        cancelled.cancel()

        async def task(tag: str) -> None:
            await trio.sleep(0.02)
            ran.append(tag)

        scheduler.spawn(task, "task")
        forever = scheduler.spawn(trio.sleep_forever)
        await trio.sleep(0.05)
        forever.cancel()
    assert sorted(ran) == ["task", "timer"]
