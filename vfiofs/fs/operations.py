"""pyfuse3 adapter: maps FUSE requests onto the tree (:mod:`vfiofs.fs.tree`) and open files.

Holds no VFIO rule. It owns what is FUSE's business: the inode tree, attributes, the one
table of open files (fh → an object of :mod:`vfiofs.fs.files`, one class per kind of node),
and the translation of results into replies. Every handler maps every failure to a
``FUSEError`` with an errno in 1..511 — an exception escaping a handler would kill the
daemon, and a larger errno would leave the caller hanging.

Numbering: a VFIO handle's fh is the mailbox's own number (counting up from 1); the
adapter numbers its other files down from the largest fh FUSE carries, so the two never meet.
"""

from __future__ import annotations

import errno
import itertools
import logging
import stat

import pyfuse3

from vfiofs.core.mailbox import Mailbox
from vfiofs.errors import VfioError
from vfiofs.fs.files import NO_FILE, OpenFile, VfioHandle
from vfiofs.fs.tree import Tree

log = logging.getLogger(__name__)

LAST_FH = (1 << 64) - 1  # FUSE's fh is a uint64_t


def _failure(exc: BaseException, what: str, fh: int = 0, off: int = 0) -> pyfuse3.FUSEError:
    """The reply for a handler's exception: a FUSEError as it is, a VfioError's errno, else a logged EIO."""
    if isinstance(exc, pyfuse3.FUSEError):
        return exc
    if isinstance(exc, VfioError):
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s fh=%d off=%#x -> %s", what, fh, off, exc)
        return pyfuse3.FUSEError(exc.errno)
    log.exception("internal error in %s", what)
    return pyfuse3.FUSEError(errno.EIO)


class VfioOperations(pyfuse3.Operations):
    """The vfiofs mount: ``iommu``, ``vfio/``, ``ports/``, ``.vfiofs/`` and the read-only ``sys/`` tree."""

    enable_writeback_cache = False

    def __init__(self, server: Mailbox, uid: int, gid: int, file_mode: int = 0o600) -> None:
        super().__init__()
        self.server = server
        self.trace = log.isEnabledFor(logging.DEBUG)  # --debug: one line per request
        self.tree = Tree(server, uid, gid, file_mode)
        self.nodes = self.tree.nodes
        self._files: dict[int, OpenFile] = {}  # every open file, VFIO handle or not
        self._own_fhs = itertools.count(LAST_FH, -1)

    # -- namespace ----------------------------------------------------------------------------
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self.tree.node(parent_inode)
        if name == b".":
            return self.tree.attributes(parent)
        child = parent.children.get(name)
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.tree.attributes(child)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self.tree.attributes(self.tree.node(inode))

    async def setattr(self, inode, attr, fields, fh, ctx) -> pyfuse3.EntryAttributes:
        node = self.tree.node(inode)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)  # nodes are fixed at mount time (see README)
        if fields.update_size and stat.S_ISDIR(node.mode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        return self.tree.attributes(node)  # truncation and times are ignored, as on a character device

    async def _fixed_tree(self, *args: object) -> None:
        """The tree is fixed at mount time: nothing can be created, removed or renamed."""
        raise pyfuse3.FUSEError(errno.EPERM)

    create = mknod = mkdir = symlink = link = unlink = rmdir = rename = _fixed_tree

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self.tree.node(inode)
        if not stat.S_ISDIR(node.mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        children = list(self.tree.node(fh).children.values())
        for position, child in enumerate(children[start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(token, child.name, self.tree.attributes(child), position):
                break

    async def releasedir(self, fh: int) -> None:
        return None

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.tree.node(inode)
        if node.target is None:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.target

    # -- open files ---------------------------------------------------------------------------
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self.tree.node(inode)
        if node.opener is None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        try:
            file = node.opener(flags, ctx)
        except Exception as exc:
            raise _failure(exc, "open") from None
        if not isinstance(file, VfioHandle):
            file.fh = next(self._own_fhs)
        self._files[file.fh] = file
        if self.trace:
            log.debug("open %s pid=%d uid=%d -> fh=%d", node.name.decode(), ctx.pid, ctx.uid, file.fh)
        # direct_io: every read and write reaches the daemon; nothing is cached.
        return pyfuse3.FileInfo(fh=file.fh, direct_io=True, keep_cache=False, nonseekable=file.nonseekable)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        try:
            data = self._files.get(fh, NO_FILE).read(off, size)
        except Exception as exc:
            raise _failure(exc, "read", fh, off) from None
        if self.trace:
            log.debug("read fh=%d off=%#x size=%d -> %d bytes", fh, off, size, len(data))
        return data

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        try:
            written = self._files.get(fh, NO_FILE).write(off, buf)
        except Exception as exc:
            raise _failure(exc, "write", fh, off) from None
        if self.trace:
            log.debug("write fh=%d off=%#x size=%d -> %d", fh, off, len(buf), written)
        return written

    async def poll(self, inode: int, fh: int, poll_handle, ctx: pyfuse3.RequestContext) -> int:
        try:
            return self._files.get(fh, NO_FILE).poll(poll_handle)
        except Exception as exc:
            raise _failure(exc, "poll", fh) from None

    async def flush(self, fh: int) -> None:
        return None

    async def fsync(self, fh: int, datasync: bool) -> None:
        try:
            self._files.get(fh, NO_FILE).fsync()
        except Exception as exc:
            raise _failure(exc, "fsync", fh) from None

    async def release(self, fh: int) -> None:
        if self.trace:
            log.debug("release fh=%d", fh)
        file = self._files.pop(fh, NO_FILE)
        try:
            file.release()
        except Exception:  # close always succeeds
            log.exception("internal error in release")

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_files = len(self.nodes)
        data.f_namemax = 255
        return data
