"""The adapter's .vfiofs/status and .vfiofs/trace files, and the one table all open files share.
Handlers are called directly; nothing is mounted."""

from __future__ import annotations

import errno
import json
import os
import select

import pyfuse3
import pytest

from support import fuse_errno
from vfiofs import abi
from vfiofs.errors import VfioError
from vfiofs.fs.tree import CONTROL_INODE_BASE

CTX = pyfuse3.RequestContext()
STATUS, TRACE = CONTROL_INODE_BASE + 1, CONTROL_INODE_BASE + 2
IOMMU, VFIO0 = 2, 100
DEFAULT_POLLMASK = select.POLLIN | select.POLLOUT | select.POLLRDNORM | select.POLLWRNORM


class FakePollHandle:
    def __init__(self) -> None:
        self.notified = 0

    def notify(self) -> None:
        self.notified += 1


async def walk(ops, path: str) -> int:
    inode = pyfuse3.ROOT_INODE
    for name in path.split("/"):
        inode = (await ops.lookup(inode, name.encode(), CTX)).st_ino
    return inode


@pytest.mark.parametrize("inode", [STATUS, TRACE])
@pytest.mark.parametrize("flags", [os.O_RDWR, os.O_WRONLY, os.O_RDONLY | os.O_TRUNC])
async def test_control_files_refuse_writable_opens(ops, inode, flags):
    assert await fuse_errno(ops.open(inode, flags, CTX)) == errno.EACCES


async def test_status_is_a_snapshot_taken_at_open(ops):
    info = await ops.open(STATUS, os.O_RDONLY, CTX)
    assert info.direct_io is True and info.keep_cache is False and info.nonseekable is False
    device = await ops.open(VFIO0, os.O_RDWR, CTX)  # after the snapshot: not in it
    snapshot = json.loads(await ops.read(info.fh, 0, 1 << 20))
    assert snapshot["open_handles"] == 0
    assert [d["node"] for d in snapshot["devices"]][:2] == ["vfio/devices/vfio0", "vfio/devices/vfio1"]
    assert await ops.read(info.fh, 2, 5) == json.dumps(snapshot, indent=1).encode()[2:7]
    assert await fuse_errno(ops.write(info.fh, 0, b"x")) == errno.EACCES
    assert await ops.fsync(info.fh, False) is None
    assert await ops.poll(STATUS, info.fh, None, CTX) == DEFAULT_POLLMASK
    await ops.release(info.fh)
    again = await ops.open(STATUS, os.O_RDONLY, CTX)
    assert json.loads(await ops.read(again.fh, 0, 1 << 20))["open_handles"] == 1
    await ops.release(again.fh)
    await ops.release(device.fh)


async def test_status_failure_is_eio(ops, monkeypatch, caplog):
    def broken():
        raise RuntimeError("core bug")

    monkeypatch.setattr(ops.server, "status", broken)
    assert await fuse_errno(ops.open(STATUS, os.O_RDONLY, CTX)) == errno.EIO
    assert "internal error in open" in caplog.text


async def test_trace_streams_events_and_wakes_its_poller(ops):
    info = await ops.open(TRACE, os.O_RDONLY, CTX)
    fh = info.fh
    assert info.direct_io is True and info.nonseekable is True
    assert len(ops.server.trace.subscribers) == 1
    assert await fuse_errno(ops.read(fh, 0, 4096)) == errno.EAGAIN
    handle = FakePollHandle()
    assert await ops.poll(TRACE, fh, handle, CTX) == 0
    device = await ops.open(VFIO0, os.O_RDWR, CTX)
    assert await fuse_errno(ops.read(device.fh, 0, 4)) == errno.EINVAL  # a traced access (blocked handle)
    assert handle.notified == 1
    ops.server.trace.emit(op="more")
    assert handle.notified == 1  # a poll handle is good for one notification
    assert await ops.poll(TRACE, fh, None, CTX) == select.POLLIN | select.POLLRDNORM
    lines = (await ops.read(fh, 0, 1 << 16)).splitlines()
    events = [json.loads(line) for line in lines]
    assert [e["op"] for e in events] == ["read", "more"]
    assert events[0]["errno"] == "EINVAL" and events[0]["device"] == "vfio0"
    assert await fuse_errno(ops.write(fh, 0, b"x")) == errno.EACCES
    assert await fuse_errno(ops.fsync(fh, False)) == errno.EBADF  # as it always answered
    await ops.release(fh)
    assert ops.server.trace.subscribers == []
    await ops.release(device.fh)


async def test_one_table_for_every_kind_of_file(ops):
    """Files of every kind open side by side; each answers for itself and closes alone."""
    ctx = pyfuse3.RequestContext()
    iommu = await ops.open(IOMMU, os.O_RDWR, ctx)
    device = await ops.open(VFIO0, os.O_RDWR, ctx)
    port = await ops.open(await walk(ops, "ports/vfio3"), os.O_RDWR, ctx)
    vendor = await ops.open(await walk(ops, "sys/bus/pci/devices/0000:00:01.0/vendor"), os.O_RDONLY, ctx)
    trace = await ops.open(TRACE, os.O_RDONLY, ctx)
    fhs = [iommu.fh, device.fh, port.fh, vendor.fh, trace.fh]
    assert len(set(fhs)) == len(fhs)
    # VFIO handles keep the mailbox's numbers; the others are not mailbox handles.
    assert ops.server.handle(device.fh) is not ops.server.handle(iommu.fh)
    for fh in (port.fh, vendor.fh, trace.fh):
        with pytest.raises(VfioError):
            ops.server.handle(fh)
    await ops.release(vendor.fh)
    assert await fuse_errno(ops.read(vendor.fh, 0, 10)) == errno.EBADF
    assert await ops.poll(0, vendor.fh, None, ctx) == DEFAULT_POLLMASK  # an unknown fh, as before
    assert await fuse_errno(ops.fsync(vendor.fh, False)) == errno.EBADF
    assert await fuse_errno(ops.read(port.fh, 0, 10)) == errno.EAGAIN
    assert await fuse_errno(ops.read(device.fh, abi.VFIO_PCI_INDEX_TO_OFFSET(0), 4)) == errno.EINVAL
    for fh in fhs:
        await ops.release(fh)
    assert ops.server.status()["open_handles"] == 0
