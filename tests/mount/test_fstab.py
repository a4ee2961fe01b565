"""``mount -t fuse.vfiofs`` and fstab lines, through mount(8) and mount.fuse3.

mount(8) runs mount.fuse3 with PATH, HOME and SHELL removed from the environment, and
mount.fuse3 runs ``/bin/sh -c "vfiofs SOURCE MOUNTPOINT -o OPTIONS"``, so ``vfiofs`` is
looked up in /bin/sh's built-in PATH (/usr/local/sbin:/usr/local/bin:/usr/sbin:...), not in
the caller's. Each test runs in private mount and PID namespaces (tests/namespaces.py)
where a directory holding only a ``vfiofs`` link to this environment's command is
bind-mounted over /usr/local/sbin; nothing changes on the machine.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from namespaces import daemon_pid, mounted_here, needs_root, run_isolated, scratch, sh, unused_gid, vfiofs_command
from vfiofs.host.mounting import find_mount

pytestmark = [needs_root, pytest.mark.skipif(not shutil.which("mount.fuse3") and not shutil.which("mount.fuse"),
                                             reason="needs mount.fuse3 (the fuse3 package)")]


def _vfiofs_on_the_helpers_path(where: Path) -> None:
    """Make /bin/sh (without PATH) find this environment's vfiofs, in this namespace only."""
    command = vfiofs_command()
    if len(command) != 1:
        raise RuntimeError("no vfiofs console script next to this python: pip install -e .")
    bin_dir = where / "bin"
    bin_dir.mkdir()
    (bin_dir / "vfiofs").symlink_to(command[0])
    target = next(d for d in ("/usr/local/sbin", "/usr/local/bin") if os.path.isdir(d))
    sh("mount", "--bind", bin_dir, target)
    found = subprocess.run(["env", "-i", "/bin/sh", "-c", "command -v vfiofs"], capture_output=True, text=True)
    assert found.stdout.strip() == f"{target}/vfiofs", found


def _mount_options(mnt: Path) -> tuple[str, set[str]]:
    entry = find_mount(mnt)
    return entry.fstype, set(entry.options)


def _umount_stops_the_daemon(mnt: Path) -> None:
    daemon = daemon_pid(mnt)
    assert daemon is not None
    result = subprocess.run(["umount", str(mnt)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert not mounted_here(mnt)
    _, status = os.waitpid(daemon, 0)  # reparented to this namespace's init (us) when mount returned
    assert os.waitstatus_to_exitcode(status) == 0


def _mount_t_fuse_vfiofs() -> None:
    where = scratch()
    _vfiofs_on_the_helpers_path(where)
    devices = where / "defs"
    devices.mkdir()
    for name, size in [("a", "4KiB"), ("b", "8KiB")]:
        (devices / f"{name}.toml").write_text(f'model = "ram"\n[ram]\nsize = "{size}"\n')
    mnt = where / "mnt"
    mnt.mkdir()

    result = subprocess.run(["mount", "-t", "fuse.vfiofs", str(devices), str(mnt), "-o", "allow_other"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    fstype, options = _mount_options(mnt)
    assert fstype == "fuse.vfiofs"
    assert {"allow_other", "default_permissions", "nosuid", "nodev"} <= options  # rw,dev,suid were dropped
    assert sorted(os.listdir(mnt / "vfio/devices")) == ["vfio0", "vfio1"]
    from vfiofs.client import IommuFd, VfioDevice

    with IommuFd(str(mnt / "iommu")) as iommu, VfioDevice(str(mnt / "vfio/devices/vfio1")) as dev:
        dev.bind_iommufd(iommu)
        assert dev.get_region_info(0).size == 8 * 1024
    _umount_stops_the_daemon(mnt)

    # The bundled devices, and a helper failure reported by mount(8) as vfiofs's one line.
    result = subprocess.run(["mount", "-t", "fuse.vfiofs", "bundled", str(mnt)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert len(os.listdir(mnt / "vfio/devices")) == 6
    _umount_stops_the_daemon(mnt)
    result = subprocess.run(["mount", "-t", "fuse.vfiofs", str(where / "missing"), str(mnt)],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "vfiofs: bad device definition" in result.stderr and "Traceback" not in result.stderr
    assert not mounted_here(mnt)


def test_mount_t_fuse_vfiofs_and_umount():
    run_isolated(_mount_t_fuse_vfiofs)


def _fstab_line(gid: int) -> None:
    where = scratch()
    _vfiofs_on_the_helpers_path(where)
    mnt, state = where / "run" / "vfiofs", where / "state"
    fstab = where / "fstab"
    # The README's line (x-mount.mkdir: mount(8) makes the mountpoint), plus what fstab lines
    # often carry for mount(8) and systemd.
    fstab.write_text(f"# vfiofs\nbundled  {mnt}  fuse.vfiofs  allow_other,gid={gid},mode=0660,x-mount.mkdir,"
                     f"nofail,noauto,_netdev,x-systemd.requires=modprobe@fuse.service,state_dir={state}  0  0\n")
    result = subprocess.run(["mount", "--fstab", str(fstab), str(mnt)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    fstype, options = _mount_options(mnt)
    assert fstype == "fuse.vfiofs" and "allow_other" in options
    for node in ["iommu", "vfio/devices/vfio0", "vfio/0"]:
        st = os.stat(mnt / node)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, gid, 0o660), node
    assert stat.S_IMODE(os.stat(mnt / "vfio/vfio").st_mode) == 0o666
    _umount_stops_the_daemon(mnt)


def test_fstab_line_mounts_and_umounts():
    run_isolated(_fstab_line, unused_gid())
