"""Benchmark of the fused sampler steps against the eager reference and ``torch.compile`` of it (DESIGN §5).

For every op x shape x dtype this prints (and writes to CSV) the median time of one step call of the fused
``cpu`` backend, its GB/s on the op's byte model (the minimum bytes the step must move, written next to each op
in :data:`OPS`), the percentage of this machine's bandwidth -- a STREAM-style triad ``a = b + s*c`` on float32
buffers moving the same number of bytes, measured in the same run, interleaved with the op -- and the speed-up
against the eager reference (``backend="torch"``, the same call) and against ``torch.compile(fullgraph=True)``
of :func:`zsnr_kernels.reference.fused_step` with the same float coefficients (compile time excluded).
Absolute times are only comparable within one run; the ratios are what is reported.

    python bench/bench_step.py                        # full table (several minutes: one compile per row)
    python bench/bench_step.py --quick                # under about a minute
    python bench/bench_step.py --ops euler_cfg_rescale --shapes 4x4x128x128 --dtypes float32 --csv out.csv
    python -m pytest bench/bench_step.py --benchmark-only -q     # pytest-benchmark regression cases

Then the Python per-call overhead of ``euler_step(..., backend="cpu")`` at (1,4,64,64) is printed with a
breakdown of where the time goes (``--no-overhead`` skips it).
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import io
import math
import os
import platform
import pstats
import statistics
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

import zsnr_kernels as zk
from zsnr_kernels import _ext, coefficients as co, reference
from zsnr_kernels.parameterization import rescale_space_coeffs

SHAPES = [(1, 4, 64, 64), (4, 4, 128, 128), (1, 16, 128, 128), (1, 16, 21, 60, 104)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TARGET_SHAPES = [(4, 4, 128, 128), (1, 16, 21, 60, 104)]   # where issue 3 sets the targets

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
    # LMS order 4: reads y, F, d_1, d_2, d_3, writes y_next and this step's derivative d: 7N.
    Op("lms4", zk.lms_step, "lms", ("y", "F", "d_1", "d_2", "d_3"), ("y_next", "d"), n_history=3,
       kwargs={"order": 4}),
]}
HEADLINE = "euler_cfg_rescale"


@dataclass
class Case:
    """One op at one shape and dtype: the step call per backend and the reference as a function of tensors."""

    op: Op
    shape: tuple[int, ...]
    dtype: torch.dtype
    call: Callable[[str], Callable[[], object]]   # backend -> zero-argument step call
    ref_fn: Callable                                # reference.fused_step with float coefficients
    ref_args: tuple[torch.Tensor, ...]
    nbytes: int


def make_case(op: Op, shape, dtype) -> Case:
    """Inputs (seeded), the step call, and the reference closure with the coefficients the step uses."""
    gen = torch.Generator().manual_seed(0)

    def rnd():
        return torch.randn(shape, generator=gen).to(dtype)

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
    if op.stage2:  # the first stage runs once, outside any timed region
        first = op.step(y, rnd(), SIGMA, SIGMA_NEXT, backend="cpu", return_denoised=True, **op.kwargs)
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
        eager_opts["noise"] = torch.randn(shape, generator=gen).to(dtype)

    def call(backend: str):
        kw = eager_opts if backend == "torch" else opts
        return lambda: op.step(y, model_output, SIGMA, SIGMA_NEXT, backend=backend, **kw)

    # The same float coefficients the step computes (as steps._torch_step does for one sample).
    pz = zk.parameterization("v", 1.0)
    args = co.StepArgs(op.sampler, SIGMA, SIGMA_NEXT, stage=2 if op.stage2 else 1,
                       sigma_prev=SIGMA_PREV[:op.n_history], **op.kwargs)
    c = co.step_coeffs(pz, args)
    p, q = pz.denoise_coeffs(sigma_eval)
    uv = rescale_space_coeffs(pz, sigma_eval, "output")
    n_h = len(c.h)
    keep_d = op.sampler in ("dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde")
    guided, w, phi = op.guided, opts["guidance_scale"], opts["guidance_rescale"]

    def ref_fn(*ts):
        y_, fc_ = ts[0], ts[1]
        fu_ = ts[2] if guided else None
        hs = ts[3 if guided else 2:]
        z = torch.randn_like(y_) if c.e != 0.0 else None
        y_out, d, carry = reference.fused_step(
            y_, fc_, fu_, p=p, q=q, a=c.a, b=c.b, history=tuple(hs[:n_h]), h=c.h, noise=z, e=c.e,
            guidance_scale=w, guidance_rescale=phi, rescale_uv=uv, carry=c.carry)
        return (y_out,) + ((d,) if keep_d else ()) + ((carry,) if carry is not None else ())

    ref_args = (y, f_c) + ((f_u,) if guided else ()) + tuple(hist)
    nbytes = op.elements * math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return Case(op, tuple(shape), dtype, call, ref_fn, ref_args, nbytes)


def check_case(case: Case) -> None:
    """The reference closure must reproduce the step (noise-free ops): guards the coefficient mapping."""
    if case.op.noisy:
        return
    got = case.call("cpu")().y.float()
    want = case.ref_fn(*case.ref_args)[0].float()
    tol = 5e-2 if case.dtype != torch.float32 else 1e-4
    err = (got - want).abs().max().item()
    if not err <= tol * (1 + want.abs().max().item()):
        raise AssertionError(f"{case.op.name} {case.shape} {case.dtype}: reference closure differs from the "
                             f"cpu step by {err}")


# ------------------------------------------------------------------------------------------------- timing


def triad_fn(nbytes: int) -> Callable[[], object]:
    """STREAM triad a = b + s*c on float32 buffers whose 2 reads + 1 write total ``nbytes``."""
    n = max(1, nbytes // 12)
    b, c, a = torch.rand(n), torch.rand(n), torch.empty(n)
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


def measure(fns: dict[str, Callable], budget_s: float, rounds: int, min_samples: int = 5,
            sample_s: float = 2e-4, mins: dict | None = None) -> dict[str, float]:
    """Median seconds per call of each function (and the fastest sample of each into ``mins`` if given).

    Each sample times ``inner`` back-to-back calls (enough to last ``sample_s``, so a timer read never dominates
    a microsecond call); the variants are interleaved over ``rounds`` rounds so slow drift of the machine (the
    other core busy, clock changes) hits them all alike; about ``budget_s`` is spent per variant.
    """
    est = {k: _calibrate(f, min(0.05, budget_s / 4)) for k, f in fns.items()}
    inner = {k: max(1, int(sample_s / max(t, 1e-9))) for k, t in est.items()}
    # Functions slower than the budget (the eager reference on video latents) get 3 samples, not min_samples.
    per_round = {k: max(1, math.ceil(max(min_samples if est[k] * inner[k] < budget_s else 3,
                                          budget_s / (est[k] * inner[k])) / rounds)) for k in fns}
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            samples[k] += [_sample(f, inner[k]) for _ in range(per_round[k])]
    if mins is not None:
        mins.update({k: min(v) for k, v in samples.items()})
    return {k: statistics.median(v) for k, v in samples.items()}


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
    fn = torch.compile(fresh, fullgraph=True, dynamic=False)
    fn(*case.ref_args)
    return lambda: fn(*case.ref_args)


# ------------------------------------------------------------------------------------------------- the table


def machine_info() -> dict[str, str]:
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), model)
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cores": str(os.cpu_count()),
        "omp_threads": str(torch.get_num_threads()),
        "isa": _ext.C.cpu_isa() if _ext.available() else "unavailable",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg_1min": f"{os.getloadavg()[0]:.2f}",   # other work on the machine skews every timing
    }


COLUMNS = ["op", "shape", "dtype", "byte_model", "bytes", "cpu_us", "cpu_gbps", "triad_us", "triad_gbps",
           "pct_triad", "eager_us", "x_eager", "compile_us", "x_compile", "target", "loadavg", "spread"]


def _target(op: str, shape, row: dict) -> str:
    """Issue 3's targets: >= 70% of triad at the target shapes; the headline also >= 10x eager, >= 2x compile."""
    if tuple(shape) not in TARGET_SHAPES:
        return "-"
    miss = []
    if row["pct_triad"] < 70:
        miss.append(f"triad {row['pct_triad']:.0f}%<70")
    if op == HEADLINE:
        if row["x_eager"] < 10:
            miss.append(f"eager {row['x_eager']:.1f}x<10")
        if row["x_compile"] == row["x_compile"] and row["x_compile"] < 2:  # NaN when compile was skipped
            miss.append(f"compile {row['x_compile']:.2f}x<2")
    return "ok" if not miss else "MISS " + ",".join(miss)


def _fmt_shape(shape) -> str:
    return "x".join(map(str, shape))


def _parse_shape(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.lower().replace(",", "x").strip("()").split("x") if v)


def run_table(ops, shapes, dtypes, *, quick: bool, compile_ops=frozenset(), out=None, on_row=None) -> list[dict]:
    """Measure and print every op x shape x dtype; ``compile_ops`` names the ops given a torch.compile baseline;
    ``on_row(row)`` is called as each row is measured (the CSV is written as it goes)."""
    out = out or sys.stdout
    budget, rounds = (0.04, 2) if quick else (0.3, 3)
    rows = []
    head = (f"{'op':18s} {'shape':15s} {'dtype':8s} {'bytes':>4s} {'cpu us':>9s} {'GB/s':>6s} {'triad%':>6s} "
            f"{'eager us':>10s} {'x eager':>7s} {'compile us':>10s} {'x comp':>6s}  target")
    # Build every case (and compile its reference) first, then measure them back to back: the compiles take
    # minutes of CPU, the measurements then run in one short stretch.
    todo = []
    t0 = time.perf_counter()
    for op in ops:
        for shape in shapes:
            for dname in dtypes:
                case = make_case(op, shape, DTYPES[dname])
                check_case(case)
                fns = {"triad": triad_fn(case.nbytes), "cpu": case.call("cpu"), "eager": case.call("torch")}
                if op.name in compile_ops:
                    fns["compile"] = compile_reference(case)
                todo.append((op, shape, dname, case, fns))
        if op.name in compile_ops:
            print(f"  compiled the reference of {op.name} ({time.perf_counter() - t0:.0f} s so far)", file=out,
                  flush=True)
    if compile_ops:
        print(f"built {len(todo)} cases, {sum('compile' in f for *_, f in todo)} compiles, in "
              f"{time.perf_counter() - t0:.0f} s", file=out)
    print(head, file=out)
    print("-" * len(head), file=out)
    for op, shape, dname, case, fns in todo:
        fastest: dict[str, float] = {}
        t = measure(fns, budget, rounds, mins=fastest)
        compiled = "compile" in fns
        row = {"op": op.name, "shape": _fmt_shape(shape), "dtype": dname, "byte_model": op.byte_model,
               "bytes": case.nbytes, "cpu_us": t["cpu"] * 1e6, "cpu_gbps": case.nbytes / t["cpu"] / 1e9,
               "triad_us": t["triad"] * 1e6, "triad_gbps": case.nbytes / t["triad"] / 1e9,
               "pct_triad": 100.0 * t["triad"] / t["cpu"], "eager_us": t["eager"] * 1e6,
               "x_eager": t["eager"] / t["cpu"],
               "compile_us": t["compile"] * 1e6 if compiled else float("nan"),
               "x_compile": t["compile"] / t["cpu"] if compiled else float("nan"),
               "loadavg": os.getloadavg()[0],
               "spread": max(t[k] / fastest[k] for k in ("cpu", "triad"))}
        row["target"] = _target(op.name, shape, row)
        if row["spread"] > 1.5:  # the median is far from the best sample: other work interfered
            row["target"] += f" (noisy: median/min {row['spread']:.1f})"
        rows.append(row)
        if on_row is not None:
            on_row(row)
        print(f"{op.name:18s} {row['shape']:15s} {dname:8s} {op.elements:>3d}N {row['cpu_us']:9.1f} "
              f"{row['cpu_gbps']:6.1f} {row['pct_triad']:5.0f}% {row['eager_us']:10.1f} "
              f"{row['x_eager']:6.1f}x {row['compile_us']:10.1f} {row['x_compile']:5.2f}x  {row['target']}",
              file=out, flush=True)
    return rows


class CsvWriter:
    """Rows to ``path`` as they are measured (an interrupted run keeps its rows), each with the machine."""

    def __init__(self, path: str, machine: dict):
        self.machine = machine
        self.fh = open(path, "w", newline="")
        self.w = csv.DictWriter(self.fh, fieldnames=COLUMNS + list(machine))
        self.w.writeheader()

    def __call__(self, row: dict) -> None:
        self.w.writerow({**{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}, **self.machine})
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


# ------------------------------------------------------------------------------------------------- overhead


class _Recorder:
    """Stands in for a function, records the arguments of the last call and forwards it."""

    def __init__(self, fn):
        self.fn, self.args, self.kwargs = fn, None, None

    def __call__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs
        return self.fn(*args, **kwargs)


class _ModuleProxy:
    """A module whose ``fused_step`` is recorded (used to capture the raw arguments of ``_C.fused_step``)."""

    def __init__(self, module):
        self._module = module
        self.fused_step = _Recorder(module.fused_step)

    def __getattr__(self, name):
        return getattr(self._module, name)


def overhead(shape=(1, 4, 64, 64), dtype=torch.float32, *, quick: bool = False, out=None) -> dict:
    """Per-call time of ``euler_step(..., backend="cpu")`` from Python, and where it goes.

    Layers, each timed on its own with the arguments the layer above passed it (captured from one real call):
    the whole call; ``_cpu.fused_step`` (layout checks, output allocation, the C call: validation and the host
    coefficients excluded); ``_C.fused_step`` alone (pybind11 conversion + the kernel, writing into the same
    output); ``torch.empty_like(y)``.  Then a cProfile of the whole call (its own overhead inflates Python
    frames; read it for proportions).
    """
    from zsnr_kernels import _cpu

    out = out or sys.stdout
    gen = torch.Generator().manual_seed(0)
    y, f = (torch.randn(shape, generator=gen).to(dtype) for _ in range(2))

    def whole():
        return zk.euler_step(y, f, SIGMA, SIGMA_NEXT, backend="cpu")

    def whole_auto():
        return zk.euler_step(y, f, SIGMA, SIGMA_NEXT)

    rec_cpu, saved_cpu, saved_c = _Recorder(_cpu.fused_step), _cpu.fused_step, _ext.C
    proxy = _ModuleProxy(_ext.C)
    _cpu.fused_step, _ext.C = rec_cpu, proxy
    try:
        # The captured _C arguments are raw pointers into this result's tensors: keep it alive while they are
        # replayed (the kernel would otherwise write into freed memory).
        captured = whole()
    finally:
        _cpu.fused_step, _ext.C = saved_cpu, saved_c
    c_fn, c_args = saved_c.fused_step, proxy.fused_step.args

    fns = {
        "euler_step(backend='cpu')": whole,
        "euler_step(backend='auto')": whole_auto,
        "_cpu.fused_step": lambda: saved_cpu(*rec_cpu.args, **rec_cpu.kwargs),
        "_C.fused_step": lambda: c_fn(*c_args),
        "torch.empty_like(y)": lambda: torch.empty_like(y),
        "triad over 3N (y, F, y_next)": triad_fn(3 * y.numel() * y.element_size()),
    }
    t = measure(fns, 0.1 if quick else 0.5, 3 if quick else 5, sample_s=2e-3)
    del fns, captured
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


# ------------------------------------------------------------------------------------------------- main


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--csv", help="write the table (and the machine) to this CSV file")
    ap.add_argument("--quick", action="store_true", help="short timing budget, two shapes (about a minute)")
    ap.add_argument("--ops", nargs="+", choices=list(OPS), metavar="OP", help=f"ops (default all: {list(OPS)})")
    ap.add_argument("--shapes", nargs="+", type=_parse_shape, metavar="SHAPE",
                    help="shapes like 4x4x128x128 (default: the four latent shapes of DESIGN §5)")
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["float32", "bfloat16"])
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="skip the torch.compile baseline (each compile takes seconds)")
    ap.add_argument("--no-overhead", dest="overhead", action="store_false",
                    help="skip the per-call overhead breakdown")
    a = ap.parse_args(argv)
    if not _ext.available():
        raise SystemExit(f"the cpu backend is unavailable: {_ext.why_unavailable()}")
    ops = [OPS[k] for k in (a.ops or OPS)]
    shapes = a.shapes or (SHAPES[:2] if a.quick else SHAPES)
    if a.quick and not a.ops:
        ops = [OPS[k] for k in (HEADLINE, "euler", "dpmpp_2m", "dpmpp_3m_sde")]
    # A compile takes seconds per row: --quick compiles the headline only.
    compile_ops = set() if not a.compile else {HEADLINE} if a.quick else {op.name for op in ops}
    machine = machine_info()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()))
    if float(machine["loadavg_1min"]) > 0.5:
        print(f"WARNING: load average {machine['loadavg_1min']} before the run: other processes compete for the "
              "cores (OpenMP threads then wait on each other); timings and ratios are unreliable")
    print("cpu: fused kernels (backend='cpu'); eager: backend='torch'; compile: torch.compile(fullgraph=True, "
          "dynamic=False) of reference.fused_step; triad% = triad time / cpu time over the same bytes; "
          "x = baseline time / cpu time; times are medians per call")
    skipped = [op.name for op in ops if op.name not in compile_ops]
    if skipped:
        print(f"torch.compile baseline skipped for {', '.join(skipped)} (--no-compile or --quick)")
    print("byte models (N = elements of the latent, in its dtype):")
    for op in ops:
        print(f"  {op.name:18s} {op.byte_model}")
    t0 = time.perf_counter()
    writer = CsvWriter(a.csv, machine) if a.csv else None
    try:
        rows = run_table(ops, shapes, a.dtypes, quick=a.quick, compile_ops=compile_ops, on_row=writer)
    finally:
        if writer is not None:
            writer.close()
    print(f"table took {time.perf_counter() - t0:.0f} s" + (f"; wrote {a.csv}" if a.csv else ""))
    if a.overhead:
        overhead(quick=a.quick)
    return rows


# ------------------------------------------------------------------------------------------------- pytest-benchmark

BENCH_OPS = [HEADLINE, "dpmpp_2m", "euler_ancestral"]


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", SHAPES[:2], ids=_fmt_shape)
@pytest.mark.parametrize("op", BENCH_OPS)
def test_bench_step(benchmark, op, shape, dtype, backend):
    """One step call per backend; extra_info carries the byte model so GB/s can be recomputed."""
    if backend == "cpu" and not _ext.available():
        pytest.skip(_ext.why_unavailable())
    case = make_case(OPS[op], shape, DTYPES[dtype])
    benchmark.extra_info.update(bytes=case.nbytes, byte_model=OPS[op].byte_model)
    benchmark(case.call(backend))


def test_bench_overhead_euler_small(benchmark):
    """The whole Python call at (1,4,64,64) float32: the < 20 us per-call target."""
    if not _ext.available():
        pytest.skip(_ext.why_unavailable())
    y, f = torch.randn(1, 4, 64, 64), torch.randn(1, 4, 64, 64)
    benchmark(lambda: zk.euler_step(y, f, SIGMA, SIGMA_NEXT, backend="cpu"))


@pytest.mark.parametrize("shape", SHAPES[:2], ids=_fmt_shape)
def test_bench_triad(benchmark, shape):
    """The triad over the headline's bytes (fp32): the bandwidth the step ratios are read against."""
    case = make_case(OPS[HEADLINE], shape, torch.float32)
    benchmark.extra_info.update(bytes=case.nbytes)
    benchmark(triad_fn(case.nbytes))


if __name__ == "__main__":
    main()
