"""Command line: ``vfiofs mount`` and ``vfiofs umount``.

Every error a user can cause ends in one line on stderr that says what is wrong and
how to fix it, and a non-zero exit status — never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NoReturn, Sequence

from .definitions import DefinitionError, bundled_directory, load_directory

FUSE_DEVICE = Path("/dev/fuse")


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"vfiofs: {message} (see 'vfiofs --help')\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vfiofs", description="Emulated VFIO devices (cdev + iommufd) as a FUSE filesystem.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    mount = sub.add_parser("mount", help="mount emulated devices at MOUNTPOINT")
    mount.add_argument("mountpoint", type=Path)
    mount.add_argument("--devices", type=Path, help="directory of device definitions (default: the bundled devices)")
    mount.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    mount.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]",
                       help="FUSE mount options, e.g. allow_other")
    mount.add_argument("--state-dir", type=Path, default=default_state_dir(),
                       help="where persistent regions keep their contents (default: %(default)s)")
    mount.add_argument("--log", type=Path, help="in the background, append log messages to this file")
    mount.add_argument("--debug", action="store_true", help="log every request")
    mount.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    umount = sub.add_parser("umount", help="unmount a vfiofs mount")
    umount.add_argument("mountpoint", type=Path)
    return parser


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "vfiofs"


def check_mountpoint(path: Path) -> Path:
    try:
        path.stat()
    except FileNotFoundError:
        raise CliError(f"mountpoint {path} does not exist: create it with 'mkdir -p {path}'") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise CliError(
                f"{path} is a stale FUSE mount whose daemon died: clear it with 'fusermount3 -u -z {path}'"
            ) from None
        raise CliError(f"cannot use mountpoint {path}: {exc.strerror}") from None
    if not path.is_dir():
        raise CliError(f"mountpoint {path} is not a directory")
    if os.path.ismount(path):
        raise CliError(f"{path} is already a mount point: unmount it first ('vfiofs umount {path}')")
    return path.resolve()


def check_fuse_device() -> None:
    if not FUSE_DEVICE.exists():
        raise CliError("/dev/fuse is missing: install fuse3 and load the module ('modprobe fuse')")
    if os.geteuid() != 0:
        if not shutil.which("fusermount3"):
            raise CliError("fusermount3 is not installed: install the fuse3 package")
        if not os.access(FUSE_DEVICE, os.R_OK | os.W_OK):
            raise CliError(
                f"/dev/fuse is not usable by uid {os.getuid()}: ask an administrator to make it mode 0666 "
                "(udev normally does), or mount as root"
            )


def _load(devices: Path | None):
    directory = devices if devices is not None else bundled_directory()
    try:
        return load_directory(directory)
    except DefinitionError as exc:
        raise CliError(f"bad device definition: {exc}") from None


def _split_options(groups: Sequence[str]) -> list[str]:
    return [opt.strip() for group in groups for opt in group.split(",") if opt.strip()]


def cmd_mount(args: argparse.Namespace) -> int:
    mountpoint = check_mountpoint(args.mountpoint)
    check_fuse_device()
    definitions = _load(args.devices)
    options = _split_options(args.options)
    if not args.foreground:
        return _spawn_background(args, mountpoint, definitions[0].path.parent)
    return _run_foreground(args, mountpoint, definitions, options)


def _run_foreground(args, mountpoint: Path, definitions, options: list[str]) -> int:
    from .daemon import MountError, serve  # pyfuse3 is only needed to actually mount

    ready_fd = args.ready_fd

    def on_ready() -> None:
        logging.getLogger("vfiofs").info("serving %d device(s) at %s", len(definitions), mountpoint)
        if ready_fd is not None:
            os.write(ready_fd, b"ready\n")
            os.close(ready_fd)

    try:
        serve(mountpoint, definitions, options, on_ready, state_dir=args.state_dir)
    except MountError as exc:
        if ready_fd is not None:
            os.write(ready_fd, f"error: {exc}\n".encode())
        raise CliError(str(exc)) from None
    return 0


def _spawn_background(args, mountpoint: Path, devices: Path) -> int:
    """Start the daemon as a detached child and return once its mount is ready."""
    read_end, write_end = os.pipe()
    command = [sys.executable, "-m", "vfiofs", "mount", "-f", "--ready-fd", str(write_end),
               "--devices", str(devices.resolve()), "--state-dir", str(args.state_dir.resolve()),
               str(mountpoint)]
    command += [f"-o{opt}" for opt in _split_options(args.options)]
    if args.debug:
        command.append("--debug")
    log = open(args.log, "ab") if args.log else subprocess.DEVNULL
    try:
        subprocess.Popen(command, pass_fds=(write_end,), stdin=subprocess.DEVNULL, stdout=log,
                         stderr=log, start_new_session=True)
    finally:
        os.close(write_end)
        if args.log:
            log.close()
    with os.fdopen(read_end, "rb") as pipe:
        status = pipe.read().decode(errors="replace").strip()
    if status == "ready":
        return 0
    if status.startswith("error: "):
        raise CliError(status[len("error: "):])
    raise CliError("the daemon exited before the mount was ready: run with -f to see why")


def cmd_umount(args: argparse.Namespace) -> int:
    path = args.mountpoint
    if os.geteuid() == 0 or not shutil.which("fusermount3"):
        command = ["umount", str(path)]
    else:
        command = ["fusermount3", "-u", str(path)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise CliError(f"cannot unmount {path}: {detail}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "debug", False) else logging.INFO,
        format="vfiofs[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    try:
        return {"mount": cmd_mount, "umount": cmd_umount}[args.command](args)
    except CliError as exc:
        print(f"vfiofs: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
