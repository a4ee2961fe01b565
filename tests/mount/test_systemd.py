"""The systemd units in systemd/, and the daemon's sd_notify protocol.

There is no systemd running here (and the tests must not install units on the machine),
so the units are checked with ``systemd-analyze verify``, and the daemon is started the
way the unit starts it: its ExecStartPre= and ExecStart= lines, with the unit's
Environment= (and EnvironmentFile=), its NoNewPrivileges= and CapabilityBoundingSet=
(applied with setpriv), and $NOTIFY_SOCKET pointing at a datagram socket the test reads,
with SO_PASSCRED to see who sent each message, as systemd does for NotifyAccess=main.
Only the paths change: /usr/local/bin/vfiofs becomes this environment's vfiofs, and the
mountpoint and state directory move into temporary directories.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import select
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from namespaces import (expose_python, mounted_here, needs_root, open_dev_fuse, python_as, run_as, run_isolated,
                        scratch, temporary_user, unused_gid, user_env, user_home, vfiofs_command)
from support import NOBODY, REPO, is_mounted
from vfiofs.host import daemon
from vfiofs.host.mounting import find_mount, lazy_unmount

SYSTEM_UNIT = REPO / "systemd" / "vfiofs.service"
USER_UNIT = REPO / "systemd" / "vfiofs@.service"
INSTALLED = "/usr/local/bin/vfiofs"  # where the units expect the command (pip install as root)
BUNDLED_DEVICES = ["vfio0", "vfio1", "vfio2", "vfio3", "vfio4", "vfio5"]
CAPABILITIES = {"CAP_DAC_OVERRIDE": 1, "CAP_SYS_PTRACE": 19, "CAP_SYS_ADMIN": 21}  # linux/capability.h


# -- reading a unit ---------------------------------------------------------------------------

def service_section(unit: Path) -> dict[str, list[str]]:
    """The [Service] settings of ``unit``: key -> values in order."""
    settings: dict[str, list[str]] = {}
    section = None
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def _environment_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and line[0] not in "#;":
            key, _, value = line.partition("=")
            env[key.strip()] = " ".join(shlex.split(value))
    return env


def unit_command(unit: Path, key: str, paths: dict[str, str], env: dict[str, str] | None = None) -> list[str]:
    """``key`` (ExecStart, ExecStartPre) of ``unit`` as systemd would run it, with ``paths`` replaced.

    ``paths`` maps specifiers (%t, %h, ...) and fixed paths of the unit to test paths.
    Environment= then EnvironmentFile= then ``env`` give the ${VARIABLES}.
    """
    service = service_section(unit)

    def resolve(text: str) -> str:
        for old, new in paths.items():
            text = text.replace(old, new)
        return text

    variables: dict[str, str] = {}
    for value in service.get("Environment", []):
        variables.update(item.split("=", 1) for item in shlex.split(value))
    for value in service.get("EnvironmentFile", []):
        path = Path(resolve(value.lstrip("-")))
        if path.exists():
            variables.update(_environment_file(path))
        elif not value.startswith("-"):
            raise FileNotFoundError(path)
    variables.update(env or {})
    [line] = service[key]
    argv = [re.sub(r"\$\{(\w+)\}", lambda m: variables[m[1]], arg) for arg in shlex.split(resolve(line.lstrip("-@+!:")))]
    if argv[0] == INSTALLED:
        argv[:1] = vfiofs_command()
    return argv


def sandbox(unit: Path) -> list[str]:
    """A setpriv prefix applying the unit's NoNewPrivileges= and CapabilityBoundingSet=."""
    service = service_section(unit)
    prefix = ["setpriv"]
    if service.get("NoNewPrivileges") == ["yes"]:
        prefix.append("--no-new-privs")
    if "CapabilityBoundingSet" in service:
        caps = [cap.lower().removeprefix("cap_") for value in service["CapabilityBoundingSet"] for cap in value.split()]
        prefix += ["--bounding-set", ",".join(["-all"] + [f"+{cap}" for cap in caps]), "--inh-caps", "-all"]
    return prefix


class NotifySocket:
    """What systemd listens on for sd_notify: a datagram socket, path or '@abstract'."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    def receive(self, timeout: float) -> tuple[str, int]:
        """The next message and the pid of its sender."""
        if not select.select([self.sock], [], [], timeout)[0]:
            raise TimeoutError(f"no notification within {timeout} s")
        data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = -1
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, _uid, _gid = struct.unpack("3i", payload[:12])
        return data.decode(), pid

    def close(self) -> None:
        self.sock.close()
        if not self.address.startswith("@"):
            os.unlink(self.address)


def capabilities(pid: int) -> tuple[set[str], bool]:
    status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
    effective = int(status["CapEff"], 16)
    held = {name for name, bit in CAPABILITIES.items() if effective & (1 << bit)}
    if effective & ~sum(1 << bit for bit in CAPABILITIES.values()):
        held.add("others")
    return held, status.get("NoNewPrivs", "0").strip() == "1"


def _stops_on_sigterm(process: subprocess.Popen, listener: NotifySocket, mnt: Path,
                      mounted: Callable[[Path], bool] = is_mounted, log: Path | None = None) -> None:
    """systemctl stop: SIGTERM, STOPPING=1 from the main process, a clean exit, the mount gone."""
    process.send_signal(signal.SIGTERM)
    assert listener.receive(30) == ("STOPPING=1", process.pid)
    assert process.wait(timeout=30) == 0, log.read_text() if log is not None else None
    assert not mounted(mnt)


def _stop(process: subprocess.Popen, mnt: Path) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()
    if is_mounted(mnt):
        lazy_unmount(mnt)


# -- the unit files ---------------------------------------------------------------------------

needs_analyze = pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="needs systemd-analyze (systemd)")


def _verify(*args: str, env: dict[str, str] | None = None) -> None:
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", *args], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), result


def _installed_copy(unit: Path, directory: Path, name: str | None = None) -> Path:
    """``unit`` with ExecStart's program at this environment's vfiofs (verify checks that it exists)."""
    command = vfiofs_command()
    assert len(command) == 1, "no vfiofs console script next to this python: install the package (quickstart.sh)"
    lines = unit.read_text().splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.startswith("ExecStart=")]
    assert len(starts) == 1 and lines[starts[0]].startswith(f"ExecStart={INSTALLED} "), f"{unit.name}: runs {INSTALLED}"
    lines[starts[0]] = lines[starts[0]].replace(INSTALLED, command[0], 1)
    copy = directory / (name or unit.name)
    copy.write_text("".join(lines))
    return copy


@needs_analyze
def test_system_unit_verifies(tmp_path):
    _verify(str(_installed_copy(SYSTEM_UNIT, tmp_path)))


@needs_analyze
def test_user_template_unit_verifies(tmp_path):
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    template = _installed_copy(USER_UNIT, tmp_path)
    instance = _installed_copy(USER_UNIT, tmp_path, "vfiofs@work.service")
    _verify("--user", str(template), str(instance), env=dict(os.environ, XDG_RUNTIME_DIR=str(runtime)))


def test_units_are_what_the_readme_says():
    system, user = service_section(SYSTEM_UNIT), service_section(USER_UNIT)
    for service in (system, user):
        assert service["Type"] == ["notify"] and service["Restart"] == ["on-failure"]
        assert "ExecStop" not in service  # SIGTERM unmounts
    assert "-o allow_other" in system["ExecStart"][0] and "--mode 0660" in system["ExecStart"][0]
    assert system["DeviceAllow"] == ["/dev/fuse rw"] and system["DevicePolicy"] == ["closed"]
    assert system["ExecStart"][0].endswith(" /run/vfiofs")
    assert user["ExecStart"][0].endswith(" %t/vfiofs/%i")
    # Each of these would give the service its own mount namespace: the mount would never reach the host.
    namespacing = {"ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts", "ReadWritePaths",
                   "ReadOnlyPaths", "InaccessiblePaths", "ProtectKernelTunables", "ProtectKernelModules",
                   "ProtectKernelLogs", "ProtectControlGroups", "ProtectProc", "ProcSubset", "TemporaryFileSystem",
                   "BindPaths", "BindReadOnlyPaths", "RootDirectory", "MountAPIVFS", "PrivateNetwork", "PrivateUsers"}
    assert not namespacing & (set(system) | set(user))
    # no_new_privs would stop the user's setuid fusermount3.
    assert not {"NoNewPrivileges", "SystemCallFilter", "RestrictSUIDSGID", "LockPersonality"} & set(user)


# -- sd_notify --------------------------------------------------------------------------------

def test_sd_notify_path_and_abstract_addresses(tmp_path, monkeypatch):
    for address in (str(tmp_path / "notify"), f"@vfiofs-test-{secrets.token_hex(4)}"):
        listener = NotifySocket(address)
        try:
            monkeypatch.setenv("NOTIFY_SOCKET", address)
            assert daemon.sd_notify("READY=1\nSTATUS=x") is True
            assert listener.receive(5) == ("READY=1\nSTATUS=x", os.getpid())
        finally:
            listener.close()


def test_sd_notify_without_a_manager(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert daemon.sd_notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert daemon.sd_notify("READY=1") is False  # a warning, never an exception
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert daemon.sd_notify("READY=1") is False
    assert "not notifying" in caplog.text


# -- the system unit ------------------------------------------------------------------------

def _start_system_unit(tmp: Path, notify: str, gid: int) -> tuple[subprocess.Popen, Path]:
    mnt, state = tmp / "run" / "vfiofs", tmp / "state"
    paths = {"/run/vfiofs": str(mnt), "/var/lib/vfiofs": str(state)}
    # ExecStartPre= makes the mountpoint; its failure would not stop the unit ("-"), but here it must work.
    subprocess.run(unit_command(SYSTEM_UNIT, "ExecStartPre", paths), check=True)
    assert stat.S_IMODE(mnt.stat().st_mode) == 0o755
    state.mkdir(mode=0o700)  # StateDirectory=
    command = sandbox(SYSTEM_UNIT) + unit_command(SYSTEM_UNIT, "ExecStart", paths, {"VFIOFS_GROUP": str(gid)})
    log = open(tmp / "daemon.log", "wb")
    process = subprocess.Popen(command, env=dict(os.environ, NOTIFY_SOCKET=notify), stdin=subprocess.DEVNULL,
                               stdout=log, stderr=log, cwd="/")
    log.close()
    return process, mnt


@needs_root
@pytest.mark.skipif(not shutil.which("setpriv"), reason="needs setpriv (util-linux)")
def test_system_unit_is_ready_only_once_the_mount_answers(tmp_path):
    gid = unused_gid()
    listener = NotifySocket(str(tmp_path / "notify"))
    process, mnt = _start_system_unit(tmp_path, listener.address, gid)
    try:
        message, sender = listener.receive(60)
        # Right now: statfs is never cached, so the daemon itself answered it.
        os.statvfs(mnt)
        devices = sorted(os.listdir(mnt / "vfio/devices"))
        assert message.splitlines()[0] == "READY=1", message  # the first message, nothing before it
        assert f"STATUS=serving 6 device(s) at {mnt}" in message.splitlines()
        assert sender == process.pid  # the main process (NotifyAccess=main)
        assert devices == BUNDLED_DEVICES

        for node in ["iommu", "vfio/devices/vfio0", "vfio/devices/vfio4", "vfio/0", "ports/vfio3"]:
            st = os.stat(mnt / node)
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, gid, 0o660), node
        container = os.stat(mnt / "vfio/vfio")
        assert (container.st_gid, stat.S_IMODE(container.st_mode)) == (gid, 0o666)
        assert {"allow_other", "default_permissions"} <= set(find_mount(mnt).options)
        assert capabilities(process.pid) == ({"CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "CAP_DAC_OVERRIDE"}, True)

        _stops_on_sigterm(process, listener, mnt)
    finally:
        _stop(process, mnt)
        listener.close()


@needs_root
@pytest.mark.skipif(not shutil.which("setpriv"), reason="needs setpriv (util-linux)")
def test_system_unit_restarts_over_the_stale_mount_of_a_crash(tmp_path):
    """Restart=on-failure after a crash: ExecStartPre's mkdir may fail on the stale mount (it is
    ignored, "-"), then vfiofs detaches the stale mount itself, with the unit's capabilities only."""
    gid = unused_gid()
    listener = NotifySocket(str(tmp_path / "notify"))
    process, mnt = _start_system_unit(tmp_path, listener.address, gid)
    try:
        assert listener.receive(60)[0].startswith("READY=1")
        os.listdir(mnt / "vfio/devices")  # caches the root's attributes, as any use does
        process.kill()  # the crash
        process.wait()
        with pytest.raises(OSError) as dead:
            os.statvfs(mnt)
        assert dead.value.errno == errno.ENOTCONN

        paths = {"/run/vfiofs": str(mnt), "/var/lib/vfiofs": str(tmp_path / "state")}
        subprocess.run(unit_command(SYSTEM_UNIT, "ExecStartPre", paths), capture_output=True)  # may fail: "-"
        command = sandbox(SYSTEM_UNIT) + unit_command(SYSTEM_UNIT, "ExecStart", paths, {"VFIOFS_GROUP": str(gid)})
        log = tmp_path / "restart.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(command, env=dict(os.environ, NOTIFY_SOCKET=listener.address),
                                       stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd="/")
        message, sender = listener.receive(60)
        assert message.startswith("READY=1") and sender == process.pid
        assert sorted(os.listdir(mnt / "vfio/devices")) == BUNDLED_DEVICES
        assert f"vfiofs: {mnt} was a stale mount (daemon gone); cleaned it up and mounting again" in log.read_text()
        _stops_on_sigterm(process, listener, mnt)
    finally:
        _stop(process, mnt)
        listener.close()


def _group_members_use_the_system_mount(gid: int) -> None:
    where = scratch()
    expose_python(where)
    listener = NotifySocket(str(where / "notify"))
    process, mnt = _start_system_unit(where, listener.address, gid)
    try:
        message, _ = listener.receive(60)
        assert message.startswith("READY=1")
        env = user_env(where)
        # A member of the group: bind, region access, mmap, and DMA into its own memory (the
        # root daemon opens its /proc/PID/mem: CAP_SYS_PTRACE and CAP_DAC_OVERRIDE).
        member = python_as(NOBODY, NOBODY, r"""
import mmap, sys
from vfiofs.client import IommuFd, VfioDevice
mnt = sys.argv[1]
with IommuFd(f"{mnt}/iommu") as iommu, VfioDevice(f"{mnt}/vfio/devices/vfio0") as dev:
    dev.bind_iommufd(iommu)
    dev.write(0, 0x40, b"member")
    assert dev.read(0, 0x40, 6) == b"member"
    ram = dev.mmap(0)
    assert ram[0x40:0x46] == b"member"
    ram.close()
    ioas = iommu.ioas_alloc()
    buf = mmap.mmap(-1, 4096)
    iommu.map_buffer(ioas, buf, iova=0x100000)
    dev.attach_iommufd_pt(ioas)
print("ok")
""", str(mnt), groups=[gid], env=env)
        assert member.returncode == 0 and member.stdout == "ok\n", (member.stderr, (where / "daemon.log").read_text())
        outsider = run_as(NOBODY, NOBODY, ["sh", "-c", 'exec 3<>"$1"', "sh", str(mnt / "vfio/devices/vfio1")])
        assert outsider.returncode != 0 and "Permission denied" in outsider.stderr
        container = run_as(NOBODY, NOBODY, ["sh", "-c", 'exec 3<>"$1"', "sh", str(mnt / "vfio/vfio")])
        assert container.returncode == 0, container.stderr
        _stops_on_sigterm(process, listener, mnt, mounted=mounted_here)
    finally:
        _stop(process, mnt)


@needs_root
@pytest.mark.skipif(not shutil.which("setpriv"), reason="needs setpriv (util-linux)")
def test_system_unit_serves_the_members_of_its_group():
    run_isolated(_group_members_use_the_system_mount, unused_gid())


# -- the user unit ----------------------------------------------------------------------------

def _user_unit(user) -> None:
    where = scratch()
    open_dev_fuse(where)
    expose_python(where)
    home = user_home(where, user)
    runtime = user_home(where, user, "runtime")  # $XDG_RUNTIME_DIR
    os.chmod(runtime, 0o700)
    devices = where / "my-devices"
    devices.mkdir()
    (devices / "only.toml").write_text('model = "ram"\n[ram]\nsize = "4KiB"\n')
    config = home / ".config"  # %E: $XDG_CONFIG_HOME
    (config / "vfiofs").mkdir(parents=True)
    (config / "vfiofs" / "work.env").write_text(f"# the settings of vfiofs@work\nVFIOFS_DEVICES={devices}\n")
    paths = {"%t": str(runtime), "%i": "work", "%h": str(home), "%E": str(config)}
    env = user_env(home)
    pre = run_as(user.pw_uid, user.pw_gid, unit_command(USER_UNIT, "ExecStartPre", paths), env=env)
    assert pre.returncode == 0, pre.stderr
    mnt = runtime / "vfiofs" / "work"
    command = unit_command(USER_UNIT, "ExecStart", paths)
    assert str(home / ".local/state/vfiofs/work") in command

    address = f"@vfiofs-test-{secrets.token_hex(6)}"  # abstract: systemd --user uses paths, both work
    listener = NotifySocket(address)
    log = open(where / "user-daemon.log", "wb")
    process = subprocess.Popen(command, user=user.pw_uid, group=user.pw_gid, extra_groups=[],
                               env=dict(env, NOTIFY_SOCKET=address), stdin=subprocess.DEVNULL, stdout=log,
                               stderr=log, cwd=str(home))
    log.close()
    try:
        message, sender = listener.receive(60)
        look = python_as(user.pw_uid, user.pw_gid, r"""
import os, stat, sys
os.statvfs(sys.argv[1])
st = os.stat(sys.argv[1] + "/vfio/devices/vfio0")
print(sorted(os.listdir(sys.argv[1] + "/vfio/devices")), st.st_uid, oct(stat.S_IMODE(st.st_mode)))
""", str(mnt), env=env)
        assert message.splitlines()[0] == "READY=1" and sender == process.pid, message
        assert look.returncode == 0, look.stderr
        assert look.stdout.split() == ["['vfio0']", str(user.pw_uid), "0o600"]  # from work.env
        # systemctl --user stop vfiofs@work; unmounted through fusermount3 -u
        _stops_on_sigterm(process, listener, mnt, mounted=mounted_here, log=where / "user-daemon.log")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        listener.close()


@needs_root
@pytest.mark.skipif(not shutil.which("fusermount3"), reason="needs fusermount3")
def test_user_unit_as_an_ordinary_user():
    with temporary_user() as user:
        run_isolated(_user_unit, user)
