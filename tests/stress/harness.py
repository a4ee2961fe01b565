"""What every stress test shares: how long to run, a watchdog for hangs, the daemon's log,
an independent oracle for the mailbox's transport errors, and the figures for bench/reliability.py.

The fast form (the default, what ``pytest tests`` runs) is bounded so that all of
tests/stress takes well under 30 s. ``VFIOFS_STRESS=long`` selects the full counts.
``VFIOFS_STRESS_SEED`` fixes the seed of the generated requests (default: a fixed seed in the
fast form, a fresh one, printed, in the long form). ``VFIOFS_STRESS_REPORT=FILE`` makes the
tests append their figures to FILE as JSON lines (bench/reliability.py reads them).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import random
import signal
import struct
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from vfiofs.abi import protocol

LONG = os.environ.get("VFIOFS_STRESS", "").lower() == "long"
HANG_LIMIT = 5.0  # seconds: any single system call slower than this is a hang


def count(fast: int, long: int) -> int:
    """``fast`` in the default (CI) form, ``long`` with VFIOFS_STRESS=long."""
    return long if LONG else fast


def seed() -> int:
    given = os.environ.get("VFIOFS_STRESS_SEED")
    if given:
        return int(given, 0)
    return random.SystemRandom().randrange(1 << 32) if LONG else 0x5EED14


def record(section: str, **figures: object) -> None:
    """Append this test's figures to $VFIOFS_STRESS_REPORT (a JSON line), if it is set."""
    path = os.environ.get("VFIOFS_STRESS_REPORT")
    if path:
        with open(path, "a") as out:
            out.write(json.dumps({"section": section, **figures}) + "\n")


# -- hangs -------------------------------------------------------------------------------------

class Hang(AssertionError):
    pass


class Watchdog:
    """Times every system call made under :meth:`op`. A call still running after ``limit``
    seconds is a hang: the watchdog records what it was, aborts the mount's FUSE connection
    (``umount -f``, root only: a daemon stuck in its own FLUSH cannot even be killed) and kills
    the daemon, so the stuck call returns (ENOTCONN) instead of blocking the test run for ever;
    the test then fails with the hang. Nothing is synchronised by sleeping: the thread only
    looks at the clock."""

    def __init__(self, mount, limit: float = HANG_LIMIT) -> None:
        self.daemon_pid = mount.daemon.process.pid
        self.mountpoint = str(mount.path)
        self.limit = limit
        self.slowest = 0.0
        self.slowest_what = ""
        self.calls = 0
        self.hung: str | None = None
        self._what: str | None = None
        self._started = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="stress-watchdog", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            what, started = self._what, self._started
            if what is not None and time.monotonic() - started > self.limit and self.hung is None:
                self.hung = what
                abort(self.mountpoint)
                try:
                    os.kill(self.daemon_pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    @contextmanager
    def op(self, what: str) -> Iterator[None]:
        self._started = time.monotonic()
        self._what = what
        try:
            yield
        finally:
            took = time.monotonic() - self._started
            self._what = None
            self.calls += 1
            if took > self.slowest:
                self.slowest, self.slowest_what = took, what
            if self.hung is not None:
                raise Hang(f"no answer within {self.limit:.0f} s: {self.hung} (the daemon was killed)")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def abort(mountpoint: str) -> None:
    """Abort a FUSE connection: umount2(MNT_FORCE) ends every request waiting on it (FUSE aborts
    the connection even when the unmount itself is refused as busy). Called directly, not through
    umount(8): a forked child would close its copies of the mount's fds, and each close waits for
    the stuck daemon's FLUSH."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.umount2(os.fsencode(mountpoint), 1)  # MNT_FORCE


# -- the daemon's log ---------------------------------------------------------------------------

CRASH_MARKERS = ("Traceback (most recent call last)", "internal error")


def crashes_in_log(mount) -> list[str]:
    """Lines of the daemon's log that show a handler failed with an unexpected exception (the
    adapter turns those into EIO and logs them: each one is a bug a request could trigger)."""
    return [line for line in mount.daemon.output().splitlines() if any(m in line for m in CRASH_MARKERS)]


# -- the mailbox's transport errors, from docs/protocol.md §1, §6 and §9 alone --------------------

_HEADER = struct.Struct("<IHHIIIIQIIQ")
_FDREF = struct.Struct("<iI16s")
MAGIC = 0x53464656


def transport_errno(offset: int, message: bytes) -> int | None:
    """What a pwrite() of ``message`` at ``offset`` (>= 2^62) fails with before any command
    runs, per the specification, or None if the request reaches its operation. Written from
    the document, not from vfiofs/abi/protocol.py, so that it can disagree with it."""
    if offset + len(message) > (1 << 63) - 1:
        return errno.EINVAL  # the kernel's own check
    relative = offset - (1 << 62)
    if relative % (1 << 20) or relative >> 20 > 0xFFFFFFFF:
        return errno.EINVAL
    if len(message) > 65536:
        return errno.EMSGSIZE
    if len(message) < 48:
        return errno.EBADMSG
    magic, version, hsize, op, _request, kind, nfds, _value, plen, res0, res1 = _HEADER.unpack_from(message)
    if magic != MAGIC:
        return errno.EBADMSG
    if version != 1:
        return errno.EPROTO
    if hsize != 48 or res0 or res1:
        return errno.EBADMSG
    if not 1 <= op <= 5:
        return errno.EPROTO
    if kind > 2:
        return errno.EBADMSG
    if nfds > 2048:
        return errno.EBADMSG
    if 48 + 24 * nfds + plen != len(message):
        return errno.EBADMSG
    if plen and kind != 1:
        return errno.EBADMSG
    seen = set()
    for i in range(nfds):
        fd, fkind, _token = _FDREF.unpack_from(message, 48 + 24 * i)
        if not 1 <= fkind <= 5 or fd < 0 or fd in seen:
            return errno.EBADMSG
        seen.add(fd)
    return None


def decode_header(message: bytes) -> dict:
    magic, version, hsize, op, request, kind, nfds, value, plen, _r0, _r1 = _HEADER.unpack_from(message)
    return {"op": op, "request": request, "arg_kind": kind, "nfds": nfds, "arg_value": value, "payload_len": plen}


CONTROL = protocol.CONTROL_BASE
