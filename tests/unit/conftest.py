"""Everything under tests/unit runs without FUSE: `pytest tests/unit` or `pytest -m unit`."""

import pytest

from vfiofs.fs.operations import VfioOperations
from vfiofs.host.daemon import build_server
from vfiofs.host.definitions import bundled_directory, load_directory


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/tests/unit/" in str(item.path):
            item.add_marker(pytest.mark.unit)


@pytest.fixture
def ops() -> VfioOperations:
    """The FUSE adapter over the bundled devices, called directly (no mount), for uid/gid 1000."""
    return VfioOperations(build_server(load_directory(bundled_directory())), 1000, 1000)
