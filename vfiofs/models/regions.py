"""What backs a BAR: shared memory that can be revoked and persisted, and emulated registers.

BAR memory lives in a memfd. The daemon reads and writes it with pread/pwrite and never
maps it itself: the binder may hold the same memfd (see :meth:`BarMemory.share`), and
a client that shrank a file the daemon had mapped could make the daemon fault. Revoking
access truncates the memfd the binder holds (its mappings then raise SIGBUS) and moves
the device onto a fresh memfd, so an old mapping can never reach a later binder's data.
"""

from __future__ import annotations

import bisect
import fcntl
import os
from pathlib import Path
from typing import Sequence

from vfiofs.models.spec import Register

_CHUNK = 1 << 20


def _copy(src: int, dst: int, size: int) -> None:
    for offset in range(0, size, _CHUNK):
        data = os.pread(src, min(_CHUNK, size - offset), offset)
        data += bytes(min(_CHUNK, size - offset) - len(data))
        os.pwrite(dst, data, offset)


class StateFileError(Exception):
    """A persistent region's state file cannot be used; ``str()`` is one line."""


class BarMemory:
    """The memory of one BAR, optionally persisted in ``state_file``."""

    def __init__(self, name: str, size: int, state_file: Path | None = None) -> None:
        self.name, self.size, self.state_file = name, size, state_file
        self.shared = False  # the current memfd has been handed to a binder
        self.fd = self._fresh()
        self._state_fd: int | None = None
        if state_file is not None:
            self._open_state(state_file)

    def _fresh(self) -> int:
        fd = os.memfd_create(f"vfiofs:{self.name}", os.MFD_CLOEXEC)
        os.ftruncate(fd, self.size)
        return fd

    def _open_state(self, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StateFileError(f"cannot open state file {path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StateFileError(f"state file {path} is in use by another vfiofs: use another --state-dir") from None
        size = os.fstat(fd).st_size
        if size not in (0, self.size):
            os.close(fd)
            raise StateFileError(f"state file {path} holds {size} bytes but the BAR has {self.size}: "
                                 "delete the file or fix the definition")
        if size == 0:
            os.ftruncate(fd, self.size)
        self._state_fd = fd
        _copy(fd, self.fd, self.size)

    # -- data ----------------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        data = os.pread(self.fd, size, offset)
        return data if len(data) == size else data + bytes(size - len(data))

    def write(self, offset: int, data: bytes) -> None:
        os.pwrite(self.fd, data, offset)

    # -- sharing and revocation -------------------------------------------------------------------
    def share(self) -> int:
        """The memfd to hand to the binder (the caller must not close it)."""
        self.shared = True
        return self.fd

    def reset(self, keep: bool) -> None:
        """Revoke every mapping handed out; keep the contents or zero them."""
        if self.shared:
            fresh = self._fresh()
            if keep:
                _copy(self.fd, fresh, self.size)
            os.ftruncate(self.fd, 0)  # every old mapping now faults
            os.close(self.fd)
            self.fd, self.shared = fresh, False
        elif not keep:
            os.ftruncate(self.fd, 0)
            os.ftruncate(self.fd, self.size)

    def sync(self) -> None:
        """Make the contents durable in the state file (no-op without one)."""
        if self._state_fd is None:
            return
        _copy(self.fd, self._state_fd, self.size)
        os.fsync(self._state_fd)

    def close(self) -> None:
        """Persist and release; closing twice is harmless."""
        if self.fd < 0:
            return
        self.sync()
        for fd in (self.fd, self._state_fd):
            if fd is not None:
                os.close(fd)
        self.fd, self._state_fd = -1, None


class RegisterFile:
    """The registers of one BAR with their access kinds (ro, rw, wo, w1c, rc)."""

    def __init__(self, registers: Sequence[Register]) -> None:
        self.registers = sorted(registers, key=lambda r: r.offset)
        self._starts = [r.offset for r in self.registers]
        self._max_width = max((r.width for r in self.registers), default=0)
        self.values: dict[int, int] = {}
        self.reset()

    def reset(self) -> None:
        self.values = {r.offset: r.reset for r in self.registers}

    def overlapping(self, offset: int, size: int) -> list[Register]:
        if not self.registers:
            return []
        first = bisect.bisect_left(self._starts, offset - self._max_width + 1)
        end = bisect.bisect_left(self._starts, offset + size)
        return [r for r in self.registers[first:end] if r.offset + r.width > offset]

    def overlay_read(self, offset: int, data: bytearray) -> None:
        """Replace the bytes of ``data`` (read at ``offset``) that registers cover."""
        for reg in self.overlapping(offset, len(data)):
            value = 0 if reg.access == "wo" else self.values[reg.offset]
            raw = value.to_bytes(reg.width, "little")
            lo, hi = max(offset, reg.offset), min(offset + len(data), reg.offset + reg.width)
            data[lo - offset : hi - offset] = raw[lo - reg.offset : hi - reg.offset]
            if reg.access == "rc":
                self.values[reg.offset] = 0

    def apply_write(self, offset: int, data: bytes) -> None:
        for reg in self.overlapping(offset, len(data)):
            lo, hi = max(offset, reg.offset), min(offset + len(data), reg.offset + reg.width)
            shift = 8 * (lo - reg.offset)
            mask = ((1 << (8 * (hi - lo))) - 1) << shift
            value = int.from_bytes(data[lo - offset : hi - offset], "little") << shift
            current = self.values[reg.offset]
            if reg.access in ("rw", "wo"):
                self.values[reg.offset] = (current & ~mask) | value
            elif reg.access == "w1c":
                self.values[reg.offset] = current & ~value

