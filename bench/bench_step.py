"""Benchmark of the fused sampler steps: ``python -m zsnr_kernels bench`` from a checkout, plus the
pytest-benchmark regression cases.  The benchmark itself lives in :mod:`zsnr_kernels.tools.bench` (so the installed
command line has it); read its docstring for what is measured and how.

    python bench/bench_step.py                        # full table (several minutes: one compile per row)
    python bench/bench_step.py --quick                # about a minute
    python bench/bench_step.py --ops euler_cfg_rescale --shapes 4x4x128x128 --dtypes float32 --csv out.csv
    python -m pytest bench/bench_step.py --benchmark-only -q     # pytest-benchmark regression cases
"""

from __future__ import annotations

import pytest
import torch

import zsnr_kernels as zk
from zsnr_kernels.backends import ext as _ext, registry as _backend
from zsnr_kernels.tools.bench import (  # noqa: F401  (COLUMNS: the script's interface, read by tests/tools/test_bench_smoke.py)
    COLUMNS,
    DTYPES,
    HEADLINE,
    OPS,
    SHAPES,
    SIGMA,
    SIGMA_NEXT,
    fmt_shape,
    main,
    make_case,
    triad_fn,
)

BENCH_OPS = [HEADLINE, "dpmpp_2m", "euler_ancestral"]


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", SHAPES[:2], ids=fmt_shape)
@pytest.mark.parametrize("op", BENCH_OPS)
def test_bench_step(benchmark, op, shape, dtype, backend):
    """One step call per backend; extra_info carries the byte model so GB/s can be recomputed."""
    if backend == "cpu" and not _ext.available():
        pytest.skip(_ext.why_unavailable())
    case = make_case(OPS[op], shape, DTYPES[dtype])
    benchmark.extra_info.update(bytes=case.nbytes, byte_model=OPS[op].byte_model)
    benchmark(case.call(backend))


@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", SHAPES[:2], ids=fmt_shape)
@pytest.mark.parametrize("op", BENCH_OPS)
def test_bench_step_gpu(benchmark, op, shape, dtype, backend):
    """One step call on CUDA tensors, followed by a synchronization (so a call's kernels are inside its time; the
    synchronization adds a few microseconds).  Skips without a GPU or where the backend refuses the step."""
    if not torch.cuda.is_available():
        pytest.skip("torch.cuda.is_available() is False")
    case = make_case(OPS[op], shape, DTYPES[dtype], "cuda")
    reasons = _backend.not_supported_reasons(backend, case.y)
    if reasons:
        pytest.skip("; ".join(reasons))
    call = case.call(backend)
    benchmark.extra_info.update(bytes=case.nbytes, byte_model=OPS[op].byte_model)

    def synced():
        call()
        torch.cuda.synchronize()

    benchmark(synced)


def test_bench_overhead_euler_small(benchmark):
    """The whole Python call at (1,4,64,64) float32: the < 20 us per-call target."""
    if not _ext.available():
        pytest.skip(_ext.why_unavailable())
    y, f = torch.randn(1, 4, 64, 64), torch.randn(1, 4, 64, 64)
    benchmark(lambda: zk.euler_step(y, f, SIGMA, SIGMA_NEXT, backend="cpu"))


@pytest.mark.parametrize("shape", SHAPES[:2], ids=fmt_shape)
def test_bench_triad(benchmark, shape):
    """The triad over the headline's bytes (fp32): the bandwidth the step ratios are read against."""
    case = make_case(OPS[HEADLINE], shape, torch.float32)
    benchmark.extra_info.update(bytes=case.nbytes)
    benchmark(triad_fn(case.nbytes))


if __name__ == "__main__":
    main(prog="python bench/bench_step.py")
