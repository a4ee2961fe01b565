"""The vfiofs command: one-line errors with non-zero exit, background mounts, signals."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys

import pytest

from support import REPO, errno_of, is_mounted, start_mount, stop_mount, wait_until
from vfiofs import cli
from vfiofs.host.mounting import find_mount, lazy_unmount


def vfiofs(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vfiofs", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vfiofs: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_help_and_module_entry_point():
    result = vfiofs("--help")
    assert result.returncode == 0 and "mount" in result.stdout and "umount" in result.stdout


def test_missing_mountpoint(tmp_path):
    missing = tmp_path / "nope"
    assert_one_line_error(vfiofs("mount", str(missing)), "does not exist", f"mkdir -p {missing}")


def test_mountpoint_that_is_a_file(tmp_path):
    file = tmp_path / "file"
    file.write_text("")
    assert_one_line_error(vfiofs("mount", str(file)), "is not a directory")


def test_bad_definition_names_file_and_field(tmp_path):
    devices = tmp_path / "devices"
    devices.mkdir()
    (devices / "a.toml").write_text('model = "ram"\n[ram]\nsize = 1000\n')
    (tmp_path / "mnt").mkdir()
    result = vfiofs("mount", "-f", "--devices", str(devices), str(tmp_path / "mnt"))
    assert_one_line_error(result, str(devices / "a.toml"), "ram.size", "power of two")
    assert not is_mounted(tmp_path / "mnt")


def test_empty_definition_directory(tmp_path):
    (tmp_path / "mnt").mkdir()
    assert_one_line_error(vfiofs("mount", "--devices", str(tmp_path), str(tmp_path / "mnt")), "no device definitions")


def test_bad_mount_option_is_one_line(tmp_path):
    (tmp_path / "mnt").mkdir()
    result = vfiofs("mount", "-f", "-o", "no_such_option", str(tmp_path / "mnt"))
    assert_one_line_error(result, "no_such_option", "-o")


def test_unknown_command_and_missing_argument():
    result = vfiofs("frobnicate")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    result = vfiofs("mount")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1


def test_missing_dev_fuse(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cli, "FUSE_DEVICE", tmp_path / "fuse")
    assert cli.main(["mount", str(tmp_path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == ["vfiofs: /dev/fuse is missing: install fuse3 and load the module ('modprobe fuse')"]


def test_already_mounted(mount):
    assert_one_line_error(vfiofs("mount", str(mount.path)), "already a mount point", "vfiofs umount")


def test_umount_of_something_not_mounted(tmp_path):
    assert_one_line_error(vfiofs("umount", str(tmp_path)), "cannot unmount")


def test_background_mount_and_umount(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "vfiofs.log"
    result = vfiofs("mount", "--log", str(log), str(mnt))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    try:
        assert is_mounted(mnt)
        assert f"serving 6 device(s) at {mnt}" in log.read_text()
        assert sorted(os.listdir(mnt / "vfio/devices")) == ["vfio0", "vfio1", "vfio2", "vfio3", "vfio4", "vfio5"]
    finally:
        result = vfiofs("umount", str(mnt))
    assert result.returncode == 0, result.stderr
    assert not is_mounted(mnt)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_unmounts_cleanly(tmp_path, signum):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = start_mount(mnt)
    fd = os.open(m.device(0), os.O_RDWR)  # an open handle does not stop the unmount
    m.process.send_signal(signum)
    assert m.process.wait(timeout=20) == 0
    assert not is_mounted(mnt)
    try:
        os.close(fd)  # the fd is released either way; its flush can no longer reach a daemon
    except OSError as exc:
        assert exc.errno == errno.ENOTCONN
    stop_mount(m)


def test_external_unmount_stops_the_daemon(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = start_mount(mnt)
    subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
    assert m.process.wait(timeout=20) == 0
    assert wait_until(lambda: not is_mounted(mnt))
    stop_mount(m)


def test_mount_with_definitions_from_a_directory(tmp_path):
    devices = tmp_path / "defs"
    devices.mkdir()
    for i, size in enumerate(["4KiB", "8KiB", "16KiB"]):
        (devices / f"d{i}.toml").write_text(f'model = "ram"\n[ram]\nsize = "{size}"\n')
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = start_mount(mnt, devices=devices)
    try:
        from vfiofs.client import IommuFd, VfioDevice

        assert sorted(os.listdir(mnt / "vfio/devices")) == ["vfio0", "vfio1", "vfio2"]
        with IommuFd(m.iommu) as iommu, VfioDevice(m.device(2)) as dev:
            dev.bind_iommufd(iommu)
            assert dev.get_region_info(0).size == 16 * 1024
    finally:
        assert stop_mount(m) == 0


def test_stale_mount_after_a_daemon_crash_is_explained(tmp_path):
    """A crashed daemon leaves a mount that answers ENOTCONN; mounting again cleans it up."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = start_mount(mnt)
    m.process.kill()
    m.process.wait()
    try:
        assert errno_of(os.stat, str(mnt / "iommu")) == errno.ENOTCONN
        assert errno_of(os.statvfs, str(mnt)) == errno.ENOTCONN
        result = vfiofs("mount", str(mnt))
        assert result.returncode == 0, result.stderr
        assert result.stderr.splitlines() == [
            f"vfiofs: {mnt} was a stale mount (daemon gone); cleaned it up and mounting again"]
        assert is_mounted(mnt)
        from vfiofs.client import IommuFd, VfioDevice

        with IommuFd(str(mnt / "iommu")) as iommu, VfioDevice(str(mnt / "vfio/devices/vfio0")) as dev:
            dev.bind_iommufd(iommu)
            dev.write(0, 0x10, b"alive")
            assert dev.read(0, 0x10, 5) == b"alive"
        result = vfiofs("umount", str(mnt))
        assert result.returncode == 0, result.stderr
    finally:
        if is_mounted(mnt):
            lazy_unmount(mnt)
    assert wait_until(lambda: not is_mounted(mnt))


def test_stale_mount_of_another_filesystem_is_left_alone(tmp_path, monkeypatch, capsys):
    """Only a dead vfiofs mount is cleaned up; anything else is explained and left as it is."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    monkeypatch.setattr(cli, "mount_type", lambda path: "fuse.sshfs")
    monkeypatch.setattr(cli.os, "statvfs", lambda path: (_ for _ in ()).throw(OSError(errno.ENOTCONN, "gone")))
    monkeypatch.setattr(cli.os.path, "ismount", lambda path: True)
    monkeypatch.setattr(cli.subprocess, "run", lambda *a, **k: pytest.fail("must not unmount anything"))
    assert cli.main(["mount", str(mnt)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"vfiofs: {mnt} is a stale fuse.sshfs mount whose daemon died: clear it with 'fusermount3 -u -z {mnt}'"]


def test_group_and_mode_of_the_nodes(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = vfiofs("mount", "--group", "12345", "--mode", "0660", str(mnt))
    assert result.returncode == 0, result.stderr
    try:
        for node in ["iommu", "vfio/devices/vfio0", "vfio/devices/vfio4", "vfio/0", "ports/vfio3"]:
            st = os.stat(mnt / node)
            assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (os.getuid(), 12345, 0o660), node
        container = os.stat(mnt / "vfio/vfio")
        assert (container.st_gid, container.st_mode & 0o7777) == (12345, 0o666)  # like /dev/vfio/vfio
        assert os.stat(mnt / "vfio/devices").st_mode & 0o7777 == 0o755
    finally:
        assert vfiofs("umount", str(mnt)).returncode == 0


def test_group_and_mode_as_mount_options(tmp_path):
    """-o gid=NAME,mode=... (what an fstab line can say) is the same as --group/--mode."""
    import grp

    group = grp.getgrgid(0).gr_name
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = vfiofs("mount", "-o", f"gid={group},mode=640", "-o", "nofail,x-systemd.automount", str(mnt))
    assert result.returncode == 0, result.stderr
    try:
        st = os.stat(mnt / "vfio/devices/vfio1")
        assert (st.st_gid, st.st_mode & 0o7777) == (0, 0o640)
    finally:
        assert vfiofs("umount", str(mnt)).returncode == 0


@pytest.mark.parametrize("args, fragments", [
    (["--mode", "0999"], ["bad mode '0999'", "0660"]),
    (["--mode", "4755"], ["bad mode '4755'", "from 0 to 0777"]),
    (["-o", "mode=rw"], ["bad mode 'rw'"]),
    (["--group", "no-such-group-vfiofs"], ["group 'no-such-group-vfiofs' does not exist", "groupadd"]),
    (["-o", "gid="], ["-o gid needs a value", "gid=vfiofs"]),
    (["--group", "0", "-o", "gid=1"], ["--group 0 and -o gid=1 disagree"]),
])
def test_bad_group_or_mode_is_one_line(tmp_path, args, fragments):
    (tmp_path / "mnt").mkdir()
    result = vfiofs("mount", *args, str(tmp_path / "mnt"))
    assert_one_line_error(result, *fragments)
    assert not is_mounted(tmp_path / "mnt")


def test_mount_helper_form(tmp_path):
    """mount.fuse3 runs 'vfiofs SOURCE MOUNTPOINT -o OPTS': a background mount of SOURCE."""
    devices = tmp_path / "defs"
    devices.mkdir()
    (devices / "d.toml").write_text('model = "ram"\n[ram]\nsize = "4KiB"\n')
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    # what mount.fuse3 passes for 'mount -t fuse.vfiofs DEFS MNT -o allow_other' as root
    result = vfiofs(str(devices), str(mnt), "-o", "rw,allow_other,mode=0640,dev,suid")
    assert result.returncode == 0, result.stderr
    try:
        assert os.listdir(mnt / "vfio/devices") == ["vfio0"]
        assert os.stat(mnt / "vfio/devices/vfio0").st_mode & 0o777 == 0o640
        options = set(find_mount(mnt).options)
        assert "allow_other" in options and {"nosuid", "nodev"} <= options
    finally:
        assert vfiofs("umount", str(mnt)).returncode == 0
    assert cli.mount_helper_argv(["bundled", "/m", "-o", "ro"]) == ["mount", "/m", "--devices", "bundled", "-o", "ro"]
    assert cli.mount_helper_argv(["mount", "/m"]) == ["mount", "/m"]
    assert_one_line_error(vfiofs(str(tmp_path / "nope"), str(mnt)), "bad device definition", "nope")


def test_debug_logs_every_request(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "debug.log"
    assert vfiofs("mount", "--debug", "--log", str(log), str(mnt)).returncode == 0
    try:
        fd = os.open(mnt / "vfio/devices/vfio0", os.O_RDWR)
        assert errno_of(os.pread, fd, 4, 0) == errno.EINVAL
        os.close(fd)
    finally:
        assert vfiofs("umount", str(mnt)).returncode == 0
    assert wait_until(lambda: "release fh=" in log.read_text())
    text = log.read_text()
    assert "open vfio0" in text and "read fh=1 off=0x0 -> EINVAL: handle is blocked" in text


def test_validate_checks_definitions_without_mounting(tmp_path):
    result = vfiofs("validate")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "6 definition(s) valid"
    assert lines[4].startswith("vfio4: vedu.toml: edu [1234:11e8] model edu, BAR0 0x100000")
    assert lines[5] == "vfio5: vioat.toml: ioat [8086:2021] model ioat, BAR0 0x4000 mmap, msix,pcie,pm, group 5"
    good = tmp_path / "good"
    good.mkdir()
    (good / "one.toml").write_text('iommu_group = 3\n[[bar]]\nindex = 0\nsize = "4KiB"\nmmap = true\n')
    result = vfiofs("validate", str(good))
    assert result.returncode == 0
    assert result.stdout.splitlines() == [
        "vfio0: one.toml: one [1234:5241] model generic, BAR0 0x1000 mmap, no capabilities, group 3",
        "1 definition(s) valid"]
    (good / "two.toml").write_text('[[bar]]\nindex = 9\nsize = 4096\n')
    assert_one_line_error(vfiofs("validate", str(good)), f"{good / 'two.toml'}: bar[0].index: must be 0-5")
    assert_one_line_error(vfiofs("validate", str(tmp_path / "missing")), "is not a directory")
