"""R2 (issue 14): processes racing to bind one device.

Eight processes each open the same device node and issue VFIO_DEVICE_BIND_IOMMUFD at the
same moment (a barrier), round after round. The kernel's outcome (vfio cdev + iommufd,
drivers/vfio/device_cdev.c): every open succeeds; the first BIND to take the device wins;
each other BIND fails in vfio_df_open() with EINVAL ("device->open_count != 0": the cdev
path does not share a device), and that fd stays blocked (reads EINVAL, a second BIND
EINVAL) while the winner holds the device. vfiofs does the same, every round; after the
winner's close the device is unbound and reset.

The same with the legacy path in the race: half the processes open the device's group
node instead (one winner in all; group opens lose with EBUSY, BINDs with EINVAL after a
winning BIND and with EBUSY after a winning group open).

Fast form here (8 × 30 rounds each); VFIOFS_STRESS=long runs 8 × 1,000
(bench/reliability.py records the figures).
"""

from __future__ import annotations

from harness import count
from kill_support import bind_race, cdev_group_race


def test_eight_processes_bind_one_device_exactly_one_wins_every_round(mount):
    result = bind_race(mount.path, processes=8, rounds=count(30, 1000))
    assert result["rounds_with_that_outcome"] == result["rounds"]
    assert result["outcome"] == {"0": 1, "EINVAL": 7}
    assert sum(result["wins_per_process"]) == result["rounds"]


def test_binds_and_group_opens_racing_for_one_device_exactly_one_path_wins_every_round(mount):
    """The legacy path races too: the device's group node opened by four processes while four
    others BIND the device. The two paths exclude each other (kernel group.c: EBUSY both
    ways), so one of the eight wins each round and everybody else is refused."""
    result = cdev_group_race(mount.path, processes=8, rounds=count(30, 1000))
    assert result["won_by_bind"] + result["won_by_group_open"] == result["rounds"]
