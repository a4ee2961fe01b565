"""R4 (issue 14): the daemon SIGKILLed while a client writes persistent records.

A client binds a device with a ``persist = true`` BAR and writes record n at slot n, by
pwrite and through its mapping in turn, fsyncing after each: a record is *acknowledged*
when its fsync returned (docs/definitions.md: a killed daemon loses only what was written
since the last fsync). The daemon is SIGKILLed at a random moment. Then:

* the client's next request fails with ENOTCONN or ECONNABORTED (the request in flight
  when the connection was aborted) within 5 s — an error, not a hang; so does a second
  client that was blocked in poll() on the mount (the UART's other end, ports/vfio1): its
  poll() returns POLLERR and its read fails;
* under ``vfiofs mount``: the mountpoint is a stale mount (ENOTCONN); the next
  ``vfiofs mount`` there says so, cleans it up and mounts;
* under the system unit (systemd/vfiofs.service, run as tests/mount/test_systemd.py
  runs it; its Restart=on-failure and RestartSec= applied by the test, as systemd would):
  the restarted daemon is READY (its mount answers) again; bench/reliability.py
  measures how long that takes (the issue asks for 2 s);
* after the restart every acknowledged record is there.

Fast form: 2 kills each; VFIOFS_STRESS=long: 20 and 10.
"""

from __future__ import annotations

import shutil

import pytest

from harness import count
from kill_support import killed_daemon_mount, killed_daemon_unit
from namespaces import needs_root, unused_gid


def test_killed_mount_daemon_errors_clients_and_the_next_mount_recovers_every_acknowledged_write(tmp_path):
    result = killed_daemon_mount(tmp_path, rounds=count(2, 20))
    assert result["lost"] == 0 and result["acknowledged_records"] > 0
    assert result["client_error_after_s"]["max"] < 5


@needs_root
@pytest.mark.skipif(not shutil.which("setpriv"), reason="needs setpriv (util-linux)")
def test_killed_unit_daemon_is_restarted_with_every_acknowledged_write(tmp_path):
    """The restart time itself (the issue's 2 s) is a figure bench/reliability.py measures; here
    only a hang is a failure."""
    result = killed_daemon_unit(tmp_path, unused_gid(), rounds=count(2, 10))
    assert result["lost"] == 0 and result["acknowledged_records"] > 0
    assert result["kill_to_ready_s"]["max"] < 30, result
