"""The memory of a client process, for DMA and for ioctl pointers into it.

The daemon must know whose memory a mapping refers to without trusting what the client
says. The client connects to the daemon's fd channel; the kernel tells the daemon who
connected (SO_PEERPIDFD: a pidfd of the peer process, not a number the client chose).
:meth:`ProcessMemory.open` opens ``/proc/<pid>/mem`` and only then checks that the pidfd's
process is still alive. A live process keeps its pid, so the file opened is that
process's memory, and it stays tied to that process (not to the pid) afterwards. Reads
and writes fail (and DMA faults) once the process is gone.

Access needs ptrace rights over the process: the same user (or a root daemon), and with
Yama's ptrace_scope=1 the process must have named the daemon with PR_SET_PTRACER, which
the client library does. Without those rights the map is refused with EPERM.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
from dataclasses import dataclass

from vfiofs.abi import PAGE_SIZE
from vfiofs.errors import VfioError
from vfiofs.host.mounting import mount_device

_PRESENT_BYTES = bytes(range(0x80, 0x100))  # a pagemap entry's last byte with bit 63 set


def pid_of_pidfd(pidfd: int) -> int:
    """The pid a pidfd refers to in this pid namespace (-1: dead or not visible here)."""
    with open(f"/proc/self/fdinfo/{pidfd}") as info:
        for line in info:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    return -1


def alive(pidfd: int) -> bool:
    """A pidfd becomes readable when its process exits. (poll, not select: the daemon's
    descriptors go past FD_SETSIZE.)"""
    readable = select.poll()
    readable.register(pidfd, select.POLLIN)
    return not readable.poll(0)


@dataclass
class Vma:
    start: int
    end: int
    readable: bool
    writable: bool
    device: tuple[int, int] = (0, 0)  # (major, minor) of the file behind it; (0, 0) for anonymous memory


#: (major, minor) of the daemon's own mount, once it is mounted (:func:`refuse_files_of`). Memory
#: backed by a file there is never the daemon's to touch: faulting such a page in sends a FUSE
#: request to the daemon itself, which is busy waiting for that very fault.
OWN_DEVICES: set[tuple[int, int]] = set()


def refuse_files_of(mountpoint: str) -> None:
    """Note the device number of the mount at ``mountpoint`` (read from the mount table: a stat()
    of it would ask the daemon itself)."""
    try:
        device = mount_device(mountpoint)
    except OSError:
        return
    if device is not None:
        OWN_DEVICES.add(device)


class _iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
for _name in ("process_vm_readv", "process_vm_writev"):
    getattr(_libc, _name).argtypes = [ctypes.c_int, ctypes.POINTER(_iovec), ctypes.c_ulong,
                                      ctypes.POINTER(_iovec), ctypes.c_ulong, ctypes.c_ulong]
    getattr(_libc, _name).restype = ctypes.c_ssize_t


class ProcessMemory:
    """The address space of one client process.

    Identity and permission are settled once, at :meth:`open`. Transfers use
    process_vm_readv/writev, which honour the process's page protections, and the pidfd is
    checked before and after each one: a transfer that overlaps the process's exit is
    reported as failed and its data discarded. (Between that check and the syscall the pid
    could only name another process if the kernel handed out that same pid again, which
    takes a full cycle through pid_max.)
    """

    def __init__(self, pid: int, mem_fd: int, pidfd: int = -1) -> None:
        self.pid = pid
        self.mem_fd = mem_fd
        self.pidfd = pidfd
        try:  # which pages are resident (bit 63 of each entry); the same access rights as mem
            self.pagemap_fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self.pagemap_fd = -1

    @classmethod
    def open(cls, pidfd: int) -> "ProcessMemory":
        pid = pid_of_pidfd(pidfd)
        if pid <= 0:
            raise VfioError(errno.EPERM, "the calling process is gone or not visible to the daemon")
        try:
            mem_fd = os.open(f"/proc/{pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise VfioError(errno.EPERM, f"the daemon may not access process {pid}'s memory ({exc.strerror}): "
                            "it needs the same user, and PR_SET_PTRACER under Yama ptrace_scope=1") from None
        if not alive(pidfd):  # opened after the process died: the pid may name someone else now
            os.close(mem_fd)
            raise VfioError(errno.EPERM, "the calling process exited while its memory was being opened")
        return cls(pid, mem_fd, os.dup(pidfd))

    def vmas(self) -> list[Vma]:
        try:
            with open(f"/proc/{self.pid}/maps") as maps:
                lines = maps.read().splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            span, perms, _offset, device = line.split()[:4]
            start, end = (int(x, 16) for x in span.split("-"))
            major, minor = (int(x, 16) for x in device.split(":"))
            out.append(Vma(start, end, perms[0] == "r", perms[1] == "w", (major, minor)))
        return out

    def check_range(self, addr: int, length: int, write: bool) -> None:
        """EFAULT unless [addr, addr+length) is mapped in the process, readable (and writable),
        and none of it is a file of this mount (see :data:`OWN_DEVICES`)."""
        cursor, end = addr, addr + length
        for vma in sorted(self.vmas(), key=lambda v: v.start):
            if vma.end <= cursor or vma.start > cursor:
                continue
            if not vma.readable or (write and not vma.writable) or vma.device in OWN_DEVICES:
                break
            cursor = vma.end
            if cursor >= end:
                return
        raise VfioError(errno.EFAULT, f"{addr:#x}+{length:#x} is not {'writable' if write else 'readable'} "
                        f"memory of process {self.pid}")

    def _resident(self, addr: int, size: int) -> bool:
        """Every page of [addr, addr+size) is in memory now, so a transfer faults nothing in."""
        if self.pagemap_fd < 0:
            return False
        first, last = addr // PAGE_SIZE, (addr + size - 1) // PAGE_SIZE
        try:
            entries = os.pread(self.pagemap_fd, 8 * (last - first + 1), 8 * first)
        except OSError:
            return False
        # bit 63 of every little-endian entry: the top bit of every 8th byte; none may be clear
        return len(entries) == 8 * (last - first + 1) and not entries[7::8].translate(None, _PRESENT_BYTES)

    def _never_through_the_mount(self, addr: int, size: int) -> None:
        """A page the transfer would have to fault in must not be a file of this mount: the daemon
        would wait for itself. The mapping was checked when it was made, but the process may have
        mapped such a file over it since. Resident pages need no fault, so only a transfer that
        touches a page not in memory pays for reading the process's maps."""
        if not OWN_DEVICES or self._resident(addr, size):
            return
        end = addr + size
        for vma in self.vmas():
            if vma.start < end and addr < vma.end and vma.device in OWN_DEVICES:
                raise OSError(errno.EFAULT, "the range is now a file of this mount")

    def _transfer(self, call, addr: int, buffer, size: int) -> None:
        if self.pidfd < 0 or not alive(self.pidfd):
            raise OSError(errno.ESRCH, "the process has exited")
        self._never_through_the_mount(addr, size)
        local = _iovec(ctypes.addressof(ctypes.c_char.from_buffer(buffer)) if size else None, size)
        remote = _iovec(addr, size)
        done = call(self.pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if done < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        if done != size:
            raise OSError(errno.EFAULT, "partial transfer: part of the range is not accessible")
        if not alive(self.pidfd):
            raise OSError(errno.ESRCH, "the process exited during the transfer")

    def read(self, addr: int, size: int) -> bytearray:
        buffer = bytearray(size)  # handed to the model as is: no second copy
        if size:
            self._transfer(_libc.process_vm_readv, addr, buffer, size)
        return buffer

    def write(self, addr: int, data: bytes) -> None:
        if data:
            self._transfer(_libc.process_vm_writev, addr, bytearray(data), len(data))

    def close(self) -> None:
        for attr in ("mem_fd", "pidfd", "pagemap_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)
