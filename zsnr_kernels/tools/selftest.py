"""``zsnr-kernels selftest``: every backend that runs on this machine against the float64 reference.

What a user runs after installing on new hardware (docs/design.md §4).  For each backend of the registry and each
device it runs on here (``cpu``; ``cuda`` where PyTorch sees a GPU; Triton on CPU tensors under
``TRITON_INTERPRET=1``), in float32, float16 and bfloat16:

* **steps**: one call of every sampler of :data:`zsnr_kernels.SAMPLERS` from sigma = inf (the library's point), a
  finite step with everything the sampler takes (its history, its second stage, churn; guidance rescale in the x0
  space), per-sample sigmas (a (B,) tensor) and a step to sigma = 0, each with guidance, guidance rescale and
  per-sample Philox seeds, against ``backend="torch"`` on float64 copies of the inputs under
  :mod:`zsnr_kernels.tools.tolerances`; the finite step again with ``out=y`` (in place), which must equal the
  fresh output bit for bit;
* **noise** (§2.8): the Philox integers bit for bit where a backend exposes its generator (the torch reference on
  the device, the cpu module's vector loop, Triton's ``tl.philox``), the in-kernel normals against the definition
  (:func:`zsnr_kernels.noise.normal`) to float rounding, and a batch with per-sample seeds against one call per
  sample, bit for bit;
* **plans**: a :class:`~zsnr_kernels.SamplingPlan` from sigma = inf against ``sample()`` on the same backend (bit
  for bit where both read the same coefficients), and on CUDA the plan's whole run captured in one CUDA graph,
  replayed with new noise, against its eager run, bit for bit.

It prints one table row per backend, device, dtype and check (the worst error and how much of its tolerance it
used), says what failed and what to do, and exits with status 1 on any miss.
"""

from __future__ import annotations

import argparse
import csv
import functools
import math
import platform
import sys
import textwrap
import time
from dataclasses import dataclass, field

import torch

from .. import coefficients as co, noise as _noise, sampling, steps
from .._version import __version__
from ..backends import ext as _ext, registry as _backend
from ..parameterization import parameterization
from ..plan import SamplingPlan
from . import cli as _cli, tolerances as _tol

INF = math.inf
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: batch 3 for per-sample seeds and sigmas; 3 * 17 * 13 = 663 elements per sample, not a multiple of 4, so each
#: sample's last Philox group is partial
SHAPE = (3, 3, 17, 13)
SEEDS = (7, 2**32 + 5, 2**64 - 1)      # one per sample, setting the high bits of either half of the key
STEP_INDEX = 3
GUIDANCE = {"guidance_scale": 4.5, "guidance_rescale": 0.7}
SIGMA, SIGMA_NEXT, SIGMA_HAT = 6.0, 2.5, 3.2   # a finite step, and a churn target above its sigma_next
PREV = (9.0, 14.0, 20.0)                       # remembered sigmas, newest first
TO_ZERO = 0.7                                  # the last step, to sigma = 0
# Per-sample sigmas, one per sample: all finite and nonzero, so that every sample of a two-stage sampler takes
# both stages (the stage is one decision for the whole batch); history sigmas above each sample's sigma.
PER_SAMPLE_SIGMA, PER_SAMPLE_NEXT, PER_SAMPLE_HAT = (9.0, 6.0, 0.7), (2.5, 2.0, 0.3), (3.2, 2.6, 0.5)
PER_SAMPLE_PREV = ((14.0, 9.0, 1.5), (20.0, 14.0, 3.0), (30.0, 20.0, 5.0))
PLAN_SIGMAS = (INF, 9.0, 2.0, 0.4, 0.0)
PLAN_GUIDANCE = {"guidance_scale": 3.0, "guidance_rescale": 0.7}
#: the backends whose plan reads the very coefficients their sample() computes, so that the two agree bit for bit
#: (tests/api/test_plan.py); cuda's sample() computes a step's coefficients on the device, whose log/expm1 differ
#: from glibc's by an ulp, so it is held to tolerances.RUN_ULPS
PLAN_BITWISE = frozenset({"torch", "cpu", "triton"})

#: the table's checks, in its order
CHECKS = ("from inf", "finite", "in place", "per-sample sigmas", "to 0", "philox integers", "philox normals",
          "batch = 1 + 1 + 1", "plan = sample()", "cuda graph")


def _model(y: torch.Tensor, sigma: torch.Tensor):
    """A smooth nonlinear stand-in network with a guidance pair (the plans' model)."""
    f = 0.6 * y + 0.2 * torch.sin(3.0 * y)
    return f, 0.5 * f - 0.1


# ------------------------------------------------------------------------------------------------- the cases


def _sigma(v, device):
    """A noise level as the step functions take it: a float, or one per sample as a (B,) float64 tensor on the
    latent's device (§2.9)."""
    return torch.tensor(v, dtype=torch.float64, device=device) if isinstance(v, tuple) else v


def _fmt_sigma(v) -> str:
    return "(" + ", ".join(f"{s:g}" for s in v) + ")" if isinstance(v, tuple) else f"{v:g}"


@dataclass(frozen=True)
class Case:
    """One step call: ``steps.sampler_step(sampler, y, (F_c, F_u), sigma, sigma_next, ...)`` with ``prev`` history
    sigmas (tensors h0, h1, ...), and for ``stage2`` the second call of a two-stage sampler (its first stage's D is
    h0; the model was evaluated at ``first_sigma``)."""

    check: str
    sampler: str
    sigma: float | tuple
    sigma_next: float | tuple
    hat: float | tuple | None = None      # sigma_hat_next: the next step's churn, folded in (churn samplers)
    prev: tuple = ()
    stage2: bool = False
    first_sigma: float | tuple | None = None
    first_carry: bool = False             # the first call's StepResult.derivative (h1): dpmpp_sde's y_0, CFG++'s D_u
    rescale_space: str = "output"
    in_place: bool = False                # also run with out=y (must equal the fresh output bit for bit)

    @property
    def name(self) -> str:
        s = f"{self.sampler} {_fmt_sigma(self.sigma)} -> {_fmt_sigma(self.sigma_next)}"
        if self.stage2:
            s += " stage 2"
        if self.hat is not None:
            s += f" churn to {_fmt_sigma(self.hat)}"
        if self.prev:
            s += f" history {len(self.prev)}"
        return s + (f", rescale in {self.rescale_space}" if self.rescale_space != "output" else "")

    @property
    def tensors(self) -> tuple[str, ...]:
        n_hist = (1 + self.first_carry) if self.stage2 else len(self.prev)
        return ("y", "fc", "fu", *(f"h{k}" for k in range(n_hist)))


def _first_stage(sampler: str, sigma, sigma_next, hat) -> steps.StepResult:
    """The reference's first call on a tiny float64 batch: whether it is already the whole step, and where the
    second call's model is evaluated."""
    batch = len(sigma) if isinstance(sigma, tuple) else 1
    one = torch.zeros(batch, 1, dtype=torch.float64)
    kw = {} if hat is None else {"sigma_hat_next": _sigma(hat, "cpu")}
    return steps.sampler_step(sampler, one, one, _sigma(sigma, "cpu"), _sigma(sigma_next, "cpu"), backend="torch",
                              seed=0, step_index=0, **kw)


def _two_stage(check: str, sampler: str, sigma, sigma_next, hat=None, **kw) -> list[Case]:
    """The step's first call, and its second where the first is not the whole step."""
    first = _first_stage(sampler, sigma, sigma_next, hat)
    cases = [Case(check, sampler, sigma, sigma_next, hat, **kw)]
    if not first.complete:
        s = first.sigma
        cases.append(Case(check, sampler, sigma, sigma_next, hat, stage2=True, **kw,
                          first_sigma=tuple(s.tolist()) if isinstance(s, torch.Tensor) else s,
                          first_carry=first.derivative is not None))
    return cases


def step_cases(samplers, quick: bool = False) -> list[Case]:
    """Every sampler's cases, built from its row of the sampler table (what it takes: history, two stages,
    churn).  ``quick``: from inf and the finite step only."""
    cases = []
    for name in samplers:
        spec = co.SAMPLERS[name]
        hat = SIGMA_HAT if spec.churn else None
        if spec.kind == "two_stage":
            cases += _two_stage("from inf", name, INF, SIGMA_NEXT, hat)
            cases += _two_stage("finite", name, SIGMA, SIGMA_NEXT, hat, rescale_space="x0", in_place=True)
            if not quick:
                cases += _two_stage("per-sample sigmas", name, PER_SAMPLE_SIGMA, PER_SAMPLE_NEXT,
                                    PER_SAMPLE_HAT if spec.churn else None)
                cases += _two_stage("to 0", name, TO_ZERO, 0.0)
            continue
        depth = spec.history
        cases.append(Case("from inf", name, INF, SIGMA_NEXT, hat))  # no history yet: nothing lies above inf
        cases.append(Case("finite", name, SIGMA, SIGMA_NEXT, hat, PREV[:depth], rescale_space="x0", in_place=True))
        if not quick:
            cases.append(Case("per-sample sigmas", name, PER_SAMPLE_SIGMA, PER_SAMPLE_NEXT,
                              PER_SAMPLE_HAT if spec.churn else None, PER_SAMPLE_PREV[:depth]))
            cases.append(Case("to 0", name, TO_ZERO, 0.0, None, PREV[:depth]))
    return cases


def _inputs(index: int, case: Case, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Unit-scale random inputs of case ``index``, drawn in float64 and rounded to ``dtype`` once, so that their
    float64 copies hold exactly the numbers the backend reads."""
    g = torch.Generator().manual_seed(1000 + index)
    t = {name: torch.randn(SHAPE, generator=g, dtype=torch.float64) for name in case.tensors}
    t["fc"] = 0.8 * t["fu"] + 0.6 * t["fc"]  # a conditional output correlated with the unconditional one
    return {k: v.to(dtype) for k, v in t.items()}


def _call(case: Case, t: dict, backend: str, out: torch.Tensor | None = None) -> steps.StepResult:
    """Run ``case`` on tensors ``t`` (y is ``out`` itself when writing in place)."""
    device = t["y"].device
    y = t["y"] if out is None else out
    kw = dict(GUIDANCE, rescale_space=case.rescale_space, seed=list(SEEDS), step_index=STEP_INDEX, backend=backend)
    if case.hat is not None:
        kw["sigma_hat_next"] = _sigma(case.hat, device)
    if case.prev:
        kw["history"] = [(_sigma(s, device), t[f"h{k}"]) for k, s in enumerate(case.prev)]
    if case.stage2:
        kw["first"] = steps.StepResult(y, _sigma(case.first_sigma, device), t["h0"], complete=False,
                                       derivative=t.get("h1"))  # dpmpp_sde's y_0, CFG++'s D_u
    return steps.sampler_step(case.sampler, y, (t["fc"], t["fu"]), _sigma(case.sigma, device),
                              _sigma(case.sigma_next, device), out=out, **kw)


def _outputs(r: steps.StepResult) -> dict[str, torch.Tensor]:
    return {k: v for k, v in (("y", r.y), ("denoised", r.denoised), ("derivative", r.derivative)) if v is not None}


def _sigma_list(s) -> list[float]:
    return s.tolist() if isinstance(s, torch.Tensor) else [s]


# ------------------------------------------------------------------------------------------------- the table


@dataclass
class Row:
    """One line of the table: a check of one backend on one device in one dtype, over its cases."""

    backend: str
    device: str
    dtype: str
    check: str
    tolerance: str
    cases: set = field(default_factory=set)
    err: float = 0.0
    used: float = -1.0          # the worst share of the tolerance (<= 1 passes); bit-exact checks: 0 or inf
    worst: str = ""
    failures: list = field(default_factory=list)

    def record(self, case: str, err: float, used: float, failure: str | None = None, output: str = "") -> None:
        self.cases.add(case)
        what = f"{case}: {output}" if output else case
        if not used <= self.used:  # NaN counts as the worst
            self.err, self.used, self.worst = err, used, what
        if failure is not None:
            self.failures.append(f"{what}: {failure}")

    @property
    def ok(self) -> bool:
        return not self.failures

    def cells(self) -> list[str]:
        used = "-" if not self.cases else f"{100 * self.used:.0f}%" if math.isfinite(self.used) else "MISS"
        return [self.backend, self.device, self.dtype, self.check, str(len(self.cases)), f"{self.err:.2g}",
                self.tolerance, used, "ok" if self.ok else "FAIL"]


HEADER = ["backend", "device", "dtype", "check", "cases", "max |err|", "tolerance", "used", "result"]


class Report:
    """The rows of one run, by (backend, device, dtype, check); :meth:`ordered` gives the table's order."""

    def __init__(self, out, verbose: bool):
        self.rows: dict[tuple, Row] = {}
        self.out, self.verbose = out, verbose

    def row(self, backend: str, device: str, dtype: str, check: str, tolerance: str) -> Row:
        key = (backend, device, dtype, check)
        if key not in self.rows:
            self.rows[key] = Row(backend, device, dtype, check, tolerance)
        return self.rows[key]

    def case(self, row: Row, case: str, err: float, used: float, failure: str | None = None,
             output: str = "") -> None:
        """Record one case (one ``output`` of it) in ``row``; print it with --verbose (the summary lists the first
        failures of each row)."""
        row.record(case, err, used, failure, output)
        if self.verbose:
            print(f"  {'FAIL' if failure else 'ok  '} {row.backend} {row.device} {row.dtype} {row.check}: {case}"
                  + (f": {output}" if output else "") + ": "
                  + (failure or f"max |err| {err:.3g}, {100 * used:.0f}% of the tolerance"), file=self.out)

    def error(self, row: Row, case: str, exc: BaseException) -> None:
        self.case(row, case, math.nan, math.inf, f"raised {type(exc).__name__}: {exc}")

    def ordered(self) -> list[Row]:
        """The rows by device, backend (the registry's order), dtype and check (:data:`CHECKS`)."""
        backends = [b.name for b in _backend.REGISTRY]
        dtypes = list(DTYPES)
        return sorted(self.rows.values(), key=lambda r: (
            r.device != "cpu", backends.index(r.backend), dtypes.index(r.dtype) if r.dtype in dtypes else -1,
            CHECKS.index(r.check)))

    def table(self) -> str:
        lines = [HEADER] + [r.cells() for r in self.ordered()]
        widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
        right = {4, 5, 7}  # numbers
        return "\n".join("  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in
                                   enumerate(zip(line, widths))).rstrip() for line in lines)

    def write_csv(self, path: str) -> None:
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["backend", "device", "dtype", "check", "cases", "max_err", "tolerance", "used", "result",
                        "worst_case", "failures"])
            for r in self.ordered():
                w.writerow([r.backend, r.device, r.dtype, r.check, len(r.cases), f"{r.err:.6g}", r.tolerance,
                            f"{r.used:.6g}", "ok" if r.ok else "FAIL", r.worst, " | ".join(r.failures)])


def _step_tolerance(dtype: torch.dtype) -> str:
    atol, rtol = _tol.STEP[dtype]
    s = f"{atol:g} + {rtol:g} |ref|"
    return s if dtype == torch.float32 else s + f", {_tol.LOW_PRECISION_VS_TORCH:g}x torch"


# --------------------------------------------------------------------------------------------------- steps


class _Cached:
    """Each case's inputs, float64 reference and torch backend's low-precision result, computed once and shared by
    every backend (exceptions too: a case the reference refuses fails every backend with its message)."""

    def __init__(self):
        self._memo: dict = {}

    def get(self, key, compute):
        if key not in self._memo:
            try:
                self._memo[key] = (compute(), None)
            except Exception as exc:  # noqa: BLE001 -- reported per backend, not fatal to the run
                self._memo[key] = (None, exc)
        value, exc = self._memo[key]
        if exc is not None:
            raise exc
        return value


def _check_step(report: Report, cache: _Cached, backend: str, device: str, dtype_name: str, index: int,
                case: Case) -> None:
    dtype = DTYPES[dtype_name]
    row = report.row(backend, device, dtype_name, case.check, _step_tolerance(dtype))
    inputs = cache.get(("inputs", index, dtype), lambda: _inputs(index, case, dtype))
    t = {k: v.to(device) for k, v in inputs.items()}
    try:
        ref = cache.get(("ref", index, dtype), lambda: _call(case, {k: v.double() for k, v in inputs.items()},
                                                            "torch"))
    except Exception as exc:  # noqa: BLE001
        report.case(row, case.name, math.nan, math.inf,
                    f"the float64 reference (backend='torch') raised {type(exc).__name__}: {exc}")
        return
    try:
        lp = None if dtype == torch.float32 else cache.get(("lp", index, dtype, device),
                                                           lambda: _call(case, t, "torch"))
        got = _call(case, t, backend)
    except Exception as exc:  # noqa: BLE001
        report.error(row, case.name, exc)
        return
    g, r = _outputs(got), _outputs(ref)
    if g.keys() != r.keys() or got.complete != ref.complete or _sigma_list(got.sigma) != _sigma_list(ref.sigma):
        report.case(row, case.name, math.nan, math.inf,
                    f"returned {sorted(g)}, complete={got.complete}, sigma={_sigma_list(got.sigma)}; the reference "
                    f"{sorted(r)}, complete={ref.complete}, sigma={_sigma_list(ref.sigma)}")
        return
    for k in r:
        if not torch.isfinite(g[k]).all():
            report.case(row, case.name, math.nan, math.inf, "non-finite values (the reference's are "
                        + ("finite)" if torch.isfinite(r[k]).all() else "not either)"), output=k)
            continue
        e = _tol.step_error(g[k], r[k], None if lp is None else _outputs(lp)[k])
        failure = None
        if not e.used <= 1.0:
            failure = f"max |err| {e.err:.3g} is {100 * e.used:.0f}% of the tolerance ({_step_tolerance(dtype)}" + (
                f"; the torch backend's own error {e.torch_err:.3g})" if e.torch_err is not None else ")")
        report.case(row, case.name, e.err, e.used, failure, output=k)
    if case.in_place:
        _check_in_place(report, backend, device, dtype_name, case, t, got)


def _check_in_place(report: Report, backend, device, dtype_name, case: Case, t: dict,
                    fresh: steps.StepResult) -> None:
    """``out=y``: the result is y itself and holds the fresh output's values, bit for bit (the statistics pass of
    the x0-space rescale reads y before the update pass overwrites it)."""
    row = report.row(backend, device, dtype_name, "in place", "bit-exact")
    y = t["y"].clone()
    try:
        r = _call(case, {**t, "y": y}, backend, out=y)
    except Exception as exc:  # noqa: BLE001
        report.error(row, case.name, exc)
        return
    if r.y is not y:
        report.case(row, case.name, math.nan, math.inf, "the result is not the out= tensor")
        return
    a, b = _outputs(r), _outputs(fresh)
    if a.keys() != b.keys():
        report.case(row, case.name, math.nan, math.inf, f"returned {sorted(a)}, a fresh output {sorted(b)}")
        return
    err = max((a[k].double() - b[k].double()).abs().max().item() for k in b)
    equal = all(torch.equal(a[k], b[k]) for k in b)
    report.case(row, case.name, err, 0.0 if equal else math.inf,
                None if equal else f"out=y differs from a fresh output by up to {err:.3g}")


# --------------------------------------------------------------------------------------------------- noise


def _torch_words(device, seeds, step, draw, g0, n_groups) -> torch.Tensor:
    """The torch reference's Philox words of groups g0 .. g0 + n_groups - 1 of each seed, computed by PyTorch's
    integer ops on ``device`` (on the CPU: the definition the others are compared with); int64 [seeds, 4 groups]."""
    g = torch.arange(g0, g0 + n_groups, dtype=torch.int64, device=device)
    key0 = torch.tensor([s & 0xFFFFFFFF for s in seeds], device=device)[:, None]
    key1 = torch.tensor([s >> 32 for s in seeds], device=device)[:, None]
    words = _noise.philox4x32(key0, key1, g & 0xFFFFFFFF, g >> 32, step, draw)
    return torch.stack(words, dim=-1).reshape(len(seeds), -1).cpu()


def _cpu_words(device, seeds, step, draw, g0, n_groups) -> torch.Tensor:
    """The cpu kernels' element-pass generator (the vector Philox of the instruction set in use, scalar for the
    tail)."""
    out = torch.empty(len(seeds), n_groups, 4, dtype=torch.uint32)
    for i, s in enumerate(seeds):
        _ext.C.cpu_philox_rows(out[i].data_ptr(), s, step, draw, g0, n_groups)
    return out.reshape(len(seeds), -1).to(torch.int64)


@functools.cache
def _triton_philox_kernel():
    """A Triton kernel writing ``tl.philox``'s words (the generator the triton backend's kernels call) with the
    counter of §2.8; built on first use, so that this module imports without Triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def philox_words(seeds, out, n_groups, g0, step, draw, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        g = g0 + j
        seed = tl.load(seeds + b)  # int64 holding the uint64 seed
        zero = (j * 0).to(tl.uint32)
        x0, x1, x2, x3 = tl.philox(seed, g.to(tl.uint32), (g >> 32).to(tl.uint32), zero + step, zero + draw)
        base = (b * n_groups + j) * 4
        mask = j < n_groups
        tl.store(out + base + 0, x0.to(tl.int64), mask=mask)
        tl.store(out + base + 1, x1.to(tl.int64), mask=mask)
        tl.store(out + base + 2, x2.to(tl.int64), mask=mask)
        tl.store(out + base + 3, x3.to(tl.int64), mask=mask)

    return triton, philox_words


def _triton_words(device, seeds, step, draw, g0, n_groups) -> torch.Tensor:
    triton, kernel = _triton_philox_kernel()
    signed = torch.tensor([s - 2**64 if s >= 2**63 else s for s in seeds], dtype=torch.int64, device=device)
    out = torch.zeros(len(seeds), n_groups * 4, dtype=torch.int64, device=device)
    block = 128
    kernel[(len(seeds), triton.cdiv(n_groups, block))](signed, out, n_groups, g0, step, draw, BLOCK=block)
    return out.cpu() & 0xFFFFFFFF


#: how each backend's Philox integers are reached (a backend missing here exposes none: its normals are checked)
PHILOX_WORDS = {"torch": _torch_words, "cpu": _cpu_words, "triton": _triton_words}


#: the Philox groups compared: step 9, draw 1, 1003 groups from 2**32 - 37, across the carry of the group index into
#: the counter's second word (and a partial vector block of the cpu loop)
PHILOX_PROBE = (9, 1, 2**32 - 37, 1003)


def _check_noise(report: Report, backend: str, device: str) -> None:
    if backend in PHILOX_WORDS and not (backend == "torch" and device == "cpu"):  # (that is the definition itself)
        row = report.row(backend, device, "uint32", "philox integers", "bit-exact")
        step, draw, g0, n_groups = PHILOX_PROBE
        what = f"{n_groups} groups from {g0} of each seed, step {step}, draw {draw}"
        try:
            got = PHILOX_WORDS[backend](device, SEEDS, *PHILOX_PROBE)
            want = _torch_words("cpu", SEEDS, *PHILOX_PROBE)
            equal = torch.equal(got, want)
            report.case(row, what, (got - want).abs().max().item(), 0.0 if equal else math.inf,
                        None if equal else f"{int((got != want).sum())} of {want.numel()} words differ from the "
                        "definition")
        except Exception as exc:  # noqa: BLE001
            report.error(row, what, exc)

    # the normals: with y = F = 0 a noisy step from inf writes e z, the noise itself scaled
    spec = next(s for s in co.SAMPLERS.values() if s.kind == "single" and s.stochastic(1.0))
    eta = {"eta": 1.0} if spec.eta else {}
    row = report.row(backend, device, "float32", "philox normals", f"{_tol.NORMAL_ATOL:g}")
    what = f"{spec.name} from inf with y = F = 0: y / e against noise.normal"
    try:
        zero = torch.zeros(SHAPE, device=device)
        r = steps.sampler_step(spec.name, zero, zero, INF, SIGMA_NEXT, seed=list(SEEDS), step_index=STEP_INDEX,
                               backend=backend, **eta)
        e = co.step_coeffs(parameterization("v"), co.StepArgs(spec.name, INF, SIGMA_NEXT, **eta)).e
        err = (r.y.cpu() / e - _noise.normal(SHAPE, list(SEEDS), STEP_INDEX)).abs().max().item()
        report.case(row, what, err, err / _tol.NORMAL_ATOL,
                    None if err <= _tol.NORMAL_ATOL else f"max |z - definition| {err:.3g}")
    except Exception as exc:  # noqa: BLE001
        report.error(row, what, exc)

    # A batch with per-sample seeds equals one call per sample: the Philox key and counter are per sample (§2.8).
    # With guidance rescale where the backend runs compiled kernels, whose statistics are reduced in fixed blocks per
    # sample (§2.7); the torch reference's reductions are PyTorch's, which may tile a batch otherwise than one sample.
    row = report.row(backend, device, "float32", "batch = 1 + 1 + 1", "bit-exact")
    guidance = GUIDANCE if _backend.get(backend).compiled else {"guidance_scale": GUIDANCE["guidance_scale"]}
    what = f"{spec.name} {SIGMA:g} -> {SIGMA_NEXT:g}, seeds {list(SEEDS)}" + (
        ", guidance rescale" if "guidance_rescale" in guidance else "")
    try:
        g = torch.Generator().manual_seed(5)
        y, fc, fu = (torch.randn(SHAPE, generator=g).to(device) for _ in range(3))
        kw = dict(guidance, step_index=STEP_INDEX, backend=backend, **eta)
        batch = steps.sampler_step(spec.name, y, (fc, fu), SIGMA, SIGMA_NEXT, seed=list(SEEDS), **kw).y
        ones = torch.cat([steps.sampler_step(spec.name, y[i:i + 1], (fc[i:i + 1], fu[i:i + 1]), SIGMA, SIGMA_NEXT,
                                             seed=s, **kw).y for i, s in enumerate(SEEDS)])
        err = (batch.double() - ones.double()).abs().max().item()
        equal = torch.equal(batch, ones)
        report.case(row, what, err, 0.0 if equal else math.inf,
                    None if equal else f"the batch differs from one call per sample by up to {err:.3g}")
    except Exception as exc:  # noqa: BLE001
        report.error(row, what, exc)


# --------------------------------------------------------------------------------------------------- plans


def _check_plan(report: Report, backend: str, device: str, dtype_name: str, sampler: str) -> None:
    dtype = DTYPES[dtype_name]
    bitwise = backend in PLAN_BITWISE
    row = report.row(backend, device, dtype_name, "plan = sample()",
                     "bit-exact" if bitwise else f"{_tol.RUN_ULPS[dtype]} ulps")
    what = f"{sampler} {_fmt_sigma(PLAN_SIGMAS)}"
    kw = dict(PLAN_GUIDANCE, sampler=sampler, seed=list(SEEDS), backend=backend)
    g = torch.Generator().manual_seed(11)
    noise = torch.randn(SHAPE, generator=g).to(dtype=dtype, device=device)
    try:
        plan = SamplingPlan(PLAN_SIGMAS, SHAPE, dtype=dtype, device=device, **kw)
        planned = plan.run(_model, noise)
        stepped = sampling.sample(_model, noise, PLAN_SIGMAS, **kw)
    except Exception as exc:  # noqa: BLE001
        report.error(row, what, exc)
        return
    err = (planned.double() - stepped.double()).abs().max().item()
    if bitwise:
        ok, used = torch.equal(planned, stepped), 0.0 if torch.equal(planned, stepped) else math.inf
    else:
        allowed = _tol.run_allowed(stepped)
        ok, used = err <= allowed, err / allowed
    report.case(row, what, err, used, None if ok else f"plan.run differs from sample() by up to {err:.3g}")
    if device == "cuda" and _backend.get(backend).compiled:
        _check_graph(report, backend, dtype_name, sampler, plan, noise)


def _check_graph(report: Report, backend: str, dtype_name: str, sampler: str, plan: SamplingPlan,
                 noise: torch.Tensor) -> None:
    """The plan's whole run, model included, captured in one CUDA graph and replayed with new noise copied into the
    captured input: each replay equals an eager run."""
    row = report.row(backend, "cuda", dtype_name, "cuda graph", "bit-exact")
    what = f"{sampler} {_fmt_sigma(PLAN_SIGMAS)}, 2 replays"
    try:
        static_noise = noise.clone()
        plan.run(_model, static_noise)  # every kernel the capture launches is compiled (Triton) before it
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_x0 = plan.run(_model, static_noise)
        err, equal = 0.0, True
        for scale in (0.5, 2.0):
            fresh = noise * scale
            static_noise.copy_(fresh)
            graph.replay()
            torch.cuda.synchronize()
            eager = plan.run(_model, fresh)
            err = max(err, (static_x0.double() - eager.double()).abs().max().item())
            equal = equal and torch.equal(static_x0, eager)
    except Exception as exc:  # noqa: BLE001
        report.error(row, what, exc)
        return
    report.case(row, what, err, 0.0 if equal else math.inf,
                None if equal else f"a replay differs from the eager run by up to {err:.3g}")


def plan_samplers(samplers, quick: bool) -> list[str]:
    """The samplers whose plans run: all of them, or with ``quick`` the first of each kind (single, two-stage,
    multistep) that draws noise, else the first of that kind."""
    if not quick:
        return list(samplers)
    chosen = {}
    for name in samplers:
        spec = co.SAMPLERS[name]
        if spec.kind not in chosen or (spec.stochastic(1.0) and not co.SAMPLERS[chosen[spec.kind]].stochastic(1.0)):
            chosen[spec.kind] = name
    return list(chosen.values())


# ----------------------------------------------------------------------------------------------------- run


def _devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def available(backends) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """``(devices each backend runs on here, reasons of those that run on none)``, from the registry."""
    runs, why = {}, {}
    for name in backends:
        for device in _devices():
            reasons = _backend.not_supported_reasons(name, torch.zeros(1, device=device))
            if not reasons:
                runs.setdefault(name, []).append(device)
            else:
                why[name] = reasons
        if name in runs:
            why.pop(name, None)
    return runs, why


def _machine() -> str:
    parts = [f"zsnr-kernels {__version__}", f"python {platform.python_version()}", f"torch {torch.__version__}"]
    if _ext.available():
        parts.append(f"cpu kernels {_ext.C.cpu_isa()}")
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    else:
        parts.append(f"no GPU visible to torch (built for CUDA {torch.version.cuda})")
    return ", ".join(parts)


#: what to do, by what went wrong
FIX_FAILED = """\
  * A backend that missed a check computes wrong samples on this machine.  Until it is fixed, run on one that
    passed: zsnr_kernels.use_backend("NAME") around your sampling, or backend="NAME" per call (backend="torch" is
    the reference itself, on any device).
  * zsnr-kernels selftest --backends NAME --verbose  prints every case of that backend."""
FIX_MISSING = """\
  * A required backend that did not run: the reasons above say why, `zsnr-kernels info` in more detail (the cuda
    module is built by pip install where nvcc is found: README, "Building for a GPU"; the triton backend needs
    pip install triton and a GPU)."""
FIX_REPORT = """\
  * Report this output with that of `zsnr-kernels info` (versions, builds, the GPU) in an issue."""


def run(a: argparse.Namespace, out=None) -> int:
    """The self-test with parsed options (see :func:`add_arguments`); returns the exit status (0: all passed)."""
    out = out or sys.stdout
    t0 = time.perf_counter()
    backends = list(dict.fromkeys([*(a.backends or [b.name for b in _backend.REGISTRY]), *a.require]))
    samplers = a.samplers or list(co.SAMPLERS)
    dtypes = a.dtypes or list(DTYPES)
    runs, why = available(backends)
    print(f"selftest: {_machine()}", file=out)
    print("backends: " + ", ".join(f"{b} on {'+'.join(d)}" for b, d in runs.items()), file=out)
    for b, reasons in why.items():
        print(f"not run: {b}: {'; '.join(reasons)}", file=out)
    if not torch.cuda.is_available():
        print("no CUDA device: the cuda and triton backends and the CUDA-graph check need one (TRITON_INTERPRET=1 "
              "runs the Triton kernels on the CPU)", file=out)

    report = Report(out, a.verbose)
    cache = _Cached()
    cases = step_cases(samplers, a.quick)
    for device in _devices():
        on_device = [b for b in runs if device in runs[b]]
        for b in on_device:
            _check_noise(report, b, device)
        for dtype_name in dtypes:
            for b in on_device:
                for index, case in enumerate(cases):
                    _check_step(report, cache, b, device, dtype_name, index, case)
                for sampler in plan_samplers(samplers, a.quick):
                    _check_plan(report, b, device, dtype_name, sampler)

    rows = report.ordered()
    legend = (
        "Steps, each with guidance, guidance rescale and per-sample Philox seeds: |err| <= atol + rtol |ref| per "
        "element against backend='torch' on float64 copies of the inputs (zsnr_kernels/tools/tolerances.py); "
        f"fp16/bf16 also <= {_tol.LOW_PRECISION_VS_TORCH:g}x the torch backend's own error in that dtype + "
        f"{_tol.LOW_PRECISION_SLACK_ULPS} fp32 ulps.  used: the worst element's share of its tolerance.")
    no_words = [b for b in runs if b not in PHILOX_WORDS]
    if no_words:
        legend += (f"  {', '.join(no_words)}: no entry point to the Philox integers; the normals of its steps are "
                   "checked (philox normals).")
    print("\n" + textwrap.fill(legend, 118), file=out)
    print(report.table() + "\n", file=out)
    if a.csv:
        report.write_csv(a.csv)
        print(f"wrote {a.csv}", file=out)

    failed = [r for r in rows if not r.ok]
    missing = [b for b in a.require if b not in runs]
    elapsed = time.perf_counter() - t0
    if not failed and not missing:
        print(f"selftest passed: {len(rows)} checks of {', '.join(runs)} ({elapsed:.0f} s)", file=out)
        return 0
    print(f"selftest FAILED ({elapsed:.0f} s):", file=out)
    for b in missing:
        print(f"  {b}: required (--require) but it runs on no device here: {'; '.join(why.get(b, []))}", file=out)
    for r in failed:
        print(f"  {r.backend} on {r.device}, {r.dtype}, {r.check}: {len(r.failures)} of {len(r.cases)} cases "
              "failed", file=out)
        for message in r.failures[:3]:
            print(f"    {message}", file=out)
        if len(r.failures) > 3:
            print(f"    ... and {len(r.failures) - 3} more (--verbose lists them)", file=out)
    print("What to do:", *([FIX_FAILED] if failed else []), *([FIX_MISSING] if missing else []), FIX_REPORT,
          sep="\n", file=out)
    return 1


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The self-test's options (shared by ``python -m zsnr_kernels selftest`` and :func:`main`)."""
    names = [b.name for b in _backend.REGISTRY]
    ap.add_argument("--quick", action="store_true",
                    help="the steps from inf and the finite steps only, and plans of one sampler per kind")
    ap.add_argument("--backends", nargs="+", choices=names, metavar="BACKEND",
                    help=f"backends to test, where they run here (default all: {' '.join(names)})")
    ap.add_argument("--require", nargs="+", choices=names, default=[], metavar="BACKEND",
                    help="fail unless these backends run here (e.g. --require cuda triton on a GPU machine)")
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES), metavar="DTYPE",
                    help=f"storage dtypes (default all: {' '.join(DTYPES)})")
    ap.add_argument("--samplers", nargs="+", choices=list(co.SAMPLERS), metavar="SAMPLER",
                    help="samplers (default: every row of the sampler table)")
    ap.add_argument("--csv", type=_cli.output_path, metavar="PATH", help="write the table to this CSV file")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every case's error")


def main(argv=None) -> int:
    """``python -m zsnr_kernels selftest [options]`` as a function; returns the exit status."""
    ap = argparse.ArgumentParser(prog="python -m zsnr_kernels selftest", description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    return run(ap.parse_args(argv))
