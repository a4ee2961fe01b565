"""Builds the interposition library (preload/*.c) with the system compiler.

`pip install .` (and the editable install quickstart.sh does) compiles it into
vfiofs/host/libvfiofs_preload.so; `vfiofs run` preloads it. It is a plain shared library
for LD_PRELOAD, not a Python extension, so it gets a plain name.
"""

from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildPreload(build_ext):
    def get_ext_filename(self, fullname: str) -> str:
        *package, name = fullname.split(".")
        return str(Path(*package, name + ".so"))

    def get_export_symbols(self, ext: Extension) -> list[str]:
        return []  # no PyInit_: it is never imported


setup(
    ext_modules=[Extension("vfiofs.host.libvfiofs_preload", sources=sorted(str(p) for p in Path("preload").glob("*.c")),
                           extra_compile_args=["-O2", "-Wall", "-Wextra", "-fvisibility=default"],
                           libraries=["dl"])],
    cmdclass={"build_ext": BuildPreload},
)
