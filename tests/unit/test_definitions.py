"""Unit tests of device definitions (vfiofs.host.definitions).

A definition that is wrong must be refused before anything mounts, with a one-line
message that names the file and the field: ``<path>: <field>: <reason>`` (file-level
problems have no field: ``<path>: <reason>``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from vfiofs.host.definitions import (
    DEFAULT_IDENTITY,
    Definition,
    DefinitionError,
    bundled_directory,
    load_definition,
    load_directory,
)
from vfiofs.host.daemon import build_model
from vfiofs.models.api import DeviceModel, LocalMemory, ModelContext
from vfiofs.pci.config import layout_capabilities
from vfiofs.models.spec import BarSpec, Capability, PciIdentity, Register

DEFAULT = PciIdentity(
    vendor=0x1234,
    device=0x5241,
    subsystem_vendor=0x1AF4,
    subsystem_device=0x1100,
    class_code=0x050000,
    revision=1,
    interrupt_pin=0,
)

MODEL_CHOICES = 'must be one of edu, generic, ioat, ram, uart16550 or "package.module:Class", got '


def write(directory: Path, filename: str, text: str | bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / filename
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def refused(path: Path, field: str, load=load_definition, target=None) -> DefinitionError:
    """Load ``target`` (default ``path``), expect a refusal naming ``path`` and ``field``."""
    with pytest.raises(DefinitionError) as info:
        load(path if target is None else target)
    exc = info.value
    message = str(exc)
    assert exc.path == str(path)
    assert exc.field == field
    assert "\n" not in message
    if field:
        assert message.startswith(f"{path}: {field}: ")
        assert message == f"{path}: {field}: {exc.reason}"
    else:  # file-level problems have no field part
        assert message == f"{path}: {exc.reason}"
    return exc


def refused_text(tmp_path: Path, text: str, field: str, filename: str = "d.toml") -> DefinitionError:
    return refused(write(tmp_path, filename, text), field)


def loaded(tmp_path: Path, text: str, filename: str = "d.toml") -> Definition:
    return load_definition(write(tmp_path, filename, text))


@pytest.fixture
def build():
    """``build(definition, state_dir=None)`` as the daemon builds (memfd BARs, state files);
    every model built is shut down afterwards."""
    models: list[DeviceModel] = []

    def _build(definition: Definition, state_dir: Path | None = None) -> DeviceModel:
        model = build_model(definition, state_dir)
        models.append(model)
        return model

    yield _build
    for model in models:
        model.shutdown()


@pytest.fixture
def module_names():
    """Names of test modules to drop from sys.modules after the test."""
    names: list[str] = []
    yield names
    for name in names:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]


def make_package(tmp_path: Path, monkeypatch, module_names: list[str], package: str, source: str) -> None:
    """``<tmp_path>/<package>/models.py`` holding ``source``, importable as ``<package>.models``."""
    root = tmp_path / "pkgs"
    write(root / package, "__init__.py", "")
    write(root / package, "models.py", source)
    monkeypatch.syspath_prepend(str(root))
    module_names.append(package)


# --- the bundled devices --------------------------------------------------------------------------


def test_bundled_directory_loads_in_file_order():
    directory = bundled_directory()
    assert directory.is_dir()
    definitions = load_directory(directory)
    assert [d.name for d in definitions] == ["ram-64k", "ram-1m", "showcase", "uart", "edu", "ioat"]
    assert [d.path.name for d in definitions] == ["ram0.toml", "ram1.toml", "showcase.toml", "uart.toml",
                                                       "vedu.toml", "vioat.toml"]
    assert [d.model for d in definitions] == ["generic", "generic", "generic", "uart16550", "edu", "ioat"]
    assert all(d.spec.name == d.name and d.spec.source == d.path for d in definitions)


def test_bundled_ram_devices():
    ram64k, ram1m, *_ = load_directory(bundled_directory())
    assert ram64k.spec.bars == (BarSpec(index=0, size=64 * 1024, mmap=True),)
    assert ram1m.spec.bars == (BarSpec(index=0, size=1 << 20, is_64bit=True, prefetchable=True, mmap=True),)
    assert ram64k.identity == DEFAULT
    assert ram1m.identity == PciIdentity(vendor=0x1234, device=0x5242, class_code=0x050000, revision=1)
    for definition in (ram64k, ram1m):
        assert definition.spec.capabilities == (Capability(kind="pm"),)
        assert definition.spec.rom is None
        assert definition.spec.express is False
        assert definition.spec.config_size == 256


def test_bundled_showcase_identity_and_bars():
    showcase = load_directory(bundled_directory())[2]
    spec = showcase.spec
    assert showcase.identity == PciIdentity(
        vendor=0x1234, device=0x5653, subsystem_vendor=0x1AF4, subsystem_device=0x1100,
        class_code=0xFF0000, revision=2, interrupt_pin=1,
    )
    assert [bar.index for bar in spec.bars] == [0, 1, 2, 4]

    bar0 = spec.bar(0)
    assert (bar0.size, bar0.io, bar0.is_64bit, bar0.mmap, bar0.mappable_areas) == (4096, False, False, False, ())
    assert [(r.name, r.offset, r.width, r.reset, r.access) for r in bar0.registers] == [
        ("id", 0x00, 4, 0x53564656, "ro"),
        ("scratch", 0x04, 4, 0, "rw"),
        ("status", 0x08, 4, 0x3, "w1c"),
        ("events", 0x0C, 4, 0x1, "rc"),
        ("doorbell", 0x10, 4, 0, "wo"),
        ("counter", 0x18, 8, 0, "rw"),
    ]

    bar1 = spec.bar(1)
    assert (bar1.size, bar1.mmap, bar1.sparse) == (64 * 1024, True, True)
    assert bar1.mmap_areas == ((0x1000, 0xF000),)
    assert bar1.mappable_areas == ((0x1000, 0xF000),)
    assert bar1.registers == (Register(offset=0, width=4, reset=0, access="rw", name="queue_doorbell"),)

    assert spec.bar(2) == BarSpec(index=2, size=1 << 20, is_64bit=True, prefetchable=True, mmap=True)
    assert spec.bar(2).mappable_areas == ((0, 1 << 20),)
    assert spec.bar(3) is None  # upper half of BAR2
    assert spec.bar(4) == BarSpec(index=4, size=32, io=True)
    assert spec.bar(5) is None


def test_bundled_showcase_rom_and_capabilities():
    showcase = load_directory(bundled_directory())[2]
    spec = showcase.spec
    assert spec.rom == (bundled_directory() / "showcase.rom").read_bytes()
    assert len(spec.rom) == 2048
    assert [cap.kind for cap in spec.capabilities] == ["pm", "msi", "msix", "pcie"]
    assert spec.capability("pm") == Capability(kind="pm")
    msi = spec.capability("msi")
    assert (msi.vectors, msi.address64, msi.maskable) == (4, True, True)
    assert spec.capability("msix") == Capability(
        kind="msix", vectors=8, table_bar=1, table_offset=0x800, pba_bar=1, pba_offset=0xC00
    )
    assert spec.capability("pcie") == Capability(kind="pcie")
    assert spec.express is True
    assert spec.config_size == 4096
    assert [(p.cap.kind, p.offset, p.length) for p in layout_capabilities(spec)] == [
        ("pm", 0x40, 8), ("msi", 0x48, 24), ("msix", 0x60, 12), ("pcie", 0x6C, 0x3C),
    ]


def test_bundled_showcase_builds(build):
    showcase = load_directory(bundled_directory())[2]
    model = build(showcase)
    assert type(model) is DeviceModel
    assert model.spec is showcase.spec
    assert {index: memory.size for index, memory in model.memory.items()} == {
        0: 4096, 1: 64 * 1024, 2: 1 << 20, 4: 32,
    }
    assert model.bar_read(0, 0x00, 4) == (0x53564656).to_bytes(4, "little")
    # every MSI-X vector starts masked: vector control of entries 0 and 7
    assert model.bar_read(1, 0x800 + 12, 4) == b"\x01\0\0\0"
    assert model.bar_read(1, 0x800 + 7 * 16 + 12, 4) == b"\x01\0\0\0"


# --- defaults and the ram shorthand -----------------------------------------------------------------


def test_empty_definition_uses_defaults(tmp_path, build):
    path = write(tmp_path, "scratch.toml", "")
    definition = load_definition(path)
    assert definition.path == path
    assert definition.name == "scratch"  # the file stem
    assert definition.model == "generic"
    assert definition.identity == DEFAULT == DEFAULT_IDENTITY
    spec = definition.spec
    assert (spec.name, spec.model, spec.bars, spec.rom, spec.capabilities) == ("scratch", "generic", (), None, ())
    assert (spec.express, spec.config_size) == (False, 256)
    model = build(definition)
    assert type(model) is DeviceModel
    assert model.memory == {}


def test_explicit_generic_model(tmp_path):
    definition = loaded(tmp_path, 'model = "generic"\n[[bar]]\nindex = 3\nsize = 64\n')
    assert definition.model == definition.spec.model == "generic"
    assert definition.spec.bars == (BarSpec(index=3, size=64),)


def test_explicit_name_overrides_file_stem(tmp_path):
    definition = loaded(tmp_path, 'name = "My_dev-1.0"\n', filename="a.toml")
    assert definition.name == definition.spec.name == "My_dev-1.0"


def test_longest_name_is_accepted(tmp_path):
    assert loaded(tmp_path, f'name = "{"a" * 64}"\n').name == "a" * 64


def test_ram_model_without_section_is_a_64k_mappable_bar0(tmp_path, build):
    definition = loaded(tmp_path, 'model = "ram"\n')
    assert definition.model == "ram"
    assert definition.identity == DEFAULT
    assert definition.spec.bars == (BarSpec(index=0, size=64 * 1024, mmap=True),)
    model = build(definition)
    assert isinstance(model, DeviceModel)
    assert model.memory[0].size == 64 * 1024


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ('"64KiB"', 64 * 1024),
        ('"1MiB"', 1 << 20),
        ("4096", 4096),
        ('"4096"', 4096),
        ('"8192B"', 8192),
        ('" 16 KiB "', 16 * 1024),
        ('"1GiB"', 1 << 30),
        ("0x100000", 1 << 20),
    ],
)
def test_ram_size_forms(tmp_path, value, size):
    definition = loaded(tmp_path, f'model = "ram"\n[ram]\nsize = {value}\n')
    assert definition.spec.bars == (BarSpec(index=0, size=size, mmap=True),)


def test_ram_with_bars_is_refused(tmp_path):
    exc = refused_text(tmp_path, 'model = "ram"\n[ram]\nsize = 4096\n[[bar]]\nindex = 1\nsize = 4096\n', "bar")
    assert exc.reason == 'model = "ram" defines its BAR with [ram]; use [[bar]] without it'


@pytest.mark.parametrize("model", ["", 'model = "generic"\n'], ids=["default", "generic"])
def test_ram_section_without_ram_model(tmp_path, model):
    exc = refused_text(tmp_path, f'{model}[ram]\nsize = 4096\n', "ram")
    assert exc.reason == 'only goes with model = "ram"'


def test_unknown_ram_field(tmp_path):
    assert refused_text(tmp_path, 'model = "ram"\n[ram]\nsise = 4096\n', "ram.sise").reason == \
        "unknown field (known: size)"


@pytest.mark.parametrize("value", ["1000", "12288", '"3KiB"', "0x1001"])
def test_ram_size_not_a_power_of_two(tmp_path, value):
    reason = refused_text(tmp_path, f'model = "ram"\n[ram]\nsize = {value}\n', "ram.size").reason
    assert reason.startswith("must be a power of two from 4096 to 1073741824, got ")


def test_size_message_names_the_value(tmp_path):
    """The complete one-line message: file, field, reason."""
    path = write(tmp_path, "ram.toml", 'model = "ram"\n[ram]\nsize = 1000\n')
    exc = refused(path, "ram.size")
    assert str(exc) == f"{path}: ram.size: must be a power of two from 4096 to 1073741824, got 1000"


@pytest.mark.parametrize("value", ["0", "2048", '"2KiB"', '"2GiB"', str(1 << 31), '"4194304KiB"'])
def test_ram_size_too_small_or_too_large(tmp_path, value):
    reason = refused_text(tmp_path, f'model = "ram"\n[ram]\nsize = {value}\n', "ram.size").reason
    assert reason.startswith("must be a power of two from 4096 to 1073741824")


def test_negative_size_is_not_a_byte_count(tmp_path):
    reason = refused_text(tmp_path, 'model = "ram"\n[ram]\nsize = -4096\n', "ram.size").reason
    assert reason == "must be a byte count, got -4096"


@pytest.mark.parametrize("value", ['"64KB"', '"64kib"', '"lots"', '""', '"-4096"', '"1.5MiB"', '"64 Ki B"'])
def test_bad_size_string(tmp_path, value):
    reason = refused_text(tmp_path, f'model = "ram"\n[ram]\nsize = {value}\n', "ram.size").reason
    assert reason == f'must be a byte count such as 4096 or "64KiB", got {value.strip(chr(34))!r}'


@pytest.mark.parametrize("value", ["true", "4096.0", "[4096]"])
def test_size_of_wrong_type(tmp_path, value):
    reason = refused_text(tmp_path, f'model = "ram"\n[ram]\nsize = {value}\n', "ram.size").reason
    assert reason.startswith("must be a byte count, got ")


# --- file-level and top-level refusals -------------------------------------------------------------


@pytest.mark.parametrize("text", ['name = \n', "[pci\n", 'model = "ram"\nmodel = "ram"\n', "[[bar]\n"])
def test_invalid_toml(tmp_path, text):
    assert refused_text(tmp_path, text, "").reason.startswith("not valid TOML: ")


def test_invalid_utf8(tmp_path):
    path = write(tmp_path, "bad.toml", b'model = "\xff"\n')
    assert refused(path, "").reason.startswith("not valid TOML: ")


def test_unreadable_file(tmp_path):
    path = tmp_path / "missing.toml"
    assert refused(path, "").reason == "cannot read: No such file or directory"


def test_unknown_top_level_field(tmp_path):
    exc = refused_text(tmp_path, 'colour = "red"\n', "colour")
    assert exc.reason == "unknown field (known: bar, capability, iommu_group, model, name, pci, ram, rom)"


@pytest.mark.parametrize("section", ["pci", "rom"])
def test_section_that_is_not_a_table(tmp_path, section):
    assert refused_text(tmp_path, f"{section} = 3\n", section).reason == "must be a table"


def test_ram_section_that_is_not_a_table(tmp_path):
    assert refused_text(tmp_path, 'model = "ram"\nram = 3\n', "ram").reason == "must be a table"


@pytest.mark.parametrize("key", ["bar", "capability"])
def test_array_section_that_is_a_single_table(tmp_path, key):
    exc = refused_text(tmp_path, f"[{key}]\nindex = 0\n", key)
    assert exc.reason == f"must be an array of tables ([[{key}]])"


@pytest.mark.parametrize(
    "name",
    ['""', '"-leading-dash"', '".hidden"', '"has space"', '"slash/name"', '"é"', f'"{"a" * 65}"', "5", "true",
     '"trailing-newline\\n"'],
)
def test_bad_name(tmp_path, name):
    assert refused_text(tmp_path, f"name = {name}\n", "name").reason.startswith("must be 1-64 letters, digits")


def test_bad_file_stem_is_a_bad_name(tmp_path):
    """Without a name field the stem is the name, and it is checked the same way."""
    exc = refused_text(tmp_path, "", "name", filename="my device.toml")
    assert exc.reason.endswith("got 'my device'")


# --- [pci] ----------------------------------------------------------------------------------------


def test_pci_identity_in_hex(tmp_path):
    text = """
[pci]
vendor = 0x8086
device = 0x10d3
subsystem_vendor = 0xffff
subsystem_device = 0x0000
class = 0x020000
revision = 0xff
interrupt_pin = 4
"""
    assert loaded(tmp_path, text).identity == PciIdentity(
        vendor=0x8086, device=0x10D3, subsystem_vendor=0xFFFF, subsystem_device=0,
        class_code=0x020000, revision=0xFF, interrupt_pin=4,
    )


def test_partial_pci_table_keeps_other_defaults(tmp_path):
    identity = loaded(tmp_path, "[pci]\ndevice = 0x5242\nclass = 0xffffff\n").identity
    assert identity == PciIdentity(vendor=0x1234, device=0x5242, subsystem_vendor=0x1AF4,
                                   subsystem_device=0x1100, class_code=0xFFFFFF, revision=1, interrupt_pin=0)


def test_unknown_pci_field(tmp_path):
    exc = refused_text(tmp_path, "[pci]\nvendr = 0x1234\n", "pci.vendr")
    assert exc.reason == ("unknown field (known: class, device, interrupt_pin, revision, subsystem_device, "
                          "subsystem_vendor, vendor)")


@pytest.mark.parametrize(
    ("key", "value", "field"),
    [
        ("vendor", '"0x1234"', "pci.vendor"),
        ("device", "1.5", "pci.device"),
        ("subsystem_vendor", "true", "pci.subsystem_vendor"),
        ("subsystem_device", "[1]", "pci.subsystem_device"),
        ("class", "false", "pci.class"),
        ("revision", '"1"', "pci.revision"),
        ("interrupt_pin", '"A"', "pci.interrupt_pin"),
    ],
)
def test_pci_id_must_be_an_integer(tmp_path, key, value, field):
    assert refused_text(tmp_path, f"[pci]\n{key} = {value}\n", field).reason.startswith("must be an integer, got ")


@pytest.mark.parametrize(
    ("key", "value", "field", "bits"),
    [
        ("vendor", "0x10000", "pci.vendor", 16),
        ("device", "-1", "pci.device", 16),
        ("subsystem_vendor", "0x1ffff", "pci.subsystem_vendor", 16),
        ("subsystem_device", "65536", "pci.subsystem_device", 16),
        ("class", "0x1000000", "pci.class", 24),
        ("revision", "0x100", "pci.revision", 8),
        ("interrupt_pin", "256", "pci.interrupt_pin", 8),
    ],
)
def test_pci_id_out_of_range(tmp_path, key, value, field, bits):
    reason = refused_text(tmp_path, f"[pci]\n{key} = {value}\n", field).reason
    assert reason.startswith(f"must fit in {bits} bits, got ")


@pytest.mark.parametrize("pin", [0, 1, 2, 3, 4])
def test_interrupt_pins(tmp_path, pin):
    assert loaded(tmp_path, f"[pci]\ninterrupt_pin = {pin}\n").identity.interrupt_pin == pin


def test_interrupt_pin_5_is_refused(tmp_path):
    exc = refused_text(tmp_path, "[pci]\ninterrupt_pin = 5\n", "pci.interrupt_pin")
    assert exc.reason == "must be 0 (none) or 1-4 (INTA-INTD), got 5"


# --- [[bar]] ----------------------------------------------------------------------------------------


def test_every_bar_field(tmp_path):
    text = """
[[bar]]
index = 4
size = 256
kind = "io"
[[bar]]
index = 0
size = "2MiB"
kind = "memory"
bits = 64
prefetchable = true
mmap = true
persist = true
[[bar]]
index = 2
size = 16
bits = 32
"""
    spec = loaded(tmp_path, text).spec
    assert spec.bars == (  # sorted by index
        BarSpec(index=0, size=2 << 20, is_64bit=True, prefetchable=True, mmap=True, persist=True),
        BarSpec(index=2, size=16),
        BarSpec(index=4, size=256, io=True),
    )


@pytest.mark.parametrize(
    ("bar", "size"),
    [
        ("", 16),                        # smallest trapped memory BAR
        ("", 1 << 30),                   # largest memory BAR
        ("mmap = true\n", 4096),         # smallest mappable BAR
        ('kind = "io"\n', 4),            # smallest I/O BAR
        ('kind = "io"\n', 256),          # largest I/O BAR
    ],
)
def test_bar_size_limits_accepted(tmp_path, bar, size):
    assert loaded(tmp_path, f"[[bar]]\nindex = 0\nsize = {size}\n{bar}").spec.bars[0].size == size


@pytest.mark.parametrize(
    ("bar", "size", "limits"),
    [
        ("", "8", "from 16 to 1073741824"),
        ("", '"2GiB"', "from 16 to 1073741824"),
        ("", "24", "from 16 to 1073741824"),
        ("mmap = true\n", "2048", "from 4096 to 1073741824"),
        ("mmap = true\n", "12288", "from 4096 to 1073741824"),
        ('kind = "io"\n', "512", "from 4 to 256"),
        ('kind = "io"\n', "2", "from 4 to 256"),
        ('kind = "io"\n', "24", "from 4 to 256"),
    ],
)
def test_bar_size_refused(tmp_path, bar, size, limits):
    exc = refused_text(tmp_path, f"[[bar]]\nindex = 0\nsize = {size}\n{bar}", "bar[0].size")
    assert exc.reason.startswith(f"must be a power of two {limits}, got ")


def test_bar_size_refusal_names_the_bar(tmp_path):
    text = "[[bar]]\nindex = 0\nsize = 4096\n[[bar]]\nindex = 1\nsize = 1000\n"
    assert refused_text(tmp_path, text, "bar[1].size").reason == \
        "must be a power of two from 16 to 1073741824, got 1000"


@pytest.mark.parametrize(("bar", "field"), [("size = 4096\n", "bar[0].index"), ("index = 0\n", "bar[0].size")])
def test_bar_required_fields(tmp_path, bar, field):
    assert refused_text(tmp_path, f"[[bar]]\n{bar}", field).reason == "is required"


def test_unknown_bar_field(tmp_path):
    exc = refused_text(tmp_path, "[[bar]]\nindex = 0\nsize = 4096\ncolour = 1\n", "bar[0].colour")
    assert exc.reason == ("unknown field (known: bits, index, kind, mmap, mmap_areas, persist, prefetchable, "
                          "register, size)")


@pytest.mark.parametrize("index", [6, 7, 255])
def test_bar_index_above_5(tmp_path, index):
    text = f"[[bar]]\nindex = 0\nsize = 4096\n[[bar]]\nindex = {index}\nsize = 4096\n"
    assert refused_text(tmp_path, text, "bar[1].index").reason == f"must be 0-5, got {index}"


def test_bar_index_negative(tmp_path):
    reason = refused_text(tmp_path, "[[bar]]\nindex = -1\nsize = 4096\n", "bar[0].index").reason
    assert reason.startswith("must fit in 8 bits, got ")


def test_duplicate_bar_slot(tmp_path):
    text = "[[bar]]\nindex = 2\nsize = 4096\n[[bar]]\nindex = 2\nsize = 4096\n"
    assert refused_text(tmp_path, text, "bar[1].index").reason == "BAR slot 2 is already used"


def test_64bit_bar_at_index_5(tmp_path):
    exc = refused_text(tmp_path, "[[bar]]\nindex = 5\nsize = 4096\nbits = 64\n", "bar[0].index")
    assert exc.reason == "a 64-bit BAR takes two slots: index must be 0-4"


@pytest.mark.parametrize(
    "text",
    [
        "[[bar]]\nindex = 0\nsize = 4096\nbits = 64\n[[bar]]\nindex = 1\nsize = 4096\n",
        "[[bar]]\nindex = 1\nsize = 4096\n[[bar]]\nindex = 0\nsize = 4096\nbits = 64\n",
        "[[bar]]\nindex = 0\nsize = 4096\nbits = 64\n[[bar]]\nindex = 1\nsize = 4096\nbits = 64\n",
    ],
    ids=["64bit-first", "64bit-second", "two-64bit"],
)
def test_64bit_bar_takes_the_next_slot(tmp_path, text):
    assert refused_text(tmp_path, text, "bar[1].index").reason == "BAR slot 1 is already used"


def test_64bit_bars_side_by_side(tmp_path):
    text = "".join(f"[[bar]]\nindex = {i}\nsize = 4096\nbits = 64\n" for i in (0, 2, 4))
    assert [(b.index, b.is_64bit) for b in loaded(tmp_path, text).spec.bars] == [(0, True), (2, True), (4, True)]


@pytest.mark.parametrize("extra", ["bits = 64\n", "mmap = true\n", "prefetchable = true\n"])
def test_io_bar_is_32bit_unprefetchable_and_trapped(tmp_path, extra):
    exc = refused_text(tmp_path, f'[[bar]]\nindex = 0\nsize = 16\nkind = "io"\n{extra}', "bar[0].kind")
    assert exc.reason == "an I/O BAR is 32-bit, not prefetchable and never mappable"


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("kind", '"port"', "must be one of memory, io, got 'port'"),
        ("bits", "48", "must be one of 32, 64, got 48"),
        ("prefetchable", "1", "must be true or false, got 1"),
        ("mmap", '"yes"', "must be true or false, got 'yes'"),
        ("persist", "0", "must be true or false, got 0"),
    ],
)
def test_bad_bar_field_values(tmp_path, key, value, reason):
    text = f"[[bar]]\nindex = 0\nsize = 4096\n{key} = {value}\n"
    assert refused_text(tmp_path, text, f"bar[0].{key}").reason == reason


# --- mmap_areas -----------------------------------------------------------------------------------------


MMAP_BAR = '[[bar]]\nindex = 0\nsize = "64KiB"\nmmap = true\n'


def test_mmap_areas_are_sorted(tmp_path):
    text = MMAP_BAR + "mmap_areas = [{ offset = 0x8000, size = 0x8000 }, { offset = 0x1000, size = 0x2000 }]\n"
    bar = loaded(tmp_path, text).spec.bars[0]
    assert bar.mmap_areas == ((0x1000, 0x2000), (0x8000, 0x8000))
    assert bar.sparse is True


def test_mmap_areas_can_touch(tmp_path):
    text = MMAP_BAR + "mmap_areas = [{ offset = 0, size = 0x1000 }, { offset = 0x1000, size = 0xf000 }]\n"
    assert loaded(tmp_path, text).spec.bars[0].mmap_areas == ((0, 0x1000), (0x1000, 0xF000))


def test_mmap_area_size_as_string(tmp_path):
    """An area's size is a byte count, like every other size: "60KiB" is 0xf000."""
    text = MMAP_BAR + 'mmap_areas = [{ offset = 0x1000, size = "60KiB" }]\n'
    assert loaded(tmp_path, text).spec.bars[0].mmap_areas == ((0x1000, 0xF000),)


def test_mmap_areas_need_mmap(tmp_path):
    text = '[[bar]]\nindex = 0\nsize = "64KiB"\nmmap_areas = [{ offset = 0x1000, size = 0x1000 }]\n'
    assert refused_text(tmp_path, text, "bar[0].mmap_areas").reason == "needs mmap = true"


@pytest.mark.parametrize(
    ("areas", "field"),
    [
        ("{ offset = 0x800, size = 0x1000 }", "bar[0].mmap_areas[0]"),              # offset not aligned
        ("{ offset = 0x1000, size = 0x1800 }", "bar[0].mmap_areas[0]"),             # size not aligned
        ("{ offset = 0x1000, size = 0 }", "bar[0].mmap_areas[0]"),                  # empty
        ("{ offset = 0xf000, size = 0x2000 }", "bar[0].mmap_areas[0]"),             # past the end
        ("{ offset = 0x10000, size = 0x1000 }", "bar[0].mmap_areas[0]"),            # starts past the end
        ("{ offset = 0, size = 0x1000 }, { offset = 0x3000, size = 0x100 }", "bar[0].mmap_areas[1]"),
    ],
)
def test_bad_mmap_area(tmp_path, areas, field):
    exc = refused_text(tmp_path, MMAP_BAR + f"mmap_areas = [{areas}]\n", field)
    assert exc.reason == "must be page-aligned (4096), non-empty and inside the BAR"


def test_overlapping_mmap_areas(tmp_path):
    text = MMAP_BAR + "mmap_areas = [{ offset = 0x4000, size = 0x2000 }, { offset = 0x1000, size = 0x4000 }]\n"
    assert refused_text(tmp_path, text, "bar[0].mmap_areas").reason == "areas overlap"


@pytest.mark.parametrize(
    ("areas", "field", "reason"),
    [
        ("5", "bar[0].mmap_areas", "must be a list of {offset, size} tables"),
        ("[5]", "bar[0].mmap_areas[0]", "must be a table {offset = ..., size = ...}"),
        ("[{ offset = 0 }]", "bar[0].mmap_areas[0].size", "is required"),
        ("[{ size = 4096 }]", "bar[0].mmap_areas[0].offset", "is required"),
        ("[{ offset = 0, size = 4096, prot = 1 }]", "bar[0].mmap_areas[0].prot", "unknown field (known: offset, size)"),
    ],
)
def test_malformed_mmap_areas(tmp_path, areas, field, reason):
    assert refused_text(tmp_path, MMAP_BAR + f"mmap_areas = {areas}\n", field).reason == reason


# --- registers -------------------------------------------------------------------------------------------


def reg_bar(*registers: str, bar: str = "[[bar]]\nindex = 0\nsize = 4096\n") -> str:
    return bar + "".join(f"[[bar.register]]\n{r}" for r in registers)


def test_register_defaults_and_fields(tmp_path):
    text = reg_bar("offset = 0x20\n",
                   'offset = 0x10\nwidth = 2\nreset = 0xffff\naccess = "ro"\nname = "ctl"\n',
                   "offset = 0x13\nwidth = 1\n",
                   'offset = 0x18\nwidth = 8\nreset = 0x7fffffffffffffff\naccess = "rc"\n')
    assert loaded(tmp_path, text).spec.bars[0].registers == (  # sorted by offset
        Register(offset=0x10, width=2, reset=0xFFFF, access="ro", name="ctl"),
        Register(offset=0x13, width=1),
        Register(offset=0x18, width=8, reset=0x7FFF_FFFF_FFFF_FFFF, access="rc"),
        Register(offset=0x20, width=4, reset=0, access="rw", name=""),
    )


@pytest.mark.parametrize("access", ["ro", "rw", "wo", "w1c", "rc"])
def test_register_access_kinds(tmp_path, access):
    text = reg_bar(f'offset = 0\naccess = "{access}"\n')
    assert loaded(tmp_path, text).spec.bars[0].registers[0].access == access


def test_registers_in_an_io_bar_and_in_the_trapped_page_of_a_sparse_bar(tmp_path):
    text = (reg_bar("offset = 0\nwidth = 2\n", bar='[[bar]]\nindex = 4\nsize = 16\nkind = "io"\n')
            + reg_bar("offset = 0xffc\n", bar=MMAP_BAR + "mmap_areas = [{ offset = 0x1000, size = 0xf000 }]\n"))
    spec = loaded(tmp_path, text).spec
    assert spec.bar(4).registers == (Register(offset=0, width=2),)
    assert spec.bar(0).registers == (Register(offset=0xFFC, width=4),)


def test_unknown_register_field(tmp_path):
    text = reg_bar("offset = 0\n", "offset = 4\nmask = 1\n")
    exc = refused_text(tmp_path, text, "bar[0].register[1].mask")
    assert exc.reason == "unknown field (known: access, name, offset, reset, width)"


@pytest.mark.parametrize("width", ["3", "16", "0", '"4"'])
def test_register_bad_width(tmp_path, width):
    exc = refused_text(tmp_path, reg_bar(f"offset = 0\nwidth = {width}\n"), "bar[0].register[0].width")
    assert exc.reason.startswith("must be one of 1, 2, 4, 8, got ")


@pytest.mark.parametrize("width", ["true", "4.0"])
def test_register_width_of_wrong_type(tmp_path, width):
    """1, 2, 4 or 8 as integers: a boolean or a float is not a width."""
    exc = refused_text(tmp_path, reg_bar(f"offset = 0\nwidth = {width}\n"), "bar[0].register[0].width")
    assert exc.reason.startswith("must be one of 1, 2, 4, 8, got ")


@pytest.mark.parametrize(
    ("register", "width"),
    [
        ("offset = 2\n", 4),                 # 4 bytes at 2: misaligned
        ("offset = 0x104\nwidth = 8\n", 8),  # misaligned for 8 bytes
        ("offset = 0x1000\n", 4),            # outside the BAR
        ("offset = 0xffe\n", 4),             # misaligned and running past the end
        ("offset = 0xfff\nwidth = 2\n", 2),
    ],
)
def test_register_offset_refused(tmp_path, register, width):
    text = reg_bar("offset = 0x100\n", "offset = 0x200\n", register)
    assert refused_text(tmp_path, text, "bar[0].register[2].offset").reason == \
        f"must be aligned to the width ({width}) and inside the BAR"


def test_register_in_the_last_bytes(tmp_path):
    text = reg_bar("offset = 0xff8\nwidth = 4\n", "offset = 0xffc\nwidth = 2\n", "offset = 0xfff\nwidth = 1\n")
    assert [(r.offset, r.width) for r in loaded(tmp_path, text).spec.bars[0].registers] == \
        [(0xFF8, 4), (0xFFC, 2), (0xFFF, 1)]


def test_register_offset_required(tmp_path):
    assert refused_text(tmp_path, reg_bar("width = 4\n"), "bar[0].register[0].offset").reason == "is required"


def test_register_bad_access(tmp_path):
    exc = refused_text(tmp_path, reg_bar('offset = 0\naccess = "rw1c"\n'), "bar[0].register[0].access")
    assert exc.reason == "must be one of ro, rw, wo, w1c, rc, got 'rw1c'"


@pytest.mark.parametrize(("width", "reset"), [(1, "0x100"), (2, "0x10000"), (4, "0x100000000"), (4, "-1")])
def test_register_reset_too_large(tmp_path, width, reset):
    exc = refused_text(tmp_path, reg_bar(f"offset = 0\nwidth = {width}\nreset = {reset}\n"),
                       "bar[0].register[0].reset")
    assert exc.reason.startswith(f"must fit in {8 * width} bits, got ")


def test_register_name_must_be_a_string(tmp_path):
    exc = refused_text(tmp_path, reg_bar("offset = 0\nname = 5\n"), "bar[0].register[0].name")
    assert exc.reason == "must be a string"


@pytest.mark.parametrize(
    ("registers", "reason"),
    [
        (("offset = 0\nwidth = 8\n", "offset = 4\n"), "registers at 0x0 and 0x4 overlap"),
        (("offset = 0x10\n", "offset = 0x12\nwidth = 2\n"), "registers at 0x10 and 0x12 overlap"),
        (("offset = 0x22\nwidth = 1\n", "offset = 0x20\n"), "registers at 0x20 and 0x22 overlap"),
        (("offset = 8\n", "offset = 8\nwidth = 1\n"), "registers at 0x8 and 0x8 overlap"),
    ],
)
def test_overlapping_registers(tmp_path, registers, reason):
    assert refused_text(tmp_path, reg_bar(*registers), "bar[0].register").reason == reason


@pytest.mark.parametrize(
    ("areas", "offset"),
    [
        ("", "0x20"),                                                 # the whole BAR is mappable
        ("mmap_areas = [{ offset = 0x1000, size = 0xf000 }]\n", "0x1000"),
        ("mmap_areas = [{ offset = 0x1000, size = 0xf000 }]\n", "0xfff8"),
        ("mmap_areas = [{ offset = 0x1000, size = 0x1000 }]\n", "0x1ffc"),
    ],
)
def test_register_inside_a_mappable_area(tmp_path, areas, offset):
    first = "" if not areas else "offset = 0\n"  # in the trapped first page
    text = reg_bar(*filter(None, [first, f"offset = {offset}\n"]), bar=MMAP_BAR + areas)
    exc = refused_text(tmp_path, text, "bar[0].register")
    assert exc.reason == (f"register at {int(offset, 16):#x} lies in a mappable area: "
                          "list the RAM parts in mmap_areas")


def test_registers_that_are_not_an_array_of_tables(tmp_path):
    text = "[[bar]]\nindex = 0\nsize = 4096\n[[bar]]\nindex = 1\nsize = 4096\nregister = 5\n"
    assert refused_text(tmp_path, text, "bar[1].register").reason == \
        "must be an array of tables ([[bar.register]])"


# --- [rom] -------------------------------------------------------------------------------------------------


def test_rom_file_is_relative_to_the_definition(tmp_path, monkeypatch):
    image = bytes(range(256)) * 3
    write(tmp_path / "defs", "option.rom", image)
    path = write(tmp_path / "defs", "d.toml", '[rom]\nfile = "option.rom"\n')
    monkeypatch.chdir(tmp_path)  # not the definition's directory
    assert load_definition(path).spec.rom == image


def test_rom_file_missing(tmp_path):
    path = write(tmp_path, "d.toml", '[rom]\nfile = "nope.rom"\n')
    assert refused(path, "rom.file").reason == f"cannot read {tmp_path / 'nope.rom'}: No such file or directory"


def test_rom_file_unreadable_directory(tmp_path):
    (tmp_path / "romdir").mkdir()
    path = write(tmp_path, "d.toml", '[rom]\nfile = "romdir"\n')
    assert refused(path, "rom.file").reason == f"cannot read {tmp_path / 'romdir'}: Is a directory"


@pytest.mark.parametrize("rom", ["", 'file = ""\n', "file = 5\n"])
def test_rom_file_not_named(tmp_path, rom):
    exc = refused_text(tmp_path, f"[rom]\n{rom}", "rom.file")
    assert exc.reason == "must name the ROM image file (relative to the definition)"


def test_rom_file_empty(tmp_path):
    write(tmp_path, "empty.rom", b"")
    exc = refused_text(tmp_path, '[rom]\nfile = "empty.rom"\n', "rom.file")
    assert exc.reason == "image must be 1 byte to 16 MiB, got 0 bytes"


def test_unknown_rom_field(tmp_path):
    write(tmp_path, "x.rom", b"\x55\xaa")
    exc = refused_text(tmp_path, '[rom]\nfile = "x.rom"\npath = "x.rom"\n', "rom.path")
    assert exc.reason == "unknown field (known: file)"


# --- [[capability]] ------------------------------------------------------------------------------------------


MSIX_BARS = '[[bar]]\nindex = 0\nsize = 4096\n[[bar]]\nindex = 2\nsize = "64KiB"\n[[bar]]\nindex = 4\nsize = 16\nkind = "io"\n'


def test_capabilities_placed_in_order(tmp_path):
    text = ('[[capability]]\ntype = "pcie"\n[[capability]]\ntype = "msi"\naddress64 = false\n'
            '[[capability]]\ntype = "pm"\noffset = 0xc0\n[[capability]]\ntype = "msix"\n' + MSIX_BARS)
    spec = loaded(tmp_path, text).spec
    assert spec.capabilities == (
        Capability(kind="pcie"),
        Capability(kind="msi", vectors=1, address64=False, maskable=False),
        Capability(kind="pm", offset=0xC0),
        Capability(kind="msix", vectors=1, pba_offset=16),  # the PBA defaults to right after the table
    )
    assert [(p.cap.kind, p.offset, p.length) for p in layout_capabilities(spec)] == [
        ("pcie", 0x40, 0x3C), ("msi", 0x7C, 10), ("pm", 0xC0, 8), ("msix", 0xC8, 12),
    ]
    assert (spec.express, spec.config_size) == (True, 4096)


def test_unknown_capability_field(tmp_path):
    exc = refused_text(tmp_path, '[[capability]]\ntype = "pm"\nversion = 3\n', "capability[0].version")
    assert exc.reason == ("unknown field (known: address64, maskable, offset, pba_bar, pba_offset, table_bar, "
                          "table_offset, type, vectors)")


def test_unknown_capability_type(tmp_path):
    text = '[[capability]]\ntype = "pm"\n[[capability]]\ntype = "vpd"\n'
    assert refused_text(tmp_path, text, "capability[1].type").reason == \
        "must be one of pm, msi, msix, pcie, got 'vpd'"


def test_capability_type_required(tmp_path):
    assert refused_text(tmp_path, "[[capability]]\noffset = 0x40\n", "capability[0].type").reason == "is required"


def test_capability_listed_twice(tmp_path):
    text = '[[capability]]\ntype = "msi"\n[[capability]]\ntype = "pm"\n[[capability]]\ntype = "msi"\n'
    assert refused_text(tmp_path, text, "capability[2].type").reason == "msi is listed twice"


@pytest.mark.parametrize("offset", [0x3C, 0x00, 0x42, 0x41])
def test_capability_offset_low_or_misaligned(tmp_path, offset):
    exc = refused_text(tmp_path, f'[[capability]]\ntype = "pm"\noffset = {offset}\n', "capability[0].offset")
    assert exc.reason == f"must be 4-byte aligned and at least 0x40, got {offset:#x}"


def test_capability_offset_past_config_header(tmp_path):
    exc = refused_text(tmp_path, '[[capability]]\ntype = "pm"\noffset = 0x100\n', "capability[0].offset")
    assert exc.reason == "must fit in 8 bits, got 0x100"


def test_capabilities_overlapping(tmp_path):
    text = '[[capability]]\ntype = "msi"\noffset = 0x40\n[[capability]]\ntype = "pm"\noffset = 0x4c\n'
    assert refused_text(tmp_path, text, "capability").reason == "pm at 0x4c overlaps msi at 0x40"


def test_automatic_capability_overlapping_an_explicit_one(tmp_path):
    text = '[[capability]]\ntype = "pcie"\n[[capability]]\ntype = "pm"\noffset = 0x78\n'
    assert refused_text(tmp_path, text, "capability").reason == "pm at 0x78 overlaps pcie at 0x40"


def test_capability_that_does_not_fit(tmp_path):
    text = '[[capability]]\ntype = "pcie"\noffset = 0xc8\n'
    assert refused_text(tmp_path, text, "capability").reason == "pcie at 0xc8 (60 bytes) does not fit below 0x100"


def test_capability_that_fits_exactly(tmp_path):
    spec = loaded(tmp_path, '[[capability]]\ntype = "pcie"\noffset = 0xc4\n').spec
    assert [(p.offset, p.length) for p in layout_capabilities(spec)] == [(0xC4, 0x3C)]


@pytest.mark.parametrize("vectors", [1, 2, 4, 8, 16, 32])
def test_msi_vectors(tmp_path, vectors):
    text = f'[[capability]]\ntype = "msi"\nvectors = {vectors}\nmaskable = true\n'
    assert loaded(tmp_path, text).spec.capabilities == (Capability(kind="msi", vectors=vectors, maskable=True),)


@pytest.mark.parametrize("vectors", ["0", "3", "64", "-1", "true", "4.0"])
def test_msi_bad_vectors(tmp_path, vectors):
    exc = refused_text(tmp_path, f'[[capability]]\ntype = "msi"\nvectors = {vectors}\n', "capability[0].vectors")
    assert exc.reason.startswith("must be one of 1, 2, 4, 8, 16, 32, got ")


def test_msix_2048_vectors(tmp_path):
    text = MSIX_BARS + ('[[capability]]\ntype = "msix"\nvectors = 2048\ntable_bar = 2\n'
                        "pba_bar = 2\npba_offset = 0x8000\n")
    assert loaded(tmp_path, text).spec.capabilities == (
        Capability(kind="msix", vectors=2048, table_bar=2, table_offset=0, pba_bar=2, pba_offset=0x8000),
    )


@pytest.mark.parametrize("vectors", [0, 2049])
def test_msix_vectors_out_of_range(tmp_path, vectors):
    exc = refused_text(tmp_path, MSIX_BARS + f'[[capability]]\ntype = "msix"\nvectors = {vectors}\n',
                       "capability[0].vectors")
    assert exc.reason == f"must be 1-2048, got {vectors}"


def test_msix_vectors_past_12_bits(tmp_path):
    exc = refused_text(tmp_path, MSIX_BARS + '[[capability]]\ntype = "msix"\nvectors = 4096\n',
                       "capability[0].vectors")
    assert exc.reason == "must fit in 12 bits, got 0x1000"


@pytest.mark.parametrize(
    ("placement", "field", "bar"),
    [
        ("table_bar = 1\n", "capability[2].table_bar", 1),     # not implemented
        ("table_bar = 3\n", "capability[2].table_bar", 3),
        ("table_bar = 4\n", "capability[2].table_bar", 4),     # an I/O BAR
        ("pba_bar = 4\n", "capability[2].pba_bar", 4),
        ("pba_bar = 5\n", "capability[2].pba_bar", 5),
    ],
)
def test_msix_in_a_bar_that_is_not_a_memory_bar(tmp_path, placement, field, bar):
    text = (MSIX_BARS + '[[capability]]\ntype = "pm"\n[[capability]]\ntype = "msi"\n'
            f'[[capability]]\ntype = "msix"\nvectors = 8\n{placement}')
    assert refused_text(tmp_path, text, field).reason == f"BAR {bar} is not an implemented memory BAR"


def test_msix_without_bars(tmp_path):
    exc = refused_text(tmp_path, '[[capability]]\ntype = "msix"\n', "capability[0].table_bar")
    assert exc.reason == "BAR 0 is not an implemented memory BAR"


@pytest.mark.parametrize(
    ("placement", "field", "reason"),
    [
        ("table_offset = 0xf90\n", "capability[2].table_offset", "must be 8-byte aligned and leave 128 bytes inside BAR 0"),
        ("table_offset = 0x804\n", "capability[2].table_offset", "must be 8-byte aligned and leave 128 bytes inside BAR 0"),
        ("table_offset = 0x1000\n", "capability[2].table_offset", "must be 8-byte aligned and leave 128 bytes inside BAR 0"),
        ("table_offset = 0x800\npba_offset = 0xffc\n", "capability[2].pba_offset",
         "must be 8-byte aligned and leave 8 bytes inside BAR 0"),
        ("table_offset = 0x800\npba_offset = 0x1000\n", "capability[2].pba_offset",
         "must be 8-byte aligned and leave 8 bytes inside BAR 0"),
    ],
)
def test_msix_structures_not_fitting(tmp_path, placement, field, reason):
    text = (MSIX_BARS + '[[capability]]\ntype = "pm"\n[[capability]]\ntype = "pcie"\n'
            f'[[capability]]\ntype = "msix"\nvectors = 8\n{placement}')
    assert refused_text(tmp_path, text, field).reason == reason


def test_msix_structures_fitting_exactly(tmp_path):
    text = MSIX_BARS + ('[[capability]]\ntype = "msix"\nvectors = 8\ntable_offset = 0xf80\n'
                        "pba_bar = 2\npba_offset = 0xfff8\n")
    assert loaded(tmp_path, text).spec.capability("msix") == Capability(
        kind="msix", vectors=8, table_bar=0, table_offset=0xF80, pba_bar=2, pba_offset=0xFFF8
    )


def test_msix_pba_grows_with_vectors(tmp_path):
    """65 vectors need a 16-byte PBA: 8 bytes before the end of the BAR are not enough."""
    text = MSIX_BARS + '[[capability]]\ntype = "msix"\nvectors = 65\npba_offset = 0xff8\n'
    exc = refused_text(tmp_path, text, "capability[0].pba_offset")
    assert exc.reason == "must be 8-byte aligned and leave 16 bytes inside BAR 0"


# --- model = "package.module:Class" -----------------------------------------------------------------------------


CUSTOM_MODULE = """
from vfiofs.host.daemon import build_model
from vfiofs.models.api import DeviceModel, LocalMemory, ModelContext


class Custom(DeviceModel):
    reset_works = False

    def __init__(self, spec, context=None):
        super().__init__(spec, context)
        self.given_context = context


class NotAModel:
    def __init__(self, spec, context=None):
        self.spec = spec


def factory(spec, context=None):
    return Custom(spec, context)
"""


def test_custom_model_class(tmp_path, monkeypatch, module_names, build):
    make_package(tmp_path, monkeypatch, module_names, "vfiofs_testpkg_a", CUSTOM_MODULE)
    definition = loaded(tmp_path, 'model = "vfiofs_testpkg_a.models:Custom"\n[[bar]]\nindex = 1\nsize = 8192\n')
    assert definition.model == definition.spec.model == "vfiofs_testpkg_a.models:Custom"
    cls = sys.modules["vfiofs_testpkg_a.models"].Custom
    assert definition.factory is cls
    model = build(definition)
    assert type(model) is cls
    assert isinstance(model, DeviceModel)
    assert model.spec is definition.spec
    assert model.reset_works is False
    assert isinstance(model.given_context, ModelContext) and model.context is model.given_context
    assert model.memory[1].size == 8192
    other = build(definition, tmp_path)
    assert type(other) is cls and other is not model
    assert other.context is not model.context
    standalone = definition.build()  # no daemon: the model makes its own context
    assert standalone.given_context is None and isinstance(standalone.memory[1], LocalMemory)


@pytest.mark.parametrize("name", ["NotAModel", "factory"])
def test_custom_model_that_is_not_a_device_model(tmp_path, monkeypatch, module_names, name):
    make_package(tmp_path, monkeypatch, module_names, f"vfiofs_testpkg_{name.lower()}", CUSTOM_MODULE)
    model = f"vfiofs_testpkg_{name.lower()}.models:{name}"
    exc = refused_text(tmp_path, f'model = "{model}"\n', "model")
    assert exc.reason == f"{model} is not a vfiofs.models.api.DeviceModel subclass"


def test_custom_model_module_not_found(tmp_path):
    exc = refused_text(tmp_path, 'model = "vfiofs_no_such_module_x.models:Custom"\n', "model")
    assert exc.reason == "cannot load vfiofs_no_such_module_x.models:Custom: No module named 'vfiofs_no_such_module_x'"


def test_custom_model_module_that_fails_to_import(tmp_path, monkeypatch, module_names):
    make_package(tmp_path, monkeypatch, module_names, "vfiofs_testpkg_broken", "raise RuntimeError('boom')\n")
    exc = refused_text(tmp_path, 'model = "vfiofs_testpkg_broken.models:Custom"\n', "model")
    assert exc.reason == "cannot load vfiofs_testpkg_broken.models:Custom: boom"


def test_custom_model_class_missing(tmp_path, monkeypatch, module_names):
    make_package(tmp_path, monkeypatch, module_names, "vfiofs_testpkg_b", CUSTOM_MODULE)
    exc = refused_text(tmp_path, 'model = "vfiofs_testpkg_b.models:Missing"\n', "model")
    assert exc.reason == ("cannot load vfiofs_testpkg_b.models:Missing: "
                          "module 'vfiofs_testpkg_b.models' has no attribute 'Missing'")


@pytest.mark.parametrize(
    ("text", "got"),
    [
        ('model = "rom"\n', "'rom'"),
        ("model = 1\n", "1"),
        ('model = "RAM"\n', "'RAM'"),
        ('model = "pkg.mod"\n', "'pkg.mod'"),
        ('model = "pkg:mod:Class"\n', "'pkg:mod:Class'"),
        ('model = ":Class"\n', "':Class'"),
        ('model = ["ram"]\n', "['ram']"),
        ("model = { a = 1 }\n", "{'a': 1}"),
    ],
    ids=["unknown", "integer", "wrong-case", "no-class", "two-colons", "no-module", "array", "table"],
)
def test_unknown_model(tmp_path, text, got):
    assert refused_text(tmp_path, text, "model").reason == MODEL_CHOICES + got


# --- build() -----------------------------------------------------------------------------------------------------


BUILD_BARS = """
[[bar]]
index = 0
size = 4096
[[bar.register]]
offset = 0
reset = 0xabcd
[[bar]]
index = 1
size = "64KiB"
mmap = true
mmap_areas = [{ offset = 0x1000, size = 0xf000 }]
[[bar]]
index = 2
size = "1MiB"
bits = 64
mmap = true
[[bar]]
index = 5
size = 64
kind = "io"
"""


def test_build_returns_a_fresh_model_each_call(tmp_path, build):
    definition = loaded(tmp_path, BUILD_BARS)
    first, second = build(definition), build(definition)
    assert type(first) is DeviceModel and type(second) is DeviceModel
    assert first is not second
    for model in (first, second):
        assert model.spec is definition.spec
        assert model.identity == definition.identity
        assert model.bars == definition.spec.bars
        assert {index: memory.size for index, memory in model.memory.items()} == {
            0: 4096, 1: 64 * 1024, 2: 1 << 20, 5: 64,
        }
        assert model.bar_read(0, 0, 4) == (0xABCD).to_bytes(4, "little")
    first.bar_write(2, 0x100, b"\xaa\xbb")
    first.bar_write(0, 0, b"\x11\x22\x33\x44")
    assert first.bar_read(2, 0x100, 2) == b"\xaa\xbb"
    assert second.bar_read(2, 0x100, 2) == b"\0\0"  # no shared memory between builds
    assert second.bar_read(0, 0, 4) == (0xABCD).to_bytes(4, "little")  # nor shared registers


def test_ram_build_memory_size(tmp_path, build):
    model = build(loaded(tmp_path, 'model = "ram"\n[ram]\nsize = "8KiB"\n'))
    assert type(model) is DeviceModel
    assert list(model.memory) == [0]
    assert model.memory[0].size == 8192


PERSIST = '[[bar]]\nindex = 2\nsize = "16KiB"\nmmap = true\npersist = true\n'


def test_persistent_bar_needs_a_state_directory(tmp_path):
    definition = loaded(tmp_path, PERSIST, filename="keep.toml")
    with pytest.raises(ValueError) as info:
        build_model(definition)
    assert str(info.value) == "keep: BAR 2 persists but no state directory was given"


def test_persistent_bar_refused_without_leaking_earlier_bars(tmp_path):
    """A refused build must not leave the memfds of the BARs before the persistent one open."""
    definition = loaded(tmp_path, "[[bar]]\nindex = 0\nsize = 4096\n" + PERSIST, filename="keep.toml")
    before = sorted(os.listdir("/proc/self/fd"))
    with pytest.raises(ValueError):
        build_model(definition)
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_persistent_bar_state_file(tmp_path, build):
    definition = loaded(tmp_path, "[[bar]]\nindex = 0\nsize = 4096\n" + PERSIST, filename="keep.toml")
    state = tmp_path / "state"
    model = build_model(definition, state)  # shut down here, not by the fixture
    try:
        state_file = state / "keep.bar2"
        assert state_file.is_file()
        assert state_file.stat().st_size == 16 * 1024
        assert sorted(p.name for p in state.iterdir()) == ["keep.bar2"]  # BAR0 does not persist
        assert model.memory[2].size == 16 * 1024
        model.bar_write(2, 0x3FFE, b"\x5a\xa5")
        model.bar_write(0, 0, b"\x77")
    finally:
        model.shutdown()
    again = build(definition, state)
    assert again.bar_read(2, 0x3FFE, 2) == b"\x5a\xa5"
    assert again.bar_read(0, 0, 1) == b"\0"
    assert state_file.read_bytes()[0x3FFE:] == b"\x5a\xa5"


# --- directories -------------------------------------------------------------------------------------------------


def test_directory_is_taken_in_file_name_order(tmp_path):
    for stem in ("b", "c", "a"):
        write(tmp_path, f"{stem}.toml", "")
    write(tmp_path, "README.md", "not a definition")
    write(tmp_path, "x.toml.bak", "not = valid = toml")
    definitions = load_directory(tmp_path)
    assert [d.name for d in definitions] == ["a", "b", "c"]
    assert [d.path for d in definitions] == [tmp_path / "a.toml", tmp_path / "b.toml", tmp_path / "c.toml"]


def test_duplicate_names_across_files(tmp_path):
    first = write(tmp_path, "a.toml", 'name = "dup"\n')
    second = write(tmp_path, "b.toml", 'model = "ram"\nname = "dup"\n')
    exc = refused(second, "name", load=load_directory, target=tmp_path)
    assert exc.reason == f"'dup' is already used by {first}"


def test_explicit_name_clashing_with_a_file_stem(tmp_path):
    first = write(tmp_path, "a.toml", 'name = "b"\n')
    second = write(tmp_path, "b.toml", "")
    assert refused(second, "name", load=load_directory, target=tmp_path).reason == f"'b' is already used by {first}"


def test_directory_refuses_the_first_bad_file(tmp_path):
    write(tmp_path, "a.toml", "")
    bad = write(tmp_path, "b.toml", "[pci]\nrevision = 256\n")
    write(tmp_path, "c.toml", "[[bar]]\nindex = 9\nsize = 4096\n")
    refused(bad, "pci.revision", load=load_directory, target=tmp_path)


def test_directory_that_does_not_exist(tmp_path):
    missing = tmp_path / "nope"
    assert refused(missing, "", load=load_directory).reason == "is not a directory of device definitions"


def test_directory_that_is_a_file(tmp_path):
    path = write(tmp_path, "d.toml", "")
    assert refused(path, "", load=load_directory).reason == "is not a directory of device definitions"


def test_directory_without_definitions(tmp_path):
    write(tmp_path, "README.md", "nothing here")
    write(tmp_path / "sub", "nested.toml", "")  # not searched recursively
    assert refused(tmp_path, "", load=load_directory).reason == "holds no device definitions (*.toml)"
