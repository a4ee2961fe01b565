"""Through a real mount: GET_IRQ_INFO, SET_IRQS and interrupt delivery to the binder's eventfds.

The device under test (tests/models/irq_test_device.toml) raises interrupts when BAR0
registers are written, so every delivery rule is driven from the test itself.
"""

from __future__ import annotations

import errno
import os
import select
import struct
import threading

import pytest

from support import errno_of, wait_until
from vfiofs import client as vc
from vfiofs.client import IommuFd, VfioDevice, ioctl

INTX, MSI, MSIX, ERR, REQ = range(5)
NONE, BOOL, EVENTFD = vc.VFIO_IRQ_SET_DATA_NONE, vc.VFIO_IRQ_SET_DATA_BOOL, vc.VFIO_IRQ_SET_DATA_EVENTFD
MASK, UNMASK, TRIGGER = (vc.VFIO_IRQ_SET_ACTION_MASK, vc.VFIO_IRQ_SET_ACTION_UNMASK,
                         vc.VFIO_IRQ_SET_ACTION_TRIGGER)
CFG = vc.VFIO_PCI_CONFIG_REGION_INDEX


@pytest.fixture
def irqmount(models_mount):
    return models_mount


@pytest.fixture
def dev(irqmount):
    with irqmount.bound(0) as device:
        yield device


def eventfds(n: int) -> list[int]:
    return [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(n)]


def count(efd: int) -> int:
    """How often the eventfd was signalled since the last call (0 if never)."""
    try:
        return os.eventfd_read(efd)
    except BlockingIOError:
        return 0


def poke(device: VfioDevice, offset: int, value: int) -> None:
    device.write(0, offset, value.to_bytes(4, "little"))


def daemon_eventfds(pid: int) -> int:
    fds = os.listdir(f"/proc/{pid}/fd")
    return sum(1 for fd in fds if _link(pid, fd) == "anon_inode:[eventfd]")


def _link(pid: int, fd: str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return ""


def cap_offset(device: VfioDevice, cap_id: int) -> int:
    """Walk the config-space capability chain to ``cap_id``."""
    at = device.read(CFG, 0x34, 1)[0]
    while at:
        if device.read(CFG, at, 1)[0] == cap_id:
            return at
        at = device.read(CFG, at + 1, 1)[0]
    raise AssertionError(f"no capability {cap_id:#x}")


def raw_set_irqs(device: VfioDevice, flags: int, index: int, start: int, count_: int, data: bytes = b"",
                 argsz: int | None = None) -> int:
    header = vc.vfio_irq_set(argsz=argsz if argsz is not None else 20 + len(data), flags=flags, index=index,
                             start=start, count=count_)
    return ioctl(device.fd, vc.VFIO_DEVICE_SET_IRQS, bytearray(bytes(header) + data))


# -- GET_IRQ_INFO -------------------------------------------------------------------------------

def test_25_get_irq_info(dev, mount):
    info = {i: dev.get_irq_info(i) for i in range(5)}
    ev, maskable, auto, noresize = (vc.VFIO_IRQ_INFO_EVENTFD, vc.VFIO_IRQ_INFO_MASKABLE,
                                    vc.VFIO_IRQ_INFO_AUTOMASKED, vc.VFIO_IRQ_INFO_NORESIZE)
    assert (info[INTX].flags, info[INTX].count) == (ev | maskable | auto, 1)
    assert (info[MSI].flags, info[MSI].count) == (ev | noresize, 4)
    assert (info[MSIX].flags, info[MSIX].count) == (ev | noresize, 16)
    assert (info[ERR].flags, info[ERR].count) == (ev | noresize, 1)  # a PCI Express device
    assert (info[REQ].flags, info[REQ].count) == (ev | noresize, 1)
    assert errno_of(dev.get_irq_info, 5) == errno.EINVAL
    short = vc.vfio_irq_info(argsz=15, index=0)
    assert errno_of(ioctl, dev.fd, vc.VFIO_DEVICE_GET_IRQ_INFO, short) == errno.EINVAL
    # a conventional PCI device without an interrupt pin or MSI: counts 0, and no ERR index
    with IommuFd(mount.iommu) as iommu, VfioDevice(mount.device(0)) as ram:
        ram.bind_iommufd(iommu)
        assert [ram.get_irq_info(i).count for i in (INTX, MSI, MSIX, REQ)] == [0, 0, 0, 1]
        assert errno_of(ram.get_irq_info, ERR) == errno.EINVAL
        assert errno_of(ram.enable_irq_eventfds, INTX, [-1]) == errno.EINVAL  # no INTx: even start 0


# -- SET_IRQS validation --------------------------------------------------------------------------

def test_26_set_irqs_validation(dev):
    fd = eventfds(1)[0]
    one = struct.pack("<i", fd)
    assert errno_of(raw_set_irqs, dev, EVENTFD | TRIGGER, MSIX, 0, 1, one, argsz=19) == errno.EINVAL
    assert errno_of(raw_set_irqs, dev, EVENTFD | TRIGGER, 5, 0, 1, one) == errno.EINVAL
    assert errno_of(raw_set_irqs, dev, EVENTFD | TRIGGER, MSIX, 16, 1, one) == errno.EINVAL  # start past the end
    assert errno_of(raw_set_irqs, dev, EVENTFD | TRIGGER, MSIX, 15, 2, one * 2) == errno.EINVAL
    assert errno_of(raw_set_irqs, dev, NONE | TRIGGER, MSIX, 1, 0xFFFF_FFFF) == errno.EINVAL
    assert errno_of(raw_set_irqs, dev, TRIGGER, MSIX, 0, 1) == errno.EINVAL  # no DATA type
    assert errno_of(raw_set_irqs, dev, NONE | BOOL | TRIGGER, MSIX, 0, 1, b"\1") == errno.EINVAL
    assert errno_of(raw_set_irqs, dev, EVENTFD | TRIGGER | (1 << 6), MSIX, 0, 1, one) == errno.EINVAL
    assert errno_of(raw_set_irqs, dev, EVENTFD | TRIGGER, MSIX, 0, 2, one) == errno.EINVAL  # short data
    # argsz promises two eventfds, the buffer holds one: the copy of the data faults
    assert errno_of(raw_set_irqs, dev, EVENTFD | TRIGGER, MSIX, 0, 2, one, argsz=28) == errno.EFAULT
    for action in (MASK, UNMASK):
        assert errno_of(raw_set_irqs, dev, NONE | action, MSI, 0, 1) == errno.ENOTTY
        assert errno_of(raw_set_irqs, dev, NONE | action, MSIX, 0, 1) == errno.ENOTTY
    assert errno_of(raw_set_irqs, dev, NONE | MASK | UNMASK, INTX, 0, 1) == errno.ENOTTY
    assert errno_of(raw_set_irqs, dev, NONE | MASK, INTX, 0, 1) == errno.EINVAL  # INTx not enabled
    assert errno_of(raw_set_irqs, dev, NONE | TRIGGER, ERR, 0, 1) == errno.EINVAL  # no trigger to loop back
    closed = eventfds(1)[0]
    os.close(closed)
    assert errno_of(dev.enable_irq_eventfds, MSIX, [closed]) == errno.EBADF
    with open("/etc/hostname") as not_an_eventfd:
        assert errno_of(dev.enable_irq_eventfds, MSIX, [not_an_eventfd.fileno()]) == errno.EINVAL
    assert errno_of(dev.enable_irq_eventfds, MSIX, [10_000]) == errno.EBADF
    os.close(fd)


def test_one_interrupt_type_at_a_time(dev):
    efds = eventfds(2)
    dev.enable_irq_eventfds(MSI, [efds[0]])
    assert errno_of(dev.enable_irq_eventfds, MSIX, [efds[1]]) == errno.EINVAL
    assert errno_of(dev.enable_irq_eventfds, INTX, [efds[1]]) == errno.EINVAL
    dev.disable_irqs(MSI)
    dev.enable_irq_eventfds(MSIX, [efds[1]])
    dev.disable_irqs(MSIX)
    for fd in efds:
        os.close(fd)


# -- INTx -------------------------------------------------------------------------------------------

def test_intx_is_level_triggered_and_automasked(dev):
    (efd,) = eventfds(1)
    dev.enable_irq_eventfds(INTX, [efd])
    poke(dev, 0x04, 1)  # assert
    assert count(efd) == 1
    assert int.from_bytes(dev.read(CFG, 6, 2), "little") & 0x08  # STATUS.INTERRUPT
    poke(dev, 0x04, 1)  # still asserted, and masked: nothing more
    assert count(efd) == 0
    dev.unmask_intx()  # still asserted: it fires again, and masks again
    assert count(efd) == 1
    poke(dev, 0x04, 0)
    assert not int.from_bytes(dev.read(CFG, 6, 2), "little") & 0x08
    dev.unmask_intx()
    assert count(efd) == 0
    poke(dev, 0x04, 1)
    assert count(efd) == 1
    poke(dev, 0x04, 0)
    # explicit mask, and BOOL forms
    dev.unmask_intx()
    raw_set_irqs(dev, BOOL | MASK, INTX, 0, 1, b"\1")
    poke(dev, 0x04, 1)
    assert count(efd) == 0
    raw_set_irqs(dev, BOOL | UNMASK, INTX, 0, 1, b"\0")  # false: no unmask
    assert count(efd) == 0
    raw_set_irqs(dev, BOOL | UNMASK, INTX, 0, 1, b"\1")
    assert count(efd) == 1
    assert errno_of(raw_set_irqs, dev, EVENTFD | UNMASK, INTX, 0, 1, struct.pack("<i", efd)) == errno.ENOTTY
    os.close(efd)


def test_intx_disable_in_config_masks_and_unmasks(dev):
    (efd,) = eventfds(1)
    dev.enable_irq_eventfds(INTX, [efd])
    command = int.from_bytes(dev.read(CFG, 4, 2), "little")
    dev.write(CFG, 4, (command | 0x400).to_bytes(2, "little"))  # INTx disable
    poke(dev, 0x04, 1)
    assert count(efd) == 0
    dev.write(CFG, 4, command.to_bytes(2, "little"))  # re-enable: the asserted line fires
    assert count(efd) == 1
    os.close(efd)


def test_intx_loopback_and_disable(dev):
    (efd,) = eventfds(1)
    dev.enable_irq_eventfds(INTX, [efd])
    raw_set_irqs(dev, NONE | TRIGGER, INTX, 0, 1)
    raw_set_irqs(dev, BOOL | TRIGGER, INTX, 0, 1, b"\1")
    raw_set_irqs(dev, BOOL | TRIGGER, INTX, 0, 1, b"\0")
    assert count(efd) == 2
    dev.disable_irqs(INTX)
    poke(dev, 0x04, 1)
    assert count(efd) == 0
    assert errno_of(raw_set_irqs, dev, NONE | TRIGGER, INTX, 0, 1) == errno.EINVAL  # not enabled any more
    os.close(efd)


# -- MSI / MSI-X -------------------------------------------------------------------------------------

def test_msi_vectors_and_per_vector_mask(dev):
    efds = eventfds(4)
    dev.enable_irq_eventfds(MSI, efds)
    at = cap_offset(dev, 0x05)
    control = int.from_bytes(dev.read(CFG, at + 2, 2), "little")
    assert control & 1 and (control >> 4) & 7 == 2  # enabled, 4 vectors
    poke(dev, 0x08, 2)
    assert [count(fd) for fd in efds] == [0, 0, 1, 0]
    mask_at = at + 16  # 64-bit address: mask bits at +0x10, pending at +0x14
    dev.write(CFG, mask_at, (1 << 1).to_bytes(4, "little"))
    poke(dev, 0x08, 1)
    assert count(efds[1]) == 0
    assert int.from_bytes(dev.read(CFG, mask_at + 4, 4), "little") == 1 << 1  # pending
    dev.write(CFG, mask_at, bytes(4))
    assert count(efds[1]) == 1
    assert int.from_bytes(dev.read(CFG, mask_at + 4, 4), "little") == 0
    dev.disable_irqs(MSI)
    assert not int.from_bytes(dev.read(CFG, at + 2, 2), "little") & 1
    for fd in efds:
        os.close(fd)


def test_msix_table_belongs_to_the_host_as_in_vfio_pci(dev):
    """SET_IRQS alone delivers; the table reads 0xFF and drops writes (vfio-pci hides it from
    region access); mask bits written anywhere, and the function mask, hold nothing back."""
    efds = eventfds(16)
    dev.enable_irq_eventfds(MSIX, efds)
    poke(dev, 0x00, 3)
    assert count(efds[3]) == 1
    assert dev.read(1, 0, 16 * 16) == b"\xff" * 256  # the table: BAR1 at 0
    dev.write(1, 16 * 3 + 12, (1).to_bytes(4, "little"))  # "mask" vector 3: dropped
    poke(dev, 0x00, 3)
    assert count(efds[3]) == 1
    assert dev.read(1, 0x800, 8) == bytes(8)  # the PBA: nothing is ever pending
    dev.write(1, 0x800, b"\xff" * 8)  # and it is read-only
    assert dev.read(1, 0x800, 8) == bytes(8)
    # the MSI-X capability is read-only: ENABLE follows SET_IRQS, the function mask cannot be set
    at = cap_offset(dev, 0x11)
    control = int.from_bytes(dev.read(CFG, at + 2, 2), "little")
    assert control & 0x8000 and control & 0x7FF == 15
    dev.write(CFG, at + 2, (control | 0x4000).to_bytes(2, "little"))
    assert int.from_bytes(dev.read(CFG, at + 2, 2), "little") == control
    poke(dev, 0x00, 3)
    assert count(efds[3]) == 1
    # unassigning one vector (-1) leaves the others working
    dev.enable_irq_eventfds(MSIX, [-1], start=3)
    poke(dev, 0x00, 3)
    poke(dev, 0x00, 5)
    assert (count(efds[3]), count(efds[5])) == (0, 1)
    for fd in efds:
        os.close(fd)


def test_err_and_req_triggers(dev):
    err, req = eventfds(2)
    raw_set_irqs(dev, EVENTFD | TRIGGER, ERR, 0, 1, struct.pack("<i", err))
    raw_set_irqs(dev, EVENTFD | TRIGGER, REQ, 0, 1, struct.pack("<i", req))
    poke(dev, 0x10, 1)
    poke(dev, 0x14, 1)
    assert (count(err), count(req)) == (1, 1)
    raw_set_irqs(dev, NONE | TRIGGER, ERR, 0, 1)  # loopback
    assert count(err) == 1
    assert errno_of(raw_set_irqs, dev, EVENTFD | TRIGGER, REQ, 0, 0) == errno.EINVAL  # count 0 with an eventfd
    raw_set_irqs(dev, NONE | TRIGGER, REQ, 0, 0)  # count 0: unassign
    poke(dev, 0x14, 1)
    assert count(req) == 0
    os.close(err)
    os.close(req)


def test_nothing_is_lost_when_interrupts_come_faster_than_the_driver_reads(dev):
    (efd,) = eventfds(1)
    dev.enable_irq_eventfds(MSIX, [efd])
    total = 0
    for _ in range(10):
        poke(dev, 0x0C, 5000)  # 5000 messages per register write
    total += count(efd)
    assert total == 50_000
    os.close(efd)


def test_driver_waits_with_epoll_from_another_thread(dev):
    """A driver thread blocks in epoll on its MSI-X eventfds; the device raises from this thread."""
    efds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(4)]  # blocking eventfds, as drivers use
    dev.enable_irq_eventfds(MSIX, efds)
    seen: list[int] = []
    ready = threading.Event()

    def driver() -> None:
        ep = select.epoll()
        for v, fd in enumerate(efds):
            ep.register(fd, select.EPOLLIN)
        ready.set()
        while len(seen) < 4:
            for fd, _ in ep.poll(10):
                os.eventfd_read(fd)
                seen.append(efds.index(fd))
        ep.close()

    thread = threading.Thread(target=driver)
    thread.start()
    ready.wait(10)
    for v in (2, 0, 3, 1):
        poke(dev, 0x00, v)
    thread.join(20)
    assert not thread.is_alive() and sorted(seen) == [0, 1, 2, 3]
    for fd in efds:
        os.close(fd)


# -- who gets interrupts, and teardown ----------------------------------------------------------------

def test_interrupts_reach_only_the_binder_and_close_tears_down(irqmount):
    with IommuFd(irqmount.iommu) as iommu:
        bound = VfioDevice(irqmount.device(0))
        bound.bind_iommufd(iommu)
        efds = eventfds(2)
        with VfioDevice(irqmount.device(0)) as blocked:
            assert errno_of(blocked.enable_irq_eventfds, MSIX, [efds[1]]) == errno.EINVAL
            assert errno_of(blocked.get_irq_info, MSIX) == errno.EINVAL
        bound.enable_irq_eventfds(MSIX, [efds[0]])
        assert daemon_eventfds(irqmount.process.pid) == 1
        bound.close()  # every assignment goes with the handle (FUSE delivers the release a moment later)
        assert wait_until(lambda: daemon_eventfds(irqmount.process.pid) == 0)
        with VfioDevice(irqmount.device(0)) as rebound:
            rebound.bind_iommufd(iommu)
            assert errno_of(raw_set_irqs, rebound, NONE | TRIGGER, MSIX, 0, 1) == errno.EINVAL  # disabled
            poke(rebound, 0x00, 0)
            assert count(efds[0]) == 0
        for fd in efds:
            os.close(fd)


def test_reset_tears_down_every_assignment(dev, irqmount):
    efds = eventfds(2)
    dev.enable_irq_eventfds(MSIX, [efds[0]])
    raw_set_irqs(dev, EVENTFD | TRIGGER, REQ, 0, 1, struct.pack("<i", efds[1]))
    assert daemon_eventfds(irqmount.process.pid) == 2
    dev.reset()
    assert daemon_eventfds(irqmount.process.pid) == 0
    poke(dev, 0x14, 1)
    assert count(efds[1]) == 0
    for fd in efds:
        os.close(fd)


def test_closing_the_clients_eventfd_does_not_break_the_daemon(dev):
    (efd,) = eventfds(1)
    dev.enable_irq_eventfds(MSIX, [efd])
    os.close(efd)  # the daemon holds its own reference: signalling stays harmless
    poke(dev, 0x00, 0)
    assert dev.get_irq_info(MSIX).count == 16


def test_set_irqs_with_many_vectors_at_once(dev):
    efds = eventfds(16)
    dev.enable_irq_eventfds(MSIX, efds)
    for v in range(16):
        poke(dev, 0x00, v)
    assert [count(fd) for fd in efds] == [1] * 16
    for fd in efds:
        os.close(fd)


def test_the_same_eventfd_on_two_vectors(dev, irqmount):
    (efd,) = eventfds(1)
    dev.enable_irq_eventfds(MSIX, [efd, efd])
    assert daemon_eventfds(irqmount.process.pid) == 2  # one reference per vector, as the kernel keeps
    dev.enable_irq_eventfds(MSIX, [-1])  # unassigning vector 0 leaves vector 1 working
    poke(dev, 0x00, 1)
    assert count(efd) == 1
    os.close(efd)


def test_a_timer_in_the_model_raises_the_interrupt_later(dev):
    """The device completes work on a trio timer; the driver sleeps in select until then."""
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    dev.enable_irq_eventfds(MSIX, [efd])
    poke(dev, 0x18, 50)  # "done in 50 ms": the write itself returns at once
    ready, _, _ = select.select([efd], [], [], 10)
    assert ready == [efd] and os.eventfd_read(efd) == 1
    # a reset cancels what the device had pending
    poke(dev, 0x18, 200)
    dev.reset()
    dev.enable_irq_eventfds(MSIX, [efd])
    poke(dev, 0x18, 300)  # a fresh timer after the reset still works ...
    ready, _, _ = select.select([efd], [], [], 10)
    assert ready == [efd] and os.eventfd_read(efd) == 1  # ... and the cancelled one never fired
    os.close(efd)


def test_a_saturated_eventfd_cannot_hang_the_daemon(dev, irqmount):
    """A client can push its own eventfd to the maximum count; the daemon must not block on it."""
    (efd,) = eventfds(1)
    dev.enable_irq_eventfds(MSIX, [efd])
    os.eventfd_write(efd, 0xFFFF_FFFF_FFFF_FFFE)  # the counter's maximum
    poke(dev, 0x00, 0)  # would block the daemon forever if it wrote
    assert dev.get_irq_info(MSIX).count == 16  # the daemon still answers
    assert os.eventfd_read(efd) == 0xFFFF_FFFF_FFFF_FFFE
    poke(dev, 0x00, 0)
    assert count(efd) == 1  # and counting resumes once the driver read it
    os.close(efd)
