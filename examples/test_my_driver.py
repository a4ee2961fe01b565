"""Testing a userspace VFIO driver with the vfiofs pytest plugin.

A driver project needs no hardware, no root and no conftest.py. It installs vfiofs:

    pip install vfiofs

and its tests ask for the ``vfiofs`` fixture. Each test gets a fresh, private mount with
the bundled devices (vfio4 is QEMU's edu device), taken down after the test whatever
happens. ``vfiofs.bind(i)`` opens device ``i`` and binds it to the fixture's iommufd, as a
driver does with /dev/vfio/devices/vfioN and /dev/iommu. The marker
``@pytest.mark.vfiofs_devices(...)`` serves other devices: definition files, directories,
bundled names such as "vedu.toml", or inline TOML. Tests are independent, so
``pytest -n auto`` (pytest-xdist) runs them in parallel.

In a real project the helpers below would be your driver's code, and the tests would
call it with the paths the fixture gives (``vfiofs.iommu``, ``vfiofs.device(i)``).
"""

import pytest

from vfiofs.client import VFIO_PCI_BAR0_REGION_INDEX as BAR0

EDU = 4  # with the bundled devices, vfio4 is the edu device
EDU_ID = 0x010000ED  # edu's identification register: version 1.0, "ED"
ID, LIVENESS = 0x00, 0x04


def read32(dev, offset):
    return int.from_bytes(dev.read(BAR0, offset, 4), "little")


def write32(dev, offset, value):
    dev.write(BAR0, offset, value.to_bytes(4, "little"))


def test_identification(vfiofs):
    dev = vfiofs.bind(EDU)
    assert read32(dev, ID) == EDU_ID


def test_liveness(vfiofs):
    dev = vfiofs.bind(EDU)
    for value in (0, 0x12345678, 0xFFFFFFFF):
        write32(dev, LIVENESS, value)
        assert read32(dev, LIVENESS) == ~value & 0xFFFFFFFF


@pytest.mark.vfiofs_devices("vedu.toml")  # only the edu device, so it is vfio0
def test_edu_alone(vfiofs):
    assert vfiofs.devices == [vfiofs.device(0)]
    assert read32(vfiofs.bind(0), ID) == EDU_ID


@pytest.mark.vfiofs_devices({"scratch": """
    model = "ram"
    [pci]
    vendor = 0x1234
    device = 0xbeef
    [ram]
    size = "64KiB"
"""})
def test_custom_ram_device(vfiofs):
    dev = vfiofs.bind(0)
    assert dev.get_region_info(BAR0).size == 64 * 1024
    ram = dev.mmap(BAR0)
    ram[0:5] = b"hello"                          # through the mapping
    assert dev.read(BAR0, 0, 5) == b"hello"      # the device sees it
    ram.close()
    device_id = vfiofs.sys / "bus" / "pci" / "devices" / "0000:00:01.0" / "device"
    assert device_id.read_text().strip() == "0xbeef"
