"""HostPort (vfiofs.core.ports) over a fake model: EAGAIN both ways, poll masks, model bugs → EIO,
and the model's notification fanned out to every subscriber."""

from __future__ import annotations

import errno
import logging
import select

import pytest

from vfiofs.core.ports import HostPort
from vfiofs.errors import VfioError

READABLE = select.POLLIN | select.POLLRDNORM
WRITABLE = select.POLLOUT | select.POLLWRNORM


class FakeContext:
    def __init__(self) -> None:
        self.watchers: list = []

    def watch_host_port(self, callback) -> None:
        self.watchers.append(callback)

    def host_port_changed(self) -> None:
        for callback in self.watchers:
            callback()


class FakeModel:
    """A line with a transmit buffer (device → host) and a receive FIFO of ``room`` bytes."""

    has_host_port = True

    def __init__(self, room: int = 4) -> None:
        self.context = FakeContext()
        self.transmitted = bytearray()
        self.received = bytearray()
        self.capacity = room

    def host_pending(self) -> int:
        return len(self.transmitted)

    def host_room(self) -> int:
        return self.capacity - len(self.received)

    def host_read(self, size: int) -> bytes:
        data = bytes(self.transmitted[:size])
        del self.transmitted[:size]
        return data

    def host_write(self, data: bytes) -> int:
        taken = min(len(data), self.host_room())
        self.received += data[:taken]
        return taken


def errno_of(call, *args) -> int:
    with pytest.raises(VfioError) as exc:
        call(*args)
    return exc.value.errno


@pytest.fixture
def model() -> FakeModel:
    return FakeModel()


@pytest.fixture
def port(model) -> HostPort:
    return HostPort(model)


def test_read_is_eagain_when_nothing_was_transmitted(port, model):
    assert errno_of(port.read, 10) == errno.EAGAIN
    model.transmitted += b"hello"
    assert port.read(3) == b"hel"
    assert port.read(10) == b"lo"
    assert errno_of(port.read, 10) == errno.EAGAIN


def test_write_is_eagain_when_the_device_takes_nothing(port, model):
    assert port.write(b"abcdef") == 4
    assert model.received == b"abcd"
    assert errno_of(port.write, b"x") == errno.EAGAIN
    assert port.write(b"") == 0  # an empty write takes nothing and is no error


def test_poll_mask_follows_pending_and_room(port, model):
    assert port.poll_mask() == WRITABLE
    model.transmitted += b"x"
    assert port.poll_mask() == READABLE | WRITABLE
    model.received += b"abcd"
    assert port.poll_mask() == READABLE
    model.transmitted.clear()
    assert port.poll_mask() == 0


def test_poll_mask_without_pending_or_room_is_always_ready():
    class Bare:
        context = FakeContext()

        def host_read(self, size):
            return b""

        def host_write(self, data):
            return 0

    assert HostPort(Bare()).poll_mask() == READABLE | WRITABLE


@pytest.mark.parametrize(
    ("method", "bug"),
    [
        ("host_read", lambda size: b"x" * (size + 1)),  # more than asked for
        ("host_read", lambda size: 3),  # not bytes (bytes(3) would be three zero bytes)
        ("host_read", lambda size: "ab"),
        ("host_write", lambda data: len(data) + 1),  # more than it was given
        ("host_write", lambda data: -1),
        ("host_write", lambda data: None),
    ],
)
def test_a_bad_return_is_eio_and_logged(port, model, caplog, method, bug):
    setattr(model, method, bug)
    call = port.read if method == "host_read" else port.write
    arg = 4 if method == "host_read" else b"abc"
    with caplog.at_level(logging.ERROR, logger="vfiofs.core.ports"):
        assert errno_of(call, arg) == errno.EIO
    assert caplog.records and f"internal error in port {method[5:]}" in caplog.text


@pytest.mark.parametrize("method", ["host_read", "host_write", "host_pending", "host_room"])
def test_a_model_exception_is_eio_and_logged(port, model, caplog, method):
    def broken(*args):
        raise RuntimeError("model bug")

    setattr(model, method, broken)
    call = {"host_read": lambda: port.read(4), "host_write": lambda: port.write(b"abc")}.get(method, port.poll_mask)
    with caplog.at_level(logging.ERROR, logger="vfiofs.core.ports"):
        assert errno_of(call) == errno.EIO
    assert "model bug" in caplog.text


def test_a_model_vfio_error_keeps_its_errno(port, model, caplog):
    def refuses(*args):
        raise VfioError(errno.ENXIO, "line is down")

    model.host_read = refuses
    model.host_write = refuses
    with caplog.at_level(logging.ERROR, logger="vfiofs.core.ports"):
        assert errno_of(port.read, 4) == errno.ENXIO
        assert errno_of(port.write, b"x") == errno.ENXIO
    assert not caplog.records  # the model said what went wrong: nothing to log


def test_notification_fans_out_to_every_subscriber(port, model):
    seen: list[str] = []
    first, second = (lambda: seen.append("first")), (lambda: seen.append("second"))
    port.subscribe(first)
    port.subscribe(second)
    model.context.host_port_changed()
    assert seen == ["first", "second"]
    port.unsubscribe(first)
    port.unsubscribe(first)  # a second unsubscribe is harmless
    model.context.host_port_changed()
    assert seen == ["first", "second", "second"]


def test_a_failing_subscriber_does_not_reach_the_model(port, model, caplog):
    seen: list[str] = []

    def broken():
        raise RuntimeError("subscriber bug")

    port.subscribe(broken)
    port.subscribe(lambda: seen.append("after"))
    with caplog.at_level(logging.ERROR, logger="vfiofs.core.ports"):
        model.context.host_port_changed()  # does not raise
    assert seen == ["after"]
    assert "subscriber bug" in caplog.text


def test_a_subscriber_may_unsubscribe_while_notified(port, model):
    seen: list[str] = []

    def once():
        seen.append("once")
        port.unsubscribe(once)

    port.subscribe(once)
    port.subscribe(lambda: seen.append("other"))
    model.context.host_port_changed()
    model.context.host_port_changed()
    assert seen == ["once", "other", "other"]
