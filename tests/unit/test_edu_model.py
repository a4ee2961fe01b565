"""QEMU's edu device model (vfiofs/models/edu.py, devices/vedu.toml) without a mount.

The model runs on a standalone context whose far side is test doubles: a manual scheduler,
a recording interrupt sink and a fake IOMMU over a bytearray of "host memory" — connected
through the context as vfio-pci connects the real ones. The mount tests are in
tests/mount/test_edu.py.
"""

from __future__ import annotations


import pytest

from support import ModelRig, model_rig
from support import rig_read as rd, rig_write as wr
from vfiofs import abi
from vfiofs.host.definitions import bundled_directory, load_definition
from vfiofs.models.edu import EduDevice, factorial32

MSI = abi.VFIO_PCI_MSI_IRQ_INDEX
ONES4 = 0xFFFF_FFFF
ONES8 = 0xFFFF_FFFF_FFFF_FFFF
HOST_IOVA = 0x100000  # where the fake IOMMU maps the "host memory"
HOST_SIZE = 0x4000


# -- fixtures for the unit tests --------------------------------------------------------------------

SPEC = load_definition(bundled_directory() / "vedu.toml").spec


class SlowFactorialEdu(EduDevice):
    factorial_delay = 0.5


class FastDmaEdu(EduDevice):
    dma_delay = 0.001


def make(cls=EduDevice, irq_type: str = "none") -> ModelRig:
    return model_rig(cls, SPEC, irq_type, HOST_IOVA, HOST_SIZE)


@pytest.fixture
def edu():
    rig = make()
    yield rig
    rig.model.shutdown()


@pytest.fixture
def msi_edu():
    rig = make(irq_type="msi")
    yield rig
    rig.model.shutdown()


def advance(rig: ModelRig, seconds: float = 0.0) -> int:
    return rig.clock.advance(seconds)


def snapshot(rig: ModelRig) -> tuple:
    """Everything the driver can observe through BAR0, and the DMA buffer."""
    return (tuple(rd(rig, offset) for offset in (0x04, 0x08, 0x20, 0x24)),
            tuple(rd(rig, offset, 8) for offset in (0x80, 0x88, 0x90, 0x98)), bytes(rig.model.buffer))


# -- identification, liveness -----------------------------------------------------------------------

def test_identification(edu):
    assert rd(edu, 0x00) == 0x010000ED
    wr(edu, 0x00, 0)  # read-only
    assert rd(edu, 0x00) == 0x010000ED


def test_liveness_stores_the_complement(edu):
    assert rd(edu, 0x04) == 0
    wr(edu, 0x04, 0x12345678)
    assert rd(edu, 0x04) == 0xEDCBA987
    wr(edu, 0x04, 0)
    assert rd(edu, 0x04) == 0xFFFFFFFF
    wr(edu, 0x04, 0xFFFFFFFF)
    assert rd(edu, 0x04) == 0


# -- factorial ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("n", "result"), [(0, 1), (1, 1), (5, 120), (12, 479001600), (13, 0x7328CC00),
                                           (33, 0x80000000), (34, 0), (0xFFFFFFFF, 0)])
def test_factorial_values(edu, n, result):
    wr(edu, 0x08, n)
    advance(edu)
    assert rd(edu, 0x08) == result
    assert rd(edu, 0x20) == 0


def test_factorial32_wraps_like_uint32():
    product = 1
    for n in range(40):
        product *= max(n, 1)
        assert factorial32(n) == product % (1 << 32)


def test_factorial_is_asynchronous_with_the_busy_bit(edu):
    wr(edu, 0x08, 5)
    assert rd(edu, 0x20) == 0x01  # computing
    assert rd(edu, 0x08) == 5  # the input until the result replaces it
    wr(edu, 0x08, 7)  # ignored while busy
    assert rd(edu, 0x08) == 5
    assert advance(edu) == 1  # factorial_delay 0: the next loop iteration
    assert rd(edu, 0x20) == 0
    assert rd(edu, 0x08) == 120
    assert edu.irqs.take() == []  # status 0x80 was not set
    wr(edu, 0x08, 4)  # idle again: accepted
    advance(edu)
    assert rd(edu, 0x08) == 24


def test_factorial_delay_is_configurable():
    rig = make(SlowFactorialEdu)
    try:
        wr(rig, 0x08, 6)
        assert advance(rig, 0.25) == 0
        assert rd(rig, 0x20) == 0x01 and rd(rig, 0x08) == 6
        assert advance(rig, 0.25) == 1
        assert rd(rig, 0x20) == 0 and rd(rig, 0x08) == 720
    finally:
        rig.model.shutdown()


def test_status_write_keeps_only_the_irq_bit(edu):
    wr(edu, 0x20, 0xFFFFFFFF)
    assert rd(edu, 0x20) == 0x80
    wr(edu, 0x20, 0x7F)
    assert rd(edu, 0x20) == 0x00
    wr(edu, 0x20, 0x01)  # the busy bit is read-only
    assert rd(edu, 0x20) == 0x00
    wr(edu, 0x08, 3)
    wr(edu, 0x20, 0x80)
    assert rd(edu, 0x20) == 0x81
    wr(edu, 0x20, 0x00)  # clearing does not stop the computation
    assert rd(edu, 0x20) == 0x01
    advance(edu)
    assert rd(edu, 0x20) == 0x00 and rd(edu, 0x08) == 6


def test_factorial_interrupt_by_intx(edu):
    wr(edu, 0x20, 0x80)
    wr(edu, 0x08, 5)
    assert edu.irqs.take() == []
    advance(edu)
    assert edu.irqs.take() == [("intx", True)]
    assert rd(edu, 0x24) == 0x1
    assert rd(edu, 0x20) == 0x80
    wr(edu, 0x64, 0x1)
    assert rd(edu, 0x24) == 0
    assert edu.irqs.take() == [("intx", False)]


def test_factorial_interrupt_by_msi(msi_edu):
    wr(msi_edu, 0x20, 0x80)
    wr(msi_edu, 0x08, 12)
    advance(msi_edu)
    assert msi_edu.irqs.take() == [("irq", MSI, 0)]
    assert rd(msi_edu, 0x08) == 479001600 and rd(msi_edu, 0x24) == 0x1
    wr(msi_edu, 0x64, 0x1)  # the driver acks with MSI too; no INTx change
    assert rd(msi_edu, 0x24) == 0
    assert msi_edu.irqs.take() == []


# -- raise / acknowledge ---------------------------------------------------------------------------

def test_raise_and_ack_drive_the_intx_level(edu):
    sink = edu.irqs
    wr(edu, 0x60, 0)  # nothing pending, nothing raised
    assert sink.take() == [] and rd(edu, 0x24) == 0
    wr(edu, 0x60, 0x10)
    assert rd(edu, 0x24) == 0x10 and sink.take() == [("intx", True)]
    wr(edu, 0x60, 0x20)
    assert rd(edu, 0x24) == 0x30 and sink.take() == [("intx", True)]  # still asserted (a level)
    wr(edu, 0x64, 0x10)
    assert rd(edu, 0x24) == 0x20 and sink.take() == []  # not yet zero: stays asserted
    wr(edu, 0x64, 0xFFFFFFFF)
    assert rd(edu, 0x24) == 0 and sink.take() == [("intx", False)]


def test_raise_sends_an_msi_message_on_every_write(msi_edu):
    sink = msi_edu.irqs
    wr(msi_edu, 0x60, 0)
    assert sink.take() == []
    wr(msi_edu, 0x60, 0x4)
    wr(msi_edu, 0x60, 0x4)
    wr(msi_edu, 0x60, 0)  # irq_status is still non-zero: another message
    assert sink.take() == [("irq", MSI, 0)] * 3
    assert rd(msi_edu, 0x24) == 0x4
    wr(msi_edu, 0x64, 0x4)
    assert rd(msi_edu, 0x24) == 0 and sink.take() == []  # MSI enabled: no deassert
    wr(msi_edu, 0x60, 0x8000_0000)
    assert rd(msi_edu, 0x24) == 0x8000_0000 and sink.take() == [("irq", MSI, 0)]


def test_switching_from_msi_back_to_intx(msi_edu):
    wr(msi_edu, 0x60, 0x2)
    msi_edu.irqs.irq_type = "none"  # the driver disabled MSI
    msi_edu.irqs.take()
    wr(msi_edu, 0x60, 0x1)
    assert msi_edu.irqs.take() == [("intx", True)]
    wr(msi_edu, 0x64, 0x3)
    assert msi_edu.irqs.take() == [("intx", False)]


def test_irq_registers_access(edu):
    assert rd(edu, 0x60) == ONES4  # write-only
    assert rd(edu, 0x64) == ONES4
    wr(edu, 0x24, 0x55)  # read-only
    assert rd(edu, 0x24) == 0
    assert edu.irqs.take() == []


# -- access rules ------------------------------------------------------------------------------------

@pytest.mark.parametrize("offset", [0x00, 0x04, 0x08, 0x20, 0x24])
@pytest.mark.parametrize("size", [1, 2, 3, 8, 16])
def test_wrong_size_below_0x80_reads_all_ones(edu, offset, size):
    wr(edu, 0x04, 0x12345678)
    assert edu.model.bar_read(0, offset, size) == b"\xff" * size


@pytest.mark.parametrize("size", [1, 2, 8])
def test_wrong_size_writes_below_0x80_are_ignored(edu, size):
    before = snapshot(edu)
    for offset in (0x04, 0x08, 0x20, 0x60, 0x64):
        wr(edu, offset, 0x80, size)
    assert snapshot(edu) == before
    assert edu.irqs.take() == []
    assert advance(edu, 1) == 0  # no factorial started


@pytest.mark.parametrize("offset", [0x02, 0x0C, 0x10, 0x1C, 0x28, 0x40, 0x68, 0x7C, 0x84, 0x8C, 0x94, 0x9C,
                                    0xA0, 0x100, 0x40000, 0xFFFFC])
def test_unlisted_offsets_read_all_ones_and_ignore_writes(edu, offset):
    before = snapshot(edu)
    assert rd(edu, offset) == ONES4
    if offset >= 0x80 and offset % 8 == 0:
        assert rd(edu, offset, 8) == ONES8
    wr(edu, offset, 0x12345678)
    if offset >= 0x80:
        wr(edu, offset, 0x1_0000_0001, 8)
    assert snapshot(edu) == before
    assert edu.irqs.take() == []


@pytest.mark.parametrize("size", [1, 2, 3, 16])
def test_wrong_size_from_0x80_reads_all_ones_and_ignores_writes(edu, size):
    wr(edu, 0x80, 0x1122334455667788, 8)
    assert edu.model.bar_read(0, 0x80, size) == b"\xff" * size
    wr(edu, 0x80, 0, size)
    wr(edu, 0x98, 1, size)
    assert rd(edu, 0x80, 8) == 0x1122334455667788
    assert rd(edu, 0x98, 8) == 0


# -- DMA registers -------------------------------------------------------------------------------------

@pytest.mark.parametrize("offset", [0x80, 0x88, 0x90])
def test_dma_address_registers(edu, offset):
    assert rd(edu, offset, 8) == 0
    wr(edu, offset, 0xAAAA_BBBB_CCCC_DDDD, 8)
    assert rd(edu, offset, 8) == 0xAAAA_BBBB_CCCC_DDDD
    assert rd(edu, offset, 4) == 0xCCCC_DDDD  # a 4-byte read: the low half
    assert rd(edu, offset + 4, 4) == ONES4  # +4 is no register
    wr(edu, offset + 4, 0x1111)  # ignored
    assert rd(edu, offset, 8) == 0xAAAA_BBBB_CCCC_DDDD
    wr(edu, offset, 0x1234)  # a 4-byte write replaces the whole register, zero-extended
    assert rd(edu, offset, 8) == 0x1234


def test_dma_command_needs_the_start_bit(edu):
    for value in (0x0, 0x2, 0x4, 0x6, 0xFFFF_FFFE):
        wr(edu, 0x98, value)
        wr(edu, 0x98, value, 8)
        assert rd(edu, 0x98, 8) == 0
    assert advance(edu, 1) == 0


def test_dma_registers_are_frozen_while_running(edu):
    wr(edu, 0x80, HOST_IOVA, 8)
    wr(edu, 0x88, 0x40000, 8)
    wr(edu, 0x90, 16, 8)
    wr(edu, 0x98, 0x1)
    assert rd(edu, 0x98) == 0x1
    for offset in (0x80, 0x88, 0x90):
        wr(edu, offset, 0x999, 8)
        wr(edu, offset, 0x999)
    wr(edu, 0x98, 0x7)
    assert [rd(edu, o, 8) for o in (0x80, 0x88, 0x90, 0x98)] == [HOST_IOVA, 0x40000, 16, 0x1]
    advance(edu, 0.1)
    assert rd(edu, 0x98) == 0
    wr(edu, 0x90, 32)  # idle again: writable
    assert rd(edu, 0x90) == 32


# -- DMA transfers -------------------------------------------------------------------------------------

def start_dma(rig: ModelRig, src: int, dst: int, count: int, cmd: int) -> None:
    wr(rig, 0x80, src, 8)
    wr(rig, 0x88, dst, 8)
    wr(rig, 0x90, count, 8)
    wr(rig, 0x98, cmd, 8)


def test_dma_round_trip_completes_after_100ms(edu):
    pattern = bytes((i * 7 + 3) & 0xFF for i in range(4096))
    edu.host.memory[0:4096] = pattern
    start_dma(edu, HOST_IOVA, 0x40000, 4096, 0x1)
    assert advance(edu, 0.05) == 0
    assert rd(edu, 0x98) == 0x1 and edu.host.accesses == []  # nothing happens before the delay
    assert advance(edu, 0.05) == 1
    assert rd(edu, 0x98) == 0
    assert edu.host.accesses == [("read", HOST_IOVA, 4096)]
    assert bytes(edu.model.buffer) == pattern
    assert rd(edu, 0x40000) == ONES4  # the buffer is not visible through BAR0
    # EDU → RAM, into another page
    start_dma(edu, 0x40000, HOST_IOVA + 0x2000, 4096, 0x3)
    assert rd(edu, 0x98) == 0x3
    advance(edu, 0.1)
    assert rd(edu, 0x98) == 0x2  # the start bit clears, the direction stays
    assert bytes(edu.host.memory[0x2000:0x3000]) == pattern
    assert edu.model.dma_errors == [] and edu.irqs.take() == []  # no 0x04: no interrupt


def test_dma_partial_transfers_inside_the_buffer(edu):
    edu.host.memory[0:8] = b"ABCDEFGH"
    start_dma(edu, HOST_IOVA, 0x40FF8, 8, 0x1)  # the last 8 bytes of the buffer
    advance(edu, 0.1)
    assert bytes(edu.model.buffer[0xFF8:]) == b"ABCDEFGH"
    start_dma(edu, 0x40FFC, HOST_IOVA + 0x100, 4, 0x3)
    advance(edu, 0.1)
    assert bytes(edu.host.memory[0x100:0x104]) == b"EFGH"
    start_dma(edu, HOST_IOVA, 0x41000, 0, 0x1)  # zero bytes at the end: nothing to copy, no error
    advance(edu, 0.1)
    assert edu.model.dma_errors == [] and rd(edu, 0x98) == 0


def test_dma_irq_0x100(edu, msi_edu):
    start_dma(edu, HOST_IOVA, 0x40000, 16, 0x1 | 0x4)
    advance(edu, 0.1)
    assert edu.irqs.take() == [("intx", True)]
    assert rd(edu, 0x24) == 0x100 and rd(edu, 0x98) == 0x4
    wr(edu, 0x64, 0x100)
    assert edu.irqs.take() == [("intx", False)]
    start_dma(msi_edu, 0x40000, HOST_IOVA, 16, 0x1 | 0x2 | 0x4)
    advance(msi_edu, 0.1)
    assert msi_edu.irqs.take() == [("irq", MSI, 0)]
    assert rd(msi_edu, 0x24) == 0x100


def test_dma_addresses_are_masked_to_28_bits(edu):
    assert edu.model.dma_mask == (1 << 28) - 1
    edu.host.memory[0:4] = b"mask"
    start_dma(edu, 0xF000_0000 | HOST_IOVA, 0x40000, 4, 0x1)
    advance(edu, 0.1)
    assert bytes(edu.model.buffer[:4]) == b"mask"
    start_dma(edu, 0x40000, 0x1_1000_0000 | (HOST_IOVA + 0x10), 4, 0x3)
    advance(edu, 0.1)
    assert bytes(edu.host.memory[0x10:0x14]) == b"mask"
    assert [a[1] for a in edu.host.accesses] == [HOST_IOVA, HOST_IOVA + 0x10]


@pytest.mark.parametrize(("device_addr", "count"), [(0x3FFF0, 0x20), (0x40FF0, 0x20), (0x40000, 0x1001),
                                                    (0x0, 4), (0x41000, 1), (0x40000, (1 << 64) - 1)])
@pytest.mark.parametrize("to_ram", [False, True])
def test_dma_outside_the_buffer_is_refused_and_the_command_completes(edu, device_addr, count, to_ram):
    edu.host.memory[:] = b"\x5a" * HOST_SIZE
    edu.model.buffer[:] = b"\xa5" * 4096
    if to_ram:
        start_dma(edu, device_addr, HOST_IOVA, count, 0x1 | 0x2 | 0x4)
    else:
        start_dma(edu, HOST_IOVA, device_addr, count, 0x1 | 0x4)
    advance(edu, 0.1)
    assert len(edu.model.dma_errors) == 1
    assert "refused" in edu.model.dma_errors[0] and "outside the buffer [0x40000, 0x41000)" in edu.model.dma_errors[0]
    assert edu.host.accesses == []  # not performed: host memory neither read nor written
    assert edu.host.memory == b"\x5a" * HOST_SIZE and edu.model.buffer == b"\xa5" * 4096
    assert rd(edu, 0x98) & 0x1 == 0  # completed
    assert rd(edu, 0x24) == 0x100 and edu.irqs.take() == [("intx", True)]


@pytest.mark.parametrize("to_ram", [False, True])
def test_dma_fault_is_recorded_and_the_command_completes(edu, to_ram):
    edu.model.buffer[:] = b"\xa5" * 4096
    unmapped = HOST_IOVA + HOST_SIZE - 8  # runs past the end of the mapping
    if to_ram:
        start_dma(edu, 0x40000, unmapped, 16, 0x1 | 0x2 | 0x4)
    else:
        start_dma(edu, unmapped, 0x40000, 16, 0x1 | 0x4)
    advance(edu, 0.1)
    assert len(edu.model.dma_errors) == 1
    assert "DMA fault" in edu.model.dma_errors[0] and f"{unmapped:#x}" in edu.model.dma_errors[0]
    assert edu.model.buffer == b"\xa5" * 4096
    assert rd(edu, 0x98) & 0x1 == 0 and rd(edu, 0x24) == 0x100
    assert edu.irqs.take() == [("intx", True)]


def test_dma_without_an_iommu_attachment_faults(edu):
    edu.model.context.connect_dma(None)  # detached, as after close: every DMA faults
    start_dma(edu, HOST_IOVA, 0x40000, 16, 0x1)
    advance(edu, 0.1)
    assert len(edu.model.dma_errors) == 1 and "not attached" in edu.model.dma_errors[0]
    assert rd(edu, 0x98) == 0


def test_dma_delay_is_configurable():
    rig = make(FastDmaEdu)
    try:
        start_dma(rig, HOST_IOVA, 0x40000, 16, 0x1)
        assert advance(rig, 0.001) == 1 and rd(rig, 0x98) == 0
    finally:
        rig.model.shutdown()


# -- reset ---------------------------------------------------------------------------------------------

def test_reset_restores_power_on_state(edu):
    wr(edu, 0x04, 0x12345678)
    wr(edu, 0x20, 0x80)
    wr(edu, 0x60, 0x30)
    edu.model.buffer[:4] = b"data"
    start_dma(edu, 0x0, 0x40000, 4, 0x1 | 0x4)  # pending; would fault
    wr(edu, 0x08, 5)  # pending
    assert rd(edu, 0x20) == 0x81
    edu.model.dma_errors.append("an old error")
    edu.irqs.take()
    edu.model.reset()
    assert edu.irqs.take() == [("intx", False)]
    assert [rd(edu, o) for o in (0x00, 0x04, 0x08, 0x20, 0x24)] == [0x010000ED, 0, 0, 0, 0]
    assert [rd(edu, o, 8) for o in (0x80, 0x88, 0x90, 0x98)] == [0, 0, 0, 0]
    assert edu.model.buffer == bytes(4096) and edu.model.dma_errors == []
    assert advance(edu, 1) == 0  # the factorial and the DMA were cancelled
    assert edu.irqs.take() == [] and edu.host.accesses == []
    wr(edu, 0x08, 5)  # and the device works afterwards
    advance(edu)
    assert rd(edu, 0x08) == 120


def test_bundled_definition():
    assert SPEC.name == "edu"
    identity = SPEC.identity
    assert (identity.vendor, identity.device, identity.revision, identity.class_code) == (0x1234, 0x11E8, 0x10,
                                                                                         0x00FF00)
    assert (identity.subsystem_vendor, identity.subsystem_device, identity.interrupt_pin) == (0x1AF4, 0x1100, 1)
    (bar,) = SPEC.bars
    assert (bar.index, bar.size, bar.io, bar.is_64bit, bar.prefetchable, bar.mmap) == (0, 1 << 20, False, False,
                                                                                      False, False)
    (msi,) = SPEC.capabilities
    assert (msi.kind, msi.vectors, msi.address64, msi.maskable) == ("msi", 1, True, False)
    assert load_definition(bundled_directory() / "vedu.toml").factory is EduDevice
