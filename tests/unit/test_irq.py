"""Unit tests of the interrupt controller (vfiofs.pci.irq) without FUSE: fake eventfds, real config space."""

from __future__ import annotations

import errno
import struct

import pytest

from vfiofs import abi
from vfiofs.errors import VfioError
from vfiofs.models.api import DeviceModel
from vfiofs.models.spec import BarSpec, Capability, DeviceSpec, PciIdentity
from vfiofs.core.ioctl import IoctlArg
from vfiofs.core.usermem import UserBuffer
from vfiofs.pci.vfio_pci import VfioPciDevice

SPEC = DeviceSpec(
    name="irq", model="generic", identity=PciIdentity(vendor=0x1234, device=1, interrupt_pin=1),
    bars=(BarSpec(index=0, size=4096),),
    capabilities=(Capability("msi", vectors=2, maskable=True),
                  Capability("msix", vectors=4, table_bar=0, table_offset=0, pba_bar=0, pba_offset=0x800)),
)
NONE, BOOL, EVENTFD = abi.VFIO_IRQ_SET_DATA_NONE, abi.VFIO_IRQ_SET_DATA_BOOL, abi.VFIO_IRQ_SET_DATA_EVENTFD
TRIGGER, UNMASK = abi.VFIO_IRQ_SET_ACTION_TRIGGER, abi.VFIO_IRQ_SET_ACTION_UNMASK


class FakeEventfd:
    is_eventfd = True

    def __init__(self, fd: int) -> None:
        self.fd, self.count, self.closed, self.claimed = fd, 0, False, False

    def close(self) -> None:
        self.closed = True

    def duplicate(self) -> "FakeEventfd":
        copy = FakeEventfd(self.fd)
        copy.original = self
        return copy


def count_signal(trigger: FakeEventfd) -> None:
    trigger.count += 1


def close_trigger(trigger: FakeEventfd) -> None:
    trigger.close()


@pytest.fixture
def device():
    return VfioPciDevice(DeviceModel(SPEC), signal=count_signal, release=close_trigger)


def set_irqs(driver, flags, index, start, count, data=b"", files=None, argsz=None):
    header = abi.vfio_irq_set(argsz=argsz if argsz is not None else 20 + len(data), flags=flags, index=index,
                              start=start, count=count)
    return driver.ioctl(abi.VFIO_DEVICE_SET_IRQS, IoctlArg(UserBuffer(bytes(header) + data), files=files or {}))


def fails(*args, **kwargs) -> int:
    with pytest.raises(VfioError) as exc:
        set_irqs(*args, **kwargs)
    return exc.value.errno


def test_counts_follow_the_definition(device):
    assert device.irqs.counts == {0: 1, 1: 2, 2: 4, 3: 0, 4: 1}


def test_validation_comes_before_dispatch(device):
    assert fails(device, NONE | abi.VFIO_IRQ_SET_ACTION_MASK, 1, 0, 1) == errno.ENOTTY  # valid range, bad action
    assert fails(device, NONE | abi.VFIO_IRQ_SET_ACTION_MASK, 1, 2, 1) == errno.EINVAL  # range first
    assert fails(device, NONE | TRIGGER, 3, 0, 1) == errno.EINVAL  # ERR has no vectors here
    assert fails(device, EVENTFD | TRIGGER, 2, 0, 1, b"", argsz=20) == errno.EINVAL  # data missing from argsz
    with pytest.raises(VfioError) as exc:
        device.ioctl(abi.VFIO_DEVICE_SET_IRQS, IoctlArg(UserBuffer(None)))
    assert exc.value.errno == errno.EFAULT


def test_a_failed_assignment_claims_nothing(device):
    good, bad = FakeEventfd(10), object()
    files = {5: good, 6: bad}
    assert fails(device, EVENTFD | TRIGGER, 2, 0, 2, struct.pack("<2i", 5, 6), files) == errno.EINVAL
    assert device.irqs.irq_type == "none" and not good.claimed
    assert fails(device, EVENTFD | TRIGGER, 2, 0, 1, struct.pack("<i", 7), files) == errno.EBADF


def test_intx_automask_cycle(device):
    trigger = FakeEventfd(3)
    set_irqs(device, EVENTFD | TRIGGER, 0, 0, 1, struct.pack("<i", 3), {3: trigger})
    device.irqs.set_intx(True)
    device.irqs.set_intx(True)
    assert trigger.count == 1
    set_irqs(device, NONE | UNMASK, 0, 0, 1)
    assert trigger.count == 2
    device.irqs.set_intx(False)
    set_irqs(device, NONE | UNMASK, 0, 0, 1)
    assert trigger.count == 2
    device.irqs.teardown()
    assert trigger.closed and device.irqs.irq_type == "none"


def test_msix_table_is_the_hosts_as_in_vfio_pci(device):
    """SET_IRQS alone makes a vector deliver; the table is hidden from region access (reads
    0xFF, writes dropped) and its mask bits hold nothing back; the PBA stays clear."""
    device.open_device()
    device.config.write(4, (0x0002).to_bytes(2, "little"))  # PCI_COMMAND.MEMORY
    triggers = {i: FakeEventfd(i) for i in range(4)}
    set_irqs(device, EVENTFD | TRIGGER, 2, 0, 4, struct.pack("<4i", 0, 1, 2, 3), triggers)
    device.model.memory[0].write(16 + 12, (1).to_bytes(4, "little"))  # the memory behind: masked
    device.irqs.raise_irq(2, 1)
    assert triggers[1].count == 1 and device.model.memory[0].read(0x800, 1) == b"\x00"
    assert device.read(0, 4 * 16) == b"\xff" * 64  # the whole table
    assert device.write(12, bytes(4)) == 4  # dropped
    assert device.model.memory[0].read(12, 4) != bytes(4)
    # an access across the table's end: the table part 0xFF / dropped, the rest reaches the BAR
    assert device.write(4 * 16 - 2, b"abcd") == 4
    assert device.model.memory[0].read(4 * 16, 2) == b"cd"
    assert device.read(4 * 16 - 2, 4) == b"\xff\xffcd"
    assert device.write(0x800, b"\xff" * 8) == 8  # the PBA is read-only
    assert device.read(0x800, 8) == bytes(8)


def test_replacing_a_vector_releases_the_old_eventfd(device):
    first, second = FakeEventfd(1), FakeEventfd(2)
    set_irqs(device, EVENTFD | TRIGGER, 1, 0, 1, struct.pack("<i", 1), {1: first})
    set_irqs(device, EVENTFD | TRIGGER, 1, 0, 1, struct.pack("<i", 2), {2: second})
    assert first.closed and not second.closed
    set_irqs(device, EVENTFD | TRIGGER, 1, 0, 1, struct.pack("<i", -1))
    assert second.closed and device.irqs.vectors == [None, None]
    set_irqs(device, NONE | TRIGGER, 1, 0, 0)
    assert device.irqs.irq_type == "none"


def test_interrupts_before_any_binding_go_nowhere(device):
    device.irqs.raise_irq(2, 0)
    device.irqs.raise_irq(1, 0)
    device.irqs.set_intx(True)
    assert device.config.data[6] & 0x08  # the line is visible in STATUS all the same


def test_one_eventfd_for_two_vectors_gets_two_references(device):
    shared = FakeEventfd(9)
    set_irqs(device, EVENTFD | TRIGGER, 2, 0, 2, struct.pack("<2i", 9, 9), {9: shared})
    first, second = device.irqs.vectors[0], device.irqs.vectors[1]
    assert first is shared and second is not shared and second.original is shared
    set_irqs(device, EVENTFD | TRIGGER, 2, 0, 1, struct.pack("<i", -1))
    assert first.closed and not second.closed


def test_intx_mask_and_unmask_share_their_checks(device):
    for action in (abi.VFIO_IRQ_SET_ACTION_MASK, UNMASK):
        assert fails(device, NONE | action, 0, 0, 1) == errno.EINVAL  # INTx not enabled yet
    trigger = FakeEventfd(3)
    set_irqs(device, EVENTFD | TRIGGER, 0, 0, 1, struct.pack("<i", 3), {3: trigger})
    for action in (abi.VFIO_IRQ_SET_ACTION_MASK, UNMASK):
        assert fails(device, EVENTFD | action, 0, 0, 1, struct.pack("<i", 3), {3: trigger}) == errno.ENOTTY
    set_irqs(device, BOOL | abi.VFIO_IRQ_SET_ACTION_MASK, 0, 0, 1, b"\0")  # a false BOOL does nothing
    assert not device.irqs.intx_masked
    set_irqs(device, BOOL | abi.VFIO_IRQ_SET_ACTION_MASK, 0, 0, 1, b"\1")
    device.irqs.set_intx(True)
    assert device.irqs.intx_masked and trigger.count == 0
    set_irqs(device, BOOL | UNMASK, 0, 0, 1, b"\1")
    assert trigger.count == 1  # the line is still asserted: unmasking signals it (then automasks)


def test_a_masked_msi_vector_is_pending_until_unmasked(device):
    triggers = {5: FakeEventfd(5), 6: FakeEventfd(6)}
    set_irqs(device, EVENTFD | TRIGGER, abi.VFIO_PCI_MSI_IRQ_INDEX, 0, 2, struct.pack("<2i", 5, 6), triggers)
    msi = device.config.capability_offset("msi")
    config = abi.VFIO_PCI_INDEX_TO_OFFSET(abi.VFIO_PCI_CONFIG_REGION_INDEX)
    mask_at, pending_at = msi + 16, msi + 20  # 64-bit, maskable
    device.write(config + mask_at, struct.pack("<I", 0b10))
    device.irqs.raise_irq(abi.VFIO_PCI_MSI_IRQ_INDEX, 1)
    device.irqs.raise_irq(abi.VFIO_PCI_MSI_IRQ_INDEX, 0)
    assert (triggers[5].count, triggers[6].count) == (1, 0)
    assert struct.unpack("<I", device.read(config + pending_at, 4))[0] == 0b10
    device.write(config + mask_at, struct.pack("<I", 0))
    assert triggers[6].count == 1 and struct.unpack("<I", device.read(config + pending_at, 4))[0] == 0
