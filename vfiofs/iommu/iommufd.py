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
from vfiofs.errors import VfioError
from vfiofs.models.api import DmaFault, DmaPort
from vfiofs.host.procmem import ProcessMemory
from vfiofs.core.usermem import UserBuffer


@dataclass(eq=False)
class IommufdObject:
    id: int = 0


PAGE_SIZE = 4096
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
    memory: ProcessMemory

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

    def dma_port(self, on_fault: Callable[[str], None], on_done: Callable[[str, int, int], None]) -> DmaPort:
        """DmaTarget: a device's DMA through this IOAS."""
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
        self._process: Callable[[], ProcessMemory] | None = None
        self._emsgsize = False

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
    def ioctl(self, request: int, arg: UserBuffer, value: int,
              process: Callable[[], ProcessMemory] | None = None) -> int:
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
        self._process, self._emsgsize = process, False
        try:
            command.execute(self, cmd)
        finally:
            self._process = None
        # iommufd_ucmd_respond(): the whole command goes back, up to the caller's size.
        arg.write_struct(cmd, min(user_size, ctypes.sizeof(cmd)))
        if self._emsgsize:
            raise VfioError(errno.EMSGSIZE, "num_iovas is too small; it now holds the count needed")
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

    def _ioas(self, ioas_id: int) -> Ioas:
        obj = self.objects.get(ioas_id)
        if not isinstance(obj, Ioas):
            raise VfioError(errno.ENOENT, f"no IOAS {ioas_id}")
        return obj

    def _caller_memory(self) -> ProcessMemory:
        if self._process is None:
            raise VfioError(errno.EPERM, "the caller's process was not identified (docs/protocol.md §12)")
        return self._process()

    def _ioas_map(self, cmd: abi.iommu_ioas_map) -> None:
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
        memory = self._caller_memory()
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

    def _ioas_unmap(self, cmd: abi.iommu_ioas_unmap) -> None:
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

    def _ioas_iova_ranges(self, cmd: abi.iommu_ioas_iova_ranges) -> None:
        if getattr(cmd, "__reserved"):
            raise VfioError(errno.EOPNOTSUPP, "reserved field must be 0")
        self._ioas(cmd.ioas_id)
        ranges = [(0, IOVA_LAST)]  # one aperture, no reserved regions
        room, cmd.num_iovas = cmd.num_iovas, len(ranges)
        cmd.out_iova_alignment = PAGE_SIZE
        if room < len(ranges):
            self._emsgsize = True  # the kernel reports the count, then fails
            return
        if ranges:
            memory = self._caller_memory()
            try:
                data = b"".join(struct.pack("<QQ", start, last) for start, last in ranges)
                memory.write(cmd.allowed_iovas, data)
            except OSError:
                raise VfioError(errno.EFAULT, "allowed_iovas is not writable memory of the caller") from None
            finally:
                memory.close()

    def _destroy(self, cmd: abi.iommu_destroy) -> None:
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


_COMMANDS = {
    abi.IOMMUFD_CMD_IOAS_MAP: _Command(abi.IOMMU_IOAS_MAP, abi.iommu_ioas_map, 40, IommufdContext._ioas_map),
    abi.IOMMUFD_CMD_IOAS_UNMAP: _Command(abi.IOMMU_IOAS_UNMAP, abi.iommu_ioas_unmap, 24, IommufdContext._ioas_unmap),
    abi.IOMMUFD_CMD_IOAS_IOVA_RANGES: _Command(
        abi.IOMMU_IOAS_IOVA_RANGES, abi.iommu_ioas_iova_ranges, 32, IommufdContext._ioas_iova_ranges),
    abi.IOMMUFD_CMD_DESTROY: _Command(abi.IOMMU_DESTROY, abi.iommu_destroy, 8, IommufdContext._destroy),
    abi.IOMMUFD_CMD_IOAS_ALLOC: _Command(
        abi.IOMMU_IOAS_ALLOC, abi.iommu_ioas_alloc, 12, IommufdContext._ioas_alloc
    ),
}
