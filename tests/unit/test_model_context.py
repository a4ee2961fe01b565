"""Unit tests of the model boundary (vfiofs.models.api): the context a model is given, and
the BAR memory the daemon builds for it (vfiofs.host.memory)."""

from __future__ import annotations

import errno
import os

import pytest

from support import RecordingSink
from vfiofs.errors import VfioError
from vfiofs.host.memory import BarMemory, StateFileError, bar_memory
from vfiofs.models.api import DeviceModel, DmaFault, DmaPort, LocalMemory, ModelContext
from vfiofs.models.spec import BarSpec, DeviceSpec, PciIdentity

SPEC = DeviceSpec(name="ctx", model="generic", identity=PciIdentity(vendor=1, device=2),
                  bars=(BarSpec(0, 4096, mmap=True), BarSpec(2, 64, persist=True)))


class Echo(DmaPort):
    def read(self, iova: int, size: int) -> bytes:
        return iova.to_bytes(8, "little")[:size]

    def write(self, iova: int, data: bytes) -> None:
        self.written = (iova, data)


def test_a_standalone_model_has_in_memory_bars_and_nothing_connected():
    model = DeviceModel(SPEC)
    assert sorted(model.context.memory) == [0, 2]
    assert all(isinstance(m, LocalMemory) for m in model.context.memory.values())
    assert model.context.irq_type == "none" and not model.msi_enabled()
    model.raise_irq(2, 0)  # dropped: nothing is connected
    with pytest.raises(DmaFault, match="not attached"):
        model.dma_read(0x1000, 4)
    with pytest.raises(RuntimeError, match="trio loop"):  # background tasks need the daemon
        model.spawn(lambda: None)
    with pytest.raises(VfioError) as info:  # nothing to hand to a binder's mmap
        model.context.memory[0].share()
    assert info.value.errno == errno.EINVAL


def test_standalone_memory_resets_like_bar_memory():
    model = DeviceModel(SPEC)
    model.bar_write(0, 0x10, b"gone")
    model.bar_write(2, 0x10, b"kept")
    model.reset()
    assert model.bar_read(0, 0x10, 4) == bytes(4)
    assert model.bar_read(2, 0x10, 4) == b"kept"  # persist: kept across reset (never written to disk)


def test_the_driver_side_connects_interrupts_and_dma():
    model = DeviceModel(SPEC)
    sink, port = RecordingSink("msix"), Echo()
    model.context.connect_interrupts(sink)
    model.context.connect_dma(port)
    model.raise_irq(2, 3)
    model.assert_intx()
    model.deassert_intx()
    assert sink.events == [("irq", 2, 3), ("intx", True), ("intx", False)]
    assert model.context.irq_type == "msix"
    assert model.dma_read(0x42, 2) == b"\x42\x00"
    model.dma_write(0x10, b"x")
    assert port.written == (0x10, b"x")
    model.context.connect_dma(None)  # detached again
    with pytest.raises(DmaFault):
        model.dma_write(0x10, b"x")


def test_host_port_news_reach_every_watcher_and_a_failing_one_is_contained(caplog):
    context = ModelContext.standalone(SPEC)
    heard: list[str] = []

    def broken() -> None:
        raise RuntimeError("listener bug")

    context.watch_host_port(lambda: heard.append("a"))
    context.watch_host_port(broken)
    context.watch_host_port(lambda: heard.append("b"))
    context.host_port_changed()
    assert heard == ["a", "b"]
    assert "host-side notification failed" in caplog.text
    ModelContext.standalone(SPEC).host_port_changed()  # nobody watching: nothing happens


def test_a_model_takes_a_context_not_a_state_directory(tmp_path):
    with pytest.raises(TypeError, match="ModelContext"):
        DeviceModel(SPEC, tmp_path)
    with pytest.raises(ValueError, match="no memory for BAR 2"):
        DeviceModel(SPEC, ModelContext({0: LocalMemory(4096)}))


def test_bar_memory_is_one_memfd_per_bar_with_state_files(tmp_path):
    memory = bar_memory(SPEC, tmp_path)
    try:
        assert all(isinstance(m, BarMemory) for m in memory.values())
        assert [m.size for m in memory.values()] == [4096, 64]
        assert (tmp_path / "ctx.bar2").stat().st_size == 64
        assert memory[0].share() >= 0
    finally:
        for m in memory.values():
            m.close()


def test_a_state_file_in_use_is_refused_without_leaking(tmp_path):
    first = bar_memory(SPEC, tmp_path)
    try:
        before = sorted(os.listdir("/proc/self/fd"))
        with pytest.raises(StateFileError, match="in use by another vfiofs"):
            bar_memory(SPEC, tmp_path)
        assert sorted(os.listdir("/proc/self/fd")) == before
    finally:
        for m in first.values():
            m.close()
