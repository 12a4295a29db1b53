"""Build of the compiled modules; the package metadata lives in pyproject.toml.

Always builds the CPU module ``zsnr_kernels._C`` from ``csrc/bindings.cpp``: pure pybind11, no libtorch,
so one build serves every PyTorch version and takes seconds.  Environment switches:

    ZSNR_OPENMP=0|1|auto       OpenMP loops (default auto: on when the compiler accepts -fopenmp)
    ZSNR_BUILD_CUDA=0|1|auto   reserved for the CUDA module (not built yet; 1 is an error for now)

Build metadata (compiler, flags, OpenMP, CUDA) is written to ``zsnr_kernels/_build_info.json`` next to
the module.
"""

import json
import os
import re
from pathlib import Path

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext, has_flag
from setuptools import setup

ROOT = Path(__file__).parent.resolve()
VERSION = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
# -fno-trapping-math / -fno-math-errno: no FP exception traps or errno to preserve, so the compiler may
# if-convert and vectorise the dtype conversions; IEEE inf/NaN semantics are kept (no -ffinite-math-only).
CXX_FLAGS = ["-O3", "-std=c++17", "-fno-trapping-math", "-fno-math-errno"]


def _switch(name: str) -> str:
    value = os.environ.get(name, "auto").strip().lower()
    if value not in ("0", "1", "auto"):
        raise SystemExit(f"{name} must be 0, 1 or auto, got {value!r}")
    return value


class BuildExt(build_ext):
    """Adds -fopenmp where the compiler takes it and writes the build metadata."""

    def build_extensions(self):
        openmp = _switch("ZSNR_OPENMP")
        use_openmp = openmp == "1" or (
            openmp == "auto" and self.compiler.compiler_type == "unix" and has_flag(self.compiler, "-fopenmp")
        )
        flags = CXX_FLAGS + (["-fopenmp"] if use_openmp else [])
        for ext in self.extensions:
            ext.extra_compile_args += flags
            if use_openmp:
                ext.extra_link_args += ["-fopenmp"]
            ext.define_macros += [
                ("ZSNR_VERSION", f'"{VERSION}"'),
                ("ZSNR_CXX_FLAGS", '"' + " ".join(flags) + '"'),
            ]
        super().build_extensions()
        self._info = {
            "version": VERSION,
            "compiler": getattr(self.compiler, "compiler_so", [None])[0],
            "flags": flags,
            "openmp": use_openmp,
            "cuda": False,
        }
        self._write_info()  # next to the module in the build directory (goes into the wheel)

    def run(self):
        super().run()
        if self.inplace and hasattr(self, "_info"):
            self._write_info()  # next to the module copied into the source tree (pip install -e)

    def _write_info(self):
        out = Path(self.get_ext_fullpath("zsnr_kernels._C")).parent / "_build_info.json"
        out.write_text(json.dumps(self._info, indent=2) + "\n")


if _switch("ZSNR_BUILD_CUDA") == "1":
    # Room for the CUDA module (csrc/cuda/, ZSNR_CUDA_ARCHS): not implemented yet.
    raise SystemExit("ZSNR_BUILD_CUDA=1: the CUDA module is not implemented yet")

# Compile the C++ sources in parallel (ZSNR_BUILD_JOBS, default: all cores).
ParallelCompile("ZSNR_BUILD_JOBS", default=0).install()

ext_modules = [
    Pybind11Extension(
        "zsnr_kernels._C",
        ["csrc/bindings.cpp", "csrc/cpu/step.cpp", "csrc/cpu/kernels_base.cpp", "csrc/cpu/kernels_avx2.cpp",
         "csrc/cpu/kernels_avx512.cpp"],
        include_dirs=["csrc/include", "csrc"],
        cxx_std=17,
    )
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
