"""Benchmark of the fused sampler steps: ``python -m zsnr_kernels bench`` from a checkout, plus the
pytest-benchmark regression cases.  The benchmark itself lives in :mod:`zsnr_kernels.tools.bench` (so the installed
command line has it); read its docstring for what is measured and how.

    python bench/bench_step.py                        # full table (several minutes: one compile per row)
    python bench/bench_step.py --quick                # about a minute
    python bench/bench_step.py --ops euler_cfg_rescale --shapes 4x4x128x128 --dtypes float32 --csv out.csv
    python -m pytest bench/bench_step.py --benchmark-only -q --benchmark-json=run.json   # regression cases
    python -m zsnr_kernels bench-compare bench/baselines/<kind>.json run.json            # against the baseline

Each case stores in ``extra_info`` its ``x_roof``: its median time over the roof's, measured in the same test right
after it (:func:`zsnr_kernels.tools.bench.roof_us`: the triad over the case's bytes on the case's device, or the
in-kernel noise where that takes longer), with the conditions it ran in (:func:`benchmark_against_roof`).  Times
differ between machines and runs; the ratio is what ``bench-compare`` tracks (:mod:`zsnr_kernels.tools.bench_compare`).
The cases run on one thread with freed memory kept (:func:`pinned_conditions` says why).

``ZSNR_BENCH_SLOWDOWN=0.3`` makes every benchmarked call 30% slower for real (a busy-wait of 0.3 x its fastest
time, measured first, after each call): a run made with it must be flagged by ``bench-compare``.
"""

from __future__ import annotations

import math
import os
import time

import pytest
import torch

import zsnr_kernels as zk
from zsnr_kernels.backends import ext as _ext, registry as _backend
from zsnr_kernels.tools import bench
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
SLOWDOWN = float(os.environ.get("ZSNR_BENCH_SLOWDOWN") or 0.0)
THREADS = int(os.environ.get("ZSNR_BENCH_THREADS") or 1)
ROOF_BUDGET_S, ROOF_ROUNDS = 0.2, 3     # bench.measure of the roof after each case


@pytest.fixture(scope="session", autouse=True)
def pinned_conditions():
    """The cases run on ``THREADS`` threads, the cpu kernels' and PyTorch's alike (1 unless ``ZSNR_BENCH_THREADS``
    says otherwise), with glibc keeping freed memory (:func:`zk.retain_freed_memory`), so that a baseline means
    something on a machine shared with other work and from one process to the next.

    NOTE: beside other processes (load average 4-5 on the 2-core build machine), two runs of the 2-thread
    euler_cfg_rescale 4x4x128x128 fp32 case took medians of 76 us and 31975 us (every call waiting whole 4 ms
    scheduler ticks at a barrier for a worker parked behind another process); on 1 thread, 132 and 127 us, x_roof
    1.97 and 1.90.  With OMP_WAIT_POLICY=passive and 2 threads, 148 and 150 us.  The eager dpmpp_2m 4x4x128x128
    fp32 case page-faulted its temporaries back in on every call in some processes (1504 faults per call; x_roof
    45-64 in three processes); with freed memory kept, 0 faults and x_roof 17.5-17.8.
    """
    before = zk.get_num_threads(), torch.get_num_threads()
    zk.set_num_threads(THREADS)
    torch.set_num_threads(THREADS)
    zk.retain_freed_memory()
    yield
    zk.set_num_threads(before[0])
    torch.set_num_threads(before[1])


@pytest.fixture(scope="session")
def noise_ns() -> float:
    """The cpu kernels' in-kernel noise cost per element, all threads together (measured once per session)."""
    return bench.noise_cost_ns() / zk.get_num_threads() if _ext.available() else 0.0


@pytest.fixture(scope="session")
def machine_kind() -> str:
    return bench.machine_kind()


def slowed(call, fraction: float):
    """``call`` followed by a busy-wait of ``fraction`` x its fastest time (measured here, before the benchmark: the
    median would take in the stalls of a busy machine): a real slowdown of that fraction, which ``bench-compare``
    must flag."""
    fastest: dict[str, float] = {}
    bench.measure({"call": call}, 0.1, 2, mins=fastest)
    extra = fraction * fastest["call"]

    def slow():
        call()
        end = time.perf_counter() + extra
        while time.perf_counter() < end:
            pass

    return slow


def benchmark_against_roof(benchmark, call, nbytes: int, kind: str, noise_us: float = 0.0, device: str = "cpu"):
    """Benchmark ``call``, then time the triad over ``nbytes`` on ``device`` (:func:`bench.measure`) and record in
    ``extra_info`` the case's ``x_roof`` (median / roof) and the conditions: machine kind, threads, cores, load
    average, and the cores other processes used meanwhile.  Nothing is recorded under ``--benchmark-disable``."""
    others = bench.others_cpu()
    benchmark.extra_info.update(bytes=nbytes, machine_kind=kind, threads=THREADS, cores=os.cpu_count(),
                                loadavg=os.getloadavg()[0])
    benchmark(slowed(call, SLOWDOWN) if SLOWDOWN else call)
    if benchmark.disabled:
        return
    triad_s = bench.measure({"triad": triad_fn(nbytes, device)}, ROOF_BUDGET_S, ROOF_ROUNDS, device=device)["triad"]
    roof = bench.roof_us(triad_s * 1e6, noise_us)
    benchmark.extra_info.update(roof_us=roof, x_roof=benchmark.stats.stats.median * 1e6 / roof, others_cpu=others())


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", SHAPES[:2], ids=fmt_shape)
@pytest.mark.parametrize("op", BENCH_OPS)
def test_bench_step(benchmark, op, shape, dtype, backend, noise_ns, machine_kind):
    """One step call per backend; extra_info carries the byte model so GB/s can be recomputed."""
    if backend == "cpu" and not _ext.available():
        pytest.skip(_ext.why_unavailable())
    case = make_case(OPS[op], shape, DTYPES[dtype])
    benchmark.extra_info.update(byte_model=OPS[op].byte_model)
    benchmark_against_roof(benchmark, case.call(backend), case.nbytes, machine_kind,
                           bench.in_kernel_noise_us(OPS[op], backend, math.prod(shape), noise_ns))


@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", SHAPES[:2], ids=fmt_shape)
@pytest.mark.parametrize("op", BENCH_OPS)
def test_bench_step_gpu(benchmark, op, shape, dtype, backend, machine_kind):
    """One step call on CUDA tensors, followed by a synchronization (so a call's kernels are inside its time; the
    synchronization adds a few microseconds).  Skips without a GPU or where the backend refuses the step."""
    if not torch.cuda.is_available():
        pytest.skip("torch.cuda.is_available() is False")
    case = make_case(OPS[op], shape, DTYPES[dtype], "cuda")
    reasons = _backend.not_supported_reasons(backend, case.y)
    if reasons:
        pytest.skip("; ".join(reasons))
    call = case.call(backend)
    benchmark.extra_info.update(byte_model=OPS[op].byte_model)

    def synced():
        call()
        torch.cuda.synchronize()

    benchmark_against_roof(benchmark, synced, case.nbytes, machine_kind, device="cuda")


def test_bench_overhead_euler_small(benchmark, machine_kind):
    """The whole Python call at (1,4,64,64) float32: the < 20 us per-call target."""
    if not _ext.available():
        pytest.skip(_ext.why_unavailable())
    y, f = torch.randn(1, 4, 64, 64), torch.randn(1, 4, 64, 64)
    benchmark_against_roof(benchmark, lambda: zk.euler_step(y, f, SIGMA, SIGMA_NEXT, backend="cpu"),
                           OPS["euler"].elements * y.numel() * y.element_size(), machine_kind)


@pytest.mark.parametrize("shape", SHAPES[:2], ids=fmt_shape)
def test_bench_triad(benchmark, shape, machine_kind):
    """The triad over the headline's bytes (fp32), timed by pytest-benchmark: its x_roof (about 1) shows that the
    two timings of one call agree."""
    case = make_case(OPS[HEADLINE], shape, torch.float32)
    benchmark_against_roof(benchmark, triad_fn(case.nbytes), case.nbytes, machine_kind)


if __name__ == "__main__":
    main(prog="python bench/bench_step.py")
