"""Reproducers of what the stress tests found, each kept as the regression test of its fix."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

from harness import Watchdog, crashes_in_log
from support import errno_of, wait_until
from vfiofs import client as vc

PAGE = 4096
TRIGGER_EVENTFD = vc.VFIO_IRQ_SET_DATA_EVENTFD | vc.VFIO_IRQ_SET_ACTION_TRIGGER


def test_set_irqs_naming_a_file_of_the_mount_as_its_eventfd_does_not_hang_the_daemon(mount):
    """R1 finding: the daemon closed the descriptor it was passed (not an eventfd) on its event
    loop; close() of a file of its own mount waits for the FLUSH that only that loop answers."""
    watchdog = Watchdog(mount)
    try:
        with mount.bound(0) as dev, vc.IommuFd(mount.iommu) as other, open(mount.node(".vfiofs/status")) as status:
            for fd in (other.fd, dev.fd, status.fileno()):
                with watchdog.op(f"SET_IRQS with fd {fd} of the mount as the eventfd"):
                    assert errno_of(dev.set_irqs, vc.VFIO_PCI_MSI_IRQ_INDEX, TRIGGER_EVENTFD, 0, data=[fd]) \
                        == errno.EINVAL
                with watchdog.op("GET_INFO after it"):
                    assert dev.get_info().num_regions == 9
    finally:
        watchdog.close()
    assert not crashes_in_log(mount)


def _map_file(path: str, prot: int = mmap.PROT_READ) -> int:
    """A private mapping of the first page of ``path``, never touched here: its address."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    fd = os.open(path, os.O_RDONLY)
    try:
        va = libc.mmap(None, PAGE, prot, mmap.MAP_PRIVATE, fd, 0)
    finally:
        os.close(fd)
    assert va not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    return va


def test_memory_backed_by_a_file_of_the_mount_is_refused_for_dma(mount, tmp_path):
    """R6 finding: IOMMU_IOAS_MAP accepted a private mapping of a file of the mount itself (a sys/
    attribute); the first DMA faulted that page in from inside the daemon, which sent a FUSE READ
    to itself and hung. IOVA_RANGES writing its result there hung the same way."""
    config = next((mount.path / "sys/bus/pci/devices").iterdir()) / "config"
    ours = _map_file(str(config))
    other = tmp_path / "elsewhere"
    other.write_bytes(b"\x01" * PAGE)
    theirs = _map_file(str(other))  # a file of another filesystem is memory like any other
    watchdog = Watchdog(mount)
    try:
        with vc.IommuFd(mount.iommu) as iommu:
            ioas = iommu.ioas_alloc()
            with watchdog.op("IOAS_MAP of a file of the mount"):
                assert errno_of(iommu.map, ioas, ours, PAGE, 0x100000, writeable=False) == errno.EFAULT
            with watchdog.op("IOAS_MAP of a file elsewhere"):
                assert iommu.map(ioas, theirs, PAGE, 0x200000, writeable=False) == 0x200000
            ranges = vc.iommu_ioas_iova_ranges(size=32, ioas_id=ioas, num_iovas=1, allowed_iovas=ours)
            with watchdog.op("IOVA_RANGES into a file of the mount"):
                assert errno_of(vc.ioctl, iommu.fd, vc.IOMMU_IOAS_IOVA_RANGES, ranges) == errno.EFAULT
        with vc.VfioContainer(mount.node("vfio/vfio")) as container, vc.VfioGroup(mount.node("vfio/0")) as group:
            group.set_container(container)
            container.set_iommu(vc.VFIO_TYPE1v2_IOMMU)
            with watchdog.op("MAP_DMA of a file of the mount"):
                assert errno_of(container.map_dma, ours, 0x100000, PAGE, write=False) == errno.EFAULT
        with watchdog.op("a request after them"), vc.IommuFd(mount.iommu) as iommu:
            assert iommu.ioas_alloc() >= 1
    finally:
        watchdog.close()
    assert not crashes_in_log(mount)


def test_a_file_of_the_mount_mapped_over_dma_memory_faults_the_dma_instead_of_hanging(mount):
    """Open finding 2 (then fixed): the mapping was checked when it was made, but the process can
    mmap(MAP_FIXED) a file of the mount over it afterwards. The next DMA faulted that page in from
    inside the daemon, which hung waiting for itself. A transfer that would fault a page in now
    checks what backs it, and refuses the mount's own files (a DMA fault)."""
    from support import node_by_ids

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    watchdog = Watchdog(mount)
    try:
        with vc.IommuFd(mount.iommu) as iommu, vc.VfioDevice(node_by_ids(mount, 0x1234, 0x11E8)) as edu:
            edu.bind_iommufd(iommu)
            ioas = iommu.ioas_alloc()
            edu.attach_iommufd_pt(ioas)
            va = libc.mmap(None, PAGE, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
            iommu.map(ioas, va, PAGE, 0x100000, writeable=False)
            config = next((mount.path / "sys/bus/pci/devices").iterdir()) / "config"
            fd = os.open(config, os.O_RDONLY)
            assert libc.mmap(va, PAGE, mmap.PROT_READ, mmap.MAP_PRIVATE | 0x10, fd, 0) == va  # MAP_FIXED
            os.close(fd)
            for offset, value in ((0x80, 0x100000), (0x88, 0x40000), (0x90, 64), (0x98, 1)):  # RAM -> edu
                with watchdog.op(f"edu register {offset:#x}"):
                    edu.write(0, offset, value.to_bytes(8, "little"))
            def dma_done() -> bool:
                with watchdog.op("edu DMA status"):
                    return not int.from_bytes(edu.read(0, 0x98, 8), "little") & 1

            wait_until(dma_done, timeout=4)
            with watchdog.op("GET_INFO after it"):
                assert edu.get_info().num_regions == 9
    finally:
        watchdog.close()
    assert "is now a file of this mount" in mount.daemon.output()  # the DMA fault, logged
    assert not crashes_in_log(mount)
