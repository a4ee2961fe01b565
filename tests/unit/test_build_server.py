"""host/daemon.build_server: every way a device cannot be built ends in one MountError line, and
the devices built before it are shut down (their BAR memfds closed)."""

from __future__ import annotations

import dataclasses

import pytest

from vfiofs.host import daemon
from vfiofs.host.daemon import MountError, build_server
from vfiofs.host.definitions import bundled_directory, load_directory
from vfiofs.models.api import DeviceModel


class Broken(DeviceModel):
    def __init__(self, spec, context=None):
        super().__init__(spec, context)
        raise RuntimeError("model bug")


def test_a_model_whose_constructor_fails_is_one_line_and_the_others_are_shut_down(monkeypatch):
    first, second, *_ = load_directory(bundled_directory())
    broken = dataclasses.replace(second, model="tests:Broken", factory=Broken)
    built = []
    real = daemon.build_model
    monkeypatch.setattr(daemon, "build_model", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    with pytest.raises(MountError) as failed:
        build_server([first, broken])
    assert str(failed.value) == f"{second.name}: cannot build the device (model tests:Broken): RuntimeError: model bug"
    assert len(built) == 1 and all(memory.fd == -1 for memory in built[0].context.memory.values())

