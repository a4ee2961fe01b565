"""The lifetime of an iommufd context: what its mappings hold is let go of when the context
goes (the iommu file closed, and no bound device or attached group holding it any more),
as iommufd_fops_release destroys every object. Found by the killed-clients stress test
(tests/stress/test_killed_clients.py): each client killed with a DMA mapping left its
/proc/PID/mem and pidfd open in the daemon for good."""

from __future__ import annotations

from vfiofs import abi
from vfiofs.core.handles import Device
from vfiofs.core.ioctl import IoctlArg
from vfiofs.core.mailbox import Mailbox
from vfiofs.core.usermem import UserBuffer
from vfiofs.iommu.iommufd import IommufdContext
from vfiofs.iommu.type1 import Type1Container
from vfiofs.pci.vfio_pci import VfioPciDevice

from test_handles import SpyModel, World  # noqa: F401 (the same server as the state machine's tests)

PAGE = 4096


class HeldMemory:
    """A caller's memory as a mapping holds it (the daemon's ProcessMemory: two descriptors)."""

    def __init__(self) -> None:
        self.closed = False

    def read(self, addr: int, size: int) -> bytes:
        return bytes(size)

    def write(self, addr: int, data: bytes) -> None:
        pass

    def check_range(self, addr: int, length: int, write: bool) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def map_one(ctx: IommufdContext, ioas: int) -> HeldMemory:
    memory = HeldMemory()
    cmd = abi.iommu_ioas_map(size=40, flags=abi.IOMMU_IOAS_MAP_READABLE | abi.IOMMU_IOAS_MAP_WRITEABLE |
                             abi.IOMMU_IOAS_MAP_FIXED_IOVA, ioas_id=ioas, user_va=0x10000, length=PAGE,
                             iova=0x100000)
    assert ctx.ioctl(abi.IOMMU_IOAS_MAP, IoctlArg(UserBuffer(bytes(cmd)), process=lambda: memory)) == 0
    return memory


def test_closing_the_iommu_file_lets_go_of_the_mapped_memory():
    w = World()
    iommu = w.server.open_iommu()
    ctx = w.server.handle(iommu).ctx
    memory = map_one(ctx, w.ioas_alloc(iommu))
    w.server.release(iommu)
    assert memory.closed and not ctx.objects


def test_a_bound_device_keeps_the_context_until_it_closes():
    w = World()
    dev, iommu = w.server.open_device(0), w.server.open_iommu()
    w.bind(dev, iommu)
    ctx = w.server.handle(iommu).ctx
    memory = map_one(ctx, w.ioas_alloc(iommu))
    w.server.release(iommu)  # the order a killed process's files are released in is any order
    assert not memory.closed  # the device may still do DMA through it
    w.server.release(dev)
    assert memory.closed and not ctx.objects


def test_an_attached_group_keeps_the_context_until_it_lets_go():
    devices = [Device(0, "dev0", VfioPciDevice(SpyModel()))]
    server = Mailbox(devices, iommufd=IommufdContext, container=Type1Container)
    iommu, group = server.open_iommu(), server.open_group(devices[0].group.number)
    ctx = server.handle(iommu).ctx
    ctx.vfio_compat.attach_group(server.handle(group))
    memory = map_one(ctx, ctx.vfio_ioas.id)
    server.release(iommu)
    assert not memory.closed
    ctx.vfio_compat.detach_group(server.handle(group))
    assert memory.closed and not ctx.objects
