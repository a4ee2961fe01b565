"""The side channel that hands a region's memory to its binder: SCM_RIGHTS over a UNIX socket.

FUSE cannot return a file descriptor, so for mmap the client listens on an abstract UNIX
socket with a random name, sends that name through its *bound* handle's mailbox, and
the daemon connects and passes the region's memfd. The daemon checks that the listener
belongs to the uid that opened the handle before it sends anything.
"""

from __future__ import annotations

import errno
import itertools
import os
import secrets
import socket
import struct
import threading
from collections import OrderedDict

from vfiofs.errors import VfioError
from vfiofs.host.procmem import alive

MESSAGE = b"vfiofs-region\0"


def send_fd(name: bytes, fd: int, uid: int) -> None:
    """Connect to abstract socket ``name`` and pass ``fd``; never blocks."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        sock.connect(b"\0" + name)
        _pid, peer_uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if peer_uid != uid:
            raise VfioError(errno.EPERM, f"listener belongs to uid {peer_uid}, the handle to uid {uid}")
        socket.send_fds(sock, [MESSAGE], [fd])
    except OSError as exc:
        raise VfioError(exc.errno or errno.EIO, f"cannot pass the region to the client: {exc.strerror}") from None
    finally:
        sock.close()


# -- the other direction: clients hand file descriptors (eventfds) to the daemon ------------------

PARCEL_MAGIC = b"VFFSPRCL"
PARCEL_ID_SIZE = 16
MAX_FDS_PER_MESSAGE = 253  # the kernel's SCM_MAX_FD
MAX_PARCELS = 64
_PARCEL_HEADER = struct.Struct("<8s16sI")


class PassedFd:
    """A descriptor a client deposited; the daemon holds its own reference until released."""

    __slots__ = ("fd", "is_eventfd", "claimed")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        try:
            self.is_eventfd = os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
        except OSError:
            self.is_eventfd = False
        self.claimed = False

    def duplicate(self) -> "PassedFd":
        """Another reference to the same descriptor (one per interrupt vector that uses it)."""
        return PassedFd(os.dup(self.fd))

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            if self.is_eventfd:
                os.close(fd)
            else:
                close_untrusted(fd)


def close_untrusted(fd: int) -> None:
    """Close a descriptor a client sent that is not an eventfd, on a thread of its own.

    close() of a file on a FUSE mount waits for that mount's daemon to answer FLUSH, and
    uninterruptibly. A client may send a file of *this* mount (an fd of a device node, say,
    named as an eventfd in SET_IRQS): closed on the event loop, the daemon would wait for
    itself for ever, with every client of the mount behind it. On its own thread the close
    waits while the loop answers the FLUSH."""
    threading.Thread(target=_close_quietly, args=(fd,), name="vfiofs-close", daemon=True).start()


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux 6.5+


class Parcel:
    """What one client connection deposited: its uid, its pidfd (its own copy), and descriptors
    by number. ``source`` numbers the connection it came from."""

    def __init__(self, uid: int, pidfd: int | None, source: int = 0) -> None:
        self.uid, self.pidfd, self.source = uid, pidfd, source
        self.fds: dict[int, PassedFd] = {}

    def close(self) -> None:
        for passed in self.fds.values():
            if not passed.claimed:
                passed.close()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


class FdChannel:
    """A per-mount abstract socket where clients deposit descriptors before the command that uses them.

    A client connects, sends one or more messages — magic, a random 16-byte parcel id,
    the count, then that many s32 fd numbers (as the client knows them) — each with the
    descriptors attached, and disconnects. The command's fd table then names the parcel.
    Nothing here blocks: parcels are collected when a command needs one, and they are
    already queued because the client sent them before issuing the command.
    """

    def __init__(self) -> None:
        self.name = b"vfiofs-fds-" + secrets.token_hex(16).encode()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        self.sock.bind(b"\0" + self.name)
        self.sock.listen(64)
        self._parcels: OrderedDict[bytes, Parcel] = OrderedDict()
        self._connections = itertools.count(1)

    def _parcel(self, parcel: bytes, uid: int) -> "Parcel | None":
        if parcel not in self._parcels:
            self._collect()
        found = self._parcels.get(parcel)
        return found if found is not None and found.uid == uid else None

    def take(self, parcel: bytes, number: int, uid: int) -> PassedFd | None:
        """The descriptor a client of ``uid`` deposited as ``number`` in ``parcel``."""
        found = self._parcel(parcel, uid)
        return None if found is None else found.fds.get(number)

    def sender(self, parcel: bytes, uid: int) -> int | None:
        """A pidfd of the process that deposited ``parcel`` (as the kernel reported it), or None."""
        found = self._parcel(parcel, uid)
        return None if found is None else found.pidfd

    def discard(self, parcel: bytes) -> None:
        """The command is over: close what it did not claim."""
        found = self._parcels.pop(parcel, None)
        if found is not None:
            found.close()

    def _collect(self) -> None:
        try:
            self._accept_all()
        finally:
            self._drop_orphans()

    def _drop_orphans(self) -> None:
        """Parcels whose depositing process has exited: only that process knew their id, so no
        command can name them any more (a client killed between its deposit and its command)."""
        for parcel, found in list(self._parcels.items()):
            if found.pidfd is not None and not alive(found.pidfd):
                self.discard(parcel)

    def _accept_all(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # nobody waiting (BlockingIOError) or the socket failed: nothing to collect
                return
            with conn:
                conn.setblocking(False)
                _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
                try:
                    pidfd = conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
                except OSError:  # kernels before 6.5: who sent it cannot be proven
                    pidfd = None
                self._receive(conn, uid, pidfd)

    def _receive(self, conn: socket.socket, uid: int, pidfd: int | None) -> None:
        try:
            self._receive_messages(conn, uid, pidfd, next(self._connections))
        finally:
            if pidfd is not None:  # each parcel holds its own copy
                os.close(pidfd)

    def _receive_messages(self, conn: socket.socket, uid: int, pidfd: int | None, source: int) -> None:
        while True:
            try:
                message, fds, _flags, _addr = socket.recv_fds(conn, 4096, MAX_FDS_PER_MESSAGE)
            except OSError:  # nothing more queued (BlockingIOError) or the connection failed
                return
            if not message and not fds:
                return  # the client is done
            passed = [PassedFd(fd) for fd in fds]
            try:
                magic, parcel, count = _PARCEL_HEADER.unpack_from(message)
                numbers = struct.unpack_from(f"<{count}i", message, _PARCEL_HEADER.size)
            except struct.error:
                magic, parcel, numbers = b"", b"", ()
            if magic != PARCEL_MAGIC or len(numbers) != len(passed):
                for p in passed:
                    p.close()
                continue
            found = self._parcels.get(parcel)
            if found is None:
                found = self._parcels[parcel] = Parcel(uid, None if pidfd is None else os.dup(pidfd), source)
            if found.uid != uid or found.source != source:  # a parcel id is one connection's, once
                for p in passed:
                    p.close()
                continue
            for number, p in zip(numbers, passed):
                old = found.fds.pop(number, None)
                if old is not None:
                    old.close()
                found.fds[number] = p
            while len(self._parcels) > MAX_PARCELS:
                self.discard(next(iter(self._parcels)))

    def close(self) -> None:
        for parcel in list(self._parcels):
            self.discard(parcel)
        self.sock.close()


def deposit(channel_name: bytes, parcel: bytes, fds: dict[int, int]) -> int:
    """Client side: send ``fds`` (number as the command names it → descriptor) as ``parcel``;
    with no descriptors the parcel only proves who we are. Returns the daemon's pid."""
    items = list(fds.items())
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as sock:
        sock.connect(b"\0" + channel_name)
        daemon_pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        for i in range(0, max(len(items), 1), MAX_FDS_PER_MESSAGE):
            chunk = items[i : i + MAX_FDS_PER_MESSAGE]
            header = _PARCEL_HEADER.pack(PARCEL_MAGIC, parcel, len(chunk))
            numbers = struct.pack(f"<{len(chunk)}i", *(number for number, _ in chunk))
            socket.send_fds(sock, [header + numbers], [fd for _, fd in chunk])
    return daemon_pid
