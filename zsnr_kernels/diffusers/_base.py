"""What the :mod:`zsnr_kernels.diffusers` schedulers share: the output class, diffusers' training tables and
spacings in float64, the config checks, the base scheduler (the parameterization, model-input semantics) and the two
ways of walking a schedule -- by timestep (DDIM, DDPM) and by step counter (Euler family, DPM-Solver).

Private to the package: the scheduler modules import from here, users import from :mod:`zsnr_kernels.diffusers`.
"""

from __future__ import annotations

import importlib.util
import math
import operator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

try:  # the real package: this package is zsnr_kernels.diffusers, imports are absolute
    from diffusers import ConfigMixin, SchedulerMixin
    from diffusers.configuration_utils import register_to_config  # noqa: F401 - for the scheduler modules
    from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers
    from diffusers.utils import BaseOutput
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as exc:  # pragma: no cover - exercised only without diffusers
    raise ImportError("zsnr_kernels.diffusers needs the diffusers package (pip install diffusers)") from exc

from .. import _validate, reference, schedules, steps
from .._validate import SIGMA_MAX
from ..parameterization import parameterization

INF = math.inf

#: diffusers' prediction_type -> this library's prediction ("original_sample": the Euler scheduler's older name)
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "original_sample": "x0"}

_FLOW = ("flow-matching schedules keep x = (1 - t) x0 + t noise, not these variance-preserving tables; use "
         "ZSNRFlowMatchEulerDiscreteScheduler or ZSNRFlowMatchHeunDiscreteScheduler, or sample such a model with "
         "zsnr_kernels.sample(..., prediction='flow') on sigma = t / (1 - t)")

#: config values the schedulers refuse although diffusers takes them: (key, value) -> why, and the fix
REFUSED = {
    ("algorithm_type", "dpmsolver"): (
        "the noise-prediction DPM-Solver combines the noise predictions of earlier steps, which the fused multistep "
        "steps do not keep (they remember denoised predictions), and diffusers deprecates it; use "
        "algorithm_type='dpmsolver++' (the same first-order step)"),
    ("algorithm_type", "sde-dpmsolver"): (
        "the noise-prediction SDE-DPM-Solver combines the noise predictions of earlier steps, which the fused "
        "multistep steps do not keep, and diffusers deprecates it; use algorithm_type='sde-dpmsolver++'"),
    ("solver_order", 4): (
        "UniPC of order 4 and above remembers four or more predictions, and the fused kernels read at most three; "
        "use solver_order=3 or lower (diffusers recommends 2 for guided sampling, 3 for unconditional)"),
    ("predict_x0", False): (
        "UniPC's noise-prediction form combines the noise predictions of earlier steps, which the fused multistep "
        "steps do not keep (they remember denoised predictions); use predict_x0=True, diffusers' default"),
    ("use_flow_sigmas", True): _FLOW,
    ("use_dynamic_shifting", True): _FLOW,
    ("prediction_type", "flow_prediction"): _FLOW,
}


@dataclass
class ZSNRSchedulerOutput(BaseOutput):
    """What ``step`` returns.

    prev_sample:          the next model input y (the state the pipeline keeps); after the last step, the clean latent
    pred_original_sample: the denoised prediction D of this model evaluation (x0, the same in VE and VP terms)
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


# ------------------------------------------------------------------------------ diffusers' tables, in float64
#
# The schedulers take every config diffusers takes, so the tables are built as diffusers builds them, unchecked
# (zsnr_kernels.schedules validates its arguments for the library's own API): a beta_end of 1 or more, betas of
# another length than num_train_timesteps, a one-entry table.  Where such a table has no noise level (alphas_cumprod
# outside [0, 1], where diffusers computes NaN) a step there says so.


def _alpha_bar(kind: str):
    """diffusers' ``betas_for_alpha_bar`` transforms: abar(t) for t in [0, 1]."""
    if kind == "cosine":
        return lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    if kind == "exp":
        return lambda t: math.exp(t * -12.0)

    def laplace(t):
        snr = math.exp(-0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6))
        return math.sqrt(snr / (1 + snr))
    return laplace


def _betas_for_alpha_bar(T: int, kind: str) -> torch.Tensor:
    abar = _alpha_bar(kind)
    return torch.tensor([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)], dtype=torch.float64)


#: beta_schedule -> betas(T, beta_start, beta_end), diffusers' formulas (DDPM's sigmoid and laplace, Heun's exp)
_BETA_SCHEDULES = {
    "linear": lambda T, b0, b1: torch.linspace(b0, b1, T, dtype=torch.float64),
    "scaled_linear": lambda T, b0, b1: torch.linspace(b0**0.5, b1**0.5, T, dtype=torch.float64) ** 2,
    "squaredcos_cap_v2": lambda T, b0, b1: _betas_for_alpha_bar(T, "cosine"),
    "exp": lambda T, b0, b1: _betas_for_alpha_bar(T, "exp"),
    "laplace": lambda T, b0, b1: _betas_for_alpha_bar(T, "laplace"),
    "sigmoid": lambda T, b0, b1: torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (b1 - b0) + b0,
}


def _train_betas(owner: str, cfg) -> torch.Tensor:
    """Training betas in float64, as diffusers builds them (it uses float32), rescaled to zero terminal SNR on
    request (Lin et al. Algorithm 1: the last beta is exactly 1, the last alphas_cumprod exactly 0)."""
    if cfg.trained_betas is not None:  # any length, as diffusers (num_train_timesteps still sets the spacings)
        betas = torch.as_tensor(np.asarray(cfg.trained_betas, dtype=np.float64))
        if betas.ndim != 1 or betas.numel() == 0:
            raise ValueError(f"trained_betas must be a non-empty 1-D sequence, got shape {tuple(betas.shape)}")
    elif cfg.beta_schedule in _BETA_SCHEDULES:
        betas = _BETA_SCHEDULES[cfg.beta_schedule](cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end)
    else:
        raise _refuse(owner, "beta_schedule", cfg.beta_schedule,
                      f"use one of {tuple(_BETA_SCHEDULES)}, or pass the betas as trained_betas")
    if getattr(cfg, "rescale_betas_zero_snr", False):
        if betas.numel() < 2:  # diffusers divides 0 by 0 here and returns NaN betas
            raise _refuse(owner, "rescale_betas_zero_snr", True,
                          "a one-entry table has no terminal timestep to rescale (diffusers returns NaN betas); "
                          "pass rescale_betas_zero_snr=False")
        betas = schedules.rescale_zero_terminal_snr(betas)
    return betas


def _sigmas_of(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma = sqrt((1 - abar)/abar): NaN outside [0, 1] (no noise level; diffusers' NaN too), inf at abar = 0 and
    above SIGMA_MAX, the largest finite level a fused step takes: its steps differ from the limit at inf by a
    relative 1/sigma < 1e-30 (float32 tables, diffusers', underflow to abar = 0 there; beta_end = 1 reaches it)."""
    inside = (alphas_cumprod >= 0) & (alphas_cumprod <= 1)
    sig = schedules.sigmas_from_alphas_cumprod(alphas_cumprod.clamp(0, 1))
    sig = torch.where(sig > SIGMA_MAX, torch.full_like(sig, INF), sig)
    return torch.where(inside, sig, torch.full_like(sig, math.nan))


def _sigma_of(alpha_cumprod: float) -> float:
    """:func:`_sigmas_of` of one value, in Python floats (DDIM and DDPM take two a step)."""
    if not 0.0 <= alpha_cumprod <= 1.0:
        return math.nan
    sigma = INF if alpha_cumprod == 0.0 else math.sqrt((1.0 - alpha_cumprod) / alpha_cumprod)
    return INF if sigma > SIGMA_MAX else sigma


def _check_level(sigma: float, where: str) -> None:
    if math.isnan(sigma):
        raise ValueError(f"{where} has no noise level: its alphas_cumprod lies outside [0, 1] (betas above 1 or "
                         "below 0, as beta_end >= 1 gives; diffusers computes NaN there). Use betas in [0, 1]")


def _refuse(owner: str, key: str, value, fix: str) -> ValueError:
    return ValueError(f"{owner} does not support {key}={value!r}; {fix}")


def _refuse_choice(owner: str, key: str, value, allowed) -> ValueError:
    """The error for a config value outside ``allowed``: :data:`REFUSED`'s reason and fix, or the choices."""
    return _refuse(owner, key, value, REFUSED.get((key, value)) or f"use one of {tuple(allowed)}")


def _steps_count(n, T: int | None = None) -> int:
    """``num_inference_steps`` as a positive int (at most T when given): a Python or numpy integer, or a 0-d integer
    tensor, as diffusers takes them (not a bool or a float)."""
    try:
        k = operator.index(n) if not isinstance(n, (bool, np.bool_)) else None
    except TypeError:
        k = None
    if k is None or k < 1 or (T is not None and k > T):
        need = f"an int in [1, num_train_timesteps={T}]" if T is not None else "an int >= 1"
        raise ValueError(f"num_inference_steps must be {need}, got {n!r}")
    return k


def _spacing(n: int, T: int, spacing: str, offset: int, *, fractional: bool = False) -> np.ndarray:
    """diffusers' ``timestep_spacing`` (DDIM, DDPM and the Euler family), descending: ``linspace`` (fractional
    float32 for the Euler family, rounded to int64 for DDIM/DDPM), ``leading`` (T // n apart, plus
    ``steps_offset``), ``trailing``.  numpy's float ``arange`` gives ``trailing`` an extra value for some n (T = 1000:
    61, 103, 121, ...), which diffusers turns into a timestep -1: dropped here (module docstring)."""
    if spacing == "linspace":
        if fractional:
            return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
        return np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + offset
    ts = np.arange(T, 0, -T / n).round().astype(np.int64) - 1
    return ts[ts >= 0]


def _interp_sigmas(train_sigmas: torch.Tensor, t) -> torch.Tensor:
    """``np.interp(t, arange(T), train_sigmas)`` in float64 (clamped to the table's ends, as numpy), without NaN
    next to an infinite last entry: an integral t is the table entry; a fractional t interpolates linearly in sigma
    (inf towards an inf neighbour)."""
    last = train_sigmas.numel() - 1
    tt = torch.as_tensor(np.asarray(t, dtype=np.float64)).clamp(0, last)
    lo = tt.floor().long()
    hi = (lo + 1).clamp(max=last)
    w = tt - lo
    mixed = (1 - w) * train_sigmas[lo] + w * train_sigmas[hi]
    return torch.where(w == 0, train_sigmas[lo], mixed)


def _beta_grid(n: int, sigma_min: float, sigma_max: float, *, sigma_max_finite: float) -> torch.Tensor:
    """diffusers' ``use_beta_sigmas`` (Lee et al. 2024, "Beta Sampling is All You Need"): sigma_min + ppf(1 -
    linspace(0, 1, n)) (sigma_max - sigma_min), ppf the Beta(0.6, 0.6) quantile function, then a final 0.  At
    sigma_max = inf it follows the library's grids (:func:`zsnr_kernels.schedules.karras`): inf, then the grid of
    n - 1 points from ``sigma_max_finite``."""
    import scipy.stats  # diffusers' own dependency for this option (checked when the config is)

    inf0 = math.isinf(sigma_max)
    top, m = (sigma_max_finite, n - 1) if inf0 else (sigma_max, n)
    ppf = scipy.stats.beta.ppf(1 - np.linspace(0, 1, m), 0.6, 0.6)
    body = torch.as_tensor(sigma_min + ppf * (top - sigma_min), dtype=torch.float64)
    head = torch.full((int(inf0),), INF, dtype=torch.float64)
    return torch.cat([head, body, body.new_zeros(1)])


def _dynamic_threshold(x: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding as diffusers' ``_threshold_sample``: per sample, s = the ``ratio`` quantile of
    |x| clamped to [1, max_value]; x -> clamp(x, -s, s) / s."""
    flat = x.reshape(x.shape[0], -1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x.shape).to(x.dtype)


def _guided(pair, w: float, phi: float) -> torch.Tensor:
    """F of a guided pair, eagerly (where no fused step runs: a clipped D, a step that leaves the sample): the
    reference's guidance and output-space rescale, the fused steps' definition (docs/design.md §2.7)."""
    fc, fu = pair
    f = reference.guidance(fc, fu, w)
    if phi:
        f = f * reference.rescale_factor(fc, f, phi).to(f.dtype).reshape((-1,) + (1,) * (f.ndim - 1))
    return f


def _dtype_of(model_output) -> torch.dtype:
    """The dtype of a model output or guided pair (diffusers draws some noise in it)."""
    return (model_output[0] if isinstance(model_output, (tuple, list)) else model_output).dtype


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """Per-sample scalars as a (n, 1, ..., 1) tensor broadcasting against ``like``."""
    return torch.tensor(values, dtype=torch.float64).to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def _posterior_std(pz, sigma: float, sigma_next: float) -> float:
    """The DDPM posterior std, DDIM's at eta = 1: sqrt((1-abar')/(1-abar) (1 - abar/abar')) =
    s' sqrt(1 - (sigma'/sigma)^2) (s' at sigma = inf)."""
    r = 0.0 if sigma == INF else sigma_next / sigma
    return pz.noise_scale(sigma_next) * math.sqrt(1.0 - r * r)


# ----------------------------------------------------------------------------------------------- the base class


class _ZSNRScheduler(SchedulerMixin, ConfigMixin):
    """What every scheduler here shares: float64 training tables, the config checks, the parameterization,
    model-input semantics.

    Each subclass writes out diffusers' ``__init__`` signature under ``@register_to_config`` (which reads it) and
    starts its body with ``super().__init__()``: the config is registered by then, and this builds the tables from
    it.  ``_choices`` lists the values a config key may take (others are refused, with :data:`REFUSED`'s reason
    where there is one), ``_aliases`` the values diffusers renames, as its own scheduler does (a UniPC or DEIS
    config switched to DPM-Solver).

    ``backend`` (not a config key, so configs stay diffusers') picks the step backend: ``"auto"`` (fused kernels
    where available, else the float64-capable reference), ``"cpu"``, ``"torch"``.
    """

    _compatibles: ClassVar[list[str]] = [e.name for e in KarrasDiffusionSchedulers]
    _choices: ClassVar[dict[str, tuple]] = {"prediction_type": tuple(_PREDICTIONS),
                                            "timestep_spacing": schedules.SPACINGS}
    _aliases: ClassVar[dict[str, dict]] = {}
    order = 1
    backend = "auto"
    _clips_denoised: ClassVar[bool] = True  # clip_sample/thresholding act on D in _model_output

    def __init__(self) -> None:
        self._check_config()
        self.betas = _train_betas(type(self).__name__, self.config)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.num_inference_steps = None

    def _check_config(self) -> None:
        owner, cfg = type(self).__name__, self.config
        renamed = {key: names[cfg[key]] for key, names in self._aliases.items() if cfg[key] in names}
        if renamed:
            self.register_to_config(**renamed)
            cfg = self.config
        for key, allowed in self._choices.items():
            if cfg[key] not in allowed:
                raise _refuse_choice(owner, key, cfg[key], allowed)
        grids = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if cfg.get(k)]
        if len(grids) > 1:
            raise ValueError(f"{owner}: only one of {grids} can be True")
        if cfg.get("use_beta_sigmas") and importlib.util.find_spec("scipy") is None:
            raise ImportError("use_beta_sigmas needs scipy, as in diffusers (pip install scipy)")

    @property
    def _pz(self):
        """The parameterization of ``config.prediction_type``, read when used: diffusers' steps read the config,
        so ``register_to_config(prediction_type=...)`` on a live scheduler takes effect (training scripts do it)."""
        kind = self.config.prediction_type
        cached = getattr(self, "_pz_of", (None, None))
        if kind != cached[0]:
            if kind not in _PREDICTIONS:
                raise _refuse_choice(type(self).__name__, "prediction_type", kind, _PREDICTIONS)
            self._pz_of = cached = (kind, parameterization(_PREDICTIONS[kind]))
        return cached[1]

    @property
    def _train_sigmas(self) -> torch.Tensor:
        """Ascending float64 training sigmas (index = timestep); the last is inf for a zero-SNR model."""
        return _sigmas_of(self.alphas_cumprod)

    def _table(self) -> schedules.DiscreteSchedule:
        return schedules.DiscreteSchedule.from_alphas_cumprod(self.alphas_cumprod)

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The sample unchanged: the state these schedulers keep already is the model input y = c_in(sigma) x."""
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # one model evaluation ------------------------------------------------------------------------------------

    def _model_output(self, model_output, sample: torch.Tensor, sigma: float, guidance_scale=1.0,
                      guidance_rescale=0.0):
        """(F, options, raw D) for the step function at ``sigma``: the one place a model output becomes F.

        ``model_output`` is the model's output, or the pair ``(F_cond, F_uncond)`` of a classifier-free-guided call
        with ``guidance_scale`` w and ``guidance_rescale`` phi: the step function then forms F = F_u + w (F_c - F_u)
        and rescales it in the model's output space (``rescale_space="output"``: diffusers' ``rescale_noise_cfg``
        acts on the noise/v prediction the pipeline guided) inside the fused pass.  ``options`` are the step
        function's keyword arguments (parameterization, backend, guidance).

        Clipping or thresholding the denoised prediction (``clip_sample``, ``thresholding``) is not linear, so then
        F (guided eagerly), D = p y + q F, the clip, and D is passed on as an x0-prediction; the raw D is returned
        for DDIM's unclipped direction.
        """
        pz, owner = self._pz, type(self).__name__
        w, phi, _ = _validate.guidance(guidance_scale, guidance_rescale, "output")
        if isinstance(model_output, (tuple, list)):
            if len(model_output) != 2:
                raise ValueError(f"{owner}.step: model_output must be a tensor or the pair (noise_pred_cond, "
                                 f"noise_pred_uncond), got a sequence of {len(model_output)}")
            model_output = tuple(m if m.dtype == sample.dtype else m.to(sample.dtype) for m in model_output)
        else:
            if w != 1.0 or phi != 0.0:
                raise ValueError(f"{owner}.step: guidance_scale={w} and guidance_rescale={phi} guide inside the step, "
                                 "which needs model_output=(noise_pred_cond, noise_pred_uncond); pass the pair, or "
                                 "leave both at their defaults when the pipeline guided already")
            if model_output.dtype != sample.dtype:
                model_output = model_output.to(sample.dtype)
        if sigma == INF and pz.prediction == "eps":
            raise ValueError(
                f"{owner}: this schedule starts at sigma = inf (zero terminal SNR, timestep "
                f"{self.config.num_train_timesteps - 1}), where an epsilon-prediction model has no denoised "
                "prediction (D = x - sigma * eps has no limit, Lin et al. 2023 §3.2). Use a v-prediction model "
                "(prediction_type='v_prediction'), or a finite start: rescale_betas_zero_snr=False or "
                "timestep_spacing='leading'.")
        opts = {"prediction": pz.prediction, "sigma_data": pz.sigma_data, "backend": self.backend}
        # (a class whose namesake keeps these keys but never clips, TCD, sets _clips_denoised = False)
        clip = self._clips_denoised and getattr(self.config, "clip_sample", False)
        threshold = self._clips_denoised and getattr(self.config, "thresholding", False)
        if not (clip or threshold):
            if isinstance(model_output, tuple):
                opts.update(guidance_scale=w, guidance_rescale=phi, rescale_space="output")
            return model_output, opts, None
        f = _guided(model_output, w, phi) if isinstance(model_output, tuple) else model_output
        p, q = pz.denoise_coeffs(sigma)
        wide = torch.promote_types(sample.dtype, torch.float32)
        d = f.to(wide) * q + (sample.to(wide) * p if p else 0.0)
        if threshold:
            dc = _dynamic_threshold(d, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
        else:
            dc = d.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return dc.to(sample.dtype), {**opts, "prediction": "x0"}, d

    @staticmethod
    def _noise(sample: torch.Tensor, generator, dtype: torch.dtype, variance_noise: torch.Tensor | None = None):
        """The step's unit noise, drawn only if the step adds some: ``variance_noise`` or diffusers' own draw
        ``randn_tensor(shape, generator=generator, dtype=dtype)``, in the sample's dtype."""
        def draw() -> torch.Tensor:
            z = variance_noise if variance_noise is not None else randn_tensor(
                sample.shape, generator=generator, device=sample.device, dtype=dtype)
            return z.to(device=sample.device, dtype=sample.dtype)
        return draw

    @staticmethod
    def _unchanged(sample: torch.Tensor, f, opts: dict, sigma: float):
        """(sample, D) of a step to its own noise level, which leaves the sample as it is (diffusers' updates reduce
        to the identity too).  Schedules whose final sigma repeats the last one have it (DDIM with
        ``set_alpha_to_one=False`` ending at t = 0, ``final_sigmas_type="sigma_min"`` after a grid ending there), and
        spacings that repeat a timestep (more steps than a ``leading`` or DPM-Solver spacing has timesteps for)."""
        if isinstance(f, tuple):
            f = _guided(f, opts["guidance_scale"], opts["guidance_rescale"])
        p, q = parameterization(opts["prediction"], opts["sigma_data"]).denoise_coeffs(sigma)
        return sample.clone(), (f * q + sample * p if p else f * q)  # a new tensor, as diffusers returns

    @classmethod
    def _euler(cls, sample: torch.Tensor, f, sigma: float, sigma_next: float, opts: dict):
        """(y, D) of an Euler step from sigma to sigma_next, or of a step to its own noise level (:meth:`_unchanged`):
        the update of the Euler and EDM Euler schedulers."""
        if sigma_next == sigma:
            return cls._unchanged(sample, f, opts, sigma)
        r = steps.euler_step(sample, f, sigma, sigma_next, **opts)
        return r.y, r.denoised

    @staticmethod
    def _output(prev_sample, denoised, return_dict: bool, *, with_denoised: bool = True):
        if not return_dict:
            return (prev_sample, denoised) if with_denoised else (prev_sample,)
        return ZSNRSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction training target at training ``timesteps`` (one, or one per sample), as diffusers'
        ``get_velocity``: sqrt(abar_t) noise - sqrt(1 - abar_t) x0 (``sample`` is the clean x0); at zero SNR
        (abar = 0) it is -x0."""
        ts = torch.as_tensor(timesteps).reshape(-1).long().cpu()
        abar = self.alphas_cumprod.to(torch.float64)[ts]
        shape = (-1,) + (1,) * (sample.ndim - 1)
        a = abar.sqrt().to(device=sample.device, dtype=sample.dtype).reshape(shape)
        b = (1.0 - abar).sqrt().to(device=sample.device, dtype=sample.dtype).reshape(shape)
        return a * noise - b * sample

    def _add_noise_at(self, original_samples: torch.Tensor, noise: torch.Tensor, sigmas: list[float]):
        """y = c_in(sigma) x0 + s(sigma) noise = sqrt(abar) x0 + sqrt(1 - abar) noise (the noise at sigma = inf)."""
        c = _column([self._pz.c_in(s) for s in sigmas], original_samples)
        s = _column([self._pz.noise_scale(s) for s in sigmas], original_samples)
        return c * original_samples + s * noise


# -------------------------------------------------------------------------------------------- DDIM and DDPM


class _TimestepIndexed(_ZSNRScheduler):
    """DDIM and DDPM: like diffusers, ``step`` reads the noise levels from the timestep it is given (through
    ``alphas_cumprod``), not from a step counter."""

    def __init__(self) -> None:
        super().__init__()
        self.init_noise_sigma = 1.0
        self.timesteps = torch.arange(self.config.num_train_timesteps - 1, -1, -1, dtype=torch.int64)

    def _alpha_cumprod_at(self, t: int) -> float:
        if not 0 <= t < self.alphas_cumprod.numel():  # diffusers: an IndexError
            raise ValueError(f"timestep {t} lies outside the training table [0, {self.alphas_cumprod.numel() - 1}]"
                             f" (steps_offset={self.config.steps_offset} or trained_betas shorter than "
                             f"num_train_timesteps={self.config.num_train_timesteps}?)")
        return float(self.alphas_cumprod[t])

    def _sigma_at(self, t: int) -> float:
        sigma = _sigma_of(self._alpha_cumprod_at(t))
        _check_level(sigma, f"timestep {t}")
        return sigma

    def _spaced_timesteps(self, num_inference_steps) -> torch.Tensor:
        cfg = self.config
        n = _steps_count(num_inference_steps, cfg.num_train_timesteps)  # diffusers refuses more, as here
        return torch.from_numpy(_spacing(n, cfg.num_train_timesteps, cfg.timestep_spacing, cfg.steps_offset))

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        """The model input of ``original_samples`` noised to training ``timesteps`` (one, or one per sample):
        sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, as diffusers' ``add_noise``."""
        ts = torch.as_tensor(timesteps).reshape(-1).long().tolist()
        return self._add_noise_at(original_samples, noise, [self._sigma_at(t) for t in ts])


# ------------------------------------------------------------------------- Euler family and DPM-Solver (indexed)


class _StepCounter:
    """diffusers' step counter, shared by the walks that count steps (``_StepIndexed`` here, LCM's and TCD's):
    ``step_index``, ``begin_index``/``set_begin_index`` (img2img) and ``index_for_timestep``."""

    @property
    def step_index(self) -> int | None:
        """Index of the next step (model evaluation) in ``timesteps`` (None before the first step)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """The first step (evaluation), as set by a pipeline with :meth:`set_begin_index` (img2img)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def index_for_timestep(self, timestep, schedule_timesteps: torch.Tensor | None = None) -> int:
        """Index of ``timestep`` in ``timesteps``; the second match when it occurs twice (diffusers' rule, so that
        img2img starting mid-schedule does not skip a sigma)."""
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        indices = (schedule_timesteps == timestep).nonzero()
        if len(indices) == 0:
            raise ValueError(f"timestep {timestep} is not one of scheduler.timesteps; pass one of them")
        return indices[1 if len(indices) > 1 else 0].item()


class _StepIndexed(_StepCounter, _ZSNRScheduler):
    """Schedulers that walk ``sigmas`` with a step counter, as diffusers' Euler family and DPM-Solver do.

    ``sigmas`` is the float64 sampling schedule (descending; the first inf at zero terminal SNR, the last the final
    sigma), ``timesteps`` holds one training timestep per model evaluation and ``_evals`` says which step (and
    stage, for Heun) each evaluation is.  Before ``set_timesteps`` that schedule is the training one (every
    timestep, descending, then 0), which diffusers' Euler schedulers step through too.
    """

    _ve_state = False  # True where diffusers keeps the variance-exploding x (Euler family)
    _timestep_dtype = torch.float32  # of ``timesteps`` after set_timesteps, as diffusers'
    _refuses_integer_timesteps = False  # diffusers' Euler and Euler ancestral do (see _open)

    def __init__(self) -> None:
        super().__init__()
        T = self.config.num_train_timesteps
        sigmas = torch.cat([self._train_sigmas.flip(0), torch.zeros(1, dtype=torch.float64)])
        self._set_schedule(np.linspace(0, T - 1, T)[::-1], sigmas, None)
        self.num_inference_steps = None

    @property
    def init_noise_sigma(self) -> torch.Tensor | float:
        """The scale the pipeline gives the start noise: for the Euler family a tensor (as diffusers'), s(sigma_0)
        with ``linspace`` or ``trailing`` spacing (diffusers starts those at x = sigma_0 noise, model input
        s(sigma_0) noise), else 1; 1.0 for DPM-Solver."""
        if not self._ve_state:
            return 1.0
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return torch.tensor(self._pz.noise_scale(float(self.sigmas[0])), dtype=self.sigmas.dtype)
        return torch.tensor(1.0, dtype=self.sigmas.dtype)

    def _next_eval(self, timestep) -> int:
        if self._step_index is None:
            if self._begin_index is not None:
                self._step_index = self._begin_index
            else:
                t = timestep.to(self.timesteps.device) if isinstance(timestep, torch.Tensor) else timestep
                self._step_index = self.index_for_timestep(t)
        k = self._step_index
        if k >= len(self._evals):
            raise ValueError(f"step() was called {k + 1} times but the schedule has {len(self._evals)} model "
                             "evaluations; call set_timesteps again to start a new run")
        self._step_index = k + 1
        return k

    def _eval_sigma(self, k: int) -> float:
        i, stage = self._evals[k]
        return float(self.sigmas[i + (stage != 1)])

    def _open(self, timestep, model_output, sample: torch.Tensor, guidance_scale=1.0, guidance_rescale=0.0):
        """The opening every step here shares: the evaluation k (found from the first timestep, then counted, as
        diffusers), the noise levels of its step and the model output as the step function takes it (evaluated at
        sigma, or at sigma_next for Heun's second stage).  Returns (k, sigma, sigma_next, F, prediction).

        diffusers' Euler and Euler ancestral refuse integer timesteps: there they are loop indices
        (``enumerate(timesteps)``) far more often than timesteps, which are floats."""
        if self._refuses_integer_timesteps and (isinstance(timestep, int) or (
                isinstance(timestep, torch.Tensor) and not timestep.is_floating_point())):
            raise ValueError(f"Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to "
                             f"`{type(self).__name__}.step()` is not supported. Make sure to pass one of the "
                             "`scheduler.timesteps` as a timestep.")
        k = self._next_eval(timestep)
        i, stage = self._evals[k]
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        if math.isnan(sigma + sigma_next):  # the messages only then: this runs on every step
            _check_level(sigma, f"scheduler.sigmas[{i}]")
            _check_level(sigma_next, f"scheduler.sigmas[{i + 1}]")
        f, opts, _ = self._model_output(model_output, sample, self._eval_sigma(k), guidance_scale, guidance_rescale)
        return k, sigma, sigma_next, f, opts

    def _set_schedule(self, timesteps, sigmas: torch.Tensor, device, evals: list[tuple[int, int]] | None = None,
                      ) -> None:
        """Install a schedule: one (step, stage) per evaluation, stage 1 at ``timesteps[step]``, stage 2 (and
        Heun's no-op) at ``timesteps[step + 1]``."""
        if not isinstance(timesteps, torch.Tensor):  # a copy: numpy's reversed views have negative strides
            timesteps = torch.from_numpy(np.array(timesteps))
        ts = timesteps.to(self._timestep_dtype)
        evals = evals if evals is not None else [(i, 1) for i in range(ts.numel())]
        self.sigmas = sigmas.to(torch.float64)
        self.timesteps = ts[torch.tensor([i + (stage != 1) for i, stage in evals], dtype=torch.long)].to(device)
        self._evals = evals
        self.num_inference_steps = ts.numel()
        self._step_index = None
        self._begin_index = None

    # set_timesteps ----------------------------------------------------------------------------------------------

    def _spaced(self, n: int, T: int) -> np.ndarray:
        """The timesteps of ``timestep_spacing`` (the Euler family's; DPM-Solver has its own)."""
        return _spacing(n, T, self.config.timestep_spacing, self.config.steps_offset, fractional=True)

    def _grid_span(self, sigmas: torch.Tensor) -> torch.Tensor:
        """The sigmas whose ends a Karras/exponential/beta grid spans (unless the config sets ``sigma_min`` or
        ``sigma_max``): the spaced ones for the Euler family."""
        return sigmas

    def _grid_timesteps(self, ts: np.ndarray) -> np.ndarray:
        """A grid's timesteps (log-linear interpolation) as the class takes them: as they are here."""
        return ts

    def _grid_kind(self) -> str | None:
        cfg = self.config
        for key, kind in (("use_karras_sigmas", "karras"), ("use_lu_lambdas", "lu"),
                          ("use_exponential_sigmas", "exponential"), ("use_beta_sigmas", "beta")):
            if cfg.get(key):  # diffusers' order of precedence
                return kind
        return None

    def _grid(self, sigmas: torch.Tensor, n: int):
        """diffusers' ``use_karras_sigmas``/``use_exponential_sigmas``/``use_beta_sigmas``/``use_lu_lambdas``
        (exponential in log sigma: the same grid) between the ends of ``sigmas`` (or the config's ``sigma_min``/
        ``sigma_max``), with timesteps by log-linear interpolation.  A zero-SNR grid keeps its first sigma inf
        (timestep T - 1) and continues from the largest finite training sigma.  A grid that ends at sigma_min ends
        there exactly (the formulas return it up to rounding, which would put a final ``sigma_min`` a rounding error
        above the grid's end)."""
        table = self._table()
        smin = getattr(self.config, "sigma_min", None)
        smax = getattr(self.config, "sigma_max", None)
        smin = float(sigmas[-1]) if smin is None else smin
        smax = float(sigmas[0]) if smax is None else smax
        if n == 1:  # diffusers' one-point grid is its start (at zero SNR there is no finite end to span)
            grid = torch.tensor([smax], dtype=torch.float64)
        else:
            kind = self._grid_kind()
            build = {"karras": schedules.karras, "beta": _beta_grid}.get(kind, schedules.exponential)
            grid = build(n, smin, smax, sigma_max_finite=table.sigma_max_finite)[:-1]
            if math.isclose(grid[-1].item(), smin, rel_tol=1e-12):
                grid[-1] = smin
        return self._grid_timesteps(table.sigma_to_t(grid, mode="interp").numpy()), grid

    def _final_sigma(self) -> float:
        """The sigma a spaced schedule ends at: 0, or the smallest training one (``final_sigmas_type``)."""
        if getattr(self.config, "final_sigmas_type", "zero") == "sigma_min":
            return float(self._train_sigmas[0])
        return 0.0

    def _schedule(self, num_inference_steps=None, timesteps=None, sigmas=None, *, T: int | None = None):
        """(timesteps, sigmas) as diffusers' ``set_timesteps`` builds them, from a step count (``timestep_spacing``,
        sigmas interpolated in the training table, a grid on request, then the final sigma), custom ``timesteps``
        (their sigmas interpolated), or custom ``sigmas`` (ending with the final one; timesteps by log-linear
        interpolation).  ``T`` replaces ``num_train_timesteps`` in the spacing (Heun's ``set_timesteps`` takes it)."""
        cfg, owner = self.config, type(self).__name__
        given = [name for name, v in (("num_inference_steps", num_inference_steps), ("timesteps", timesteps),
                                      ("sigmas", sigmas)) if v is not None]
        if len(given) != 1:
            raise ValueError(f"{owner}.set_timesteps: pass exactly one of num_inference_steps, timesteps and "
                             f"sigmas, got {given or 'none'}")
        grid = self._grid_kind()
        if timesteps is not None and grid is not None:
            raise ValueError(f"{owner}.set_timesteps: custom timesteps cannot be used with the config's "
                             f"{grid} grid; pass num_inference_steps, or a config without it")
        if sigmas is not None:
            sig = torch.as_tensor(np.asarray(sigmas, dtype=np.float64))
            if sig.ndim != 1 or sig.numel() < 2:
                raise ValueError("sigmas must hold at least two noise levels (the steps' and the final one)")
            ts = self._table().sigma_to_t(sig[:-1], mode="interp").numpy()
        else:
            if timesteps is not None:  # typed first, as diffusers (DPM-Solver truncates them to integers)
                ts = torch.as_tensor(np.asarray(timesteps, dtype=np.float64)).to(self._timestep_dtype).numpy()
                n = ts.size
            else:
                n = _steps_count(num_inference_steps)
                ts = self._spaced(n, T or cfg.num_train_timesteps)
            if getattr(cfg, "interpolation_type", "linear") == "log_linear":  # n + 1 points from the table's ends
                table = self._table()
                sig = schedules.exponential(n + 1, table.sigma_min, table.sigma_max,
                                            sigma_max_finite=table.sigma_max_finite)[:-1]
            else:
                sig = _interp_sigmas(self._train_sigmas, ts)
            if grid is not None:
                ts, sig = self._grid(self._grid_span(sig), n)
            sig = torch.cat([sig, torch.tensor([self._final_sigma()], dtype=torch.float64)])
        rises = (sig[1:] > sig[:-1]).nonzero()
        if len(rises):
            i = rises[0].item()
            if sigmas is None and i == len(sig) - 2:  # only final_sigmas_type="sigma_min" can end above the grid
                fix = ("final_sigmas_type='sigma_min' ends at the smallest training sigma, above the grid's end: "
                       "use final_sigmas_type='zero', or a config sigma_min of at least that")
            else:
                fix = "pass descending timesteps or sigmas"
            raise ValueError(f"{owner}: the schedule raises the noise level from sigmas[{i}]={sig[i].item()} to "
                             f"sigmas[{i + 1}]={sig[i + 1].item()}; the fused steps only lower it (sampling, not "
                             f"inversion): {fix}")
        return ts, sig

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        """The model input of ``original_samples`` noised to the sigma of the evaluation at ``timesteps``
        (found like diffusers: ``begin_index``/``step_index`` when set, else by timestep; before set_timesteps,
        the training timesteps' sigmas): c_in(sigma) x0 + s(sigma) noise = sqrt(abar) x0 + sqrt(1 - abar) noise.
        That is the state these schedulers keep, diffusers' x0 + sigma noise times c_in(sigma): code that scales
        diffusers' result itself (EDM-style training dividing by sqrt(sigma^2 + 1)) must not scale this one."""
        ts = torch.as_tensor(timesteps).reshape(-1)
        if self._begin_index is None:
            schedule = self.timesteps.to(ts.device)
            idx = [self.index_for_timestep(t, schedule) for t in ts]
        else:
            idx = [self._step_index if self._step_index is not None else self._begin_index] * ts.numel()
        return self._add_noise_at(original_samples, noise, [self._eval_sigma(k) for k in idx])

    def _finish(self, y: torch.Tensor, sigma_out: float, k: int) -> torch.Tensor:
        """What the last step returns: the variance-exploding latent y / c_in(sigma) where diffusers keeps one (the
        Euler family at a final sigma > 0; EDM, whose y at sigma = 0 is x0 / sigma_data), else y (at sigma = 0 with
        sigma_data = 1, y is x0)."""
        if self._ve_state and k == len(self._evals) - 1:
            c = self._pz.c_in(sigma_out)
            return y / c if c != 1.0 else y
        return y


_EULER_FAMILY_DOC = """
    The state is the model input y, not diffusers' x = y / c_in(sigma): ``init_noise_sigma`` is s(sigma_0) or 1
    (see the package docstring) and ``scale_model_input`` is the identity, so the pipeline's model inputs equal
    diffusers' ``scale_model_input`` outputs.  With ``rescale_betas_zero_snr=True`` the schedule starts at
    sigma = inf exactly (diffusers: 4096).
"""


# ---------------------------------------------------------------------------------- EDM (continuous sigmas)

#: diffusers' EDM prediction_type -> (this library's prediction, sign of the model output).  EDM's own
#: parameterization, which diffusers calls "epsilon", is D = c_skip x + c_out F with c_out = +sigma sd/sqrt(sigma^2 +
#: sd^2): the v-prediction of -F (v's c_out has the other sign, its c_skip and c_in are the same)
_EDM_PREDICTIONS = {"epsilon": ("v", -1.0), "v_prediction": ("v", 1.0), "sample": ("x0", 1.0),
                    "original_sample": ("x0", 1.0)}


class _EDMScheduler(_StepIndexed):
    """diffusers' EDM schedulers: no training table, a Karras (``rho``) or exponential grid from ``sigma_max`` to
    ``sigma_min``, the model called at timestep c_noise = 0.25 log sigma, EDM's preconditioning with ``sigma_data``
    (c_in = 1/sqrt(sigma^2 + sd^2): the model input is this library's state y for that sigma_data).  ``prediction_type``
    ``"epsilon"`` is EDM's own F-parameterization (D = c_skip x + c_out F), run as the library's v-prediction of -F
    (see :data:`_EDM_PREDICTIONS`), ``"v_prediction"`` the library's v, and ``"sample"`` (``"original_sample"``),
    which diffusers' EDM schedulers take and then fail at ``step``, an x0-prediction.

    Zero terminal SNR here means ``sigma_max=float("inf")`` (diffusers' grids are NaN there): the schedule is inf,
    then the grid of n - 1 points from ``sigma_max_finite`` (a config key of these classes only, required then) down
    to ``sigma_min`` (:func:`zsnr_kernels.schedules.karras`).  The first model call gets the start noise itself at
    timestep c_noise = inf, which the network must take: EDM's log-sigma conditioning has no finite value there (an
    EDM model is trained on a log-normal range of finite sigmas, so this is for models trained to start at inf).
    """

    _ve_state = True
    _timestep_dtype = torch.float32
    _refuses_integer_timesteps = True
    _choices = {"sigma_schedule": ("karras", "exponential"), "final_sigmas_type": ("zero", "sigma_min")}

    def __init__(self, train_points: int) -> None:  # no betas: no _ZSNRScheduler.__init__
        self._check_config()
        cfg = self.config
        for key in ("sigma_min", "sigma_data"):
            if not (isinstance(cfg[key], (int, float)) and 0 < cfg[key] < INF):
                raise ValueError(f"{type(self).__name__}: {key} must be a positive finite number, got {cfg[key]!r}")
        if not (isinstance(cfg.sigma_max, (int, float)) and cfg.sigma_min <= cfg.sigma_max):
            raise ValueError(f"{type(self).__name__}: sigma_max must be a number >= sigma_min={cfg.sigma_min} (inf "
                             f"for zero terminal SNR), got {cfg.sigma_max!r}")
        if cfg.sigma_max == INF and cfg.sigma_max_finite is None:
            raise ValueError(f"{type(self).__name__}: sigma_max=inf (a start at zero terminal SNR) needs "
                             "sigma_max_finite=, the largest finite sigma the grid continues from (EDM: 80)")
        sigmas = self._edm_sigmas(train_points)
        self._set_schedule(self.precondition_noise(sigmas[:-1]), sigmas, None)
        self.num_inference_steps = None

    @property
    def _pz(self):
        """The parameterization of ``prediction_type`` with ``sigma_data``, read when used (see the base's)."""
        key = (self.config.prediction_type, self.config.sigma_data)
        cached = getattr(self, "_pz_of", (None, None))
        if key != cached[0]:
            if key[0] not in _EDM_PREDICTIONS:
                raise _refuse_choice(type(self).__name__, "prediction_type", key[0], _EDM_PREDICTIONS)
            self._pz_of = cached = (key, parameterization(_EDM_PREDICTIONS[key[0]][0], key[1]))
        return cached[1]

    def _model_output(self, model_output, sample, sigma, guidance_scale=1.0, guidance_rescale=0.0):
        """The base's, with EDM's "epsilon" output negated (see :data:`_EDM_PREDICTIONS`): one elementwise pass
        before the fused one, the guidance rescale's factor unchanged (a ratio of stds)."""
        if _EDM_PREDICTIONS.get(self.config.prediction_type, (None, 1.0))[1] < 0:
            model_output = (tuple(-m for m in model_output) if isinstance(model_output, (tuple, list))
                            else -model_output)
        return super()._model_output(model_output, sample, sigma, guidance_scale, guidance_rescale)

    @property
    def init_noise_sigma(self) -> float:
        """The scale of the first model input: diffusers starts from x = sqrt(sigma_max^2 + 1) noise (sigma_data = 1's
        formula, whatever sigma_data is) and scales it by c_in(sigma_max), so sqrt(sigma_max^2 + 1) c_in(sigma_max);
        1 at sigma_max = inf."""
        smax, sd = self.config.sigma_max, self.config.sigma_data
        return 1.0 if smax == INF else math.sqrt(smax * smax + 1.0) / math.hypot(smax, sd)

    @staticmethod
    def precondition_noise(sigma) -> torch.Tensor:
        """EDM's c_noise = 0.25 log sigma, the timestep the model is called at (inf at sigma = inf)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
        return (0.25 * sigma.log()).to(torch.float32)

    def _edm_sigmas(self, n: int, ramp=None) -> torch.Tensor:
        """diffusers' ``_compute_karras_sigmas``/``_compute_exponential_sigmas`` of ``ramp`` (default linspace(0, 1,
        n); the exponential grid reads only its length, as diffusers') in float64, ending exactly at sigma_min, then
        the final sigma (0, or sigma_min for ``final_sigmas_type="sigma_min"``)."""
        cfg = self.config
        smin, smax, rho = float(cfg.sigma_min), float(cfg.sigma_max), float(cfg.rho)
        if smax == INF:
            if ramp is not None:
                raise ValueError(f"{type(self).__name__}: a custom ramp cannot start at sigma_max=inf; pass "
                                 "num_inference_steps, or a finite sigma_max")
            build = schedules.karras if cfg.sigma_schedule == "karras" else schedules.exponential
            extra = {"rho": rho} if cfg.sigma_schedule == "karras" else {}
            grid = build(n, smin, INF, sigma_max_finite=float(cfg.sigma_max_finite), **extra)[:-1]
        elif cfg.sigma_schedule == "karras":
            ramp = torch.linspace(0, 1, n, dtype=torch.float64) if ramp is None else ramp.to(torch.float64)
            lo, hi = smin ** (1 / rho), smax ** (1 / rho)
            grid = (hi + ramp * (lo - hi)) ** rho
        else:
            m = n if ramp is None else ramp.numel()
            grid = torch.linspace(math.log(smax), math.log(smin), m, dtype=torch.float64).exp()
        if math.isclose(grid[-1].item(), smin, rel_tol=1e-12):
            grid[-1] = smin
        last = smin if cfg.final_sigmas_type == "sigma_min" else 0.0
        return torch.cat([grid, torch.tensor([last], dtype=torch.float64)])
