"""R1: generated control requests through a real mount (docs/reliability.md)."""

from __future__ import annotations

import errno
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


def test_garbage_on_the_fd_channel_never_hurts_the_daemon(mount):
    """The fd channel is the other way into the daemon: random messages, wrong counts, files of
    the mount itself attached to bad parcels, a connection that never says anything, 64+ parcels;
    after each, a command that has to collect parcels still gets its answer."""
    import os
    import random
    import secrets
    import socket
    import struct

    from harness import Watchdog, crashes_in_log
    from support import errno_of
    from vfiofs import client as vc
    from vfiofs.host import fdpass

    rng = random.Random(seed())
    watchdog = Watchdog(mount)
    daemon_fds = f"/proc/{mount.daemon.process.pid}/fd"
    before = len(os.listdir(daemon_fds))
    sent = 0
    try:
        with mount.bound(4) as dev, vc.IommuFd(mount.iommu) as other:
            name = vc._channel_name(dev.fd)
            idle = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            idle.connect(b"\0" + name)  # connected, never sends, never closes (until the end)
            status = os.open(mount.node(".vfiofs/status"), os.O_RDONLY)
            pool = [other.fd, dev.fd, status]
            for i in range(count(300, 5000)):
                with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
                    sock.connect(b"\0" + name)
                    fds = rng.sample(pool, rng.randrange(len(pool) + 1))
                    parcel = secrets.token_bytes(16)
                    r = rng.random()
                    if r < 0.3:
                        message = rng.randbytes(rng.randrange(0, 200))
                    elif r < 0.6:  # a count that does not match what is attached
                        numbers = [rng.randrange(-2, 100) for _ in range(rng.randrange(5))]
                        message = struct.pack("<8s16sI", fdpass.PARCEL_MAGIC, parcel, rng.randrange(1 << 32)) + \
                            struct.pack(f"<{len(numbers)}i", *numbers)
                    else:  # well formed, then never used: the daemon must hold at most 64
                        message = struct.pack("<8s16sI", fdpass.PARCEL_MAGIC, parcel, len(fds)) + \
                            struct.pack(f"<{len(fds)}i", *range(len(fds)))
                    with watchdog.op(f"deposit #{i}"):
                        try:
                            socket.send_fds(sock, [message], fds)
                        except OSError:
                            pass
                    sent += 1
                with watchdog.op(f"SET_IRQS after deposit #{i}"):  # collects the queued parcels
                    assert errno_of(dev.set_irqs, vc.VFIO_PCI_MSI_IRQ_INDEX,
                                    vc.VFIO_IRQ_SET_DATA_EVENTFD | vc.VFIO_IRQ_SET_ACTION_TRIGGER, 0,
                                    data=[other.fd]) == errno.EINVAL
            efd = os.eventfd(0)
            with watchdog.op("a real eventfd after all that"):
                dev.set_irqs(vc.VFIO_PCI_MSI_IRQ_INDEX, vc.VFIO_IRQ_SET_DATA_EVENTFD | vc.VFIO_IRQ_SET_ACTION_TRIGGER,
                             0, data=[efd])
            os.close(efd)
            os.close(status)
            idle.close()
        # what a parcel holds is bounded: at most 64 parcels (3 descriptors and a pidfd each here)
        grown = len(os.listdir(daemon_fds)) - before
        assert grown <= 64 * 4 + 8, f"the daemon holds {grown} more descriptors than before"
    finally:
        watchdog.close()
    record("R1-channel", deposits=sent, hangs=int(bool(watchdog.hung)), crashes=len(crashes_in_log(mount)))
    assert not crashes_in_log(mount)
