"""Builds the C parts with the system compiler: the interposition library and the examples.

`pip install .` (and the editable install quickstart.sh does) compiles preload/*.c into
vfiofs/host/libvfiofs_preload.so; `vfiofs run` preloads it. It is a plain shared library
for LD_PRELOAD, not a Python extension, so it gets a plain name.

The same step compiles each examples/*.c into a program next to its source
(examples/ioat_driver.c → examples/ioat_driver). The examples are not part of the package;
a compile error fails the install.
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

    def run(self) -> None:
        super().run()  # builds the library and sets up self.compiler
        for source in sorted(Path("examples").glob("*.c")):
            objects = self.compiler.compile([str(source)], output_dir=self.build_temp,
                                            extra_postargs=["-O2", "-Wall", "-Wextra"])
            self.compiler.link_executable(objects, source.stem, output_dir=str(source.parent))


setup(
    ext_modules=[Extension("vfiofs.host.libvfiofs_preload", sources=sorted(str(p) for p in Path("preload").glob("*.c")),
                           extra_compile_args=["-O2", "-Wall", "-Wextra", "-fvisibility=default"],
                           libraries=["dl"])],
    cmdclass={"build_ext": BuildPreload},
)
