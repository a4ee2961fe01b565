"""Run a piece of a test in private mount and PID namespaces (needs root).

What happens in there never reaches the machine: a 0666 node bind-mounted over /dev/fuse
(the real one stays as it is), a modified /etc/fuse.conf, a python that other users can
reach, mounts. When the function returns, the namespace's init exits and the kernel kills
whatever it left running (background daemons included) and drops its mounts.

    def test_something():
        run_isolated(scenario, arg)      # scenario(arg) runs inside; its failure fails the test
"""

from __future__ import annotations

import contextlib
import ctypes
import grp
import os
import pwd
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Iterator

import pytest

from vfiofs.host.mounting import is_mounted as mounted_here  # in this namespace's /proc/self/mounts

from support import REPO

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000

_scratch: Path | None = None  # see scratch()

needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount") or not shutil.which("mknod"),
                                reason="needs root (private mount namespaces) and util-linux")


def _unshare(flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(flags) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def sh(*argv: str | os.PathLike) -> None:
    """Run a setup command; fail loudly."""
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))}: {result.stderr.strip()}")


def run_isolated(fn: Callable[..., None], *args: object, timeout: float = 120) -> None:
    """Run ``fn(*args)`` in a forked child inside new mount and PID namespaces; re-raise its failure."""
    global _scratch
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    _scratch = Path(tempfile.mkdtemp(prefix="vfiofs-ns-"))  # a mountpoint; empty again on the host
    try:
        _run_forked(fn, args, timeout, read_end, write_end)
    finally:
        os.rmdir(_scratch)
        _scratch = None


def _run_forked(fn: Callable[..., None], args: tuple, timeout: float, read_end: int, write_end: int) -> None:
    pid = os.fork()
    if pid == 0:  # the middle: enters the namespaces, forks their init, reports
        status = 1
        try:
            os.close(read_end)
            os.setpgid(0, 0)
            _unshare(CLONE_NEWNS | CLONE_NEWPID)
            # The first child becomes the PID namespace's init: no other fork (subprocess) before it.
            inner = os.fork()
            if inner == 0:  # pid 1 of the new PID namespace
                code = 1
                try:
                    sh("mount", "--make-rprivate", "/")  # nothing done in here propagates out
                    sh("mount", "-t", "proc", "proc", "/proc")  # pids as this namespace sees them
                    fn(*args)
                    code = 0
                except BaseException:
                    os.write(write_end, traceback.format_exc().encode(errors="replace"))
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            _, wait_status = os.waitpid(inner, 0)
            status = 0 if os.waitstatus_to_exitcode(wait_status) == 0 else 1
        except BaseException:
            os.write(write_end, traceback.format_exc().encode(errors="replace"))
        finally:
            os._exit(status)
    os.close(write_end)
    report = b""
    deadline = time.monotonic() + timeout
    try:
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([pipe], [], [], left)[0]:
                    raise TimeoutError(f"the isolated part of the test took more than {timeout} s")
                chunk = pipe.read(65536)
                if not chunk:
                    break
                report += chunk
        _, wait_status = os.waitpid(pid, 0)
        pid = 0
    finally:
        if pid:  # timed out or interrupted: kill the middle and the namespace's init (and so the rest)
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(wait_status) != 0:
        pytest.fail("in the private namespace:\n" + (report.decode(errors="replace") or "it died without a report"),
                    pytrace=False)


# -- things to do inside -----------------------------------------------------------------------

def scratch() -> Path:
    """A tmpfs (0755, devices allowed) that exists only in this namespace, every user can enter."""
    if _scratch is None:
        raise RuntimeError("scratch() only works inside run_isolated()")
    if not mounted_here(_scratch):
        sh("mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", _scratch)
    return _scratch


def open_dev_fuse(where: Path) -> None:
    """Bind-mount a 0666 node for the FUSE device over /dev/fuse, as udev usually makes it."""
    rdev = os.stat("/dev/fuse").st_rdev
    node = where / "fuse"
    os.mknod(node, stat.S_IFCHR | 0o666, rdev)
    os.chmod(node, 0o666)
    sh("mount", "--bind", node, "/dev/fuse")


def replace_file(path: str, content: str, where: Path) -> None:
    """Bind-mount a file with ``content`` over ``path``."""
    copy = where / (Path(path).name + ".replaced")
    copy.write_text(content)
    os.chmod(copy, 0o644)
    sh("mount", "--bind", copy, path)


def allow_user_allow_other(where: Path) -> None:
    """/etc/fuse.conf with user_allow_other, in this namespace only."""
    conf = Path("/etc/fuse.conf")
    if not conf.exists():
        raise RuntimeError("no /etc/fuse.conf to bind a modified copy over")
    replace_file(str(conf), conf.read_text() + "\nuser_allow_other\n", where)


def _blocking_ancestor(path: Path) -> Path | None:
    """The outermost directory on the way to ``path`` that other users cannot traverse."""
    current = Path("/")
    for part in path.parts[1:]:
        current = current / part
        if not os.stat(current).st_mode & stat.S_IXOTH:
            return current
    return None


def expose_python(where: Path) -> None:
    """Let every user run this interpreter, the venv and the repository.

    The venv's python may live in a directory other users cannot enter (e.g. under a 0700
    /root). Each such directory is covered with a 0755 tmpfs in which only the needed
    trees are bind-mounted back, at their own paths; nothing else of it shows.
    """
    needed = {Path(os.path.realpath(p)) for p in (sys.base_prefix, sys.prefix, REPO)}
    covered: dict[Path, list[Path]] = {}
    for path in sorted(needed):
        blocker = _blocking_ancestor(path)
        if blocker == path:
            raise RuntimeError(f"{path} itself is closed to other users")
        if blocker is not None:
            covered.setdefault(blocker, []).append(path)
    for blocker, paths in covered.items():
        stages = []
        for index, path in enumerate(paths):
            stage = where / f"stage-{len(os.listdir(where))}-{index}"
            stage.mkdir()
            sh("mount", "--bind", path, stage)
            stages.append(stage)
        sh("mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", blocker)
        for path, stage in zip(paths, stages):
            path.mkdir(parents=True, exist_ok=True, mode=0o755)
            sh("mount", "--move", stage, path)


def run_as(uid: int, gid: int, argv: list[str], *, groups: list[int] | None = None, env: dict | None = None,
           cwd: str = "/", timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``argv`` as ``uid``:``gid`` with only ``groups`` as supplementary groups."""
    return subprocess.run(argv, user=uid, group=gid, extra_groups=groups or [], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def python_as(uid: int, gid: int, code: str, *args: str, groups: list[int] | None = None,
              env: dict | None = None) -> subprocess.CompletedProcess:
    """Run Python ``code`` (with ``sys.argv[1:] == args``) as another user."""
    return run_as(uid, gid, [sys.executable, "-c", code, *args], groups=groups, env=env)


@contextlib.contextmanager
def temporary_user() -> Iterator[pwd.struct_passwd]:
    """A fresh unprivileged system user with its own group, deleted afterwards."""
    assert shutil.which("useradd") and shutil.which("userdel"), "the non-root tests need useradd and userdel (passwd)"
    name = f"vfiofs-test-{os.getpid()}-{secrets.token_hex(3)}"
    result = subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                             "--shell", "/usr/sbin/nologin", "--comment", "vfiofs test suite", name],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"useradd {name}: {result.stderr.strip()}")
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], capture_output=True)
        try:
            grp.getgrnam(name)
        except KeyError:
            pass
        else:
            subprocess.run(["groupdel", name], capture_output=True)


def unused_gid() -> int:
    """A gid that names no group (nobody is a member of it)."""
    for gid in range(64999, 60000, -1):
        try:
            grp.getgrgid(gid)
        except KeyError:
            return gid
    raise RuntimeError("no free gid between 60000 and 64999")


def user_home(where: Path, user: pwd.struct_passwd, name: str = "home") -> Path:
    """A directory in ``where`` owned by ``user``."""
    home = where / f"{name}-{user.pw_uid}"
    home.mkdir(mode=0o755, exist_ok=True)
    os.chown(home, user.pw_uid, user.pw_gid)
    return home


def vfiofs_command() -> list[str]:
    """The installed ``vfiofs`` command of this environment (the console script next to python)."""
    script = Path(sys.executable).parent / "vfiofs"
    return [str(script)] if script.exists() else [sys.executable, "-m", "vfiofs"]


def user_env(home: Path) -> dict[str, str]:
    return {"PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin", "HOME": str(home),
            "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}


def daemon_pid(mountpoint: Path) -> int | None:
    """The pid of the vfiofs daemon serving ``mountpoint`` (as this PID namespace numbers it)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        named = any(arg == b"vfiofs" or arg.endswith(b"/vfiofs") for arg in argv)
        if named and b"-f" in argv and os.fsencode(str(mountpoint)) in argv:
            return int(entry)
    return None
