"""QEMU's edu device (vfiofs/models/edu.py, devices/vedu.toml).

Unit tests drive the model directly, with the manual scheduler, a recording interrupt
sink and a fake IOMMU over a bytearray of "host memory". Integration tests bind the
bundled edu device through a real mount and use pread/pwrite and eventfds.
"""

from __future__ import annotations

import errno
import os
import select

import pytest

from support import REPO, errno_of, wait_until
from vfiofs import client as vc
from vfiofs.client import IommuFd, VfioDevice
from vfiofs.models.definitions import load_definition
from vfiofs.models.api import DmaFault, InterruptSink
from vfiofs.models.edu import EduDevice, factorial32

MSI, INTX = vc.VFIO_PCI_MSI_IRQ_INDEX, vc.VFIO_PCI_INTX_IRQ_INDEX
CFG = vc.VFIO_PCI_CONFIG_REGION_INDEX
ONES4 = 0xFFFF_FFFF
ONES8 = 0xFFFF_FFFF_FFFF_FFFF
HOST_IOVA = 0x100000  # where the fake IOMMU maps the "host memory"
HOST_SIZE = 0x4000


# -- fixtures for the unit tests --------------------------------------------------------------------

class RecordingSink(InterruptSink):
    """Records what the model signals; ``irq_type`` says whether the driver enabled MSI."""

    def __init__(self, irq_type: str = "none") -> None:
        self.irq_type = irq_type
        self.events: list[tuple] = []

    def raise_irq(self, index: int, vector: int = 0) -> None:
        self.events.append(("msg", index, vector))

    def set_intx(self, asserted: bool) -> None:
        self.events.append(("intx", asserted))

    def take(self) -> list[tuple]:
        events, self.events = self.events, []
        return events


class FakeDma:
    """One mapping [HOST_IOVA, HOST_IOVA + HOST_SIZE) over a bytearray; DmaFault elsewhere."""

    def __init__(self) -> None:
        self.memory = bytearray(HOST_SIZE)
        self.accesses: list[tuple[str, int, int]] = []

    def _at(self, iova: int, size: int) -> int:
        if not (HOST_IOVA <= iova and iova + size <= HOST_IOVA + HOST_SIZE):
            raise DmaFault(iova, size, "no mapping")
        return iova - HOST_IOVA

    def read(self, iova: int, size: int) -> bytes:
        self.accesses.append(("read", iova, size))
        at = self._at(iova, size)
        return bytes(self.memory[at : at + size])

    def write(self, iova: int, data: bytes) -> None:
        self.accesses.append(("write", iova, len(data)))
        at = self._at(iova, len(data))
        self.memory[at : at + len(data)] = data


SPEC = load_definition(REPO / "devices" / "vedu.toml").spec


class SlowFactorialEdu(EduDevice):
    factorial_delay = 0.5


class FastDmaEdu(EduDevice):
    dma_delay = 0.001


def make(cls=EduDevice, irq_type: str = "none") -> EduDevice:
    model = cls(SPEC)
    model.interrupts = RecordingSink(irq_type)
    model.dma = FakeDma()
    return model


@pytest.fixture
def edu():
    model = make()
    yield model
    model.shutdown()


@pytest.fixture
def msi_edu():
    model = make(irq_type="msi")
    yield model
    model.shutdown()


def rd(model: EduDevice, offset: int, size: int = 4) -> int:
    data = model.bar_read(0, offset, size)
    assert len(data) == size
    return int.from_bytes(data, "little")


def wr(model: EduDevice, offset: int, value: int, size: int = 4) -> None:
    model.bar_write(0, offset, value.to_bytes(size, "little"))


def advance(model: EduDevice, seconds: float = 0.0) -> int:
    return model.scheduler.advance(seconds)


def snapshot(model: EduDevice) -> tuple:
    return (model.liveness, model.fact, model.status, model.irq_status, model.dma_src, model.dma_dst,
            model.dma_count, model.dma_cmd, bytes(model.buffer))


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
    assert edu.interrupts.take() == []  # status 0x80 was not set
    wr(edu, 0x08, 4)  # idle again: accepted
    advance(edu)
    assert rd(edu, 0x08) == 24


def test_factorial_delay_is_configurable():
    model = make(SlowFactorialEdu)
    try:
        wr(model, 0x08, 6)
        assert advance(model, 0.25) == 0
        assert rd(model, 0x20) == 0x01 and rd(model, 0x08) == 6
        assert advance(model, 0.25) == 1
        assert rd(model, 0x20) == 0 and rd(model, 0x08) == 720
    finally:
        model.shutdown()


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
    assert edu.interrupts.take() == []
    advance(edu)
    assert edu.interrupts.take() == [("intx", True)]
    assert rd(edu, 0x24) == 0x1
    assert rd(edu, 0x20) == 0x80
    wr(edu, 0x64, 0x1)
    assert rd(edu, 0x24) == 0
    assert edu.interrupts.take() == [("intx", False)]


def test_factorial_interrupt_by_msi(msi_edu):
    wr(msi_edu, 0x20, 0x80)
    wr(msi_edu, 0x08, 12)
    advance(msi_edu)
    assert msi_edu.interrupts.take() == [("msg", MSI, 0)]
    assert rd(msi_edu, 0x08) == 479001600 and rd(msi_edu, 0x24) == 0x1
    wr(msi_edu, 0x64, 0x1)  # the driver acks with MSI too; no INTx change
    assert rd(msi_edu, 0x24) == 0
    assert msi_edu.interrupts.take() == []


# -- raise / acknowledge ---------------------------------------------------------------------------

def test_raise_and_ack_drive_the_intx_level(edu):
    sink = edu.interrupts
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
    sink = msi_edu.interrupts
    wr(msi_edu, 0x60, 0)
    assert sink.take() == []
    wr(msi_edu, 0x60, 0x4)
    wr(msi_edu, 0x60, 0x4)
    wr(msi_edu, 0x60, 0)  # irq_status is still non-zero: another message
    assert sink.take() == [("msg", MSI, 0)] * 3
    assert rd(msi_edu, 0x24) == 0x4
    wr(msi_edu, 0x64, 0x4)
    assert rd(msi_edu, 0x24) == 0 and sink.take() == []  # MSI enabled: no deassert
    wr(msi_edu, 0x60, 0x8000_0000)
    assert rd(msi_edu, 0x24) == 0x8000_0000 and sink.take() == [("msg", MSI, 0)]


def test_switching_from_msi_back_to_intx(msi_edu):
    wr(msi_edu, 0x60, 0x2)
    msi_edu.interrupts.irq_type = "none"  # the driver disabled MSI
    msi_edu.interrupts.take()
    wr(msi_edu, 0x60, 0x1)
    assert msi_edu.interrupts.take() == [("intx", True)]
    wr(msi_edu, 0x64, 0x3)
    assert msi_edu.interrupts.take() == [("intx", False)]


def test_irq_registers_access(edu):
    assert rd(edu, 0x60) == ONES4  # write-only
    assert rd(edu, 0x64) == ONES4
    wr(edu, 0x24, 0x55)  # read-only
    assert rd(edu, 0x24) == 0
    assert edu.interrupts.take() == []


# -- access rules ------------------------------------------------------------------------------------

@pytest.mark.parametrize("offset", [0x00, 0x04, 0x08, 0x20, 0x24])
@pytest.mark.parametrize("size", [1, 2, 3, 8, 16])
def test_wrong_size_below_0x80_reads_all_ones(edu, offset, size):
    wr(edu, 0x04, 0x12345678)
    assert edu.bar_read(0, offset, size) == b"\xff" * size


@pytest.mark.parametrize("size", [1, 2, 8])
def test_wrong_size_writes_below_0x80_are_ignored(edu, size):
    before = snapshot(edu)
    for offset in (0x04, 0x08, 0x20, 0x60, 0x64):
        wr(edu, offset, 0x80, size)
    assert snapshot(edu) == before
    assert edu.interrupts.take() == []
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
    assert edu.interrupts.take() == []


@pytest.mark.parametrize("size", [1, 2, 3, 16])
def test_wrong_size_from_0x80_reads_all_ones_and_ignores_writes(edu, size):
    wr(edu, 0x80, 0x1122334455667788, 8)
    assert edu.bar_read(0, 0x80, size) == b"\xff" * size
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

def start_dma(model: EduDevice, src: int, dst: int, count: int, cmd: int) -> None:
    wr(model, 0x80, src, 8)
    wr(model, 0x88, dst, 8)
    wr(model, 0x90, count, 8)
    wr(model, 0x98, cmd, 8)


def test_dma_round_trip_completes_after_100ms(edu):
    pattern = bytes((i * 7 + 3) & 0xFF for i in range(4096))
    edu.dma.memory[0:4096] = pattern
    start_dma(edu, HOST_IOVA, 0x40000, 4096, 0x1)
    assert advance(edu, 0.05) == 0
    assert rd(edu, 0x98) == 0x1 and edu.dma.accesses == []  # nothing happens before the delay
    assert advance(edu, 0.05) == 1
    assert rd(edu, 0x98) == 0
    assert edu.dma.accesses == [("read", HOST_IOVA, 4096)]
    assert bytes(edu.buffer) == pattern
    assert rd(edu, 0x40000) == ONES4  # the buffer is not visible through BAR0
    # EDU → RAM, into another page
    start_dma(edu, 0x40000, HOST_IOVA + 0x2000, 4096, 0x3)
    assert rd(edu, 0x98) == 0x3
    advance(edu, 0.1)
    assert rd(edu, 0x98) == 0x2  # the start bit clears, the direction stays
    assert bytes(edu.dma.memory[0x2000:0x3000]) == pattern
    assert edu.dma_errors == [] and edu.interrupts.take() == []  # no 0x04: no interrupt


def test_dma_partial_transfers_inside_the_buffer(edu):
    edu.dma.memory[0:8] = b"ABCDEFGH"
    start_dma(edu, HOST_IOVA, 0x40FF8, 8, 0x1)  # the last 8 bytes of the buffer
    advance(edu, 0.1)
    assert bytes(edu.buffer[0xFF8:]) == b"ABCDEFGH"
    start_dma(edu, 0x40FFC, HOST_IOVA + 0x100, 4, 0x3)
    advance(edu, 0.1)
    assert bytes(edu.dma.memory[0x100:0x104]) == b"EFGH"
    start_dma(edu, HOST_IOVA, 0x41000, 0, 0x1)  # zero bytes at the end: nothing to copy, no error
    advance(edu, 0.1)
    assert edu.dma_errors == [] and rd(edu, 0x98) == 0


def test_dma_irq_0x100(edu, msi_edu):
    start_dma(edu, HOST_IOVA, 0x40000, 16, 0x1 | 0x4)
    advance(edu, 0.1)
    assert edu.interrupts.take() == [("intx", True)]
    assert rd(edu, 0x24) == 0x100 and rd(edu, 0x98) == 0x4
    wr(edu, 0x64, 0x100)
    assert edu.interrupts.take() == [("intx", False)]
    start_dma(msi_edu, 0x40000, HOST_IOVA, 16, 0x1 | 0x2 | 0x4)
    advance(msi_edu, 0.1)
    assert msi_edu.interrupts.take() == [("msg", MSI, 0)]
    assert rd(msi_edu, 0x24) == 0x100


def test_dma_addresses_are_masked_to_28_bits(edu):
    assert edu.dma_mask == (1 << 28) - 1
    edu.dma.memory[0:4] = b"mask"
    start_dma(edu, 0xF000_0000 | HOST_IOVA, 0x40000, 4, 0x1)
    advance(edu, 0.1)
    assert bytes(edu.buffer[:4]) == b"mask"
    start_dma(edu, 0x40000, 0x1_1000_0000 | (HOST_IOVA + 0x10), 4, 0x3)
    advance(edu, 0.1)
    assert bytes(edu.dma.memory[0x10:0x14]) == b"mask"
    assert [a[1] for a in edu.dma.accesses] == [HOST_IOVA, HOST_IOVA + 0x10]


@pytest.mark.parametrize(("device_addr", "count"), [(0x3FFF0, 0x20), (0x40FF0, 0x20), (0x40000, 0x1001),
                                                    (0x0, 4), (0x41000, 1), (0x40000, (1 << 64) - 1)])
@pytest.mark.parametrize("to_ram", [False, True])
def test_dma_outside_the_buffer_is_refused_and_the_command_completes(edu, device_addr, count, to_ram):
    edu.dma.memory[:] = b"\x5a" * HOST_SIZE
    edu.buffer[:] = b"\xa5" * 4096
    if to_ram:
        start_dma(edu, device_addr, HOST_IOVA, count, 0x1 | 0x2 | 0x4)
    else:
        start_dma(edu, HOST_IOVA, device_addr, count, 0x1 | 0x4)
    advance(edu, 0.1)
    assert len(edu.dma_errors) == 1
    assert "refused" in edu.dma_errors[0] and "outside the buffer [0x40000, 0x41000)" in edu.dma_errors[0]
    assert edu.dma.accesses == []  # not performed: host memory neither read nor written
    assert edu.dma.memory == b"\x5a" * HOST_SIZE and edu.buffer == b"\xa5" * 4096
    assert rd(edu, 0x98) & 0x1 == 0  # completed
    assert rd(edu, 0x24) == 0x100 and edu.interrupts.take() == [("intx", True)]


@pytest.mark.parametrize("to_ram", [False, True])
def test_dma_fault_is_recorded_and_the_command_completes(edu, to_ram):
    edu.buffer[:] = b"\xa5" * 4096
    unmapped = HOST_IOVA + HOST_SIZE - 8  # runs past the end of the mapping
    if to_ram:
        start_dma(edu, 0x40000, unmapped, 16, 0x1 | 0x2 | 0x4)
    else:
        start_dma(edu, unmapped, 0x40000, 16, 0x1 | 0x4)
    advance(edu, 0.1)
    assert len(edu.dma_errors) == 1
    assert "DMA fault" in edu.dma_errors[0] and f"{unmapped:#x}" in edu.dma_errors[0]
    assert edu.buffer == b"\xa5" * 4096
    assert rd(edu, 0x98) & 0x1 == 0 and rd(edu, 0x24) == 0x100
    assert edu.interrupts.take() == [("intx", True)]


def test_dma_without_an_iommu_attachment_faults(edu):
    edu.dma = type(edu).dma  # the core's default port: not attached
    start_dma(edu, HOST_IOVA, 0x40000, 16, 0x1)
    advance(edu, 0.1)
    assert len(edu.dma_errors) == 1 and "not attached" in edu.dma_errors[0]
    assert rd(edu, 0x98) == 0


def test_dma_delay_is_configurable():
    model = make(FastDmaEdu)
    try:
        start_dma(model, HOST_IOVA, 0x40000, 16, 0x1)
        assert advance(model, 0.001) == 1 and rd(model, 0x98) == 0
    finally:
        model.shutdown()


# -- reset ---------------------------------------------------------------------------------------------

def test_reset_restores_power_on_state(edu):
    wr(edu, 0x04, 0x12345678)
    wr(edu, 0x20, 0x80)
    wr(edu, 0x60, 0x30)
    edu.buffer[:4] = b"data"
    start_dma(edu, 0x0, 0x40000, 4, 0x1 | 0x4)  # pending; would fault
    wr(edu, 0x08, 5)  # pending
    assert rd(edu, 0x20) == 0x81
    edu.dma_errors.append("an old error")
    edu.interrupts.take()
    edu.reset()
    assert edu.interrupts.take() == [("intx", False)]
    assert [rd(edu, o) for o in (0x00, 0x04, 0x08, 0x20, 0x24)] == [0x010000ED, 0, 0, 0, 0]
    assert [rd(edu, o, 8) for o in (0x80, 0x88, 0x90, 0x98)] == [0, 0, 0, 0]
    assert edu.buffer == bytes(4096) and edu.dma_errors == []
    assert advance(edu, 1) == 0  # the factorial and the DMA were cancelled
    assert edu.interrupts.take() == [] and edu.dma.accesses == []
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
    assert load_definition(REPO / "devices" / "vedu.toml").factory is EduDevice


# -- through a real mount ------------------------------------------------------------------------------

def edu_node(mount) -> str:
    """The vfio/devices/vfioN node of the edu device, found by its ids in the mount's sysfs."""
    pci = mount.path / "sys/bus/pci/devices"
    for bdf in sorted(os.listdir(pci)):
        ids = [(pci / bdf / name).read_text().strip() for name in ("vendor", "device")]
        if ids == ["0x1234", "0x11e8"]:
            (vfio,) = os.listdir(pci / bdf / "vfio-dev")
            return mount.node(f"vfio/devices/{vfio}")
    raise AssertionError("no edu device in the mount")


@pytest.fixture
def bound(mount):
    iommu = IommuFd(mount.iommu)
    dev = VfioDevice(edu_node(mount))
    dev.bind_iommufd(iommu)
    yield dev
    dev.close()
    iommu.close()


def pread(dev: VfioDevice, offset: int, size: int = 4) -> int:
    data = os.pread(dev.fd, size, offset)  # BAR0 is region 0: file offset (0 << 40) + offset
    assert len(data) == size
    return int.from_bytes(data, "little")


def pwrite(dev: VfioDevice, offset: int, value: int, size: int = 4) -> None:
    assert os.pwrite(dev.fd, value.to_bytes(size, "little"), offset) == size


def wait(efd: int, timeout: float = 5.0) -> int:
    ready, _, _ = select.select([efd], [], [], timeout)
    assert ready, "no interrupt"
    return os.eventfd_read(efd)


def pending(efd: int) -> int:
    try:
        return os.eventfd_read(efd)
    except BlockingIOError:
        return 0


def test_mount_identity_regions_and_irqs(bound):
    cfg = bound.read(CFG, 0, 64)
    assert cfg[0:4] == bytes.fromhex("3412e811")
    assert cfg[8] == 0x10 and cfg[9:12] == bytes([0x00, 0xFF, 0x00])  # revision, prog-if, sub, base class
    assert cfg[0x2C:0x30] == bytes.fromhex("f41a0011")
    assert cfg[0x3D] == 1  # INTA
    cap = cfg[0x34]
    assert bound.read(CFG, cap, 1)[0] == 0x05  # MSI, the only capability
    assert bound.read(CFG, cap + 1, 1)[0] == 0
    control = int.from_bytes(bound.read(CFG, cap + 2, 2), "little")
    assert control & 0x0080 and not control & 0x0100 and control & 0x000E == 0  # 64-bit, no masking, 1 vector
    info = bound.get_region_info(0)
    assert info.size == 1 << 20
    assert info.flags == vc.VFIO_REGION_INFO_FLAG_READ | vc.VFIO_REGION_INFO_FLAG_WRITE  # trapped
    assert all(bound.get_region_info(i).size == 0 for i in range(1, 7))
    assert (bound.get_irq_info(INTX).count, bound.get_irq_info(MSI).count) == (1, 1)
    assert bound.get_irq_info(vc.VFIO_PCI_MSIX_IRQ_INDEX).count == 0


def test_mount_registers(bound):
    assert pread(bound, 0x00) == 0x010000ED
    assert pread(bound, 0x04) == 0
    pwrite(bound, 0x04, 0x12345678)
    assert pread(bound, 0x04) == 0xEDCBA987
    for offset in (0x00, 0x04):
        assert os.pread(bound.fd, 1, offset) == b"\xff"
        assert os.pread(bound.fd, 2, offset) == b"\xff\xff"
        assert pread(bound, offset, 8) == ONES8
    pwrite(bound, 0x04, 0, 2)  # ignored
    pwrite(bound, 0x04, 0, 8)  # ignored
    assert pread(bound, 0x04) == 0xEDCBA987
    pwrite(bound, 0x80, 0x0123_4567_89AB_CDEF, 8)
    assert pread(bound, 0x80, 8) == 0x0123_4567_89AB_CDEF
    assert pread(bound, 0x84) == ONES4
    pwrite(bound, 0x80, 0x42)
    assert pread(bound, 0x80, 8) == 0x42
    assert pread(bound, 0x40000) == ONES4  # the DMA buffer is not in BAR0
    assert pread(bound, 0xFFFF8, 8) == ONES8
    assert errno_of(os.pread, bound.fd, 4, 1 << 20) == errno.EINVAL  # past the 1 MiB BAR
    pwrite(bound, 0x08, 10)
    deadline = 100
    while pread(bound, 0x20) & 0x01 and deadline:
        deadline -= 1
    assert pread(bound, 0x08) == 3628800


def test_mount_factorial_by_msi(bound):
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        bound.enable_irq_eventfds(MSI, [efd])
        pwrite(bound, 0x20, 0x80)
        pwrite(bound, 0x08, 13)
        assert wait(efd) == 1
        assert pread(bound, 0x20) == 0x80
        assert pread(bound, 0x08) == 0x7328CC00
        assert pread(bound, 0x24) == 0x1
        pwrite(bound, 0x64, 0x1)
        assert pread(bound, 0x24) == 0
        pwrite(bound, 0x60, 0x8)  # raise by hand: one message per write
        pwrite(bound, 0x60, 0x8)
        assert pread(bound, 0x24) == 0x8
        assert wait(efd) == 2
        pwrite(bound, 0x64, 0x8)
        assert pending(efd) == 0
    finally:
        os.close(efd)


def test_mount_factorial_by_intx(bound):
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        bound.enable_irq_eventfds(INTX, [efd])
        pwrite(bound, 0x20, 0x80)
        pwrite(bound, 0x08, 5)
        assert wait(efd) == 1
        assert pread(bound, 0x08) == 120 and pread(bound, 0x24) == 0x1
        status = int.from_bytes(bound.read(CFG, 0x06, 2), "little")
        assert status & 0x0008  # PCI_STATUS_INTERRUPT: the line is asserted
        bound.unmask_intx()  # still asserted: it signals again (a level)
        assert wait(efd) == 1
        pwrite(bound, 0x64, 0x1)  # ack: the line drops
        assert not int.from_bytes(bound.read(CFG, 0x06, 2), "little") & 0x0008
        bound.unmask_intx()
        assert pending(efd) == 0
        pwrite(bound, 0x60, 0x2)  # and rises again by hand
        assert wait(efd) == 1
        pwrite(bound, 0x64, 0x2)
    finally:
        os.close(efd)


def test_mount_close_resets_the_device(mount):
    node = edu_node(mount)
    with IommuFd(mount.iommu) as iommu:
        with VfioDevice(node) as dev:
            dev.bind_iommufd(iommu)
            pwrite(dev, 0x04, 0x12345678)
            pwrite(dev, 0x20, 0x80)
            pwrite(dev, 0x90, 77, 8)
        with VfioDevice(node) as dev:  # the release of the first handle may arrive a little later
            assert wait_until(lambda: _try_bind(dev, iommu))
            assert [pread(dev, o) for o in (0x04, 0x20, 0x24)] == [0, 0, 0]
            assert pread(dev, 0x90, 8) == 0


def _try_bind(dev: VfioDevice, iommu: IommuFd) -> bool:
    try:
        dev.bind_iommufd(iommu)
        return True
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        return False
