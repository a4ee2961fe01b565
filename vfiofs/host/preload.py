"""Where the interposition library (preload/*.c, built by the install step) is."""

from __future__ import annotations

from pathlib import Path

LIBRARY = Path(__file__).resolve().parent / "libvfiofs_preload.so"


class PreloadMissing(Exception):
    """The library was not built; ``str()`` is one line saying how to build it."""


def library_path() -> Path:
    if not LIBRARY.is_file():
        raise PreloadMissing(f"the interposition library {LIBRARY} is missing: build it with "
                             "'pip install -e .' (./quickstart.sh does) and a C compiler")
    return LIBRARY
