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
from typing import Callable

from vfiofs import abi
from vfiofs.errors import VfioError
from vfiofs.iommu.iommufd import IOVA_LAST, PAGE_SIZE, U64_MAX, Ioas, Mapping
from vfiofs.host.procmem import ProcessMemory
from vfiofs.core.usermem import UserBuffer
from vfiofs.core.ioctl import offsetofend, place_capabilities

TYPE1_TYPES = (abi.VFIO_TYPE1_IOMMU, abi.VFIO_TYPE1v2_IOMMU)
EXTENSIONS = {abi.VFIO_TYPE1_IOMMU, abi.VFIO_TYPE1v2_IOMMU, abi.VFIO_UNMAP_ALL, abi.VFIO_DMA_CC_IOMMU}
IOVA_PGSIZES = (1 << 12) | (1 << 21) | (1 << 30)
DMA_ENTRY_LIMIT = 65535  # type1's default dma_entry_limit


class Container:
    """One open of ``vfio/vfio``."""

    def __init__(self) -> None:
        self.groups: list[object] = []  # GroupFile objects attached (the state machine manages this)
        self.iommu_type: int | None = None
        self.ioas = Ioas(id=0)

    # -- membership (called by the state machine) ---------------------------------------------------
    def group_detached(self) -> None:
        if not self.groups:  # "deprivileged": back to no IOMMU, mappings gone
            self.iommu_type = None
            for mapping in list(self.ioas.mappings):
                self.ioas.remove(mapping)

    # -- ioctls ---------------------------------------------------------------------------------------
    def ioctl(self, request: int, arg: UserBuffer, value: int,
              process: Callable[[], ProcessMemory] | None = None) -> int:
        if request == abi.VFIO_GET_API_VERSION:
            return abi.VFIO_API_VERSION
        if request == abi.VFIO_CHECK_EXTENSION:
            return 1 if value in EXTENSIONS else 0
        if request == abi.VFIO_SET_IOMMU:
            if not self.groups or self.iommu_type is not None:
                raise VfioError(errno.EINVAL, "SET_IOMMU needs an attached group and no IOMMU set yet")
            if value not in TYPE1_TYPES:
                raise VfioError(errno.ENODEV, f"no IOMMU driver for type {value}")
            self.iommu_type = value
            return 0
        if self.iommu_type is None:
            raise VfioError(errno.ENOTTY, f"ioctl {request:#x} needs an IOMMU type (VFIO_SET_IOMMU)")
        if request == abi.VFIO_IOMMU_GET_INFO:
            return self._get_info(arg)
        if request == abi.VFIO_IOMMU_MAP_DMA:
            return self._map_dma(arg, process)
        if request == abi.VFIO_IOMMU_UNMAP_DMA:
            return self._unmap_dma(arg)
        raise VfioError(errno.ENOTTY, f"ioctl {request:#x} not supported by type1")

    def _get_info(self, arg: UserBuffer) -> int:
        minsz = offsetofend(abi.vfio_iommu_type1_info, "iova_pgsizes")
        info = arg.read_struct(abi.vfio_iommu_type1_info, minsz)
        if info.argsz < minsz:
            raise VfioError(errno.EINVAL, "argsz smaller than vfio_iommu_type1_info")
        info.flags = abi.VFIO_IOMMU_INFO_PGSIZES | abi.VFIO_IOMMU_INFO_CAPS
        info.iova_pgsizes = IOVA_PGSIZES
        caps = [
            (abi.vfio_info_cap_header(id=abi.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, version=1),
             [(ctypes.c_uint32 * 2)(1, 0), abi.vfio_iova_range(start=0, end=IOVA_LAST)]),
            (abi.vfio_info_cap_header(id=abi.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, version=1),
             [ctypes.c_uint32(DMA_ENTRY_LIMIT - len(self.ioas.mappings))]),
        ]
        size = ctypes.sizeof(abi.vfio_iommu_type1_info)
        room = min(info.argsz, size)  # what the caller's buffer holds, before argsz may be raised
        place_capabilities(arg, info, caps, size)
        arg.write_struct(info, room)
        return 0

    def _map_dma(self, arg: UserBuffer, process: Callable[[], ProcessMemory] | None) -> int:
        minsz = offsetofend(abi.vfio_iommu_type1_dma_map, "size")
        cmd = arg.read_struct(abi.vfio_iommu_type1_dma_map, minsz)
        known = abi.VFIO_DMA_MAP_FLAG_READ | abi.VFIO_DMA_MAP_FLAG_WRITE
        if cmd.argsz < minsz or cmd.flags & ~(known | abi.VFIO_DMA_MAP_FLAG_VADDR):
            raise VfioError(errno.EINVAL, "argsz too small or unknown flags")
        if cmd.flags & abi.VFIO_DMA_MAP_FLAG_VADDR:
            raise VfioError(errno.EINVAL, "VFIO_UPDATE_VADDR is not supported")
        readable, writable = bool(cmd.flags & 1), bool(cmd.flags & 2)
        mask = PAGE_SIZE - 1
        if not (readable or writable) or not cmd.size or (cmd.size | cmd.iova | cmd.vaddr) & mask:
            raise VfioError(errno.EINVAL, "no READ/WRITE, zero size, or not page-aligned")
        last = cmd.iova + cmd.size - 1
        if last > U64_MAX or cmd.vaddr + cmd.size - 1 > U64_MAX or last > IOVA_LAST:
            raise VfioError(errno.EINVAL, "range overflows or leaves the IOVA aperture")
        if self.ioas.overlaps(cmd.iova, last):
            raise VfioError(errno.EEXIST, "the range overlaps an existing mapping")
        if len(self.ioas.mappings) >= DMA_ENTRY_LIMIT:
            raise VfioError(errno.ENOSPC, "dma_entry_limit reached")
        if process is None:
            raise VfioError(errno.EPERM, "the caller's process was not identified (docs/protocol.md §12)")
        memory = process()
        try:
            memory.check_range(cmd.vaddr, cmd.size, write=writable)
        except VfioError:
            memory.close()
            raise
        self.ioas.mappings.append(Mapping(cmd.iova, cmd.size, cmd.vaddr, readable, writable, memory))
        self.ioas.mappings.sort(key=lambda m: m.iova)
        return 0

    def _unmap_dma(self, arg: UserBuffer) -> int:
        minsz = offsetofend(abi.vfio_iommu_type1_dma_unmap, "size")
        cmd = arg.read_struct(abi.vfio_iommu_type1_dma_unmap, minsz)
        known = abi.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP | abi.VFIO_DMA_UNMAP_FLAG_ALL | abi.VFIO_DMA_UNMAP_FLAG_VADDR
        if cmd.argsz < minsz or cmd.flags & ~known:
            raise VfioError(errno.EINVAL, "argsz too small or unknown flags")
        if cmd.flags & (abi.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP | abi.VFIO_DMA_UNMAP_FLAG_VADDR):
            raise VfioError(errno.EINVAL, "dirty tracking and VADDR updates are not supported")
        if cmd.flags & abi.VFIO_DMA_UNMAP_FLAG_ALL:
            if cmd.iova or cmd.size:
                raise VfioError(errno.EINVAL, "UNMAP_ALL takes iova 0 and size 0")
            victims = list(self.ioas.mappings)
        else:
            if not cmd.size or (cmd.iova | cmd.size) & (PAGE_SIZE - 1) or cmd.iova + cmd.size - 1 > U64_MAX:
                raise VfioError(errno.EINVAL, "zero size, not page-aligned, or overflowing")
            last = cmd.iova + cmd.size - 1
            first = self.ioas.find(cmd.iova)
            final = self.ioas.find(last)
            if (first is not None and first.iova != cmd.iova) or (final is not None and final.last != last):
                raise VfioError(errno.EINVAL, "the range would split a mapping (type1v2)")
            victims = [m for m in self.ioas.mappings if cmd.iova <= m.iova and m.last <= last]
        for mapping in victims:
            self.ioas.remove(mapping)
        cmd.size = sum(m.length for m in victims)
        arg.write_struct(cmd, minsz)
        return 0


__all__ = ["Container", "Mapping"]
