"""``vfiofs run``: C programs (tests/c/paths.c, built here with gcc) and shell commands see the
mount's devices at /dev/iommu, /dev/vfio and /sys, through every libc call that takes a path;
everything else stays the host's; exit status, signals, private mounts, errors."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from namespaces import (expose_python, needs_root, open_dev_fuse, run_as, run_isolated, scratch, temporary_user,
                        user_env, user_home, vfiofs_command)
from support import REPO, build_c
from vfiofs.host.mounting import is_mounted

VFIOFS = vfiofs_command()
SOURCE = REPO / "tests/c/paths.c"
B = "/sys/bus/pci/devices/0000:00:01.0"  # vfio0, the bundled 64 KiB RAM device, group 0
EDU = "/sys/bus/pci/devices/0000:00:05.0"  # vfio4, the edu device
LONG = "/dev/vfio/" + "/".join(["x" * 200] * 21)[:4085]  # fits PATH_MAX, but not once rewritten

OPENS = ["open", "openat", "open64", "openat64", "__open_2", "__open64_2", "__openat_2", "__openat64_2"]
FOPENS = ["fopen", "fopen64"]
READLINKS = ["readlink", "readlinkat", "__readlink_chk", "__readlinkat_chk"]
STATS = ["stat", "stat64", "__xstat", "__xstat64"]  # follow links
LSTATS = ["lstat", "lstat64", "fstatat", "fstatat64", "statx", "__lxstat", "__fxstatat"]  # do not
ACCESSES = ["access", "faccessat", "euidaccess"]
REALPATHS = ["realpath", "realpath-malloc", "__realpath_chk", "canonicalize_file_name"]


@pytest.fixture(scope="module")
def programs(tmp_path_factory) -> dict[str, Path]:
    """paths.c built plainly and as a distribution builds (fortified, 64-bit file offsets)."""
    where = tmp_path_factory.mktemp("c")
    builds = {"plain": ["-O2"],
              "fortified": ["-O2", "-D_FORTIFY_SOURCE=2", "-D_FILE_OFFSET_BITS=64", "-DPLAIN_CALLS=0"]}
    out = {}
    for name, flags in builds.items():
        out[name] = build_c(SOURCE, where / f"paths-{name}", *flags)
        out[name].chmod(0o755)
    return out


def vfiofs(*args: str, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*VFIOFS, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, **kwargs)


def ask(mount, program: Path, pairs: list[tuple[str, str]], cwd: str = "/") -> dict[tuple[str, str], str]:
    """Run ``program`` on (op, path) pairs under vfiofs run --mount; each pair's answer."""
    result = vfiofs("run", "--mount", str(mount.path), "--", str(program), *[x for pair in pairs for x in pair],
                    cwd=cwd)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    return parse(result.stdout, pairs)


def parse(stdout: str, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    lines = stdout.splitlines()
    assert len(lines) == len(pairs), stdout
    answers = {}
    for (op, path), line in zip(pairs, lines):
        prefix = f"{op} {path} "
        assert line.startswith(prefix), (line, prefix)
        answers[op, path] = line[len(prefix):]
    return answers


def expect(table: dict[tuple[str, str], str], ops: list[str], path: str, answer: str) -> None:
    for op in ops:
        table[op, path] = answer


def test_every_call_sees_the_mounts_devices(mount, programs):
    mnt = mount.path
    ram_device = (mnt / "sys/bus/pci/devices/0000:00:01.0/device").read_text().replace("\n", "\\n")
    want: dict[tuple[str, str], str] = {}
    for path, answer in [(f"{B}/vendor", "= 0x1234\\n"), (f"{EDU}/device", "= 0x11e8\\n"),
                         (f"{B}/iommu_group/type", "= DMA\\n"),  # through the relative link, in the mount
                         (f"{B}/vfio-dev/vfio0/device/vendor", "= 0x1234\\n"),
                         ("/sys/kernel/iommu_groups/0/devices/0000:00:01.0/device", f"= {ram_device}"),
                         (f"{B}/../../../../kernel/iommu_groups/0/type", "= DMA\\n"),  # a link target appended
                         (f"{B}/nope", "! ENOENT"),
                         ("/dev/vfio/devices/vfio0/x", "! ENOTDIR"),  # the host has no /dev/vfio: ENOENT there
                         (LONG, "! ENAMETOOLONG")]:
        expect(want, OPENS, path, answer)
    expect(want, FOPENS, f"{B}/device", f"= {ram_device}")
    expect(want, FOPENS, "/sys/kernel/debug/iommu/intel/0000:00:01.0/domain_translation_struct", "! ENOENT")
    want["opendir", f"{B}/vfio-dev/"] = "= vfio0"
    want["opendir", f"{EDU}/vfio-dev"] = "= vfio4"
    want["opendir", "/dev/vfio"] = "= 0 1 2 3 4 5 devices vfio"
    want["opendir", "/dev/vfio/devices/"] = "= vfio0 vfio1 vfio2 vfio3 vfio4 vfio5"
    want["opendir", "/sys/kernel/iommu_groups/4"] = "= devices reserved_regions type"
    want["opendir", f"{B}/vendor"] = "! ENOTDIR"
    expect(want, READLINKS, f"{B}/iommu_group", "= ../../../../kernel/iommu_groups/0")
    expect(want, READLINKS, f"{B}/vfio-dev/vfio0/device", "= ../../../0000:00:01.0")
    expect(want, READLINKS, f"{B}/vendor", "! EINVAL")
    for path, kind in [("/dev/iommu", "file"), ("/dev/vfio/vfio", "file"), ("/dev/vfio/0", "file"),
                       ("/dev/vfio/devices", "dir"), (f"{B}/vfio-dev/vfio0", "dir")]:
        expect(want, STATS + LSTATS, path, f"= {kind}")
    expect(want, STATS, f"{B}/iommu_group", "= dir")
    expect(want, LSTATS, f"{B}/iommu_group", "= link")
    expect(want, STATS + LSTATS, "/dev/vfio/7", "! ENOENT")
    expect(want, ACCESSES, "/dev/iommu", "= ok")
    expect(want, ACCESSES, f"{B}/vfio-dev", "= ok")
    expect(want, ACCESSES, "/sys/kernel/debug/iommu/intel", "! ENOENT")  # the selftests' Intel IOMMU probe
    expect(want, REALPATHS, f"{B}/iommu_group", "= /sys/kernel/iommu_groups/0")
    expect(want, REALPATHS, f"{B}/vfio-dev/vfio0/device", f"= {B}")
    expect(want, REALPATHS, "/dev/vfio/devices/vfio0", "= /dev/vfio/devices/vfio0")
    expect(want, REALPATHS, "/dev/vfio/devices/../vfio", "= /dev/vfio/vfio")
    expect(want, REALPATHS, f"{B}/nope", "! ENOENT")
    want["lgetxattr", "/dev/vfio/vfio"] = "! ENODATA"  # answered by the mount, not the host's ENOENT
    want["threads", f"{B}/vendor"] = "= 0x1234\\n"  # 8 threads x 500 opens, all the same bytes

    got = ask(mount, programs["plain"], list(want))
    assert got == want


def test_a_distribution_build_goes_through_the_checked_entry_points(mount, programs):
    """-D_FORTIFY_SOURCE=2 -D_FILE_OFFSET_BITS=64: open() is __open64_2, realpath() __realpath_chk,
    stat() stat64, fopen() fopen64 — what a packaged VFIO program calls."""
    symbols = subprocess.run(["nm", "-D", str(programs["fortified"])], capture_output=True, text=True,
                             check=True).stdout
    called = set(re.findall(r" U (\w+)@", symbols))
    assert {"__open64_2", "__openat64_2", "__realpath_chk", "stat64", "lstat64", "fopen64", "opendir"} <= called
    assert not {"open", "openat", "stat", "lstat", "fopen"} & called

    pairs = [("open", f"{B}/vendor"), ("openat", "/dev/vfio/devices/vfio0/x"), ("fopen", f"{EDU}/device"),
             ("stat", "/dev/iommu"), ("lstat", f"{B}/iommu_group"), ("realpath", f"{B}/iommu_group"),
             ("readlink", f"{B}/iommu_group"), ("opendir", f"{B}/vfio-dev/"),
             ("access", "/sys/kernel/debug/iommu/intel")]
    assert list(ask(mount, programs["fortified"], pairs).values()) == [
        "= 0x1234\\n", "! ENOTDIR", "= 0x11e8\\n", "= file", "= link", "= /sys/kernel/iommu_groups/0",
        "= ../../../../kernel/iommu_groups/0", "= vfio0", "! ENOENT"]


def test_open_with_o_creat_passes_the_mode(mount, programs, tmp_path):
    """The mode of open/openat/open64/openat64 (a variadic argument the library forwards) reaches
    the new file: each call creates its own file with its own mode (umask 0)."""
    for name, answer in [("plain", "= 0601 0602 0603 0604"), ("fortified", "= 0601 0602")]:
        path = str(tmp_path / name)
        assert ask(mount, programs[name], [("create", path)]) == {("create", path): answer}


def test_other_paths_are_the_hosts(mount, programs):
    """Whatever is not one of the mount's devices, groups or nodes answers exactly as without the
    library: host files, the host's own PCI devices and groups, relative paths, '..' out of /dev/vfio."""
    pairs = [("open", "/etc/hostname"), ("fopen", "/etc/hostname"), ("open", "/dev/null"),
             ("open", "/sys/bus/pci/devices/0000:00:00.0/vendor"),  # slot 0 is never a vfiofs device
             ("open", "/sys/bus/pci/devices/0000:ff:1f.7/vendor"), ("readlink", "/sys/bus/pci/devices/0000:00:00.0"),
             ("opendir", "/sys/bus/pci/devices"), ("opendir", "/sys/kernel/iommu_groups"),
             ("stat", "/sys/kernel/iommu_groups/4000"), ("open", "/dev/vfio/../null"),
             ("stat", "dev/iommu"), ("open", "dev/vfio/vfio"), ("access", "/dev/iommu2"), ("realpath", "/etc/hostname")]
    direct = subprocess.run([str(programs["plain"]), *[x for pair in pairs for x in pair]], capture_output=True,
                            text=True, check=True, cwd="/").stdout
    assert ask(mount, programs["plain"], pairs) == parse(direct, pairs)
    assert ask(mount, programs["plain"], [("open", "/etc/hostname")])["open", "/etc/hostname"] == \
        "= " + Path("/etc/hostname").read_text().replace("\n", "\\n")


def test_shell_commands_see_the_devices_on_a_private_mount():
    """No --mount: the bundled devices are mounted for the command alone and unmounted after."""
    script = (f"echo $VFIOFS_MOUNT; cat {B}/vendor {EDU}/device; ls /dev/vfio/devices; "
              f"readlink {B}/iommu_group; ls {B}/vfio-dev/; test -e /sys/kernel/debug/iommu/intel || echo no-debugfs; "
              f"{sys.executable} -c \"print(open('{EDU}/vendor').read().strip(), sorted(__import__('os').listdir('/dev/vfio')))\"")
    result = vfiofs("run", "--", "sh", "-c", script)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    lines = result.stdout.splitlines()
    mnt = Path(lines[0])
    assert mnt.name == "mnt" and mnt.parent.name.startswith("vfiofs-run-")
    assert lines[1:] == ["0x1234", "0x11e8", "vfio0", "vfio1", "vfio2", "vfio3", "vfio4",
                         "vfio5", "../../../../kernel/iommu_groups/0", "vfio0", "no-debugfs",
                         "0x1234 ['0', '1', '2', '3', '4', '5', 'devices', 'vfio']"]
    assert not is_mounted(mnt) and not mnt.parent.exists()


def test_devices_option_mounts_those_definitions(tmp_path):
    devices = tmp_path / "devices"
    devices.mkdir()
    (devices / "a.toml").write_text('name = "a"\n[pci]\nvendor = 0x1af4\ndevice = 0x10f0\n'
                                    '[[bar]]\nindex = 0\nsize = "4KiB"\nmmap = true\n')
    result = vfiofs("run", "--devices", str(devices), "--", "sh", "-c",
                    f"cat {B}/vendor {B}/device; ls /dev/vfio/devices")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0x1af4", "0x10f0", "vfio0"]


@pytest.mark.parametrize("command, status", [(["true"], 0), (["sh", "-c", "exit 3"], 3),
                                             (["sh", "-c", "kill -KILL $$"], 128 + signal.SIGKILL),
                                             (["sh", "-c", "kill -TERM $$"], 128 + signal.SIGTERM)])
def test_exit_status_is_the_commands(mount, command, status):
    result = vfiofs("run", "--mount", str(mount.path), "--", *command)
    assert (result.returncode, result.stderr) == (status, "")


def test_exit_status_with_a_private_mount():
    result = vfiofs("run", "--", "sh", "-c", "echo $VFIOFS_MOUNT; exit 7")
    assert result.returncode == 7
    assert not Path(result.stdout.strip()).parent.exists()


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_signals_end_the_command_and_the_mount(how):
    """SIGTERM to vfiofs run is passed on to the command; Ctrl-C (SIGINT to the terminal's process
    group) reaches the command directly. Either way the private mount goes."""
    process = subprocess.Popen([*VFIOFS, "run", "--", "sh", "-c", "echo $VFIOFS_MOUNT; exec sleep 60"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        mnt = Path(process.stdout.readline().strip())  # the command runs: the mount is up
        assert is_mounted(mnt)
        if how == "sigterm":
            os.kill(process.pid, signal.SIGTERM)
        else:
            os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=30) == 128 + (signal.SIGTERM if how == "sigterm" else signal.SIGINT)
        assert process.stderr.read() == ""
        assert not is_mounted(mnt) and not mnt.parent.exists()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        process.stdout.close()
        process.stderr.close()


def assert_one_line_error(result: subprocess.CompletedProcess, status: int, *fragments: str) -> None:
    assert result.returncode == status
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vfiofs: ") and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_run_help_is_runs_own():
    result = vfiofs("run", "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: vfiofs run [--mount MNT | --devices DIR] -- CMD [ARGS...]")


def test_errors_are_one_line(tmp_path, mount):
    assert_one_line_error(vfiofs("run"), 2, "no command given")
    assert_one_line_error(vfiofs("run", "--mount", str(mount.path), "--", "vfiofs-no-such-command"), 127,
                          "vfiofs-no-such-command: command not found")
    assert_one_line_error(vfiofs("run", "--", "vfiofs-no-such-command"), 127, "command not found")
    assert_one_line_error(vfiofs("run", "--mount", str(tmp_path), "--", "true"), 1, "is not a vfiofs mount")
    assert_one_line_error(vfiofs("run", "--mount", str(tmp_path / "gone"), "--", "true"), 1, "does not exist")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.toml").write_text('model = "ram"\n[ram]\nsize = 1000\n')
    assert_one_line_error(vfiofs("run", "--devices", str(bad), "--", "true"), 1, "bad device definition")


# -- an ordinary user ------------------------------------------------------------------------------

def _user_runs_a_c_program(user: pwd.struct_passwd, program: Path) -> None:
    where = scratch()
    open_dev_fuse(where)
    expose_python(where)
    home = user_home(where, user)
    env = {**user_env(home), "TMPDIR": str(home)}
    binary = where / "paths"
    shutil.copy(program, binary)
    binary.chmod(0o755)
    pairs = [("open", f"{B}/vendor"), ("open", f"{EDU}/device"), ("opendir", f"{B}/vfio-dev/"),
             ("readlink", f"{B}/iommu_group"), ("stat", "/dev/iommu"), ("open", "/dev/vfio/devices/vfio0/x"),
             ("access", "/sys/kernel/debug/iommu/intel"), ("realpath", f"{B}/iommu_group"),
             ("open", "/etc/hostname")]
    result = run_as(user.pw_uid, user.pw_gid, [*VFIOFS, "run", "--", str(binary), *[x for p in pairs for x in p]],
                    env=env)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert list(parse(result.stdout, pairs).values()) == [
        "= 0x1234\\n", "= 0x11e8\\n", "= vfio0", "= ../../../../kernel/iommu_groups/0", "= file", "! ENOTDIR",
        "! ENOENT", "= /sys/kernel/iommu_groups/0", "= " + Path("/etc/hostname").read_text().replace("\n", "\\n")]

    shell = run_as(user.pw_uid, user.pw_gid, [*VFIOFS, "run", "--", "sh", "-c",
                                              f"echo $VFIOFS_MOUNT; id -u; cat {B}/vendor; exit 5"], env=env)
    assert shell.returncode == 5 and shell.stderr == "", shell.stderr
    mnt, uid, vendor = shell.stdout.split()
    assert (uid, vendor) == (str(user.pw_uid), "0x1234")
    assert Path(mnt).parent.parent == home and not Path(mnt).parent.exists() and not is_mounted(mnt)


@needs_root
@pytest.mark.skipif(not shutil.which("fusermount3"), reason="needs fusermount3")
def test_ordinary_user_runs_a_c_program(programs):
    with temporary_user() as user:
        run_isolated(_user_runs_a_c_program, user, programs["plain"])
