"""Fixtures: a fresh real vfiofs mount per test, unmounted even when the test fails."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from support import Mount, is_mounted, start_mount, stop_mount


@pytest.fixture
def mount(tmp_path: Path):
    """The bundled devices mounted in a temporary directory (vfio0: 64 KiB RAM, vfio1: 1 MiB RAM)."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    m: Mount = start_mount(mountpoint)
    try:
        yield m
    finally:
        alive = m.alive()
        returncode = stop_mount(m)
        assert alive, "the daemon died during the test"
        assert returncode == 0, f"daemon exited with {returncode}"
        assert not is_mounted(mountpoint), "SIGTERM left the mount behind"


@pytest.fixture
def public_dir():
    """A directory every user can traverse (pytest's tmp_path is private to root)."""
    path = tempfile.mkdtemp(prefix="vfiofs-public-")
    os.chmod(path, 0o755)
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


MODELS = Path(__file__).resolve().parent / "models"


@pytest.fixture
def models_mount(tmp_path: Path):
    """tests/models mounted (the interrupt/DMA test device as vfio0), its Python models importable."""
    mountpoint = tmp_path / "modelsmnt"
    mountpoint.mkdir()
    m: Mount = start_mount(mountpoint, devices=MODELS, pythonpath=MODELS)
    try:
        yield m
    finally:
        alive = m.alive()
        returncode = stop_mount(m)
        assert alive, "the daemon died during the test"
        assert returncode == 0, f"daemon exited with {returncode}"
