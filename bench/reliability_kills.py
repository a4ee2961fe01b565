"""Reliability figures of issue 14 for R2 (bind races), R3 (killed clients), R4 (killed
daemon) and permissions, measured with the scenarios the stress tests run
(tests/stress/kill_support.py), at the issue's full counts when ``long``.

bench/reliability.py runs these after R1, R5 and R6 and prints them in its table. R4's
systemd unit and the permission checks between users need root (they are reported as
skipped otherwise).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for _path in (REPO / "tests" / "stress", REPO / "tests", REPO):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import kill_support  # noqa: E402  (tests/stress: the scenarios)
from support import start_mount, stop_mount  # noqa: E402


def _mounted(fn):
    """Run ``fn(mount)`` against a fresh mount of the bundled devices in a temporary directory."""
    where = Path(tempfile.mkdtemp(prefix="vfiofs-kills-"))
    mnt = where / "mnt"
    mnt.mkdir()
    m = start_mount(mnt)
    try:
        result = fn(m)
        assert m.alive(), "the daemon died"
    finally:
        returncode = stop_mount(m)
        m.daemon.close_log()
        shutil.rmtree(where, ignore_errors=True)
    assert returncode == 0, f"daemon exited with {returncode}"
    return result


def measure_r2(long: bool) -> dict:
    """8 processes × 1,000 rounds (--long; 30 otherwise) binding one device at once; then the
    same with half of them opening the device's group node instead."""
    rounds = 1000 if long else 30
    result = _mounted(lambda m: kill_support.bind_race(m.path, processes=8, rounds=rounds))
    result["with_group_opens"] = _mounted(lambda m: kill_support.cdev_group_race(m.path, processes=8, rounds=rounds))
    return result


def measure_r3(long: bool) -> dict:
    """1,000 clients (--long; 40 otherwise) SIGKILLed at a random point."""
    def run(m) -> dict:
        result = kill_support.killed_clients(m.path, m.daemon.pid, rounds=1000 if long else 40)
        result["rss_slack_kib"] = kill_support.RSS_SLACK_KIB
        assert result["daemon_fds"]["back"], result
        assert result["daemon_rss_kib"]["growth"] <= kill_support.RSS_SLACK_KIB, result
        return result

    return _mounted(run)


def measure_r4(long: bool) -> dict:
    """The daemon SIGKILLed under ``vfiofs mount`` (20 kills with --long, 2 otherwise) and under
    the system unit (10 / 2; root and setpriv only)."""
    results: dict = {}
    where = Path(tempfile.mkdtemp(prefix="vfiofs-kills-"))
    try:
        (where / "m").mkdir()
        results["vfiofs_mount"] = kill_support.killed_daemon_mount(where / "m", rounds=20 if long else 2)
        if os.geteuid() == 0 and shutil.which("setpriv"):
            from namespaces import unused_gid

            (where / "u").mkdir()
            unit = kill_support.killed_daemon_unit(where / "u", unused_gid(), rounds=10 if long else 2)
            assert unit["kill_to_ready_s"]["max"] < 2.0, unit
            results["system_unit"] = unit
        else:
            results["system_unit"] = "skipped: needs root and setpriv"
    finally:
        shutil.rmtree(where, ignore_errors=True)
    return results


PERMISSION_TESTS = [
    "tests/stress/test_permissions.py",
    "tests/mount/test_mount_robustness.py::test_permissions_are_enforced_by_the_kernel",
    "tests/mount/test_mount_robustness.py::test_a_forged_token_is_refused",
    "tests/mount/test_nonroot.py",
    "tests/mount/test_systemd.py::test_system_unit_serves_the_members_of_its_group",
    "tests/mount/test_mount_dma.py::test_the_daemon_refuses_a_map_whose_process_it_cannot_prove",
    "tests/mount/test_mount_dma.py::test_a_parcel_from_another_user_is_refused",
    "tests/mount/test_mount_mmap.py::test_side_channel_refuses_a_listener_of_another_uid",
]


def measure_permissions() -> dict:
    """Every permission check of the suite (this issue's and the earlier ones), with its outcome."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *PERMISSION_TESTS],
                          cwd=REPO, capture_output=True, text=True)
    outcomes: dict[str, str] = {}
    for line in done.stdout.splitlines():
        found = re.match(r"(PASSED|FAILED|SKIPPED|ERROR) (?:\[\d+\] )?(\S+)", line)
        if found:
            outcomes[found[2]] = found[1].lower()
    assert outcomes, done.stdout[-2000:] + done.stderr[-2000:]
    failed = [name for name, outcome in outcomes.items() if outcome in ("failed", "error")]
    assert not failed, f"failed: {failed}"
    return {"checks": len(outcomes), "passed": sum(o == "passed" for o in outcomes.values()),
            "skipped": sum(o == "skipped" for o in outcomes.values()), "tests": outcomes}


MEASURES = [("R2 bind races", measure_r2), ("R3 killed clients", measure_r3), ("R4 killed daemon", measure_r4),
            ("permissions", lambda long: measure_permissions())]


def summary(name: str, result: dict) -> str:
    """One line of figures for ``name``'s result."""
    if name.startswith("R2"):
        mixed = result["with_group_opens"]
        return (f"{result['processes']} processes x {result['rounds']} rounds: one winner + "
                f"{result['outcome']['EINVAL']} x EINVAL in {result['rounds_with_that_outcome']}/{result['rounds']} "
                f"rounds ({result['rounds_all_binds_in_flight_at_once']} with every BIND in flight at once), "
                f"wins {result['wins_per_process']}, {result['seconds']} s; with 4 group opens racing 4 BINDs: "
                f"one winner in {mixed['won_by_bind'] + mixed['won_by_group_open']}/{mixed['rounds']} rounds "
                f"(BIND {mixed['won_by_bind']}, group open {mixed['won_by_group_open']}), {mixed['seconds']} s")
    if name.startswith("R3"):
        fds, rss = result["daemon_fds"], result["daemon_rss_kib"]
        return (f"{result['rounds']} kills {result['kills_by_stage']}: all reset, no holder; daemon fds "
                f"{fds['baseline']} -> {fds['after']}, RSS {rss['baseline']} -> {rss['after']} KiB "
                f"(+{rss['growth']}, slack {result['rss_slack_kib']}), cleanup median {result['cleanup_ms']['median']} "
                f"ms max {result['cleanup_ms']['max']} ms, {result['seconds']} s")
    if name.startswith("R4"):
        parts = []
        for how, r in result.items():
            if isinstance(r, str):
                parts.append(f"{how}: {r}")
                continue
            back = r.get("kill_to_ready_s") or r.get("kill_to_answering_s")
            parts.append(f"{how}: {r['rounds']} kills, client errors {r['client_errors']} after max "
                         f"{r['client_error_after_s']['max']} s, answering again after median {back['median']} s "
                         f"max {back['max']} s, {r['acknowledged_records']} acknowledged records, {r['lost']} lost")
        return "; ".join(parts)
    return f"{result['passed']} passed, {result['skipped']} skipped of {result['checks']} checks"
