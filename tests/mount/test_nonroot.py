"""An ordinary user mounts with ``vfiofs mount`` (through fusermount3) and unmounts with
``vfiofs umount``; who else can see and use the nodes.

Each test creates a system user (deleted afterwards) and runs in private mount and PID
namespaces (tests/namespaces.py): a 0666 node for the FUSE device is bind-mounted over
/dev/fuse there (on these machines the real one is 0600 root, and it is never touched),
/etc/fuse.conf is replaced there when a test needs user_allow_other, and the directory
that hides this environment's python from other users (e.g. a 0700 /root) is covered
there with a tmpfs that shows only the interpreter, the venv and the repository. So the
user runs the very ``vfiofs`` command and client library of this environment.
"""

from __future__ import annotations

import errno
import os
import pwd
import shutil
import signal
import stat
from pathlib import Path

import pytest

from namespaces import (allow_user_allow_other, daemon_pid, expose_python, mounted_here, needs_root,
                        open_dev_fuse, python_as, run_as, run_isolated, scratch, temporary_user, user_env,
                        user_home, vfiofs_command)
from support import NOBODY
from vfiofs.host.mounting import find_mount

pytestmark = [needs_root, pytest.mark.skipif(not shutil.which("fusermount3"), reason="needs fusermount3")]

VFIOFS = vfiofs_command()

# Run by the users themselves: what a driver does with the nodes.
USE_A_DEVICE = r"""
import os, sys
from vfiofs.client import IommuFd, VfioDevice
mnt, index = sys.argv[1], int(sys.argv[2])
with IommuFd(f"{mnt}/iommu") as iommu, VfioDevice(f"{mnt}/vfio/devices/vfio{index}") as dev:
    dev.bind_iommufd(iommu)
    dev.write(0, 0x20, b"user")
    assert dev.read(0, 0x20, 4) == b"user"
    ram = dev.mmap(0)  # the memfd comes over the side channel, which checks the uid
    assert ram[0x20:0x24] == b"user"
    ram.close()
print("used", index)
"""

OPEN_ERRNO = r"""
import os, sys
try:
    os.close(os.open(sys.argv[1], os.O_RDWR))
    print(0)
except OSError as exc:
    print(exc.errno)
"""


@pytest.fixture(scope="module")
def user():
    with temporary_user() as entry:
        yield entry


def _prepare(user: pwd.struct_passwd) -> tuple[Path, Path, dict[str, str]]:
    """Inside the namespace: usable /dev/fuse, reachable python, the user's home and mountpoint."""
    where = scratch()
    open_dev_fuse(where)
    expose_python(where)
    home = user_home(where, user)
    mnt = user_home(where, user, "mnt")
    return home, mnt, user_env(home)


def _as_user(user, argv, env, **kwargs):
    return run_as(user.pw_uid, user.pw_gid, argv, env=env, **kwargs)


def _mount(user, mnt: Path, env, *options: str) -> None:
    result = _as_user(user, [*VFIOFS, "mount", *options, str(mnt)], env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert mounted_here(mnt)


def _umount(user, mnt: Path, env) -> None:
    result = _as_user(user, [*VFIOFS, "umount", str(mnt)], env)
    assert result.returncode == 0, result.stderr
    assert not mounted_here(mnt)


# -- mount, use, unmount ---------------------------------------------------------------------

def _ordinary_user_mounts_and_unmounts(user: pwd.struct_passwd) -> None:
    home, mnt, env = _prepare(user)
    _mount(user, mnt, env)  # background mode: returns once the mount answers
    daemon = daemon_pid(mnt)
    assert daemon is not None and os.stat(f"/proc/{daemon}").st_uid == user.pw_uid
    entry = find_mount(mnt)
    assert entry.fstype == "fuse.vfiofs" and f"user_id={user.pw_uid}" in entry.options

    listing = python_as(user.pw_uid, user.pw_gid, r"""
import os, stat, sys
mnt = sys.argv[1]
for node in ["iommu", "vfio/devices/vfio0", "vfio/devices/vfio4", "vfio/0", "vfio/vfio"]:
    st = os.stat(os.path.join(mnt, node))
    print(node, st.st_uid, st.st_gid, oct(stat.S_IMODE(st.st_mode)))
""", str(mnt), env=env)
    assert listing.returncode == 0, listing.stderr
    uid, gid = user.pw_uid, user.pw_gid
    assert listing.stdout.splitlines() == [
        f"iommu {uid} {gid} 0o600", f"vfio/devices/vfio0 {uid} {gid} 0o600", f"vfio/devices/vfio4 {uid} {gid} 0o600",
        f"vfio/0 {uid} {gid} 0o600", f"vfio/vfio {uid} {gid} 0o666"]

    used = python_as(user.pw_uid, user.pw_gid, USE_A_DEVICE, str(mnt), "0", env=env)
    assert used.returncode == 0 and used.stdout == "used 0\n", used.stderr

    # Without allow_other nobody else sees anything, not even root.
    for look in (os.stat, os.listdir):
        with pytest.raises(PermissionError):
            look(mnt)
    with pytest.raises(PermissionError):
        os.stat(mnt / "iommu")
    other = run_as(NOBODY, NOBODY, ["ls", str(mnt / "vfio/devices")])
    assert other.returncode != 0 and "Permission denied" in other.stderr

    _umount(user, mnt, env)
    os.waitpid(daemon, 0)  # this namespace's init inherits the daemon: it exited, and was reaped here


def test_ordinary_user_mounts_uses_and_unmounts(user):
    run_isolated(_ordinary_user_mounts_and_unmounts, user)


# -- allow_other -----------------------------------------------------------------------------

def _allow_other_needs_user_allow_other(user: pwd.struct_passwd) -> None:
    home, mnt, env = _prepare(user)
    assert "\nuser_allow_other" not in "\n" + open("/etc/fuse.conf").read(), "this machine allows it already"
    result = _as_user(user, [*VFIOFS, "mount", "-o", "allow_other", str(mnt)], env)
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("vfiofs: "), result.stderr
    assert "user_allow_other" in result.stderr and "/etc/fuse.conf" in result.stderr
    assert not mounted_here(mnt)


def test_allow_other_needs_user_allow_other(user):
    run_isolated(_allow_other_needs_user_allow_other, user)


def _with_allow_other_modes_decide(user: pwd.struct_passwd) -> None:
    home, mnt, env = _prepare(user)
    allow_user_allow_other(scratch())

    # Default mode 0600: others see the tree, but only the owner opens the nodes.
    _mount(user, mnt, env, "-o", "allow_other")
    seen = run_as(NOBODY, NOBODY, ["ls", str(mnt / "vfio/devices")])
    assert seen.returncode == 0 and seen.stdout.split() == ["vfio0", "vfio1", "vfio2", "vfio3", "vfio4", "vfio5"]

    def open_errno(path: Path, *groups: int) -> int:
        result = python_as(NOBODY, NOBODY, OPEN_ERRNO, str(path), groups=list(groups), env=env)
        assert result.returncode == 0, result.stderr
        return int(result.stdout)

    assert open_errno(mnt / "vfio/devices/vfio0") == errno.EACCES
    assert open_errno(mnt / "iommu") == errno.EACCES
    assert open_errno(mnt / "vfio/vfio") == 0  # the container is 0666, like /dev/vfio/vfio
    assert open_errno(mnt / "vfio/devices/vfio0", user.pw_gid) == errno.EACCES  # the group has no rights
    used = python_as(user.pw_uid, user.pw_gid, USE_A_DEVICE, str(mnt), "1", env=env)
    assert used.returncode == 0, used.stderr
    _umount(user, mnt, env)

    # --group G --mode 0660: the members of G use the devices too, nobody else.
    _mount(user, mnt, env, "-o", "allow_other", "--group", str(user.pw_gid), "--mode", "0660")
    st = os.stat(mnt / "vfio/devices/vfio0")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (user.pw_uid, user.pw_gid, 0o660)
    assert open_errno(mnt / "vfio/devices/vfio0") == errno.EACCES
    member = python_as(NOBODY, NOBODY, USE_A_DEVICE, str(mnt), "0", groups=[user.pw_gid], env=env)
    assert member.returncode == 0 and member.stdout == "used 0\n", member.stderr
    _umount(user, mnt, env)


def test_with_allow_other_node_modes_and_group_decide(user):
    run_isolated(_with_allow_other_modes_decide, user)


# -- a crashed daemon ------------------------------------------------------------------------

def _stale_mount_is_cleaned_up_by_the_user(user: pwd.struct_passwd) -> None:
    home, mnt, env = _prepare(user)
    _mount(user, mnt, env)
    daemon = daemon_pid(mnt)
    os.kill(daemon, signal.SIGKILL)
    os.waitpid(daemon, 0)
    dead = python_as(user.pw_uid, user.pw_gid, "import os, sys; os.statvfs(sys.argv[1])", str(mnt), env=env)
    assert "Transport endpoint is not connected" in dead.stderr

    again = _as_user(user, [*VFIOFS, "mount", str(mnt)], env)  # fusermount3 -u -z, then a new mount
    assert again.returncode == 0, again.stderr
    assert again.stderr.splitlines() == [f"vfiofs: {mnt} was a stale mount (daemon gone); cleaned it up and "
                                         "mounting again"]
    used = python_as(user.pw_uid, user.pw_gid, USE_A_DEVICE, str(mnt), "1", env=env)
    assert used.returncode == 0, used.stderr
    _umount(user, mnt, env)


def test_user_recovers_a_stale_mount(user):
    run_isolated(_stale_mount_is_cleaned_up_by_the_user, user)
