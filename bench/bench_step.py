"""Benchmark of the eager reference step (the baseline the fused backends are measured against, DESIGN §5).

Byte model of the Euler step with guidance (+ rescale): the update reads y, F_c, F_u and writes y_next (4N
elements); the rescale statistics read F_c and F_u once more (2N).  GB/s below counts those minimum bytes.

    python bench/bench_step.py                       # a table: shape, dtype, median ms, GB/s of the eager step
    python -m pytest bench/bench_step.py --benchmark-only   # pytest-benchmark cases for regression tracking
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

import zsnr_kernels as zk

SHAPES = [(1, 4, 64, 64), (4, 4, 128, 128), (1, 16, 128, 128), (1, 16, 21, 60, 104)]
DTYPES = [torch.float32, torch.bfloat16]


def _inputs(shape, dtype):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(3)]


def euler_guided(y, fc, fu):
    return zk.euler_step(y, (fc, fu), 5.0, 4.0, guidance_scale=7.5, guidance_rescale=0.7, backend="torch").y


def bytes_moved(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return (4 + 2) * n * torch.empty((), dtype=dtype).element_size()


def median_seconds(fn, *args, repeat: int = 20) -> float:
    fn(*args)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:2], ids=str)
def test_bench_euler_guided_reference(benchmark, shape, dtype):
    benchmark(euler_guided, *_inputs(shape, dtype))


if __name__ == "__main__":
    print(f"{'shape':24s} {'dtype':10s} {'median ms':>10s} {'GB/s':>8s}")
    for shape in SHAPES:
        for dtype in DTYPES:
            t = median_seconds(euler_guided, *_inputs(shape, dtype), repeat=5 if len(shape) == 5 else 20)
            print(f"{str(shape):24s} {str(dtype)[6:]:10s} {t * 1e3:10.3f} {bytes_moved(shape, dtype) / t / 1e9:8.2f}")
