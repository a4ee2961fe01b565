"""Through a real mount: IOAS_MAP/UNMAP/IOVA_RANGES with the kernel's errnos, device DMA into the
driver's own memory, DMA faults, and the refusals that keep the daemon out of other processes."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import secrets

import pytest

from support import errno_of, run_dma
from vfiofs import client as vc
from vfiofs.host import fdpass
from vfiofs.abi import protocol
from vfiofs.client import IommuFd, VfioDevice, ioctl

PAGE = 4096
R, W, FIXED = vc.IOMMU_IOAS_MAP_READABLE, vc.IOMMU_IOAS_MAP_WRITEABLE, vc.IOMMU_IOAS_MAP_FIXED_IOVA
U64_MAX = (1 << 64) - 1


@pytest.fixture
def dmamount(models_mount):
    return models_mount


@pytest.fixture
def iommu(mount):
    with IommuFd(mount.iommu) as handle:
        yield handle


def address(buffer) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def map_cmd(ioas: int, user_va: int, length: int, iova: int = 0, flags: int = R | W | FIXED, **kw):
    return vc.iommu_ioas_map(size=kw.pop("size", 40), flags=flags, ioas_id=ioas, user_va=user_va, length=length,
                             iova=iova, **kw)


def map_errno(iommu: IommuFd, cmd) -> int:
    return errno_of(ioctl, iommu.fd, vc.IOMMU_IOAS_MAP, cmd)


# -- IOAS commands -----------------------------------------------------------------------------

def test_36_ioas_map_errnos(iommu):
    ioas = iommu.ioas_alloc()
    buf = mmap.mmap(-1, 4 * PAGE)
    va = address(buf)
    assert map_errno(iommu, map_cmd(ioas, va, PAGE, 0x10000, flags=FIXED)) == errno.EINVAL  # neither R nor W
    assert map_errno(iommu, map_cmd(ioas, va, PAGE, 0x10000, flags=R | (1 << 3))) == errno.EOPNOTSUPP
    assert map_errno(iommu, map_cmd(ioas, va, PAGE, 0x10000, __reserved=1)) == errno.EOPNOTSUPP
    assert map_errno(iommu, map_cmd(ioas, va, PAGE, U64_MAX)) == errno.EOVERFLOW
    assert map_errno(iommu, map_cmd(ioas, va, U64_MAX)) == errno.EOVERFLOW
    assert map_errno(iommu, map_cmd(999, va, PAGE, 0x10000)) == errno.ENOENT
    assert map_errno(iommu, map_cmd(ioas, va, 0, 0x10000)) == errno.EINVAL
    assert map_errno(iommu, map_cmd(ioas, va, 100, 0x10000)) == errno.EINVAL  # length not page-aligned
    assert map_errno(iommu, map_cmd(ioas, va, PAGE, 0x10010)) == errno.EINVAL  # iova not page-aligned
    assert map_errno(iommu, map_cmd(ioas, va + 8, PAGE, 0x10000)) == errno.EINVAL  # user_va not page-aligned
    assert map_errno(iommu, map_cmd(ioas, va, PAGE, 1 << 48)) == errno.EINVAL  # beyond the aperture
    assert map_errno(iommu, map_cmd(ioas, va, PAGE, 0x10000, size=39)) == errno.EINVAL
    tail = bytearray(bytes(map_cmd(ioas, va, PAGE, 0x10000, size=48)) + b"\0" * 7 + b"\1")
    assert errno_of(ioctl, iommu.fd, vc.IOMMU_IOAS_MAP, tail) == errno.E2BIG
    assert iommu.map(ioas, va, 2 * PAGE, 0x10000) == 0x10000
    assert map_errno(iommu, map_cmd(ioas, va, PAGE, 0x11000)) == errno.EEXIST  # overlaps
    auto = iommu.map(ioas, va + 2 * PAGE, PAGE)  # no FIXED_IOVA: the IOMMU picks, never 0
    assert auto != 0 and auto % PAGE == 0 and not 0x10000 <= auto < 0x12000
    # memory the process does not have, or cannot write
    assert map_errno(iommu, map_cmd(ioas, PAGE, PAGE, 0x40000)) == errno.EFAULT
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    readonly = libc.mmap(None, PAGE, mmap.PROT_READ, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    assert map_errno(iommu, map_cmd(ioas, readonly, PAGE, 0x50000)) == errno.EFAULT  # WRITEABLE on read-only
    assert iommu.map(ioas, readonly, PAGE, 0x50000, writeable=False) == 0x50000  # READABLE only is fine


def test_37_ioas_unmap(iommu):
    ioas = iommu.ioas_alloc()
    assert iommu.unmap(ioas) == 0  # unmap-all on an empty IOAS succeeds
    buf = mmap.mmap(-1, 4 * PAGE)
    iommu.map(ioas, address(buf), 2 * PAGE, 0x10000)
    iommu.map(ioas, address(buf) + 2 * PAGE, 2 * PAGE, 0x20000)
    assert errno_of(iommu.unmap, ioas, 0x10000, PAGE) == errno.ENOENT  # would split a mapping
    assert errno_of(iommu.unmap, ioas, 0x30000, PAGE) == errno.ENOENT  # nothing there
    assert errno_of(iommu.unmap, ioas, U64_MAX, PAGE) == errno.EOVERFLOW
    assert errno_of(iommu.unmap, 999, 0x10000, PAGE) == errno.ENOENT
    assert iommu.unmap(ioas, 0x10000, 2 * PAGE) == 2 * PAGE
    assert iommu.unmap(ioas) == 2 * PAGE  # the rest
    assert iommu.unmap(ioas) == 0


def test_iova_ranges(iommu):
    ioas = iommu.ioas_alloc()
    ranges, alignment = iommu.iova_ranges(ioas)
    assert ranges == [(0, (1 << 48) - 1)] and alignment == PAGE
    cmd = vc.iommu_ioas_iova_ranges(size=32, ioas_id=ioas, num_iovas=0)
    assert errno_of(ioctl, iommu.fd, vc.IOMMU_IOAS_IOVA_RANGES, cmd) == errno.EMSGSIZE
    assert cmd.num_iovas == 1  # the kernel tells how many there are
    bad = vc.iommu_ioas_iova_ranges(size=32, ioas_id=ioas, num_iovas=4, allowed_iovas=PAGE)
    assert errno_of(ioctl, iommu.fd, vc.IOMMU_IOAS_IOVA_RANGES, bad) == errno.EFAULT
    reserved = vc.iommu_ioas_iova_ranges(size=32, ioas_id=ioas, **{"__reserved": 1})
    assert errno_of(ioctl, iommu.fd, vc.IOMMU_IOAS_IOVA_RANGES, reserved) == errno.EOPNOTSUPP
    assert errno_of(ioctl, iommu.fd, vc.IOMMU_IOAS_IOVA_RANGES, vc.iommu_ioas_iova_ranges(size=32, ioas_id=77)) \
        == errno.ENOENT


# -- device DMA ---------------------------------------------------------------------------------

@pytest.fixture
def dma(dmamount):
    """(device, iommu, ioas): the DMA test device bound and attached to a fresh IOAS."""
    iommu = IommuFd(dmamount.iommu)
    dev = VfioDevice(dmamount.device(0))
    dev.bind_iommufd(iommu)
    ioas = iommu.ioas_alloc()
    dev.attach_iommufd_pt(ioas)
    yield dev, iommu, ioas
    dev.close()
    iommu.close()



def test_device_dma_reads_and_writes_the_drivers_memory(dma):
    dev, iommu, ioas = dma
    buf = mmap.mmap(-1, 2 * PAGE)
    iova = iommu.map_buffer(ioas, buf, iova=0x100000)
    pattern = secrets.token_bytes(2 * PAGE)
    buf[:] = pattern
    assert run_dma(dev, 1, iova, 2 * PAGE) == 0  # device reads the driver's buffer
    assert dev.read(2, 0, 2 * PAGE) == pattern
    dev.write(2, 0, b"from the device" + bytes(2 * PAGE - 15))
    assert run_dma(dev, 2, iova + 100, 15) == 0  # device writes into it
    assert buf[100:115] == b"from the device"
    assert buf[:100] == pattern[:100] and buf[115:] == pattern[115:]  # not a byte more


def test_dma_faults_never_touch_what_is_not_mapped(dma):
    dev, iommu, ioas = dma
    buf = mmap.mmap(-1, 3 * PAGE)
    buf[:] = b"\x11" * (3 * PAGE)
    iommu.map(ioas, address(buf), PAGE, 0x100000)  # only the first page
    assert run_dma(dev, 1, 0x200000, 16) == 1  # unmapped IOVA
    dev.write(2, 0, b"\x99" * (2 * PAGE))
    assert run_dma(dev, 2, 0x100000 + PAGE - 8, 16) == 1  # crosses the end of the mapping
    assert buf[:] == b"\x11" * (3 * PAGE)  # nothing written, not even the part that was mapped
    assert run_dma(dev, 1, 0x100000 + PAGE - 8, 16) == 1
    ro = mmap.mmap(-1, PAGE)
    iommu.map(ioas, address(ro), PAGE, 0x300000, writeable=False)
    assert run_dma(dev, 1, 0x300000, 8) == 0
    assert run_dma(dev, 2, 0x300000, 8) == 1  # a write to a read-only mapping
    assert ro[:8] == bytes(8)


def test_unmap_and_detach_stop_dma(dma):
    dev, iommu, ioas = dma
    buf = mmap.mmap(-1, PAGE)
    iommu.map_buffer(ioas, buf, iova=0x100000)
    assert run_dma(dev, 1, 0x100000, 8) == 0
    iommu.unmap(ioas, 0x100000, PAGE)
    assert run_dma(dev, 1, 0x100000, 8) == 1
    iommu.map_buffer(ioas, buf, iova=0x100000)
    dev.detach_iommufd_pt()
    assert run_dma(dev, 1, 0x100000, 8) == 1  # detached: no address space at all
    dev.attach_iommufd_pt(ioas)
    assert run_dma(dev, 1, 0x100000, 8) == 0


def test_dma_reaches_the_process_that_mapped_and_faults_once_it_is_gone(dma):
    """The IOMMU maps the *mapping* process's memory: a forked child maps its own buffer into
    the shared iommufd context, the device reads it, and after the child exits DMA faults."""
    dev, iommu, ioas = dma
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            buf = mmap.mmap(-1, PAGE)
            buf[0:6] = b"child!"
            iommu.map_buffer(ioas, buf, iova=0x700000)
            os.write(ready_w, b"1")
            os.read(go_r, 1)
        finally:
            os._exit(0)
    assert os.read(ready_r, 1) == b"1"
    assert run_dma(dev, 1, 0x700000, 6) == 0
    assert dev.read(2, 0, 6) == b"child!"
    os.write(go_w, b"1")
    os.waitpid(pid, 0)
    assert run_dma(dev, 1, 0x700000, 6) == 1  # the process is gone: a fault, not someone else's memory
    for fd in (ready_r, ready_w, go_r, go_w):
        os.close(fd)


# -- the refusals -------------------------------------------------------------------------------

def raw_map(iommu: IommuFd, cmd, fds: dict) -> None:
    message = protocol.encode_request(protocol.Request(protocol.OP_IOCTL, vc.IOMMU_IOAS_MAP, protocol.ARG_BUFFER,
                                                       payload=bytes(cmd), fds=fds))
    os.pwrite(iommu.fd, message, protocol.control_offset(77))


def test_the_daemon_refuses_a_map_whose_process_it_cannot_prove(iommu):
    ioas = iommu.ioas_alloc()
    buf = mmap.mmap(-1, PAGE)
    cmd = map_cmd(ioas, address(buf), PAGE, 0x100000)
    assert errno_of(raw_map, iommu, cmd, {}) == errno.EPERM  # no proof at all
    forged = {0: protocol.FdRef(protocol.FD_PROCESS, secrets.token_bytes(16))}
    assert errno_of(raw_map, iommu, cmd, forged) == errno.EPERM  # a parcel id nobody deposited


@pytest.mark.skipif(os.geteuid() != 0, reason="depositing as another user needs root")
def test_a_parcel_from_another_user_is_refused(iommu):
    """Even a root daemon never maps one user's memory for another user's handle."""
    ioas = iommu.ioas_alloc()
    buf = mmap.mmap(-1, PAGE)
    channel = vc._channel_name(iommu.fd)
    parcel = secrets.token_bytes(16)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child: become nobody and deposit a proof of itself
        try:
            os.setgid(65534)
            os.setuid(65534)
            fdpass.deposit(channel, parcel, {})
        finally:
            os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    cmd = map_cmd(ioas, address(buf), PAGE, 0x100000)
    assert errno_of(raw_map, iommu, cmd, {0: protocol.FdRef(protocol.FD_PROCESS, parcel)}) == errno.EPERM
