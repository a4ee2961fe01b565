"""R6: DMA misuse is refused every time and reported in the trace (docs/reliability.md).

Mappings (IOMMU_IOAS_MAP on the iommu node, VFIO_IOMMU_MAP_DMA on a type1 container) of
memory the caller does not have: an address valid only in another process, one no process
has, a page unmapped again, a read-only page mapped writable, a PROT_NONE page, and memory
backed by a file of the mount itself (which the daemon could only fault in by asking itself). Device DMA
(the bundled edu model's engine) from an unmapped IOVA, into a read-only mapping, from the
memory of a process that has exited, and from memory the process turned into a file of the
mount after mapping it. Each must be refused (EFAULT for a mapping, a DMA
fault for the device, and the memory untouched), and each must appear in .vfiofs/trace: the
command with its errno, or the device's DMA fault.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os

from harness import Watchdog, count, crashes_in_log, record
from support import node_by_ids, wait_until
from vfiofs import client as vc

PAGE = 4096
EDU_BUFFER = 0x40000
DMA_SRC, DMA_DST, DMA_COUNT, DMA_CMD = 0x80, 0x88, 0x90, 0x98
DMA_START, DMA_TO_RAM = 0x01, 0x02

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def anonymous(prot: int, address: int = 0) -> int:
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (0x100000 if address else 0)  # MAP_FIXED_NOREPLACE
    va = libc.mmap(address or None, PAGE, prot, flags, -1, 0)
    assert va not in (None, ctypes.c_void_p(-1).value), f"mmap failed: {ctypes.get_errno()}"
    return va


def mapped_here(va: int) -> bool:
    with open("/proc/self/maps") as maps:
        for line in maps:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            if start <= va < end:
                return True
    return False


class Trace:
    """.vfiofs/trace, subscribed before anything happens; events read as they come."""

    def __init__(self, mount) -> None:
        self.fd = os.open(mount.node(".vfiofs/trace"), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self.pending = b""

    def events(self) -> list[dict]:
        out = []
        while True:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                break
            self.pending += chunk
        *lines, self.pending = self.pending.split(b"\n")
        for line in lines:
            if line:
                out.append(json.loads(line))
        return out

    def close(self) -> None:
        os.close(self.fd)


class Tally:
    def __init__(self, trace: Trace, watchdog: Watchdog) -> None:
        self.trace, self.watchdog = trace, watchdog
        self.attempts = self.refused = self.traced = 0
        self.failures: list[str] = []

    def mapping(self, what: str, fn, expected: int, command: str) -> None:
        """A mapping that must fail with ``expected`` and show up as ``command`` with that errno."""
        self.attempts += 1
        self.trace.events()  # what happened before is not this attempt's
        with self.watchdog.op(what):
            try:
                fn()
                err = 0
            except OSError as exc:
                err = exc.errno
        if err == expected:
            self.refused += 1
        else:
            self.failures.append(f"{what}: {errno.errorcode.get(err, 'success')}, expected "
                                 f"{errno.errorcode[expected]}")
        name = errno.errorcode[expected]
        if any(e.get("op") == "ioctl" and command in e.get("command", "") and e.get("errno") == name
               for e in self.trace.events()):
            self.traced += 1
        else:
            self.failures.append(f"{what}: no '{command} {name}' in the trace")

    def dma(self, what: str, start, faulted, untouched) -> None:
        """Device DMA that must fault, leave memory alone, and show up as a DMA fault in the trace."""
        self.attempts += 1
        self.trace.events()
        with self.watchdog.op(what):
            start()
        events: list[dict] = []

        def fault_seen() -> bool:  # the DMA completes on the daemon's timer
            events.extend(self.trace.events())
            return faulted() and any(e.get("op") == "dma" and "fault" in e for e in events)

        wait_until(fault_seen, timeout=5)
        events += self.trace.events()
        if faulted() and untouched():
            self.refused += 1
        else:
            self.failures.append(f"{what}: the DMA was not refused (faulted={faulted()}, untouched={untouched()})")
        if any(e.get("op") == "dma" and "fault" in e for e in events):
            self.traced += 1
        else:
            self.failures.append(f"{what}: no DMA fault in the trace")


def test_dma_misuse_is_refused_and_traced(mount):
    rounds = count(1, 40)
    trace = Trace(mount)
    watchdog = Watchdog(mount)
    tally = Tally(trace, watchdog)
    try:
        for _ in range(rounds):
            misuse_round(mount, tally)
    finally:
        watchdog.close()
        trace.close()
    record("R6", attempts=tally.attempts, refused=tally.refused, traced=tally.traced, rounds=rounds)
    assert not tally.failures, "\n".join(tally.failures[:20])
    assert tally.refused == tally.traced == tally.attempts
    assert not crashes_in_log(mount)


def other_process_page() -> tuple[int, int, int]:
    """A child with a page at an address this process does not have: (pid, address, go_fd)."""
    hint = 0x6F0000000000
    while mapped_here(hint):
        hint += 1 << 30
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            va = anonymous(mmap.PROT_READ | mmap.PROT_WRITE, hint)
            ctypes.memset(va, 0x5A, PAGE)
            os.write(ready_w, va.to_bytes(8, "little"))
            os.read(go_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(go_r)
    va = int.from_bytes(os.read(ready_r, 8), "little")
    os.close(ready_r)
    assert not mapped_here(va)
    return pid, va, go_w


def misuse_round(mount, tally: Tally) -> None:
    rw, ro, none = mmap.PROT_READ | mmap.PROT_WRITE, mmap.PROT_READ, 0  # PROT_NONE
    readonly, noaccess = anonymous(ro), anonymous(none)
    gone = anonymous(rw)
    libc.munmap(gone, PAGE)
    pid, theirs, go = other_process_page()
    config = next((mount.path / "sys/bus/pci/devices").iterdir()) / "config"
    fd = os.open(config, os.O_RDONLY)
    ours = libc.mmap(None, PAGE, ro, mmap.MAP_PRIVATE, fd, 0)  # never touched: a DMA would fault it in
    os.close(fd)
    try:
        cases = [("another process's page", theirs, True), ("a page nobody has", PAGE, True),
                 ("a page unmapped again", gone, True), ("a read-only page, writable", readonly, True),
                 ("a PROT_NONE page", noaccess, False), ("a file of the mount itself", ours, False)]
        with vc.IommuFd(mount.iommu) as iommu:
            ioas = iommu.ioas_alloc()
            for i, (what, va, writable) in enumerate(cases):
                tally.mapping(f"IOMMU_IOAS_MAP of {what}",
                              lambda: iommu.map(ioas, va, PAGE, 0x100000 + i * PAGE, writeable=writable),
                              errno.EFAULT, "IOMMU_IOAS_MAP")
        with vc.VfioContainer(mount.node("vfio/vfio")) as container, vc.VfioGroup(mount.node("vfio/0")) as group:
            group.set_container(container)
            container.set_iommu(vc.VFIO_TYPE1v2_IOMMU)
            for i, (what, va, writable) in enumerate(cases):
                tally.mapping(f"VFIO_IOMMU_MAP_DMA of {what}",
                              lambda: container.map_dma(va, 0x100000 + i * PAGE, PAGE, write=writable),
                              errno.EFAULT, "VFIO_IOMMU_MAP_DMA")
    finally:
        os.write(go, b"1")
        os.close(go)
        os.waitpid(pid, 0)
        libc.munmap(readonly, PAGE)
        libc.munmap(noaccess, PAGE)
        libc.munmap(ours, PAGE)
    device_dma_round(mount, tally)


def device_dma_round(mount, tally: Tally) -> None:
    edu_path = node_by_ids(mount, 0x1234, 0x11E8)
    with vc.IommuFd(mount.iommu) as iommu, vc.VfioDevice(edu_path) as edu:
        edu.bind_iommufd(iommu)
        ioas = iommu.ioas_alloc()
        edu.attach_iommufd_pt(ioas)

        def w64(offset: int, value: int) -> None:
            edu.write(0, offset, value.to_bytes(8, "little"))

        def run(src: int, dst: int, size: int, command: int) -> None:
            w64(DMA_SRC, src)
            w64(DMA_DST, dst)
            w64(DMA_COUNT, size)
            w64(DMA_CMD, command)

        def done() -> bool:
            return not int.from_bytes(edu.read(0, DMA_CMD, 8), "little") & DMA_START

        # the device's buffer holds a pattern a faulting read must not replace
        pattern = bytes(range(256)) * 16
        buf = mmap.mmap(-1, PAGE)
        buf[:] = pattern
        iommu.map_buffer(ioas, buf, iova=0x200000)
        run(0x200000, EDU_BUFFER, PAGE, DMA_START)  # a good read fills the device buffer
        wait_until(done, timeout=5)
        ro = mmap.mmap(-1, PAGE)
        ro[:] = b"\x33" * PAGE
        iommu.map_buffer(ioas, ro, iova=0x300000, writeable=False)
        tally.dma("edu DMA from an unmapped IOVA", lambda: run(0x900000, EDU_BUFFER, 64, DMA_START), done,
                  lambda: True)
        tally.dma("edu DMA into a read-only mapping", lambda: run(EDU_BUFFER, 0x300000, 64, DMA_START | DMA_TO_RAM),
                  done, lambda: ro[:] == b"\x33" * PAGE)
        tally.dma("edu DMA that runs past the end of a mapping",
                  lambda: run(EDU_BUFFER, 0x200000 + PAGE - 32, 64, DMA_START | DMA_TO_RAM),
                  done, lambda: buf[:] == pattern)
        # memory of a process that has exited: it mapped its page, then went away
        child_iova = 0x400000
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                page = mmap.mmap(-1, PAGE)
                page[:8] = b"childmem"
                iommu.map_buffer(ioas, page, iova=child_iova)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)

        def nothing_of_the_child() -> bool:
            """Copy the device buffer back to our own page: it must not hold the child's bytes."""
            run(EDU_BUFFER, 0x200000, 8, DMA_START | DMA_TO_RAM)
            wait_until(done, timeout=5)
            return buf[:8] != b"childmem"

        tally.dma("edu DMA from the memory of a process that exited",
                  lambda: run(child_iova, EDU_BUFFER, 8, DMA_START), done, nothing_of_the_child)
        # memory that became a file of the mount after it was mapped (mmap MAP_FIXED over it)
        va = anonymous(mmap.PROT_READ | mmap.PROT_WRITE)
        iommu.map(ioas, va, PAGE, 0x500000, writeable=False)
        config = next((mount.path / "sys/bus/pci/devices").iterdir()) / "config"
        fd = os.open(config, os.O_RDONLY)
        assert libc.mmap(va, PAGE, mmap.PROT_READ, mmap.MAP_PRIVATE | 0x10, fd, 0) == va  # MAP_FIXED
        os.close(fd)
        tally.dma("edu DMA from memory remapped to a file of the mount",
                  lambda: run(0x500000, EDU_BUFFER, 64, DMA_START), done, lambda: True)
        libc.munmap(va, PAGE)
        iommu.unmap(ioas)
        edu.detach_iommufd_pt()
