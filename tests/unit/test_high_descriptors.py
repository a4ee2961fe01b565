"""The daemon holds thousands of descriptors (a memfd per BAR of every device, the clients'
eventfds and pidfds), so the numbers it checks go past select()'s FD_SETSIZE (1024): every
readiness check must work there too. Before, an interrupt for an eventfd numbered 1024 or
higher was dropped with a warning, and so was an exited process's parcel."""

from __future__ import annotations

import fcntl
import os
import resource
from types import SimpleNamespace

import pytest

from vfiofs.host import eventfd, mounting, procmem

HIGH = 1500


@pytest.fixture
def high():
    """``high(fd)``: a duplicate of ``fd`` numbered at least HIGH (closed after the test)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft <= HIGH + 10:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    made: list[int] = []

    def dup_high(fd: int) -> int:
        made.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, HIGH))
        return made[-1]

    yield dup_high
    for fd in made:
        os.close(fd)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_an_eventfd_numbered_past_fd_setsize_is_signalled(high):
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    trigger = SimpleNamespace(fd=high(efd))
    assert trigger.fd >= 1024
    eventfd.signal(trigger)
    eventfd.signal(trigger)
    assert os.eventfd_read(efd) == 2
    os.close(efd)


def test_a_pidfd_numbered_past_fd_setsize_tells_alive_from_exited(high):
    child = os.fork()
    if child == 0:
        os._exit(0)
    pidfd = high(os.pidfd_open(child))
    os.waitid(os.P_PID, child, os.WEXITED)
    assert pidfd >= 1024 and not procmem.alive(pidfd)
    mine = high(os.pidfd_open(os.getpid()))
    assert procmem.alive(mine)


def test_a_ready_pipe_numbered_past_fd_setsize_is_read(high):
    """A process starting a mount may itself hold many descriptors (a test with many clients):
    the daemon's ready report still arrives, and silence still times out."""
    read_end, write_end = os.pipe()
    try:
        report = high(read_end)
        assert report >= 1024
        assert mounting._read_report(report, 0.05) == ("", True)
        os.write(write_end, b"ready\n")
        assert mounting._read_report(report, 5.0) == ("ready", False)
    finally:
        os.close(read_end)
        os.close(write_end)
