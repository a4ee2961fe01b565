"""The mount's inode tree, fixed at mount time: nodes, their attributes, and how each file opens.

```
iommu                     the iommufd node            (VfioHandle)
vfio/vfio, vfio/<group>   the legacy container/groups (VfioHandle)
vfio/devices/vfioN        the device cdevs            (VfioHandle)
ports/vfioN               host ports of devices with one (PortFile)
.vfiofs/status, trace     for `vfiofs ls` / `vfiofs trace` (StatusFile, TraceFile)
sys/...                   the read-only sysfs view of vfiofs.pci.sysfs (AttributeFile)
```

Each file node carries an ``opener(flags, ctx)`` that returns a new open file
(:mod:`vfiofs.fs.files`); directories and symlinks have none.
"""

from __future__ import annotations

import errno
import logging
import stat
import time
from dataclasses import dataclass, field
from typing import Callable

import pyfuse3

from vfiofs.core.mailbox import Mailbox
from vfiofs.core.ports import HostPort
from vfiofs.fs.files import (AttributeFile, OpenFile, PortFile, StatusFile, TraceFile, VfioHandle,
                             refuse_writable)
from vfiofs.pci import sysfs

log = logging.getLogger(__name__)

ATTR_TIMEOUT = 300.0  # the tree never changes while mounted
GROUP_INODE_BASE = 1 << 20  # vfio/<N> group nodes
PORTS_INODE_BASE = 1 << 22  # the ports/ directory; ports/vfioN is PORTS_INODE_BASE + 1 + N
CONTROL_INODE_BASE = 1 << 23  # the .vfiofs directory and its files
SYSFS_INODE_BASE = 1 << 24  # sys/ nodes: far above the fixed inodes (100 + device index)

Opener = Callable[[int, pyfuse3.RequestContext], OpenFile]


@dataclass
class Node:
    inode: int
    name: bytes
    mode: int
    children: dict[bytes, "Node"] = field(default_factory=dict)
    opener: Opener | None = None  # files only: opener(flags, ctx) returns a new open file
    content: bytes | None = None  # sys/ files: their fixed contents
    target: bytes | None = None  # symlinks: what readlink returns
    size: int = 0  # st_size


def process_of(tid: int) -> int:
    """FUSE reports the calling thread; `vfiofs ls` wants its process (Tgid)."""
    try:
        with open(f"/proc/{tid}/status") as status:
            for line in status:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return tid


class Tree:
    """Every node by inode, and the attributes FUSE reports for them."""

    def __init__(self, server: Mailbox, uid: int, gid: int, file_mode: int = 0o600) -> None:
        self.uid, self.gid = uid, gid
        self.stamp_ns = time.time_ns()
        self.nodes: dict[int, Node] = {}
        self._build(server, file_mode)

    def _build(self, server: Mailbox, file_mode: int) -> None:
        root = self._add(pyfuse3.ROOT_INODE, b"", stat.S_IFDIR | 0o755)
        iommu = self._add(2, b"iommu", stat.S_IFREG | file_mode, _vfio_opener(server, server.open_iommu))
        vfio = self._add(3, b"vfio", stat.S_IFDIR | 0o755)
        devices = self._add(4, b"devices", stat.S_IFDIR | 0o755)
        # The legacy container is an unprivileged interface, as /dev/vfio/vfio (0666) is.
        container = self._add(5, b"vfio", stat.S_IFREG | 0o666, _vfio_opener(server, server.open_container))
        root.children = {iommu.name: iommu, vfio.name: vfio}
        vfio.children = {devices.name: devices, container.name: container}
        for number in sorted(server.groups):
            opens = lambda uid, pid=0, number=number: server.open_group(number, uid, pid)  # noqa: E731
            group = self._add(GROUP_INODE_BASE + number, str(number).encode(), stat.S_IFREG | file_mode,
                              _vfio_opener(server, opens))
            vfio.children[group.name] = group
        for device in server.devices:
            opens = lambda uid, pid=0, index=device.index: server.open_device(index, uid, pid)  # noqa: E731
            node = self._add(100 + device.index, f"vfio{device.index}".encode(), stat.S_IFREG | file_mode,
                             _vfio_opener(server, opens))
            devices.children[node.name] = node
        # .vfiofs/status (a snapshot for `vfiofs ls`) and .vfiofs/trace (the event stream)
        control = self._add(CONTROL_INODE_BASE, b".vfiofs", stat.S_IFDIR | 0o755)
        root.children[control.name] = control
        status = self._add(CONTROL_INODE_BASE + 1, b"status", stat.S_IFREG | (file_mode & 0o444),
                           lambda flags, ctx: _read_only(flags, StatusFile, server))
        trace = self._add(CONTROL_INODE_BASE + 2, b"trace", stat.S_IFREG | (file_mode & 0o444),
                          lambda flags, ctx: _read_only(flags, TraceFile, server.trace))
        control.children = {status.name: status, trace.name: trace}
        self._add_ports(root, server.devices, file_mode)
        try:
            self._add_sysfs(root, sysfs.build_tree((d.index, d.driver.spec) for d in server.devices))
        except Exception:  # the device nodes matter more than the sysfs view of them
            log.exception("cannot build the sys/ tree; mounting without it")
            root.children.pop(b"sys", None)
            self.nodes = {inode: node for inode, node in self.nodes.items() if inode < SYSFS_INODE_BASE}

    def _add_ports(self, root: Node, devices: list, file_mode: int) -> None:
        """``ports/vfioN`` for every device whose model has a host side."""
        ports = None
        for device in devices:
            model = device.driver.host_port()
            if model is None:
                continue
            if ports is None:
                ports = self._add(PORTS_INODE_BASE, b"ports", stat.S_IFDIR | 0o755)
                root.children[ports.name] = ports
            port = HostPort(model)
            node = self._add(PORTS_INODE_BASE + 1 + device.index, f"vfio{device.index}".encode(),
                             stat.S_IFREG | file_mode, lambda flags, ctx, port=port: PortFile(port))
            ports.children[node.name] = node

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
                content = entry.content
                node = self._add(inode, name.encode(), stat.S_IFREG | 0o444,
                                 lambda flags, ctx, content=content: _read_only(flags, AttributeFile, content))
                node.content, node.size = content, entry.size
            dirs[parent_path].children[node.name] = node

    def _add(self, inode: int, name: bytes, mode: int, opener: Opener | None = None) -> Node:
        node = Node(inode, name, mode, opener=opener)
        self.nodes[inode] = node
        return node

    def node(self, inode: int) -> Node:
        node = self.nodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = node.inode
        attrs.st_mode = node.mode
        if stat.S_ISDIR(node.mode):
            attrs.st_nlink = 2 + sum(1 for c in node.children.values() if stat.S_ISDIR(c.mode))
        else:
            attrs.st_nlink = 1
        attrs.st_uid, attrs.st_gid = self.uid, self.gid
        attrs.st_size = node.size
        attrs.st_blksize = 4096
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = self.stamp_ns
        attrs.entry_timeout = attrs.attr_timeout = ATTR_TIMEOUT
        attrs.generation = 0
        return attrs


def _vfio_opener(server: Mailbox, opens: Callable[..., int]) -> Opener:
    """A VFIO node's opener: a new mailbox handle for the caller (its uid and process)."""
    def opener(flags: int, ctx: pyfuse3.RequestContext) -> VfioHandle:
        return VfioHandle(server, opens(ctx.uid, process_of(ctx.pid)))
    return opener


def _read_only(flags: int, kind: Callable[..., OpenFile], *args: object) -> OpenFile:
    refuse_writable(flags)
    return kind(*args)
