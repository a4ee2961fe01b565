"""Through a real FUSE mount: concurrency, dying clients, hostile input, permissions."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from support import REPO, as_nobody, errno_of, mounted, wait_until
from vfiofs import client as vc
from vfiofs.abi import protocol
from vfiofs.client import IommuFd, VfioDevice, ioctl
from vfiofs.abi.protocol import FD_HANDLE, FdRef, Request


def test_many_opens_at_once(mount):
    devs = [VfioDevice(mount.device(0)) for _ in range(300)]
    with IommuFd(mount.iommu) as iommu:
        devs[150].bind_iommufd(iommu)
        for i, dev in enumerate(devs):
            if i != 150:
                assert errno_of(dev.read, 0, 0, 4) == errno.EINVAL
        devs[150].write(0, 0, b"only me")
    for dev in devs:
        dev.close()
    assert mount.alive()


def test_two_threads_binding_the_same_device_exactly_one_wins(mount):
    with IommuFd(mount.iommu) as iommu:
        for _ in range(20):
            devs = [VfioDevice(mount.device(0)) for _ in range(2)]
            barrier = threading.Barrier(2)

            def bind(dev: VfioDevice) -> int:
                barrier.wait()
                try:
                    dev.bind_iommufd(iommu)
                    return 0
                except OSError as exc:
                    return exc.errno

            with ThreadPoolExecutor(2) as pool:
                results = sorted(pool.map(bind, devs))
            assert results == [0, errno.EINVAL]
            for dev in devs:
                dev.close()


def test_threads_sharing_one_handle_never_see_each_others_replies(mount):
    """Eight threads on one fd ask for different regions; each must get its own answer."""
    with IommuFd(mount.iommu) as iommu, VfioDevice(mount.device(0)) as dev:
        dev.bind_iommufd(iommu)

        def ask(index: int) -> list[tuple[int, int]]:
            answers = []
            for _ in range(200):
                info = dev.get_region_info(index)
                answers.append((info.index, info.offset))
            return answers

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(ask, range(8)))
        for index, answers in enumerate(results):
            assert set(answers) == {(index, index << 40)}


CLIENT = """
import sys, time
from vfiofs.client import IommuFd, VfioDevice
iommu = IommuFd(sys.argv[1]); dev = VfioDevice(sys.argv[2])
dev.bind_iommufd(iommu)
dev.write(0, 0, b"dirty")
print("bound", flush=True)
sys.stdin.read()
"""


def test_client_killed_while_bound_frees_the_device(mount):
    child = subprocess.Popen([sys.executable, "-c", CLIENT, mount.iommu, mount.device(0)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO)
    assert child.stdout.readline() == b"bound\n"
    with IommuFd(mount.iommu) as iommu, VfioDevice(mount.device(0)) as dev:
        assert errno_of(dev.bind_iommufd, iommu) == errno.EINVAL
        child.send_signal(signal.SIGKILL)
        child.wait()

        def bindable() -> bool:
            try:
                dev.bind_iommufd(iommu)
                return True
            except OSError as exc:
                assert exc.errno == errno.EINVAL
                return False

        # FUSE delivers RELEASE asynchronously after the process is gone.
        assert wait_until(bindable)
        assert dev.read(0, 0, 5) == bytes(5)  # the close reset the device
    child.stdin.close()
    child.stdout.close()


def control_write(fd: int, data: bytes, offset: int | None = None) -> int:
    return os.pwrite(fd, data, protocol.control_offset(9) if offset is None else offset)


def test_garbage_at_the_control_offset(mount):
    good = protocol.encode_request(Request(protocol.OP_GET_TOKEN))
    with VfioDevice(mount.device(0)) as dev, IommuFd(mount.iommu) as iommu:
        cases = {
            b"": None,  # zero-length: never reaches the daemon
            b"\x00": errno.EBADMSG,
            os.urandom(47): errno.EBADMSG,
            os.urandom(4096): errno.EBADMSG,
            b"XXXX" + good[4:]: errno.EBADMSG,
            good[:4] + b"\x02\x00" + good[6:]: errno.EPROTO,
            good[:8] + b"\x09\x00\x00\x00" + good[12:]: errno.EPROTO,
            good + b"trailing": errno.EBADMSG,
            b"\xff" * (protocol.MAX_MESSAGE + 1): errno.EMSGSIZE,
        }
        for fd in (dev.fd, iommu.fd):
            for data, expected in cases.items():
                if expected is None:
                    assert control_write(fd, data) == 0
                else:
                    assert errno_of(control_write, fd, data) == expected, data[:16]
            assert errno_of(control_write, fd, good, protocol.CONTROL_BASE + 1) == errno.EINVAL
            assert errno_of(control_write, fd, good, protocol.CONTROL_BASE - 4096) == errno.EINVAL
            assert errno_of(os.pread, fd, 100, protocol.control_offset(12345)) == errno.ENOMSG
            assert errno_of(os.pread, fd, 100, protocol.CONTROL_BASE + 8) == errno.EINVAL
        # still alive and correct
        assert dev.bind_iommufd(iommu) >= 1
        assert dev.get_info().num_regions == 9
    assert mount.alive()


def test_random_requests_never_hurt_the_daemon(mount):
    """Valid headers with random commands and random payloads: clean errnos only."""
    import random

    rng = random.Random(1234)
    numbers = [vc.VFIO_DEVICE_BIND_IOMMUFD, vc.VFIO_DEVICE_GET_INFO, vc.VFIO_DEVICE_GET_REGION_INFO,
               vc.VFIO_DEVICE_ATTACH_IOMMUFD_PT, vc.VFIO_DEVICE_DETACH_IOMMUFD_PT, vc.VFIO_DEVICE_FEATURE,
               vc.VFIO_DEVICE_RESET, vc.IOMMU_DESTROY, vc.IOMMU_IOAS_ALLOC, vc.VFIO_GET_API_VERSION]
    with IommuFd(mount.iommu) as iommu, VfioDevice(mount.device(1)) as bound, VfioDevice(mount.device(0)) as blocked:
        bound.bind_iommufd(iommu)
        for i in range(600):
            fd = (iommu.fd, bound.fd, blocked.fd)[i % 3]
            payload = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 80)))
            arg = bytearray(payload) if rng.random() < 0.8 else rng.choice([None, rng.randrange(1 << 32)])
            try:
                ioctl(fd, rng.choice(numbers) | (rng.random() < 0.1) * rng.randrange(1 << 16) << 16, arg)
            except OSError as exc:
                assert 1 <= exc.errno <= 511
        assert bound.get_region_info(0).size == 1 << 20
    assert mount.alive()


def test_a_forged_token_is_refused(mount):
    """The daemon resolves fd arguments only by tokens it handed out: guessing gets EBADFD."""
    with VfioDevice(mount.device(0)) as dev, IommuFd(mount.iommu):
        bind = vc.vfio_device_bind_iommufd(argsz=24, iommufd=3)
        for token in (bytes(16), b"\xff" * 16, os.urandom(16)):
            message = protocol.encode_request(Request(
                protocol.OP_IOCTL, vc.VFIO_DEVICE_BIND_IOMMUFD, protocol.ARG_BUFFER, payload=bytes(bind),
                fds={3: FdRef(FD_HANDLE, token)}))
            assert errno_of(control_write, dev.fd, message) == errno.EBADFD
        assert errno_of(dev.get_info) == errno.EINVAL


def test_tokens_are_per_handle_and_unguessable(mount):
    with IommuFd(mount.iommu) as a, IommuFd(mount.iommu) as b, VfioDevice(mount.device(0)) as d:
        tokens = {vc.handle_token(a.fd), vc.handle_token(b.fd), vc.handle_token(d.fd)}
        assert len(tokens) == 3 and all(len(t) == 16 for t in tokens)
        assert vc.handle_token(a.fd) == vc.handle_token(a.fd)


def _as_nobody(path: str) -> str:
    """What uid 65534 gets for ``path``: 'opened' (read-write), 'visible' (exists) or 'hidden'."""
    script = 'if ( exec 3<>"$1" ) 2>/dev/null; then echo opened; elif [ -e "$1" ]; then echo visible; else echo hidden; fi'
    return as_nobody(script, path).stdout.strip()


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")
def test_permissions_are_enforced_by_the_kernel(public_dir):
    control = public_dir / "control"
    control.write_text("")
    control.chmod(0o666)
    assert _as_nobody(str(control)) == "opened"  # the probe itself works
    mnt = public_dir / "mnt"
    mnt.mkdir()
    # Without allow_other, no other user can even see the nodes.
    with mounted(mnt) as m:
        assert _as_nobody(m.device(0)) == "hidden"
    # With allow_other they can see them, and the 0600 mode decides (default_permissions).
    with mounted(mnt, options=("allow_other",)) as m:
        st = os.stat(m.device(0))
        assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o600, os.getuid(), os.getgid())
        assert _as_nobody(m.device(0)) == "visible"
        assert _as_nobody(m.iommu) == "visible"
        os.close(os.open(m.device(0), os.O_RDWR))  # the owner can


def test_client_reports_a_malformed_reply_as_oserror(monkeypatch, mount):
    """Whatever comes back, the client library raises OSError, as fcntl.ioctl would."""
    with IommuFd(mount.iommu) as iommu:
        monkeypatch.setattr(vc.os, "pread", lambda fd, size, offset: b"not a reply at all, definitely")
        assert errno_of(iommu.ioas_alloc) == errno.EBADMSG
        # and an fd whose token cannot be read resolves as foreign, not as an exception
        assert vc.resolve_fd(iommu.fd, iommu.fd).kind == protocol.FD_FOREIGN
