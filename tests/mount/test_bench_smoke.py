"""Smoke test of the benchmark harness: bench/run.py --quick runs and writes well-formed JSON.

No timing assertions: this only checks that the harness works end to end.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from vfiofs.host.mounting import MountEntry, mount_table

REPO = Path(__file__).resolve().parents[2]
FIGURE_KEYS = {"name", "unit", "median", "p90", "n", "baseline", "baseline_median", "ratio", "target", "met"}
MACHINE_KEYS = {"kernel", "cpu", "nproc", "python", "pyfuse3", "libfuse"}
NOT_IMPLEMENTED: set[str] = set()  # every figure is measured now


def fuse_mounts() -> list[MountEntry]:
    return [entry for entry in mount_table() if b"vfiofs-bench-" in entry.point]


@pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="needs /dev/fuse")
def test_bench_quick_writes_well_formed_json(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    process = subprocess.Popen([sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--json", str(out)],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)  # lets the harness unmount what it mounted
        try:
            output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        pytest.fail(f"bench/run.py --quick took more than 120 s:\n{output[-3000:]}")
    assert process.returncode == 0, output[-3000:]
    assert not fuse_mounts(), "the harness left a mount behind"

    result = json.loads(out.read_text())
    assert MACHINE_KEYS <= result["machine"].keys()
    assert result["machine"]["nproc"] >= 1
    assert "run.py" in result["command"] and "--quick" in result["command"]
    figures = result["figures"]
    names = {f["name"] for f in figures}
    for prefix in ("read4", "write4", "control.get_region_info", "control.raw_pair", "open_bind_close",
                   "scale.1.", "scale.10.", "concurrency.vfiofs_1client", "concurrency.vfiofs_2clients",
                   "mmap_bar.read", "irq_latency", "dma.read_1048576", "dma.write_4096"):
        assert any(name.startswith(prefix) for name in names), f"no figure {prefix}"
    assert NOT_IMPLEMENTED <= names
    for fig in figures:
        assert FIGURE_KEYS <= fig.keys(), fig
        assert fig["met"] in (None, True, False), fig
        if fig["name"] in NOT_IMPLEMENTED:
            assert fig["median"] is None and fig["p90"] is None and fig["n"] is None and fig["met"] is None, fig
            assert fig["ratio"] is None and fig["baseline_median"] is None, fig
            continue
        assert isinstance(fig["median"], (int, float)) and fig["median"] > 0, fig
        assert isinstance(fig["p90"], (int, float)) and fig["p90"] > 0, fig
        assert isinstance(fig["n"], int) and fig["n"] > 0, fig
        for key in ("baseline_median", "ratio"):
            assert fig[key] is None or (isinstance(fig[key], (int, float)) and fig[key] > 0), fig
        if fig["baseline"] is not None:
            assert fig["baseline_median"] is not None and fig["ratio"] is not None, fig
        if fig["target"] is not None:
            assert isinstance(fig["met"], bool), fig
