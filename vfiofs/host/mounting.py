"""Starting, waiting for and stopping a mount's daemon in a child process; what is mounted where.

One implementation for everything that runs a mount: ``vfiofs mount`` in the background, the
pytest plugin, the test suite and the benchmark. The child is ``python -m vfiofs mount -f
--ready-fd N``: it writes ``ready`` on fd N once the mount answers, or ``error: <one line>`` when
it cannot mount, and exits. Only the standard library is imported here (the CLI uses this module
before pyfuse3 is needed, and the benchmark loads it from its own tree whatever tree it measures).
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Mapping, Sequence, Union

MOUNTS = "/proc/self/mounts"
READY_TIMEOUT = 60.0  # seconds for a daemon to report its mount ready
STOP_TIMEOUT = 20.0  # seconds for a daemon to unmount and exit after SIGTERM

PathLike = Union[str, "os.PathLike[str]"]
Log = Union[PathLike, IO[bytes], None]

# -- the mount table ---------------------------------------------------------------------------

_ESCAPED = re.compile(rb"\\([0-3][0-7]{2})")


def unescape(field: bytes) -> bytes:
    """A field of /proc/*/mounts as it really is: the kernel writes space, tab, newline and
    backslash as octal escapes (``\\040``, ``\\011``, ``\\012``, ``\\134``)."""
    return _ESCAPED.sub(lambda match: bytes([int(match[1], 8)]), field)


@dataclass(frozen=True)
class MountEntry:
    """One line of the mount table."""

    source: bytes
    point: bytes
    fstype: str
    options: tuple[str, ...]


def mount_table(table: PathLike = MOUNTS) -> list[MountEntry]:
    """Every mount of this mount namespace (or of the file ``table``), in the kernel's order."""
    entries = []
    with open(table, "rb") as lines:
        for line in lines:
            fields = line.split()
            if len(fields) < 4:
                continue
            source, point, fstype, options = (unescape(field) for field in fields[:4])
            entries.append(MountEntry(source, point, fstype.decode(errors="replace"),
                                      tuple(options.decode(errors="replace").split(","))))
    return entries


def _table_key(path: PathLike) -> bytes:
    """``path`` as the mount table spells it: absolute, the symlinks of its parent resolved. The
    last component is not resolved: that would stat the mount, whose daemon may be dead or hung."""
    parent, name = os.path.split(os.path.abspath(path))
    return os.fsencode(os.path.join(os.path.realpath(parent), name))


def find_mount(path: PathLike, table: PathLike = MOUNTS) -> MountEntry | None:
    """The top-most mount at ``path`` (the last the table lists there), or None."""
    key = _table_key(path)
    found = None
    for entry in mount_table(table):
        if entry.point == key:
            found = entry
    return found


def mount_device(path: PathLike, table: PathLike = "/proc/self/mountinfo") -> tuple[int, int] | None:
    """(major, minor) of the top-most mount at ``path``, from mountinfo; None: nothing mounted
    there. Read from the table because a stat() of a FUSE mount asks its daemon (maybe us)."""
    key = _table_key(path)
    found = None
    with open(table, "rb") as lines:
        for line in lines:
            fields = line.split()
            if len(fields) > 4 and unescape(fields[4]) == key:
                major, minor = fields[2].split(b":")
                found = (int(major), int(minor))
    return found


def is_mounted(path: PathLike, table: PathLike = MOUNTS) -> bool:
    """Whether something is mounted at ``path``. Never touches the mount itself."""
    return find_mount(path, table) is not None


def mount_type(path: PathLike, table: PathLike = MOUNTS) -> str | None:
    """The filesystem type of the top-most mount at ``path`` (e.g. ``fuse.vfiofs``); None: none
    or the table cannot be read."""
    try:
        entry = find_mount(path, table)
    except OSError:
        return None
    return None if entry is None else entry.fstype


def lazy_unmount(path: PathLike) -> None:
    """Detach ``path`` at once (``fusermount3 -u -z``, or ``umount -l`` without it); quietly, a
    failure is the caller's to notice with :func:`is_mounted`."""
    if shutil.which("fusermount3"):
        command = ["fusermount3", "-u", "-z", os.fspath(path)]
    else:
        command = ["umount", "-l", os.fspath(path)]
    subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=False)


# -- a daemon in a child process ---------------------------------------------------------------

def last_message(text: str) -> str:
    """The daemon's one-line error (the line ``vfiofs: ...``, without the prefix), else its last
    line; "" if it wrote nothing."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("vfiofs: "):
            return line[len("vfiofs: "):]
    return lines[-1] if lines else ""


class MountFailed(RuntimeError):
    """The daemon did not report its mount ready. It has been stopped and the mount removed.

    ``reported`` is the daemon's own one-line error (None if it reported none), ``last_message``
    the last thing it logged, ``timed_out`` whether it was still silent after the timeout.
    """

    def __init__(self, mountpoint: Path, reported: str | None, last_message: str, timed_out: bool,
                 timeout: float | None, returncode: int | None) -> None:
        self.mountpoint = mountpoint
        self.reported = reported
        self.last_message = last_message
        self.timed_out = timed_out
        self.returncode = returncode
        if reported is not None:
            reason = reported
        else:
            reason = (f"no ready report within {timeout:.0f} s" if timed_out
                      else f"the daemon exited ({exit_description(returncode)}) before the mount was ready")
            if last_message:
                reason += f"; its last message: {last_message}"
        self.reason = reason
        super().__init__(f"cannot mount {mountpoint}: {reason}")


def exit_description(returncode: int | None) -> str:
    """A child's returncode in words: "status 3", "killed by SIGKILL", "killed by signal 36"."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"status {returncode}"


class MountProcess:
    """A running daemon (``process``, a :class:`subprocess.Popen`) and the mount it serves.

    ``ready_ns``: nanoseconds from just before the child was started to its ready report.
    """

    def __init__(self, process: subprocess.Popen, mountpoint: Path, log: Path | None,
                 own_log: IO[bytes] | None = None) -> None:
        self.process = process
        self.mountpoint = mountpoint
        self.log = log
        self.ready_ns = 0
        self._own_log = own_log  # the temporary file the output goes to when no log was given

    def __repr__(self) -> str:
        return f"<MountProcess {self.mountpoint} pid={self.process.pid}>"

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        """The daemon's exit status; None while it runs."""
        return self.process.poll()

    def alive(self) -> bool:
        return self.process.poll() is None

    def output(self) -> str:
        """What the daemon has logged so far ("" if its log cannot be read back)."""
        try:
            if self._own_log is not None:
                fd = self._own_log.fileno()
                return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")
            if self.log is not None:
                return self.log.read_text(errors="replace")
        except (OSError, ValueError):
            pass
        return ""

    def last_message(self) -> str:
        return last_message(self.output())

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM and wait up to ``timeout`` s (the daemon unmounts); then SIGKILL if it still runs;
        then lazily unmount whatever is left. Safe to call again. Returns the exit status."""
        process = self.process
        try:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            try:
                if process.poll() is None:
                    process.kill()
                    process.wait()
            finally:
                try:
                    if is_mounted(self.mountpoint):
                        lazy_unmount(self.mountpoint)
                finally:
                    self._close_pipes()
        return process.returncode

    def _close_pipes(self) -> None:
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()

    def close_log(self) -> None:
        """Let go of the temporary log (after :meth:`stop`, once nothing more needs to be read)."""
        if self._own_log is not None:
            self._own_log.close()
            self._own_log = None


def vfiofs_command(mountpoint: PathLike, devices: PathLike | None = None, state_dir: PathLike | None = None,
                   options: Iterable[str] = (), group: int | str | None = None, mode: int | None = None,
                   debug: bool = False) -> list[str]:
    """``python -m vfiofs mount -f MOUNTPOINT ...`` with this interpreter (no ``--ready-fd`` yet)."""
    command = [sys.executable, "-m", "vfiofs", "mount", "-f"]
    if devices is not None:
        command += ["--devices", os.fspath(devices)]
    if state_dir is not None:
        command += ["--state-dir", os.fspath(state_dir)]
    if group is not None:
        command += ["--group", str(group)]
    if mode is not None:
        command += ["--mode", f"{mode:04o}"]
    command.append(os.fspath(mountpoint))
    command += [f"-o{opt}" for opt in options]
    if debug:
        command.append("--debug")
    return command


def start(mountpoint: PathLike, devices: PathLike | None = None, state_dir: PathLike | None = None,
          options: Iterable[str] = (), pythonpath: Iterable[PathLike] = (), log: Log = None,
          user: int | str | None = None, env: Mapping[str, str] | None = None, cwd: PathLike | None = None,
          group: int | str | None = None, mode: int | None = None, debug: bool = False, detach: bool = False,
          timeout: float | None = READY_TIMEOUT) -> MountProcess:
    """Run ``vfiofs mount -f`` in a child and return once its mount answers; else raise
    :class:`MountFailed` (the child stopped, the mount gone).

    ``pythonpath`` goes in front of the child's PYTHONPATH (for Python device models). ``log``: a
    path (appended to), an open binary file (the caller keeps it), or None (a temporary file the
    MountProcess keeps, so a failure can quote the daemon). ``detach``: a session of its own, so
    the daemon outlives this process and its terminal. ``timeout`` None waits as long as it takes.
    """
    command = vfiofs_command(mountpoint, devices, state_dir, options, group, mode, debug)
    if pythonpath:
        base = dict(os.environ if env is None else env)
        base["PYTHONPATH"] = os.pathsep.join([*map(os.fspath, pythonpath),
                                              *filter(None, [base.get("PYTHONPATH")])])
        env = base
    return launch(command, mountpoint, ready_fd_option="--ready-fd", log=log, user=user, env=env, cwd=cwd,
                  detach=detach, timeout=timeout)


def launch(command: Sequence[str], mountpoint: PathLike, *, ready_fd_option: str | None = "--ready-fd",
           log: Log = None, user: int | str | None = None, env: Mapping[str, str] | None = None,
           cwd: PathLike | None = None, detach: bool = False,
           timeout: float | None = READY_TIMEOUT) -> MountProcess:
    """Run the FUSE server ``command`` and return once it reports ``ready``: on a pipe whose fd is
    given after ``ready_fd_option``, or, when that is None, as the first line of its stdout (the
    benchmark's C and bare pyfuse3 servers). Otherwise stop it and raise :class:`MountFailed`."""
    mountpoint = Path(mountpoint)
    own_log = None
    if log is None:
        own_log = log_file = tempfile.TemporaryFile(prefix="vfiofs-daemon-")
        log_path = None
    elif isinstance(log, (str, os.PathLike)):
        log_path = Path(log)
        log_file = open(log_path, "ab")
    else:
        log_file, log_path = log, None
    read_end = write_end = -1
    try:
        if ready_fd_option is not None:
            read_end, write_end = os.pipe()
            command = [*command, ready_fd_option, str(write_end)]
        started = time.perf_counter_ns()
        process = subprocess.Popen(
            command, pass_fds=() if write_end < 0 else (write_end,), stdin=subprocess.DEVNULL,
            stdout=log_file if ready_fd_option is not None else subprocess.PIPE, stderr=log_file,
            cwd=cwd, env=env, user=user, start_new_session=detach)
    except BaseException:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)
        if own_log is not None:
            own_log.close()
        raise
    finally:
        if log_path is not None:
            log_file.close()  # the child has its own
    daemon = MountProcess(process, mountpoint, log_path, own_log)
    if write_end >= 0:
        os.close(write_end)
    ready = read_end if read_end >= 0 else process.stdout.fileno()
    try:
        report, timed_out = _read_report(ready, timeout)
    except BaseException:
        daemon.stop()
        raise
    finally:
        if read_end >= 0:
            os.close(read_end)
    if report == "ready":
        daemon.ready_ns = time.perf_counter_ns() - started
        return daemon
    if not timed_out:  # it reported an error, or died: let it finish its exit (and its log)
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
    returncode = process.poll()
    daemon.stop()
    reported = report[len("error: "):] if report.startswith("error: ") else None
    failure = MountFailed(mountpoint, reported, daemon.last_message(), timed_out, timeout, returncode)
    daemon.close_log()
    raise failure


def _read_report(fd: int, timeout: float | None) -> tuple[str, bool]:
    """The first line the child writes on ``fd`` ("" at EOF), and whether ``timeout`` ran out first."""
    deadline = None if timeout is None else time.monotonic() + timeout
    readable = select.poll()  # poll, not select: the caller's descriptors may go past FD_SETSIZE
    readable.register(fd, select.POLLIN)
    data = b""
    while b"\n" not in data:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and (left <= 0 or not readable.poll(left * 1000)):
            return "", True
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.partition(b"\n")[0].decode(errors="replace").strip(), False
