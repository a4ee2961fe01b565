"""examples/edu_driver.py, a userspace driver for the bundled edu device, against a real mount."""

from __future__ import annotations

import subprocess
import sys

from support import REPO, wait_until

DRIVER = REPO / "examples" / "edu_driver.py"


def run_driver(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DRIVER), *args], capture_output=True, text=True, timeout=60,
                          cwd=REPO)


def test_edu_driver_runs_every_step(mount):
    result = run_driver(str(mount.path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    # each expected line, exactly or (ending in "...") as a prefix
    expected = [
        "edu: found 1234:11e8 at 0000:00:...",
        "edu: bound to iommufd (devid ...",
        "edu: identification 0x010000ed (version 1.0)",
        "edu: liveness 0x12345678 -> 0xedcba987 ok",
        "edu: MSI enabled with an eventfd",
        "edu: 12! = 479001600 (by MSI interrupt)",
        "edu: DMA buffer of 4096 bytes mapped at IOVA 0x100000 (IOAS ...",
        "edu: attached to IOAS ...",
        "edu: DMA RAM -> EDU 4096 bytes done (interrupt 0x100)",
        "edu: DMA EDU -> RAM 4096 bytes done (interrupt 0x100)",
        "edu: DMA round trip of 4096 bytes ok",
        "edu: all checks passed",
    ]
    assert len(lines) == len(expected), result.stdout
    for line, want in zip(lines, expected):
        assert line.startswith(want[:-3]) if want.endswith("...") else line == want, (line, want)
    # the driver closed its handle, so the device can be bound again (the release may arrive a little later)
    assert wait_until(lambda: run_driver(str(mount.path)).returncode == 0, timeout=10)


def test_edu_driver_fails_with_one_line(tmp_path):
    result = run_driver(str(tmp_path))  # not a vfiofs mount
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("edu_driver: error: ")
