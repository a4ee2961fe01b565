"""Unit tests of the pyfuse3 adapter (vfiofs.fs.operations), calling handlers directly.

Nothing is mounted: the handlers are coroutines over a real Mailbox built from the
bundled definitions. Besides the tree and attributes, these tests pin the daemon-safety
rule: whatever goes wrong below a handler, FUSE gets a FUSEError with an errno in 1..511.
"""

from __future__ import annotations

import errno
import logging
import stat
from types import SimpleNamespace

import pyfuse3
import pytest

from support import fuse_errno
from vfiofs import abi
from vfiofs.abi import protocol
from vfiofs.abi import VFIO_PCI_INDEX_TO_OFFSET, vfio_device_bind_iommufd
from vfiofs.host.daemon import build_server
from vfiofs.host.definitions import bundled_directory, load_directory
from vfiofs.errors import ERRNO_MAX, ERRNO_MIN, VfioError
from vfiofs.fs.operations import VfioOperations
from vfiofs.abi.protocol import ARG_BUFFER, FD_HANDLE, OP_IOCTL, FdRef, Request
from vfiofs.core.handles import DeviceFile, HandleState, IommuFile

UID, GID = 4321, 8765
ROOT, IOMMU, VFIO, DEVICES, VFIO0, VFIO1 = pyfuse3.ROOT_INODE, 2, 3, 4, 100, 101
DIR_MODE = stat.S_IFDIR | 0o755
FILE_MODE = stat.S_IFREG | 0o600
BAR0 = VFIO_PCI_INDEX_TO_OFFSET(abi.VFIO_PCI_BAR0_REGION_INDEX)
CTX = pyfuse3.RequestContext()


@pytest.fixture
def server():
    return build_server(load_directory(bundled_directory()))


@pytest.fixture
def ops(server):
    return VfioOperations(server, UID, GID)


def bind_message(token: bytes, iommufd: int = 5) -> bytes:
    return protocol.encode_request(
        Request(
            op=OP_IOCTL,
            request=abi.VFIO_DEVICE_BIND_IOMMUFD,
            arg_kind=ARG_BUFFER,
            payload=bytes(vfio_device_bind_iommufd(argsz=24, iommufd=iommufd)),
            fds={iommufd: FdRef(FD_HANDLE, token)},
        )
    )


def bind(server, device_fh: int, iommu_fh: int) -> None:
    """VFIO_DEVICE_BIND_IOMMUFD through the sans-I/O server, as a client would send it."""
    message = bind_message(server.token(iommu_fh))
    assert server.write(device_fh, protocol.control_offset(1), message) == len(message)
    reply = protocol.decode_reply(server.read(device_fh, protocol.control_offset(1), 4096))
    assert reply.result == 0
    assert server.handle(device_fh).state is HandleState.BOUND


async def open_bound(ops, server, inode: int = VFIO0) -> int:
    device_fh = (await ops.open(inode, 0, CTX)).fh
    iommu_fh = (await ops.open(IOMMU, 0, CTX)).fh
    bind(server, device_fh, iommu_fh)
    return device_fh


class Fields(SimpleNamespace):
    """Stand-in for pyfuse3.SetattrFields, whose attributes are read-only from Python."""

    def __init__(self, **changed: bool) -> None:
        flags = dict(update_mode=False, update_uid=False, update_gid=False, update_size=False,
                     update_atime=False, update_mtime=False, update_ctime=False)
        flags.update(changed)
        super().__init__(**flags)


# --- the tree -----------------------------------------------------------------------------------


async def test_root_attributes(ops):
    attrs = await ops.getattr(ROOT, CTX)
    assert attrs.st_ino == ROOT
    assert attrs.st_mode == DIR_MODE
    assert (attrs.st_uid, attrs.st_gid) == (UID, GID)
    assert attrs.st_nlink == 6  # ".", the entry in the parent, vfio/.., ports/.., sys/.. and .vfiofs/..
    assert set(ops.nodes[ROOT].children) == {b"iommu", b"vfio", b"ports", b"sys", b".vfiofs"}


@pytest.mark.parametrize(
    ("parent", "name", "inode", "mode", "nlink"),
    [
        (ROOT, b"iommu", IOMMU, FILE_MODE, 1),
        (ROOT, b"vfio", VFIO, DIR_MODE, 3),  # vfio/devices/.. links to it
        (VFIO, b"devices", DEVICES, DIR_MODE, 2),
        (DEVICES, b"vfio0", VFIO0, FILE_MODE, 1),
        (DEVICES, b"vfio1", VFIO1, FILE_MODE, 1),
    ],
)
async def test_lookup(ops, parent, name, inode, mode, nlink):
    attrs = await ops.lookup(parent, name, CTX)
    assert attrs.st_ino == inode
    assert attrs.st_mode == mode
    assert (attrs.st_uid, attrs.st_gid) == (UID, GID)
    assert attrs.st_nlink == nlink
    assert attrs.st_size == 0
    got = await ops.getattr(inode, CTX)
    assert (got.st_ino, got.st_mode, got.st_uid, got.st_gid) == (inode, mode, UID, GID)


async def test_directory_children(ops, server):
    groups = {str(number).encode() for number in server.groups}  # one legacy group node each
    assert set(ops.nodes[VFIO].children) == {b"devices", b"vfio"} | groups
    assert set(ops.nodes[DEVICES].children) == {b"vfio0", b"vfio1", b"vfio2", b"vfio3", b"vfio4", b"vfio5"}


async def test_lookup_dot_is_the_directory_itself(ops):
    assert (await ops.lookup(DEVICES, b".", CTX)).st_ino == DEVICES


@pytest.mark.parametrize(
    ("parent", "name"),
    [(ROOT, b"missing"), (ROOT, b"devices"), (DEVICES, b"vfio9"), (VFIO, b"vfio0"), (999, b"iommu"), (IOMMU, b"x")],
)
async def test_lookup_missing_is_enoent(ops, parent, name):
    assert await fuse_errno(ops.lookup(parent, name, CTX)) == errno.ENOENT


async def test_getattr_unknown_inode_is_enoent(ops):
    assert await fuse_errno(ops.getattr(999, CTX)) == errno.ENOENT


async def test_file_mode_is_configurable(server):
    ops = VfioOperations(server, 0, 0, file_mode=0o660)
    assert (await ops.getattr(VFIO1, CTX)).st_mode == stat.S_IFREG | 0o660
    assert (await ops.getattr(IOMMU, CTX)).st_mode == stat.S_IFREG | 0o660
    assert (await ops.getattr(DEVICES, CTX)).st_mode == DIR_MODE


async def test_opendir(ops):
    assert await ops.opendir(ROOT, CTX) == ROOT
    assert await ops.opendir(DEVICES, CTX) == DEVICES
    assert await fuse_errno(ops.opendir(VFIO0, CTX)) == errno.ENOTDIR
    assert await fuse_errno(ops.opendir(999, CTX)) == errno.ENOENT


async def test_statfs(ops):
    data = await ops.statfs(CTX)
    assert (data.f_bsize, data.f_frsize, data.f_namemax) == (4096, 4096, 255)
    assert data.f_files == len(ops.nodes) >= 7  # root, iommu, vfio, devices, vfio0-2


# --- setattr -----------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["update_mode", "update_uid", "update_gid"])
async def test_setattr_ownership_or_mode_is_eperm(ops, flag):
    attr = pyfuse3.EntryAttributes()
    assert await fuse_errno(ops.setattr(VFIO0, attr, Fields(**{flag: True}), None, CTX)) == errno.EPERM
    assert (await ops.getattr(VFIO0, CTX)).st_mode == FILE_MODE  # unchanged


async def test_setattr_truncating_a_directory_is_eisdir(ops):
    assert await fuse_errno(ops.setattr(DEVICES, pyfuse3.EntryAttributes(), Fields(update_size=True), None, CTX)) == errno.EISDIR


async def test_setattr_size_and_times_on_a_file_are_ignored(ops):
    attr = pyfuse3.EntryAttributes()
    attr.st_size = 12345
    attrs = await ops.setattr(VFIO0, attr, Fields(update_size=True, update_mtime=True), None, CTX)
    assert (attrs.st_ino, attrs.st_mode, attrs.st_size) == (VFIO0, FILE_MODE, 0)


async def test_setattr_unknown_inode_is_enoent(ops):
    assert await fuse_errno(ops.setattr(999, pyfuse3.EntryAttributes(), Fields(), None, CTX)) == errno.ENOENT


# --- handles ------------------------------------------------------------------------------------


async def test_open_device(ops, server):
    info = await ops.open(VFIO1, 0, CTX)
    assert isinstance(info, pyfuse3.FileInfo)
    assert info.direct_io is True
    assert info.keep_cache is False
    handle = server.handle(info.fh)
    assert isinstance(handle, DeviceFile)
    assert handle.device is server.devices[1]
    assert handle.state is HandleState.BLOCKED


async def test_open_iommu_gives_distinct_handles(ops, server):
    first, second = await ops.open(IOMMU, 0, CTX), await ops.open(IOMMU, 0, CTX)
    assert first.fh != second.fh
    assert first.direct_io is True and second.direct_io is True
    assert isinstance(server.handle(first.fh), IommuFile)


@pytest.mark.parametrize("inode", [ROOT, VFIO, DEVICES])
async def test_open_directory_is_eisdir(ops, inode):
    assert await fuse_errno(ops.open(inode, 0, CTX)) == errno.EISDIR


async def test_open_unknown_inode_is_enoent(ops):
    assert await fuse_errno(ops.open(999, 0, CTX)) == errno.ENOENT


async def test_read_and_write_on_blocked_handle_are_einval(ops):
    """A fresh device handle is BLOCKED until it binds, as in the kernel."""
    fh = (await ops.open(VFIO0, 0, CTX)).fh
    assert await fuse_errno(ops.read(fh, BAR0, 4)) == errno.EINVAL
    assert await fuse_errno(ops.read(fh, 0, 4)) == errno.EINVAL
    assert await fuse_errno(ops.write(fh, BAR0, b"\x01\x02\x03\x04")) == errno.EINVAL


async def test_read_and_write_on_iommu_are_einval(ops):
    fh = (await ops.open(IOMMU, 0, CTX)).fh
    assert await fuse_errno(ops.read(fh, 0, 8)) == errno.EINVAL
    assert await fuse_errno(ops.write(fh, 0, b"x")) == errno.EINVAL


@pytest.mark.parametrize("garbage", [b"", b"hello", bytes(48), b"\xff" * 100])
async def test_control_write_of_garbage_is_ebadmsg(ops, garbage):
    fh = (await ops.open(VFIO0, 0, CTX)).fh
    assert await fuse_errno(ops.write(fh, protocol.control_offset(7), garbage)) == errno.EBADMSG


async def test_control_write_off_a_slot_boundary_is_einval(ops):
    fh = (await ops.open(VFIO0, 0, CTX)).fh
    assert await fuse_errno(ops.write(fh, protocol.control_offset(7) + 8, bind_message(bytes(16)))) == errno.EINVAL


async def test_control_read_without_a_reply_is_enomsg(ops):
    fh = (await ops.open(VFIO0, 0, CTX)).fh
    assert await fuse_errno(ops.read(fh, protocol.control_offset(3), 4096)) == errno.ENOMSG


async def test_mailbox_round_trip_through_the_adapter(ops, server):
    """Bind via ops.write/ops.read, then use BAR0: the whole data path through the handlers."""
    device_fh = (await ops.open(VFIO0, 0, CTX)).fh
    iommu_fh = (await ops.open(IOMMU, 0, CTX)).fh
    slot = protocol.control_offset(42)
    message = bind_message(server.token(iommu_fh))
    assert await ops.write(device_fh, slot, message) == len(message)
    reply = protocol.decode_reply(await ops.read(device_fh, slot, 4096))
    assert (reply.op, reply.request, reply.result) == (OP_IOCTL, abi.VFIO_DEVICE_BIND_IOMMUFD, 0)
    bound = vfio_device_bind_iommufd.from_buffer_copy(reply.payload)
    assert bound.out_devid == server.handle(device_fh).devobj.id
    assert await ops.read(device_fh, BAR0, 4) == bytes(4)
    assert await ops.write(device_fh, BAR0 + 8, b"\xde\xad\xbe\xef") == 4
    assert await ops.read(device_fh, BAR0 + 8, 4) == b"\xde\xad\xbe\xef"


async def test_bind_with_unknown_token_is_ebadfd(ops):
    """A token the server never issued resolves to a foreign fd."""
    fh = (await ops.open(VFIO0, 0, CTX)).fh
    assert await fuse_errno(ops.write(fh, protocol.control_offset(0), bind_message(bytes(16)))) == errno.EBADFD


async def test_release_closes_the_handle(ops, server):
    fh = await open_bound(ops, server)
    assert await ops.release(fh) is None
    assert await fuse_errno(ops.read(fh, BAR0, 4)) == errno.EBADF
    assert server.devices[0].bound_file is None
    assert await ops.release(fh) is None  # a second release of the same fh is harmless


async def test_unknown_fh_is_ebadf(ops):
    assert await fuse_errno(ops.read(12345, 0, 4)) == errno.EBADF
    assert await fuse_errno(ops.write(12345, 0, b"x")) == errno.EBADF


# --- daemon safety: nothing but FUSEError(1..511) leaves a handler ------------------------------


async def test_model_bug_in_read_is_eio(ops, server, monkeypatch, caplog):
    fh = await open_bound(ops, server)

    def broken(index, offset, size):
        raise RuntimeError("model bug")

    monkeypatch.setattr(server.devices[0].driver.model, "bar_read", broken)
    with caplog.at_level(logging.ERROR):
        assert await fuse_errno(ops.read(fh, BAR0, 4)) == errno.EIO
    assert "device model failed in bar_read" in caplog.text
    # The handle survives: config space still reads.
    assert len(await ops.read(fh, VFIO_PCI_INDEX_TO_OFFSET(abi.VFIO_PCI_CONFIG_REGION_INDEX), 4)) == 4


async def test_server_bug_in_read_and_write_is_eio(ops, server, monkeypatch, caplog):
    """An exception the core did not anticipate is logged and becomes EIO, not a crash."""
    fh = (await ops.open(VFIO0, 0, CTX)).fh

    def broken(*args):
        raise KeyError("core bug")

    monkeypatch.setattr(server, "read", broken)
    monkeypatch.setattr(server, "write", broken)
    monkeypatch.setattr(server, "fsync", broken)
    with caplog.at_level(logging.ERROR, logger="vfiofs.fs.operations"):
        assert await fuse_errno(ops.read(fh, 0, 4)) == errno.EIO
        assert await fuse_errno(ops.write(fh, 0, b"x")) == errno.EIO
        assert await fuse_errno(ops.fsync(fh, False)) == errno.EIO
    assert [r.getMessage() for r in caplog.records if r.name == "vfiofs.fs.operations"] == [
        "internal error in read",
        "internal error in write",
        "internal error in fsync",
    ]


async def test_fuse_error_from_an_open_file_is_the_reply_unlogged(ops, server, monkeypatch, caplog):
    """A FUSEError an open file raises is answered as it is: its errno, no internal-error log."""
    fh = (await ops.open(VFIO0, 0, CTX)).fh

    def busy(*args):
        raise pyfuse3.FUSEError(errno.EAGAIN)

    for name in ("read", "write", "fsync"):
        monkeypatch.setattr(server, name, busy)
    with caplog.at_level(logging.DEBUG, logger="vfiofs.fs.operations"):
        assert await fuse_errno(ops.read(fh, 0, 4)) == errno.EAGAIN
        assert await fuse_errno(ops.write(fh, 0, b"x")) == errno.EAGAIN
        assert await fuse_errno(ops.fsync(fh, False)) == errno.EAGAIN
    assert not [r for r in caplog.records if r.name == "vfiofs.fs.operations" and r.levelno >= logging.ERROR]


async def test_server_bug_in_open_is_eio(ops, server, monkeypatch):
    def broken(index):
        raise RuntimeError("core bug")

    monkeypatch.setattr(server, "open_device", broken)
    assert await fuse_errno(ops.open(VFIO0, 0, CTX)) == errno.EIO


async def test_release_never_fails(ops, server, monkeypatch, caplog):
    fh = (await ops.open(VFIO0, 0, CTX)).fh

    def broken(fh):
        raise RuntimeError("core bug")

    monkeypatch.setattr(server, "release", broken)
    with caplog.at_level(logging.ERROR, logger="vfiofs.fs.operations"):
        assert await ops.release(fh) is None
    assert "internal error in release" in caplog.text


async def test_errno_out_of_range_from_a_model_is_clamped(ops, server, monkeypatch):
    """VfioError(1000) would leave the FUSE caller hanging; it is reported as EIO."""
    fh = await open_bound(ops, server)

    def refuses(index, offset, data):
        raise VfioError(1000, "model says no")

    monkeypatch.setattr(server.devices[0].driver.model, "bar_write", refuses)
    seen = await fuse_errno(ops.write(fh, BAR0, b"\x01"))
    assert ERRNO_MIN <= seen <= ERRNO_MAX
    assert seen == errno.EIO


async def test_model_refusing_open_fails_the_bind_cleanly(ops, server, monkeypatch):
    """A model's open hook with a bad errno: the bind fails with EIO and the handle stays BLOCKED."""
    device_fh = (await ops.open(VFIO0, 0, CTX)).fh
    iommu_fh = (await ops.open(IOMMU, 0, CTX)).fh

    def refuses():
        raise VfioError(-5, "negative errno")

    monkeypatch.setattr(server.devices[0].driver.model, "open", refuses)
    message = bind_message(server.token(iommu_fh))
    assert await fuse_errno(ops.write(device_fh, protocol.control_offset(0), message)) == errno.EIO
    assert server.handle(device_fh).state is HandleState.BLOCKED
    assert server.devices[0].bound_file is None
    assert await fuse_errno(ops.read(device_fh, BAR0, 4)) == errno.EINVAL
