"""The interface between vfiofs's generic VFIO layer and a device model.

The kernel separates vfio_main.c from its drivers through ``struct vfio_device_ops``;
vfiofs separates its core from device models the same way. A model describes its PCI
identity and BARs and implements this small set of hooks. It knows nothing about FUSE,
handles or ioctls: the core decides *whether* an access may happen (bound handle, region
bounds, offsets), the model decides *what* it does.

Hooks run on the daemon's event loop and must not block; they raise
:class:`vfiofs.errors.VfioError` to fail with a specific errno. Any other exception is
logged and reported to the caller as EIO — it never takes the daemon down.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class PciIdentity:
    """What the config-space header says about the function."""

    vendor: int
    device: int
    subsystem_vendor: int = 0x1AF4
    subsystem_device: int = 0x1100
    class_code: int = 0xFF0000  # 24 bits: base class, subclass, prog-if
    revision: int = 0
    interrupt_pin: int = 0  # 0 none, 1..4 INTA..INTD


@dataclass(frozen=True)
class Bar:
    """One implemented base address register."""

    index: int  # 0..5
    size: int  # bytes, a power of two
    io: bool = False  # I/O space instead of memory space
    is_64bit: bool = False
    prefetchable: bool = False


class DeviceModel:
    """Base class of device models (compare ``struct vfio_device_ops``).

    Subclasses set :attr:`identity` and :attr:`bars` and override the hooks they need.
    """

    identity: PciIdentity
    bars: Sequence[Bar] = ()
    #: True if :meth:`reset` resets the function (reported as VFIO_DEVICE_FLAGS_RESET).
    reset_works: bool = True

    def open(self) -> None:
        """Called when a handle binds (the kernel's ``open_device``); raise to refuse the bind."""

    def close(self) -> None:
        """Called when the bound handle is closed (``close_device``); the core resets afterwards."""

    def reset(self) -> None:
        """Return the function to its power-on state (VFIO_DEVICE_RESET, and after close)."""

    def bar_read(self, index: int, offset: int, size: int) -> bytes:
        """Read ``size`` bytes at ``offset`` of BAR ``index``; the core has checked the bounds."""
        raise NotImplementedError

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` of BAR ``index``; the core has checked the bounds."""
        raise NotImplementedError
