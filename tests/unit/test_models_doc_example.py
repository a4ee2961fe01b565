"""docs/models.md's worked example (a countdown timer) is real: its definition, its model and
its test are taken from the page and run here, and its behaviour is checked once more."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from support import RecordingSink
from vfiofs import abi
from vfiofs.models.api import ModelContext
from vfiofs.host.definitions import load_definition
from vfiofs.models.timers import ManualScheduler

PAGE = Path(__file__).resolve().parents[2] / "docs" / "models.md"
BLOCK = re.compile(r"<!-- example: (?P<name>[\w.]+) -->\n```\w+\n(?P<code>.*?)\n```", re.S)


def examples() -> dict[str, str]:
    return {m.group("name"): m.group("code") + "\n" for m in BLOCK.finditer(PAGE.read_text(encoding="utf-8"))}


@pytest.fixture
def countdown(tmp_path, monkeypatch):
    """The example's files in a devices directory on sys.path; its definition loaded."""
    for name, code in examples().items():
        (tmp_path / name).write_text(code, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("countdown", None)


def build(devices: Path, irq_type: str):
    definition = load_definition(devices / "countdown.toml")
    clock, sink = ManualScheduler(), RecordingSink(irq_type)
    context = ModelContext.standalone(definition.spec, clock)
    context.connect_interrupts(sink)
    return definition.build(context), clock, sink


def reg(model, offset: int) -> int:
    return int.from_bytes(model.bar_read(0, offset, 4), "little")


def put(model, offset: int, value: int) -> None:
    model.bar_write(0, offset, value.to_bytes(4, "little"))


def test_the_page_has_the_three_blocks():
    assert set(examples()) == {"countdown.toml", "countdown.py", "test_countdown.py"}


def test_the_pages_own_test_passes(countdown):
    namespace = {"__file__": str(countdown / "test_countdown.py"), "__name__": "test_countdown"}
    exec(compile(examples()["test_countdown.py"], str(countdown / "test_countdown.py"), "exec"), namespace)
    tests = [fn for name, fn in namespace.items() if name.startswith("test_") and callable(fn)]
    assert tests
    for test in tests:
        test()


def test_the_definition_names_the_example_model(countdown):
    definition = load_definition(countdown / "countdown.toml")
    assert definition.factory.__name__ == "CountdownTimer" and definition.factory.__module__ == "countdown"
    assert definition.spec.capability("msi") is not None


def test_periodic_mode_reloads_and_sends_msi(countdown):
    timer, clock, sink = build(countdown, "msi")
    put(timer, 0x04, 2)
    put(timer, 0x08, 0x1 | 0x2 | 0x4)  # START | PERIODIC | IRQ_ENABLE
    assert clock.advance(0.002) == 2
    assert sink.events == [("irq", abi.VFIO_PCI_MSI_IRQ_INDEX, 0)]
    assert reg(timer, 0x0C) == 2 and reg(timer, 0x08) == 0x7  # reloaded, still running
    clock.advance(0.002)
    assert len(sink.events) == 2


def test_without_irq_enable_only_the_status_bit_is_set(countdown):
    timer, clock, sink = build(countdown, "intx")
    put(timer, 0x04, 1)
    put(timer, 0x08, 0x1)
    clock.advance(0.001)
    assert reg(timer, 0x10) == 1 and sink.events == []


def test_a_control_write_stops_the_count_and_reset_cancels_it(countdown):
    timer, clock, sink = build(countdown, "intx")
    put(timer, 0x04, 5)
    put(timer, 0x08, 0x1 | 0x4)
    clock.advance(0.002)
    put(timer, 0x08, 0x4)  # START cleared
    assert clock.advance(1) == 0 and reg(timer, 0x0C) == 3  # stopped where it was
    put(timer, 0x08, 0x1 | 0x4)
    timer.reset()
    assert clock.advance(1) == 0
    assert [reg(timer, o) for o in (0x00, 0x04, 0x08, 0x0C, 0x10)] == [0x544D5231, 0, 0, 0, 0]
    assert sink.events[-1] == ("intx", False)


def test_read_only_registers_ignore_the_driver(countdown):
    timer, _, _ = build(countdown, "none")
    put(timer, 0x00, 0)
    put(timer, 0x0C, 99)
    assert reg(timer, 0x00) == 0x544D5231 and reg(timer, 0x0C) == 0
