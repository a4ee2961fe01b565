"""Permissions (issue 14): what the control path takes on trust, and what it verifies.

Covered elsewhere, and not repeated here: without ``allow_other`` no other user, root
included, sees the nodes (tests/mount/test_mount_robustness.py
``test_permissions_are_enforced_by_the_kernel``, tests/mount/test_nonroot.py); with it the
node modes, ``--mode`` and ``--group`` decide (test_nonroot.py
``test_with_allow_other_node_modes_and_group_decide``, test_systemd.py
``test_system_unit_serves_the_members_of_its_group``); a made-up token is EBADFD
(test_mount_robustness.py), a made-up or another user's process proof is EPERM and a
region's memory goes only to a listener of the handle's user (test_mount_dma.py,
test_mount_mmap.py); tickets of another user are refused in the state machine
(tests/unit/test_handles.py).

Here, through a real mount: a real token names only an open handle of the right kind; a
process proof of a process that has exited is refused; with ``allow_other`` and nodes
open to everybody, another user can neither use descriptors this user deposited nor claim
a device this user's group handle opened.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import secrets
import struct

import pytest

from support import REPO, errno_of
from vfiofs import abi
from vfiofs import client as vc
from vfiofs.abi import protocol
from vfiofs.abi.protocol import FD_HANDLE, FdRef, Request
from vfiofs.client import IommuFd, VfioContainer, VfioDevice, VfioGroup
from vfiofs.host import fdpass
from vfiofs.host.mounting import start

NOBODY = 65534
EDU = 4
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="acting as another user needs root")


def control(fd: int, request: Request) -> protocol.Reply:
    return vc._transact(fd, request, protocol.MAX_MESSAGE)


def bind_with(dev: VfioDevice, token: bytes) -> None:
    bind = abi.vfio_device_bind_iommufd(argsz=24, iommufd=3)
    control(dev.fd, Request(protocol.OP_IOCTL, abi.VFIO_DEVICE_BIND_IOMMUFD, protocol.ARG_BUFFER, payload=bytes(bind),
                            fds={3: FdRef(FD_HANDLE, token)}))


def test_a_token_names_only_an_open_handle_of_the_right_kind(mount):
    with VfioDevice(mount.device(0)) as dev, VfioDevice(mount.device(1)) as other:
        iommu = IommuFd(mount.iommu)
        stale = vc.handle_token(iommu.fd)
        iommu.close()  # its token died with it, whoever kept a copy
        assert errno_of(bind_with, dev, stale) == errno.EBADFD
        assert errno_of(bind_with, dev, vc.handle_token(other.fd)) == errno.EBADFD  # a device is no iommufd
        with IommuFd(mount.iommu) as live:
            bind_with(dev, vc.handle_token(live.fd))  # the same request with a live iommufd's token binds
            assert dev.get_info().num_regions == 9


def test_the_proof_of_a_process_that_has_exited_is_refused(mount):
    """A PROCESS proof is the pidfd the kernel reported for the depositing process: once that
    process is gone the daemon maps nobody's memory with it (the pid may be someone else's now)."""
    with IommuFd(mount.iommu) as iommu:
        ioas = iommu.ioas_alloc()
        buf = mmap.mmap(-1, mmap.PAGESIZE)
        address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        parcel = secrets.token_bytes(16)
        channel = vc._channel_name(iommu.fd)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - deposits a proof of itself, then exits
            try:
                fdpass.deposit(channel, parcel, {})
            finally:
                os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        cmd = abi.iommu_ioas_map(size=40, flags=abi.IOMMU_IOAS_MAP_READABLE | abi.IOMMU_IOAS_MAP_WRITEABLE |
                                 abi.IOMMU_IOAS_MAP_FIXED_IOVA, ioas_id=ioas, user_va=address,
                                 length=mmap.PAGESIZE, iova=0x100000)
        request = Request(protocol.OP_IOCTL, abi.IOMMU_IOAS_MAP, protocol.ARG_BUFFER, payload=bytes(cmd),
                          fds={0: FdRef(protocol.FD_PROCESS, parcel)})
        assert errno_of(control, iommu.fd, request) == errno.EPERM
        del address
        iommu.map_buffer(ioas, buf, iova=0x100000)  # its own proof works
        buf.close()


@pytest.fixture
def open_mount(public_dir):
    """The bundled devices with allow_other and every node 0666: only the daemon's checks
    stand between users."""
    mnt = public_dir / "mnt"
    mnt.mkdir()
    daemon = start(mnt, options=("allow_other",), mode=0o666, state_dir=public_dir / "state", cwd=REPO)
    try:
        yield mnt
    finally:
        assert daemon.alive(), daemon.output()
        assert daemon.stop() == 0


def forked_as_nobody(work) -> int:
    """Run ``work()`` in a forked child that became uid/gid 65534 (no groups); its return
    value (a small int, e.g. an errno) comes back as the exit status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the other user
        status = 255
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            status = work()
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status), status
    return os.WEXITSTATUS(status)


@needs_root
def test_descriptors_deposited_by_another_user_are_not_open_for_my_handle(open_mount):
    node = str(open_mount / f"vfio/devices/vfio{EDU}")
    with IommuFd(open_mount / "iommu") as iommu, VfioDevice(node) as dev:
        dev.bind_iommufd(iommu)
        channel = vc._channel_name(dev.fd)
        theirs, mine = secrets.token_bytes(16), secrets.token_bytes(16)

        def deposit_an_eventfd() -> int:
            fdpass.deposit(channel, theirs, {5: os.eventfd(0)})
            return 0

        assert forked_as_nobody(deposit_an_eventfd) == 0
        irq_set = abi.vfio_irq_set(argsz=24, flags=abi.VFIO_IRQ_SET_DATA_EVENTFD | abi.VFIO_IRQ_SET_ACTION_TRIGGER,
                                   index=vc.VFIO_PCI_MSI_IRQ_INDEX, start=0, count=1)

        def set_irqs(parcel: bytes) -> None:
            control(dev.fd, Request(protocol.OP_IOCTL, abi.VFIO_DEVICE_SET_IRQS, protocol.ARG_BUFFER,
                                    payload=bytes(irq_set) + struct.pack("<i", 5),
                                    fds={5: FdRef(protocol.FD_PASSED, parcel)}))

        assert errno_of(set_irqs, theirs) == errno.EBADF  # as if fd 5 were not open
        efd = os.eventfd(0)
        fdpass.deposit(channel, mine, {5: efd})
        set_irqs(mine)  # the same request with my own deposit works
        os.close(efd)


@needs_root
def test_another_user_cannot_claim_the_device_my_group_handle_opened(open_mount):
    with VfioContainer(open_mount / "vfio/vfio") as container, VfioGroup(open_mount / "vfio/0") as group:
        group.set_container(container)
        container.set_iommu()
        name = b"0000:00:01.0\0"
        reply = control(group.fd, Request(protocol.OP_IOCTL, abi.VFIO_GROUP_GET_DEVICE_FD, protocol.ARG_BUFFER,
                                          payload=name))
        ticket, index = reply.result >> 16, reply.result & 0xFFFF
        node = str(open_mount / f"vfio/devices/vfio{index}")

        def claim() -> int:
            fd = os.open(node, os.O_RDWR)  # the node is 0666: the open itself is allowed
            try:
                control(fd, Request(protocol.OP_CLAIM, arg_kind=protocol.ARG_NULL, arg_value=ticket))
                return 0
            except OSError as exc:
                return exc.errno
            finally:
                os.close(fd)

        assert forked_as_nobody(claim) == errno.EINVAL
        assert claim() == errno.EINVAL  # a claim uses the ticket up, even a refused one
        with group.get_device("0000:00:01.0") as dev:  # a fresh GET_DEVICE_FD works for its user
            assert dev.get_info().num_regions == 9
