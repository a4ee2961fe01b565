"""What the core needs from the drivers below it, as Protocols (the kernel's ``*_ops``).

The core never imports a driver: :mod:`vfiofs.host.daemon` passes the concrete classes
in (``VfioPciDevice`` for :class:`DeviceDriver`, ``IommufdContext`` for
:class:`IommuContext`, ``Type1Container`` for :class:`IommuContainer`, the descriptor
channel and ``send_fd`` for the mailbox). These classes only state the shapes; nothing
here runs.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from vfiofs.core.ioctl import IoctlArg


class CallerMemory(Protocol):
    """The memory of the process behind an ioctl (``IoctlArg.process()`` opens it)."""

    def read(self, addr: int, size: int) -> bytes: ...

    def write(self, addr: int, data: bytes) -> None: ...

    def check_range(self, addr: int, length: int, write: bool) -> None: ...

    def close(self) -> None: ...


class DmaAccess(Protocol):
    """A device's view of an address space (``vfiofs.models.api.DmaPort``)."""

    def read(self, iova: int, size: int) -> bytes: ...

    def write(self, iova: int, data: bytes) -> None: ...


class DmaTarget(Protocol):
    """An address space a device's DMA can go through (an IOAS, or a type1 container's)."""

    def dma_port(self, on_fault: Callable[[str], None],
                 on_done: Callable[[str, int, int], None]) -> DmaAccess: ...


class DeviceDriver(Protocol):
    """vfio_device_ops: the driver half of a registered device (``VfioPciDevice``)."""

    spec: Any  # the DeviceSpec: name, identity, iommu_group
    irqs: Any  # has ``irq_type`` (str), for `vfiofs ls`
    trace: Any  # the mount's TraceBus, or None

    def open_device(self) -> None: ...

    def close_device(self) -> None: ...

    def ioctl(self, request: int, arg: IoctlArg) -> int: ...

    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> int: ...

    def map_region(self, index: int, offset: int, length: int) -> int: ...

    def sync(self) -> None: ...

    def attach_dma(self, target: DmaTarget | None) -> None: ...

    def host_port(self) -> object | None: ...


class IommuBinding(Protocol):
    """A device bound to an iommufd context (``struct iommufd_device``)."""

    id: int  # the object id BIND reports as out_devid

    @property
    def ioas_id(self) -> int | None:
        """The IOAS the device is attached to (through its HWPT), for `vfiofs ls`."""


class IommuContext(Protocol):
    """One open of ``/dev/iommu`` (``struct iommufd_ctx``): its own ioctls and its devices."""

    def ioctl(self, request: int, arg: IoctlArg) -> int: ...

    def bind_device(self, name: str, on_attach: Callable[[DmaTarget | None], None]) -> IommuBinding: ...

    def unbind_device(self, binding: Any) -> None: ...

    def attach(self, binding: Any, pt_id: int) -> int:
        """Attach (or replace) to IOAS/HWPT ``pt_id``; the HWPT id the device is now attached to."""

    def detach(self, binding: Any) -> None: ...

    def release(self) -> None:
        """The iommu file was closed: destroy every object once no device or group holds the context."""

    @property
    def vfio_compat(self) -> "IommuContainer":
        """The context as a legacy container (iommufd's VFIO compatibility layer)."""


class IommuContainer(Protocol):
    """What a group is attached to with VFIO_GROUP_SET_CONTAINER: one open of
    ``/dev/vfio/vfio`` with its IOMMU backend (type1), or an iommufd context through its
    VFIO compatibility layer (``IommufdContext.vfio_compat``)."""

    @property
    def iommu_set(self) -> bool:
        """Devices may be handed out (type1: VFIO_SET_IOMMU succeeded; an iommufd: always)."""

    def attach_group(self, group: object) -> None:
        """SET_CONTAINER's own work (an iommufd creates its compat IOAS); errors propagate."""

    def detach_group(self, group: object) -> None:
        """The last group leaving a type1 container takes the IOMMU type and every mapping with it."""

    def connect_device(self, name: str, on_attach: Callable[[DmaTarget | None], None]) -> object:
        """The first open of a group's device: give it the container's address space (an
        iommufd binds it and attaches it to the compat IOAS); the link to disconnect later."""

    def disconnect_device(self, link: Any) -> None:
        """The device's last handle closed (after ``close_device``)."""


class DescriptorChannel(Protocol):
    """Where clients deposit descriptors (eventfds, a pidfd) for a request (``FdChannel``)."""

    name: bytes

    def take(self, parcel: bytes, number: int, uid: int) -> object | None: ...

    def sender(self, parcel: bytes, uid: int) -> int | None: ...

    def discard(self, parcel: bytes) -> None: ...


#: Sends a region's memory to the client's listener: ``send_fd(listener_name, fd, uid)``.
SendFd = Callable[[bytes, int, int], None]
#: Opens the memory of the process a pidfd refers to (``ProcessMemory.open``).
OpenMemory = Callable[[int], CallerMemory]
