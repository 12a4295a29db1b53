"""Build of the compiled modules; the package metadata lives in pyproject.toml.

Always builds the CPU module ``zsnr_kernels._C`` from ``csrc/bindings.cpp``: pure pybind11, no libtorch,
so one build serves every PyTorch version and takes seconds.  When nvcc is found it also builds the CUDA module
``zsnr_kernels._C_cuda`` (the same binding file with ZSNR_CUDA_MODULE defined, csrc/cuda/step.cu, the static CUDA
runtime: it loads on machines without a CUDA toolkit, and without a driver it loads and reports no device).
Environment switches:

    ZSNR_OPENMP=0|1|auto       OpenMP loops (default auto: on when the compiler accepts -fopenmp)
    ZSNR_BUILD_CUDA=0|1|auto   the CUDA module (default auto: built when nvcc is found, and a failed CUDA build
                               is reported loudly but does not stop the CPU module; 1: nvcc must exist and
                               the build must succeed)
    ZSNR_CUDA_ARCHS="80;90"    compute capabilities to compile for (SASS for each, plus PTX of the newest)
    CUDA_HOME / CUDA_PATH      where nvcc is looked for first (then PATH)

Build metadata (compiler, flags, OpenMP, CUDA) is written to ``zsnr_kernels/_build_info.json`` next to
the module.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext, has_flag
from setuptools import setup

ROOT = Path(__file__).parent.resolve()
VERSION = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
# -fno-trapping-math / -fno-math-errno: no FP exception traps or errno to preserve, so the compiler may
# if-convert and vectorise the dtype conversions; IEEE inf/NaN semantics are kept (no -ffinite-math-only).
# -ffp-contract=off: GCC fuses a * b + c into an FMA wherever the target has one (its default outside ISO C), so
# the AVX2 and AVX-512 kernels would round differently from the baseline ones; every multiply-add that should be
# fused is written as fmaf, which is one rounding on every instruction set.
CXX_FLAGS = ["-O3", "-std=c++17", "-fno-trapping-math", "-fno-math-errno", "-ffp-contract=off"]
CUDA_EXT = "zsnr_kernels._C_cuda"
# nvcc keeps its default --fmad=true: the element math writes every rounding-relevant multiply-add as fmaf
# (see csrc/cuda/step.cu).
NVCC_FLAGS = ["-O3", "-std=c++17", "--threads", "0", "-Xcompiler", "-fPIC,-fvisibility=hidden",
              "-Xptxas", "-warn-spills"]


def _switch(name: str) -> str:
    value = os.environ.get(name, "auto").strip().lower()
    if value not in ("0", "1", "auto"):
        raise SystemExit(f"{name} must be 0, 1 or auto, got {value!r}")
    return value


def _find_nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and Path(root, "bin", "nvcc").is_file():
            return str(Path(root, "bin", "nvcc"))
    return shutil.which("nvcc")


def _cuda_archs() -> list[int]:
    raw = os.environ.get("ZSNR_CUDA_ARCHS", "80;90")
    try:
        archs = sorted({int(a) for a in re.split(r"[;, ]+", raw.strip()) if a})
    except ValueError:
        archs = []
    if not archs:
        raise SystemExit(f"ZSNR_CUDA_ARCHS must list compute capabilities such as '80;90', got {raw!r}")
    return archs


class BuildExt(build_ext):
    """Adds -fopenmp where the compiler takes it, builds the CUDA module with nvcc, writes the build metadata."""

    def build_extension(self, ext):
        if ext.name == CUDA_EXT:
            self._build_cuda(ext)
        else:
            super().build_extension(ext)

    def _build_cuda(self, ext):
        """nvcc compiles step.cu and the binding file (host code, ZSNR_CUDA_MODULE) and links the module against
        the static CUDA runtime.  Under ZSNR_BUILD_CUDA=auto a failure is reported and the module skipped."""
        archs = _cuda_archs()
        gencode = []
        for a in archs:
            code = f"[sm_{a},compute_{a}]" if a == archs[-1] else f"sm_{a}"
            gencode += ["-gencode", f"arch=compute_{a},code={code}"]
        import pybind11

        includes = ["-Icsrc/include", "-Icsrc", f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
        version = [f'-DZSNR_VERSION="{VERSION}"', '-DZSNR_CXX_FLAGS="nvcc ' + " ".join(NVCC_FLAGS) + '"',
                   '-DZSNR_CUDA_ARCHS="' + ";".join(map(str, archs)) + '"']
        tmp = Path(self.build_temp, "cuda")
        tmp.mkdir(parents=True, exist_ok=True)
        out = Path(self.get_ext_fullpath(ext.name))
        out.parent.mkdir(parents=True, exist_ok=True)
        steps = [
            [self._nvcc, "-c", *NVCC_FLAGS, *gencode, *includes, "csrc/cuda/step.cu", "-o", str(tmp / "step.o")],
            [self._nvcc, "-c", *NVCC_FLAGS, *includes, *version, "-DZSNR_CUDA_MODULE", "-x", "c++",
             "csrc/bindings.cpp", "-o", str(tmp / "bindings.o")],
            [self._nvcc, "-shared", "--cudart", "static", *gencode, str(tmp / "step.o"), str(tmp / "bindings.o"),
             "-o", str(out)],
        ]
        try:
            for cmd in steps:
                print(" ".join(cmd), flush=True)
                subprocess.run(cmd, check=True, cwd=ROOT)
        except (OSError, subprocess.CalledProcessError) as exc:
            if self._cuda_switch == "1":
                raise SystemExit(f"ZSNR_BUILD_CUDA=1: building the CUDA module failed: {exc}") from exc
            self._cuda_info = {"built": False, "why": f"the CUDA build failed: {exc}"}
            self.extensions.remove(ext)  # nothing to copy into the package (the CUDA module is listed last)
            banner = "*" * 78
            print(f"{banner}\nzsnr-kernels: the CUDA module was NOT built ({exc}).\nThe CPU module is "
                  f"unaffected; set ZSNR_BUILD_CUDA=0 to skip CUDA or =1 to make this fatal.\n{banner}",
                  file=sys.stderr, flush=True)
            return
        self._cuda_info = {"built": True, "nvcc": self._nvcc, "archs": archs, "flags": NVCC_FLAGS}

    def build_extensions(self):
        self._cuda_switch = _switch("ZSNR_BUILD_CUDA")
        self._nvcc = _find_nvcc() if self._cuda_switch != "0" else None
        if self._cuda_switch == "1" and self._nvcc is None:
            raise SystemExit("ZSNR_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
        if self._nvcc is None:
            why = "ZSNR_BUILD_CUDA=0" if self._cuda_switch == "0" else "nvcc was not found at build time"
            self._cuda_info = {"built": False, "why": why}
            self.extensions = [e for e in self.extensions if e.name != CUDA_EXT]
        openmp = _switch("ZSNR_OPENMP")
        use_openmp = openmp == "1" or (
            openmp == "auto" and self.compiler.compiler_type == "unix" and has_flag(self.compiler, "-fopenmp")
        )
        flags = CXX_FLAGS + (["-fopenmp"] if use_openmp else [])
        for ext in self.extensions:
            if ext.name == CUDA_EXT:
                continue
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
            "cuda": self._cuda_info,
        }
        self._write_info()  # next to the module in the build directory (goes into the wheel)

    def run(self):
        super().run()
        if self.inplace and hasattr(self, "_info"):
            self._write_info()  # next to the module copied into the source tree (pip install -e)

    def _write_info(self):
        out = Path(self.get_ext_fullpath("zsnr_kernels._C")).parent / "_build_info.json"
        out.write_text(json.dumps(self._info, indent=2) + "\n")


# Compile the C++ sources in parallel (ZSNR_BUILD_JOBS, default: all cores).
ParallelCompile("ZSNR_BUILD_JOBS", default=0).install()

ext_modules = [
    Pybind11Extension(
        "zsnr_kernels._C",
        ["csrc/bindings.cpp", "csrc/cpu/step.cpp", "csrc/cpu/kernels_base.cpp", "csrc/cpu/kernels_avx2.cpp",
         "csrc/cpu/kernels_avx512.cpp"],
        include_dirs=["csrc/include", "csrc"],
        cxx_std=17,
    ),
    # built by BuildExt._build_cuda with nvcc (the sources are listed there); dropped when CUDA is not built
    Pybind11Extension(CUDA_EXT, []),
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
