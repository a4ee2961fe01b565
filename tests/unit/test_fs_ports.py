"""The adapter's ports/vfioN files (vfiofs.fs) over the bundled UART, and poll of other files.
Handlers are called directly; nothing is mounted."""

from __future__ import annotations

import errno
import os
import select

import pyfuse3
import pytest

from support import fuse_errno
from vfiofs.errors import VfioError
from vfiofs.fs.tree import PORTS_INODE_BASE

RBR = THR = 0
UART = 3  # devices/uart.toml sorts after showcase.toml: vfio3

class FakePollHandle:
    def __init__(self, fail: bool = False) -> None:
        self.notified, self.fail = 0, fail

    def notify(self) -> None:
        self.notified += 1
        if self.fail:
            raise OSError(errno.ENOENT, "poller gone")


async def test_adapter_port_handlers(ops):
    ctx = pyfuse3.RequestContext()
    assert set(ops.nodes[PORTS_INODE_BASE].children) == {b"vfio3"}
    inode = (await ops.lookup(PORTS_INODE_BASE, b"vfio3", ctx)).st_ino
    assert inode == PORTS_INODE_BASE + 1 + UART
    info = await ops.open(inode, os.O_RDWR, ctx)
    fh = info.fh
    assert info.direct_io and info.nonseekable
    with pytest.raises(VfioError):
        ops.server.handle(fh)  # not a mailbox handle
    model = ops.server.devices[UART].driver.model
    assert await fuse_errno(ops.read(fh, 0, 10)) == errno.EAGAIN
    handle = FakePollHandle()
    assert await ops.poll(inode, fh, handle, ctx) == select.POLLOUT | select.POLLWRNORM
    model.bar_write(0, THR, b"h")
    assert handle.notified == 1
    model.bar_write(0, THR, b"i")
    model.bar_write(0, THR, b"!")  # a handle is good for one notification
    assert handle.notified == 1
    assert await ops.poll(inode, fh, None, ctx) == (select.POLLIN | select.POLLRDNORM
                                                     | select.POLLOUT | select.POLLWRNORM)
    assert await ops.read(fh, 12345, 2) == b"hi"  # the offset means nothing
    assert await ops.read(fh, 0, 10) == b"!"
    assert await ops.write(fh, 0, bytes(20)) == 16
    assert await fuse_errno(ops.write(fh, 0, b"x")) == errno.EAGAIN
    failing = FakePollHandle(fail=True)
    assert await ops.poll(inode, fh, failing, ctx) == 0
    model.bar_read(0, RBR, 1)  # room again: pollers are woken, and a failing notify is contained
    assert failing.notified == 1
    await ops.fsync(fh, False)
    await ops.release(fh)
    assert await fuse_errno(ops.read(fh, 0, 1)) == errno.EBADF  # a released fh is unknown


async def test_adapter_port_contains_model_bugs(ops, caplog):
    ctx = pyfuse3.RequestContext()
    inode = PORTS_INODE_BASE + 1 + UART
    fh = (await ops.open(inode, os.O_RDWR, ctx)).fh
    model = ops.server.devices[UART].driver.model

    def broken(*args):
        raise RuntimeError("model bug")

    model.host_read = broken
    model.host_write = lambda data: len(data) + 1  # more than it was given
    model.host_pending = broken
    assert await fuse_errno(ops.read(fh, 0, 10)) == errno.EIO
    assert await fuse_errno(ops.write(fh, 0, b"abc")) == errno.EIO
    assert await fuse_errno(ops.poll(inode, fh, None, ctx)) == errno.EIO
    model.host_read = lambda size: b"x" * (size + 1)
    assert await fuse_errno(ops.read(fh, 0, 4)) == errno.EIO
    model.host_read = lambda size: 3  # not bytes (bytes(3) would be three zero bytes)
    assert await fuse_errno(ops.read(fh, 0, 4)) == errno.EIO
    assert "internal error in port read" in caplog.text


async def test_adapter_poll_of_other_files_is_the_default_mask(ops):
    ctx = pyfuse3.RequestContext()
    fh = (await ops.open(100, os.O_RDWR, ctx)).fh  # vfio0
    mask = select.POLLIN | select.POLLOUT | select.POLLRDNORM | select.POLLWRNORM
    assert await ops.poll(100, fh, FakePollHandle(), ctx) == mask
    await ops.release(fh)
