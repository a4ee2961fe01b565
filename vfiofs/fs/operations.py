"""pyfuse3 adapter: maps FUSE requests onto :class:`vfiofs.core.mailbox.Server`.

Holds no VFIO rule. It owns only what is FUSE's business: the inode tree, attributes,
and the translation of results into replies. Every handler maps every failure to a
``FUSEError`` with an errno in 1..511 — an exception escaping a handler would kill the
daemon, and a larger errno would leave the caller hanging.

It also serves the read-only ``sys/`` tree that :mod:`vfiofs.pci.sysfs` computes (files,
directories, symlinks): those files never reach the Server; their handles live in a
table of their own, numbered from ``SYSFS_FH_BASE``.

And it serves ``ports/vfioN`` for every device whose model has a host side (``host_read``
and ``host_write``, such as the 16550 UART): the other end of the device's serial line.
Reading takes what the driver transmitted, writing feeds what the driver receives; both
fail with EAGAIN instead of waiting (the daemon runs one task), and ``poll`` reports
POLLIN/POLLOUT and wakes waiters when the model says data arrived or room appeared. Their
handles also live in a table of their own, numbered from ``PORTS_FH_BASE``.
"""

from __future__ import annotations

import errno
import json
import itertools
import logging
import os
import select
import stat
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pyfuse3

from vfiofs.pci import sysfs
from vfiofs.errors import VfioError
from vfiofs.core.mailbox import Mailbox

log = logging.getLogger(__name__)

ATTR_TIMEOUT = 300.0  # the tree never changes while mounted
GROUP_INODE_BASE = 1 << 20  # vfio/<N> group nodes
SYSFS_INODE_BASE = 1 << 24  # sys/ nodes: far above the fixed inodes (100 + device index)
SYSFS_FH_BASE = 1 << 48  # sys/ file handles: the Server's numbers start at 1
SIDE_FH_BASE = 1 << 47  # every handle at or above this is a sys/, ports/ or .vfiofs/ file
TRACE_FH_BASE = 3 << 46  # .vfiofs/trace handles, between ports/ (1 << 47) and sys/ (1 << 48)
CONTROL_INODE_BASE = 1 << 23  # the .vfiofs directory and its files
PORTS_INODE_BASE = 1 << 22  # the ports/ directory; ports/vfioN is PORTS_INODE_BASE + 1 + N
PORTS_FH_BASE = 1 << 47  # ports/ file handles
# What poll reports for a file without a poll method (the kernel's DEFAULT_POLLMASK).
DEFAULT_POLLMASK = select.POLLIN | select.POLLOUT | select.POLLRDNORM | select.POLLWRNORM


@dataclass
class Node:
    inode: int
    name: bytes
    mode: int
    children: dict[bytes, "Node"] = field(default_factory=dict)
    opener: Callable[..., int] | None = None  # files only: opener(uid, pid) returns a new fh
    special: str = ""  # ".vfiofs/status" and ".vfiofs/trace": produced by the daemon when opened
    content: bytes | None = None  # sys/ files: their fixed contents (no opener)
    target: bytes | None = None  # symlinks: what readlink returns
    size: int = 0  # st_size
    port: object | None = None  # ports/ files: the device model whose host side they are


@dataclass
class PortFile:
    """An open ``ports/vfioN``: the model's host side, and the latest poll handle to wake."""

    model: object
    poll_handle: object | None = None  # pyfuse3.PollHandle, good for one notification


@dataclass
class TraceFile:
    """An open ``.vfiofs/trace``: its queue of events, and the latest poll handle to wake."""

    subscriber: Any = None
    poll_handle: object | None = None


def _process_of(tid: int) -> int:
    """FUSE reports the calling thread; `vfiofs ls` wants its process (Tgid)."""
    try:
        with open(f"/proc/{tid}/status") as status:
            for line in status:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return tid


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

    def __init__(self, server: Mailbox, uid: int, gid: int, file_mode: int = 0o600) -> None:
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
        # The legacy container is an unprivileged interface, as /dev/vfio/vfio (0666) is.
        container = self._add(5, b"vfio", stat.S_IFREG | 0o666, server.open_container)
        root.children = {iommu.name: iommu, vfio.name: vfio}
        vfio.children = {devices.name: devices, container.name: container}
        for number in sorted(server.groups):
            group = self._add(GROUP_INODE_BASE + number, str(number).encode(), stat.S_IFREG | file_mode,
                              lambda uid, pid=0, number=number: server.open_group(number, uid, pid))
            vfio.children[group.name] = group
        for device in server.devices:
            node = self._add(
                100 + device.index,
                f"vfio{device.index}".encode(),
                stat.S_IFREG | file_mode,
                lambda uid, pid=0, index=device.index: server.open_device(index, uid, pid),
            )
            devices.children[node.name] = node
        # .vfiofs/status (a snapshot for `vfiofs ls`) and .vfiofs/trace (the event stream)
        control = self._add(CONTROL_INODE_BASE, b".vfiofs", stat.S_IFDIR | 0o755)
        root.children[control.name] = control
        for offset, name in ((1, "status"), (2, "trace")):
            node = self._add(CONTROL_INODE_BASE + offset, name.encode(), stat.S_IFREG | (file_mode & 0o444))
            node.special = name
            control.children[node.name] = node
        self._trace_files: dict[int, TraceFile] = {}
        self._trace_fhs = itertools.count(TRACE_FH_BASE)
        self._port_files: dict[int, PortFile] = {}  # ports/ file handles
        self._port_fhs = itertools.count(PORTS_FH_BASE)
        self._add_ports(root, server.devices, file_mode)
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

    def _add_ports(self, root: Node, devices: list, file_mode: int) -> None:
        """``ports/vfioN`` for every device whose model has a host side (duck typing)."""
        ports = None
        for device in devices:
            model = getattr(getattr(device, "driver", None), "model", None)
            if not (callable(getattr(model, "host_read", None)) and callable(getattr(model, "host_write", None))):
                continue
            if ports is None:
                ports = self._add(PORTS_INODE_BASE, b"ports", stat.S_IFDIR | 0o755)
                root.children[ports.name] = ports
            node = self._add(PORTS_INODE_BASE + 1 + device.index, f"vfio{device.index}".encode(),
                             stat.S_IFREG | file_mode)
            node.port = model
            ports.children[node.name] = node
            wake = lambda model=model: self._port_event(model)  # noqa: E731
            model.on_host_readable = wake
            if hasattr(model, "on_host_writable"):
                model.on_host_writable = wake

    def _port_event(self, model: object) -> None:
        """The model has news for its host side: wake every poller of its port (never raises)."""
        try:
            for port in self._port_files.values():
                if port.model is model and port.poll_handle is not None:
                    handle, port.poll_handle = port.poll_handle, None  # one notification per handle
                    try:
                        handle.notify()
                    except Exception as exc:  # e.g. the poller is gone
                        log.debug("poll notification failed: %s", exc)
        except Exception:
            log.exception("internal error in a port notification")

    def _add(self, inode: int, name: bytes, mode: int, opener: Callable[..., int] | None = None) -> Node:
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
        if node.port is not None:
            return self._open_port(node)
        if node.content is not None:
            return self._open_sysfs(node.name, node.content, flags)
        if node.special:
            return self._open_special(node, flags)
        if node.opener is None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        try:
            fh = node.opener(ctx.uid, _process_of(ctx.pid))
        except Exception as exc:
            raise _failure(exc, "open") from None
        if self.trace:
            log.debug("open %s pid=%d uid=%d -> fh=%d", node.name.decode(), ctx.pid, ctx.uid, fh)
        # direct_io: every read and write reaches the daemon; nothing is cached.
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    def _open_special(self, node: Node, flags: int) -> pyfuse3.FileInfo:
        if (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EACCES)
        try:
            if node.special == "status":
                content = json.dumps(self.server.status(), indent=1).encode() + b"\n"
                return self._open_sysfs(node.name, content, flags)
            fh = next(self._trace_fhs)
            traced = TraceFile()
            traced.subscriber = self.server.trace.subscribe(lambda: self._trace_event(traced))
            self._trace_files[fh] = traced
        except Exception as exc:
            raise _failure(exc, "open") from None
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False, nonseekable=True)

    @staticmethod
    def _trace_event(traced: "TraceFile") -> None:
        handle, traced.poll_handle = traced.poll_handle, None  # one notification per poll handle
        if handle is not None:
            try:
                handle.notify()
            except Exception as exc:
                log.debug("trace poll notification failed: %s", exc)

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

    def _open_port(self, node: Node) -> pyfuse3.FileInfo:
        fh = next(self._port_fhs)
        self._port_files[fh] = PortFile(node.port)
        if self.trace:
            log.debug("open port %s -> fh=%d", node.name.decode(), fh)
        # A stream: offsets mean nothing, and every read and write reaches the model.
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False, nonseekable=True)

    def _port_read(self, fh: int, port: PortFile, size: int) -> bytes:
        try:
            data = port.model.host_read(size)
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise TypeError(f"host_read returned {type(data).__name__}, not bytes")
            data = bytes(data)
            if len(data) > size:
                raise ValueError(f"host_read returned {len(data)} bytes, asked for {size}")
        except Exception as exc:
            raise _failure(exc, "port read", fh) from None
        if not data:
            raise pyfuse3.FUSEError(errno.EAGAIN)  # never wait in the daemon; poll for POLLIN
        return data

    def _port_write(self, fh: int, port: PortFile, buf: bytes) -> int:
        try:
            taken = port.model.host_write(bytes(buf))
            if not isinstance(taken, int) or not 0 <= taken <= len(buf):
                raise ValueError(f"host_write returned {taken!r} for {len(buf)} bytes")
        except Exception as exc:
            raise _failure(exc, "port write", fh) from None
        if taken == 0 and buf:
            raise pyfuse3.FUSEError(errno.EAGAIN)  # the device's receive FIFO is full; poll for POLLOUT
        return taken

    @staticmethod
    def _port_mask(model: object) -> int:
        pending, room = getattr(model, "host_pending", None), getattr(model, "host_room", None)
        mask = 0
        if pending is None or pending() > 0:
            mask |= select.POLLIN | select.POLLRDNORM
        if room is None or room() > 0:
            mask |= select.POLLOUT | select.POLLWRNORM
        return mask

    async def poll(self, inode: int, fh: int, poll_handle, ctx: pyfuse3.RequestContext) -> int:
        traced = self._trace_files.get(fh)
        if traced is not None:
            if poll_handle is not None:
                traced.poll_handle = poll_handle
            return (select.POLLIN | select.POLLRDNORM) if traced.subscriber.queue or traced.subscriber.dropped else 0
        port = self._port_files.get(fh)
        if port is None:
            return DEFAULT_POLLMASK  # a file without a poll method, as the kernel's vfio device fds
        try:
            mask = self._port_mask(port.model)
        except Exception as exc:
            raise _failure(exc, "poll", fh) from None
        if poll_handle is not None:
            port.poll_handle = poll_handle  # the latest replaces (and so releases) the previous one
        return mask

    async def read(self, fh: int, off: int, size: int) -> bytes:
        if fh >= SIDE_FH_BASE:  # sys/, ports/ and .vfiofs/ files; VFIO handles are numbered far below
            content = self._sysfs_open.get(fh)
            if content is not None:
                return content[off : off + size] if off >= 0 else b""
            traced = self._trace_files.get(fh)
            if traced is not None:
                data = traced.subscriber.take(size)
                if not data:
                    raise pyfuse3.FUSEError(errno.EAGAIN)  # poll for POLLIN
                return data
            port = self._port_files.get(fh)
            if port is not None:
                return self._port_read(fh, port, size)
        try:
            data = self.server.read(fh, off, size)
        except Exception as exc:
            raise _failure(exc, "read", fh, off) from None
        if self.trace:
            log.debug("read fh=%d off=%#x size=%d -> %d bytes", fh, off, size, len(data))
        return data

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if fh >= SIDE_FH_BASE:
            if fh in self._sysfs_open or fh in self._trace_files:
                raise pyfuse3.FUSEError(errno.EACCES)  # opened read-only; the kernel says EBADF first
            port = self._port_files.get(fh)
            if port is not None:
                return self._port_write(fh, port, buf)
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
        if fh in self._sysfs_open or fh in self._port_files:
            return None  # kernfs: noop_fsync; a port has nothing to make durable
        try:
            self.server.fsync(fh)
        except Exception as exc:
            raise _failure(exc, "fsync", fh) from None

    async def release(self, fh: int) -> None:
        if self.trace:
            log.debug("release fh=%d", fh)
        if self._sysfs_open.pop(fh, None) is not None or self._port_files.pop(fh, None) is not None:
            return None
        traced = self._trace_files.pop(fh, None)
        if traced is not None:
            self.server.trace.unsubscribe(traced.subscriber)
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
