"""pytest plugin: a fresh, private vfiofs mount for every test that asks for it.

Installed with vfiofs (entry point ``pytest11``), so a driver project only has to
``pip install vfiofs`` and use the ``vfiofs`` fixture::

    def test_identification(vfiofs):
        dev = vfiofs.bind(4)                       # the bundled edu device, bound
        assert dev.read(0, 0, 4) == (0x010000ED).to_bytes(4, "little")

Each test gets its own temporary directory with a mount point, a definitions directory
and a state directory, and its own daemon (``python -m vfiofs mount -f``, the same
interpreter as pytest). Nothing is shared between tests, so ``pytest -n auto``
(pytest-xdist) works. The mount is always taken down at teardown: when the test passes,
fails, raises, or is interrupted (Ctrl-C). The daemon gets SIGTERM, then it is killed if
it still runs after 20 s, then the mount is lazily unmounted (``fusermount3 -u -z``) if it
is still there. If the daemon exits on its own with an error during the test, teardown
reports it. When a test fails, its report includes the daemon's log.

The fixture's object (:class:`VfiofsMount`):

- ``path``: the mount root; ``iommu``, ``device(i)``, ``devices`` (every device node,
  in order) and ``sys`` are paths inside it (:class:`pathlib.Path`);
- ``iommufd``: an :class:`~vfiofs.client.IommuFd` opened on first use (lazily, so a test
  that never touches it sees the iommu node unopened) and closed at teardown;
- ``bind(i)``: opens device ``i`` and binds it to ``iommufd``; returns the
  :class:`~vfiofs.client.VfioDevice`, which teardown closes if the test did not;
- ``definitions``: the directory of definitions the daemon serves; ``state_dir``;
  ``log`` (the daemon's messages); ``process`` (the daemon).

Markers:

- ``@pytest.mark.vfiofs_devices(*sources)`` chooses the devices instead of the bundled
  ones. A source is a path to a definition file, a path to a directory of definitions,
  the name of a bundled definition (``"vedu.toml"``, or ``"vedu"``), an inline TOML
  string (anything with a newline or ``=``), a dict of name → TOML text (keyword
  arguments count as one), or a list of any of these. Devices are numbered in the order
  given (a directory's files in name order). Inline definitions without a ``name`` are
  named by their dict key, or ``inline0``, ``inline1``, … . Relative paths are looked up next to the test file,
  then in the current directory. A single directory is served as it is; anything else is
  copied into the test's own definitions directory (a ROM image a definition names is
  linked next to it).
- ``@pytest.mark.vfiofs_pythonpath(*paths)`` puts directories on the daemon's
  ``PYTHONPATH``, where it imports Python device models (``model = "module:Class"``).

The closest marker wins (a function's over its class's or module's ``pytestmark``).
A mount that fails fails the test's setup with the daemon's one-line error.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import pytest

from vfiofs.host import mounting
from vfiofs.host.mounting import MountFailed, MountProcess, exit_description, is_mounted, last_message

if TYPE_CHECKING:
    from vfiofs.client import IommuFd, VfioDevice

MARK_DEVICES = "vfiofs_devices"
MARK_PYTHONPATH = "vfiofs_pythonpath"
READY_TIMEOUT = mounting.READY_TIMEOUT  # seconds for the daemon to report the mount ready
STOP_TIMEOUT = mounting.STOP_TIMEOUT  # seconds for the daemon to unmount and exit after SIGTERM
LOG_LINES = 200  # how much of the daemon's log a failed test's report shows

_ACTIVE = pytest.StashKey["VfiofsMount"]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARK_DEVICES}(*sources): devices the vfiofs fixture serves, in this order: definition files, "
        "directories of definitions, bundled definition names ('vedu.toml'), inline TOML strings, "
        "dicts of name -> TOML, lists of any of these",
    )
    config.addinivalue_line(
        "markers",
        f"{MARK_PYTHONPATH}(*paths): directories on the vfiofs daemon's PYTHONPATH (for Python device models)",
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    mount = item.stash.get(_ACTIVE, None)
    if mount is not None and report.failed and report.when == "call":
        text = mount.log_tail()
        if text.strip():
            report.sections.append(("vfiofs daemon log", text))


class VfiofsMount:
    """A running vfiofs mount of one test (the ``vfiofs`` fixture's value)."""

    def __init__(self, path: Path, definitions: Path, state_dir: Path, log: Path, daemon: MountProcess) -> None:
        self.path = path
        self.definitions = definitions
        self.state_dir = state_dir
        self.log = log
        self._daemon = daemon  # stops the daemon and clears the mount at teardown
        self._iommufd: IommuFd | None = None
        self._bound: list[VfioDevice] = []

    def __repr__(self) -> str:
        return f"<VfiofsMount {self.path} pid={self.process.pid}>"

    @property
    def process(self) -> subprocess.Popen:
        """The daemon's process."""
        return self._daemon.process

    @property
    def iommu(self) -> Path:
        """The emulated /dev/iommu."""
        return self.path / "iommu"

    def device(self, index: int) -> Path:
        """The node of device ``index``, like /dev/vfio/devices/vfioN."""
        return self.path / "vfio" / "devices" / f"vfio{index}"

    @property
    def devices(self) -> list[Path]:
        """Every device node, vfio0 first."""
        folder = self.path / "vfio" / "devices"
        names = [name for name in os.listdir(folder) if name.startswith("vfio") and name[4:].isdigit()]
        return [folder / name for name in sorted(names, key=lambda name: int(name[4:]))]

    @property
    def sys(self) -> Path:
        """The read-only sysfs tree (``sys/bus/pci/devices/<bdf>/...``)."""
        return self.path / "sys"

    @property
    def iommufd(self) -> IommuFd:
        """An open iommufd of this mount, opened on first use and closed at teardown."""
        if self._iommufd is None:
            from vfiofs.client import IommuFd

            self._iommufd = IommuFd(self.iommu)
        return self._iommufd

    def bind(self, index: int) -> VfioDevice:
        """Open device ``index`` and bind it to :attr:`iommufd` (VFIO_DEVICE_BIND_IOMMUFD)."""
        from vfiofs.client import VfioDevice

        device = VfioDevice(self.device(index))
        try:
            device.bind_iommufd(self.iommufd)
        except BaseException:
            device.close()
            raise
        self._bound.append(device)
        return device

    def alive(self) -> bool:
        return self._daemon.alive()

    def log_tail(self, lines: int = LOG_LINES) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _close_handles(self) -> None:
        """Close what the fixture opened, before the daemon goes (afterwards close says ENOTCONN)."""
        for node in [*self._bound, self._iommufd]:
            if node is not None:
                try:
                    node.close()
                except OSError:
                    pass
        self._bound.clear()
        self._iommufd = None


# -- the fixture -------------------------------------------------------------------------------

@pytest.fixture
def vfiofs(request: pytest.FixtureRequest) -> Iterator[VfiofsMount]:
    """A fresh vfiofs mount in a temporary directory, taken down after the test."""
    item = request.node
    here = Path(str(getattr(item, "path", None) or item.fspath)).parent
    base = Path(tempfile.mkdtemp(prefix="vfiofs-")).resolve()
    mountpoint, state_dir, log = base / "mnt", base / "state", base / "daemon.log"
    mount: VfiofsMount | None = None
    died = ""  # why the daemon ended on its own during the test
    try:
        mountpoint.mkdir()
        state_dir.mkdir()
        definitions, origins = _definitions(item.get_closest_marker(MARK_DEVICES), base, here)
        pythonpath = _pythonpath(item.get_closest_marker(MARK_PYTHONPATH), here)
        daemon = _start(mountpoint, definitions, state_dir, log, pythonpath, base, origins)
        mount = VfiofsMount(mountpoint, definitions, state_dir, log, daemon)
        item.stash[_ACTIVE] = mount
        yield mount
        code = daemon.returncode
        if code:
            how = f"was {exit_description(code)}" if code < 0 else f"exited with {exit_description(code)}"
            died = f"the vfiofs daemon {how} during the test (its last message: {_last_line(log)})"
    finally:
        try:
            if mount is not None:
                mount._close_handles()
        finally:
            try:
                if mount is not None:
                    mount._daemon.stop(STOP_TIMEOUT)
            finally:
                if _ACTIVE in item.stash:
                    del item.stash[_ACTIVE]
                if not is_mounted(mountpoint):
                    shutil.rmtree(base, ignore_errors=True)
    if died:
        pytest.fail(died, pytrace=False)


# -- definitions -------------------------------------------------------------------------------

@dataclass
class _Entry:
    stem: str  # the device's default name
    origin: str  # where it came from, for error messages
    text: str | None = None  # inline TOML
    file: Path | None = None  # a definition file
    rom_base: Path | None = None  # what a relative rom.file is relative to


def _definitions(marker: pytest.Mark | None, base: Path, here: Path) -> tuple[Path, dict[str, str]]:
    """The directory the daemon serves, and {file in it: where that definition came from}."""
    from vfiofs.host.definitions import bundled_directory

    if marker is None:
        return bundled_directory(), {}
    sources: list[Any] = list(marker.args)
    if marker.kwargs:
        sources.append(dict(marker.kwargs))
    if len(sources) == 1 and isinstance(sources[0], (str, os.PathLike)) and not _is_inline(sources[0]):
        path = _find(sources[0], here)
        if path is not None and path.is_dir():
            return path, {}  # served as it is, like `vfiofs mount --devices DIR`
    entries: list[_Entry] = []
    inline_count = [0]
    for source in sources:
        _collect(source, here, bundled_directory(), entries, inline_count)
    if not entries:
        pytest.fail(f"@pytest.mark.{MARK_DEVICES}: no device definitions given", pytrace=False)
    return _assemble(entries, base / "definitions")


def _is_inline(value: Any) -> bool:
    return isinstance(value, str) and ("\n" in value or "=" in value)


def _find(value: str | os.PathLike, here: Path) -> Path | None:
    path = Path(value).expanduser()
    for candidate in ([path] if path.is_absolute() else [here / path, Path.cwd() / path]):
        if candidate.exists():
            return candidate.resolve()
    return None


def _collect(source: Any, here: Path, bundled: Path, entries: list[_Entry], inline_count: list[int]) -> None:
    mark = f"@pytest.mark.{MARK_DEVICES}"
    if isinstance(source, dict):
        for name, text in source.items():
            if not isinstance(text, str):
                pytest.fail(f"{mark}: the definition {name!r} must be TOML text, got {type(text).__name__}",
                            pytrace=False)
            stem = str(name)[:-5] if str(name).endswith(".toml") else str(name)
            entries.append(_Entry(stem, f"inline definition {stem!r}", text=text, rom_base=here))
    elif isinstance(source, (list, tuple)):
        for element in source:
            if _is_inline(element):
                stem = f"inline{inline_count[0]}"
                inline_count[0] += 1
                entries.append(_Entry(stem, f"inline definition {stem!r}", text=element, rom_base=here))
            else:
                _collect(element, here, bundled, entries, inline_count)
    elif _is_inline(source):
        _collect([source], here, bundled, entries, inline_count)
    elif isinstance(source, (str, os.PathLike)):
        path = _find(source, here)
        if path is None and isinstance(source, str) and os.sep not in source:
            name = source if source.endswith(".toml") else f"{source}.toml"
            if (bundled / name).is_file():
                path = bundled / name
        if path is None:
            known = ", ".join(sorted(p.name for p in bundled.glob("*.toml")))
            pytest.fail(f"{mark}: {os.fspath(source)!r} is not a file or directory (looked next to the test and "
                        f"in {Path.cwd()}) nor a bundled definition ({known})", pytrace=False)
        if path.is_dir():
            files = sorted(path.glob("*.toml"))
            if not files:
                pytest.fail(f"{mark}: {path} holds no device definitions (*.toml)", pytrace=False)
        else:
            files = [path]
        for file in files:
            entries.append(_Entry(file.stem, str(file), file=file, rom_base=file.parent))
    else:
        pytest.fail(f"{mark}: cannot use {source!r} ({type(source).__name__}): give paths, bundled names, "
                    "TOML strings, dicts or lists", pytrace=False)


def _parse(text: str) -> dict[str, Any] | None:
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return None  # copied unchanged: the daemon reports the error with the right line numbers


def _assemble(entries: list[_Entry], target: Path) -> tuple[Path, dict[str, str]]:
    """Copy the definitions into ``target`` as 00-<name>.toml, 01-…, so they keep the given order.
    A definition without a ``name`` gets its original one, so the prefix does not rename it."""
    target.mkdir()
    width = max(2, len(str(len(entries) - 1)))
    origins: dict[str, str] = {}
    for number, entry in enumerate(entries):
        if entry.text is not None:
            raw = entry.text.encode()
        else:
            assert entry.file is not None
            raw = entry.file.read_bytes()
        file = target / f"{number:0{width}d}-{entry.stem}.toml"
        origins[str(file)] = entry.origin
        try:
            data = _parse(raw.decode("utf-8"))
        except UnicodeDecodeError:
            data = None
        if data is not None:
            if "name" not in data:
                raw = f"name = {json.dumps(entry.stem)}\n".encode() + raw
            rom = data.get("rom")
            if isinstance(rom, dict) and isinstance(rom.get("file"), str) and rom["file"]:
                _link_rom(Path(rom["file"]), entry, target)
        file.write_bytes(raw)
    return target, origins


def _link_rom(name: Path, entry: _Entry, target: Path) -> None:
    if name.is_absolute():
        return
    mark = f"@pytest.mark.{MARK_DEVICES}"
    link = Path(os.path.normpath(target / name))
    if target not in link.parents:
        pytest.fail(f"{mark}: {entry.origin}: rom.file {str(name)!r} is outside the definition's directory; "
                    "give that directory as the only source instead (it is then served as it is)", pytrace=False)
    source = Path(os.path.normpath((entry.rom_base or target) / name))
    if os.path.lexists(link):
        if os.path.realpath(link) != os.path.realpath(source):
            pytest.fail(f"{mark}: {entry.origin}: rom.file {str(name)!r} names a different image than an earlier "
                        "definition's", pytrace=False)
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(source)


def _pythonpath(marker: pytest.Mark | None, here: Path) -> list[Path]:
    if marker is None:
        return []
    paths = []
    for value in marker.args:
        path = _find(value, here)
        if path is None:
            pytest.fail(f"@pytest.mark.{MARK_PYTHONPATH}: {os.fspath(value)!r} does not exist (looked next to "
                        f"the test and in {Path.cwd()})", pytrace=False)
        paths.append(path)
    return paths


# -- the daemon --------------------------------------------------------------------------------

def _start(mountpoint: Path, definitions: Path, state_dir: Path, log: Path, pythonpath: list[Path], cwd: Path,
           origins: dict[str, str]) -> MountProcess:
    """Start ``vfiofs mount -f`` (messages into ``log``) and return once the mount is ready;
    otherwise fail the test with the daemon's one-line error."""
    try:
        return mounting.start(mountpoint, devices=definitions, state_dir=state_dir, pythonpath=pythonpath, log=log,
                              cwd=cwd, timeout=READY_TIMEOUT)
    except MountFailed as exc:
        if exc.timed_out:
            failure = f"vfiofs did not mount {mountpoint} within {READY_TIMEOUT:.0f} s: {_last_line(log)}"
        else:
            reason = exc.reported if exc.reported is not None else _last_line(log)
            for file, origin in origins.items():
                reason = reason.replace(file, origin)
            failure = f"vfiofs did not mount: {reason}"
    pytest.fail(failure, pytrace=False)


def _last_line(log: Path) -> str:
    """The daemon's one-line error ("vfiofs: ..."), or its last message."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        text = ""
    return last_message(text) or "no message (see the daemon's exit status)"
