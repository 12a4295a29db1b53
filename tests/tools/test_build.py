"""setup.py's build, on a one-file stand-in module (about a second of compiling; no network):

* a build ships only what its settings produced: a ``_C_cuda`` module (or a ``_C`` of other settings) left in the
  build directory by an earlier build is deleted when this one builds no CUDA, and the build metadata agrees;
* objects are kept in the cache folder and reused only when their stamp (configuration, source, every header under
  ``csrc/``) matches: a second build compiles nothing, a changed header recompiles, other flags use another folder.

The package metadata (licence, readme, Python versions) is checked on ``pyproject.toml``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUFFIX = sysconfig.get_config_var("EXT_SUFFIX")

pytest.importorskip("pybind11", reason="setup.py's build needs pybind11 (pip install pybind11)")

# A module with no pybind11 in it: compiles in a fraction of a second.
TINY = """
#include <Python.h>
#include "tiny.h"
static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&def); }
"""


def _load_setup():
    spec = importlib.util.spec_from_file_location("zsnr_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: defines the build, runs no setup()
    return module


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """setup.py's module with its root moved to a temporary source tree holding one C++ source and one header."""
    st = _load_setup()
    src = tmp_path / "src"
    (src / "csrc").mkdir(parents=True)
    (src / "csrc" / "tiny.cpp").write_text(TINY)
    (src / "csrc" / "tiny.h").write_text("#define TINY 1\n")
    monkeypatch.setattr(st, "ROOT", src)
    monkeypatch.setattr(st, "CACHE", src / "build" / "zsnr-cache")
    monkeypatch.chdir(src)
    monkeypatch.setenv("ZSNR_BUILD_CUDA", "0")
    monkeypatch.setenv("ZSNR_OPENMP", "0")
    monkeypatch.setattr(st, "_object_keys", {})
    return st


def _build(st, build_lib: Path, inplace: bool = False) -> str:
    """Run setup.py's build_ext on the stand-in module (and the CUDA entry, dropped under ZSNR_BUILD_CUDA=0)."""
    from setuptools import Distribution

    exts = [st.Pybind11Extension("zsnr_kernels._C", ["csrc/tiny.cpp"], include_dirs=["csrc"], cxx_std=17),
            st.Pybind11Extension(st.CUDA_EXT, [])]
    dist = Distribution({"name": "zsnr-kernels", "ext_modules": exts, "cmdclass": {"build_ext": st.BuildExt},
                         "packages": ["zsnr_kernels"], "package_dir": {"zsnr_kernels": "zsnr_kernels"}})
    (st.ROOT / "zsnr_kernels").mkdir(exist_ok=True)
    cmd = dist.get_command_obj("build_ext")
    cmd.build_lib, cmd.build_temp, cmd.inplace = str(build_lib), str(build_lib.parent / "temp"), inplace
    out = io.StringIO()
    with st.parallel_compile(), contextlib.redirect_stdout(out):
        cmd.ensure_finalized()
        cmd.run()
    return out.getvalue()


def test_a_build_without_cuda_removes_an_earlier_cuda_module(tiny):
    lib = tiny.ROOT / "build" / "lib"
    pkg = lib / "zsnr_kernels"
    pkg.mkdir(parents=True)
    planted = [pkg / f"_C_cuda{SUFFIX}", pkg / "_C_cuda.so", pkg / "_C.abi3.so"]  # earlier builds' leftovers
    for p in planted:
        p.write_bytes(b"not a module of this build")
    printed = _build(tiny, lib)
    assert sorted(p.name for p in pkg.iterdir()) == sorted([f"_C{SUFFIX}", "_build_info.json"])
    for p in planted:
        assert f"removing {p}" in printed
    info = json.loads((pkg / "_build_info.json").read_text())
    assert info["cuda"] == {"built": False, "why": "ZSNR_BUILD_CUDA=0"} and info["openmp"] is False


def test_an_editable_build_without_cuda_removes_the_in_place_cuda_module(tiny):
    pkg = tiny.ROOT / "zsnr_kernels"
    pkg.mkdir()
    (pkg / f"_C_cuda{SUFFIX}").write_bytes(b"an earlier editable build's CUDA module")
    other_python = pkg / "_C_cuda.cpython-39-x86_64-linux-gnu.so"   # not importable here: another Python's
    other_python.write_bytes(b"another interpreter's build")
    _build(tiny, tiny.ROOT / "build" / "lib", inplace=True)
    assert sorted(p.name for p in pkg.iterdir()) == sorted([f"_C{SUFFIX}", "_build_info.json", other_python.name])
    assert json.loads((pkg / "_build_info.json").read_text())["cuda"]["built"] is False


def test_objects_are_reused_only_while_their_stamp_matches(tiny, monkeypatch):
    lib = tiny.ROOT / "build" / "lib"
    compiled = re.compile(r"_C: compiling (\d) of 1 sources")
    first = _build(tiny, lib)
    assert compiled.search(first)[1] == "1"
    objects = list((tiny.ROOT / "build" / "zsnr-cache").rglob("*.o"))
    assert len(objects) == 1 and Path(str(objects[0]) + tiny._STAMP).is_file()
    assert compiled.search(_build(tiny, lib))[1] == "0"                  # nothing changed: reused, linked

    (tiny.ROOT / "csrc" / "tiny.h").write_text("#define TINY 2\n")       # a header the source includes
    assert compiled.search(_build(tiny, lib))[1] == "1"
    assert compiled.search(_build(tiny, lib))[1] == "0"

    monkeypatch.setenv("ZSNR_OPENMP", "1")                               # other flags: another folder
    assert compiled.search(_build(tiny, lib))[1] == "1"
    assert len({p.parent for p in (tiny.ROOT / "build" / "zsnr-cache").rglob("*.o")}) == 2
    monkeypatch.setenv("ZSNR_OPENMP", "0")                               # and back: the first folder's objects
    assert compiled.search(_build(tiny, lib))[1] == "0"
    assert (lib / "zsnr_kernels" / f"_C{SUFFIX}").is_file()

    for var, value in (("CXXFLAGS", "-O1"), ("CPLUS_INCLUDE_PATH", str(tiny.ROOT))):  # what the compiler reads
        monkeypatch.setenv(var, value)                                    # from the environment (the C++ one:
        assert compiled.search(_build(tiny, lib))[1] == "1", var          # compiler_so_cxx) is in the key too
        monkeypatch.delenv(var)
        assert compiled.search(_build(tiny, lib))[1] == "0", var


def test_a_failed_compile_leaves_no_stamp(tiny):
    lib = tiny.ROOT / "build" / "lib"
    _build(tiny, lib)
    (tiny.ROOT / "csrc" / "tiny.h").write_text("#error broken\n")
    with pytest.raises(Exception, match="error|failed"):
        _build(tiny, lib)
    assert not list((tiny.ROOT / "build" / "zsnr-cache").rglob("*" + tiny._STAMP))
    (tiny.ROOT / "csrc" / "tiny.h").write_text("#define TINY 1\n")       # as before the failure: recompiled
    assert "_C: compiling 1 of 1" in _build(tiny, lib)


def test_package_metadata():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["readme"] == "README.md" and project["license"] == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert "the zsnr-kernels authors" in (ROOT / "LICENSE").read_text()
    versions = [c.rsplit(":: ", 1)[1] for c in project["classifiers"] if re.search(r"Python :: 3\.\d+$", c)]
    assert versions == ["3.10", "3.11", "3.12", "3.13"] and project["requires-python"] == ">=3.10"
