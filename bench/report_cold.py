"""Step times with the step's tensors out of cache, as in a sampling loop where the model runs between two steps,
next to the same step repeated on cached tensors (what ``zsnr-kernels bench`` times), for the ``cpu`` backend and
a STREAM triad over the same bytes.

    python bench/report_cold.py [--shape 1x16x21x60x104] [--dtypes float32 bfloat16] [--ops ...] [--repeats 15]

Cold: before each timed call a 512 MiB buffer is written, which evicts the step's tensors (and the interpreter's
working set) from every cache level; the figure is the median over ``--repeats`` such calls.  Warm: the median of
``--repeats`` calls in a row after two untimed ones.  Both are single calls timed with ``time.perf_counter``.
"""

import argparse
import statistics
import time

import torch

import zsnr_kernels as zk
from zsnr_kernels.tools import bench

NOISY_AND_HEADLINE = ("euler_cfg_rescale", "euler", "euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde")


def _median_us(fn, repeats: int, evict=None) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        if evict is not None:
            evict()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="1x16x21x60x104")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--ops", nargs="+", default=list(NOISY_AND_HEADLINE), choices=list(bench.OPS))
    ap.add_argument("--repeats", type=int, default=15)
    a = ap.parse_args(argv)
    shape = tuple(int(s) for s in a.shape.split("x"))
    flush = torch.empty(512 * 2**20 // 4)
    counter = iter(range(1 << 30))

    def evict():
        flush.fill_(float(next(counter)))

    print(f"cpu backend, {zk.get_num_threads()} threads, shape {shape}; us = median of {a.repeats} single calls")
    print(f"{'op':18s} {'dtype':9s} {'cold us':>9s} {'warm us':>9s} {'triad cold':>10s} {'triad warm':>10s} "
          f"{'cold %':>7s} {'warm %':>7s}")
    for dtype in a.dtypes:
        for name in a.ops:
            case = bench.make_case(bench.OPS[name], shape, getattr(torch, dtype))
            step, triad = case.call("cpu"), bench.triad_fn(case.nbytes)
            cold, warm = _median_us(step, a.repeats, evict), _median_us(step, a.repeats)
            t_cold, t_warm = _median_us(triad, a.repeats, evict), _median_us(triad, a.repeats)
            print(f"{name:18s} {dtype:9s} {cold:9.1f} {warm:9.1f} {t_cold:10.1f} {t_warm:10.1f} "
                  f"{100 * t_cold / cold:6.0f}% {100 * t_warm / warm:6.0f}%")


if __name__ == "__main__":
    main()
