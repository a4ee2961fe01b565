"""The one exception the sans-I/O layers raise: a syscall's errno, as the kernel would return it."""

from __future__ import annotations

import errno as _errno
import os

# FUSE hands an errno back to the caller only for 1..511; anything else would leave
# the request unanswered (see docs). Every errno vfiofs produces stays in this range.
ERRNO_MIN = 1
ERRNO_MAX = 511


class VfioError(Exception):
    """A failed operation; ``errno`` is what the caller's syscall returns."""

    def __init__(self, errno: int, detail: str = "") -> None:
        if not ERRNO_MIN <= errno <= ERRNO_MAX:
            detail = f"{detail} (errno {errno} out of range, reported as EIO)".strip()
            errno = _errno.EIO
        super().__init__(errno, detail or os.strerror(errno))
        self.errno = errno
        self.detail = detail

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno, str(self.errno))
        return f"{name}: {self.detail}" if self.detail else name
