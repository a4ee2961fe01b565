"""The interposition library's path rules (preload/paths.c ``vfiofs_redirect``), without FUSE.

A plain directory tree stands in for the mount (the rules only look up whether it has a device
or a group); the library is loaded with ctypes in a child python, since it reads VFIOFS_MOUNT
once when it loads.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vfiofs.host.preload import library_path

PROBE = r"""
import ctypes, json, sys
lib = ctypes.CDLL(sys.argv[1], use_errno=True)
out = ctypes.create_string_buffer(4096)
answers = []
for path in json.loads(sys.stdin.read()):
    out.value = b"untouched"
    ctypes.set_errno(0)
    rc = lib.vfiofs_redirect(path.encode(), out)
    answers.append([rc, out.value.decode(), ctypes.get_errno()])
print(json.dumps(answers))
"""

BDF = "0000:00:01.0"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A stand-in mount with one device (0000:00:01.0) and one group (7)."""
    (tmp_path / "sys/bus/pci/devices" / BDF).mkdir(parents=True)
    (tmp_path / "sys/kernel/iommu_groups/7").mkdir(parents=True)
    return tmp_path


def redirect(mount: str | None, *paths: str) -> list[tuple[int, str, int]]:
    env = {key: value for key, value in os.environ.items() if key != "VFIOFS_MOUNT"}
    if mount is not None:
        env["VFIOFS_MOUNT"] = mount
    result = subprocess.run([sys.executable, "-c", PROBE, str(library_path())], input=json.dumps(paths),
                            capture_output=True, text=True, env=env, check=True)
    return [tuple(answer) for answer in json.loads(result.stdout)]


def test_device_nodes_go_into_the_mount(root):
    r = str(root)
    cases = {
        "/dev/iommu": f"{r}/iommu",
        "/dev/vfio": f"{r}/vfio",
        "/dev/vfio/": f"{r}/vfio/",
        "/dev/vfio/vfio": f"{r}/vfio/vfio",
        "/dev/vfio/3": f"{r}/vfio/3",
        "/dev/vfio/devices/vfio0": f"{r}/vfio/devices/vfio0",
        "//dev/./vfio//devices/vfio0": f"{r}/vfio//devices/vfio0",  # the rest goes as written
        "/dev/iommu/": f"{r}/iommu/",  # ENOTDIR there, as for the real node
    }
    assert redirect(r, *cases) == [(1, want, 0) for want in cases.values()]


def test_sysfs_paths_of_the_mounts_devices_and_groups_go_into_the_mount(root):
    r = str(root)
    cases = {
        f"/sys/bus/pci/devices/{BDF}": f"{r}/sys/bus/pci/devices/{BDF}",
        f"/sys/bus/pci/devices/{BDF}/vendor": f"{r}/sys/bus/pci/devices/{BDF}/vendor",
        f"/sys/bus/pci/devices/{BDF}/vfio-dev/": f"{r}/sys/bus/pci/devices/{BDF}/vfio-dev/",
        f"/sys/bus/pci/devices/{BDF}/iommu_group": f"{r}/sys/bus/pci/devices/{BDF}/iommu_group",
        # A link target appended to the link's directory stays inside the mount's /sys.
        f"/sys/bus/pci/devices/{BDF}/../../../../kernel/iommu_groups/7":
            f"{r}/sys/bus/pci/devices/{BDF}/../../../../kernel/iommu_groups/7",
        "/sys/kernel/iommu_groups/7": f"{r}/sys/kernel/iommu_groups/7",
        "/sys/kernel/iommu_groups/7/devices": f"{r}/sys/kernel/iommu_groups/7/devices",
        # The mount has no debugfs: the selftests' Intel IOMMU probe finds nothing (ENOENT).
        "/sys/kernel/debug/iommu/intel": f"{r}/sys/kernel/debug/iommu/intel",
    }
    assert redirect(r, *cases) == [(1, want, 0) for want in cases.values()]


def test_everything_else_passes_through(root):
    paths = [
        "/etc/hostname", "/dev/null", "/dev/vfiox", "/dev/iommu2", "/devx/iommu", "/dev", "/",
        "dev/iommu", "./dev/vfio/vfio", "",  # relative: not ours
        "/dev/vfio/../null", "/dev/iommu/..",  # ".." out of the redirected part
        "/sys/bus/pci/devices", "/sys/bus/pci/devices/", "/sys/bus/pci/devices/..",
        "/sys/bus/pci/devices/0000:00:02.0/vendor",  # a device the mount does not have: the host's
        "/sys/kernel/iommu_groups/8/type", "/sys/kernel/iommu_groups", "/sys/kernel/debug/dri",
        f"/sys/bus/pci/devices/{BDF}/../../../../../etc/hostname",  # climbs out of /sys
        "/sys/class/vfio-dev/vfio0",
    ]
    assert [(rc, err) for rc, _, err in redirect(str(root), *paths)] == [(0, 0)] * len(paths)


def test_without_a_usable_mount_root_nothing_is_redirected(root):
    for mount in (None, "", "relative/mnt"):
        assert redirect(mount, "/dev/iommu", f"/sys/bus/pci/devices/{BDF}/vendor") == [(0, "untouched", 0)] * 2


def test_trailing_slashes_of_the_root_are_dropped(root):
    assert redirect(f"{root}///", "/dev/iommu") == [(1, f"{root}/iommu", 0)]


def test_a_rewritten_path_that_does_not_fit_is_enametoolong(root):
    tail = "/".join(["x" * 200] * 21)[: 4095 - len("/dev/vfio/")]
    long_path = "/dev/vfio/" + tail
    assert len(long_path) == 4095
    fits = "/dev/vfio/" + tail[: 4095 - len(str(root)) - len("/vfio/") - 1]
    (rc, _, err), fitted = redirect(str(root), long_path, fits)
    assert (rc, err) == (-1, errno.ENAMETOOLONG)
    assert fitted == (1, f"{root}/vfio/{fits[len('/dev/vfio/'):]}", 0)
