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
        assert f"serving 5 device(s) at {mnt}" in log.read_text()
        assert sorted(os.listdir(mnt / "vfio/devices")) == ["vfio0", "vfio1", "vfio2", "vfio3", "vfio4"]
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
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = start_mount(mnt)
    m.process.kill()
    m.process.wait()
    try:
        assert errno_of(os.stat, str(mnt / "iommu")) == errno.ENOTCONN
        assert_one_line_error(vfiofs("mount", str(mnt)), "stale FUSE mount", f"fusermount3 -u -z {mnt}")
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
    assert not is_mounted(mnt)


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
