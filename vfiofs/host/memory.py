"""BAR memory the daemon serves: a memfd that can be shared, revoked and persisted.

BAR memory lives in a memfd. The daemon reads and writes it with pread/pwrite and never
maps it itself: the binder may hold the same memfd (see :meth:`BarMemory.share`), and
a client that shrank a file the daemon had mapped could make the daemon fault. Revoking
access truncates the memfd the binder holds (its mappings then raise SIGBUS) and moves
the device onto a fresh memfd, so an old mapping can never reach a later binder's data.

The daemon builds one :class:`BarMemory` per BAR (:func:`bar_memory`) and hands them to the
model through its :class:`~vfiofs.models.api.ModelContext`; a model never builds its own.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from vfiofs.models.spec import DeviceSpec

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
