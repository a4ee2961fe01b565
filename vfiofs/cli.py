"""Command line: ``vfiofs mount``, ``vfiofs umount``, ``vfiofs run`` and the tools.

Every error a user can cause ends in one line on stderr that says what is wrong and
how to fix it, and a non-zero exit status — never a traceback.

``vfiofs SOURCE MOUNTPOINT [-o OPTIONS]`` is the form mount(8) uses, through mount.fuse3,
for ``mount -t fuse.vfiofs`` and fstab lines: it is ``vfiofs mount`` in the background with
SOURCE as the devices directory (``bundled`` for the bundled devices).
"""

from __future__ import annotations

import argparse
import errno
import time
import select
import json
import grp
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Mapping, NoReturn, Sequence

from vfiofs.host import mounting, preload
from vfiofs.host.mounting import mount_type  # a name of this module: clean_stale_mount looks it up here
from vfiofs.host.definitions import DefinitionError, bundled_directory, load_directory

FUSE_DEVICE = Path("/dev/fuse")
COMMANDS = ("mount", "umount", "validate", "ls", "trace", "run")
BUNDLED = ("bundled", "vfiofs")  # a SOURCE (or --devices) naming the bundled definitions
DEFAULT_MODE = 0o600
# vfiofs's own -o options (for fstab lines, which cannot pass flags): key -> example value.
OWN_OPTIONS = {"gid": "gid=vfiofs", "mode": "mode=0660", "state_dir": "state_dir=/var/lib/vfiofs",
               "log": "log=/var/log/vfiofs.log"}
# What mount(8) and mount.fuse3 pass along that is not for the FUSE mount: fstab-only
# options, and rw/dev/suid, which mount(8) states as root's defaults (the mount stays
# nodev,nosuid: the nodes are regular files and nothing in the mount is setuid).
IGNORED_OPTIONS = {"defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group", "nofail",
                   "_netdev", "rw", "dev", "suid"}
IGNORED_PREFIXES = ("x-", "X-", "comment=")


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status ``status`` (1 unless given)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"vfiofs: {message} (see 'vfiofs --help')\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vfiofs", description="Emulated VFIO devices (cdev + iommufd) as a FUSE filesystem.",
        epilog="'vfiofs SOURCE MOUNTPOINT [-o OPT,...]' (how mount -t fuse.vfiofs and fstab run it) is "
               "'vfiofs mount MOUNTPOINT --devices SOURCE -o OPT,...'; SOURCE 'bundled' means the bundled devices.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    mount = sub.add_parser("mount", help="mount emulated devices at MOUNTPOINT")
    mount.add_argument("mountpoint", type=Path)
    mount.add_argument("--devices", metavar="DIR",
                       help="directory of device definitions (default, or 'bundled': the bundled devices)")
    mount.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    mount.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]",
                       help="FUSE mount options, e.g. allow_other; also gid=, mode=, state_dir=, log= "
                            "(the same as the flags)")
    mount.add_argument("--group", metavar="NAME|GID",
                       help="group that owns the nodes (default: the mounting user's group)")
    mount.add_argument("--mode", metavar="OCTAL", help="mode of the device nodes (default: 0600)")
    mount.add_argument("--state-dir", type=Path, default=default_state_dir(),
                       help="where persistent regions keep their contents (default: %(default)s)")
    mount.add_argument("--log", type=Path, help="in the background, append log messages to this file")
    mount.add_argument("--debug", action="store_true", help="log every request")
    mount.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    umount = sub.add_parser("umount", help="unmount a vfiofs mount")
    umount.add_argument("mountpoint", type=Path)
    ls = sub.add_parser("ls", help="list the devices of a mount and who uses them")
    ls.add_argument("mountpoint", type=Path)
    ls.add_argument("--json", action="store_true", help="print the daemon's status as JSON")
    trace = sub.add_parser("trace", help="stream every device access of a mount as it happens")
    trace.add_argument("mountpoint", type=Path)
    trace.add_argument("--json", action="store_true", help="one JSON object per line")
    trace.add_argument("--count", type=int, help="stop after this many events")
    run = sub.add_parser(
        "run", help="run a program that sees the devices at /dev/iommu, /dev/vfio and /sys (LD_PRELOAD)",
        usage=RUN_USAGE,
        description="Run CMD with vfiofs's interposition library preloaded: its /dev/iommu, /dev/vfio/... and the "
                    "devices' /sys/bus/pci/devices/<bdf> and /sys/kernel/iommu_groups/<n> paths lead into the "
                    "mount. Without --mount the devices are mounted on a private temporary mountpoint for the life "
                    "of CMD. The exit status is CMD's (128+N if a signal N killed it).")
    run.add_argument("--mount", type=Path, metavar="MNT", help="a running vfiofs mount to use")
    run.add_argument("--devices", metavar="DIR",
                     help="device definitions to mount for CMD (default, or 'bundled': the bundled devices)")
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]", help="the program and its arguments")
    validate = sub.add_parser("validate", help="check device definitions without mounting")
    validate.add_argument("directory", type=Path, nargs="?", help="definitions (default: the bundled devices)")
    return parser


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "vfiofs"


def check_mountpoint(path: Path) -> Path:
    for _ in range(8):  # each lazy unmount uncovers what was below; stale mounts rarely stack
        try:
            path.stat()  # may come from the kernel's attribute cache, even with the daemon gone
            if os.path.ismount(path):
                os.statvfs(path)  # never cached: a FUSE mount without its daemon says ENOTCONN
            break
        except FileNotFoundError:
            raise CliError(f"mountpoint {path} does not exist: create it with 'mkdir -p {path}'") from None
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise CliError(f"cannot use mountpoint {path}: {exc.strerror}") from None
            clean_stale_mount(path)
    if not path.is_dir():
        raise CliError(f"mountpoint {path} is not a directory")
    if os.path.ismount(path):
        raise CliError(f"{path} is already a mount point: unmount it first ('vfiofs umount {path}')")
    return path.resolve()


def clean_stale_mount(path: Path) -> None:
    """``path`` answers ENOTCONN: a FUSE mount whose daemon is gone. Detach it if it is ours."""
    fstype = mount_type(path)
    if fstype != "fuse.vfiofs":
        what = f"{fstype} mount" if fstype else "FUSE mount"
        raise CliError(f"{path} is a stale {what} whose daemon died: clear it with 'fusermount3 -u -z {path}'")
    if os.geteuid() == 0 or not shutil.which("fusermount3"):
        command = ["umount", "-l", str(path)]
    else:
        command = ["fusermount3", "-u", "-z", str(path)]
    result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise CliError(f"{path} is a stale mount (daemon gone) that cannot be cleaned up: {detail}")
    print(f"vfiofs: {path} was a stale mount (daemon gone); cleaned it up and mounting again",
          file=sys.stderr, flush=True)


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


def _load(devices: str | None):
    directory = bundled_directory() if devices is None or devices in BUNDLED else Path(devices)
    try:
        return load_directory(directory)
    except DefinitionError as exc:
        raise CliError(f"bad device definition: {exc}") from None


def _split_options(groups: Sequence[str]) -> list[str]:
    return [opt.strip() for group in groups for opt in group.split(",") if opt.strip()]


def parse_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise CliError(f"bad mode {text!r}: give permission bits in octal, from 0 to 0777 (e.g. 0660)")
    return mode


def resolve_group(text: str) -> int:
    if text.isdigit():
        gid = int(text)
        if gid >= 0xFFFFFFFF:
            raise CliError(f"bad group {text!r}: a gid is below 4294967295")
        return gid
    try:
        return grp.getgrnam(text).gr_gid
    except (KeyError, ValueError):
        raise CliError(f"group {text!r} does not exist: create it ('groupadd --system {text}') "
                       "or give a numeric gid") from None


def _take_own_options(args: argparse.Namespace) -> list[str]:
    """Move vfiofs's options out of ``-o`` into ``args``, drop mount(8)'s; the rest is for FUSE."""
    flags = {"gid": ("--group", args.group), "mode": ("--mode", args.mode)}
    fuse: list[str] = []
    for opt in _split_options(args.options):
        key, equals, value = opt.partition("=")
        if key in OWN_OPTIONS:
            if not equals or not value:
                raise CliError(f"-o {key} needs a value, e.g. -o {OWN_OPTIONS[key]}")
            flag, given = flags.get(key, (None, None))
            if given is not None and given != value:
                raise CliError(f"{flag} {given} and -o {opt} disagree: give one of them")
            if key == "gid":
                args.group = value
            elif key == "mode":
                args.mode = value
            else:  # state_dir, log
                setattr(args, key, Path(value))
        elif opt in IGNORED_OPTIONS or opt.startswith(IGNORED_PREFIXES):
            continue
        else:
            fuse.append(opt)
    return fuse


def cmd_mount(args: argparse.Namespace) -> int:
    options = _take_own_options(args)
    gid = resolve_group(args.group) if args.group is not None else os.getgid()
    mode = parse_mode(args.mode) if args.mode is not None else DEFAULT_MODE
    mountpoint = check_mountpoint(args.mountpoint)
    check_fuse_device()
    definitions = _load(args.devices)
    if not args.foreground:
        return _spawn_background(args, mountpoint, definitions[0].path.parent, options, gid, mode)
    return _run_foreground(args, mountpoint, definitions, options, gid, mode)


def _run_foreground(args, mountpoint: Path, definitions, options: list[str], gid: int, mode: int) -> int:
    from vfiofs.host.daemon import MountError, serve  # pyfuse3 is only needed to actually mount

    ready_fd = args.ready_fd

    def on_ready() -> None:
        logging.getLogger("vfiofs").info("serving %d device(s) at %s", len(definitions), mountpoint)
        if ready_fd is not None:
            os.write(ready_fd, b"ready\n")
            os.close(ready_fd)

    try:
        serve(mountpoint, definitions, options, on_ready, state_dir=args.state_dir, gid=gid, file_mode=mode)
    except MountError as exc:
        if ready_fd is not None:
            os.write(ready_fd, f"error: {exc}\n".encode())
        raise CliError(str(exc)) from None
    return 0


def _spawn_background(args, mountpoint: Path, devices: Path, options: list[str], gid: int, mode: int) -> int:
    """Start the daemon as a detached child and return once its mount answers."""
    try:
        log = open(args.log if args.log else os.devnull, "ab")
    except OSError as exc:
        raise CliError(f"cannot open the log file {args.log}: {exc.strerror}") from None
    with log:
        try:
            mounting.start(mountpoint, devices=devices.resolve(), state_dir=args.state_dir.resolve(),
                           options=options, group=gid, mode=mode, debug=args.debug, log=log, detach=True,
                           timeout=None)
        except mounting.MountFailed as exc:
            if exc.reported is not None:
                raise CliError(exc.reported) from None
            raise CliError("the daemon exited before the mount was ready: run with -f to see why") from None
    return 0


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


def cmd_validate(args: argparse.Namespace) -> int:
    """Load every definition as a mount would; print one line per device, or the first error."""
    definitions = _load(args.directory)
    for index, definition in enumerate(definitions):
        spec = definition.spec
        bars = ", ".join(f"BAR{b.index} {b.size:#x}{' mmap' if b.mmap else ''}{' io' if b.io else ''}"
                         for b in spec.bars) or "no BARs"
        caps = ",".join(c.kind for c in spec.capabilities) or "no capabilities"
        print(f"vfio{index}: {definition.path.name}: {definition.name} "
              f"[{spec.identity.vendor:04x}:{spec.identity.device:04x}] model {definition.model}, {bars}, "
              f"{caps}, group {spec.iommu_group}")
    print(f"{len(definitions)} definition(s) valid")
    return 0


def _control_file(mountpoint: Path, name: str) -> Path:
    path = mountpoint / ".vfiofs" / name
    try:
        if path.is_file():
            return path
    except OSError as exc:
        raise CliError(f"cannot read {mountpoint}: {exc.strerror}") from None
    raise CliError(f"{mountpoint} is not a vfiofs mount (no .vfiofs/{name})")


def cmd_ls(args: argparse.Namespace) -> int:
    try:
        status = json.loads(_control_file(args.mountpoint, "status").read_text())
    except OSError as exc:
        raise CliError(f"cannot read the status of {args.mountpoint}: {exc.strerror}") from None
    if args.json:
        print(json.dumps(status, indent=1))
        return 0
    rows = [("NODE", "NAME", "IDS", "BDF", "GROUP", "BOUND BY", "IOAS", "IRQ")]
    for dev in status["devices"]:
        bound = ", ".join(f"pid {b['pid']} ({b['via']})" for b in dev["bound_by"]) or "-"
        rows.append((dev["node"], dev["name"], f"{dev['vendor']}:{dev['device']}", dev["bdf"], str(dev["group"]),
                     bound, "-" if dev["ioas"] is None else str(dev["ioas"]), dev["interrupts"]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def format_event(event: dict) -> str:
    """One trace event as a line of text."""
    stamp = time.strftime("%H:%M:%S", time.localtime(event["t"])) + f".{int(event['t'] % 1 * 1e6):06d}"
    op = event.get("op")
    where = f"{event.get('device', '-')}"
    if "handle" in event:
        where += f" fh={event['handle']}"
    if op in ("read", "write"):
        text = f"{op} {event['region']}+{event['offset']:#x} size {event['size']}"
        if "value" in event:
            text += f" = {event['value']}"
    elif op == "ioctl":
        text = f"{event['command']}"
    elif op == "irq":
        text = f"interrupt ({event.get('type')}) -> eventfd {event.get('eventfd')}"
    elif op == "dma":
        text = f"DMA fault: {event['fault']}" if "fault" in event else \
            f"DMA {event.get('direction')} {event.get('iova')} size {event.get('size')}"
    else:
        text = json.dumps({k: v for k, v in event.items() if k != "t"})
    if event.get("errno"):
        text += f" -> {event['errno']}"
    return f"{stamp} {where} {text}"


def cmd_trace(args: argparse.Namespace) -> int:
    path = _control_file(args.mountpoint, "trace")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise CliError(f"cannot open {path}: {exc.strerror}") from None
    seen = 0
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if not args.json:
        print(f"vfiofs: tracing {args.mountpoint} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        while args.count is None or seen < args.count:
            poller.poll()
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                continue
            for line in chunk.decode(errors="replace").splitlines():
                print(line if args.json else format_event(json.loads(line)), flush=True)
                seen += 1
                if args.count is not None and seen >= args.count:
                    break
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        pass
    except OSError as exc:
        raise CliError(f"tracing stopped: {exc.strerror} (was the mount unmounted?)") from None
    finally:
        os.close(fd)
    return 0


RUN_USAGE = "vfiofs run [--mount MNT | --devices DIR] -- CMD [ARGS...]"
FORWARDED = (signal.SIGTERM, signal.SIGHUP)  # what vfiofs run passes on to CMD


class _Signalled(Exception):
    """SIGTERM or SIGHUP before CMD started: undo the mount, exit as if killed by it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _other_preloads(environ: Mapping[str, str], library: Path) -> list[str]:
    """What LD_PRELOAD names besides ``library`` (entries separated by colons or spaces, as ld.so reads them)."""
    return [entry for entry in environ.get("LD_PRELOAD", "").replace(" ", ":").split(":")
            if entry and entry != str(library)]


def preload_environment(environ: Mapping[str, str], library: Path, mountpoint: Path) -> dict[str, str]:
    """CMD's environment: the library first in LD_PRELOAD (before what the user preloads), the mount."""
    env = dict(environ)
    env["LD_PRELOAD"] = ":".join([str(library), *_other_preloads(environ, library)])
    env["VFIOFS_MOUNT"] = str(mountpoint)
    return env


def without_preload(environ: Mapping[str, str], library: Path) -> dict[str, str]:
    """The daemon's environment: not preloaded, even inside another vfiofs run."""
    env = {key: value for key, value in environ.items() if key not in ("VFIOFS_MOUNT", "LD_PRELOAD")}
    rest = _other_preloads(environ, library)
    if rest:
        env["LD_PRELOAD"] = ":".join(rest)
    return env


def exit_status(returncode: int) -> int:
    """A shell's $? for a child's returncode: 128+N for death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def find_program(name: str, path: str | None) -> str:
    """The file exec would run for ``name`` (a shell's rules: with a slash as is, else on PATH)."""
    if "/" in name:
        if not os.path.exists(name):
            raise CliError(f"{name}: no such file", status=127)
        if os.path.isdir(name) or not os.access(name, os.X_OK):
            raise CliError(f"{name}: not an executable file", status=126)
        return name
    found = shutil.which(name, path=path)
    if found is None:
        raise CliError(f"{name}: command not found", status=127)
    return found


def check_run_mount(path: Path) -> Path:
    """``--mount``: an existing, answering vfiofs mount; returned absolute, symlinks resolved."""
    try:
        if not path.is_dir():
            raise CliError(f"mount {path} does not exist" if not path.exists() else f"{path} is not a directory")
        status = (path / ".vfiofs" / "status").is_file()
    except OSError as exc:
        raise CliError(f"cannot use the mount {path}: {exc.strerror}"
                       + (" (its daemon is gone: 'vfiofs umount' it)" if exc.errno == errno.ENOTCONN else "")) from None
    if not status:
        raise CliError(f"{path} is not a vfiofs mount: mount one with 'vfiofs mount {path}', or leave out --mount "
                       "to mount the devices for the command")
    return path.resolve()


def cmd_run(args: argparse.Namespace) -> int:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise CliError(f"run: no command given: {RUN_USAGE}", status=2)
    if args.mount is not None and args.devices is not None:
        raise CliError("run: --mount uses a running mount, --devices mounts new ones: give one of them", status=2)
    try:
        library = preload.library_path()
    except preload.PreloadMissing as exc:
        raise CliError(str(exc)) from None
    program = find_program(argv[0], os.environ.get("PATH", os.defpath))
    if args.mount is not None:
        return _run_program(program, argv, preload_environment(os.environ, library, check_run_mount(args.mount)))
    check_fuse_device()
    definitions = _load(args.devices)

    def stop(signum, frame):
        raise _Signalled(signum)

    previous = {signum: signal.signal(signum, stop) for signum in FORWARDED}
    scratch = Path(tempfile.mkdtemp(prefix="vfiofs-run-"))
    mountpoint = scratch / "mnt"
    daemon = None
    try:
        mountpoint.mkdir()
        try:
            daemon = mounting.start(mountpoint, devices=definitions[0].path.parent.resolve(),
                                    state_dir=scratch / "state", env=without_preload(os.environ, library),
                                    detach=True)  # a session of its own: Ctrl-C at the terminal is for CMD
        except mounting.MountFailed as exc:
            raise CliError(f"cannot mount the devices for the command: {exc.reason}") from None
        return _run_program(program, argv, preload_environment(os.environ, library, mountpoint))
    finally:
        try:
            if daemon is not None:
                daemon.stop()
                daemon.close_log()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if not mounting.is_mounted(mountpoint):
                shutil.rmtree(scratch, ignore_errors=True)


def _run_program(program: str, argv: list[str], env: dict[str, str]) -> int:
    """Run CMD in this process group, so a terminal's Ctrl-C reaches it directly as it reaches any
    foreground program (vfiofs run lets it pass and waits); SIGTERM and SIGHUP are passed on.

    The handlers are in place before CMD starts (none of a signal is lost in between); being
    Python functions, not SIG_IGN, they are reset to the default in CMD by exec."""
    child: list[subprocess.Popen] = []

    def forward(signum, frame):
        if child:
            try:
                child[0].send_signal(signum)
            except ProcessLookupError:
                pass
        else:
            raise _Signalled(signum)

    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        try:
            child.append(subprocess.Popen(argv, executable=program, env=env))
        except OSError as exc:
            raise CliError(f"{argv[0]}: {exc.strerror}", status=127 if exc.errno == errno.ENOENT else 126) from None
        return exit_status(child[0].wait())
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def mount_helper_argv(argv: Sequence[str]) -> list[str]:
    """``vfiofs SOURCE MOUNTPOINT [-o OPTS]`` (mount.fuse3's call) as ``vfiofs mount`` arguments."""
    argv = list(argv)
    if len(argv) >= 2 and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        source, mountpoint, rest = argv[0], argv[1], argv[2:]
        return ["mount", mountpoint, "--devices", source, *rest]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(mount_helper_argv(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "debug", False) else logging.INFO,
        format="vfiofs[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    try:
        commands = {"mount": cmd_mount, "umount": cmd_umount, "validate": cmd_validate, "ls": cmd_ls,
                    "trace": cmd_trace, "run": cmd_run}
        return commands[args.command](args)
    except CliError as exc:
        print(f"vfiofs: {exc}", file=sys.stderr)
        return exc.status
    except _Signalled as exc:  # vfiofs run, before CMD started
        return 128 + exc.signum
    except KeyboardInterrupt:
        return 130
