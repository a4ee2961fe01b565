"""Running a mount: build devices from definitions, mount, serve until a signal, unmount."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import resource
import signal
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pyfuse3
import trio

from .definitions import Definition
from .fdpass import FdChannel
from .model import DeviceModel
from .tasks import TrioScheduler
from .fuse_ops import VfioOperations
from .regions import StateFileError
from .server import Server
from . import sysfs
from .state import Device, Group
from .vfio_pci import VfioPciDevice

log = logging.getLogger(__name__)

BASE_OPTIONS = ("fsname=vfiofs", "subtype=vfiofs", "default_permissions")


class MountError(Exception):
    """The mount could not be set up; ``str()`` is a one-line explanation."""


def build_server(definitions: Sequence[Definition], state_dir: Path | None = None) -> Server:
    """Instantiate every device; MountError if a persistent region's state file is unusable."""
    devices = []
    groups: dict[int, Group] = {}
    try:
        for index, definition in enumerate(definitions):
            number = definition.spec.iommu_group if definition.spec.iommu_group is not None else index
            group = groups.setdefault(number, Group(number))
            devices.append(Device(index, definition.name, VfioPciDevice(definition.build(state_dir)), group,
                                  bdf=sysfs.bdf(index)))
    except (StateFileError, ValueError) as exc:
        for device in devices:
            device.driver.model.shutdown()
        raise MountError(str(exc)) from None
    return Server(devices, channel=FdChannel())


def keep_large_allocations_on_the_heap() -> None:
    """DMA buffers are large and short-lived; glibc would mmap each one afresh and the kernel
    would fault in every page of it on every transfer (measured: 800 µs instead of 100 µs per
    1 MiB DMA). Keep them on the heap, where freed memory is reused."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def raise_fd_limit() -> None:
    """Each BAR holds a memfd: allow as many open files as the hard limit permits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def mount_options(extra: Sequence[str]) -> set[str]:
    return set(BASE_OPTIONS) | {opt for opt in extra if opt}


def serve(
    mountpoint: Path,
    definitions: Sequence[Definition],
    options: Sequence[str] = (),
    on_ready: Callable[[], None] | None = None,
    state_dir: Path | None = None,
) -> None:
    """Mount and serve in this process until SIGINT/SIGTERM; always unmounts."""
    raise_fd_limit()
    keep_large_allocations_on_the_heap()
    server = build_server(definitions, state_dir)
    try:
        _serve(server, mountpoint, options, on_ready)
    finally:
        if server.channel is not None:
            server.channel.close()
        for device in server.devices:  # persistent regions are written back on the way out
            try:
                device.driver.model.shutdown()
            except Exception:
                log.exception("shutting down %s", device.name)


def _serve(server: Server, mountpoint: Path, options: Sequence[str], on_ready: Callable[[], None] | None) -> None:
    ops = VfioOperations(server, uid=os.getuid(), gid=os.getgid())
    models = [device.driver.model for device in server.devices]
    with _stderr_captured() as libfuse_said:
        try:
            pyfuse3.init(ops, str(mountpoint), mount_options(options))
            failure = None
        except RuntimeError as exc:
            failure = exc
    if failure is not None:
        reason = " ".join(libfuse_said()) or str(failure)
        raise MountError(f"cannot mount {mountpoint}: {reason} (check the -o options and the mountpoint)")
    for line in libfuse_said():
        log.warning("libfuse: %s", line)
    try:
        trio.run(_main, on_ready, models)
    finally:
        pyfuse3.close(unmount=True)
    log.info("unmounted %s", mountpoint)


@contextlib.contextmanager
def _stderr_captured() -> Iterator[Callable[[], list[str]]]:
    """Collect what libfuse prints on fd 2 so a failure can be reported as one line."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        lines: list[str] = []
        try:
            yield lambda: lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(line.strip() for line in sink.read().decode(errors="replace").splitlines() if line.strip())


async def _main(on_ready: Callable[[], None] | None, models: Sequence[DeviceModel] = ()) -> None:
    async with trio.open_nursery() as nursery:
        scheduler = TrioScheduler(nursery)
        for model in models:  # timers and tasks of device models run in this nursery
            model.scheduler = scheduler

        async def fuse_loop() -> None:
            # The core never awaits inside a handler, so one worker task is enough and fastest.
            await pyfuse3.main(min_tasks=1, max_tasks=1)
            # main() returns when the kernel ends the session (e.g. fusermount3 -u).
            nursery.cancel_scope.cancel()

        nursery.start_soon(fuse_loop)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            if on_ready is not None:
                on_ready()
            async for signum in signals:
                log.info("received %s, unmounting", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
