"""R3 (issue 14): clients SIGKILLed at a random point.

Each round a client binds the edu device (DMA, MSI, timers) and a RAM device, maps its
own memory for DMA, maps a BAR, hands over an eventfd and runs DMA back and forth with a
completion interrupt; it reports each stage as it gets there, and is SIGKILLed at a random
moment after a randomly chosen stage (before anything, after the opens, mid-bind, bound,
with DMA mappings, with a BAR mapping, with eventfds, mid-DMA). A quarter of the clients
take the legacy path instead (container, group, type1 DMA map, VFIO_GROUP_GET_DEVICE_FD
and its CLAIM — killed mid-way too — eventfds, DMA). After every kill:

* the daemon reports no holder, no IOAS and no interrupts for any device, and no open
  handle (``vfiofs ls --json``: the status file), waited for by polling, not sleeping;
* both devices are back at power-on (registers, DMA engine, RAM contents);
* at the end the daemon holds as many descriptors as after the warm-up rounds, and its
  RSS grew by less than kill_support.RSS_SLACK_KIB (see there for why some slack).

Fast form here (40 kills); VFIOFS_STRESS=long runs 1,000.
"""

from __future__ import annotations

import json
import subprocess
import sys

from harness import count
from kill_support import RSS_SLACK_KIB, killed_clients, quiet


def test_clients_killed_anywhere_leave_nothing_behind(mount):
    result = killed_clients(mount.path, mount.daemon.pid, rounds=count(40, 1000))
    assert result["daemon_fds"]["back"], result
    assert result["daemon_rss_kib"]["growth"] <= RSS_SLACK_KIB, result
    assert quiet(mount.path)
    listing = subprocess.run([sys.executable, "-m", "vfiofs", "ls", "--json", str(mount.path)],
                             capture_output=True, text=True, check=True)
    assert all(not d["bound_by"] for d in json.loads(listing.stdout)["devices"])
    table = subprocess.run([sys.executable, "-m", "vfiofs", "ls", str(mount.path)], capture_output=True, text=True,
                           check=True)
    assert "pid " not in table.stdout  # the BOUND BY column shows no holder
