"""`vfiofs ls` and `vfiofs trace` against a real mount, and the .vfiofs/ files behind them."""

from __future__ import annotations

import json
import mmap
import os
import select
import subprocess
import sys

from support import REPO, run_dma
from test_cli import assert_one_line_error, vfiofs
from vfiofs import client as vc
from vfiofs.client import IommuFd, VfioContainer, VfioDevice, VfioGroup


def test_ls_shows_who_holds_each_device(mount):
    with IommuFd(mount.iommu) as iommu, VfioDevice(mount.device(0)) as dev:
        dev.bind_iommufd(iommu)
        ioas = iommu.ioas_alloc()
        dev.attach_iommufd_pt(ioas)
        status = json.loads(vfiofs("ls", "--json", str(mount.path)).stdout)
        first = status["devices"][0]
        assert first["bound_by"] == [{"pid": os.getpid(), "handle": first["bound_by"][0]["handle"], "via": "cdev"}]
        assert first["ioas"] == ioas and first["bdf"] == "0000:00:01.0" and first["vendor"] == "1234"
        assert all(d["bound_by"] == [] for d in status["devices"][1:])
        table = vfiofs("ls", str(mount.path)).stdout.splitlines()
        assert table[0].split()[:4] == ["NODE", "NAME", "IDS", "BDF"]
        assert f"pid {os.getpid()} (cdev)" in table[1] and table[1].startswith("vfio/devices/vfio0")
    # the legacy path shows up as such
    container = VfioContainer(mount.node("vfio/vfio"))
    group = VfioGroup(mount.node("vfio/1"))
    group.set_container(container)
    container.set_iommu()
    dev = group.get_device("0000:00:02.0")
    second = json.loads(vfiofs("ls", "--json", str(mount.path)).stdout)["devices"][1]
    assert second["bound_by"][0]["via"] == "group" and second["ioas"] == "container"
    dev.close()
    group.close()
    container.close()


def test_ls_and_trace_refuse_what_is_not_a_mount(tmp_path):
    assert_one_line_error(vfiofs("ls", str(tmp_path)), "is not a vfiofs mount")
    assert_one_line_error(vfiofs("trace", str(tmp_path)), "is not a vfiofs mount")


def read_events(fd: int, want, timeout: float = 10) -> list[dict]:
    """Events from an open .vfiofs/trace until ``want`` (a count, or a test on the events so far)
    is satisfied, waiting with poll (no sleeping)."""
    done = want if callable(want) else (lambda events: len(events) >= want)
    events: list[dict] = []
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while not done(events) and poller.poll(int(timeout * 1000)):
        try:
            events += [json.loads(line) for line in os.read(fd, 1 << 16).splitlines()]
        except BlockingIOError:
            continue
    return events


def test_trace_file_records_accesses_commands_and_errnos(mount):
    fd = os.open(mount.node(".vfiofs/trace"), os.O_RDONLY | os.O_NONBLOCK)
    try:
        with IommuFd(mount.iommu) as iommu, VfioDevice(mount.device(0)) as dev:
            try:
                dev.get_info()  # blocked: EINVAL
            except OSError:
                pass
            dev.bind_iommufd(iommu)
            dev.write(0, 0x10, b"\x78\x56\x34\x12")
            dev.read(0, 0x10, 4)
            events = read_events(fd, 5)
        ops = [(e["op"], e.get("command"), e.get("errno")) for e in events]
        assert ("ioctl", "VFIO_DEVICE_GET_INFO", "EINVAL") in ops
        assert ("ioctl", "VFIO_DEVICE_BIND_IOMMUFD", 0) in ops
        writes = [e for e in events if e["op"] == "write"]
        reads = [e for e in events if e["op"] == "read"]
        assert writes[0] | {"t": 0} == {"t": 0, "device": "vfio0", "handle": writes[0]["handle"], "op": "write",
                                        "region": "BAR0", "offset": 0x10, "size": 4, "value": "0x12345678"}
        assert reads[0]["value"] == "0x12345678" and reads[0]["region"] == "BAR0"
        assert all(e["t"] > 0 for e in events)
    finally:
        os.close(fd)


def test_trace_records_interrupts_and_dma(models_mount):
    fd = os.open(models_mount.node(".vfiofs/trace"), os.O_RDONLY | os.O_NONBLOCK)
    try:
        with IommuFd(models_mount.iommu) as iommu, VfioDevice(models_mount.device(0)) as dev:
            dev.bind_iommufd(iommu)
            efd = os.eventfd(0, os.EFD_NONBLOCK)
            dev.enable_irq_eventfds(vc.VFIO_PCI_MSIX_IRQ_INDEX, [efd])
            dev.set_irqs(vc.VFIO_PCI_MSIX_IRQ_INDEX, vc.VFIO_IRQ_SET_DATA_NONE | vc.VFIO_IRQ_SET_ACTION_TRIGGER, 0, 1)
            ioas = iommu.ioas_alloc()
            dev.attach_iommufd_pt(ioas)
            buf = mmap.mmap(-1, 4096)
            iommu.map_buffer(ioas, buf, iova=0x100000)
            assert run_dma(dev, 1, 0x100000, 64) == 0
            assert run_dma(dev, 1, 0x900000, 8) == 1
            events = read_events(fd, lambda evs: sum(e["op"] == "dma" for e in evs) >= 2)
            os.close(efd)
        kinds = [e for e in events if e["op"] in ("irq", "dma")]
        assert any(e["op"] == "irq" and e["type"] == "msix" for e in kinds)
        assert {"device": "irqdev", "op": "dma", "direction": "read", "iova": "0x100000", "size": 64} in \
            [{k: v for k, v in e.items() if k != "t"} for e in kinds]
        assert any(e["op"] == "dma" and "fault" in e and "0x900000" in e["fault"] for e in kinds)
    finally:
        os.close(fd)


def test_trace_command_streams_text(mount):
    tracer = subprocess.Popen([sys.executable, "-m", "vfiofs", "trace", str(mount.path), "--count", "3"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    assert tracer.stderr.readline().startswith("vfiofs: tracing")  # subscribed
    with IommuFd(mount.iommu) as iommu, VfioDevice(mount.device(1)) as dev:
        dev.bind_iommufd(iommu)
        dev.write(0, 8, b"\x01\x00\x00\x00")
    out, _ = tracer.communicate(timeout=20)
    assert tracer.returncode == 0
    lines = out.splitlines()
    assert len(lines) == 3
    assert "vfio1" in lines[1] and "VFIO_DEVICE_BIND_IOMMUFD" in lines[1]
    assert lines[2].endswith("write BAR0+0x8 size 4 = 0x1")
