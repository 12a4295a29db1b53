"""Benchmark of the fused sampler steps against eager PyTorch and ``torch.compile`` of it (docs/design.md §5).

For every op x shape x dtype this measures the median time of one step call of each fused backend (``cpu`` on CPU
tensors; ``cuda`` and ``triton`` on CUDA tensors when a GPU is present), its GB/s on the op's byte model (the
minimum bytes the step must move, written next to each op in :data:`OPS`), the percentage of the bandwidth of a
STREAM-style triad ``a = b + s*c`` on float32 buffers moving the same number of bytes on the same device, measured
in the same run, interleaved with the op, and the speed-up against the eager reference (``eager``: the same call
with ``backend="torch"``) and against ``torch.compile(fullgraph=True)`` of :func:`zsnr_kernels.reference.fused_step`
with the same float coefficients (``compile``; compile time excluded).  Absolute times are only comparable within
one run; the ratios are what is reported.

Steps that draw Philox noise in the kernel are bound by computing it, not by memory, on a CPU with few cores: the
table's ``roof%`` is the larger of the triad time and the noise time (elements x the noise cost per element per
core, measured at the start of the run on a cache-resident buffer, / the kernels' threads) over the op's time; for
noise-free ops it equals ``triad%``.

On CPU tensors ``kern%`` is the triad's time over the compiled call alone (``kernel_us``: ``_C.fused_step`` on
the step's record, built once, so without the Python layers and the output allocation): on
small latents the triad runs from cache in tens of microseconds and a call from Python carries about as much
again, so ``triad%`` there measures the Python layers as much as the kernels.

Each row says where the step's bytes live between calls (``where``: ``L2`` within one core's L2, ``LLC`` within the
last-level cache, ``DRAM`` beyond it; sizes from sysfs) and the targets that apply to it (``target``): noise-free
steps >= 85% of roof where the bytes live in DRAM; steps with in-kernel noise >= 70% of roof, judged in L2 by the
compiled call alone (``kernel_us``); the headline >= 10x eager and >= 2x ``torch.compile`` at :data:`TARGET_SHAPES`
where the baseline leaves room for that ratio.  Noise-free steps in cache get no target: their ``triad%`` measures
the Python layers as much as the kernels.  The console prints ``-`` for what was not measured (a skipped baseline)
and where no target applies.  The compiled baseline is compiled in-process and warmed up (:func:`warm_up`) before
it is timed.

On CUDA tensors the times come from CUDA events around back-to-back calls (so they include the host's launch cost
where it exceeds the kernel's); ``graph_us`` is the replay of a CUDA graph of :data:`GRAPH_CALLS` captured calls
divided by that count, the kernel time without launch overhead, which is what matters on small latents; and
``pct_peak`` / ``graph_pct_peak`` give GB/s as a percentage of the device's peak memory bandwidth,
``2 * memory_clock_rate * memory_bus_width / 8`` from ``torch.cuda.get_device_properties`` (where this torch lacks
those fields, of a device-to-device copy measured at start, and the columns are named ``pct_d2d_copy``
/ ``graph_pct_d2d_copy`` instead).  Latents of a few MB stay in the GPU's L2 cache between calls, so their
percentages can exceed 100.

    python -m zsnr_kernels bench                       # full table (several minutes: one compile per row)
    python -m zsnr_kernels bench --quick               # about a minute
    python -m zsnr_kernels bench --ops euler_cfg_rescale --shapes 4x4x128x128 --dtypes float32 --csv out.csv
    python -m zsnr_kernels bench --quick --png bench.png   # GB/s against latent size (pip install "zsnr-kernels[plot]")

``python bench/bench_step.py`` takes the same options; ``python -m pytest bench/bench_step.py --benchmark-only``
runs the pytest-benchmark regression cases (``python -m zsnr_kernels bench-compare`` checks a run of them against
``bench/baselines/``).  After the table, the Python per-call overhead of ``euler_step(..., backend="cpu")`` at
(1,4,64,64) is printed with a breakdown of where the time goes (``--no-overhead`` skips it), then what a sampling
loop pays per step at the video latent, by default, in place, in ``sample()`` and in a ``SamplingPlan``, against
the roof in cache and in DRAM (:func:`loops`; ``--no-loops`` skips it).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import csv
import functools
import io
import math
import os
import platform
import pstats
import re
import statistics
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import zsnr_kernels as zk
from zsnr_kernels import reference
from zsnr_kernels.backends import ext as _ext, registry as _backend
from zsnr_kernels.tools import cli as _cli
from zsnr_kernels import coefficients as co
from zsnr_kernels.parameterization import rescale_space_coeffs

SHAPES = [(1, 4, 64, 64), (4, 4, 128, 128), (1, 16, 128, 128), (1, 16, 21, 60, 104)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TARGET_SHAPES = [(4, 4, 128, 128), (1, 16, 21, 60, 104)]   # where issue 3 sets the targets

#: What ``--backends`` names: the fused backends (library backend names) and the two baselines.
FUSED = {"cpu": "cpu", "cuda": "cuda", "triton": "cuda"}   # fused backend -> device of its tensors
BASELINES = ("eager", "compile")                           # backend="torch"; torch.compile of the reference
BACKENDS = tuple(FUSED) + BASELINES
GRAPH_CALLS = 20   # step calls captured in one CUDA graph (replay time / GRAPH_CALLS = per-call kernel time)

# One mid-schedule step of a v-prediction model: finite sigmas, so every sampler takes its general branch.
SIGMA, SIGMA_NEXT = 5.0, 4.0
SIGMA_PREV = (6.5, 8.0, 10.0)           # history noise levels, newest first
GUIDANCE, RESCALE = 7.5, 0.7            # Lin et al.'s w and phi
SEED, STEP_INDEX = 1234, 3              # Philox noise drawn inside the kernel (no noise read)


# ------------------------------------------------------------------------------------------------- the ops


@dataclass(frozen=True)
class Op:
    """One benchmarked step call and its byte model.

    ``reads`` and ``writes`` name the N-element tensors (in the storage dtype) the update pass must move;
    ``stats_reads`` those the guidance-rescale statistics pass reads before it.  Every call uses
    ``return_denoised=False``, so D is written only where the sampler itself needs it (multistep history).
    """

    name: str
    step: Callable
    sampler: str                          # coefficients.StepArgs.sampler
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    stats_reads: tuple[str, ...] = ()
    guided: bool = False                  # model_output = (F_c, F_u), guidance_scale = 7.5
    rescale: bool = False                 # guidance_rescale = 0.7 (statistics pass)
    n_history: int = 0                    # history tensors passed (newest first)
    stage2: bool = False                  # second call of a two-stage sampler (first stage run untimed)
    noisy: bool = False                   # seed= / step_index=: Philox noise generated in the kernel
    kwargs: dict = field(default_factory=dict)   # sampler options, passed to the step and to StepArgs

    @property
    def elements(self) -> int:
        """N-element tensors moved: the byte model is ``elements * N * itemsize``."""
        return len(self.reads) + len(self.writes) + len(self.stats_reads)

    @property
    def byte_model(self) -> str:
        s = f"{self.elements}N: reads {', '.join(self.reads)}; writes {', '.join(self.writes)}"
        return s + (f"; stats read {', '.join(self.stats_reads)}" if self.stats_reads else "")


OPS = {op.name: op for op in [
    # Headline.  Statistics pass reads F_c, F_u; update reads y, F_c, F_u, writes y_next: 6N.
    Op("euler_cfg_rescale", zk.euler_step, "euler", ("y", "F_c", "F_u"), ("y_next",), ("F_c", "F_u"),
       guided=True, rescale=True),
    # Guidance without rescale: one pass, reads y, F_c, F_u, writes y_next: 4N.
    Op("euler_cfg", zk.euler_step, "euler", ("y", "F_c", "F_u"), ("y_next",), guided=True),
    # Plain Euler: reads y, F, writes y_next: 3N.
    Op("euler", zk.euler_step, "euler", ("y", "F"), ("y_next",)),
    # Ancestral, in-kernel Philox noise (nothing read for it): reads y, F, writes y_next: 3N.
    Op("euler_ancestral", zk.euler_ancestral_step, "euler_ancestral", ("y", "F"), ("y_next",), noisy=True),
    # Heun corrector (stage 2): reads y_2, F_2, D_1, writes y_next: 4N.
    Op("heun_stage2", zk.heun_step, "heun", ("y", "F", "D_1"), ("y_next",), stage2=True),
    # DPM-Solver-2 stage 2: reads y_2, F_2, D_1, writes y_next: 4N.
    Op("dpm_2_stage2", zk.dpm_2_step, "dpm_2", ("y", "F", "D_1"), ("y_next",), stage2=True),
    # DPM++ 2M: reads y, F, D_prev, writes y_next and D (the next step's history): 5N.
    Op("dpmpp_2m", zk.dpmpp_2m_step, "dpmpp_2m", ("y", "F", "D_prev"), ("y_next", "D"), n_history=1),
    # DPM++ 2M SDE, in-kernel noise: reads y, F, D_prev, writes y_next, D: 5N.
    Op("dpmpp_2m_sde", zk.dpmpp_2m_sde_step, "dpmpp_2m_sde", ("y", "F", "D_prev"), ("y_next", "D"),
       n_history=1, noisy=True),
    # DPM++ 3M SDE, in-kernel noise: reads y, F, D_1, D_2, writes y_next, D: 6N.
    Op("dpmpp_3m_sde", zk.dpmpp_3m_sde_step, "dpmpp_3m_sde", ("y", "F", "D_1", "D_2"), ("y_next", "D"),
       n_history=2, noisy=True),
    # DDIM eta = 0 (no noise): reads y, F, writes y_next: 3N.
    Op("ddim", zk.ddim_step, "ddim", ("y", "F"), ("y_next",), kwargs={"eta": 0.0}),
    # RES multistep (from the coefficient table: no C++ mirror): reads y, F, D_prev, writes y_next, D: 5N.
    Op("res_multistep", zk.res_multistep_step, "res_multistep", ("y", "F", "D_prev"), ("y_next", "D"),
       n_history=1),
    # LCM (from the coefficient table), in-kernel noise: reads y, F, writes y_next: 3N.
    Op("lcm", zk.lcm_step, "lcm", ("y", "F"), ("y_next",), noisy=True),
    # CFG++ Euler (from the coefficient table): renoises with F_u, a column of the same pass: reads y, F_c, F_u,
    # writes y_next: 4N, as guided Euler.
    Op("euler_cfg_pp", zk.euler_cfg_pp_step, "euler_cfg_pp", ("y", "F_c", "F_u"), ("y_next",), guided=True),
    # UniPC order 3 with its order-3 corrector (from the coefficient table), both in one pass: reads y, F, D_1, D_2,
    # D_3, writes y_next and D: 7N (separately, UniC and UniP would read y, D, D_1..D_3 twice and write y_c: 12N).
    Op("unipc3", zk.unipc_step, "unipc", ("y", "F", "D_1", "D_2", "D_3"), ("y_next", "D"), n_history=3,
       kwargs={"order": 3, "corrector": 3, "solver_type": "bh2"}),
    # LMS order 4: reads y, F, d_1, d_2, d_3, writes y_next and this step's derivative d: 7N.
    Op("lms4", zk.lms_step, "lms", ("y", "F", "d_1", "d_2", "d_3"), ("y_next", "d"), n_history=3,
       kwargs={"order": 4}),
]}
HEADLINE = "euler_cfg_rescale"
QUICK_OPS = (HEADLINE, "euler", "dpmpp_2m", "dpmpp_3m_sde")


@dataclass
class Case:
    """One op at one shape, dtype and device: the step call per library backend and the reference as a function
    of tensors."""

    op: Op
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: str
    call: Callable[[str], Callable[[], object]]   # library backend -> zero-argument step call
    ref_fn: Callable                                # reference.fused_step with float coefficients
    ref_args: tuple[torch.Tensor, ...]
    nbytes: int
    cpu_record: Callable[[], tuple] | None = None   # -> (the step's _C.fused_step record, what it points to)
    keep: object = None                             # owns the tensors a timed record reads and writes
    warm_calls: int = 0                             # calls of the compiled reference before it was timed
    warm_settled: bool = True                       # whether those calls stopped compiling and settled

    @property
    def y(self) -> torch.Tensor:
        return self.ref_args[0]


def make_case(op: Op, shape, dtype, device: str = "cpu") -> Case:
    """Inputs (seeded, drawn on the CPU and moved to ``device``), the step call, and the reference closure with
    the coefficients the step uses."""
    gen = torch.Generator().manual_seed(0)

    def rnd():
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    y = rnd()
    f_c = rnd()
    f_u = rnd() if op.guided else None
    opts = dict(guidance_scale=GUIDANCE if op.guided else 1.0, guidance_rescale=RESCALE if op.rescale else 0.0,
                return_denoised=False, **op.kwargs)
    if op.noisy:
        opts.update(seed=SEED, step_index=STEP_INDEX)
    hist = [rnd() for _ in range(op.n_history)]
    if op.n_history:
        opts["history"] = list(zip(SIGMA_PREV, hist))
    sigma_eval = SIGMA
    if op.stage2:  # the first stage runs once, outside any timed region (on the reference for CUDA tensors)
        first = op.step(y, rnd(), SIGMA, SIGMA_NEXT, return_denoised=True, backend="auto" if device == "cpu"
                        else "torch", **op.kwargs)
        assert not first.complete
        opts["first"] = first
        y, hist, sigma_eval = first.y, [first.denoised], first.sigma
    model_output = (f_c, f_u) if op.guided else f_c
    # NOTE: the eager reference of a noisy op reads a pre-drawn noise tensor instead of seed=: its Philox in
    # PyTorch ops costs about 4 us per element (70 ms at 1x4x64x64), which would swamp the step it baselines.
    # That favours the eager baseline (one more tensor read, no generation).
    eager_opts = dict(opts)
    if op.noisy:
        del eager_opts["seed"], eager_opts["step_index"]
        eager_opts["noise"] = rnd()

    def call(backend: str):
        kw = eager_opts if backend == "torch" else opts
        return lambda: op.step(y, model_output, SIGMA, SIGMA_NEXT, backend=backend, **kw)

    # The same float coefficients the step computes (as the torch backend, backends/eager.py, does for one sample).
    pz = zk.parameterization("v", 1.0)
    args = co.StepArgs(op.sampler, SIGMA, SIGMA_NEXT, stage=2 if op.stage2 else 1,
                       sigma_prev=SIGMA_PREV[:op.n_history], **op.kwargs)
    c = co.step_coeffs(pz, args)
    p, q = pz.denoise_coeffs(sigma_eval)
    uv = rescale_space_coeffs(pz, sigma_eval, "output")
    n_h = len(c.h)
    keep_d = co.SAMPLERS[op.sampler].keeps == "denoised"  # D is written where the sampler remembers it
    guided, w, phi = op.guided, opts["guidance_scale"], opts["guidance_rescale"]

    def ref_fn(*ts):
        y_, fc_ = ts[0], ts[1]
        fu_ = ts[2] if guided else None
        hs = ts[3 if guided else 2:]
        z = torch.randn_like(y_) if c.e != 0.0 else None
        y_out, d, carry = reference.fused_step(
            y_, fc_, fu_, p=p, q=q, a=c.a, b=c.b, history=tuple(hs[:n_h]), h=c.h, noise=z, e=c.e,
            guidance_scale=w, guidance_rescale=phi, rescale_uv=uv, carry=c.carry, b_u=c.b_u, carry_u=c.carry_u)
        return (y_out,) + ((d,) if keep_d else ()) + ((carry,) if carry is not None else ())

    def cpu_record():
        """The record the cpu backend's step hands ``_C.fused_step`` (contiguous inputs, outputs allocated as the
        step allocates them), and the tensors it points to."""
        from zsnr_kernels import noise as _noise
        from zsnr_kernels.backends import call as _call

        a = args._replace(sigma_prev=tuple(SIGMA_PREV[:len(hist)]))
        fields, sigmas, n_prev = _call.describe(pz, [a], [sigma_eval], w, phi, "output")
        outs = [torch.empty_like(y), torch.empty_like(y) if co.SAMPLERS[a.sampler].keeps_denoised(a.stage) else None,
                torch.empty_like(y) if c.carry is not None else None]  # y_out, D as the step asks, carry
        rec = _call.step_call(y, f_c, f_u, hist, None, *outs, fields, 1, n_prev, sigmas, 0,
                              _noise.step_seeds(SEED, shape[0]) if op.noisy else 0, STEP_INDEX if op.noisy else None)
        return rec, outs

    ref_args = (y, f_c) + ((f_u,) if guided else ()) + tuple(hist)
    nbytes = op.elements * math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return Case(op, tuple(shape), dtype, device, call, ref_fn, ref_args, nbytes, cpu_record)


def noise_cost_ns(elements: int = 1 << 16, budget_s: float = 0.2) -> float:
    """Nanoseconds per element per core of the cpu kernels' in-kernel noise (Philox4x32-10 and Box-Muller, as the
    element pass computes it), on a buffer that stays in cache: the best of repeated fills on this thread."""
    out = torch.empty(elements)
    fill = functools.partial(_ext.C.cpu_philox_normals, out.data_ptr(), 12345, 0, 0, elements)
    return _calibrate(fill, budget_s) * 1e9 / elements


def noise_fn(elements: int) -> Callable[[], object]:
    """The cpu kernels' in-kernel noise of ``elements`` elements (Philox4x32-10 and Box-Muller, as the element pass
    computes it) into a buffer of their own, on the calling thread: the noise roof of a noisy step, to time beside
    the step (``bench/bench_step.py``), so that a drift of the machine moves both."""
    out = torch.empty(elements)

    def fill():  # holds the buffer
        _ext.C.cpu_philox_normals(out.data_ptr(), 12345, 0, 0, elements)

    return fill


def in_kernel_noise_us(op: Op, backend: str, elements: int, noise_ns: float) -> float:
    """Microseconds the cpu kernels' threads take to compute ``op``'s Philox noise over ``elements`` (``noise_ns``
    per element, all threads together: :func:`noise_cost_ns` / threads); 0 where no noise is drawn in the kernel
    (noise-free ops, and other backends: the eager reference reads drawn noise)."""
    return noise_ns * elements / 1e3 if op.noisy and backend == "cpu" else 0.0


def roof_us(triad_us: float, noise_us: float) -> float:
    """The time a step cannot beat (docs/design.md §5): the triad over its bytes, or computing its in-kernel noise
    (:func:`in_kernel_noise_us`) where that takes longer."""
    return max(triad_us, noise_us)


def check_case(case: Case, backend: str) -> None:
    """The reference closure must reproduce the fused ``backend``'s step (noise-free ops): guards the coefficient
    mapping, and that what is timed computes the step."""
    if case.op.noisy:
        return
    got = case.call(backend)().y.float()
    want = case.ref_fn(*case.ref_args)[0].float()
    tol = 5e-2 if case.dtype != torch.float32 else 1e-4
    err = (got - want).abs().max().item()
    if not err <= tol * (1 + want.abs().max().item()):
        raise AssertionError(f"{case.op.name} {case.shape} {case.dtype} {case.device}: reference closure differs "
                             f"from the {backend} step by {err}")


# ------------------------------------------------------------------------------------------------- timing


def triad_fn(nbytes: int, device: str = "cpu") -> Callable[[], object]:
    """STREAM triad a = b + s*c on float32 buffers whose 2 reads + 1 write total ``nbytes``."""
    n = max(1, nbytes // 12)
    b, c, a = (torch.rand(n, device=device) for _ in range(3))
    return lambda: torch.add(b, c, alpha=3.0, out=a)


def _calibrate(fn, warmup_s: float) -> float:
    """Warm ``fn`` up (at least 2 calls, about ``warmup_s``) and return a per-call time estimate."""
    t_end = time.perf_counter() + warmup_s
    fn()
    best, calls = float("inf"), 0
    while calls < 1 or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        calls += 1
    return best


def _sample(fn, inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def _calibrate_cuda(fn, warmup_s: float) -> float:
    """:func:`_calibrate` of ``fn`` followed by a device synchronization (an upper bound of its time)."""
    def synced():
        fn()
        torch.cuda.synchronize()

    return _calibrate(synced, warmup_s)


def _sample_cuda(fn, inner: int) -> float:
    """Seconds per call of ``inner`` back-to-back calls, from CUDA events recorded on the current stream."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(inner):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e-3 / inner


def measure(fns: dict[str, Callable], budget_s: float, rounds: int, min_samples: int = 5,
            sample_s: float = 2e-4, mins: dict | None = None, device: str = "cpu") -> dict[str, float]:
    """Median seconds per call of each function (and the fastest sample of each into ``mins`` if given).

    Each sample times ``inner`` back-to-back calls (enough to last ``sample_s``, so a timer read never dominates
    a microsecond call); the variants are interleaved over ``rounds`` rounds so slow drift of the machine (the
    other core busy, clock changes) hits them all alike; about ``budget_s`` is spent per variant.  On
    ``device="cuda"`` a sample is timed by CUDA events (the functions launch work on the current stream).
    """
    calibrate, sample = (_calibrate, _sample) if device == "cpu" else (_calibrate_cuda, _sample_cuda)
    est = {k: calibrate(f, min(0.05, budget_s / 4)) for k, f in fns.items()}
    inner = {k: max(1, int(sample_s / max(t, 1e-9))) for k, t in est.items()}
    # Functions slower than the budget (the eager reference on video latents) get 3 samples, not min_samples.
    per_round = {k: max(1, math.ceil(max(min_samples if est[k] * inner[k] < budget_s else 3,
                                          budget_s / (est[k] * inner[k])) / rounds)) for k in fns}
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            samples[k] += [sample(f, inner[k]) for _ in range(per_round[k])]
    if mins is not None:
        mins.update({k: min(v) for k, v in samples.items()})
    return {k: statistics.median(v) for k, v in samples.items()}


def cuda_graph(fn: Callable[[], object], calls: int = GRAPH_CALLS) -> Callable[[], object]:
    """Capture ``calls`` back-to-back calls of ``fn`` in a ``torch.cuda.CUDAGraph``; returns its ``replay``.

    ``fn`` is warmed up on a side stream first (as PyTorch's CUDA-graph notes ask); the captured calls reuse the
    graph's private memory pool, so the capture costs about one call's outputs.  Raises what the capture raises
    (a backend that synchronizes with the host or launches outside the current stream cannot be captured).
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    torch.cuda.synchronize()
    return graph.replay


def device_bandwidth(budget_s: float = 0.2) -> tuple[str, float]:
    """``(name, GB/s)`` of the current CUDA device's memory: ``("peak", ...)`` from its properties
    (``2 * memory_clock_rate [kHz] * 1e3 * memory_bus_width [bits] / 8``, DDR: two transfers per clock), or
    ``("d2d_copy", ...)``, a measured device-to-device copy of 256 MiB (read + write), where this torch's
    ``torch.cuda.get_device_properties`` has no memory clock or bus width."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return "peak", 2.0 * clock_khz * 1e3 * bus_bits / 8 / 1e9
    n = 256 << 20
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = measure({"copy": lambda: dst.copy_(src)}, budget_s, 3, device="cuda")["copy"]
    return "d2d_copy", 2 * n / t / 1e9


_n_compiled = 0


def compile_reference(case: Case):
    """``torch.compile(fullgraph=True, dynamic=False)`` of the reference closure, compiled by its first call.

    Dynamo caches compiled graphs on the code object, and every case's closure shares ``ref_fn``'s code: each
    case gets a copy of that code under its own name, so the cases neither hit the recompile limit nor walk
    each other's guards on every call.
    """
    global _n_compiled
    _n_compiled += 1
    f = case.ref_fn
    code = f.__code__.replace(co_name=f"ref_fn_{_n_compiled}")
    fresh = types.FunctionType(code, f.__globals__, code.co_name, f.__defaults__, f.__closure__)
    # NOTE: Inductor compiles in a pool of worker processes by default; on the 2-core build machine the pool kept
    # the cores busy for seconds after the compile, and the compiled call took 20-50 ms there instead of 40 us
    # (euler_cfg_rescale, 1x4x64x64 fp32): a first run printed 17987 us, a rerun 89.6 us.  Compile in this
    # process, shut down a pool an earlier compile started, and warm the call up before it is timed.
    with torch._inductor.config.patch(compile_threads=1):
        fn = torch.compile(fresh, fullgraph=True, dynamic=False)
        fn(*case.ref_args)
    shutdown = getattr(torch._inductor.async_compile, "shutdown_compile_workers", None)
    if shutdown is not None:
        shutdown()
    call = lambda: fn(*case.ref_args)  # noqa: E731
    case.warm_calls, case.warm_settled = warm_up(call)
    return call


def warm_up(fn: Callable[[], object], quiet_s: float = 1.0, settle: int = 5, max_s: float = 10.0) -> tuple[int, bool]:
    """Call a compiled ``fn`` until it stops recompiling and its time settles: at least ``settle`` calls and
    ``quiet_s`` seconds since the last call that compiled a new graph or was less than half the fastest call before
    it (at most ``max_s`` seconds in all).  Returns the calls made and whether it settled.

    NOTE: right after a compile, calls of the compiled reference took 24-56 ms for 0.5-7 s on the loaded 2-core
    machine, then 40 us (euler_cfg_rescale, 1x4x64x64 fp32): a stretch of equally slow calls looks steady, so the
    warm-up waits for a quiet second after the last improvement rather than for a few similar calls.
    """
    from torch._dynamo.utils import counters

    best, calls, settled = math.inf, 0, False
    start = last_change = time.perf_counter()
    since = 0
    while True:
        graphs = counters["stats"]["unique_graphs"]
        t0 = time.perf_counter()
        fn()
        now = time.perf_counter()
        calls += 1
        if counters["stats"]["unique_graphs"] != graphs or now - t0 < 0.5 * best:
            last_change, since = now, 0
        else:
            since += 1
        best = min(best, now - t0)
        if since >= settle and now - last_change >= quiet_s:
            settled = True
            break
        if now - start >= max_s:
            break
    return calls, settled


# ------------------------------------------------------------------------------------------------- the table


def machine_info(devices=("cpu",)) -> dict[str, str]:
    """The machine and versions, written into every CSV row (with the GPU where ``"cuda"`` is in ``devices``)."""
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), model)
    except OSError:
        pass
    info = {
        "cpu_model": model,
        "cores": str(os.cpu_count()),
        "omp_threads": str(torch.get_num_threads()),
        "isa": _ext.C.cpu_isa() if _ext.available() else "unavailable",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg_1min": f"{os.getloadavg()[0]:.2f}",   # other work on the machine skews every timing
    }
    caches = cache_sizes()
    info.update(l2_kib=str(caches[0] >> 10) if caches else "", llc_kib=str(caches[1] >> 10) if caches else "")
    if "cuda" in devices:
        info.update(gpu=torch.cuda.get_device_name(), cuda=str(torch.version.cuda))
    return info


def others_cpu() -> Callable[[], float]:
    """Start counting the CPU time other processes take; the function returned gives their average use since this
    call, in cores (NaN where ``/proc/stat`` is not readable).  The load average cannot say it: it counts this
    process's own threads, and lags by a minute.  Hypervisor steal time counts as other processes'."""
    def busy_s() -> float:   # CPU seconds all cores were busy since boot
        with open("/proc/stat") as fh:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fh.readline().split()[1:9])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    try:
        busy0 = busy_s()
    except (OSError, ValueError):
        return lambda: float("nan")
    own0, t0 = time.process_time(), time.perf_counter()
    # /proc/stat counts clock ticks (10 ms): over a second, a resolution of about 0.01 core
    return lambda: max(0.0, busy_s() - busy0 - (time.process_time() - own0)) / (time.perf_counter() - t0)


def contended(others: float, threads: int, cores: int | None = None) -> bool:
    """Whether other processes (their CPU use in cores, :func:`others_cpu`) took more than a tenth of a core beyond
    the cores a run's ``threads`` left free: its threads then waited for a core a tenth of the time or more (up to
    a scheduler tick a wait: 4 ms on the build machine, CONFIG_HZ=250), and its times and ratios are unreliable."""
    return others > max(0, (cores or os.cpu_count()) - threads) + 0.1


def machine_kind(info: dict | None = None) -> str:
    """The kind of machine a run was made on, as a file name: the CPU model, architecture, the cpu kernels'
    instruction set and the cores, e.g. ``amd-epyc-x86_64-avx512-2c``.  Times differ between machines; ratios to
    the roof measured in the same run carry over between machines of one kind (``bench/baselines/<kind>.json``)."""
    info = info or machine_info()
    model = re.sub(r"[^a-z0-9]+", "-", info["cpu_model"].lower()).strip("-")
    return f"{model}-{platform.machine()}-{info['isa']}-{info['cores']}c"


#: CSV columns, one row per device x op x shape x dtype x backend.  ``us`` is the backend's median time per call,
#: ``gbps`` the byte model over it, ``pct_triad`` the triad's time over it (same bytes, same device); ``x_eager``
#: and ``x_compile`` the baselines' times over it; ``graph_*`` the CUDA-graph replay (fused CUDA backends);
#: ``noise_us`` the time the cpu kernels' threads need to compute the op's in-kernel noise (0 without),
#: ``pct_roof`` max(triad_us, noise_us) over ``us``; ``kernel_us`` the compiled call alone (cpu backend, see the
#: module docstring) and ``pct_triad_kernel`` the triad's time over it.
COLUMNS = ["device", "op", "shape", "dtype", "backend", "byte_model", "bytes", "elements", "us", "gbps",
           "triad_us", "triad_gbps", "pct_triad", "noise_us", "pct_roof", "eager_us", "x_eager", "compile_us",
           "x_compile", "graph_us", "graph_gbps", "kernel_us", "pct_triad_kernel", "where", "target", "loadavg",
           "spread"]


def bandwidth_columns(ref: str) -> list[str]:
    """The CUDA columns against the device bandwidth ``ref`` (``"peak"`` or ``"d2d_copy"``, see
    :func:`device_bandwidth`): its GB/s, and the percentage of it per call and per graph replay."""
    return [f"{ref}_gbps", f"pct_{ref}", f"graph_pct_{ref}"]


def cache_sizes() -> tuple[int, int] | None:
    """``(L2 bytes per core, last-level cache bytes)`` of CPU 0 from sysfs, or ``None`` where it is not readable."""
    sizes: dict[int, int] = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            if not entry.startswith("index"):
                continue
            with open(f"{base}/{entry}/level") as fh:
                level = int(fh.read())
            with open(f"{base}/{entry}/type") as fh:
                kind = fh.read().strip()
            with open(f"{base}/{entry}/size") as fh:
                text = fh.read().strip().upper()
            size = int(text.rstrip("KMG")) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            if kind in ("Unified", "Data"):
                sizes[level] = max(size, sizes.get(level, 0))
    except (OSError, ValueError):
        return None
    return (sizes[2], max(sizes.items())[1]) if 2 in sizes else None


def regime(nbytes: int, caches: tuple[int, int] | None) -> str:
    """Where a step's tensors live between calls: ``"L2"`` (they fit one core's L2), ``"DRAM"`` (they exceed the
    last-level cache), ``"LLC"`` between, ``"?"`` where the cache sizes are unknown."""
    if caches is None:
        return "?"
    l2, llc = caches
    return "L2" if nbytes <= l2 else "DRAM" if nbytes > llc else "LLC"


#: The performance method's targets for the cpu backend, as % of roof: noise-free steps on latents that live in DRAM
#: (the roof is the triad there), and noisy steps (the roof is the larger of the triad and the in-kernel noise).
#: Small latents (in L2) are judged by the compiled call alone (``kernel_us``), not by the call from Python.
TARGET_NOISE_FREE_DRAM, TARGET_NOISY = 85.0, 70.0
#: The headline's ratios (at the shapes issue 3 names), targets only where a baseline is not itself near the roof:
#: a ratio above 1 / (the baseline's share of the roof) cannot exist.
TARGET_X_EAGER, TARGET_X_COMPILE = 10.0, 2.0


def _target(op: Op, shape, row: dict, where: str) -> str:
    """The targets that apply to this row (see :data:`TARGET_NOISY`), as ``ok: ...`` or ``MISS: ...``, or ``-``
    where none applies (baselines, GPU rows, noise-free steps on latents in cache)."""
    if row["backend"] != "cpu":
        return "-"
    checks = []  # (label, value, target, unit)
    if where == "L2":  # the compiled call alone against the in-cache roof
        kern_roof = 100.0 * roof_us(row["triad_us"], row["noise_us"]) / row["kernel_us"]
        if op.noisy and kern_roof == kern_roof:
            checks.append(("kern roof", kern_roof, TARGET_NOISY, "%"))
    elif op.noisy:
        checks.append(("roof", row["pct_roof"], TARGET_NOISY, "%"))
    elif where == "DRAM":
        checks.append(("roof", row["pct_roof"], TARGET_NOISE_FREE_DRAM, "%"))
    if op.name == HEADLINE and tuple(shape) in TARGET_SHAPES:
        for name, key, want in (("eager", "eager_us", TARGET_X_EAGER), ("compile", "compile_us", TARGET_X_COMPILE)):
            base = row[key]
            if base == base and row["triad_us"] / base < 1.0 / want:  # measured, and the ratio can exist
                checks.append((f"x {name}", base / row["us"], want, "x"))
    if not checks:
        return "-"
    miss = [c for c in checks if not c[1] >= c[2]]
    fmt = [f"{label} {v:.0f}{u}{'<' if c in miss else '>='}{t:.0f}" if u == "%" else
           f"{label} {v:.1f}{u}{'<' if c in miss else '>='}{t:.0f}" for c in checks for label, v, t, u in [c]]
    return ("MISS: " if miss else "ok: ") + ", ".join(fmt)


def fmt_shape(shape) -> str:
    return "x".join(map(str, shape))


def parse_shape(s: str) -> tuple[int, ...]:
    shape = tuple(int(v) for v in s.lower().replace(",", "x").strip("()").split("x") if v)
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"a shape is positive sizes joined by x, like 4x4x128x128, not {s!r}")
    return shape


_BW_LABEL = {"peak": "%peak", "d2d_copy": "%copy"}   # console headers of the pct_<bandwidth> columns


def _header(device: str, bw: str | None) -> str:
    gpu = f" {_BW_LABEL[bw]:>6s} {'graph us':>9s} {'g' + _BW_LABEL[bw]:>7s}" if device == "cuda" else ""
    return (f"{'op':18s} {'shape':15s} {'dtype':8s} {'bytes':>4s} {'backend':7s} {'us':>9s} {'GB/s':>6s} "
            f"{'triad%':>6s} {'roof%':>5s} {'kern%':>5s}{gpu} {'eager us':>10s} {'x eager':>7s} {'compile us':>10s} "
            f"{'x comp':>6s} {'in':>4s}  target")


def _legend(caches) -> str:
    sizes = (f"L2 {caches[0] >> 10} KiB per core, last-level cache {caches[1] >> 20} MiB" if caches else
             "cache sizes unknown")
    return (f"in: where the step's bytes live ({sizes}): L2, LLC, or DRAM beyond it; target: noise-free steps "
            f">= {TARGET_NOISE_FREE_DRAM:.0f}% of roof in DRAM, noisy steps >= {TARGET_NOISY:.0f}% of roof (in L2: of "
            f"the compiled call alone, kern roof); the headline >= {TARGET_X_EAGER:.0f}x eager and "
            f">= {TARGET_X_COMPILE:.0f}x compile at {', '.join(map(fmt_shape, TARGET_SHAPES))} where the baseline "
            "leaves room for it; '-': not measured (skipped, see above) or no target applies")


def _num(v: float, width: int, fmt: str, unit: str = "") -> str:
    """``v`` formatted to ``width`` characters (with its unit), or ``-`` there where it was not measured (NaN)."""
    return f"{v:{fmt}}{unit}".rjust(width) if v == v else "-".rjust(width)


def _line(row: dict, elements: int, bw: str | None) -> str:
    gpu = ""
    if row["device"] == "cuda":
        gpu = (f" {_num(row[f'pct_{bw}'], 6, '.0f', '%')} {_num(row['graph_us'], 9, '.1f')}"
               f" {_num(row[f'graph_pct_{bw}'], 7, '.0f', '%')}")
    return (f"{row['op']:18s} {row['shape']:15s} {row['dtype']:8s} {elements:>4d}N {row['backend']:7s} "
            f"{row['us']:9.1f} {row['gbps']:6.1f} {_num(row['pct_triad'], 6, '.0f', '%')} "
            f"{_num(row['pct_roof'], 5, '.0f', '%')} {_num(row['pct_triad_kernel'], 5, '.0f', '%')}{gpu} "
            f"{_num(row['eager_us'], 10, '.1f')} {_num(row['x_eager'], 7, '.1f', 'x')} "
            f"{_num(row['compile_us'], 10, '.1f')} {_num(row['x_compile'], 6, '.2f', 'x')} {row['where']:>4s}  "
            f"{row['target']}")


@dataclass
class Plan:
    """What one run measures: the fused backends and baselines per device, and the device bandwidth on CUDA."""

    fused: dict[str, list[str]]           # device -> fused backends to time there
    baselines: tuple[str, ...]            # subset of BASELINES
    compile_ops: frozenset = frozenset()  # ops given the torch.compile baseline
    bandwidth: tuple[str, float] | None = None   # device_bandwidth() when CUDA is timed


def _skip(reasons_seen: set, out, what: str, why: str) -> None:
    if (what, why) not in reasons_seen:
        reasons_seen.add((what, why))
        print(f"skipped {what}: {why}", file=out)


def run_table(ops, shapes, dtypes, plan: Plan, *, quick: bool, out=None, on_row=None) -> list[dict]:
    """Measure and print every device x op x shape x dtype of ``plan``; ``on_row(row)`` is called as each row is
    measured (the CSV is written as it goes).  A backend that refuses a case is skipped with its reason printed."""
    out = out or sys.stdout
    budget, rounds = (0.04, 2) if quick else (0.3, 3)
    rows: list[dict] = []
    seen: set = set()
    bw = plan.bandwidth[0] if plan.bandwidth else None
    for device, fused in plan.fused.items():
        # Build every case (and compile its reference) first, then measure them back to back: the compiles take
        # minutes of CPU, the measurements then run in one short stretch.
        todo = []
        t0 = time.perf_counter()
        for op in ops:
            for shape in shapes:
                for dname in dtypes:
                    case = make_case(op, shape, DTYPES[dname], device)
                    fns = {"triad": triad_fn(case.nbytes, device)}
                    for b in fused:
                        reasons = _backend.not_supported_reasons(b, case.y)
                        try:
                            if not reasons:
                                check_case(case, b)
                        except ValueError as exc:  # the backend refuses this step
                            reasons = [f"{op.name} {fmt_shape(shape)} {dname}: {exc}"]
                        if reasons:
                            _skip(seen, out, b, "; ".join(reasons))
                            continue
                        fns[b] = case.call(b)
                        if b == "cpu" and co.SAMPLERS[op.sampler].kernel:  # a record the module steps by itself
                            # (a sampler without a C++ mirror steps from a coefficient table built per call:
                            # its kernel_us is not measured)
                            record, case.keep = case.cpu_record()
                            fns["cpu kernel"] = functools.partial(_ext.C.fused_step, record)
                        if device == "cuda":
                            try:
                                fns[f"{b} graph"] = cuda_graph(fns[b])
                            except RuntimeError as exc:
                                _skip(seen, out, f"the CUDA-graph timing of {b}", f"the capture failed ({exc})")
                    if not any(b in fns for b in fused):
                        continue
                    if "eager" in plan.baselines:
                        fns["eager"] = case.call("torch")
                    if "compile" in plan.baselines and op.name in plan.compile_ops:
                        fns["compile"] = compile_reference(case)
                    todo.append((op, shape, dname, case, fns))
            if "compile" in plan.baselines and op.name in plan.compile_ops:
                warm = [c for *_, c, f in todo if c.op is op and "compile" in f]
                calls = sum(c.warm_calls for c in warm)
                unsettled = sum(not c.warm_settled for c in warm)
                print(f"  compiled the reference of {op.name} on {device} ({time.perf_counter() - t0:.0f} s so "
                      f"far), warmed up with {calls} calls" + (f" ({unsettled} case(s) still recompiling or "
                      "unsteady after 10 s: their compile times are unreliable)" if unsettled else ""),
                      file=out, flush=True)
        if not todo:
            print(f"nothing to time on {device}: no fused backend ran a case", file=out)
            continue
        n_comp = sum("compile" in f for *_, f in todo)
        if n_comp:
            print(f"built {len(todo)} cases on {device}, {n_comp} compiles, in {time.perf_counter() - t0:.0f} s",
                  file=out)
        noise_ns = 0.0  # per element, all the cpu kernels' threads together
        if device == "cpu" and "cpu" in fused and any(op.noisy for op, *_ in todo):
            per_core, threads = noise_cost_ns(), _ext.C.num_threads()
            noise_ns = per_core / threads
            print(f"noise: {per_core:.2f} ns per element per core ({_ext.C.cpu_isa()}), {threads} threads: "
                  f"{noise_ns:.2f} ns per element", file=out)
        caches = cache_sizes() if device == "cpu" else None
        if device == "cpu":
            print(_legend(caches), file=out)
        head = _header(device, bw)
        print(head, file=out)
        print("-" * len(head), file=out)
        for op, shape, dname, case, fns in todo:
            rows += _measure_case(op, shape, dname, case, fns, fused, budget, rounds, bw and plan.bandwidth[1],
                                  bw, noise_ns, on_row, out, caches)
    return rows


def _measure_case(op, shape, dname, case, fns, fused, budget, rounds, bw_gbps, bw, noise_ns, on_row,
                  out, caches=None) -> list[dict]:
    """Time one case's functions together (interleaved) and return its rows (fused backends first)."""
    fastest: dict[str, float] = {}
    t = measure(fns, budget, rounds, mins=fastest, device=case.device,
                sample_s=2e-4 if case.device == "cpu" else 2e-3)
    nan = float("nan")
    eager, comp = t.get("eager", nan), t.get("compile", nan)
    rows = []
    for b in [b for b in fused if b in t] + [b for b in BASELINES if b in t]:
        graph = t[f"{b} graph"] / GRAPH_CALLS if f"{b} graph" in t else nan
        kern = t.get(f"{b} kernel", nan)
        row = {"device": case.device, "op": op.name, "shape": fmt_shape(shape), "dtype": dname, "backend": b,
               "byte_model": op.byte_model, "bytes": case.nbytes, "elements": math.prod(shape),
               "us": t[b] * 1e6, "gbps": case.nbytes / t[b] / 1e9,
               "triad_us": t["triad"] * 1e6, "triad_gbps": case.nbytes / t["triad"] / 1e9,
               "pct_triad": 100.0 * t["triad"] / t[b], "eager_us": eager * 1e6, "x_eager": eager / t[b],
               "noise_us": in_kernel_noise_us(op, b, math.prod(shape), noise_ns),
               "compile_us": comp * 1e6, "x_compile": comp / t[b],
               "graph_us": graph * 1e6, "graph_gbps": case.nbytes / graph / 1e9,
               "kernel_us": kern * 1e6, "pct_triad_kernel": 100.0 * t["triad"] / kern,
               "loadavg": os.getloadavg()[0], "spread": max(t[k] / fastest[k] for k in (b, "triad"))}
        row["pct_roof"] = 100.0 * roof_us(row["triad_us"], row["noise_us"]) / row["us"]
        if bw and case.device == "cuda":
            row.update({f"{bw}_gbps": bw_gbps, f"pct_{bw}": 100.0 * row["gbps"] / bw_gbps,
                        f"graph_pct_{bw}": 100.0 * row["graph_gbps"] / bw_gbps})
        row["where"] = regime(case.nbytes, caches) if case.device == "cpu" else "-"
        row["target"] = _target(op, shape, row, row["where"])
        if row["spread"] > 1.5:  # the median is far from the best sample: other work interfered
            row["target"] += f" (unsteady timing: median/min {row['spread']:.1f})"
        rows.append(row)
        if on_row is not None:
            on_row(row)
        if b in FUSED:
            print(_line(row, op.elements, bw), file=out, flush=True)
    return rows


class CsvWriter:
    """Rows to the open text file ``fh`` as they are measured (an interrupted run keeps its rows), each with the
    machine."""

    def __init__(self, fh, machine: dict, extra_columns=()):
        self.machine, self.fh = machine, fh
        self.w = csv.DictWriter(fh, fieldnames=COLUMNS + list(extra_columns) + list(machine))
        self.w.writeheader()

    def __call__(self, row: dict) -> None:
        self.w.writerow({**{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}, **self.machine})
        self.fh.flush()


# ------------------------------------------------------------------------------------------------- the plot

PLOT_INSTALL = 'pip install "zsnr-kernels[plot]"'


def require_matplotlib() -> None:
    """Raise ``SystemExit`` naming the install command if matplotlib (needed by ``--png``) is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"--png needs matplotlib ({exc}); install it with: {PLOT_INSTALL}") from None


def _si(n: int) -> str:
    """1234567 -> '1.2M' (tick labels)."""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def plot(rows: list[dict], path: str, bandwidth: tuple[str, float] | None = None) -> None:
    """Write a PNG of GB/s against the latent's elements (log-log): one panel per device x op x dtype, one line
    per backend (and per CUDA-graph replay), the triad over the same bytes dashed, the device bandwidth dotted."""
    from matplotlib.figure import Figure

    panels: dict[tuple, list[dict]] = {}
    for r in rows:
        panels.setdefault((r["op"], r["device"], r["dtype"]), []).append(r)
    cols = list(dict.fromkeys((d, t) for _, d, t in panels))   # devices and dtypes in the order measured
    ops = list(dict.fromkeys(r["op"] for r in rows))
    fig = Figure(figsize=(max(6.0, 4.2 * len(cols)), 3.0 * len(ops) + 0.8), layout="constrained")
    axes = fig.subplots(len(ops), len(cols), squeeze=False)
    for i, op in enumerate(ops):
        for j, (device, dtype) in enumerate(cols):
            ax = axes[i][j]
            ax.set(xscale="log", yscale="log", title=f"{op}, {device} {dtype}", xlabel="latent elements N",
                   ylabel="GB/s (byte model)")
            pr = sorted(panels.get((op, device, dtype), []), key=lambda r: r["elements"])
            if not pr:
                ax.set_axis_off()
                continue
            by_backend: dict[str, list[dict]] = {}
            for r in pr:
                by_backend.setdefault(r["backend"], []).append(r)
            for b, rs in by_backend.items():
                ax.plot([r["elements"] for r in rs], [r["gbps"] for r in rs], marker="o", label=b)
                graph = [r for r in rs if r["graph_gbps"] == r["graph_gbps"]]
                if graph:
                    ax.plot([r["elements"] for r in graph], [r["graph_gbps"] for r in graph], marker=".",
                            linestyle="-.", label=f"{b} (CUDA graph)")
            first = by_backend[next(iter(by_backend))]
            ax.plot([r["elements"] for r in first], [r["triad_gbps"] for r in first], "k--", label="triad")
            ax.minorticks_off()
            ax.set_xticks([r["elements"] for r in first],
                          [f"{_si(r['elements'])}\n{r['shape']}" for r in first], fontsize="x-small")
            if device == "cuda" and bandwidth:
                ax.axhline(bandwidth[1], color="gray", linestyle=":", label=bandwidth[0].replace("_", " "))
            ax.legend(fontsize="small")
    fig.suptitle("GB/s of one step call (median); triad: b + s*c over the same bytes")
    fig.savefig(path, dpi=80)


# ------------------------------------------------------------------------------------------------- overhead


def overhead(shape=(1, 4, 64, 64), dtype=torch.float32, *, quick: bool = False, out=None) -> dict:
    """Per-call time of ``euler_step(..., backend="cpu")`` from Python, and where it goes.

    Layers, each timed on its own with the arguments the layer above passes it: the whole call;
    ``_cpu.fused_step`` (layout checks, output allocation, the step record, the C call: validation and the host
    coefficients excluded); ``_C.fused_step`` alone on one record built once (reading the record + the kernel,
    writing into the same outputs); ``torch.empty_like(y)``.  Then a cProfile of
    the whole call (its own overhead inflates Python frames; read it for proportions).
    """
    from zsnr_kernels.backends import call as _call, cpu as _cpu

    out = out or sys.stdout
    gen = torch.Generator().manual_seed(0)
    y, f = (torch.randn(shape, generator=gen).to(dtype) for _ in range(2))

    def whole():
        return zk.euler_step(y, f, SIGMA, SIGMA_NEXT, backend="cpu")

    def whole_auto():
        return zk.euler_step(y, f, SIGMA, SIGMA_NEXT)

    pz, args = zk.parameterization("v", 1.0), [co.StepArgs("euler", SIGMA, SIGMA_NEXT)]
    step_kw = dict(guidance_scale=1.0, guidance_rescale=0.0, rescale_space="output", noise=None, seeds=None,
                   step_index=None, want_denoised=True, out=None)  # what euler_step passes
    fields, sigmas, n_prev = _call.describe(pz, args, [SIGMA], 1.0, 0.0, "output")
    owned = [torch.empty_like(y), torch.empty_like(y)]  # y_out and D, as euler_step allocates them
    record = _call.step_call(y, f, None, [], None, *owned, None, fields, 1, n_prev, sigmas, 0, 0, None)

    fns = {
        "euler_step(backend='cpu')": whole,
        "euler_step(backend='auto')": whole_auto,
        "_cpu.fused_step": lambda: _cpu.fused_step(y, f, None, [], pz, args, [SIGMA], **step_kw),
        "_C.fused_step": functools.partial(_ext.C.fused_step, record),
        "torch.empty_like(y)": lambda: torch.empty_like(y),
        "triad over 3N (y, F, y_next)": triad_fn(3 * y.numel() * y.element_size()),
    }
    t = measure(fns, 0.1 if quick else 0.5, 3 if quick else 5, sample_s=2e-3)
    del fns, owned
    print(f"\nPer-call overhead at {shape} {str(dtype)[6:]} (median, target < 20 us for the whole call):", file=out)
    for k, v in t.items():
        print(f"  {k:32s} {v * 1e6:8.2f} us", file=out)
    print(f"  => validation + host coefficients + StepResult: {(t[next(iter(t))] - t['_cpu.fused_step']) * 1e6:.2f} us;"
          f" _cpu layer (layout, allocation): {(t['_cpu.fused_step'] - t['_C.fused_step']) * 1e6:.2f} us;"
          f" C call incl. kernel: {t['_C.fused_step'] * 1e6:.2f} us", file=out)
    prof = cProfile.Profile()
    n = 500 if quick else 5000
    prof.enable()
    for _ in range(n):
        whole()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(15)
    body = s.getvalue()
    body = body[body.find("   ncalls"):] if "   ncalls" in body else body
    print(f"  cProfile of {n} whole calls, top 15 by own time (cumulative us/call = tottime/{n}):", file=out)
    for line in body.rstrip().splitlines():
        print("   " + line, file=out)
    return t


# ------------------------------------------------------------------------------------------------- loops

LOOPS_SHAPE = (1, 16, 21, 60, 104)   # the video latent: y, F_c and F_u, 8.4 MB each in fp32, fit a 32 MiB LLC
LOOP_STEPS = 20                      # steps of the sample() and SamplingPlan runs (their time / LOOP_STEPS is shown)


def evicted_medians(fns: dict[str, Callable], evict: Callable[[], object], repeats: int) -> dict[str, float]:
    """Median seconds of single calls of each function, each made right after ``evict()`` (which is not timed:
    ``perf_counter`` is read around the call alone), the functions interleaved over ``repeats`` rounds."""
    for f in fns.values():
        f()  # first-call costs (page faults of fresh buffers) stay out of the samples
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            evict()
            t0 = time.perf_counter()
            f()
            samples[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def minor_faults(fn: Callable[[], object], calls: int) -> float:
    """Minor page faults per call of ``fn``: the process's ``ru_minflt`` over ``calls`` calls (NaN where the
    ``resource`` module is missing, as on Windows)."""
    try:
        import resource
    except ImportError:
        return float("nan")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def loops(shape=LOOPS_SHAPE, dtype=torch.float32, *, steps: int = LOOP_STEPS, quick: bool = False, out=None) -> dict:
    """What a sampling loop pays per step of the guided (w = 7.5), rescaled (phi = 0.7) Euler step on the cpu
    backend, next to what one step costs alone and to the roof measured here.

    Timed together, interleaved (:func:`measure`), on the same tensors y, F_c, F_u:

    * ``default``: ``euler_step(y, (F_c, F_u), ...)`` as written by default: a new state and D every call;
    * ``in_place``: the same with ``out=y, return_denoised=False``;
    * ``sample``: ``zk.sample`` of ``steps`` steps from sigma = inf with a model returning F_c, F_u, per step;
    * ``plan``: ``zk.SamplingPlan.run`` of the same schedule, per step;
    * ``roof_cache``: ``torch.add(F_c, F_u, out=y); torch.add(y, F_c, out=y)``: the 6 passes over the latent that
      the in-place step makes (statistics: read F_c, F_u; update: read y, F_c, F_u, write y), repeated over the
      same tensors, so from the cache level those tensors fit in (``regime``).

    Then, each right after a write of a buffer twice the last-level cache (evicting the tensors, as a model call
    between two steps does; the write is not timed, :func:`evicted_medians`): ``roof_dram``, the same two adds,
    and ``in_place_evicted``, the in-place step.  Each row's ``x_roof`` is its time over the roof of its condition
    (repeated: ``roof_cache``; evicted: ``roof_dram``), ``x_in_place`` over the in-place step's; ``faults`` the
    minor page faults per step (the default path's fresh outputs can meet glibc's heap trim every step, see
    :func:`zsnr_kernels.retain_freed_memory`).  Returns those rows and the conditions: threads, regime, load
    average before and after, and the cores other processes used meanwhile (:func:`others_cpu`).
    """
    out = out or sys.stdout
    load_before, others = os.getloadavg()[0], others_cpu()
    gen = torch.Generator().manual_seed(0)
    y, f_c, f_u, noise = (torch.randn(shape, generator=gen).to(dtype) for _ in range(4))
    guide = dict(guidance_scale=GUIDANCE, guidance_rescale=RESCALE, backend="cpu")
    sigmas = zk.schedules.karras(steps, 0.03, math.inf, sigma_max_finite=14.6)  # steps model calls, from inf

    def model(x, sigma):
        return f_c, f_u

    plan = zk.SamplingPlan(sigmas, shape, sampler="euler", dtype=dtype, **guide)

    def roof():
        torch.add(f_c, f_u, out=y)
        torch.add(y, f_c, out=y)

    fns = {
        "default": lambda: zk.euler_step(y, (f_c, f_u), SIGMA, SIGMA_NEXT, **guide),
        "in_place": lambda: zk.euler_step(y, (f_c, f_u), SIGMA, SIGMA_NEXT, out=y, return_denoised=False, **guide),
        "sample": lambda: zk.sample(model, noise, sigmas, **guide),
        "plan": lambda: plan.run(model, noise),
        "roof_cache": roof,
    }
    per_call = {"sample": steps, "plan": steps}  # steps per call (1 elsewhere)
    t = {k: v / per_call.get(k, 1) for k, v in measure(fns, 0.1 if quick else 1.0, 3 if quick else 5).items()}
    faults = {k: minor_faults(fns[k], 2 if quick else 10) / per_call.get(k, 1)
              for k in ("default", "in_place", "sample", "plan")}
    caches = cache_sizes()
    # twice the LLC: its replacement is not strict LRU, so a write of its size alone leaves some of the step's lines
    flush = torch.zeros((2 * caches[1] if caches else 256 << 20) // 4)
    cold = evicted_medians({"roof_dram": roof, "in_place_evicted": fns["in_place"]}, lambda: flush.add_(1.0),
                           5 if quick else 41)
    t.update(cold)
    working_set = 3 * y.numel() * y.element_size()   # y, F_c, F_u
    info = {"shape": tuple(shape), "dtype": str(dtype)[6:], "threads": zk.get_num_threads(), "steps": steps,
            "working_set_bytes": working_set, "regime": regime(working_set, caches),
            "evict_bytes": flush.numel() * flush.element_size(), "loadavg_before": load_before,
            "loadavg_after": os.getloadavg()[0], "others_cpu": others()}
    rows = {k: {"us": v * 1e6, "x_in_place": v / t["in_place"],
                "x_roof": v / t["roof_dram" if k in cold else "roof_cache"], "faults": faults.get(k, float("nan"))}
            for k, v in t.items()}
    labels = {
        "default": "default path (new y and D)", "in_place": "in place (out=y)",
        "sample": f"sample(), {steps} steps from inf", "plan": f"SamplingPlan.run, {steps} steps",
        "roof_cache": f"roof: 2 adds, same tensors ({info['regime']})",
        "roof_dram": "roof: the 2 adds (DRAM)", "in_place_evicted": "in place",
    }
    print(f"\nLoops at {fmt_shape(shape)} {info['dtype']}: Euler, w={GUIDANCE}, phi={RESCALE}, cpu backend, "
          f"threads: {info['threads']}; y, F_c, F_u: {_si(working_set)}B ({info['regime']}); load average "
          f"{load_before:.2f} before, {info['loadavg_after']:.2f} after; other processes used "
          f"{info['others_cpu']:.2f} cores meanwhile"
          + (" (unreliable: they competed for the cores)" if contended(info["others_cpu"], info["threads"]) else ""),
          file=out)
    print(f"  {'per step (median)':34s} {'us':>9s} {'x in place':>10s} {'x roof':>7s} {'faults':>7s}", file=out)
    for k, row in rows.items():
        if k == "roof_dram":
            print(f"  after a {info['evict_bytes'] >> 20} MiB write (evicted; x roof: of the DRAM roof):", file=out)
        print(f"  {labels[k]:34s} {row['us']:9.1f} {row['x_in_place']:9.2f}x {row['x_roof']:6.2f}x "
              f"{_num(row['faults'], 7, '.0f')}", file=out)
    if faults["default"] > 0:
        print("  the default path page-faults its fresh outputs back in: pass out=, or call "
              "zk.retain_freed_memory() once (zsnr_kernels/backends/host_memory.py)", file=out)
    return {**info, "rows": rows}


#: the latents of a diffusers pipeline step (issue 18): SD at 512x512, one and two images
PIPELINE_SHAPES = [(1, 4, 128, 128), (2, 4, 128, 128)]


def pipeline_step(shapes=PIPELINE_SHAPES, dtypes=(torch.float32, torch.bfloat16), *, quick: bool = False,
                  out=None) -> list[dict]:
    """One diffusers pipeline step's sampler time, what happens between the UNet call and the next one: the stock
    pipeline's eager path (``uncond + w (cond - uncond)``, diffusers' ``rescale_noise_cfg``, then
    ``EulerDiscreteScheduler.step``) against the fused path of ``ZSNREulerDiscreteScheduler.step((cond, uncond),
    guidance_scale=, guidance_rescale=)`` (one pass on the cpu backend), at a mid-schedule timestep of a v-prediction
    model, w = 7.5, phi = 0.7.  Returns one row per shape and dtype; needs diffusers (skipped with a line without)."""
    out = out or sys.stdout
    try:
        import diffusers
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
    except ImportError as exc:
        print(f"\npipeline step: skipped, diffusers is not installed ({exc})", file=out)
        return []
    from zsnr_kernels.diffusers import ZSNREulerDiscreteScheduler

    config = dict(beta_schedule="scaled_linear", prediction_type="v_prediction", timestep_spacing="trailing")
    eager_sched = diffusers.EulerDiscreteScheduler(**config)
    fused_sched = ZSNREulerDiscreteScheduler(**config)
    rows = []
    print(f"\nPipeline step (CFG w={GUIDANCE} + rescale phi={RESCALE} + Euler step, the sampler's share of one "
          "diffusers pipeline step), median us:", file=out)
    for shape in shapes:
        for dtype in dtypes:
            gen = torch.Generator().manual_seed(0)
            latents, cond, uncond = (torch.randn(shape, generator=gen).to(dtype) for _ in range(3))
            for sched in (eager_sched, fused_sched):
                sched.set_timesteps(25)
            t = eager_sched.timesteps[10]

            def eager():
                eager_sched._step_index = 10  # the same step every call (step() advances it)
                eager_sched.is_scale_input_called = True  # the pipeline scales the UNet's input before (a warning else)
                guided = rescale_noise_cfg(uncond + GUIDANCE * (cond - uncond), cond, guidance_rescale=RESCALE)
                return eager_sched.step(guided, t, latents).prev_sample

            # the ZSNR schedulers' latents are the model input y = x / sqrt(sigma^2 + 1) (diffusers' scaled input)
            sigma, sigma_next = (float(v) for v in eager_sched.sigmas[10:12])
            y = (latents.double() / math.hypot(sigma, 1.0)).to(dtype)

            def fused():
                fused_sched._step_index = 10
                return fused_sched.step((cond, uncond), t, y, guidance_scale=GUIDANCE,
                                        guidance_rescale=RESCALE).prev_sample

            # the two paths compute one thing: checked first
            want, got = eager().double() / math.hypot(sigma_next, 1.0), fused().double()
            tol = 1e-4 if dtype == torch.float32 else 5e-2
            if not torch.allclose(got, want, rtol=tol, atol=tol * want.abs().max().item()):
                raise AssertionError(f"pipeline step {fmt_shape(shape)} {dtype}: the fused path differs from the eager "
                                     f"one by {(got - want).abs().max().item():.3g}")
            m = measure({"eager": eager, "fused": fused}, 0.1 if quick else 0.5, 3 if quick else 5)
            row = {"shape": fmt_shape(shape), "dtype": str(dtype)[6:], "eager_us": m["eager"] * 1e6,
                   "fused_us": m["fused"] * 1e6, "x": m["eager"] / m["fused"]}
            rows.append(row)
            print(f"  {row['shape']:>12s} {row['dtype']:9s} eager {row['eager_us']:9.1f}  fused "
                  f"{row['fused_us']:9.1f}  {row['x']:5.2f}x", file=out)
    return rows


# ------------------------------------------------------------------------------------------------- command line


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared by ``python -m zsnr_kernels bench`` and ``bench/bench_step.py``)."""
    ap.add_argument("--quick", action="store_true",
                    help=f"short timing budget, two shapes, ops {', '.join(QUICK_OPS)} unless --ops is given, "
                         "torch.compile of the headline only (about a minute)")
    ap.add_argument("--ops", nargs="+", choices=list(OPS), metavar="OP", help=f"ops (default all: {list(OPS)})")
    ap.add_argument("--shapes", nargs="+", type=parse_shape, metavar="SHAPE",
                    help="shapes like 4x4x128x128 (default: the four latent shapes of docs/design.md §5)")
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["float32", "bfloat16"])
    ap.add_argument("--backends", nargs="+", choices=BACKENDS, metavar="BACKEND",
                    help="fused backends cpu (CPU tensors), cuda and triton (CUDA tensors) and the baselines eager "
                         "(backend='torch') and compile (torch.compile of the reference), timed on each device a "
                         "fused backend runs on (default: all; cuda and triton only where torch.cuda.is_available())")
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="skip the torch.compile baseline (each compile takes seconds); same as leaving compile out "
                         "of --backends")
    ap.add_argument("--no-overhead", dest="overhead", action="store_false",
                    help="skip the per-call overhead breakdown of the cpu backend")
    ap.add_argument("--no-loops", dest="loops", action="store_false",
                    help="skip the loops section (the guided, rescaled Euler step by default, in place, in sample() "
                         "and in a SamplingPlan, against the roof in cache and in DRAM)")
    ap.add_argument("--no-pipeline", dest="pipeline", action="store_false",
                    help="skip the diffusers pipeline step section (eager CFG + rescale + scheduler step against the "
                         "fused guidance of the ZSNR schedulers)")
    ap.add_argument("--loops-shape", type=parse_shape, default=LOOPS_SHAPE, metavar="SHAPE",
                    help=f"the loops section's latent shape (default {fmt_shape(LOOPS_SHAPE)})")
    ap.add_argument("--csv", type=_cli.output_path, metavar="PATH", help="write one row per device, op, shape, "
                    "dtype and backend (and the machine) to this CSV file")
    ap.add_argument("--png", type=_cli.output_path, metavar="PATH", help=f"plot GB/s against latent size to this "
                    f"PNG (needs matplotlib: {PLOT_INSTALL})")


def _plan(a: argparse.Namespace, ops, out) -> Plan:
    cuda = torch.cuda.is_available()
    chosen = a.backends or [b for b in BACKENDS if FUSED.get(b) != "cuda" or cuda]
    if not a.backends and not cuda:
        print("cuda, triton: not timed, torch.cuda.is_available() is False", file=out)
    fused: dict[str, list[str]] = {}
    for b in (b for b in chosen if b in FUSED):
        if FUSED[b] == "cuda" and not cuda:
            print(f"skipped {b}: torch.cuda.is_available() is False (torch {torch.__version__}, built for CUDA "
                  f"{torch.version.cuda})", file=out)
            continue
        fused.setdefault(FUSED[b], []).append(b)
    if not fused:
        raise SystemExit("--backends: nothing to time; name at least one fused backend that runs here (cpu"
                         + (", cuda, triton" if cuda else "") + "); eager and compile are baselines timed next to "
                         "them")
    baselines = tuple(b for b in BASELINES if b in chosen and (b != "compile" or a.compile))
    # A compile takes seconds per row: --quick compiles the headline only.
    compile_ops = frozenset() if "compile" not in baselines else frozenset(
        {HEADLINE} if a.quick else {op.name for op in ops})
    return Plan(fused, baselines, compile_ops, device_bandwidth() if "cuda" in fused else None)


def run(a: argparse.Namespace, out=None) -> list[dict]:
    """The benchmark with parsed options (see :func:`add_arguments`); returns the measured rows."""
    out = out or sys.stdout
    if a.png:
        require_matplotlib()  # before minutes of measuring
    ops = [OPS[k] for k in (a.ops or (QUICK_OPS if a.quick else OPS))]
    shapes = a.shapes or (SHAPES[:2] if a.quick else SHAPES)
    plan = _plan(a, ops, out)
    machine = machine_info(tuple(plan.fused))
    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()), file=out)
    if float(machine["loadavg_1min"]) > 0.5:
        print(f"WARNING: load average {machine['loadavg_1min']} before the run: other processes compete for the "
              "cores (OpenMP threads then wait on each other); timings and ratios are unreliable", file=out)
    print("us: median time per call of the fused backend; eager: backend='torch'; compile: torch.compile("
          "fullgraph=True, dynamic=False) of reference.fused_step; triad% = triad time / backend time over the same "
          "bytes; x = baseline time / backend time", file=out)
    if plan.bandwidth:
        name, gbps = plan.bandwidth
        print(f"cuda: CUDA-event times; graph us = replay of {GRAPH_CALLS} captured calls / {GRAPH_CALLS}; "
              + (f"%peak: of {gbps:.0f} GB/s (2 x memory clock x bus width)" if name == "peak" else
                 f"%copy: of {gbps:.0f} GB/s, a measured device-to-device copy (this torch reports no memory "
                 "clock or bus width)") + "; g%: the graph time's", file=out)
    skipped = [op.name for op in ops if op.name not in plan.compile_ops]
    if skipped:
        print(f"torch.compile baseline skipped for {', '.join(skipped)} (--no-compile, --backends or --quick)",
              file=out)
    print("byte models (N = elements of the latent, in its dtype):", file=out)
    for op in ops:
        print(f"  {op.name:18s} {op.byte_model}", file=out)
    t0 = time.perf_counter()
    extra = bandwidth_columns(plan.bandwidth[0]) if plan.bandwidth else ()
    with open(a.csv, "w", newline="") if a.csv else contextlib.nullcontext() as fh:
        writer = CsvWriter(fh, machine, extra) if fh else None
        rows = run_table(ops, shapes, a.dtypes, plan, quick=a.quick, out=out, on_row=writer)
    print(f"table took {time.perf_counter() - t0:.0f} s" + (f"; wrote {a.csv}" if a.csv else ""), file=out)
    if a.png:
        plot(rows, a.png, plan.bandwidth)
        print(f"wrote {a.png}", file=out)
    if a.overhead and "cpu" in plan.fused.get("cpu", ()) and _ext.available():
        overhead(quick=a.quick, out=out)
    if a.loops and "cpu" in plan.fused.get("cpu", ()) and _ext.available():
        loops(a.loops_shape, quick=a.quick, out=out)
    if a.pipeline and "cpu" in plan.fused.get("cpu", ()) and _ext.available():
        pipeline_step(PIPELINE_SHAPES[:1] if a.quick else PIPELINE_SHAPES, quick=a.quick, out=out)
    return rows


def main(argv=None, prog: str = "python -m zsnr_kernels bench") -> list[dict]:
    """``python -m zsnr_kernels bench [options]`` as a function; returns the measured rows."""
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    return run(ap.parse_args(argv))
