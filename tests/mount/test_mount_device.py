"""Through a real FUSE mount: a bound handle's ioctls, its regions, and the iommu node."""

from __future__ import annotations

import errno
import os

import pytest

from support import errno_of
from vfiofs import client as vc
from vfiofs.client import IommuFd, VfioDevice, ioctl

KiB = 1024


@pytest.fixture
def bound(mount):
    """vfio0 (64 KiB RAM) bound to a fresh iommufd."""
    iommu = IommuFd(mount.iommu)
    dev = VfioDevice(mount.device(0))
    dev.bind_iommufd(iommu)
    yield dev, iommu
    dev.close()
    iommu.close()


# -- device ioctls -------------------------------------------------------------------------

def test_22_get_info(bound):
    dev, _ = bound
    info = dev.get_info()
    assert (info.argsz, info.flags, info.num_regions, info.num_irqs) == (
        24, vc.VFIO_DEVICE_FLAGS_PCI | vc.VFIO_DEVICE_FLAGS_RESET, 9, 5)
    assert info.cap_offset == 0
    short = vc.vfio_device_info(argsz=15)
    assert errno_of(ioctl, dev.fd, vc.VFIO_DEVICE_GET_INFO, short) == errno.EINVAL
    # argsz 16: exactly 16 bytes come back, the rest of the caller's buffer is untouched
    buf = bytearray(b"\x10\0\0\0" + b"\xee" * 20)
    assert ioctl(dev.fd, vc.VFIO_DEVICE_GET_INFO, buf) == 0
    assert int.from_bytes(buf[8:12], "little") == 9 and buf[16:] == b"\xee" * 8


def test_23_get_region_info(bound):
    dev, _ = bound
    bar0 = dev.get_region_info(vc.VFIO_PCI_BAR0_REGION_INDEX)
    assert (bar0.size, bar0.offset, bar0.flags) == (
        64 * KiB, 0, vc.VFIO_REGION_INFO_FLAG_READ | vc.VFIO_REGION_INFO_FLAG_WRITE | vc.VFIO_REGION_INFO_FLAG_MMAP)
    for index in range(1, 6):
        bar = dev.get_region_info(index)
        assert (bar.size, bar.flags, bar.offset) == (0, 0, index << 40)
    rom = dev.get_region_info(vc.VFIO_PCI_ROM_REGION_INDEX)
    assert (rom.size, rom.flags, rom.offset) == (0, 0, 6 << 40)
    config = dev.get_region_info(vc.VFIO_PCI_CONFIG_REGION_INDEX)
    assert (config.size, config.offset) == (256, 7 << 40)
    assert errno_of(dev.get_region_info, vc.VFIO_PCI_VGA_REGION_INDEX) == errno.EINVAL
    assert errno_of(dev.get_region_info, 9) == errno.EINVAL
    assert errno_of(dev.get_region_info, 0xFFFFFFFF) == errno.EINVAL
    short = vc.vfio_region_info(argsz=31, index=0)
    assert errno_of(ioctl, dev.fd, vc.VFIO_DEVICE_GET_REGION_INFO, short) == errno.EINVAL
    # fields the kernel does not set come back as the caller sent them
    echoed = vc.vfio_region_info(argsz=64, index=0, cap_offset=0x55)
    ioctl(dev.fd, vc.VFIO_DEVICE_GET_REGION_INFO, echoed)
    assert (echoed.argsz, echoed.cap_offset, echoed.size) == (64, 0x55, 64 * KiB)


def test_28_38_unknown_ioctls_on_a_bound_handle_are_enotty(bound):
    dev, _ = bound
    for request in (0x3BFE, 0x1234, vc.VFIO_GET_API_VERSION, vc.VFIO_CHECK_EXTENSION, vc.IOMMU_IOAS_ALLOC):
        assert errno_of(ioctl, dev.fd, request, bytearray(32)) == errno.ENOTTY, hex(request)


def test_29_feature(bound):
    dev, _ = bound
    feature = lambda argsz, flags: vc.vfio_device_feature(argsz=argsz, flags=flags)
    f = vc.VFIO_DEVICE_FEATURE
    assert errno_of(ioctl, dev.fd, f, feature(7, vc.VFIO_DEVICE_FEATURE_GET)) == errno.EINVAL
    assert errno_of(ioctl, dev.fd, f, feature(8, 1 << 20)) == errno.EINVAL
    both = vc.VFIO_DEVICE_FEATURE_GET | vc.VFIO_DEVICE_FEATURE_SET
    assert errno_of(ioctl, dev.fd, f, feature(8, both)) == errno.EINVAL
    for index in (vc.VFIO_DEVICE_FEATURE_PCI_VF_TOKEN, vc.VFIO_DEVICE_FEATURE_MIGRATION, 0x1FF):
        flags = vc.VFIO_DEVICE_FEATURE_PROBE | vc.VFIO_DEVICE_FEATURE_GET | index
        assert errno_of(ioctl, dev.fd, f, feature(8, flags)) == errno.ENOTTY


def test_reset_returns_the_ram_to_zero(bound):
    dev, _ = bound
    dev.write(0, 0x100, b"\x5a" * 64)
    assert ioctl(dev.fd, vc.VFIO_DEVICE_RESET) == 0
    assert dev.read(0, 0x100, 64) == bytes(64)


# -- regions -------------------------------------------------------------------------------

def test_ram_bar_read_write(bound):
    dev, _ = bound
    pattern = os.urandom(64 * KiB)
    assert dev.write(0, 0, pattern) == 64 * KiB
    assert dev.read(0, 0, 64 * KiB) == pattern
    assert dev.write(0, 0x1234, b"\x01\x02\x03") == 3
    assert dev.read(0, 0x1233, 5) == pattern[0x1233:0x1234] + b"\x01\x02\x03" + pattern[0x1237:0x1238]


def test_30_access_past_the_end_is_einval_and_crossing_it_is_short(bound):
    dev, _ = bound
    end = 64 * KiB
    assert errno_of(dev.read, 0, end, 4) == errno.EINVAL
    assert errno_of(dev.write, 0, end + 100, b"x") == errno.EINVAL
    assert len(dev.read(0, end - 4, 16)) == 4
    assert dev.write(0, end - 2, b"abcdef") == 2
    assert dev.read(0, end - 2, 2) == b"ab"


def test_30_regions_that_do_not_exist(bound):
    dev, _ = bound
    assert errno_of(dev.read, 1, 0, 4) == errno.EINVAL  # unimplemented BAR
    assert errno_of(dev.write, 5, 0, b"1234") == errno.EINVAL
    assert errno_of(dev.read, vc.VFIO_PCI_ROM_REGION_INDEX, 0, 4) == errno.EINVAL
    assert errno_of(dev.write, vc.VFIO_PCI_ROM_REGION_INDEX, 0, b"1234") == errno.EINVAL
    assert errno_of(dev.read, vc.VFIO_PCI_VGA_REGION_INDEX, 0, 4) == errno.EINVAL
    assert errno_of(dev.read, 9, 0, 4) == errno.EINVAL
    assert errno_of(dev.read, 1000, 0, 4) == errno.EINVAL


def test_config_space_header(bound):
    dev, _ = bound
    cfg = dev.read(vc.VFIO_PCI_CONFIG_REGION_INDEX, 0, 64)
    assert cfg[0:4] == (0x1234 | 0x5241 << 16).to_bytes(4, "little")
    assert cfg[8] == 1 and cfg[9:12] == bytes([0x00, 0x00, 0x05])  # revision, class 05/00/00
    assert cfg[0x2C:0x30] == (0x1AF4 | 0x1100 << 16).to_bytes(4, "little")
    assert int.from_bytes(cfg[4:6], "little") & 0x2  # memory decoding on
    # read-only fields ignore writes, but the write reports its full length
    assert dev.write(7, 0, b"\xff\xff\xff\xff") == 4
    assert dev.read(7, 0, 4) == cfg[0:4]
    # past the end of config space: EFAULT, not a short count
    assert errno_of(dev.read, 7, 256, 4) == errno.EFAULT
    assert errno_of(dev.read, 7, 254, 4) == errno.EFAULT


def test_config_bar_sizing(bound):
    dev, _ = bound
    assert dev.write(7, 0x10, b"\xff\xff\xff\xff") == 4
    assert int.from_bytes(dev.read(7, 0x10, 4), "little") == 0xFFFF0000  # 64 KiB, 32-bit memory
    assert dev.write(7, 0x14, b"\xff\xff\xff\xff") == 4
    assert dev.read(7, 0x14, 4) == bytes(4)  # BAR1 not implemented
    dev.write(7, 0x10, (0xFEBC0000).to_bytes(4, "little"))
    assert int.from_bytes(dev.read(7, 0x10, 4), "little") == 0xFEBC0000


def test_close_resets_the_device_for_the_next_binder(mount):
    with IommuFd(mount.iommu) as iommu:
        with VfioDevice(mount.device(0)) as dev:
            dev.bind_iommufd(iommu)
            dev.write(0, 0, b"secret")
            dev.write(7, 0x10, b"\xff\xff\xff\xff")
        with VfioDevice(mount.device(0)) as dev:
            dev.bind_iommufd(iommu)
            assert dev.read(0, 0, 6) == bytes(6)
            assert dev.read(7, 0x10, 4) == bytes(4)


def test_devices_are_independent(mount):
    with IommuFd(mount.iommu) as iommu, VfioDevice(mount.device(0)) as a, VfioDevice(mount.device(1)) as b:
        a.bind_iommufd(iommu)
        b.bind_iommufd(iommu)
        assert b.get_region_info(0).size == 1024 * KiB
        a.write(0, 0, b"AAAA")
        b.write(0, 0, b"BBBB")
        assert (a.read(0, 0, 4), b.read(0, 0, 4)) == (b"AAAA", b"BBBB")
        assert b.read(7, 2, 2) == (0x5242).to_bytes(2, "little")


# -- iommufd attach / detach --------------------------------------------------------------

def test_17_to_21_attach_and_detach(bound):
    dev, iommu = bound
    ioas = iommu.ioas_alloc()
    iommu.destroy(ioas)  # bind attached nothing: the IOAS is free to go
    ioas = iommu.ioas_alloc()
    attach = lambda **kw: vc.vfio_device_attach_iommufd_pt(**{"argsz": 16, "pt_id": ioas, **kw})
    a = vc.VFIO_DEVICE_ATTACH_IOMMUFD_PT
    assert errno_of(ioctl, dev.fd, a, attach(argsz=11)) == errno.EINVAL
    assert errno_of(ioctl, dev.fd, a, attach(flags=2)) == errno.EINVAL
    assert errno_of(ioctl, dev.fd, a, attach(flags=vc.VFIO_DEVICE_ATTACH_PASID)) == errno.EOPNOTSUPP
    assert errno_of(dev.attach_iommufd_pt, 4242) == errno.ENOENT
    hwpt = dev.attach_iommufd_pt(ioas)
    assert hwpt not in (0, ioas)
    assert dev.attach_iommufd_pt(ioas) == hwpt  # a second attach replaces, no EBUSY
    assert errno_of(iommu.destroy, ioas) == errno.EBUSY
    d = vc.VFIO_DEVICE_DETACH_IOMMUFD_PT
    assert errno_of(ioctl, dev.fd, d, vc.vfio_device_detach_iommufd_pt(argsz=7)) == errno.EINVAL
    assert errno_of(ioctl, dev.fd, d, vc.vfio_device_detach_iommufd_pt(argsz=12, flags=2)) == errno.EINVAL
    dev.detach_iommufd_pt()
    dev.detach_iommufd_pt()  # not attached: a no-op that succeeds
    iommu.destroy(ioas)


def test_19_attach_to_an_object_that_is_not_a_page_table(mount):
    with IommuFd(mount.iommu) as iommu, VfioDevice(mount.device(0)) as dev:
        devid = dev.bind_iommufd(iommu)
        assert errno_of(dev.attach_iommufd_pt, devid) == errno.EINVAL


# -- the iommu node ------------------------------------------------------------------------

def test_34_ioas_alloc(mount):
    with IommuFd(mount.iommu) as iommu:
        a = vc.IOMMU_IOAS_ALLOC
        assert errno_of(ioctl, iommu.fd, a, vc.iommu_ioas_alloc(size=11)) == errno.EINVAL
        assert errno_of(ioctl, iommu.fd, a, bytes(vc.iommu_ioas_alloc(size=16)) + b"\0\0\x01\0") == errno.E2BIG
        assert errno_of(ioctl, iommu.fd, a, vc.iommu_ioas_alloc(size=12, flags=1)) == errno.EOPNOTSUPP
        first = iommu.ioas_alloc()
        longer = bytearray(bytes(vc.iommu_ioas_alloc(size=16)) + bytes(4))
        assert ioctl(iommu.fd, a, longer) == 0
        assert (first, int.from_bytes(longer[8:12], "little")) == (1, 2)
    with IommuFd(mount.iommu) as fresh:
        assert fresh.ioas_alloc() == 1  # each open is its own context


def test_35_destroy(mount):
    with IommuFd(mount.iommu) as iommu:
        assert errno_of(iommu.destroy, 0) == errno.ENOENT
        assert errno_of(iommu.destroy, 77) == errno.ENOENT
        assert errno_of(ioctl, iommu.fd, vc.IOMMU_DESTROY, None) == errno.EFAULT
        assert errno_of(ioctl, iommu.fd, (ord(";") << 8) | 0x7F, bytearray(8)) == errno.ENOTTY
        ioas = iommu.ioas_alloc()
        iommu.destroy(ioas)
        assert errno_of(iommu.destroy, ioas) == errno.ENOENT


def test_38_api_version_on_the_iommu_node(mount):
    with IommuFd(mount.iommu) as iommu:
        assert ioctl(iommu.fd, vc.VFIO_GET_API_VERSION) == vc.VFIO_API_VERSION == 0


def test_iommu_node_has_no_read_or_write(mount):
    with IommuFd(mount.iommu) as iommu:
        assert errno_of(os.pread, iommu.fd, 8, 0) == errno.EINVAL
        assert errno_of(os.pwrite, iommu.fd, b"12345678", 0) == errno.EINVAL


def test_the_tree_is_fixed(mount):
    devices = mount.node("vfio/devices")
    assert {"iommu", "vfio"} <= set(os.listdir(mount.path))
    assert sorted(os.listdir(devices)) == ["vfio0", "vfio1", "vfio2", "vfio3", "vfio4", "vfio5"]
    assert errno_of(os.mkdir, os.path.join(devices, "new")) == errno.EPERM
    assert errno_of(os.open, os.path.join(devices, "vfio9"), os.O_CREAT | os.O_RDWR) == errno.EPERM
    assert errno_of(os.unlink, mount.device(0)) == errno.EPERM
    assert errno_of(os.rename, mount.device(0), os.path.join(devices, "x")) == errno.EPERM
    assert errno_of(os.symlink, "vfio0", os.path.join(devices, "link")) == errno.EPERM
    assert errno_of(os.chmod, mount.device(0), 0o666) == errno.EPERM
    assert errno_of(os.open, os.path.join(devices, "missing"), os.O_RDWR) == errno.ENOENT
    assert sorted(os.listdir(devices)) == ["vfio0", "vfio1", "vfio2", "vfio3", "vfio4", "vfio5"]
