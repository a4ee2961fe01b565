"""Unit tests of device definitions (vfiofs.definitions).

A definition that is wrong must be refused before anything mounts, with a one-line
message that names the file and the field: ``<path>: <field>: <reason>``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vfiofs.definitions import (
    Definition,
    DefinitionError,
    bundled_directory,
    load_definition,
    load_directory,
)
from vfiofs.model import PciIdentity
from vfiofs.models.ram import RamModel

RAM_DEFAULT = PciIdentity(
    vendor=0x1234,
    device=0x5241,
    subsystem_vendor=0x1AF4,
    subsystem_device=0x1100,
    class_code=0x050000,
    revision=1,
    interrupt_pin=0,
)


def write(directory: Path, filename: str, text: str | bytes) -> Path:
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


def ram_size(definition: Definition) -> int:
    model = definition.build()
    return model.bars[0].size


# --- accepted definitions -----------------------------------------------------------------


def test_bundled_directory_loads():
    directory = bundled_directory()
    assert directory.is_dir()
    definitions = load_directory(directory)
    assert [d.path.name for d in definitions] == sorted(p.name for p in directory.glob("*.toml"))
    assert len(definitions) >= 2
    assert {d.model for d in definitions} == {"ram"}
    assert [d.name for d in definitions][:2] == ["ram-64k", "ram-1m"]
    assert [ram_size(d) for d in definitions][:2] == [64 * 1024, 1 << 20]
    assert definitions[1].identity.device == 0x5242


def test_minimal_definition_uses_model_defaults(tmp_path):
    path = write(tmp_path, "scratch.toml", 'model = "ram"\n')
    definition = load_definition(path)
    assert definition.path == path
    assert definition.model == "ram"
    assert definition.name == "scratch"  # the file stem
    assert definition.identity == RAM_DEFAULT
    assert ram_size(definition) == 64 * 1024


def test_explicit_name_overrides_file_stem(tmp_path):
    definition = load_definition(write(tmp_path, "a.toml", 'model = "ram"\nname = "My_dev-1.0"\n'))
    assert definition.name == "My_dev-1.0"


def test_pci_identity_in_hex(tmp_path):
    path = write(
        tmp_path,
        "nic.toml",
        """
model = "ram"
[pci]
vendor = 0x8086
device = 0x10d3
subsystem_vendor = 0xffff
subsystem_device = 0x0000
class = 0x020000
revision = 0xff
""",
    )
    assert load_definition(path).identity == PciIdentity(
        vendor=0x8086,
        device=0x10D3,
        subsystem_vendor=0xFFFF,
        subsystem_device=0,
        class_code=0x020000,
        revision=0xFF,
        interrupt_pin=0,
    )


def test_partial_pci_table_keeps_other_defaults(tmp_path):
    path = write(tmp_path, "d.toml", 'model = "ram"\n[pci]\ndevice = 0x5242\nclass = 0xffffff\n')
    identity = load_definition(path).identity
    assert identity.device == 0x5242
    assert identity.class_code == 0xFFFFFF
    assert (identity.vendor, identity.subsystem_vendor, identity.revision) == (0x1234, 0x1AF4, 1)


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
    definition = load_definition(write(tmp_path, "r.toml", f'model = "ram"\n[ram]\nsize = {value}\n'))
    assert ram_size(definition) == size


def test_directory_is_taken_in_file_name_order(tmp_path):
    for stem in ("b", "c", "a"):
        write(tmp_path, f"{stem}.toml", 'model = "ram"\n')
    write(tmp_path, "README.md", "not a definition")
    write(tmp_path, "x.toml.bak", "not = valid = toml")
    definitions = load_directory(tmp_path)
    assert [d.name for d in definitions] == ["a", "b", "c"]
    assert [d.path for d in definitions] == [tmp_path / "a.toml", tmp_path / "b.toml", tmp_path / "c.toml"]


def test_build_returns_a_fresh_model_each_call(tmp_path):
    definition = load_definition(write(tmp_path, "r.toml", 'model = "ram"\n[ram]\nsize = "8KiB"\n'))
    first, second = definition.build(), definition.build()
    assert isinstance(first, RamModel) and isinstance(second, RamModel)
    assert first is not second
    assert [bar.size for bar in first.bars] == [8192]
    assert len(first.memory) == len(second.memory) == 8192
    assert first.identity == second.identity == definition.identity
    first.bar_write(0, 0, b"\xaa\xbb")
    assert second.bar_read(0, 0, 2) == b"\0\0"  # no shared memory between builds


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ['model = "ram"\nname = \n', "[pci\n", 'model = "ram"\nmodel = "ram"\n'])
def test_invalid_toml(tmp_path, text):
    path = write(tmp_path, "bad.toml", text)
    exc = refused(path, "")
    assert exc.reason.startswith("not valid TOML: ")


def test_invalid_utf8(tmp_path):
    path = write(tmp_path, "bad.toml", b'model = "\xff"\n')
    assert refused(path, "").reason.startswith("not valid TOML: ")


def test_unreadable_file(tmp_path):
    path = tmp_path / "missing.toml"
    assert refused(path, "").reason == "cannot read: No such file or directory"


def test_unknown_top_level_field(tmp_path):
    path = write(tmp_path, "d.toml", 'model = "ram"\ncolour = "red"\n')
    assert refused(path, "colour").reason.startswith("unknown field (known: model, name, pci, ram)")


def test_unknown_pci_field(tmp_path):
    path = write(tmp_path, "d.toml", 'model = "ram"\n[pci]\nvendr = 0x1234\n')
    assert "unknown field" in refused(path, "pci.vendr").reason


def test_unknown_ram_field(tmp_path):
    path = write(tmp_path, "d.toml", 'model = "ram"\n[ram]\nsise = 4096\n')
    assert refused(path, "ram.sise").reason == "unknown field (known: size)"


@pytest.mark.parametrize("section", ["pci", "ram"])
def test_section_that_is_not_a_table(tmp_path, section):
    path = write(tmp_path, "d.toml", f'model = "ram"\n{section} = 3\n')
    assert refused(path, section).reason == "must be a table"


@pytest.mark.parametrize(
    ("text", "got"),
    [("", "None"), ('model = "rom"\n', "'rom'"), ("model = 1\n", "1"), ('model = "RAM"\n', "'RAM'")],
    ids=["missing", "unknown", "integer", "wrong-case"],
)
def test_missing_or_unknown_model(tmp_path, text, got):
    path = write(tmp_path, "d.toml", text)
    assert refused(path, "model").reason == f"must be one of ram, got {got}"


@pytest.mark.parametrize(
    "name",
    ['""', '"-leading-dash"', '".hidden"', '"has space"', '"slash/name"', '"é"', f'"{"a" * 65}"', "5", "true"],
)
def test_bad_name(tmp_path, name):
    path = write(tmp_path, "d.toml", f'model = "ram"\nname = {name}\n')
    assert refused(path, "name").reason.startswith("must be 1-64 letters, digits")


def test_longest_name_is_accepted(tmp_path):
    assert load_definition(write(tmp_path, "d.toml", f'model = "ram"\nname = "{"a" * 64}"\n')).name == "a" * 64


def test_bad_file_stem_is_a_bad_name(tmp_path):
    """Without a name field the stem is the name, and it is checked the same way."""
    path = write(tmp_path, "my device.toml", 'model = "ram"\n')
    assert refused(path, "name").reason.endswith("got 'my device'")


@pytest.mark.parametrize(
    ("key", "value", "field"),
    [
        ("vendor", '"0x1234"', "pci.vendor"),
        ("device", "1.5", "pci.device"),
        ("subsystem_vendor", "true", "pci.subsystem_vendor"),
        ("subsystem_device", "[1]", "pci.subsystem_device"),
        ("class", "false", "pci.class"),
        ("revision", '"1"', "pci.revision"),
    ],
)
def test_pci_id_must_be_an_integer(tmp_path, key, value, field):
    path = write(tmp_path, "d.toml", f'model = "ram"\n[pci]\n{key} = {value}\n')
    assert refused(path, field).reason.startswith("must be an integer, got ")


@pytest.mark.parametrize(
    ("key", "value", "field", "bits"),
    [
        ("vendor", "0x10000", "pci.vendor", 16),
        ("device", "-1", "pci.device", 16),
        ("subsystem_vendor", "0x1ffff", "pci.subsystem_vendor", 16),
        ("subsystem_device", "65536", "pci.subsystem_device", 16),
        ("class", "0x1000000", "pci.class", 24),
        ("revision", "0x100", "pci.revision", 8),
    ],
)
def test_pci_id_out_of_range(tmp_path, key, value, field, bits):
    path = write(tmp_path, "d.toml", f'model = "ram"\n[pci]\n{key} = {value}\n')
    assert refused(path, field).reason.startswith(f"must fit in {bits} bits, got ")


@pytest.mark.parametrize("value", ["1000", "12288", '"3KiB"', "0x1001"])
def test_size_not_a_power_of_two(tmp_path, value):
    path = write(tmp_path, "d.toml", f'model = "ram"\n[ram]\nsize = {value}\n')
    reason = refused(path, "ram.size").reason
    assert reason.startswith("must be a power of two from 4096 to 1073741824, got ")


def test_size_message_names_the_value(tmp_path):
    """The complete one-line message: file, field, reason."""
    path = write(tmp_path, "ram.toml", 'model = "ram"\n[ram]\nsize = 1000\n')
    exc = refused(path, "ram.size")
    assert str(exc) == f"{path}: ram.size: must be a power of two from 4096 to 1073741824, got 1000"


@pytest.mark.parametrize("value", ["0", "-4096", "2048", '"2KiB"', '"2GiB"', str(1 << 31), '"4194304KiB"'])
def test_size_too_small_or_too_large(tmp_path, value):
    path = write(tmp_path, "d.toml", f'model = "ram"\n[ram]\nsize = {value}\n')
    assert refused(path, "ram.size").reason.startswith("must be a power of two from 4096 to 1073741824")


@pytest.mark.parametrize("value", ['"64KB"', '"64kib"', '"lots"', '""', '"-4096"', '"1.5MiB"', '"64 Ki B"'])
def test_bad_size_string(tmp_path, value):
    path = write(tmp_path, "d.toml", f'model = "ram"\n[ram]\nsize = {value}\n')
    assert refused(path, "ram.size").reason.startswith('must be a byte count such as 4096 or "64KiB", got ')


@pytest.mark.parametrize("value", ["true", "4096.0", "[4096]"])
def test_size_of_wrong_type(tmp_path, value):
    path = write(tmp_path, "d.toml", f'model = "ram"\n[ram]\nsize = {value}\n')
    assert refused(path, "ram.size").reason.startswith("must be a byte count, got ")


def test_duplicate_names_across_files(tmp_path):
    first = write(tmp_path, "a.toml", 'model = "ram"\nname = "dup"\n')
    second = write(tmp_path, "b.toml", 'model = "ram"\nname = "dup"\n')
    exc = refused(second, "name", load=load_directory, target=tmp_path)
    assert exc.reason == f"'dup' is already used by {first}"


def test_explicit_name_clashing_with_a_file_stem(tmp_path):
    first = write(tmp_path, "a.toml", 'model = "ram"\nname = "b"\n')
    second = write(tmp_path, "b.toml", 'model = "ram"\n')
    assert refused(second, "name", load=load_directory, target=tmp_path).reason == f"'b' is already used by {first}"


def test_directory_refuses_the_first_bad_file(tmp_path):
    write(tmp_path, "a.toml", 'model = "ram"\n')
    bad = write(tmp_path, "b.toml", 'model = "ram"\n[pci]\nrevision = 256\n')
    refused(bad, "pci.revision", load=load_directory, target=tmp_path)


def test_directory_that_does_not_exist(tmp_path):
    missing = tmp_path / "nope"
    assert refused(missing, "", load=load_directory).reason == "is not a directory of device definitions"


def test_directory_that_is_a_file(tmp_path):
    path = write(tmp_path, "d.toml", 'model = "ram"\n')
    assert refused(path, "", load=load_directory).reason == "is not a directory of device definitions"


def test_directory_without_definitions(tmp_path):
    write(tmp_path, "README.md", "nothing here")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub", "nested.toml", 'model = "ram"\n')  # not searched recursively
    assert refused(tmp_path, "", load=load_directory).reason == "holds no device definitions (*.toml)"
