"""The I/OAT DMA engine model (vfiofs/models/ioat.py, devices/vioat.toml) without a mount.

The model runs on a standalone context connected to test doubles — a manual scheduler, a
recording interrupt sink and a fake IOMMU over a bytearray of "host memory" — as vfio-pci
connects the real ones. The mount tests are in tests/mount/test_ioat.py.
"""

from __future__ import annotations

import struct

import pytest

from support import ModelRig, model_rig
from support import rig_read as rd, rig_write as wr
from vfiofs import abi
from vfiofs.host.definitions import bundled_directory, load_definition
from vfiofs.models.ioat import IoatDevice

MSIX = abi.VFIO_PCI_MSIX_IRQ_INDEX
HOST_IOVA = 0x100000  # where the fake IOMMU maps the "host memory"
HOST_SIZE = 0x10000
UNMAPPED = 0x8000_0000

CH = 0x80
CHANCTRL, DMA_COMP, CHANCMD, DMACOUNT = CH + 0x00, CH + 0x02, CH + 0x04, CH + 0x06
CHANSTS, CHAINADDR, CHANCMP, CDAR, CHANERR, ERRMASK = CH + 0x08, CH + 0x10, CH + 0x18, CH + 0x20, CH + 0x28, CH + 0x2C
ACTIVE, DONE, SUSPENDED, HALTED = 0, 1, 2, 3
REARM, ERR_COMPL, ABORT_EN, ERR_INT = 0x01, 0x04, 0x08, 0x10
RESET, SUSPEND, RESUME = 0x20, 0x04, 0x10
INT_EN, COMPL_WRITE, NULL = 0x01, 0x08, 0x20

SPEC = load_definition(bundled_directory() / "vioat.toml").spec


def make(cls=IoatDevice, irq_type: str = "msix") -> ModelRig:
    return model_rig(cls, SPEC, irq_type, HOST_IOVA, HOST_SIZE)


@pytest.fixture
def ioat():
    rig = make()
    yield rig
    rig.model.shutdown()


def run(rig: ModelRig) -> int:
    """Let every due timer run (the daemon's loop, with nothing else to do)."""
    return rig.clock.advance(0)


def status(rig: ModelRig) -> int:
    return rd(rig, CHANSTS, 8) & 7


def descriptor(size: int, src: int, dst: int, nxt: int, ctl: int = 0, op: int = 0) -> bytes:
    return struct.pack("<IIQQQ", size, ctl | op << 24, src, dst, nxt) + bytes(32)


DESC = HOST_IOVA  # descriptors at the start of host memory, 64 bytes apart
SRC = HOST_IOVA + 0x4000
DST = HOST_IOVA + 0x8000


def kick(rig: ModelRig, chain: int, count: int, chanctrl: int = REARM | ABORT_EN) -> None:
    """What the selftests' ioat driver does to start: CHAINADDR, CHANCTRL, DMACOUNT."""
    wr(rig, CHAINADDR, chain, 8)
    wr(rig, CHANCTRL, chanctrl, 2)
    wr(rig, DMACOUNT, count, 2)


def driver_init(rig: ModelRig) -> None:
    """The selftest driver's init: clear errors, RESET, wait, INTRCTRL = MSIX_VECTOR_CONTROL."""
    wr(rig, CHANERR, rd(rig, CHANERR))
    wr(rig, CHANCMD, RESET, 1)
    run(rig)
    assert rd(rig, CHANCMD, 1) == 0 and status(rig) == HALTED
    wr(rig, 0x03, 0x08, 1)


# -- registers -----------------------------------------------------------------------------------------

def test_power_on_values(ioat):
    assert rd(ioat, 0x00, 1) == 1  # CHANCNT
    assert rd(ioat, 0x01, 1) == 12  # XFERCAP: 4 KiB
    assert rd(ioat, 0x08, 1) == 0x33  # VER
    assert [rd(ioat, o, 1) for o in (0x02, 0x03)] == [0, 0]
    assert [rd(ioat, o) for o in (0x04, 0x10)] == [0, 0]  # ATTNSTATUS, DMACAP
    assert [rd(ioat, o, 2) for o in (0x0C, 0x0E)] == [0, 0]
    assert rd(ioat, CHANCTRL, 2) == 0 and rd(ioat, DMA_COMP, 2) == 0x0002
    assert rd(ioat, CHANCMD, 1) == 0 and rd(ioat, DMACOUNT, 2) == 0
    assert rd(ioat, CHANSTS, 8) == HALTED  # halted from power-on
    assert [rd(ioat, o, 8) for o in (CHAINADDR, CHANCMP, CDAR)] == [0, 0, 0]
    assert rd(ioat, CHANERR) == 0 and rd(ioat, ERRMASK) == 0
    assert ioat.model.bar_read(0, 0, 16) == bytes.fromhex("010c0000000000003300000000000000")


def test_read_only_registers_ignore_writes(ioat):
    for offset, size in ((0x00, 1), (0x01, 1), (0x08, 1), (0x0E, 2), (0x10, 4), (DMA_COMP, 2), (CHANSTS, 8),
                         (CDAR, 8)):
        before = rd(ioat, offset, size)
        wr(ioat, offset, (1 << 8 * size) - 1, size)
        assert rd(ioat, offset, size) == before, hex(offset)


def test_reserved_offsets_read_zero_and_ignore_writes(ioat):
    for offset in (0x14, 0x40, 0x7C, CH + 0x30, 0xFC):
        wr(ioat, offset, 0xFFFFFFFF)
        assert rd(ioat, offset) == 0, hex(offset)


def test_read_write_registers_keep_what_was_written(ioat):
    wr(ioat, 0x02, 0x5A, 1)
    assert rd(ioat, 0x02, 1) == 0x5A
    wr(ioat, 0x0C, 0xFFFF, 2)
    assert rd(ioat, 0x0C, 2) == 0x3FFF  # the delay field only
    wr(ioat, CHANCTRL, 0x0009, 2)
    assert rd(ioat, CHANCTRL, 2) == 0x0009
    wr(ioat, CHANCMP, 0x1122334455667780, 8)
    assert rd(ioat, CHANCMP, 8) == 0x1122334455667780
    wr(ioat, ERRMASK, 0xDEADBEEF)
    assert rd(ioat, ERRMASK) == 0xDEADBEEF


def test_intrctrl_keeps_only_its_enable_bits(ioat):
    wr(ioat, 0x03, 0xFF, 1)
    assert rd(ioat, 0x03, 1) == 0x09  # MASTER_INT_EN | MSIX_VECTOR_CONTROL; status bits read-only
    wr(ioat, 0x03, 0x08, 1)
    assert rd(ioat, 0x03, 1) == 0x08


def test_chainaddr_in_two_halves(ioat):
    wr(ioat, CHAINADDR, 0x89ABCDC0)
    wr(ioat, CHAINADDR + 4, 0x01234567)
    assert rd(ioat, CHAINADDR, 8) == 0x0123456789ABCDC0
    assert rd(ioat, CHAINADDR) == 0x89ABCDC0 and rd(ioat, CHAINADDR + 4) == 0x01234567


def test_chanerr_is_write_one_to_clear(ioat):
    kick(ioat, UNMAPPED, 1)  # a fetch fault sets CHAIN_ADDR_VALUE_ERR
    run(ioat)
    assert rd(ioat, CHANERR) == 0x10
    wr(ioat, CHANERR, 0x01)  # not set: no change
    assert rd(ioat, CHANERR) == 0x10
    wr(ioat, CHANERR + 1, 0xFF, 1)  # a byte that does not cover bit 4 clears nothing
    assert rd(ioat, CHANERR) == 0x10
    wr(ioat, CHANERR, 0x10)
    assert rd(ioat, CHANERR) == 0


def test_memory_beyond_the_register_page_is_plain_memory(ioat):
    wr(ioat, 0x100, 0xCAFEF00D)
    assert rd(ioat, 0x100) == 0xCAFEF00D
    wr(ioat, 0xFC, 0x1122334455667788, 8)  # spans the reserved 0xFC and memory at 0x100
    assert rd(ioat, 0xFC) == 0 and rd(ioat, 0x100) == 0x11223344


def test_msix_table_starts_masked_in_bar0(ioat):
    assert rd(ioat, 0x2000 + 12) == 1  # vector 0 control: masked


def test_register_values_are_in_the_bar_memory(ioat):
    """A mapping of BAR0 reads the same values as pread (the memory is the register file)."""
    memory = ioat.model.memory[0]
    assert memory.read(0x08, 1) == b"\x33" and memory.read(CHANSTS, 8) == HALTED.to_bytes(8, "little")
    wr(ioat, CHAINADDR, DESC, 8)
    assert memory.read(CHAINADDR, 8) == DESC.to_bytes(8, "little")


# -- commands ------------------------------------------------------------------------------------------

def test_reset_reads_back_until_done_then_halted(ioat):
    wr(ioat, CHAINADDR, DESC, 8)
    wr(ioat, CHANCTRL, 0x0009, 2)
    wr(ioat, CHANCMP, HOST_IOVA + 0x100, 8)
    ioat.host.put(DESC, descriptor(8, SRC, DST, DESC))
    wr(ioat, DMACOUNT, 1, 2)
    run(ioat)
    assert status(ioat) == DONE
    wr(ioat, CHANCMD, RESET, 1)
    assert rd(ioat, CHANCMD, 1) == RESET  # in progress
    wr(ioat, DMACOUNT, 2, 2)  # ignored while resetting
    assert run(ioat) == 1
    assert rd(ioat, CHANCMD, 1) == 0
    assert rd(ioat, CHANSTS, 8) == HALTED
    assert [rd(ioat, o, 8) for o in (CHAINADDR, CHANCMP, CDAR)] == [0, 0, 0]
    assert rd(ioat, CHANCTRL, 2) == 0 and rd(ioat, DMACOUNT, 2) == 0


class SlowResetIoat(IoatDevice):
    reset_delay = 0.01


def test_reset_delay_is_configurable():
    rig = make(SlowResetIoat)
    try:
        wr(rig, CHANCMD, RESET, 1)
        assert rig.clock.advance(0.005) == 0 and rd(rig, CHANCMD, 1) == RESET
        assert rig.clock.advance(0.005) == 1 and rd(rig, CHANCMD, 1) == 0
    finally:
        rig.model.shutdown()


class PacedIoat(IoatDevice):
    batch_delay = 1.0  # one batch per advance(0), the next one a second later


@pytest.fixture
def paced():
    rig = make(PacedIoat)
    yield rig
    rig.model.shutdown()


def test_reset_stops_a_running_chain(paced):
    ioat = paced
    ioat.host.put(DESC, descriptor(8, SRC, DST, DESC))
    ioat.host.put(SRC, b"12345678")
    kick(ioat, DESC, 1000)
    assert run(ioat) == 1  # one batch of 256
    assert status(ioat) == ACTIVE and rd(ioat, CHANSTS, 8) == DESC | ACTIVE
    wr(ioat, CHANCMD, RESET, 1)
    ioat.clock.advance(10)
    assert rd(ioat, CHANSTS, 8) == HALTED
    copies = sum(1 for kind, iova, _ in ioat.host.accesses if kind == "write" and iova == DST)
    assert copies == IoatDevice.batch


def test_suspend_after_done_and_restart_from_suspended(ioat):
    driver_init(ioat)
    ioat.host.put(DESC, descriptor(8, SRC, DST, DESC))
    ioat.host.put(SRC, b"abcdefgh")
    kick(ioat, DESC, 1)
    run(ioat)
    assert status(ioat) == DONE
    wr(ioat, CHANCMD, SUSPEND, 1)
    assert status(ioat) == SUSPENDED and rd(ioat, CHANCMD, 1) == 0
    ioat.host.put(SRC, b"ijklmnop")
    kick(ioat, DESC, 1)  # the selftest driver re-kicks a suspended channel this way
    run(ioat)
    assert status(ioat) == DONE and ioat.host.get(DST, 8) == b"ijklmnop"


def test_suspend_mid_chain_and_resume(paced):
    ioat = paced
    ioat.host.put(DESC, descriptor(8, SRC, DST, DESC))
    kick(ioat, DESC, 300)
    run(ioat)  # one batch
    wr(ioat, CHANCMD, SUSPEND, 1)
    assert status(ioat) == SUSPENDED
    assert run(ioat) == 0  # the next batch was cancelled
    assert ioat.model._completed == IoatDevice.batch
    wr(ioat, CHANCMD, RESUME, 1)
    assert status(ioat) == ACTIVE
    ioat.clock.advance(1)
    assert status(ioat) == DONE and ioat.model._completed == 300


def test_suspend_leaves_a_halted_channel_halted(ioat):
    wr(ioat, CHANCMD, SUSPEND, 1)
    assert status(ioat) == HALTED
    wr(ioat, CHANCMD, RESUME, 1)
    assert status(ioat) == HALTED


# -- copies --------------------------------------------------------------------------------------------

def test_one_copy_goes_active_then_done(ioat):
    driver_init(ioat)
    data = bytes(range(256)) * 16
    ioat.host.put(SRC, data)
    ioat.host.put(DESC, descriptor(len(data), SRC, DST, DESC))
    kick(ioat, DESC, 1)
    assert status(ioat) == ACTIVE  # until the loop runs the channel
    run(ioat)
    assert ioat.host.get(DST, len(data)) == data
    assert rd(ioat, CHANSTS, 8) == DESC | DONE  # the completed descriptor's address and DONE
    assert rd(ioat, CDAR, 8) == DESC and rd(ioat, CHANERR) == 0
    assert ioat.host.accesses == [("read", DESC, 64), ("read", SRC, 4096), ("write", DST, 4096)]
    assert ioat.irqs.take() == []  # no int_en


def test_a_chain_of_descriptors_followed_through_next(ioat):
    n = 5
    for i in range(n):
        ioat.host.put(SRC + 16 * i, bytes([0x41 + i]) * 16)
        ioat.host.put(DESC + 64 * i, descriptor(16, SRC + 16 * i, DST + 16 * (n - 1 - i), DESC + 64 * (i + 1)))
    kick(ioat, DESC, n)
    run(ioat)
    assert status(ioat) == DONE
    assert ioat.host.get(DST, 16 * n) == b"".join(bytes([0x41 + i]) * 16 for i in reversed(range(n)))
    assert rd(ioat, CHANSTS, 8) == (DESC + 64 * (n - 1)) | DONE
    fetched = [iova for kind, iova, size in ioat.host.accesses if size == 64]
    assert fetched == [DESC + 64 * i for i in range(n)]  # descriptor n+1 is never fetched


def test_count_repeats_a_self_linked_descriptor(ioat):
    ioat.host.put(DESC, descriptor(8, SRC, DST, DESC))
    ioat.host.put(SRC, b"repeated")
    kick(ioat, DESC, 1000)
    assert run(ioat) == 4  # ceil(1000 / 256) loop iterations
    assert status(ioat) == DONE and ioat.host.get(DST, 8) == b"repeated"
    assert sum(1 for kind, iova, _ in ioat.host.accesses if (kind, iova) == ("write", DST)) == 1000


def test_dmacount_counts_from_the_chain_load_and_appends(ioat):
    for i in range(3):
        ioat.host.put(SRC + 8 * i, bytes([0x61 + i]) * 8)
        ioat.host.put(DESC + 64 * i, descriptor(8, SRC + 8 * i, DST + 8 * i, DESC + 64 * (i + 1)))
    kick(ioat, DESC, 1)
    run(ioat)
    assert ioat.host.get(DST, 24) == b"a" * 8 + bytes(16)
    wr(ioat, DMACOUNT, 1, 2)  # the same count again: nothing more to do
    run(ioat)
    assert ioat.host.get(DST, 24) == b"a" * 8 + bytes(16) and status(ioat) == DONE
    wr(ioat, DMACOUNT, 3, 2)  # appending two: the chain continues at descriptor 1
    run(ioat)
    assert ioat.host.get(DST, 24) == b"a" * 8 + b"b" * 8 + b"c" * 8
    assert rd(ioat, CHANSTS, 8) == (DESC + 128) | DONE


def test_dmacount_wraps_at_16_bits(ioat):
    ioat.host.put(DESC, descriptor(0, SRC, DST, DESC))
    kick(ioat, DESC, 0xFFFF)
    run(ioat)
    wr(ioat, DMACOUNT, 0x0001, 2)  # two more, across the wrap
    run(ioat)
    assert status(ioat) == DONE
    assert sum(1 for _, _, size in ioat.host.accesses if size == 64) == 0x10001


def test_null_descriptor_transfers_nothing(ioat):
    ioat.host.put(DESC, descriptor(1, UNMAPPED, UNMAPPED, DESC, ctl=NULL))
    kick(ioat, DESC, 1)
    run(ioat)
    assert status(ioat) == DONE and rd(ioat, CHANERR) == 0
    assert ioat.host.accesses == [("read", DESC, 64)]


def test_completion_write_back_to_chancmp(ioat):
    wr(ioat, CHANCMP, HOST_IOVA + 0x200, 8)
    ioat.host.put(DESC, descriptor(8, SRC, DST, DESC + 64, ctl=COMPL_WRITE))
    ioat.host.put(DESC + 64, descriptor(8, SRC, DST, DESC))
    kick(ioat, DESC, 2)
    run(ioat)
    written = int.from_bytes(ioat.host.get(HOST_IOVA + 0x200, 8), "little")
    assert written == DESC | ACTIVE  # written after descriptor 0, while the chain went on
    wr(ioat, DMACOUNT, 3, 2)
    ioat.host.put(DESC, descriptor(8, SRC, DST, DESC + 64, ctl=COMPL_WRITE))
    run(ioat)
    assert int.from_bytes(ioat.host.get(HOST_IOVA + 0x200, 8), "little") == DESC | DONE


def test_no_write_back_without_chancmp(ioat):
    ioat.host.put(DESC, descriptor(8, SRC, DST, DESC, ctl=COMPL_WRITE))
    kick(ioat, DESC, 1)
    run(ioat)
    assert status(ioat) == DONE
    assert [a for a in ioat.host.accesses if a[0] == "write"] == [("write", DST, 8)]


# -- interrupts ----------------------------------------------------------------------------------------

def test_int_en_sends_msix_vector_0_exactly_once(ioat):
    driver_init(ioat)
    ioat.host.put(DESC, descriptor(8, SRC, DST, DESC, ctl=INT_EN))
    kick(ioat, DESC, 1)
    assert ioat.irqs.take() == []
    run(ioat)
    assert ioat.irqs.take() == [("irq", MSIX, 0)]
    assert rd(ioat, 0x03, 1) == 0x08 | 0x02  # INT_STATUS
    assert rd(ioat, 0x04) == 1  # ATTNSTATUS, cleared by the read
    assert rd(ioat, 0x04) == 0 and rd(ioat, 0x03, 1) == 0x08
    assert run(ioat) == 0 and ioat.irqs.take() == []


def test_no_interrupt_without_int_en(ioat):
    driver_init(ioat)
    ioat.host.put(DESC, descriptor(8, SRC, DST, DESC))
    kick(ioat, DESC, 100)
    run(ioat)
    assert status(ioat) == DONE and ioat.irqs.take() == [] and rd(ioat, 0x04) == 0


def test_one_interrupt_per_rearm(ioat):
    driver_init(ioat)
    ioat.host.put(DESC, descriptor(8, SRC, DST, DESC, ctl=INT_EN))
    kick(ioat, DESC, 3)  # three int_en completions, one INT_REARM
    run(ioat)
    assert ioat.irqs.take() == [("irq", MSIX, 0)]
    wr(ioat, CHANCTRL, REARM, 2)
    wr(ioat, DMACOUNT, 4, 2)
    run(ioat)
    assert ioat.irqs.take() == [("irq", MSIX, 0)]


def test_no_interrupt_unarmed_or_with_intrctrl_off(ioat):
    ioat.host.put(DESC, descriptor(8, SRC, DST, DESC, ctl=INT_EN))
    kick(ioat, DESC, 1, chanctrl=ABORT_EN)  # not armed
    run(ioat)
    assert ioat.irqs.take() == []
    kick(ioat, DESC, 1)  # armed, but INTRCTRL is 0 after power-on
    run(ioat)
    assert ioat.irqs.take() == [] and rd(ioat, 0x04) == 1  # the channel still reports attention


def test_master_int_en_also_lets_msix_out(ioat):
    wr(ioat, 0x03, 0x01, 1)
    ioat.host.put(DESC, descriptor(8, SRC, DST, DESC, ctl=INT_EN))
    kick(ioat, DESC, 1)
    run(ioat)
    assert ioat.irqs.take() == [("irq", MSIX, 0)]
    assert rd(ioat, 0x03, 1) == 0x01 | 0x02 | 0x04  # INT_STATUS and INT


def test_intx_when_msix_is_off():
    rig = make(irq_type="intx")
    try:
        wr(rig, 0x03, 0x01, 1)  # MASTER_INT_EN
        rig.host.put(DESC, descriptor(8, SRC, DST, DESC, ctl=INT_EN))
        kick(rig, DESC, 1)
        run(rig)
        assert rig.irqs.level and ("intx", True) in rig.irqs.take()
        assert rd(rig, 0x04) == 1  # reading ATTNSTATUS acknowledges
        assert not rig.irqs.level
    finally:
        rig.model.shutdown()


# -- errors --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("src", "dst", "error"), [(UNMAPPED, DST, 0x01), (SRC, UNMAPPED, 0x02)])
def test_unmapped_copy_halts_with_chanerr_and_no_interrupt(ioat, src, dst, error):
    driver_init(ioat)
    ioat.host.put(DESC, descriptor(64, src, dst, DESC, ctl=INT_EN))
    kick(ioat, DESC, 1)
    run(ioat)  # raises nothing
    assert status(ioat) == HALTED and rd(ioat, CHANERR) == error
    assert rd(ioat, CDAR, 8) == DESC
    assert ioat.irqs.take() == []
    assert ioat.host.get(DST, 64) == bytes(64)
    # halted by an error, the channel does not start again until the error is cleared and reset
    kick(ioat, DESC, 1)
    assert run(ioat) == 0 and status(ioat) == HALTED
    # the selftest driver's recovery: clear CHANERR, RESET; then a good copy works
    driver_init(ioat)
    ioat.host.put(SRC, b"recovers")
    ioat.host.put(DESC, descriptor(8, SRC, DST, DESC, ctl=INT_EN))
    kick(ioat, DESC, 1)
    run(ioat)
    assert status(ioat) == DONE and ioat.host.get(DST, 8) == b"recovers"
    assert ioat.irqs.take() == [("irq", MSIX, 0)]


def test_a_halt_stops_the_repeats(ioat):
    ioat.host.put(DESC, descriptor(8, SRC, UNMAPPED, DESC))
    kick(ioat, DESC, 1000)
    run(ioat)
    assert status(ioat) == HALTED and ioat.model._completed == 0
    assert sum(1 for _, _, size in ioat.host.accesses if size == 64) == 1


@pytest.mark.parametrize(("chain", "error"), [(UNMAPPED, 0x10), (DESC + 8, 0x10)])
def test_bad_chain_address(ioat, chain, error):
    kick(ioat, chain, 1)
    run(ioat)
    assert status(ioat) == HALTED and rd(ioat, CHANERR) == error


def test_bad_next_address(ioat):
    ioat.host.put(DESC, descriptor(8, SRC, DST, UNMAPPED))
    kick(ioat, DESC, 2)
    run(ioat)
    assert status(ioat) == HALTED and rd(ioat, CHANERR) == 0x04
    assert rd(ioat, CHANSTS, 8) == DESC | HALTED  # descriptor 0 completed
    ioat.host.put(DESC, descriptor(8, SRC, DST, DESC + 4))
    driver_init(ioat)
    kick(ioat, DESC, 2)
    run(ioat)
    assert rd(ioat, CHANERR) == 0x08  # NEXT_DESC_ALIGN_ERR


def test_unsupported_op_and_oversized_copy(ioat):
    ioat.host.put(DESC, descriptor(8, SRC, DST, DESC, op=0x01))  # FILL: not modelled
    kick(ioat, DESC, 1)
    run(ioat)
    assert status(ioat) == HALTED and rd(ioat, CHANERR) == 0x400
    driver_init(ioat)
    ioat.host.put(DESC, descriptor(4097, SRC, DST, DESC))
    kick(ioat, DESC, 1)
    run(ioat)
    assert status(ioat) == HALTED and rd(ioat, CHANERR) == 0x800
    assert [a for a in ioat.host.accesses if a[0] == "write"] == []


def test_error_completion_and_error_interrupt(ioat):
    wr(ioat, 0x03, 0x08, 1)
    wr(ioat, CHANCMP, HOST_IOVA + 0x200, 8)
    ioat.host.put(DESC, descriptor(8, UNMAPPED, DST, DESC))
    kick(ioat, DESC, 1, chanctrl=REARM | ERR_COMPL | ERR_INT)
    run(ioat)
    assert rd(ioat, CHANERR) == 0x01
    assert int.from_bytes(ioat.host.get(HOST_IOVA + 0x200, 8), "little") & 7 == HALTED
    assert ioat.irqs.take() == [("irq", MSIX, 0)]


def test_faulting_write_back_halts(ioat):
    wr(ioat, CHANCMP, UNMAPPED, 8)
    ioat.host.put(DESC, descriptor(8, SRC, DST, DESC, ctl=COMPL_WRITE))
    kick(ioat, DESC, 1)
    run(ioat)
    assert status(ioat) == HALTED and rd(ioat, CHANERR) == 0x1000


def test_dma_without_an_attachment_halts(ioat):
    ioat.model.context.connect_dma(None)
    kick(ioat, DESC, 1)
    run(ioat)
    assert status(ioat) == HALTED and rd(ioat, CHANERR) == 0x10


# -- device reset --------------------------------------------------------------------------------------

def test_device_reset_restores_power_on(ioat):
    wr(ioat, 0x03, 0x08, 1)
    ioat.host.put(DESC, descriptor(8, SRC, DST, DESC))
    kick(ioat, DESC, 1000)
    run(ioat)
    ioat.irqs.take()
    ioat.model.reset()
    assert run(ioat) == 0  # the chain was cancelled
    assert rd(ioat, CHANSTS, 8) == HALTED and rd(ioat, 0x03, 1) == 0 and rd(ioat, CHAINADDR, 8) == 0
    assert rd(ioat, 0x08, 1) == 0x33 and rd(ioat, 0x01, 1) == 12 and rd(ioat, 0x2000 + 12) == 1
    kick(ioat, DESC, 1)  # and it works afterwards
    run(ioat)
    assert status(ioat) == DONE


class BigIoat(IoatDevice):
    xfercap = 16
    version = 0x32


def test_constants_are_class_attributes():
    rig = make(BigIoat)
    try:
        assert rd(rig, 0x01, 1) == 16 and rd(rig, 0x08, 1) == 0x32
    finally:
        rig.model.shutdown()


def test_bundled_definition():
    definition = load_definition(bundled_directory() / "vioat.toml")
    assert definition.name == "ioat" and definition.model == "ioat" and definition.factory is IoatDevice
    identity = SPEC.identity
    assert (identity.vendor, identity.device, identity.class_code, identity.revision) == (0x8086, 0x2021, 0x088000,
                                                                                         0x04)
    (bar,) = SPEC.bars
    assert (bar.index, bar.size, bar.is_64bit, bar.mmap) == (0, 16384, True, True)
    msix = SPEC.capability("msix")
    assert (msix.vectors, msix.table_bar, msix.table_offset, msix.pba_bar, msix.pba_offset) == (1, 0, 0x2000, 0,
                                                                                                0x3000)
    assert SPEC.express and SPEC.config_size == 4096
