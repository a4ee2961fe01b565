"""The pytest plugin (vfiofs/pytest_plugin.py), driven through pytest's own pytester.

Each test writes a small test file into pytester's directory and runs it in a fresh
pytest process with this interpreter, which loads the plugin through its ``pytest11``
entry point as a driver project's pytest would. The inner tests append their mount
points to ``mounts.txt`` so the outer test can check /proc/self/mounts afterwards.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from support import REPO, is_mounted

pytest_plugins = ["pytester"]

TIMEOUT = 120  # seconds for one inner pytest run

RECORD = """
import os, time
from pathlib import Path

import pytest

from vfiofs.client import VFIO_PCI_BAR0_REGION_INDEX as BAR0

HERE = Path(__file__).parent


def record(vfiofs):
    with open(HERE / "mounts.txt", "a") as out:
        out.write(f"{vfiofs.path}\\n")


def read32(dev, offset):
    return int.from_bytes(dev.read(BAR0, offset, 4), "little")
"""



def ram(device: int, size: str = "4KiB") -> str:
    """A RAM device's definition (PCI device id ``device``)."""
    return f'model = "ram"\n[pci]\ndevice = {device:#06x}\n[ram]\nsize = "{size}"\n'


def write_tests(pytester: pytest.Pytester, body: str, name: str = "test_inner") -> Path:
    return pytester.makepyfile(**{name: RECORD + textwrap.dedent(body)})


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=TIMEOUT)


def mounts(pytester: pytest.Pytester) -> list[Path]:
    """The mount points the inner tests recorded; each must be gone, directory and all."""
    recorded = [Path(line) for line in (pytester.path / "mounts.txt").read_text().split()]
    for path in recorded:
        assert not is_mounted(path), f"{path} is still mounted"
        assert not path.parent.exists(), f"{path.parent} was left behind"
    return recorded


def test_default_bundled_devices(pytester: pytest.Pytester) -> None:
    write_tests(pytester, """
        import json

        from vfiofs.client import IommuFd, VfioDevice
        from vfiofs.host.definitions import bundled_directory

        def test_bundled(vfiofs):
            record(vfiofs)
            assert vfiofs.definitions == bundled_directory()
            assert [p.name for p in vfiofs.devices] == [f"vfio{i}" for i in range(6)]
            assert vfiofs.device(4) == vfiofs.path / "vfio" / "devices" / "vfio4"
            assert vfiofs.iommu.exists() and (vfiofs.sys / "bus" / "pci" / "devices").is_dir()
            status = json.loads((vfiofs.path / ".vfiofs" / "status").read_text())
            assert status["open_handles"] == 0  # the iommufd is opened lazily, by the first bind
            dev = vfiofs.bind(4)
            assert isinstance(dev, VfioDevice) and isinstance(vfiofs.iommufd, IommuFd)
            assert read32(dev, 0) == 0x010000ED  # edu
            dev.close()
            assert vfiofs.bind(0).get_region_info(BAR0).size == 64 * 1024
    """)
    run(pytester).assert_outcomes(passed=1)
    assert len(mounts(pytester)) == 1


def test_inline_definitions_dict_and_list(pytester: pytest.Pytester) -> None:
    write_tests(pytester, f"""
        def names(vfiofs):
            return [(vfiofs.sys / "bus/pci/devices" / f"0000:00:{{i + 1:02x}}.0" / "device").read_text().strip()
                    for i in range(len(vfiofs.devices))]

        @pytest.mark.vfiofs_devices({{"alpha": {ram(0xa)!r}, "beta.toml": {ram(0xb, "8KiB")!r}}})
        def test_dict(vfiofs):
            record(vfiofs)
            assert names(vfiofs) == ["0x000a", "0x000b"]
            assert sorted(p.name for p in vfiofs.definitions.iterdir()) == ["00-alpha.toml", "01-beta.toml"]
            assert vfiofs.bind(1).get_region_info(BAR0).size == 8192

        @pytest.mark.vfiofs_devices([{ram(0xc)!r}, {'name = "named"' + chr(10) + ram(0xd)!r}])
        def test_list(vfiofs):
            record(vfiofs)
            assert names(vfiofs) == ["0x000c", "0x000d"]
            assert "name = \\"inline0\\"" in (vfiofs.definitions / "00-inline0.toml").read_text()

        @pytest.mark.vfiofs_devices('model = "ram"')
        def test_one_string(vfiofs):
            record(vfiofs)
            assert len(vfiofs.devices) == 1
    """)
    run(pytester).assert_outcomes(passed=3)
    assert len(set(mounts(pytester))) == 3


def test_definition_file_directory_and_bundled_name(pytester: pytest.Pytester) -> None:
    defs = pytester.mkdir("defs")
    (defs / "b.toml").write_text(ram(0xb))
    (defs / "a.toml").write_text(ram(0xa))
    (pytester.path / "single.toml").write_text(ram(0x5))
    write_tests(pytester, f"""
        def device_ids(vfiofs):
            return [(vfiofs.sys / "bus/pci/devices" / f"0000:00:{{i + 1:02x}}.0" / "device").read_text().strip()
                    for i in range(len(vfiofs.devices))]

        @pytest.mark.vfiofs_devices("single.toml")  # relative to this file
        def test_relative_file(vfiofs):
            record(vfiofs)
            assert device_ids(vfiofs) == ["0x0005"]

        @pytest.mark.vfiofs_devices({str(pytester.path / "single.toml")!r})
        def test_absolute_file(vfiofs):
            record(vfiofs)
            assert device_ids(vfiofs) == ["0x0005"]

        @pytest.mark.vfiofs_devices(HERE / "defs")
        def test_directory(vfiofs):
            record(vfiofs)
            assert vfiofs.definitions == HERE / "defs"  # a single directory is served as it is
            assert device_ids(vfiofs) == ["0x000a", "0x000b"]  # in file-name order

        @pytest.mark.vfiofs_devices("vedu.toml", "defs", ["single.toml", {ram(0x7)!r}], "ram0")
        def test_mix_in_given_order(vfiofs):
            record(vfiofs)
            assert device_ids(vfiofs) == ["0x11e8", "0x000a", "0x000b", "0x0005", "0x0007", "0x5241"]
            assert read32(vfiofs.bind(0), 0) == 0x010000ED

        @pytest.mark.vfiofs_devices("showcase.toml")  # a bundled definition with a ROM image next to it
        def test_bundled_with_rom(vfiofs):
            record(vfiofs)
            rom = vfiofs.bind(0).read(6, 0, 2)
            assert rom == b"\\x55\\xaa"
    """)
    run(pytester).assert_outcomes(passed=5)
    assert len(set(mounts(pytester))) == 5


def test_unmounted_after_failure_and_exception(pytester: pytest.Pytester) -> None:
    write_tests(pytester, """
        def test_fails(vfiofs):
            record(vfiofs)
            vfiofs.bind(4)
            assert False, "the driver is wrong"

        def test_raises(vfiofs):
            record(vfiofs)
            dev = vfiofs.bind(0)
            raise RuntimeError("the driver crashed")

        def test_open_handles_left(vfiofs):
            record(vfiofs)
            from vfiofs.client import VfioDevice
            global LEAK
            LEAK = [VfioDevice(vfiofs.device(i)) for i in range(3)]
            assert False
    """)
    result = run(pytester)
    result.assert_outcomes(failed=3)
    result.stdout.fnmatch_lines(["*- vfiofs daemon log -*"])  # a failed test's report shows the daemon's log
    assert len(set(mounts(pytester))) == 3


def test_unmounted_after_keyboard_interrupt(pytester: pytest.Pytester) -> None:
    write_tests(pytester, """
        def test_interrupted(vfiofs):
            record(vfiofs)
            vfiofs.bind(0)
            raise KeyboardInterrupt
    """)
    result = run(pytester)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert len(mounts(pytester)) == 1


def test_a_daemon_that_dies_during_the_test_fails_its_teardown(pytester: pytest.Pytester) -> None:
    write_tests(pytester, """
        import signal

        @pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGRTMIN + 2])
        def test_killed(vfiofs, signum):
            record(vfiofs)
            os.kill(vfiofs.process.pid, signum)
            vfiofs.process.wait()
    """)
    result = run(pytester)
    result.assert_outcomes(passed=2, errors=2)
    rt = int(__import__("signal").SIGRTMIN) + 2
    result.stdout.fnmatch_lines_random([
        "*the vfiofs daemon was killed by SIGKILL during the test (its last message: *",
        f"*the vfiofs daemon was killed by signal {rt} during the test (its last message: *",
    ])
    assert "Traceback" not in result.stdout.str()
    assert len(set(mounts(pytester))) == 2


def test_mount_failure_is_one_line(pytester: pytest.Pytester) -> None:
    write_tests(pytester, """
        @pytest.mark.vfiofs_devices({"bad": '[[bar]]\\nindex = 0\\nsize = 1000\\n'})
        def test_bad_definition(vfiofs):
            pass

        @pytest.mark.vfiofs_devices("no-such-device.toml")
        def test_unknown_source(vfiofs):
            pass
    """)
    result = run(pytester)
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines([
        "*vfiofs did not mount: bad device definition: inline definition 'bad': bar[[]0[]].size: "
        "must be a power of two*got 1000",
        "*'no-such-device.toml' is not a file or directory*nor a bundled definition*vedu.toml*",
    ])
    assert "Traceback" not in result.stdout.str()


def test_python_model_on_pythonpath(pytester: pytest.Pytester) -> None:
    models = pytester.mkdir("models")
    (models / "answer_model.py").write_text(textwrap.dedent("""
        from vfiofs.models.api import DeviceModel

        class Answer(DeviceModel):
            def bar_read(self, index, offset, size):
                return (42).to_bytes(size, "little")
    """))
    write_tests(pytester, """
        @pytest.mark.vfiofs_pythonpath("models")
        @pytest.mark.vfiofs_devices({"answer": 'model = "answer_model:Answer"\\n[[bar]]\\nindex = 0\\nsize = 4096\\n'})
        def test_model(vfiofs):
            record(vfiofs)
            assert read32(vfiofs.bind(0), 0x10) == 42
    """)
    run(pytester).assert_outcomes(passed=1)
    assert len(mounts(pytester)) == 1


def test_parallel_with_xdist(pytester: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    write_tests(pytester, """
        def together(vfiofs, mine, other):
            record(vfiofs)
            (HERE / mine).write_text(str(vfiofs.path))
            deadline = time.monotonic() + 30
            while not (HERE / other).exists():  # both mounts exist at the same time
                assert time.monotonic() < deadline, "the other test never ran alongside"
                time.sleep(0.01)
            assert (HERE / other).read_text() != str(vfiofs.path)
            assert read32(vfiofs.bind(4), 0) == 0x010000ED

        def test_one(vfiofs):
            together(vfiofs, "one", "two")

        def test_two(vfiofs):
            together(vfiofs, "two", "one")
    """)
    run(pytester, "-n", "2").assert_outcomes(passed=2)
    one, two = mounts(pytester)
    assert one != two


def test_example_driver_tests_pass(pytester: pytest.Pytester) -> None:
    example = REPO / "examples" / "test_my_driver.py"
    pytester.makepyfile(test_my_driver=example.read_text())
    run(pytester).assert_outcomes(passed=4)
