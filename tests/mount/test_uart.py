"""The 16550 UART (vfiofs/models/uart.py, devices/uart.toml) through a real mount: its BAR0
and its host port (<mnt>/ports/vfio3); then the FUSE adapter's port handlers without a mount.
The model's own tests are in tests/unit/test_uart_model.py."""

from __future__ import annotations

import errno
import os
import select
import threading
import time

import pytest

from support import errno_of, wait_until

RBR = THR = 0
IER = 1
IIR = FCR = 2
LSR = 5

ERBFI = 0x01
DR, THRE, TEMT = 0x01, 0x20, 0x40
NO_INT, IIR_RDI = 0x01, 0x04
UART = 3  # devices/uart.toml sorts after showcase.toml: vfio3


# -- through a real mount --------------------------------------------------------------------------

@pytest.fixture
def bound_uart(mount):
    with mount.bound(UART) as dev:
        yield dev


def port_path(mount, index: int = UART) -> str:
    return mount.node(f"ports/vfio{index}")


def wait_for(fd: int, events: int, timeout_ms: int = 5000) -> int:
    poller = select.poll()
    poller.register(fd, events)
    ready = poller.poll(timeout_ms)
    return ready[0][1] if ready else 0


def asleep_in_poll(tid: int) -> bool:
    """Thread ``tid`` of this process sleeps in poll(2) itself (its FUSE_POLL request already
    answered), as the kernel reports in /proc: state S, wait channel poll_schedule_timeout or
    do_sys_poll (a FUSE request in flight waits elsewhere, in request_wait_answer)."""
    task = f"/proc/self/task/{tid}"
    try:
        with open(f"{task}/stat") as stat, open(f"{task}/wchan") as wchan:
            state, channel = stat.read().rpartition(")")[2].split()[0], wchan.read()
    except FileNotFoundError:  # the thread has already finished
        return False
    if channel.strip() in ("", "0"):  # a kernel that hides wait channels: the state is all there is
        return state == "S"
    return state == "S" and "poll" in channel


def test_mount_uart_region_info(bound_uart):
    dev = bound_uart
    bar0 = dev.get_region_info(0)
    assert (bar0.size, bar0.offset) == (8, 0)
    assert dev.read(7, 0, 4) == (0x32534348).to_bytes(4, "little")
    assert dev.read(7, 0x0B, 1) == b"\x07" and dev.read(7, 0x0A, 1) == b"\x00" and dev.read(7, 0x09, 1) == b"\x02"


def test_mount_transmit_hello_to_the_port(mount, bound_uart):
    dev = bound_uart
    dev.write(0, FCR, b"\x07")  # FIFOs on, both cleared
    assert dev.read(0, IIR, 1) == bytes([0xC0 | NO_INT])
    port = os.open(port_path(mount), os.O_RDWR | os.O_NONBLOCK)
    try:
        assert errno_of(os.read, port, 100) == errno.EAGAIN  # nothing transmitted yet
        assert wait_for(port, select.POLLIN, 0) == 0
        for byte in b"hello":
            dev.write(0, THR, bytes([byte]))
            assert dev.read(0, LSR, 1) == bytes([THRE | TEMT])
        assert wait_for(port, select.POLLIN) & select.POLLIN
        assert os.read(port, 100) == b"hello"
        assert errno_of(os.read, port, 100) == errno.EAGAIN
    finally:
        os.close(port)


def test_mount_poll_wakes_when_the_driver_transmits(mount, bound_uart):
    """A poller that is already asleep is woken by the THR write (poll_handle.notify)."""
    dev = bound_uart
    port = os.open(port_path(mount), os.O_RDWR | os.O_NONBLOCK)
    try:
        result = {}
        started = threading.Event()

        def waiter_thread() -> None:
            result["tid"] = threading.get_native_id()
            started.set()
            start = time.monotonic()
            result["revents"] = wait_for(port, select.POLLIN, 10000)
            result["waited"] = time.monotonic() - start

        waiter = threading.Thread(target=waiter_thread)
        waiter.start()
        assert started.wait(10)
        # the wake-up is what is tested: wait until the kernel has the waiter asleep in poll(2)
        assert wait_until(lambda: asleep_in_poll(result["tid"]))
        dev.write(0, THR, b"Q")
        waiter.join(15)
        assert not waiter.is_alive()
        assert result["revents"] & select.POLLIN
        # woken by the notification, not by the timeout (poll re-checks once when it expires)
        assert result["waited"] < 5
        assert os.read(port, 10) == b"Q"
    finally:
        os.close(port)


def test_mount_port_write_reaches_rbr(mount, bound_uart):
    dev = bound_uart
    dev.write(0, FCR, b"\x07")
    assert dev.read(0, LSR, 1) == bytes([THRE | TEMT])
    port = os.open(port_path(mount), os.O_RDWR | os.O_NONBLOCK)
    try:
        assert wait_for(port, select.POLLOUT, 0) & select.POLLOUT
        assert os.write(port, b"world") == 5
        dev.write(0, IER, bytes([ERBFI]))
        assert dev.read(0, IIR, 1) == bytes([0xC0 | IIR_RDI])
        received = b""
        while dev.read(0, LSR, 1)[0] & DR:
            received += dev.read(0, RBR, 1)
        assert received == b"world"
        assert dev.read(0, LSR, 1) == bytes([THRE | TEMT])
        assert dev.read(0, IIR, 1) == bytes([0xC0 | NO_INT])
        # a full FIFO: a short write, then EAGAIN, and no POLLOUT until the driver reads
        assert os.write(port, bytes(20)) == 16
        assert errno_of(os.write, port, b"x") == errno.EAGAIN
        assert wait_for(port, select.POLLOUT, 0) == 0
        dev.read(0, RBR, 1)
        assert wait_for(port, select.POLLOUT, 0) & select.POLLOUT
        assert os.write(port, b"xy") == 1
    finally:
        os.close(port)


def test_mount_ports_tree(mount):
    assert os.listdir(mount.node("ports")) == [f"vfio{UART}"]
    st = os.stat(port_path(mount))
    assert (oct(st.st_mode), st.st_uid) == (oct(0o100600), os.getuid())
    assert oct(os.stat(mount.node("ports")).st_mode) == oct(0o40755)
    for index in (0, 1, 2):  # devices without a host side have no port
        assert not os.path.exists(port_path(mount, index))
        assert errno_of(os.open, port_path(mount, index), os.O_RDWR) == errno.ENOENT


def test_mount_port_works_without_a_binder(mount):
    port = os.open(port_path(mount), os.O_RDWR | os.O_NONBLOCK)
    try:
        assert errno_of(os.read, port, 10) == errno.EAGAIN
        assert os.write(port, b"early") == 5  # the line is there even while no driver is bound
        # a device node's poll is the kernel's default (a vfio device fd has no poll method)
        fd = os.open(mount.device(0), os.O_RDWR)
        try:
            assert wait_for(fd, select.POLLIN | select.POLLOUT, 0) == select.POLLIN | select.POLLOUT
        finally:
            os.close(fd)
        assert wait_for(port, select.POLLIN, 0) == 0  # and the port's own poll still works
    finally:
        os.close(port)
