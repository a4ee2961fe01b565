"""Unit tests of the handle state machine and iommufd objects, driven through the sans-I/O server.

No FUSE here: requests are encoded with the real codec and fed to Mailbox.write/read,
exactly as the adapter does, so every rule is checked in microseconds.
"""

from __future__ import annotations

import ctypes
import errno
import struct

import pytest

from vfiofs import abi
from vfiofs.abi import protocol
from vfiofs.errors import VfioError
from vfiofs.core.ioctl import IoctlArg
from vfiofs.core.usermem import UserBuffer
from vfiofs.iommu.iommufd import IommufdContext
from vfiofs.iommu.type1 import Type1Container
from vfiofs.host.memory import bar_memory
from vfiofs.models.api import DeviceModel, ModelContext
from vfiofs.models.spec import BarSpec, DeviceSpec, PciIdentity
from vfiofs.abi.protocol import ARG_BUFFER, ARG_NULL, ARG_VALUE, FD_FOREIGN, FD_HANDLE, FdRef, Request
from vfiofs.core.mailbox import Mailbox
from vfiofs.core.grants import Tickets
from vfiofs.core.handles import TRANSITIONS, Device, DeviceFile, Event, Group, GroupGrant, HandleState
from vfiofs.pci.vfio_pci import VfioPciDevice

ID = PciIdentity(vendor=0x1234, device=0x5241)
SLOT = protocol.control_offset(7)


RAM_SPEC = DeviceSpec(name="spy", model="generic", identity=ID, bars=(BarSpec(index=0, size=4096, mmap=True),))


class SpyModel(DeviceModel):
    """A RAM device that records its hooks and can be told to fail them."""

    def __init__(self) -> None:
        super().__init__(RAM_SPEC, ModelContext(bar_memory(RAM_SPEC)))  # memfd BARs, as the daemon's: mmap works
        self.calls: list[str] = []
        self.fail_open: BaseException | None = None
        self.fail_close: BaseException | None = None

    def open(self) -> None:
        self.calls.append("open")
        if self.fail_open:
            raise self.fail_open

    def close(self) -> None:
        self.calls.append("close")
        if self.fail_close:
            raise self.fail_close

    def reset(self) -> None:
        self.calls.append("reset")
        super().reset()


def make_mailbox(devices) -> Mailbox:
    return Mailbox(devices, iommufd=IommufdContext, container=Type1Container)


class World:
    """A server with two spy devices and helpers that speak the wire protocol."""

    def __init__(self) -> None:
        self.models = [SpyModel(), SpyModel()]
        self.server = make_mailbox([Device(i, f"dev{i}", VfioPciDevice(m)) for i, m in enumerate(self.models)])

    def token(self, fh: int) -> bytes:
        return self.server.token(fh)

    def call(self, fh: int, request: int, arg=None, fds=None) -> tuple[int, bytes]:
        if arg is None:
            req = Request(protocol.OP_IOCTL, request, ARG_NULL)
        elif isinstance(arg, int):
            req = Request(protocol.OP_IOCTL, request, ARG_VALUE, arg_value=arg)
        else:
            req = Request(protocol.OP_IOCTL, request, ARG_BUFFER, payload=bytes(arg), fds=fds or {})
        message = protocol.encode_request(req)
        assert self.server.write(fh, SLOT, message) == len(message)
        reply = protocol.decode_reply(self.server.read(fh, SLOT, 1 << 16))
        if isinstance(arg, ctypes.Structure):  # copy back, as the client library does
            ctypes.memmove(ctypes.addressof(arg), reply.payload, len(reply.payload))
        return reply.result, reply.payload

    def fails(self, fh: int, request: int, arg=None, fds=None) -> int:
        with pytest.raises(VfioError) as exc:
            self.call(fh, request, arg, fds)
        return exc.value.errno

    def bind_struct(self, iommufd: int = 3, argsz: int = 24, **kw) -> abi.vfio_device_bind_iommufd:
        return abi.vfio_device_bind_iommufd(argsz=argsz, iommufd=iommufd, **kw)

    def bind(self, fh: int, iommu_fh: int) -> int:
        bind = self.bind_struct()
        assert self.call(fh, abi.VFIO_DEVICE_BIND_IOMMUFD, bind, {3: FdRef(FD_HANDLE, self.token(iommu_fh))})[0] == 0
        return bind.out_devid

    def ioas_alloc(self, iommu_fh: int) -> int:
        cmd = abi.iommu_ioas_alloc(size=12)
        self.call(iommu_fh, abi.IOMMU_IOAS_ALLOC, cmd)
        return cmd.out_ioas_id


@pytest.fixture
def w() -> World:
    return World()


def state(w: World, fh: int) -> HandleState:
    handle = w.server.handle(fh)
    assert isinstance(handle, DeviceFile)
    return handle.state


def test_every_open_is_an_independent_blocked_handle(w):
    fhs = [w.server.open_device(0) for _ in range(50)]
    assert len(set(fhs)) == 50
    assert all(state(w, fh) is HandleState.BLOCKED for fh in fhs)
    assert len({w.token(fh) for fh in fhs}) == 50  # tokens are per handle


@pytest.mark.parametrize(
    "request_",
    [abi.VFIO_DEVICE_GET_INFO, abi.VFIO_DEVICE_GET_REGION_INFO, abi.VFIO_DEVICE_RESET, abi.VFIO_DEVICE_FEATURE,
     abi.VFIO_DEVICE_ATTACH_IOMMUFD_PT, abi.VFIO_DEVICE_DETACH_IOMMUFD_PT, abi.VFIO_GET_API_VERSION,
     abi.VFIO_DEVICE_SET_IRQS, 0x3BFF, 0xDEADBEEF],
)
def test_blocked_handle_refuses_everything_but_bind(w, request_):
    fh = w.server.open_device(0)
    assert w.fails(fh, request_, bytearray(64)) == errno.EINVAL
    assert w.fails(fh, request_) == errno.EINVAL


def test_blocked_region_access_is_einval(w):
    fh = w.server.open_device(0)
    for offset in (0, 7 << 40, 100 << 40):
        with pytest.raises(VfioError) as exc:
            w.server.read(fh, offset, 4)
        assert exc.value.errno == errno.EINVAL
        with pytest.raises(VfioError) as exc:
            w.server.write(fh, offset, b"abcd")
        assert exc.value.errno == errno.EINVAL
    assert w.models[0].bar_read(0, 0, 4) == bytes(4)


def test_bind_check_order(w):
    dev, iommu = w.server.open_device(0), w.server.open_iommu()
    good = {3: FdRef(FD_HANDLE, w.token(iommu))}
    bind = abi.VFIO_DEVICE_BIND_IOMMUFD
    assert w.fails(dev, bind, None) == errno.EFAULT  # get_user(argsz) on NULL
    assert w.fails(dev, bind, bytes(2)) == errno.EFAULT
    assert w.fails(dev, bind, w.bind_struct(argsz=15), good) == errno.EINVAL
    # argsz beyond the buffer: copy_struct_from_user faults
    assert w.fails(dev, bind, w.bind_struct(argsz=40), good) == errno.EFAULT
    # a larger struct with a non-zero tail is E2BIG; with a zero tail it is accepted later
    assert w.fails(dev, bind, bytes(w.bind_struct(argsz=32)) + b"\0" * 7 + b"\1", good) == errno.E2BIG
    assert w.fails(dev, bind, w.bind_struct(flags=2), good) == errno.EINVAL
    assert w.fails(dev, bind, w.bind_struct(iommufd=-1), good) == errno.EINVAL
    assert w.fails(dev, bind, w.bind_struct(flags=abi.VFIO_DEVICE_BIND_FLAG_TOKEN), good) == errno.EINVAL
    assert w.fails(dev, bind, w.bind_struct(iommufd=4), good) == errno.EBADF  # not in the fd table
    assert w.fails(dev, bind, w.bind_struct(), {3: FdRef(FD_FOREIGN)}) == errno.EBADFD
    assert w.fails(dev, bind, w.bind_struct(), {3: FdRef(FD_HANDLE, bytes(16))}) == errno.EBADFD
    other_dev = w.server.open_device(1)
    assert w.fails(dev, bind, w.bind_struct(), {3: FdRef(FD_HANDLE, w.token(other_dev))}) == errno.EBADFD
    # none of that had a side effect
    assert state(w, dev) is HandleState.BLOCKED
    assert w.models[0].calls == []
    assert w.server.handle(iommu).ctx.objects == {}
    # an argsz-32 struct with a zero tail binds
    result, payload = w.call(dev, bind, bytes(w.bind_struct(argsz=32)) + bytes(8), good)
    assert result == 0 and int.from_bytes(payload[12:16], "little") == 1
    assert state(w, dev) is HandleState.BOUND


def test_bind_success_writes_only_out_devid(w):
    dev, iommu = w.server.open_device(0), w.server.open_iommu()
    bind = w.bind_struct(token_uuid_ptr=0x1122334455667788)
    raw_before = bytes(bind)
    w.call(dev, abi.VFIO_DEVICE_BIND_IOMMUFD, bind, {3: FdRef(FD_HANDLE, w.token(iommu))})
    after = bytes(bind)
    assert bind.out_devid >= 1
    assert after[:12] == raw_before[:12] and after[16:] == raw_before[16:]
    assert w.models[0].calls == ["open"]


def test_already_bound_is_checked_before_the_iommufd(w):
    dev, iommu = w.server.open_device(0), w.server.open_iommu()
    w.bind(dev, iommu)
    # kernel step 7 (already bound) comes before step 9 (fd lookup): EINVAL, not EBADF
    assert w.fails(dev, abi.VFIO_DEVICE_BIND_IOMMUFD, w.bind_struct(iommufd=9)) == errno.EINVAL
    assert state(w, dev) is HandleState.BOUND


def test_second_handle_cannot_bind_while_first_is_bound(w):
    a, b, iommu = w.server.open_device(0), w.server.open_device(0), w.server.open_iommu()
    w.bind(a, iommu)
    assert w.fails(b, abi.VFIO_DEVICE_BIND_IOMMUFD, w.bind_struct(),
                   {3: FdRef(FD_HANDLE, w.token(iommu))}) == errno.EINVAL
    assert state(w, b) is HandleState.BLOCKED
    w.server.release(a)
    assert w.bind(b, iommu) >= 1


@pytest.mark.parametrize("failure, expected", [(VfioError(errno.EIO), errno.EIO),
                                               (VfioError(errno.ENODEV), errno.ENODEV),
                                               (RuntimeError("model bug"), errno.EIO)])
def test_failed_model_open_grants_nothing(w, failure, expected):
    dev, iommu = w.server.open_device(0), w.server.open_iommu()
    w.models[0].fail_open = failure
    assert w.fails(dev, abi.VFIO_DEVICE_BIND_IOMMUFD, w.bind_struct(),
                   {3: FdRef(FD_HANDLE, w.token(iommu))}) == expected
    assert state(w, dev) is HandleState.BLOCKED
    assert w.server.devices[0].bound_file is None
    assert w.server.handle(iommu).ctx.objects == {}  # the devid was released
    with pytest.raises(VfioError) as exc:
        w.server.read(dev, 0, 4)
    assert exc.value.errno == errno.EINVAL
    w.models[0].fail_open = None
    assert w.bind(dev, iommu) == 1


def test_close_of_bound_handle_closes_resets_and_frees(w):
    dev, iommu = w.server.open_device(0), w.server.open_iommu()
    devid = w.bind(dev, iommu)
    w.server.write(dev, 0, b"data")
    ctx = w.server.handle(iommu).ctx
    assert devid in ctx.objects
    w.server.release(dev)
    assert w.models[0].calls == ["open", "close", "reset"]
    assert w.models[0].bar_read(0, 0, 4) == bytes(4)
    assert devid not in ctx.objects
    assert w.server.devices[0].bound_file is None


def test_close_always_succeeds_even_if_the_model_fails(w):
    dev, iommu = w.server.open_device(0), w.server.open_iommu()
    w.bind(dev, iommu)
    w.models[0].fail_close = RuntimeError("close bug")
    w.server.release(dev)
    assert w.server.devices[0].bound_file is None
    w.server.release(dev)  # a second release of the same fh is harmless


def test_closing_the_iommu_handle_does_not_unbind(w):
    dev, iommu = w.server.open_device(0), w.server.open_iommu()
    w.bind(dev, iommu)
    ctx = w.server.handle(iommu).ctx
    w.server.release(iommu)
    assert state(w, dev) is HandleState.BOUND
    info = abi.vfio_device_info(argsz=24)
    assert w.call(dev, abi.VFIO_DEVICE_GET_INFO, info)[0] == 0
    alloc = abi.iommu_ioas_alloc(size=12)  # the context lives on: its objects still work
    buf = UserBuffer(bytes(alloc))
    assert ctx.ioctl(abi.IOMMU_IOAS_ALLOC, IoctlArg(buf)) == 0
    ioas = abi.iommu_ioas_alloc.from_buffer_copy(bytes(buf.data)).out_ioas_id
    attach = abi.vfio_device_attach_iommufd_pt(argsz=16, pt_id=ioas)
    assert w.call(dev, abi.VFIO_DEVICE_ATTACH_IOMMUFD_PT, attach)[0] == 0


def test_attach_detach_and_destroy_rules(w):
    dev, iommu = w.server.open_device(0), w.server.open_iommu()
    devid = w.bind(dev, iommu)
    ioas = w.ioas_alloc(iommu)
    attach = lambda pt, **kw: abi.vfio_device_attach_iommufd_pt(argsz=kw.pop("argsz", 16), pt_id=pt, **kw)
    att = abi.VFIO_DEVICE_ATTACH_IOMMUFD_PT
    assert w.fails(dev, att, attach(ioas, argsz=11)) == errno.EINVAL
    assert w.fails(dev, att, attach(ioas, flags=2)) == errno.EINVAL
    assert w.fails(dev, att, attach(ioas, flags=abi.VFIO_DEVICE_ATTACH_PASID)) == errno.EOPNOTSUPP
    assert w.fails(dev, att, attach(999)) == errno.ENOENT
    assert w.fails(dev, att, attach(devid)) == errno.EINVAL
    a = attach(ioas)
    w.call(dev, att, a)
    hwpt = a.pt_id
    assert hwpt not in (ioas, devid)
    destroy = lambda i: abi.iommu_destroy(size=8, id=i)
    assert w.fails(iommu, abi.IOMMU_DESTROY, destroy(ioas)) == errno.EBUSY
    assert w.fails(iommu, abi.IOMMU_DESTROY, destroy(hwpt)) == errno.EBUSY
    assert w.fails(iommu, abi.IOMMU_DESTROY, destroy(devid)) == errno.EBUSY
    # attaching again is a replace, to the same HWPT
    again = attach(ioas)
    w.call(dev, att, again)
    assert again.pt_id == hwpt
    # replace onto another IOAS: the old auto HWPT goes away
    ioas2 = w.ioas_alloc(iommu)
    moved = attach(ioas2)
    w.call(dev, att, moved)
    assert moved.pt_id != hwpt and hwpt not in w.server.handle(iommu).ctx.objects
    w.call(iommu, abi.IOMMU_DESTROY, destroy(ioas))
    det = abi.VFIO_DEVICE_DETACH_IOMMUFD_PT
    assert w.fails(dev, det, abi.vfio_device_detach_iommufd_pt(argsz=7)) == errno.EINVAL
    assert w.fails(dev, det, abi.vfio_device_detach_iommufd_pt(argsz=12, flags=4)) == errno.EINVAL
    assert w.call(dev, det, abi.vfio_device_detach_iommufd_pt(argsz=12))[0] == 0
    assert w.call(dev, det, abi.vfio_device_detach_iommufd_pt(argsz=12))[0] == 0  # not attached: no-op
    w.call(iommu, abi.IOMMU_DESTROY, destroy(ioas2))
    assert w.fails(iommu, abi.IOMMU_DESTROY, destroy(ioas2)) == errno.ENOENT


def test_close_detaches_and_frees_the_ioas(w):
    dev, iommu = w.server.open_device(0), w.server.open_iommu()
    w.bind(dev, iommu)
    ioas = w.ioas_alloc(iommu)
    w.call(dev, abi.VFIO_DEVICE_ATTACH_IOMMUFD_PT, abi.vfio_device_attach_iommufd_pt(argsz=16, pt_id=ioas))
    w.server.release(dev)
    assert w.call(iommu, abi.IOMMU_DESTROY, abi.iommu_destroy(size=8, id=ioas))[0] == 0


def test_iommufd_size_rules(w):
    iommu = w.server.open_iommu()
    alloc = abi.IOMMU_IOAS_ALLOC
    assert w.fails(iommu, alloc, abi.iommu_ioas_alloc(size=11)) == errno.EINVAL
    assert w.fails(iommu, alloc, bytes(abi.iommu_ioas_alloc(size=16)) + b"\0\0\0\1") == errno.E2BIG
    assert w.fails(iommu, alloc, abi.iommu_ioas_alloc(size=12, flags=1)) == errno.EOPNOTSUPP
    assert w.fails(iommu, alloc, None) == errno.EFAULT
    result, payload = w.call(iommu, alloc, bytes(abi.iommu_ioas_alloc(size=16)) + bytes(4))
    assert result == 0 and int.from_bytes(payload[8:12], "little") == 1
    assert w.fails(iommu, abi.IOMMU_DESTROY, abi.iommu_destroy(size=8, id=0)) == errno.ENOENT
    assert w.fails(iommu, abi.IOMMU_DESTROY, None) == errno.EFAULT
    assert w.fails(iommu, (ord(";") << 8) | 0x7F, bytearray(16)) == errno.ENOTTY
    # same nr, different encoding (an _IOW-style number) is not the command
    assert w.fails(iommu, abi.IOMMU_IOAS_ALLOC | (12 << 16), abi.iommu_ioas_alloc(size=12)) == errno.ENOTTY
    assert w.call(iommu, abi.VFIO_GET_API_VERSION)[0] == abi.VFIO_API_VERSION
    with pytest.raises(VfioError) as exc:
        w.server.read(iommu, 0, 8)
    assert exc.value.errno == errno.EINVAL


def test_ids_are_lowest_free_from_one(w):
    iommu = w.server.open_iommu()
    ids = [w.ioas_alloc(iommu) for _ in range(3)]
    assert ids == [1, 2, 3]
    w.call(iommu, abi.IOMMU_DESTROY, abi.iommu_destroy(size=8, id=2))
    assert w.ioas_alloc(iommu) == 2


def test_mailbox_slots_are_independent_and_consumed(w):
    iommu = w.server.open_iommu()
    slots = [protocol.control_offset(t) for t in (1, 2)]
    for slot in slots:
        w.server.write(iommu, slot, protocol.encode_request(Request(protocol.OP_GET_TOKEN)))
    for slot in slots:
        assert protocol.decode_reply(w.server.read(iommu, slot, 64)).payload == w.token(iommu)
    with pytest.raises(VfioError) as exc:
        w.server.read(iommu, slots[0], 64)
    assert exc.value.errno == errno.ENOMSG


def test_reply_too_large_for_the_read_stays(w):
    iommu = w.server.open_iommu()
    w.server.write(iommu, SLOT, protocol.encode_request(Request(protocol.OP_GET_TOKEN)))
    with pytest.raises(VfioError) as exc:
        w.server.read(iommu, SLOT, 10)
    assert exc.value.errno == errno.EMSGSIZE
    assert len(w.server.read(iommu, SLOT, 100)) == protocol.REPLY_HEADER_SIZE + 16


def test_failed_command_discards_the_old_reply(w):
    dev = w.server.open_device(0)
    w.server.write(dev, SLOT, protocol.encode_request(Request(protocol.OP_GET_TOKEN)))
    with pytest.raises(VfioError):
        w.call(dev, abi.VFIO_DEVICE_GET_INFO, abi.vfio_device_info(argsz=24))
    with pytest.raises(VfioError) as exc:
        w.server.read(dev, SLOT, 100)
    assert exc.value.errno == errno.ENOMSG


def test_pending_replies_are_bounded(w):
    from vfiofs.core.mailbox import MAX_PENDING_REPLIES

    iommu = w.server.open_iommu()
    token_request = protocol.encode_request(Request(protocol.OP_GET_TOKEN))
    for tag in range(MAX_PENDING_REPLIES + 10):
        w.server.write(iommu, protocol.control_offset(tag), token_request)
    assert w.server.pending_replies(iommu) == MAX_PENDING_REPLIES
    with pytest.raises(VfioError):
        w.server.read(iommu, protocol.control_offset(0), 100)  # the oldest was dropped
    assert w.server.read(iommu, protocol.control_offset(MAX_PENDING_REPLIES + 9), 100)


def test_released_handle_is_gone(w):
    dev, iommu = w.server.open_device(0), w.server.open_iommu()
    token = w.token(iommu)
    w.server.release(iommu)
    for call in (lambda: w.server.read(iommu, 0, 4), lambda: w.server.token(iommu)):
        with pytest.raises(VfioError) as exc:
            call()
        assert exc.value.errno == errno.EBADF
    # its token names nothing any more: an fd argument carrying it is a foreign file
    assert w.fails(dev, abi.VFIO_DEVICE_BIND_IOMMUFD, w.bind_struct(), {3: FdRef(FD_HANDLE, token)}) == errno.EBADFD


class _NoResetModel(DeviceModel):
    reset_works = False

    def bar_read(self, index: int, offset: int, size: int) -> bytes:
        raise NotImplementedError  # a model bug


def test_reset_flag_follows_the_model():
    server = make_mailbox([Device(0, "noreset", VfioPciDevice(_NoResetModel(RAM_SPEC)))])
    w = World.__new__(World)
    w.server = server
    dev, iommu = server.open_device(0), server.open_iommu()
    w.bind(dev, iommu)
    info = abi.vfio_device_info(argsz=24)
    w.call(dev, abi.VFIO_DEVICE_GET_INFO, info)
    assert info.flags == abi.VFIO_DEVICE_FLAGS_PCI
    assert w.fails(dev, abi.VFIO_DEVICE_RESET) == errno.EINVAL
    # a model without region handlers: the bug becomes EIO, not a dead daemon
    with pytest.raises(VfioError) as exc:
        server.read(dev, 0, 4)
    assert exc.value.errno == errno.EIO


def test_a_model_returning_the_wrong_size_is_eio(w):
    dev, iommu = w.server.open_device(0), w.server.open_iommu()
    w.bind(dev, iommu)
    w.models[0].bar_read = lambda index, offset, size: b"\0" * (size + 1)
    with pytest.raises(VfioError) as exc:
        w.server.read(dev, 0, 4)
    assert exc.value.errno == errno.EIO
    w.models[0].bar_read = lambda index, offset, size: None
    with pytest.raises(VfioError) as exc:
        w.server.read(dev, 0, 4)
    assert exc.value.errno == errno.EIO


# --- the transition table: every (state, event) pair -------------------------------------------

BLOCKED, BOUND, GRANTED, CLOSED = HandleState
E = Event
_DATA = (E.DEVICE_IOCTL, E.READ, E.WRITE, E.MMAP, E.FSYNC)
#: (state, event) → the errno it fails with, or the state it leaves the handle in.
OUTCOMES: dict[tuple[HandleState, Event], int | HandleState] = {
    **{(BLOCKED, e): errno.EINVAL for e in (E.ATTACH_PT, E.DETACH_PT, *_DATA)},
    (BLOCKED, E.BIND): BOUND, (BLOCKED, E.CLAIM): GRANTED, (BLOCKED, E.RELEASE): CLOSED,
    **{(BOUND, e): BOUND for e in (E.ATTACH_PT, E.DETACH_PT, *_DATA)},
    (BOUND, E.BIND): errno.EINVAL, (BOUND, E.CLAIM): errno.EINVAL, (BOUND, E.RELEASE): CLOSED,
    **{(GRANTED, e): GRANTED for e in _DATA},
    (GRANTED, E.ATTACH_PT): errno.ENOTTY, (GRANTED, E.DETACH_PT): errno.ENOTTY,  # cdev-only: the driver's
    (GRANTED, E.BIND): errno.EINVAL, (GRANTED, E.CLAIM): errno.EINVAL, (GRANTED, E.RELEASE): CLOSED,
    **{(CLOSED, e): errno.EBADF for e in (E.BIND, E.ATTACH_PT, E.DETACH_PT, *_DATA)},
    (CLOSED, E.CLAIM): errno.EINVAL, (CLOSED, E.RELEASE): CLOSED,
}


def test_the_table_has_every_pair():
    assert set(TRANSITIONS) == {(s, e) for s in HandleState for e in Event} == set(OUTCOMES)


def legacy_ready(w: World, number: int = 0, uid: int = 0) -> tuple[int, int]:
    """A group handle with a container whose IOMMU is set: GET_DEVICE_FD may hand out devices."""
    container, group = w.server.open_container(uid), w.server.open_group(number, uid)
    w.call(group, abi.VFIO_GROUP_SET_CONTAINER, (3).to_bytes(4, "little"), {3: FdRef(FD_HANDLE, w.token(container))})
    w.call(container, abi.VFIO_SET_IOMMU, abi.VFIO_TYPE1v2_IOMMU)
    return group, container


def get_device_fd(w: World, group: int, name: str) -> tuple[int, int]:
    """(device index, ticket), as the client library splits the ioctl's result."""
    result, _ = w.call(group, abi.VFIO_GROUP_GET_DEVICE_FD, name.encode() + b"\0")
    return result & 0xFFFF, result >> 16


def claim(w: World, fh: int, ticket: int) -> int:
    message = protocol.encode_request(Request(protocol.OP_CLAIM, arg_kind=ARG_NULL, arg_value=ticket))
    assert w.server.write(fh, SLOT, message) == len(message)
    return protocol.decode_reply(w.server.read(fh, SLOT, 64)).result


def granted(w: World, group: int, name: str, uid: int = 0) -> int:
    index, ticket = get_device_fd(w, group, name)
    fh = w.server.open_device(index, uid)
    assert claim(w, fh, ticket) == 0
    return fh


def handle_in(w: World, state: HandleState) -> tuple[int, DeviceFile]:
    fh = w.server.open_device(0)
    if state is BOUND:
        w.bind(fh, w.iommu)
    elif state is GRANTED:
        fh = granted(w, legacy_ready(w)[0], "dev0")
    handle = w.server.handle(fh)
    assert isinstance(handle, DeviceFile)
    if state is CLOSED:
        w.server.release(fh)
    assert handle.state is state
    return fh, handle


def fire(w: World, fh: int, handle: DeviceFile, event: Event) -> None:
    """``event`` on ``handle`` with arguments that would succeed if the state allowed it."""
    def ioctl(request: int, struct: ctypes.Structure, files=None) -> None:
        handle.ioctl(request, IoctlArg(UserBuffer(bytes(struct)), files=files or {}))

    if event is E.BIND:
        ioctl(abi.VFIO_DEVICE_BIND_IOMMUFD, w.bind_struct(), {3: w.server.handle(w.iommu)})
    elif event is E.ATTACH_PT:
        ioctl(abi.VFIO_DEVICE_ATTACH_IOMMUFD_PT, abi.vfio_device_attach_iommufd_pt(argsz=16, pt_id=w.ioas))
    elif event is E.DETACH_PT:
        ioctl(abi.VFIO_DEVICE_DETACH_IOMMUFD_PT, abi.vfio_device_detach_iommufd_pt(argsz=12))
    elif event is E.DEVICE_IOCTL:
        ioctl(abi.VFIO_DEVICE_GET_INFO, abi.vfio_device_info(argsz=24))
    elif event is E.READ:
        assert handle.read(0, 4) == bytes(4)
    elif event is E.WRITE:
        assert handle.write(0, b"abcd") == 4
    elif event is E.MMAP:
        assert handle.map_region(0, 0, 4096) >= 0
    elif event is E.FSYNC:
        handle.fsync()
    elif event is E.CLAIM and handle.state is BLOCKED:  # a real grant for this device
        index, ticket = get_device_fd(w, legacy_ready(w)[0], "dev0")
        if claim(w, fh, ticket) != 0:
            raise AssertionError("claim failed")
    elif event is E.CLAIM:  # refused before the grant is looked at
        handle.claim(GroupGrant(w.server.devices[0], group_file=None))  # type: ignore[arg-type]
    else:
        handle.release()


@pytest.mark.parametrize("state, event", sorted(OUTCOMES, key=lambda k: (list(HandleState).index(k[0]), k[1].name)),
                         ids=lambda v: v.name)
def test_every_state_and_event(w, state, event):
    w.iommu = w.server.open_iommu()
    w.ioas = w.ioas_alloc(w.iommu)
    fh, handle = handle_in(w, state)
    expected = OUTCOMES[state, event]
    if isinstance(expected, HandleState):
        fire(w, fh, handle, event)
        assert handle.state is expected
    else:
        with pytest.raises(VfioError) as exc:
            fire(w, fh, handle, event)
        assert exc.value.errno == expected
        assert handle.state is state  # a refused event changes nothing


def test_bind_on_a_granted_handle_is_refused_before_the_group_check(w):
    """df->group is checked before vfio_device_block_group(): EINVAL, not EBUSY."""
    iommu = w.server.open_iommu()
    fh = granted(w, legacy_ready(w)[0], "dev0")
    assert w.fails(fh, abi.VFIO_DEVICE_BIND_IOMMUFD, w.bind_struct(), {3: FdRef(FD_HANDLE, w.token(iommu))}) \
        == errno.EINVAL
    # a cdev handle of the same device meets the group in use
    other = w.server.open_device(0)
    assert w.fails(other, abi.VFIO_DEVICE_BIND_IOMMUFD, w.bind_struct(),
                   {3: FdRef(FD_HANDLE, w.token(iommu))}) == errno.EBUSY


def test_granted_handles_share_the_device_and_hold_the_group(w):
    group, container = legacy_ready(w)
    a, b = granted(w, group, "dev0"), granted(w, group, "dev0")
    assert w.models[0].calls == ["open"]  # the group path opens a device once, for many handles
    w.server.write(a, 0, b"both")
    assert w.server.read(b, 0, 4) == b"both"
    assert w.fails(group, abi.VFIO_GROUP_UNSET_CONTAINER) == errno.EBUSY
    w.server.release(group)
    with pytest.raises(VfioError) as exc:
        w.server.open_group(0)
    assert exc.value.errno == errno.EBUSY  # the granted handles keep the group in use
    w.server.release(a)
    assert w.models[0].calls == ["open"]
    w.server.release(b)
    assert w.models[0].calls == ["open", "close", "reset"]
    w.server.release(w.server.open_group(0))  # free again


def test_group_ioctls_check_order(w):
    group, iommu = w.server.open_group(0), w.server.open_iommu()
    status = abi.vfio_group_status(argsz=8)
    assert w.call(group, abi.VFIO_GROUP_GET_STATUS, status)[0] == 0 and status.flags == abi.VFIO_GROUP_FLAGS_VIABLE
    assert w.fails(group, abi.VFIO_GROUP_GET_STATUS, abi.vfio_group_status(argsz=7)) == errno.EINVAL
    assert w.fails(group, abi.VFIO_GROUP_SET_CONTAINER, None) == errno.EFAULT
    assert w.fails(group, abi.VFIO_GROUP_SET_CONTAINER, (5).to_bytes(4, "little")) == errno.EBADF
    device = w.server.open_device(1)  # neither a container nor an iommufd
    assert w.fails(group, abi.VFIO_GROUP_SET_CONTAINER, (3).to_bytes(4, "little"),
                   {3: FdRef(FD_HANDLE, w.token(device))}) == errno.EBADFD
    assert w.fails(group, abi.VFIO_GROUP_UNSET_CONTAINER) == errno.EINVAL
    assert iommu
    assert w.fails(group, abi.VFIO_GROUP_GET_DEVICE_FD, b"dev0") == errno.EFAULT  # no NUL inside the buffer
    assert w.fails(group, abi.VFIO_GROUP_GET_DEVICE_FD, b"dev0\0") == errno.EINVAL  # no container
    assert w.fails(group, abi.VFIO_DEVICE_GET_INFO, bytes(24)) == errno.ENOTTY
    with pytest.raises(VfioError) as exc:
        w.server.open_group(0)
    assert exc.value.errno == errno.EBUSY


def test_get_device_fd_looks_devices_up_in_its_group_only(w):
    group, _ = legacy_ready(w)
    assert w.fails(group, abi.VFIO_GROUP_GET_DEVICE_FD, b"dev1\0") == errno.ENODEV
    assert w.fails(group, abi.VFIO_GROUP_GET_DEVICE_FD, b"nonsense\0") == errno.ENODEV
    assert w.models[0].calls == w.models[1].calls == []


def test_a_group_cannot_open_while_one_of_its_devices_is_bound_through_its_cdev(w):
    w = shared_group_world()
    iommu, fh = w.server.open_iommu(), w.server.open_device(1)
    w.bind(fh, iommu)
    with pytest.raises(VfioError) as exc:
        w.server.open_group(7)
    assert exc.value.errno == errno.EBUSY
    w.server.release(fh)
    w.server.release(w.server.open_group(7))  # unbound: the group is free again


def test_a_claimed_grant_is_no_longer_held_by_its_group_handle(w):
    group, _ = legacy_ready(w)
    handles = [granted(w, group, "dev0") for _ in range(3)]
    assert w.server.handle(group).grants == []  # claims do not pile up on a long-lived group handle
    index, ticket = get_device_fd(w, group, "dev0")
    assert len(w.server.handle(group).grants) == 1  # until claimed, the grant holds the device
    w.server.release(group)
    for fh in handles:
        w.server.release(fh)
    assert w.models[0].calls == ["open", "close", "reset"]


# --- tickets ------------------------------------------------------------------------------------

def shared_group_world() -> World:
    w = World.__new__(World)
    w.models = [SpyModel(), SpyModel()]
    group = Group(7)
    w.server = make_mailbox([Device(i, f"dev{i}", VfioPciDevice(m), group) for i, m in enumerate(w.models)])
    return w


def test_a_ticket_is_single_use(w):
    index, ticket = get_device_fd(w, legacy_ready(w)[0], "dev0")
    first, second = w.server.open_device(index), w.server.open_device(index)
    assert claim(w, first, ticket) == 0
    with pytest.raises(VfioError) as exc:
        claim(w, second, ticket)
    assert exc.value.errno == errno.EINVAL
    assert w.server.handle(second).state is BLOCKED


def test_only_the_group_openers_user_may_claim_and_a_wrong_claim_uses_the_ticket(w):
    index, ticket = get_device_fd(w, legacy_ready(w, uid=1000)[0], "dev0")
    stranger, owner = w.server.open_device(index, uid=1001), w.server.open_device(index, uid=1000)
    for fh in (stranger, owner):
        with pytest.raises(VfioError) as exc:
            claim(w, fh, ticket)
        assert exc.value.errno == errno.EINVAL
    assert w.server.handle(owner).state is BLOCKED


def test_only_a_device_handle_of_that_device_claims(w):
    w = shared_group_world()
    group, container = legacy_ready(w, 7)
    index, ticket = get_device_fd(w, group, "dev1")
    assert index == 1
    for fh in (container, w.server.open_device(0)):  # not a device handle; another device's handle
        with pytest.raises(VfioError) as exc:
            claim(w, fh, ticket)
        assert exc.value.errno == errno.EINVAL


def test_a_ticket_used_up_by_a_failed_claim_gives_its_device_back(w):
    group, _ = legacy_ready(w, uid=1000)
    for wrong in (w.server.open_device(0, uid=1001), w.server.open_device(1, uid=1000)):  # user; device
        index, ticket = get_device_fd(w, group, "dev0")
        assert w.models[0].calls[-1] == "open"
        with pytest.raises(VfioError) as exc:
            claim(w, wrong, ticket)
        assert exc.value.errno == errno.EINVAL
        assert w.models[0].calls[-2:] == ["close", "reset"]  # not held until the group handle closes
    assert w.server.handle(group).grants == [] and len(w.server.tickets) == 0


def test_an_unclaimed_grant_lapses_with_its_group(w):
    group, _ = legacy_ready(w)
    index, ticket = get_device_fd(w, group, "dev0")
    assert w.models[0].calls == ["open"]
    w.server.release(group)
    assert w.models[0].calls == ["open", "close", "reset"]  # the device it opened is closed again
    fh = w.server.open_device(index)
    with pytest.raises(VfioError) as exc:
        claim(w, fh, ticket)
    assert exc.value.errno == errno.EINVAL


def test_the_oldest_tickets_lapse_beyond_the_limit():
    lapsed: list[str] = []

    class FakeGrant:
        def __init__(self, name: str) -> None:
            self.name = name

        def lapse(self) -> None:
            lapsed.append(self.name)

    class Claimant:
        def __init__(self) -> None:
            self.claimed: list[str] = []

        def claim(self, grant: FakeGrant) -> None:
            self.claimed.append(grant.name)

    tickets = Tickets(limit=2)
    issued = [tickets.issue(FakeGrant(name), uid=5) for name in "abc"]
    assert len(set(issued)) == 3 and all(t & 1 and t < 1 << 46 for t in issued)
    assert lapsed == ["a"] and len(tickets) == 2
    holder = Claimant()
    with pytest.raises(VfioError) as exc:
        tickets.claim(issued[0], 5, holder)
    assert exc.value.errno == errno.EINVAL
    tickets.claim(issued[2], 5, holder)
    assert holder.claimed == ["c"] and len(tickets) == 1


def test_status_tells_how_each_device_is_held(w):
    iommu = w.server.open_iommu()
    cdev = w.server.open_device(0, pid=11)
    w.bind(cdev, iommu)
    assert w.server.status()["devices"][0]["ioas"] is None
    ioas = w.ioas_alloc(iommu)
    w.call(cdev, abi.VFIO_DEVICE_ATTACH_IOMMUFD_PT, abi.vfio_device_attach_iommufd_pt(argsz=16, pt_id=ioas))
    group, _ = legacy_ready(w, 1)
    legacy = granted(w, group, "dev1")
    first, second = w.server.status()["devices"]
    assert first["bound_by"] == [{"pid": 11, "handle": cdev, "via": "cdev"}] and first["ioas"] == ioas
    assert second["bound_by"] == [{"pid": 0, "handle": legacy, "via": "group"}] and second["ioas"] == "container"
    w.server.release(legacy)
    assert w.server.status()["devices"][1]["bound_by"] == []


# --- issue 13 fidelity: reset keeps mappings, close revokes; overflow; whole sparse BARs ----------

def test_reset_zeroes_shared_memory_in_place_and_release_revokes_it(w):
    import os

    iommu, fh = w.server.open_iommu(), w.server.open_device(0)
    w.bind(fh, iommu)
    memory = w.models[0].context.memory[0]
    fd = os.dup(w.server.handle(fh).map_region(0, 0, 4096))  # what the binder holds
    os.pwrite(fd, b"binder", 0)  # as a store through the binder's mapping
    w.call(fh, abi.VFIO_DEVICE_RESET)
    assert os.path.samestat(os.fstat(memory.fd), os.fstat(fd)) and os.fstat(fd).st_size == 4096  # same memfd
    assert os.pread(fd, 6, 0) == bytes(6)  # power-on contents, seen through it
    os.pwrite(fd, b"again", 0)
    assert w.server.read(fh, 0, 5) == b"again"
    w.server.release(fh)  # the bound handle closes: the memory is taken back
    assert not os.path.samestat(os.fstat(memory.fd), os.fstat(fd))
    assert os.fstat(fd).st_size == 0  # old mappings fault (SIGBUS)
    assert memory.read(0, 5) == bytes(5)
    os.close(fd)


def test_type1_map_and_unmap_overflow_is_eoverflow(w):
    group, container = legacy_ready(w)
    page = 4096
    overflowing = abi.vfio_iommu_type1_dma_map(argsz=32, flags=3, vaddr=0x10000, iova=(1 << 64) - page,
                                               size=2 * page)
    assert w.fails(container, abi.VFIO_IOMMU_MAP_DMA, overflowing) == errno.EOVERFLOW
    vaddr_wraps = abi.vfio_iommu_type1_dma_map(argsz=32, flags=3, vaddr=(1 << 64) - page, iova=0, size=2 * page)
    assert w.fails(container, abi.VFIO_IOMMU_MAP_DMA, vaddr_wraps) == errno.EOVERFLOW
    beyond = abi.vfio_iommu_type1_dma_map(argsz=32, flags=3, vaddr=0x10000, iova=1 << 48, size=page)
    assert w.fails(container, abi.VFIO_IOMMU_MAP_DMA, beyond) == errno.EINVAL  # no overflow: the aperture
    unaligned = abi.vfio_iommu_type1_dma_map(argsz=32, flags=3, vaddr=0x10000, iova=(1 << 64) - page, size=100)
    assert w.fails(container, abi.VFIO_IOMMU_MAP_DMA, unaligned) == errno.EINVAL  # alignment comes first
    unmap = abi.vfio_iommu_type1_dma_unmap(argsz=24, iova=(1 << 64) - page, size=2 * page)
    assert w.fails(container, abi.VFIO_IOMMU_UNMAP_DMA, unmap) == errno.EOVERFLOW


def test_a_sparse_bar_maps_whole_like_vfio_pci_core_mmap():
    spec = DeviceSpec(name="sparse", model="generic", identity=ID,
                      bars=(BarSpec(index=1, size=0x10000, mmap=True, mmap_areas=((0x1000, 0xF000),)),))
    driver = VfioPciDevice(DeviceModel(spec, ModelContext(bar_memory(spec))))
    whole = driver.map_region(1, 0, 0x10000)
    assert driver.map_region(1, 0, 4096) == whole  # the register page too: the same memory
    for offset, length in ((0, 0x11000), (0x800, 4096), (0, 0)):
        with pytest.raises(VfioError) as exc:
            driver.map_region(1, offset, length)
        assert exc.value.errno == errno.EINVAL


# --- iommufd's VFIO compatibility container (drivers/iommu/iommufd/vfio_compat.c) ----------------

class FakeMemory:
    """A process's memory for DMA-mapping commands: any range is mappable."""

    def check_range(self, addr: int, length: int, write: bool) -> None:
        pass

    def read(self, addr: int, size: int) -> bytes:
        return bytes(size)

    def write(self, addr: int, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass


def compat_call(ctx: IommufdContext, request: int, arg=None):
    """(result, bytes written back) of ``request`` on the context, with a process to map from."""
    if isinstance(arg, int):
        ioctl_arg = IoctlArg(UserBuffer(None), value=arg, process=FakeMemory)
    else:
        ioctl_arg = IoctlArg(UserBuffer(bytes(arg) if arg is not None else None), process=FakeMemory)
    result = ctx.ioctl(request, ioctl_arg)
    return result, bytes(ioctl_arg.buf.copy_from(0, len(ioctl_arg.buf))) if arg is not None and not isinstance(arg, int) else b""


def compat_errno(ctx: IommufdContext, request: int, arg=None) -> int:
    with pytest.raises(VfioError) as exc:
        compat_call(ctx, request, arg)
    return exc.value.errno


PAGE = 4096


def dma_map(vaddr: int, iova: int, size: int, flags: int = 3) -> abi.vfio_iommu_type1_dma_map:
    return abi.vfio_iommu_type1_dma_map(argsz=32, flags=flags, vaddr=vaddr, iova=iova, size=size)


def dma_unmap(iova: int, size: int, flags: int = 0) -> abi.vfio_iommu_type1_dma_unmap:
    return abi.vfio_iommu_type1_dma_unmap(argsz=24, flags=flags, iova=iova, size=size)


def test_compat_before_a_group_is_attached():
    """Without a compat IOAS every command that needs one is ENODEV, after its own checks."""
    ctx = IommufdContext()
    assert compat_call(ctx, abi.VFIO_GET_API_VERSION)[0] == abi.VFIO_API_VERSION
    for ext, answer in ((abi.VFIO_TYPE1_IOMMU, 1), (abi.VFIO_TYPE1v2_IOMMU, 1), (abi.VFIO_UNMAP_ALL, 1),
                        (abi.VFIO_UPDATE_VADDR, 0), (abi.VFIO_NOIOMMU_IOMMU, 0), (2, 0), (0, 0)):
        assert compat_call(ctx, abi.VFIO_CHECK_EXTENSION, ext)[0] == answer
    assert compat_errno(ctx, abi.VFIO_CHECK_EXTENSION, abi.VFIO_DMA_CC_IOMMU) == errno.ENODEV
    assert compat_errno(ctx, abi.VFIO_SET_IOMMU, 2) == errno.EINVAL  # the type first
    assert compat_errno(ctx, abi.VFIO_SET_IOMMU, abi.VFIO_TYPE1v2_IOMMU) == errno.ENODEV
    assert compat_errno(ctx, abi.VFIO_IOMMU_GET_INFO, abi.vfio_iommu_type1_info(argsz=15)) == errno.EINVAL
    assert compat_errno(ctx, abi.VFIO_IOMMU_GET_INFO, abi.vfio_iommu_type1_info(argsz=24)) == errno.ENODEV
    assert compat_errno(ctx, abi.VFIO_IOMMU_MAP_DMA, dma_map(0x10000, 0, PAGE, flags=4)) == errno.EINVAL
    assert compat_errno(ctx, abi.VFIO_IOMMU_MAP_DMA, dma_map(0x10000, 0, PAGE)) == errno.ENODEV
    assert compat_errno(ctx, abi.VFIO_IOMMU_UNMAP_DMA, dma_unmap(0, PAGE, flags=1)) == errno.EINVAL  # dirty bitmap
    assert compat_errno(ctx, abi.VFIO_IOMMU_UNMAP_DMA, dma_unmap(0, PAGE)) == errno.ENODEV
    assert compat_errno(ctx, 0x3B75) == errno.ENOTTY  # VFIO_IOMMU_DIRTY_PAGES
    assert compat_errno(ctx, abi.VFIO_GROUP_GET_STATUS, bytes(8)) == errno.ENOTTY


def test_set_container_with_an_iommufd_makes_the_compat_ioas_and_hands_out_devices(w):
    iommu = w.server.open_iommu()
    ctx = w.server.handle(iommu).ctx
    group = w.server.open_group(0)
    w.call(group, abi.VFIO_GROUP_SET_CONTAINER, (3).to_bytes(4, "little"), {3: FdRef(FD_HANDLE, w.token(iommu))})
    status = abi.vfio_group_status(argsz=8)
    w.call(group, abi.VFIO_GROUP_GET_STATUS, status)
    assert status.flags == abi.VFIO_GROUP_FLAGS_VIABLE | abi.VFIO_GROUP_FLAGS_CONTAINER_SET
    assert ctx.vfio_ioas is not None and ctx.vfio_ioas.id == 1  # an ordinary IOAS object of the context
    assert w.ioas_alloc(iommu) == 2
    assert w.fails(group, abi.VFIO_GROUP_SET_CONTAINER, (3).to_bytes(4, "little"),
                   {3: FdRef(FD_HANDLE, w.token(iommu))}) == errno.EINVAL  # already set
    assert w.fails(group, abi.VFIO_GROUP_SET_CONTAINER, (9).to_bytes(4, "little")) == errno.EBADF  # fdget first
    # no VFIO_SET_IOMMU needed: the device is bound to the context and attached to the compat IOAS
    fh = granted(w, group, "dev0")
    devices = [o for o in ctx.objects.values() if type(o).__name__ == "DeviceObject"]
    assert len(devices) == 1 and devices[0].ioas_id == 1
    assert w.fails(iommu, abi.IOMMU_DESTROY, abi.iommu_destroy(size=8, id=1)) == errno.EBUSY  # attached
    # an iommufd lets go of a group with open devices (no container_users check); they stay bound
    assert w.call(group, abi.VFIO_GROUP_UNSET_CONTAINER)[0] == 0
    assert len([o for o in ctx.objects.values() if type(o).__name__ == "DeviceObject"]) == 1
    w.server.release(fh)
    assert [type(o).__name__ for o in ctx.objects.values()] == ["Ioas", "Ioas"]  # unbound, auto HWPT gone
    assert w.models[0].calls == ["open", "close", "reset"]


def test_a_second_group_shares_the_compat_ioas_and_a_destroyed_one_is_enodev(w):
    iommu = w.server.open_iommu()
    ctx = w.server.handle(iommu).ctx
    for number in (0, 1):
        group = w.server.open_group(number)
        w.call(group, abi.VFIO_GROUP_SET_CONTAINER, (3).to_bytes(4, "little"), {3: FdRef(FD_HANDLE, w.token(iommu))})
    assert [o.id for o in ctx.objects.values()] == [1]
    w.call(iommu, abi.IOMMU_DESTROY, abi.iommu_destroy(size=8, id=1))
    assert ctx.vfio_ioas is None
    assert compat_errno(ctx, abi.VFIO_IOMMU_MAP_DMA, dma_map(0x10000, 0, PAGE)) == errno.ENODEV
    assert w.fails(group, abi.VFIO_GROUP_GET_DEVICE_FD, b"dev1\0") == errno.ENODEV  # no compat IOAS to attach
    assert w.models[1].calls == []


def attached_compat() -> IommufdContext:
    ctx = IommufdContext()
    ctx.vfio_compat.attach_group(object())
    return ctx


def test_compat_get_info_reports_dma_avail_then_the_iova_range():
    ctx = attached_compat()
    result, out = compat_call(ctx, abi.VFIO_IOMMU_GET_INFO, abi.vfio_iommu_type1_info(argsz=24))
    info = abi.vfio_iommu_type1_info.from_buffer_copy(out)
    assert (result, info.argsz, info.cap_offset) == (0, 72, 0)  # argsz raised to the whole chain
    assert info.flags == abi.VFIO_IOMMU_INFO_PGSIZES | abi.VFIO_IOMMU_INFO_CAPS
    assert info.iova_pgsizes == (1 << 64) - 4096  # no domain yet: any multiple of the page size
    buf = bytearray(128)
    buf[0:4] = (128).to_bytes(4, "little")
    _, out = compat_call(ctx, abi.VFIO_IOMMU_GET_INFO, bytes(buf))
    info = abi.vfio_iommu_type1_info.from_buffer_copy(out)
    assert (info.argsz, info.cap_offset) == (72, 24)  # argsz comes back as the chain's size, also when smaller
    assert struct.unpack_from("<HHII", out, 24) == (abi.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, 1, 40, (1 << 32) - 1)
    assert struct.unpack_from("<HHIII", out, 40) == (abi.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, 1, 0, 1, 0)
    assert struct.unpack_from("<QQ", out, 56) == (0, (1 << 48) - 1)
    buf = bytearray(40)  # room for the first capability only
    buf[0:4] = (40).to_bytes(4, "little")
    _, out = compat_call(ctx, abi.VFIO_IOMMU_GET_INFO, bytes(buf))
    assert abi.vfio_iommu_type1_info.from_buffer_copy(out).cap_offset == 0
    assert struct.unpack_from("<HHII", out, 24) == (abi.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, 1, 40, (1 << 32) - 1)


def test_compat_map_unmap_and_overflow():
    ctx = attached_compat()
    assert compat_call(ctx, abi.VFIO_SET_IOMMU, abi.VFIO_TYPE1v2_IOMMU)[0] == 0
    assert compat_call(ctx, abi.VFIO_SET_IOMMU, abi.VFIO_TYPE1v2_IOMMU)[0] == 0  # again: fine
    top = (1 << 64) - PAGE
    assert compat_errno(ctx, abi.VFIO_IOMMU_MAP_DMA, dma_map(0x10000, top, 2 * PAGE)) == errno.EOVERFLOW
    assert compat_errno(ctx, abi.VFIO_IOMMU_UNMAP_DMA, dma_unmap(top, 2 * PAGE)) == errno.EOVERFLOW
    assert compat_errno(ctx, abi.VFIO_IOMMU_MAP_DMA, dma_map(0x10000, 0x1000, 100)) == errno.EINVAL
    last_page = (1 << 48) - PAGE  # the last page of the reported range maps
    compat_call(ctx, abi.VFIO_IOMMU_MAP_DMA, dma_map(0x10000, last_page, PAGE))
    compat_call(ctx, abi.VFIO_IOMMU_MAP_DMA, dma_map(0x20000, 0x100000, 4 * PAGE))
    assert compat_errno(ctx, abi.VFIO_IOMMU_MAP_DMA, dma_map(0x30000, 0x101000, PAGE)) == errno.EEXIST
    # type1v2: unmapping part of a mapping is ENOENT, with size written back as 0
    with pytest.raises(VfioError) as exc:
        compat_call(ctx, abi.VFIO_IOMMU_UNMAP_DMA, dma_unmap(0x101000, PAGE))
    assert exc.value.errno == errno.ENOENT
    _, out = compat_call(ctx, abi.VFIO_IOMMU_UNMAP_DMA, dma_unmap(last_page, PAGE))
    assert abi.vfio_iommu_type1_dma_unmap.from_buffer_copy(out).size == PAGE
    assert compat_errno(ctx, abi.VFIO_IOMMU_UNMAP_DMA, dma_unmap(0, PAGE, flags=abi.VFIO_DMA_UNMAP_FLAG_ALL)) \
        == errno.EINVAL
    _, out = compat_call(ctx, abi.VFIO_IOMMU_UNMAP_DMA, dma_unmap(0, 0, flags=abi.VFIO_DMA_UNMAP_FLAG_ALL))
    assert abi.vfio_iommu_type1_dma_unmap.from_buffer_copy(out).size == 4 * PAGE
    assert ctx.vfio_ioas.mappings == []


def test_compat_type1_unmaps_part_of_a_mapping():
    """SET_IOMMU(VFIO_TYPE1_IOMMU) disables large pages: UNMAP_DMA cuts mappings first."""
    ctx = attached_compat()
    compat_call(ctx, abi.VFIO_SET_IOMMU, abi.VFIO_TYPE1_IOMMU)
    compat_call(ctx, abi.VFIO_IOMMU_MAP_DMA, dma_map(0x20000, 0x100000, 4 * PAGE))
    _, out = compat_call(ctx, abi.VFIO_IOMMU_UNMAP_DMA, dma_unmap(0x101000, 2 * PAGE))
    assert abi.vfio_iommu_type1_dma_unmap.from_buffer_copy(out).size == 2 * PAGE
    assert [(m.iova, m.length, m.user_va) for m in ctx.vfio_ioas.mappings] == [
        (0x100000, PAGE, 0x20000), (0x103000, PAGE, 0x23000)]


# --- extended config space: what a model may implement ----------------------------------------------

class ErrorStatusModel(DeviceModel):
    """Two write-1-to-clear registers in extended config space, as the I/OAT model needs."""

    def __init__(self, spec: DeviceSpec) -> None:
        super().__init__(spec)
        self.extended = {0x148: 0x0000_0011, 0x180: 0x0000_0100}
        self.seen: list[tuple[int, bytes]] = []

    def config_read(self, offset: int, size: int) -> bytes:
        base = offset & ~3
        value = self.extended.get(base, 0).to_bytes(4, "little")
        return value[offset - base : offset - base + size]

    def config_write(self, offset: int, data: bytes) -> None:
        self.seen.append((offset, data))
        if offset in self.extended and len(data) == 4:
            self.extended[offset] &= ~int.from_bytes(data, "little")


def test_a_model_serves_extended_config_space_in_dword_pieces():
    from vfiofs.models.spec import Capability

    spec = DeviceSpec(name="express", model="generic", identity=ID, capabilities=(Capability(kind="pcie"),))
    model = ErrorStatusModel(spec)
    driver = VfioPciDevice(model)
    cfg = 7 << 40
    assert driver.region_info(7)[0] == 4096
    assert driver.read(cfg + 0x148, 4) == (0x11).to_bytes(4, "little")
    assert driver.write(cfg + 0x148, (0x10).to_bytes(4, "little")) == 4  # W1C
    assert driver.read(cfg + 0x148, 4) == (0x01).to_bytes(4, "little")
    assert driver.read(cfg + 0x144, 12) == bytes(4) + (1).to_bytes(4, "little") + bytes(4)
    model.seen.clear()
    driver.write(cfg + 0xFE, bytes(8))  # across 0x100: the first two bytes are conventional space
    assert model.seen == [(0x100, bytes(4)), (0x104, bytes(2))]
    assert driver.read(cfg + 0x181, 1) == b"\x01"
    for offset, size in ((0x1000, 4), (0xFFE, 4)):
        with pytest.raises(VfioError) as exc:
            driver.read(cfg + offset, size)
        assert exc.value.errno == errno.EFAULT
    conventional = VfioPciDevice(ErrorStatusModel(RAM_SPEC))
    with pytest.raises(VfioError) as exc:
        conventional.read(cfg + 0x148, 4)
    assert exc.value.errno == errno.EFAULT  # 256 bytes: no extended space
