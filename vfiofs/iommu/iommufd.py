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

import errno
import struct
from dataclasses import dataclass, field
from typing import Callable

from vfiofs import abi
from vfiofs.abi import PAGE_SIZE
from vfiofs.core.ioctl import Ioctl, IoctlArg, IoctlTable, RespondThenFail, Style, offsetofend
from vfiofs.core.ops import CallerMemory
from vfiofs.errors import VfioError
from vfiofs.models.api import DmaFault, DmaPort


@dataclass(eq=False)
class IommufdObject:
    id: int = 0


IOVA_LAST = (1 << 48) - 1  # the aperture of the emulated IOMMU: 48-bit IOVAs
U64_MAX = (1 << 64) - 1
_MAP_FLAGS = abi.IOMMU_IOAS_MAP_FIXED_IOVA | abi.IOMMU_IOAS_MAP_WRITEABLE | abi.IOMMU_IOAS_MAP_READABLE


@dataclass(eq=False)
class Mapping:
    """IOVA [iova, iova+length) → process memory [user_va, user_va+length)."""

    iova: int
    length: int
    user_va: int
    readable: bool
    writable: bool
    memory: CallerMemory

    @property
    def last(self) -> int:
        return self.iova + self.length - 1


@dataclass(eq=False)
class Ioas(IommufdObject):
    """An I/O address space: what device DMA sees."""

    hwpts: list["HwptPaging"] = field(default_factory=list)
    mappings: list[Mapping] = field(default_factory=list)  # sorted by iova, never overlapping

    def find(self, iova: int) -> Mapping | None:
        for mapping in self.mappings:
            if mapping.iova <= iova <= mapping.last:
                return mapping
        return None

    def overlaps(self, iova: int, last: int) -> bool:
        return any(m.iova <= last and iova <= m.last for m in self.mappings)

    def remove(self, mapping: Mapping) -> None:
        self.mappings.remove(mapping)
        if not any(m.memory is mapping.memory for m in self.mappings):
            mapping.memory.close()

    def dma_port(self, on_fault: Callable[[str], None],
                 on_done: Callable[[str, int, int], None]) -> "IoasDma":
        """A device's DMA through this IOAS (the core's DmaTarget): faults and transfers are reported."""
        return IoasDma(self, on_fault, on_done)


class IoasDma(DmaPort):
    """A device's DMA through an IOAS: each access is checked against the mappings, page by page."""

    def __init__(self, ioas: Ioas, trace: Callable[[str], None],
                 done: Callable[[str, int, int], None] = lambda kind, iova, size: None) -> None:
        self.ioas = ioas
        self.trace = trace  # faults
        self.done = done  # transfers that happened

    def _pieces(self, iova: int, size: int, write: bool) -> list[tuple[Mapping, int, int]]:
        pieces, cursor, end = [], iova, iova + size
        while cursor < end:
            mapping = self.ioas.find(cursor)
            if mapping is None:
                raise self._fault(iova, size, f"IOVA {cursor:#x} is not mapped")
            if write and not mapping.writable:
                raise self._fault(iova, size, f"IOVA {cursor:#x} is mapped read-only")
            if not write and not mapping.readable:
                raise self._fault(iova, size, f"IOVA {cursor:#x} is mapped write-only")
            n = min(end, mapping.last + 1) - cursor
            pieces.append((mapping, mapping.user_va + (cursor - mapping.iova), n))
            cursor += n
        return pieces

    def _fault(self, iova: int, size: int, reason: str) -> DmaFault:
        fault = DmaFault(iova, size, reason)
        self.trace(str(fault))
        return fault

    def read(self, iova: int, size: int) -> bytes:
        pieces = self._pieces(iova, size, write=False)
        try:
            if len(pieces) == 1:
                mapping, addr, n = pieces[0]
                data = mapping.memory.read(addr, n)
            else:
                data = b"".join(mapping.memory.read(addr, n) for mapping, addr, n in pieces)
        except OSError as exc:
            raise self._fault(iova, size, f"the process's memory is not accessible ({exc.strerror})") from None
        self.done("read", iova, size)
        return data

    def write(self, iova: int, data: bytes) -> None:
        """All pieces are checked against the mappings first; the process's own page
        protections are enforced by the kernel on each piece."""
        done = 0
        for mapping, addr, n in self._pieces(iova, len(data), write=True):
            try:
                mapping.memory.write(addr, data[done : done + n])
            except OSError as exc:
                raise self._fault(iova, len(data), f"the process's memory is not writable ({exc.strerror})") from None
            done += n
        self.done("write", iova, len(data))


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
    #: told which IOAS the device's DMA now goes through (None: detached)
    on_attach: Callable[[Ioas | None], None] = lambda ioas: None

    @property
    def ioas_id(self) -> int | None:
        return self.hwpt.ioas.id if self.hwpt is not None and self.hwpt.ioas is not None else None


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
    def ioctl(self, request: int, arg: IoctlArg) -> int:
        """iommufd_fops_ioctl(): numbers outside the command range go to the VFIO compatibility
        table; inside it, get_user(size) comes before the command lookup (a NULL argument is
        EFAULT even for an unknown command), then the row's prologue and handler."""
        nr = request & 0xFF
        if (request >> 8) & 0xFF != abi.IOMMUFD_TYPE or not abi.IOMMUFD_CMD_BASE <= nr < _TABLE_END:
            return VFIO_COMPAT_IOCTLS.dispatch(self, request, arg)
        arg.buf.get_u32(0)  # get_user(size): EFAULT comes before the command lookup
        return IOMMUFD_IOCTLS.dispatch(self, request, arg)

    def _api_version(self, arg: IoctlArg, _: None) -> int:
        return abi.VFIO_API_VERSION

    def _ioas_alloc(self, arg: IoctlArg, cmd: abi.iommu_ioas_alloc) -> None:
        if cmd.flags:
            raise VfioError(errno.EOPNOTSUPP, "IOAS_ALLOC flags must be 0")
        cmd.out_ioas_id = self._add(Ioas()).id

    def _ioas(self, ioas_id: int) -> Ioas:
        obj = self.objects.get(ioas_id)
        if not isinstance(obj, Ioas):
            raise VfioError(errno.ENOENT, f"no IOAS {ioas_id}")
        return obj

    @staticmethod
    def _caller_memory(arg: IoctlArg) -> CallerMemory:
        if arg.process is None:
            raise VfioError(errno.EPERM, "the caller's process was not identified (docs/protocol.md §12)")
        return arg.process()

    def _ioas_map(self, arg: IoctlArg, cmd: abi.iommu_ioas_map) -> None:
        """iommufd_ioas_map(): checks in the kernel's order, then pins the range to the caller."""
        if cmd.flags & ~_MAP_FLAGS or getattr(cmd, "__reserved"):
            raise VfioError(errno.EOPNOTSUPP, "unknown IOAS_MAP flags or reserved bits")
        if cmd.iova >= U64_MAX or cmd.length >= U64_MAX:
            raise VfioError(errno.EOVERFLOW, "iova or length too large")
        readable = bool(cmd.flags & abi.IOMMU_IOAS_MAP_READABLE)
        writable = bool(cmd.flags & abi.IOMMU_IOAS_MAP_WRITEABLE)
        if not (readable or writable):
            raise VfioError(errno.EINVAL, "a mapping must be READABLE, WRITEABLE or both")
        ioas = self._ioas(cmd.ioas_id)
        if cmd.length == 0 or cmd.length % PAGE_SIZE or cmd.user_va % PAGE_SIZE:
            raise VfioError(errno.EINVAL, "length and user_va must be page-aligned and non-zero")
        if cmd.user_va + cmd.length - 1 > U64_MAX:
            raise VfioError(errno.EOVERFLOW, "user_va + length overflows")
        if cmd.flags & abi.IOMMU_IOAS_MAP_FIXED_IOVA:
            iova = cmd.iova
            if iova % PAGE_SIZE:
                raise VfioError(errno.EINVAL, "iova must be page-aligned")
            if iova + cmd.length - 1 > U64_MAX:
                raise VfioError(errno.EOVERFLOW, "iova + length overflows")
            if iova + cmd.length - 1 > IOVA_LAST:
                raise VfioError(errno.EINVAL, f"iova range beyond the aperture (last {IOVA_LAST:#x})")
            if ioas.overlaps(iova, iova + cmd.length - 1):
                raise VfioError(errno.EEXIST, "the range overlaps an existing mapping")
        else:
            iova = self._allocate_iova(ioas, cmd.length)
        memory = self._caller_memory(arg)
        try:
            memory.check_range(cmd.user_va, cmd.length, write=writable)
        except VfioError:
            memory.close()
            raise
        ioas.mappings.append(Mapping(iova, cmd.length, cmd.user_va, readable, writable, memory))
        ioas.mappings.sort(key=lambda m: m.iova)
        cmd.iova = iova

    def _allocate_iova(self, ioas: Ioas, length: int) -> int:
        """Lowest free IOVA (never 0), aligned like the kernel's allocator (up to 2 MiB)."""
        align = min(1 << (length - 1).bit_length(), 2 << 20)
        align = max(align, PAGE_SIZE)
        candidate = align
        for mapping in ioas.mappings:
            if candidate + length - 1 < mapping.iova:
                break
            if mapping.last >= candidate:
                candidate = (mapping.last + 1 + align - 1) // align * align
        if candidate + length - 1 > IOVA_LAST:
            raise VfioError(errno.ENOSPC, "no free IOVA range of that size")
        return candidate

    def _ioas_unmap(self, arg: IoctlArg, cmd: abi.iommu_ioas_unmap) -> None:
        ioas = self._ioas(cmd.ioas_id)
        if cmd.iova == 0 and cmd.length == U64_MAX:  # unmap everything
            unmapped = sum(m.length for m in ioas.mappings)
            for mapping in list(ioas.mappings):
                ioas.remove(mapping)
            cmd.length = unmapped
            return
        if cmd.iova >= U64_MAX or cmd.length >= U64_MAX:
            raise VfioError(errno.EOVERFLOW, "iova or length too large")
        if cmd.length == 0:
            raise VfioError(errno.EINVAL, "length must not be 0")
        last = cmd.iova + cmd.length - 1
        if last > U64_MAX:
            raise VfioError(errno.EOVERFLOW, "iova + length overflows")
        touched = [m for m in ioas.mappings if m.iova <= last and cmd.iova <= m.last]
        if not touched:
            raise VfioError(errno.ENOENT, "nothing is mapped there")
        if any(m.iova < cmd.iova or m.last > last for m in touched):
            raise VfioError(errno.ENOENT, "the range splits a mapping: unmap whole mappings")
        for mapping in touched:
            ioas.remove(mapping)
        cmd.length = sum(m.length for m in touched)

    def _ioas_iova_ranges(self, arg: IoctlArg, cmd: abi.iommu_ioas_iova_ranges) -> None:
        if getattr(cmd, "__reserved"):
            raise VfioError(errno.EOPNOTSUPP, "reserved field must be 0")
        self._ioas(cmd.ioas_id)
        ranges = [(0, IOVA_LAST)]  # one aperture, no reserved regions
        room, cmd.num_iovas = cmd.num_iovas, len(ranges)
        cmd.out_iova_alignment = PAGE_SIZE
        if room < len(ranges):  # the kernel reports the count, then fails
            raise RespondThenFail(errno.EMSGSIZE, "num_iovas is too small; it now holds the count needed")
        if ranges:
            memory = self._caller_memory(arg)
            try:
                data = b"".join(struct.pack("<QQ", start, last) for start, last in ranges)
                memory.write(cmd.allowed_iovas, data)
            except OSError:
                raise VfioError(errno.EFAULT, "allowed_iovas is not writable memory of the caller") from None
            finally:
                memory.close()

    def _destroy(self, arg: IoctlArg, cmd: abi.iommu_destroy) -> None:
        obj = self.objects.get(cmd.id)
        if obj is None:
            raise VfioError(errno.ENOENT, f"no object {cmd.id}")
        if self._busy(obj):
            raise VfioError(errno.EBUSY, f"object {cmd.id} is in use")
        if isinstance(obj, Ioas):
            for mapping in list(obj.mappings):
                obj.remove(mapping)
        self._remove(obj)

    # -- devices (called by the state machine) -----------------------------------------------
    def bind_device(self, name: str, on_attach: Callable[[Ioas | None], None] = lambda ioas: None) -> DeviceObject:
        obj = self._add(DeviceObject(name=name, on_attach=on_attach))
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
            dev.on_attach(hwpt.ioas)
        return hwpt.id

    def detach(self, dev: DeviceObject) -> None:
        """Detach ``dev``; a no-op when it is not attached. Auto HWPTs die with their last device."""
        hwpt, dev.hwpt = dev.hwpt, None
        if hwpt is None:
            return
        dev.on_attach(None)
        hwpt.devices.discard(dev)
        if not hwpt.devices and hwpt.ioas is not None:
            hwpt.ioas.hwpts.remove(hwpt)
            self._remove(hwpt)


def _iommufd_row(request: int, handler: Callable, struct_type: type, last_field: str) -> Ioctl:
    return Ioctl(request, handler, struct_type, offsetofend(struct_type, last_field), Style.IOMMUFD)


IOMMUFD_IOCTLS = IoctlTable("iommufd", [
    _iommufd_row(abi.IOMMU_DESTROY, IommufdContext._destroy, abi.iommu_destroy, "id"),
    _iommufd_row(abi.IOMMU_IOAS_ALLOC, IommufdContext._ioas_alloc, abi.iommu_ioas_alloc, "out_ioas_id"),
    _iommufd_row(abi.IOMMU_IOAS_IOVA_RANGES, IommufdContext._ioas_iova_ranges, abi.iommu_ioas_iova_ranges,
                 "out_iova_alignment"),
    _iommufd_row(abi.IOMMU_IOAS_MAP, IommufdContext._ioas_map, abi.iommu_ioas_map, "iova"),
    _iommufd_row(abi.IOMMU_IOAS_UNMAP, IommufdContext._ioas_unmap, abi.iommu_ioas_unmap, "length"),
])

#: iommufd_vfio_ioctl(): the legacy container ioctls /dev/iommu also answers.
VFIO_COMPAT_IOCTLS = IoctlTable("iommufd's VFIO compatibility", [
    Ioctl(abi.VFIO_GET_API_VERSION, IommufdContext._api_version, style=Style.RAW),
])
