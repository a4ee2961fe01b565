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


def caller_memory(arg: IoctlArg) -> CallerMemory:
    """The memory of the process behind the ioctl; EPERM if the transport could not identify it."""
    if arg.process is None:
        raise VfioError(errno.EPERM, "the caller's process was not identified (docs/protocol.md §12)")
    return arg.process()


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
    #: VFIO_SET_IOMMU(VFIO_TYPE1_IOMMU) through the compat layer (iopt_disable_large_pages):
    #: the compat UNMAP_DMA may then cut mappings and unmap part of one
    split_unmaps: bool = False

    def find(self, iova: int) -> Mapping | None:
        for mapping in self.mappings:
            if mapping.iova <= iova <= mapping.last:
                return mapping
        return None

    def overlaps(self, iova: int, last: int) -> bool:
        return any(m.iova <= last and iova <= m.last for m in self.mappings)

    def cut(self, after: int) -> None:
        """iopt_cut_iova(): make ``after`` the last IOVA of a mapping, splitting the one that
        holds it (both halves keep the same process memory); EINVAL off a page boundary."""
        mapping = self.find(after)
        if mapping is None or mapping.last == after:
            return
        if (after + 1) % PAGE_SIZE:
            raise VfioError(errno.EINVAL, f"cannot cut a mapping at {after + 1:#x}")
        head = after + 1 - mapping.iova
        tail = Mapping(after + 1, mapping.length - head, mapping.user_va + head, mapping.readable,
                       mapping.writable, mapping.memory)
        mapping.length = head
        self.mappings.insert(self.mappings.index(mapping) + 1, tail)

    def pin(self, arg: IoctlArg, iova: int, length: int, user_va: int, readable: bool, writable: bool) -> None:
        """Map the caller's [user_va, +length) at [iova, +length) (the range checks done):
        EPERM if the caller is unknown, EFAULT unless its process has that memory."""
        memory = caller_memory(arg)
        try:
            memory.check_range(user_va, length, write=writable)
        except VfioError:
            memory.close()
            raise
        self.mappings.append(Mapping(iova, length, user_va, readable, writable, memory))
        self.mappings.sort(key=lambda m: m.iova)

    def remove(self, mapping: Mapping) -> None:
        self.mappings.remove(mapping)
        if not any(m.memory is mapping.memory for m in self.mappings):
            mapping.memory.close()

    def unmap_all(self) -> int:
        """Remove every mapping; the bytes unmapped."""
        unmapped = sum(m.length for m in self.mappings)
        for mapping in list(self.mappings):
            self.remove(mapping)
        return unmapped

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
        #: the IOAS the VFIO compatibility ioctls act on (``ictx->vfio_ioas``): created when
        #: a group is attached to this context with VFIO_GROUP_SET_CONTAINER
        self.vfio_ioas: Ioas | None = None
        #: the context as a legacy container (what VFIO_GROUP_SET_CONTAINER attaches a group to)
        self.vfio_compat = VfioCompat(self)
        #: the iommu file was closed; bound devices and attached groups still hold the context
        #: (in the kernel they hold a reference on the file, so iommufd_fops_release waits for them)
        self.closed = False
        self.groups = 0  # groups attached through the compat layer

    def release(self) -> None:
        """The iommu file was closed: once no device and no group holds the context any more,
        destroy every object, as iommufd_fops_release does — mappings let go of the process
        memory they hold (its /proc/PID/mem and pidfd)."""
        self.closed = True
        self._destroy_if_unused()

    def _destroy_if_unused(self) -> None:
        if not self.closed or self.groups or any(isinstance(o, DeviceObject) for o in self.objects.values()):
            return
        for obj in list(self.objects.values()):
            if isinstance(obj, Ioas):
                obj.unmap_all()
        self.objects.clear()
        self.vfio_ioas = None

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
        if obj is self.vfio_ioas:  # destroying the compat IOAS leaves the context without one
            self.vfio_ioas = None

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

    def _ioas_alloc(self, arg: IoctlArg, cmd: abi.iommu_ioas_alloc) -> None:
        if cmd.flags:
            raise VfioError(errno.EOPNOTSUPP, "IOAS_ALLOC flags must be 0")
        cmd.out_ioas_id = self._add(Ioas()).id

    def _ioas(self, ioas_id: int) -> Ioas:
        obj = self.objects.get(ioas_id)
        if not isinstance(obj, Ioas):
            raise VfioError(errno.ENOENT, f"no IOAS {ioas_id}")
        return obj

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
        fixed = bool(cmd.flags & abi.IOMMU_IOAS_MAP_FIXED_IOVA)
        cmd.iova = self._map_user(arg, ioas, cmd.user_va, cmd.length, cmd.iova if fixed else None, readable, writable)

    def _map_user(self, arg: IoctlArg, ioas: Ioas, user_va: int, length: int, iova: int | None,
                  readable: bool, writable: bool) -> int:
        """iopt_map_user_pages(): map the caller's [user_va, +length) at ``iova`` (None: choose)."""
        if length == 0 or length % PAGE_SIZE or user_va % PAGE_SIZE:
            raise VfioError(errno.EINVAL, "length and user_va must be page-aligned and non-zero")
        if user_va + length - 1 > U64_MAX:
            raise VfioError(errno.EOVERFLOW, "user_va + length overflows")
        if iova is not None:  # iopt_check_iova()
            if iova % PAGE_SIZE:
                raise VfioError(errno.EINVAL, "iova must be page-aligned")
            if iova + length - 1 > U64_MAX:
                raise VfioError(errno.EOVERFLOW, "iova + length overflows")
            if iova + length - 1 > IOVA_LAST:
                raise VfioError(errno.EINVAL, f"iova range beyond the aperture (last {IOVA_LAST:#x})")
            if ioas.overlaps(iova, iova + length - 1):
                raise VfioError(errno.EEXIST, "the range overlaps an existing mapping")
        else:
            iova = self._allocate_iova(ioas, length)
        ioas.pin(arg, iova, length, user_va, readable, writable)
        return iova

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
            cmd.length = ioas.unmap_all()
            return
        if cmd.iova >= U64_MAX or cmd.length >= U64_MAX:
            raise VfioError(errno.EOVERFLOW, "iova or length too large")
        cmd.length = self._unmap_range(ioas, cmd.iova, cmd.length)

    @staticmethod
    def _unmap_range(ioas: Ioas, iova: int, length: int) -> int:
        """iopt_unmap_iova(): whole mappings inside [iova, +length); the bytes unmapped."""
        if length == 0:
            raise VfioError(errno.EINVAL, "length must not be 0")
        last = iova + length - 1
        if last > U64_MAX:
            raise VfioError(errno.EOVERFLOW, "iova + length overflows")
        touched = [m for m in ioas.mappings if m.iova <= last and iova <= m.last]
        if not touched:
            raise VfioError(errno.ENOENT, "nothing is mapped there")
        if any(m.iova < iova or m.last > last for m in touched):
            raise VfioError(errno.ENOENT, "the range splits a mapping: unmap whole mappings")
        for mapping in touched:
            ioas.remove(mapping)
        return sum(m.length for m in touched)

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
            memory = caller_memory(arg)
            try:
                data = b"".join(struct.pack("<QQ", start, last) for start, last in ranges)
                memory.check_range(cmd.allowed_iovas, len(data), write=True)
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
            obj.unmap_all()
        self._remove(obj)

    # -- devices (called by the state machine) -----------------------------------------------
    def bind_device(self, name: str, on_attach: Callable[[Ioas | None], None] = lambda ioas: None) -> DeviceObject:
        obj = self._add(DeviceObject(name=name, on_attach=on_attach))
        assert isinstance(obj, DeviceObject)
        return obj

    def unbind_device(self, dev: DeviceObject) -> None:
        self.detach(dev)
        self._remove(dev)
        self._destroy_if_unused()

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


# -- the VFIO compatibility container (drivers/iommu/iommufd/vfio_compat.c) ----------------------------

#: the page sizes of an emulated IOMMU domain (4 KiB, 2 MiB, 1 GiB), as type1 reports them;
#: the compat layer with no domain reports "any multiple of PAGE_SIZE" (iommufd_get_pagesizes)
IOVA_PGSIZES = (1 << 12) | (1 << 21) | (1 << 30)
_NO_DOMAIN_PGSIZES = U64_MAX & ~(PAGE_SIZE - 1)
_U32_MAX = (1 << 32) - 1


class VfioCompat:
    """iommufd_vfio_ioctl(): /dev/iommu answering the legacy container ioctls on the
    context's compat IOAS, and the context as a group's container (IommuContainer)."""

    def __init__(self, ctx: "IommufdContext") -> None:
        self.ctx = ctx

    def ioas(self) -> Ioas:
        """get_compat_ioas(): ENODEV until a group is attached (or after it was destroyed)."""
        if self.ctx.vfio_ioas is None:
            raise VfioError(errno.ENODEV, "no compat IOAS: attach a group with VFIO_GROUP_SET_CONTAINER first")
        return self.ctx.vfio_ioas

    # -- as a group's container (the state machine calls these) -----------------------------------
    @property
    def iommu_set(self) -> bool:
        """A group attached to an iommufd may hand out devices at once: no SET_IOMMU needed."""
        return True

    def attach_group(self, group: object) -> None:
        """iommufd_vfio_compat_ioas_create(): the first group creates the compat IOAS (an
        ordinary IOAS object of the context); an existing one is kept."""
        if self.ctx.vfio_ioas is None:
            ioas = self.ctx._add(Ioas())
            assert isinstance(ioas, Ioas)
            self.ctx.vfio_ioas = ioas
        self.ctx.groups += 1

    def detach_group(self, group: object) -> None:
        """The group lets go of the context; the compat IOAS and its mappings stay (until the
        context itself goes: its file closed and nothing else holds it)."""
        self.ctx.groups -= 1
        self.ctx._destroy_if_unused()

    def connect_device(self, name: str, on_attach: Callable[[Ioas | None], None]) -> "DeviceObject":
        """vfio_df_iommufd_bind() for a group's device: bind it to the context and attach it
        to the compat IOAS (through an automatic HWPT); the legacy path reports neither id."""
        dev = self.ctx.bind_device(name, on_attach)
        try:
            self.ctx.attach(dev, self.ioas().id)
        except VfioError:
            self.ctx.unbind_device(dev)
            raise
        return dev

    def disconnect_device(self, dev: "DeviceObject") -> None:
        self.ctx.unbind_device(dev)

    # -- the container ioctls ----------------------------------------------------------------------
    def _api_version(self, arg: IoctlArg, _: None) -> int:
        return abi.VFIO_API_VERSION

    def _check_extension(self, arg: IoctlArg, _: None) -> int:
        if arg.value in (abi.VFIO_TYPE1_IOMMU, abi.VFIO_TYPE1v2_IOMMU, abi.VFIO_UNMAP_ALL):
            return 1
        if arg.value == abi.VFIO_DMA_CC_IOMMU:  # needs the compat IOAS; every emulated domain is coherent
            self.ioas()
            return 1
        return 0  # VFIO_UPDATE_VADDR, the nesting type, and VFIO_NOIOMMU_IOMMU (no noiommu here)

    def _set_iommu(self, arg: IoctlArg, _: None) -> int:
        """Any number of times, even with mappings; TYPE1 lets UNMAP_DMA cut mappings."""
        if arg.value not in (abi.VFIO_TYPE1_IOMMU, abi.VFIO_TYPE1v2_IOMMU):
            raise VfioError(errno.EINVAL, f"IOMMU type {arg.value} is not type1/type1v2")
        ioas = self.ioas()
        if arg.value == abi.VFIO_TYPE1_IOMMU:
            ioas.split_unmaps = True
        return 0

    def _get_info(self, arg: IoctlArg, info: abi.vfio_iommu_type1_info) -> int:
        """Two capabilities, DMA_AVAIL (U32_MAX) then IOVA_RANGE, each written only if it fits;
        ``argsz`` always comes back as the size of the whole chain."""
        room = min(info.argsz, ctypes.sizeof(info))
        ioas = self.ioas()
        info.flags = abi.VFIO_IOMMU_INFO_PGSIZES | abi.VFIO_IOMMU_INFO_CAPS
        info.iova_pgsizes = IOVA_PGSIZES if ioas.hwpts else _NO_DOMAIN_PGSIZES
        info.cap_offset = 0
        ranges = [abi.vfio_iova_range(start=0, end=IOVA_LAST)]
        dma_avail = bytes(abi.vfio_iommu_type1_info_dma_avail(
            header=abi.vfio_info_cap_header(id=abi.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, version=1), avail=_U32_MAX))
        iova = bytes(abi.vfio_iommu_type1_info_cap_iova_range(
            header=abi.vfio_info_cap_header(id=abi.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, version=1),
            nr_iovas=len(ranges))) + b"".join(bytes(r) for r in ranges)
        total, last = ctypes.sizeof(info), None
        for cap in (dma_avail, iova):
            if info.argsz - total >= len(cap):
                arg.buf.copy_to(total, cap)
            if last is not None and info.argsz >= total:
                arg.buf.copy_to(last + 4, total.to_bytes(4, "little"))  # the previous cap's next
            last, total = total, total + (len(cap) + 7) // 8 * 8
        if info.argsz >= total:
            info.cap_offset = ctypes.sizeof(info)
        info.argsz = total
        arg.buf.write_struct(info, room)
        return 0

    def _map_dma(self, arg: IoctlArg, cmd: abi.vfio_iommu_type1_dma_map) -> int:
        if cmd.flags & ~(abi.VFIO_DMA_MAP_FLAG_READ | abi.VFIO_DMA_MAP_FLAG_WRITE):
            raise VfioError(errno.EINVAL, "unknown flags")
        ioas = self.ioas()
        self.ctx._map_user(arg, ioas, cmd.vaddr, cmd.size, cmd.iova, bool(cmd.flags & abi.VFIO_DMA_MAP_FLAG_READ),
                           bool(cmd.flags & abi.VFIO_DMA_MAP_FLAG_WRITE))
        return 0

    def _unmap_dma(self, arg: IoctlArg, cmd: abi.vfio_iommu_type1_dma_unmap) -> int:
        """``size`` is written back with the bytes unmapped, also when the unmap itself fails."""
        if cmd.flags & ~abi.VFIO_DMA_UNMAP_FLAG_ALL:
            raise VfioError(errno.EINVAL, "unknown flags")
        ioas = self.ioas()
        minsz = offsetofend(abi.vfio_iommu_type1_dma_unmap, "size")
        if cmd.flags & abi.VFIO_DMA_UNMAP_FLAG_ALL:
            if cmd.iova or cmd.size:
                raise VfioError(errno.EINVAL, "UNMAP_ALL takes iova 0 and size 0")
            cmd.size = ioas.unmap_all()
            arg.buf.write_struct(cmd, minsz)
            return 0
        if ioas.split_unmaps:  # type1: cut at both ends first (the end wraps like an unsigned long)
            ioas.cut((cmd.iova + cmd.size - 1) & U64_MAX)
            if cmd.iova:
                ioas.cut(cmd.iova - 1)
        try:
            unmapped = self.ctx._unmap_range(ioas, cmd.iova, cmd.size)
        except VfioError:
            cmd.size = 0
            arg.buf.write_struct(cmd, minsz)
            raise
        cmd.size = unmapped
        arg.buf.write_struct(cmd, minsz)
        return 0


def _compat(handler: Callable) -> Callable:
    """A compat row's handler, run on the context's VfioCompat."""
    return lambda ctx, arg, cmd: handler(ctx.vfio_compat, arg, cmd)


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

#: iommufd_vfio_ioctl(): the legacy container ioctls /dev/iommu also answers (anything else,
#: VFIO_IOMMU_DIRTY_PAGES included, is ENOTTY).
VFIO_COMPAT_IOCTLS = IoctlTable("iommufd's VFIO compatibility", [
    Ioctl(abi.VFIO_GET_API_VERSION, _compat(VfioCompat._api_version), style=Style.RAW),
    Ioctl(abi.VFIO_CHECK_EXTENSION, _compat(VfioCompat._check_extension), style=Style.RAW),
    Ioctl(abi.VFIO_SET_IOMMU, _compat(VfioCompat._set_iommu), style=Style.RAW),
    Ioctl(abi.VFIO_IOMMU_GET_INFO, _compat(VfioCompat._get_info), abi.vfio_iommu_type1_info,
          offsetofend(abi.vfio_iommu_type1_info, "iova_pgsizes"), Style.VFIO),
    Ioctl(abi.VFIO_IOMMU_MAP_DMA, _compat(VfioCompat._map_dma), abi.vfio_iommu_type1_dma_map,
          offsetofend(abi.vfio_iommu_type1_dma_map, "size"), Style.VFIO),
    Ioctl(abi.VFIO_IOMMU_UNMAP_DMA, _compat(VfioCompat._unmap_dma), abi.vfio_iommu_type1_dma_unmap,
          offsetofend(abi.vfio_iommu_type1_dma_unmap, "size"), Style.VFIO),
])
