"""Client library: drive vfiofs nodes the way a driver drives /dev/vfio and /dev/iommu.

``ioctl(fd, request, arg)`` is the generic primitive, like ``fcntl.ioctl``: it takes the
kernel's request number and the kernel's structure, carries them through the node's
control mailbox (docs/protocol.md) and raises ``OSError`` with the command's errno.
:class:`VfioDevice` and :class:`IommuFd` wrap the common commands. Every name of the
kernel ABI (structures, ioctl numbers, flags) is importable from here too.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import secrets
import socket
import struct
import threading
from typing import Union

from vfiofs.host import fdpass
from vfiofs.abi import protocol
from vfiofs.abi import *  # noqa: F401,F403 - the kernel ABI is part of the client API
from vfiofs.abi import (
    VFIO_DEVICE_ATTACH_IOMMUFD_PT,
    VFIO_DEVICE_BIND_IOMMUFD,
    VFIO_DEVICE_DETACH_IOMMUFD_PT,
    VFIO_DEVICE_GET_INFO,
    VFIO_DEVICE_GET_REGION_INFO,
    VFIO_DEVICE_RESET,
    VFIO_CHECK_EXTENSION,
    VFIO_DMA_MAP_FLAG_READ,
    VFIO_DMA_MAP_FLAG_WRITE,
    VFIO_DMA_UNMAP_FLAG_ALL,
    VFIO_GROUP_GET_DEVICE_FD,
    VFIO_GROUP_GET_STATUS,
    VFIO_GROUP_SET_CONTAINER,
    VFIO_GROUP_UNSET_CONTAINER,
    VFIO_IOMMU_GET_INFO,
    VFIO_IOMMU_MAP_DMA,
    VFIO_IOMMU_UNMAP_DMA,
    VFIO_SET_IOMMU,
    VFIO_TYPE1v2_IOMMU,
    VFIO_DEVICE_GET_IRQ_INFO,
    VFIO_DEVICE_SET_IRQS,
    VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_ACTION_UNMASK,
    VFIO_IRQ_SET_DATA_BOOL,
    VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE,
    VFIO_PCI_INTX_IRQ_INDEX,
    IOMMU_DESTROY,
    IOMMU_IOAS_ALLOC,
    IOMMU_IOAS_IOVA_RANGES,
    IOMMU_IOAS_MAP,
    IOMMU_IOAS_UNMAP,
    VFIO_PCI_INDEX_TO_OFFSET,
    IOMMU_IOAS_MAP_FIXED_IOVA,
    IOMMU_IOAS_MAP_READABLE,
    IOMMU_IOAS_MAP_WRITEABLE,
    iommu_destroy,
    iommu_ioas_alloc,
    iommu_ioas_iova_ranges,
    iommu_ioas_map,
    iommu_ioas_unmap,
    iommu_iova_range,
    vfio_device_attach_iommufd_pt,
    vfio_device_bind_iommufd,
    vfio_device_detach_iommufd_pt,
    vfio_device_info,
    vfio_group_status,
    vfio_iommu_type1_dma_map,
    vfio_iommu_type1_dma_unmap,
    vfio_iommu_type1_info,
    vfio_irq_info,
    vfio_irq_set,
    vfio_region_info,
)
from vfiofs.errors import VfioError
from vfiofs.abi.protocol import FD_FOREIGN, FD_HANDLE, FD_NOT_OPEN, FdRef

Arg = Union[None, int, bytes, bytearray, memoryview, ctypes.Structure, ctypes.Array]

# Byte offsets of fd numbers (s32) inside the structures of commands that take them,
# so they can be resolved in the caller's own process before the request leaves it.
FD_FIELDS: dict[int, tuple[int, ...]] = {
    VFIO_DEVICE_BIND_IOMMUFD: (vfio_device_bind_iommufd.iommufd.offset,),
    VFIO_GROUP_SET_CONTAINER: (0,),  # the argument points to an int holding the container fd
}


def _transact(fd: int, request: protocol.Request, reply_room: int) -> protocol.Reply:
    """One mailbox round trip in this thread's own slot."""
    offset = protocol.control_offset(threading.get_native_id() & protocol.MAX_TAG)
    message = protocol.encode_request(request)
    written = os.pwrite(fd, message, offset)  # the command's errno surfaces here
    if written != len(message):
        raise OSError(errno.EIO, f"short control write ({written} of {len(message)} bytes)")
    data = os.pread(fd, protocol.REPLY_HEADER_SIZE + reply_room, offset)
    try:
        return protocol.decode_reply(data)
    except VfioError as exc:  # not a vfiofs reply: callers only ever see OSError
        raise OSError(exc.errno, f"malformed reply from {fd}: {exc.detail}") from None


def handle_token(fd: int) -> bytes:
    """The unforgeable reference of a vfiofs handle, readable only through that handle."""
    reply = _transact(fd, protocol.Request(op=protocol.OP_GET_TOKEN), protocol.TOKEN_SIZE)
    return reply.payload


def resolve_fd(fd: int, own_fd: int) -> FdRef:
    """What fd number ``fd`` of this process is, for the daemon (kernel: fget + type check)."""
    try:
        st = os.fstat(fd)
    except OSError as exc:
        if exc.errno == errno.EBADF:
            return FdRef(FD_NOT_OPEN)
        raise
    if st.st_dev != os.fstat(own_fd).st_dev:
        return FdRef(FD_FOREIGN)
    try:
        return FdRef(FD_HANDLE, handle_token(fd))
    except OSError:
        return FdRef(FD_FOREIGN)  # on the mount but not a handle (e.g. a directory)


def _channel_name(fd: int) -> bytes:
    """Where this mount's daemon takes descriptors. Asked every time: a new mount may reuse
    an old one's device number, so nothing about a mount can be cached by st_dev."""
    return _transact(fd, protocol.Request(op=protocol.OP_FD_CHANNEL), protocol.MAX_MESSAGE).payload


def _pass_eventfds(fd: int, payload: bytes) -> dict[int, FdRef]:
    """SET_IRQS with DATA_EVENTFD: the daemon must signal these eventfds itself, so the
    descriptors travel to it (SCM_RIGHTS) before the command names them."""
    if len(payload) < ctypes.sizeof(vfio_irq_set):
        return {}
    hdr = vfio_irq_set.from_buffer_copy(payload)
    if not hdr.flags & VFIO_IRQ_SET_DATA_EVENTFD:
        return {}
    count = min(hdr.count, (len(payload) - ctypes.sizeof(vfio_irq_set)) // 4)
    numbers = struct.unpack_from(f"<{count}i", payload, ctypes.sizeof(vfio_irq_set))
    refs: dict[int, FdRef] = {}
    send: dict[int, int] = {}
    parcel = secrets.token_bytes(16)
    for number in numbers:
        if number < 0 or number in refs:
            continue
        try:
            os.fstat(number)
        except OSError:
            refs[number] = FdRef(FD_NOT_OPEN)
            continue
        refs[number] = FdRef(protocol.FD_PASSED, parcel)
        send[number] = number
    if send:
        fdpass.deposit(_channel_name(fd), parcel, send)
    return refs


# Commands that reach into the caller's memory (mappings, pointers in their structs): the
# daemon must be able to prove which process asked (docs/protocol.md §12).
PROCESS_COMMANDS = {IOMMU_IOAS_MAP, IOMMU_IOAS_IOVA_RANGES, VFIO_IOMMU_MAP_DMA}
PR_SET_PTRACER = 0x59616D61


def _prove_process(fd: int) -> dict[int, FdRef]:
    """Deposit an empty parcel: the daemon learns from the kernel which process we are, and
    (under Yama ptrace_scope=1) we allow that daemon to read and write our memory."""
    parcel = secrets.token_bytes(16)
    daemon_pid = fdpass.deposit(_channel_name(fd), parcel, {})
    if daemon_pid > 0:
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PTRACER, daemon_pid, 0, 0, 0)
        except (OSError, AttributeError):  # no Yama: nothing to allow
            pass
    return {0: FdRef(protocol.FD_PROCESS, parcel)}


def ioctl(fd: int, request: int, arg: Arg = None) -> int:
    """Run ioctl ``request`` on a vfiofs handle; returns what the kernel would return.

    ``arg`` is a ctypes structure or a writable buffer (updated in place with what the
    kernel copies back), read-only bytes (sent, not updated), an int for commands that
    take a value, or None for a NULL pointer. Raises ``OSError`` with the command's errno.
    """
    if hasattr(fd, "fileno"):
        fd = fd.fileno()
    if arg is None:
        req = protocol.Request(protocol.OP_IOCTL, request, protocol.ARG_NULL)
    elif isinstance(arg, int):
        req = protocol.Request(protocol.OP_IOCTL, request, protocol.ARG_VALUE, arg_value=arg)
    else:
        view = memoryview(arg).cast("B")
        payload = bytes(view)
        fds = _pass_eventfds(fd, payload) if request == VFIO_DEVICE_SET_IRQS else {}
        if request in PROCESS_COMMANDS:
            fds.update(_prove_process(fd))
        for field_offset in FD_FIELDS.get(request, ()):
            if len(payload) >= field_offset + 4:
                number = int.from_bytes(payload[field_offset : field_offset + 4], "little", signed=True)
                if number >= 0:
                    fds[number] = resolve_fd(number, fd)
        req = protocol.Request(protocol.OP_IOCTL, request, protocol.ARG_BUFFER, payload=payload, fds=fds)
    try:
        reply = _transact(fd, req, len(req.payload))
    except ValueError as exc:  # request too large for the mailbox
        raise OSError(errno.EINVAL, str(exc)) from None
    except OSError:
        if request in WRITEBACK_ON_ERROR and not view_readonly(arg):
            _copy_back_after_failure(fd, arg, len(req.payload))
        raise
    if not view_readonly(arg) and reply.payload:
        memoryview(arg).cast("B")[: len(reply.payload)] = reply.payload
    if request == VFIO_GROUP_GET_DEVICE_FD:
        return _open_granted_device(fd, reply.result)
    return reply.result


def _open_granted_device(group_fd: int, result: int) -> int:
    """GET_DEVICE_FD returns a new fd in the kernel: open the device node and claim the
    daemon's grant on that new handle, then hand its fd number to the caller."""
    index, ticket = result & 0xFFFF, result >> 16
    group_path = os.readlink(f"/proc/self/fd/{group_fd}")  # <mount>/vfio/<N>
    root = os.path.dirname(os.path.dirname(group_path))
    new_fd = os.open(os.path.join(root, "vfio", "devices", f"vfio{index}"), os.O_RDWR | os.O_CLOEXEC)
    try:
        _transact(new_fd, protocol.Request(protocol.OP_CLAIM, arg_kind=protocol.ARG_NULL, arg_value=ticket), 0)
    except BaseException:
        os.close(new_fd)
        raise
    return new_fd


# Commands whose kernel code copies results out and then fails (the caller sees both).
WRITEBACK_ON_ERROR = {IOMMU_IOAS_IOVA_RANGES}


def _copy_back_after_failure(fd: int, arg: Arg, room: int) -> None:
    offset = protocol.control_offset(threading.get_native_id() & protocol.MAX_TAG)
    try:
        reply = protocol.decode_reply(os.pread(fd, protocol.REPLY_HEADER_SIZE + room, offset))
    except (OSError, VfioError):
        return  # nothing was written back
    memoryview(arg).cast("B")[: len(reply.payload)] = reply.payload


def view_readonly(arg: Arg) -> bool:
    if arg is None or isinstance(arg, int):
        return True
    return memoryview(arg).readonly


class _Node:
    """An open vfiofs node; closes on exit from a with-block."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)

    @classmethod
    def from_fd(cls, fd: int):
        """Wrap an fd this process already has (e.g. from VFIO_GROUP_GET_DEVICE_FD)."""
        node = cls.__new__(cls)
        node.path, node.fd = os.readlink(f"/proc/self/fd/{fd}"), fd
        return node

    def fileno(self) -> int:
        if self.fd < 0:
            raise ValueError("I/O operation on closed node")
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def ioctl(self, request: int, arg: Arg = None) -> int:
        return ioctl(self.fileno(), request, arg)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class IommuFd(_Node):
    """An open of the ``iommu`` node: an emulated iommufd context."""

    def ioas_alloc(self) -> int:
        cmd = iommu_ioas_alloc(size=ctypes.sizeof(iommu_ioas_alloc))
        self.ioctl(IOMMU_IOAS_ALLOC, cmd)
        return cmd.out_ioas_id

    def destroy(self, object_id: int) -> None:
        self.ioctl(IOMMU_DESTROY, iommu_destroy(size=ctypes.sizeof(iommu_destroy), id=object_id))

    def map(self, ioas_id: int, user_va: int, length: int, iova: int | None = None,
            readable: bool = True, writeable: bool = True) -> int:
        """IOMMU_IOAS_MAP of this process's memory; returns the IOVA (chosen by the IOMMU if None)."""
        flags = (IOMMU_IOAS_MAP_READABLE if readable else 0) | (IOMMU_IOAS_MAP_WRITEABLE if writeable else 0)
        if iova is not None:
            flags |= IOMMU_IOAS_MAP_FIXED_IOVA
        cmd = iommu_ioas_map(size=ctypes.sizeof(iommu_ioas_map), flags=flags, ioas_id=ioas_id, user_va=user_va,
                             length=length, iova=iova or 0)
        self.ioctl(IOMMU_IOAS_MAP, cmd)
        return cmd.iova

    def map_buffer(self, ioas_id: int, buffer, iova: int | None = None, readable: bool = True,
                   writeable: bool = True) -> int:
        """Map a page-aligned writable buffer of this process (e.g. ``mmap.mmap(-1, n)``)."""
        address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
        return self.map(ioas_id, address, len(buffer), iova, readable, writeable)

    def unmap(self, ioas_id: int, iova: int = 0, length: int = (1 << 64) - 1) -> int:
        """IOMMU_IOAS_UNMAP; the default range unmaps everything. Returns the bytes unmapped."""
        cmd = iommu_ioas_unmap(size=ctypes.sizeof(iommu_ioas_unmap), ioas_id=ioas_id, iova=iova, length=length)
        self.ioctl(IOMMU_IOAS_UNMAP, cmd)
        return cmd.length

    def iova_ranges(self, ioas_id: int) -> tuple[list[tuple[int, int]], int]:
        """IOMMU_IOAS_IOVA_RANGES: the usable (start, last) ranges and the IOVA alignment."""
        ranges = (iommu_iova_range * 16)()
        cmd = iommu_ioas_iova_ranges(size=ctypes.sizeof(iommu_ioas_iova_ranges), ioas_id=ioas_id, num_iovas=16,
                                     allowed_iovas=ctypes.addressof(ranges))
        self.ioctl(IOMMU_IOAS_IOVA_RANGES, cmd)
        return [(r.start, r.last) for r in ranges[: cmd.num_iovas]], cmd.out_iova_alignment


class VfioDevice(_Node):
    """An open of ``vfio/devices/vfioN``. Opening never binds: call :meth:`bind_iommufd`."""

    def bind_iommufd(self, iommufd: IommuFd | int) -> int:
        """VFIO_DEVICE_BIND_IOMMUFD; returns the devid."""
        number = iommufd.fileno() if isinstance(iommufd, IommuFd) else iommufd
        bind = vfio_device_bind_iommufd(argsz=ctypes.sizeof(vfio_device_bind_iommufd), iommufd=number)
        self.ioctl(VFIO_DEVICE_BIND_IOMMUFD, bind)
        return bind.out_devid

    def attach_iommufd_pt(self, pt_id: int) -> int:
        """VFIO_DEVICE_ATTACH_IOMMUFD_PT; returns the page table id the device is attached to."""
        attach = vfio_device_attach_iommufd_pt(argsz=ctypes.sizeof(vfio_device_attach_iommufd_pt), pt_id=pt_id)
        self.ioctl(VFIO_DEVICE_ATTACH_IOMMUFD_PT, attach)
        return attach.pt_id

    def detach_iommufd_pt(self) -> None:
        self.ioctl(VFIO_DEVICE_DETACH_IOMMUFD_PT,
                   vfio_device_detach_iommufd_pt(argsz=ctypes.sizeof(vfio_device_detach_iommufd_pt)))

    def get_info(self) -> vfio_device_info:
        info = vfio_device_info(argsz=ctypes.sizeof(vfio_device_info))
        self.ioctl(VFIO_DEVICE_GET_INFO, info)
        return info

    def get_region_info(self, index: int) -> vfio_region_info:
        info = vfio_region_info(argsz=ctypes.sizeof(vfio_region_info), index=index)
        self.ioctl(VFIO_DEVICE_GET_REGION_INFO, info)
        return info

    def reset(self) -> None:
        self.ioctl(VFIO_DEVICE_RESET)

    def get_irq_info(self, index: int) -> vfio_irq_info:
        info = vfio_irq_info(argsz=ctypes.sizeof(vfio_irq_info), index=index)
        self.ioctl(VFIO_DEVICE_GET_IRQ_INFO, info)
        return info

    def set_irqs(self, index: int, flags: int, start: int = 0, count: int | None = None,
                 data: list[int] | bytes | None = None) -> None:
        """VFIO_DEVICE_SET_IRQS. ``data``: eventfd numbers (DATA_EVENTFD, -1 unassigns) or
        bools (DATA_BOOL); with DATA_NONE leave it out. ``count`` defaults to len(data)."""
        if flags & VFIO_IRQ_SET_DATA_EVENTFD:
            payload = struct.pack(f"<{len(data or [])}i", *(data or []))
        elif flags & VFIO_IRQ_SET_DATA_BOOL:
            payload = bytes(data or b"")
        else:
            payload = b""
        if count is None:
            count = len(data) if data is not None else 0
        header = vfio_irq_set(argsz=ctypes.sizeof(vfio_irq_set) + len(payload), flags=flags, index=index,
                              start=start, count=count)
        self.ioctl(VFIO_DEVICE_SET_IRQS, bytearray(bytes(header) + payload))

    def enable_irq_eventfds(self, index: int, eventfds: list[int], start: int = 0) -> None:
        """Route vectors ``start``.. of ``index`` to ``eventfds`` (DATA_EVENTFD | ACTION_TRIGGER)."""
        self.set_irqs(index, VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER, start, data=eventfds)

    def disable_irqs(self, index: int) -> None:
        """DATA_NONE | ACTION_TRIGGER with count 0: the index goes back to disabled."""
        self.set_irqs(index, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, 0, 0)

    def unmask_intx(self) -> None:
        self.set_irqs(VFIO_PCI_INTX_IRQ_INDEX, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK, 0, 1)

    def mmap(self, index: int, length: int | None = None, offset: int = 0) -> mmap.mmap:
        """A shared, writable mapping of region ``index`` (a BAR with VFIO_REGION_INFO_FLAG_MMAP).

        FUSE cannot map a device node, so the daemon passes the region's memory over a
        one-shot abstract UNIX socket that only this process knows (docs/protocol.md).
        The mapping stays valid until the handle is closed or the device is reset; after
        that, touching it raises SIGBUS, as a revoked mapping does.
        """
        if length is None:
            size = self.get_region_info(index).size
            length = ((size + mmap.PAGESIZE - 1) & ~(mmap.PAGESIZE - 1)) - offset
        name = b"vfiofs-" + secrets.token_hex(16).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as listener:
            listener.bind(b"\0" + name)
            listener.listen(1)
            request = protocol.encode_map_request(index, offset, length, name)
            _transact(self.fileno(), request, 0)
            listener.settimeout(10)
            conn, _ = listener.accept()
            with conn:
                _msg, fds, _flags, _addr = socket.recv_fds(conn, 64, 1)
        if len(fds) != 1:
            raise OSError(errno.EIO, "the daemon did not pass the region's memory")
        try:
            return mmap.mmap(fds[0], length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                             offset=offset)
        finally:
            os.close(fds[0])

    def fsync(self) -> None:
        """Make persistent regions durable (fsync on the bound handle)."""
        os.fsync(self.fileno())

    def read(self, index: int, offset: int, size: int) -> bytes:
        """pread() of region ``index``; may return fewer bytes at the end of a BAR."""
        return os.pread(self.fileno(), size, VFIO_PCI_INDEX_TO_OFFSET(index) + offset)

    def write(self, index: int, offset: int, data: bytes) -> int:
        """pwrite() to region ``index``; returns the number of bytes the device took."""
        return os.pwrite(self.fileno(), data, VFIO_PCI_INDEX_TO_OFFSET(index) + offset)


class VfioContainer(_Node):
    """An open of ``vfio/vfio``: the legacy container (type1 IOMMU)."""

    def check_extension(self, extension: int) -> int:
        return self.ioctl(VFIO_CHECK_EXTENSION, extension)

    def set_iommu(self, iommu_type: int = VFIO_TYPE1v2_IOMMU) -> None:
        self.ioctl(VFIO_SET_IOMMU, iommu_type)

    def get_info(self) -> bytearray:
        """VFIO_IOMMU_GET_INFO with room for its capabilities; returns the raw buffer."""
        info = vfio_iommu_type1_info(argsz=ctypes.sizeof(vfio_iommu_type1_info))
        self.ioctl(VFIO_IOMMU_GET_INFO, info)
        buf = bytearray(max(info.argsz, ctypes.sizeof(info)))
        struct.pack_into("<I", buf, 0, len(buf))
        self.ioctl(VFIO_IOMMU_GET_INFO, buf)
        return buf

    def map_dma(self, vaddr: int, iova: int, size: int, read: bool = True, write: bool = True) -> None:
        flags = (VFIO_DMA_MAP_FLAG_READ if read else 0) | (VFIO_DMA_MAP_FLAG_WRITE if write else 0)
        self.ioctl(VFIO_IOMMU_MAP_DMA, vfio_iommu_type1_dma_map(argsz=ctypes.sizeof(vfio_iommu_type1_dma_map),
                                                               flags=flags, vaddr=vaddr, iova=iova, size=size))

    def map_buffer(self, buffer, iova: int, read: bool = True, write: bool = True) -> None:
        self.map_dma(ctypes.addressof(ctypes.c_char.from_buffer(buffer)), iova, len(buffer), read, write)

    def unmap_dma(self, iova: int = 0, size: int = 0, unmap_all: bool = False) -> int:
        cmd = vfio_iommu_type1_dma_unmap(argsz=ctypes.sizeof(vfio_iommu_type1_dma_unmap), iova=iova, size=size,
                                         flags=VFIO_DMA_UNMAP_FLAG_ALL if unmap_all else 0)
        self.ioctl(VFIO_IOMMU_UNMAP_DMA, cmd)
        return cmd.size


class VfioGroup(_Node):
    """An open of ``vfio/<N>``: a legacy IOMMU group."""

    def get_status(self) -> int:
        status = vfio_group_status(argsz=ctypes.sizeof(vfio_group_status))
        self.ioctl(VFIO_GROUP_GET_STATUS, status)
        return status.flags

    def set_container(self, container: VfioContainer | int) -> None:
        number = container.fileno() if isinstance(container, VfioContainer) else container
        self.ioctl(VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(number))

    def unset_container(self) -> None:
        self.ioctl(VFIO_GROUP_UNSET_CONTAINER)

    def get_device_fd(self, name: str) -> int:
        """VFIO_GROUP_GET_DEVICE_FD by device name (the PCI address); a new fd, granted at once."""
        return self.ioctl(VFIO_GROUP_GET_DEVICE_FD, ctypes.create_string_buffer(name.encode()))

    def get_device(self, name: str) -> VfioDevice:
        return VfioDevice.from_fd(self.get_device_fd(name))
