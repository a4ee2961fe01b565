"""Running a mount: build devices from definitions, mount, serve until a signal, unmount."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pyfuse3
import trio

from .definitions import Definition
from .fuse_ops import VfioOperations
from .server import Server
from .state import Device
from .vfio_pci import VfioPciDevice

log = logging.getLogger(__name__)

BASE_OPTIONS = ("fsname=vfiofs", "subtype=vfiofs", "default_permissions")


class MountError(Exception):
    """The mount could not be set up; ``str()`` is a one-line explanation."""


def build_server(definitions: Sequence[Definition]) -> Server:
    devices = [
        Device(index, definition.name, VfioPciDevice(definition.build()))
        for index, definition in enumerate(definitions)
    ]
    return Server(devices)


def mount_options(extra: Sequence[str]) -> set[str]:
    return set(BASE_OPTIONS) | {opt for opt in extra if opt}


def serve(
    mountpoint: Path,
    definitions: Sequence[Definition],
    options: Sequence[str] = (),
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Mount and serve in this process until SIGINT/SIGTERM; always unmounts."""
    ops = VfioOperations(build_server(definitions), uid=os.getuid(), gid=os.getgid())
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
        trio.run(_main, on_ready)
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


async def _main(on_ready: Callable[[], None] | None) -> None:
    async with trio.open_nursery() as nursery:

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
