"""Unit tests of vfio-pci's device ioctls, DMA attachment and host port, without FUSE."""

from __future__ import annotations

import errno
import struct

import pytest

from vfiofs import abi
from vfiofs.core.ioctl import IoctlArg
from vfiofs.core.usermem import UserBuffer
from vfiofs.errors import VfioError
from vfiofs.models.api import DeviceModel
from vfiofs.models.spec import BarSpec, Capability, DeviceSpec, PciIdentity
from vfiofs.pci.vfio_pci import VfioPciDevice

SPEC = DeviceSpec(
    name="pci", model="generic", identity=PciIdentity(vendor=0x1234, device=2),
    bars=(BarSpec(index=0, size=0x10000, mmap=True, mmap_areas=((0x1000, 0x3000), (0x8000, 0x8000))),
          BarSpec(index=2, size=0x1000, mmap=True),
          BarSpec(index=3, size=0x1000)),
    capabilities=(Capability("msix", vectors=4, table_bar=0, table_offset=0, pba_bar=0, pba_offset=0x800),),
)


def ioctl(driver: VfioPciDevice, request: int, data: bytes | None) -> tuple[int, bytes]:
    buf = UserBuffer(data)
    result = driver.ioctl(request, IoctlArg(buf))
    return result, bytes(buf.data or b"")


def errno_of(driver: VfioPciDevice, request: int, data: bytes | None) -> int:
    with pytest.raises(VfioError) as exc:
        ioctl(driver, request, data)
    return exc.value.errno


@pytest.fixture
def driver() -> VfioPciDevice:
    return VfioPciDevice(DeviceModel(SPEC))


def region_info(argsz: int, index: int, length: int | None = None) -> bytes:
    head = bytes(abi.vfio_region_info(argsz=argsz, index=index))
    return head.ljust(length if length is not None else argsz, b"\xcc")


def expected_chain(base: int) -> bytes:
    """The region's capability chain written out by hand: sparse mmap (two areas), then MSI-X mappable."""
    sparse = struct.pack("<HHI", abi.VFIO_REGION_INFO_CAP_SPARSE_MMAP, 1, base + 48) + struct.pack("<II", 2, 0)
    sparse += struct.pack("<QQ", 0x1000, 0x3000) + struct.pack("<QQ", 0x8000, 0x8000)
    msix = struct.pack("<HHI", abi.VFIO_REGION_INFO_CAP_MSIX_MAPPABLE, 1, 0)
    return sparse + msix


def test_region_caps_are_chained_after_the_structure(driver):
    _, out = ioctl(driver, abi.VFIO_DEVICE_GET_REGION_INFO, region_info(32 + 56, 0))
    info = abi.vfio_region_info.from_buffer_copy(out[:32])
    assert info.flags == (abi.VFIO_REGION_INFO_FLAG_READ | abi.VFIO_REGION_INFO_FLAG_WRITE
                          | abi.VFIO_REGION_INFO_FLAG_MMAP | abi.VFIO_REGION_INFO_FLAG_CAPS)
    assert (info.argsz, info.cap_offset, info.size, info.offset) == (88, 32, 0x10000, 0)
    assert out[32:] == expected_chain(32)


def test_region_caps_too_big_raise_argsz_and_write_no_chain(driver):
    _, out = ioctl(driver, abi.VFIO_DEVICE_GET_REGION_INFO, region_info(32, 0, length=100))
    info = abi.vfio_region_info.from_buffer_copy(out[:32])
    assert (info.argsz, info.cap_offset) == (88, 0) and info.flags & abi.VFIO_REGION_INFO_FLAG_CAPS
    assert out[32:] == b"\xcc" * 68


def test_region_without_caps(driver):
    _, out = ioctl(driver, abi.VFIO_DEVICE_GET_REGION_INFO, region_info(64, 2))
    info = abi.vfio_region_info.from_buffer_copy(out[:32])
    assert (info.flags & abi.VFIO_REGION_INFO_FLAG_CAPS, info.cap_offset, info.size) == (0, 0, 0x1000)
    assert out[32:] == b"\xcc" * 32
    _, out = ioctl(driver, abi.VFIO_DEVICE_GET_REGION_INFO, region_info(32, 1))
    assert abi.vfio_region_info.from_buffer_copy(out).size == 0  # an unimplemented BAR


def test_region_info_errors(driver):
    assert errno_of(driver, abi.VFIO_DEVICE_GET_REGION_INFO, region_info(31, 0, length=32)) == errno.EINVAL
    assert errno_of(driver, abi.VFIO_DEVICE_GET_REGION_INFO, region_info(32, 8)) == errno.EINVAL  # VGA
    assert errno_of(driver, abi.VFIO_DEVICE_GET_REGION_INFO, b"\x20\0\0\0") == errno.EFAULT


def test_get_info_writes_back_at_most_argsz(driver):
    data = bytes(abi.vfio_device_info(argsz=16)) + b"\xcc" * 8
    _, out = ioctl(driver, abi.VFIO_DEVICE_GET_INFO, data[:24])
    info = abi.vfio_device_info.from_buffer_copy(out)
    assert (info.flags, info.num_regions, info.num_irqs) == (
        abi.VFIO_DEVICE_FLAGS_PCI | abi.VFIO_DEVICE_FLAGS_RESET, abi.VFIO_PCI_NUM_REGIONS, abi.VFIO_PCI_NUM_IRQS)
    assert out[16:] == bytes(abi.vfio_device_info(argsz=16))[16:24]  # cap_offset, pad untouched by the driver
    assert errno_of(driver, abi.VFIO_DEVICE_GET_INFO, struct.pack("<IIII", 15, 0, 0, 0)) == errno.EINVAL


def test_get_irq_info_checks(driver):
    info = lambda argsz, index: bytes(abi.vfio_irq_info(argsz=argsz, index=index))  # noqa: E731
    _, out = ioctl(driver, abi.VFIO_DEVICE_GET_IRQ_INFO, info(16, abi.VFIO_PCI_MSIX_IRQ_INDEX))
    assert abi.vfio_irq_info.from_buffer_copy(out).count == 4
    assert errno_of(driver, abi.VFIO_DEVICE_GET_IRQ_INFO, info(15, 0)) == errno.EINVAL
    assert errno_of(driver, abi.VFIO_DEVICE_GET_IRQ_INFO, info(16, abi.VFIO_PCI_NUM_IRQS)) == errno.EINVAL
    assert errno_of(driver, abi.VFIO_DEVICE_GET_IRQ_INFO, info(16, abi.VFIO_PCI_ERR_IRQ_INDEX)) == errno.EINVAL


def test_feature_checks_in_order(driver):
    feature = lambda argsz, flags: struct.pack("<II", argsz, flags)  # noqa: E731
    get, set_, probe = abi.VFIO_DEVICE_FEATURE_GET, abi.VFIO_DEVICE_FEATURE_SET, abi.VFIO_DEVICE_FEATURE_PROBE
    assert errno_of(driver, abi.VFIO_DEVICE_FEATURE, feature(7, 1 << 31 | get | set_)) == errno.EINVAL
    assert errno_of(driver, abi.VFIO_DEVICE_FEATURE, feature(8, 1 << 31)) == errno.EINVAL  # unknown flag
    assert errno_of(driver, abi.VFIO_DEVICE_FEATURE, feature(8, get | set_)) == errno.EINVAL  # needs PROBE
    assert errno_of(driver, abi.VFIO_DEVICE_FEATURE, feature(8, get | set_ | probe)) == errno.ENOTTY
    assert errno_of(driver, abi.VFIO_DEVICE_FEATURE, None) == errno.EFAULT


def test_unknown_request_and_reset(driver):
    assert errno_of(driver, 0x3BFF, b"") == errno.ENOTTY
    assert ioctl(driver, abi.VFIO_DEVICE_RESET, None)[0] == 0

    class NoReset(DeviceModel):
        reset_works = False

    assert errno_of(VfioPciDevice(NoReset(SPEC)), abi.VFIO_DEVICE_RESET, None) == errno.EINVAL


class FakeTarget:
    """A DmaTarget that hands out a port recording the driver's callbacks."""

    def __init__(self) -> None:
        self.ports: list[tuple] = []

    def dma_port(self, on_fault, on_done):
        port = FakePort(on_fault, on_done)
        self.ports.append(port)
        return port


class FakePort:
    def __init__(self, on_fault, on_done) -> None:
        self.on_fault, self.on_done = on_fault, on_done


def test_attach_dma_asks_the_target_for_a_port(driver):
    target = FakeTarget()
    driver.attach_dma(target)
    (port,) = target.ports
    port.on_fault("IOVA 0x1000 is not mapped")  # the driver's callbacks: faults are kept for status
    port.on_done("read", 0x1000, 4)
    assert list(driver.dma_trace) == ["IOVA 0x1000 is not mapped"]
    driver.attach_dma(None)  # detached: no port asked for
    assert len(target.ports) == 1


def test_host_port_only_for_models_with_a_host_side(driver):
    assert driver.host_port() is None

    class Declared(DeviceModel):
        has_host_port = True

    class Undeclared(DeviceModel):  # host methods alone do not make a host port
        def host_read(self, size: int) -> bytes:
            return b""

        def host_write(self, data: bytes) -> int:
            return len(data)

    model = Declared(SPEC)
    assert VfioPciDevice(model).host_port() is model
    assert VfioPciDevice(Undeclared(SPEC)).host_port() is None


def test_interrupts_go_through_the_injected_signal():
    signalled, released = [], []
    driver = VfioPciDevice(DeviceModel(SPEC), signal=signalled.append, release=released.append)

    class Eventfd:
        fd, is_eventfd, claimed = 7, True, False

    trigger = Eventfd()
    header = abi.vfio_irq_set(argsz=24, flags=abi.VFIO_IRQ_SET_DATA_EVENTFD | abi.VFIO_IRQ_SET_ACTION_TRIGGER,
                              index=abi.VFIO_PCI_REQ_IRQ_INDEX, start=0, count=1)
    driver.ioctl(abi.VFIO_DEVICE_SET_IRQS, IoctlArg(UserBuffer(bytes(header) + struct.pack("<i", 7)),
                                                    files={7: trigger}))
    driver.irqs.raise_irq(abi.VFIO_PCI_REQ_IRQ_INDEX)
    assert signalled == [trigger] and released == []
    driver.close_device()
    assert released == [trigger]


@pytest.mark.parametrize("answer, ok", [(b"\x01\x02\x03\x04", True), (bytearray(b"\x01\x02\x03\x04"), True),
                                        (b"\x01\x02", False), ("abcd", False), (None, False)])
def test_a_model_read_of_the_wrong_kind_or_size_is_eio(driver, monkeypatch, answer, ok):
    monkeypatch.setattr(driver.model, "bar_read", lambda index, pos, count: answer)
    if ok:
        assert driver.read(abi.VFIO_PCI_INDEX_TO_OFFSET(2), 4) == b"\x01\x02\x03\x04"
        return
    with pytest.raises(VfioError) as exc:
        driver.read(abi.VFIO_PCI_INDEX_TO_OFFSET(2), 4)
    assert exc.value.errno == errno.EIO


def test_a_model_bug_in_a_bar_write_or_an_extended_config_read_is_eio(driver, monkeypatch):
    def broken(*args):
        raise RuntimeError("model bug")

    monkeypatch.setattr(driver.model, "bar_write", broken)
    with pytest.raises(VfioError) as exc:
        driver.write(abi.VFIO_PCI_INDEX_TO_OFFSET(2), b"abcd")
    assert exc.value.errno == errno.EIO
    express = VfioPciDevice(DeviceModel(DeviceSpec(name="pcie", model="generic", identity=SPEC.identity,
                                                   capabilities=(Capability("pcie"),))))
    config = abi.VFIO_PCI_INDEX_TO_OFFSET(abi.VFIO_PCI_CONFIG_REGION_INDEX)
    monkeypatch.setattr(express.model, "config_read", lambda offset, size: bytes(size + 1))
    with pytest.raises(VfioError) as exc:
        express.read(config + 0x100, 4)
    assert exc.value.errno == errno.EIO


def test_setting_bcr_flr_in_devctl_resets_the_function(monkeypatch):
    model = DeviceModel(DeviceSpec(name="pcie", model="generic", identity=SPEC.identity,
                                   bars=(BarSpec(index=0, size=0x1000),), capabilities=(Capability("pcie"),)))
    express = VfioPciDevice(model)
    resets = []
    monkeypatch.setattr(model, "reset", lambda: resets.append(1))
    config = abi.VFIO_PCI_INDEX_TO_OFFSET(abi.VFIO_PCI_CONFIG_REGION_INDEX)
    devctl = express.config.capability_offset("pcie") + 8
    express.write(config + devctl, struct.pack("<H", 0x0010))  # another DEVCTL bit: no reset
    assert resets == []
    express.write(config + 0x04, struct.pack("<H", 0))  # decoding off, to see the reset restore it
    express.write(config + devctl, struct.pack("<H", 0x8000))
    assert resets == [1] and express.config.command & 0x2  # power-on config: memory decoding back on
    assert not struct.unpack("<H", express.read(config + devctl, 2))[0] & 0x8000  # the FLR bit reads 0
