"""csrc/cuda compiled by nvcc for every target architecture, and the shared headers kept host-clean.

No GPU is needed: nvcc compiles (and ptxas assembles) device code for sm_80 and sm_90 without one.  Warnings are
errors on both sides of nvcc (``-Werror all-warnings``; ptxas ``-warn-spills,-Werror``, so a kernel that spills
registers fails the build).  Skipped when ``nvcc`` is not on PATH.

Floating-point contraction: the default ``--fmad=true`` is kept on purpose.  The element math (combine.h,
philox.h) writes every multiply-add whose rounding matters as an explicit ``fmaf`` and contains no other
``a*b + c``, so contraction cannot change it; the float64 coefficient code could not match the host bit for bit
even with ``--fmad=false``, because CUDA's log/expm1/hypot differ from glibc's by an ulp (coefficients.h
promises ~1 ulp), so ``--fmad=false`` would only slow the kernels down.

The shared headers (csrc/include/zsnr) are also compiled alone as host C++ with ``g++ -Wall -Wextra -Werror``,
and csrc/cuda/step.cuh (the launcher API, no device code) as host C++ when the CUDA headers can be found, so that
the pybind11 module and the CPU backend can include them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
NVCC = shutil.which("nvcc")
GXX = shutil.which("g++")

NVCC_FLAGS = [
    "-c", "-std=c++17",
    "-I", str(CSRC / "include"), "-I", str(CSRC),
    "-Werror", "all-warnings",
    "-Xptxas", "-warn-spills,-Werror",
]

SHARED_HEADERS = ("common.h", "combine.h", "coefficients.h", "philox.h")


def _run(cmd: list[str], cwd: Path, timeout: float = 240) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\nexit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("arch", [80, 90])
def test_step_cu_compiles(arch: int, tmp_path: Path) -> None:
    obj = tmp_path / f"step_sm{arch}.o"
    cmd = [NVCC, *NVCC_FLAGS, "-gencode", f"arch=compute_{arch},code=sm_{arch}",
           str(CSRC / "cuda" / "step.cu"), "-o", str(obj)]
    _run(cmd, tmp_path)
    assert obj.is_file() and obj.stat().st_size > 0


@pytest.mark.skipif(GXX is None, reason="g++ not on PATH")
def test_shared_headers_host_clean(tmp_path: Path) -> None:
    src = tmp_path / "headers.cpp"
    includes = "".join(f'#include "zsnr/{h}"\n' for h in SHARED_HEADERS)
    # Use the templates and inline functions so that their bodies are checked, not only parsed.
    src.write_text(includes + r"""
double use_headers() {
  zsnr::ElemCoeffs c{};
  float z[4];
  zsnr::philox_normal4(1u, 2u, 3u, 0u, 5u, z);
  float acc = zsnr::update<3, true>(c, 1.0f, 2.0f, 3.0f, 4.0f, 5.0f, z[0]);
  acc += zsnr::update<0, false>(c, 1.0f, 2.0f, 0.0f, 0.0f, 0.0f, 0.0f);
  acc += zsnr::carry(c, 1.0f, zsnr::denoise(1.0f, zsnr::guide(1.0f, 2.0f, 3.0f), 0.5f, 0.5f));
  acc += zsnr::update<2, true, true>(c, 1.0f, 2.0f, 3.0f, 4.0f, 5.0f, 6.0f, z[1]);
  acc += zsnr::carry<true>(c, 1.0f, 2.0f, 3.0f);
  double sums[zsnr::kNumSums] = {};
  const zsnr::RescaleSample rs = zsnr::rescale_sample(0.5f, 0.25f, 1.0f, 7.5f, zsnr::rescale_weights(3.0, -0.5));
  for (int i = 0; i < 4; ++i) {
    float gc = 0.0f, g = 0.0f;
    zsnr::rescale_terms<true>(0.5f + i, 0.25f - i, 1.0f + 0.5f * i, rs, &gc, &g);
    sums[zsnr::kSumC] += gc, sums[zsnr::kSumCC] += gc * gc, sums[zsnr::kSumG] += g, sums[zsnr::kSumGG] += g * g;
  }
  float gc0 = 0.0f, g0 = 0.0f;
  zsnr::rescale_terms<false>(0.5f, 0.25f, 0.0f, rs, &gc0, &g0);
  double p = 1.0, q = 1.0;
  zsnr::fold_rescale(zsnr::rescale_factor(sums, 4.0, 0.7), 3.0, -0.5, &p, &q);
  zsnr::Param pz{zsnr::kPredV, 1.0};
  zsnr::StepArgs s{};
  s.sampler = zsnr::kLms;
  s.stage = 1;
  s.sigma = 2.0;
  s.sigma_next = 1.0;
  s.sigma_hat_next = 1.0;
  s.order = 4;
  const zsnr::StepCoeffs sc = zsnr::step_coeffs(pz, s);
  double u = 0.0, t = 0.0;
  zsnr::rescale_space_coeffs(pz, 2.0, zsnr::kSpaceV, &u, &t);
  zsnr::denoise_coeffs(pz, 2.0, &p, &q);
  const double table[2] = {1.0, 2.0};
  return acc + gc0 + g0 + p + q + u + t + sc.a + zsnr::quantize_sigma(1.5, table, 2, 1) +
         zsnr::churn_gamma(1.0, 10, 1.0, 0.0, 10.0);
}
""")
    _run([GXX, "-std=c++17", "-Wall", "-Wextra", "-Werror", "-I", str(CSRC / "include"), "-c", str(src),
          "-o", str(tmp_path / "headers.o")], tmp_path)


def _cuda_include() -> Path | None:
    """The CUDA toolkit's include directory, for compiling step.cuh as host C++."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if NVCC is not None:
        candidates.append(str(Path(os.path.realpath(NVCC)).parent.parent))
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime_api.h").is_file():
            return Path(c) / "include"
    return None


@pytest.mark.skipif(GXX is None or NVCC is None, reason="g++ or nvcc not on PATH")
def test_launcher_header_host_clean(tmp_path: Path) -> None:
    inc = _cuda_include()
    if inc is None:
        pytest.skip("CUDA headers not found (set CUDA_HOME)")
    src = tmp_path / "launcher.cpp"
    src.write_text('#include "cuda/step.cuh"\n'
                   "size_t bytes(int64_t b, int64_t n) { return zsnr::cuda::workspace_bytes(b, n); }\n")
    _run([GXX, "-std=c++17", "-Wall", "-Wextra", "-Werror", "-I", str(CSRC / "include"), "-I", str(CSRC),
          "-I", str(inc), "-c", str(src), "-o", str(tmp_path / "launcher.o")], tmp_path)
