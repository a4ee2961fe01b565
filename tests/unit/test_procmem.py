"""The daemon's view of a client's memory (host/procmem.py) and of passed descriptors (host/fdpass.py):
what keeps the daemon from ever waiting for itself."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import time

import pytest

from vfiofs.errors import VfioError
from vfiofs.host import fdpass, procmem
from vfiofs.host.procmem import ProcessMemory

PAGE = 4096


@pytest.fixture
def own_memory():
    pidfd = os.pidfd_open(os.getpid())
    memory = ProcessMemory.open(pidfd)
    yield memory
    memory.close()
    os.close(pidfd)


def address(buffer) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def test_vmas_carry_the_device_of_the_file_behind_them(own_memory, tmp_path):
    path = tmp_path / "backing"
    path.write_bytes(b"\0" * PAGE)
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), PAGE) as mapped:
        st = os.stat(path)
        vma = next(v for v in own_memory.vmas() if v.start <= address(mapped) < v.end)
        assert vma.device == (os.major(st.st_dev), os.minor(st.st_dev))
    anonymous = mmap.mmap(-1, PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    assert next(v for v in own_memory.vmas() if v.start <= address(anonymous) < v.end).device == (0, 0)


def test_memory_backed_by_a_file_of_the_own_mount_is_refused(own_memory, tmp_path, monkeypatch):
    path = tmp_path / "backing"
    path.write_bytes(b"\0" * PAGE)
    st = os.stat(path)
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), PAGE) as mapped:
        own_memory.check_range(address(mapped), PAGE, write=True)  # another filesystem's file: fine
        monkeypatch.setattr(procmem, "OWN_DEVICES", {(os.major(st.st_dev), os.minor(st.st_dev))})
        with pytest.raises(VfioError) as refused:
            own_memory.check_range(address(mapped), PAGE, write=False)
        assert refused.value.errno == errno.EFAULT
    anonymous = mmap.mmap(-1, PAGE)
    own_memory.check_range(address(anonymous), PAGE, write=True)  # anonymous memory still is


def test_the_device_of_a_mount_comes_from_mountinfo(monkeypatch):
    monkeypatch.setattr(procmem, "OWN_DEVICES", set())
    procmem.refuse_files_of("/proc")
    st = os.stat("/proc")
    assert procmem.OWN_DEVICES == {(os.major(st.st_dev), os.minor(st.st_dev))}


def test_a_passed_descriptor_that_is_no_eventfd_is_closed_off_the_callers_thread():
    """close() of a file of the daemon's own mount waits for the daemon: never on its loop."""
    r, w = os.pipe()
    passed = fdpass.PassedFd(os.dup(r))
    fd = passed.fd
    assert not passed.is_eventfd
    passed.close()
    assert passed.fd == -1
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.fstat(fd)
        except OSError as exc:
            assert exc.errno == errno.EBADF
            break
        time.sleep(0.001)
    else:
        raise AssertionError("the descriptor was never closed")
    efd = fdpass.PassedFd(os.eventfd(0))
    assert efd.is_eventfd
    number = efd.fd
    efd.close()  # an eventfd is closed at once
    with pytest.raises(OSError):
        os.fstat(number)
    os.close(r)
    os.close(w)


def test_a_transfer_that_would_fault_in_a_file_of_the_own_mount_is_refused(own_memory, tmp_path, monkeypatch):
    """Resident pages are read at once; a page not in memory is read only if no file of the
    mount backs it (else the daemon would fault it in through itself)."""
    untouched = mmap.mmap(-1, 2 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    touched = mmap.mmap(-1, PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    touched[:4] = b"here"
    assert not own_memory._resident(address(untouched), 2 * PAGE)
    assert own_memory._resident(address(touched), PAGE)
    path = tmp_path / "backing"
    path.write_bytes(b"file" + bytes(PAGE - 4))
    st = os.stat(path)
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), PAGE, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    va = address(mapped)
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # not in memory, if the kernel agrees
    os.close(fd)
    monkeypatch.setattr(procmem, "OWN_DEVICES", {(os.major(st.st_dev), os.minor(st.st_dev))})
    if not own_memory._resident(va, PAGE):
        with pytest.raises(OSError) as refused:
            own_memory.read(va, 4)
        assert refused.value.errno == errno.EFAULT
    assert mapped[:4] == b"file"  # now it is resident: nothing to fault in, so nothing to refuse
    assert own_memory.read(va, 4) == b"file"
    assert own_memory.read(address(touched), 4) == b"here"
