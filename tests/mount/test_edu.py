"""QEMU's edu device (vfiofs/models/edu.py, devices/vedu.toml) through a real mount: the
bundled edu device bound with pread/pwrite and eventfds. The model's own tests, without a
mount, are in tests/unit/test_edu_model.py.
"""

from __future__ import annotations

import errno
import os
import select

import pytest

from support import errno_of, node_by_ids, try_bind, wait_until
from vfiofs import client as vc
from vfiofs.client import IommuFd, VfioDevice

MSI, INTX = vc.VFIO_PCI_MSI_IRQ_INDEX, vc.VFIO_PCI_INTX_IRQ_INDEX
CFG = vc.VFIO_PCI_CONFIG_REGION_INDEX
ONES4 = 0xFFFF_FFFF
ONES8 = 0xFFFF_FFFF_FFFF_FFFF


# -- through a real mount ------------------------------------------------------------------------------

def edu_node(mount) -> str:
    return node_by_ids(mount, 0x1234, 0x11E8)


@pytest.fixture
def bound(mount):
    with mount.bound(edu_node(mount)) as dev:
        yield dev


def pread(dev: VfioDevice, offset: int, size: int = 4) -> int:
    data = os.pread(dev.fd, size, offset)  # BAR0 is region 0: file offset (0 << 40) + offset
    assert len(data) == size
    return int.from_bytes(data, "little")


def pwrite(dev: VfioDevice, offset: int, value: int, size: int = 4) -> None:
    assert os.pwrite(dev.fd, value.to_bytes(size, "little"), offset) == size


@pytest.fixture
def efd():
    """A non-blocking eventfd for one interrupt, closed after the test."""
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    yield fd
    os.close(fd)


def wait(efd: int, timeout: float = 5.0) -> int:
    ready, _, _ = select.select([efd], [], [], timeout)
    assert ready, "no interrupt"
    return os.eventfd_read(efd)


def pending(efd: int) -> int:
    try:
        return os.eventfd_read(efd)
    except BlockingIOError:
        return 0


def test_mount_identity_regions_and_irqs(bound):
    cfg = bound.read(CFG, 0, 64)
    assert cfg[0:4] == bytes.fromhex("3412e811")
    assert cfg[8] == 0x10 and cfg[9:12] == bytes([0x00, 0xFF, 0x00])  # revision, prog-if, sub, base class
    assert cfg[0x2C:0x30] == bytes.fromhex("f41a0011")
    assert cfg[0x3D] == 1  # INTA
    cap = cfg[0x34]
    assert bound.read(CFG, cap, 1)[0] == 0x05  # MSI, the only capability
    assert bound.read(CFG, cap + 1, 1)[0] == 0
    control = int.from_bytes(bound.read(CFG, cap + 2, 2), "little")
    assert control & 0x0080 and not control & 0x0100 and control & 0x000E == 0  # 64-bit, no masking, 1 vector
    info = bound.get_region_info(0)
    assert info.size == 1 << 20
    assert info.flags == vc.VFIO_REGION_INFO_FLAG_READ | vc.VFIO_REGION_INFO_FLAG_WRITE  # trapped
    assert all(bound.get_region_info(i).size == 0 for i in range(1, 7))
    assert (bound.get_irq_info(INTX).count, bound.get_irq_info(MSI).count) == (1, 1)
    assert bound.get_irq_info(vc.VFIO_PCI_MSIX_IRQ_INDEX).count == 0


def test_mount_registers(bound):
    assert pread(bound, 0x00) == 0x010000ED
    assert pread(bound, 0x04) == 0
    pwrite(bound, 0x04, 0x12345678)
    assert pread(bound, 0x04) == 0xEDCBA987
    for offset in (0x00, 0x04):
        assert os.pread(bound.fd, 1, offset) == b"\xff"
        assert os.pread(bound.fd, 2, offset) == b"\xff\xff"
        assert pread(bound, offset, 8) == ONES8
    pwrite(bound, 0x04, 0, 2)  # ignored
    pwrite(bound, 0x04, 0, 8)  # ignored
    assert pread(bound, 0x04) == 0xEDCBA987
    pwrite(bound, 0x80, 0x0123_4567_89AB_CDEF, 8)
    assert pread(bound, 0x80, 8) == 0x0123_4567_89AB_CDEF
    assert pread(bound, 0x84) == ONES4
    pwrite(bound, 0x80, 0x42)
    assert pread(bound, 0x80, 8) == 0x42
    assert pread(bound, 0x40000) == ONES4  # the DMA buffer is not in BAR0
    assert pread(bound, 0xFFFF8, 8) == ONES8
    assert errno_of(os.pread, bound.fd, 4, 1 << 20) == errno.EINVAL  # past the 1 MiB BAR
    pwrite(bound, 0x08, 10)
    deadline = 100
    while pread(bound, 0x20) & 0x01 and deadline:
        deadline -= 1
    assert pread(bound, 0x08) == 3628800


def test_mount_factorial_by_msi(bound, efd):
    bound.enable_irq_eventfds(MSI, [efd])
    pwrite(bound, 0x20, 0x80)
    pwrite(bound, 0x08, 13)
    assert wait(efd) == 1
    assert pread(bound, 0x20) == 0x80
    assert pread(bound, 0x08) == 0x7328CC00
    assert pread(bound, 0x24) == 0x1
    pwrite(bound, 0x64, 0x1)
    assert pread(bound, 0x24) == 0
    pwrite(bound, 0x60, 0x8)  # raise by hand: one message per write
    pwrite(bound, 0x60, 0x8)
    assert pread(bound, 0x24) == 0x8
    assert wait(efd) == 2
    pwrite(bound, 0x64, 0x8)
    assert pending(efd) == 0


def test_mount_factorial_by_intx(bound, efd):
    bound.enable_irq_eventfds(INTX, [efd])
    pwrite(bound, 0x20, 0x80)
    pwrite(bound, 0x08, 5)
    assert wait(efd) == 1
    assert pread(bound, 0x08) == 120 and pread(bound, 0x24) == 0x1
    status = int.from_bytes(bound.read(CFG, 0x06, 2), "little")
    assert status & 0x0008  # PCI_STATUS_INTERRUPT: the line is asserted
    bound.unmask_intx()  # still asserted: it signals again (a level)
    assert wait(efd) == 1
    pwrite(bound, 0x64, 0x1)  # ack: the line drops
    assert not int.from_bytes(bound.read(CFG, 0x06, 2), "little") & 0x0008
    bound.unmask_intx()
    assert pending(efd) == 0
    pwrite(bound, 0x60, 0x2)  # and rises again by hand
    assert wait(efd) == 1
    pwrite(bound, 0x64, 0x2)


def test_mount_close_resets_the_device(mount):
    node = edu_node(mount)
    with IommuFd(mount.iommu) as iommu:
        with VfioDevice(node) as dev:
            dev.bind_iommufd(iommu)
            pwrite(dev, 0x04, 0x12345678)
            pwrite(dev, 0x20, 0x80)
            pwrite(dev, 0x90, 77, 8)
        with VfioDevice(node) as dev:  # the release of the first handle may arrive a little later
            assert wait_until(lambda: try_bind(dev, iommu))
            assert [pread(dev, o) for o in (0x04, 0x20, 0x24)] == [0, 0, 0]
            assert pread(dev, 0x90, 8) == 0


