"""Running a mount: build devices from definitions, mount, serve until a signal, unmount.

Readiness means the mount answers: once the FUSE loop runs, a worker thread stat()s the
mount root (a request this daemon must answer), and only then is ``on_ready`` called and
the service manager told READY=1 (sd_notify over ``$NOTIFY_SOCKET``, for systemd's
Type=notify). STOPPING=1 follows when the daemon starts to unmount.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import resource
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pyfuse3
import trio

from vfiofs.host.definitions import Definition
from vfiofs.host import fdpass
from vfiofs.host.fdpass import FdChannel
from vfiofs.host import procmem
from vfiofs.host.procmem import ProcessMemory
from vfiofs.models.api import DeviceModel, ModelContext
from vfiofs.host.tasks import TrioScheduler
from vfiofs.fs.operations import VfioOperations
from vfiofs.host.memory import StateFileError, bar_memory
from vfiofs.core.mailbox import Mailbox
from vfiofs.pci import sysfs
from vfiofs.core.handles import Device, Group
from vfiofs.iommu.iommufd import IommufdContext
from vfiofs.iommu.type1 import Type1Container
from vfiofs.pci.vfio_pci import VfioPciDevice
from vfiofs.host import eventfd

log = logging.getLogger(__name__)

BASE_OPTIONS = ("fsname=vfiofs", "subtype=vfiofs", "default_permissions")


class MountError(Exception):
    """The mount could not be set up; ``str()`` is a one-line explanation."""


def build_model(definition: Definition, state_dir: Path | None = None) -> DeviceModel:
    """A model on a context whose BARs are memfds (persistent ones backed by ``state_dir``).

    Raises StateFileError or ValueError (a persistent BAR without ``state_dir``), leaking nothing.
    """
    memory = bar_memory(definition.spec, state_dir)
    try:
        return definition.build(ModelContext(memory))
    except BaseException:
        for bar in memory.values():
            bar.close()
        raise


def build_server(definitions: Sequence[Definition], state_dir: Path | None = None) -> Mailbox:
    """Instantiate every device; MountError if a persistent region's state file is unusable.

    Devices share a Group when their definitions name the same ``iommu_group`` (always set:
    :func:`vfiofs.host.definitions.assign_groups` numbers the rest)."""
    devices = []
    groups: dict[int, Group] = {}
    try:
        for index, definition in enumerate(definitions):
            number = definition.spec.iommu_group
            group = groups.setdefault(number, Group(number))
            devices.append(Device(index, definition.name,
                                  VfioPciDevice(build_model(definition, state_dir), signal=eventfd.signal,
                                                release=eventfd.release),
                                  group, bdf=sysfs.bdf(index)))
    except (StateFileError, ValueError) as exc:
        _shut_down(devices)
        raise MountError(str(exc)) from None
    except Exception as exc:  # e.g. a Python model's constructor failed: one line, not a traceback
        log.debug("building %s", definition.name, exc_info=True)
        _shut_down(devices)
        raise MountError(f"{definition.name}: cannot build the device (model {definition.model}): "
                         f"{type(exc).__name__}: {exc}") from None
    return Mailbox(devices, iommufd=IommufdContext, container=Type1Container, channel=FdChannel(),
                   send_fd=fdpass.send_fd, open_memory=ProcessMemory.open, clock=time.time)


def _shut_down(devices: Sequence[Device]) -> None:
    for device in devices:
        device.driver.model.shutdown()


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


def sd_notify(state: str) -> bool:
    """Tell the service manager ``state`` (e.g. ``READY=1``) as sd_notify(3) does.

    ``$NOTIFY_SOCKET`` is a datagram socket: a path, or an abstract name written with a
    leading '@'. Returns False when there is no manager to tell or it cannot be reached;
    never raises.
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        target = b"\0" + os.fsencode(address[1:])
    elif address.startswith("/"):
        target = os.fsencode(address)
    else:
        log.warning("NOTIFY_SOCKET=%s is not a UNIX socket; not notifying the service manager", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(target)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot notify the service manager at %s: %s", address, exc.strerror or exc)
        return False
    return True


def serve(
    mountpoint: Path,
    definitions: Sequence[Definition],
    options: Sequence[str] = (),
    on_ready: Callable[[], None] | None = None,
    state_dir: Path | None = None,
    gid: int | None = None,
    file_mode: int = 0o600,
) -> None:
    """Mount and serve in this process until SIGINT/SIGTERM; always unmounts.

    The nodes belong to this process's uid and to ``gid`` (default: this process's gid);
    device, group, iommu and port nodes get ``file_mode``. ``on_ready`` runs once the
    mount answers.
    """
    raise_fd_limit()
    keep_large_allocations_on_the_heap()
    server = build_server(definitions, state_dir)
    try:
        _serve(server, mountpoint, options, on_ready, os.getgid() if gid is None else gid, file_mode)
    finally:
        if server.channel is not None:
            server.channel.close()
        for device in server.devices:  # persistent regions are written back on the way out
            try:
                device.driver.model.shutdown()
            except Exception:
                log.exception("shutting down %s", device.name)


def _serve(server: Mailbox, mountpoint: Path, options: Sequence[str], on_ready: Callable[[], None] | None,
           gid: int, file_mode: int) -> None:
    ops = VfioOperations(server, uid=os.getuid(), gid=gid, file_mode=file_mode)
    models = [device.driver.model for device in server.devices]
    with _stderr_captured() as libfuse_said:
        try:
            pyfuse3.init(ops, str(mountpoint), mount_options(options))
            failure = None
        except RuntimeError as exc:
            failure = exc
    if failure is not None:
        reason = " ".join(libfuse_said()) or str(failure)
        if "user_allow_other" in reason:
            hint = "add a line 'user_allow_other' to /etc/fuse.conf (as root), or mount without allow_other"
        else:
            hint = "check the -o options and the mountpoint"
        raise MountError(f"cannot mount {mountpoint}: {reason} ({hint})")
    for line in libfuse_said():
        log.warning("libfuse: %s", line)
    procmem.refuse_files_of(str(mountpoint))
    try:
        unanswered = trio.run(_main, on_ready, models, mountpoint)
    finally:
        sd_notify("STOPPING=1")
        pyfuse3.close(unmount=True)
    log.info("unmounted %s", mountpoint)
    if unanswered:
        raise MountError(unanswered)


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


async def _main(on_ready: Callable[[], None] | None, models: Sequence[DeviceModel] = (),
                mountpoint: Path | None = None) -> str | None:
    """Serve until a signal or an external unmount; a one-line failure if the mount never answered."""
    async with trio.open_nursery() as nursery:
        scheduler = TrioScheduler(nursery)
        for model in models:  # timers and tasks of device models run in this nursery
            model.context.connect_scheduler(scheduler)

        async def fuse_loop() -> None:
            # The core never awaits inside a handler, so one worker task is enough and fastest.
            await pyfuse3.main(min_tasks=1, max_tasks=1)
            # main() returns when the kernel ends the session (e.g. fusermount3 -u).
            nursery.cancel_scope.cancel()

        nursery.start_soon(fuse_loop)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            if mountpoint is not None:
                try:  # a request this loop must answer: the mount works once it returns
                    await trio.to_thread.run_sync(os.stat, mountpoint)
                except OSError as exc:
                    nursery.cancel_scope.cancel()
                    return f"the mount at {mountpoint} does not answer: {exc.strerror or exc}"
            if on_ready is not None:
                on_ready()
            sd_notify(f"READY=1\nSTATUS=serving {len(models)} device(s) at {mountpoint}")
            async for signum in signals:
                log.info("received %s, unmounting", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
    return None
