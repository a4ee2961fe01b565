"""Parcels on the fd channel whose depositing process died before its command (a client
killed between the deposit and the ioctl) are dropped when the channel next collects, with
the descriptors they hold. Found by the killed-clients stress test
(tests/stress/test_killed_clients.py): each such kill left an eventfd and a pidfd in the
daemon until 64 more parcels had pushed it out."""

from __future__ import annotations

import os
import secrets

import pytest

from vfiofs.host import fdpass

pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs pidfds")


def test_a_parcel_of_a_process_that_died_is_dropped_with_its_descriptors():
    channel = fdpass.FdChannel()
    try:
        orphan = secrets.token_bytes(16)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the client that dies before its command
            try:
                efd = os.eventfd(0)
                fdpass.deposit(channel.name, orphan, {5: efd})
            finally:
                os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        efd = os.eventfd(0)
        mine = secrets.token_bytes(16)
        fdpass.deposit(channel.name, mine, {7: efd})
        before = len(os.listdir("/proc/self/fd"))
        passed = channel.take(mine, 7, os.getuid())  # collects both connections
        assert passed is not None and passed.is_eventfd
        assert orphan not in channel._parcels
        # what the orphan held (its eventfd and its pidfd) is closed: only mine (eventfd, pidfd) are new
        assert len(os.listdir("/proc/self/fd")) == before + 2
        assert channel.take(orphan, 5, os.getuid()) is None
        os.close(efd)
    finally:
        channel.close()


def test_a_parcel_of_a_live_process_stays():
    channel = fdpass.FdChannel()
    try:
        first, second = secrets.token_bytes(16), secrets.token_bytes(16)
        efd = os.eventfd(0)
        fdpass.deposit(channel.name, first, {3: efd})
        fdpass.deposit(channel.name, second, {4: efd})
        assert channel.take(second, 4, os.getuid()) is not None
        assert channel.take(first, 3, os.getuid()) is not None
        os.close(efd)
    finally:
        channel.close()


def _deposit_two_parcels_on_one_connection(name: bytes, first: bytes, second: bytes) -> None:
    import socket
    import struct

    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.connect(b"\0" + name)
        for parcel in (first, second):
            sock.send(struct.pack("<8s16sI", fdpass.PARCEL_MAGIC, parcel, 0))


def test_parcels_of_one_connection_do_not_share_a_descriptor():
    """Two parcels from one connection: discarding the first must not close the descriptor the
    second still holds — else that number, reused by the daemon for something else, would be
    closed a second time when the second goes (a client could close the daemon's files)."""
    channel = fdpass.FdChannel()
    try:
        first, second = secrets.token_bytes(16), secrets.token_bytes(16)
        _deposit_two_parcels_on_one_connection(channel.name, first, second)
        assert channel.sender(first, os.getuid()) is not None
        channel.discard(first)
        pidfd = channel.sender(second, os.getuid())
        assert pidfd is not None
        os.fstat(pidfd)  # still open
        bystander = os.eventfd(0)  # the daemon opens something else meanwhile
        channel.discard(second)
        os.fstat(bystander)  # and it survives the second parcel's end
        os.close(bystander)
    finally:
        channel.close()
