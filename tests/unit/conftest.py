"""Everything under tests/unit runs without FUSE: `pytest tests/unit` or `pytest -m unit`."""

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/tests/unit/" in str(item.path):
            item.add_marker(pytest.mark.unit)
