"""R5: no access path of a blocked or closed handle reaches device data (docs/reliability.md).

An owner binds devices and writes a random canary into every mappable BAR. Then every path is
enumerated, not picked: every region index 0..8 read and written at several offsets, an mmap
of every region (through MAP_REGION and through mmap(2) of the node), every request number
the ABI module knows except BIND (as a struct, NULL and a value), the other operations, and
every file under ports/, .vfiofs/ and sys/ — on a blocked handle of each device while its owner
holds it, and again after the owner closed (a fresh handle on the node, perhaps on the same fd
number; the closed handle's token, reply slots, mapping and GET_DEVICE_FD ticket). Every byte
any attempt returns is searched for the canary, and the owner checks the canary was not
overwritten. An attempt that succeeds where the kernel refuses, or shows the canary, is an escape.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import secrets
import signal
from dataclasses import dataclass, field

from fuzz import ALL_NUMBERS, STRUCTS
from harness import Watchdog, crashes_in_log, record
from support import raw_mmap_errno
from vfiofs import abi
from vfiofs import client as vc
from vfiofs.abi import protocol

PAGE = 4096
OFFSETS = (0, 8, 0x100, 0xFF8, 0x1000, 0x8000, 0xFFF0, 0x10000, 0x80000)
TAG = 4321


@dataclass
class Tally:
    canary: bytes
    attempts: int = 0
    escapes: list = field(default_factory=list)

    def saw(self, what: str, data: bytes | None, expected_errno: int | None, err: int) -> None:
        """One attempt: ``data`` it returned (None if it failed with ``err``)."""
        self.attempts += 1
        if data is not None and self.canary[:8] in bytes(data):
            self.escapes.append(f"{what}: returned the owner's data")
        elif expected_errno is not None and err != expected_errno:
            got = errno.errorcode.get(err, "success") if err else "success"
            self.escapes.append(f"{what}: {got}, expected {errno.errorcode[expected_errno]}")


def attempt(watchdog: Watchdog, what: str, fn, *args):
    with watchdog.op(what):
        try:
            return fn(*args), 0
        except OSError as exc:
            return None, exc.errno


def fill_canaries(dev: vc.VfioDevice, canary: bytes) -> dict[int, bytes]:
    """Write the canary over every mappable BAR of ``dev``; what the owner reads back, by region."""
    filled = {}
    for index in range(6):
        try:
            info = dev.get_region_info(index)
        except OSError:
            continue
        if info.size and info.flags & vc.VFIO_REGION_INFO_FLAG_MMAP and info.flags & vc.VFIO_REGION_INFO_FLAG_WRITE:
            size = min(info.size, 1 << 20)
            dev.write(index, 0, (canary * (size // len(canary) + 1))[:size])
            dev.read(index, 0, size)  # registers that clear on read settle
            filled[index] = dev.read(index, 0, size)
    return filled


def canaries_intact(dev: vc.VfioDevice, filled: dict[int, bytes], canary: bytes) -> bool:
    """The owner's data is as it left it (a sparse BAR's registers may read differently: where
    two reads in a row differ, the byte is not data)."""
    for index, before in filled.items():
        now, again = dev.read(index, 0, len(before)), dev.read(index, 0, len(before))
        if any(a != b and c == b for a, b, c in zip(before, now, again)):
            return False
    return True


def canary_count(filled: dict[int, bytes], canary: bytes) -> int:
    return sum(data.count(canary) for data in filled.values())


def arg_forms(request: int):
    cls = STRUCTS.get(request)
    size = ctypes.sizeof(cls) if cls else 64
    buf = bytearray(size)
    buf[0:4] = size.to_bytes(4, "little")
    return [("struct", buf), ("NULL", None), ("value", 3)]


def control(fd: int, request: protocol.Request) -> bytes:
    offset = protocol.control_offset(TAG)
    os.pwrite(fd, protocol.encode_request(request), offset)
    return os.pread(fd, protocol.MAX_MESSAGE, offset)


def every_path_of_a_blocked_handle(tally: Tally, wd: Watchdog, fd: int, name: str) -> None:
    """Regions, mmaps, every request but BIND, the other operations; all must refuse (EINVAL)."""
    for index in range(abi.VFIO_PCI_NUM_REGIONS):
        base = abi.VFIO_PCI_INDEX_TO_OFFSET(index)
        for offset in OFFSETS:
            for size in (1, 4, 8, PAGE):
                data, err = attempt(wd, f"{name}: pread region {index} +{offset:#x} x{size}", os.pread, fd, size,
                                    base + offset)
                tally.saw(f"{name}: pread region {index} +{offset:#x} x{size}", data, errno.EINVAL, err)
            _, err = attempt(wd, f"{name}: pwrite region {index}", os.pwrite, fd, b"\xee" * 8, base + offset)
            tally.saw(f"{name}: pwrite region {index} +{offset:#x}", None, errno.EINVAL, err)
        for length in (PAGE, 1 << 16):
            request = protocol.encode_map_request(index, 0, length, b"vfiofs-escape-" + secrets.token_hex(8).encode())
            _, err = attempt(wd, f"{name}: MAP_REGION {index}", control, fd, request)
            tally.saw(f"{name}: MAP_REGION region {index} length {length:#x}", None, errno.EINVAL, err)
            for shared in (True, False):
                err = raw_mmap_errno(fd, length, shared, base)
                # FUSE refuses a direct_io file MAP_SHARED (ENODEV); a private map copies nothing
                # from the daemon but the kernel may allow it: whatever it gives must hold no data.
                if err == 0:
                    tally.saw(f"{name}: mmap(2) region {index} shared={shared}", private_map_bytes(fd, length, base),
                              None, 0)
                else:
                    tally.saw(f"{name}: mmap(2) region {index} shared={shared}", None, None, err)
    dev = vc.VfioDevice.from_fd(fd)
    try:
        for index in range(abi.VFIO_PCI_NUM_REGIONS):
            _, err = attempt(wd, f"{name}: client mmap {index}", dev.mmap, index, PAGE)
            tally.saw(f"{name}: client mmap region {index}", None, errno.EINVAL, err)
    finally:
        dev.fd = -1  # the fd is the caller's: the wrapper must not close it
    for request in ALL_NUMBERS:
        if request == abi.VFIO_DEVICE_BIND_IOMMUFD:
            continue
        for form, arg in arg_forms(request):
            what = f"{name}: ioctl {request:#x} ({form})"
            _, err = attempt(wd, what, vc.ioctl, fd, request, arg)
            tally.saw(what, bytes(arg) if isinstance(arg, bytearray) else None, errno.EINVAL, err)
            data, err = attempt(wd, f"{what}: its slot", os.pread, fd, protocol.MAX_MESSAGE,
                                protocol.control_offset(threading_tag()))
            tally.saw(f"{what}: reply slot", data, errno.ENOMSG, err)
    for op in (protocol.OP_GET_TOKEN, protocol.OP_FD_CHANNEL):  # they succeed: with no device data
        data, err = attempt(wd, f"{name}: op {op}", control, fd, protocol.Request(op))
        tally.saw(f"{name}: op {op}", data, None, err)
    _, err = attempt(wd, f"{name}: CLAIM", control, fd, protocol.Request(protocol.OP_CLAIM, arg_value=3))
    tally.saw(f"{name}: CLAIM of a made-up ticket", None, errno.EINVAL, err)
    _, err = attempt(wd, f"{name}: fsync", os.fsync, fd)
    tally.saw(f"{name}: fsync", None, errno.EINVAL, err)


def threading_tag() -> int:
    import threading

    return threading.get_native_id() & protocol.MAX_TAG


def private_map_bytes(fd: int, length: int, offset: int) -> bytes | None:
    try:
        with mmap.mmap(fd, length, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ, offset=offset) as m:
            return bytes(m)
    except (OSError, ValueError):
        return None


def side_files(tally: Tally, wd: Watchdog, mount) -> None:
    """Read every file under ports/, .vfiofs/ and sys/ (all of it) and look for the canary."""
    for top in ("ports", ".vfiofs", "sys"):
        for root, _dirs, files in os.walk(mount.path / top):
            for name in files:
                path = os.path.join(root, name)
                if os.path.islink(path):
                    continue
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
                try:
                    chunks = []
                    for _ in range(64):
                        data, err = attempt(wd, f"read {path}", os.read, fd, 1 << 16)
                        if not data:
                            break
                        chunks.append(data)
                    tally.saw(f"read {path}", b"".join(chunks), None, 0)
                    for index in range(abi.VFIO_PCI_NUM_REGIONS):  # a side file is no door to a region
                        data, err = attempt(wd, f"pread {path} region {index}", os.pread, fd, PAGE,
                                            abi.VFIO_PCI_INDEX_TO_OFFSET(index))
                        tally.saw(f"pread {path} at region {index}", data, None, err)
                finally:
                    os.close(fd)


def sigbus_or_clean(mapping: mmap.mmap, canary: bytes) -> str:
    """Touch a mapping in a child: 'sigbus' (revoked), 'clean' (no canary) or 'canary'."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            import faulthandler

            faulthandler.disable()  # the SIGBUS is the expected answer, not a crash to report
            signal.signal(signal.SIGBUS, signal.SIG_DFL)
            os._exit(3 if canary[:8] in bytes(mapping[:]) else 0)
        finally:
            os._exit(4)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS:
        return "sigbus"
    return "clean" if os.WEXITSTATUS(status) == 0 else "canary"


def test_no_path_of_a_blocked_or_closed_handle_reaches_device_data(mount):
    canary = b"CANARY" + secrets.token_bytes(10)
    tally = Tally(canary)
    wd = Watchdog(mount)
    try:
        _run(mount, tally, wd)
    finally:
        wd.close()
    record("R5", attempts=tally.attempts, escapes=len(tally.escapes), slowest_s=round(wd.slowest, 3))
    assert not tally.escapes, f"{len(tally.escapes)} escapes of {tally.attempts}:\n" + "\n".join(tally.escapes[:20])
    assert not crashes_in_log(mount)


def _run(mount, tally: Tally, wd: Watchdog) -> None:
    iommu = vc.IommuFd(mount.iommu)
    owners = {}
    filled = {}
    for index in (0, 1, 3, 4, 5):
        owners[index] = vc.VfioDevice(mount.device(index))
        owners[index].bind_iommufd(iommu)
        filled[index] = fill_canaries(owners[index], tally.canary)
    # vfio2 through the legacy path: a granted handle is its owner
    container = vc.VfioContainer(mount.node("vfio/vfio"))
    group = vc.VfioGroup(mount.node("vfio/2"))
    group.set_container(container)
    container.set_iommu(vc.VFIO_TYPE1v2_IOMMU)
    bdf2 = next(b for b in os.listdir(mount.path / "sys/bus/pci/devices")
                if os.listdir(mount.path / "sys/bus/pci/devices" / b / "vfio-dev") == ["vfio2"])
    owners[2] = group.get_device(bdf2)
    filled[2] = fill_canaries(owners[2], tally.canary)
    assert all(canary_count(filled[i], tally.canary) for i in (0, 1, 2)), "the RAM devices must hold a canary"
    mapping = owners[0].mmap(0)  # the owner's own mapping of BAR0, revoked when it closes
    assert tally.canary[:8] in bytes(mapping[:PAGE])

    # 1. blocked handles while the owners hold the devices
    for index in sorted(owners):
        with vc.VfioDevice(mount.device(index)) as blocked:
            every_path_of_a_blocked_handle(tally, wd, blocked.fd, f"blocked vfio{index} (owner bound)")
        assert canaries_intact(owners[index], filled[index], tally.canary), f"a blocked write reached vfio{index}"
    side_files(tally, wd, mount)

    # a blocked handle shared with a forked child stays what it is when the parent closes its
    # copy: the child's fd is the same open file description (as with the kernel's struct file)
    inherited = os.open(mount.device(0), os.O_RDWR)
    results_r, results_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(results_r)
            os.read(go_r, 1)  # the parent has closed its copy
            outcome = []
            for index in range(abi.VFIO_PCI_NUM_REGIONS):
                try:
                    data = os.pread(inherited, 64, abi.VFIO_PCI_INDEX_TO_OFFSET(index))
                    outcome.append("canary" if tally.canary[:8] in data else "data")
                except OSError as exc:
                    outcome.append(errno.errorcode.get(exc.errno, str(exc.errno)))
            os.write(results_w, ",".join(outcome).encode())
        finally:
            os._exit(0)
    os.close(results_w)
    os.close(inherited)  # the parent's copy goes first
    os.write(go_w, b"1")
    os.waitpid(pid, 0)
    os.close(go_r)
    os.close(go_w)
    outcome = os.read(results_r, 4096).decode().split(",")
    os.close(results_r)
    for index, result in enumerate(outcome):
        tally.attempts += 1
        if result != "EINVAL":
            tally.escapes.append(f"a fork-inherited blocked fd, region {index}: {result}, expected EINVAL")

    # 2. the owners close: what is left of them must reach nothing
    tokens = {index: vc.handle_token(dev.fd) for index, dev in owners.items()}
    ticket = group_ticket(group, bdf2)  # a GET_DEVICE_FD grant nobody claims
    old_fds = {index: dev.fd for index, dev in owners.items()}
    for dev in owners.values():
        dev.close()
    group.close()
    container.close()
    tally.saw("the owner's BAR0 mapping after close", None, None, 0)
    if sigbus_or_clean(mapping, tally.canary) == "canary":
        tally.escapes.append("the owner's BAR0 mapping still shows its data after close")
    for index in sorted(owners):
        fresh = os.open(mount.device(index), os.O_RDWR | os.O_CLOEXEC)  # usually the closed handle's fd number
        try:
            name = f"fresh vfio{index} on fd {fresh} (owner's was {old_fds[index]}) after close"
            every_path_of_a_blocked_handle(tally, wd, fresh, name)
            if index == 2:
                _, err = attempt(wd, "CLAIM a lapsed ticket", control, fresh,
                                 protocol.Request(protocol.OP_CLAIM, arg_value=ticket))
                tally.saw(f"{name}: CLAIM of the lapsed GET_DEVICE_FD ticket", None, errno.EINVAL, err)
            for other in tokens.values():  # the closed handle's token names nothing any more
                bind = vc.vfio_device_bind_iommufd(argsz=24, iommufd=77)
                message = protocol.Request(protocol.OP_IOCTL, vc.VFIO_DEVICE_BIND_IOMMUFD, protocol.ARG_BUFFER,
                                           payload=bytes(bind), fds={77: protocol.FdRef(protocol.FD_HANDLE, other)})
                _, err = attempt(wd, "BIND naming a closed handle's token", control, fresh, message)
                tally.saw(f"{name}: BIND with a closed handle's token as iommufd", None, errno.EBADFD, err)
        finally:
            os.close(fresh)
    side_files(tally, wd, mount)

    # 3. the next owner: the device was reset when the last one closed
    for index in sorted(owners):
        with vc.VfioDevice(mount.device(index)) as dev:
            dev.bind_iommufd(iommu)
            for region in range(6):
                info = dev.get_region_info(region)
                if info.size and info.flags & vc.VFIO_REGION_INFO_FLAG_READ:
                    data, err = attempt(wd, "new owner read", dev.read, region, 0, min(info.size, 1 << 20))
                    tally.saw(f"the next owner of vfio{index}, region {region}", data, None, err)
    iommu.close()


def group_ticket(group: vc.VfioGroup, bdf: str) -> int:
    """VFIO_GROUP_GET_DEVICE_FD without the client's CLAIM: the raw ticket."""
    payload = bdf.encode() + b"\0"
    offset = protocol.control_offset(TAG)
    os.pwrite(group.fd, protocol.encode_request(protocol.Request(
        protocol.OP_IOCTL, vc.VFIO_GROUP_GET_DEVICE_FD, protocol.ARG_BUFFER, payload=payload)), offset)
    reply = protocol.decode_reply(os.pread(group.fd, protocol.MAX_MESSAGE, offset))
    return reply.result >> 16
