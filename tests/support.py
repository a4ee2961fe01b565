"""Shared helpers for the test suite: real mounts in a child process, errno capture."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from vfiofs.client import IommuFd, VfioDevice
from vfiofs.host.mounting import MountProcess, is_mounted, start  # noqa: F401 (is_mounted: for the tests)

REPO = Path(__file__).resolve().parent.parent


def errno_of(fn: Callable[..., object], *args: object, **kwargs: object) -> int:
    """The errno ``fn(*args, **kwargs)`` fails with; fails the test if it succeeds."""
    try:
        fn(*args, **kwargs)
    except OSError as exc:
        return exc.errno
    raise AssertionError(f"{getattr(fn, '__name__', fn)} succeeded, expected an error")


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
    """A test's mount: its daemon (a :class:`MountProcess`) and the paths of its nodes."""

    daemon: MountProcess

    @property
    def path(self) -> Path:
        return self.daemon.mountpoint

    @property
    def process(self) -> subprocess.Popen:
        return self.daemon.process

    def node(self, name: str) -> str:
        return str(self.path / name)

    @property
    def iommu(self) -> str:
        return self.node("iommu")

    def device(self, index: int) -> str:
        return self.node(f"vfio/devices/vfio{index}")

    def alive(self) -> bool:
        return self.daemon.alive()

    @contextlib.contextmanager
    def bound(self, node: int | str) -> Iterator[VfioDevice]:
        """Device ``node`` (an index or a node path) bound to a fresh iommufd; both closed after."""
        with IommuFd(self.iommu) as iommu, VfioDevice(self.device(node) if isinstance(node, int) else node) as dev:
            dev.bind_iommufd(iommu)
            yield dev


def start_mount(mountpoint: Path, devices: Path | None = None, options: tuple[str, ...] = (),
                user: int | None = None, state_dir: Path | None = None, pythonpath: Path | None = None) -> Mount:
    """Run ``vfiofs mount -f`` in a child and return once it reports the mount ready
    (:class:`~vfiofs.host.mounting.MountFailed`, a RuntimeError, if it does not)."""
    return Mount(start(mountpoint, devices=devices, state_dir=state_dir or Path(str(mountpoint) + ".state"),
                       options=options, pythonpath=() if pythonpath is None else (pythonpath,), user=user,
                       cwd=REPO))


def stop_mount(mount: Mount) -> int:
    """SIGTERM the daemon, wait for it, and make sure the mount is gone; its exit status."""
    return mount.daemon.stop()


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


class RecordingSink:
    """An interrupt sink for model tests: records what a model drives, in order —
    ``("irq", index, vector)`` messages and ``("intx", asserted)`` levels — and the INTx
    level now. ``irq_type`` is what the model sees as the driver's choice."""

    def __init__(self, irq_type: str = "none") -> None:
        self.irq_type = irq_type
        self.events: list[tuple] = []
        self.level = False

    def raise_irq(self, index: int, vector: int = 0) -> None:
        self.events.append(("irq", index, vector))

    def set_intx(self, asserted: bool) -> None:
        self.level = asserted
        self.events.append(("intx", asserted))

    def take(self) -> list[tuple]:
        """The events since the last take."""
        events, self.events = self.events, []
        return events


async def fuse_errno(coro) -> int:
    """The errno an adapter handler fails with (as a pyfuse3.FUSEError); fails the test if it succeeds."""
    import pyfuse3
    import pytest

    with pytest.raises(pyfuse3.FUSEError) as exc:
        await coro
    return exc.value.errno


class FakeDma:
    """A DMA port for model unit tests: one mapping [iova, iova + size) over a bytearray,
    every access recorded; anything else raises DmaFault, as an unmapped IOVA does."""

    def __init__(self, iova: int, size: int) -> None:
        self.iova, self.memory = iova, bytearray(size)
        self.accesses: list[tuple[str, int, int]] = []

    def _at(self, iova: int, size: int) -> int:
        from vfiofs.models.api import DmaFault

        if not (self.iova <= iova and iova + size <= self.iova + len(self.memory)):
            raise DmaFault(iova, size, "no mapping")
        return iova - self.iova

    def read(self, iova: int, size: int) -> bytes:
        self.accesses.append(("read", iova, size))
        at = self._at(iova, size)
        return bytes(self.memory[at : at + size])

    def write(self, iova: int, data: bytes) -> None:
        self.accesses.append(("write", iova, len(data)))
        at = self._at(iova, len(data))
        self.memory[at : at + len(data)] = data

    def put(self, iova: int, data: bytes) -> None:
        """Fill the driver's memory directly (not a device access)."""
        self.memory[iova - self.iova : iova - self.iova + len(data)] = data

    def get(self, iova: int, size: int) -> bytes:
        return bytes(self.memory[iova - self.iova : iova - self.iova + size])


def node_by_ids(mount: "Mount", vendor: int, device: int) -> str:
    """The vfio/devices/vfioN node of the device with these PCI ids, found in the mount's sysfs."""
    pci = mount.path / "sys/bus/pci/devices"
    for bdf in sorted(os.listdir(pci)):
        ids = [(pci / bdf / name).read_text().strip() for name in ("vendor", "device")]
        if ids == [f"{vendor:#06x}", f"{device:#06x}"]:
            (vfio,) = os.listdir(pci / bdf / "vfio-dev")
            return mount.node(f"vfio/devices/{vfio}")
    raise AssertionError(f"no {vendor:04x}:{device:04x} device in the mount")


def build_c(source: Path, out: Path, *flags: str) -> Path:
    """Compile a C test program from tests/c with the system gcc (the install step puts it there);
    warnings are errors. Fails the test, with gcc's messages, if it does not build."""
    done = subprocess.run(["gcc", "-Wall", "-Wextra", "-Werror", *flags, "-o", str(out), str(source), "-pthread"],
                          capture_output=True, text=True)
    assert done.returncode == 0, f"gcc failed on {source.name}:\n{done.stderr}"
    return out


def preload_env(mount: "Mount") -> dict[str, str]:
    """The environment a C program needs to reach ``mount`` through the interposition library."""
    from vfiofs.host.preload import library_path

    return dict(os.environ, LD_PRELOAD=str(library_path()), VFIOFS_MOUNT=str(mount.path))


@dataclass
class ModelRig:
    """A model on a standalone context whose far side is connected to test doubles: a
    RecordingSink for its interrupts, a FakeDma for its DMA, a manual clock for its timers."""

    model: object
    irqs: RecordingSink
    host: FakeDma
    clock: object


def rig_read(rig: ModelRig, offset: int, size: int = 4) -> int:
    """A little-endian register read of BAR0 straight from the rig's model."""
    data = rig.model.bar_read(0, offset, size)
    assert len(data) == size
    return int.from_bytes(data, "little")


def rig_write(rig: ModelRig, offset: int, value: int, size: int = 4) -> None:
    rig.model.bar_write(0, offset, value.to_bytes(size, "little"))


def model_rig(cls, spec, irq_type: str, iova: int, size: int) -> ModelRig:
    from vfiofs.models.api import ModelContext
    from vfiofs.models.timers import ManualScheduler

    clock = ManualScheduler()
    model = cls(spec, ModelContext.standalone(spec, clock))
    rig = ModelRig(model, RecordingSink(irq_type), FakeDma(iova, size), clock)
    model.context.connect_interrupts(rig.irqs)
    model.context.connect_dma(rig.host)
    return rig


def try_bind(dev: VfioDevice, iommu: IommuFd) -> bool:
    """BIND, or False while the device is still busy (EBUSY); any other error fails the test."""
    import errno as _errno

    try:
        dev.bind_iommufd(iommu)
        return True
    except OSError as exc:
        if exc.errno != _errno.EBUSY:
            raise
        return False
