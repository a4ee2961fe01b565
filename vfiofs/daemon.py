"""Running a mount: build devices from definitions, mount, serve until a signal, unmount."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Callable, Sequence

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
    try:
        pyfuse3.init(ops, str(mountpoint), mount_options(options))
    except RuntimeError as exc:
        raise MountError(f"cannot mount {mountpoint}: {exc} (check the -o options and the mountpoint)") from None
    try:
        trio.run(_main, on_ready)
    finally:
        pyfuse3.close(unmount=True)
    log.info("unmounted %s", mountpoint)


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
