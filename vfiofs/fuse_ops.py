"""pyfuse3 adapter: maps FUSE requests onto :class:`vfiofs.server.Server`.

Holds no VFIO rule. It owns only what is FUSE's business: the inode tree, attributes,
and the translation of results into replies. Every handler maps every failure to a
``FUSEError`` with an errno in 1..511 — an exception escaping a handler would kill the
daemon, and a larger errno would leave the caller hanging.

It also serves the read-only ``sys/`` tree that :mod:`vfiofs.sysfs` computes (files,
directories, symlinks): those files never reach the Server; their handles live in a
table of their own, numbered from ``SYSFS_FH_BASE``.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from typing import Callable

import pyfuse3

from . import sysfs
from .errors import VfioError
from .server import Server

log = logging.getLogger(__name__)

ATTR_TIMEOUT = 300.0  # the tree never changes while mounted
SYSFS_INODE_BASE = 1 << 24  # sys/ nodes: far above the fixed inodes (100 + device index)
SYSFS_FH_BASE = 1 << 48  # sys/ file handles: the Server's numbers start at 1


@dataclass
class Node:
    inode: int
    name: bytes
    mode: int
    children: dict[bytes, "Node"] = field(default_factory=dict)
    opener: Callable[[int], int] | None = None  # files only: opener(uid) returns a new fh
    content: bytes | None = None  # sys/ files: their fixed contents (no opener)
    target: bytes | None = None  # symlinks: what readlink returns
    size: int = 0  # st_size


def _failure(exc: BaseException, what: str, fh: int = 0, off: int = 0) -> pyfuse3.FUSEError:
    if isinstance(exc, VfioError):
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s fh=%d off=%#x -> %s", what, fh, off, exc)
        return pyfuse3.FUSEError(exc.errno)
    log.exception("internal error in %s", what)
    return pyfuse3.FUSEError(errno.EIO)


class VfioOperations(pyfuse3.Operations):
    """The vfiofs tree: ``iommu``, ``vfio/devices/vfioN`` and the read-only ``sys/`` tree."""

    enable_writeback_cache = False

    def __init__(self, server: Server, uid: int, gid: int, file_mode: int = 0o600) -> None:
        super().__init__()
        self.server = server
        self.trace = log.isEnabledFor(logging.DEBUG)  # --debug: one line per request
        self.uid, self.gid = uid, gid
        self.stamp_ns = time.time_ns()
        self.nodes: dict[int, Node] = {}
        root = self._add(pyfuse3.ROOT_INODE, b"", stat.S_IFDIR | 0o755)
        iommu = self._add(2, b"iommu", stat.S_IFREG | file_mode, server.open_iommu)
        vfio = self._add(3, b"vfio", stat.S_IFDIR | 0o755)
        devices = self._add(4, b"devices", stat.S_IFDIR | 0o755)
        root.children = {iommu.name: iommu, vfio.name: vfio}
        vfio.children = {devices.name: devices}
        for device in server.devices:
            node = self._add(
                100 + device.index,
                f"vfio{device.index}".encode(),
                stat.S_IFREG | file_mode,
                lambda uid, index=device.index: server.open_device(index, uid),
            )
            devices.children[node.name] = node
        self._sysfs_open: dict[int, bytes] = {}  # sys/ file handles -> contents
        self._sysfs_fhs = itertools.count(SYSFS_FH_BASE)
        try:
            self._add_sysfs(root, sysfs.build_tree((d.index, d.driver.spec) for d in server.devices))
        except Exception:  # the device nodes matter more than the sysfs view of them
            log.exception("cannot build the sys/ tree; mounting without it")
            root.children.pop(b"sys", None)
            self.nodes = {inode: node for inode, node in self.nodes.items() if inode < SYSFS_INODE_BASE}

    def _add_sysfs(self, root: Node, entries: list[sysfs.Entry]) -> None:
        dirs: dict[str, Node] = {"": root}
        for inode, entry in enumerate(entries, SYSFS_INODE_BASE):
            parent_path, _, name = entry.path.rpartition("/")
            if entry.kind == "dir":
                node = self._add(inode, name.encode(), stat.S_IFDIR | 0o755)
                dirs[entry.path] = node
            elif entry.kind == "symlink":
                target = entry.target.encode()
                node = self._add(inode, name.encode(), stat.S_IFLNK | 0o777)
                node.target, node.size = target, len(target)
            else:
                node = self._add(inode, name.encode(), stat.S_IFREG | 0o444)
                node.content, node.size = entry.content, entry.size
            dirs[parent_path].children[node.name] = node

    def _add(self, inode: int, name: bytes, mode: int, opener: Callable[[int], int] | None = None) -> Node:
        node = Node(inode, name, mode, opener=opener)
        self.nodes[inode] = node
        return node

    def _node(self, inode: int) -> Node:
        node = self.nodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = node.inode
        attrs.st_mode = node.mode
        attrs.st_nlink = 2 + sum(1 for c in node.children.values() if stat.S_ISDIR(c.mode)) if stat.S_ISDIR(node.mode) else 1
        attrs.st_uid, attrs.st_gid = self.uid, self.gid
        attrs.st_size = node.size
        attrs.st_blksize = 4096
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = self.stamp_ns
        attrs.entry_timeout = attrs.attr_timeout = ATTR_TIMEOUT
        attrs.generation = 0
        return attrs

    # -- namespace ----------------------------------------------------------------------------
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        if name == b".":
            return self._attrs(parent)
        child = parent.children.get(name)
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(child)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self._node(inode))

    async def setattr(self, inode, attr, fields, fh, ctx) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)  # nodes are fixed at mount time (see README)
        if fields.update_size and stat.S_ISDIR(node.mode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        return self._attrs(node)  # truncation and times are ignored, as on a character device

    async def _fixed_tree(self, *args: object) -> None:
        """The tree is fixed at mount time: nothing can be created, removed or renamed."""
        raise pyfuse3.FUSEError(errno.EPERM)

    create = mknod = mkdir = symlink = link = unlink = rmdir = rename = _fixed_tree

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._node(inode)
        if not stat.S_ISDIR(node.mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        children = list(self._node(fh).children.values())
        for position, child in enumerate(children[start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(token, child.name, self._attrs(child), position):
                break

    async def releasedir(self, fh: int) -> None:
        return None

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        if node.target is None:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.target

    # -- handles ------------------------------------------------------------------------------
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if node.content is not None:
            return self._open_sysfs(node.name, node.content, flags)
        if node.opener is None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        try:
            fh = node.opener(ctx.uid)
        except Exception as exc:
            raise _failure(exc, "open") from None
        if self.trace:
            log.debug("open %s pid=%d uid=%d -> fh=%d", node.name.decode(), ctx.pid, ctx.uid, fh)
        # direct_io: every read and write reaches the daemon; nothing is cached.
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    def _open_sysfs(self, name: bytes, content: bytes, flags: int) -> pyfuse3.FileInfo:
        # sys/ files are read-only for everyone: default_permissions stops other users with
        # the 0444 mode, and root is refused here, as kernfs refuses a writable open.
        if (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EACCES)
        fh = next(self._sysfs_fhs)
        self._sysfs_open[fh] = content
        if self.trace:
            log.debug("open sys file %r -> fh=%d", name, fh)
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        content = self._sysfs_open.get(fh)
        if content is not None:
            return content[off : off + size] if off >= 0 else b""
        try:
            data = self.server.read(fh, off, size)
        except Exception as exc:
            raise _failure(exc, "read", fh, off) from None
        if self.trace:
            log.debug("read fh=%d off=%#x size=%d -> %d bytes", fh, off, size, len(data))
        return data

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if fh in self._sysfs_open:
            raise pyfuse3.FUSEError(errno.EACCES)  # opened read-only; the kernel says EBADF first
        try:
            written = self.server.write(fh, off, buf)
        except Exception as exc:
            raise _failure(exc, "write", fh, off) from None
        if self.trace:
            log.debug("write fh=%d off=%#x size=%d -> %d", fh, off, len(buf), written)
        return written

    async def flush(self, fh: int) -> None:
        return None

    async def fsync(self, fh: int, datasync: bool) -> None:
        if fh in self._sysfs_open:
            return None  # kernfs: noop_fsync
        try:
            self.server.fsync(fh)
        except Exception as exc:
            raise _failure(exc, "fsync", fh) from None

    async def release(self, fh: int) -> None:
        if self.trace:
            log.debug("release fh=%d", fh)
        if self._sysfs_open.pop(fh, None) is not None:
            return None
        try:
            self.server.release(fh)
        except Exception:  # close always succeeds
            log.exception("internal error in release")

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_files = len(self.nodes)
        data.f_namemax = 255
        return data
