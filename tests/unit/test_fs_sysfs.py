"""The adapter's sys/ tree (vfiofs.fs): attributes, symlinks, read-only attribute files, and the
fallback when vfiofs.pci.sysfs fails. Handlers are called directly; nothing is mounted."""

from __future__ import annotations

import errno
import os
import stat

import pyfuse3
import pytest

from support import fuse_errno
from vfiofs.errors import VfioError
from vfiofs.fs.operations import VfioOperations
from vfiofs.host.daemon import build_server
from vfiofs.host.definitions import bundled_directory, load_directory
from vfiofs.pci import sysfs

BDFS = ["0000:00:01.0", "0000:00:02.0", "0000:00:03.0", "0000:00:04.0", "0000:00:05.0",
        "0000:00:06.0"]
PCI = "sys/bus/pci/devices"
CTX = pyfuse3.RequestContext()


@pytest.fixture
def ops():
    return VfioOperations(build_server(load_directory(bundled_directory())), 4321, 8765)


async def walk(ops, path: str) -> int:
    inode = pyfuse3.ROOT_INODE
    for name in path.split("/"):
        inode = (await ops.lookup(inode, name.encode(), CTX)).st_ino
    return inode


async def test_adapter_attributes(ops):
    config = await walk(ops, f"{PCI}/0000:00:03.0/config")
    attrs = await ops.getattr(config, CTX)
    assert (attrs.st_mode, attrs.st_size, attrs.st_uid, attrs.st_gid) == (stat.S_IFREG | 0o444, 4096, 4321, 8765)
    vendor = await ops.getattr(await walk(ops, f"{PCI}/0000:00:01.0/vendor"), CTX)
    assert (vendor.st_mode, vendor.st_size) == (stat.S_IFREG | 0o444, 4096)
    assert (await ops.getattr(await walk(ops, f"{PCI}/0000:00:01.0/config"), CTX)).st_size == 256
    link = await ops.getattr(await walk(ops, f"{PCI}/0000:00:01.0/iommu_group"), CTX)
    assert stat.S_ISLNK(link.st_mode) and link.st_size == len("../../../../kernel/iommu_groups/0")
    assert stat.S_ISDIR((await ops.getattr(await walk(ops, "sys"), CTX)).st_mode)


async def test_adapter_readlink(ops):
    inode = await walk(ops, f"{PCI}/0000:00:02.0/driver")
    assert await ops.readlink(inode, CTX) == b"../../../../bus/pci/drivers/vfio-pci"
    assert await fuse_errno(ops.readlink(await walk(ops, "sys"), CTX)) == errno.EINVAL
    assert await fuse_errno(ops.readlink(2, CTX)) == errno.EINVAL  # the iommu node
    assert await fuse_errno(ops.readlink(987654321, CTX)) == errno.ENOENT


async def test_adapter_reads_slices_and_never_touches_the_server(ops, monkeypatch):
    def no_server(*args):
        raise AssertionError("sys/ files must not reach the mailbox")

    for name in ("read", "write", "release", "fsync", "open_device", "open_iommu"):
        monkeypatch.setattr(ops.server, name, no_server)
    inode = await walk(ops, f"{PCI}/0000:00:01.0/resource")
    info = await ops.open(inode, os.O_RDONLY, CTX)
    assert info.direct_io is True and info.keep_cache is False
    with pytest.raises(VfioError):
        ops.server.handle(info.fh)  # not a mailbox handle
    content = ops.nodes[inode].content
    assert await ops.read(info.fh, 0, 4096) == content
    assert await ops.read(info.fh, 2, 4) == content[2:6]
    assert await ops.read(info.fh, len(content), 10) == b""
    assert await fuse_errno(ops.write(info.fh, 0, b"x")) == errno.EACCES
    assert await ops.fsync(info.fh, False) is None
    await ops.release(info.fh)
    other = await ops.open(inode, os.O_RDONLY, CTX)
    assert other.fh != info.fh
    await ops.release(other.fh)


@pytest.mark.parametrize("flags", [os.O_RDWR, os.O_WRONLY, os.O_RDONLY | os.O_TRUNC])
async def test_adapter_refuses_writable_opens(ops, flags):
    inode = await walk(ops, f"{PCI}/0000:00:03.0/config")
    assert await fuse_errno(ops.open(inode, flags, CTX)) == errno.EACCES


async def test_adapter_opendir_on_sys_dirs(ops):
    inode = await walk(ops, PCI)
    assert await ops.opendir(inode, CTX) == inode
    assert set(ops.nodes[inode].children) == {b.encode() for b in BDFS}
    assert await fuse_errno(ops.open(inode, os.O_RDONLY, CTX)) == errno.EISDIR


def test_adapter_survives_a_sysfs_bug(monkeypatch, caplog):
    def broken(devices):
        raise RuntimeError("sysfs bug")

    monkeypatch.setattr(sysfs, "build_tree", broken)
    ops = VfioOperations(build_server(load_directory(bundled_directory())), 0, 0)
    assert set(ops.nodes[pyfuse3.ROOT_INODE].children) == {b"iommu", b"vfio", b"ports", b".vfiofs"}
    assert "cannot build the sys/ tree" in caplog.text
