"""Shared scenarios for the kill and race stress tests (issue 14: R2, R3, R4) and for
bench/reliability_kills.py, which runs the same code with the long counts.

Client processes come from a multiprocessing *forkserver*: a clean single-threaded process
that has imported the client library once, so a new client costs a fork, not an
interpreter start, and never inherits pytest's threads. Every wait for the daemon's
asynchronous work (FUSE RELEASE after a close or a death) polls a condition
(``support.wait_until``); a sleep is used only to pick a random moment to kill at.
"""

from __future__ import annotations

import errno
import json
import mmap
import multiprocessing
import os
import random
import select
import signal
import struct
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _path in (HERE, HERE.parent):  # tests/stress (this module) and tests/ (support) for the forkserver and bench
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from support import wait_until  # noqa: E402
from vfiofs import client as vc  # noqa: E402
from vfiofs.client import IommuFd, VfioContainer, VfioDevice, VfioGroup  # noqa: E402

PAGE = mmap.PAGESIZE
EDU = 4  # bundled vfio4: edu (DMA, MSI, INTx, timers)
RAM = 0  # bundled vfio0: 64 KiB RAM, mappable BAR0


# -- what the daemon holds -------------------------------------------------------------------

def daemon_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def daemon_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def status(mnt: Path) -> dict:
    """What ``vfiofs ls --json`` prints: the daemon's own status file."""
    return json.loads((Path(mnt) / ".vfiofs" / "status").read_text())


def quiet(mnt: Path, open_handles: int | None = 0) -> bool:
    """No device has a holder, no interrupts are set up, and exactly ``open_handles`` handles
    are open (None: any number)."""
    st = status(mnt)
    return open_handles in (None, st["open_handles"]) and all(
        not d["bound_by"] and d["ioas"] is None and d["interrupts"] == "none" for d in st["devices"])


def forkserver() -> multiprocessing.context.BaseContext:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["kill_support"])
    return ctx


# -- R2: bind races ----------------------------------------------------------------------------

MARK = 0x200  # where each round's winner leaves its mark in BAR0 (the next winner must find zeros)


def _racer(index: int, node: str, iommu_path: str, rounds: int, barrier, results) -> None:
    iommu = IommuFd(iommu_path)
    barrier.wait()
    try:
        for r in range(rounds):
            dev = VfioDevice(node)
            barrier.wait()  # A: everybody holds a fresh, blocked handle
            t0 = time.monotonic_ns()
            try:
                dev.bind_iommufd(iommu)
                outcome = 0
            except OSError as exc:
                outcome = exc.errno
            t1 = time.monotonic_ns()
            found = mark = b""
            if outcome == 0:
                found = dev.read(0, MARK, 8)  # what the previous winner's close left
                mark = struct.pack("<II", r + 1, index + 1)
                dev.write(0, MARK, mark)
                mark = dev.read(0, MARK, 8)
            barrier.wait()  # B: every bind answered; the winner still holds the device
            if outcome == 0:
                access = again = 0
            else:
                access = _errno(dev.read, 0, MARK, 8)  # a loser stays blocked...
                again = _errno(dev.bind_iommufd, iommu)  # ...and cannot bind while the winner holds it
            results.put((index, r, outcome, found, mark, access, again, t0, t1))
            barrier.wait()  # C: checked; now everybody closes
            dev.close()
            barrier.wait()  # D: closed; the parent waits for the daemon to let go
    finally:
        iommu.close()


def _errno(fn, *args) -> int:
    try:
        fn(*args)
    except OSError as exc:
        return exc.errno
    return 0


def bind_race(mnt: Path, processes: int = 8, rounds: int = 50, device: int = RAM) -> dict:
    """``processes`` processes open device ``device`` and BIND it at once, ``rounds`` times.

    Per round: exactly one BIND succeeds; every other gets EINVAL (the kernel's
    vfio_df_open(): "device is bound through another handle"), stays blocked (a region read
    is EINVAL) and cannot bind while the winner holds it (EINVAL again); the winner finds
    the device reset (zeros where the previous winner wrote); after every close the daemon
    reports no holder. Returns the figures; raises AssertionError on the first deviation.
    """
    mnt = Path(mnt)
    ctx = forkserver()
    barrier = ctx.Barrier(processes + 1, timeout=30)
    results = ctx.SimpleQueue()
    node, iommu = str(mnt / f"vfio/devices/vfio{device}"), str(mnt / "iommu")
    workers = [ctx.Process(target=_racer, args=(i, node, iommu, rounds, barrier, results), daemon=True)
               for i in range(processes)]
    for w in workers:
        w.start()
    barrier.wait()  # the workers are up (forkserver start, imports): not part of the figures
    wins = [0] * processes
    overlapping = 0
    outcomes: dict[tuple, int] = {}
    started = time.monotonic()
    try:
        for r in range(rounds):
            barrier.wait()  # A
            barrier.wait()  # B
            barrier.wait()  # C
            rows = sorted(results.get() for _ in range(processes))
            barrier.wait()  # D
            assert {row[1] for row in rows} == {r}, rows
            codes = tuple(sorted(row[2] for row in rows))
            outcomes[codes] = outcomes.get(codes, 0) + 1
            assert codes == (0,) + (errno.EINVAL,) * (processes - 1), f"round {r}: {codes}"
            (winner,) = [row for row in rows if row[2] == 0]
            wins[winner[0]] += 1
            assert winner[3] == bytes(8), f"round {r}: the device was not reset: {winner[3]!r}"
            assert winner[4] == struct.pack("<II", r + 1, winner[0] + 1), f"round {r}: torn write {winner[4]!r}"
            for row in rows:
                if row[2]:
                    assert (row[5], row[6]) == (errno.EINVAL, errno.EINVAL), f"round {r}: loser {row}"
            if max(row[7] for row in rows) < min(row[8] for row in rows):
                overlapping += 1  # every BIND was in flight at one moment
            # The winner closed: the daemon lets go of the device (RELEASE comes asynchronously).
            # (The workers are opening their next handles meanwhile: those are blocked, not holders.)
            assert wait_until(lambda: quiet(mnt, open_handles=None), timeout=10), status(mnt)
    finally:
        for w in workers:
            w.join(timeout=30)
            if w.is_alive():
                w.kill()
    elapsed = time.monotonic() - started
    assert all(w.exitcode == 0 for w in workers), [w.exitcode for w in workers]
    assert wait_until(lambda: quiet(mnt, open_handles=0), timeout=10), status(mnt)
    with IommuFd(mnt / "iommu") as iommu, VfioDevice(node) as dev:  # the last winner's close reset it too
        dev.bind_iommufd(iommu)
        assert dev.read(0, MARK, 8) == bytes(8)
    assert wait_until(lambda: quiet(mnt), timeout=10), status(mnt)
    return {"processes": processes, "rounds": rounds, "outcome": {"0": 1, "EINVAL": processes - 1},
            "rounds_with_that_outcome": outcomes.get((0,) + (errno.EINVAL,) * (processes - 1), 0),
            "rounds_all_binds_in_flight_at_once": overlapping, "wins_per_process": wins,
            "seconds": round(elapsed, 2)}


def _raw_bind(dev: VfioDevice, token: bytes) -> None:
    """BIND as one request, the iommufd's token resolved beforehand (the client library asks
    for it in the same call, one more round trip than a group open needs)."""
    from vfiofs.abi import protocol

    bind = vc.vfio_device_bind_iommufd(argsz=24, iommufd=3)
    request = protocol.Request(protocol.OP_IOCTL, vc.VFIO_DEVICE_BIND_IOMMUFD, protocol.ARG_BUFFER,
                               payload=bytes(bind), fds={3: protocol.FdRef(protocol.FD_HANDLE, token)})
    vc._transact(dev.fileno(), request, 64)


def _mixed_racer(index: int, role: str, mnt: str, device: int, rounds: int, barrier, results) -> None:
    """One process of :func:`cdev_group_race`: each round it either opens the device's group
    node (legacy path) or BINDs its open handle of the device (cdev path), at once with the others."""
    iommu = IommuFd(f"{mnt}/iommu") if role == "bind" else None
    token = vc.handle_token(iommu.fileno()) if iommu is not None else b""
    barrier.wait()
    try:
        for r in range(rounds):
            barrier.wait()  # E: the parent saw the previous round's releases
            held = VfioDevice(f"{mnt}/vfio/devices/vfio{device}") if role == "bind" else None
            barrier.wait()  # A
            try:
                if role == "group":
                    held = VfioGroup(f"{mnt}/vfio/{device}")
                else:
                    _raw_bind(held, token)
                outcome = 0
            except OSError as exc:
                outcome = exc.errno
            barrier.wait()  # B: everybody tried; the winner still holds what it won
            results.put((index, r, role, outcome))
            barrier.wait()  # C
            if held is not None:
                held.close()
            barrier.wait()  # D
    finally:
        if iommu is not None:
            iommu.close()


def cdev_group_race(mnt: Path, processes: int = 8, rounds: int = 30, device: int = RAM) -> dict:
    """Half the processes open the device's group node, half BIND a handle of the device they
    opened beforehand (one request each, so neither side starts ahead), all at once. The
    kernel makes the two paths exclusive (group.c: vfio_group_fops_open is EBUSY while a
    device of the group is bound through its cdev; vfio_device_block_group makes BIND EBUSY
    while the group is open), so every round has exactly one winner, and either

    * a BIND won: every group open is EBUSY, every other BIND EINVAL; or
    * a group open won: every other group open is EBUSY, and so is every BIND.
    """
    mnt = Path(mnt)
    ctx = forkserver()
    barrier = ctx.Barrier(processes + 1, timeout=30)
    results = ctx.SimpleQueue()
    roles = ["group" if i % 2 else "bind" for i in range(processes)]
    binders = roles.count("bind")
    workers = [ctx.Process(target=_mixed_racer, args=(i, roles[i], str(mnt), device, rounds, barrier, results),
                           daemon=True) for i in range(processes)]
    for w in workers:
        w.start()
    barrier.wait()
    won = {"bind": 0, "group": 0}
    started = time.monotonic()
    try:
        for r in range(rounds):
            barrier.wait()  # E
            barrier.wait()  # A
            barrier.wait()  # B
            barrier.wait()  # C
            rows = [results.get() for _ in range(processes)]
            barrier.wait()  # D
            winners = [row for row in rows if row[3] == 0]
            assert len(winners) == 1, f"round {r}: {rows}"
            winner = winners[0][2]
            won[winner] += 1
            expected = {"bind": errno.EINVAL, "group": errno.EBUSY} if winner == "bind" else \
                {"bind": errno.EBUSY, "group": errno.EBUSY}
            for _, _, role, outcome in rows:
                assert outcome in (0, expected[role]), f"round {r}: {winner} won, {role} got {outcome}: {rows}"
            # Everything but the binders' iommufds is closed once the daemon has handled the
            # releases (after the last round the workers close those too).
            left = binders if r < rounds - 1 else None
            assert wait_until(lambda: quiet(mnt, open_handles=left), timeout=10), (r, status(mnt))
    finally:
        for w in workers:
            w.join(timeout=30)
            if w.is_alive():
                w.kill()
    assert all(w.exitcode == 0 for w in workers), [w.exitcode for w in workers]
    assert wait_until(lambda: quiet(mnt), timeout=10), status(mnt)
    return {"processes": processes, "rounds": rounds, "won_by_bind": won["bind"],
            "won_by_group_open": won["group"], "seconds": round(time.monotonic() - started, 2)}


# -- R3: killed clients ------------------------------------------------------------------------

# Stages a client reports (one byte each) as it reaches them; the parent kills it at a random
# moment after a randomly chosen stage.
S_START, S_OPENED, S_BINDING, S_BOUND, S_DMA_MAPPED, S_MAPPED, S_IRQS, S_DMA = range(8)
STAGE_NAMES = ["start", "opened", "mid-bind", "bound", "dma-mapped", "mmapped", "eventfds", "mid-dma"]
# How long after reaching a stage the kill may come (s): short windows for the quick steps
# (a FUSE round trip is ~0.1 ms), the edu DMA takes 0.1 s (EduDevice.dma_delay).
KILL_WINDOW = [0.002, 0.002, 0.001, 0.002, 0.002, 0.002, 0.003, 0.15]
# The legacy path (container, group, VFIO_GROUP_GET_DEVICE_FD) has stages of its own.
LEGACY_STAGE_NAMES = ["start", "opened", "container-set", "dma-mapped", "mid-get-device-fd", "granted", "eventfds",
                      "mid-dma"]
LEGACY_KILL_WINDOW = [0.002, 0.002, 0.002, 0.002, 0.001, 0.002, 0.003, 0.15]
EDU_BDF = "0000:00:05.0"
IOVA = 0x100000
EDU_BUFFER = 0x40000


def _client(mnt: str, report) -> None:
    """A driver doing everything at once, reporting its progress; it is killed somewhere."""
    stage = lambda n: report.send_bytes(bytes([n]))  # noqa: E731
    stage(S_START)
    iommu = IommuFd(f"{mnt}/iommu")
    edu = VfioDevice(f"{mnt}/vfio/devices/vfio{EDU}")
    ram = VfioDevice(f"{mnt}/vfio/devices/vfio{RAM}")
    stage(S_OPENED)
    stage(S_BINDING)
    edu.bind_iommufd(iommu)
    ram.bind_iommufd(iommu)
    stage(S_BOUND)
    ioas = iommu.ioas_alloc()
    buf = mmap.mmap(-1, 2 * PAGE)
    buf[0:8] = b"fromram!"
    iommu.map_buffer(ioas, buf, iova=IOVA)
    edu.attach_iommufd_pt(ioas)
    ram.attach_iommufd_pt(ioas)
    stage(S_DMA_MAPPED)
    window = ram.mmap(0, PAGE)
    window[0:8] = b"dirtyram"
    ram.write(0, 0x100, b"dirty")
    stage(S_MAPPED)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    edu.enable_irq_eventfds(vc.VFIO_PCI_MSI_IRQ_INDEX, [efd])
    edu.write(0, 0x04, struct.pack("<I", 0x1234))  # liveness
    edu.write(0, 0x20, struct.pack("<I", 0x80))  # interrupt when the factorial is done
    edu.write(0, 0x08, struct.pack("<I", 12))  # and start one
    stage(S_IRQS)
    _dma_forever(edu, efd, lambda: stage(S_DMA))


def _legacy_client(mnt: str, report) -> None:
    """The same driver on the legacy path: container, group, type1 DMA map, GET_DEVICE_FD."""
    stage = lambda n: report.send_bytes(bytes([n]))  # noqa: E731
    stage(0)
    container = VfioContainer(f"{mnt}/vfio/vfio")
    group = VfioGroup(f"{mnt}/vfio/{EDU}")  # the edu device is alone in group 4
    stage(1)
    group.set_container(container)
    container.set_iommu()
    stage(2)
    buf = mmap.mmap(-1, 2 * PAGE)
    buf[0:8] = b"fromram!"
    container.map_buffer(buf, iova=IOVA)
    stage(3)
    stage(4)
    edu = group.get_device(EDU_BDF)  # GET_DEVICE_FD, then the new handle's CLAIM
    stage(5)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    edu.enable_irq_eventfds(vc.VFIO_PCI_MSI_IRQ_INDEX, [efd])
    edu.write(0, 0x04, struct.pack("<I", 0x1234))
    stage(6)
    _dma_forever(edu, efd, lambda: stage(7))


def _dma_forever(edu: VfioDevice, efd: int, started) -> None:
    for n in range(1 << 30):  # DMA back and forth until killed, interrupt on completion
        to_ram = n & 1
        src, dst = (EDU_BUFFER, IOVA + PAGE) if to_ram else (IOVA, EDU_BUFFER)
        edu.write(0, 0x80, struct.pack("<Q", src))
        edu.write(0, 0x88, struct.pack("<Q", dst))
        edu.write(0, 0x90, struct.pack("<Q", PAGE))
        edu.write(0, 0x98, struct.pack("<Q", 0x1 | 0x4 | (0x2 if to_ram else 0)))
        started()
        select.select([efd], [], [], 2)
        try:
            os.eventfd_read(efd)
        except BlockingIOError:
            pass
        edu.write(0, 0x64, struct.pack("<I", 0xFFFFFFFF))  # acknowledge everything


def check_reset(mnt: Path) -> None:
    """Both devices as after power-on: what the killed client wrote is gone."""
    mnt = Path(mnt)
    with IommuFd(mnt / "iommu") as iommu, VfioDevice(mnt / f"vfio/devices/vfio{EDU}") as edu, \
            VfioDevice(mnt / f"vfio/devices/vfio{RAM}") as ram:
        edu.bind_iommufd(iommu)
        ram.bind_iommufd(iommu)
        regs = {off: int.from_bytes(edu.read(0, off, 4), "little") for off in (0x04, 0x08, 0x20, 0x24)}
        regs.update({off: int.from_bytes(edu.read(0, off, 8), "little") for off in (0x80, 0x88, 0x90, 0x98)})
        assert regs == dict.fromkeys(regs, 0), {hex(k): hex(v) for k, v in regs.items() if v}
        assert ram.read(0, 0, 8) == bytes(8) and ram.read(0, 0x100, 5) == bytes(5)


class KillReport:
    def __init__(self) -> None:
        self.by_stage: dict[str, int] = {f"cdev:{name}": 0 for name in STAGE_NAMES}
        self.by_stage.update({f"legacy:{name}": 0 for name in LEGACY_STAGE_NAMES})
        self.cleanup_ms: list[float] = []


CLIENTS = {"cdev": (_client, STAGE_NAMES, KILL_WINDOW), "legacy": (_legacy_client, LEGACY_STAGE_NAMES,
                                                                   LEGACY_KILL_WINDOW)}


def killed_clients(mnt: Path, daemon_pid: int, rounds: int = 30, seed: int = 14, warmup: int = 5,
                   check_every: int = 1, legacy_share: float = 0.25) -> dict:
    """``rounds`` clients, each SIGKILLed at a random point of :func:`_client` (or, for
    ``legacy_share`` of them, of :func:`_legacy_client`); after every kill
    the daemon must report no holder and no open handle, and (every ``check_every`` rounds)
    both devices must be back at power-on. The daemon's fd count must come back to what it was
    after ``warmup`` rounds, its RSS must not grow by more than :data:`RSS_SLACK_KIB`."""
    mnt = Path(mnt)
    ctx = forkserver()
    rng = random.Random(seed)
    report = KillReport()
    baseline_fds = baseline_rss = None
    started = time.monotonic()
    for r in range(warmup + rounds):
        if r == warmup:
            baseline_fds, baseline_rss = daemon_fds(daemon_pid), daemon_rss_kib(daemon_pid)
        kind = "legacy" if rng.random() < legacy_share else "cdev"
        client, names, windows = CLIENTS[kind]
        target = rng.randrange(len(names))
        delay = rng.uniform(0, windows[target])
        read_end, write_end = ctx.Pipe(duplex=False)
        child = ctx.Process(target=client, args=(str(mnt), write_end), daemon=True)
        child.start()
        write_end.close()
        try:
            reached = -1
            while reached < target:
                if not read_end.poll(20):
                    raise AssertionError(f"round {r}: the {kind} client never reached {names[target]}")
                try:
                    reached = read_end.recv_bytes()[-1]
                except EOFError:
                    child.join(5)
                    raise AssertionError(f"round {r}: the {kind} client died before {names[target]}: "
                                         f"exit {child.exitcode}") from None
            time.sleep(delay)
            os.kill(child.pid, signal.SIGKILL)
            child.join(timeout=20)
            assert child.exitcode == -signal.SIGKILL, f"round {r}: client exit {child.exitcode}"
        finally:
            read_end.close()
            if child.is_alive():
                child.kill()
                child.join()
        killed_at = time.monotonic()
        if r >= warmup:
            report.by_stage[f"{kind}:{names[target]}"] += 1
        assert wait_until(lambda: quiet(mnt), timeout=10), f"round {r} ({kind}, {names[target]}): {status(mnt)}"
        report.cleanup_ms.append((time.monotonic() - killed_at) * 1000)
        if r % check_every == 0 or r == warmup + rounds - 1:
            check_reset(mnt)
            assert wait_until(lambda: quiet(mnt), timeout=10), status(mnt)
    elapsed = time.monotonic() - started
    # Descriptors the daemon closes on RELEASE are closed by the time RELEASE is handled, so
    # the count is back at once; the poll only covers a scheduling hiccup.
    fds_back = wait_until(lambda: daemon_fds(daemon_pid) <= baseline_fds, timeout=5)
    final_fds, final_rss = daemon_fds(daemon_pid), daemon_rss_kib(daemon_pid)
    cleanup = sorted(report.cleanup_ms[warmup:])
    return {"rounds": rounds, "kills_by_stage": report.by_stage,
            "daemon_fds": {"baseline": baseline_fds, "after": final_fds, "back": fds_back},
            "daemon_rss_kib": {"baseline": baseline_rss, "after": final_rss, "growth": final_rss - baseline_rss},
            "cleanup_ms": {"median": round(cleanup[len(cleanup) // 2], 2), "max": round(cleanup[-1], 2)},
            "seconds": round(elapsed, 2), "seed": seed}


#: How much the daemon's RSS may grow over a kill run. CPython never returns small-object
#: arenas and the allocator's free lists to the system promptly, and the first rounds after
#: the warm-up still touch code paths (DMA faults, revocations, timers) for the first time;
#: a leak of one object graph per killed client (handles, contexts, memfds' bookkeeping)
#: would be tens of KiB per round, i.e. tens of MiB over 1,000 rounds.
RSS_SLACK_KIB = 4096


# -- R4: killed daemon -------------------------------------------------------------------------

#: A device with a persistent BAR: 64 KiB, mappable, kept in STATE_DIR/nvram.bar0.
NVRAM = 'name = "nvram"\n\n[[bar]]\nindex = 0\nsize = "64KiB"\nmmap = true\npersist = true\n'
RECORD = struct.Struct("<Q")
SLOTS = 64 * 1024 // RECORD.size
DISCONNECTED = (errno.ENOTCONN, errno.ECONNABORTED)  # the FUSE connection is gone / was aborted mid-request


def nvram_definitions(where: Path) -> Path:
    """vfio0: the persistent device; vfio1: the bundled UART, whose other end ports/vfio1 a
    client can wait on with poll() (a wait the daemon is part of)."""
    defs = Path(where) / "defs"
    defs.mkdir(exist_ok=True)
    (defs / "nvram.toml").write_text(NVRAM)
    (defs / "uart.toml").write_text((HERE.parent.parent / "devices" / "uart.toml").read_text())
    return defs


def _poller(mnt: str, report) -> None:
    """Waits in poll() on ports/vfio1 for data that never comes; reports what poll returned and
    the errno of the read after it."""
    import select as _select

    fd = os.open(f"{mnt}/ports/vfio1", os.O_RDWR)
    waiter = _select.poll()
    waiter.register(fd, _select.POLLIN)
    report.send_bytes(b"polling")
    events = waiter.poll()
    try:
        os.read(fd, 16)
        error = 0
    except OSError as exc:
        error = exc.errno
    report.send_bytes(struct.pack("<ii", events[0][1] if events else 0, error))


def _writer(mnt: str, report) -> None:
    """Writes record n (the value n at slot n), alternately with pwrite and through its
    mapping, and fsyncs after each: a record is acknowledged once its fsync returned. It
    reports each acknowledged n, and the errno that stops it (as -errno)."""
    iommu = IommuFd(f"{mnt}/iommu")
    dev = VfioDevice(f"{mnt}/vfio/devices/vfio0")
    dev.bind_iommufd(iommu)
    start = RECORD.unpack(dev.read(0, 0, RECORD.size))[0]  # slot 0: where the last run got to
    ram = dev.mmap(0)
    report.send_bytes(RECORD.pack(start))
    n = start
    try:
        while n + 1 < SLOTS:
            n += 1
            if n & 1:
                dev.write(0, n * RECORD.size, RECORD.pack(n))
            else:
                ram[n * RECORD.size:(n + 1) * RECORD.size] = RECORD.pack(n)
            dev.write(0, 0, RECORD.pack(n))
            dev.fsync()
            report.send_bytes(struct.pack("<q", n))
        report.send_bytes(struct.pack("<q", 0))  # ran out of slots before the kill
        time.sleep(60)
    except OSError as exc:
        report.send_bytes(struct.pack("<q", -exc.errno))


def _check_records(mnt: Path, acked: int) -> int:
    """Every acknowledged record is there after the restart; returns where the device says it got to."""
    with IommuFd(Path(mnt) / "iommu") as iommu, VfioDevice(Path(mnt) / "vfio/devices/vfio0") as dev:
        dev.bind_iommufd(iommu)
        data = dev.read(0, 0, 64 * 1024)
    values = [RECORD.unpack_from(data, i * RECORD.size)[0] for i in range(SLOTS)]
    missing = [n for n in range(1, acked + 1) if values[n] != n]
    assert not missing, f"acknowledged records lost: {missing[:10]} ({len(missing)} in all)"
    assert values[0] >= acked, f"slot 0 says {values[0]}, {acked} were acknowledged"
    return values[0]


class _Round:
    """One writer against the daemon, the daemon killed at a random moment."""

    def __init__(self, ctx, mnt: Path) -> None:
        self.poll_end, write_end = ctx.Pipe(duplex=False)
        self.poller = ctx.Process(target=_poller, args=(str(mnt), write_end), daemon=True)
        self.poller.start()
        write_end.close()
        self.read_end, write_end = ctx.Pipe(duplex=False)
        self.writer = ctx.Process(target=_writer, args=(str(mnt), write_end), daemon=True)
        self.writer.start()
        write_end.close()
        assert self.read_end.poll(30), "the writer did not start"
        self.start = RECORD.unpack(self.read_end.recv_bytes())[0]
        assert self.poll_end.poll(30) and self.poll_end.recv_bytes() == b"polling", "the poller did not start"

    def after_kill(self, timeout: float = 5.0) -> tuple[int, int, float]:
        """The last acknowledged record, the errno the writer got, and how long it took to get it."""
        killed = time.monotonic()
        acked, error = self.start, 0
        while not error:
            assert self.read_end.poll(max(0.0, killed + timeout - time.monotonic())), \
                "the writer hangs: no error within the timeout after the daemon died"
            value = struct.unpack("<q", self.read_end.recv_bytes())[0]
            if value > 0:
                acked = value
            else:
                error = -value
        assert error in DISCONNECTED, f"the writer got {errno.errorcode.get(error, error)}"
        assert self.poll_end.poll(max(0.0, killed + timeout - time.monotonic())), \
            "the poller hangs: poll() did not return within the timeout after the daemon died"
        revents, poll_error = struct.unpack("<ii", self.poll_end.recv_bytes())
        waited = time.monotonic() - killed
        assert revents & (select.POLLERR | select.POLLHUP) and poll_error in DISCONNECTED, (revents, poll_error)
        for process, end in ((self.writer, self.read_end), (self.poller, self.poll_end)):
            process.join(10)
            end.close()
        return acked, error, waited


def killed_daemon_mount(where: Path, rounds: int = 2, seed: int = 4) -> dict:
    """``vfiofs mount`` (as tests start it: ``vfiofs mount -f``), SIGKILLed while a client writes
    persistent records; the next ``vfiofs mount`` on the same mountpoint finds the stale mount,
    cleans it up and mounts; every acknowledged record is there."""
    from support import start_mount, stop_mount

    where = Path(where)
    rng = random.Random(seed)
    defs, state, mnt = nvram_definitions(where), where / "state", where / "mnt"
    mnt.mkdir()
    ctx = forkserver()
    recover, noticed, errors, acked_total = [], [], {}, 0
    m = start_mount(mnt, devices=defs, state_dir=state)
    try:
        for _ in range(rounds):
            one = _Round(ctx, mnt)
            time.sleep(rng.uniform(0.02, 0.2))  # a random moment, not a synchronisation
            os.kill(m.daemon.pid, signal.SIGKILL)
            killed = time.monotonic()
            m.process.wait()
            acked, error, waited = one.after_kill()
            noticed.append(waited)
            errors[errno.errorcode[error]] = errors.get(errno.errorcode[error], 0) + 1
            try:
                os.statvfs(mnt)
                raise AssertionError("the mount still answers after its daemon died")
            except OSError as dead:
                assert dead.errno == errno.ENOTCONN, dead
            m.daemon.close_log()
            m = start_mount(mnt, devices=defs, state_dir=state)  # returns once the new mount answers
            recover.append(time.monotonic() - killed)
            assert "was a stale mount (daemon gone); cleaned it up and mounting again" in m.daemon.output()
            _check_records(mnt, acked)
            acked_total += acked - one.start
    finally:
        stop_mount(m)
        m.daemon.close_log()
    return {"rounds": rounds, "client_errors": errors, "acknowledged_records": acked_total, "lost": 0,
            "client_error_after_s": _spread(noticed), "kill_to_answering_s": _spread(recover)}


def _spread(values: list[float]) -> dict:
    values = sorted(values)
    return {"median": round(values[len(values) // 2], 3), "max": round(values[-1], 3)}


def killed_daemon_unit(where: Path, gid: int, rounds: int = 2, seed: int = 5) -> dict:
    """The system unit (systemd/vfiofs.service) emulated as tests/mount/test_systemd.py does: its
    ExecStartPre= and ExecStart= (sandboxed with setpriv, NOTIFY_SOCKET set), and its
    Restart=on-failure / RestartSec= by restarting it after the SIGKILL, as systemd would. The
    time from the kill to READY=1 of the new main process (which sends it only once a stat
    through the mount was answered) is what the unit's users wait."""
    mount_tests = HERE.parent / "mount"
    if str(mount_tests) not in sys.path:
        sys.path.insert(0, str(mount_tests))
    import subprocess

    from test_systemd import SYSTEM_UNIT, NotifySocket, sandbox, service_section, unit_command

    service = service_section(SYSTEM_UNIT)
    assert service["Restart"] == ["on-failure"], "SIGKILL is a failure: the unit must restart on it"
    restart_sec = float(service["RestartSec"][0].removesuffix("s"))
    where = Path(where)
    rng = random.Random(seed)
    defs, state, mnt = nvram_definitions(where), where / "state", where / "run" / "vfiofs"
    state.mkdir(mode=0o700)  # StateDirectory=
    paths = {"/run/vfiofs": str(mnt), "/var/lib/vfiofs": str(state)}
    variables = {"VFIOFS_GROUP": str(gid), "VFIOFS_DEVICES": str(defs)}  # /etc/vfiofs/vfiofs.env
    listener = NotifySocket(str(where / "notify"))
    log_path = where / "unit.log"

    def exec_start() -> subprocess.Popen:
        subprocess.run(unit_command(SYSTEM_UNIT, "ExecStartPre", paths), capture_output=True)  # "-": may fail
        command = sandbox(SYSTEM_UNIT) + unit_command(SYSTEM_UNIT, "ExecStart", paths, variables)
        with open(log_path, "ab") as log:
            return subprocess.Popen(command, env=dict(os.environ, NOTIFY_SOCKET=listener.address),
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/")

    def ready(process: subprocess.Popen) -> None:
        message, sender = listener.receive(30)
        assert message.splitlines()[0] == "READY=1" and sender == process.pid, (message, log_path.read_text())

    ctx = forkserver()
    recover, noticed, errors, acked_total = [], [], {}, 0
    process = exec_start()
    try:
        ready(process)
        for _ in range(rounds):
            one = _Round(ctx, mnt)
            time.sleep(rng.uniform(0.02, 0.2))  # a random moment, not a synchronisation
            process.kill()
            killed = time.monotonic()
            process.wait()
            assert process.returncode == -signal.SIGKILL  # a failure for Restart=on-failure
            acked, error, waited = one.after_kill()
            noticed.append(waited)
            errors[errno.errorcode[error]] = errors.get(errno.errorcode[error], 0) + 1
            # systemd: the main process died -> RestartSec= later, ExecStartPre= and ExecStart= again.
            time.sleep(max(0.0, killed + restart_sec - time.monotonic()))
            process = exec_start()
            ready(process)
            recover.append(time.monotonic() - killed)
            os.statvfs(mnt)
            _check_records(mnt, acked)
            acked_total += acked - one.start
        assert log_path.read_text().count("was a stale mount (daemon gone); cleaned it up") == rounds
        process.send_signal(signal.SIGTERM)  # systemctl stop
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        from vfiofs.host.mounting import is_mounted, lazy_unmount

        if is_mounted(mnt):
            lazy_unmount(mnt)
        listener.close()
    return {"rounds": rounds, "restart_sec": restart_sec, "client_errors": errors,
            "acknowledged_records": acked_total, "lost": 0, "client_error_after_s": _spread(noticed),
            "kill_to_ready_s": _spread(recover)}
