"""Build of the compiled modules; the package metadata lives in pyproject.toml.

Always builds the CPU module ``zsnr_kernels._C`` from ``csrc/bindings.cpp``: pure pybind11, no libtorch,
so one build serves every PyTorch version.  When nvcc is found it also builds the CUDA module
``zsnr_kernels._C_cuda`` (the same binding file with ZSNR_CUDA_MODULE defined, csrc/cuda/step.cu, the static CUDA
runtime: it loads on machines without a CUDA toolkit, and without a driver it loads and reports no device).
Environment switches:

    ZSNR_OPENMP=0|1|auto       OpenMP loops (default auto: on when the compiler accepts -fopenmp)
    ZSNR_BUILD_CUDA=0|1|auto   the CUDA module (default auto: built when nvcc is found, and a failed CUDA build
                               is reported loudly but does not stop the CPU module; 1: nvcc must exist and
                               the build must succeed)
    ZSNR_CUDA_ARCHS="80;90"    compute capabilities to compile for (SASS for each, plus PTX of the newest)
    CUDA_HOME / CUDA_PATH      where nvcc is looked for first (then PATH)
    ZSNR_BUILD_JOBS=N          parallel compiles (default 0: all cores; 1: one at a time, modules one after the other)

Build metadata (compiler, flags, OpenMP, CUDA) is written to ``zsnr_kernels/_build_info.json`` next to
the module.

Object files are kept in ``build/zsnr-cache/`` under the source tree, one folder per extension and configuration
(compiler and its version, flags, macros, Python ABI, pybind11 version, nvcc and archs), each object stamped with
the hash of its configuration, its source and every header under ``csrc/``: a later build (``pip install -e .``
then ``pip install -e ".[test]"``, or ``pip wheel .``) recompiles only what changed and links the rest, and an
object whose stamp differs is never reused.  ``rm -rf build`` forces a clean build.  The C++ sources compile in
parallel (pybind11's ParallelCompile), and the CUDA module's two compiles run alongside them.

A build ships only what it produced: ``_C*`` modules left in the build directory (or, for an editable install, in
the package directory) by a build of other settings, such as a ``_C_cuda`` module when this one builds no CUDA,
are deleted.
"""

import hashlib
import importlib.machinery
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
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


CACHE = ROOT / "build" / "zsnr-cache"   # object files, kept between builds (see the module docstring)
_STAMP = ".zsnr-key"                     # next to each object: the hash it was compiled for
_object_keys: dict[str, str] = {}        # object path -> the hash it must carry to be reused (filled per extension)


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def _headers_digest() -> str:
    """Hash of every header under csrc/ (any source may include any of them)."""
    files = sorted(p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".h", ".hpp", ".cuh", ".inl"))
    return _digest(*[(str(p.relative_to(ROOT)), p.read_bytes().hex()) for p in files])


def _tool_version(cmd: str) -> str:
    try:
        return subprocess.run([cmd, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "unknown"


def _python_abi() -> list:
    import pybind11

    return [sys.implementation.cache_tag, sysconfig.get_config_var("SOABI"), sys.version, pybind11.__version__]


def _object_key(config: str, src) -> str:
    return _digest(config, _headers_digest(), Path(ROOT, src).read_bytes())


def _is_current(obj, key: str) -> bool:
    stamp = Path(str(obj) + _STAMP)
    return Path(obj).exists() and stamp.exists() and stamp.read_text() == key


def _needs_recompile(obj: str, src: str) -> bool:
    """ParallelCompile's hook (called only when ``obj`` exists): reuse it only if its stamp matches.  The stamp is
    removed before a recompile and written after the extension built, so a failed compile is never reused."""
    key = _object_keys.get(os.path.abspath(obj))
    if key is not None and _is_current(obj, key):
        return False
    Path(obj + _STAMP).unlink(missing_ok=True)
    return True


def _cuda_archs() -> list[int]:
    raw = os.environ.get("ZSNR_CUDA_ARCHS", "80;90")
    try:
        archs = sorted({int(a) for a in re.split(r"[;, ]+", raw.strip()) if a})
    except ValueError:
        archs = []
    if not archs:
        raise SystemExit(f"ZSNR_CUDA_ARCHS must list compute capabilities such as '80;90', got {raw!r}")
    return archs


def _env(*names: str) -> list[str]:
    """The values of environment variables a compiler reads by itself (part of a cache key)."""
    return [f"{n}={os.environ.get(n, '')}" for n in names]


class BuildExt(build_ext):
    """Adds -fopenmp where the compiler takes it, builds the CUDA module with nvcc, writes the build metadata."""

    def build_extension(self, ext):
        t0 = time.perf_counter()
        if ext.name == CUDA_EXT:
            self._build_cuda(ext)
        else:
            self._build_cached(ext)
        print(f"zsnr-kernels: {ext.name} took {time.perf_counter() - t0:.1f} s", flush=True)

    def _build_cached(self, ext):
        """The C++ extension with its objects in a folder of ``CACHE`` keyed by the configuration; only sources
        whose stamp differs are compiled (see :func:`_needs_recompile`), then the module is linked."""
        # The C++ sources compile with compiler_so_cxx (setuptools >= 72: CXX, CXXFLAGS) where it exists, else
        # with compiler_so; both go into the key, with the compilers' versions and the include-path variables.
        cxx = getattr(self.compiler, "compiler_so_cxx", None) or self.compiler.compiler_so
        config = _digest(ext.name, self.compiler.compiler_so, cxx, _tool_version(self.compiler.compiler_so[0]),
                         _tool_version(cxx[0]), ext.extra_compile_args, ext.extra_link_args, ext.define_macros,
                         ext.undef_macros, ext.include_dirs, _env("CPATH", "CPLUS_INCLUDE_PATH", "C_INCLUDE_PATH"),
                         _python_abi())
        obj_dir = CACHE / f"{ext.name.rsplit('.', 1)[-1]}-{config[:16]}"
        objects = self.compiler.object_filenames(ext.sources, output_dir=str(obj_dir))
        keys = {os.path.abspath(o): _object_key(config, src) for o, src in zip(objects, ext.sources)}
        _object_keys.update(keys)
        stale = [o for o, k in keys.items() if not _is_current(o, k)]
        print(f"zsnr-kernels: {ext.name}: compiling {len(stale)} of {len(keys)} sources"
              + (f" ({len(keys) - len(stale)} reused)" if len(stale) < len(keys) else "")
              + f", objects in {obj_dir.relative_to(ROOT)}", flush=True)
        saved = self.build_temp
        self.build_temp = str(obj_dir)
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = saved
        for obj, key in keys.items():  # compiled (or reused) and linked: the objects are good for this key
            Path(obj + _STAMP).write_text(key)

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
        host = os.environ.get("NVCC_CCBIN") or os.environ.get("CXX") or "c++"
        config = _digest(ext.name, self._nvcc, _tool_version(self._nvcc), _tool_version(host), NVCC_FLAGS, gencode,
                         version, _python_abi(), _env("NVCC_PREPEND_FLAGS", "NVCC_APPEND_FLAGS", "NVCC_CCBIN", "CXX",
                                                      "CPATH", "CPLUS_INCLUDE_PATH"))
        tmp = CACHE / f"_C_cuda-{config[:16]}"
        tmp.mkdir(parents=True, exist_ok=True)
        out = Path(self.get_ext_fullpath(ext.name))
        out.parent.mkdir(parents=True, exist_ok=True)
        # (source, object, command): each object is compiled unless its stamp matches; the link always runs.
        compiles = [
            ("csrc/cuda/step.cu", tmp / "step.o",
             [self._nvcc, "-c", *NVCC_FLAGS, *gencode, *includes, "csrc/cuda/step.cu", "-o", str(tmp / "step.o")]),
            ("csrc/bindings.cpp", tmp / "bindings.o",
             [self._nvcc, "-c", *NVCC_FLAGS, *includes, *version, "-DZSNR_CUDA_MODULE", "-x", "c++",
              "csrc/bindings.cpp", "-o", str(tmp / "bindings.o")]),
        ]
        link = [self._nvcc, "-shared", "--cudart", "static", *gencode, str(tmp / "step.o"), str(tmp / "bindings.o"),
                "-o", str(out)]
        todo = [(obj, _object_key(config, src), cmd) for src, obj, cmd in compiles]
        stale = [t for t in todo if not _is_current(t[0], t[1])]
        print(f"zsnr-kernels: {ext.name}: compiling {len(stale)} of {len(todo)} sources with nvcc for sm_"
              + ", sm_".join(map(str, archs)) + (f" ({len(todo) - len(stale)} reused)" if len(stale) < len(todo)
                                                 else "") + f", objects in {tmp.relative_to(ROOT)}", flush=True)
        try:
            for obj, _, cmd in stale:  # the two compiles run side by side (step.cu is the long one)
                Path(str(obj) + _STAMP).unlink(missing_ok=True)
                print(" ".join(cmd), flush=True)
            procs = [subprocess.Popen(cmd, cwd=ROOT) for *_, cmd in stale]
            codes = [proc.wait() for proc in procs]
            for (obj, key, cmd), code in zip(stale, codes):
                if code:
                    raise subprocess.CalledProcessError(code, cmd)
                Path(str(obj) + _STAMP).write_text(key)
            print(" ".join(link), flush=True)
            subprocess.run(link, check=True, cwd=ROOT)
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
        # Always compile (through the stamped object cache) and link: distutils' own check skips a module that is
        # newer than its sources, which reused a module built with other flags or headers.
        self.force = self.compiler.force = True
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
        if len(self.extensions) > 1 and os.environ.get("ZSNR_BUILD_JOBS", "0").strip() != "1":
            self.parallel = len(self.extensions)  # the CUDA module compiles while the C++ one does
        super().build_extensions()
        self._remove_stale(Path(self.get_ext_fullpath("zsnr_kernels._C")).parent, every_python=True)
        self._info = {
            "version": VERSION,
            "compiler": (getattr(self.compiler, "compiler_so_cxx", None) or self.compiler.compiler_so)[0],
            "flags": flags,
            "openmp": use_openmp,
            "cuda": self._cuda_info,
        }
        self._write_info()  # next to the module in the build directory (goes into the wheel)

    def run(self):
        super().run()
        if self.inplace and hasattr(self, "_info"):
            self._remove_stale(Path(self.get_ext_fullpath("zsnr_kernels._C")).parent, every_python=False)
            self._write_info()  # next to the module copied into the source tree (pip install -e)

    def _remove_stale(self, package_dir: Path, every_python: bool):
        """Delete the ``_C*`` modules in ``package_dir`` that this build did not produce (a ``_C_cuda`` of an
        earlier build with CUDA, a ``_C.so`` or ``.abi3.so`` of other settings), so that what ships or loads is
        what these settings built.  ``every_python=False`` (the source tree of an editable install) keeps modules
        that this interpreter would not import (another Python's editable build)."""
        produced = {Path(self.get_ext_fullpath(e.name)).name for e in self.extensions}
        for path in package_dir.glob("_C*"):
            if path.name in produced or not path.is_file():
                continue
            module = path.name.split(".", 1)[0]
            if not every_python and not any(path.name == module + sfx
                                            for sfx in importlib.machinery.EXTENSION_SUFFIXES):
                continue
            print(f"zsnr-kernels: removing {path} (not produced by this build's settings)", flush=True)
            path.unlink()

    def _write_info(self):
        out = Path(self.get_ext_fullpath("zsnr_kernels._C")).parent / "_build_info.json"
        out.write_text(json.dumps(self._info, indent=2) + "\n")


def parallel_compile() -> ParallelCompile:
    """The C++ sources compile in parallel (ZSNR_BUILD_JOBS, default: all cores), reusing stamped objects."""
    return ParallelCompile("ZSNR_BUILD_JOBS", default=0, needs_recompile=_needs_recompile)


def ext_modules() -> list:
    return [
        Pybind11Extension(
            "zsnr_kernels._C",
            ["csrc/bindings.cpp", "csrc/cpu/step.cpp", "csrc/cpu/thread_pool.cpp", "csrc/cpu/kernels_base.cpp",
             "csrc/cpu/kernels_avx2.cpp", "csrc/cpu/kernels_avx512.cpp"],
            include_dirs=["csrc/include", "csrc"],
            cxx_std=17,
        ),
        # built by BuildExt._build_cuda with nvcc (the sources are listed there); dropped when CUDA is not built
        Pybind11Extension(CUDA_EXT, []),
    ]


# setuptools' build backend (pip) and `python setup.py` run this file as __main__; tests/tools/test_build.py imports it.
if __name__ == "__main__":
    parallel_compile().install()
    setup(ext_modules=ext_modules(), cmdclass={"build_ext": BuildExt})
