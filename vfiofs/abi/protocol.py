"""Wire format of the control mailbox that carries ioctls through FUSE (sans-I/O codec).

FUSE cannot carry VFIO's ``_IO()`` ioctls, so each open handle has a control window
far above any region offset. A client pwrite()s a request into a slot of that window
and pread()s the reply from the same slot; the errno of the pwrite is the errno of the
command. Slots are chosen by the client (the library uses its thread id) so threads
sharing one open file never read each other's replies. docs/protocol.md is the
byte-level specification; this module is its only implementation, shared by the
daemon and the client library.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass, field

from vfiofs.errors import VfioError

# --- where the mailbox lives -------------------------------------------------------
# Region offsets are index << 40 and the kernel rejects offset + count >= 2**63, so
# the top quarter of the usable range [2**62, 2**63) can never be a region: region
# indices would have to reach 2**22.
CONTROL_BASE = 1 << 62
SLOT_SHIFT = 20  # one 1 MiB slot per tag
SLOT_SIZE = 1 << SLOT_SHIFT
MAX_TAG = (1 << 32) - 1
MAX_MESSAGE = 64 * 1024  # request or reply, header included

MAGIC = int.from_bytes(b"VFFS", "little")
VERSION = 1

# --- operations ----------------------------------------------------------------------
OP_IOCTL = 1  # run a kernel ioctl number with its struct
OP_GET_TOKEN = 2  # return this handle's unforgeable reference (for fd arguments)
OP_MAP_REGION = 3  # pass a mappable region's memory to the caller over a UNIX socket
OP_FD_CHANNEL = 4  # the name of the socket where clients deposit descriptors (eventfds)
OP_CLAIM = 5  # make this fresh device handle the one VFIO_GROUP_GET_DEVICE_FD returned (arg_value)

# --- how the ioctl argument is passed --------------------------------------------------
ARG_NULL = 0  # a NULL pointer: any copy from or to it faults (EFAULT)
ARG_BUFFER = 1  # a pointer to the payload bytes (the struct)
ARG_VALUE = 2  # an integer argument (ioctls that take a value, not a pointer)

# --- what an fd number in the caller's process refers to ---------------------------------
FD_NOT_OPEN = 1  # no such fd in the caller's table
FD_FOREIGN = 2  # open, but not a handle of this mount
FD_HANDLE = 3  # a handle of this mount, named by its token
FD_PASSED = 4  # the descriptor itself was deposited on the fd channel; token = parcel id
FD_PROCESS = 5  # not a descriptor: the calling process, proven by a parcel it deposited (fd = 0)

TOKEN_SIZE = 16
MAX_FDS = 2048  # SET_IRQS may carry one eventfd per MSI-X vector

_REQUEST = struct.Struct("<IHHIIIIQIIQ")  # 48 bytes
_FDREF = struct.Struct("<iI16s")  # 24 bytes
_REPLY = struct.Struct("<IHHIIqII")  # 32 bytes
REQUEST_HEADER_SIZE = _REQUEST.size
FDREF_SIZE = _FDREF.size
REPLY_HEADER_SIZE = _REPLY.size


def control_offset(tag: int) -> int:
    """File offset of the mailbox slot for ``tag``."""
    if not 0 <= tag <= MAX_TAG:
        raise ValueError(f"tag {tag} outside 0..{MAX_TAG}")
    return CONTROL_BASE + (tag << SLOT_SHIFT)


def is_control_offset(offset: int) -> bool:
    return offset >= CONTROL_BASE


def slot_tag(offset: int) -> int:
    """The tag of a control offset; EINVAL unless it is the start of a slot."""
    relative = offset - CONTROL_BASE
    if relative < 0 or relative & (SLOT_SIZE - 1) or (relative >> SLOT_SHIFT) > MAX_TAG:
        raise VfioError(errno.EINVAL, "control access must start at a slot boundary")
    return relative >> SLOT_SHIFT


@dataclass(frozen=True)
class FdRef:
    """What one fd number in the caller's process is, as the client resolved it."""

    kind: int
    token: bytes = bytes(TOKEN_SIZE)


@dataclass
class Request:
    op: int
    request: int = 0
    arg_kind: int = ARG_NULL
    arg_value: int = 0
    payload: bytes = b""
    fds: dict[int, FdRef] = field(default_factory=dict)


@dataclass
class Reply:
    op: int
    request: int
    result: int
    payload: bytes


def encode_request(req: Request) -> bytes:
    header = _REQUEST.pack(
        MAGIC,
        VERSION,
        REQUEST_HEADER_SIZE,
        req.op,
        req.request,
        req.arg_kind,
        len(req.fds),
        req.arg_value & 0xFFFF_FFFF_FFFF_FFFF,
        len(req.payload),
        0,
        0,
    )
    refs = b"".join(_FDREF.pack(fd, ref.kind, ref.token) for fd, ref in req.fds.items())
    message = header + refs + bytes(req.payload)
    if len(message) > MAX_MESSAGE:
        raise ValueError(f"request of {len(message)} bytes exceeds {MAX_MESSAGE}")
    return message


def _bad(detail: str) -> VfioError:
    return VfioError(errno.EBADMSG, detail)


def decode_request(message: bytes) -> Request:
    """Parse and validate a request; every malformation is a clean errno."""
    if len(message) > MAX_MESSAGE:
        raise VfioError(errno.EMSGSIZE, f"request larger than {MAX_MESSAGE} bytes")
    if len(message) < REQUEST_HEADER_SIZE:
        raise _bad("request shorter than its header")
    (magic, version, hsize, op, request, arg_kind, nfds, arg_value, plen, res0, res1) = _REQUEST.unpack_from(
        message
    )
    if magic != MAGIC:
        raise _bad("bad magic")
    if version != VERSION:
        raise VfioError(errno.EPROTO, f"protocol version {version} not supported (want {VERSION})")
    if hsize != REQUEST_HEADER_SIZE or res0 or res1:
        raise _bad("bad header size or non-zero reserved fields")
    if op not in (OP_IOCTL, OP_GET_TOKEN, OP_MAP_REGION, OP_FD_CHANNEL, OP_CLAIM):
        raise VfioError(errno.EPROTO, f"unknown operation {op}")
    if arg_kind not in (ARG_NULL, ARG_BUFFER, ARG_VALUE):
        raise _bad(f"unknown argument kind {arg_kind}")
    if nfds > MAX_FDS:
        raise _bad("too many fd references")
    if REQUEST_HEADER_SIZE + nfds * FDREF_SIZE + plen != len(message):
        raise _bad("lengths in the header do not add up to the request size")
    if arg_kind != ARG_BUFFER and plen:
        raise _bad("payload given for an argument that is not a buffer")
    fds: dict[int, FdRef] = {}
    pos = REQUEST_HEADER_SIZE
    for _ in range(nfds):
        fd, kind, token = _FDREF.unpack_from(message, pos)
        pos += FDREF_SIZE
        if kind not in (FD_NOT_OPEN, FD_FOREIGN, FD_HANDLE, FD_PASSED, FD_PROCESS) or fd < 0 or fd in fds:
            raise _bad("bad fd reference")
        fds[fd] = FdRef(kind, token)
    return Request(op, request, arg_kind, arg_value, bytes(message[pos:]), fds)


_MAP = struct.Struct("<IIQQ")  # region index, reserved, offset, length; then the socket name
MAX_SOCKET_NAME = 107  # sun_path minus the leading NUL of an abstract name


def encode_map_request(index: int, offset: int, length: int, socket_name: bytes) -> Request:
    return Request(OP_MAP_REGION, arg_kind=ARG_BUFFER, payload=_MAP.pack(index, 0, offset, length) + socket_name)


def decode_map_request(payload: bytes) -> tuple[int, int, int, bytes]:
    """(index, offset, length, abstract socket name) of an OP_MAP_REGION payload."""
    if len(payload) <= _MAP.size or len(payload) > _MAP.size + MAX_SOCKET_NAME:
        raise _bad("map request needs a region and a socket name of 1-107 bytes")
    index, reserved, offset, length = _MAP.unpack_from(payload)
    if reserved:
        raise _bad("non-zero reserved field in map request")
    return index, offset, length, bytes(payload[_MAP.size :])


def encode_reply(reply: Reply) -> bytes:
    header = _REPLY.pack(
        MAGIC, VERSION, REPLY_HEADER_SIZE, reply.op, reply.request, reply.result, len(reply.payload), 0
    )
    return header + bytes(reply.payload)


def decode_reply(message: bytes) -> Reply:
    if len(message) < REPLY_HEADER_SIZE:
        raise _bad("reply shorter than its header")
    magic, version, hsize, op, request, result, plen, _ = _REPLY.unpack_from(message)
    if magic != MAGIC or version != VERSION or hsize != REPLY_HEADER_SIZE:
        raise _bad("bad reply header")
    if REPLY_HEADER_SIZE + plen != len(message):
        raise _bad("reply length does not match its header")
    return Reply(op, request, result, bytes(message[REPLY_HEADER_SIZE:]))
