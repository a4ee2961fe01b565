"""A C driver written for a real host (only /dev and /sys paths, selftest style) runs
unmodified under `vfiofs run`: path redirection, ioctl translation and BAR mmap together."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from support import REPO, build_c

SOURCE = REPO / "tests" / "c" / "host_paths.c"


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> Path:
    return build_c(SOURCE, tmp_path_factory.mktemp("c") / "host_paths", "-O1")


def test_a_host_driver_runs_unmodified_under_vfiofs_run(program):
    done = subprocess.run([sys.executable, "-m", "vfiofs", "run", "--", str(program), "0000:00:01.0"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    r = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    assert r["cdev"] == "/dev/vfio/devices/vfio0"
    assert r["bind"] == r["attach"] == r["ioas_map"] == r["bar0_info"] == "ok:0"
    assert r["bar0_size"] == str(64 * 1024) and r["vendor"] == "0x1234" and r["config_pread"] == "ok:2"
    assert r["bar_pread"] == "ok:4" and r["through_mapping"] == "0xfeedf00d"
    assert r["group"] == "/dev/vfio/0"
    assert r["api_version"] == "ok:0" and r["set_container"] == "ok:0"
    assert r["check_type1v2"] == "ok:1" and r["set_iommu"] == "ok:0"
    assert r["device_fd"] == "new" and r["map_dma"] == "ok:0"
    assert r["device_info"] == "ok:0" and r["num_regions"] == "9"
