"""Through a real FUSE mount: blocked handles, BIND and its errnos, the bound state.

Numbers in the test names refer to the behaviours listed in
shared/reference/kernel-vfio.md §4.
"""

from __future__ import annotations

import ctypes
import errno
import os

import pytest

from support import errno_of, raw_mmap_errno
from vfiofs import client as vc
from vfiofs.client import IommuFd, VfioDevice, ioctl


def bind_struct(iommufd: int, **kw) -> vc.vfio_device_bind_iommufd:
    kw.setdefault("argsz", ctypes.sizeof(vc.vfio_device_bind_iommufd))
    return vc.vfio_device_bind_iommufd(iommufd=iommufd, **kw)


def bind_errno(dev: VfioDevice, iommufd: int, **kw) -> int:
    return errno_of(ioctl, dev.fd, vc.VFIO_DEVICE_BIND_IOMMUFD, bind_struct(iommufd, **kw))


def assert_blocked(dev: VfioDevice) -> None:
    assert errno_of(dev.read, 0, 0, 4) == errno.EINVAL
    assert errno_of(dev.get_info) == errno.EINVAL


def test_01_open_needs_no_iommufd_and_every_open_is_independent(mount):
    devs = [VfioDevice(mount.device(0)) for _ in range(3)]
    with IommuFd(mount.iommu) as iommu:
        assert devs[1].bind_iommufd(iommu) >= 1
        assert_blocked(devs[0])
        assert_blocked(devs[2])
        assert devs[1].get_info().num_regions == 9
    for dev in devs:
        dev.close()


def test_02_blocked_read_and_write_are_einval(mount):
    with VfioDevice(mount.device(0)) as dev:
        for offset in (0, 0x10, vc.VFIO_PCI_INDEX_TO_OFFSET(7), vc.VFIO_PCI_INDEX_TO_OFFSET(50)):
            assert errno_of(os.pread, dev.fd, 4, offset) == errno.EINVAL
            assert errno_of(os.pwrite, dev.fd, b"\xff" * 4, offset) == errno.EINVAL
        assert errno_of(os.read, dev.fd, 8) == errno.EINVAL
        # A zero-length read or write never reaches a FUSE daemon (README: limits).
        assert os.pread(dev.fd, 0, 0) == b""


def test_03_blocked_shared_mmap_fails(mount):
    with VfioDevice(mount.device(0)) as dev:
        # The kernel says EINVAL; FUSE refuses shared maps of direct_io files with ENODEV (README: limits).
        assert raw_mmap_errno(dev.fd, 4096) == errno.ENODEV


@pytest.mark.parametrize(
    "request_",
    [vc.VFIO_DEVICE_GET_INFO, vc.VFIO_DEVICE_GET_REGION_INFO, vc.VFIO_DEVICE_FEATURE, vc.VFIO_DEVICE_RESET,
     vc.VFIO_DEVICE_ATTACH_IOMMUFD_PT, vc.VFIO_DEVICE_DETACH_IOMMUFD_PT, vc.VFIO_DEVICE_GET_IRQ_INFO,
     vc.VFIO_DEVICE_SET_IRQS, vc.VFIO_GET_API_VERSION, vc.VFIO_CHECK_EXTENSION, vc.IOMMU_IOAS_ALLOC, 0x3BFE, 0x1234],
)
def test_04_38_blocked_handle_refuses_every_ioctl_but_bind(mount, request_):
    with VfioDevice(mount.device(0)) as dev:
        assert errno_of(ioctl, dev.fd, request_, bytearray(64)) == errno.EINVAL
        assert errno_of(ioctl, dev.fd, request_) == errno.EINVAL
        assert errno_of(ioctl, dev.fd, request_, 1) == errno.EINVAL


def test_05_bind_argsz_too_small(mount):
    with VfioDevice(mount.device(0)) as dev, IommuFd(mount.iommu) as iommu:
        assert bind_errno(dev, iommu.fd, argsz=15) == errno.EINVAL
        assert bind_errno(dev, iommu.fd, argsz=0) == errno.EINVAL
        assert_blocked(dev)


def test_06_bind_unknown_flags(mount):
    with VfioDevice(mount.device(0)) as dev, IommuFd(mount.iommu) as iommu:
        assert bind_errno(dev, iommu.fd, flags=1 << 1) == errno.EINVAL
        assert bind_errno(dev, iommu.fd, flags=1 << 31) == errno.EINVAL
        # the token flag is known, but an emulated PF/VF-less device takes no token
        assert bind_errno(dev, iommu.fd, flags=vc.VFIO_DEVICE_BIND_FLAG_TOKEN) == errno.EINVAL
        assert_blocked(dev)


def test_07_bind_negative_iommufd(mount):
    with VfioDevice(mount.device(0)) as dev:
        assert bind_errno(dev, -1) == errno.EINVAL
        assert bind_errno(dev, -2) == errno.EINVAL
        assert_blocked(dev)


def test_08_bind_fd_not_open(mount):
    with VfioDevice(mount.device(0)) as dev:
        closed = os.open("/dev/null", os.O_RDONLY)
        os.close(closed)
        assert bind_errno(dev, closed) == errno.EBADF
        assert bind_errno(dev, 1000) == errno.EBADF
        assert_blocked(dev)


def test_09_bind_fd_that_is_not_an_iommufd(mount, tmp_path):
    with VfioDevice(mount.device(0)) as dev, VfioDevice(mount.device(1)) as other:
        efd = os.eventfd(0)
        regular = os.open(tmp_path / "file", os.O_CREAT | os.O_RDWR)
        directory = os.open(mount.node("vfio/devices"), os.O_RDONLY | os.O_DIRECTORY)
        try:
            for fd in (efd, regular, directory, dev.fd, other.fd):
                assert bind_errno(dev, fd) == errno.EBADFD, fd
        finally:
            for fd in (efd, regular, directory):
                os.close(fd)
        assert_blocked(dev)


def test_09_iommufd_of_another_mount_is_not_accepted(mount, tmp_path):
    from support import mounted

    second = tmp_path / "second"
    second.mkdir()
    with mounted(second) as other_mount, VfioDevice(mount.device(0)) as dev:
        with IommuFd(other_mount.iommu) as foreign_iommu:
            assert bind_errno(dev, foreign_iommu.fd) == errno.EBADFD
        assert_blocked(dev)


def test_10_bind_success_writes_only_out_devid(mount):
    with VfioDevice(mount.device(0)) as dev, IommuFd(mount.iommu) as iommu:
        bind = bind_struct(iommu.fd, token_uuid_ptr=0xAABBCCDD11223344)
        before = bytes(bind)
        assert ioctl(dev.fd, vc.VFIO_DEVICE_BIND_IOMMUFD, bind) == 0
        after = bytes(bind)
        assert bind.out_devid != 0
        assert after[:12] == before[:12] and after[16:] == before[16:]
        info = dev.get_info()
        assert info.flags & vc.VFIO_DEVICE_FLAGS_PCI


def test_11_second_bind_on_a_bound_handle(mount):
    with VfioDevice(mount.device(0)) as dev, IommuFd(mount.iommu) as iommu, IommuFd(mount.iommu) as iommu2:
        dev.bind_iommufd(iommu)
        assert bind_errno(dev, iommu.fd) == errno.EINVAL
        assert bind_errno(dev, iommu2.fd) == errno.EINVAL
        assert bind_errno(dev, 1000) == errno.EINVAL  # "already bound" comes before the fd lookup
        assert dev.get_info().num_regions == 9  # still bound and usable


def test_12_failed_bind_then_valid_bind(mount):
    with VfioDevice(mount.device(0)) as dev, IommuFd(mount.iommu) as iommu:
        assert bind_errno(dev, -1) == errno.EINVAL
        assert bind_errno(dev, 999) == errno.EBADF
        assert bind_errno(dev, dev.fd) == errno.EBADFD
        assert dev.bind_iommufd(iommu) >= 1
        assert dev.get_info().num_irqs == 5


def test_13_one_bound_handle_per_device(mount):
    with IommuFd(mount.iommu) as iommu:
        a, b = VfioDevice(mount.device(0)), VfioDevice(mount.device(0))
        a.bind_iommufd(iommu)
        assert bind_errno(b, iommu.fd) == errno.EINVAL
        assert_blocked(b)
        with VfioDevice(mount.device(1)) as c:
            assert c.bind_iommufd(iommu) >= 1  # another device is independent
        a.close()
        assert b.bind_iommufd(iommu) >= 1
        b.close()


def test_16_close_returns_zero_and_iommufd_close_does_not_unbind(mount):
    blocked = os.open(mount.device(0), os.O_RDWR)
    assert os.close(blocked) is None
    dev = VfioDevice(mount.device(0))
    iommu = IommuFd(mount.iommu)
    dev.bind_iommufd(iommu)
    iommu.close()
    assert dev.get_region_info(0).size == 64 * 1024
    dev.write(0, 0, b"still here")
    assert dev.read(0, 0, 10) == b"still here"
    with VfioDevice(mount.device(0)) as other, IommuFd(mount.iommu) as iommu2:
        assert bind_errno(other, iommu2.fd) == errno.EINVAL
    assert os.close(dev.fd) is None
    dev.fd = -1


def test_bind_through_a_dup_and_a_different_fd_number(mount):
    with VfioDevice(mount.device(0)) as dev, IommuFd(mount.iommu) as iommu:
        high = os.dup2(iommu.fd, 200)
        try:
            assert dev.bind_iommufd(high) >= 1
        finally:
            os.close(high)
        assert dev.get_info().num_regions == 9


def test_devids_come_from_the_iommufd_object_table(mount):
    with IommuFd(mount.iommu) as iommu, VfioDevice(mount.device(0)) as a, VfioDevice(mount.device(1)) as b:
        ioas = iommu.ioas_alloc()
        devid_a = a.bind_iommufd(iommu)
        devid_b = b.bind_iommufd(iommu)
        assert sorted([ioas, devid_a, devid_b]) == [1, 2, 3]
        # a device object cannot be destroyed while bound
        assert errno_of(iommu.destroy, devid_a) == errno.EBUSY
