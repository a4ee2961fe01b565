"""``vfiofs run`` without FUSE: the command line, the environment CMD gets, its exit status, and
every one-line error that needs no mount."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from vfiofs import cli
from vfiofs.host import preload

LIB = Path("/opt/vfiofs/libvfiofs_preload.so")


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line(err: str, *fragments: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vfiofs: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0]


def test_run_is_a_subcommand_not_a_mount_source():
    assert cli.mount_helper_argv(["run", "--help"]) == ["run", "--help"]
    assert cli.mount_helper_argv(["run", "a", "b"]) == ["run", "a", "b"]
    assert cli.mount_helper_argv(["bundled", "/mnt"]) == ["mount", "/mnt", "--devices", "bundled"]


def test_run_help_is_runs_own(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert out.startswith("usage: vfiofs run [--mount MNT | --devices DIR] -- CMD [ARGS...]")
    assert "--mount MNT" in out and "--devices DIR" in out and "MOUNTPOINT" not in out


@pytest.mark.parametrize("argv", [["run"], ["run", "--"], ["run", "--mount", "/tmp"]])
def test_no_command(capsys, argv):
    status, out, err = run_main(capsys, *argv)
    assert status == 2 and out == ""
    assert_one_line(err, "no command given", "vfiofs run [--mount MNT")


def test_mount_and_devices_together(capsys):
    status, _, err = run_main(capsys, "run", "--mount", "/tmp", "--devices", "bundled", "--", "true")
    assert status == 2
    assert_one_line(err, "--mount", "--devices", "give one of them")


def test_library_missing(capsys, monkeypatch, tmp_path):
    missing = tmp_path / "libvfiofs_preload.so"
    monkeypatch.setattr(preload, "LIBRARY", missing)
    status, _, err = run_main(capsys, "run", "--mount", str(tmp_path), "--", "true")
    assert status == 1
    assert_one_line(err, f"the interposition library {missing} is missing", "pip install -e .")


def test_command_not_found_is_127(capsys, tmp_path):
    status, _, err = run_main(capsys, "run", "--mount", str(tmp_path), "--", "vfiofs-no-such-command")
    assert status == 127
    assert_one_line(err, "vfiofs-no-such-command: command not found")
    status, _, err = run_main(capsys, "run", "--mount", str(tmp_path), "--", str(tmp_path / "nope"))
    assert status == 127
    assert_one_line(err, f"{tmp_path / 'nope'}: no such file")


def test_command_not_executable_is_126(capsys, tmp_path):
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    for target in (script, tmp_path):
        status, _, err = run_main(capsys, "run", "--mount", str(tmp_path), "--", str(target))
        assert status == 126
        assert_one_line(err, f"{target}: not an executable file")


def test_mount_that_is_missing_or_not_vfiofs(capsys, tmp_path):
    status, _, err = run_main(capsys, "run", "--mount", str(tmp_path / "gone"), "--", "true")
    assert status == 1
    assert_one_line(err, f"mount {tmp_path / 'gone'} does not exist")
    status, _, err = run_main(capsys, "run", "--mount", str(tmp_path), "--", "true")
    assert status == 1
    assert_one_line(err, f"{tmp_path} is not a vfiofs mount", f"vfiofs mount {tmp_path}")
    (tmp_path / "file").write_text("")
    status, _, err = run_main(capsys, "run", "--mount", str(tmp_path / "file"), "--", "true")
    assert status == 1
    assert_one_line(err, f"{tmp_path / 'file'} is not a directory")


def test_preload_goes_first_once():
    env = cli.preload_environment({"PATH": "/bin", "LD_PRELOAD": "/a.so /b.so"}, LIB, Path("/mnt/x"))
    assert env == {"PATH": "/bin", "LD_PRELOAD": f"{LIB}:/a.so:/b.so", "VFIOFS_MOUNT": "/mnt/x"}
    again = cli.preload_environment(env, LIB, Path("/mnt/y"))  # a vfiofs run inside a vfiofs run
    assert again["LD_PRELOAD"] == f"{LIB}:/a.so:/b.so" and again["VFIOFS_MOUNT"] == "/mnt/y"
    assert cli.preload_environment({}, LIB, Path("/m"))["LD_PRELOAD"] == str(LIB)


def test_daemon_is_not_preloaded():
    env = cli.without_preload({"LD_PRELOAD": f"{LIB}:/a.so", "VFIOFS_MOUNT": "/m", "HOME": "/h"}, LIB)
    assert env == {"LD_PRELOAD": "/a.so", "HOME": "/h"}
    assert cli.without_preload({"LD_PRELOAD": str(LIB)}, LIB) == {}


def test_exit_status_is_a_shells():
    assert cli.exit_status(0) == 0
    assert cli.exit_status(3) == 3
    assert cli.exit_status(-signal.SIGKILL) == 137
    assert cli.exit_status(-signal.SIGTERM) == 143
