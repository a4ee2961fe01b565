"""examples/ioat_driver, the C counterpart of examples/edu_driver.py: a driver written for a real
host (examples/ioat_driver.c), built by the install step, run unmodified under `vfiofs run`. It
binds the I/OAT device (vfio5), maps BAR0, copies a page by DMA and gets the completion as MSI-X
vector 0 — as the user running the suite, and as nobody, an ordinary user with a mount of its own.
The mount's trace shows what reached the device."""

from __future__ import annotations

import json
import os
import pwd
import select
import subprocess
from pathlib import Path

import pytest

from namespaces import (expose_python, needs_root, open_dev_fuse, run_as, run_isolated, scratch, user_env, user_home,
                        vfiofs_command)
from support import NOBODY, REPO, wait_until

VFIOFS = vfiofs_command()
DRIVER = REPO / "examples" / "ioat_driver"
IOAT = "0000:00:06.0"  # vfio5, devices/vioat.toml
REPORT = [f"{IOAT}: 8086:2021 at /dev/vfio/devices/vfio5, I/OAT 3.3, BAR0 16384 bytes mapped",
          "copied 4096 bytes by DMA, MSI-X vector 0 fired once, CHANSTS DONE"]


@pytest.fixture(scope="module")
def driver() -> Path:
    """The program the install step built; never built here, so a broken install step fails."""
    source = DRIVER.with_suffix(".c")
    assert DRIVER.is_file() and os.access(DRIVER, os.X_OK), \
        f"{DRIVER} is missing: the install step builds it, run 'pip install -e .' (./quickstart.sh does)"
    assert DRIVER.stat().st_mtime >= source.stat().st_mtime, \
        f"{DRIVER} is older than {source.name}: run 'pip install -e .' again to rebuild it"
    return DRIVER


def run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*VFIOFS, "run", *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, **kwargs)


def test_the_install_step_built_a_dynamically_linked_program(driver):
    """Its ioctl and mmap come from libc, where the interposition library can take them."""
    symbols = subprocess.run(["nm", "-D", str(driver)], capture_output=True, text=True, check=True).stdout
    imported = {line.split()[-1].split("@")[0] for line in symbols.splitlines() if " U " in line}
    assert "ioctl" in imported and imported & {"mmap", "mmap64"}, imported


def test_the_driver_copies_by_dma_with_an_msix_completion(driver):
    """The README's command: the bundled devices, mounted by `vfiofs run` for the driver alone."""
    done = run("--", "examples/ioat_driver", IOAT, cwd=REPO)
    assert (done.returncode, done.stderr) == (0, ""), done.stdout + done.stderr
    assert done.stdout.splitlines() == REPORT


def read_trace(fd: int, until, timeout: float = 10) -> list[dict]:
    """Events from an open .vfiofs/trace until ``until(events)`` holds (or the timeout)."""
    events: list[dict] = []
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while not until(events) and poller.poll(int(timeout * 1000)):
        try:
            events += [json.loads(line) for line in os.read(fd, 1 << 16).splitlines()]
        except BlockingIOError:
            continue
    return events


def test_what_the_device_saw(mount, driver):
    """Only kernel interfaces: its config writes are PCI_COMMAND alone (never the MSI-X
    capability), its register stores reach the model through the mapping, the model DMAs the
    descriptor and the page and raises one MSI-X message; everything is released after."""
    fd = os.open(mount.node(".vfiofs/trace"), os.O_RDONLY | os.O_NONBLOCK)
    try:
        done = run("--mount", str(mount.path), "--", str(driver), IOAT)
        assert (done.returncode, done.stderr) == (0, ""), done.stdout + done.stderr
        assert done.stdout.splitlines() == REPORT
        events = read_trace(fd, lambda evs: any(e.get("command") == "IOMMU_IOAS_UNMAP" for e in evs))
    finally:
        os.close(fd)

    ioctls = [(e["device"], e["command"]) for e in events
              if e["op"] == "ioctl" and e["command"].startswith(("VFIO", "IOMMU"))]  # not the library's own
    assert ioctls == [("iommu", "IOMMU_IOAS_ALLOC"), ("vfio5", "VFIO_DEVICE_BIND_IOMMUFD"),
                      ("vfio5", "VFIO_DEVICE_ATTACH_IOMMUFD_PT"), ("vfio5", "VFIO_DEVICE_GET_INFO"),
                      ("vfio5", "VFIO_DEVICE_GET_REGION_INFO"), ("vfio5", "VFIO_DEVICE_GET_IRQ_INFO"),
                      ("vfio5", "VFIO_DEVICE_GET_REGION_INFO"),
                      ("vfio5", "VFIO_DEVICE_GET_REGION_INFO"),  # the library's, for the mapping's sparse areas
                      ("iommu", "IOMMU_IOAS_MAP"), ("vfio5", "VFIO_DEVICE_SET_IRQS"),
                      ("vfio5", "VFIO_DEVICE_SET_IRQS"), ("iommu", "IOMMU_IOAS_UNMAP")]
    assert all(e["errno"] == 0 for e in events if e["op"] == "ioctl")

    def accesses(op: str, region: str) -> list[tuple[int, int, str]]:
        return [(e["offset"], e["size"], e["value"]) for e in events
                if e["op"] == op and e.get("device") == "vfio5" and e["region"] == region]

    assert accesses("write", "CONFIG") == [(0x04, 2, "0x6")]  # PCI_COMMAND: MEMORY | MASTER
    assert accesses("write", "BAR0") == [
        (0xA8, 4, "0x0"), (0x84, 1, "0x20"),  # CHANERR cleared, CHANCMD RESET
        (0x03, 1, "0x9"),  # INTRCTRL: MSIX_VECTOR_CONTROL | MASTER_INT_EN
        (0x80, 2, "0x11"), (0x90, 8, "0x100000"), (0x86, 2, "0x1")]  # CHANCTRL, CHAINADDR, DMACOUNT
    reads = accesses("read", "BAR0")
    assert reads[-2:] == [(0x04, 4, "0x1"), (0x88, 8, "0x100001")]  # ATTNSTATUS channel 0; CHANSTS DONE
    device = [{k: v for k, v in e.items() if k not in ("t", "eventfd")} for e in events if e["op"] in ("dma", "irq")]
    assert device == [{"device": "ioat", "op": "dma", "direction": "read", "iova": "0x100000", "size": 64},
                      {"device": "ioat", "op": "dma", "direction": "read", "iova": "0x101000", "size": 4096},
                      {"device": "ioat", "op": "dma", "direction": "write", "iova": "0x102000", "size": 4096},
                      {"device": "ioat", "op": "irq", "type": "msix"}]

    def released() -> bool:
        status = json.loads((mount.path / ".vfiofs/status").read_text())
        ioat = next(d for d in status["devices"] if d["bdf"] == IOAT)
        return ioat["bound_by"] == [] and ioat["interrupts"] == "none"

    assert wait_until(released)


@pytest.mark.parametrize("bdf, message", [
    ("0000:00:01.0", "0000:00:01.0 is 1234:5241, not an I/OAT DMA function (8086:2021): No such device"),
    ("0000:ff:1f.7", ("/sys/bus/pci/devices/0000:ff:1f.7/vfio-dev/ (is 0000:ff:1f.7 bound to vfio-pci?): "
                      "No such file or directory"))], ids=["ram0", "nothing"])
def test_the_wrong_device_is_one_line_and_exit_1(mount, driver, bdf, message):
    """0000:00:01.0 is vfio0, the 64 KiB RAM device; 0000:ff:1f.7 is neither the mount's nor the host's."""
    done = run("--mount", str(mount.path), "--", str(driver), bdf)
    assert (done.returncode, done.stdout, done.stderr) == (1, "", f"ioat_driver: {message}\n")


def _nobody_runs_the_driver(driver: Path) -> None:
    where = scratch()
    open_dev_fuse(where)  # what udev usually makes it: 0666
    expose_python(where)
    home = user_home(where, pwd.getpwuid(NOBODY))
    env = {**user_env(home), "TMPDIR": str(home)}  # vfiofs run makes its private mount in TMPDIR
    done = run_as(NOBODY, NOBODY, [*VFIOFS, "run", "--", str(driver), IOAT], env=env)
    assert (done.returncode, done.stderr) == (0, ""), done.stdout + done.stderr
    assert done.stdout.splitlines() == REPORT


@needs_root
def test_an_ordinary_user_runs_the_driver(driver):
    """nobody (uid 65534, no groups) mounts the devices through `vfiofs run` and drives them:
    nothing in the driver, the library or the mount needs privileges."""
    run_isolated(_nobody_runs_the_driver, driver)
