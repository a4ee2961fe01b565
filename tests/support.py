"""Shared helpers for the test suite: real mounts in a child process, errno capture."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

REPO = Path(__file__).resolve().parent.parent


def errno_of(fn: Callable[..., object], *args: object, **kwargs: object) -> int:
    """The errno ``fn(*args, **kwargs)`` fails with; fails the test if it succeeds."""
    try:
        fn(*args, **kwargs)
    except OSError as exc:
        return exc.errno
    raise AssertionError(f"{getattr(fn, '__name__', fn)} succeeded, expected an error")


def is_mounted(path: Path) -> bool:
    target = os.fsencode(os.path.realpath(path))
    with open("/proc/self/mounts", "rb") as mounts:
        return any(line.split()[1] == target for line in mounts)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``condition`` (for effects the kernel delivers asynchronously, like FUSE release)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.002)
    return condition()


@dataclass
class Mount:
    path: Path
    process: subprocess.Popen

    def node(self, name: str) -> str:
        return str(self.path / name)

    @property
    def iommu(self) -> str:
        return self.node("iommu")

    def device(self, index: int) -> str:
        return self.node(f"vfio/devices/vfio{index}")

    def alive(self) -> bool:
        return self.process.poll() is None


def start_mount(mountpoint: Path, devices: Path | None = None, options: tuple[str, ...] = (),
                user: int | None = None, state_dir: Path | None = None, pythonpath: Path | None = None) -> Mount:
    """Run ``vfiofs mount -f`` in a child and return once it reports the mount ready."""
    read_end, write_end = os.pipe()
    command = [sys.executable, "-m", "vfiofs", "mount", "-f", "--ready-fd", str(write_end), str(mountpoint),
               "--state-dir", str(state_dir or Path(str(mountpoint) + ".state"))]
    if devices is not None:
        command += ["--devices", str(devices)]
    command += [f"-o{opt}" for opt in options]
    env = None
    if pythonpath is not None:  # where the daemon finds Python models the definitions name
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(pythonpath),
                                                                        os.environ.get("PYTHONPATH")])))
    process = subprocess.Popen(command, pass_fds=(write_end,), cwd=REPO, stderr=subprocess.PIPE, user=user,
                               env=env)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        status = pipe.read()
    if status != b"ready\n":
        process.kill()
        _, err = process.communicate(timeout=10)
        raise RuntimeError(f"mount failed: {status!r} {err.decode(errors='replace')}")
    return Mount(mountpoint, process)


def stop_mount(mount: Mount) -> int:
    """SIGTERM the daemon, wait for it, and make sure the mount is gone."""
    if mount.alive():
        mount.process.send_signal(signal.SIGTERM)
    try:
        mount.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        mount.process.kill()
        mount.process.wait()
    if mount.process.stderr:
        mount.process.stderr.close()
    if is_mounted(mount.path):
        subprocess.run(["fusermount3", "-u", "-z", str(mount.path)], check=False)
    return mount.process.returncode


NOBODY = 65534


def as_nobody(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run a /bin/sh script as uid/gid 65534 with no supplementary groups (needs root)."""
    return subprocess.run(["/bin/sh", "-c", script, "sh", *args], user=NOBODY, group=NOBODY, extra_groups=[],
                          capture_output=True, text=True, cwd="/")


@contextlib.contextmanager
def mounted(mountpoint: Path, devices: Path | None = None, options: tuple[str, ...] = ()) -> Iterator[Mount]:
    mount = start_mount(mountpoint, devices, options)
    try:
        yield mount
    finally:
        stop_mount(mount)


_libc = None


def raw_mmap_errno(fd: int, length: int, shared: bool = True, offset: int = 0) -> int:
    """errno of libc mmap() (Python's mmap module checks st_size first); 0 if it succeeded."""
    import ctypes
    import mmap as _mmap

    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mmap.restype = ctypes.c_void_p
        _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                               ctypes.c_long]
        _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    flags = _mmap.MAP_SHARED if shared else _mmap.MAP_PRIVATE
    address = _libc.mmap(None, length, _mmap.PROT_READ | _mmap.PROT_WRITE, flags, fd, offset)
    if address == ctypes.c_void_p(-1).value:
        return ctypes.get_errno()
    _libc.munmap(address, length)
    return 0


def run_dma(dev, command: int, iova: int, size: int) -> int:
    """Drive the DMA engine of tests/models/irq_test_device: 1 reads IOVA into BAR2, 2 writes
    BAR2 to IOVA. Returns 0 for a good transfer, 1 for a DMA fault."""
    dev.write(0, 0x20, iova.to_bytes(8, "little"))
    dev.write(0, 0x28, size.to_bytes(8, "little"))
    dev.write(0, 0x30, command.to_bytes(4, "little"))
    return int.from_bytes(dev.read(0, 0x38, 4), "little")
