"""The sysfs-like tree under ``<mnt>/sys``: vfiofs.pci.sysfs alone, the adapter, a real mount, real lspci."""

from __future__ import annotations

import errno
import os
import posixpath
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from support import as_nobody, errno_of, mounted
from vfiofs.pci import sysfs
from vfiofs.host.daemon import build_server
from vfiofs.host.definitions import bundled_directory, load_directory
from vfiofs.pci.config import PciConfigSpace
from vfiofs.models.spec import BarSpec, DeviceSpec, PciIdentity

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
BDFS = ["0000:00:01.0", "0000:00:02.0", "0000:00:03.0", "0000:00:04.0", "0000:00:05.0",
        "0000:00:06.0"]
PCI = "sys/bus/pci/devices"
ZERO_LINE = "0x0000000000000000 0x0000000000000000 0x0000000000000000"
LINE_RE = re.compile(r"^0x[0-9a-f]{16} 0x[0-9a-f]{16} 0x[0-9a-f]{16}$")

# Host addresses the rules in vfiofs.pci.sysfs give the bundled devices (vfio0 ram-64k,
# vfio1 ram-1m, vfio2 showcase, vfio3 uart, vfio4 edu, vfio5 ioat): 32-bit memory and the ROM downward from 0xfec00000,
# 64-bit prefetchable upward from 0x800000000, I/O upward from 0xc000.
EXPECTED_RESOURCES = {
    0: {0: (0xFEBF0000, 64 * KiB, 0x40200)},
    1: {0: (0x8_0000_0000, 1 * MiB, 0x14220C)},
    2: {
        0: (0xFEBEF000, 4 * KiB, 0x40200),
        1: (0xFEBD0000, 64 * KiB, 0x40200),
        2: (0x8_0010_0000, 1 * MiB, 0x14220C),
        4: (0xC000, 32, 0x40101),
        6: (0xFEBEE800, 2 * KiB, 0x46200),
    },
    3: {0: (0xC020, 8, 0x40101)},  # uart
    4: {0: (0xFEA00000, 1 * MiB, 0x40200)},  # edu
    5: {0: (0xFEBE8000, 16 * KiB, 0x140204)},  # ioat: 64-bit, not prefetchable, so below 4 GiB
}


@pytest.fixture(scope="module")
def bundled():
    """(index, spec) of the bundled devices, as the daemon builds them."""
    server = build_server(load_directory(bundled_directory()))
    return [(device.index, device.driver.spec) for device in server.devices]


@pytest.fixture(scope="module")
def tree(bundled):
    return {entry.path: entry for entry in sysfs.build_tree(bundled)}


def identity(**kw) -> PciIdentity:
    return PciIdentity(vendor=kw.pop("vendor", 0x1234), device=kw.pop("device", 0x1), **kw)


def spec_with(*bars: BarSpec, rom: bytes | None = None, name: str = "t", **ident) -> DeviceSpec:
    return DeviceSpec(name=name, model="ram", identity=identity(**ident), bars=bars, rom=rom)


def text(tree, path: str) -> str:
    entry = tree[path]
    assert entry.kind == "file"
    return entry.content.decode()


def resolve(path: str, target: str) -> str:
    return posixpath.normpath(posixpath.join(posixpath.dirname(path), target))


def bar_address(config: bytes, index: int) -> int:
    """The address a BAR register holds (64-bit BARs with their upper half)."""
    low = int.from_bytes(config[0x10 + 4 * index : 0x14 + 4 * index], "little")
    if low & 1:
        return low & ~0x3
    address = low & ~0xF
    if low & 0x6 == 0x4:
        address |= int.from_bytes(config[0x14 + 4 * index : 0x18 + 4 * index], "little") << 32
    return address


# -- vfiofs.pci.sysfs: addresses and formats -------------------------------------------------------------


@pytest.mark.parametrize(("index", "expected"), [
    (0, "0000:00:01.0"), (1, "0000:00:02.0"), (2, "0000:00:03.0"), (30, "0000:00:1f.0"),
    (31, "0000:01:00.0"), (32 * 256 - 1, "0001:00:00.0"),
])
def test_bdf_rule(index, expected):
    assert sysfs.bdf(index) == expected
    assert re.fullmatch(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]", expected)


def test_identity_attributes(tree):
    expected = [
        ("0x1234\n", "0x5241\n", "0x1af4\n", "0x1100\n", "0x050000\n", "0x01\n", "0\n"),
        ("0x1234\n", "0x5242\n", "0x1af4\n", "0x1100\n", "0x050000\n", "0x01\n", "0\n"),
        ("0x1234\n", "0x5653\n", "0x1af4\n", "0x1100\n", "0xff0000\n", "0x02\n", "19\n"),
    ]
    names = ("vendor", "device", "subsystem_vendor", "subsystem_device", "class", "revision", "irq")
    for bdf, values in zip(BDFS, expected):
        assert tuple(text(tree, f"{PCI}/{bdf}/{name}") for name in names) == values
    assert text(tree, f"{PCI}/0000:00:03.0/modalias") == "pci:v00001234d00005653sv00001AF4sd00001100bcFFsc00i00\n"
    assert "PCI_SLOT_NAME=0000:00:03.0\n" in text(tree, f"{PCI}/0000:00:03.0/uevent")


def test_irq_swizzles_the_pin_onto_16_to_19():
    pinned = spec_with(interrupt_pin=1)
    assert sysfs.irq_of(0, pinned) == 17  # device 1, INTA
    assert sysfs.irq_of(2, pinned) == 19
    assert sysfs.irq_of(3, pinned) == 16
    assert sysfs.irq_of(0, spec_with(interrupt_pin=2)) == 18
    assert sysfs.irq_of(5, spec_with()) == 0


@pytest.mark.parametrize(("bar", "flags"), [
    (BarSpec(0, 4096), 0x00040200),
    (BarSpec(0, 4096, prefetchable=True), 0x00042208),
    (BarSpec(0, 4096, is_64bit=True), 0x00140204),
    (BarSpec(0, 4096, is_64bit=True, prefetchable=True), 0x0014220C),
    (BarSpec(0, 32, io=True), 0x00040101),
])
def test_bar_flags_are_the_kernels(bar, flags):
    assert sysfs.bar_flags(bar) == flags
    assert sysfs.ROM_FLAGS == 0x00046200


def test_resource_files(tree, bundled):
    for (index, spec), bdf in zip(bundled, BDFS):
        lines = text(tree, f"{PCI}/{bdf}/resource").splitlines()
        assert len(lines) == 13
        assert all(LINE_RE.match(line) for line in lines)
        expected = EXPECTED_RESOURCES[index]
        for i, line in enumerate(lines):
            if i not in expected:
                assert line == ZERO_LINE, (bdf, i)
                continue
            start, size, flags = expected[i]
            assert line == f"0x{start:016x} 0x{start + size - 1:016x} 0x{flags:016x}"
            assert start % size == 0  # naturally aligned
            if i < 6:
                bar = spec.bar(i)
                assert bar is not None and bar.size == size
                assert flags & 0xF == PciConfigSpace(spec).data[0x10 + 4 * i] & 0xF  # low bits mirror the BAR
        assert lines[7:] == [ZERO_LINE] * 6


def test_config_holds_the_host_addresses(tree, bundled):
    for (index, spec), bdf in zip(bundled, BDFS):
        entry = tree[f"{PCI}/{bdf}/config"]
        config = entry.content
        power_on = PciConfigSpace(spec).data
        assert len(config) == spec.config_size == entry.size
        for i, (start, _size, _flags) in EXPECTED_RESOURCES[index].items():
            if i < 6:
                assert bar_address(config, i) == start
                assert config[0x10 + 4 * i] & 0xF == power_on[0x10 + 4 * i] & 0xF
            else:
                rom = int.from_bytes(config[0x30:0x34], "little")
                assert rom == start  # address, enable bit clear (as firmware leaves it)
        # Everything else is the power-on config space (the interrupt line names the irq).
        changed = {o for o in range(len(config)) if config[o] != power_on[o]}
        assert changed <= set(range(0x10, 0x28)) | set(range(0x30, 0x34)) | {0x3C}
    showcase = tree[f"{PCI}/0000:00:03.0/config"].content
    assert showcase[0x3C:0x3E] == bytes([19, 1])
    assert len(showcase) == 4096


def test_vfio_dev_and_groups(tree):
    for index, bdf in enumerate(BDFS):
        assert text(tree, f"{PCI}/{bdf}/vfio-dev/vfio{index}/dev") == f"511:{index}\n"
        assert tree[f"{PCI}/{bdf}/iommu_group"].target == f"../../../../kernel/iommu_groups/{index}"
        assert tree[f"{PCI}/{bdf}/driver"].target == "../../../../bus/pci/drivers/vfio-pci"
        assert resolve(f"{PCI}/{bdf}/iommu_group", tree[f"{PCI}/{bdf}/iommu_group"].target) == \
            f"sys/kernel/iommu_groups/{index}"
        link = f"sys/kernel/iommu_groups/{index}/devices/{bdf}"
        assert resolve(link, tree[link].target) == f"{PCI}/{bdf}"
        link = f"sys/bus/pci/drivers/vfio-pci/{bdf}"
        assert resolve(link, tree[link].target) == f"{PCI}/{bdf}"
        link = f"sys/class/vfio-dev/vfio{index}"
        assert resolve(link, tree[link].target) == f"{PCI}/{bdf}/vfio-dev/vfio{index}"


def test_tree_is_well_formed(tree, bundled):
    entries = sysfs.build_tree(bundled)
    assert len(entries) == len(tree)  # no duplicate paths
    seen = set()
    for entry in entries:  # parents come first and are directories
        parent = posixpath.dirname(entry.path)
        assert parent == "" or (parent in seen and tree[parent].kind == "dir"), entry.path
        assert entry.kind in ("dir", "file", "symlink")
        seen.add(entry.path)
    assert entries[0].path == "sys"
    for entry in entries:
        if entry.kind == "symlink":  # every link is relative and resolves inside the tree
            assert not entry.target.startswith("/")
            assert resolve(entry.path, entry.target) in tree, entry.path
        elif entry.kind == "file":
            assert entry.size == (len(entry.content) if entry.path.endswith("/config") else 4096)
            assert len(entry.content) <= 4096
    assert sorted(p.rsplit("/", 1)[1] for p in tree if posixpath.dirname(p) == PCI) == BDFS


def test_no_devices_still_gives_the_skeleton():
    paths = {entry.path for entry in sysfs.build_tree([])}
    assert {"sys", "sys/bus/pci/devices", "sys/bus/pci/drivers/vfio-pci", "sys/kernel/iommu_groups"} <= paths
    assert not any(p.startswith(f"{PCI}/") for p in paths)


def test_windows_kinds_alignment_and_no_overlap():
    specs = [
        spec_with(BarSpec(0, 4 * KiB), BarSpec(1, 1 * MiB, is_64bit=True), BarSpec(3, 256, io=True),
                  BarSpec(4, 16 * MiB, is_64bit=True, prefetchable=True)),
        spec_with(BarSpec(0, 8 * KiB, prefetchable=True), BarSpec(2, 64 * KiB, is_64bit=True, prefetchable=True),
                  BarSpec(4, 4, io=True), rom=bytes(5000)),
        spec_with(BarSpec(0, 256 * MiB)),
    ]
    devices = sysfs.layout_devices(list(enumerate(specs)))
    used = []
    for dev in devices:
        for i, res in enumerate(dev.resources):
            if res == sysfs.UNUSED:
                continue
            assert res.assigned and res.start % res.size == 0
            io = bool(res.flags & sysfs.IORESOURCE_IO)
            high = res.flags & sysfs.IORESOURCE_MEM_64 and res.flags & sysfs.IORESOURCE_PREFETCH
            if io:
                assert sysfs.IO_BASE <= res.start and res.end < sysfs.IO_LIMIT
            elif high:
                assert res.start >= sysfs.MEM64_BASE
            else:  # 32-bit, 64-bit non-prefetchable, 32-bit prefetchable and ROM: below 4 GiB
                assert sysfs.MEM32_BOTTOM <= res.start and res.end < sysfs.MEM32_TOP
            used.append((io, res.start, res.end))
            if i < 6:
                assert bar_address(dev.config, i) == res.start
    used.sort()
    for (io_a, _, end_a), (io_b, start_b, _) in zip(used, used[1:]):
        assert io_a != io_b or end_a < start_b
    assert devices[1].resources[6].size == 8 * KiB  # ROM rounded up to a power of two
    assert devices[1].resources[6].flags == sysfs.ROM_FLAGS


def test_a_bar_that_does_not_fit_is_unassigned():
    specs = [spec_with(BarSpec(0, 1 * GiB)), spec_with(BarSpec(0, 1 * GiB), BarSpec(1, 64, io=True)),
             spec_with(BarSpec(0, 32 * KiB), BarSpec(1, 0x1000, io=True)),
             spec_with(BarSpec(0, 0x4000, io=True))]  # the I/O window 0xc000-0xffff has 16 KiB
    devices = sysfs.layout_devices(list(enumerate(specs)))
    assert devices[0].resources[0] == sysfs.Resource(0x8000_0000, 0xBFFF_FFFF, 0x40200)
    lost = devices[1].resources[0]
    assert (lost.start, lost.end, lost.flags) == (0, GiB - 1, 0x40200 | sysfs.IORESOURCE_UNSET)
    assert not lost.assigned and lost.size == GiB
    assert bar_address(devices[1].config, 0) == 0
    assert devices[1].resources[1] == sysfs.Resource(0xC000, 0xC03F, 0x40101)
    assert devices[2].resources[0] == sysfs.Resource(0xFEBF8000, 0xFEBFFFFF, 0x40200)
    assert devices[2].resources[1] == sysfs.Resource(0xD000, 0xDFFF, 0x40101)  # after c000-c03f, 4K-aligned
    assert devices[3].resources[0] == sysfs.Resource(0, 0x3FFF, 0x40101 | sysfs.IORESOURCE_UNSET)
    assert LINE_RE.match(lost.line())


# -- through a real mount ----------------------------------------------------------------------------


def read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_mount_files_match_the_tree(mount, tree):
    root = mount.path
    for path, entry in tree.items():
        full = root / path
        st = os.lstat(full)
        if entry.kind == "dir":
            assert stat.S_ISDIR(st.st_mode)
        elif entry.kind == "symlink":
            assert stat.S_ISLNK(st.st_mode)
            assert os.readlink(full) == entry.target
        else:
            assert (stat.S_IMODE(st.st_mode), st.st_size) == (0o444, entry.size)
            assert read(full) == entry.content
    dev = root / PCI / "0000:00:01.0"
    assert read(dev / "vendor") == b"0x1234\n"
    assert read(dev / "class") == b"0x050000\n"


def test_mount_links_resolve(mount):
    root = mount.path.resolve()
    for index, bdf in enumerate(BDFS):
        dev = root / PCI / bdf
        group = dev / "iommu_group"
        assert os.path.realpath(group) == str(root / f"sys/kernel/iommu_groups/{index}")
        assert os.listdir(group / "devices") == [bdf]
        assert os.path.realpath(group / "devices" / bdf) == str(dev)
        assert os.path.basename(os.readlink(dev / "driver")) == "vfio-pci"
        assert os.path.realpath(dev / "driver") == str(root / "sys/bus/pci/drivers/vfio-pci")
        assert os.path.realpath(root / "sys/bus/pci/drivers/vfio-pci" / bdf) == str(dev)
        vfio_dev = dev / "vfio-dev" / f"vfio{index}"
        assert os.listdir(dev / "vfio-dev") == [f"vfio{index}"]
        assert read(vfio_dev / "dev") == f"511:{index}\n".encode()
        assert os.path.realpath(root / "sys/class/vfio-dev" / f"vfio{index}") == str(vfio_dev)
        assert os.path.realpath(vfio_dev / "device") == str(dev)
        assert os.path.exists(mount.device(index))  # vfio-dev/vfioN names vfio/devices/vfioN
    assert sorted(os.listdir(root / "sys/bus/pci/drivers/vfio-pci")) == BDFS
    assert sorted(os.listdir(root / PCI)) == BDFS


def test_mount_sysfs_files_are_read_only(mount):
    config = mount.path / PCI / "0000:00:03.0" / "config"
    assert errno_of(os.open, config, os.O_RDWR) == errno.EACCES  # even for root
    assert errno_of(os.open, config, os.O_WRONLY) == errno.EACCES
    fd = os.open(config, os.O_RDONLY)
    try:
        assert errno_of(os.write, fd, b"x") == errno.EBADF
        assert os.pread(fd, 4, 0x10) == bytes.fromhex("00f0befe")  # BAR0 = 0xfebef000
        assert len(os.pread(fd, 8192, 0)) == 4096
    finally:
        os.close(fd)
    assert errno_of(os.unlink, config) == errno.EPERM
    assert errno_of(os.chmod, config, 0o666) == errno.EPERM
    assert errno_of(os.mkdir, mount.path / PCI / "0000:00:09.0") == errno.EPERM


# -- real lspci ----------------------------------------------------------------------------------------

needs_lspci = pytest.mark.skipif(shutil.which("lspci") is None, reason="pciutils (lspci) is not installed")


def lspci(mount_path: Path, *args: str, user: int | None = None) -> str:
    result = subprocess.run(
        ["lspci", "-A", "linux-sysfs", "-O", f"sysfs.path={mount_path}/sys/bus/pci", *args],
        capture_output=True, text=True, timeout=60, user=user, group=user, extra_groups=[] if user else None,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}, cwd="/",
    )
    assert result.returncode == 0, result.stderr
    # Debian's lspci may complain that it has no kernel module index (no /lib/modules here).
    assert all("libkmod" in line for line in result.stderr.splitlines()), result.stderr
    return result.stdout


def blocks(output: str) -> dict[str, list[str]]:
    """lspci -v output split per device: slot -> lines."""
    out = {}
    for block in output.strip("\n").split("\n\n"):
        lines = block.splitlines()
        out[lines[0].split(" ", 1)[0]] = lines
    return out


RAM0 = [
    "00:01.0 RAM memory [0500]: Device [1234:5241] (rev 01)",
    "\tSubsystem: Red Hat, Inc. Device [1af4:1100]",
    "\tIOMMU group: 0",
    "\tRegion 0: Memory at febf0000 (32-bit, non-prefetchable) [size=64K]",
    "\tCapabilities: [40] Power Management version 3",
    "\tKernel driver in use: vfio-pci",
]
RAM1 = [
    "00:02.0 RAM memory [0500]: Device [1234:5242] (rev 01)",
    "\tSubsystem: Red Hat, Inc. Device [1af4:1100]",
    "\tIOMMU group: 1",
    "\tRegion 0: Memory at 800000000 (64-bit, prefetchable) [size=1M]",
    "\tCapabilities: [40] Power Management version 3",
    "\tKernel driver in use: vfio-pci",
]
SHOWCASE = [
    "00:03.0 Unassigned class [ff00]: Device [1234:5653] (rev 02)",
    "\tSubsystem: Red Hat, Inc. Device [1af4:1100]",
    "\tControl: I/O+ Mem+ BusMaster- SpecCycle- MemWINV- VGASnoop- ParErr- Stepping- SERR- FastB2B- DisINTx-",
    "\tInterrupt: pin A routed to IRQ 19",
    "\tIOMMU group: 2",
    "\tRegion 0: Memory at febef000 (32-bit, non-prefetchable) [size=4K]",
    "\tRegion 1: Memory at febd0000 (32-bit, non-prefetchable) [size=64K]",
    "\tRegion 2: Memory at 800100000 (64-bit, prefetchable) [size=1M]",
    "\tRegion 4: I/O ports at c000 [size=32]",
    "\tExpansion ROM at febee800 [disabled] [size=2K]",
    "\tCapabilities: [40] Power Management version 3",
    "\tCapabilities: [48] MSI: Enable- Count=1/4 Maskable+ 64bit+",
    "\tCapabilities: [60] MSI-X: Enable- Count=8 Masked-",
    "\t\tVector table: BAR=1 offset=00000800",
    "\t\tPBA: BAR=1 offset=00000c00",
    "\tCapabilities: [6c] Express (v2) Endpoint, MSI 00",
    "\t\tDevCap:\tMaxPayload 128 bytes, PhantFunc 0, Latency L0s <64ns, L1 <1us",
    "\t\t\tExtTag- AttnBtn- AttnInd- PwrInd- RBE- FLReset+ SlotPowerLimit 0W",
    "\t\tLnkSta:\tSpeed 2.5GT/s, Width x1",
    "\tKernel driver in use: vfio-pci",
]


def assert_in_order(lines: list[str], expected: list[str]) -> None:
    positions = []
    for line in expected:
        assert line in lines, f"missing {line!r} in:\n" + "\n".join(lines)
        positions.append(lines.index(line))
    assert positions == sorted(positions), "\n".join(lines)


@needs_lspci
def test_lspci_decodes_every_device(mount):
    output = lspci(mount.path, "-vvv", "-nn")
    devices = blocks(output)
    assert list(devices) == ["00:01.0", "00:02.0", "00:03.0", "00:04.0", "00:05.0", "00:06.0"]
    for slot, expected in zip(devices, (RAM0, RAM1, SHOWCASE)):
        assert devices[slot][0] == expected[0]
        assert_in_order(devices[slot], expected)
        assert not any("virtual" in line or "<unassigned>" in line or "<ignored>" in line for line in devices[slot])
    # Only the showcase has an interrupt pin and I/O decoding; only the implemented BARs show.
    assert not any("Interrupt:" in line for line in devices["00:01.0"] + devices["00:02.0"])
    assert [line.split(":")[0] for line in devices["00:03.0"] if line.startswith("\tRegion")] == [
        "\tRegion 0", "\tRegion 1", "\tRegion 2", "\tRegion 4"]


@needs_lspci
def test_lspci_selects_one_device(mount):
    assert lspci(mount.path, "-n", "-s", "00:03.0") == "00:03.0 ff00: 1234:5653 (rev 02)\n"
    assert lspci(mount.path, "-n", "-s", "0000:00:01.0") == "00:01.0 0500: 1234:5241 (rev 01)\n"
    assert lspci(mount.path, "-n", "-d", "1234:5242") == "00:02.0 0500: 1234:5242 (rev 01)\n"
    assert lspci(mount.path, "-n", "-s", "00:1f.0") == ""


@needs_lspci
def test_lspci_dumps_config_space(mount, tree):
    """-xxxx prints the whole 4 KiB of the PCIe function: every byte comes from ``config``."""
    dump = lspci(mount.path, "-xxxx", "-s", "00:03.0").splitlines()[1:]
    data = bytearray()
    for line in dump:
        if line:
            data += bytes.fromhex(line.split(":", 1)[1])
    assert bytes(data) == tree[f"{PCI}/0000:00:03.0/config"].content


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")
def test_other_users_can_read_sysfs_with_allow_other(public_dir, tree):
    mnt = public_dir / "mnt"
    mnt.mkdir()
    with mounted(mnt, options=("allow_other",)) as m:
        config = str(m.path / PCI / "0000:00:03.0" / "config")
        script = 'cat "$1" | od -An -v -tx1 | tr -d " \\n"; if ( exec 3>>"$1" ) 2>/dev/null; then echo " writable"; fi'
        result = as_nobody(script, config)
        assert result.stdout == tree[f"{PCI}/0000:00:03.0/config"].content.hex()
        assert result.stderr == ""
        if shutil.which("lspci"):
            seen = blocks(lspci(m.path, "-vvv", "-nn", user=65534))
            assert_in_order(seen["00:03.0"], SHOWCASE)
        # The device nodes themselves stay 0600.
        assert stat.S_IMODE(os.stat(m.device(0)).st_mode) == 0o600
