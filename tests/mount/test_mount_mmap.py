"""Through a real mount: mappable BARs — coherency, refusals, reset, revocation, isolation, persistence.

A reset keeps mappings (as the kernel's); closing the bound handle revokes them. Revocation makes an old mapping raise SIGBUS, which kills a process, so those checks run
the mapping in a child process and look at how it died.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from support import REPO, as_nobody, errno_of, raw_mmap_errno, start_mount, stop_mount
from vfiofs.client import IommuFd, VfioDevice
from vfiofs.errors import VfioError
from vfiofs.host.fdpass import send_fd

KiB = 1024


@pytest.fixture
def bound(mount):
    with mount.bound(2) as dev:  # the showcase device
        yield dev


def test_mapping_is_coherent_with_trapped_access(bound):
    ram = bound.mmap(2)
    assert len(ram) == 1024 * KiB
    ram[0x100:0x105] = b"store"  # through the mapping ...
    assert bound.read(2, 0x100, 5) == b"store"  # ... is what the device sees, no msync needed
    bound.write(2, 0x2000, b"device")  # a change on the device side ...
    assert ram[0x2000:0x2006] == b"device"  # ... is visible once the access returned
    again = bound.mmap(2, 4096, 4096)  # a second, partial mapping shares the same memory
    ram[0x1000:0x1004] = b"both"
    assert again[0:4] == b"both"
    ram.close()
    again.close()


def test_sparse_bar_maps_whole_as_vfio_pci_core_mmap_allows(bound):
    """The kernel checks neither sparse areas nor the MSI-X table (it reports MSIX_MAPPABLE):
    the whole BAR maps (the selftests map every MMAP BAR whole), and shows the BAR's memory."""
    area = bound.mmap(1, 0xF000, 0x1000)
    area[0:4] = b"ring"
    assert bound.read(1, 0x1000, 4) == b"ring"
    area.close()
    register_page = bound.mmap(1, 4096, 0)  # the register page alone, too
    register_page.close()
    whole = bound.mmap(1)
    assert len(whole) == 64 * KiB
    # the MSI-X table (offset 0x800) shows every vector masked, as after reset; the PBA is clear
    for vector in range(8):
        entry = 0x800 + 16 * vector
        assert int.from_bytes(whole[entry + 12 : entry + 16], "little") & 1 == 1
    assert whole[0xC00:0xC08] == bytes(8)
    whole[0x2000:0x2004] = b"full"
    assert bound.read(1, 0x2000, 4) == b"full"
    whole.close()


def test_33_mmap_refusals(bound):
    assert errno_of(bound.mmap, 0, 4096) == errno.EINVAL  # trapped BAR
    assert errno_of(bound.mmap, 4, 4096) == errno.EINVAL  # I/O BAR
    for index in (6, 7, 8, 9):  # ROM, config, VGA, no such region
        assert errno_of(bound.mmap, index, 4096) == errno.EINVAL
    assert errno_of(bound.mmap, 2, 2 * 1024 * KiB) == errno.EINVAL  # beyond the BAR
    assert errno_of(bound.mmap, 2, 4096, 1024 * KiB) == errno.EINVAL
    assert errno_of(bound.mmap, 2, 4096, 100) == errno.EINVAL  # not page-aligned (refused by mmap or daemon)


def test_blocked_and_foreign_handles_cannot_map(mount):
    with VfioDevice(mount.device(2)) as blocked:
        assert errno_of(blocked.mmap, 2, 4096) == errno.EINVAL


def test_side_channel_refuses_a_listener_of_another_uid():
    import socket
    import secrets

    name = b"vfiofs-test-" + secrets.token_hex(8).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(b"\0" + name)
        listener.listen(1)
        fd = os.memfd_create("probe")
        try:
            with pytest.raises(VfioError) as exc:
                send_fd(name, fd, uid=os.getuid() + 1)
            assert exc.value.errno == errno.EPERM
            refused, _ = listener.accept()  # the refused attempt delivered nothing
            with refused:
                assert socket.recv_fds(refused, 64, 1)[:2] == (b"", [])
            send_fd(name, fd, uid=os.getuid())
            conn, _ = listener.accept()
            with conn:
                msg, fds, _, _ = socket.recv_fds(conn, 64, 1)
            assert len(fds) == 1 and os.fstat(fds[0]).st_ino == os.fstat(fd).st_ino
            os.close(fds[0])
        finally:
            os.close(fd)
    with pytest.raises(VfioError) as exc:
        send_fd(b"vfiofs-nobody-listens-" + secrets.token_hex(8).encode(), 0, uid=0)
    assert exc.value.errno == errno.ECONNREFUSED


MAPPER = textwrap.dedent("""
    import sys
    from vfiofs.client import IommuFd, VfioDevice
    iommu, dev = IommuFd(sys.argv[1]), VfioDevice(sys.argv[2])
    dev.bind_iommufd(iommu)
    ram = dev.mmap(2)
    ram[0:6] = b"secret"
    dev.close()      # unbinds: the mapping is revoked
    print("revoked", flush=True)
    sys.stdin.readline()
    ram[0]               # must fault
    print("still readable", flush=True)
""")


def test_closing_the_bound_handle_revokes_its_mappings(mount):
    """vfiofs's isolation guarantee: a process that keeps a mapping after close loses it."""
    child = subprocess.Popen([sys.executable, "-c", MAPPER, mount.iommu, mount.device(2)], cwd=REPO,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdout.readline() == b"revoked\n"
    # the next binder starts from clean memory the old mapping cannot reach
    with IommuFd(mount.iommu) as iommu, VfioDevice(mount.device(2)) as dev:
        dev.bind_iommufd(iommu)
        fresh = dev.mmap(2)
        assert fresh[0:6] == bytes(6)
        fresh[0:4] = b"mine"
        child.stdin.write(b"go\n")
        child.stdin.flush()
        assert child.wait(timeout=20) == -signal.SIGBUS
        assert child.stdout.read() == b""
        assert dev.read(2, 0, 4) == b"mine"
        fresh.close()
    child.stdin.close()
    child.stdout.close()


@pytest.mark.parametrize("how", ["VFIO_DEVICE_RESET", "FLR"])
def test_mappings_stay_valid_across_a_reset(bound, how):
    """As in the kernel: a reset zeroes the BARs in place; the binder's mappings keep working."""
    ram, sparse = bound.mmap(2), bound.mmap(1)
    ram[0:6] = b"before"
    sparse[0x1000:0x1004] = b"ring"
    sparse[0x800 + 12] = 0  # clear MSI-X vector 0's mask bit in the mapped table
    if how == "FLR":
        devctl = 0x6C + 8  # the showcase's PCIe capability: DEVCTL, bit 15 = initiate FLR
        value = int.from_bytes(bound.read(7, devctl, 2), "little")
        bound.write(7, devctl, (value | 0x8000).to_bytes(2, "little"))
    else:
        bound.reset()
    assert ram[0:6] == bytes(6) and sparse[0x1000:0x1004] == bytes(4)  # power-on contents, no SIGBUS
    assert sparse[0x800 + 12] & 1 == 1  # the table's power-on contents: every mask bit set
    ram[0:5] = b"after"  # the same mapping still reaches the device
    assert bound.read(2, 0, 5) == b"after"
    bound.write(2, 0x10, b"device")
    assert ram[0x10:0x16] == b"device"
    ram.close()
    sparse.close()


PRIVATE = textwrap.dedent("""
    import ctypes, mmap, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    fd = os.open(sys.argv[1], os.O_RDWR)
    addr = libc.mmap(None, 4096, mmap.PROT_READ, mmap.MAP_PRIVATE, fd, 2 << 40)
    print("mapped" if addr != ctypes.c_void_p(-1).value else "refused", flush=True)
    print(ctypes.string_at(addr, 6), flush=True)
""")


def test_nobody_else_reaches_region_data(mount, bound):
    ram = bound.mmap(2)
    ram[0:6] = b"secret"
    with VfioDevice(mount.device(2)) as other:
        assert errno_of(other.read, 2, 0, 6) == errno.EINVAL  # read
        assert errno_of(other.write, 2, 0, b"x") == errno.EINVAL  # write
        assert errno_of(other.mmap, 2, 4096) == errno.EINVAL  # the side channel
        assert raw_mmap_errno(other.fd, 4096, shared=True, offset=2 << 40) == errno.ENODEV  # FUSE mmap
    # A private FUSE mapping of a blocked handle faults through read (EINVAL) instead of showing data.
    child = subprocess.run([sys.executable, "-c", PRIVATE, mount.device(2)], capture_output=True, cwd=REPO,
                           timeout=20)
    assert child.stdout.splitlines()[:1] == [b"mapped"] and child.returncode == -signal.SIGBUS
    # The daemon's own fds are out of reach for any other user (ptrace rules on /proc/PID/fd).
    fds = os.listdir(f"/proc/{mount.process.pid}/fd")
    memfds = [fd for fd in fds if "memfd:vfiofs" in os.readlink(f"/proc/{mount.process.pid}/fd/{fd}")]
    assert memfds
    if os.geteuid() == 0:
        probe = as_nobody('( exec 3<"$1" ) 2>/dev/null && echo opened || echo refused',
                          f"/proc/{mount.process.pid}/fd/{memfds[0]}")
        assert probe.stdout.strip() == "refused"
    ram.close()


PERSIST = """
name = "nvram"

[[bar]]
index = 0
size = "64KiB"
mmap = true
persist = true

[[bar]]
index = 2
size = "4KiB"
"""


def test_persistent_regions_survive_close_reset_and_restart(tmp_path):
    devices = tmp_path / "defs"
    devices.mkdir()
    (devices / "nvram.toml").write_text(PERSIST)
    state, mnt = tmp_path / "state", tmp_path / "mnt"
    mnt.mkdir()
    m = start_mount(mnt, devices=devices, state_dir=state)
    try:
        with IommuFd(m.iommu) as iommu:
            with VfioDevice(m.device(0)) as dev:
                assert errno_of(os.fsync, dev.fd) == errno.EINVAL  # only the binder may
                dev.bind_iommufd(iommu)
                ram = dev.mmap(0)
                ram[0:7] = b"durable"
                dev.write(2, 0, b"volatile")
                dev.reset()  # persistent memory survives a reset, the rest does not
                assert dev.read(0, 0, 7) == b"durable" and dev.read(2, 0, 8) == bytes(8)
                dev.write(0, 0x100, b"fsynced")
                dev.fsync()
                ram.close()
            with VfioDevice(m.device(0)) as dev:  # and a close
                dev.bind_iommufd(iommu)
                assert dev.read(0, 0x100, 7) == b"fsynced"
        assert (state / "nvram.bar0").stat().st_size == 64 * KiB
        # a second daemon cannot use the same state
        with pytest.raises(RuntimeError, match="in use by another vfiofs"):
            other = tmp_path / "other"
            other.mkdir()
            start_mount(other, devices=devices, state_dir=state)
        # fsync made it durable: even a daemon that is killed keeps it
        m.process.kill()
        m.process.wait()
    finally:
        stop_mount(m)
    m2 = start_mount(mnt, devices=devices, state_dir=state)
    try:
        with IommuFd(m2.iommu) as iommu, VfioDevice(m2.device(0)) as dev:
            dev.bind_iommufd(iommu)
            assert dev.read(0, 0, 7) == b"durable"
            assert dev.read(0, 0x100, 7) == b"fsynced"
            dev.write(0, 0x200, b"clean stop")
    finally:
        assert stop_mount(m2) == 0  # a clean stop writes back without fsync
    m3 = start_mount(mnt, devices=devices, state_dir=state)
    try:
        with IommuFd(m3.iommu) as iommu, VfioDevice(m3.device(0)) as dev:
            dev.bind_iommufd(iommu)
            assert dev.read(0, 0x200, 10) == b"clean stop"
    finally:
        stop_mount(m3)


DOORBELL_MODEL = '''
from vfiofs.models.api import DeviceModel

class ChecksumDevice(DeviceModel):
    """Writing BAR0+0 (doorbell) sums the first N bytes of the mapped buffer in BAR2 into BAR0+4."""

    def bar_write(self, index, offset, data):
        if index == 0 and offset == 0:
            count = int.from_bytes(data, "little")
            self.set_register(0, 4, sum(self.bar_read(2, 0, count)) & 0xFFFFFFFF)
            return
        super().bar_write(index, offset, data)
'''

DOORBELL_DEF = """
model = "checksum_model:ChecksumDevice"

[[bar]]
index = 0
size = "4KiB"

[[bar.register]]
name = "result"
offset = 4
access = "ro"

[[bar]]
index = 2
size = "64KiB"
mmap = true
"""


def test_python_model_sees_the_buffer_filled_through_the_mapping(tmp_path):
    """A driver fills a buffer through the mapping, then rings a doorbell with pwrite."""
    devices = tmp_path / "defs"
    devices.mkdir()
    (devices / "checksum.toml").write_text(DOORBELL_DEF)
    (tmp_path / "checksum_model.py").write_text(DOORBELL_MODEL)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = start_mount(mnt, devices=devices, pythonpath=tmp_path)
    try:
        with IommuFd(m.iommu) as iommu, VfioDevice(m.device(0)) as dev:
            dev.bind_iommufd(iommu)
            buffer = dev.mmap(2)
            payload = bytes(range(1, 201))
            buffer[0:200] = payload
            dev.write(0, 0, (200).to_bytes(4, "little"))  # the doorbell
            assert int.from_bytes(dev.read(0, 4, 4), "little") == sum(payload)
            buffer.close()
    finally:
        assert stop_mount(m) == 0
