"""Device definitions: TOML files in a devices directory, checked before anything mounts.

One file defines one device; files are taken in name order and become vfio0, vfio1, …
A definition that is wrong is refused with the file, the field and the reason, e.g.
``devices/ram.toml: ram.size: must be a power of two from 4096 to 1073741824, got 1000``.

Format (all numbers may be written in hex):

    model = "ram"             # which built-in model implements the device
    name = "scratch"          # optional; defaults to the file name without .toml

    [pci]                     # optional; each model has defaults
    vendor = 0x1234
    device = 0x5241
    subsystem_vendor = 0x1af4
    subsystem_device = 0x1100
    class = 0x050000          # base class, subclass, prog-if
    revision = 0x01

    [ram]                     # the model's own section
    size = "64KiB"            # BAR0 size: a power of two from 4 KiB to 1 GiB
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .model import DeviceModel, PciIdentity
from .models.ram import RamModel

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class DefinitionError(Exception):
    """A definition that cannot be served; ``str()`` is one line: file: field: reason."""

    def __init__(self, path: Path | str, field: str, reason: str) -> None:
        self.path, self.field, self.reason = str(path), field, reason
        super().__init__(f"{path}: {field}: {reason}" if field else f"{path}: {reason}")


@dataclass
class Definition:
    path: Path
    name: str
    model: str
    identity: PciIdentity
    build: Callable[[], DeviceModel]


_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB)?\s*$")
_UNITS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


class _Reader:
    """Field access for one file that turns every problem into a DefinitionError."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, field: str, reason: str) -> DefinitionError:
        return DefinitionError(self.path, field, reason)

    def table(self, data: dict[str, Any], key: str, allowed: set[str]) -> dict[str, Any]:
        value = data.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(key, "must be a table")
        for extra in sorted(set(value) - allowed):
            raise self.fail(f"{key}.{extra}", f"unknown field (known: {', '.join(sorted(allowed))})")
        return value

    def integer(self, data: dict[str, Any], key: str, field: str, bits: int, default: int) -> int:
        value = data.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(field, f"must be an integer, got {value!r}")
        if not 0 <= value < (1 << bits):
            raise self.fail(field, f"must fit in {bits} bits, got {value:#x}")
        return value

    def size(self, data: dict[str, Any], key: str, field: str, lo: int, hi: int, default: int) -> int:
        value = data.get(key, default)
        if isinstance(value, str):
            match = _SIZE.match(value)
            if not match:
                raise self.fail(field, f"must be a byte count such as 4096 or \"64KiB\", got {value!r}")
            value = int(match.group(1)) * _UNITS[match.group(2)]
        elif not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(field, f"must be a byte count, got {value!r}")
        if value & (value - 1) or not lo <= value <= hi:
            raise self.fail(field, f"must be a power of two from {lo} to {hi}, got {value}")
        return value


def _ram(reader: _Reader, data: dict[str, Any], identity: PciIdentity) -> Callable[[], DeviceModel]:
    section = reader.table(data, "ram", {"size"})
    size = reader.size(section, "size", "ram.size", 4096, 1 << 30, 64 * 1024)
    return lambda: RamModel(identity, size)


# model name → (default identity, parser of the model's own section)
MODELS: dict[str, tuple[PciIdentity, Callable[[_Reader, dict[str, Any], PciIdentity], Callable[[], DeviceModel]]]] = {
    # 1234 is QEMU's vendor id for its own test devices; class 05/00 is "RAM memory".
    "ram": (PciIdentity(vendor=0x1234, device=0x5241, class_code=0x050000, revision=1), _ram),
}

_TOP = {"model", "name", "pci", "ram"}
_PCI = {"vendor", "device", "subsystem_vendor", "subsystem_device", "class", "revision"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def load_definition(path: Path) -> Definition:
    reader = _Reader(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise reader.fail("", f"cannot read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise reader.fail("", f"not valid TOML: {exc}") from None
    for extra in sorted(set(data) - _TOP):
        raise reader.fail(extra, f"unknown field (known: {', '.join(sorted(_TOP))})")
    model = data.get("model")
    if model not in MODELS:
        raise reader.fail("model", f"must be one of {', '.join(sorted(MODELS))}, got {model!r}")
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not _NAME.match(name):
        raise reader.fail("name", f"must be 1-64 letters, digits, '.', '_' or '-', got {name!r}")
    default, parse = MODELS[model]
    pci = reader.table(data, "pci", _PCI)
    identity = PciIdentity(
        vendor=reader.integer(pci, "vendor", "pci.vendor", 16, default.vendor),
        device=reader.integer(pci, "device", "pci.device", 16, default.device),
        subsystem_vendor=reader.integer(pci, "subsystem_vendor", "pci.subsystem_vendor", 16, default.subsystem_vendor),
        subsystem_device=reader.integer(pci, "subsystem_device", "pci.subsystem_device", 16, default.subsystem_device),
        class_code=reader.integer(pci, "class", "pci.class", 24, default.class_code),
        revision=reader.integer(pci, "revision", "pci.revision", 8, default.revision),
        interrupt_pin=default.interrupt_pin,
    )
    return Definition(path, name, model, identity, parse(reader, data, identity))


def load_directory(directory: Path) -> list[Definition]:
    """All definitions in ``directory``, in file-name order; names must be unique."""
    if not directory.is_dir():
        raise DefinitionError(directory, "", "is not a directory of device definitions")
    files = sorted(directory.glob("*.toml"))
    if not files:
        raise DefinitionError(directory, "", "holds no device definitions (*.toml)")
    definitions = [load_definition(path) for path in files]
    seen: dict[str, Path] = {}
    for definition in definitions:
        if definition.name in seen:
            raise DefinitionError(definition.path, "name", f"{definition.name!r} is already used by {seen[definition.name]}")
        seen[definition.name] = definition.path
    return definitions


def bundled_directory() -> Path:
    """The devices/ folder shipped with vfiofs (installed as the vfiofs.devices package)."""
    try:
        from . import devices  # type: ignore[attr-defined]
    except ImportError:  # running from a source tree that was not installed
        return Path(__file__).resolve().parent.parent / "devices"
    return Path(devices.__file__).parent
