"""Unit tests of the ioctl table (vfiofs.core.ioctl): prologue styles, ENOTTY, capability chains."""

from __future__ import annotations

import ctypes
import errno
import struct

import pytest

from vfiofs import abi
from vfiofs.core.ioctl import (Ioctl, IoctlArg, IoctlTable, RespondThenFail, Style, capability_chain, offsetofend,
                               place_capabilities)
from vfiofs.core.usermem import UserBuffer
from vfiofs.errors import VfioError


class Owner:
    def __init__(self) -> None:
        self.seen: list[object] = []

    def keep(self, arg: IoctlArg, cmd: object) -> int:
        self.seen.append(cmd)
        return 7


def errno_of(fn, *args) -> int:
    with pytest.raises(VfioError) as exc:
        fn(*args)
    return exc.value.errno


def arg_of(data: bytes | ctypes.Structure | None, value: int = 0) -> IoctlArg:
    return IoctlArg(UserBuffer(None if data is None else bytes(data)), value=value)


STATUS = Ioctl(1, Owner.keep, abi.vfio_group_status, offsetofend(abi.vfio_group_status, "flags"), Style.VFIO)
BIND = Ioctl(2, Owner.keep, abi.vfio_device_bind_iommufd, offsetofend(abi.vfio_device_bind_iommufd, "out_devid"),
             Style.VFIO_EXTENSIBLE)
ALLOC = Ioctl(3, Owner.keep, abi.iommu_ioas_alloc, offsetofend(abi.iommu_ioas_alloc, "out_ioas_id"), Style.IOMMUFD)
VALUE = Ioctl(4, Owner.keep, style=Style.RAW)


def test_offsetofend():
    assert offsetofend(abi.vfio_iommu_type1_info, "iova_pgsizes") == 16
    assert offsetofend(abi.iommu_ioas_map, "iova") == 40
    assert offsetofend(abi.vfio_device_detach_iommufd_pt, "flags") == 8


def test_vfio_style_copies_minsz_and_checks_argsz():
    owner = Owner()
    assert STATUS.call(owner, arg_of(abi.vfio_group_status(argsz=8, flags=3))) == 7
    assert owner.seen[0].flags == 3
    assert errno_of(STATUS.call, owner, arg_of(abi.vfio_group_status(argsz=7))) == errno.EINVAL
    assert errno_of(STATUS.call, owner, arg_of(bytes(4))) == errno.EFAULT  # copy_from_user(minsz)
    assert errno_of(STATUS.call, owner, arg_of(None)) == errno.EFAULT
    assert len(owner.seen) == 1


def test_vfio_extensible_reads_argsz_before_copying():
    owner = Owner()
    assert errno_of(BIND.call, owner, arg_of(None)) == errno.EFAULT
    assert errno_of(BIND.call, owner, arg_of(struct.pack("<I", 15))) == errno.EINVAL  # before any copy
    assert errno_of(BIND.call, owner, arg_of(abi.vfio_device_bind_iommufd(argsz=40))) == errno.EFAULT
    bigger = bytes(abi.vfio_device_bind_iommufd(argsz=32))
    assert errno_of(BIND.call, owner, arg_of(bigger + bytes(7) + b"\1")) == errno.E2BIG
    assert BIND.call(owner, arg_of(bigger + bytes(8))) == 7
    assert BIND.call(owner, arg_of(struct.pack("<IIiI", 16, 0, 5, 0))) == 7  # short: zero-extended
    assert owner.seen[-1].iommufd == 5 and owner.seen[-1].out_devid == 0


def test_iommufd_style_writes_back_up_to_the_callers_size():
    def handler(owner, arg, cmd):
        cmd.out_ioas_id = 9

    row = Ioctl(3, handler, abi.iommu_ioas_alloc, 12, Style.IOMMUFD)
    arg = arg_of(bytes(abi.iommu_ioas_alloc(size=16)) + bytes(4))
    assert row.call(None, arg) == 0
    assert arg.buf.data == bytes(abi.iommu_ioas_alloc(size=16, out_ioas_id=9)) + bytes(4)
    assert errno_of(ALLOC.call, Owner(), arg_of(abi.iommu_ioas_alloc(size=11))) == errno.EINVAL


def test_respond_then_fail_writes_back_and_fails():
    def handler(owner, arg, cmd):
        cmd.out_ioas_id = 4
        raise RespondThenFail(errno.EMSGSIZE, "needs more room")

    arg = arg_of(abi.iommu_ioas_alloc(size=12))
    with pytest.raises(VfioError) as exc:
        Ioctl(3, handler, abi.iommu_ioas_alloc, 12, Style.IOMMUFD).call(None, arg)
    assert exc.value.errno == errno.EMSGSIZE and exc.value.detail == "needs more room"
    assert not isinstance(exc.value, RespondThenFail)
    assert arg.buf.written and abi.iommu_ioas_alloc.from_buffer_copy(bytes(arg.buf.data)).out_ioas_id == 4


def test_other_errors_write_nothing_back():
    def handler(owner, arg, cmd):
        cmd.out_ioas_id = 4
        raise VfioError(errno.ENOENT)

    arg = arg_of(abi.iommu_ioas_alloc(size=12))
    assert errno_of(Ioctl(3, handler, abi.iommu_ioas_alloc, 12, Style.IOMMUFD).call, None, arg) == errno.ENOENT
    assert not arg.buf.written


def test_raw_style_leaves_the_argument_to_the_handler():
    owner = Owner()
    assert VALUE.call(owner, arg_of(None, value=3)) == 7 and owner.seen == [None]
    assert VALUE.copy_in(arg_of(None)) is None


def test_copy_in_is_the_prologue_alone():
    assert BIND.copy_in(arg_of(abi.vfio_device_bind_iommufd(argsz=24, iommufd=3))).iommufd == 3
    assert errno_of(BIND.copy_in, arg_of(struct.pack("<I", 8))) == errno.EINVAL


def test_table_dispatch_and_enotty():
    table = IoctlTable("test", [STATUS, VALUE])
    owner = Owner()
    assert 1 in table and 2 not in table
    assert table.dispatch(owner, 4, arg_of(None)) == 7
    assert errno_of(table.dispatch, owner, 2, arg_of(bytes(64))) == errno.ENOTTY
    assert errno_of(table.dispatch, owner, 2, arg_of(None)) == errno.ENOTTY  # before touching the argument
    assert Ioctl(5, lambda owner, arg, cmd: None, style=Style.RAW).call(owner, arg_of(None)) == 0
    with pytest.raises(ValueError):
        IoctlTable("twice", [VALUE, VALUE])


def _header(cap_id: int) -> abi.vfio_info_cap_header:
    return abi.vfio_info_cap_header(id=cap_id, version=1)


def test_capability_chain_layout():
    iova = abi.vfio_iommu_type1_info_cap_iova_range(header=_header(1), nr_iovas=2)
    ranges = [abi.vfio_iova_range(start=0, end=0xFFF), abi.vfio_iova_range(start=0x2000, end=0x2FFF)]
    avail = abi.vfio_iommu_type1_info_dma_avail(header=_header(3), avail=65535)
    chain = capability_chain([(iova, ranges), (avail, []), (_header(9), [])], base=24)
    # 16 + 2*16 = 48; 12 padded to 16; a bare header is 8
    assert len(chain) == 48 + 16 + 8
    assert struct.unpack_from("<HHIII", chain, 0) == (1, 1, 24 + 48, 2, 0)
    assert struct.unpack_from("<QQQQ", chain, 16) == (0, 0xFFF, 0x2000, 0x2FFF)
    assert struct.unpack_from("<HHII", chain, 48) == (3, 1, 24 + 64, 65535) and chain[60:64] == bytes(4)
    assert struct.unpack_from("<HHI", chain, 64) == (9, 1, 0)  # the last capability's next is 0
    assert capability_chain([], base=24) == b""


def test_place_capabilities_puts_the_chain_after_the_structure_when_it_fits():
    caps = [(abi.vfio_iommu_type1_info_dma_avail(header=_header(3), avail=1), [])]
    buf = UserBuffer(bytes(40))
    info = abi.vfio_iommu_type1_info(argsz=40)
    place_capabilities(buf, info, caps, 24)
    assert info.argsz == 40 and info.cap_offset == 24
    assert struct.unpack_from("<HHII", buf.data, 24) == (3, 1, 0, 1)


def test_place_capabilities_raises_argsz_when_the_chain_does_not_fit():
    caps = [(abi.vfio_iommu_type1_info_dma_avail(header=_header(3), avail=1), [])]
    buf = UserBuffer(bytes(24))
    info = abi.vfio_iommu_type1_info(argsz=24, cap_offset=99)
    place_capabilities(buf, info, caps, 24)
    assert info.argsz == 40 and info.cap_offset == 0
    assert not buf.written and buf.data == bytes(24)
