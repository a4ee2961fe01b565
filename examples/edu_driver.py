#!/usr/bin/env python3
"""A small userspace driver for QEMU's edu device, served by a vfiofs mount.

    python examples/edu_driver.py [MOUNTPOINT]        (default /tmp/vfiofs)

It uses nothing but the public client library (``vfiofs.client``), the way a driver uses
/dev/iommu and /dev/vfio/devices/vfioN with the kernel:

1. finds the edu device (PCI 1234:11e8) in the mount's sysfs tree and the vfioN node
   that belongs to it (``sys/bus/pci/devices/<bdf>/vfio-dev/vfioN``);
2. binds it to an iommufd (VFIO_DEVICE_BIND_IOMMUFD);
3. checks the identification register (0x010000ED) and the liveness register;
4. computes 12! and waits for the MSI interrupt with select() on an eventfd;
5. DMA: maps a page of its own memory into an IOAS with IOMMU_IOAS_MAP, attaches the
   device, copies the page into the device's buffer (RAM → EDU), clears it, copies it
   back (EDU → RAM), each completion signalled by interrupt 0x100, and checks the page.

Every step prints one line. On failure it prints one line starting with
``edu_driver: error:`` to stderr and exits 1.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import select
import sys
from pathlib import Path

from vfiofs.client import (
    IOMMU_IOAS_MAP,
    IOMMU_IOAS_MAP_FIXED_IOVA,
    IOMMU_IOAS_MAP_READABLE,
    IOMMU_IOAS_MAP_WRITEABLE,
    IOMMU_IOAS_UNMAP,
    VFIO_PCI_BAR0_REGION_INDEX,
    VFIO_PCI_MSI_IRQ_INDEX,
    IommuFd,
    VfioDevice,
    iommu_ioas_map,
    iommu_ioas_unmap,
    ioctl,
)

EDU_VENDOR, EDU_DEVICE = 0x1234, 0x11E8
EDU_ID = 0x010000ED

# BAR0 registers (QEMU docs/specs/edu.rst)
ID, LIVENESS, FACTORIAL, STATUS, IRQ_STATUS, IRQ_RAISE, IRQ_ACK = 0x00, 0x04, 0x08, 0x20, 0x24, 0x60, 0x64
DMA_SRC, DMA_DST, DMA_COUNT, DMA_CMD = 0x80, 0x88, 0x90, 0x98
STATUS_IRQFACT = 0x80
DMA_START, DMA_TO_RAM, DMA_IRQ = 0x01, 0x02, 0x04
FACT_IRQ, DMA_DONE_IRQ = 0x001, 0x100
EDU_BUFFER = 0x40000  # the device's 4 KiB DMA buffer, a device-side address

PAGE = 4096
IOVA = 0x100000
TIMEOUT = 5.0


class Failure(Exception):
    """One line saying what went wrong."""


def step(message: str) -> None:
    print(f"edu: {message}", flush=True)


# -- finding the device ----------------------------------------------------------------------------

def find_edu(mountpoint: Path) -> tuple[str, Path]:
    """(BDF, vfio/devices/vfioN path) of the first edu device in the mount."""
    pci = mountpoint / "sys" / "bus" / "pci" / "devices"
    if not (mountpoint / "iommu").exists():
        raise Failure(f"{mountpoint} is not a vfiofs mount (no iommu node)")
    try:
        bdfs = sorted(os.listdir(pci))
    except OSError as exc:
        raise Failure(f"cannot list {pci}: {exc.strerror}") from None
    for bdf in bdfs:
        try:
            vendor = int((pci / bdf / "vendor").read_text(), 0)
            device = int((pci / bdf / "device").read_text(), 0)
        except (OSError, ValueError):
            continue
        if (vendor, device) != (EDU_VENDOR, EDU_DEVICE):
            continue
        nodes = os.listdir(pci / bdf / "vfio-dev")
        if len(nodes) != 1:
            raise Failure(f"{bdf} has no single vfio-dev entry: {nodes}")
        return bdf, mountpoint / "vfio" / "devices" / nodes[0]
    raise Failure(f"no edu device ({EDU_VENDOR:04x}:{EDU_DEVICE:04x}) under {pci}")


# -- register access -----------------------------------------------------------------------------------

class Edu:
    def __init__(self, dev: VfioDevice) -> None:
        self.dev = dev

    def read32(self, offset: int) -> int:
        return int.from_bytes(self.dev.read(VFIO_PCI_BAR0_REGION_INDEX, offset, 4), "little")

    def write32(self, offset: int, value: int) -> None:
        self.dev.write(VFIO_PCI_BAR0_REGION_INDEX, offset, value.to_bytes(4, "little"))

    def read64(self, offset: int) -> int:
        return int.from_bytes(self.dev.read(VFIO_PCI_BAR0_REGION_INDEX, offset, 8), "little")

    def write64(self, offset: int, value: int) -> None:
        self.dev.write(VFIO_PCI_BAR0_REGION_INDEX, offset, value.to_bytes(8, "little"))


def wait_irq(efd: int, what: str) -> int:
    ready, _, _ = select.select([efd], [], [], TIMEOUT)
    if not ready:
        raise Failure(f"no interrupt within {TIMEOUT:g} s for {what}")
    return os.eventfd_read(efd)


def expect_irq(edu: Edu, efd: int, bit: int, what: str) -> None:
    """Wait for the MSI, check the cause in the interrupt status, and acknowledge it."""
    wait_irq(efd, what)
    status = edu.read32(IRQ_STATUS)
    if not status & bit:
        raise Failure(f"{what}: interrupt status {status:#x} lacks {bit:#x}")
    edu.write32(IRQ_ACK, bit)  # the ISR acks with MSI too (edu.rst)


# -- the checks ------------------------------------------------------------------------------------------

def identify(edu: Edu) -> None:
    ident = edu.read32(ID)
    if ident != EDU_ID:
        raise Failure(f"identification register reads {ident:#010x}, expected {EDU_ID:#010x}")
    step(f"identification {ident:#010x} (version {ident >> 24}.{(ident >> 16) & 0xFF})")
    edu.write32(LIVENESS, 0x12345678)
    live = edu.read32(LIVENESS)
    if live != 0xEDCBA987:
        raise Failure(f"liveness check: wrote 0x12345678, read {live:#010x}, expected 0xedcba987")
    step(f"liveness 0x12345678 -> {live:#010x} ok")


def factorial(edu: Edu, efd: int, n: int = 12) -> None:
    edu.write32(STATUS, STATUS_IRQFACT)  # interrupt when done
    edu.write32(FACTORIAL, n)
    expect_irq(edu, efd, FACT_IRQ, "the factorial")
    result = edu.read32(FACTORIAL)
    expected = 1
    for i in range(2, n + 1):
        expected = expected * i & 0xFFFFFFFF
    if result != expected:
        raise Failure(f"{n}! = {result}, expected {expected}")
    edu.write32(STATUS, 0)
    step(f"{n}! = {result} (by MSI interrupt)")


def buffer_address(buf: mmap.mmap) -> int:
    view = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(view)
    finally:
        del view  # release the export, so that the mmap can be closed later


def dma(edu: Edu, dev: VfioDevice, iommu: IommuFd, efd: int) -> None:
    buf = mmap.mmap(-1, PAGE)  # page-aligned anonymous memory of this process
    ioas = iommu.ioas_alloc()
    cmd = iommu_ioas_map(size=ctypes.sizeof(iommu_ioas_map),
                         flags=IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
                         ioas_id=ioas, user_va=buffer_address(buf), length=PAGE, iova=IOVA)
    try:
        ioctl(iommu.fileno(), IOMMU_IOAS_MAP, cmd)
    except OSError as exc:
        raise Failure(f"DMA: IOMMU_IOAS_MAP of {PAGE} bytes at IOVA {IOVA:#x} failed: "
                      f"{os.strerror(exc.errno)} (errno {exc.errno})") from None
    step(f"DMA buffer of {PAGE} bytes mapped at IOVA {cmd.iova:#x} (IOAS {ioas})")
    try:
        pt = dev.attach_iommufd_pt(ioas)
        step(f"attached to IOAS {ioas} (hwpt {pt})")
        pattern = bytes((i * 31 + 7) & 0xFF for i in range(PAGE))
        buf[:] = pattern
        transfer(edu, efd, IOVA, EDU_BUFFER, DMA_START | DMA_IRQ, "RAM -> EDU")
        buf[:] = bytes(PAGE)
        transfer(edu, efd, EDU_BUFFER, IOVA, DMA_START | DMA_TO_RAM | DMA_IRQ, "EDU -> RAM")
        if buf[:] != pattern:
            wrong = next(i for i in range(PAGE) if buf[i] != pattern[i])
            raise Failure(f"DMA round trip: byte {wrong:#x} is {buf[wrong]:#04x}, expected {pattern[wrong]:#04x}")
        step(f"DMA round trip of {PAGE} bytes ok")
        dev.detach_iommufd_pt()
    finally:
        unmap = iommu_ioas_unmap(size=ctypes.sizeof(iommu_ioas_unmap), ioas_id=ioas, iova=IOVA, length=PAGE)
        try:
            ioctl(iommu.fileno(), IOMMU_IOAS_UNMAP, unmap)
        except OSError:
            pass  # the failure that brought us here matters more
        buf.close()


def transfer(edu: Edu, efd: int, src: int, dst: int, command: int, what: str) -> None:
    edu.write64(DMA_SRC, src)
    edu.write64(DMA_DST, dst)
    edu.write64(DMA_COUNT, PAGE)
    edu.write64(DMA_CMD, command)
    expect_irq(edu, efd, DMA_DONE_IRQ, f"DMA {what}")
    if edu.read64(DMA_CMD) & DMA_START:
        raise Failure(f"DMA {what}: interrupt 0x100 arrived but the command is still running")
    step(f"DMA {what} {PAGE} bytes done (interrupt 0x100)")


def run(mountpoint: Path) -> None:
    bdf, node = find_edu(mountpoint)
    step(f"found {EDU_VENDOR:04x}:{EDU_DEVICE:04x} at {bdf} -> {node.relative_to(mountpoint)}")
    try:
        iommu = IommuFd(mountpoint / "iommu")
        dev = VfioDevice(node)
    except OSError as exc:
        raise Failure(f"cannot open {exc.filename}: {exc.strerror}") from None
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        try:
            devid = dev.bind_iommufd(iommu)
        except OSError as exc:
            raise Failure(f"VFIO_DEVICE_BIND_IOMMUFD failed: {os.strerror(exc.errno)} (is the device in use?)") \
                from None
        step(f"bound to iommufd (devid {devid})")
        edu = Edu(dev)
        identify(edu)
        dev.enable_irq_eventfds(VFIO_PCI_MSI_IRQ_INDEX, [efd])
        step("MSI enabled with an eventfd")
        factorial(edu, efd)
        dma(edu, dev, iommu, efd)
        dev.disable_irqs(VFIO_PCI_MSI_IRQ_INDEX)
    finally:
        dev.close()  # unbinds; vfiofs resets the device
        iommu.close()
        os.close(efd)
    step("all checks passed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mountpoint", nargs="?", default="/tmp/vfiofs", type=Path,
                        help="where vfiofs is mounted (default /tmp/vfiofs)")
    args = parser.parse_args(argv)
    try:
        run(args.mountpoint)
    except Failure as exc:
        print(f"edu_driver: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"edu_driver: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
