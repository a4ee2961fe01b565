"""The handle state machine: every rule about what an open handle may do.

Reproduces drivers/vfio/device_cdev.c, group.c and vfio_main.c ("vfio: Block device
access via device fd until device is opened"). A device handle is in one of four states:

    open(vfio/devices/vfioN)
          │
          ▼        BIND ok
       BLOCKED ────────────────► BOUND ───────┐    (cdev: ATTACH_PT / DETACH_PT)
        │   │      CLAIM ok                   │ RELEASE
        │   └──────────────────► GRANTED ─────┤    (the fd VFIO_GROUP_GET_DEVICE_FD returned)
        │                                     ▼
        └──────────── RELEASE ──────────────► CLOSED

BLOCKED refuses everything but BIND (and CLAIM) with EINVAL; a failed BIND or CLAIM
leaves it BLOCKED with no side effect. BOUND and GRANTED both reach the driver; they
differ in BIND (already bound / not a cdev handle), in ATTACH_PT/DETACH_PT (cdev-only:
a GRANTED handle passes them to the driver, which answers ENOTTY) and in RELEASE (the
iommufd unbinds it, or it lets go of the group). CLOSED refuses everything with EBADF but
a CLAIM (EINVAL, as for any handle that is not fresh) and a second RELEASE (nothing to do).

:data:`TRANSITIONS` below is the whole machine: for each (state, event) the checks, in
the kernel's order (the first that fails decides the errno), the action once they all
passed, and the state after it. Checks and actions are methods of :class:`DeviceFile`,
named in the table. The group, container and iommu nodes have no states of their own
beyond what their ioctl tables check.

Sans-I/O: no FUSE, no sockets, no clock. The drivers are reached only through the
Protocols of :mod:`vfiofs.core.ops`, and only when this module has allowed it.
"""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass
from typing import Any, Callable

from vfiofs import abi
from vfiofs.core.grants import Tickets
from vfiofs.core.ioctl import Ioctl, IoctlArg, IoctlTable, Style, offsetofend
from vfiofs.core.ops import DeviceDriver, IommuBinding, IommuContainer, IommuContext
from vfiofs.errors import VfioError

__all__ = ["HandleState", "Event", "TRANSITIONS", "Device", "Group", "DeviceFile",
           "IommuFile", "ContainerFile", "GroupFile", "GroupGrant"]


class HandleState(enum.Enum):
    BLOCKED = "blocked"  # opened through the cdev, nothing granted yet
    BOUND = "bound"  # VFIO_DEVICE_BIND_IOMMUFD succeeded (df->access_granted, cdev)
    GRANTED = "granted"  # the handle VFIO_GROUP_GET_DEVICE_FD returned (df->group set)
    CLOSED = "closed"  # released


class Event(enum.Enum):
    BIND = "VFIO_DEVICE_BIND_IOMMUFD"
    ATTACH_PT = "VFIO_DEVICE_ATTACH_IOMMUFD_PT"
    DETACH_PT = "VFIO_DEVICE_DETACH_IOMMUFD_PT"
    DEVICE_IOCTL = "any other ioctl"  # the driver's (vfio_device_ops.ioctl)
    READ = "region read"
    WRITE = "region write"
    MMAP = "region mmap"
    FSYNC = "fsync"
    CLAIM = "CLAIM of a GET_DEVICE_FD grant"
    RELEASE = "release"


@dataclass(frozen=True)
class Refuse:
    """A check that always fails: where an event ends in this state."""

    errno: int
    why: str


@dataclass(frozen=True)
class Transition:
    checks: tuple[str | Refuse, ...] = ()  # DeviceFile method names, in the kernel's order
    action: str | None = None  # DeviceFile method run once every check passed; its result is the event's
    then: HandleState | None = None  # the state after the action (None: unchanged)


BLOCKED, BOUND, GRANTED, CLOSED = HandleState
_CLOSED = Refuse(errno.EBADF, "handle is closed")
_BLOCKED = Refuse(errno.EINVAL, "handle is blocked")  # until VFIO_DEVICE_BIND_IOMMUFD
_NOT_FRESH = Refuse(errno.EINVAL, "only a fresh handle can claim a grant")
_BIND_ARGS = ("copy_in", "valid_bind_args")  # get_user(argsz), copy_struct_from_user, flags/iommufd < 0

# (state, event) → Transition(checks in the kernel's order, action, state after). A check
# that cannot fail in a state is left out of that state's row (a BOUND handle's group is
# never in use: the group could not be opened while the device was bound through its cdev).
TRANSITIONS: dict[tuple[HandleState, Event], Transition] = {
    (BLOCKED, Event.BIND): Transition(_BIND_ARGS + ("group_not_in_use", "no_vf_token", "iommufd_of_this_mount",
                                                    "device_not_open"), "bind", BOUND),
    (BLOCKED, Event.ATTACH_PT): Transition((_BLOCKED,)),
    (BLOCKED, Event.DETACH_PT): Transition((_BLOCKED,)),
    (BLOCKED, Event.DEVICE_IOCTL): Transition((_BLOCKED,)),
    (BLOCKED, Event.READ): Transition((_BLOCKED,)),
    (BLOCKED, Event.WRITE): Transition((_BLOCKED,)),
    (BLOCKED, Event.MMAP): Transition((_BLOCKED,)),
    (BLOCKED, Event.FSYNC): Transition((_BLOCKED,)),
    (BLOCKED, Event.CLAIM): Transition(("grant_for_this_device", "grant_pending"), "claim_grant", GRANTED),
    (BLOCKED, Event.RELEASE): Transition((), None, CLOSED),

    (BOUND, Event.BIND): Transition(_BIND_ARGS + (Refuse(errno.EINVAL, "handle is already bound"),)),
    (BOUND, Event.ATTACH_PT): Transition(("copy_in", "valid_attach_flags"), "attach_pt"),
    (BOUND, Event.DETACH_PT): Transition(("copy_in", "valid_detach_flags"), "detach_pt"),
    (BOUND, Event.DEVICE_IOCTL): Transition((), "driver_ioctl"),
    (BOUND, Event.READ): Transition((), "driver_read"),
    (BOUND, Event.WRITE): Transition((), "driver_write"),
    (BOUND, Event.MMAP): Transition((), "driver_map_region"),
    (BOUND, Event.FSYNC): Transition((), "driver_sync"),
    (BOUND, Event.CLAIM): Transition((_NOT_FRESH,)),
    (BOUND, Event.RELEASE): Transition((), "unbind", CLOSED),

    (GRANTED, Event.BIND): Transition(_BIND_ARGS + (
        Refuse(errno.EINVAL, "a handle from VFIO_GROUP_GET_DEVICE_FD cannot BIND"),)),
    (GRANTED, Event.ATTACH_PT): Transition((), "driver_ioctl"),  # cdev-only ioctls: the driver's ENOTTY
    (GRANTED, Event.DETACH_PT): Transition((), "driver_ioctl"),
    (GRANTED, Event.DEVICE_IOCTL): Transition((), "driver_ioctl"),
    (GRANTED, Event.READ): Transition((), "driver_read"),
    (GRANTED, Event.WRITE): Transition((), "driver_write"),
    (GRANTED, Event.MMAP): Transition((), "driver_map_region"),
    (GRANTED, Event.FSYNC): Transition((), "driver_sync"),
    (GRANTED, Event.CLAIM): Transition((_NOT_FRESH,)),
    (GRANTED, Event.RELEASE): Transition((), "leave_group", CLOSED),

    (CLOSED, Event.BIND): Transition((_CLOSED,)),
    (CLOSED, Event.ATTACH_PT): Transition((_CLOSED,)),
    (CLOSED, Event.DETACH_PT): Transition((_CLOSED,)),
    (CLOSED, Event.DEVICE_IOCTL): Transition((_CLOSED,)),
    (CLOSED, Event.READ): Transition((_CLOSED,)),
    (CLOSED, Event.WRITE): Transition((_CLOSED,)),
    (CLOSED, Event.MMAP): Transition((_CLOSED,)),
    (CLOSED, Event.FSYNC): Transition((_CLOSED,)),
    (CLOSED, Event.CLAIM): Transition((_NOT_FRESH,)),
    (CLOSED, Event.RELEASE): Transition(),  # a second release: nothing left to undo
}


@dataclass(slots=True)
class Call:
    """One event's inputs, and what its checks found on the way (``cmd``, ``target``)."""

    request: int = 0
    arg: IoctlArg | None = None
    cmd: Any = None  # the structure ``copy_in`` took from the caller
    target: "IommuFile | None" = None  # BIND's iommufd, once looked up
    grant: "GroupGrant | None" = None
    offset: int = 0
    size: int = 0
    data: bytes = b""
    index: int = 0


class Group:
    """An IOMMU group (``struct vfio_group``): the legacy way in, exclusive with the cdev one."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.devices: list[Device] = []
        self.opened: GroupFile | None = None  # open, or kept open by device handles it handed out
        self.derived_handles = 0  # live device handles obtained through VFIO_GROUP_GET_DEVICE_FD

    @property
    def cdev_bound(self) -> bool:
        """A device of this group is bound through its cdev (the group cannot be opened)."""
        return any(device.bound_file is not None for device in self.devices)

    def blocks_cdev(self) -> bool:
        """vfio_device_block_group(): BIND fails with EBUSY while the group is in use."""
        return self.opened is not None or self.derived_handles > 0


class Device:
    """A registered device (``struct vfio_device``)."""

    def __init__(self, index: int, name: str, driver: DeviceDriver, group: Group | None = None,
                 bdf: str = "") -> None:
        self.index = index
        self.name = name
        self.driver = driver
        self.bdf = bdf or name  # the name VFIO_GROUP_GET_DEVICE_FD looks devices up by
        self.group = group if group is not None else Group(index)
        self.group.devices.append(self)
        self.bound_file: DeviceFile | None = None  # the cdev handle that bound it
        self.open_count = 0  # granted handles (one via the cdev, or any number via the group)
        #: group path: the container the first GET_DEVICE_FD connected the device to, and its link
        self.container_link: tuple[IommuContainer, object] | None = None

    def open(self) -> None:
        """First grant opens the device (vfio_df_open); errors propagate and grant nothing."""
        if self.open_count == 0:
            self.driver.open_device()
        self.open_count += 1

    def open_through(self, container: IommuContainer) -> None:
        """GET_DEVICE_FD's open: the first one connects the device to the container's IOMMU
        (an iommufd binds it and attaches the compat IOAS), then opens it; all or nothing."""
        if self.open_count:
            self.open()
            return
        link = container.connect_device(self.name, self.driver.attach_dma)
        try:
            self.open()
        except BaseException:
            container.disconnect_device(link)
            raise
        self.container_link = (container, link)

    def close(self) -> None:
        """The last close closes the device, then lets go of its container (vfio_df_close)."""
        self.open_count -= 1
        if self.open_count == 0:
            self.driver.close_device()
            if self.container_link is not None:
                container, link = self.container_link
                self.container_link = None
                container.disconnect_device(link)


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

    def claim(self, grant: object) -> None:
        raise VfioError(errno.EINVAL, "no such grant for this handle")


class IommuFile(ControlNode):
    """One open of the ``iommu`` node: a fresh iommufd context."""

    what = "/dev/iommu"

    def __init__(self, ctx: IommuContext) -> None:
        self.ctx = ctx

    def ioctl(self, request: int, arg: IoctlArg) -> int:
        return self.ctx.ioctl(request, arg)

    def release(self) -> None:
        """Devices bound to the context (and groups attached to it) keep it alive; the
        context destroys its objects once they are gone too."""
        self.ctx.release()


# The ioctls the core serves on a device handle (the cdev's own; any other goes to the driver).
# Their rows give the prologue (structure, minimum size, style) that the ``copy_in`` check
# runs where TRANSITIONS puts it; what follows is the table's, so the rows are never dispatched.
def _through_transitions(handle: object, arg: IoctlArg, cmd: object) -> int:
    raise AssertionError("the cdev's ioctls run through DeviceFile.fire, not IoctlTable.dispatch")


CDEV_IOCTLS = IoctlTable("the vfio cdev", [
    Ioctl(abi.VFIO_DEVICE_BIND_IOMMUFD, _through_transitions, abi.vfio_device_bind_iommufd,
          offsetofend(abi.vfio_device_bind_iommufd, "out_devid"), Style.VFIO_EXTENSIBLE),
    Ioctl(abi.VFIO_DEVICE_ATTACH_IOMMUFD_PT, _through_transitions, abi.vfio_device_attach_iommufd_pt,
          offsetofend(abi.vfio_device_attach_iommufd_pt, "pt_id"), Style.VFIO),
    Ioctl(abi.VFIO_DEVICE_DETACH_IOMMUFD_PT, _through_transitions, abi.vfio_device_detach_iommufd_pt,
          offsetofend(abi.vfio_device_detach_iommufd_pt, "flags"), Style.VFIO),
])
_EVENT_OF_REQUEST = {abi.VFIO_DEVICE_BIND_IOMMUFD: Event.BIND, abi.VFIO_DEVICE_ATTACH_IOMMUFD_PT: Event.ATTACH_PT,
                     abi.VFIO_DEVICE_DETACH_IOMMUFD_PT: Event.DETACH_PT}


class DeviceFile:
    """One open of a device node (``struct vfio_device_file``), driven by :data:`TRANSITIONS`."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.state = HandleState.BLOCKED  # (sets self._plan: this state's row of the table)
        self.ictx: IommuContext | None = None  # BOUND: the iommufd it is bound to
        self.devobj: IommuBinding | None = None  # BOUND: its device object there (iommufd_device)
        self.group_file: GroupFile | None = None  # GRANTED: the group handle that granted it

    @property
    def has_device(self) -> bool:
        """Bound or granted: the handle reaches the driver."""
        return self.state in (HandleState.BOUND, HandleState.GRANTED)

    @property
    def state(self) -> HandleState:
        return self._state

    @state.setter
    def state(self, state: HandleState) -> None:
        self._state = state
        self._plan = _PLANS[state]

    def fire(self, event: Event, call: Call) -> Any:
        """Run ``event``: its checks in order, then its action, then the state change
        (:data:`TRANSITIONS`, compiled into :data:`_PLANS` so that a region access costs an
        index and a call, not a dictionary of enums)."""
        checks, action, then = self._plan[event.slot]
        for check in checks:
            check(self, call)
        result = action(self, call) if action is not None else None
        if then is not None:
            self.state = then
        return result

    # -- events -----------------------------------------------------------------------------
    def ioctl(self, request: int, arg: IoctlArg) -> int:
        event = _EVENT_OF_REQUEST.get(request, Event.DEVICE_IOCTL)
        return self.fire(event, Call(request, arg)) or 0

    def read(self, offset: int, size: int) -> bytes:
        return self.fire(Event.READ, Call(offset=offset, size=size))

    def write(self, offset: int, data: bytes) -> int:
        return self.fire(Event.WRITE, Call(offset=offset, data=data))

    def map_region(self, index: int, offset: int, length: int) -> int:
        """The memory behind an mmap of region ``index`` (blocked: EINVAL, like the kernel's mmap)."""
        return self.fire(Event.MMAP, Call(index=index, offset=offset, size=length))

    def fsync(self) -> None:
        """Make the device's persistent regions durable; only a handle that has the device may."""
        self.fire(Event.FSYNC, Call())

    def claim(self, grant: GroupGrant) -> None:
        """OP_CLAIM: become the handle VFIO_GROUP_GET_DEVICE_FD returned."""
        self.fire(Event.CLAIM, Call(grant=grant))

    def release(self) -> None:
        """The last close; always succeeds."""
        self.fire(Event.RELEASE, Call())

    # -- checks (each raises VfioError or lets the event go on) -------------------------------
    def copy_in(self, call: Call) -> None:
        """The ioctl's prologue (its row in CDEV_IOCTLS): argsz, then copy from the caller."""
        assert call.arg is not None
        call.cmd = CDEV_IOCTLS.rows[call.request].copy_in(call.arg)

    def valid_bind_args(self, call: Call) -> None:
        if call.cmd.iommufd < 0 or call.cmd.flags & ~abi.VFIO_DEVICE_BIND_FLAG_TOKEN:
            raise VfioError(errno.EINVAL, "negative iommufd or unknown flags")

    def group_not_in_use(self, call: Call) -> None:
        if self.device.group.blocks_cdev():
            raise VfioError(errno.EBUSY, "the device's group is open (legacy group/container path)")

    def no_vf_token(self, call: Call) -> None:
        if call.cmd.flags & abi.VFIO_DEVICE_BIND_FLAG_TOKEN:
            raise VfioError(errno.EINVAL, "device takes no VF token")

    def iommufd_of_this_mount(self, call: Call) -> None:
        assert call.arg is not None
        target = call.arg.files.get(call.cmd.iommufd)
        if target is None:
            raise VfioError(errno.EBADF, f"fd {call.cmd.iommufd} is not open")
        if not isinstance(target, IommuFile):
            raise VfioError(errno.EBADFD, f"fd {call.cmd.iommufd} is not an iommufd of this mount")
        call.target = target

    def device_not_open(self, call: Call) -> None:
        """vfio_df_open(): only the group path may open a device more than once."""
        if self.device.open_count != 0:
            raise VfioError(errno.EINVAL, "device is bound through another handle")

    def valid_attach_flags(self, call: Call) -> None:
        if call.cmd.flags & ~abi.VFIO_DEVICE_ATTACH_PASID:
            raise VfioError(errno.EINVAL, "unknown flags")
        if call.cmd.flags & abi.VFIO_DEVICE_ATTACH_PASID:
            raise VfioError(errno.EOPNOTSUPP, "device does not support PASID")

    def valid_detach_flags(self, call: Call) -> None:
        if call.cmd.flags & ~abi.VFIO_DEVICE_DETACH_PASID:
            raise VfioError(errno.EINVAL, "unknown flags")
        if call.cmd.flags & abi.VFIO_DEVICE_DETACH_PASID:
            raise VfioError(errno.EOPNOTSUPP, "device does not support PASID")

    def grant_for_this_device(self, call: Call) -> None:
        assert call.grant is not None
        if call.grant.device is not self.device:
            raise VfioError(errno.EINVAL, "the grant is for another device")

    def grant_pending(self, call: Call) -> None:
        assert call.grant is not None
        if not call.grant.pending:
            raise VfioError(errno.EINVAL, "the grant was already used or has lapsed")

    # -- actions --------------------------------------------------------------------------------
    def bind(self, call: Call) -> int:
        """vfio_df_ioctl_bind_iommufd() past its checks: bind, open, write out_devid; all or nothing."""
        assert call.target is not None and call.arg is not None
        device, ictx = self.device, call.target.ctx
        binding = ictx.bind_device(device.name, device.driver.attach_dma)
        try:
            device.open()
        except VfioError:
            ictx.unbind_device(binding)
            raise
        try:
            call.arg.buf.copy_to(offsetofend(abi.vfio_device_bind_iommufd, "iommufd"),
                                 binding.id.to_bytes(4, "little"))
        except VfioError:
            device.close()
            ictx.unbind_device(binding)
            raise
        device.bound_file = self
        self.ictx, self.devobj = ictx, binding
        return 0

    def attach_pt(self, call: Call) -> int:
        assert self.ictx is not None and self.devobj is not None and call.arg is not None
        pt_id = self.ictx.attach(self.devobj, call.cmd.pt_id)
        try:
            call.arg.buf.copy_to(abi.vfio_device_attach_iommufd_pt.pt_id.offset, pt_id.to_bytes(4, "little"))
        except VfioError:
            self.ictx.detach(self.devobj)
            raise
        return 0

    def detach_pt(self, call: Call) -> int:
        assert self.ictx is not None and self.devobj is not None
        self.ictx.detach(self.devobj)
        return 0

    def driver_ioctl(self, call: Call) -> int:
        assert call.arg is not None
        return self.device.driver.ioctl(call.request, call.arg)

    def driver_read(self, call: Call) -> bytes:
        return self.device.driver.read(call.offset, call.size)

    def driver_write(self, call: Call) -> int:
        return self.device.driver.write(call.offset, call.data)

    def driver_map_region(self, call: Call) -> int:
        return self.device.driver.map_region(call.index, call.offset, call.size)

    def driver_sync(self, call: Call) -> None:
        self.device.driver.sync()

    def claim_grant(self, call: Call) -> None:
        """Granted from the start (vfio_device_group_open sets access_granted), tied to the group."""
        assert call.grant is not None
        self.group_file = call.grant.group_file
        self.group_file.grants.remove(call.grant)  # the handle holds the device from now on
        self.device.group.derived_handles += 1

    def unbind(self, call: Call) -> None:
        assert self.ictx is not None and self.devobj is not None
        self.device.close()
        self.ictx.unbind_device(self.devobj)
        self.device.bound_file = None
        self.ictx = self.devobj = None

    def leave_group(self, call: Call) -> None:
        assert self.group_file is not None
        self.device.close()
        self.device.group.derived_handles -= 1
        self.group_file.handle_released()


def _refusal(refuse: Refuse) -> Callable[[DeviceFile, Call], None]:
    def check(handle: DeviceFile, call: Call) -> None:
        raise VfioError(refuse.errno, refuse.why)

    return check


_Step = tuple[tuple[Callable[[DeviceFile, Call], None], ...], Callable[[DeviceFile, Call], Any] | None,
              "HandleState | None"]


def _compile_table() -> dict[HandleState, tuple[_Step, ...]]:
    """:data:`TRANSITIONS` as functions: for each state, one step per event, indexed by
    ``event.slot``. Every (state, event) must have a transition and every name in it must
    be a DeviceFile method (checked here, at import)."""
    for slot, event in enumerate(Event):
        event.slot = slot  # type: ignore[attr-defined]
    plans = {}
    for state in HandleState:
        steps = []
        for event in Event:
            transition = TRANSITIONS[state, event]
            names = [c for c in transition.checks if isinstance(c, str)]
            if transition.action:
                names.append(transition.action)
            missing = [name for name in names if not callable(getattr(DeviceFile, name, None))]
            if missing:  # pragma: no cover - guards edits of the table
                raise AssertionError(f"({state.name}, {event.name}) names unknown methods {missing}")
            checks = tuple(_refusal(c) if isinstance(c, Refuse) else getattr(DeviceFile, c) for c in transition.checks)
            action = getattr(DeviceFile, transition.action) if transition.action else None
            steps.append((checks, action, transition.then))
        plans[state] = tuple(steps)
    return plans


_PLANS = _compile_table()


class ContainerFile(ControlNode):
    """One open of ``vfio/vfio``: a legacy container (its IOMMU backend is a driver, e.g. type1)."""

    what = "the container"

    def __init__(self, container: IommuContainer) -> None:
        self.container = container

    def ioctl(self, request: int, arg: IoctlArg) -> int:
        return self.container.ioctl(request, arg)

    def release(self) -> None:
        """Attached groups keep the container alive, as their file references do in the kernel."""


@dataclass(eq=False)
class GroupGrant:
    """A device VFIO_GROUP_GET_DEVICE_FD opened, waiting for the client's new handle to claim it."""

    device: Device
    group_file: "GroupFile"

    @property
    def pending(self) -> bool:
        """Its group handle still holds it: not claimed yet, and it has not lapsed."""
        return self in self.group_file.grants

    def lapse(self) -> None:
        self.group_file.forget_grant(self)


class GroupFile(ControlNode):
    """One open of ``vfio/<N>``: the legacy group node, opened by ``uid``."""

    what = "a group"

    def __init__(self, group: Group, tickets: Tickets, uid: int = 0) -> None:
        if group.cdev_bound:
            raise VfioError(errno.EBUSY, "a device of this group is bound through its cdev")
        if group.opened is not None:
            raise VfioError(errno.EBUSY, "the group is already open")
        self.group = group
        self.tickets = tickets
        self.uid = uid  # who may claim the devices it hands out (the kernel's file credentials)
        self.container: IommuContainer | None = None
        self.via_iommufd = False  # the container is an iommufd context (its compat layer)
        self.grants: list[GroupGrant] = []  # opened devices whose grant was neither claimed nor lapsed
        self.released = False
        group.opened = self

    def ioctl(self, request: int, arg: IoctlArg) -> int:
        return GROUP_IOCTLS.dispatch(self, request, arg)

    def _get_status(self, arg: IoctlArg, status: abi.vfio_group_status) -> int:
        """VIABLE always (no other owner of the group); CONTAINER_SET with a container or an iommufd."""
        status.flags = abi.VFIO_GROUP_FLAGS_VIABLE | (
            abi.VFIO_GROUP_FLAGS_CONTAINER_SET if self.container is not None else 0)
        arg.buf.write_struct(status, offsetofend(abi.vfio_group_status, "flags"))
        return 0

    def _set_container(self, arg: IoctlArg, _: None) -> int:
        """vfio_group_ioctl_set_container(): get_user, fdget (EBADF), a container already set
        (EINVAL), then a container or an iommufd (its compat IOAS, made on the first group)."""
        number = int.from_bytes(arg.buf.copy_from(0, 4), "little", signed=True)
        target = arg.files.get(number) if number >= 0 else None
        if target is None:
            raise VfioError(errno.EBADF, f"fd {number} is not open")
        if self.container is not None:
            raise VfioError(errno.EINVAL, "the group already has a container")
        if isinstance(target, ContainerFile):
            container = target.container
        elif isinstance(target, IommuFile):
            container = target.ctx.vfio_compat
        else:
            raise VfioError(errno.EBADFD, f"fd {number} is neither a container nor an iommufd of this mount")
        container.attach_group(self)
        self.container, self.via_iommufd = container, isinstance(target, IommuFile)
        return 0

    def _unset_container(self, arg: IoctlArg, _: None) -> int:
        """EBUSY while device handles are open applies to a container only (container_users);
        an iommufd is let go of at once, its devices stay bound to it until they close."""
        if self.container is None:
            raise VfioError(errno.EINVAL, "the group has no container")
        if self.group.derived_handles and not self.via_iommufd:
            raise VfioError(errno.EBUSY, "device handles from this group are still open")
        self._detach()
        return 0

    def _get_device_fd(self, arg: IoctlArg, _: None) -> int:
        """Open the named device for a new, granted handle. The result is ``ticket << 16 |
        index``: the client opens device node ``index`` and claims the ticket there, so
        the caller gets a new fd, as from the kernel (docs/protocol.md §13)."""
        raw = arg.buf.copy_from(0, len(arg.buf))
        name = raw.split(b"\0", 1)[0].decode(errors="replace")
        if b"\0" not in raw:
            raise VfioError(errno.EFAULT, "the device name is not NUL-terminated inside the buffer")
        if self.container is None or not self.container.iommu_set:
            raise VfioError(errno.EINVAL, "the group needs a container with an IOMMU set")
        device = next((d for d in self.group.devices if d.bdf == name), None)
        if device is None:
            raise VfioError(errno.ENODEV, f"no device {name!r} in group {self.group.number}")
        device.open_through(self.container)
        grant = GroupGrant(device, self)
        self.grants.append(grant)
        return self.tickets.issue(grant, self.uid) << 16 | device.index

    def forget_grant(self, grant: GroupGrant) -> None:
        """A grant never claimed (the client died, or its ticket lapsed): close the device it opened."""
        if grant in self.grants:
            self.grants.remove(grant)
            grant.device.close()

    def handle_released(self) -> None:
        if self.released and self.group.derived_handles == 0:
            self._finish()

    def _detach(self) -> None:
        assert self.container is not None
        self.container.detach_group(self)
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


GROUP_IOCTLS = IoctlTable("a group", [
    Ioctl(abi.VFIO_GROUP_GET_STATUS, GroupFile._get_status, abi.vfio_group_status,
          offsetofend(abi.vfio_group_status, "flags"), Style.VFIO),
    Ioctl(abi.VFIO_GROUP_SET_CONTAINER, GroupFile._set_container, style=Style.RAW),
    Ioctl(abi.VFIO_GROUP_UNSET_CONTAINER, GroupFile._unset_container, style=Style.RAW),
    Ioctl(abi.VFIO_GROUP_GET_DEVICE_FD, GroupFile._get_device_fd, style=Style.RAW),
])
