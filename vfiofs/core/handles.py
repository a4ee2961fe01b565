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
device's driver half (:mod:`vfiofs.pci.vfio_pci`) and the iommufd objects
(:mod:`vfiofs.iommu.iommufd`) are called only when this module has allowed it.
"""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass, field
from typing import Callable, Mapping

from vfiofs import abi
from vfiofs.errors import VfioError
from vfiofs.iommu.type1 import Container
from vfiofs.iommu.iommufd import DeviceObject, IommufdContext
from vfiofs.host.procmem import ProcessMemory
from vfiofs.core.usermem import UserBuffer
from vfiofs.core.ioctl import offsetofend
from vfiofs.pci.vfio_pci import VfioPciDevice

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


class Group:
    """An IOMMU group (``struct vfio_group``): the legacy way in, exclusive with the cdev one."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.devices: list[Device] = []
        self.opened: GroupFile | None = None  # open, or kept open by device handles it handed out
        self.derived_handles = 0  # live device handles obtained through VFIO_GROUP_GET_DEVICE_FD
        self.cdev_bound = 0  # devices of this group bound through their cdev

    def blocks_cdev(self) -> bool:
        """vfio_device_block_group(): BIND fails with EBUSY while the group is in use."""
        return self.opened is not None or self.derived_handles > 0


class Device:
    """A registered device (``struct vfio_device``)."""

    def __init__(self, index: int, name: str, driver: VfioPciDevice, group: Group | None = None,
                 bdf: str = "") -> None:
        self.index = index
        self.name = name
        self.driver = driver
        self.bdf = bdf or name  # the name VFIO_GROUP_GET_DEVICE_FD looks devices up by
        self.group = group if group is not None else Group(index)
        self.group.devices.append(self)
        self.bound_file: DeviceFile | None = None  # the cdev handle that bound it
        self.open_count = 0  # granted handles (one via the cdev, or any number via the group)

    def open(self) -> None:
        """First grant opens the device (vfio_df_open); errors propagate and grant nothing."""
        if self.open_count == 0:
            self.driver.open_device()
        self.open_count += 1

    def close(self) -> None:
        self.open_count -= 1
        if self.open_count == 0:
            self.driver.close_device()


class ControlNode:
    """A node that only carries ioctls (iommu, container, group): no data, no mmap, no fsync."""

    what = "this node"

    def read(self, offset: int, size: int) -> bytes:
        raise VfioError(errno.EINVAL, f"{self.what} has no read")

    def write(self, offset: int, data: bytes) -> int:
        raise VfioError(errno.EINVAL, f"{self.what} has no write")

    def map_region(self, index: int, offset: int, length: int) -> int:
        raise VfioError(errno.ENODEV, f"{self.what} has no mmap")

    def fsync(self) -> None:
        raise VfioError(errno.EINVAL, f"{self.what} has no fsync")


class IommuFile(ControlNode):
    """One open of the ``iommu`` node: a fresh iommufd context."""

    what = "/dev/iommu"

    def __init__(self) -> None:
        self.ctx = IommufdContext()

    def ioctl(self, request: int, arg: IoctlArg) -> int:
        return self.ctx.ioctl(request, arg.buf, arg.value, arg.process)

    def release(self) -> None:
        """Nothing to undo: devices bound to the context keep it alive."""


class DeviceFile:
    """One open of a device node (``struct vfio_device_file``)."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.state = HandleState.BLOCKED
        self.ictx: IommufdContext | None = None
        self.devobj: DeviceObject | None = None
        self.group_file: GroupFile | None = None  # set for handles from VFIO_GROUP_GET_DEVICE_FD

    def adopt_grant(self, grant: "Grant") -> None:
        """Turn this fresh handle into the one VFIO_GROUP_GET_DEVICE_FD returned: granted
        from the start (vfio_device_group_open sets access_granted), tied to the group."""
        if self.state is not HandleState.BLOCKED or grant.device is not self.device:
            raise VfioError(errno.EINVAL, "the grant is for another device or this handle is in use")
        if grant.claimed or grant not in grant.group_file.grants:
            raise VfioError(errno.EINVAL, "the grant was already used or has lapsed")
        grant.claimed = True
        self.group_file = grant.group_file
        self.device.group.derived_handles += 1
        self.state = HandleState.BOUND

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
        if self.group_file is None:  # the cdev's own ioctls; a group handle goes to the driver (ENOTTY)
            if request == abi.VFIO_DEVICE_ATTACH_IOMMUFD_PT:
                return self._attach(arg.buf)
            if request == abi.VFIO_DEVICE_DETACH_IOMMUFD_PT:
                return self._detach(arg.buf)
        return self.device.driver.ioctl(request, arg)

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
        if self.group_file is not None:
            raise VfioError(errno.EINVAL, "a handle from VFIO_GROUP_GET_DEVICE_FD cannot BIND")
        if self.device.group.blocks_cdev():
            raise VfioError(errno.EBUSY, "the device's group is open (legacy group/container path)")
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
        if device.open_count != 0:
            raise VfioError(errno.EINVAL, "device is bound through another handle")
        ictx = target.ctx
        devobj = ictx.bind_device(device.name, device.driver.attach_dma)
        try:
            device.open()
        except VfioError:
            ictx.unbind_device(devobj)
            raise
        try:
            buf.copy_to(offsetofend(abi.vfio_device_bind_iommufd, "iommufd"), devobj.id.to_bytes(4, "little"))
        except VfioError:
            device.close()
            ictx.unbind_device(devobj)
            raise
        # Granted only here, after every step succeeded.
        device.bound_file = self
        device.group.cdev_bound += 1
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
        """The last close: unbind (cdev) or let go of the group (legacy). Always succeeds."""
        if self.state is HandleState.BOUND and self.group_file is not None:
            self.device.close()
            self.device.group.derived_handles -= 1
            self.group_file.handle_released()
        elif self.state is HandleState.BOUND:
            assert self.ictx is not None and self.devobj is not None
            self.device.close()
            self.ictx.unbind_device(self.devobj)
            self.device.bound_file = None
            self.device.group.cdev_bound -= 1
            self.ictx = self.devobj = None
        self.state = HandleState.CLOSED


class ContainerFile(ControlNode):
    """One open of ``vfio/vfio``: a legacy container (type1 semantics in :mod:`vfiofs.iommu.type1`)."""

    what = "the container"

    def __init__(self) -> None:
        self.container = Container()

    def ioctl(self, request: int, arg: IoctlArg) -> int:
        return self.container.ioctl(request, arg.buf, arg.value, arg.process)

    def release(self) -> None:
        """Attached groups keep the container alive, as their file references do in the kernel."""


@dataclass(eq=False)
class Grant:
    """A device VFIO_GROUP_GET_DEVICE_FD opened, waiting for the client's new handle to claim it."""

    device: Device
    group_file: "GroupFile"
    claimed: bool = False


class GroupFile(ControlNode):
    """One open of ``vfio/<N>``: the legacy group node."""

    what = "a group"

    def __init__(self, group: Group) -> None:
        if group.cdev_bound:
            raise VfioError(errno.EBUSY, "a device of this group is bound through its cdev")
        if group.opened is not None:
            raise VfioError(errno.EBUSY, "the group is already open")
        self.group = group
        self.container: Container | None = None
        self.grants: list[Grant] = []
        self.released = False
        group.opened = self

    def ioctl(self, request: int, arg: IoctlArg) -> int:
        if request == abi.VFIO_GROUP_GET_STATUS:
            minsz = offsetofend(abi.vfio_group_status, "flags")
            status = arg.buf.read_struct(abi.vfio_group_status, minsz)
            if status.argsz < minsz:
                raise VfioError(errno.EINVAL, "argsz smaller than vfio_group_status")
            status.flags = abi.VFIO_GROUP_FLAGS_VIABLE | (
                abi.VFIO_GROUP_FLAGS_CONTAINER_SET if self.container is not None else 0)
            arg.buf.write_struct(status, minsz)
            return 0
        if request == abi.VFIO_GROUP_SET_CONTAINER:
            number = int.from_bytes(arg.buf.copy_from(0, 4), "little", signed=True)
            if self.container is not None:
                raise VfioError(errno.EINVAL, "the group already has a container")
            target = arg.files.get(number) if number >= 0 else None
            if target is None:
                raise VfioError(errno.EBADF, f"fd {number} is not open")
            if not isinstance(target, ContainerFile):
                raise VfioError(errno.EBADFD, f"fd {number} is not a container of this mount")
            self.container = target.container
            self.container.groups.append(self)
            return 0
        if request == abi.VFIO_GROUP_UNSET_CONTAINER:
            if self.container is None:
                raise VfioError(errno.EINVAL, "the group has no container")
            if self.group.derived_handles:
                raise VfioError(errno.EBUSY, "device handles from this group are still open")
            self._detach()
            return 0
        if request == abi.VFIO_GROUP_GET_DEVICE_FD:
            raise VfioError(errno.EINVAL, "VFIO_GROUP_GET_DEVICE_FD goes through get_device()")
        raise VfioError(errno.ENOTTY, f"ioctl {request:#x} not supported on a group")

    def get_device(self, buf: UserBuffer) -> Grant:
        """VFIO_GROUP_GET_DEVICE_FD: open the named device for a new, granted handle."""
        raw = buf.copy_from(0, len(buf))
        name = raw.split(b"\0", 1)[0].decode(errors="replace")
        if b"\0" not in raw:
            raise VfioError(errno.EFAULT, "the device name is not NUL-terminated inside the buffer")
        if self.container is None or self.container.iommu_type is None:
            raise VfioError(errno.EINVAL, "the group needs a container with an IOMMU set")
        device = next((d for d in self.group.devices if d.bdf == name), None)
        if device is None:
            raise VfioError(errno.ENODEV, f"no device {name!r} in group {self.group.number}")
        device.open()
        device.driver.attach_dma(self.container.ioas)
        grant = Grant(device, self)
        self.grants.append(grant)
        return grant

    def forget_grant(self, grant: Grant) -> None:
        """A grant never claimed (the client died): close the device it opened."""
        if grant in self.grants and not grant.claimed:
            self.grants.remove(grant)
            grant.device.close()

    def handle_released(self) -> None:
        if self.released and self.group.derived_handles == 0:
            self._finish()

    def _detach(self) -> None:
        assert self.container is not None
        self.container.groups.remove(self)
        self.container.group_detached()
        self.container = None

    def _finish(self) -> None:
        for grant in list(self.grants):
            self.forget_grant(grant)
        if self.container is not None:
            self._detach()
        self.group.opened = None

    def release(self) -> None:
        """The group file closes; device handles it handed out keep the group in use."""
        self.released = True
        if self.group.derived_handles == 0:
            self._finish()
