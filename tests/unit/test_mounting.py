"""vfiofs.host.mounting without FUSE: the mount table read from a fake file, and the start/stop
protocol driven with small stand-in servers (python -c scripts) instead of the daemon."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from vfiofs.host import mounting
from vfiofs.host.mounting import MountFailed, find_mount, is_mounted, launch, mount_type, unescape


def escape(path: Path) -> str:
    """``path`` as the kernel writes it in /proc/self/mounts."""
    text = str(path)
    for char, code in (("\\", "\\134"), (" ", "\\040"), ("\t", "\\011"), ("\n", "\\012")):
        text = text.replace(char, code)
    return text


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return Path(os.path.realpath(tmp_path))


def table(where: Path, *lines: str) -> Path:
    file = where / "mounts"
    file.write_text("".join(line + "\n" for line in lines))
    return file


def test_unescape_octal_codes():
    assert unescape(rb"/a\040b\011c\012d\134e") == b"/a b\tc\nd\\e"
    assert unescape(rb"/plain") == b"/plain"
    assert unescape(rb"/a\134040") == b"/a\\040"  # an escaped backslash is not the start of a code


@pytest.mark.parametrize("name", ["with space", "with\ttab", "back\\slash", "new\nline", "all \t\\ three"])
def test_paths_with_characters_the_kernel_escapes(base, name):
    point = base / name
    point.mkdir()
    mounts = table(base, "proc /proc proc rw 0 0", f"vfiofs {escape(point)} fuse.vfiofs rw,nosuid,nodev 0 0")
    assert is_mounted(point, mounts)
    assert mount_type(point, mounts) == "fuse.vfiofs"
    assert find_mount(point, mounts).options == ("rw", "nosuid", "nodev")
    assert not is_mounted(base, mounts)


def test_the_raw_escaped_name_is_not_a_match(base):
    literal = base / "a\\040b"  # a directory really named with a backslash, 0, 4, 0
    literal.mkdir()
    spaced = base / "a b"
    mounts = table(base, f"x {escape(spaced)} tmpfs rw 0 0")
    assert not is_mounted(literal, mounts)
    assert is_mounted(spaced, mounts)


def test_relative_paths_and_symlinked_parents_are_compared_as_the_kernel_writes_them(base, monkeypatch):
    real = base / "real"
    (real / "mnt").mkdir(parents=True)
    (base / "link").symlink_to(real)
    mounts = table(base, f"x {escape(real / 'mnt')} fuse.vfiofs rw 0 0")
    assert is_mounted(base / "link" / "mnt", mounts)
    assert is_mounted(base / "real" / "x" / ".." / "mnt", mounts)
    monkeypatch.chdir(real)
    assert is_mounted("mnt", mounts)


def test_the_top_most_mount_counts(base):
    point = base / "m"
    point.mkdir()
    mounts = table(base, f"a {escape(point)} tmpfs rw 0 0", f"b {escape(point)} fuse.sshfs rw 0 0")
    assert mount_type(point, mounts) == "fuse.sshfs"
    assert find_mount(point, mounts).source == b"b"


def test_short_lines_are_skipped_and_an_unreadable_table_has_no_type(base):
    point = base / "m"
    mounts = table(base, "", "garbage", f"x {escape(point)} tmpfs rw 0 0")
    assert is_mounted(point, mounts)
    assert mount_type(point, base / "no-such-table") is None


def test_the_real_table_knows_the_root():
    assert is_mounted("/")


def test_the_daemon_command():
    command = mounting.vfiofs_command(Path("/m"), devices=Path("/d"), state_dir="/s", options=["allow_other"],
                                      group=12, mode=0o640, debug=True)
    assert command == [sys.executable, "-m", "vfiofs", "mount", "-f", "--devices", "/d", "--state-dir", "/s",
                       "--group", "12", "--mode", "0640", "/m", "-oallow_other", "--debug"]
    assert mounting.vfiofs_command("/m") == [sys.executable, "-m", "vfiofs", "mount", "-f", "/m"]


# -- the readiness protocol, with stand-in servers ----------------------------------------------

SERVER = """
import os, signal, sys
fd = int(sys.argv[-1])
{body}
"""


def stand_in(body: str) -> list[str]:
    return [sys.executable, "-c", SERVER.format(body=body)]


def test_ready_then_stop(base):
    daemon = launch(stand_in("os.write(fd, b'ready\\n'); os.close(fd); signal.pause()"), base / "m")
    assert daemon.alive() and daemon.returncode is None and daemon.ready_ns > 0
    assert daemon.stop() == -signal.SIGTERM
    assert not daemon.alive()
    assert daemon.stop() == -signal.SIGTERM  # again: nothing left to do


def test_a_reported_error_is_the_failure(base):
    body = "print('vfiofs: cannot mount: boom', file=sys.stderr, flush=True); os.write(fd, b'error: boom\\n'); sys.exit(1)"
    with pytest.raises(MountFailed) as failed:
        launch(stand_in(body), base / "m")
    assert failed.value.reported == "boom" and failed.value.returncode == 1 and not failed.value.timed_out
    assert failed.value.last_message == "cannot mount: boom"
    assert str(failed.value) == f"cannot mount {base / 'm'}: boom"
    assert isinstance(failed.value, RuntimeError)


def test_an_exit_without_a_report_quotes_the_last_message(base):
    log = base / "daemon.log"
    body = "print('starting', flush=True); print('Traceback: it broke', file=sys.stderr, flush=True); sys.exit(3)"
    with pytest.raises(MountFailed) as failed:
        launch(stand_in(body), base / "m", log=log)
    assert failed.value.reported is None and failed.value.returncode == 3
    assert failed.value.reason == "the daemon exited (status 3) before the mount was ready; " \
                                  "its last message: Traceback: it broke"
    assert log.read_text().splitlines() == ["starting", "Traceback: it broke"]


def test_silence_past_the_timeout_stops_the_server(base):
    with pytest.raises(MountFailed) as failed:
        launch(stand_in("signal.pause()"), base / "m", timeout=0.2)
    assert failed.value.timed_out and failed.value.reported is None
    assert failed.value.returncode is None  # it was still running when the wait gave up


def test_a_server_that_ignores_sigterm_is_killed(base):
    body = "signal.signal(signal.SIGTERM, signal.SIG_IGN); os.write(fd, b'ready\\n'); signal.pause()"
    daemon = launch(stand_in(body), base / "m")
    assert daemon.stop(timeout=0.2) == -signal.SIGKILL


def test_ready_on_stdout(base):
    command = [sys.executable, "-c", "import signal; print('ready', flush=True); signal.pause()"]
    daemon = launch(command, base / "m", ready_fd_option=None)
    assert daemon.alive()
    assert daemon.stop() == -signal.SIGTERM


def test_pythonpath_goes_in_front(base, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/already")
    seen = base / "seen"
    monkeypatch.setattr(mounting, "vfiofs_command", lambda *a: stand_in(
        f"open({str(seen)!r}, 'w').write(os.environ['PYTHONPATH']); os.write(fd, b'ready\\n'); signal.pause()"))
    daemon = mounting.start(base / "m", pythonpath=[base / "models"])
    try:
        assert seen.read_text() == os.pathsep.join([str(base / "models"), "/already"])
    finally:
        daemon.stop()
