"""Noise schedules: betas, zero terminal SNR, timestep spacings, sigma grids and sigma quantization.

All math here is host math in float64 (docs/design.md §2.6).  Functions take Python numbers, sequences or torch tensors
and return float64 CPU tensors unless a docstring says otherwise.  Noise levels live in [0, inf]: sigma = inf is
the exact zero-terminal-SNR start (Lin et al. 2023), sigma = 0 is clean data, and nothing here returns NaN.

Conventions (those of diffusers and k-diffusion):

* ``alphas_cumprod[t] = prod_{s <= t} (1 - betas[s])`` and ``sigma_t = sqrt((1 - abar_t) / abar_t)``;
  a table of training sigmas is ascending, index = training timestep.
* A sampling schedule is descending and ends with an appended 0.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Sequence, Union

import torch

from . import _validate

__all__ = [
    "BETA_SCHEDULES",
    "SPACINGS",
    "GRIDS",
    "COMFY_SCHEDULERS",
    "AYS_MODELS",
    "betas",
    "alphas_cumprod",
    "rescale_zero_terminal_snr",
    "sigmas_from_alphas_cumprod",
    "timesteps",
    "karras",
    "exponential",
    "polyexponential",
    "kl_optimal",
    "linear_quadratic",
    "align_your_steps",
    "loglinear_interp",
    "betainc",
    "beta_ppf",
    "vp",
    "flow",
    "flow_times",
    "flow_shift_mu",
    "flow_time_to_sigma",
    "sigma_to_flow_time",
    "quantize",
    "DiscreteSchedule",
]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "linspace", "trailing")
GRIDS = ("karras", "exponential", "polyexponential", "kl_optimal", "vp")
#: ComfyUI's scheduler menu (``comfy.samplers.SCHEDULER_NAMES``): :meth:`DiscreteSchedule.comfy`
COMFY_SCHEDULERS = ("normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta",
                    "linear_quadratic", "kl_optimal")
QUANTIZE_SPACES = ("log", "linear")

_F64 = torch.float64
TensorLike = Union[torch.Tensor, Sequence[float]]


# ----------------------------------------------------------------------------------------------------------------
# validation helpers


def _as_f64_vector(name: str, values: TensorLike) -> torch.Tensor:
    """A 1-D float64 CPU copy of ``values`` (never aliases the caller's tensor)."""
    try:
        if isinstance(values, torch.Tensor):
            t = values.detach().to(device="cpu", dtype=_F64).clone()
        else:  # not via the default dtype: a list of Python floats must not pass through float32
            t = torch.tensor(values, dtype=_F64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} must be a 1-D sequence of real numbers: {exc}") from None
    if t.ndim != 1 or t.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {tuple(t.shape)}")
    if torch.isnan(t).any():
        raise ValueError(f"{name} contains NaN")
    return t


# ----------------------------------------------------------------------------------------------------------------
# betas and alphas_cumprod


def _alpha_bar_cosine(t: float) -> float:
    """Nichol & Dhariwal's cosine alpha-bar, s = 0.008."""
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def betas(
    kind: str = "scaled_linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
) -> torch.Tensor:
    """Training betas as diffusers' DDPM/DDIM schedulers build them, but in float64.

    * ``linear``: ``linspace(beta_start, beta_end, T)``.
    * ``scaled_linear`` (Stable Diffusion): ``linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2``.
    * ``squaredcos_cap_v2``: ``beta_i = min(1 - abar((i+1)/T) / abar(i/T), 0.999)`` with the cosine
      ``abar(t) = cos((t + 0.008) / 1.008 * pi/2) ** 2``; beta_start/beta_end are ignored.

    diffusers computes ``linear``/``scaled_linear`` with a float32 ``torch.linspace`` (so its values differ from
    these by float32 rounding, a few ulp of float32) and ``squaredcos_cap_v2`` in Python floats before casting to
    float32 (so its values are exactly these rounded to float32).
    """
    _validate.choice("kind", kind, BETA_SCHEDULES)
    T = _validate.integer("num_train_timesteps", num_train_timesteps, lo=2)
    if kind == "squaredcos_cap_v2":
        vals = [min(1 - _alpha_bar_cosine((i + 1) / T) / _alpha_bar_cosine(i / T), 0.999) for i in range(T)]
        return torch.tensor(vals, dtype=_F64)
    b0 = _validate.positive("beta_start", beta_start)
    b1 = _validate.positive("beta_end", beta_end)
    for name, b in (("beta_start", b0), ("beta_end", b1)):
        if b >= 1:
            raise ValueError(f"{name} must be < 1, got {b}")
    if kind == "linear":
        return torch.linspace(b0, b1, T, dtype=_F64)
    return torch.linspace(b0**0.5, b1**0.5, T, dtype=_F64) ** 2


def _check_betas(b: TensorLike) -> torch.Tensor:
    b = _as_f64_vector("betas", b)
    if ((b < 0) | (b > 1)).any():
        raise ValueError("betas must lie in [0, 1]")
    return b


def alphas_cumprod(betas: TensorLike) -> torch.Tensor:
    """``cumprod(1 - betas)`` in float64.  A final beta of exactly 1 gives a final value of exactly 0."""
    return torch.cumprod(1.0 - _check_betas(betas), dim=0)


def rescale_zero_terminal_snr(betas: TensorLike) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: rescale betas so the terminal SNR is exactly zero.

    With ``a = sqrt(alphas_cumprod)``, the new ``a'`` is ``(a - a[-1]) * a[0] / (a[0] - a[-1])``: an affine map
    that keeps ``a[0]`` and sends ``a[-1]`` to exactly 0.0 (``x - x`` is exact), so the last beta is exactly 1,
    the last ``alphas_cumprod`` is exactly 0.0 and the last sigma is inf.  The first beta is returned unchanged
    (diffusers' ``rescale_zero_terminal_snr`` recomputes it as ``1 - a'[0]**2``, which may move it by an ulp);
    the others agree with diffusers up to its float32 arithmetic.
    """
    b = _check_betas(betas)
    if b.numel() < 2:
        raise ValueError("betas must have at least 2 entries")
    a = torch.cumprod(1.0 - b, dim=0).sqrt()
    if (a[:-1] == 0).any():
        k = int(torch.nonzero(a[:-1] == 0)[0])
        raise ValueError(f"alphas_cumprod is 0 at timestep {k}, before the last (a beta of 1 there, or betas whose "
                         "product underflows); only the last may reach 0 (the rescale makes it so)")
    a0, aT = a[0].item(), a[-1].item()
    if not a0 > aT:
        raise ValueError("betas must give alphas_cumprod[0] > alphas_cumprod[-1] (some beta after the first > 0)")
    a = (a - aT) * (a0 / (a0 - aT))
    abar = a * a
    out = torch.empty_like(b)
    out[0] = b[0]
    out[1:] = 1.0 - abar[1:] / abar[:-1]
    out[-1] = 1.0  # abar[-1] is exactly 0 already; make the intent explicit
    return out


def sigmas_from_alphas_cumprod(alphas_cumprod: TensorLike) -> torch.Tensor:
    """``sigma = sqrt((1 - abar) / abar)``, with ``sigma = inf`` exactly where ``abar == 0`` (no NaN, no warning)."""
    ac = _as_f64_vector("alphas_cumprod", alphas_cumprod)
    if ((ac < 0) | (ac > 1)).any():
        raise ValueError("alphas_cumprod must lie in [0, 1]")
    zero = ac == 0
    safe = torch.where(zero, torch.ones_like(ac), ac)
    return torch.where(zero, torch.full_like(ac, math.inf), ((1.0 - safe) / safe).sqrt())


# ----------------------------------------------------------------------------------------------------------------
# timestep spacing (diffusers' DDIMScheduler.set_timesteps)


def timesteps(
    num_steps: int, num_train_timesteps: int = 1000, spacing: str = "leading", steps_offset: int = 0
) -> torch.Tensor:
    """Integer training timesteps, descending, exactly as diffusers' ``DDIMScheduler.set_timesteps``.

    With ``T = num_train_timesteps`` and ``S = num_steps`` (numpy's float arithmetic is reproduced step by step,
    and ``round`` is round-half-to-even like ``np.round``):

    * ``leading``: ``arange(S) * (T // S)`` reversed, plus ``steps_offset``.
    * ``linspace``: ``round(linspace(0, T - 1, S))`` reversed (``S = 1`` gives ``[0]``, as numpy does).
    * ``trailing``: ``round(arange(T, 0, -T / S)) - 1``.  numpy's float ``arange`` returns S + 1 values for some S
      (T = 1000: S = 61, 103, 121, ...), so diffusers then ends with a spurious timestep -1; we return the first S.

    ``steps_offset`` applies to ``leading`` only, as in diffusers (it is ignored otherwise).  Returns int64.
    """
    T = _validate.integer("num_train_timesteps", num_train_timesteps, lo=1)
    S = _validate.integer("num_steps", num_steps, lo=1, hi=T)
    _validate.choice("spacing", spacing, SPACINGS)
    offset = _validate.integer("steps_offset", steps_offset, lo=0)
    if spacing == "leading":
        ratio = T // S
        ts = [i * ratio + offset for i in range(S)][::-1]
    elif spacing == "linspace":
        step = (T - 1) / (S - 1) if S > 1 else 0.0
        vals = [float(i) * step for i in range(S)]
        if S > 1:
            vals[-1] = float(T - 1)  # numpy sets the endpoint exactly
        ts = [round(v) for v in vals][::-1]
    else:
        # np.arange(T, 0, -r): first two values start, start - r; then numpy's fill uses start + i * delta
        # with delta recomputed as (start - r) - start.
        start = float(T)
        delta = (start + (-T / S)) - start
        vals = [start] + [start + i * delta for i in range(1, S)]
        ts = [round(v) - 1 for v in vals]
    return torch.tensor(ts, dtype=torch.int64)


# ----------------------------------------------------------------------------------------------------------------
# continuous grids (k-diffusion's get_sigmas_*), with sigma_max = inf for zero-SNR models


def _append_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros(1)])


def _grid_bounds(n, sigma_min, sigma_max, sigma_max_finite):
    """Validate and return (n_finite, sigma_min, top, starts_with_inf)."""
    n = _validate.integer("n", n, lo=1)
    smin = _validate.positive("sigma_min", sigma_min)
    smax = _validate.positive("sigma_max", sigma_max, allow_inf=True)
    if math.isinf(smax):
        if sigma_max_finite is None:
            raise ValueError(
                "sigma_max is inf (a zero-SNR model): pass sigma_max_finite=, the model's largest finite sigma, "
                "which the grid continues from after its first point inf"
            )
        top = _validate.positive("sigma_max_finite", sigma_max_finite)
        if top < smin:
            raise ValueError(f"sigma_max_finite ({top}) must be >= sigma_min ({smin})")
        return n - 1, smin, top, True
    if smax < smin:
        raise ValueError(f"sigma_max ({smax}) must be >= sigma_min ({smin})")
    return n, smin, smax, False


def _finish(body: torch.Tensor, starts_with_inf: bool) -> torch.Tensor:
    if starts_with_inf:
        body = torch.cat([torch.full((1,), math.inf, dtype=_F64), body])
    return _append_zero(body)


_INF_DOC = """
    ``n`` is the number of nonzero sigmas; a final 0 is appended (length ``n + 1``).  If ``sigma_max`` is inf (a
    zero-SNR model) the grid is ``[inf]`` followed by this grid of ``n - 1`` points from ``sigma_max_finite`` (the
    model's largest finite sigma, required then, ignored otherwise) down to ``sigma_min``, then 0.  Float64 values
    equal k-diffusion's run with float64 as torch's default dtype; its default float32 ``linspace`` differs by
    float32 rounding.
"""


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, *, sigma_max_finite=None) -> torch.Tensor:
    """Karras et al. (2022): ``(max^(1/rho) + ramp * (min^(1/rho) - max^(1/rho))) ** rho``, ramp = linspace(0, 1, n).
    """
    n, smin, smax, inf0 = _grid_bounds(n, sigma_min, sigma_max, sigma_max_finite)
    rho = _validate.positive("rho", rho)
    ramp = torch.linspace(0, 1, n, dtype=_F64)
    lo, hi = smin ** (1 / rho), smax ** (1 / rho)
    return _finish((hi + ramp * (lo - hi)) ** rho, inf0)


def exponential(n: int, sigma_min: float, sigma_max: float, *, sigma_max_finite=None) -> torch.Tensor:
    """Uniform in log sigma: ``exp(linspace(log sigma_max, log sigma_min, n))``."""
    n, smin, smax, inf0 = _grid_bounds(n, sigma_min, sigma_max, sigma_max_finite)
    return _finish(torch.linspace(math.log(smax), math.log(smin), n, dtype=_F64).exp(), inf0)


def polyexponential(
    n: int, sigma_min: float, sigma_max: float, rho: float = 1.0, *, sigma_max_finite=None
) -> torch.Tensor:
    """Polynomial in log sigma: ``exp(ramp * (log max - log min) + log min)``, ramp = ``linspace(1, 0, n) ** rho``."""
    n, smin, smax, inf0 = _grid_bounds(n, sigma_min, sigma_max, sigma_max_finite)
    rho = _validate.positive("rho", rho)
    ramp = torch.linspace(1, 0, n, dtype=_F64) ** rho
    return _finish(torch.exp(ramp * (math.log(smax) - math.log(smin)) + math.log(smin)), inf0)


def kl_optimal(n: int, sigma_min: float, sigma_max: float, *, sigma_max_finite=None) -> torch.Tensor:
    """The KL-optimal schedule of Teng et al. (2024, "Improving the training of rectified flows"; ComfyUI's
    ``kl_optimal``): ``tan(w atan(sigma_min) + (1 - w) atan(sigma_max))``, w = i / (n - 1) for i < n (n = 1:
    ``[sigma_max]``, where ComfyUI's 0 / 0 gives NaN)."""
    n, smin, smax, inf0 = _grid_bounds(n, sigma_min, sigma_max, sigma_max_finite)
    w = torch.arange(n, dtype=_F64) / (n - 1) if n > 1 else torch.zeros(1, dtype=_F64)
    return _finish((w * math.atan(smin) + (1 - w) * math.atan(smax)).tan(), inf0)


for _f in (karras, exponential, polyexponential, kl_optimal):
    _f.__doc__ += _INF_DOC


def linear_quadratic(n: int, sigma_max: float, threshold_noise: float = 0.025, linear_steps: int | None = None, *,
                     sigma_max_finite=None) -> torch.Tensor:
    """The linear-quadratic schedule of Mochi (Genmo 2024; ComfyUI's ``linear_quadratic``), in units of
    ``sigma_max``: ``sigma_max * (1 - x)`` where x rises linearly from 0 to ``threshold_noise`` over
    ``linear_steps`` (default ``n // 2``) steps, then quadratically (continuing the line's slope) to 1, the final 0.
    Written for flow models, whose ComfyUI sigma is the flow time t in [0, 1] (``sigma_max = 1``; this library's
    noise level of a flow time t is ``t / (1 - t)``, inf at t = 1).  Length ``n + 1``.

    If ``sigma_max`` is inf the schedule is ``[inf]`` followed by this schedule of ``n - 1`` steps from
    ``sigma_max_finite`` (required then)."""
    n = _validate.integer("n", n, lo=1)
    smax = _validate.positive("sigma_max", sigma_max, allow_inf=True)
    threshold = _validate.real("threshold_noise", threshold_noise, lo=0.0, hi=1.0)
    inf0 = math.isinf(smax)
    if inf0:
        if sigma_max_finite is None:
            raise ValueError("sigma_max is inf (a zero-SNR model): pass sigma_max_finite=, the model's largest finite "
                             "sigma, which the schedule continues from after its first point inf")
        smax, n = _validate.positive("sigma_max_finite", sigma_max_finite), n - 1
    if n == 0:
        return _finish(torch.zeros(0, dtype=_F64), True)
    if n == 1:
        x = [0.0, 1.0]
    else:
        lin = n // 2 if linear_steps is None else _validate.integer("linear_steps", linear_steps, lo=1, hi=n - 1)
        quad = n - lin
        step_diff = lin - threshold * n
        qc = step_diff / (lin * quad**2)
        lc = threshold / lin - 2 * step_diff / quad**2
        const = qc * lin**2
        x = [i * threshold / lin for i in range(lin)] + [qc * i**2 + lc * i + const for i in range(lin, n)] + [1.0]
    body = torch.tensor([1.0 - v for v in x], dtype=_F64) * smax
    return torch.cat([torch.full((1,), math.inf, dtype=_F64), body]) if inf0 else body


#: Align Your Steps (Sabour et al. 2024): the published 10-step schedules.  SD 1.5 and SDXL are given as timesteps
#: of a 1000-step discrete model (the grids ComfyUI tabulates are the SD table's sigmas at them, so a model's own
#: table, a zero-SNR one included, gives its own noise levels), Stable Video Diffusion as EDM sigmas.
AYS_TIMESTEPS = {
    "sd1": (999, 850, 736, 645, 545, 455, 343, 233, 124, 24, 0),
    "sdxl": (999, 845, 730, 587, 443, 310, 193, 116, 53, 13, 0),
}
AYS_SIGMAS = {"svd": (700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002)}
AYS_MODELS = tuple(AYS_TIMESTEPS) + tuple(AYS_SIGMAS)


def loglinear_interp(sigmas: TensorLike, num: int) -> torch.Tensor:
    """A descending grid of positive sigmas resampled to ``num`` points, linear in log sigma over an even
    parameter (AYS's rule for other step counts: numpy's ``interp`` of ``log sigmas`` on ``linspace(0, 1)``)."""
    s = _as_f64_vector("sigmas", sigmas)
    num = _validate.integer("num", num, lo=2)
    if not ((s > 0) & torch.isfinite(s)).all():
        raise ValueError("sigmas must be finite and > 0 to interpolate in log space")
    ys = s.flip(0).log()
    xs = torch.linspace(0, 1, s.numel(), dtype=_F64)
    new = torch.linspace(0, 1, num, dtype=_F64)
    hi = torch.searchsorted(xs, new, right=False).clamp(1, s.numel() - 1)
    lo = hi - 1
    w = (new - xs[lo]) / (xs[hi] - xs[lo])
    return (ys[lo] + w * (ys[hi] - ys[lo])).exp().flip(0)


def align_your_steps(n: int, model: str, table: TensorLike | None = None) -> torch.Tensor:
    """Align Your Steps for ``model`` (:data:`AYS_MODELS`): the published 10-step noise levels, log-linearly
    resampled to ``n + 1`` points for other step counts (:func:`loglinear_interp`, as ComfyUI does), the last
    replaced by 0.  ``sd1``/``sdxl`` read their timesteps from ``table`` (the model's ascending training sigmas,
    default Stable Diffusion's scaled-linear table); a zero-SNR table's last sigma is inf, and then the schedule is
    ``[inf]`` followed by the grid of ``n - 1`` steps from the published timesteps below the last."""
    n = _validate.integer("n", n, lo=1)
    model = _validate.choice("model", model, AYS_MODELS)
    if model in AYS_SIGMAS:
        if table is not None:
            raise ValueError(f"model={model!r} has published sigmas, not timesteps: pass no table")
        grid, inf0 = torch.tensor(AYS_SIGMAS[model], dtype=_F64), False
    else:
        tab = _as_f64_vector("table", table) if table is not None else DiscreteSchedule.from_betas().train_sigmas
        if tab.numel() != 1000:
            raise ValueError(f"the AYS timesteps index a 1000-step model; table has {tab.numel()} entries")
        grid = tab[list(AYS_TIMESTEPS[model])]
        inf0 = math.isinf(grid[0].item())
        if inf0:  # the finite part: the published grid from its second timestep, resampled to one step fewer
            grid = grid[1:]
            n -= 1
    if n == 0:
        return _finish(torch.zeros(0, dtype=_F64), True)
    body = grid if n + 1 == grid.numel() else loglinear_interp(grid, n + 1)
    body = torch.cat([body[:-1], body.new_zeros(1)])
    return torch.cat([torch.full((1,), math.inf, dtype=_F64), body]) if inf0 else body


def vp(n: int, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3) -> torch.Tensor:
    """Continuous VP (Song et al.): ``sqrt(exp(beta_d * t**2 / 2 + beta_min * t) - 1)``, t = linspace(1, eps_s, n),
    then a final 0.  Its largest sigma is finite by construction (no inf variant)."""
    n = _validate.integer("n", n, lo=1)
    beta_d = _validate.positive("beta_d", beta_d)
    beta_min = _validate.real("beta_min", beta_min)
    if beta_min < 0:
        raise ValueError(f"beta_min must be >= 0, got {beta_min}")
    eps_s = _validate.positive("eps_s", eps_s)
    if eps_s > 1:
        raise ValueError(f"eps_s must be <= 1, got {eps_s}")
    t = torch.linspace(1, eps_s, n, dtype=_F64)
    return _append_zero(torch.sqrt(torch.exp(beta_d * t**2 / 2 + beta_min * t) - 1))


# ----------------------------------------------------------------------------------------------------------------
# quantization to a table of sigmas


def _check_table(table: TensorLike) -> torch.Tensor:
    t = _as_f64_vector("table", table)
    if (t < 0).any():
        raise ValueError("table must not contain negative sigmas")
    if not ((t > 0) & torch.isfinite(t)).any():
        raise ValueError("table must contain at least one finite positive sigma")
    return t


def _nearest(s: torch.Tensor, table: torch.Tensor, space: str) -> torch.Tensor:
    """Index into ``table`` of the nearest usable entry (finite, > 0) for each finite positive ``s``.

    ``s`` and ``table`` are float64 on one device.  Entries of ``s`` that are 0/inf get an arbitrary index; the
    callers mask them.  Ties go to the first entry in table order (``argmin``).
    """
    usable = torch.isfinite(table) & (table > 0)
    valid = torch.isfinite(s) & (s > 0)
    s_safe = torch.where(valid, s, torch.ones_like(s)).unsqueeze(-1)
    tab_safe = torch.where(usable, table, torch.ones_like(table))
    if space == "log":
        dist = (s_safe.log() - tab_safe.log()).abs()
    else:
        dist = (s_safe - tab_safe).abs()
    dist = torch.where(usable, dist, torch.full_like(dist, math.inf))
    return dist.argmin(dim=-1)


def quantize(sigmas, table: TensorLike, space: str = "log"):
    """Replace each sigma by the nearest entry of ``table``.

    ``space="log"`` (default) takes ``argmin |log sigma - log table|`` (k-diffusion ``quantize=True``, ComfyUI);
    ``space="linear"`` takes ``argmin |sigma - table|`` (EDM ``round_sigma``).  Ties go to the first entry in table
    order.  The table may be ascending, descending or unsorted and may contain inf (a zero-SNR model's last
    sigma) or 0 (a schedule's final 0): only finite positive entries are ever selected.  sigma = inf and sigma = 0
    are returned unchanged (they are exact endpoints, not noise levels to round).

    ``sigmas`` is a Python float (returns a float) or a tensor of any shape (returns a tensor of the same shape,
    dtype and device; the distances are taken in float64 on that device).  Negative or NaN sigmas raise ValueError
    for Python floats and CPU tensors; on accelerator tensors they are not checked (that would sync the device)
    and pass through unchanged.
    """
    _validate.choice("space", space, QUANTIZE_SPACES)
    tab = _check_table(table)
    if isinstance(sigmas, torch.Tensor):
        if not sigmas.is_floating_point():
            raise TypeError(f"sigmas must be a floating-point tensor, got {sigmas.dtype}")
        if sigmas.device.type == "cpu" and (torch.isnan(sigmas) | (sigmas < 0)).any():
            raise ValueError("sigmas must be >= 0 and not NaN")
        s = sigmas.detach().to(_F64)
        tab = tab.to(s.device)
        idx = _nearest(s.reshape(-1), tab, space).reshape(s.shape)
        out = torch.where(torch.isfinite(s) & (s > 0), tab[idx], s)
        return out.to(sigmas.dtype)
    s = _validate.real("sigmas", sigmas, lo=0.0, allow_inf=True)
    if s == 0 or math.isinf(s):
        return s
    return float(tab[_nearest(torch.tensor([s], dtype=_F64), tab, space)[0]])


# ----------------------------------------------------------------------------------------------------------------
# flow matching (rectified flow: x_t = (1 - t) x0 + t eps), as diffusers' FlowMatchEulerDiscreteScheduler schedules it

FLOW_TIME_SHIFTS = ("exponential", "linear")


def flow_time_to_sigma(t: TensorLike) -> torch.Tensor:
    """This library's noise level of flow times t in [0, 1]: ``sigma = t / (1 - t)`` (x_t / (1 - t) = x0 + sigma
    eps), inf at t = 1 (pure noise), 0 at t = 0; float64."""
    t = _as_f64_vector("t", t)
    if ((t < 0) | (t > 1)).any():
        raise ValueError("flow times t must lie in [0, 1]")
    return torch.where(t == 1, torch.full_like(t, math.inf), t / (1 - t))


def sigma_to_flow_time(sigma: TensorLike) -> torch.Tensor:
    """The flow time of noise levels: ``t = sigma / (1 + sigma)``, 1 at sigma = inf; float64."""
    s = _as_f64_vector("sigma", sigma)
    if (s < 0).any():
        raise ValueError("sigma must be >= 0")
    return torch.where(torch.isinf(s), torch.ones_like(s), s / (1 + s))


def flow_shift_mu(image_seq_len: int, base_image_seq_len: int = 256, max_image_seq_len: int = 4096,
                  base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """The resolution-dependent shift ``mu`` of Flux-style pipelines (diffusers' ``calculate_shift``): linear in the
    image's token count, ``base_shift`` at ``base_image_seq_len`` and ``max_shift`` at ``max_image_seq_len``."""
    seq = _validate.integer("image_seq_len", image_seq_len, lo=1)
    lo = _validate.integer("base_image_seq_len", base_image_seq_len, lo=1)
    hi = _validate.integer("max_image_seq_len", max_image_seq_len, lo=lo + 1)
    b0, b1 = _validate.real("base_shift", base_shift), _validate.real("max_shift", max_shift)
    m = (b1 - b0) / (hi - lo)
    return seq * m + (b0 - m * lo)


def _flow_grid(t: torch.Tensor, kind: str) -> torch.Tensor:
    """diffusers' ``_convert_to_karras`` (rho = 7) / ``_convert_to_exponential`` / ``_convert_to_beta`` (Beta(0.6,
    0.6) quantiles) of flow times, between their ends t[0] and t[-1] (kept exactly: the formulas return them up to
    rounding, and t[0] = 1 must stay 1, the start at sigma = inf)."""
    n, hi, lo = t.numel(), t[0].item(), t[-1].item()
    if kind == "use_karras_sigmas":
        ramp = torch.linspace(0, 1, n, dtype=_F64)
        g = (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    elif kind == "use_exponential_sigmas":
        if not lo > 0:
            raise ValueError("use_exponential_sigmas needs flow times above 0 (diffusers takes log(0) = -inf there)")
        g = torch.linspace(math.log(hi), math.log(lo), n, dtype=_F64).exp()
    else:
        q = (1 - torch.linspace(0, 1, n, dtype=_F64)).tolist()
        g = torch.tensor([lo + beta_ppf(x, 0.6, 0.6) * (hi - lo) for x in q], dtype=_F64)
    g[0] = hi
    if n > 1:
        g[-1] = lo
    return g


def flow_times(n: int | None = None, *, num_train_timesteps: int = 1000, shift: float = 1.0,
               use_dynamic_shifting: bool = False, mu: float | None = None, image_seq_len: int | None = None,
               base_image_seq_len: int = 256, max_image_seq_len: int = 4096, base_shift: float = 0.5,
               max_shift: float = 1.15, shift_terminal: float | None = None, time_shift_type: str = "exponential",
               use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
               times: TensorLike | None = None) -> torch.Tensor:
    """The flow times t of ``FlowMatchEulerDiscreteScheduler.set_timesteps(n)`` (its ``sigmas``) with this config, in
    float64 (diffusers rounds them to float32): descending from exactly 1, then a final 0; length ``n + 1``.  The
    keywords are diffusers' config keys (and ``set_timesteps``' ``mu``), so ``flow_times(n, mu=mu, **config)``
    takes a ``FlowMatchEulerDiscreteScheduler`` config but for ``invert_sigmas`` and ``stochastic_sampling``, which
    are not the schedule's (the drop-in ``zsnr_kernels.diffusers.ZSNRFlowMatchEulerDiscreteScheduler`` takes them).

    diffusers' steps: t evenly spaced from 1 down to the training schedule's smallest time (1/T, shifted by
    ``shift`` unless ``use_dynamic_shifting``) -- or the custom ``times`` (``set_timesteps(sigmas=...)``, Flux's
    ``linspace(1, 1/n, n)``; n may then be left out) -- then shifted, ``shift t / (1 + (shift - 1) t)``, or with
    ``use_dynamic_shifting`` by ``mu`` (``e^mu / (e^mu + (1/t - 1))``, or ``mu / (mu + (1/t - 1))`` for
    ``time_shift_type="linear"``), then with ``shift_terminal`` stretched so that the last time before 0 is
    ``shift_terminal`` (LTX-Video), then on request moved to a Karras (rho 7), exponential or Beta(0.6, 0.6) grid
    between the ends.  ``mu`` may instead come from ``image_seq_len`` (the image's token count) through
    :func:`flow_shift_mu` with ``base_image_seq_len``, ``max_image_seq_len``, ``base_shift``, ``max_shift``, as Flux
    pipelines compute it.  Every shift and grid keeps t = 1 at exactly 1 (sigma = inf: :func:`flow`)."""
    T = _validate.integer("num_train_timesteps", num_train_timesteps, lo=1)
    _validate.choice("time_shift_type", time_shift_type, FLOW_TIME_SHIFTS)
    grids = [k for k, v in (("use_karras_sigmas", use_karras_sigmas), ("use_exponential_sigmas",
                                                                      use_exponential_sigmas),
                            ("use_beta_sigmas", use_beta_sigmas)) if v]
    if len(grids) > 1:
        raise ValueError(f"only one of {grids} can be True")
    if times is not None:
        base = _as_f64_vector("times", times)
        if base.numel() == 0 or ((base < 0) | (base > 1)).any():
            raise ValueError("times must hold at least one flow time, each in [0, 1]")
        if n is not None and _validate.integer("n", n, lo=1) != base.numel():
            raise ValueError(f"n={n} but {base.numel()} times were given (diffusers: the same length, or no n)")
        n = base.numel()
    else:
        if n is None:
            raise ValueError("flow_times needs n (the number of steps) or times=")
        n = _validate.integer("n", n, lo=1)
        base = None
    if use_dynamic_shifting:
        if mu is None and image_seq_len is None:
            raise ValueError("use_dynamic_shifting=True needs mu= (or image_seq_len=, from which flow_shift_mu "
                             "computes it), as diffusers' set_timesteps does")
        if mu is not None and image_seq_len is not None:
            raise ValueError("pass mu= or image_seq_len=, not both")
        if mu is None:
            mu = flow_shift_mu(image_seq_len, base_image_seq_len, max_image_seq_len, base_shift, max_shift)
        mu = _validate.real("mu", mu)
        if time_shift_type == "linear" and not mu > 0:
            raise ValueError(f"mu must be > 0 for the linear time shift, got {mu}")
        scale = math.exp(mu) if time_shift_type == "exponential" else mu

        def shifted(t):  # a true division (torch's scalar / tensor multiplies by a rounded reciprocal)
            return torch.full_like(t, scale) / (scale + (1 / t - 1))
    else:
        shift = _validate.positive("shift", shift)

        def shifted(t):
            return shift * t / (1 + (shift - 1) * t)
    if base is None:
        t_min = 1.0 / T if use_dynamic_shifting else shifted(torch.tensor(1.0 / T, dtype=_F64)).item()
        base = torch.linspace(1.0, t_min, n, dtype=_F64)
    t = torch.where(base == 1, 1.0, shifted(base))  # every shift maps 1 to 1: exactly, whatever the rounding
    if shift_terminal:
        terminal = _validate.real("shift_terminal", shift_terminal, lo=0.0, hi=1.0)
        if terminal == 1.0:
            raise ValueError("shift_terminal must be < 1 (the stretch divides by 1 - shift_terminal)")
        if t[-1] == 1.0:  # n = 1 from t = 1: no stretch moves it (diffusers divides 0 by 0 there: NaN)
            raise ValueError("shift_terminal needs n >= 2 (a schedule whose last time is below 1)")
        t = 1 - (1 - t) / ((1 - t[-1]) / (1 - terminal))
    if grids:
        t = _flow_grid(t, grids[0])
    return _append_zero(t)


def flow(n: int | None = None, **config) -> torch.Tensor:
    """The noise levels of :func:`flow_times` (same keywords), for this library's ``prediction="flow"``: inf first
    (t = 1, exact: the model input there is the noise itself), then ``t / (1 - t)``, then 0.  Sample a flow model
    with ``zsnr_kernels.sample(model, noise, schedules.flow(n, ...), sampler="euler" or "heun_flow",
    prediction="flow")``; the model takes its flow time back as ``sigma_to_flow_time(sigma)`` (1 at inf)."""
    return flow_time_to_sigma(flow_times(n, **config))


# ----------------------------------------------------------------------------------------------------------------
# the regularized incomplete beta function and its inverse (the ``beta`` schedule's quantiles)


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz; converges fast for x < (a + 1) / (a + b + 2))."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-16:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) in float64, for a, b > 0 and x in [0, 1]."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def beta_ppf(q: float, a: float, b: float) -> float:
    """The quantile of the Beta(a, b) distribution, x with I_x(a, b) = q, by bisection to the last float64 bit
    (I_x is increasing in x): what ``scipy.stats.beta.ppf`` computes, without scipy."""
    if q <= 0.0 or q >= 1.0:
        return 0.0 if q <= 0.0 else 1.0
    if a == b and q == 0.5:  # the median of a symmetric Beta, exactly (the beta schedule rounds 0.5 * T there)
        return 0.5
    lo, hi = 0.0, 1.0
    while True:
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            return mid
        if betainc(a, b, mid) < q:
            lo = mid
        else:
            hi = mid


# ----------------------------------------------------------------------------------------------------------------
# a discrete model's table


@dataclass(frozen=True, eq=False)
class DiscreteSchedule:
    """The training noise levels of a discrete-time model: ``train_sigmas[t]`` for timestep ``t``, ascending.

    ``train_sigmas`` is a float64 CPU tensor of length ``num_train_timesteps >= 2``, strictly increasing and positive;
    only its last entry may be inf (a zero-terminal-SNR model).  ``alphas_cumprod`` is kept beside it so that
    DDIM/DDPM coefficients can use the exact training values (``abar = 1 / (1 + sigma^2)``, 0 at inf).  Build it
    with :meth:`from_betas`, :meth:`from_alphas_cumprod` or :meth:`from_sigmas`.  The tensors are private
    copies; do not modify them in place.
    """

    train_sigmas: torch.Tensor
    alphas_cumprod: torch.Tensor

    def __post_init__(self):
        s = _as_f64_vector("train_sigmas", self.train_sigmas)
        ac = _as_f64_vector("alphas_cumprod", self.alphas_cumprod)
        if s.numel() < 2:
            raise ValueError(f"train_sigmas must have at least 2 entries, got {s.numel()}")
        if ac.shape != s.shape:
            raise ValueError(f"alphas_cumprod has shape {tuple(ac.shape)}, train_sigmas {tuple(s.shape)}")
        if not s[0] > 0:
            raise ValueError(f"train_sigmas must be > 0 (the first training sigma is {s[0].item()})")
        if torch.isinf(s[:-1]).any():
            raise ValueError("only the last of train_sigmas may be inf")
        if not (s[1:] > s[:-1]).all():
            raise ValueError("train_sigmas must be strictly increasing (index = timestep)")
        object.__setattr__(self, "train_sigmas", s)
        object.__setattr__(self, "alphas_cumprod", ac)
        object.__setattr__(self, "_log_sigmas", s.log())

    # constructors ------------------------------------------------------------------------------------------------

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: TensorLike) -> "DiscreteSchedule":
        """From a model's ``alphas_cumprod`` (descending, in (0, 1), the last may be 0)."""
        ac = _as_f64_vector("alphas_cumprod", alphas_cumprod)
        return cls(sigmas_from_alphas_cumprod(ac), ac)

    @classmethod
    def from_betas(
        cls,
        kind: str = "scaled_linear",
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        zero_terminal_snr: bool = False,
    ) -> "DiscreteSchedule":
        """From a named beta schedule (see :func:`betas`), rescaled to zero terminal SNR on request."""
        b = betas(kind, num_train_timesteps, beta_start, beta_end)
        if zero_terminal_snr:
            b = rescale_zero_terminal_snr(b)
        return cls.from_alphas_cumprod(alphas_cumprod(b))

    @classmethod
    def from_sigmas(cls, sigmas: TensorLike) -> "DiscreteSchedule":
        """From an ascending table of training sigmas (the last may be inf)."""
        s = _as_f64_vector("sigmas", sigmas)
        if (s < 0).any():
            raise ValueError("sigmas must be >= 0")
        return cls(s, torch.where(torch.isinf(s), torch.zeros_like(s), 1.0 / (1.0 + s * s)))

    # properties --------------------------------------------------------------------------------------------------

    @property
    def num_train_timesteps(self) -> int:
        return self.train_sigmas.numel()

    @property
    def log_sigmas(self) -> torch.Tensor:
        """``log(train_sigmas)`` (the last is inf for a zero-SNR model)."""
        return self._log_sigmas

    @property
    def zero_terminal_snr(self) -> bool:
        return math.isinf(self.train_sigmas[-1].item())

    @property
    def sigma_min(self) -> float:
        return self.train_sigmas[0].item()

    @property
    def sigma_max(self) -> float:
        """The largest training sigma: inf for a zero-SNR model."""
        return self.train_sigmas[-1].item()

    @property
    def sigma_max_finite(self) -> float:
        """The largest finite training sigma (the second-to-last one for a zero-SNR model)."""
        return self.train_sigmas[-2 if self.zero_terminal_snr else -1].item()

    # sampling schedules ------------------------------------------------------------------------------------------

    def timesteps(self, num_steps: int, spacing: str = "leading", steps_offset: int = 0) -> torch.Tensor:
        """:func:`timesteps` for this model's ``num_train_timesteps`` (diffusers' ``set_timesteps``)."""
        return timesteps(num_steps, self.num_train_timesteps, spacing, steps_offset)

    def sigmas(self, num_steps: int, spacing: str = "leading", steps_offset: int = 0) -> torch.Tensor:
        """The training sigmas at :meth:`timesteps`, then a final 0: descending, length ``num_steps + 1``.

        For a zero-SNR model with ``trailing`` spacing the first sigma is inf.
        """
        ts = self.timesteps(num_steps, spacing, steps_offset)
        if ts.max().item() >= self.num_train_timesteps:
            raise ValueError(
                f"steps_offset={steps_offset} pushes timestep {ts.max().item()} past the last training timestep "
                f"{self.num_train_timesteps - 1}"
            )
        return _append_zero(self.train_sigmas[ts])

    def grid(self, kind: str, n: int, **kw) -> torch.Tensor:
        """A continuous grid (:func:`karras`, :func:`exponential`, :func:`polyexponential`) spanning this model.

        ``sigma_min``, ``sigma_max`` and ``sigma_max_finite`` default to the model's; for a zero-SNR model the grid
        starts with inf.  Other keywords (``rho``) are passed on.  ``kind="vp"`` ignores the model.
        """
        _validate.choice("kind", kind, GRIDS)
        if kind == "vp":
            return vp(n, **kw)
        kw.setdefault("sigma_min", self.sigma_min)
        kw.setdefault("sigma_max", self.sigma_max)
        kw.setdefault("sigma_max_finite", self.sigma_max_finite)
        return {"karras": karras, "exponential": exponential, "polyexponential": polyexponential,
                "kl_optimal": kl_optimal}[kind](n, **kw)

    # ComfyUI's schedulers (comfy/samplers.py), on this model's table: each returns ``steps`` sigmas and a final 0
    # unless its docstring says otherwise; a zero-SNR table's last sigma is inf, so a schedule that reaches the last
    # training timestep starts there, as ComfyUI's would at its model's sigma_max

    def simple(self, steps: int) -> torch.Tensor:
        """ComfyUI's ``simple``: every (T / steps)-th training sigma from the top, ``sigmas[-(1 + int(i * T /
        steps))]``."""
        steps = _validate.integer("steps", steps, lo=1)
        T = self.num_train_timesteps
        ss = T / steps
        return _append_zero(self.train_sigmas[[T - 1 - int(i * ss) for i in range(steps)]])

    def ddim_uniform(self, steps: int) -> torch.Tensor:
        """ComfyUI's ``ddim_uniform``: training sigmas 1, 1 + k, 1 + 2k, ... (k = max(T // steps, 1)) up to the
        table's end, descending, then 0.  Like diffusers' ``leading`` spacing it need not reach the last timestep
        (a zero-SNR model's inf), and it can return more than ``steps`` sigmas (T = 1000, steps = 7: 8)."""
        steps = _validate.integer("steps", steps, lo=1)
        T = self.num_train_timesteps
        return _append_zero(self.train_sigmas[list(range(1, T, max(T // steps, 1)))].flip(0))

    def normal(self, steps: int, sgm: bool = False) -> torch.Tensor:
        """ComfyUI's ``normal`` (``sgm_uniform`` with ``sgm=True``): timesteps evenly spaced from the last
        (``sigma_to_t(sigma_max)``) to the first, ``steps`` of them including both ends (with ``sgm``, ``steps + 1``
        of them without the last: SGM's uniform spacing), each mapped to its sigma by log-linear interpolation
        (:meth:`t_to_sigma`), then 0."""
        steps = _validate.integer("steps", steps, lo=1)
        start = float(self.num_train_timesteps - 1)  # sigma_to_t(sigma_max): the last timestep
        ts = torch.linspace(start, 0.0, steps + 1, dtype=_F64)[:-1] if sgm else torch.linspace(start, 0.0, steps,
                                                                                              dtype=_F64)
        return _append_zero(self.t_to_sigma(ts))

    def beta(self, steps: int, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
        """ComfyUI's ``beta`` (Lee et al. 2024, "Beta sampling is all you need"): timesteps at the Beta(alpha,
        beta) quantiles of ``1 - i / steps``, rounded to the nearest training step (half to even), consecutive
        repeats dropped (so it can return fewer than ``steps`` sigmas), then 0."""
        steps = _validate.integer("steps", steps, lo=1)
        alpha, beta = _validate.positive("alpha", alpha), _validate.positive("beta", beta)
        top = self.num_train_timesteps - 1
        ts: list[int] = []
        for i in range(steps):
            t = round(beta_ppf(1.0 - i / steps, alpha, beta) * top)
            if not ts or t != ts[-1]:
                ts.append(t)
        return _append_zero(self.train_sigmas[ts])

    def comfy(self, scheduler: str, steps: int) -> torch.Tensor:
        """The sigmas ComfyUI's ``scheduler`` (:data:`COMFY_SCHEDULERS`, its menu's names, each with its defaults)
        gives for this model and ``steps``; the grids continue from the largest finite sigma after an inf start on
        a zero-SNR model (:func:`karras`)."""
        _validate.choice("scheduler", scheduler, COMFY_SCHEDULERS)
        if scheduler in ("normal", "sgm_uniform"):
            return self.normal(steps, sgm=scheduler == "sgm_uniform")
        if scheduler in ("simple", "ddim_uniform", "beta"):
            return getattr(self, scheduler)(steps)
        if scheduler == "linear_quadratic":
            return linear_quadratic(steps, self.sigma_max, sigma_max_finite=self.sigma_max_finite)
        grid = {"karras": karras, "exponential": exponential, "kl_optimal": kl_optimal}[scheduler]
        return grid(steps, self.sigma_min, self.sigma_max, sigma_max_finite=self.sigma_max_finite)

    def quantize(self, sigmas, space: str = "log"):
        """:func:`quantize` to this model's training sigmas (inf stays inf, 0 stays 0)."""
        return quantize(sigmas, self.train_sigmas, space)

    # sigma <-> t -------------------------------------------------------------------------------------------------

    def sigma_to_t(self, sigma, mode: str = "nearest"):
        """Timestep of a noise level.

        * ``nearest``: ``argmin_t |log sigma - log sigmas[t]|`` (k-diffusion ``quantize=True``); int64 result.
        * ``interp``: log-linear interpolation between the bracketing timesteps, clamped to the table
          (k-diffusion ``quantize=False``, same formula); float64 result.

        Ends: sigma = inf maps to the last timestep ``T - 1`` (the zero-SNR timestep, or the noisiest one).
        sigma = 0 and anything below ``sigma_min`` map to 0, as in k-diffusion (a model should not be evaluated at
        sigma = 0).  For a zero-SNR model every finite sigma above ``sigma_max_finite`` maps to ``T - 2`` in both
        modes: log-linear interpolation towards log inf = inf has weight 0 for any finite sigma.

        ``sigma``: a Python float (returns int / float) or a tensor (returns a tensor of its shape on its device).
        """
        _validate.choice("mode", mode, ("nearest", "interp"))
        scalar = not isinstance(sigma, torch.Tensor)
        if scalar:
            s = torch.tensor(_validate.real("sigma", sigma, lo=0.0, allow_inf=True), dtype=_F64)
        else:
            if not sigma.is_floating_point():
                raise TypeError(f"sigma must be a floating-point tensor, got {sigma.dtype}")
            s = sigma.detach().to(_F64)
        if s.device.type == "cpu" and (torch.isnan(s) | (s < 0)).any():
            raise ValueError("sigma must be >= 0 and not NaN")
        T = self.num_train_timesteps
        logs = self._log_sigmas.to(s.device)
        flat = s.reshape(-1)
        if mode == "nearest":
            t = _nearest(flat, self.train_sigmas.to(s.device), "log")
            t = torch.where(torch.isinf(flat), torch.full_like(t, T - 1), t)
            t = torch.where(flat == 0, torch.zeros_like(t), t)
        else:
            valid = torch.isfinite(flat) & (flat > 0)
            ls = torch.where(valid, flat, torch.ones_like(flat)).log()
            low_idx = (torch.searchsorted(logs, ls, right=True) - 1).clamp(0, T - 2)
            high_idx = low_idx + 1
            low, high = logs[low_idx], logs[high_idx]
            high_inf = torch.isinf(high)
            high_safe = torch.where(high_inf, low - 1, high)
            w = torch.where(high_inf, torch.zeros_like(ls), (low - ls) / (low - high_safe)).clamp(0, 1)
            t = (1 - w) * low_idx + w * high_idx
            t = torch.where(torch.isinf(flat), torch.full_like(t, T - 1), t)
            t = torch.where(flat == 0, torch.zeros_like(t), t)
        t = t.reshape(s.shape)
        return t.item() if scalar else t

    def t_to_sigma(self, t):
        """Noise level of a timestep.

        Integer ``t`` (Python int or integer tensor) indexes the table.  Fractional ``t`` is log-linear
        interpolation, ``exp((1 - w) log sigmas[floor t] + w log sigmas[ceil t])`` with ``w = frac(t)`` (k-diffusion's
        ``t_to_sigma``, computed in float64 where k-diffusion casts t to float32); integral values of a float ``t``
        return the table entry exactly, and for a zero-SNR model any ``t > T - 2`` gives inf.
        ``t`` must lie in ``[0, T - 1]``.  Returns a float for a Python number, else a float64 tensor.
        """
        scalar = not isinstance(t, torch.Tensor)
        if scalar:
            if isinstance(t, bool) or not isinstance(t, numbers.Real):
                raise TypeError(f"t must be a real number or a tensor, got {t!r}")
            tt = torch.tensor(t, dtype=torch.int64 if isinstance(t, numbers.Integral) else _F64)
        else:
            tt = t.detach()
        T = self.num_train_timesteps
        table = self.train_sigmas.to(tt.device)
        if tt.device.type == "cpu":
            bad = (tt < 0) | (tt > T - 1)
            if tt.is_floating_point():
                bad = bad | torch.isnan(tt)
            if bad.any():
                raise ValueError(f"t must lie in [0, {T - 1}]")
        if not tt.is_floating_point():
            out = table[tt.long()]
        else:
            tf = tt.to(_F64)
            low_idx = tf.floor().long().clamp(0, T - 1)
            high_idx = tf.ceil().long().clamp(0, T - 1)
            w = tf - low_idx
            lows, highs = table[low_idx], table[high_idx]
            logs = self._log_sigmas.to(tt.device)
            high_log = torch.where(torch.isinf(highs), torch.zeros_like(w), logs[high_idx])
            interp = ((1 - w) * logs[low_idx] + w * high_log).exp()
            interp = torch.where(torch.isinf(highs), torch.full_like(w, math.inf), interp)
            out = torch.where(w == 0, lows, interp)
        return out.item() if scalar else out

    def __repr__(self) -> str:
        return (
            f"DiscreteSchedule(num_train_timesteps={self.num_train_timesteps}, sigma_min={self.sigma_min:.6g}, "
            f"sigma_max={self.sigma_max:.6g}, zero_terminal_snr={self.zero_terminal_snr})"
        )
