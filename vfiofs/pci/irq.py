"""A device's interrupts as vfio-pci exposes them: GET_IRQ_INFO, SET_IRQS and delivery.

Mirrors drivers/vfio/pci/vfio_pci_intrs.c and vfio_set_irqs_validate_and_prepare():
one interrupt type is active at a time (INTx, MSI or MSI-X); ERR and REQ are single
triggers beside it. INTx is level-triggered and automasked: one signal per assertion,
then masked until the driver unmasks (SET_IRQS UNMASK, or clearing INTx-disable in
config space), and signalled again on unmask while the line is still asserted. MSI and
MSI-X are edge messages per vector. MSI honours its per-vector mask bits (recording a masked
message in the pending bits). MSI-X, as in vfio-pci, belongs to the host: SET_IRQS alone
makes a vector deliver, and neither the table's mask bits nor the function mask (which the
user cannot write) hold a message back; the table itself is hidden from region access
(:meth:`vfiofs.pci.vfio_pci.VfioPciDevice.read`). A signal is an eventfd increment, so
nothing is lost when the driver is slow.

GET_IRQ_INFO and SET_IRQS are handlers for the driver's ioctl table
(:class:`vfiofs.core.ioctl.IoctlTable`): the table's vfio prologue has already copied the
structure in and checked ``argsz`` against :data:`IRQ_INFO_MINSZ` / :data:`IRQ_SET_MINSZ`.

Sans-I/O: triggers are opaque handles (:class:`Trigger`) the transport resolved from the
caller's eventfd numbers; ``signal`` and ``release`` are injected.
"""

from __future__ import annotations

import errno
import struct
from typing import Callable, Mapping, Protocol

from vfiofs import abi
from vfiofs.errors import VfioError
from vfiofs.core.ioctl import IoctlArg, offsetofend
from vfiofs.models.spec import DeviceSpec
from vfiofs.pci.config import PCI_COMMAND_INTX_DISABLE

NONE, INTX, MSI, MSIX = "none", "intx", "msi", "msix"

PCI_STATUS_INTERRUPT = 0x08
PCI_MSI_FLAGS_ENABLE = 0x0001
PCI_MSIX_FLAGS_ENABLE = 0x8000

_DATA = abi.VFIO_IRQ_SET_DATA_NONE | abi.VFIO_IRQ_SET_DATA_BOOL | abi.VFIO_IRQ_SET_DATA_EVENTFD
_ACTION = abi.VFIO_IRQ_SET_ACTION_MASK | abi.VFIO_IRQ_SET_ACTION_UNMASK | abi.VFIO_IRQ_SET_ACTION_TRIGGER
#: argsz below these is EINVAL; SET_IRQS's data follows at IRQ_SET_MINSZ.
IRQ_INFO_MINSZ = offsetofend(abi.vfio_irq_info, "count")
IRQ_SET_MINSZ = offsetofend(abi.vfio_irq_set, "count")


class Trigger(Protocol):
    """An eventfd the daemon may signal (it holds its own reference)."""

    fd: int
    is_eventfd: bool
    claimed: bool  # kept by a vector: the transport must not close it after the command

    def duplicate(self) -> "Trigger":
        """Another reference to the same eventfd (one per vector)."""


class Config(Protocol):
    data: bytearray

    def capability_offset(self, kind: str) -> int | None: ...


class IrqController:
    """The interrupt state of one device while a handle is bound."""

    def __init__(self, spec: DeviceSpec, config: Callable[[], Config],
                 signal: Callable[[Trigger], None], release: Callable[[Trigger], None]) -> None:
        self.spec = spec
        self._config = config
        self._signal = signal
        self._release = release
        msi, msix = spec.capability("msi"), spec.capability("msix")
        self.counts = {
            abi.VFIO_PCI_INTX_IRQ_INDEX: 1 if spec.identity.interrupt_pin else 0,
            abi.VFIO_PCI_MSI_IRQ_INDEX: msi.vectors if msi else 0,
            abi.VFIO_PCI_MSIX_IRQ_INDEX: msix.vectors if msix else 0,
            abi.VFIO_PCI_ERR_IRQ_INDEX: 1 if spec.express else 0,
            abi.VFIO_PCI_REQ_IRQ_INDEX: 1,
        }
        self.msi = msi
        self.irq_type = NONE
        self.intx_trigger: Trigger | None = None
        self.intx_masked = False
        self.intx_asserted = False
        self.vectors: list[Trigger | None] = []
        self.err_trigger: Trigger | None = None
        self.req_trigger: Trigger | None = None

    # -- GET_IRQ_INFO (vfio_pci_ioctl_get_irq_info) ---------------------------------------------------
    def get_irq_info(self, arg: IoctlArg, info: abi.vfio_irq_info) -> int:
        """The handler behind VFIO_DEVICE_GET_IRQ_INFO (``argsz`` already checked)."""
        if info.index >= abi.VFIO_PCI_NUM_IRQS:
            raise VfioError(errno.EINVAL, "no such interrupt index")
        if info.index == abi.VFIO_PCI_ERR_IRQ_INDEX and not self.spec.express:
            raise VfioError(errno.EINVAL, "ERR interrupts exist only on PCI Express devices")
        info.flags = abi.VFIO_IRQ_INFO_EVENTFD
        if info.index == abi.VFIO_PCI_INTX_IRQ_INDEX:
            info.flags |= abi.VFIO_IRQ_INFO_MASKABLE | abi.VFIO_IRQ_INFO_AUTOMASKED
        else:
            info.flags |= abi.VFIO_IRQ_INFO_NORESIZE
        info.count = self.counts[info.index]
        arg.buf.write_struct(info, IRQ_INFO_MINSZ)
        return 0

    # -- SET_IRQS ---------------------------------------------------------------------------------------
    def set_irqs(self, arg: IoctlArg, hdr: abi.vfio_irq_set) -> int:
        """The handler behind VFIO_DEVICE_SET_IRQS (``argsz`` already checked); eventfd numbers
        are resolved through ``arg.files``."""
        index, start, count, flags = hdr.index, hdr.start, hdr.count, hdr.flags
        # vfio_set_irqs_validate_and_prepare()
        if index >= abi.VFIO_PCI_NUM_IRQS or count >= 0xFFFF_FFFF - start or flags & ~(_DATA | _ACTION):
            raise VfioError(errno.EINVAL, "bad index, range or flags")
        limit = self.counts[index]
        if start >= limit or start + count > limit:
            raise VfioError(errno.EINVAL, f"vectors {start}+{count} outside the {limit} of index {index}")
        data_type = flags & _DATA
        size = {abi.VFIO_IRQ_SET_DATA_NONE: 0, abi.VFIO_IRQ_SET_DATA_BOOL: 1,
                abi.VFIO_IRQ_SET_DATA_EVENTFD: 4}.get(data_type)
        if size is None:
            raise VfioError(errno.EINVAL, "exactly one DATA type is needed")
        data = b""
        if size:
            if hdr.argsz - IRQ_SET_MINSZ < count * size:
                raise VfioError(errno.EINVAL, "argsz too small for the data")
            data = arg.buf.copy_from(IRQ_SET_MINSZ, count * size)
        action = flags & _ACTION
        handler = self._dispatch(index, action)
        if handler is None:
            raise VfioError(errno.ENOTTY, f"action {action:#x} not supported on index {index}")
        eventfds = list(struct.unpack(f"<{count}i", data)) if data_type == abi.VFIO_IRQ_SET_DATA_EVENTFD else []
        bools = list(data) if data_type == abi.VFIO_IRQ_SET_DATA_BOOL else []
        handler(index, start, count, data_type, eventfds, bools, arg.files)
        return 0

    def _dispatch(self, index: int, action: int):
        if index == abi.VFIO_PCI_INTX_IRQ_INDEX:
            return {abi.VFIO_IRQ_SET_ACTION_MASK: self._intx_mask, abi.VFIO_IRQ_SET_ACTION_UNMASK: self._intx_unmask,
                    abi.VFIO_IRQ_SET_ACTION_TRIGGER: self._intx_trigger}.get(action)
        if action != abi.VFIO_IRQ_SET_ACTION_TRIGGER:
            return None
        if index in (abi.VFIO_PCI_MSI_IRQ_INDEX, abi.VFIO_PCI_MSIX_IRQ_INDEX):
            return self._msi_trigger
        if index == abi.VFIO_PCI_ERR_IRQ_INDEX:
            return self._single_trigger if self.spec.express else None
        return self._single_trigger

    def _resolve(self, number: int, files: Mapping[int, object]) -> Trigger | None:
        """eventfd_ctx_fdget(): EBADF if not open, EINVAL if not an eventfd; None for negative numbers."""
        if number < 0:
            return None
        target = files.get(number)
        if target is None:
            raise VfioError(errno.EBADF, f"fd {number} is not open")
        if not getattr(target, "is_eventfd", False):
            raise VfioError(errno.EINVAL, f"fd {number} is not an eventfd")
        return target  # type: ignore[return-value]

    @staticmethod
    def _own(trigger: Trigger | None) -> Trigger | None:
        """Keep ``trigger``: the transport must not close it after the command."""
        if trigger is not None:
            if trigger.claimed:
                trigger = trigger.duplicate()  # one reference per vector
            trigger.claimed = True
        return trigger

    def _drop(self, trigger: Trigger | None) -> None:
        if trigger is not None:
            self._release(trigger)

    # -- INTx --------------------------------------------------------------------------------------------
    def _intx_mask(self, index, start, count, data_type, eventfds, bools, files) -> None:
        if self._intx_mask_wanted(start, count, data_type, bools, "masking through an eventfd"):
            self.intx_masked = True

    def _intx_unmask(self, index, start, count, data_type, eventfds, bools, files) -> None:
        if self._intx_mask_wanted(start, count, data_type, bools, "unmasking through an eventfd (irqfd)"):
            self.unmask_intx()

    def _intx_mask_wanted(self, start: int, count: int, data_type: int, bools: list[int], eventfd_use: str) -> bool:
        """vfio_pci_set_intx_mask/unmask: INTx enabled and its one vector (EINVAL), no eventfd
        (ENOTTY); whether to act (DATA_NONE, or a true DATA_BOOL)."""
        if self.irq_type != INTX or start != 0 or count != 1:
            raise VfioError(errno.EINVAL, "INTx is not enabled")
        if data_type == abi.VFIO_IRQ_SET_DATA_EVENTFD:
            raise VfioError(errno.ENOTTY, f"{eventfd_use} is not supported")
        return data_type == abi.VFIO_IRQ_SET_DATA_NONE or bool(bools[0])

    def _intx_trigger(self, index, start, count, data_type, eventfds, bools, files) -> None:
        if self.irq_type == INTX and count == 0 and data_type == abi.VFIO_IRQ_SET_DATA_NONE:
            self._intx_disable()
            return
        if self.irq_type not in (INTX, NONE) or start != 0 or count != 1:
            raise VfioError(errno.EINVAL, "another interrupt type is enabled, or bad range")
        if data_type == abi.VFIO_IRQ_SET_DATA_EVENTFD:
            trigger = self._resolve(eventfds[0], files)
            if self.irq_type == NONE:
                self.irq_type, self.intx_masked = INTX, False
            self._drop(self.intx_trigger)
            self.intx_trigger = self._own(trigger)
            self._intx_update()  # a line already asserted fires at once
            return
        if self.irq_type != INTX:
            raise VfioError(errno.EINVAL, "INTx is not enabled")
        if (data_type == abi.VFIO_IRQ_SET_DATA_NONE or bools[0]) and self.intx_trigger is not None:
            self._signal(self.intx_trigger)  # loopback

    def _intx_disable(self) -> None:
        self._drop(self.intx_trigger)
        self.intx_trigger, self.intx_masked, self.irq_type = None, False, NONE

    def _intx_update(self) -> None:
        """Signal once for an asserted, unmasked, enabled line, then automask."""
        config = self._config()
        disabled = int.from_bytes(config.data[4:6], "little") & PCI_COMMAND_INTX_DISABLE
        if (self.irq_type == INTX and self.intx_asserted and not self.intx_masked and not disabled
                and self.intx_trigger is not None):
            self._signal(self.intx_trigger)
            self.intx_masked = True

    def unmask_intx(self) -> None:
        self.intx_masked = False
        self._intx_update()

    def set_intx(self, asserted: bool) -> None:
        """The model drives the INTx line; STATUS.INTERRUPT follows it."""
        self.intx_asserted = asserted
        config = self._config()
        if asserted:
            config.data[6] |= PCI_STATUS_INTERRUPT
        else:
            config.data[6] &= ~PCI_STATUS_INTERRUPT & 0xFF
        if asserted:
            self._intx_update()

    # -- MSI / MSI-X --------------------------------------------------------------------------------------
    def _msi_trigger(self, index, start, count, data_type, eventfds, bools, files) -> None:
        kind = MSI if index == abi.VFIO_PCI_MSI_IRQ_INDEX else MSIX
        if self.irq_type == kind and count == 0 and data_type == abi.VFIO_IRQ_SET_DATA_NONE:
            self._msi_disable()
            return
        if self.irq_type not in (kind, NONE):
            raise VfioError(errno.EINVAL, "another interrupt type is enabled")
        if data_type == abi.VFIO_IRQ_SET_DATA_EVENTFD:
            triggers = [self._resolve(n, files) for n in eventfds]  # all or nothing
            if self.irq_type == NONE:
                self.irq_type = kind
                self.vectors = [None] * self.counts[index]
                self._set_enable(kind, True, start + count)
            for i, trigger in enumerate(triggers):
                self._drop(self.vectors[start + i])
                self.vectors[start + i] = self._own(trigger)
            return
        if self.irq_type != kind:
            raise VfioError(errno.EINVAL, "this interrupt type is not enabled")
        for i in range(start, start + count):  # loopback, whatever the masks say
            trigger = self.vectors[i]
            if trigger is not None and (data_type == abi.VFIO_IRQ_SET_DATA_NONE or bools[i - start]):
                self._signal(trigger)

    def _msi_disable(self) -> None:
        for trigger in self.vectors:
            self._drop(trigger)
        self._set_enable(self.irq_type, False, 0)
        self.vectors, self.irq_type = [], NONE

    def _set_enable(self, kind: str, on: bool, nvec: int) -> None:
        """Mirror the enable state in config space, as the kernel's MSI setup does."""
        config = self._config()
        at = config.capability_offset("msi" if kind == MSI else "msix")
        if at is None:
            return
        control = int.from_bytes(config.data[at + 2 : at + 4], "little")
        if kind == MSI:
            mme = max(nvec - 1, 0).bit_length() if on else 0
            control = (control & ~0x0071) | (PCI_MSI_FLAGS_ENABLE if on else 0) | (mme << 4)
        else:
            control = (control & ~PCI_MSIX_FLAGS_ENABLE) | (PCI_MSIX_FLAGS_ENABLE if on else 0)
        config.data[at + 2 : at + 4] = control.to_bytes(2, "little")

    def _msi_bits(self, pending: bool) -> tuple[Config, int]:
        """Config space and where the mask (or pending) bits of a maskable MSI capability are."""
        config = self._config()
        at = config.capability_offset("msi")
        assert at is not None and self.msi is not None and self.msi.maskable
        return config, at + (16 if self.msi.address64 else 12) + (4 if pending else 0)

    def _msi_masked(self, vector: int) -> bool:
        if not (self.msi and self.msi.maskable):
            return False
        config, mask_at = self._msi_bits(pending=False)
        return bool(int.from_bytes(config.data[mask_at : mask_at + 4], "little") >> vector & 1)

    def raise_irq(self, index: int, vector: int = 0) -> None:
        """The model sends an edge interrupt; it reaches the binder only if that type is enabled."""
        if index == abi.VFIO_PCI_MSI_IRQ_INDEX and self.irq_type == MSI:
            if vector < len(self.vectors) and self.vectors[vector] is not None:
                if self._msi_masked(vector):
                    self._set_msi_pending(vector)
                else:
                    self._signal(self.vectors[vector])  # type: ignore[arg-type]
        elif index == abi.VFIO_PCI_MSIX_IRQ_INDEX and self.irq_type == MSIX:
            # vfio-pci programs the real table itself: an assigned vector always delivers
            if vector < len(self.vectors) and self.vectors[vector] is not None:
                self._signal(self.vectors[vector])  # type: ignore[arg-type]
        elif index == abi.VFIO_PCI_ERR_IRQ_INDEX and self.err_trigger is not None:
            self._signal(self.err_trigger)
        elif index == abi.VFIO_PCI_REQ_IRQ_INDEX and self.req_trigger is not None:
            self._signal(self.req_trigger)

    def _set_msi_pending(self, vector: int) -> None:
        config, pending_at = self._msi_bits(pending=True)
        value = int.from_bytes(config.data[pending_at : pending_at + 4], "little") | 1 << vector
        config.data[pending_at : pending_at + 4] = value.to_bytes(4, "little")

    def deliver_unmasked(self) -> None:
        """After an MSI mask bit changed: send what became deliverable (the pending bits)."""
        if self.irq_type == MSI and self.msi is not None and self.msi.maskable:
            config, pending_at = self._msi_bits(pending=True)
            pending = int.from_bytes(config.data[pending_at : pending_at + 4], "little")
            for vector, trigger in enumerate(self.vectors):
                if pending >> vector & 1 and not self._msi_masked(vector):
                    pending &= ~(1 << vector)
                    if trigger is not None:
                        self._signal(trigger)
            config.data[pending_at : pending_at + 4] = pending.to_bytes(4, "little")

    # -- ERR / REQ (vfio_pci_set_ctx_trigger_single) --------------------------------------------------------
    def _single_trigger(self, index, start, count, data_type, eventfds, bools, files) -> None:
        if start != 0 or count > 1:
            raise VfioError(errno.EINVAL, "ERR and REQ have a single vector")
        attr = "err_trigger" if index == abi.VFIO_PCI_ERR_IRQ_INDEX else "req_trigger"
        current: Trigger | None = getattr(self, attr)
        if data_type == abi.VFIO_IRQ_SET_DATA_NONE:
            if current is None:
                raise VfioError(errno.EINVAL, "no trigger assigned")
            if count:
                self._signal(current)
            else:
                self._drop(current)
                setattr(self, attr, None)
            return
        if not count:
            raise VfioError(errno.EINVAL, "count 0 needs DATA_NONE")
        if data_type == abi.VFIO_IRQ_SET_DATA_BOOL:
            if bools[0] and current is not None:
                self._signal(current)
            return
        number = eventfds[0]
        if number == -1:
            self._drop(current)
            setattr(self, attr, None)
        elif number >= 0:
            trigger = self._resolve(number, files)
            self._drop(current)
            setattr(self, attr, self._own(trigger))

    # -- teardown --------------------------------------------------------------------------------------------
    def teardown(self) -> None:
        """Close of the bound handle, or reset: every assignment goes."""
        if self.irq_type == INTX:
            self._intx_disable()
        elif self.irq_type in (MSI, MSIX):
            self._msi_disable()
        for attr in ("err_trigger", "req_trigger"):
            self._drop(getattr(self, attr))
            setattr(self, attr, None)
        self.intx_masked = False
