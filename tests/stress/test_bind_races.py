"""R2 (issue 14): processes racing to bind one device.

Eight processes each open the same device node and issue VFIO_DEVICE_BIND_IOMMUFD at the
same moment (a barrier), round after round. The kernel's outcome (vfio cdev + iommufd,
drivers/vfio/device_cdev.c): every open succeeds; the first BIND to take the device wins;
each other BIND fails in vfio_df_open() with EINVAL ("device->open_count != 0": the cdev
path does not share a device), and that fd stays blocked (reads EINVAL, a second BIND
EINVAL) while the winner holds the device. vfiofs does the same, every round; after the
winner's close the device is unbound and reset.

Fast form here (8 × 30 rounds); VFIOFS_STRESS=long runs 8 × 1,000
(bench/reliability_kills.py records the figures).
"""

from __future__ import annotations

from kill_support import LONG, bind_race


def test_eight_processes_bind_one_device_exactly_one_wins_every_round(mount):
    result = bind_race(mount.path, processes=8, rounds=1000 if LONG else 30)
    assert result["rounds_with_that_outcome"] == result["rounds"]
    assert result["outcome"] == {"0": 1, "EINVAL": 7}
    assert sum(result["wins_per_process"]) == result["rounds"]
