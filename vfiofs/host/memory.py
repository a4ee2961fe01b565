"""BAR memory the daemon serves: a memfd that can be shared, revoked and persisted.

BAR memory lives in a memfd. The daemon reads and writes it with pread/pwrite and never
maps it itself: the binder may hold the same memfd (see :meth:`BarMemory.share`), and
a client that shrank a file the daemon had mapped could make the daemon fault. A reset
(:meth:`BarMemory.reset`) zeroes the memfd in place, so the binder's mappings stay valid
across VFIO_DEVICE_RESET as the kernel's do. Revoking access (:meth:`BarMemory.revoke`,
when the bound handle closes) truncates the memfd the binder holds (its mappings then
raise SIGBUS) and moves the device onto a fresh memfd, so an old mapping can never reach
a later binder's data.

The daemon builds one :class:`BarMemory` per BAR (:func:`bar_memory`) and hands them to the
model through its :class:`~vfiofs.models.api.ModelContext`; a model never builds its own.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from pathlib import Path

from vfiofs.models.spec import DeviceSpec

_CHUNK = 1 << 20


_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def _extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The (offset, length) ranges of ``fd`` that hold data (holes read as zeros and need no copy)."""
    extents, offset = [], 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                break
            return [(0, size)]  # no SEEK_DATA here: copy everything
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        extents.append((start, end - start))
        offset = end
    return extents


def _copy(src: int, dst: int, size: int) -> None:
    for start, length in _extents(src, size):
        for offset in range(start, start + length, _CHUNK):
            data = os.pread(src, min(_CHUNK, start + length - offset), offset)
            os.pwrite(dst, data, offset)


def _zero(fd: int, size: int) -> None:
    """Zero ``fd`` in place, keeping its size: mappings of it stay valid and read zeros."""
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, 0, size) == 0:
        return
    zeros = bytes(min(_CHUNK, size))  # a file system without hole punching
    for offset in range(0, size, _CHUNK):
        os.pwrite(fd, zeros[: min(_CHUNK, size - offset)], offset)


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
            try:
                self._open_state(state_file)
            except BaseException:
                os.close(self.fd)
                self.fd = -1
                raise

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
        """Power-on contents, in place: zeroed unless ``keep``; mappings handed out stay valid."""
        if not keep:
            _zero(self.fd, self.size)

    def revoke(self) -> None:
        """Take the memory back from every mapping handed out (they fault from now on); the
        device goes on with the same contents in a fresh memfd nobody else holds."""
        if not self.shared:
            return
        fresh = self._fresh()
        _copy(self.fd, fresh, self.size)
        os.ftruncate(self.fd, 0)  # every old mapping now faults
        os.close(self.fd)
        self.fd, self.shared = fresh, False

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


def bar_memory(spec: DeviceSpec, state_dir: Path | None = None) -> dict[int, BarMemory]:
    """One BarMemory per BAR of ``spec``; persistent BARs keep ``state_dir/<name>.bar<index>``.

    Raises ValueError (a persistent BAR without ``state_dir``) or StateFileError, having
    closed the memory it already built.
    """
    memory: dict[int, BarMemory] = {}
    try:
        for bar in spec.bars:
            state_file = None
            if bar.persist:
                if state_dir is None:
                    raise ValueError(f"{spec.name}: BAR {bar.index} persists but no state directory was given")
                state_file = state_dir / f"{spec.name}.bar{bar.index}"
            memory[bar.index] = BarMemory(f"{spec.name}.bar{bar.index}", bar.size, state_file)
    except BaseException:
        for built in memory.values():
            built.close()
        raise
    return memory
