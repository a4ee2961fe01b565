"""R1: generated control requests (and region accesses) against every kind of handle of a real mount.

A seeded generator builds each case; the test process sends it with a real pwrite/pread on a
real fd and checks the answer against what the kernel (docs: kernel-vfio.md, docs/protocol.md)
allows for that node in that state:

* transport errors (malformed header, wrong lengths, bad fd entries, wrong offsets) must be
  exactly the errno of docs/protocol.md §6, computed by :func:`harness.transport_errno`;
* a blocked device handle answers every ioctl but BIND with EINVAL, region accesses with
  EINVAL, MAP_REGION with EINVAL; a failed BIND leaves it blocked (checked right after);
* an unknown request number is ENOTTY on bound/granted device handles, containers and groups;
* everything else fails only with one of the kernel's errnos (never EIO, which is what the
  FUSE adapter turns an unexpected exception into), and a failed command leaves no reply;
* a successful command leaves exactly one reply echoing its op and request, with a payload
  as long as the request's;
* after every case the daemon still answers (GET_TOKEN round trip), every 64 cases statfs and
  the state invariants are checked, and the daemon's log must show no traceback;
* every system call is watched: one that takes more than 5 s is a hang.

A failing case is replayed alone and reported with the seed, its index and its bytes, which
is everything needed to turn it into a regression test.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from harness import Watchdog, crashes_in_log, transport_errno
from vfiofs import abi
from vfiofs import client as vc
from vfiofs.abi import protocol
from vfiofs.abi.protocol import FdRef, Request

E = errno
#: every errno the kernel's VFIO, iommufd and vfio-pci code (and the mailbox) can answer a request with
KERNEL_ERRNOS = {E.EPERM, E.ENOENT, E.EBADF, E.ENOMEM, E.EACCES, E.EFAULT, E.EBUSY, E.EEXIST, E.ENODEV,
                 E.EINVAL, E.ENOSPC, E.ENOTTY, E.E2BIG, E.EAGAIN, E.EOVERFLOW, E.EMSGSIZE, E.EOPNOTSUPP,
                 E.EBADFD}
BIND_ERRNOS = {E.EFAULT, E.EINVAL, E.E2BIG, E.EBUSY, E.EBADF, E.EBADFD}
MAP_REGION_ERRNOS = {E.EBADMSG, E.ENODEV, E.EINVAL, E.ECONNREFUSED, E.EPERM}
REGION_ERRNOS = {E.EINVAL, E.EFAULT, E.EIO}  # EIO: MMIO with memory decoding off, as vfio-pci

DEVICE_NUMBERS = {abi.VFIO_DEVICE_GET_INFO, abi.VFIO_DEVICE_GET_REGION_INFO, abi.VFIO_DEVICE_GET_IRQ_INFO,
                  abi.VFIO_DEVICE_SET_IRQS, abi.VFIO_DEVICE_RESET, abi.VFIO_DEVICE_FEATURE,
                  abi.VFIO_DEVICE_BIND_IOMMUFD, abi.VFIO_DEVICE_ATTACH_IOMMUFD_PT,
                  abi.VFIO_DEVICE_DETACH_IOMMUFD_PT}
CONTAINER_NUMBERS = {abi.VFIO_GET_API_VERSION, abi.VFIO_CHECK_EXTENSION, abi.VFIO_SET_IOMMU,
                     abi.VFIO_IOMMU_GET_INFO, abi.VFIO_IOMMU_MAP_DMA, abi.VFIO_IOMMU_UNMAP_DMA}
GROUP_NUMBERS = {abi.VFIO_GROUP_GET_STATUS, abi.VFIO_GROUP_SET_CONTAINER, abi.VFIO_GROUP_UNSET_CONTAINER,
                 abi.VFIO_GROUP_GET_DEVICE_FD}
IOMMUFD_NUMBERS = {abi.IOMMU_DESTROY, abi.IOMMU_IOAS_ALLOC, abi.IOMMU_IOAS_IOVA_RANGES, abi.IOMMU_IOAS_MAP,
                   abi.IOMMU_IOAS_UNMAP}
#: every request number the ABI module names (0x3b00..0x3bff), answered by some node or not
ALL_NUMBERS = sorted({getattr(abi, n) for n in dir(abi) if n.startswith(("VFIO_", "IOMMU_")) and n.isupper()
                      and isinstance(getattr(abi, n), int) and 0x3B00 <= getattr(abi, n) <= 0x3BFF})

STRUCTS = {
    abi.VFIO_DEVICE_GET_INFO: abi.vfio_device_info, abi.VFIO_DEVICE_GET_REGION_INFO: abi.vfio_region_info,
    abi.VFIO_DEVICE_GET_IRQ_INFO: abi.vfio_irq_info, abi.VFIO_DEVICE_SET_IRQS: abi.vfio_irq_set,
    abi.VFIO_DEVICE_FEATURE: abi.vfio_device_feature, abi.VFIO_DEVICE_BIND_IOMMUFD: abi.vfio_device_bind_iommufd,
    abi.VFIO_DEVICE_ATTACH_IOMMUFD_PT: abi.vfio_device_attach_iommufd_pt,
    abi.VFIO_DEVICE_DETACH_IOMMUFD_PT: abi.vfio_device_detach_iommufd_pt,
    abi.VFIO_GROUP_GET_STATUS: abi.vfio_group_status, abi.VFIO_IOMMU_GET_INFO: abi.vfio_iommu_type1_info,
    abi.VFIO_IOMMU_MAP_DMA: abi.vfio_iommu_type1_dma_map, abi.VFIO_IOMMU_UNMAP_DMA: abi.vfio_iommu_type1_dma_unmap,
    abi.IOMMU_DESTROY: abi.iommu_destroy, abi.IOMMU_IOAS_ALLOC: abi.iommu_ioas_alloc,
    abi.IOMMU_IOAS_IOVA_RANGES: abi.iommu_ioas_iova_ranges, abi.IOMMU_IOAS_MAP: abi.iommu_ioas_map,
    abi.IOMMU_IOAS_UNMAP: abi.iommu_ioas_unmap, abi.IOMMU_IOAS_MAP_FILE: abi.iommu_ioas_map_file,
}

NODE_NUMBERS = {"device": sorted(DEVICE_NUMBERS), "container": sorted(CONTAINER_NUMBERS),
                "group": sorted(GROUP_NUMBERS), "iommu": sorted(IOMMUFD_NUMBERS | CONTAINER_NUMBERS)}
PAGE = 4096
LIVENESS_TAG = protocol.MAX_TAG  # the fuzzer never sends to this slot
I32 = [0, 1, 2, 3, 4, 5, 7, 8, 9, 12, 16, 20, 24, 28, 32, 40, 0xFF, 0x100, 0x1000, 0x7FFFFFFF, 0x80000000,
       0xFFFFFFFE, 0xFFFFFFFF]
I64 = [0, 1, PAGE, 0x100000, 0x100000 + PAGE, 1 << 40, 1 << 47, 1 << 48, 1 << 63, (1 << 64) - 1, (1 << 64) - PAGE,
       0x7F0000000000]


@dataclass
class Target:
    name: str
    kind: str  # device | iommu | container | group | side
    state: str  # blocked | bound | granted | open | readonly
    fd: int
    path: str
    token: bytes | None = None


@dataclass
class Case:
    index: int
    target: Target
    how: str  # write (pwrite at offset) | read (pread at offset) | client (vfiofs.client.ioctl)
    offset: int = 0
    data: bytes = b""
    size: int = 0
    request: int = 0
    arg: object = None

    def describe(self) -> str:
        t = self.target
        if self.how == "client":
            arg = bytes(self.arg).hex() if isinstance(self.arg, (bytes, bytearray)) else repr(self.arg)
            return f"#{self.index} client ioctl {self.request:#x} on {t.name} ({t.path}) arg={arg}"
        if self.how == "read":
            return f"#{self.index} pread({t.name} {t.path}, {self.size}, {self.offset:#x})"
        return f"#{self.index} pwrite({t.name} {t.path}, bytes.fromhex('{self.data.hex()}'), {self.offset:#x})"


class Failure(AssertionError):
    pass


@dataclass
class Stats:
    requests: int = 0  # cases sent
    syscalls: int = 0
    errnos: Counter = field(default_factory=Counter)
    by_target: Counter = field(default_factory=Counter)
    crashes: int = 0
    hangs: int = 0
    slowest: float = 0.0


class World:
    """The handles the fuzzer aims at, in every state it can reach through a real mount."""

    def __init__(self, mount) -> None:
        self.mount = mount
        self.keep: list = []  # objects that must stay open
        self.buffer = mmap.mmap(-1, 4 * PAGE)  # the only memory of this process a fuzzed map may name
        self.buffer_va = ctypes.addressof(ctypes.c_char.from_buffer(self.buffer))
        # memory backed by a file of the mount itself: the daemon must never fault it in
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        config = next((mount.path / "sys/bus/pci/devices").iterdir()) / "config"
        fd = os.open(config, os.O_RDONLY)
        self.mount_file_va = libc.mmap(None, PAGE, mmap.PROT_READ, mmap.MAP_PRIVATE, fd, 0)
        os.close(fd)
        self.targets: list[Target] = []
        self.closed_tokens: list[bytes] = []
        m = mount
        # tokens of handles that are gone: closed iommu, container and a bound-then-closed device
        for make in (lambda: vc.IommuFd(m.iommu), lambda: vc.VfioContainer(m.node("vfio/vfio"))):
            node = make()
            self.closed_tokens.append(vc.handle_token(node.fd))
            node.close()
        with vc.IommuFd(m.iommu) as iommu, vc.VfioDevice(m.device(0)) as dev:
            dev.bind_iommufd(iommu)
            self.closed_tokens.append(vc.handle_token(dev.fd))
        # the binder: an iommufd context with an IOAS, devices bound and attached to it
        self.iommu = self._keep(vc.IommuFd(m.iommu))
        self.ioas = self.iommu.ioas_alloc()
        self.iommu.map_buffer(self.ioas, self.buffer, iova=0x100000)
        self._add("iommu", "iommu", "open", self.iommu)
        self._add("vfio0/blocked", "device", "blocked", self._keep(vc.VfioDevice(m.device(0))))
        for index in (1, 3, 4, 5):
            dev = self._keep(vc.VfioDevice(m.device(index)))
            dev.bind_iommufd(self.iommu)
            if index != 3:
                dev.attach_iommufd_pt(self.ioas)
            self._add(f"vfio{index}/bound", "device", "bound", dev)
        self._add("vfio1/blocked-of-bound", "device", "blocked", self._keep(vc.VfioDevice(m.device(1))))
        # the legacy path: vfio2 granted through group 2 and a type1 container
        self.container = self._keep(vc.VfioContainer(m.node("vfio/vfio")))
        self.group = self._keep(vc.VfioGroup(m.node("vfio/2")))
        self.group.set_container(self.container)
        self.container.set_iommu(vc.VFIO_TYPE1v2_IOMMU)
        self.container.map_buffer(self.buffer, 0x100000)
        granted = self._keep(self.group.get_device(self.bdf(2)))
        self._add("container", "container", "open", self.container)
        self._add("container/bare", "container", "open", self._keep(vc.VfioContainer(m.node("vfio/vfio"))))
        self._add("group2", "group", "open", self.group)
        self._add("vfio2/granted", "device", "granted", granted)
        self._add("vfio2/blocked-of-granted", "device", "blocked", self._keep(vc.VfioDevice(m.device(2))))
        # side files
        self._side("ports/vfio3", os.O_RDWR | os.O_NONBLOCK)
        self._side(".vfiofs/status", os.O_RDONLY)
        self._side(".vfiofs/trace", os.O_RDONLY | os.O_NONBLOCK)
        sysfiles = sorted(p for p in (m.path / "sys").rglob("*") if p.is_file() and not p.is_symlink())
        for path in sysfiles[:: max(1, len(sysfiles) // 12)]:
            self._side(str(path.relative_to(m.path)), os.O_RDONLY)
        self.devnull = os.open(os.devnull, os.O_RDWR)
        self.fd_numbers = [t.fd for t in self.targets] + [self.devnull, 0, 1, 2, 999, 4095, 0x7FFFFFFF]
        self.tokens = [t.token for t in self.targets if t.token] + self.closed_tokens + [bytes(16), b"\xff" * 16]

    def bdf(self, index: int) -> str:
        pci = self.mount.path / "sys/bus/pci/devices"
        for bdf in os.listdir(pci):
            if os.listdir(pci / bdf / "vfio-dev") == [f"vfio{index}"]:
                return bdf
        raise AssertionError(f"no BDF for vfio{index}")

    def _keep(self, node):
        self.keep.append(node)
        return node

    def _add(self, name: str, kind: str, state: str, node) -> None:
        self.targets.append(Target(name, kind, state, node.fileno(), node.path, vc.handle_token(node.fileno())))

    def _side(self, rel: str, flags: int) -> None:
        fd = os.open(self.mount.node(rel), flags | os.O_CLOEXEC)
        self.keep.append(fd)
        self.targets.append(Target(rel, "side", "open", fd, self.mount.node(rel)))

    def reopen(self, target: Target) -> None:
        """A blocked handle that a fuzzed BIND really bound: close it (unbind, reset) and open a fresh one."""
        os.close(target.fd)
        fd = os.open(target.path, os.O_RDWR | os.O_CLOEXEC)
        for i, kept in enumerate(self.keep):
            if getattr(kept, "fd", None) == target.fd:
                kept.fd = fd
        target.fd = fd
        target.token = vc.handle_token(fd)

    def close(self) -> None:
        for node in reversed(self.keep):
            if isinstance(node, int):
                os.close(node)
            else:
                node.close()
        os.close(self.devnull)


# -- the generator ---------------------------------------------------------------------------------

class Generator:
    def __init__(self, rng: random.Random, world: World) -> None:
        self.rng = rng
        self.world = world

    def u32(self) -> int:
        r = self.rng.random()
        return self.rng.choice(I32) if r < 0.6 else self.rng.randrange(1 << 32) if r < 0.8 else self.rng.randrange(16)

    def u64(self) -> int:
        r = self.rng.random()
        if r < 0.15:
            return self.world.buffer_va + self.rng.choice((0, PAGE, 8, 4 * PAGE))
        if r < 0.18:
            return self.world.mount_file_va
        return self.rng.choice(I64) if r < 0.7 else self.rng.randrange(1 << 64)

    def fd_number(self) -> int:
        return self.rng.choice(self.world.fd_numbers) if self.rng.random() < 0.8 else self.rng.randrange(-4, 64)

    def request_number(self, target: "Target | None" = None) -> int:
        r = self.rng.random()
        known = NODE_NUMBERS.get(target.kind) if target is not None else None
        if known and r < 0.5:
            return self.rng.choice(known)
        if r < 0.85:
            return self.rng.choice(ALL_NUMBERS)
        if r < 0.95:
            return 0x3B00 | self.rng.randrange(256)
        return self.rng.randrange(1 << 32)

    def struct_payload(self, request: int) -> bytes:
        rng = self.rng
        cls = STRUCTS.get(request)
        if request == abi.VFIO_GROUP_SET_CONTAINER and rng.random() < 0.8:
            return self.fd_number().to_bytes(4, "little", signed=True) + bytes(rng.choice((0, 0, 4)))
        if request == abi.VFIO_GROUP_GET_DEVICE_FD and rng.random() < 0.8:
            name = rng.choice([self.world.bdf(2), "0000:00:01.0", "", "x" * rng.randrange(40), "0000:00:03.0"])
            return name.encode() + (b"\0" if rng.random() < 0.85 else b"")
        if cls is None:
            return rng.randbytes(rng.choice((0, 1, 4, 8, 16, 24, rng.randrange(200))))
        if rng.random() < 0.5:
            valid = self.valid_payload(request, cls)
            if valid is not None:
                return valid
        obj = cls()
        for name, ctype, *_ in cls._fields_:
            if rng.random() < 0.5:
                continue
            size = ctypes.sizeof(ctype)
            if name in ("iommufd", "fd"):
                value = self.fd_number()
            elif name in ("index", "pt_id", "ioas_id", "id", "start", "count") and rng.random() < 0.7:
                value = rng.randrange(12)
            else:
                value = self.u64() if size == 8 else self.u32()
            signed = ctypes.sizeof(ctype) == 4 and ctype in (ctypes.c_int32, ctypes.c_int)
            if signed:
                value = int.from_bytes((value & 0xFFFFFFFF).to_bytes(4, "little"), "little", signed=True)
            try:
                setattr(obj, name, value)
            except (TypeError, OverflowError):
                pass
        raw = bytearray(bytes(obj))
        r = rng.random()
        if r < 0.55:
            length = len(raw)
        elif r < 0.7:
            length = rng.randrange(len(raw))  # truncated
        elif r < 0.8:
            raw += bytes(rng.choice((4, 8, 16, 64)))  # a zero tail
            length = len(raw)
        elif r < 0.9:
            raw += rng.randbytes(rng.choice((1, 4, 8, 40)))  # a tail with bytes in it
            length = len(raw)
        else:
            raw += rng.randbytes(rng.randrange(1, 600))
            length = len(raw)
        if request == abi.VFIO_DEVICE_SET_IRQS and rng.random() < 0.5:  # an eventfd/bool array
            raw = raw[:20] + b"".join(self.fd_number().to_bytes(4, "little", signed=True)
                                      for _ in range(rng.randrange(6)))
            length = len(raw)
        raw = raw[:length]
        if len(raw) >= 4:  # argsz / size: mostly right, sometimes wrong
            r = rng.random()
            if r < 0.6:
                raw[0:4] = len(raw).to_bytes(4, "little")
            elif r < 0.8:
                raw[0:4] = rng.choice(I32).to_bytes(4, "little")
        return bytes(raw)

    def valid_payload(self, request: int, cls) -> bytes | None:
        """A request the command should accept, with at most one field changed: what gets past
        the argument checks into the drivers and the IOMMU."""
        rng = self.rng
        w = self.world
        va = w.buffer_va + PAGE * rng.randrange(4) if rng.random() < 0.9 else w.mount_file_va
        iova = rng.choice((0x100000, 0x200000, 0x400000, rng.randrange(1 << 20) * PAGE))
        fields: dict[str, int] = {}
        data = b""
        if request == abi.VFIO_DEVICE_SET_IRQS:
            index = rng.randrange(5)
            action = rng.choice((abi.VFIO_IRQ_SET_ACTION_TRIGGER, abi.VFIO_IRQ_SET_ACTION_MASK,
                                 abi.VFIO_IRQ_SET_ACTION_UNMASK))
            kind = rng.choice((abi.VFIO_IRQ_SET_DATA_NONE, abi.VFIO_IRQ_SET_DATA_BOOL, abi.VFIO_IRQ_SET_DATA_EVENTFD))
            start, n = rng.randrange(3), rng.choice((0, 1, 1, 2, 8))
            if kind == abi.VFIO_IRQ_SET_DATA_BOOL:
                data = bytes(rng.randrange(2) for _ in range(n))
            elif kind == abi.VFIO_IRQ_SET_DATA_EVENTFD:
                data = b"".join((-1).to_bytes(4, "little", signed=True) for _ in range(n))
            fields = {"flags": action | kind, "index": index, "start": start, "count": n}
        elif request in (abi.VFIO_DEVICE_GET_REGION_INFO, abi.VFIO_DEVICE_GET_IRQ_INFO):
            fields = {"index": rng.randrange(10)}
        elif request == abi.VFIO_DEVICE_FEATURE:
            fields = {"flags": rng.choice((abi.VFIO_DEVICE_FEATURE_PROBE, abi.VFIO_DEVICE_FEATURE_GET,
                                           abi.VFIO_DEVICE_FEATURE_SET)) | rng.randrange(12)}
            data = bytes(rng.choice((0, 4, 8, 16)))
        elif request == abi.VFIO_DEVICE_ATTACH_IOMMUFD_PT:
            fields = {"pt_id": rng.choice((w.ioas, w.ioas, 1, 2, 99))}
        elif request == abi.IOMMU_IOAS_MAP:
            fields = {"flags": rng.choice((6, 7, 4, 5, 2, 3)), "ioas_id": w.ioas, "user_va": va,
                      "length": PAGE * rng.randrange(1, 3), "iova": iova}
        elif request == abi.IOMMU_IOAS_UNMAP:
            fields = {"ioas_id": w.ioas, "iova": rng.choice((0, iova)), "length": rng.choice((PAGE, (1 << 64) - 1))}
        elif request == abi.IOMMU_IOAS_IOVA_RANGES:
            fields = {"ioas_id": w.ioas, "num_iovas": rng.randrange(3), "allowed_iovas": va}
        elif request == abi.IOMMU_DESTROY:
            fields = {"id": rng.randrange(1, 12)}
        elif request == abi.VFIO_IOMMU_MAP_DMA:
            fields = {"flags": rng.choice((1, 2, 3)), "vaddr": va, "iova": iova, "size": PAGE * rng.randrange(1, 3)}
        elif request == abi.VFIO_IOMMU_UNMAP_DMA:
            fields = rng.choice(({"iova": iova, "size": PAGE}, {"flags": abi.VFIO_DMA_UNMAP_FLAG_ALL}))
        elif request == abi.VFIO_DEVICE_BIND_IOMMUFD:
            fields = {"iommufd": rng.choice((w.iommu.fd, w.iommu.fd, self.fd_number()))}
        elif request in (abi.VFIO_DEVICE_GET_INFO, abi.IOMMU_IOAS_ALLOC, abi.VFIO_GROUP_GET_STATUS,
                         abi.VFIO_IOMMU_GET_INFO, abi.VFIO_DEVICE_DETACH_IOMMUFD_PT):
            fields = {}
        else:
            return None
        obj = cls()
        for name, value in fields.items():
            setattr(obj, name, value)
        if rng.random() < 0.5:  # one field changed
            name, ctype, *_ = rng.choice(cls._fields_)
            try:
                setattr(obj, name, self.u64() if ctypes.sizeof(ctype) == 8 else self.u32())
            except (TypeError, OverflowError):
                pass
        raw = bytearray(bytes(obj) + data)
        raw[0:4] = len(raw).to_bytes(4, "little")
        return bytes(raw)

    def fd_table(self, request: int) -> dict[int, FdRef]:
        rng = self.rng
        fds: dict[int, FdRef] = {}
        for _ in range(rng.choice((0, 0, 1, 1, 2, 3))):
            number = self.fd_number()
            if number < 0:
                continue
            kind = rng.choice((1, 2, 3, 3, 3, 4, 5))
            token = rng.choice(self.world.tokens) if kind == 3 else rng.randbytes(16)
            fds[number] = FdRef(kind, token)
        return fds

    def message(self, target: Target) -> tuple[bytes, int]:
        rng = self.rng
        r = rng.random()
        if r < 0.7:
            request = self.request_number(target)
            kind = rng.choices((protocol.ARG_BUFFER, protocol.ARG_NULL, protocol.ARG_VALUE), (8, 1, 1))[0]
            payload = self.struct_payload(request) if kind == protocol.ARG_BUFFER else b""
            fds = self.fd_table(request)
            field = {abi.VFIO_DEVICE_BIND_IOMMUFD: 8, abi.VFIO_GROUP_SET_CONTAINER: 0}.get(request)
            if field is not None and len(payload) >= field + 4 and rng.random() < 0.6:
                number = int.from_bytes(payload[field:field + 4], "little", signed=True)
                if number >= 0:  # name it as the client would: a real handle's token, or a gone one
                    fds[number] = FdRef(protocol.FD_HANDLE, rng.choice(self.world.tokens))
            req = Request(protocol.OP_IOCTL, request, kind, self.u64() if kind == protocol.ARG_VALUE else 0,
                          payload, fds)
        elif r < 0.78:
            req = Request(protocol.OP_GET_TOKEN)
        elif r < 0.84:
            req = Request(protocol.OP_FD_CHANNEL)
        elif r < 0.9:
            req = Request(protocol.OP_CLAIM, arg_value=rng.choice((0, 1, rng.randrange(1 << 46) | 1, (1 << 64) - 1)))
        else:
            index = rng.choice((0, 0, 1, 2, 4, 7, 9, 1 << 31))
            name = rng.randbytes(rng.choice((0, 1, 16, 107, 108))) if rng.random() < 0.3 else b"vfiofs-nobody-" + \
                rng.randbytes(8).hex().encode()
            req = protocol.encode_map_request(index, rng.choice((0, PAGE, 8, 1 << 40)),
                                              rng.choice((0, PAGE, 1 << 16, 1 << 20, 1 << 62)), name)
        message = bytearray(self._encode(req))
        if rng.random() < 0.15:  # damage the framing
            self._mangle(message)
        return bytes(message), self._offset()

    @staticmethod
    def _encode(req: Request) -> bytes:
        header = protocol._REQUEST.pack(protocol.MAGIC, 1, 48, req.op, req.request & 0xFFFFFFFF, req.arg_kind,
                                        len(req.fds), req.arg_value & ((1 << 64) - 1), len(req.payload), 0, 0)
        refs = b"".join(protocol._FDREF.pack(fd, ref.kind, ref.token) for fd, ref in req.fds.items())
        return header + refs + req.payload  # may exceed MAX_MESSAGE: that is a case too

    def _mangle(self, message: bytearray) -> None:
        rng = self.rng
        r = rng.random()
        if r < 0.35 and message:
            for _ in range(rng.randrange(1, 4)):
                message[rng.randrange(min(len(message), 72))] = rng.randrange(256)
        elif r < 0.5:
            del message[rng.randrange(len(message) + 1):]
        elif r < 0.6:
            message += rng.randbytes(rng.randrange(1, 64))
        elif r < 0.7:
            message[:] = rng.randbytes(rng.choice((1, 47, 48, 72, 200)))
        elif r < 0.8:
            message[20:24] = rng.choice((1, 2, 2049, 0xFFFFFFFF)).to_bytes(4, "little")
        elif r < 0.9:
            message[32:36] = rng.choice((0, 1, 65536, 0xFFFFFFFF)).to_bytes(4, "little")
        else:
            message += bytes(65537 - len(message))

    def _offset(self) -> int:
        rng = self.rng
        r = rng.random()
        if r < 0.9:
            return protocol.control_offset(rng.choice((7, 1234, rng.randrange(protocol.MAX_TAG))))
        return rng.choice((protocol.CONTROL_BASE + 1, protocol.CONTROL_BASE + (1 << 20) + 8,
                           protocol.CONTROL_BASE + (1 << 52), (1 << 63) - 16, protocol.CONTROL_BASE - PAGE))

    def region_offset(self) -> int:
        rng = self.rng
        index = rng.choice((0, 0, 1, 2, 3, 4, 5, 6, 7, 7, 8, 9, 10, 255, 1 << 21))
        within = rng.choice((0, 4, 0x10, 0x40, 0x80, 0x98, 0xFFC, 0x1000, 0xFFFF, 0x10000, 0xFFFFF, rng.randrange(1 << 20),
                             (1 << 40) - 4))
        return (index << 40) + within

    def case(self, index: int) -> Case:
        rng = self.rng
        handles = [t for t in self.world.targets if t.kind != "side"]
        sides = [t for t in self.world.targets if t.kind == "side"]
        target = rng.choice(sides) if rng.random() < 0.12 else rng.choice(handles)
        r = rng.random()
        if r < 0.68:
            data, offset = self.message(target)
            return Case(index, target, "write", offset, data)
        if r < 0.78:
            return Case(index, target, "write", self.region_offset(), rng.randbytes(rng.choice((1, 2, 4, 8, 3, 64))))
        if r < 0.86:
            return Case(index, target, "read", self.region_offset(), size=rng.choice((1, 2, 4, 8, 16, 4096, 70000)))
        if r < 0.9:
            return Case(index, target, "read", self._offset(), size=rng.choice((0, 1, 32, 65536)))
        if target.kind == "side":
            target = rng.choice(handles)
        request = self.request_number(target)
        r = rng.random()
        arg = bytearray(self.struct_payload(request)) if r < 0.85 else (None if r < 0.92 else self.u32())
        return Case(index, target, "client", request=request, arg=arg)


# -- running and judging one case ---------------------------------------------------------------------

class Fuzzer:
    def __init__(self, mount, seed: int) -> None:
        self.mount = mount
        self.seed = seed
        self.world = World(mount)
        self.gen = Generator(random.Random(seed), self.world)
        self.watchdog = Watchdog(mount)
        self.stats = Stats()
        self.probe = self.world.iommu.fd
        self.probe_token = vc.handle_token(self.probe)

    def close(self) -> None:
        self.watchdog.close()
        self.world.close()

    def call(self, what: str, fn, *args):
        """One system call under the watchdog: (result, errno)."""
        self.stats.syscalls += 1
        with self.watchdog.op(what):
            try:
                return fn(*args), 0
            except OSError as exc:
                return None, exc.errno

    def run(self, n: int, check_every: int = 64) -> Stats:
        try:
            for i in range(n):
                case = self.gen.case(i)
                try:
                    self.run_case(case)
                    self.alive(case)
                    if i % check_every == check_every - 1:
                        self.invariants(case)
                except Failure as failure:
                    raise Failure(f"seed {self.seed:#x}, {failure}{self.shrink(case, str(failure))}") from None
        finally:
            self.stats.slowest = self.watchdog.slowest
            self.stats.crashes = len(crashes_in_log(self.mount))
            if self.watchdog.hung:
                self.stats.hangs = 1
        self.invariants(None)
        return self.stats

    def shrink(self, case: Case, message: str, budget: int = 400) -> str:
        """Zero as many bytes of a failing request as it takes to still fail the same way; the
        smaller request, replayed on the same world, as a reproducer ("" if it cannot be had:
        a hang, a dead daemon, a case that does not fail again on its own)."""
        if case.how != "write" or not case.data or self.watchdog.hung:
            return ""
        why = message.split(": ", 1)[-1].split(",")[0]

        def fails(data: bytes) -> bool:
            try:
                self.run_case(Case(case.index, case.target, case.how, case.offset, data))
                self.alive(case)
            except Failure as again:
                return why in str(again)
            except Exception:
                return False
            return False

        data = bytearray(case.data)
        if not fails(bytes(data)):
            return "\n(not reproduced alone)"
        tries = 0
        for width in (64, 16, 4, 1):
            for start in range(0, len(data), width):
                if tries >= budget:
                    break
                chunk = data[start:start + width]
                if not any(chunk):
                    continue
                data[start:start + width] = bytes(len(chunk))
                tries += 1
                if not fails(bytes(data)):
                    data[start:start + width] = chunk
        return f"\nreproducer: os.pwrite(<{case.target.name}>, bytes.fromhex('{bytes(data).hex()}'), {case.offset:#x})"

    def fail(self, case: Case | None, why: str) -> None:
        raise Failure(f"{case.describe() if case else 'after the run'}: {why}")

    # -- one case ------------------------------------------------------------------------------------
    def run_case(self, case: Case) -> None:
        self.stats.requests += 1
        self.stats.by_target[case.target.name] += 1
        if case.how == "client":
            self._client(case)
        elif case.how == "read":
            self._read(case)
        elif case.offset >= protocol.CONTROL_BASE and case.target.kind != "side":
            self._control(case)
        else:
            self._write(case)

    def _note(self, err: int) -> None:
        self.stats.errnos[errno.errorcode.get(err, str(err)) if err else "ok"] += 1

    def _expect(self, case: Case, err: int, allowed: set[int] | int, success: bool = False) -> None:
        self._note(err)
        if err == 0:
            if not success:
                self.fail(case, f"succeeded, expected {self._names(allowed)}")
            return
        allowed = {allowed} if isinstance(allowed, int) else allowed
        if err not in allowed:
            self.fail(case, f"errno {errno.errorcode.get(err, err)}, expected {self._names(allowed)}"
                            + (" or success" if success else ""))

    @staticmethod
    def _names(allowed) -> str:
        allowed = {allowed} if isinstance(allowed, int) else allowed
        return "/".join(sorted(errno.errorcode.get(e, str(e)) for e in allowed))

    def _side(self, case: Case, err: int, read: bool) -> None:
        name = case.target.name
        writable = name.startswith("ports/")
        stream = {E.ESPIPE} if writable or name == ".vfiofs/trace" else set()  # nonseekable: no pread/pwrite
        if read:
            self._expect(case, err, {E.EAGAIN, E.EINVAL} | stream, success=True)
        else:
            self._expect(case, err, ({E.EAGAIN, E.EINVAL} if writable else {E.EBADF, E.EINVAL}) | stream,
                         success=writable)

    def _write(self, case: Case) -> None:
        t = case.target
        written, err = self.call(case.describe(), os.pwrite, t.fd, case.data, case.offset)
        if t.kind == "side":
            return self._side(case, err, read=False)
        if not case.data:  # never reaches the daemon (docs/protocol.md §9)
            return self._expect(case, err, set(), success=True)
        if case.offset + len(case.data) > (1 << 63) - 1:
            return self._expect(case, err, E.EINVAL)
        if t.kind != "device" or t.state == "blocked" or case.offset >= 9 << 40:
            return self._expect(case, err, E.EINVAL)
        self._expect(case, err, REGION_ERRNOS, success=True)
        if err == 0 and not 0 < written <= len(case.data):
            self.fail(case, f"wrote {written} of {len(case.data)} bytes")

    def _read(self, case: Case) -> None:
        t = case.target
        data, err = self.call(case.describe(), os.pread, t.fd, case.size, case.offset)
        if t.kind == "side":
            return self._side(case, err, read=True)
        if case.size == 0:
            return self._expect(case, err, set(), success=True)
        if case.offset + case.size > (1 << 63) - 1:
            return self._expect(case, err, E.EINVAL)
        if case.offset >= protocol.CONTROL_BASE:
            relative = case.offset - protocol.CONTROL_BASE
            if relative % protocol.SLOT_SIZE or relative >> protocol.SLOT_SHIFT > protocol.MAX_TAG:
                return self._expect(case, err, E.EINVAL)
            return self._expect(case, err, E.ENOMSG)  # every reply is read back right after its request
        if t.kind != "device" or t.state == "blocked" or case.offset >= 9 << 40:
            return self._expect(case, err, E.EINVAL)
        self._expect(case, err, REGION_ERRNOS, success=True)
        if err == 0 and len(data) > case.size:
            self.fail(case, f"read returned {len(data)} bytes for {case.size}")

    def _control(self, case: Case) -> None:
        t = case.target
        _, err = self.call(case.describe(), os.pwrite, t.fd, case.data, case.offset)
        if not case.data:
            return self._expect(case, err, set(), success=True)  # never reaches the daemon
        transport = transport_errno(case.offset, case.data)
        if transport is not None:
            self._expect(case, err, transport)
            if transport != E.EINVAL or case.offset >= protocol.CONTROL_BASE and \
                    (case.offset - protocol.CONTROL_BASE) % protocol.SLOT_SIZE == 0:
                self._no_reply(case)
            return
        header = harness_header(case.data)
        op, request = header["op"], header["request"]
        if op == protocol.OP_GET_TOKEN:
            self._expect(case, err, set(), success=True)
            reply = self._reply(case, header)
            if reply.payload != t.token:
                self.fail(case, "GET_TOKEN answered another handle's token")
            return
        if op == protocol.OP_FD_CHANNEL:
            self._expect(case, err, set(), success=True)
            if not self._reply(case, header).payload.startswith(b"vfiofs-fds-"):
                self.fail(case, "FD_CHANNEL answered something else than a channel name")
            return
        if op == protocol.OP_CLAIM:
            self._expect(case, err, E.EINVAL)  # no fuzzed ticket is ever a real one
            return self._no_reply(case)
        if op == protocol.OP_MAP_REGION:
            if t.kind == "device" and t.state == "blocked":
                allowed = {E.EBADMSG, E.EINVAL}
            elif t.kind != "device":
                allowed = {E.EBADMSG, E.ENODEV}
            else:
                allowed = MAP_REGION_ERRNOS
            self._expect(case, err, allowed)
            return self._no_reply(case)
        self._judge_ioctl(case, request, err)
        self._still_blocked(case, request, err)
        if err:
            if not (request == abi.IOMMU_IOAS_IOVA_RANGES and t.kind == "iommu"):
                self._no_reply(case)
            else:
                self._drain(case)
        else:
            reply = self._reply(case, header)
            if reply.result < 0:
                self.fail(case, f"a successful command replied with result {reply.result}")
            self._after_success(case, request)

    def _judge_ioctl(self, case: Case, request: int, err: int) -> None:
        t = case.target
        if t.kind == "device":
            if t.state == "blocked":
                if request == abi.VFIO_DEVICE_BIND_IOMMUFD:
                    return self._expect(case, err, BIND_ERRNOS, success=True)
                return self._expect(case, err, E.EINVAL)
            if request not in DEVICE_NUMBERS:
                return self._expect(case, err, E.ENOTTY)
            if request == abi.VFIO_DEVICE_BIND_IOMMUFD:
                return self._expect(case, err, {E.EFAULT, E.EINVAL, E.E2BIG})
            if t.state == "granted" and request in (abi.VFIO_DEVICE_ATTACH_IOMMUFD_PT,
                                                    abi.VFIO_DEVICE_DETACH_IOMMUFD_PT):
                return self._expect(case, err, E.ENOTTY)
            return self._expect(case, err, KERNEL_ERRNOS, success=True)
        if t.kind == "iommu":
            if request in IOMMUFD_NUMBERS or request in CONTAINER_NUMBERS:
                return self._expect(case, err, KERNEL_ERRNOS, success=True)
            if 0x80 <= request & 0xFF <= 0x94:
                return self._expect(case, err, {E.ENOTTY, E.EFAULT, E.EINVAL})
            return self._expect(case, err, E.ENOTTY)
        known = CONTAINER_NUMBERS if t.kind == "container" else GROUP_NUMBERS
        if request not in known:
            return self._expect(case, err, E.ENOTTY)
        return self._expect(case, err, KERNEL_ERRNOS, success=True)

    def _still_blocked(self, case: Case, request: int, err: int) -> None:
        """A failed BIND grants nothing: right after it, the handle still refuses a region read."""
        t = case.target
        if t.kind == "device" and t.state == "blocked" and request == abi.VFIO_DEVICE_BIND_IOMMUFD and err:
            _, rerr = self.call(f"read after {case.describe()}", os.pread, t.fd, 4, abi.VFIO_PCI_INDEX_TO_OFFSET(7))
            if rerr != E.EINVAL:
                self.fail(case, f"the BIND failed, but the handle is no longer blocked (config read: {rerr})")

    def _after_success(self, case: Case, request: int) -> None:
        t = case.target
        if t.kind == "device" and t.state == "blocked" and request == abi.VFIO_DEVICE_BIND_IOMMUFD:
            self.world.reopen(t)  # a fuzzed BIND that was valid: start from a blocked handle again

    def _reply(self, case: Case, header: dict) -> protocol.Reply:
        data, err = self.call(f"reply of {case.describe()}", os.pread, case.target.fd, 65536, case.offset)
        if err:
            self.fail(case, f"succeeded but its reply cannot be read: {errno.errorcode.get(err, err)}")
        reply = protocol.decode_reply(data)
        expected_len = header["payload_len"] if header["arg_kind"] == protocol.ARG_BUFFER and \
            header["op"] == protocol.OP_IOCTL else None
        if reply.op != header["op"] or reply.request != header["request"] or \
                (expected_len is not None and len(reply.payload) != expected_len):
            self.fail(case, f"reply does not match its request: {reply}")
        return reply

    def _no_reply(self, case: Case) -> None:
        if case.offset >= protocol.CONTROL_BASE and (case.offset - protocol.CONTROL_BASE) % protocol.SLOT_SIZE == 0 \
                and case.offset + 32 <= (1 << 63) - 1 and (case.offset - protocol.CONTROL_BASE) >> 20 <= protocol.MAX_TAG:
            _, err = self.call(f"slot after {case.describe()}", os.pread, case.target.fd, 65536, case.offset)
            if err != E.ENOMSG:
                self.fail(case, f"failed, but left a reply in its slot ({errno.errorcode.get(err, 'a reply')})")

    def _drain(self, case: Case) -> None:
        self.call(f"slot after {case.describe()}", os.pread, case.target.fd, 65536, case.offset)

    def _client(self, case: Case) -> None:
        t = case.target
        arg = case.arg
        result, err = self.call(case.describe(), vc.ioctl, t.fd, case.request, arg)
        if err == 0 and case.request == abi.VFIO_GROUP_GET_DEVICE_FD and t.kind == "group":
            os.close(result)
        if err == E.EINVAL and isinstance(arg, bytearray) and len(arg) + 48 > 65536:
            return self._note(err)  # refused by the client library itself
        self._judge_ioctl(case, case.request, err)
        self._still_blocked(case, case.request, err)
        if err == 0:
            self._after_success(case, case.request)

    # -- is it still alive and in the state it should be? ----------------------------------------------
    def alive(self, case: Case) -> None:
        offset = protocol.control_offset(LIVENESS_TAG)
        message = protocol.encode_request(Request(protocol.OP_GET_TOKEN))
        _, err = self.call("liveness GET_TOKEN", os.pwrite, self.probe, message, offset)
        data, err2 = self.call("liveness reply", os.pread, self.probe, 64, offset)
        if err or err2 or protocol.decode_reply(data).payload != self.probe_token:
            self.fail(case, f"the daemon stopped answering (errno {err or err2})")

    def invariants(self, case: Case | None) -> None:
        _, err = self.call("statfs", os.statvfs, str(self.mount.path))
        if err:
            self.fail(case, f"statfs of the mount failed: {errno.errorcode.get(err, err)}")
        for t in self.world.targets:
            if t.kind != "device":
                continue
            info = vc.vfio_device_info(argsz=24)
            _, err = self.call(f"GET_INFO on {t.name}", vc.ioctl, t.fd, abi.VFIO_DEVICE_GET_INFO, info)
            _, rerr = self.call(f"read on {t.name}", os.pread, t.fd, 4, abi.VFIO_PCI_INDEX_TO_OFFSET(7))
            if t.state == "blocked":
                if (err, rerr) != (E.EINVAL, E.EINVAL):
                    self.fail(case, f"{t.name} is no longer blocked (GET_INFO {err}, config read {rerr})")
            elif err or rerr or info.num_regions != 9:
                self.fail(case, f"{t.name} lost its device (GET_INFO {err}, config read {rerr})")
        crashes = crashes_in_log(self.mount)
        if crashes:
            self.fail(case, "the daemon logged an internal error:\n" + "\n".join(crashes[:5]))


def harness_header(message: bytes) -> dict:
    from harness import decode_header

    return decode_header(message)


def replay(mount, case_bytes: bytes, path: str, offset: int) -> int:
    """errno of one pwrite (0 on success) on a fresh open of ``path``: for reproducers."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.pwrite(fd, case_bytes, offset)
        return 0
    except OSError as exc:
        return exc.errno
    finally:
        os.close(fd)


__all__ = ["Fuzzer", "Failure", "Stats", "World", "Path"]
