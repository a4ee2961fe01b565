"""Fixtures: a fresh real vfiofs mount per test, unmounted even when the test fails."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from support import Mount, is_mounted, start_mount, stop_mount

MODELS = Path(__file__).resolve().parent / "models"


def _serve(mountpoint: Path, **kwargs) -> Iterator[Mount]:
    """Mount, yield, and check on the way out that the daemon lived and SIGTERM unmounted it."""
    mountpoint.mkdir()
    m = start_mount(mountpoint, **kwargs)
    try:
        yield m
    finally:
        alive = m.alive()
        returncode = stop_mount(m)
        assert alive, "the daemon died during the test"
        assert returncode == 0, f"daemon exited with {returncode}"
        assert not is_mounted(mountpoint), "SIGTERM left the mount behind"


@pytest.fixture
def mount(tmp_path: Path):
    """The bundled devices in a temporary directory (vfio0-1 RAM, vfio2 showcase, vfio3 UART, vfio4 edu, vfio5 I/OAT)."""
    yield from _serve(tmp_path / "mnt")


@pytest.fixture
def models_mount(tmp_path: Path):
    """tests/models mounted (the interrupt/DMA test device as vfio0), its Python models importable."""
    yield from _serve(tmp_path / "modelsmnt", devices=MODELS, pythonpath=MODELS)


@pytest.fixture
def legacy(tmp_path: Path):
    """Three devices for the legacy path: two 64 KiB RAM devices sharing IOMMU group 7
    (0000:00:01.0 and 0000:00:02.0) and the interrupt/DMA test device in a group of its own."""
    defs = tmp_path / "defs"
    defs.mkdir()
    ram = 'model = "ram"\niommu_group = 7\n[ram]\nsize = "64KiB"\n'
    (defs / "a.toml").write_text(ram)
    (defs / "b.toml").write_text(ram)
    shutil.copy(MODELS / "irq_test_device.toml", defs / "c.toml")
    yield from _serve(tmp_path / "mnt", devices=defs, pythonpath=MODELS)


@pytest.fixture
def public_dir():
    """A directory every user can traverse (pytest's tmp_path is private to root)."""
    path = tempfile.mkdtemp(prefix="vfiofs-public-")
    os.chmod(path, 0o755)
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)
