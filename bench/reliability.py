#!/usr/bin/env python3
"""vfiofs reliability figures: runs the stress scenarios in their long form and prints what they measured.

    .venv/bin/python bench/reliability.py [--fast] [--seed N] [--json PATH]

R1 generated requests (count, crashes, hangs, slowest answer, errno histogram), R5 escape
attempts of blocked and closed handles (attempts, escapes), R6 DMA misuse (attempts, refused,
traced): the tests themselves (tests/stress/, real mounts, real system calls) do the work;
this script runs them with VFIOFS_STRESS=long (or the CI form with --fast) and collects the
figures they record (VFIOFS_STRESS_REPORT). Then R2 bind races, R3 killed clients, R4 killed
daemon and the permission checks, through the same scenarios as their tests
(bench/reliability_kills.py, tests/stress/kill_support.py). It prints one table; the exit
status is 1 if anything failed. See docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: the tests that record R1, R5 and R6 figures (R2-R4 are measured by reliability_kills)
R1_R5_R6 = ["tests/stress/test_fuzz.py", "tests/stress/test_escapes.py", "tests/stress/test_dma_misuse.py",
            "tests/stress/test_regressions.py"]


def run(fast: bool, seed: int | None) -> tuple[int, list[dict], float]:
    with tempfile.TemporaryDirectory(prefix="vfiofs-reliability-") as tmp:
        report = Path(tmp) / "figures.jsonl"
        env = dict(os.environ, VFIOFS_STRESS_REPORT=str(report))
        env.pop("VFIOFS_STRESS", None)
        if not fast:
            env["VFIOFS_STRESS"] = "long"
        if seed is not None:
            env["VFIOFS_STRESS_SEED"] = str(seed)
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "pytest", *R1_R5_R6, "-q", "-p", "no:cacheprovider"],
                              cwd=REPO, env=env)
        took = time.monotonic() - started
        figures = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    return done.returncode, figures, took


def table(figures: list[dict], took: float, fast: bool) -> str:
    by = {f["section"]: f for f in figures}
    rows = [("form", "fast (CI)" if fast else "long (VFIOFS_STRESS=long)"), ("wall time", f"{took:.0f} s")]
    if "R1" in by:
        r1 = by["R1"]
        rows += [("R1 seed", f"{r1['seed']:#x}"), ("R1 generated requests", f"{r1['requests']:,}"),
                 ("R1 system calls (with checks)", f"{r1['syscalls']:,}"),
                 ("R1 daemon crashes", str(r1["crashes"])), ("R1 hangs over 5 s", str(r1["hangs"])),
                 ("R1 slowest answer", f"{r1['slowest_s'] * 1000:.1f} ms"),
                 ("R1 run time", f"{r1['seconds']:.0f} s")]
        total = sum(r1["errnos"].values())
        for name, n in sorted(r1["errnos"].items(), key=lambda kv: -kv[1]):
            rows.append((f"R1   {name}", f"{n:,} ({100 * n / total:.1f} %)"))
    else:
        rows.append(("R1", "no figures (the test did not finish)"))
    if "R1-channel" in by:
        rows += [("R1 fd-channel deposits", f"{by['R1-channel']['deposits']:,}"),
                 ("R1 fd-channel hangs, crashes", f"{by['R1-channel']['hangs']}, {by['R1-channel']['crashes']}")]
    if "R5" in by:
        rows += [("R5 escape attempts", f"{by['R5']['attempts']:,}"), ("R5 escapes", str(by["R5"]["escapes"]))]
    else:
        rows.append(("R5", "no figures (the test did not finish)"))
    if "R6" in by:
        r6 = by["R6"]
        rows += [("R6 misuse attempts", str(r6["attempts"])), ("R6 refused", str(r6["refused"])),
                 ("R6 in the trace", str(r6["traced"]))]
    else:
        rows.append(("R6", "no figures (the test did not finish)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="the bounded form CI runs, not the long one")
    parser.add_argument("--seed", type=lambda s: int(s, 0), help="seed of R1's generator (default: a fresh one)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()
    status, figures, took = run(args.fast, args.seed)
    kills, failed = measure_kills(long=not args.fast)
    print()
    print(table(figures, took, args.fast))
    for name, line in kills.items():
        print(f"{name:<30}  {line}")
    if args.json:
        Path(args.json).write_text(json.dumps({"fast": args.fast, "seconds": took, "pytest_status": status,
                                               "figures": figures, "kills": kills}, indent=1) + "\n")
    return 1 if status or failed else 0


def measure_kills(long: bool) -> tuple[dict[str, str], bool]:
    """R2, R3, R4 and permissions: one summary line each (with its wall time)."""
    import reliability_kills  # bench/, next to this script

    lines, failed = {}, False
    for name, measure in reliability_kills.MEASURES:
        started = time.monotonic()
        try:
            line = reliability_kills.summary(name, measure(long))
        except AssertionError as exc:
            line, failed = f"FAIL {str(exc)[:2000]}", True
        lines[name] = f"{line}  [{time.monotonic() - started:.0f} s]"
    return lines, failed


if __name__ == "__main__":
    sys.exit(main())
