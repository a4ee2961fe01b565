"""Mount-wide bookkeeping of open handles, and the control mailbox in front of them.

The FUSE adapter turns each request into one call here — open, read, write, release
with a file handle number — and gets bytes or a :class:`VfioError` back. This module
owns the fh table, each handle's unforgeable token (what fd arguments are resolved
against), each handle's reply slots, resolving fd arguments, and encoding results into
replies. What a handle may *do* is decided by :mod:`vfiofs.core.handles`, who may claim
a VFIO_GROUP_GET_DEVICE_FD grant by :mod:`vfiofs.core.grants`. No FUSE, no event loop,
no driver or host import (the daemon injects them): unit tests drive it directly.
"""

from __future__ import annotations

import errno
import itertools
import secrets
from collections import OrderedDict
from typing import Callable, Sequence, Union

from vfiofs import abi
from vfiofs.abi import protocol
from vfiofs.abi.protocol import FD_FOREIGN, FD_HANDLE, OP_GET_TOKEN, OP_MAP_REGION, Request
from vfiofs.core.grants import Tickets
from vfiofs.core.handles import ContainerFile, Device, DeviceFile, Group, GroupFile, HandleState, IommuFile
from vfiofs.core.ioctl import FOREIGN_FD, IoctlArg
from vfiofs.core.ops import CallerMemory, DescriptorChannel, IommuContainer, IommuContext, OpenMemory, SendFd
from vfiofs.core.trace import TraceBus
from vfiofs.core.usermem import UserBuffer
from vfiofs.errors import VfioError

Handle = Union[DeviceFile, IommuFile, ContainerFile, GroupFile]

#: Replies a handle keeps for slots that were never read back (oldest dropped first).
MAX_PENDING_REPLIES = 1024


REGION_NAMES = {0: "BAR0", 1: "BAR1", 2: "BAR2", 3: "BAR3", 4: "BAR4", 5: "BAR5", 6: "ROM", 7: "CONFIG", 8: "VGA"}
OP_NAMES = {protocol.OP_GET_TOKEN: "GET_TOKEN", protocol.OP_MAP_REGION: "MAP_REGION",
            protocol.OP_FD_CHANNEL: "FD_CHANNEL", protocol.OP_CLAIM: "CLAIM"}
IOCTL_NAMES: dict[int, str] = {}
for _name in dir(abi):
    if _name.startswith(("VFIO_", "IOMMU_")) and _name.isupper() and isinstance(getattr(abi, _name), int):
        _value = getattr(abi, _name)
        if 0x3B00 <= _value <= 0x3BFF:  # ioctl numbers (some are shared: both names are shown)
            IOCTL_NAMES[_value] = f"{IOCTL_NAMES[_value]}/{_name}" if _value in IOCTL_NAMES else _name


class _FailedWithWriteback(Exception):
    def __init__(self, error: VfioError, payload: bytes) -> None:
        self.error, self.payload = error, payload


class OpenFile:
    """A handle plus what the transport keeps for it."""

    __slots__ = ("handle", "token", "replies", "uid", "pid")

    def __init__(self, handle: Handle, uid: int, pid: int = 0) -> None:
        self.handle = handle
        self.uid = uid  # who opened it: only that uid's listener may receive region memory
        self.pid = pid  # the process that opened it (for `vfiofs ls`)
        self.token = secrets.token_bytes(protocol.TOKEN_SIZE)
        self.replies: OrderedDict[int, bytes] = OrderedDict()


class Mailbox:
    """The mount's handles behind the control mailbox.

    The daemon passes in what the core may not build itself: ``iommufd`` and
    ``container`` make a fresh iommufd context / legacy container for each open of those
    nodes, ``channel`` is where clients deposit descriptors (None: none can be passed),
    ``send_fd(listener, fd, uid)`` hands region memory to a client (None: MAP_REGION is
    EPROTO), ``open_memory(pidfd)`` opens a calling process's memory for DMA mappings, and
    ``clock()`` stamps trace events (seconds since the epoch).
    """

    def __init__(self, devices: Sequence[Device], *, iommufd: Callable[[], IommuContext],
                 container: Callable[[], IommuContainer], channel: DescriptorChannel | None = None,
                 send_fd: SendFd | None = None, open_memory: OpenMemory | None = None,
                 clock: Callable[[], float] = lambda: 0.0) -> None:
        self.devices = list(devices)
        self._new_iommufd = iommufd
        self._new_container = container
        self._send_fd = send_fd
        self._open_memory = open_memory
        self.channel = channel
        self._files: dict[int, OpenFile] = {}
        self._by_token: dict[bytes, OpenFile] = {}
        self.tickets = Tickets()  # VFIO_GROUP_GET_DEVICE_FD grants waiting for their CLAIM
        self.trace = TraceBus(clock)
        for device in self.devices:
            device.driver.trace = self.trace
        self._next_fh = itertools.count(1)

    # -- lifecycle --------------------------------------------------------------------------
    def _register(self, handle: Handle, uid: int, pid: int = 0) -> int:
        entry = OpenFile(handle, uid, pid)
        fh = next(self._next_fh)
        self._files[fh] = entry
        self._by_token[entry.token] = entry
        return fh

    def open_device(self, index: int, uid: int = 0, pid: int = 0) -> int:
        return self._register(DeviceFile(self.devices[index]), uid, pid)

    def open_iommu(self, uid: int = 0, pid: int = 0) -> int:
        return self._register(IommuFile(self._new_iommufd()), uid, pid)

    def open_container(self, uid: int = 0, pid: int = 0) -> int:
        return self._register(ContainerFile(self._new_container()), uid, pid)

    def open_group(self, number: int, uid: int = 0, pid: int = 0) -> int:
        return self._register(GroupFile(self.groups[number], self.tickets, uid), uid, pid)

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

    def token(self, fh: int) -> bytes:
        """The handle's token (what OP_GET_TOKEN answers): how other requests name it as an fd."""
        return self._entry(fh).token

    def pending_replies(self, fh: int) -> int:
        return len(self._entry(fh).replies)

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
        if not self.trace.subscribers:
            return entry.handle.read(offset, size)
        try:
            data = entry.handle.read(offset, size)
        except VfioError as exc:
            self._trace_access(entry, fh, "read", offset, size, b"", exc)
            raise
        self._trace_access(entry, fh, "read", offset, len(data), data, None)
        return data

    def write(self, fh: int, offset: int, data: bytes) -> int:
        entry = self._entry(fh)
        if protocol.is_control_offset(offset):
            return self._control(entry, offset, data, fh)
        if not self.trace.subscribers:
            return entry.handle.write(offset, data)
        try:
            written = entry.handle.write(offset, data)
        except VfioError as exc:
            self._trace_access(entry, fh, "write", offset, len(data), data, exc)
            raise
        self._trace_access(entry, fh, "write", offset, written, data[:written], None)
        return written

    # -- what `vfiofs trace` and `vfiofs ls` see ----------------------------------------------------
    @staticmethod
    def _target(entry: OpenFile) -> str:
        handle = entry.handle
        if isinstance(handle, DeviceFile):
            return f"vfio{handle.device.index}"
        if isinstance(handle, GroupFile):
            return f"group{handle.group.number}"
        return "container" if isinstance(handle, ContainerFile) else "iommu"

    def _trace_access(self, entry: OpenFile, fh: int, op: str, offset: int, size: int, data: bytes,
                      error: VfioError | None) -> None:
        index = offset >> abi.VFIO_PCI_OFFSET_SHIFT
        event: dict = {"device": self._target(entry), "handle": fh, "op": op,
                       "region": REGION_NAMES.get(index, str(index)), "offset": offset & abi.VFIO_PCI_OFFSET_MASK,
                       "size": size}
        if data and len(data) <= 8 and error is None:
            event["value"] = hex(int.from_bytes(data, "little"))
        if error is not None:
            event["errno"] = errno.errorcode.get(error.errno, str(error.errno))
        self.trace.emit(**event)

    def status(self) -> dict:
        """A snapshot of every device: who has it, how, and where its DMA goes."""
        devices = []
        for device in self.devices:
            holders = [(fh, e) for fh, e in self._files.items()
                       if isinstance(e.handle, DeviceFile) and e.handle.device is device and e.handle.has_device]
            bound = device.bound_file
            ioas = bound.devobj.ioas_id if bound is not None and bound.devobj is not None else None
            ident = device.driver.spec.identity
            devices.append({
                "index": device.index, "name": device.name, "node": f"vfio/devices/vfio{device.index}",
                "bdf": device.bdf, "vendor": f"{ident.vendor:04x}", "device": f"{ident.device:04x}",
                "group": device.group.number,
                "bound_by": [{"pid": e.pid, "handle": fh,
                              "via": "group" if e.handle.state is HandleState.GRANTED else "cdev"}
                             for fh, e in holders],
                "ioas": ioas if bound is not None else ("container" if holders else None),
                "interrupts": device.driver.irqs.irq_type,
            })
        return {"devices": devices, "open_handles": len(self._files)}

    def fsync(self, fh: int) -> None:
        self._entry(fh).handle.fsync()

    # -- control mailbox -------------------------------------------------------------------------
    def _control(self, entry: OpenFile, offset: int, message: bytes, fh: int = 0) -> int:
        tag = protocol.slot_tag(offset)
        entry.replies.pop(tag, None)  # a new request always discards the slot's old reply
        request = protocol.decode_request(message)
        if self.trace.subscribers:
            try:
                written = self._control_request(entry, tag, request, message)
            except VfioError as exc:
                self._trace_command(entry, fh, request, exc)
                raise
            self._trace_command(entry, fh, request, None)
            return written
        return self._control_request(entry, tag, request, message)

    def _trace_command(self, entry: OpenFile, fh: int, request: Request, error: VfioError | None) -> None:
        name = IOCTL_NAMES.get(request.request, hex(request.request)) if request.op == protocol.OP_IOCTL \
            else OP_NAMES.get(request.op, str(request.op))
        self.trace.emit(device=self._target(entry), handle=fh, op="ioctl", command=name,
                        errno=errno.errorcode.get(error.errno, str(error.errno)) if error else 0)

    def _control_request(self, entry: OpenFile, tag: int, request: Request, message: bytes) -> int:
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
            self.tickets.claim(request.arg_value, entry.uid, entry.handle)
            return 0, b""
        if request.op == protocol.OP_FD_CHANNEL:
            if self.channel is None:
                raise VfioError(errno.EPROTO, "this daemon takes no passed descriptors")
            return 0, self.channel.name
        if request.op == OP_MAP_REGION:
            index, offset, length, name = protocol.decode_map_request(request.payload)
            memfd = entry.handle.map_region(index, offset, length)
            if self._send_fd is None:
                raise VfioError(errno.EPROTO, "this mailbox cannot pass descriptors")
            self._send_fd(name, memfd, entry.uid)
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

    def _caller(self, entry: OpenFile, request: Request) -> Callable[[], CallerMemory] | None:
        """How to reach the calling process's memory, if it proved who it is (a PROCESS entry)."""
        parcel = next((ref.token for ref in request.fds.values() if ref.kind == protocol.FD_PROCESS), None)
        if parcel is None or self.channel is None or self._open_memory is None:
            return None
        channel, open_pidfd = self.channel, self._open_memory

        def open_memory() -> CallerMemory:
            pidfd = channel.sender(parcel, entry.uid)
            if pidfd is None:
                raise VfioError(errno.EPERM, "no proof of the calling process from the handle's user")
            return open_pidfd(pidfd)

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
