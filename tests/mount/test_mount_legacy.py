"""Through a real mount: the legacy group/container path, and its exclusion with the cdev path.

Definitions: two RAM devices sharing IOMMU group 7 (vfio0, vfio1) and the DMA test
device alone in its group (vfio2).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import secrets
import select
import struct


from support import errno_of, run_dma
from vfiofs import client as vc
from vfiofs.client import IommuFd, VfioContainer, VfioDevice, VfioGroup, ioctl

RAM = 'model = "ram"\niommu_group = 7\n[ram]\nsize = "64KiB"\n'
VIABLE, CONTAINER_SET = vc.VFIO_GROUP_FLAGS_VIABLE, vc.VFIO_GROUP_FLAGS_CONTAINER_SET
BDF = ["0000:00:01.0", "0000:00:02.0", "0000:00:03.0"]
PAGE = 4096


def group_of(mount, index: int) -> int:
    link = os.readlink(mount.node(f"sys/bus/pci/devices/{BDF[index]}/iommu_group"))
    return int(os.path.basename(link))


def ready_group(mount, number: int, container: VfioContainer) -> VfioGroup:
    group = VfioGroup(mount.node(f"vfio/{number}"))
    group.set_container(container)
    return group


def test_nodes_match_the_sysfs_groups(legacy):
    entries = sorted(os.listdir(legacy.node("vfio")))
    assert entries == ["2", "7", "devices", "vfio"]
    assert [group_of(legacy, i) for i in range(3)] == [7, 7, 2]
    assert sorted(os.listdir(legacy.node("sys/kernel/iommu_groups/7/devices"))) == BDF[:2]
    assert oct(os.stat(legacy.node("vfio/vfio")).st_mode & 0o777) == "0o666"  # like /dev/vfio/vfio


def test_container_ioctls(legacy):
    with VfioContainer(legacy.node("vfio/vfio")) as container:
        assert ioctl(container.fd, vc.VFIO_GET_API_VERSION) == 0
        assert container.check_extension(vc.VFIO_TYPE1v2_IOMMU) == 1
        assert container.check_extension(vc.VFIO_TYPE1_IOMMU) == 1
        assert container.check_extension(vc.VFIO_UNMAP_ALL) == 1
        assert container.check_extension(vc.VFIO_SPAPR_TCE_IOMMU) == 0
        assert container.check_extension(vc.VFIO_NOIOMMU_IOMMU) == 0
        assert container.check_extension(vc.VFIO_DMA_CC_IOMMU) == 0  # no IOMMU type yet
        assert errno_of(container.set_iommu) == errno.EINVAL  # no group attached yet
        assert errno_of(container.get_info) == errno.ENOTTY  # no IOMMU type yet
        assert errno_of(os.pread, container.fd, 4, 0) == errno.EINVAL
        with ready_group(legacy, 7, container):
            assert errno_of(container.set_iommu, vc.VFIO_SPAPR_TCE_IOMMU) == errno.ENODEV
            container.set_iommu(vc.VFIO_TYPE1v2_IOMMU)
            assert errno_of(container.set_iommu) == errno.EINVAL  # once
            assert container.check_extension(vc.VFIO_DMA_CC_IOMMU) == 1  # every emulated domain is coherent
            info = container.get_info()
            argsz, flags, pgsizes, cap_offset = struct.unpack_from("<IIQI", info)
            assert flags == vc.VFIO_IOMMU_INFO_PGSIZES | vc.VFIO_IOMMU_INFO_CAPS and pgsizes & PAGE
            assert cap_offset == 24
            cap_id, version, _next = struct.unpack_from("<HHI", info, cap_offset)
            assert (cap_id, version) == (vc.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, 1)
            assert struct.unpack_from("<IIQQ", info, cap_offset + 8) == (1, 0, 0, (1 << 48) - 1)
            small = vc.vfio_iommu_type1_info(argsz=24)
            ioctl(container.fd, vc.VFIO_IOMMU_GET_INFO, small)
            assert small.argsz == argsz and small.cap_offset == 0  # the argsz dance


def test_group_ioctls(legacy):
    with VfioGroup(legacy.node("vfio/7")) as group:
        assert group.get_status() == VIABLE
        assert errno_of(group.set_container, 999) == errno.EBADF
        efd = os.eventfd(0, os.EFD_CLOEXEC)  # open, but neither a container nor an iommufd
        assert errno_of(group.set_container, efd) == errno.EBADFD
        os.close(efd)
        assert errno_of(group.unset_container) == errno.EINVAL
        assert errno_of(group.get_device_fd, BDF[0]) == errno.EINVAL  # no container yet
        with VfioContainer(legacy.node("vfio/vfio")) as container:
            group.set_container(container)
            assert group.get_status() == VIABLE | CONTAINER_SET
            assert errno_of(group.set_container, container) == errno.EINVAL
            assert errno_of(group.get_device_fd, BDF[0]) == errno.EINVAL  # no IOMMU type yet
            container.set_iommu()
            assert errno_of(group.get_device_fd, BDF[2]) == errno.ENODEV  # not in this group
            assert errno_of(group.get_device_fd, "nonsense") == errno.ENODEV
            group.unset_container()
            assert group.get_status() == VIABLE


def test_get_device_fd_returns_a_new_granted_fd(legacy):
    with VfioContainer(legacy.node("vfio/vfio")) as container:
        with ready_group(legacy, 7, container) as group:
            container.set_iommu()
            fd = group.get_device_fd(BDF[1])
            assert fd >= 0 and fd not in (group.fd, container.fd)
            assert os.readlink(f"/proc/self/fd/{fd}") == legacy.device(1)
            with VfioDevice.from_fd(fd) as dev, group.get_device(BDF[1]) as again:
                assert dev.get_info().num_regions == 9  # granted from the start, no BIND
                dev.write(0, 0, b"legacy")
                assert again.read(0, 0, 6) == b"legacy"  # a second handle of the same device
                with IommuFd(legacy.iommu) as iommu:
                    assert errno_of(dev.bind_iommufd, iommu) == errno.EINVAL
                assert errno_of(dev.attach_iommufd_pt, 1) == errno.ENOTTY
                assert errno_of(dev.detach_iommufd_pt) == errno.ENOTTY
                assert errno_of(group.unset_container) == errno.EBUSY  # device handles are open


def test_the_two_paths_exclude_each_other(legacy):
    with IommuFd(legacy.iommu) as iommu:
        cdev = VfioDevice(legacy.device(0))
        with VfioGroup(legacy.node("vfio/7")):
            assert errno_of(cdev.bind_iommufd, iommu) == errno.EBUSY  # the group is open
            assert errno_of(VfioGroup, legacy.node("vfio/7")) == errno.EBUSY  # a second open
        cdev.bind_iommufd(iommu)  # the group is closed again
        assert errno_of(VfioGroup, legacy.node("vfio/7")) == errno.EBUSY  # a device is bound via cdev
        with VfioGroup(legacy.node("vfio/2")):
            pass  # another group is unaffected
        cdev.close()
        # a device handle from the group keeps the group in use after the group fd closes
        container = VfioContainer(legacy.node("vfio/vfio"))
        group = ready_group(legacy, 7, container)
        container.set_iommu()
        derived = group.get_device(BDF[0])
        group.close()
        other = VfioDevice(legacy.device(1))
        assert errno_of(other.bind_iommufd, iommu) == errno.EBUSY
        assert errno_of(VfioGroup, legacy.node("vfio/7")) == errno.EBUSY
        derived.close()
        assert other.bind_iommufd(iommu) >= 1
        other.close()
        container.close()


def test_whole_legacy_sequence_with_dma(legacy):
    """Container, group, set IOMMU, map DMA, get the device fd, use the device."""
    container = VfioContainer(legacy.node("vfio/vfio"))
    assert ioctl(container.fd, vc.VFIO_GET_API_VERSION) == vc.VFIO_API_VERSION
    assert container.check_extension(vc.VFIO_TYPE1v2_IOMMU)
    group = VfioGroup(legacy.node(f"vfio/{group_of(legacy, 2)}"))
    assert group.get_status() & VIABLE
    group.set_container(container)
    container.set_iommu(vc.VFIO_TYPE1v2_IOMMU)
    buf = mmap.mmap(-1, 2 * PAGE)
    pattern = secrets.token_bytes(PAGE)
    buf[:PAGE] = pattern
    container.map_buffer(buf, iova=0x200000)
    dev = group.get_device(BDF[2])
    assert run_dma(dev, 1, 0x200000, PAGE) == 0
    assert dev.read(2, 0, PAGE) == pattern
    dev.write(2, 0, b"written by the device")
    assert run_dma(dev, 2, 0x200000 + PAGE, 21) == 0
    assert buf[PAGE : PAGE + 21] == b"written by the device"
    # type1 rules
    assert errno_of(container.map_buffer, buf, 0x200000) == errno.EEXIST
    assert errno_of(container.map_dma, 0, 0x300001, PAGE) == errno.EINVAL
    assert errno_of(container.unmap_dma, 0x200000 + PAGE, PAGE) == errno.EINVAL  # would split
    assert container.unmap_dma(0x200000, 2 * PAGE) == 2 * PAGE
    assert run_dma(dev, 1, 0x200000, 8) == 1  # unmapped: a DMA fault
    container.map_buffer(buf, iova=0x400000)
    assert container.unmap_dma(unmap_all=True) == 2 * PAGE
    assert container.unmap_dma(0x400000, PAGE) == 0  # nothing left: type1 unmaps 0 bytes
    top = (1 << 64) - PAGE  # iova + size wraps: EOVERFLOW, as the kernel's selftests expect
    assert errno_of(container.map_dma, ctypes.addressof(ctypes.c_char.from_buffer(buf)), top, 2 * PAGE) \
        == errno.EOVERFLOW
    assert errno_of(container.unmap_dma, top, 2 * PAGE) == errno.EOVERFLOW
    dev.close()
    group.close()
    container.close()


def test_legacy_sequence_drives_the_edu_device(mount):
    """The whole legacy sequence against the bundled edu (vfio4): DMA a page in and out."""
    edu_bdf = "0000:00:05.0"
    assert open(mount.node(f"sys/bus/pci/devices/{edu_bdf}/device")).read() == "0x11e8\n"
    number = int(os.path.basename(os.readlink(mount.node(f"sys/bus/pci/devices/{edu_bdf}/iommu_group"))))
    container = VfioContainer(mount.node("vfio/vfio"))
    group = VfioGroup(mount.node(f"vfio/{number}"))
    group.set_container(container)
    container.set_iommu(vc.VFIO_TYPE1v2_IOMMU)
    buf = mmap.mmap(-1, PAGE)
    pattern = secrets.token_bytes(PAGE)
    buf[:] = pattern
    container.map_buffer(buf, iova=0x100000)
    dev = group.get_device(edu_bdf)
    assert int.from_bytes(dev.read(0, 0x00, 4), "little") == 0x010000ED
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    dev.enable_irq_eventfds(vc.VFIO_PCI_MSI_IRQ_INDEX, [efd])

    def dma(src: int, dst: int, direction: int) -> None:
        for offset, value in ((0x80, src), (0x88, dst), (0x90, PAGE)):
            dev.write(0, offset, value.to_bytes(8, "little"))
        dev.write(0, 0x98, (1 | direction << 1 | 4).to_bytes(8, "little"))  # start, direction, IRQ when done
        assert select.select([efd], [], [], 10)[0] == [efd]  # completion interrupt 0x100
        os.eventfd_read(efd)
        assert int.from_bytes(dev.read(0, 0x24, 4), "little") & 0x100
        dev.write(0, 0x64, (0x100).to_bytes(4, "little"))  # ack

    dma(0x100000, 0x40000, 0)  # RAM -> EDU
    buf[:] = bytes(PAGE)
    dma(0x40000, 0x100000, 1)  # EDU -> RAM
    assert buf[:] == pattern
    os.close(efd)
    dev.close()
    group.close()
    container.close()


def test_iommu_get_info_with_only_the_minimum_buffer(legacy):
    """argsz 16 in a 16-byte buffer: argsz is raised to what the capabilities need, nothing
    beyond the caller's 16 bytes is written, and the call succeeds."""
    with VfioContainer(legacy.node("vfio/vfio")) as container, ready_group(legacy, 7, container):
        container.set_iommu()
        buf = bytearray(struct.pack("<II", 16, 0) + bytes(8))
        assert ioctl(container.fd, vc.VFIO_IOMMU_GET_INFO, buf) == 0
        argsz, flags, pgsizes = struct.unpack("<IIQ", buf)
        assert argsz > 24 and flags & vc.VFIO_IOMMU_INFO_CAPS and pgsizes & PAGE
