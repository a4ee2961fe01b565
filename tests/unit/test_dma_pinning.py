"""Pinning the caller's memory for a DMA mapping, the one path (``Ioas.pin``) that iommufd's
IOAS_MAP, its VFIO compat MAP_DMA and the type1 container's MAP_DMA share: no identified
caller is EPERM, memory the process does not have is EFAULT and is given back at once, and
a mapping's memory is closed when its last mapping goes."""

from __future__ import annotations

import errno

import pytest

from vfiofs import abi
from vfiofs.core.ioctl import IoctlArg
from vfiofs.core.usermem import UserBuffer
from vfiofs.errors import VfioError
from vfiofs.iommu.iommufd import IommufdContext
from vfiofs.iommu.type1 import Type1Container

PAGE = 4096
RW = abi.VFIO_DMA_MAP_FLAG_READ | abi.VFIO_DMA_MAP_FLAG_WRITE


class Memory:
    def __init__(self, mapped: bool = True) -> None:
        self.mapped, self.closed = mapped, False

    def check_range(self, addr: int, length: int, write: bool) -> None:
        if not self.mapped:
            raise VfioError(errno.EFAULT, "not mapped")

    def close(self) -> None:
        self.closed = True


def type1() -> Type1Container:
    container = Type1Container()
    container.attach_group("group")
    container.ioctl(abi.VFIO_SET_IOMMU, IoctlArg(UserBuffer(None), value=abi.VFIO_TYPE1v2_IOMMU))
    return container


def ioas_map(ctx: IommufdContext) -> tuple[int, abi.iommu_ioas_map]:
    alloc = abi.iommu_ioas_alloc(size=12)
    arg = IoctlArg(UserBuffer(bytes(alloc)))
    ctx.ioctl(abi.IOMMU_IOAS_ALLOC, arg)
    ioas_id = abi.iommu_ioas_alloc.from_buffer_copy(bytes(arg.buf.data)).out_ioas_id
    flags = abi.IOMMU_IOAS_MAP_READABLE | abi.IOMMU_IOAS_MAP_FIXED_IOVA
    return ioas_id, abi.iommu_ioas_map(size=40, flags=flags, ioas_id=ioas_id, user_va=PAGE, length=PAGE, iova=PAGE)


def map_type1(container: Type1Container, process) -> None:
    cmd = abi.vfio_iommu_type1_dma_map(argsz=32, flags=RW, vaddr=PAGE, iova=PAGE, size=PAGE)
    container.ioctl(abi.VFIO_IOMMU_MAP_DMA, IoctlArg(UserBuffer(bytes(cmd)), process=process))


def map_iommufd(ctx: IommufdContext, process) -> None:
    _, cmd = ioas_map(ctx)
    ctx.ioctl(abi.IOMMU_IOAS_MAP, IoctlArg(UserBuffer(bytes(cmd)), process=process))


@pytest.mark.parametrize("new, do_map", [(type1, map_type1), (IommufdContext, map_iommufd)], ids=["type1", "iommufd"])
def test_pinning_rules(new, do_map):
    target = new()
    with pytest.raises(VfioError) as exc:
        do_map(target, None)
    assert exc.value.errno == errno.EPERM
    missing = Memory(mapped=False)
    with pytest.raises(VfioError) as exc:
        do_map(target, lambda: missing)
    assert exc.value.errno == errno.EFAULT and missing.closed  # given back at once
    held = Memory()
    do_map(target, lambda: held)
    assert not held.closed


def test_the_last_group_leaving_a_type1_container_lets_go_of_the_memory():
    container, held = type1(), Memory()
    map_type1(container, lambda: held)
    container.detach_group("group")
    assert held.closed and not container.ioas.mappings and not container.iommu_set


def test_destroying_an_ioas_lets_go_of_the_memory():
    ctx, held = IommufdContext(), Memory()
    ioas_id, cmd = ioas_map(ctx)
    ctx.ioctl(abi.IOMMU_IOAS_MAP, IoctlArg(UserBuffer(bytes(cmd)), process=lambda: held))
    ctx.ioctl(abi.IOMMU_DESTROY, IoctlArg(UserBuffer(bytes(abi.iommu_destroy(size=8, id=ioas_id)))))
    assert held.closed and not ctx.objects


def test_type1_reports_4k_2m_1g_pages():
    info = abi.vfio_iommu_type1_info(argsz=24)
    arg = IoctlArg(UserBuffer(bytes(info)))
    type1().ioctl(abi.VFIO_IOMMU_GET_INFO, arg)
    got = abi.vfio_iommu_type1_info.from_buffer_copy(bytes(arg.buf.data))
    assert got.iova_pgsizes == (1 << 12) | (1 << 21) | (1 << 30)
    assert got.flags & abi.VFIO_IOMMU_INFO_PGSIZES
