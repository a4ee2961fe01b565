#!/usr/bin/env python3
"""vfiofs benchmark harness: every figure against its baseline, measured in the same run.

    .venv/bin/python bench/run.py [--quick] [--json PATH]

Prints a table and writes JSON (default bench/results.json). See bench/README.md for what
each figure means. Latencies are per-operation: each operation is timed on its own with
time.perf_counter_ns; the figure is the median (and p90) of those per-op times. The
candidates of one figure are measured in interleaved rounds so drift hits all of them alike.
The daemons run in child processes; the clients run in this process (and, for the
concurrency figure, in worker child processes).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


def _source_tree() -> Path:
    """The vfiofs tree to benchmark: --src DIR (also passed to workers as VFIOFS_BENCH_SRC), else the repo."""
    for i, arg in enumerate(sys.argv):
        if arg == "--src" and i + 1 < len(sys.argv):
            return Path(sys.argv[i + 1]).resolve()
        if arg.startswith("--src="):
            return Path(arg.split("=", 1)[1]).resolve()
    return Path(os.environ.get("VFIOFS_BENCH_SRC", REPO)).resolve()


def _own_mounting():
    """vfiofs/host/mounting.py of this harness's tree (standard library only), whichever tree --src measures."""
    spec = importlib.util.spec_from_file_location("vfiofs_bench_mounting", REPO / "vfiofs" / "host" / "mounting.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


mounting = _own_mounting()
SRC = _source_tree()
os.environ["VFIOFS_BENCH_SRC"] = str(SRC)
sys.path.insert(0, str(SRC))

from vfiofs.abi import protocol  # noqa: E402
from vfiofs.client import (  # noqa: E402
    VFIO_DEVICE_BIND_IOMMUFD,
    VFIO_DEVICE_GET_REGION_INFO,
    VFIO_PCI_MSIX_IRQ_INDEX,
    IommuFd,
    VfioDevice,
    ioctl,
    vfio_device_bind_iommufd,
    vfio_region_info,
)

pc = time.perf_counter_ns
CONTROL = 1 << 62  # mailbox offset used for the C / bare pyfuse3 pairs
READY_TIMEOUT = 60.0


# ------------------------------------------------------------------------------------------
# statistics and figures
# ------------------------------------------------------------------------------------------

def pct(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        raise ValueError("no samples")
    index = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[index]


class Sample:
    """A set of measurements of one quantity (already in the figure's unit)."""

    def __init__(self, values: list[float]) -> None:
        self.values = sorted(values)

    @property
    def median(self) -> float:
        return pct(self.values, 0.5)

    @property
    def p90(self) -> float:
        return pct(self.values, 0.9)

    @property
    def n(self) -> int:
        return len(self.values)


def ns_to_us(values: list[int]) -> Sample:
    return Sample([v / 1000.0 for v in values])


FIGURES: list[dict] = []


def figure(name: str, unit: str, sample: Sample | None, baseline: str | None = None,
           base: Sample | None = None, target: str | None = None, limit: float | None = None,
           on: str = "ratio", note: str = "", **extra) -> dict:
    """Record one figure. ``limit`` is checked against the ratio (on="ratio") or the value."""
    fig: dict = {"name": name, "unit": unit, "median": None, "p90": None, "n": None,
                 "baseline": baseline, "baseline_median": None, "baseline_p90": None, "baseline_n": None,
                 "ratio": None, "target": target, "met": None}
    if sample is not None:
        fig.update(median=round(sample.median, 3), p90=round(sample.p90, 3), n=sample.n)
    if base is not None:
        fig.update(baseline_median=round(base.median, 3), baseline_p90=round(base.p90, 3), baseline_n=base.n)
        if sample is not None and base.median > 0:
            fig["ratio"] = round(sample.median / base.median, 3)
    if limit is not None and sample is not None:
        value = fig["ratio"] if on == "ratio" else sample.median
        fig["met"] = None if value is None else bool(value <= limit)
    if note:
        fig["note"] = note
    fig.update(extra)
    FIGURES.append(fig)
    return fig


# ------------------------------------------------------------------------------------------
# timing loops (the operation is inlined so the loop itself costs as little as possible)
# ------------------------------------------------------------------------------------------

def lat_pread(fd: int, n: int, size: int, offset: int) -> list[int]:
    out = [0] * n
    pread = os.pread
    for i in range(n):
        t0 = pc()
        pread(fd, size, offset)
        out[i] = pc() - t0
    return out


def lat_pwrite(fd: int, n: int, data: bytes, offset: int) -> list[int]:
    out = [0] * n
    pwrite = os.pwrite
    for i in range(n):
        t0 = pc()
        pwrite(fd, data, offset)
        out[i] = pc() - t0
    return out


def lat_pair(fd: int, n: int, request: bytes, reply_size: int, offset: int) -> list[int]:
    out = [0] * n
    pwrite, pread = os.pwrite, os.pread
    for i in range(n):
        t0 = pc()
        pwrite(fd, request, offset)
        pread(fd, reply_size, offset)
        out[i] = pc() - t0
    return out


def lat_call(fn: Callable[[], object], n: int) -> list[int]:
    out = [0] * n
    for i in range(n):
        t0 = pc()
        fn()
        out[i] = pc() - t0
    return out


def interleaved(candidates: dict[str, Callable[[int], list[int]]], n: int, rounds: int = 4,
                warmup: int = 200) -> dict[str, Sample]:
    """Run each candidate for n ops in total, in ``rounds`` alternating chunks."""
    for run in candidates.values():
        run(min(warmup, n))
    collected: dict[str, list[int]] = {name: [] for name in candidates}
    chunk = max(1, n // rounds)
    for r in range(rounds):
        size = chunk if r < rounds - 1 else n - chunk * (rounds - 1)
        for name, run in candidates.items():
            collected[name].extend(run(size))
    return {name: ns_to_us(values) for name, values in collected.items()}


# ------------------------------------------------------------------------------------------
# servers: started as children, always stopped and unmounted
# ------------------------------------------------------------------------------------------

class Server:
    """A FUSE server the harness started (vfiofs, the C server or bare pyfuse3) and its mount."""

    def __init__(self, kind: str, daemon) -> None:
        self.kind, self.daemon = kind, daemon
        self.process, self.mountpoint, self.log = daemon.process, daemon.mountpoint, daemon.log
        self.ready_ns = daemon.ready_ns  # from process start to its ready report

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")


class Harness:
    """Owns the temp dir, every child server and every mount; ``close()`` undoes them all."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="vfiofs-bench-"))
        self.servers: list[Server] = []
        self.count = 0

    def _mountpoint(self, kind: str) -> Path:
        self.count += 1
        path = self.tmp / f"mnt-{kind}-{self.count}"
        path.mkdir()
        return path

    def _register(self, kind: str, daemon) -> Server:
        server = Server(kind, daemon)
        self.servers.append(server)
        return server

    def start_vfiofs(self, devices: Path | None = None, pythonpath: Path | None = None) -> Server:
        mountpoint = self._mountpoint("vfiofs")
        if devices is None and SRC != REPO and (SRC / "devices").is_dir():
            devices = SRC / "devices"  # the bundled package would resolve to the installed (editable) repo
        daemon = mounting.start(mountpoint, devices=devices, pythonpath=() if pythonpath is None else (pythonpath,),
                                log=mountpoint.with_suffix(".log"), cwd=SRC, timeout=READY_TIMEOUT)
        return self._register("vfiofs", daemon)

    def _start_stdout_ready(self, kind: str, command: list[str]) -> Server:
        mountpoint = self._mountpoint(kind)
        daemon = mounting.launch(command + [str(mountpoint)], mountpoint, ready_fd_option=None,
                                 log=mountpoint.with_suffix(".log"), cwd=REPO, timeout=READY_TIMEOUT)
        return self._register(kind, daemon)

    def build_c(self) -> Path:
        binary = self.tmp / "cfuse"
        flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], check=True,
                               capture_output=True, text=True).stdout.split()
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(binary), str(BENCH / "cfuse.c"), *flags], check=True)
        return binary

    def start_c(self, binary: Path) -> Server:
        return self._start_stdout_ready("cfuse", [str(binary)])

    def start_bare(self) -> Server:
        return self._start_stdout_ready("barepy", [sys.executable, str(BENCH / "bare_pyfuse3.py")])

    def stop(self, server: Server) -> None:
        server.daemon.stop(20)
        if server in self.servers:
            self.servers.remove(server)

    def close(self) -> None:
        for server in list(self.servers):
            try:
                self.stop(server)
            except BaseException as exc:  # keep cleaning up the others
                print(f"bench: cleanup of {server.mountpoint}: {exc}", file=sys.stderr)
                with_kill(server.process)
        for path in sorted(self.tmp.glob("mnt-*")):
            if path.is_dir() and mounting.is_mounted(path):
                mounting.lazy_unmount(path)
        shutil.rmtree(self.tmp, ignore_errors=True)


def set_affinity(pid: int, cpus: set[int]) -> None:
    """Set the CPU affinity of every thread of process ``pid``."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, OSError):
            pass


def with_kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


# ------------------------------------------------------------------------------------------
# vfiofs client helpers
# ------------------------------------------------------------------------------------------

def bound_device(mnt: Path, index: int) -> tuple[IommuFd, VfioDevice]:
    """Open and bind vfio<index>. A previous holder's release arrives asynchronously, so
    EINVAL (the device is still bound through the old handle) is retried for up to 5 s."""
    iommu = IommuFd(mnt / "iommu")
    dev = VfioDevice(mnt / f"vfio/devices/vfio{index}")
    deadline = time.monotonic() + 5
    while True:
        try:
            dev.bind_iommufd(iommu)
            return iommu, dev
        except OSError as exc:
            if exc.errno != errno.EINVAL or time.monotonic() > deadline:
                dev.close()
                iommu.close()
                raise
            time.sleep(0.001)


def region_info_request() -> tuple[bytes, int]:
    info = vfio_region_info(argsz=ctypes.sizeof(vfio_region_info), index=0)
    req = protocol.Request(protocol.OP_IOCTL, VFIO_DEVICE_GET_REGION_INFO, protocol.ARG_BUFFER,
                           payload=bytes(info))
    return protocol.encode_request(req), protocol.REPLY_HEADER_SIZE + ctypes.sizeof(vfio_region_info)


# ------------------------------------------------------------------------------------------
# concurrency workers (separate processes)
# ------------------------------------------------------------------------------------------

def worker_main(argv: list[str]) -> int:
    """--worker PATH MNT_KIND INDEX N: bind (vfiofs) or just open (c), say ready, wait for go, read."""
    path, kind, index, n = argv[0], argv[1], int(argv[2]), int(argv[3])
    keep = []
    if kind == "vfiofs":
        iommu, dev = bound_device(Path(path), index)
        keep = [iommu, dev]
        fd = dev.fileno()
    else:
        fd = os.open(path, os.O_RDWR)
    pread = os.pread
    print("ready", flush=True)
    while sys.stdin.readline().strip() == "go":
        t0 = pc()
        for _ in range(n):
            pread(fd, 4, 0)
        t1 = pc()
        print(json.dumps({"start": t0, "end": t1, "n": n}), flush=True)
    del keep
    return 0


def concurrent_rates(targets: list[tuple[str, str, int]], n: int, reps: int) -> Sample:
    """Aggregate ops/s of len(targets) worker processes reading at once, one value per repetition."""
    workers = []
    try:
        for path, kind, index in targets:
            workers.append(subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--worker", path, kind, str(index), str(n)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO))
        for w in workers:
            if w.stdout.readline().strip() != "ready":
                raise RuntimeError("concurrency worker failed to start")
        rates = []
        for _ in range(reps + 1):  # the first repetition is a warm-up
            for w in workers:
                w.stdin.write("go\n")
                w.stdin.flush()
            results = [json.loads(w.stdout.readline()) for w in workers]
            span = max(r["end"] for r in results) - min(r["start"] for r in results)
            rates.append(sum(r["n"] for r in results) / (span / 1e9))
        for w in workers:
            w.stdin.close()
            w.wait(timeout=20)
        return Sample(rates[1:])
    finally:
        for w in workers:
            with_kill(w)


# ------------------------------------------------------------------------------------------
# the benchmarks
# ------------------------------------------------------------------------------------------

def bench_trapped(h: Harness, vfs: Server, c: Server, bare: Server, n: int) -> None:
    iommu, dev = bound_device(vfs.mountpoint, 0)
    cfd = os.open(c.mountpoint / "f", os.O_RDWR)
    bfd = os.open(bare.mountpoint / "f", os.O_RDWR)
    shm = tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="vfiofs-bench-")
    shm.write(bytes(4096))
    shm.flush()
    sfd = shm.fileno()
    vfd = dev.fileno()
    four = bytes(4)
    try:
        assert os.pread(vfd, 4, 0) == four
        reads = interleaved({
            "vfiofs": lambda k: lat_pread(vfd, k, 4, 0),
            "c": lambda k: lat_pread(cfd, k, 4, 0),
            "bare": lambda k: lat_pread(bfd, k, 4, 0),
            "tmpfs": lambda k: lat_pread(sfd, k, 4, 0),
        }, n)
        writes = interleaved({
            "vfiofs": lambda k: lat_pwrite(vfd, k, four, 0),
            "c": lambda k: lat_pwrite(cfd, k, four, 0),
            "bare": lambda k: lat_pwrite(bfd, k, four, 0),
            "tmpfs": lambda k: lat_pwrite(sfd, k, four, 0),
        }, n)
    finally:
        os.close(cfd)
        os.close(bfd)
        shm.close()
        dev.close()
        iommu.close()
    for op, s in (("read", reads), ("write", writes)):
        label = f"trapped 4-byte {op} (BAR0+0, bound vfio0)"
        figure(f"{op}4", "us", s["vfiofs"], "C libfuse3 low-level, 1 thread", s["c"], "<= 2.0x C", 2.0,
               label=label)
        figure(f"{op}4", "us", s["vfiofs"], "bare pyfuse3+trio, max_tasks=1", s["bare"], "<= 1.15x bare pyfuse3",
               1.15, label=label)
        figure(f"{op}4", "us", s["vfiofs"], "tmpfs (/dev/shm) p" + op, s["tmpfs"], label=label)


def bench_unpinned_read(h: Harness, vfs: Server, c: Server, n: int) -> None:
    """Context: the trapped read with the scheduler free to place client and daemon anywhere."""
    iommu, dev = bound_device(vfs.mountpoint, 0)
    cfd = os.open(c.mountpoint / "f", os.O_RDWR)
    vfd = dev.fileno()
    try:
        s = interleaved({"vfiofs": lambda k: lat_pread(vfd, k, 4, 0),
                         "c": lambda k: lat_pread(cfd, k, 4, 0)}, n)
    finally:
        os.close(cfd)
        dev.close()
        iommu.close()
    figure("read4.unpinned", "us", s["vfiofs"], "C libfuse3 low-level, unpinned", s["c"],
           label="trapped 4-byte read, NOT pinned (context)",
           note="scheduler places client and daemon; a cross-CPU wake-up adds tens of us")


def bench_control(h: Harness, vfs: Server, c: Server, bare: Server, n: int) -> None:
    iommu, dev = bound_device(vfs.mountpoint, 0)
    cfd = os.open(c.mountpoint / "f", os.O_RDWR)
    bfd = os.open(bare.mountpoint / "f", os.O_RDWR)
    vfd = dev.fileno()
    request, reply_size = region_info_request()
    raw_offset = protocol.control_offset(0)
    c_request = bytes(48)
    try:
        os.pwrite(vfd, request, raw_offset)
        reply = protocol.decode_reply(os.pread(vfd, reply_size, raw_offset))
        assert reply.result == 0 and len(reply.payload) == ctypes.sizeof(vfio_region_info), reply
        assert dev.get_region_info(0).size > 0
        s = interleaved({
            "lib": lambda k: lat_call(lambda: dev.get_region_info(0), k),
            "raw": lambda k: lat_pair(vfd, k, request, reply_size, raw_offset),
            "c": lambda k: lat_pair(cfd, k, c_request, 64, CONTROL),
            "bare": lambda k: lat_pair(bfd, k, c_request, 64, CONTROL),
        }, n)
    finally:
        os.close(cfd)
        os.close(bfd)
        dev.close()
        iommu.close()
    base = "C mailbox pair (pwrite 48 B + pread 64 B)"
    figure("control.get_region_info", "us", s["lib"], base, s["c"], "<= 2.5x C", 2.5,
           label="VfioDevice.get_region_info(0) (client library)")
    figure("control.raw_pair", "us", s["raw"], base, s["c"], "<= 2.5x C", 2.5,
           label=f"raw mailbox GET_REGION_INFO (pwrite {len(request)} B + pread {reply_size} B)")
    figure("control.raw_pair", "us", s["raw"], "bare pyfuse3 mailbox pair (48 B + 64 B)", s["bare"],
           label=f"raw mailbox GET_REGION_INFO (pwrite {len(request)} B + pread {reply_size} B)")


def bench_open_bind(h: Harness, vfs: Server, c: Server, n: int) -> None:
    iommu = IommuFd(vfs.mountpoint / "iommu")
    node = str(vfs.mountpoint / "vfio/devices/vfio0")
    cnode = str(c.mountpoint / "f")
    busy = [0]

    def cycle() -> None:
        fd = os.open(node, os.O_RDWR | os.O_CLOEXEC)
        try:
            while True:
                bind = vfio_device_bind_iommufd(argsz=ctypes.sizeof(vfio_device_bind_iommufd), iommufd=iommu.fd)
                try:
                    ioctl(fd, VFIO_DEVICE_BIND_IOMMUFD, bind)
                    break
                except OSError as exc:  # the previous close's release may still be in flight
                    if exc.errno != errno.EINVAL:  # still bound through the old handle
                        raise
                    busy[0] += 1
        finally:
            os.close(fd)

    def open_close(path: str) -> Callable[[], None]:
        def run() -> None:
            os.close(os.open(path, os.O_RDWR | os.O_CLOEXEC))
        return run

    try:
        t0 = pc()
        s = interleaved({
            "bind": lambda k: lat_call(cycle, k),
            "vopen": lambda k: lat_call(open_close(node), k),
            "c": lambda k: lat_call(open_close(cnode), k),
        }, n, warmup=50)
        wall = (pc() - t0) / 1e9
    finally:
        iommu.close()
    rate = round(1e6 / s["bind"].median, 1)
    label = "open vfio0 + BIND_IOMMUFD (client library) + close, per cycle"
    figure("open_bind_close", "us", s["bind"], "C server open+close", s["c"], label=label,
           rate_per_s_from_median=rate, ebusy_retries=busy[0], wall_s_all_candidates=round(wall, 2))
    figure("open_bind_close", "us", s["bind"], "vfiofs open+close without bind", s["vopen"], label=label,
           rate_per_s_from_median=rate)


def write_definitions(directory: Path, count: int) -> None:
    directory.mkdir()
    width = len(str(count))
    for i in range(count):
        (directory / f"dev{i:0{width}d}.toml").write_text('model = "ram"\n[ram]\nsize = "4KiB"\n')


def bench_scaling(h: Harness, counts: list[int], mounts: int, n_read: int, n_lookup: int) -> None:
    can_drop = os.access("/proc/sys/vm/drop_caches", os.W_OK)
    ref: dict[str, Sample] = {}
    largest = counts[-1]
    for count in counts:
        defs = h.tmp / f"defs-{count}"
        write_definitions(defs, count)
        times, rss = [], []
        server = None
        for m in range(mounts):
            server = h.start_vfiofs(defs)
            times.append(server.ready_ns / 1e9)
            rss.append(server.rss_kib() * 1024 / 1e6)
            if m < mounts - 1:
                h.stop(server)
        last = count - 1
        devices_dir = server.mountpoint / "vfio/devices"
        name = f"vfio{last}"
        dfd = os.open(devices_dir, os.O_RDONLY | os.O_DIRECTORY)  # pins the parent dentries
        try:
            os.stat(name, dir_fd=dfd)
            cached = ns_to_us(lat_call(lambda: os.stat(name, dir_fd=dfd), n_lookup))
            uncached = None
            if can_drop:
                values = []
                for _ in range(n_lookup):
                    with open("/proc/sys/vm/drop_caches", "w") as drop:
                        drop.write("2")  # drops unused dentries/inodes: the next stat is a FUSE LOOKUP
                    t0 = pc()
                    os.stat(name, dir_fd=dfd)
                    values.append(pc() - t0)
                uncached = ns_to_us(values)
        finally:
            os.close(dfd)
        iommu, dev = bound_device(server.mountpoint, last)
        try:
            fd = dev.fileno()
            reads = interleaved({"r": lambda k: lat_pread(fd, k, 4, 0)}, n_read, rounds=1)["r"]
        finally:
            dev.close()
            iommu.close()
        h.stop(server)
        mount_s, rss_mb = Sample(times), Sample(rss)
        if count == counts[0]:
            ref = {"mount": mount_s, "rss": rss_mb, "read": reads, "lookup": uncached or cached}
        is_big = count == largest and count >= 1000
        base = f"{counts[0]} device(s)"
        figure(f"scale.{count}.mount_time", "s", mount_s, base, ref["mount"],
               "<= 2 s" if is_big else None, 2.0 if is_big else None, on="value",
               label=f"{count} devices: process start -> mount ready")
        figure(f"scale.{count}.rss", "MB", rss_mb, base, ref["rss"],
               "<= 150 MB" if is_big else None, 150.0 if is_big else None, on="value",
               label=f"{count} devices: daemon VmRSS after mount (MB = 10^6 bytes)")
        if uncached is not None:
            figure(f"scale.{count}.lookup_uncached", "us", uncached, base, ref["lookup"],
                   label=f"{count} devices: stat(vfio{last}) after drop_caches=2 (fresh FUSE LOOKUP)")
        figure(f"scale.{count}.lookup_cached", "us", cached, None, None,
               label=f"{count} devices: stat(vfio{last}), dentry cached (300 s entry timeout)")
        figure(f"scale.{count}.read4", "us", reads, base, ref["read"],
               "<= 1.2x 1 device" if is_big else None, 1.2 if is_big else None,
               label=f"{count} devices: trapped 4-byte read on vfio{last}")


def bench_concurrency(h: Harness, vfs: Server, c: Server, n: int, reps: int) -> None:
    mnt = str(vfs.mountpoint)
    one = concurrent_rates([(mnt, "vfiofs", 0)], n, reps)
    two = concurrent_rates([(mnt, "vfiofs", 0), (mnt, "vfiofs", 1)], n, reps)
    cf = str(c.mountpoint / "f")
    c_one = concurrent_rates([(cf, "c", 0)], n, reps)
    c_two = concurrent_rates([(cf, "c", 0), (cf, "c", 0)], n, reps)
    note = "p90 is over per-repetition aggregate rates; ratio = this / baseline (higher is better here)"
    figure("concurrency.vfiofs_1client", "ops/s", one, "C server, 1 client", c_one, note=note,
           label="trapped 4-byte reads, 1 process (vfio0)")
    figure("concurrency.vfiofs_2clients", "ops/s", two, "vfiofs, 1 client", one, note=note,
           label="trapped 4-byte reads, 2 processes (vfio0 + vfio1), aggregate")
    figure("concurrency.c_2clients", "ops/s", c_two, "C server, 1 client", c_one, note=note,
           label="C server 4-byte reads, 2 processes, aggregate (context)")


def bench_mmap(h: Harness, vfs: Server, n: int) -> None:
    """1 MiB sequential copies through a mapped RAM BAR (showcase BAR2) vs anonymous memory."""
    import mmap as _mmap

    iommu, dev = bound_device(vfs.mountpoint, 2)
    try:
        bar = dev.mmap(2)
        anon = _mmap.mmap(-1, len(bar))
        data = os.urandom(len(bar))
        for target in (bar, anon):  # fault every page in first
            target[:] = data

        def reads(target) -> Callable[[int], list[int]]:
            return lambda count: lat_call(lambda: target[:], count)

        def writes(target) -> Callable[[int], list[int]]:
            def store() -> None:
                target[:] = data
            return lambda count: lat_call(store, count)

        for kind, make in (("read", reads), ("write", writes)):
            got = interleaved({"bar": make(bar), "anon": make(anon)}, n)
            figure(f"mmap_bar.{kind}", "us", got["bar"], "memcpy, anonymous memory", got["anon"],
                   target=">= 0.9x memcpy throughput (time <= 1.11x)", limit=1 / 0.9,
                   label=f"mmap'd BAR2 sequential {kind}, 1 MiB per op (after fault-in)")
        bar.close()
        anon.close()
    finally:
        dev.close()
        iommu.close()


def run_preload_bench(h: Harness, vfs: Server, *args: str) -> dict[str, Sample]:
    """bench/preload_bench.c under the interposition library against ``vfs``; samples by name (µs)."""
    from vfiofs.host.preload import library_path

    binary = h.tmp / "preload_bench"
    if not binary.exists():
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(binary), str(BENCH / "preload_bench.c")], check=True)
    env = dict(os.environ, LD_PRELOAD=str(library_path()), VFIOFS_MOUNT=str(vfs.mountpoint))
    out = subprocess.run([str(binary), *args], env=env, check=True, capture_output=True, text=True,
                         timeout=600).stdout
    samples: dict[str, list[int]] = {}
    for line in out.splitlines():
        if line.startswith("# "):
            current = samples.setdefault(line[2:], [])
        elif line:
            current.append(int(line))
    return {name: ns_to_us(values) for name, values in samples.items()}


def bench_preload(h: Harness, vfs: Server, c: Server, n: int, n_copy: int) -> None:
    """C programs through the interposition library: an ioctl against the Python client's,
    a 4-byte pread of a bound handle against the C libfuse floor, a 1 MiB copy through a
    BAR the library mapped against memcpy on anonymous memory."""
    try:
        from vfiofs.host.preload import library_path

        library_path()
    except Exception as exc:  # a --src tree without the library
        print(f"bench: no interposition library figures: {exc}", flush=True)
        return
    iommu, dev = bound_device(vfs.mountpoint, 0)
    try:
        python = ns_to_us(lat_call(lambda: dev.get_region_info(0), n))
    finally:
        dev.close()
        iommu.close()
    lib = run_preload_bench(h, vfs, "ioctl", str(n))["ioctl"]
    figure("preload.ioctl", "us", lib, "the Python client's get_region_info", python,
           label="C ioctl(VFIO_DEVICE_GET_REGION_INFO) through the library")
    floor = run_preload_bench(h, vfs, "pread", str(n), str(c.mountpoint / "f"))["pread"]
    through = run_preload_bench(h, vfs, "pread", str(n), str(vfs.mountpoint / "vfio/devices/vfio0"))["pread"]
    figure("preload.pread4", "us", through, "C pread of the C libfuse server", floor,
           label="C pread of 4 bytes at BAR0 of bound vfio0 (program under the library)")
    traps = run_preload_bench(h, vfs, "trap", str(n))
    for kind, syscall in (("load", "pread"), ("store", "pwrite")):
        label = f"C 4-byte {kind} on a trapped BAR register page (showcase BAR1+0x100) through the library"
        figure(f"preload.trap4.{kind}", "us", traps[f"trap.{kind}"], f"C {syscall} of the same register",
               traps[syscall], label=label)
        figure(f"preload.trap4.{kind}", "us", traps[f"trap.{kind}"], "C pread of the C libfuse server", floor,
               label=label)
    copies = run_preload_bench(h, vfs, "memcpy", str(n_copy))
    for kind in ("read", "write"):
        figure(f"preload.bar_memcpy.{kind}", "us", copies[f"bar.{kind}"], "memcpy, anonymous memory",
               copies[f"anon.{kind}"], target=">= 0.9x memcpy throughput (time <= 1.11x)", limit=1 / 0.9,
               label=f"C memcpy 1 MiB {kind} on showcase BAR2 mapped through the library")


def bench_irq(h: Harness, n: int) -> None:
    """Model raises MSI-X → the driver's epoll on its eventfd wakes, vs a native eventfd
    signal between two processes; both sides stamp CLOCK_MONOTONIC into shared memory."""
    import mmap as _mmap
    import select as _select

    vfs = h.start_vfiofs(BENCH / "models", pythonpath=BENCH / "models")
    iommu, dev = bound_device(vfs.mountpoint, 0)
    try:
        efd = os.eventfd(0, os.EFD_CLOEXEC)
        dev.enable_irq_eventfds(VFIO_PCI_MSIX_IRQ_INDEX, [efd])
        stamp = dev.mmap(2)

        def waits(count: int, start: Callable[[int], None]) -> list[int]:
            ep = _select.epoll()
            ep.register(efd, _select.EPOLLIN)
            start(count)
            out = []
            left = count
            while left > 0:  # a late wake-up may find several signals counted at once
                ep.poll()
                woke = time.monotonic_ns()
                left -= os.eventfd_read(efd)
                out.append(woke - int.from_bytes(stamp[0:8], "little"))
            ep.close()
            return out

        got = waits(n, lambda count: dev.write(0, 0, count.to_bytes(4, "little")))
        stamp.close()
    finally:
        dev.close()
        iommu.close()
        h.stop(vfs)
    # the baseline: a forked process stamps shared memory and signals an eventfd
    shared = _mmap.mmap(-1, 4096)
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            for _ in range(n):
                time.sleep(0.002)
                shared[0:8] = time.monotonic_ns().to_bytes(8, "little")
                os.eventfd_write(efd, 1)
        finally:
            os._exit(0)
    ep = _select.epoll()
    ep.register(efd, _select.EPOLLIN)
    native = []
    left = n
    while left > 0:
        ep.poll()
        woke = time.monotonic_ns()
        left -= os.eventfd_read(efd)
        native.append(woke - int.from_bytes(shared[0:8], "little"))
    os.waitpid(pid, 0)
    ep.close()
    os.close(efd)
    figure("irq_latency", "us", ns_to_us(got), "native eventfd signal between two processes", ns_to_us(native),
           target="<= 3x native eventfd", limit=3.0,
           label="interrupt: model raises MSI-X -> driver's epoll wakes (2 ms apart)")


def bench_dma(h: Harness, n: int) -> None:
    """Device DMA into the driver's buffer (timed inside the device model) vs memcpy of the same size."""
    import mmap as _mmap

    vfs = h.start_vfiofs(BENCH / "models", pythonpath=BENCH / "models")
    iommu, dev = bound_device(vfs.mountpoint, 0)
    try:
        ioas = iommu.ioas_alloc()
        dev.attach_iommufd_pt(ioas)
        buf = _mmap.mmap(-1, 1 << 20)
        buf[:] = os.urandom(len(buf))
        iova = iommu.map_buffer(ioas, buf, iova=0x100000)
        dev.write(0, 0x10, iova.to_bytes(8, "little"))
        for size, label in ((4096, "4 KiB"), (1 << 20, "1 MiB")):
            dev.write(0, 0x18, size.to_bytes(8, "little"))
            for command, kind in ((1, "read"), (2, "write")):
                device_ns = []
                for _ in range(n):
                    dev.write(0, 0x20, command.to_bytes(4, "little"))
                    device_ns.append(int.from_bytes(dev.read(0, 0x28, 8), "little"))
                copy = buf if kind == "read" else _mmap.mmap(-1, size)
                source = bytes(size)

                def memcpy(count: int) -> list[int]:
                    out = []
                    for _ in range(count):
                        t = pc()
                        if kind == "read":
                            copy[:size]
                        else:
                            copy[:size] = source
                        out.append(pc() - t)
                    return out

                base = ns_to_us(memcpy(n))
                figure(f"dma.{kind}_{size}", "us", ns_to_us(device_ns), "memcpy of the same size", base,
                       target=">= 0.3x memcpy throughput (time <= 3.33x)" if size == 1 << 20 else None,
                       limit=1 / 0.3 if size == 1 << 20 else None,
                       label=f"DMA {kind} of {label} into the driver's memory (device-side time)")
        iommu.unmap(ioas)
        buf.close()
    finally:
        dev.close()
        iommu.close()
        h.stop(vfs)
    floor_process_vm_readv(n)


def floor_process_vm_readv(n: int) -> None:
    """What any cross-process copy costs here: process_vm_readv of 1 MiB from a forked child
    into a buffer that is reused (no page faults), the syscall vfiofs's DMA is built on."""
    import ctypes as _ct
    import mmap as _mmap

    class iovec(_ct.Structure):
        _fields_ = [("base", _ct.c_void_p), ("len", _ct.c_size_t)]

    libc = _ct.CDLL(None, use_errno=True)
    libc.process_vm_readv.argtypes = [_ct.c_int, _ct.POINTER(iovec), _ct.c_ulong, _ct.POINTER(iovec), _ct.c_ulong,
                                      _ct.c_ulong]
    libc.process_vm_readv.restype = _ct.c_ssize_t
    size = 1 << 20
    source = _mmap.mmap(-1, size)
    source[:] = os.urandom(size)
    address = _ct.addressof(_ct.c_char.from_buffer(source))
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child: keep the (copied-on-fork, touched) buffer alive
        source[:] = source[:]
        os.write(ready_w, b"1")
        os.read(done_r, 1)
        os._exit(0)
    try:
        os.read(ready_r, 1)
        target = _ct.create_string_buffer(size)
        local, remote = iovec(_ct.addressof(target), size), iovec(address, size)
        times = []
        for _ in range(n):
            t = pc()
            libc.process_vm_readv(pid, _ct.byref(local), 1, _ct.byref(remote), 1, 0)
            times.append(pc() - t)
        def memcpy() -> list[int]:  # the same copy as the DMA figures' baseline
            out = []
            for _ in range(n):
                t = pc()
                source[:size]
                out.append(pc() - t)
            return out

        figure("dma.floor_1048576", "us", ns_to_us(times), "memcpy of the same size", ns_to_us(memcpy()),
               label="context: raw process_vm_readv of 1 MiB from another process (the DMA floor)")
    finally:
        os.write(done_w, b"1")
        os.waitpid(pid, 0)
        for fd in (ready_r, ready_w, done_r, done_w):
            os.close(fd)


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------

def sh(*command: str) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def source_info() -> dict:
    info = {"path": str(SRC), "repo_head": sh("git", "-C", str(REPO), "rev-parse", "--short", "HEAD")}
    if SRC == REPO:
        info["vfiofs_modified"] = sh("git", "-C", str(REPO), "status", "--porcelain", "--", "vfiofs") not in ("", "unknown")
    return info


def machine_info() -> dict:
    cpu = "unknown"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import pyfuse3
    import trio
    timer = sorted(-(pc() - pc()) for _ in range(1000))
    return {
        "kernel": platform.release(),
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "pyfuse3": getattr(pyfuse3, "__version__", "unknown"),
        "trio": getattr(trio, "__version__", "unknown"),
        "libfuse": sh("pkg-config", "--modversion", "fuse3"),
        "perf_counter_ns_overhead_ns": timer[len(timer) // 2],
    }


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value >= 1000:
            return f"{value:,.0f}"
        if value >= 100:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def table(figures: list[dict]) -> str:
    head = ("figure", "median", "p90", "n", "unit", "baseline", "base med", "ratio", "target", "met")
    rows = []
    for f in figures:
        if f["median"] is None:
            rows.append((f.get("label", f["name"]), "n/a", "", "", "", "", "", "", "", "-"))
            continue
        met = "-" if f["met"] is None else ("yes" if f["met"] else "NO")
        rows.append((f.get("label", f["name"]), fmt(f["median"]), fmt(f["p90"]), str(f["n"]), f["unit"],
                     f["baseline"] or "-", fmt(f["baseline_median"]),
                     "-" if f["ratio"] is None else f"{f['ratio']:.2f}x", f["target"] or "-", met))
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer operations, 1 and 10 devices only")
    parser.add_argument("--json", default=str(BENCH / "results.json"), help="where to write the results")
    parser.add_argument("--src", metavar="DIR", default=str(REPO),
                        help="vfiofs source tree to run (daemon and client library); default: this repo")
    parser.add_argument("--no-pin", action="store_true",
                        help="do not pin the client and the servers to one CPU for the latency figures")
    args = parser.parse_args()
    all_cpus = os.sched_getaffinity(0)
    pin_cpu = None if args.no_pin or len(all_cpus) < 2 else max(all_cpus)
    if args.quick:
        n_lat, n_ctl, n_bind, counts, mounts, n_lookup, n_conc, reps = 2000, 1000, 200, [1, 10], 1, 100, 2000, 2
    else:
        n_lat, n_ctl, n_bind, counts, mounts, n_lookup, n_conc, reps = (
            20000, 10000, 2000, [1, 10, 100, 1000], 3, 300, 10000, 5)

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    started = time.time()
    info = machine_info()
    h = Harness()
    try:
        if pin_cpu is not None:  # children inherit it: daemons and client share one CPU
            os.sched_setaffinity(0, {pin_cpu})
        binary = h.build_c()
        c = h.start_c(binary)
        bare = h.start_bare()
        vfs = h.start_vfiofs()
        print(f"bench: servers up (C, bare pyfuse3, vfiofs); {'quick' if args.quick else 'full'} run", flush=True)
        bench_trapped(h, vfs, c, bare, n_lat)
        print("bench: 1/5 trapped access done", flush=True)
        bench_control(h, vfs, c, bare, n_ctl)
        print("bench: 2/5 control round trip done", flush=True)
        bench_open_bind(h, vfs, c, n_bind)
        print("bench: 3/5 open+bind+close done", flush=True)
        bench_mmap(h, vfs, max(50, n_bind // 4))
        print("bench: mmap'd BAR done", flush=True)
        bench_preload(h, vfs, c, n_ctl, max(50, n_bind // 4))
        print("bench: interposition library done", flush=True)
        bench_irq(h, max(100, n_bind // 2))
        print("bench: interrupt latency done", flush=True)
        bench_dma(h, max(50, n_bind // 10))
        print("bench: DMA done", flush=True)
        h.stop(bare)
        bench_scaling(h, counts, mounts, n_lat // 2, n_lookup)
        print("bench: 4/5 scaling done", flush=True)
        if pin_cpu is not None:  # concurrency: everybody free to use every CPU
            os.sched_setaffinity(0, all_cpus)
            for server in (vfs, c):
                set_affinity(server.pid, all_cpus)
        bench_unpinned_read(h, vfs, c, n_lat // 4)
        bench_concurrency(h, vfs, c, n_conc, reps)
        print("bench: 5/5 concurrency done", flush=True)
    finally:
        h.close()
    # order the figures as in the README: 1 trapped, 2 control, 3 open/bind, 4 scaling, 5 concurrency, 6 n/a
    order = ("read4", "write4", "control", "open_bind", "mmap_bar", "preload", "irq_latency", "dma", "scale",
             "concurrency")
    FIGURES.sort(key=lambda f: next((i for i, p in enumerate(order) if f["name"].startswith(p)), len(order)))
    result = {
        "machine": info,
        "command": " ".join([os.path.relpath(sys.executable, REPO) if sys.executable.startswith(str(REPO))
                             else sys.executable] + [os.path.relpath(__file__, REPO)] + sys.argv[1:]),
        "argv": sys.argv,
        "source": source_info(),
        "mode": "quick" if args.quick else "full",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "pinning": (f"latency figures (1-4): this process and every server pinned to CPU {pin_cpu}; "
                    "concurrency and read4.unpinned: not pinned") if pin_cpu is not None else "none",
        "timing": "each operation timed on its own with time.perf_counter_ns; median/p90 over all ops; "
                  "candidates of one figure run in 4 interleaved rounds after a warm-up; "
                  "ratio = median / baseline median",
        "figures": FIGURES,
    }
    print()
    print(f"machine: {info['cpu']}, {info['nproc']} CPUs, kernel {info['kernel']}, Python {info['python']}, "
          f"pyfuse3 {info['pyfuse3']}, libfuse {info['libfuse']}")
    print(table(FIGURES))
    print(f"\n{len(FIGURES)} figures in {result['duration_s']} s; "
          f"met {sum(1 for f in FIGURES if f['met'] is True)}, missed {sum(1 for f in FIGURES if f['met'] is False)}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted; everything unmounted", file=sys.stderr)
        sys.exit(130)
