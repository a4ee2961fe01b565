"""The emulated iommufd: one context per open of the ``iommu`` node, and its objects.

Mirrors drivers/iommu/iommufd: a context owns a table of objects with ids from 1
(the kernel's xarray with XA_FLAGS_ALLOC1 hands out the lowest free id); ioctls on the
iommu handle create and destroy them. Devices bound to the context appear as device
objects (their id is the ``out_devid`` of BIND); attaching a device to an IOAS goes
through an automatically created paging HWPT, as for a physical device, whose id is
what ATTACH writes back. The context outlives its handle while a device is bound to it,
as the kernel's ``iommufd_ctx_get`` reference does.
"""

from __future__ import annotations

import ctypes
import errno
from dataclasses import dataclass, field
from typing import Callable

from . import abi
from .errors import VfioError
from .usermem import UserBuffer


@dataclass(eq=False)
class IommufdObject:
    id: int = 0


@dataclass(eq=False)
class Ioas(IommufdObject):
    """An I/O address space (IOAS_MAP/UNMAP arrive with the DMA issue)."""

    hwpts: list["HwptPaging"] = field(default_factory=list)


@dataclass(eq=False)
class HwptPaging(IommufdObject):
    """A paging domain over an IOAS; created automatically when a device attaches."""

    ioas: Ioas | None = None
    devices: set["DeviceObject"] = field(default_factory=set)


@dataclass(eq=False)
class DeviceObject(IommufdObject):
    """A device bound to this context (``struct iommufd_device``)."""

    name: str = ""
    hwpt: HwptPaging | None = None


@dataclass(frozen=True)
class _Command:
    number: int
    struct: type[ctypes.Structure]
    min_size: int
    execute: Callable[["IommufdContext", ctypes.Structure], None]


# Command numbers the kernel's table covers (IOMMUFD_CMD_BASE .. last known). Numbers
# in this range that vfiofs does not implement answer ENOTTY; numbers outside it go to
# the VFIO compatibility layer, as in iommufd_fops_ioctl().
_TABLE_END = 0x95


class IommufdContext:
    def __init__(self) -> None:
        self.objects: dict[int, IommufdObject] = {}

    # -- object table -------------------------------------------------------------------
    def _add(self, obj: IommufdObject) -> IommufdObject:
        new_id = 1
        while new_id in self.objects:
            new_id += 1
        obj.id = new_id
        self.objects[new_id] = obj
        return obj

    def _remove(self, obj: IommufdObject) -> None:
        del self.objects[obj.id]

    def _busy(self, obj: IommufdObject) -> bool:
        if isinstance(obj, Ioas):
            return bool(obj.hwpts)
        if isinstance(obj, HwptPaging):
            return bool(obj.devices)
        return isinstance(obj, DeviceObject)  # owned by the bound device handle

    # -- the iommu handle's ioctls --------------------------------------------------------
    def ioctl(self, request: int, arg: UserBuffer, value: int) -> int:
        nr = request & 0xFF
        if (request >> 8) & 0xFF != abi.IOMMUFD_TYPE or not abi.IOMMUFD_CMD_BASE <= nr < _TABLE_END:
            return self._vfio_compat(request, value)
        user_size = arg.get_u32(0)
        command = _COMMANDS.get(nr)
        if command is None or command.number != request:
            raise VfioError(errno.ENOTTY, f"iommufd command {request:#x} not supported")
        if user_size < command.min_size:
            raise VfioError(errno.EINVAL, "size smaller than the command structure")
        cmd = arg.copy_struct_from_user(command.struct, user_size)
        command.execute(self, cmd)
        # iommufd_ucmd_respond(): the whole command goes back, up to the caller's size.
        arg.write_struct(cmd, min(user_size, ctypes.sizeof(cmd)))
        return 0

    def _vfio_compat(self, request: int, value: int) -> int:
        """iommufd_vfio_ioctl(): the legacy container ioctls /dev/iommu also answers."""
        if request == abi.VFIO_GET_API_VERSION:
            return abi.VFIO_API_VERSION
        raise VfioError(errno.ENOTTY, f"ioctl {request:#x} not supported on iommufd")

    def _ioas_alloc(self, cmd: abi.iommu_ioas_alloc) -> None:
        if cmd.flags:
            raise VfioError(errno.EOPNOTSUPP, "IOAS_ALLOC flags must be 0")
        cmd.out_ioas_id = self._add(Ioas()).id

    def _destroy(self, cmd: abi.iommu_destroy) -> None:
        obj = self.objects.get(cmd.id)
        if obj is None:
            raise VfioError(errno.ENOENT, f"no object {cmd.id}")
        if self._busy(obj):
            raise VfioError(errno.EBUSY, f"object {cmd.id} is in use")
        self._remove(obj)

    # -- devices (called by the state machine) -----------------------------------------------
    def bind_device(self, name: str) -> DeviceObject:
        obj = self._add(DeviceObject(name=name))
        assert isinstance(obj, DeviceObject)
        return obj

    def unbind_device(self, dev: DeviceObject) -> None:
        self.detach(dev)
        self._remove(dev)

    def attach(self, dev: DeviceObject, pt_id: int) -> int:
        """Attach (or replace) ``dev`` to IOAS/HWPT ``pt_id``; returns the HWPT id."""
        target = self.objects.get(pt_id)
        if target is None:
            raise VfioError(errno.ENOENT, f"no object {pt_id}")
        if isinstance(target, Ioas):
            hwpt = target.hwpts[0] if target.hwpts else self._add(HwptPaging(ioas=target))
            assert isinstance(hwpt, HwptPaging)
            if not target.hwpts:
                target.hwpts.append(hwpt)
        elif isinstance(target, HwptPaging):
            hwpt = target
        else:
            raise VfioError(errno.EINVAL, f"object {pt_id} is not an IOAS or HWPT")
        if dev.hwpt is not hwpt:
            self.detach(dev)
            hwpt.devices.add(dev)
            dev.hwpt = hwpt
        return hwpt.id

    def detach(self, dev: DeviceObject) -> None:
        """Detach ``dev``; a no-op when it is not attached. Auto HWPTs die with their last device."""
        hwpt, dev.hwpt = dev.hwpt, None
        if hwpt is None:
            return
        hwpt.devices.discard(dev)
        if not hwpt.devices and hwpt.ioas is not None:
            hwpt.ioas.hwpts.remove(hwpt)
            self._remove(hwpt)


_COMMANDS = {
    abi.IOMMUFD_CMD_DESTROY: _Command(abi.IOMMU_DESTROY, abi.iommu_destroy, 8, IommufdContext._destroy),
    abi.IOMMUFD_CMD_IOAS_ALLOC: _Command(
        abi.IOMMU_IOAS_ALLOC, abi.iommu_ioas_alloc, 12, IommufdContext._ioas_alloc
    ),
}
