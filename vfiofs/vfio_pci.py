"""vfio-pci's behaviour for one emulated function: device ioctls and region access.

This is the driver half of the split (the kernel's vfio_pci_core.c / vfio_pci_rdwr.c):
it runs only on a bound handle — the state machine in :mod:`vfiofs.state` has already
let the request through — and turns VFIO's region and info interface into calls on a
:class:`vfiofs.model.DeviceModel`.
"""

from __future__ import annotations

import ctypes
import errno
import logging
from typing import Callable, TypeVar

from . import abi
from .errors import VfioError
from .model import Bar, DeviceModel
from .pci_config import PciConfigSpace
from .usermem import UserBuffer

log = logging.getLogger(__name__)
T = TypeVar("T")

_R = abi.VFIO_REGION_INFO_FLAG_READ
_W = abi.VFIO_REGION_INFO_FLAG_WRITE

# Features the vfio core itself owns; without migration/logging ops they are ENOTTY.
_CORE_FEATURES = {
    abi.VFIO_DEVICE_FEATURE_MIGRATION,
    abi.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
    abi.VFIO_DEVICE_FEATURE_MIG_DATA_SIZE,
    abi.VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
    abi.VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP,
    abi.VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
}
_FEATURE_FLAGS = (
    abi.VFIO_DEVICE_FEATURE_MASK
    | abi.VFIO_DEVICE_FEATURE_GET
    | abi.VFIO_DEVICE_FEATURE_SET
    | abi.VFIO_DEVICE_FEATURE_PROBE
)


def call_model(what: str, hook: Callable[..., T], *args: object) -> T:
    """Run a model hook; a bug in a model becomes EIO for the caller, never a dead daemon."""
    try:
        return hook(*args)
    except VfioError:
        raise
    except Exception:
        log.exception("device model failed in %s", what)
        raise VfioError(errno.EIO, f"device model failed in {what}") from None


def offsetofend(struct: type[ctypes.Structure], field: str) -> int:
    descriptor = getattr(struct, field)
    return descriptor.offset + descriptor.size


class VfioPciDevice:
    """One emulated PCI function as vfio-pci presents it."""

    def __init__(self, model: DeviceModel) -> None:
        self.model = model
        self.bars: dict[int, Bar] = {bar.index: bar for bar in model.bars}
        self.config = PciConfigSpace(model.identity, model.bars)

    # -- lifecycle (vfio_pci_core_enable / _disable) ---------------------------------
    def open_device(self) -> None:
        self.config = PciConfigSpace(self.model.identity, self.model.bars)
        call_model("open", self.model.open)

    def close_device(self) -> None:
        """Close and reset; failures are logged, as close must always succeed."""
        for what, hook in (("close", self.model.close), ("reset", self.model.reset)):
            try:
                call_model(what, hook)
            except VfioError as exc:
                log.warning("ignoring %s during close: %s", what, exc)

    # -- ioctls -------------------------------------------------------------------------
    @property
    def num_regions(self) -> int:
        return abi.VFIO_PCI_NUM_REGIONS

    def ioctl(self, request: int, arg: UserBuffer) -> int:
        if request == abi.VFIO_DEVICE_GET_INFO:
            return self._get_info(arg)
        if request == abi.VFIO_DEVICE_GET_REGION_INFO:
            return self._get_region_info(arg)
        if request == abi.VFIO_DEVICE_RESET:
            if not self.model.reset_works:
                raise VfioError(errno.EINVAL, "device has no reset")
            call_model("reset", self.model.reset)
            return 0
        if request == abi.VFIO_DEVICE_FEATURE:
            return self._feature(arg)
        raise VfioError(errno.ENOTTY, f"ioctl {request:#x} not supported by vfio-pci")

    def _get_info(self, arg: UserBuffer) -> int:
        minsz = offsetofend(abi.vfio_device_info, "num_irqs")
        info = arg.read_struct(abi.vfio_device_info, minsz)
        if info.argsz < minsz:
            raise VfioError(errno.EINVAL, "argsz smaller than vfio_device_info")
        info.flags = abi.VFIO_DEVICE_FLAGS_PCI | (abi.VFIO_DEVICE_FLAGS_RESET if self.model.reset_works else 0)
        info.num_regions = self.num_regions
        info.num_irqs = abi.VFIO_PCI_NUM_IRQS
        arg.write_struct(info, min(info.argsz, ctypes.sizeof(info)))
        return 0

    def region_info(self, index: int) -> tuple[int, int]:
        """(size, flags) of region ``index`` as vfio-pci reports it; EINVAL if it has none."""
        if index == abi.VFIO_PCI_CONFIG_REGION_INDEX:
            return self.config.size, _R | _W
        if index <= abi.VFIO_PCI_BAR5_REGION_INDEX:
            bar = self.bars.get(index)
            return (bar.size, _R | _W) if bar else (0, 0)
        if index == abi.VFIO_PCI_ROM_REGION_INDEX:
            return 0, 0  # no expansion ROM
        # VGA, and anything past the regions this function has.
        raise VfioError(errno.EINVAL, f"no region {index}")

    def _get_region_info(self, arg: UserBuffer) -> int:
        minsz = offsetofend(abi.vfio_region_info, "offset")
        info = arg.read_struct(abi.vfio_region_info, minsz)
        if info.argsz < minsz:
            raise VfioError(errno.EINVAL, "argsz smaller than vfio_region_info")
        info.size, info.flags = self.region_info(info.index)
        info.offset = abi.VFIO_PCI_INDEX_TO_OFFSET(info.index)
        arg.write_struct(info, minsz)
        return 0

    def _feature(self, arg: UserBuffer) -> int:
        minsz = offsetofend(abi.vfio_device_feature, "flags")
        feature = arg.read_struct(abi.vfio_device_feature, minsz)
        if feature.argsz < minsz:
            raise VfioError(errno.EINVAL, "argsz smaller than vfio_device_feature")
        if feature.flags & ~_FEATURE_FLAGS:
            raise VfioError(errno.EINVAL, "unknown feature flags")
        both = abi.VFIO_DEVICE_FEATURE_GET | abi.VFIO_DEVICE_FEATURE_SET
        if feature.flags & both == both and not feature.flags & abi.VFIO_DEVICE_FEATURE_PROBE:
            raise VfioError(errno.EINVAL, "GET and SET together need PROBE")
        index = feature.flags & abi.VFIO_DEVICE_FEATURE_MASK
        where = "the vfio core" if index in _CORE_FEATURES else "vfio-pci"
        raise VfioError(errno.ENOTTY, f"feature {index} not supported by {where}")

    # -- region access (vfio_pci_rw) -----------------------------------------------------
    def _locate(self, offset: int, count: int, write: bool) -> tuple[int, int, int]:
        """(index, pos, count) of an access, truncated at the end of a BAR."""
        index = abi.VFIO_PCI_OFFSET_TO_INDEX(offset)
        pos = offset & abi.VFIO_PCI_OFFSET_MASK
        if index >= self.num_regions:
            raise VfioError(errno.EINVAL, f"no region {index}")
        if index == abi.VFIO_PCI_CONFIG_REGION_INDEX:
            return index, pos, count
        if index == abi.VFIO_PCI_ROM_REGION_INDEX and write:
            raise VfioError(errno.EINVAL, "the ROM is read-only")
        size, _ = self.region_info(index)
        if size == 0:
            raise VfioError(errno.EINVAL, f"region {index} is not implemented")
        if pos >= size:
            raise VfioError(errno.EINVAL, f"offset {pos:#x} past the end of region {index}")
        return index, pos, min(count, size - pos)

    def read(self, offset: int, count: int) -> bytes:
        index, pos, count = self._locate(offset, count, write=False)
        if index == abi.VFIO_PCI_CONFIG_REGION_INDEX:
            return self.config.read(pos, count)
        data = call_model("bar_read", self.model.bar_read, index, pos, count)
        if not isinstance(data, (bytes, bytearray)) or len(data) != count:
            log.error("device model returned %r bytes for a %d-byte read", len(data) if data is not None else None, count)
            raise VfioError(errno.EIO, "device model returned a wrong-sized read")
        return bytes(data)

    def write(self, offset: int, data: bytes) -> int:
        index, pos, count = self._locate(offset, len(data), write=True)
        if index == abi.VFIO_PCI_CONFIG_REGION_INDEX:
            return self.config.write(pos, data)
        call_model("bar_write", self.model.bar_write, index, pos, bytes(data[:count]))
        return count
