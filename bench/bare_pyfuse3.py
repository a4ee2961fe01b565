"""Bare pyfuse3 + trio server: the pyfuse3 baseline of bench/run.py.

One regular file ``f`` (mode 0666, direct_io). read returns zeros, write returns the
length. Served like vfiofs serves: ``pyfuse3.main(min_tasks=1, max_tasks=1)`` on trio,
same entry/attr timeouts. Prints ``ready`` on stdout once the mount is up.
SIGINT/SIGTERM/SIGHUP unmount.

Usage: python bench/bare_pyfuse3.py MOUNTPOINT
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys

import pyfuse3
import trio

FILE_INO = pyfuse3.ROOT_INODE + 1
TIMEOUT = 300.0


class BareOps(pyfuse3.Operations):
    enable_writeback_cache = False

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            attrs.st_mode = stat.S_IFDIR | 0o755
            attrs.st_nlink = 2
        elif inode == FILE_INO:
            attrs.st_mode = stat.S_IFREG | 0o666
            attrs.st_nlink = 1
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attrs.st_uid, attrs.st_gid = os.getuid(), os.getgid()
        attrs.st_size = 0
        attrs.st_blksize = 4096
        attrs.entry_timeout = attrs.attr_timeout = TIMEOUT
        return attrs

    async def lookup(self, parent_inode, name, ctx):
        if parent_inode != pyfuse3.ROOT_INODE or name != b"f":
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(FILE_INO)

    async def getattr(self, inode, ctx):
        return self._attrs(inode)

    async def opendir(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, b"f", self._attrs(FILE_INO), 1)

    async def releasedir(self, fh):
        return None

    async def open(self, inode, flags, ctx):
        if inode != FILE_INO:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=1, direct_io=True, keep_cache=False)

    async def read(self, fh, off, size):
        return bytes(size)

    async def write(self, fh, off, buf):
        return len(buf)

    async def flush(self, fh):
        return None

    async def release(self, fh):
        return None


async def _main() -> None:
    async with trio.open_nursery() as nursery:

        async def fuse_loop() -> None:
            await pyfuse3.main(min_tasks=1, max_tasks=1)
            nursery.cancel_scope.cancel()

        nursery.start_soon(fuse_loop)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            print("ready", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main() -> int:
    if len(sys.argv) != 2:
        print(f"usage: {sys.argv[0]} MOUNTPOINT", file=sys.stderr)
        return 2
    options = {"fsname=barepy", "subtype=barepy", "default_permissions"}
    pyfuse3.init(BareOps(), sys.argv[1], options)
    try:
        trio.run(_main)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
