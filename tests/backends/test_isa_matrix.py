"""The tests whose results depend on an instruction set, rerun under every instruction set this CPU has.

Two things round differently from one instruction set to the next: this library's CPU kernels (baseline, AVX2 and
AVX-512 loops, which must give the same bits) and PyTorch itself, whose vectorised kernels compute the oracles
(diffusers, k-diffusion) and the reference.  The main run uses the best of each; a CPU with AVX2 only would take
other paths and, before this test existed, failed where this one passed.  So each lower level runs again here in a
subprocess, with both capped: ``ZSNR_CPU_ISA`` (read by ``zsnr_kernels.backends.ext``) and PyTorch's
``ATEN_CPU_CAPABILITY``, with oneDNN's and MKL's own caps for its convolutions and matrix products.  Levels above
what the CPU has cannot run here: ``tests/backends/test_isa_pinned_bits.py`` checks the kernels of every level
against bits
recorded with AVX-512.  What stays untested on a smaller CPU is PyTorch's own code above the CPU's level (the
oracles' rounding there), which is PyTorch's and the oracles' business.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch
from conftest import inductor_cache_dir

from zsnr_kernels.backends import ext as _ext

TESTS = pathlib.Path(__file__).resolve().parents[1]
# the files whose tolerances meet an instruction set: the kernels against the reference, and the peers as oracles
# (and torch.compile's, whose generated code has the capability's vector width: the main run's later files then also
# check that the compile cache of one capability does not leak into another's, see conftest.py)
FILES = ["backends/test_cpu_backend.py", "api/test_steps.py", "math/test_limits_at_inf.py",
         "math/test_convergence_order.py", "math/test_samplers_vs_k_diffusion.py",
         "integrations/test_k_diffusion_dropins.py", "math/test_steps_vs_diffusers.py",
         "integrations/test_diffusers_schedulers.py", "integrations/test_diffusers_pipelines.py",
         "backends/test_isa_pinned_bits.py", "backends/test_torch_compile.py", "api/test_misuse.py",
         "backends/test_nan_policy.py"]
ATEN = {"baseline": "default", "avx2": "avx2", "avx512": "avx512"}  # ATEN_CPU_CAPABILITY's names
# PyTorch's convolutions (oneDNN) and matrix products (MKL) pick their own instruction sets: capped alike, so the
# diffusers pipelines' UNets run the paths an AVX2-only CPU runs (each variable is ignored by a library not present)
ONEDNN = {"baseline": "SSE41", "avx2": "AVX2", "avx512": "AVX512_CORE"}  # ONEDNN_MAX_CPU_ISA
MKL = {"baseline": "SSE4_2", "avx2": "AVX2", "avx512": "AVX512"}          # MKL_ENABLE_INSTRUCTIONS
TORCH_REPORTS = {"default": "DEFAULT", "avx2": "AVX2", "avx512": "AVX512"}  # get_cpu_capability()'s


def _levels_below_the_best() -> list[str]:
    if not _ext.available():
        return []
    try:
        used = {_ext.C.cpu_limit_isa(level) for level in range(len(_ext.ISA_LEVELS))}
    finally:
        _ext.restore_isa()
    names = [n for n in _ext.ISA_LEVELS if any(u.startswith(n) for u in used)]
    return names[:-1]


@pytest.mark.skipif(os.environ.get("ZSNR_CPU_ISA") is not None, reason="already a capped run")
@pytest.mark.parametrize("level", _levels_below_the_best() or [pytest.param(None, marks=pytest.mark.skip(
    reason="this CPU has one instruction set level (or no compiled module): the main run is the only one"))])
def test_isa_dependent_tests_pass_under_every_lower_instruction_set(level):
    env = dict(os.environ, ZSNR_CPU_ISA=level, ATEN_CPU_CAPABILITY=ATEN[level], ONEDNN_MAX_CPU_ISA=ONEDNN[level],
               MKL_ENABLE_INSTRUCTIONS=MKL[level],
               TORCHINDUCTOR_CACHE_DIR=inductor_cache_dir(TORCH_REPORTS[ATEN[level]]))  # not this run's (conftest)
    probe = ("import torch, zsnr_kernels.backends.ext as e; "
             "print(e.C.cpu_isa(), torch.backends.cpu.get_cpu_capability())")
    got = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    kernels, aten = got.stdout.split()
    assert kernels.startswith(level) and aten == TORCH_REPORTS[ATEN[level]], got.stdout
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                          *(f"tests/{f}" for f in FILES)], cwd=TESTS.parent, env=env, capture_output=True, text=True)
    assert run.returncode == 0, f"under {level}:\n{run.stdout[-6000:]}\n{run.stderr[-2000:]}"


def test_torch_reports_the_capability_it_uses():
    """The probe above relies on PyTorch naming its capability; a PyTorch without it would make the cap silent."""
    assert torch.backends.cpu.get_cpu_capability() in TORCH_REPORTS.values()
