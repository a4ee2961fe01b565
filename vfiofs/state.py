"""The handle state machine: everything that decides what an open handle may do.

Reproduces drivers/vfio/device_cdev.c and vfio_main.c ("vfio: Block device access via
device fd until device is opened"): opening ``vfio/devices/vfioN`` yields a BLOCKED
handle; the only request it accepts is VFIO_DEVICE_BIND_IOMMUFD; a successful bind
makes it BOUND for the rest of its life; release (the last close) makes it CLOSED.

    open() ──► BLOCKED ── BIND ok ──► BOUND ── release ──► CLOSED
                 │  region read/write, any other ioctl → EINVAL
                 │  BIND fails (any errno) → stays BLOCKED, no side effect
                 └──────────────────────────── release ──► CLOSED

Sans-I/O: no FUSE, no sockets, no clock. The FUSE adapter feeds requests in; the
device's driver half (:mod:`vfiofs.vfio_pci`) and the iommufd objects
(:mod:`vfiofs.iommufd`) are called only when this module has allowed it.
"""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass, field
from typing import Callable, Mapping

from . import abi
from .errors import VfioError
from .iommufd import DeviceObject, IommufdContext
from .procmem import ProcessMemory
from .usermem import UserBuffer
from .vfio_pci import VfioPciDevice, offsetofend

#: Value of :attr:`IoctlArg.files` for an fd that is open but is not a handle of this mount.
FOREIGN_FD = object()


@dataclass
class IoctlArg:
    """Everything an ioctl can see of its caller.

    ``buf`` is the memory the argument points at, ``value`` the argument as an integer
    (for ioctls that take a value), and ``files`` what the fd numbers of the caller's
    process refer to: a handle of this mount, :data:`FOREIGN_FD`, or absent (not open).
    """

    buf: UserBuffer
    value: int = 0
    files: Mapping[int, object] = field(default_factory=dict)
    #: opens the calling process's memory, when the transport could identify the caller
    process: Callable[[], ProcessMemory] | None = None


class HandleState(enum.Enum):
    BLOCKED = "blocked"
    BOUND = "bound"
    CLOSED = "closed"


class Device:
    """A registered device (``struct vfio_device``): at most one bound handle at a time."""

    def __init__(self, index: int, name: str, driver: VfioPciDevice) -> None:
        self.index = index
        self.name = name
        self.driver = driver
        self.bound_file: DeviceFile | None = None


class IommuFile:
    """One open of the ``iommu`` node: a fresh iommufd context."""

    def __init__(self) -> None:
        self.ctx = IommufdContext()

    def ioctl(self, request: int, arg: IoctlArg) -> int:
        return self.ctx.ioctl(request, arg.buf, arg.value, arg.process)

    def read(self, offset: int, size: int) -> bytes:
        raise VfioError(errno.EINVAL, "/dev/iommu has no read")

    def write(self, offset: int, data: bytes) -> int:
        raise VfioError(errno.EINVAL, "/dev/iommu has no write")

    def map_region(self, index: int, offset: int, length: int) -> int:
        raise VfioError(errno.ENODEV, "/dev/iommu has no mmap")

    def fsync(self) -> None:
        raise VfioError(errno.EINVAL, "/dev/iommu has no fsync")

    def release(self) -> None:
        """Nothing to undo: devices bound to the context keep it alive."""


class DeviceFile:
    """One open of a device node (``struct vfio_device_file``)."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.state = HandleState.BLOCKED
        self.ictx: IommufdContext | None = None
        self.devobj: DeviceObject | None = None

    # -- the gate ---------------------------------------------------------------------------
    def _require_bound(self) -> None:
        if self.state is not HandleState.BOUND:
            raise VfioError(errno.EINVAL if self.state is HandleState.BLOCKED else errno.EBADF,
                            f"handle is {self.state.value}")

    def ioctl(self, request: int, arg: IoctlArg) -> int:
        if self.state is HandleState.CLOSED:
            raise VfioError(errno.EBADF, "handle is closed")
        if request == abi.VFIO_DEVICE_BIND_IOMMUFD:
            return self._bind(arg)
        self._require_bound()
        if request == abi.VFIO_DEVICE_ATTACH_IOMMUFD_PT:
            return self._attach(arg.buf)
        if request == abi.VFIO_DEVICE_DETACH_IOMMUFD_PT:
            return self._detach(arg.buf)
        return self.device.driver.ioctl(request, arg.buf, arg.files)

    def read(self, offset: int, size: int) -> bytes:
        self._require_bound()
        return self.device.driver.read(offset, size)

    def write(self, offset: int, data: bytes) -> int:
        self._require_bound()
        return self.device.driver.write(offset, data)

    def map_region(self, index: int, offset: int, length: int) -> int:
        """The memory behind an mmap of region ``index`` (blocked: EINVAL, like the kernel's mmap)."""
        self._require_bound()
        return self.device.driver.map_region(index, offset, length)

    def fsync(self) -> None:
        """Make the device's persistent regions durable; only the binder may."""
        self._require_bound()
        self.device.driver.sync()

    # -- BIND (vfio_df_ioctl_bind_iommufd), checks in the kernel's order ---------------------
    def _bind(self, arg: IoctlArg) -> int:
        buf = arg.buf
        argsz = buf.get_u32(0)
        minsz = offsetofend(abi.vfio_device_bind_iommufd, "out_devid")
        if argsz < minsz:
            raise VfioError(errno.EINVAL, "argsz smaller than vfio_device_bind_iommufd")
        bind = buf.copy_struct_from_user(abi.vfio_device_bind_iommufd, argsz)
        if bind.iommufd < 0 or bind.flags & ~abi.VFIO_DEVICE_BIND_FLAG_TOKEN:
            raise VfioError(errno.EINVAL, "negative iommufd or unknown flags")
        # The kernel's steps 5/6 (group-derived handle, open group) belong to the legacy
        # group path, which vfiofs does not serve yet.
        if self.state is HandleState.BOUND:
            raise VfioError(errno.EINVAL, "handle is already bound")
        if bind.flags & abi.VFIO_DEVICE_BIND_FLAG_TOKEN:
            raise VfioError(errno.EINVAL, "device takes no VF token")
        target = arg.files.get(bind.iommufd)
        if target is None:
            raise VfioError(errno.EBADF, f"fd {bind.iommufd} is not open")
        if not isinstance(target, IommuFile):
            raise VfioError(errno.EBADFD, f"fd {bind.iommufd} is not an iommufd of this mount")
        device = self.device
        if device.bound_file is not None:
            raise VfioError(errno.EINVAL, "device is bound through another handle")
        ictx = target.ctx
        devobj = ictx.bind_device(device.name, device.driver.attach_dma)
        try:
            device.driver.open_device()
        except VfioError:
            ictx.unbind_device(devobj)
            raise
        try:
            buf.copy_to(offsetofend(abi.vfio_device_bind_iommufd, "iommufd"), devobj.id.to_bytes(4, "little"))
        except VfioError:
            device.driver.close_device()
            ictx.unbind_device(devobj)
            raise
        # Granted only here, after every step succeeded.
        device.bound_file = self
        self.ictx, self.devobj = ictx, devobj
        self.state = HandleState.BOUND
        return 0

    # -- ATTACH / DETACH (vfio_df_ioctl_attach_pt / _detach_pt) ------------------------------
    def _attach(self, buf: UserBuffer) -> int:
        assert self.ictx is not None and self.devobj is not None
        minsz = offsetofend(abi.vfio_device_attach_iommufd_pt, "pt_id")
        attach = buf.read_struct(abi.vfio_device_attach_iommufd_pt, minsz)
        if attach.argsz < minsz or attach.flags & ~abi.VFIO_DEVICE_ATTACH_PASID:
            raise VfioError(errno.EINVAL, "argsz too small or unknown flags")
        if attach.flags & abi.VFIO_DEVICE_ATTACH_PASID:
            raise VfioError(errno.EOPNOTSUPP, "device does not support PASID")
        pt_id = self.ictx.attach(self.devobj, attach.pt_id)
        try:
            buf.copy_to(abi.vfio_device_attach_iommufd_pt.pt_id.offset, pt_id.to_bytes(4, "little"))
        except VfioError:
            self.ictx.detach(self.devobj)
            raise
        return 0

    def _detach(self, buf: UserBuffer) -> int:
        assert self.ictx is not None and self.devobj is not None
        minsz = offsetofend(abi.vfio_device_detach_iommufd_pt, "flags")
        detach = buf.read_struct(abi.vfio_device_detach_iommufd_pt, minsz)
        if detach.argsz < minsz or detach.flags & ~abi.VFIO_DEVICE_DETACH_PASID:
            raise VfioError(errno.EINVAL, "argsz too small or unknown flags")
        if detach.flags & abi.VFIO_DEVICE_DETACH_PASID:
            raise VfioError(errno.EOPNOTSUPP, "device does not support PASID")
        self.ictx.detach(self.devobj)
        return 0

    # -- release (vfio_device_fops_release) -------------------------------------------------
    def release(self) -> None:
        """The last close: unbind if bound. Always succeeds."""
        if self.state is HandleState.BOUND:
            assert self.ictx is not None and self.devobj is not None
            self.device.driver.close_device()
            self.ictx.unbind_device(self.devobj)
            self.device.bound_file = None
            self.ictx = self.devobj = None
        self.state = HandleState.CLOSED
