"""Benchmark of the fused sampler steps: ``python -m zsnr_kernels bench`` from a checkout, plus the
pytest-benchmark regression cases.  The benchmark itself lives in :mod:`zsnr_kernels.tools.bench` (so the installed
command line has it); read its docstring for what is measured and how.

    python bench/bench_step.py                        # full table (several minutes: one compile per row)
    python bench/bench_step.py --quick                # about a minute
    python bench/bench_step.py --ops euler_cfg_rescale --shapes 4x4x128x128 --dtypes float32 --csv out.csv
    python -m pytest bench/bench_step.py --benchmark-only -q --benchmark-json=run.json   # regression cases
    python -m zsnr_kernels bench-compare bench/baselines/<kind>.json run.json            # against the baseline
    python bench/bench_step.py --comm [WORLD]         # a sharded step's communication cost on WORLD gloo processes
                                                      # (default 2; --quick: small latents, tests/distributed)

Each case stores in ``extra_info`` its ``x_roof``: its median time over the roof's, the two timed in interleaved rounds
after pytest-benchmark's own timing (:func:`zsnr_kernels.tools.bench.roof_us`: the triad over the case's bytes on the
case's device, or the in-kernel noise where that takes longer), and ``x_roof_min``, the fastest samples' ratio, with
the conditions it ran in (:func:`benchmark_against_roof`).  Times differ between machines and runs; ``x_roof_min`` is
what ``bench-compare`` tracks (:mod:`zsnr_kernels.tools.bench_compare` says why).
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
ROOF_BUDGET_S, ROOF_ROUNDS = 0.3, 7     # bench.measure of each case and its roof, interleaved


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


def benchmark_against_roof(benchmark, call, nbytes: int, kind: str, noise_elements: int = 0, device: str = "cpu"):
    """Benchmark ``call``, then time it again interleaved with its roof (:func:`bench.measure`: ``ROOF_ROUNDS``
    rounds of the call, the triad over ``nbytes`` on ``device`` and, for a step drawing noise in the cpu kernels,
    the noise of its ``noise_elements`` (:func:`bench.noise_fn`), so a drift of the machine moves them alike) and
    record in ``extra_info`` the case's ``x_roof`` (its median over the roof's, :func:`bench.roof_us`), its
    ``x_roof_min`` (its fastest sample over the roof's: what ``bench-compare`` tracks) and the conditions: machine
    kind, threads, cores, load average, and the cores other processes used meanwhile.  Nothing is recorded under
    ``--benchmark-disable``."""
    others = bench.others_cpu()
    benchmark.extra_info.update(bytes=nbytes, machine_kind=kind, threads=THREADS, cores=os.cpu_count(),
                                loadavg=os.getloadavg()[0])
    timed = slowed(call, SLOWDOWN) if SLOWDOWN else call
    benchmark(timed)
    if benchmark.disabled:
        return
    fns = {"case": timed, "triad": triad_fn(nbytes, device)}
    if noise_elements:
        fns["noise"] = bench.noise_fn(noise_elements)
    fastest: dict[str, float] = {}
    t = bench.measure(fns, ROOF_BUDGET_S, ROOF_ROUNDS, mins=fastest, device=device)
    roof = bench.roof_us(t["triad"] * 1e6, t.get("noise", 0.0) * 1e6 / THREADS)  # the noise: the threads share it
    roof_min = bench.roof_us(fastest["triad"] * 1e6, fastest.get("noise", 0.0) * 1e6 / THREADS)
    benchmark.extra_info.update(roof_us=roof, case_us=t["case"] * 1e6, x_roof=t["case"] * 1e6 / roof,
                                x_roof_min=fastest["case"] * 1e6 / roof_min, others_cpu=others())


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", SHAPES[:2], ids=fmt_shape)
@pytest.mark.parametrize("op", BENCH_OPS)
def test_bench_step(benchmark, op, shape, dtype, backend, machine_kind):
    """One step call per backend; extra_info carries the byte model so GB/s can be recomputed."""
    if backend == "cpu" and not _ext.available():
        pytest.skip(_ext.why_unavailable())
    case = make_case(OPS[op], shape, DTYPES[dtype])
    benchmark.extra_info.update(byte_model=OPS[op].byte_model)
    noise_elements = math.prod(shape) if OPS[op].noisy and backend == "cpu" else 0  # the eager reference reads noise
    benchmark_against_roof(benchmark, case.call(backend), case.nbytes, machine_kind, noise_elements)


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
    """The triad over the headline's bytes (fp32) as a case, timed against itself as the roof: its x_roof and
    x_roof_min (about 1) show how far two interleaved timings of one call can differ."""
    case = make_case(OPS[HEADLINE], shape, torch.float32)
    benchmark_against_roof(benchmark, triad_fn(case.nbytes), case.nbytes, machine_kind)


# ------------------------------------------------------------------------ sharded steps: the communication cost
#
#     python bench/bench_step.py --comm [WORLD]      (default 2 processes; see comm_main)

#: (name, full latent shape, shard dim) of the sharded-step measurement
COMM_CASES = [
    ("video (1,16,21,60,104) / frames", (1, 16, 21, 60, 104), 2),
    ("image (1,16,128,128) / rows", (1, 16, 128, 128), 2),
    ("tokens (1,4096,64) / tokens", (1, 4096, 64), 1),
]
COMM_REPS = 15
#: ``--comm WORLD --quick``: the sharded-sampling tests' latents, a few repetitions (a smoke run)
COMM_QUICK = [("frames (1,4,6,8,8) / frames", (1, 4, 6, 8, 8), 2), ("tokens (2,16,64) / tokens", (2, 16, 64), 1)]
#: what comm_worker times, in the order each repetition runs them
COMM_COLUMNS = ("plain", "sharded", "sharded_explicit", "sharded_before", "sharded_no_rescale", "all_gather", "stats",
                "noise_before")


def _normals_before(shard, y, seeds, step_index):
    """The slice's noise as sharded steps drew it before the kernels took the slice's place (kept to compare with):
    the compiled generator's normals of each sample from its element 0 to the slice's last element, of which the
    slice's are kept and handed to the step as noise=."""
    b, o, lg, inner, off, loc = y.shape[0], shard.outer, shard.total, shard.inner, shard.offset, shard.local
    n = (o - 1) * lg * inner + (off + loc) * inner
    full = torch.empty(b, o * lg * inner, dtype=torch.float32)
    for i, s in enumerate(seeds):
        _ext.C.cpu_philox_normals(full[i].data_ptr(), s, step_index, 0, n)
    return full.view(b, o, lg, inner)[:, :, off:off + loc].reshape(y.shape)


def comm_worker(rank: int, world: int, port: int, cases=None, reps: int = COMM_REPS) -> list | None:
    """One of ``world`` gloo processes on 127.0.0.1 (1 thread each), each holding an uneven slice of every case's
    latent; times, interleaved (every repetition runs each variant once, all ranks started together by a barrier):

    * ``plain``: the fused step on the rank's slice, unsharded (the kernel's own statistics and noise): the step's
      own time;
    * ``sharded``: the sharded step (guidance-rescale statistics of the full latent, one all_gather, and the noise
      drawn by the kernel at the slice's global indices);
    * ``sharded_explicit``: the same with the slice's noise drawn beside the step and passed as noise= (the path of a
      slice that splits the groups of four);
    * ``sharded_before``: the same with the noise drawn as before the kernels took the slice (:func:`_normals_before`);
    * ``sharded_no_rescale``: the sharded step without guidance rescale (no communication);
    * ``all_gather``: the step's one collective alone; ``stats``: the row statistics and merge, no communication;
      ``noise_before``: the normals the old path drew.

    Returns rank 0's rows ``(name, slice sizes, bytes sent per rank per step, {column: median ms})`` (None on other
    ranks), after printing them with the load average."""
    import statistics

    import torch.distributed as dist

    from zsnr_kernels import distributed as zd

    torch.set_num_threads(1)
    zk.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        group = dist.group.WORLD
        rows = []
        load = [os.getloadavg()[0]]
        for name, shape, dim in cases or COMM_CASES:
            n = shape[dim]
            sizes = [n // world + (r < n % world) for r in range(world)]
            local = list(shape)
            local[dim] = sizes[rank]
            g = torch.Generator().manual_seed(rank)
            y, fc, fu = (torch.randn(local, generator=g) for _ in range(3))
            kw = dict(guidance_scale=5.0, guidance_rescale=0.7, backend="cpu")
            shard = zd.layout(y, group, dim, refresh=True)
            sharded = dict(kw, process_group=group, shard_dim=dim)
            step = zk.euler_ancestral_step
            b = shape[0]
            stats = torch.zeros(b, max(sizes), zd.STATS_PER_ROW, dtype=torch.float64)
            bufs = [torch.empty_like(stats) for _ in range(world)]
            one = zd.Shard(None, dim, (sizes[rank],), 0, shard.outer, shard.inner)
            seeds = zk.noise.normalize_seeds(7, b)  # seed=7: sample i gets 7 + i
            fns = {
                "plain": lambda: step(y, (fc, fu), 3.0, 1.0, seed=7, step_index=3, **kw),
                "sharded": lambda: step(y, (fc, fu), 3.0, 1.0, seed=7, step_index=3, **sharded),
                "sharded_explicit": lambda: step(y, (fc, fu), 3.0, 1.0, noise=lambda: zd.global_normal(
                    shard, y, seeds, 3), **sharded),
                "sharded_before": lambda: step(y, (fc, fu), 3.0, 1.0, noise=lambda: _normals_before(
                    shard, y, seeds, 3), **sharded),
                "sharded_no_rescale": lambda: step(y, (fc, fu), 3.0, 1.0, seed=7, step_index=3,
                                                   **dict(sharded, guidance_rescale=0.0)),
                "all_gather": lambda: dist.all_gather(bufs, stats, group=group),
                "stats": lambda: zd.rescale_factors(one, y, fc, fu, 5.0, 0.7, [(0.0, 1.0)]),
                "noise_before": lambda: _normals_before(shard, y, seeds, 3),
            }
            times = {k: [] for k in COMM_COLUMNS}
            for k in COMM_COLUMNS:  # warm up
                dist.barrier(group=group)
                fns[k]()
            for _ in range(reps):
                for k in COMM_COLUMNS:
                    dist.barrier(group=group)
                    t = time.perf_counter()
                    fns[k]()
                    times[k].append(time.perf_counter() - t)
            rows.append((name, sizes, stats.numel() * 8, {k: statistics.median(v) * 1e3 for k, v in times.items()}))
            load.append(os.getloadavg()[0])
        if rank != 0:
            return None
        print(f"load average {load[0]:.2f} at the start, {load[-1]:.2f} at the end ({os.cpu_count()} cores; above "
              f"1.0 on 2 cores: unreliable); {world} gloo processes on 127.0.0.1, 1 thread each; medians of {reps} "
              "interleaved repetitions, ms")
        for name, sizes, nbytes, t in rows:
            print(f"{name}: slices {sizes}; one all_gather per step with guidance rescale: sends {nbytes} B per rank, "
                  f"receives {nbytes * (world - 1)} B; seeded noise: no communication")
            print("   plain step on the slice {plain:.3f} | sharded step {sharded:.3f} (noise beside it "
                  "{sharded_explicit:.3f}, as before {sharded_before:.3f}; no rescale {sharded_no_rescale:.3f}) | "
                  "all_gather alone {all_gather:.3f} | row statistics {stats:.3f} | noise as before "
                  "{noise_before:.3f}".format(**t))
            print(f"   sharded / plain = {t['sharded'] / t['plain']:.2f} (before: "
                  f"{t['sharded_before'] / t['plain']:.2f}); all_gather / plain step = "
                  f"{t['all_gather'] / t['plain']:.3f}")
        return rows
    finally:
        dist.destroy_process_group()


def comm_main(world: int = 2, quick: bool = False, timeout: float = 1800.0) -> int:
    """Start ``world`` gloo processes of :func:`comm_worker` (rank 0 prints the table; ``quick``: :data:`COMM_QUICK`,
    3 repetitions); their exit status."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--comm-rank", str(r), str(world), str(port),
                               *(["--quick"] if quick else [])], env=env) for r in range(world)]
    return max(p.wait(timeout=timeout) for p in procs)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--comm"]:  # --comm [WORLD] [--quick]
        rest = [a for a in sys.argv[2:] if a != "--quick"]
        sys.exit(comm_main(int(rest[0]) if rest else 2, quick="--quick" in sys.argv))
    if sys.argv[1:2] == ["--comm-rank"]:
        quick = "--quick" in sys.argv
        comm_worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), COMM_QUICK if quick else None,
                    3 if quick else COMM_REPS)
    else:
        main(prog="python bench/bench_step.py")
