"""The layering docs/architecture.md promises, read from the source: who may import whom,
which layers may do I/O, and no import cycles (function-level imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "vfiofs"

#: What each layer may import from vfiofs (prefixes of module names).
ALLOWED = {
    "vfiofs.abi": ("vfiofs.abi", "vfiofs.errors"),
    "vfiofs.core": ("vfiofs.abi", "vfiofs.errors", "vfiofs.core"),
    # drivers use the core's mechanisms and the interfaces it declares, never its state machine
    "vfiofs.iommu": ("vfiofs.abi", "vfiofs.errors", "vfiofs.core.ioctl", "vfiofs.core.usermem", "vfiofs.core.ops",
                     "vfiofs.models.api", "vfiofs.iommu"),
    "vfiofs.pci": ("vfiofs.abi", "vfiofs.errors", "vfiofs.core.ioctl", "vfiofs.core.usermem", "vfiofs.core.ops",
                   "vfiofs.models", "vfiofs.pci"),
    "vfiofs.models": ("vfiofs.abi", "vfiofs.errors", "vfiofs.models"),
}

#: Standard modules that mean I/O (or a clock, or an event loop); the sans-I/O layers use none.
IO_MODULES = {"os", "socket", "select", "subprocess", "fcntl", "mmap", "threading", "time", "pyfuse3", "trio",
              "importlib", "tempfile", "shutil", "signal", "resource", "pathlib.Path.open"}
#: Exceptions, each with its reason.
IO_ALLOWED = {
    ("vfiofs.core.ports", "select"): "only the POLL* constants a poll mask is made of",
}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports, at any depth of the file (TYPE_CHECKING blocks too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            known = modules()
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known)
    return found


MODULES = modules()
GRAPH = {name: {i for i in imports_of(name, path) if i in MODULES} for name, path in MODULES.items()}


def layer_of(name: str) -> str | None:
    return next((layer for layer in ALLOWED if name == layer or name.startswith(layer + ".")), None)


@pytest.mark.parametrize("name", sorted(n for n in MODULES if layer_of(n)))
def test_a_layer_imports_only_what_is_below_it(name):
    allowed = ALLOWED[layer_of(name)]
    wrong = sorted(i for i in imports_of(name, MODULES[name])
                   if i.startswith("vfiofs") and i != "vfiofs"
                   and not any(i == a or i.startswith(a + ".") for a in allowed))
    assert not wrong, f"{name} imports {wrong}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if layer_of(n)))
def test_the_sans_io_layers_do_no_io(name):
    used = {i.split(".")[0] for i in imports_of(name, MODULES[name])}
    wrong = sorted(m for m in used & IO_MODULES if (name, m) not in IO_ALLOWED)
    assert not wrong, f"{name} imports {wrong}"


def test_nothing_below_the_adapter_imports_pyfuse3():
    for name, path in MODULES.items():
        if not name.startswith(("vfiofs.fs", "vfiofs.host")):
            assert "pyfuse3" not in {i.split(".")[0] for i in imports_of(name, path)}, name


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for other in sorted(GRAPH[name]):
            if state.get(other) == 1:
                cycle = stack[stack.index(other):] + [other]
                # a package importing its own submodule (re-exports) is not a cycle of logic
                if not (len(cycle) == 3 and cycle[1].startswith(cycle[0] + ".")):
                    raise AssertionError("import cycle: " + " → ".join(cycle))
            elif other not in state:
                visit(other)
        stack.pop()
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def test_the_rules_see_the_layers():
    """The checks above would pass vacuously if the walk found nothing."""
    assert "vfiofs.core.handles" in MODULES and "vfiofs.pci.vfio_pci" in MODULES
    assert "vfiofs.abi" in GRAPH["vfiofs.pci.vfio_pci"]
