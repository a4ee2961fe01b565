"""Through a real mount: the iommu node as a legacy container (iommufd's VFIO compatibility).

The kernel's ``iommufd_compat_type1``/``_type1v2`` modes: ``/dev/iommu`` opened where
``/dev/vfio/vfio`` would be, a group attached to it with VFIO_GROUP_SET_CONTAINER, and the
container ioctls answered on the compat IOAS (drivers/iommu/iommufd/vfio_compat.c).
Definitions: two RAM devices sharing IOMMU group 7 and the DMA test device alone in its group.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import secrets
import struct

import pytest

from support import errno_of, run_dma
from vfiofs import client as vc
from vfiofs.client import IommuFd, VfioContainer, VfioGroup, ioctl

RAM = 'model = "ram"\niommu_group = 7\n[ram]\nsize = "64KiB"\n'
BDF = ["0000:00:01.0", "0000:00:02.0", "0000:00:03.0"]
PAGE = 4096
TOP = (1 << 64) - PAGE
VIABLE, CONTAINER_SET = vc.VFIO_GROUP_FLAGS_VIABLE, vc.VFIO_GROUP_FLAGS_CONTAINER_SET


def group_number(mount, bdf: str) -> int:
    return int(os.path.basename(os.readlink(mount.node(f"sys/bus/pci/devices/{bdf}/iommu_group"))))


def address(buf) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def test_compat_ioctls_before_a_group(legacy):
    """The kernel's order: the compat IOAS exists only once a group is attached; until then
    everything that needs it is ENODEV (after its own argument checks)."""
    with VfioContainer(legacy.iommu) as compat:
        assert ioctl(compat.fd, vc.VFIO_GET_API_VERSION) == vc.VFIO_API_VERSION
        assert compat.check_extension(vc.VFIO_TYPE1_IOMMU) == 1
        assert compat.check_extension(vc.VFIO_TYPE1v2_IOMMU) == 1
        assert compat.check_extension(vc.VFIO_UNMAP_ALL) == 1
        assert compat.check_extension(vc.VFIO_NOIOMMU_IOMMU) == 0
        assert compat.check_extension(vc.VFIO_SPAPR_TCE_IOMMU) == 0
        assert errno_of(compat.check_extension, vc.VFIO_DMA_CC_IOMMU) == errno.ENODEV
        assert errno_of(compat.set_iommu, vc.VFIO_SPAPR_TCE_IOMMU) == errno.EINVAL
        assert errno_of(compat.set_iommu, vc.VFIO_TYPE1v2_IOMMU) == errno.ENODEV
        assert errno_of(compat.get_info) == errno.ENODEV
        assert errno_of(ioctl, compat.fd, vc.VFIO_IOMMU_GET_INFO, vc.vfio_iommu_type1_info(argsz=15)) == errno.EINVAL
        assert errno_of(compat.map_dma, 0x10000, 0, PAGE) == errno.ENODEV
        assert errno_of(compat.unmap_dma, 0, PAGE) == errno.ENODEV
        assert errno_of(ioctl, compat.fd, 0x3B75, bytes(24)) == errno.ENOTTY  # VFIO_IOMMU_DIRTY_PAGES


@pytest.mark.parametrize("iommu_type", [vc.VFIO_TYPE1_IOMMU, vc.VFIO_TYPE1v2_IOMMU], ids=["type1", "type1v2"])
def test_compat_sequence_with_dma(legacy, iommu_type):
    """The selftests' iommufd_compat_type1[v2] mode, call by call, then DMA through the device."""
    with VfioContainer(legacy.iommu) as compat, VfioGroup(legacy.node(f"vfio/{group_number(legacy, BDF[2])}")) as group:
        assert ioctl(compat.fd, vc.VFIO_GET_API_VERSION) == 0
        assert group.get_status() == VIABLE
        group.set_container(compat.fd)  # an int * pointing at the iommufd
        assert group.get_status() == VIABLE | CONTAINER_SET
        assert errno_of(group.set_container, compat.fd) == errno.EINVAL  # already set
        assert compat.check_extension(iommu_type) > 0
        assert compat.check_extension(vc.VFIO_DMA_CC_IOMMU) == 1  # the compat IOAS exists now
        compat.set_iommu(iommu_type)
        compat.set_iommu(iommu_type)  # the selftests ignore the result; the kernel allows it again
        info = compat.get_info()  # the argsz dance: 24 bytes first, then what it asked for
        argsz, flags, pgsizes, cap_offset = struct.unpack_from("<IIQI", info)
        assert (argsz, flags, cap_offset) == (72, vc.VFIO_IOMMU_INFO_PGSIZES | vc.VFIO_IOMMU_INFO_CAPS, 24)
        assert pgsizes == (1 << 64) - PAGE  # no device attached yet: any multiple of the page size
        assert struct.unpack_from("<HHII", info, 24) == (vc.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, 1, 40, (1 << 32) - 1)
        assert struct.unpack_from("<HHIII", info, 40) == (vc.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, 1, 0, 1, 0)
        first, last = struct.unpack_from("<QQ", info, 56)
        assert (first, last) == (0, (1 << 48) - 1)
        # the device: no SET_IOMMU was needed; it does DMA through the compat IOAS
        dev = group.get_device(BDF[2])
        assert dev.get_info().num_regions == 9
        buf = mmap.mmap(-1, 2 * PAGE)
        pattern = secrets.token_bytes(PAGE)
        buf[:PAGE] = pattern
        compat.map_buffer(buf, iova=0x200000)
        assert run_dma(dev, 1, 0x200000, PAGE) == 0
        assert dev.read(2, 0, PAGE) == pattern
        dev.write(2, 0, b"written by the device")
        assert run_dma(dev, 2, 0x200000 + PAGE, 21) == 0
        assert buf[PAGE : PAGE + 21] == b"written by the device"
        pgsizes = struct.unpack_from("<IIQ", compat.get_info())[2]
        assert pgsizes == (1 << 12) | (1 << 21) | (1 << 30)  # the attached device's domain
        assert errno_of(compat.map_buffer, buf, 0x200000) == errno.EEXIST
        # the last page of the reported range maps; iova + size wrapping is EOVERFLOW both ways
        compat.map_dma(address(buf), last + 1 - PAGE, PAGE)
        assert compat.unmap_dma(last + 1 - PAGE, PAGE) == PAGE
        assert errno_of(compat.map_dma, address(buf), TOP, 2 * PAGE) == errno.EOVERFLOW
        assert errno_of(compat.unmap_dma, TOP, 2 * PAGE) == errno.EOVERFLOW
        if iommu_type == vc.VFIO_TYPE1_IOMMU:  # type1: part of a mapping unmaps
            assert compat.unmap_dma(0x200000 + PAGE, PAGE) == PAGE
            assert run_dma(dev, 1, 0x200000, PAGE) == 0 and run_dma(dev, 1, 0x200000 + PAGE, 8) == 1
        else:  # type1v2: only whole mappings
            assert errno_of(compat.unmap_dma, 0x200000 + PAGE, PAGE) == errno.ENOENT
        assert errno_of(compat.unmap_dma, 0x200000, PAGE, unmap_all=True) == errno.EINVAL
        assert compat.unmap_dma(unmap_all=True) == (PAGE if iommu_type == vc.VFIO_TYPE1_IOMMU else 2 * PAGE)
        assert run_dma(dev, 1, 0x200000, 8) == 1  # unmapped: a DMA fault
        dev.close()


def test_the_compat_ioas_is_an_ordinary_ioas_of_the_context(legacy):
    """SET_CONTAINER creates it as the context's first object; native IOAS commands reach it,
    and a second group on the same iommufd shares it."""
    with IommuFd(legacy.iommu) as iommu, VfioGroup(legacy.node("vfio/7")) as group:
        group.set_container(iommu.fd)
        assert iommu.ioas_alloc() == 2  # id 1 is the compat IOAS
        buf = mmap.mmap(-1, PAGE)
        iommu.map_buffer(1, buf, iova=0x100000)
        unmap = vc.vfio_iommu_type1_dma_unmap(argsz=24, iova=0x100000, size=PAGE)
        assert ioctl(iommu.fd, vc.VFIO_IOMMU_UNMAP_DMA, unmap) == 0  # the same fd, as a container
        assert unmap.size == PAGE
        assert iommu.unmap(1) == 0  # nothing left in IOAS 1
        with VfioGroup(legacy.node(f"vfio/{group_number(legacy, BDF[2])}")) as other:
            other.set_container(iommu.fd)
            dev = other.get_device(BDF[2])
            iommu.map_buffer(1, buf, iova=0x300000)
            buf[:8] = b"compatio"
            assert run_dma(dev, 1, 0x300000, 8) == 0 and dev.read(2, 0, 8) == b"compatio"
            assert errno_of(iommu.destroy, 1) == errno.EBUSY  # a device is attached to it
            dev.close()
        group.unset_container()
        assert group.get_status() == VIABLE


def test_an_iommufd_lets_go_of_a_group_with_open_devices(legacy):
    """UNSET_CONTAINER's EBUSY is the container's (container_users); with an iommufd it succeeds
    and the device stays bound and usable until it closes."""
    with IommuFd(legacy.iommu) as iommu, VfioGroup(legacy.node(f"vfio/{group_number(legacy, BDF[2])}")) as group:
        group.set_container(iommu.fd)
        dev = group.get_device(BDF[2])
        group.unset_container()
        assert group.get_status() == VIABLE
        buf = mmap.mmap(-1, PAGE)
        iommu.map_buffer(1, buf, iova=0x100000)
        assert run_dma(dev, 1, 0x100000, 8) == 0
        dev.close()
        group.set_container(iommu.fd)  # and may come back to the same compat IOAS
        assert group.get_status() == VIABLE | CONTAINER_SET
