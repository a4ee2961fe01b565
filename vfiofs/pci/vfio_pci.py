"""vfio-pci's behaviour for one emulated function: device ioctls, regions, mmap, reset.

This is the driver half of the split (the kernel's vfio_pci_core.c, vfio_pci_rdwr.c,
vfio_pci_config.c): it runs only on a bound handle — the state machine in
:mod:`vfiofs.core.handles` has already let the request through — and turns VFIO's region and
info interface into calls on a :class:`vfiofs.models.api.DeviceModel`.

Its ioctls are one table (:data:`IOCTLS`). It does no I/O: eventfds are signalled and
released through functions the daemon injects, and DMA goes through the port its
DmaTarget (an IOAS) hands out.
"""

from __future__ import annotations

import ctypes
import errno
import logging
from collections import deque
from typing import Callable, TypeVar

from vfiofs import abi
from vfiofs.core.ops import DmaTarget
from vfiofs.core.ioctl import Capability, Ioctl, IoctlArg, IoctlTable, Style, offsetofend, place_capabilities
from vfiofs.errors import VfioError
from vfiofs.pci.irq import IRQ_INFO_MINSZ, IRQ_SET_MINSZ, IrqController, Trigger
from vfiofs.models.api import DeviceModel
from vfiofs.pci.config import (PCI_CFG_SPACE_SIZE, PCI_COMMAND_INTX_DISABLE, PCI_COMMAND_IO, PCI_COMMAND_MEMORY,
                               PciConfigSpace, rom_bar_size)
from vfiofs.abi import PAGE_SIZE

log = logging.getLogger(__name__)
T = TypeVar("T")

_R = abi.VFIO_REGION_INFO_FLAG_READ
_W = abi.VFIO_REGION_INFO_FLAG_WRITE
_MMAP = abi.VFIO_REGION_INFO_FLAG_MMAP

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

DEVICE_INFO_MINSZ = offsetofend(abi.vfio_device_info, "num_irqs")
REGION_INFO_MINSZ = offsetofend(abi.vfio_region_info, "offset")
FEATURE_MINSZ = offsetofend(abi.vfio_device_feature, "flags")


def _ignore(trigger: Trigger) -> None:
    """The default ``signal``/``release``: for unit tests and tools that register no eventfds."""


def call_model(what: str, hook: Callable[..., T], *args: object) -> T:
    """Run a model hook; a bug in a model becomes EIO for the caller, never a dead daemon."""
    try:
        return hook(*args)
    except VfioError:
        raise
    except Exception:
        log.exception("device model failed in %s", what)
        raise VfioError(errno.EIO, f"device model failed in {what}") from None


def model_bytes(what: str, data: object, size: int) -> bytes:
    """A model's answer to a read of ``size`` bytes; anything else is EIO (logged)."""
    if type(data) is bytes and len(data) == size:  # the usual case, kept cheap
        return data
    if not isinstance(data, (bytes, bytearray)) or len(data) != size:
        log.error("device model returned a wrong-sized %s (wanted %d bytes)", what, size)
        raise VfioError(errno.EIO, f"device model returned a wrong-sized {what}")
    return bytes(data)


def _dword_pieces(start: int, end: int) -> list[tuple[int, int]]:
    """[start, end) split as vfio_config_do_rw does: naturally aligned 4/2/1-byte pieces."""
    pieces = []
    while start < end:
        n = 4 if start % 4 == 0 and end - start >= 4 else 2 if start % 2 == 0 and end - start >= 2 else 1
        pieces.append((start, n))
        start += n
    return pieces


def page_align(size: int) -> int:
    return (size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


class VfioPciDevice:
    """One emulated PCI function as vfio-pci presents it.

    ``signal`` and ``release`` are what this driver does with an eventfd it decided to fire or
    to drop (the daemon passes :mod:`vfiofs.host.eventfd`'s); the driver itself does no I/O.
    """

    def __init__(self, model: DeviceModel, *, signal: Callable[[Trigger], None] = _ignore,
                 release: Callable[[Trigger], None] = _ignore) -> None:
        self.model = model
        self._signal_trigger = signal
        self.spec = model.spec
        self.config = self._fresh_config()
        # Hot path: implemented BARs by index, with the COMMAND bit that gates them.
        self._bars = {bar.index: (bar.size, PCI_COMMAND_IO if bar.io else PCI_COMMAND_MEMORY)
                      for bar in self.spec.bars}
        self.dma_trace: deque[str] = deque(maxlen=256)  # DMA faults, newest last
        self.trace = None  # the mount's TraceBus, set by the server
        self.irqs = IrqController(self.spec, lambda: self.config, self._signal, release)
        model.context.connect_interrupts(self.irqs)
        msix = self.spec.capability("msix")
        # BAR index → the MSI-X table and PBA ranges it holds (see _msix_pieces)
        self._msix_ranges: dict[int, list[tuple[int, int, str]]] = {}
        if msix is not None:
            self._msix_ranges.setdefault(msix.table_bar, []).append(
                (msix.table_offset, msix.table_offset + 16 * msix.vectors, "table"))
            self._msix_ranges.setdefault(msix.pba_bar, []).append(
                (msix.pba_offset, msix.pba_offset + 8 * ((msix.vectors + 63) // 64), "pba"))

    def _fresh_config(self) -> PciConfigSpace:
        return PciConfigSpace(self.spec, on_flr=self._function_reset)

    # -- lifecycle (vfio_pci_core_enable / _disable) -----------------------------------------
    def open_device(self) -> None:
        self.config = self._fresh_config()
        call_model("open", self.model.open)

    def close_device(self) -> None:
        """Close and reset; failures are logged, as close must always succeed."""
        self.irqs.teardown()
        self.model.context.connect_dma(None)  # no address space until the next open attaches one
        for what, hook in (("close", self.model.close), ("reset", self.model.reset)):
            try:
                call_model(what, hook)
            except VfioError as exc:
                log.warning("ignoring %s during close: %s", what, exc)
        for memory in self.model.context.memory.values():
            memory.revoke()  # after the reset: only power-on contents move to the fresh memory
        self.config = self._fresh_config()

    def _function_reset(self) -> None:
        """VFIO_DEVICE_RESET and PCIe FLR: power-on state, interrupts torn down; the binder's BAR
        mappings stay valid and show the reset contents (vfio-pci zaps and re-faults them)."""
        self.irqs.teardown()
        call_model("reset", self.model.reset)
        self.config = self._fresh_config()

    def sync(self) -> None:
        call_model("sync", self.model.sync)

    def attach_dma(self, target: DmaTarget | None) -> None:
        """The device's DMA now goes through ``target`` (None: detached, every DMA faults)."""
        self.model.context.connect_dma(None if target is None else target.dma_port(self._trace_dma, self._trace_dma_ok))

    def host_port(self) -> object | None:
        """The model if it has a host side (the far end of a serial line, say), else None: the
        one way the core and the FUSE adapter reach a model's host side."""
        model = self.model
        if getattr(model, "has_host_port", False):
            return model
        return None

    def _trace_dma(self, event: str) -> None:
        self.dma_trace.append(event)
        log.warning("%s: %s", self.spec.name, event)
        if self.trace is not None:
            self.trace.emit(device=self.spec.name, op="dma", fault=event)

    def _trace_dma_ok(self, kind: str, iova: int, size: int) -> None:
        if self.trace is not None and self.trace.subscribers:
            self.trace.emit(device=self.spec.name, op="dma", direction=kind, iova=hex(iova), size=size)

    def _signal(self, trigger: Trigger) -> None:
        if self.trace is not None and self.trace.subscribers:
            self.trace.emit(device=self.spec.name, op="irq", type=self.irqs.irq_type, eventfd=trigger.fd)
        self._signal_trigger(trigger)

    # -- ioctls -------------------------------------------------------------------------------------
    @property
    def num_regions(self) -> int:
        return abi.VFIO_PCI_NUM_REGIONS

    def ioctl(self, request: int, arg: IoctlArg) -> int:
        """A device ioctl on a bound handle, through :data:`IOCTLS` (unknown numbers are ENOTTY)."""
        return IOCTLS.dispatch(self, request, arg)

    def _get_info(self, arg: IoctlArg, info: abi.vfio_device_info) -> int:
        info.flags = abi.VFIO_DEVICE_FLAGS_PCI | (abi.VFIO_DEVICE_FLAGS_RESET if self.model.reset_works else 0)
        info.num_regions = self.num_regions
        info.num_irqs = abi.VFIO_PCI_NUM_IRQS
        arg.buf.write_struct(info, min(info.argsz, ctypes.sizeof(info)))
        return 0

    def _get_irq_info(self, arg: IoctlArg, info: abi.vfio_irq_info) -> int:
        return self.irqs.get_irq_info(arg, info)

    def _set_irqs(self, arg: IoctlArg, hdr: abi.vfio_irq_set) -> int:
        return self.irqs.set_irqs(arg, hdr)

    def _reset(self, arg: IoctlArg, _: None) -> int:
        if not self.model.reset_works:
            raise VfioError(errno.EINVAL, "device has no reset")
        self._function_reset()
        return 0

    def region_info(self, index: int) -> tuple[int, int]:
        """(size, flags) of region ``index`` as vfio-pci reports it; EINVAL if it has none."""
        if index == abi.VFIO_PCI_CONFIG_REGION_INDEX:
            return self.config.size, _R | _W
        if index <= abi.VFIO_PCI_BAR5_REGION_INDEX:
            bar = self.spec.bar(index)
            if bar is None:
                return 0, 0
            return bar.size, _R | _W | (_MMAP if bar.mmap else 0)
        if index == abi.VFIO_PCI_ROM_REGION_INDEX:
            return (rom_bar_size(self.spec.rom), _R) if self.spec.rom is not None else (0, 0)
        # VGA (no emulated device decodes legacy VGA ranges), and anything past the regions.
        raise VfioError(errno.EINVAL, f"no region {index}")

    def region_caps(self, index: int) -> list[Capability]:
        """The info capabilities of region ``index``: sparse mmap areas, MSI-X table mappable."""
        bar = self.spec.bar(index) if index <= abi.VFIO_PCI_BAR5_REGION_INDEX else None
        caps: list[Capability] = []
        if bar is None or not bar.mmap:
            return caps
        if bar.sparse:
            sparse = abi.vfio_region_info_cap_sparse_mmap(
                header=abi.vfio_info_cap_header(id=abi.VFIO_REGION_INFO_CAP_SPARSE_MMAP, version=1),
                nr_areas=len(bar.mmap_areas))
            caps.append((sparse, [abi.vfio_region_sparse_mmap_area(offset=offset, size=size)
                                  for offset, size in bar.mmap_areas]))
        msix = self.spec.capability("msix")
        if msix is not None and msix.table_bar == index:
            caps.append((abi.vfio_info_cap_header(id=abi.VFIO_REGION_INFO_CAP_MSIX_MAPPABLE, version=1), []))
        return caps

    def _get_region_info(self, arg: IoctlArg, info: abi.vfio_region_info) -> int:
        info.size, info.flags = self.region_info(info.index)
        info.offset = abi.VFIO_PCI_INDEX_TO_OFFSET(info.index)
        caps = self.region_caps(info.index)
        if caps:
            info.flags |= abi.VFIO_REGION_INFO_FLAG_CAPS
            place_capabilities(arg.buf, info, caps, REGION_INFO_MINSZ)
        arg.buf.write_struct(info, REGION_INFO_MINSZ)
        return 0

    def _feature(self, arg: IoctlArg, feature: abi.vfio_device_feature) -> int:
        if feature.flags & ~_FEATURE_FLAGS:
            raise VfioError(errno.EINVAL, "unknown feature flags")
        both = abi.VFIO_DEVICE_FEATURE_GET | abi.VFIO_DEVICE_FEATURE_SET
        if feature.flags & both == both and not feature.flags & abi.VFIO_DEVICE_FEATURE_PROBE:
            raise VfioError(errno.EINVAL, "GET and SET together need PROBE")
        index = feature.flags & abi.VFIO_DEVICE_FEATURE_MASK
        where = "the vfio core" if index in _CORE_FEATURES else "vfio-pci"
        raise VfioError(errno.ENOTTY, f"feature {index} not supported by {where}")

    # -- region access (vfio_pci_rw) -----------------------------------------------------------
    def _locate(self, offset: int, count: int, write: bool) -> tuple[int, int, int]:
        """(index, pos, count) of a config or ROM access (implemented BARs take _bar_access)."""
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

    def _bar_access(self, offset: int, count: int) -> tuple[int, int, int] | None:
        """(index, pos, count) for an access to an implemented BAR, else None (the slow path)."""
        index = offset >> abi.VFIO_PCI_OFFSET_SHIFT
        bar = self._bars.get(index)
        if bar is None:
            return None
        size, decode = bar
        pos = offset & abi.VFIO_PCI_OFFSET_MASK
        if pos >= size:
            raise VfioError(errno.EINVAL, f"offset {pos:#x} past the end of region {index}")
        if not self.config.data[4] & decode:  # low byte of PCI_COMMAND
            raise VfioError(errno.EIO, f"BAR {index} access with decoding disabled in PCI_COMMAND")
        return index, pos, min(count, size - pos)

    def read(self, offset: int, count: int) -> bytes:
        access = self._bar_access(offset, count)
        if access is not None:
            index, pos, count = access
            if index in self._msix_ranges and self._msix_overlap(index, pos, count):
                return b"".join(b"\xff" * (hi - lo) if what == "table" else self._bar_read(index, lo, hi - lo)
                                for lo, hi, what in self._msix_pieces(index, pos, count))
            return self._bar_read(index, pos, count)
        index, pos, count = self._locate(offset, count, write=False)
        if index == abi.VFIO_PCI_CONFIG_REGION_INDEX:
            data = self.config.read(pos, count)  # EFAULT past cfg_size (256, or 4096 for PCIe)
            if pos + count > PCI_CFG_SPACE_SIZE:
                data = data[: max(0, PCI_CFG_SPACE_SIZE - pos)] + b"".join(
                    self._extended_read(at, n) for at, n in _dword_pieces(max(pos, PCI_CFG_SPACE_SIZE), pos + count))
            return data
        assert index == abi.VFIO_PCI_ROM_REGION_INDEX and self.spec.rom is not None
        return self.spec.rom[pos : pos + count].ljust(count, b"\0")

    def write(self, offset: int, data: bytes) -> int:
        access = self._bar_access(offset, len(data))
        if access is None:
            index, pos, count = self._locate(offset, len(data), write=True)
            assert index == abi.VFIO_PCI_CONFIG_REGION_INDEX  # everything else is refused or a BAR
            return self._config_write(pos, data)
        index, pos, count = access
        data = data if count == len(data) else data[:count]
        if index in self._msix_ranges and self._msix_overlap(index, pos, count):
            for lo, hi, what in self._msix_pieces(index, pos, count):
                if what is None:  # the MSI-X table and the (read-only) PBA drop the write
                    call_model("bar_write", self.model.bar_write, index, lo, data[lo - pos : hi - pos])
            return count
        call_model("bar_write", self.model.bar_write, index, pos, data)
        return count

    def _bar_read(self, index: int, pos: int, count: int) -> bytes:
        return model_bytes("read", call_model("bar_read", self.model.bar_read, index, pos, count), count)

    def _msix_overlap(self, index: int, pos: int, count: int) -> bool:
        return any(lo < pos + count and pos < hi for lo, hi, _ in self._msix_ranges[index])

    def _msix_pieces(self, index: int, pos: int, count: int) -> list[tuple[int, int, str | None]]:
        """[pos, pos + count) cut at the MSI-X table and PBA: (lo, hi, "table" | "pba" | None).

        vfio-pci hides the table from region access (vfio_pci_core_do_io_rw's excluded range:
        reads 0xFF, writes dropped), because the host owns it; the PBA reads what the device
        holds, and the device ignores writes to it."""
        end, at, pieces = pos + count, pos, []
        for lo, hi, what in sorted(self._msix_ranges[index]):
            lo, hi = max(lo, pos), min(hi, end)
            if lo >= hi:
                continue
            if at < lo:
                pieces.append((at, lo, None))
            pieces.append((lo, hi, what))
            at = hi
        if at < end:
            pieces.append((at, end, None))
        return pieces

    def _extended_read(self, offset: int, size: int) -> bytes:
        return model_bytes("config read", call_model("config_read", self.model.config_read, offset, size), size)

    def _config_write(self, pos: int, data: bytes) -> int:
        """Config writes, plus what they mean for interrupts (vfio_basic_config_write & co).
        Extended space (0x100 and up of a PCIe function) goes to the model, dword by dword."""
        if pos + len(data) > PCI_CFG_SPACE_SIZE:
            self.config.read(pos, len(data))  # the bounds check: EFAULT past cfg_size
            for at, n in _dword_pieces(max(pos, PCI_CFG_SPACE_SIZE), pos + len(data)):
                call_model("config_write", self.model.config_write, at, data[at - pos : at - pos + n])
            if pos >= PCI_CFG_SPACE_SIZE:
                return len(data)
            self._config_write(pos, data[: PCI_CFG_SPACE_SIZE - pos])
            return len(data)
        before = self.config.command & PCI_COMMAND_INTX_DISABLE
        written = self.config.write(pos, data)
        after = self.config.command & PCI_COMMAND_INTX_DISABLE
        if before and not after:
            self.irqs.unmask_intx()  # vfio-pci treats INTx-disable as mask/unmask
        elif after and not before:
            self.irqs.intx_masked = True
        self.irqs.deliver_unmasked()  # MSI mask bits may have cleared
        return written

    # -- mmap (vfio_pci_core_mmap) --------------------------------------------------------------
    def map_region(self, index: int, offset: int, length: int) -> int:
        """The memfd behind ``length`` bytes at ``offset`` of BAR ``index``; EINVAL as mmap would.

        vfio_pci_core_mmap()'s rule: any page range inside PAGE_ALIGN(size) of a BAR that has
        FLAG_MMAP. The sparse mmap areas and the MSI-X table are not checked: since the kernel
        reports MSIX_MAPPABLE, the whole BAR may be mapped. Outside the areas such a mapping
        shows the BAR's memory, not its trapped registers (docs/protocol.md §10).
        """
        if index >= self.num_regions:
            raise VfioError(errno.EINVAL, f"no region {index}")
        bar = self.spec.bar(index) if index <= abi.VFIO_PCI_BAR5_REGION_INDEX else None
        if bar is None or not bar.mmap:
            raise VfioError(errno.EINVAL, f"region {index} cannot be mapped")
        if offset % PAGE_SIZE or length <= 0 or offset + length > page_align(bar.size):
            raise VfioError(errno.EINVAL, "mapping not page-aligned or beyond the region")
        return self.model.context.memory[index].share()


#: vfio-pci's device ioctls (vfio_pci_core_ioctl); the vfio prologue checks ``argsz`` first.
IOCTLS = IoctlTable("vfio-pci", [
    Ioctl(abi.VFIO_DEVICE_GET_INFO, VfioPciDevice._get_info, abi.vfio_device_info, DEVICE_INFO_MINSZ),
    Ioctl(abi.VFIO_DEVICE_GET_REGION_INFO, VfioPciDevice._get_region_info, abi.vfio_region_info,
          REGION_INFO_MINSZ),
    Ioctl(abi.VFIO_DEVICE_GET_IRQ_INFO, VfioPciDevice._get_irq_info, abi.vfio_irq_info, IRQ_INFO_MINSZ),
    Ioctl(abi.VFIO_DEVICE_SET_IRQS, VfioPciDevice._set_irqs, abi.vfio_irq_set, IRQ_SET_MINSZ),
    Ioctl(abi.VFIO_DEVICE_RESET, VfioPciDevice._reset, style=Style.RAW),
    Ioctl(abi.VFIO_DEVICE_FEATURE, VfioPciDevice._feature, abi.vfio_device_feature, FEATURE_MINSZ),
])
