"""Through a real mount: the showcase device (vfio2) as vfio-pci presents it.

Regions and their capabilities, the virtualized config space (capability chain, BAR
and ROM sizing, read-only bits, memory decoding), register semantics and the ROM.
"""

from __future__ import annotations

import errno
import struct

import pytest

from support import errno_of
from vfiofs import client as vc
from vfiofs.client import IommuFd, VfioDevice, ioctl

KiB = 1024
R, W, MMAP, CAPS = (vc.VFIO_REGION_INFO_FLAG_READ, vc.VFIO_REGION_INFO_FLAG_WRITE,
                    vc.VFIO_REGION_INFO_FLAG_MMAP, vc.VFIO_REGION_INFO_FLAG_CAPS)
CFG = vc.VFIO_PCI_CONFIG_REGION_INDEX


@pytest.fixture
def showcase(mount):
    with mount.bound(2) as dev:
        yield dev


def cfg_read(dev: VfioDevice, offset: int, width: int) -> int:
    return int.from_bytes(dev.read(CFG, offset, width), "little")


def cfg_write(dev: VfioDevice, offset: int, width: int, value: int) -> int:
    return dev.write(CFG, offset, value.to_bytes(width, "little"))


def reg(dev: VfioDevice, bar: int, offset: int, width: int = 4) -> int:
    return int.from_bytes(dev.read(bar, offset, width), "little")


# -- regions -------------------------------------------------------------------------------

def test_region_table_like_vfio_pci(showcase):
    info = {i: showcase.get_region_info(i) for i in range(8)}
    assert (info[0].size, info[0].flags) == (4 * KiB, R | W)
    assert (info[1].size, info[1].flags) == (64 * KiB, R | W | MMAP | CAPS)
    assert (info[2].size, info[2].flags) == (1024 * KiB, R | W | MMAP)
    assert (info[3].size, info[3].flags) == (0, 0)  # the upper half of the 64-bit BAR2
    assert (info[4].size, info[4].flags) == (32, R | W)  # I/O BARs are never mappable
    assert (info[5].size, info[5].flags) == (0, 0)
    assert (info[6].size, info[6].flags) == (2 * KiB, R)  # ROM: read-only
    assert (info[7].size, info[7].flags) == (4096, R | W)  # PCI Express: extended config space
    assert all(info[i].offset == i << 40 for i in info)
    assert errno_of(showcase.get_region_info, vc.VFIO_PCI_VGA_REGION_INDEX) == errno.EINVAL
    assert showcase.get_info().num_regions == 9


def test_24_region_caps_argsz_dance(showcase):
    small = vc.vfio_region_info(argsz=32, index=1)
    assert ioctl(showcase.fd, vc.VFIO_DEVICE_GET_REGION_INFO, small) == 0
    needed = small.argsz
    assert needed > 32 and small.cap_offset == 0 and small.flags & CAPS
    buf = bytearray(needed)
    struct.pack_into("<II", buf, 0, needed, 0)
    struct.pack_into("<I", buf, 8, 1)
    assert ioctl(showcase.fd, vc.VFIO_DEVICE_GET_REGION_INFO, buf) == 0
    info = vc.vfio_region_info.from_buffer_copy(buf[:32])
    assert (info.argsz, info.cap_offset) == (needed, 32)
    caps, at = {}, info.cap_offset
    while at:
        cap_id, version, nxt = struct.unpack_from("<HHI", buf, at)
        caps[cap_id] = (version, at)
        at = nxt
    assert set(caps) == {vc.VFIO_REGION_INFO_CAP_SPARSE_MMAP, vc.VFIO_REGION_INFO_CAP_MSIX_MAPPABLE}
    _, sparse_at = caps[vc.VFIO_REGION_INFO_CAP_SPARSE_MMAP]
    nr_areas, _ = struct.unpack_from("<II", buf, sparse_at + 8)
    assert nr_areas == 1 and struct.unpack_from("<QQ", buf, sparse_at + 16) == (0x1000, 0xF000)
    # a BAR without capabilities reports none
    plain = vc.vfio_region_info(argsz=64, index=2)
    ioctl(showcase.fd, vc.VFIO_DEVICE_GET_REGION_INFO, plain)
    assert not plain.flags & CAPS and plain.cap_offset == 0


def test_rom_region(showcase):
    assert showcase.read(6, 0, 2) == b"\x55\xaa"
    assert showcase.read(6, 0x20, 4) == b"PCIR"
    assert len(showcase.read(6, 2 * KiB - 4, 64)) == 4  # crossing the end is a short read
    assert errno_of(showcase.read, 6, 2 * KiB, 4) == errno.EINVAL
    assert errno_of(showcase.write, 6, 0, b"\0\0") == errno.EINVAL


def test_io_bar(showcase):
    assert showcase.write(4, 0, b"\x11\x22\x33\x44") == 4
    assert showcase.read(4, 0, 4) == b"\x11\x22\x33\x44"
    assert errno_of(showcase.read, 4, 32, 1) == errno.EINVAL


# -- config space ------------------------------------------------------------------------------

def test_config_header_and_capability_chain(showcase):
    assert cfg_read(showcase, 0, 4) == 0x5653_1234
    assert cfg_read(showcase, 0x08, 4) == 0xFF00_0002  # class ff0000, revision 2
    assert cfg_read(showcase, 0x3D, 1) == 1  # INTA
    assert cfg_read(showcase, 0x06, 2) & 0x10  # STATUS: capability list
    chain, at = [], cfg_read(showcase, 0x34, 1)
    while at:
        chain.append((cfg_read(showcase, at, 1), at))
        at = cfg_read(showcase, at + 1, 1)
    assert chain == [(0x01, 0x40), (0x05, 0x48), (0x11, 0x60), (0x10, 0x6C)]  # PM, MSI, MSI-X, PCIe
    msi_ctrl = cfg_read(showcase, 0x48 + 2, 2)
    assert (msi_ctrl >> 1) & 7 == 2 and msi_ctrl & 0x80 and msi_ctrl & 0x100  # 4 vectors, 64-bit, maskable
    assert cfg_read(showcase, 0x60 + 2, 2) & 0x7FF == 7  # MSI-X table size 8
    assert cfg_read(showcase, 0x60 + 4, 4) == 0x800 | 1  # table in BAR1 at 0x800
    assert cfg_read(showcase, 0x60 + 8, 4) == 0xC00 | 1
    assert cfg_read(showcase, 0x6C + 2, 2) & 0xF0 == 0  # endpoint
    assert cfg_read(showcase, 0x100, 4) == 0  # no extended capabilities


def test_config_bar_and_rom_sizing(showcase):
    def size_probe(offset: int) -> int:
        cfg_write(showcase, offset, 4, 0xFFFF_FFFF)
        return cfg_read(showcase, offset, 4)

    assert size_probe(0x10) == 0xFFFF_F000  # BAR0: 4 KiB, 32-bit memory
    assert size_probe(0x14) == 0xFFFF_0000  # BAR1: 64 KiB
    assert size_probe(0x18) == 0xFFF0_000C  # BAR2: 1 MiB, 64-bit, prefetchable
    assert size_probe(0x1C) == 0xFFFF_FFFF  # BAR3: the upper half of BAR2
    assert size_probe(0x20) == 0xFFFF_FFE1  # BAR4: 32 bytes of I/O
    assert size_probe(0x24) == 0  # BAR5 not implemented
    assert size_probe(0x30) == 0xFFFF_F801  # ROM: 2 KiB, enable bit kept
    cfg_write(showcase, 0x30, 4, 0xFEB0_0000)
    assert cfg_read(showcase, 0x30, 4) == 0xFEB0_0000


def test_31_read_only_bits_ignore_writes_but_count(showcase):
    before = showcase.read(CFG, 0, 64)
    assert cfg_write(showcase, 0x00, 4, 0xDEAD_BEEF) == 4  # ids
    assert cfg_write(showcase, 0x08, 4, 0xFFFF_FFFF) == 4  # class, revision
    assert cfg_write(showcase, 0x2C, 4, 0) == 4  # subsystem
    assert cfg_write(showcase, 0x34, 1, 0x99) == 1  # capability pointer
    assert cfg_write(showcase, 0x41, 1, 0x00) == 1  # PM's NEXT byte
    after = showcase.read(CFG, 0, 64)
    assert after[0:4] == before[0:4] and after[8:12] == before[8:12] and after[0x2C:0x35] == before[0x2C:0x35]
    assert cfg_read(showcase, 0x41, 1) == 0x48
    # one write spanning COMMAND (writable bits) and STATUS (read-only): only COMMAND changes
    status = cfg_read(showcase, 0x06, 2)
    assert cfg_write(showcase, 0x04, 4, 0xFFFF_FFFF) == 4
    assert cfg_read(showcase, 0x04, 2) == 0x0547 and cfg_read(showcase, 0x06, 2) == status


def test_30_config_access_past_the_end_is_efault(showcase, mount):
    assert errno_of(showcase.read, CFG, 4096, 4) == errno.EFAULT
    assert errno_of(showcase.read, CFG, 4094, 4) == errno.EFAULT
    assert errno_of(showcase.write, CFG, 4095, b"\0\0") == errno.EFAULT
    with IommuFd(mount.iommu) as iommu, VfioDevice(mount.device(0)) as ram:
        ram.bind_iommufd(iommu)
        assert ram.get_region_info(CFG).size == 256  # conventional PCI
        assert errno_of(ram.read, CFG, 256, 1) == errno.EFAULT


def test_pcie_extended_config_space_answers_4_byte_accesses(showcase):
    """A PCI Express function has a 4 KiB config region: without extended capabilities its
    extended space reads zeros and ignores writes, in 1/2/4-byte accesses (the ioat driver's
    DMAUNCERRSTS 0x148 and CHANERR_INT 0x180 among them)."""
    assert showcase.get_region_info(CFG).size == 4096
    for offset in (0x100, 0x148, 0x180, 0xFFC):
        assert showcase.read(CFG, offset, 4) == bytes(4)
        assert cfg_write(showcase, offset, 4, 0xFFFF_FFFF) == 4  # the whole count, as the kernel
        assert cfg_read(showcase, offset, 4) == 0
    assert showcase.read(CFG, 0x181, 1) == b"\0" and showcase.read(CFG, 0x182, 2) == bytes(2)
    assert showcase.read(CFG, 0xF0, 0x20)[:2] == showcase.read(CFG, 0xF0, 2)  # across 0x100
    assert len(showcase.read(CFG, 0xF0, 0x20)) == 0x20
    assert cfg_read(showcase, 0x00, 2) == 0x1234  # conventional space untouched


def test_memory_decoding_gates_bar_access(showcase):
    command = cfg_read(showcase, 0x04, 2)
    assert command & 0x3 == 0x3  # memory and I/O decoding on after open
    cfg_write(showcase, 0x04, 2, command & ~0x2)
    assert errno_of(showcase.read, 0, 0, 4) == errno.EIO
    assert errno_of(showcase.write, 2, 0, b"x") == errno.EIO
    assert showcase.read(4, 0, 1) == b"\0"  # I/O decoding still on
    assert showcase.read(CFG, 0, 2) == b"\x34\x12"  # config space is always reachable
    cfg_write(showcase, 0x04, 2, command & ~0x1)
    assert errno_of(showcase.read, 4, 0, 1) == errno.EIO
    assert reg(showcase, 0, 0) == 0x5356_4656


def test_reset_restores_power_on_config_and_registers(showcase):
    cfg_write(showcase, 0x10, 4, 0xFFFF_FFFF)
    cfg_write(showcase, 0x04, 2, 0)
    cfg_write(showcase, 0x04, 2, 0x3)
    showcase.write(0, 0x04, b"\x01\x02\x03\x04")
    showcase.write(2, 0x100, b"ram")
    showcase.reset()
    assert cfg_read(showcase, 0x10, 4) == 0
    assert reg(showcase, 0, 0x04) == 0
    assert showcase.read(2, 0x100, 3) == bytes(3)


def test_pcie_function_level_reset_through_config(showcase):
    showcase.write(0, 0x04, b"\xaa\xbb\xcc\xdd")
    devctl = 0x6C + 8
    cfg_write(showcase, devctl, 2, cfg_read(showcase, devctl, 2) | 0x8000)
    assert reg(showcase, 0, 0x04) == 0
    assert cfg_read(showcase, devctl, 2) & 0x8000 == 0


# -- trapped registers -------------------------------------------------------------------------

def test_register_access_kinds(showcase):
    assert reg(showcase, 0, 0x00) == 0x5356_4656  # ro
    showcase.write(0, 0x00, b"\0\0\0\0")
    assert reg(showcase, 0, 0x00) == 0x5356_4656
    showcase.write(0, 0x04, (0x1234_5678).to_bytes(4, "little"))  # rw
    assert reg(showcase, 0, 0x04) == 0x1234_5678
    showcase.write(0, 0x06, b"\xff\xff")  # a 2-byte write into the upper half
    assert reg(showcase, 0, 0x04) == 0xFFFF_5678
    assert reg(showcase, 0, 0x08) == 0x3  # w1c
    showcase.write(0, 0x08, (0x1).to_bytes(4, "little"))
    assert reg(showcase, 0, 0x08) == 0x2
    assert reg(showcase, 0, 0x0C) == 0x1  # rc: the first read returns it and clears it
    assert reg(showcase, 0, 0x0C) == 0x0
    showcase.write(0, 0x10, (0xCAFE).to_bytes(4, "little"))  # wo: reads return 0
    assert reg(showcase, 0, 0x10) == 0
    showcase.write(0, 0x18, (0x0123_4567_89AB_CDEF).to_bytes(8, "little"))  # 64-bit rw
    assert reg(showcase, 0, 0x18, 8) == 0x0123_4567_89AB_CDEF
    assert reg(showcase, 0, 0x1C) == 0x0123_4567
    # bytes no register covers are plain memory
    showcase.write(0, 0x200, b"free")
    assert showcase.read(0, 0x200, 4) == b"free"
    # one read across several registers composes them
    assert showcase.read(0, 0x00, 8)[:4] == (0x5356_4656).to_bytes(4, "little")


def test_msix_table_is_hidden_from_region_access(showcase):
    """vfio-pci's excluded range: the table reads 0xFF (the host owns it); the PBA is clear."""
    assert showcase.read(1, 0x800, 8 * 16) == b"\xff" * 128
    assert showcase.read(1, 0x7FE, 4) == bytes(2) + b"\xff\xff"  # an access across the table's start
    assert showcase.read(1, 0xC00, 8) == bytes(8)
