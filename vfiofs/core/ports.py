"""The host side of a device's serial line (``ports/vfioN``), seen from the mount.

A model with a host port (the 16550 UART) offers ``host_read``/``host_write`` and, optionally,
``host_pending``/``host_room``. :class:`HostPort` is the gate between a port file and that model:
it never waits (an empty or full model is EAGAIN: the daemon runs one task, callers poll), it
turns whatever a buggy model returns into EIO (logged) instead of letting it reach FUSE, and it
fans the model's "something changed" signal out to every open port file.
"""

from __future__ import annotations

import errno
import logging
import select
from contextlib import contextmanager
from typing import Callable, Iterator

from vfiofs.errors import VfioError

log = logging.getLogger(__name__)

READABLE = select.POLLIN | select.POLLRDNORM
WRITABLE = select.POLLOUT | select.POLLWRNORM


class HostPort:
    """One device's host port: read what the driver transmitted, write what it will receive."""

    def __init__(self, model: object) -> None:
        self.model = model
        self._subscribers: list[Callable[[], None]] = []
        model.context.watch_host_port(self._changed)  # type: ignore[attr-defined]

    def read(self, size: int) -> bytes:
        """Up to ``size`` transmitted bytes; EAGAIN when there are none."""
        with _model_call("port read"):
            data = self.model.host_read(size)  # type: ignore[attr-defined]
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise TypeError(f"host_read returned {type(data).__name__}, not bytes")
            data = bytes(data)
            if len(data) > size:
                raise ValueError(f"host_read returned {len(data)} bytes, asked for {size}")
        if not data:
            raise VfioError(errno.EAGAIN, "nothing transmitted")  # poll for POLLIN
        return data

    def write(self, data: bytes) -> int:
        """Feed ``data`` to the device; how many bytes it took, EAGAIN when it took none."""
        with _model_call("port write"):
            taken = self.model.host_write(bytes(data))  # type: ignore[attr-defined]
            if not isinstance(taken, int) or not 0 <= taken <= len(data):
                raise ValueError(f"host_write returned {taken!r} for {len(data)} bytes")
        if taken == 0 and data:
            raise VfioError(errno.EAGAIN, "the device takes nothing now")  # poll for POLLOUT
        return taken

    def poll_mask(self) -> int:
        """POLLIN when there is something to read, POLLOUT when the device has room.

        A model without ``host_pending``/``host_room`` is always readable/writable.
        """
        mask = 0
        with _model_call("poll"):
            pending = getattr(self.model, "host_pending", None)
            room = getattr(self.model, "host_room", None)
            if pending is None or pending() > 0:
                mask |= READABLE
            if room is None or room() > 0:
                mask |= WRITABLE
        return mask

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` whenever the model reports news for its host side."""
        self._subscribers.append(callback)

    def unsubscribe(self, callback: Callable[[], None]) -> None:
        if callback in self._subscribers:
            self._subscribers.remove(callback)

    def _changed(self) -> None:
        """The model's notification: tell every subscriber; never raises into the model."""
        for callback in list(self._subscribers):
            try:
                callback()
            except Exception:
                log.exception("internal error in a port notification")


@contextmanager
def _model_call(what: str) -> Iterator[None]:
    """An exception or a bad return from the model: logged with its traceback, reported as EIO
    (a VfioError keeps its errno)."""
    try:
        yield
    except VfioError:
        raise
    except Exception as exc:
        log.error("internal error in %s", what, exc_info=exc)
        raise VfioError(errno.EIO, f"{what}: {exc}") from None
