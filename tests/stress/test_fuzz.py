"""R1: generated control requests through a real mount (docs/reliability.md)."""

from __future__ import annotations

import time

from fuzz import Fuzzer
from harness import count, record, seed


def test_generated_requests_get_only_the_kernels_errnos(mount):
    n = count(8000, 100_000)
    fuzz = Fuzzer(mount, seed())
    started = time.monotonic()
    try:
        stats = fuzz.run(n)
    finally:
        fuzz.close()
    record("R1", seed=fuzz.seed, requests=stats.requests, syscalls=stats.syscalls, crashes=stats.crashes,
           hangs=stats.hangs, slowest_s=round(stats.slowest, 3), seconds=round(time.monotonic() - started, 1),
           errnos=dict(stats.errnos.most_common()), targets=dict(stats.by_target))
    assert stats.requests == n and stats.crashes == 0 and stats.hangs == 0
    assert mount.alive()
