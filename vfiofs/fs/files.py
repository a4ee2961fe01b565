"""What an open file of the mount is: one class per kind of node, all in the adapter's one fh table.

Each class answers ``read(offset, size)``, ``write(offset, data)``, ``poll(poll_handle)``,
``fsync()`` and ``release()``: it returns a result or raises ``VfioError`` / ``FUSEError``;
:mod:`vfiofs.fs.operations` turns anything else into a logged EIO. Class attribute
``nonseekable`` is what the open reply says; every file is direct_io (nothing is cached).

``fh`` is the number FUSE knows the file by: a VFIO handle keeps the mailbox's own number
(so ``Mailbox.handle(fh)``, trace events and ``vfiofs ls`` all name the same handle); the
adapter numbers every other file itself.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
from typing import Any, Protocol

import pyfuse3

from vfiofs.core.mailbox import Mailbox
from vfiofs.core.ports import READABLE, HostPort
from vfiofs.core.trace import TraceBus
from vfiofs.errors import VfioError

log = logging.getLogger(__name__)

# What poll reports for a file without a poll method (the kernel's DEFAULT_POLLMASK).
DEFAULT_POLLMASK = select.POLLIN | select.POLLOUT | select.POLLRDNORM | select.POLLWRNORM


class OpenFile(Protocol):
    """What the adapter's fh table holds; ``fh`` is set by the adapter unless the mailbox chose it."""

    fh: int
    nonseekable: bool

    def read(self, offset: int, size: int) -> bytes: ...
    def write(self, offset: int, data: bytes) -> int: ...
    def poll(self, poll_handle: Any) -> int: ...  # poll_handle: a pyfuse3.PollHandle or None
    def fsync(self) -> None: ...
    def release(self) -> None: ...


def refuse_writable(flags: int) -> None:
    """Read-only files: a writable or truncating open is EACCES, even for root (as kernfs does)."""
    if (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC:
        raise pyfuse3.FUSEError(errno.EACCES)


def _wake(poll_handle: Any) -> None:
    """One notification for a pyfuse3 poll handle; a poller that is gone is no error."""
    try:
        poll_handle.notify()
    except Exception as exc:
        log.debug("poll notification failed: %s", exc)


class VfioHandle:
    """``iommu``, ``vfio/vfio``, ``vfio/<group>``, ``vfio/devices/vfioN``: a mailbox handle."""

    __slots__ = ("fh", "_mailbox")
    nonseekable = False

    def __init__(self, mailbox: Mailbox, fh: int) -> None:
        self.fh = fh
        self._mailbox = mailbox

    # The hot path: one call into the mailbox, nothing allocated here.
    def read(self, offset: int, size: int) -> bytes:
        return self._mailbox.read(self.fh, offset, size)

    def write(self, offset: int, data: bytes) -> int:
        return self._mailbox.write(self.fh, offset, data)

    def poll(self, poll_handle: Any) -> int:
        return DEFAULT_POLLMASK  # a vfio device fd has no poll method

    def fsync(self) -> None:
        self._mailbox.fsync(self.fh)

    def release(self) -> None:
        self._mailbox.release(self.fh)


class AttributeFile:
    """A ``sys/`` attribute: fixed bytes, read-only, read at any offset."""

    __slots__ = ("fh", "content")
    nonseekable = False

    def __init__(self, content: bytes) -> None:
        self.fh = 0
        self.content = content

    def read(self, offset: int, size: int) -> bytes:
        return self.content[offset : offset + size] if offset >= 0 else b""

    def write(self, offset: int, data: bytes) -> int:
        raise pyfuse3.FUSEError(errno.EACCES)  # opened read-only; the kernel says EBADF first

    def poll(self, poll_handle: Any) -> int:
        return DEFAULT_POLLMASK

    def fsync(self) -> None:
        return None  # kernfs: noop_fsync

    def release(self) -> None:
        return None


class StatusFile(AttributeFile):
    """``.vfiofs/status``: the daemon's status (for ``vfiofs ls``) as JSON, taken when opened."""

    __slots__ = ()

    def __init__(self, mailbox: Mailbox) -> None:
        super().__init__(json.dumps(mailbox.status(), indent=1).encode() + b"\n")


class TraceFile:
    """``.vfiofs/trace``: a stream of events from the trace bus, one JSON line each."""

    __slots__ = ("fh", "_bus", "_subscriber", "_poll_handle")
    nonseekable = True

    def __init__(self, bus: TraceBus) -> None:
        self.fh = 0
        self._bus = bus
        self._poll_handle: Any = None  # pyfuse3.PollHandle, good for one notification
        self._subscriber = bus.subscribe(self._event)

    def _event(self) -> None:
        handle, self._poll_handle = self._poll_handle, None  # one notification per poll handle
        if handle is not None:
            _wake(handle)

    def read(self, offset: int, size: int) -> bytes:
        data = self._subscriber.take(size)
        if not data:
            raise pyfuse3.FUSEError(errno.EAGAIN)  # never wait in the daemon; poll for POLLIN
        return data

    def write(self, offset: int, data: bytes) -> int:
        raise pyfuse3.FUSEError(errno.EACCES)  # opened read-only

    def poll(self, poll_handle: Any) -> int:
        if poll_handle is not None:
            self._poll_handle = poll_handle
        return READABLE if self._subscriber.queue or self._subscriber.dropped else 0

    def fsync(self) -> None:
        # What fsync has always answered here (the request fell through to the mailbox).
        raise VfioError(errno.EBADF, "no open handle")

    def release(self) -> None:
        self._bus.unsubscribe(self._subscriber)


class PortFile:
    """``ports/vfioN``: the other end of a device's serial line; a stream that never waits."""

    __slots__ = ("fh", "_port", "_poll_handle")
    nonseekable = True  # offsets mean nothing

    def __init__(self, port: HostPort) -> None:
        self.fh = 0
        self._port = port
        self._poll_handle: Any = None  # the latest poller's handle, good for one notification
        port.subscribe(self._changed)

    def _changed(self) -> None:
        handle, self._poll_handle = self._poll_handle, None
        if handle is not None:
            _wake(handle)

    def read(self, offset: int, size: int) -> bytes:
        return self._port.read(size)

    def write(self, offset: int, data: bytes) -> int:
        return self._port.write(data)

    def poll(self, poll_handle: Any) -> int:
        mask = self._port.poll_mask()
        if poll_handle is not None:
            self._poll_handle = poll_handle  # the latest replaces (and so releases) the previous one
        return mask

    def fsync(self) -> None:
        return None  # nothing to make durable

    def release(self) -> None:
        self._port.unsubscribe(self._changed)


class NoFile:
    """What an fh nobody opened (or already released) answers: EBADF, as the mailbox did."""

    __slots__ = ()
    fh = 0
    nonseekable = False

    def read(self, offset: int, size: int) -> bytes:
        raise VfioError(errno.EBADF, "no open handle")

    def write(self, offset: int, data: bytes) -> int:
        raise VfioError(errno.EBADF, "no open handle")

    def poll(self, poll_handle: Any) -> int:
        return DEFAULT_POLLMASK

    def fsync(self) -> None:
        raise VfioError(errno.EBADF, "no open handle")

    def release(self) -> None:
        return None


NO_FILE = NoFile()
