"""Mount-wide bookkeeping of open handles, and the control mailbox in front of them.

The FUSE adapter turns each request into one call here — open, read, write, release
with a file handle number — and gets bytes or a :class:`VfioError` back. This module
owns the fh table, each handle's unforgeable token (what fd arguments are resolved
against) and each handle's reply slots; what a handle may *do* is decided by
:mod:`vfiofs.state`. No FUSE, no event loop: unit tests drive it directly.
"""

from __future__ import annotations

import errno
import itertools
import secrets
from collections import OrderedDict
from typing import Callable, Sequence, Union

from . import abi, fdpass, protocol
from .errors import VfioError
from .procmem import ProcessMemory
from .protocol import FD_FOREIGN, FD_HANDLE, OP_GET_TOKEN, OP_MAP_REGION, Request
from .state import FOREIGN_FD, ContainerFile, Device, DeviceFile, Grant, Group, GroupFile, IoctlArg, IommuFile
from .usermem import UserBuffer

Handle = Union[DeviceFile, IommuFile, ContainerFile, GroupFile]

#: Replies a handle keeps for slots that were never read back (oldest dropped first).
MAX_PENDING_REPLIES = 1024


class _FailedWithWriteback(Exception):
    def __init__(self, error: VfioError, payload: bytes) -> None:
        self.error, self.payload = error, payload


class OpenFile:
    """A handle plus what the transport keeps for it."""

    __slots__ = ("handle", "token", "replies", "uid")

    def __init__(self, handle: Handle, uid: int) -> None:
        self.handle = handle
        self.uid = uid  # who opened it: only that uid's listener may receive region memory
        self.token = secrets.token_bytes(protocol.TOKEN_SIZE)
        self.replies: OrderedDict[int, bytes] = OrderedDict()


class Server:
    def __init__(self, devices: Sequence[Device], send_fd: Callable[[bytes, int, int], None] = fdpass.send_fd,
                 channel: fdpass.FdChannel | None = None) -> None:
        self.devices = list(devices)
        self._send_fd = send_fd
        self.channel = channel  # where clients deposit eventfds; None: descriptors cannot be passed
        self._files: dict[int, OpenFile] = {}
        self._by_token: dict[bytes, OpenFile] = {}
        self._grants: OrderedDict[int, tuple[Grant, int]] = OrderedDict()  # ticket → (grant, uid)
        self._next_fh = itertools.count(1)

    # -- lifecycle --------------------------------------------------------------------------
    def _register(self, handle: Handle, uid: int) -> int:
        entry = OpenFile(handle, uid)
        fh = next(self._next_fh)
        self._files[fh] = entry
        self._by_token[entry.token] = entry
        return fh

    def open_device(self, index: int, uid: int = 0) -> int:
        return self._register(DeviceFile(self.devices[index]), uid)

    def open_iommu(self, uid: int = 0) -> int:
        return self._register(IommuFile(), uid)

    def open_container(self, uid: int = 0) -> int:
        return self._register(ContainerFile(), uid)

    def open_group(self, number: int, uid: int = 0) -> int:
        return self._register(GroupFile(self.groups[number]), uid)

    @property
    def groups(self) -> dict[int, Group]:
        return {device.group.number: device.group for device in self.devices}

    def release(self, fh: int) -> None:
        entry = self._files.pop(fh, None)
        if entry is None:
            return
        del self._by_token[entry.token]
        entry.handle.release()

    def handle(self, fh: int) -> Handle:
        return self._entry(fh).handle

    def _entry(self, fh: int) -> OpenFile:
        entry = self._files.get(fh)
        if entry is None:
            raise VfioError(errno.EBADF, f"no open handle {fh}")
        return entry

    # -- data path -----------------------------------------------------------------------------
    def read(self, fh: int, offset: int, size: int) -> bytes:
        entry = self._entry(fh)
        if protocol.is_control_offset(offset):
            return self._take_reply(entry, offset, size)
        return entry.handle.read(offset, size)

    def write(self, fh: int, offset: int, data: bytes) -> int:
        entry = self._entry(fh)
        if protocol.is_control_offset(offset):
            return self._control(entry, offset, data)
        return entry.handle.write(offset, data)

    def fsync(self, fh: int) -> None:
        self._entry(fh).handle.fsync()

    # -- control mailbox -------------------------------------------------------------------------
    def _control(self, entry: OpenFile, offset: int, message: bytes) -> int:
        tag = protocol.slot_tag(offset)
        entry.replies.pop(tag, None)  # a new request always discards the slot's old reply
        request = protocol.decode_request(message)
        try:
            result, payload = self._execute(entry, request)
        except _FailedWithWriteback as failed:
            # The command wrote to the caller's buffer and then failed (IOVA_RANGES' EMSGSIZE):
            # keep the buffer for the client to read, and fail the write as the ioctl fails.
            self._store(entry, tag, request, -failed.error.errno, failed.payload)
            raise failed.error from None
        self._store(entry, tag, request, result, payload)
        return len(message)

    def _store(self, entry: OpenFile, tag: int, request: Request, result: int, payload: bytes) -> None:
        if len(entry.replies) >= MAX_PENDING_REPLIES:
            entry.replies.popitem(last=False)
        entry.replies[tag] = protocol.encode_reply(protocol.Reply(request.op, request.request, result, payload))

    def _execute(self, entry: OpenFile, request: Request) -> tuple[int, bytes]:
        if request.op == OP_GET_TOKEN:
            return 0, entry.token
        if request.op == protocol.OP_CLAIM:
            return self._claim(entry, request.arg_value), b""
        if request.op == protocol.OP_FD_CHANNEL:
            if self.channel is None:
                raise VfioError(errno.EPROTO, "this daemon takes no passed descriptors")
            return 0, self.channel.name
        if request.op == OP_MAP_REGION:
            index, offset, length, name = protocol.decode_map_request(request.payload)
            self._send_fd(name, entry.handle.map_region(index, offset, length), entry.uid)
            return 0, b""
        if request.arg_kind == protocol.ARG_BUFFER:
            buf = UserBuffer(request.payload)
        else:
            buf = UserBuffer(None)
        parcels = {ref.token for ref in request.fds.values() if ref.kind in (protocol.FD_PASSED, protocol.FD_PROCESS)}
        try:
            arg = IoctlArg(buf=buf, value=request.arg_value, files=self._resolve_fds(entry, request),
                           process=self._caller(entry, request))
            try:
                if request.request == abi.VFIO_GROUP_GET_DEVICE_FD and isinstance(entry.handle, GroupFile):
                    result = self._grant(entry, entry.handle.get_device(buf))
                else:
                    result = entry.handle.ioctl(request.request, arg)
            except VfioError as error:
                if buf.written:
                    raise _FailedWithWriteback(error, bytes(buf.data or b"")) from None
                raise
        finally:
            if self.channel is not None:
                for parcel in parcels:  # descriptors the command did not keep are closed
                    self.channel.discard(parcel)
        return result, bytes(buf.data or b"")

    def _grant(self, entry: OpenFile, grant: Grant) -> int:
        """The ioctl's result for GET_DEVICE_FD: an unguessable ticket and the device's node.
        The client library opens that node and claims the ticket (OP_CLAIM) on the new
        handle, so the caller gets a new fd, as from the kernel."""
        ticket = secrets.randbits(46) | 1
        self._grants[ticket] = (grant, entry.uid)
        while len(self._grants) > MAX_PENDING_REPLIES:
            stale, _ = self._grants.pop(next(iter(self._grants)))
            stale.group_file.forget_grant(stale)
        return ticket << 16 | grant.device.index

    def _claim(self, entry: OpenFile, ticket: int) -> int:
        found = self._grants.pop(ticket, None)
        if found is None or found[1] != entry.uid or not isinstance(entry.handle, DeviceFile):
            raise VfioError(errno.EINVAL, "no such grant for this handle")
        entry.handle.adopt_grant(found[0])
        return 0

    def _caller(self, entry: OpenFile, request: Request) -> Callable[[], ProcessMemory] | None:
        """How to reach the calling process's memory, if it proved who it is (a PROCESS entry)."""
        parcel = next((ref.token for ref in request.fds.values() if ref.kind == protocol.FD_PROCESS), None)
        if parcel is None or self.channel is None:
            return None
        channel = self.channel

        def open_memory() -> ProcessMemory:
            pidfd = channel.sender(parcel, entry.uid)
            if pidfd is None:
                raise VfioError(errno.EPERM, "no proof of the calling process from the handle's user")
            return ProcessMemory.open(pidfd)

        return open_memory

    def _resolve_fds(self, entry: OpenFile, request: Request) -> dict[int, object]:
        """fd number → handle, passed descriptor, or FOREIGN_FD. Unknown tokens are foreign."""
        files: dict[int, object] = {}
        for fd, ref in request.fds.items():
            if ref.kind == FD_HANDLE:
                other = self._by_token.get(ref.token)
                files[fd] = other.handle if other is not None else FOREIGN_FD
            elif ref.kind == FD_FOREIGN:
                files[fd] = FOREIGN_FD
            elif ref.kind == protocol.FD_PASSED and self.channel is not None:
                passed = self.channel.take(ref.token, fd, entry.uid)
                if passed is not None:  # a parcel that never arrived: the fd is as good as closed
                    files[fd] = passed
        return files

    def _take_reply(self, entry: OpenFile, offset: int, size: int) -> bytes:
        tag = protocol.slot_tag(offset)
        reply = entry.replies.get(tag)
        if reply is None:
            raise VfioError(errno.ENOMSG, "no reply waiting in this slot")
        if size < len(reply):
            raise VfioError(errno.EMSGSIZE, f"reply is {len(reply)} bytes, read asked for {size}")
        del entry.replies[tag]
        return reply
