"""Device definitions: TOML files in a devices directory, checked before anything mounts.

Host layer: it reads the definition files, their ROM images and the Python modules of the
models they name, once, at startup; what it produces (:class:`Definition`, a
:class:`~vfiofs.models.spec.DeviceSpec` and a model factory) is pure data for the layers below.

One file defines one device; files are taken in name order and become vfio0, vfio1, …
A definition that is wrong is refused with the file, the field and the reason, e.g.
``devices/ram.toml: bar[0].size: must be a power of two from 4096 to 1073741824, got 1000``.
The complete format, with an example using every feature, is in docs/definitions.md.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from vfiofs.models.api import DeviceModel, ModelContext
from vfiofs.models.registry import BUILTIN_MODELS
from vfiofs.pci.config import layout_capabilities
from vfiofs.abi import PAGE_SIZE
from vfiofs.models.spec import ACCESS_KINDS, CAPABILITY_KINDS, BarSpec, Capability, DeviceSpec, PciIdentity, Register

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
    spec: DeviceSpec
    factory: Callable[..., DeviceModel]

    def build(self, context: ModelContext | None = None) -> DeviceModel:
        """A fresh model instance on ``context`` (None: standalone, with in-memory BARs).

        The daemon passes a context with its BAR memory (memfds, state files of persistent
        BARs: :func:`vfiofs.host.memory.bar_memory`).
        """
        return self.factory(self.spec, context)

    @property
    def identity(self) -> PciIdentity:
        return self.spec.identity


_SIZE = re.compile(r"\s*(\d+)\s*(B|KiB|MiB|GiB)?\s*")
_UNITS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MODEL_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")

_TOP = {"model", "name", "pci", "ram", "bar", "rom", "capability", "iommu_group"}
_PCI = {"vendor", "device", "subsystem_vendor", "subsystem_device", "class", "revision", "interrupt_pin"}
_BAR = {"index", "size", "kind", "bits", "prefetchable", "mmap", "mmap_areas", "persist", "register"}
_REGISTER = {"offset", "width", "reset", "access", "name"}
_CAP = {"type", "offset", "vectors", "address64", "maskable", "table_bar", "table_offset", "pba_bar", "pba_offset"}

# The built-in identity of devices that do not say otherwise: 1234 is QEMU's vendor id
# for its own test devices; class 05/00 is "RAM memory".
DEFAULT_IDENTITY = PciIdentity(vendor=0x1234, device=0x5241, class_code=0x050000, revision=1)


class _Reader:
    """Field access for one file that turns every problem into a DefinitionError."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, field: str, reason: str) -> DefinitionError:
        return DefinitionError(self.path, field, reason)

    def table(self, data: dict[str, Any], key: str, allowed: set[str], field: str | None = None) -> dict[str, Any]:
        field = field or key
        value = data.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(field, "must be a table")
        self.known(value, allowed, field)
        return value

    def known(self, value: dict[str, Any], allowed: set[str], prefix: str) -> None:
        for extra in sorted(set(value) - allowed):
            raise self.fail(f"{prefix}.{extra}" if prefix else extra,
                            f"unknown field (known: {', '.join(sorted(allowed))})")

    def tables(self, data: dict[str, Any], key: str, field: str | None = None,
               header: str | None = None) -> list[dict[str, Any]]:
        value = data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            raise self.fail(field or key, f"must be an array of tables ([[{header or key}]])")
        return value

    def integer(self, data: dict[str, Any], key: str, field: str, bits: int, default: int | None = None) -> int:
        if key not in data and default is None:
            raise self.fail(field, "is required")
        value = data.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(field, f"must be an integer, got {value!r}")
        if not 0 <= value < (1 << bits):
            raise self.fail(field, f"must fit in {bits} bits, got {value:#x}")
        return value

    def boolean(self, data: dict[str, Any], key: str, field: str, default: bool = False) -> bool:
        value = data.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(field, f"must be true or false, got {value!r}")
        return value

    def choice(self, data: dict[str, Any], key: str, field: str, choices: tuple, default: Any = None) -> Any:
        if key not in data and default is None:
            raise self.fail(field, "is required")
        value = data.get(key, default)
        if not any(type(value) is type(choice) and value == choice for choice in choices):
            raise self.fail(field, f"must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value

    def byte_count(self, data: dict[str, Any], key: str, field: str, default: int | None = None) -> int:
        """A byte count written as an integer or as a string such as "64KiB"."""
        if key not in data and default is None:
            raise self.fail(field, "is required")
        value = data.get(key, default)
        if isinstance(value, str):
            match = _SIZE.fullmatch(value)
            if not match:
                raise self.fail(field, f"must be a byte count such as 4096 or \"64KiB\", got {value!r}")
            return int(match.group(1)) * _UNITS[match.group(2)]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise self.fail(field, f"must be a byte count, got {value!r}")
        return value

    def size(self, data: dict[str, Any], key: str, field: str, lo: int, hi: int, default: int | None = None) -> int:
        """A power-of-two byte count from ``lo`` to ``hi``."""
        value = self.byte_count(data, key, field, default)
        if value & (value - 1) or not lo <= value <= hi:
            raise self.fail(field, f"must be a power of two from {lo} to {hi}, got {value}")
        return value


def _identity(reader: _Reader, data: dict[str, Any]) -> PciIdentity:
    pci = reader.table(data, "pci", _PCI)
    d = DEFAULT_IDENTITY
    pin = reader.integer(pci, "interrupt_pin", "pci.interrupt_pin", 8, d.interrupt_pin)
    if pin > 4:
        raise reader.fail("pci.interrupt_pin", f"must be 0 (none) or 1-4 (INTA-INTD), got {pin}")
    return PciIdentity(
        vendor=reader.integer(pci, "vendor", "pci.vendor", 16, d.vendor),
        device=reader.integer(pci, "device", "pci.device", 16, d.device),
        subsystem_vendor=reader.integer(pci, "subsystem_vendor", "pci.subsystem_vendor", 16, d.subsystem_vendor),
        subsystem_device=reader.integer(pci, "subsystem_device", "pci.subsystem_device", 16, d.subsystem_device),
        class_code=reader.integer(pci, "class", "pci.class", 24, d.class_code),
        revision=reader.integer(pci, "revision", "pci.revision", 8, d.revision),
        interrupt_pin=pin,
    )


def _areas(reader: _Reader, value: Any, field: str, size: int) -> tuple[tuple[int, int], ...]:
    if not isinstance(value, list):
        raise reader.fail(field, "must be a list of {offset, size} tables")
    areas = []
    for i, item in enumerate(value):
        f = f"{field}[{i}]"
        if not isinstance(item, dict):
            raise reader.fail(f, "must be a table {offset = ..., size = ...}")
        reader.known(item, {"offset", "size"}, f)
        offset = reader.integer(item, "offset", f"{f}.offset", 64)
        length = reader.byte_count(item, "size", f"{f}.size")
        if offset % PAGE_SIZE or length % PAGE_SIZE or length == 0 or offset + length > size:
            raise reader.fail(f, f"must be page-aligned ({PAGE_SIZE}), non-empty and inside the BAR")
        areas.append((offset, length))
    areas.sort()
    for (a_off, a_len), (b_off, _) in zip(areas, areas[1:]):
        if a_off + a_len > b_off:
            raise reader.fail(field, "areas overlap")
    return tuple(areas)


def _registers(reader: _Reader, bar: dict[str, Any], field: str, size: int) -> tuple[Register, ...]:
    registers = []
    for i, raw in enumerate(reader.tables(bar, "register", f"{field}.register", "bar.register")):
        f = f"{field}.register[{i}]"
        reader.known(raw, _REGISTER, f)
        width = reader.choice(raw, "width", f"{f}.width", (1, 2, 4, 8), 4)
        offset = reader.integer(raw, "offset", f"{f}.offset", 64)
        if offset % width or offset + width > size:
            raise reader.fail(f"{f}.offset", f"must be aligned to the width ({width}) and inside the BAR")
        name = raw.get("name", "")
        if not isinstance(name, str):
            raise reader.fail(f"{f}.name", "must be a string")
        registers.append(Register(
            offset=offset, width=width,
            reset=reader.integer(raw, "reset", f"{f}.reset", 8 * width, 0),
            access=reader.choice(raw, "access", f"{f}.access", ACCESS_KINDS, "rw"),
            name=name,
        ))
    registers.sort(key=lambda r: r.offset)
    for a, b in zip(registers, registers[1:]):
        if a.offset + a.width > b.offset:
            raise reader.fail(f"{field}.register", f"registers at {a.offset:#x} and {b.offset:#x} overlap")
    return tuple(registers)


def _bars(reader: _Reader, data: dict[str, Any]) -> tuple[BarSpec, ...]:
    bars: dict[int, BarSpec] = {}
    taken: set[int] = set()
    for i, raw in enumerate(reader.tables(data, "bar")):
        f = f"bar[{i}]"
        reader.known(raw, _BAR, f)
        index = reader.integer(raw, "index", f"{f}.index", 8)
        if index > 5:
            raise reader.fail(f"{f}.index", f"must be 0-5, got {index}")
        io = reader.choice(raw, "kind", f"{f}.kind", ("memory", "io"), "memory") == "io"
        bits = reader.choice(raw, "bits", f"{f}.bits", (32, 64), 32)
        prefetchable = reader.boolean(raw, "prefetchable", f"{f}.prefetchable")
        mmap = reader.boolean(raw, "mmap", f"{f}.mmap")
        if io and (bits == 64 or prefetchable or mmap):
            raise reader.fail(f"{f}.kind", "an I/O BAR is 32-bit, not prefetchable and never mappable")
        lo, hi = (4, 256) if io else ((PAGE_SIZE if mmap else 16), 1 << 30)
        size = reader.size(raw, "size", f"{f}.size", lo, hi)
        slots = {index, index + 1} if bits == 64 else {index}
        if bits == 64 and index == 5:
            raise reader.fail(f"{f}.index", "a 64-bit BAR takes two slots: index must be 0-4")
        if slots & taken:
            raise reader.fail(f"{f}.index", f"BAR slot {min(slots & taken)} is already used")
        taken |= slots
        areas = _areas(reader, raw["mmap_areas"], f"{f}.mmap_areas", size) if "mmap_areas" in raw else ()
        if areas and not mmap:
            raise reader.fail(f"{f}.mmap_areas", "needs mmap = true")
        registers = _registers(reader, raw, f, size)
        for register in registers:
            for a_off, a_len in BarSpec(index, size, mmap=mmap, mmap_areas=areas).mappable_areas:
                if a_off < register.offset + register.width and register.offset < a_off + a_len:
                    raise reader.fail(f"{f}.register", f"register at {register.offset:#x} lies in a mappable "
                                      "area: list the RAM parts in mmap_areas")
        bars[index] = BarSpec(index=index, size=size, io=io, is_64bit=bits == 64, prefetchable=prefetchable,
                              mmap=mmap, mmap_areas=areas, registers=registers,
                              persist=reader.boolean(raw, "persist", f"{f}.persist"))
    return tuple(bars[i] for i in sorted(bars))


def _rom(reader: _Reader, data: dict[str, Any]) -> bytes | None:
    if "rom" not in data:
        return None
    rom = reader.table(data, "rom", {"file"})
    name = rom.get("file")
    if not isinstance(name, str) or not name:
        raise reader.fail("rom.file", "must name the ROM image file (relative to the definition)")
    path = (reader.path.parent / name)
    try:
        image = path.read_bytes()
    except OSError as exc:
        raise reader.fail("rom.file", f"cannot read {path}: {exc.strerror}") from None
    if not 0 < len(image) <= 16 << 20:
        raise reader.fail("rom.file", f"image must be 1 byte to 16 MiB, got {len(image)} bytes")
    return image


def _capabilities(reader: _Reader, data: dict[str, Any], bars: tuple[BarSpec, ...]) -> tuple[Capability, ...]:
    caps: list[Capability] = []
    by_index = {bar.index: bar for bar in bars}
    for i, raw in enumerate(reader.tables(data, "capability")):
        f = f"capability[{i}]"
        reader.known(raw, _CAP, f)
        kind = reader.choice(raw, "type", f"{f}.type", CAPABILITY_KINDS)
        if any(cap.kind == kind for cap in caps):
            raise reader.fail(f"{f}.type", f"{kind} is listed twice")
        offset = reader.integer(raw, "offset", f"{f}.offset", 8) if "offset" in raw else None
        if offset is not None and (offset < 0x40 or offset % 4):
            raise reader.fail(f"{f}.offset", f"must be 4-byte aligned and at least 0x40, got {offset:#x}")
        cap = Capability(kind=kind, offset=offset)
        if kind == "msi":
            vectors = reader.choice(raw, "vectors", f"{f}.vectors", (1, 2, 4, 8, 16, 32), 1)
            cap = Capability(kind, offset, vectors=vectors,
                             address64=reader.boolean(raw, "address64", f"{f}.address64", True),
                             maskable=reader.boolean(raw, "maskable", f"{f}.maskable"))
        elif kind == "msix":
            vectors = reader.integer(raw, "vectors", f"{f}.vectors", 12, 1)
            if not 1 <= vectors <= 2048:
                raise reader.fail(f"{f}.vectors", f"must be 1-2048, got {vectors}")
            placed: dict[str, tuple[int, int]] = {}
            for what, length in (("table", 16 * vectors), ("pba", 8 * ((vectors + 63) // 64))):
                bar_index = reader.integer(raw, f"{what}_bar", f"{f}.{what}_bar", 8, placed.get("table", (0, 0))[0])
                default = 0
                if what == "pba" and bar_index == placed["table"][0]:
                    default = placed["table"][1] + 16 * vectors  # right after the table
                where = reader.integer(raw, f"{what}_offset", f"{f}.{what}_offset", 32, default)
                bar = by_index.get(bar_index)
                if bar is None or bar.io:
                    raise reader.fail(f"{f}.{what}_bar", f"BAR {bar_index} is not an implemented memory BAR")
                if where % 8 or where + length > bar.size:
                    raise reader.fail(f"{f}.{what}_offset", f"must be 8-byte aligned and leave {length} bytes "
                                      f"inside BAR {bar_index}")
                placed[what] = (bar_index, where)
            (t_bar, t_off), (p_bar, p_off) = placed["table"], placed["pba"]
            if t_bar == p_bar and t_off < p_off + 8 * ((vectors + 63) // 64) and p_off < t_off + 16 * vectors:
                raise reader.fail(f"{f}.pba_offset", "the PBA overlaps the MSI-X table")
            cap = Capability(kind, offset, vectors=vectors, table_bar=placed["table"][0],
                             table_offset=placed["table"][1], pba_bar=placed["pba"][0], pba_offset=placed["pba"][1])
        caps.append(cap)
    return tuple(caps)


def _model(reader: _Reader, model: Any) -> Callable[..., DeviceModel]:
    if isinstance(model, str) and model in BUILTIN_MODELS:
        return BUILTIN_MODELS[model]
    if isinstance(model, str) and _MODEL_PATH.fullmatch(model):
        module_name, class_name = model.split(":")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except Exception as exc:  # any import failure is the definition's problem
            raise reader.fail("model", f"cannot load {model}: {exc}") from None
        if not (isinstance(cls, type) and issubclass(cls, DeviceModel)):
            raise reader.fail("model", f"{model} is not a vfiofs.models.api.DeviceModel subclass")
        return cls
    raise reader.fail("model", f"must be one of {', '.join(sorted(BUILTIN_MODELS))} or \"package.module:Class\", "
                      f"got {model!r}")


def _ram_shorthand(reader: _Reader, data: dict[str, Any]) -> tuple[BarSpec, ...]:
    """``model = "ram"`` with ``[ram] size``: one mappable memory BAR0."""
    if "bar" in data:
        raise reader.fail("bar", "model = \"ram\" defines its BAR with [ram]; use [[bar]] without it")
    section = reader.table(data, "ram", {"size"})
    size = reader.size(section, "size", "ram.size", PAGE_SIZE, 1 << 30, 64 * 1024)
    return (BarSpec(index=0, size=size, mmap=True),)


def load_definition(path: Path) -> Definition:
    reader = _Reader(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise reader.fail("", f"cannot read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise reader.fail("", f"not valid TOML: {exc}") from None
    reader.known(data, _TOP, "")
    model = data.get("model", "generic")
    factory = _model(reader, model)
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise reader.fail("name", f"must be 1-64 letters, digits, '.', '_' or '-', got {name!r}")
    if "ram" in data and model != "ram":
        raise reader.fail("ram", "only goes with model = \"ram\"")
    bars = _ram_shorthand(reader, data) if model == "ram" else _bars(reader, data)
    group = reader.integer(data, "iommu_group", "iommu_group", 16) if "iommu_group" in data else None
    spec = DeviceSpec(name=name, model=str(model), identity=_identity(reader, data), bars=bars,
                      rom=_rom(reader, data), capabilities=_capabilities(reader, data, bars), source=path,
                      iommu_group=group)
    try:
        layout_capabilities(spec)
    except ValueError as exc:
        raise reader.fail("capability", str(exc)) from None
    return Definition(path, name, str(model), spec, factory)


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
    assign_groups(definitions)
    return definitions


def assign_groups(definitions: list[Definition]) -> None:
    """Devices that name no IOMMU group get one of their own: their index if it is free."""
    taken = {d.spec.iommu_group for d in definitions if d.spec.iommu_group is not None}
    candidate = 0
    for index, definition in enumerate(definitions):
        if definition.spec.iommu_group is not None:
            continue
        group = index if index not in taken else None
        while group is None:
            if candidate not in taken:
                group = candidate
            candidate += 1
        taken.add(group)
        definition.spec = dataclasses.replace(definition.spec, iommu_group=group)


def bundled_directory() -> Path:
    """The devices/ folder shipped with vfiofs (installed as the vfiofs.devices package)."""
    try:
        from vfiofs import devices  # type: ignore[attr-defined]
    except ImportError:  # running from a source tree that was not installed
        return Path(__file__).resolve().parents[2] / "devices"
    return Path(devices.__file__).parent
