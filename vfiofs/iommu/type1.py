"""The legacy VFIO container (/dev/vfio/vfio) with the type1 IOMMU backend.

Mirrors drivers/vfio/container.c and vfio_iommu_type1.c as far as a driver can see:
API version, extensions, SET_IOMMU (only once a group is attached), GET_INFO with the
IOVA-range capability, MAP_DMA/UNMAP_DMA with type1v2's rules. Mappings live in the same
:class:`~vfiofs.iommu.iommufd.Ioas` machinery as the iommufd path, so a device reached through
a group does DMA exactly like one bound through its cdev. Which groups are attached is
decided by the state machine (:mod:`vfiofs.core.handles`); this module owns the IOMMU half.
"""

from __future__ import annotations

import ctypes
import errno

from vfiofs import abi
from vfiofs.abi import PAGE_SIZE
from vfiofs.core.ioctl import Ioctl, IoctlArg, IoctlTable, Style, offsetofend, place_capabilities
from vfiofs.errors import VfioError
from vfiofs.iommu.iommufd import IOVA_LAST, IOVA_PGSIZES, U64_MAX, Ioas, Mapping

TYPE1_TYPES = (abi.VFIO_TYPE1_IOMMU, abi.VFIO_TYPE1v2_IOMMU)
EXTENSIONS = {abi.VFIO_TYPE1_IOMMU, abi.VFIO_TYPE1v2_IOMMU, abi.VFIO_UNMAP_ALL, abi.VFIO_DMA_CC_IOMMU}
DMA_ENTRY_LIMIT = 65535  # type1's default dma_entry_limit


class Type1Container:
    """One open of ``vfio/vfio``."""

    def __init__(self) -> None:
        self.groups: list[object] = []  # groups attached (the state machine decides when)
        self.iommu_type: int | None = None
        self.ioas = Ioas(id=0)

    # -- membership (called by the state machine) ---------------------------------------------------
    @property
    def iommu_set(self) -> bool:
        return self.iommu_type is not None

    def attach_group(self, group: object) -> None:
        self.groups.append(group)

    def connect_device(self, name: str, on_attach) -> None:
        """A group's device is opened: its DMA goes through the container's address space."""
        on_attach(self.ioas)

    def disconnect_device(self, link: None) -> None:
        """Nothing to undo: closing the device detached its DMA."""

    def detach_group(self, group: object) -> None:
        self.groups.remove(group)
        if not self.groups:  # "deprivileged": back to no IOMMU, mappings gone
            self.iommu_type = None
            self.ioas.unmap_all()

    # -- ioctls ---------------------------------------------------------------------------------------
    def ioctl(self, request: int, arg: IoctlArg) -> int:
        """vfio_fops_unl_ioctl(): the container's own ioctls, then (once SET_IOMMU chose a
        backend) type1's; before that every other request is ENOTTY."""
        if request in CONTAINER_IOCTLS:
            return CONTAINER_IOCTLS.dispatch(self, request, arg)
        if self.iommu_type is None:
            raise VfioError(errno.ENOTTY, f"ioctl {request:#x} needs an IOMMU type (VFIO_SET_IOMMU)")
        return TYPE1_IOCTLS.dispatch(self, request, arg)

    def _api_version(self, arg: IoctlArg, _: None) -> int:
        return abi.VFIO_API_VERSION

    def _check_extension(self, arg: IoctlArg, _: None) -> int:
        if arg.value == abi.VFIO_DMA_CC_IOMMU and self.iommu_type is None:
            return 0  # type1 answers cache coherency only once it has an iommu (SET_IOMMU)
        return 1 if arg.value in EXTENSIONS else 0

    def _set_iommu(self, arg: IoctlArg, _: None) -> int:
        if not self.groups or self.iommu_type is not None:
            raise VfioError(errno.EINVAL, "SET_IOMMU needs an attached group and no IOMMU set yet")
        if arg.value not in TYPE1_TYPES:
            raise VfioError(errno.ENODEV, f"no IOMMU driver for type {arg.value}")
        self.iommu_type = arg.value
        return 0

    def _get_info(self, arg: IoctlArg, info: abi.vfio_iommu_type1_info) -> int:
        info.flags = abi.VFIO_IOMMU_INFO_PGSIZES | abi.VFIO_IOMMU_INFO_CAPS
        info.iova_pgsizes = IOVA_PGSIZES
        iova_range = abi.vfio_iommu_type1_info_cap_iova_range(
            header=abi.vfio_info_cap_header(id=abi.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, version=1), nr_iovas=1)
        dma_avail = abi.vfio_iommu_type1_info_dma_avail(
            header=abi.vfio_info_cap_header(id=abi.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, version=1),
            avail=DMA_ENTRY_LIMIT - len(self.ioas.mappings))
        caps = [(iova_range, [abi.vfio_iova_range(start=0, end=IOVA_LAST)]), (dma_avail, [])]
        size = ctypes.sizeof(abi.vfio_iommu_type1_info)
        room = min(info.argsz, size)  # what the caller's buffer holds, before argsz may be raised
        place_capabilities(arg.buf, info, caps, size)
        arg.buf.write_struct(info, room)
        return 0

    def _map_dma(self, arg: IoctlArg, cmd: abi.vfio_iommu_type1_dma_map) -> int:
        known = abi.VFIO_DMA_MAP_FLAG_READ | abi.VFIO_DMA_MAP_FLAG_WRITE
        if cmd.flags & ~(known | abi.VFIO_DMA_MAP_FLAG_VADDR):
            raise VfioError(errno.EINVAL, "unknown flags")
        if cmd.flags & abi.VFIO_DMA_MAP_FLAG_VADDR:
            raise VfioError(errno.EINVAL, "VFIO_UPDATE_VADDR is not supported")
        readable = bool(cmd.flags & abi.VFIO_DMA_MAP_FLAG_READ)
        writable = bool(cmd.flags & abi.VFIO_DMA_MAP_FLAG_WRITE)
        mask = PAGE_SIZE - 1
        if not (readable or writable) or not cmd.size or (cmd.size | cmd.iova | cmd.vaddr) & mask:
            raise VfioError(errno.EINVAL, "no READ/WRITE, zero size, or not page-aligned")
        last = cmd.iova + cmd.size - 1
        if last > U64_MAX or cmd.vaddr + cmd.size - 1 > U64_MAX:  # check_add_overflow()
            raise VfioError(errno.EOVERFLOW, "iova + size or vaddr + size overflows")
        if last > IOVA_LAST:
            raise VfioError(errno.EINVAL, "range leaves the IOVA aperture")
        if self.ioas.overlaps(cmd.iova, last):
            raise VfioError(errno.EEXIST, "the range overlaps an existing mapping")
        if len(self.ioas.mappings) >= DMA_ENTRY_LIMIT:
            raise VfioError(errno.ENOSPC, "dma_entry_limit reached")
        self.ioas.pin(arg, cmd.iova, cmd.size, cmd.vaddr, readable, writable)
        return 0

    def _unmap_dma(self, arg: IoctlArg, cmd: abi.vfio_iommu_type1_dma_unmap) -> int:
        known = abi.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP | abi.VFIO_DMA_UNMAP_FLAG_ALL | abi.VFIO_DMA_UNMAP_FLAG_VADDR
        if cmd.flags & ~known:
            raise VfioError(errno.EINVAL, "unknown flags")
        if cmd.flags & (abi.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP | abi.VFIO_DMA_UNMAP_FLAG_VADDR):
            raise VfioError(errno.EINVAL, "dirty tracking and VADDR updates are not supported")
        if cmd.flags & abi.VFIO_DMA_UNMAP_FLAG_ALL:
            if cmd.iova or cmd.size:
                raise VfioError(errno.EINVAL, "UNMAP_ALL takes iova 0 and size 0")
            victims = list(self.ioas.mappings)
        else:
            if not cmd.size or (cmd.iova | cmd.size) & (PAGE_SIZE - 1):
                raise VfioError(errno.EINVAL, "zero size or not page-aligned")
            if cmd.iova + cmd.size - 1 > U64_MAX:
                raise VfioError(errno.EOVERFLOW, "iova + size overflows")
            last = cmd.iova + cmd.size - 1
            first = self.ioas.find(cmd.iova)
            final = self.ioas.find(last)
            if (first is not None and first.iova != cmd.iova) or (final is not None and final.last != last):
                raise VfioError(errno.EINVAL, "the range would split a mapping (type1v2)")
            victims = [m for m in self.ioas.mappings if cmd.iova <= m.iova and m.last <= last]
        for mapping in victims:
            self.ioas.remove(mapping)
        cmd.size = sum(m.length for m in victims)
        arg.buf.write_struct(cmd, offsetofend(abi.vfio_iommu_type1_dma_unmap, "size"))
        return 0


#: vfio_fops_unl_ioctl()'s own cases: plain values, no structure.
CONTAINER_IOCTLS = IoctlTable("the container", [
    Ioctl(abi.VFIO_GET_API_VERSION, Type1Container._api_version, style=Style.RAW),
    Ioctl(abi.VFIO_CHECK_EXTENSION, Type1Container._check_extension, style=Style.RAW),
    Ioctl(abi.VFIO_SET_IOMMU, Type1Container._set_iommu, style=Style.RAW),
])

#: vfio_iommu_type1_ioctl(), reached once SET_IOMMU chose type1.
TYPE1_IOCTLS = IoctlTable("type1", [
    Ioctl(abi.VFIO_IOMMU_GET_INFO, Type1Container._get_info, abi.vfio_iommu_type1_info,
          offsetofend(abi.vfio_iommu_type1_info, "iova_pgsizes"), Style.VFIO),
    Ioctl(abi.VFIO_IOMMU_MAP_DMA, Type1Container._map_dma, abi.vfio_iommu_type1_dma_map,
          offsetofend(abi.vfio_iommu_type1_dma_map, "size"), Style.VFIO),
    Ioctl(abi.VFIO_IOMMU_UNMAP_DMA, Type1Container._unmap_dma, abi.vfio_iommu_type1_dma_unmap,
          offsetofend(abi.vfio_iommu_type1_dma_unmap, "size"), Style.VFIO),
])

__all__ = ["Type1Container", "Mapping"]
