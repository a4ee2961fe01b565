"""The ioctl table: one mechanism for every request number vfiofs implements.

The kernel's drivers each open their ioctls with the same prologue: ``minsz =
offsetofend(struct, last_field)``, copy the header from user memory, ``argsz < minsz →
EINVAL`` (vfio), or read ``size`` first and use ``copy_struct_from_user`` (iommufd). Here
that prologue is written once: a driver declares a table of :class:`Ioctl` rows — request
number, argument structure, minimum size, handler — and :meth:`IoctlTable.dispatch` runs
the prologue of the row's style before calling the handler. A number without a row is
ENOTTY, as from the kernel's ``default:`` case.

Also here, because every table needs them: :class:`IoctlArg` (all an ioctl can see of
its caller) and the VFIO info-capability chain built from the ABI's ctypes classes.
Sans-I/O: nothing in this module touches a descriptor or a process.
"""

from __future__ import annotations

import ctypes
import enum
import errno
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from vfiofs.core.usermem import UserBuffer
from vfiofs.errors import VfioError

#: Value of :attr:`IoctlArg.files` for an fd that is open but is not a handle of this mount.
FOREIGN_FD = object()


@dataclass
class IoctlArg:
    """Everything an ioctl can see of its caller.

    ``buf`` is the memory the argument points at, ``value`` the argument as an integer
    (for ioctls that take a value), and ``files`` what the fd numbers of the caller's
    process refer to: a handle of this mount, a passed descriptor, :data:`FOREIGN_FD`, or
    absent (not open). ``process`` opens the calling process's memory when the transport
    could identify the caller (the daemon injects it; the core never opens anything).
    """

    buf: UserBuffer
    value: int = 0
    files: Mapping[int, object] = field(default_factory=dict)
    process: Callable[[], Any] | None = None


def offsetofend(struct_type: type[ctypes.Structure], field_name: str) -> int:
    """The kernel's offsetofend(): where ``field_name`` of ``struct_type`` ends."""
    descriptor = getattr(struct_type, field_name)
    return descriptor.offset + descriptor.size


class RespondThenFail(VfioError):
    """Raised by an iommufd handler that must write its structure back and still fail
    (IOMMU_IOAS_IOVA_RANGES reports the count it needs, then returns EMSGSIZE)."""


class Style(enum.Enum):
    """How a request's argument is taken from the caller (the prologue before the handler)."""

    #: vfio: copy_from_user(minsz) then ``argsz < minsz → EINVAL``; the handler writes back.
    VFIO = "vfio"
    #: vfio with get_user(argsz) first (``argsz < minsz → EINVAL`` before any copy), then
    #: copy_struct_from_user(argsz): VFIO_DEVICE_BIND_IOMMUFD.
    VFIO_EXTENSIBLE = "vfio-extensible"
    #: iommufd: get_user(size), ``size < minsz → EINVAL``, copy_struct_from_user(size); after
    #: the handler the whole structure goes back, up to the caller's size
    #: (iommufd_ucmd_respond()).
    IOMMUFD = "iommufd"
    #: no structure: the handler reads ``arg.value`` or ``arg.buf`` itself.
    RAW = "raw"


Handler = Callable[..., int | None]


@dataclass(frozen=True)
class Ioctl:
    """One row of a driver's table.

    ``handler(owner, arg, cmd)`` gets the driver object, the :class:`IoctlArg` and the
    structure the prologue copied in (None for :attr:`Style.RAW`); it returns the
    ioctl's result (None means 0) or raises :class:`VfioError`.
    """

    request: int
    handler: Handler
    struct: type[ctypes.Structure] | None = None
    #: the caller's argsz/size below this is EINVAL (offsetofend of the last mandatory field)
    minsz: int = 0
    style: Style = Style.VFIO

    def copy_in(self, arg: IoctlArg) -> ctypes.Structure | None:
        """The prologue alone: the structure as the handler would get it (None for RAW).

        For callers whose own checks interleave with the kernel's copy-in (the handle
        state machine runs BIND's prologue as the first of its checks)."""
        if self.style is Style.RAW:
            return None
        assert self.struct is not None
        if self.style is Style.VFIO:
            cmd = arg.buf.read_struct(self.struct, self.minsz)
            if cmd.argsz < self.minsz:
                raise VfioError(errno.EINVAL, f"argsz smaller than {self.struct.__name__}")
            return cmd
        size = arg.buf.get_u32(0)  # VFIO_EXTENSIBLE and IOMMUFD: get_user(argsz/size) first
        if size < self.minsz:
            what = "argsz" if self.style is Style.VFIO_EXTENSIBLE else "size"
            raise VfioError(errno.EINVAL, f"{what} smaller than {self.struct.__name__}")
        return arg.buf.copy_struct_from_user(self.struct, size)

    def call(self, owner: object, arg: IoctlArg) -> int:
        cmd = self.copy_in(arg)
        if self.style is Style.IOMMUFD:
            assert cmd is not None
            size = arg.buf.get_u32(0)
            try:
                result = self.handler(owner, arg, cmd)
            except RespondThenFail as failure:
                arg.buf.write_struct(cmd, min(size, ctypes.sizeof(cmd)))
                raise VfioError(failure.errno, failure.detail) from None
            arg.buf.write_struct(cmd, min(size, ctypes.sizeof(cmd)))
            return result or 0
        return self.handler(owner, arg, cmd) or 0


class IoctlTable:
    """Request number → :class:`Ioctl`; unknown numbers are ENOTTY."""

    def __init__(self, what: str, rows: Iterable[Ioctl]) -> None:
        self.what = what
        self.rows: dict[int, Ioctl] = {}
        for row in rows:
            if row.request in self.rows:
                raise ValueError(f"{what}: request {row.request:#x} listed twice")
            self.rows[row.request] = row

    def __contains__(self, request: int) -> bool:
        return request in self.rows

    def dispatch(self, owner: object, request: int, arg: IoctlArg) -> int:
        row = self.rows.get(request)
        if row is None:
            raise VfioError(errno.ENOTTY, f"ioctl {request:#x} not supported by {self.what}")
        return row.call(owner, arg)


# -- info capability chains (vfio_info_add_capability / vfio_info_cap_shift) -------------------

Capability = tuple[ctypes.Structure, Sequence[ctypes.Structure]]
"""One capability: a structure whose first field is ``header`` (``vfio_info_cap_header``),
or the bare header, followed by the elements of its flexible array (often none)."""


def capability_chain(caps: Sequence[Capability], base: int) -> bytes:
    """The chain as the kernel lays it out at offset ``base`` of the caller's buffer: each
    capability 8-byte aligned, ``next`` the absolute offset of the following one, 0 last."""
    pieces = []
    for head, items in caps:
        body = bytes(head) + b"".join(bytes(item) for item in items)
        pieces.append(bytearray(body + bytes(-len(body) % 8)))
    out = bytearray()
    for i, piece in enumerate(pieces):
        start = base + len(out)
        nxt = start + len(piece) if i + 1 < len(pieces) else 0
        piece[4:8] = nxt.to_bytes(4, "little")  # vfio_info_cap_header.next
        out += piece
    return bytes(out)


def place_capabilities(arg: UserBuffer, info: ctypes.Structure, caps: Sequence[Capability], base: int) -> None:
    """The kernel's rule for info capabilities: the chain goes after the structure (at
    ``base``) when ``argsz`` leaves room for it; otherwise ``argsz`` is raised to what is
    needed and ``cap_offset`` stays 0, and the call still succeeds."""
    chain = capability_chain(caps, base)
    if info.argsz < base + len(chain):
        info.argsz = base + len(chain)
        info.cap_offset = 0
    else:
        arg.copy_to(base, chain)
        info.cap_offset = base
