"""The I/OAT DMA engine (vfiofs/models/ioat.py, devices/vioat.toml) through a real mount: the
bundled device bound with the Python client, descriptors built in the driver's own memory,
BAR0 driven with pread/pwrite, completion by MSI-X eventfd — the sequence the kernel's VFIO
selftests' ioat driver uses. The model's own tests are in tests/unit/test_ioat_model.py.
"""

from __future__ import annotations

import mmap
import os
import select
import struct
import time

import pytest

from support import node_by_ids, try_bind, wait_until
from vfiofs import client as vc
from vfiofs.client import IommuFd, VfioDevice, ioctl

MSIX = vc.VFIO_PCI_MSIX_IRQ_INDEX
CFG = vc.VFIO_PCI_CONFIG_REGION_INDEX
PAGE = 4096
IOVA = 0x10_0000  # where the test maps its buffer
UNMAPPED = 8 << 30

CH = 0x80
CHANCTRL, CHANCMD, DMACOUNT, CHANSTS, CHAINADDR, CHANERR = CH, CH + 0x04, CH + 0x06, CH + 0x08, CH + 0x10, CH + 0x28
DONE, SUSPENDED, HALTED = 1, 2, 3


def ioat_node(mount) -> str:
    return node_by_ids(mount, 0x8086, 0x2021)


class Rig:
    """The bound device, its IOAS with 4 pages of this process's memory at IOVA, an MSI-X eventfd."""

    def __init__(self, iommu: IommuFd, dev: VfioDevice) -> None:
        self.dev = dev
        self.buf = mmap.mmap(-1, 4 * PAGE)
        ioas = iommu.ioas_alloc()
        assert iommu.map_buffer(ioas, self.buf, IOVA) == IOVA
        dev.attach_iommufd_pt(ioas)
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        dev.enable_irq_eventfds(MSIX, [self.efd])  # as in the kernel, nothing else enables vector 0

    def rd(self, offset: int, size: int = 4) -> int:
        data = os.pread(self.dev.fd, size, offset)  # BAR0 is region 0: file offset (0 << 40) + offset
        assert len(data) == size
        return int.from_bytes(data, "little")

    def wr(self, offset: int, value: int, size: int = 4) -> None:
        assert os.pwrite(self.dev.fd, value.to_bytes(size, "little"), offset) == size

    def status(self) -> int:
        return self.rd(CHANSTS, 8) & 7

    def put(self, iova: int, data: bytes) -> None:
        self.buf[iova - IOVA : iova - IOVA + len(data)] = data

    def get(self, iova: int, size: int) -> bytes:
        return self.buf[iova - IOVA : iova - IOVA + size]

    def reset_channel(self) -> None:
        """The selftest driver's ioat_reset: clear CHANERR, RESET, poll until done, HALTED."""
        self.wr(CHANERR, self.rd(CHANERR))
        self.wr(CHANCMD, 0x20, 1)
        deadline = time.monotonic() + 5
        while self.rd(CHANCMD, 1) & 0x20:
            assert time.monotonic() < deadline, "the reset never completed"
            time.sleep(0.001)
        assert self.status() == HALTED

    def kick(self, desc: int, count: int) -> None:
        self.wr(CHAINADDR, desc, 8)
        self.wr(CHANCTRL, 0x0009, 2)  # INT_REARM | ANY_ERR_ABORT_EN
        self.wr(DMACOUNT, count, 2)

    def wait(self, timeout: float = 10.0) -> int:
        """Poll CHANSTS until DONE or HALTED, as the selftest driver busy-polls it."""
        deadline = time.monotonic() + timeout
        while (status := self.status()) not in (DONE, HALTED):
            assert time.monotonic() < deadline, f"channel still in state {status}"
        return status

    def pending(self) -> int:
        try:
            return os.eventfd_read(self.efd)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        os.close(self.efd)
        self.buf.close()


@pytest.fixture
def rig(mount):
    with IommuFd(mount.iommu) as iommu, VfioDevice(ioat_node(mount)) as dev:
        dev.bind_iommufd(iommu)
        rig = Rig(iommu, dev)
        try:
            rig.reset_channel()
            rig.wr(0x03, 0x08, 1)  # INTRCTRL: MSIX_VECTOR_CONTROL
            yield rig
        finally:
            rig.close()


def descriptor(size: int, src: int, dst: int, nxt: int, ctl: int = 0) -> bytes:
    return struct.pack("<IIQQQ", size, ctl, src, dst, nxt) + bytes(32)


DESC, SRC, DST = IOVA, IOVA + PAGE, IOVA + 2 * PAGE


def sparse_areas(fd: int, index: int) -> list[tuple[int, int]]:
    """The SPARSE_MMAP areas GET_REGION_INFO reports for region ``index``."""
    buf = bytearray(512)
    struct.pack_into("<II", buf, 0, len(buf), 0)
    struct.pack_into("<I", buf, 8, index)
    assert ioctl(fd, vc.VFIO_DEVICE_GET_REGION_INFO, buf) == 0
    at, areas = struct.unpack_from("<I", buf, 12)[0], []
    while at:
        cap_id, _, nxt = struct.unpack_from("<HHI", buf, at)
        if cap_id == vc.VFIO_REGION_INFO_CAP_SPARSE_MMAP:
            (count,) = struct.unpack_from("<I", buf, at + 8)
            areas = [struct.unpack_from("<QQ", buf, at + 16 + 16 * i) for i in range(count)]
        at = nxt
    return areas


def test_identity_regions_and_config(mount):
    with mount.bound(ioat_node(mount)) as dev:
        cfg = dev.read(CFG, 0, 64)
        assert cfg[0:4] == bytes.fromhex("86802120")
        assert cfg[8] == 0x04 and cfg[9:12] == bytes([0x00, 0x80, 0x08])  # rev 4, class 0x0880
        info = dev.get_region_info(CFG)
        assert info.size == 4096  # PCI Express: extended config space
        # DMAUNCERRSTS and CHANERR_INT answer 4-byte accesses (and read 0: see the model's docstring)
        assert dev.read(CFG, 0x148, 4) == bytes(4) and dev.read(CFG, 0x180, 4) == bytes(4)
        assert os.pwrite(dev.fd, bytes(4), (CFG << 40) + 0x180) == 4
        bar0 = dev.get_region_info(0)
        assert bar0.size == 16 * 1024 and bar0.flags & vc.VFIO_REGION_INFO_FLAG_MMAP
        # page 0 (the registers) is outside the sparse areas, so the interposition library traps it
        assert sparse_areas(dev.fd, 0) == [(0x1000, 0x3000)]
        assert dev.get_irq_info(MSIX).count == 1
        assert os.pread(dev.fd, 1, 0x08) == b"\x33"  # VER: what the selftest driver's probe reads
        assert os.pread(dev.fd, 1, 0x01) == b"\x0c"  # XFERCAP: 4 KiB


def test_power_on_channel_is_halted(rig):
    assert rig.rd(CHANSTS, 8) == HALTED and rig.rd(CHANERR) == 0


def test_memcpy_with_msix_completion(rig):
    data = bytes((i * 37 + 11) & 0xFF for i in range(PAGE))
    rig.put(SRC, data)
    rig.put(DST, b"y" * PAGE)
    rig.put(DESC, descriptor(PAGE, SRC, DST, DESC, ctl=0x1))  # int_en
    rig.kick(DESC, 1)
    ready, _, _ = select.select([rig.efd], [], [], 10)
    assert ready, "no MSI-X interrupt"
    assert os.eventfd_read(rig.efd) == 1
    assert rig.get(DST, PAGE) == data
    assert rig.rd(CHANSTS, 8) == DESC | DONE
    rig.wr(CHANCMD, 0x04, 1)  # SUSPEND, as the selftest driver does after each copy
    assert rig.status() == SUSPENDED
    assert rig.pending() == 0  # exactly one interrupt


def test_memcpy_repeated_without_interrupt(rig):
    rig.put(SRC, b"x" * 512)
    for _ in range(3):  # the selftest driver re-kicks the same descriptor every time
        rig.put(DST, b"y" * 512)
        rig.put(DESC, descriptor(512, SRC, DST, DESC))
        rig.kick(DESC, 1000)
        assert rig.wait() == DONE
        assert rig.get(DST, 512) == b"x" * 512
        rig.wr(CHANCMD, 0x04, 1)
        assert rig.status() == SUSPENDED
    assert rig.pending() == 0


def test_unmapped_source_halts_and_recovers(rig):
    rig.put(DST, b"y" * 64)
    rig.put(DESC, descriptor(64, UNMAPPED, DST, DESC, ctl=0x1))
    rig.kick(DESC, 1)
    assert rig.wait() == HALTED
    assert rig.rd(CHANERR) == 0x1  # SRC_ADDR_ERR
    assert rig.get(DST, 64) == b"y" * 64 and rig.pending() == 0
    rig.reset_channel()
    assert rig.rd(CHANERR) == 0
    rig.put(SRC, b"z" * 64)
    rig.put(DESC, descriptor(64, SRC, DST, DESC))
    rig.kick(DESC, 1)
    assert rig.wait() == DONE and rig.get(DST, 64) == b"z" * 64


def test_close_resets_the_device(mount):
    node = ioat_node(mount)
    with IommuFd(mount.iommu) as iommu:
        with VfioDevice(node) as dev:
            dev.bind_iommufd(iommu)
            assert os.pwrite(dev.fd, (0x4000).to_bytes(8, "little"), CHAINADDR) == 8
        with VfioDevice(node) as dev:  # the release of the first handle may arrive a little later
            assert wait_until(lambda: try_bind(dev, iommu))
            assert int.from_bytes(os.pread(dev.fd, 8, CHAINADDR), "little") == 0
            assert int.from_bytes(os.pread(dev.fd, 8, CHANSTS), "little") == HALTED


