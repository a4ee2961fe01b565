"""The side channel that hands a region's memory to its binder: SCM_RIGHTS over a UNIX socket.

FUSE cannot return a file descriptor, so for mmap the client listens on an abstract UNIX
socket with a random name, sends that name through its *bound* handle's mailbox, and
the daemon connects and passes the region's memfd. The daemon checks that the listener
belongs to the uid that opened the handle before it sends anything.
"""

from __future__ import annotations

import errno
import socket
import struct

from .errors import VfioError

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
