"""The caller's memory behind an ioctl argument, with the kernel's copy rules.

A real ioctl hands the kernel a pointer; the kernel copies in what it needs and copies
results back, and a copy outside the caller's buffer fails with EFAULT. Here the
caller's buffer travels inside the control request, so "user memory" is exactly those
bytes: reading or writing past them is EFAULT, a NULL argument has no bytes at all.
"""

from __future__ import annotations

import ctypes
import errno
from typing import TypeVar

from vfiofs.errors import VfioError

S = TypeVar("S", bound=ctypes.Structure)


class UserBuffer:
    """The bytes an ioctl argument points at; updated in place as copy_to_user would."""

    def __init__(self, data: bytes | bytearray | None) -> None:
        self.data = None if data is None else bytearray(data)
        self.written = False  # copy_to_user happened (some commands write back and then fail)

    def __len__(self) -> int:
        return 0 if self.data is None else len(self.data)

    def _check(self, offset: int, size: int) -> bytearray:
        if self.data is None or offset < 0 or size < 0 or offset + size > len(self.data):
            raise VfioError(errno.EFAULT, "argument buffer too short")
        return self.data

    def get_u32(self, offset: int = 0) -> int:
        """get_user() of a u32: how drivers read argsz/size first."""
        return int.from_bytes(self.copy_from(offset, 4), "little")

    def copy_from(self, offset: int, size: int) -> bytes:
        data = self._check(offset, size)
        return bytes(data[offset : offset + size])

    def copy_to(self, offset: int, payload: bytes) -> None:
        data = self._check(offset, len(payload))
        data[offset : offset + len(payload)] = payload
        self.written = True

    def read_struct(self, struct_type: type[S], size: int | None = None) -> S:
        """copy_from_user of the first ``size`` bytes (default: the whole struct), zero-filled."""
        full = ctypes.sizeof(struct_type)
        size = full if size is None else min(size, full)
        raw = self.copy_from(0, size) + bytes(full - size)
        return struct_type.from_buffer_copy(raw)

    def copy_struct_from_user(self, struct_type: type[S], usize: int) -> S:
        """copy_struct_from_user(): extensible-struct rules.

        A caller size larger than the kernel's struct is accepted only if every extra
        byte is zero (else E2BIG); a smaller one is zero-extended.
        """
        ksize = ctypes.sizeof(struct_type)
        if usize > ksize:
            tail = self.copy_from(ksize, usize - ksize)
            if any(tail):
                raise VfioError(errno.E2BIG, "non-zero bytes past the known structure")
        return self.read_struct(struct_type, usize)

    def write_struct(self, struct: ctypes.Structure, size: int | None = None, offset: int = 0) -> None:
        """copy_to_user of the first ``size`` bytes of ``struct``."""
        raw = bytes(struct)
        self.copy_to(offset, raw if size is None else raw[:size])
