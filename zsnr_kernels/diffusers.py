"""diffusers schedulers that start exactly at zero terminal SNR, on the fused steps of :mod:`zsnr_kernels.steps`.

Each class here is a real diffusers scheduler (``SchedulerMixin`` + ``ConfigMixin``) with the config keys of the
diffusers scheduler it is named after, so a pipeline takes it unchanged and switching is one line::

    pipe.scheduler = ZSNREulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler = ZSNRDPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing")   # zero terminal SNR

* :class:`ZSNRDDIMScheduler` (``DDIMScheduler``): :func:`~zsnr_kernels.ddim_step`
* :class:`ZSNRDDPMScheduler` (``DDPMScheduler``): :func:`~zsnr_kernels.ddpm_step`
* :class:`ZSNREulerDiscreteScheduler` (``EulerDiscreteScheduler``): :func:`~zsnr_kernels.euler_step`
* :class:`ZSNREulerAncestralDiscreteScheduler` (``EulerAncestralDiscreteScheduler``):
  :func:`~zsnr_kernels.euler_ancestral_step`
* :class:`ZSNRHeunDiscreteScheduler` (``HeunDiscreteScheduler``): :func:`~zsnr_kernels.heun_step`
* :class:`ZSNRDPMSolverMultistepScheduler` (``DPMSolverMultistepScheduler``, ``dpmsolver++`` and
  ``sde-dpmsolver++``): :func:`~zsnr_kernels.dpmpp_2m_step`, :func:`~zsnr_kernels.dpmpp_2m_sde_step`,
  :func:`~zsnr_kernels.dpmpp_3m_sde_step`

:data:`SCHEDULERS` maps each diffusers class name to the class here.

**What the pipeline holds.**  The ``sample`` a pipeline keeps between steps is this library's state, the model
input y = c_in(sigma) x (docs/design.md §2.1), finite at every sigma including sigma = inf.  For the
variance-preserving schedulers (DDIM, DDPM, DPM-Solver) that is exactly diffusers' sample.  diffusers'
Euler-family schedulers keep the variance-exploding x = x0 + sigma eps instead, which is infinite at zero terminal
SNR; diffusers therefore replaces the last ``alphas_cumprod`` (0) by 2**-24, a sigma_max of 4096.  Here:

* ``sigmas[0]`` is exactly inf with ``rescale_betas_zero_snr=True`` and a spacing that reaches the last training
  timestep (``trailing``, ``linspace``); the model is called there at that timestep (T - 1), with y = the noise.
* ``init_noise_sigma`` is the noise scale of the first model input, the factor diffusers' first
  ``scale_model_input(noise * init_noise_sigma)`` applies: s(sigma_0) = sigma_0 / sqrt(sigma_0^2 + 1) (1 at
  sigma_0 = inf) for the Euler family with ``linspace``/``trailing`` spacing, 1 otherwise.
* ``scale_model_input`` returns the sample unchanged: it already is the model input.
* ``step`` maps (y, model output) to the next y with the library's fused step (``backend``, default ``"auto"``);
  after the last step y at sigma = 0 is x0, what the pipeline decodes.
* ``add_noise`` returns the y of the noisy sample, sqrt(abar) x0 + sqrt(1 - abar) noise (the noise itself at zero
  SNR).

The step from sigma = inf is first order for every sampler (docs/design.md §2.3); an ``epsilon``-prediction model
cannot be evaluated there and ``step`` says so.  ``HeunDiscreteScheduler`` has no ``rescale_betas_zero_snr``;
:class:`ZSNRHeunDiscreteScheduler` adds it.

**Parity with diffusers** on finite schedules (``tests/test_diffusers_schedulers.py``): same timesteps, model
inputs and results to float32 rounding (float64 where diffusers computes in the sample's dtype, once both use the
same tables).  Noise for the stochastic samplers is drawn from the ``generator`` argument with diffusers' own
``randn_tensor`` calls (shape, dtype), so a generator seed gives diffusers' images.  Deviations:

* No noise is drawn for a step that adds none (diffusers draws, and multiplies by 0 or adds 1e-10 z, at the last
  step of Euler ancestral, DDPM, DDIM with eta > 0 and SDE-DPM-Solver++): the images are the same, the generator is
  left one draw earlier after the run.  DDPM's posterior variance is not clamped to 1e-20 (diffusers adds 1e-10 z
  at its last step).
* ``sde-dpmsolver++`` with ``solver_order=3`` follows k-diffusion's ``sample_dpmpp_3m_sde``: diffusers' third-order
  SDE update has the wrong sign on the 1/2 of its second-difference weight (it integrates to
  (1 - e^{-2h})/(4h^2) - 1/(2h) + 1/2; diffusers writes - 1/2).  The deterministic orders 1-3 match diffusers.
* ``trailing`` step counts for which numpy's ``arange`` yields one value too many (T = 1000: 61, 103, 121, ...)
  give the requested number of steps, not diffusers' extra timestep -1 (see :func:`zsnr_kernels.schedules.timesteps`).
* Karras/exponential timesteps come from float64 log sigmas (diffusers interpolates in its float32 table), which
  moves the fractional timesteps by up to 1e-2.  DPM-Solver's integer ones are equal for Karras (rounded); its
  exponential ones are truncated, as in diffusers, and so may differ by 1 where t lies within 1e-2 of an integer
  (on SD's table diffusers' float32 t(sigma_max) = 998.9999997 truncates to 998; in float64 here it is 999).
* With ``leading`` spacing and no configured grid ``sigma_max``, ``init_noise_sigma`` does not depend on
  ``set_timesteps`` having run.  diffusers' Euler family computes it from the current sigmas, so a pipeline that
  reads it first (``LDMPipeline``) starts a ``leading`` schedule from its training sigma_max there, not from the
  schedule's first sigma; with ``linspace``/``trailing`` both are the same.  (With a Karras or exponential grid and
  a configured ``sigma_max`` it changes with ``set_timesteps``, as in diffusers.)
* Pipelines that drive the scheduler's sigmas themselves instead of calling ``step`` on the latents they keep --
  ``StableDiffusionLatentUpscalePipeline`` reads ``scheduler.sigmas`` and preconditions its own model inputs --
  assume diffusers' variance-exploding latents and are not supported.
* ``prev_sample`` keeps the sample's dtype (diffusers' Euler family returns the model output's dtype).
* Not supported (a ValueError names the option): Euler's ``s_churn`` (use ``zsnr_kernels.sample(..., s_churn=)``,
  which adds the churn before the model call, as EDM does), ``interpolation_type="log_linear"``,
  ``timestep_type="continuous"``, ``use_beta_sigmas``, DPM-Solver's ``use_lu_lambdas``, ``use_flow_sigmas``,
  ``use_dynamic_shifting`` and the noise-prediction ``dpmsolver``/``sde-dpmsolver`` algorithms, DDPM variance types
  other than ``fixed_small(_log)``, beta schedules other than ``linear``, ``scaled_linear``,
  ``squaredcos_cap_v2`` (or ``trained_betas``), and custom ``timesteps=``/``sigmas=`` in ``set_timesteps`` (DDPM's
  custom ``timesteps`` excepted).
* A saved config names these classes (``_class_name``), which ``DiffusionPipeline.from_pretrained`` cannot look up
  in diffusers: load the pipeline, then set ``pipe.scheduler = ZSNR...Scheduler.from_pretrained(path,
  subfolder="scheduler")``.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

try:  # the real package: this module is zsnr_kernels.diffusers, imports are absolute
    from diffusers import ConfigMixin, SchedulerMixin
    from diffusers.configuration_utils import register_to_config
    from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers
    from diffusers.utils import BaseOutput
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as exc:  # pragma: no cover - exercised only without diffusers
    raise ImportError("zsnr_kernels.diffusers needs the diffusers package (pip install diffusers)") from exc

from . import schedules, steps
from .parameterization import parameterization

__all__ = [
    "SCHEDULERS",
    "ZSNRDDIMScheduler",
    "ZSNRDDPMScheduler",
    "ZSNRDPMSolverMultistepScheduler",
    "ZSNREulerAncestralDiscreteScheduler",
    "ZSNREulerDiscreteScheduler",
    "ZSNRHeunDiscreteScheduler",
    "ZSNRSchedulerOutput",
]

INF = math.inf

#: diffusers' prediction_type -> this library's prediction
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


_NO_OP = 3  # the stage of Heun's placeholder evaluation after the Euler step from sigma = inf


@dataclass
class ZSNRSchedulerOutput(BaseOutput):
    """What ``step`` returns.

    prev_sample:          the next model input y (the state the pipeline keeps); after the last step, the clean latent
    pred_original_sample: the denoised prediction D of this model evaluation (x0, the same in VE and VP terms)
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


# ------------------------------------------------------------------------------------------------- shared helpers


def _refuse(owner: str, key: str, value, fix: str) -> ValueError:
    return ValueError(f"{owner} does not support {key}={value!r}; {fix}")


def _require(owner: str, key: str, value, allowed) -> None:
    if value not in allowed:
        raise _refuse(owner, key, value, f"use one of {tuple(allowed)}")


def _train_betas(owner: str, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                 rescale_betas_zero_snr) -> torch.Tensor:
    """Training betas in float64, as diffusers builds them (it uses float32), rescaled to zero terminal SNR on
    request (Lin et al. Algorithm 1: the last beta is exactly 1, the last alphas_cumprod exactly 0)."""
    if trained_betas is not None:
        betas = torch.as_tensor(np.asarray(trained_betas, dtype=np.float64))
        if betas.ndim != 1 or betas.numel() != num_train_timesteps:
            raise ValueError(f"trained_betas must hold num_train_timesteps={num_train_timesteps} betas, "
                             f"got shape {tuple(betas.shape)}")
    elif beta_schedule in schedules.BETA_SCHEDULES:
        betas = schedules.betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
    else:
        raise _refuse(owner, "beta_schedule", beta_schedule,
                      f"use one of {schedules.BETA_SCHEDULES}, or pass the betas as trained_betas")
    return schedules.rescale_zero_terminal_snr(betas) if rescale_betas_zero_snr else betas


def _sigma_of(alpha_cumprod: float) -> float:
    """sigma = sqrt((1 - abar)/abar); inf at abar = 0."""
    return INF if alpha_cumprod == 0.0 else math.sqrt((1.0 - alpha_cumprod) / alpha_cumprod)


def _steps_count(n, T: int) -> int:
    """``num_inference_steps`` as an int in [1, T]: a Python or numpy integer, or a 0-d integer tensor, as
    diffusers takes them (not a bool or a float)."""
    try:
        k = operator.index(n) if not isinstance(n, (bool, np.bool_)) else None
    except TypeError:
        k = None
    if k is None or not 1 <= k <= T:
        raise ValueError(f"num_inference_steps must be an int in [1, num_train_timesteps={T}], got {n!r}")
    return k


def _interp_sigmas(train_sigmas: torch.Tensor, t: np.ndarray) -> torch.Tensor:
    """``np.interp(t, arange(T), train_sigmas)`` in float64, without NaN next to an infinite last entry: an
    integral t is the table entry; a fractional t interpolates linearly in sigma (inf towards an inf neighbour)."""
    tt = torch.as_tensor(np.asarray(t, dtype=np.float64))
    if ((tt < 0) | (tt > train_sigmas.numel() - 1)).any():
        raise ValueError(f"timesteps must lie in [0, {train_sigmas.numel() - 1}], got {tt.tolist()}; lower "
                         "steps_offset")
    lo = tt.floor().long()
    hi = (lo + 1).clamp(max=train_sigmas.numel() - 1)
    w = tt - lo
    mixed = (1 - w) * train_sigmas[lo] + w * train_sigmas[hi]
    return torch.where(w == 0, train_sigmas[lo], mixed)


def _ddim_std(pz, sigma: float, sigma_next: float) -> float:
    """DDIM's noise std at eta = 1: sqrt((1-abar')/(1-abar) (1 - abar/abar')) = s' sqrt(1 - (sigma'/sigma)^2)."""
    return pz.noise_scale(sigma_next) * math.sqrt(1.0 - (sigma_next / sigma) ** 2)


def _dynamic_threshold(x: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding as diffusers' ``_threshold_sample``: per sample, s = the ``ratio`` quantile of
    |x| clamped to [1, max_value]; x -> clamp(x, -s, s) / s."""
    flat = x.reshape(x.shape[0], -1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x.shape).to(x.dtype)


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """Per-sample scalars as a (n, 1, ..., 1) tensor broadcasting against ``like``."""
    return torch.tensor(values, dtype=torch.float64).to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


class _ZSNRScheduler(SchedulerMixin, ConfigMixin):
    """What every scheduler here shares: float64 training tables, the parameterization, model-input semantics.

    ``backend`` (not a config key, so configs stay diffusers') picks the step backend: ``"auto"`` (fused kernels
    where available, else the float64-capable reference), ``"cpu"``, ``"torch"``.
    """

    _compatibles: ClassVar[list[str]] = [e.name for e in KarrasDiffusionSchedulers]
    order = 1
    backend = "auto"

    def _init_tables(self, *, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                     rescale_betas_zero_snr, prediction_type) -> None:
        owner = type(self).__name__
        if prediction_type not in _PREDICTIONS:
            raise _refuse(owner, "prediction_type", prediction_type, f"use one of {tuple(_PREDICTIONS)}")
        self.betas = _train_betas(owner, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                                  rescale_betas_zero_snr)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = schedules.alphas_cumprod(self.betas)
        self._pz_of = (prediction_type, parameterization(_PREDICTIONS[prediction_type]))
        self.num_inference_steps = None

    @property
    def _pz(self):
        """The parameterization of ``config.prediction_type``, read when used: diffusers' steps read the config,
        so ``register_to_config(prediction_type=...)`` on a live scheduler takes effect (training scripts do it)."""
        kind = self.config.prediction_type
        if kind != self._pz_of[0]:
            if kind not in _PREDICTIONS:
                raise _refuse(type(self).__name__, "prediction_type", kind, f"use one of {tuple(_PREDICTIONS)}")
            self._pz_of = (kind, parameterization(_PREDICTIONS[kind]))
        return self._pz_of[1]

    @property
    def _train_sigmas(self) -> torch.Tensor:
        """Ascending float64 training sigmas (index = timestep); the last is inf for a zero-SNR model."""
        return schedules.sigmas_from_alphas_cumprod(self.alphas_cumprod)

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The sample unchanged: the state these schedulers keep already is the model input y = c_in(sigma) x."""
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # one model evaluation ------------------------------------------------------------------------------------

    def _model_output(self, model_output: torch.Tensor, sample: torch.Tensor, sigma: float):
        """(F, prediction) to hand to the step function at ``sigma``, plus the raw D when D is clipped.

        Clipping or thresholding the denoised prediction (``clip_sample``, ``thresholding``) is not linear, so then
        D = p y + q F is formed here, clipped, and passed on as an x0-prediction.
        """
        if sigma == INF and self._pz.prediction == "eps":
            raise ValueError(
                f"{type(self).__name__}: this schedule starts at sigma = inf (zero terminal SNR, timestep "
                f"{self.config.num_train_timesteps - 1}), where an epsilon-prediction model has no denoised "
                "prediction (D = x - sigma * eps has no limit, Lin et al. 2023 §3.2). Use a v-prediction model "
                "(prediction_type='v_prediction'), or a finite start: rescale_betas_zero_snr=False or "
                "timestep_spacing='leading'.")
        if model_output.dtype != sample.dtype:
            model_output = model_output.to(sample.dtype)
        clip = getattr(self.config, "clip_sample", False)
        threshold = getattr(self.config, "thresholding", False)
        if not (clip or threshold):
            return model_output, self._pz.prediction, None
        p, q = self._pz.denoise_coeffs(sigma)
        wide = torch.promote_types(sample.dtype, torch.float32)
        d = model_output.to(wide) * q + (sample.to(wide) * p if p else 0.0)
        if threshold:
            dc = _dynamic_threshold(d, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
        else:
            dc = d.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return dc.to(sample.dtype), "x0", d

    def _options(self, prediction: str) -> dict:
        return {"prediction": prediction, "backend": self.backend}

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
    def _unchanged(sample: torch.Tensor, f: torch.Tensor, prediction: str, sigma: float):
        """(sample, D) of a step to its own noise level, which leaves the sample as it is (diffusers' updates reduce
        to the identity too).  Schedules whose final sigma repeats the last one have it: DDIM with
        ``set_alpha_to_one=False`` ending at t = 0, ``final_sigmas_type="sigma_min"`` after a grid ending there."""
        p, q = parameterization(prediction).denoise_coeffs(sigma)
        return sample.clone(), (f * q + sample * p if p else f * q)  # a new tensor, as diffusers returns

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

    def _sigma_at(self, t: int) -> float:
        return _sigma_of(float(self.alphas_cumprod[t]))

    def _check_set(self) -> None:
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) before step()")

    def _spaced_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        T = self.config.num_train_timesteps
        num_inference_steps = _steps_count(num_inference_steps, T)
        ts = schedules.timesteps(num_inference_steps, T, self.config.timestep_spacing, self.config.steps_offset)
        if ts.max().item() >= T:
            raise ValueError(f"steps_offset={self.config.steps_offset} pushes timestep {ts.max().item()} past the "
                             f"last training timestep {T - 1}")
        return ts

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        """The model input of ``original_samples`` noised to training ``timesteps`` (one, or one per sample):
        sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, as diffusers' ``add_noise``."""
        ts = torch.as_tensor(timesteps).reshape(-1).long().tolist()
        return self._add_noise_at(original_samples, noise, [self._sigma_at(t) for t in ts])


class ZSNRDDIMScheduler(_TimestepIndexed):
    """``DDIMScheduler`` on :func:`zsnr_kernels.ddim_step` (same config keys).

    diffusers' DDIM already keeps alphas_cumprod[-1] = 0 with ``rescale_betas_zero_snr``; this class adds the
    library's exact first step there (an x0/v model gets y' = sqrt(abar') D + ... with no 0/0) and the fused
    kernels.  As in diffusers a step goes from timestep t to t - T // num_inference_steps (to
    ``final_alpha_cumprod`` past 0), which for ``trailing``/``linspace`` spacings that do not divide T is not the
    next timestep of the list; ``clip_sample``/``thresholding`` clip D, and the noise direction comes from the
    unclipped prediction unless ``use_clipped_model_output=True``.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ):
        _require(type(self).__name__, "timestep_spacing", timestep_spacing, schedules.SPACINGS)
        self._init_tables(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                          beta_schedule=beta_schedule, trained_betas=trained_betas,
                          rescale_betas_zero_snr=rescale_betas_zero_snr, prediction_type=prediction_type)
        self.init_noise_sigma = 1.0
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.int64)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Integer timesteps with ``timestep_spacing`` (and ``steps_offset`` for ``leading``), as diffusers."""
        ts = self._spaced_timesteps(num_inference_steps)
        self.num_inference_steps = num_inference_steps
        self.timesteps = ts.to(device)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator: torch.Generator | None = None,
             variance_noise: torch.Tensor | None = None, return_dict: bool = True):
        """One DDIM step from ``timestep`` for the model output at (``sample``, ``timestep``); ``eta`` in [0, 1]
        scales the noise (1: the DDPM posterior), drawn from ``generator`` or given as ``variance_noise``."""
        self._check_set()
        if variance_noise is not None and generator is not None and eta > 0:
            raise ValueError("pass either generator or variance_noise, not both")
        t = int(timestep)
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        sigma = self._sigma_at(t)
        if prev_t >= 0:
            sigma_next = self._sigma_at(prev_t)
        else:
            sigma_next = 0.0 if self.config.set_alpha_to_one else self._sigma_at(0)
        f, prediction, d_raw = self._model_output(model_output, sample, sigma)
        if sigma_next == sigma:  # set_alpha_to_one=False ending at t = 0
            prev, denoised = self._unchanged(sample, f, prediction, sigma)
            if d_raw is not None and not use_clipped_model_output and sigma != INF:
                # diffusers' direction from the raw prediction: y' = y + sqrt(abar) (D_clipped - D_raw)
                prev = prev + (self._pz.c_in(sigma) * (denoised.to(d_raw.dtype) - d_raw)).to(prev.dtype)
            return self._output(prev, denoised, return_dict)
        r = steps.ddim_step(sample, f, sigma, sigma_next, eta=eta,
                            noise=self._noise(sample, generator, model_output.dtype, variance_noise),
                            **self._options(prediction))
        prev = r.y
        if d_raw is not None and not use_clipped_model_output and sigma != INF:
            # diffusers takes the direction to x_t from the unclipped prediction: y' gains
            # sqrt(1 - abar' - std^2) * (eps_raw - eps_clipped) = k / sigma * (D_clipped - D_raw)
            k = math.sqrt(max(self._pz.noise_scale(sigma_next) ** 2 - (eta * _ddim_std(self._pz, sigma, sigma_next))
                              ** 2, 0.0))
            prev = prev + (k / sigma) * (r.denoised.to(d_raw.dtype) - d_raw).to(prev.dtype)
        return self._output(prev, r.denoised, return_dict)


class ZSNRDDPMScheduler(_TimestepIndexed):
    """``DDPMScheduler`` on :func:`zsnr_kernels.ddpm_step` (same config keys): the ancestral step through the
    posterior q(x_{t'} | x_t, x0 = D) with ``variance_type="fixed_small"`` (``"fixed_small_log"`` is the same
    noise), t' the next timestep of the list.  ``clip_sample``/``thresholding`` clip D before the posterior mean,
    exactly as diffusers."""

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        owner = type(self).__name__
        _require(owner, "timestep_spacing", timestep_spacing, schedules.SPACINGS)
        _require(owner, "variance_type", variance_type, ("fixed_small", "fixed_small_log"))
        self._init_tables(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                          beta_schedule=beta_schedule, trained_betas=trained_betas,
                          rescale_betas_zero_snr=rescale_betas_zero_snr, prediction_type=prediction_type)
        self.init_noise_sigma = 1.0
        self.custom_timesteps = False
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.int64)

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list[int] | None = None) -> None:
        """Spaced timesteps, or custom descending ``timesteps`` (then ``num_inference_steps`` must be None)."""
        T = self.config.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps and timesteps")
        if timesteps is not None:
            ts = torch.as_tensor(list(timesteps), dtype=torch.int64)
            if ts.ndim != 1 or ts.numel() == 0 or (ts[1:] >= ts[:-1]).any() or ts[0] >= T or ts[-1] < 0:
                raise ValueError(f"timesteps must be strictly descending integers in [0, {T - 1}], "
                                 f"got {list(timesteps)}")
            self.custom_timesteps = True
            self.num_inference_steps = ts.numel()
        else:
            ts = self._spaced_timesteps(num_inference_steps)
            self.custom_timesteps = False
            self.num_inference_steps = num_inference_steps
        self.timesteps = ts.to(device)

    def previous_timestep(self, timestep) -> int:
        """The timestep after ``timestep`` in the list (-1 after the last); t - 1 before set_timesteps."""
        if self.num_inference_steps is None:
            return int(timestep) - 1
        index = (self.timesteps.cpu() == int(timestep)).nonzero()
        if len(index) == 0:
            raise ValueError(f"timestep {int(timestep)} is not one of scheduler.timesteps")
        i = index[0].item()
        return -1 if i == self.timesteps.numel() - 1 else int(self.timesteps[i + 1])

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True):
        """One DDPM step from ``timestep`` to the next timestep of the list (to x0 after the last)."""
        t = int(timestep)
        prev_t = self.previous_timestep(t)
        sigma = self._sigma_at(t)
        sigma_next = self._sigma_at(prev_t) if prev_t >= 0 else 0.0
        f, prediction, _ = self._model_output(model_output, sample, sigma)
        r = steps.ddpm_step(sample, f, sigma, sigma_next, noise=self._noise(sample, generator, model_output.dtype),
                            **self._options(prediction))
        return self._output(r.y, r.denoised, return_dict)


# ------------------------------------------------------------------------- Euler family and DPM-Solver (indexed)


class _StepIndexed(_ZSNRScheduler):
    """Schedulers that walk ``sigmas`` with a step counter, as diffusers' Euler family and DPM-Solver do.

    After ``set_timesteps``: ``sigmas`` is the float64 sampling schedule (descending, ``num_inference_steps + 1``
    values, the first inf at zero terminal SNR, the last the final sigma), ``timesteps`` holds one training
    timestep per model evaluation and ``_evals`` says which step (and stage, for Heun) each evaluation is.
    """

    _ve_state = False  # True where diffusers keeps the variance-exploding x (Euler family)

    def _init_indexed(self) -> None:
        train = self._train_sigmas
        T = self.config.num_train_timesteps
        self.sigmas = torch.cat([train.flip(0), train.new_zeros(1)])
        self.timesteps = torch.arange(T - 1, -1, -1, dtype=torch.float32)
        self._evals = None
        self._step_index = None
        self._begin_index = None

    @property
    def init_noise_sigma(self) -> float:
        """The scale the pipeline gives the start noise: s(sigma_0) for the Euler family with ``linspace`` or
        ``trailing`` spacing (diffusers starts those at x = sigma_0 noise, model input s(sigma_0) noise), else 1."""
        if self._ve_state and self.config.timestep_spacing in ("linspace", "trailing"):
            return self._pz.noise_scale(float(self.sigmas[0]))
        return 1.0

    @property
    def step_index(self) -> int | None:
        """Index of the next model evaluation in ``timesteps`` (None before the first step)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """The first evaluation, as set by a pipeline with :meth:`set_begin_index` (img2img)."""
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

    def _refuse_integer_index(self, timestep) -> None:
        """diffusers' Euler schedulers refuse integer timesteps: they are loop indices (``enumerate(timesteps)``)
        far more often than timesteps, which are floats there."""
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError(f"Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to "
                             f"`{type(self).__name__}.step()` is not supported. Make sure to pass one of the "
                             "`scheduler.timesteps` as a timestep.")

    def _next_eval(self, timestep) -> int:
        if self._evals is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) before step()")
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

    def _set_schedule(self, timesteps: np.ndarray | torch.Tensor, sigmas: torch.Tensor, device,
                      timestep_dtype: torch.dtype, evals: list[tuple[int, int]] | None = None) -> None:
        """Install a schedule: one (step, stage) per evaluation, stage 1 at ``timesteps[step]``, stage 2 (and
        Heun's no-op, ``_NO_OP``) at ``timesteps[step + 1]``."""
        ts = torch.as_tensor(np.asarray(timesteps)).to(timestep_dtype)
        evals = evals if evals is not None else [(i, 1) for i in range(ts.numel())]
        self.sigmas = sigmas.to(torch.float64)
        self.timesteps = torch.stack([ts[i + (stage != 1)] for i, stage in evals]).to(device)
        self._evals = evals
        self.num_inference_steps = ts.numel()
        self._step_index = None
        self._begin_index = None

    def _spaced(self, num_inference_steps: int) -> tuple[np.ndarray, torch.Tensor]:
        """Float32 timesteps and float64 sigmas (no final value) of diffusers' Euler-family spacings: ``linspace``
        is fractional (sigmas interpolated linearly, as ``np.interp``), ``leading``/``trailing`` integral."""
        T = self.config.num_train_timesteps
        num_inference_steps = _steps_count(num_inference_steps, T)
        if self.config.timestep_spacing == "linspace":
            ts = np.linspace(0, T - 1, num_inference_steps, dtype=np.float32)[::-1].copy()
        else:
            ts = schedules.timesteps(num_inference_steps, T, self.config.timestep_spacing,
                                     self.config.steps_offset).numpy().astype(np.float32)
        return ts, _interp_sigmas(self._train_sigmas, ts)

    def _grid(self, sigmas: torch.Tensor, n: int, *, round_timesteps: bool = False):
        """diffusers' ``use_karras_sigmas``/``use_exponential_sigmas`` between the ends of the descending
        ``sigmas`` (or the config's ``sigma_min``/``sigma_max``), with timesteps by log-linear interpolation.  A
        zero-SNR grid keeps its first sigma inf (timestep T - 1) and continues from the largest finite training
        sigma."""
        table = schedules.DiscreteSchedule.from_alphas_cumprod(self.alphas_cumprod)
        smin = getattr(self.config, "sigma_min", None)
        smax = getattr(self.config, "sigma_max", None)
        smin = float(sigmas[-1]) if smin is None else smin
        smax = float(sigmas[0]) if smax is None else smax
        if n == 1:  # diffusers' one-point grid is its start (at zero SNR there is no finite end to span)
            grid = torch.tensor([smax], dtype=torch.float64)
        else:
            kind = schedules.karras if self.config.use_karras_sigmas else schedules.exponential
            grid = kind(n, smin, smax, sigma_max_finite=table.sigma_max_finite)[:-1]
        ts = table.sigma_to_t(grid, mode="interp").numpy()
        return (ts.round() if round_timesteps else ts), grid

    def _check_options(self) -> None:
        """Refuse the config options this class does not implement, naming a replacement."""
        owner = type(self).__name__
        flags = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
                 if getattr(self.config, k, False)]
        if len(flags) > 1:
            raise ValueError(f"{owner}: only one of {flags} can be True")
        for key, fix in (("use_beta_sigmas", "use use_karras_sigmas or use_exponential_sigmas"),
                         ("use_lu_lambdas", "use use_karras_sigmas or use_exponential_sigmas"),
                         ("use_flow_sigmas", "flow-matching schedules are not implemented here"),
                         ("use_dynamic_shifting", "flow-matching schedules are not implemented here")):
            if getattr(self.config, key, False):
                raise _refuse(owner, key, True, fix)
        _require(owner, "timestep_spacing", self.config.timestep_spacing, schedules.SPACINGS)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        """The model input of ``original_samples`` noised to the sigma of the evaluation at ``timesteps``
        (found like diffusers: ``begin_index``/``step_index`` when set, else by timestep; before set_timesteps,
        the training timesteps' sigmas): c_in(sigma) x0 + s(sigma) noise = sqrt(abar) x0 + sqrt(1 - abar) noise.
        That is the state these schedulers keep, diffusers' x0 + sigma noise times c_in(sigma): code that scales
        diffusers' result itself (EDM-style training dividing by sqrt(sigma^2 + 1)) must not scale this one."""
        ts = torch.as_tensor(timesteps).reshape(-1)
        if self._evals is None:  # no inference schedule yet (training): diffusers' is then the training one
            sigmas = _interp_sigmas(self._train_sigmas, ts.double().cpu().numpy())
            return self._add_noise_at(original_samples, noise, sigmas.tolist())
        if self._begin_index is None:
            schedule = self.timesteps.to(ts.device)
            idx = [self.index_for_timestep(t, schedule) for t in ts]
        else:
            idx = [self._step_index if self._step_index is not None else self._begin_index] * ts.numel()
        return self._add_noise_at(original_samples, noise, [self._eval_sigma(k) for k in idx])

    def _finish(self, y: torch.Tensor, sigma_out: float, k: int) -> torch.Tensor:
        """What the last step returns: y at sigma = 0 is x0; at a final sigma > 0 the Euler family returns
        diffusers' variance-exploding latent y / c_in(sigma)."""
        if self._ve_state and k == len(self._evals) - 1 and sigma_out > 0:
            return y / self._pz.c_in(sigma_out)
        return y


_EULER_FAMILY_DOC = """
    The state is the model input y, not diffusers' x = y / c_in(sigma): ``init_noise_sigma`` is s(sigma_0) or 1
    (see the module docstring) and ``scale_model_input`` is the identity, so the pipeline's model inputs equal
    diffusers' ``scale_model_input`` outputs.  With ``rescale_betas_zero_snr=True`` the schedule starts at
    sigma = inf exactly (diffusers: 4096).
"""


class ZSNREulerDiscreteScheduler(_StepIndexed):
    """``EulerDiscreteScheduler`` on :func:`zsnr_kernels.euler_step` (same config keys)."""

    _ve_state = True

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        interpolation_type: str = "linear",
        use_karras_sigmas: bool | None = False,
        use_exponential_sigmas: bool | None = False,
        use_beta_sigmas: bool | None = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        timestep_spacing: str = "linspace",
        timestep_type: str = "discrete",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        final_sigmas_type: str = "zero",
    ):
        owner = type(self).__name__
        self._check_options()
        _require(owner, "interpolation_type", interpolation_type, ("linear",))
        _require(owner, "timestep_type", timestep_type, ("discrete",))
        _require(owner, "final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        self._init_tables(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                          beta_schedule=beta_schedule, trained_betas=trained_betas,
                          rescale_betas_zero_snr=rescale_betas_zero_snr, prediction_type=prediction_type)
        self._init_indexed()

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """diffusers' Euler timesteps and sigmas for ``timestep_spacing`` (Karras/exponential on request), then
        the final sigma (0, or the smallest training sigma for ``final_sigmas_type="sigma_min"``)."""
        ts, sig = self._spaced(num_inference_steps)
        if self.config.use_karras_sigmas or self.config.use_exponential_sigmas:
            ts, sig = self._grid(sig, num_inference_steps)
        last = self._train_sigmas[:1] if self.config.final_sigmas_type == "sigma_min" else sig.new_zeros(1)
        self._set_schedule(ts, torch.cat([sig, last]), device, torch.float32)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = INF, s_noise: float = 1.0,
             generator: torch.Generator | None = None, return_dict: bool = True):
        """One Euler step for the model output at (``sample``, ``timestep``)."""
        self._refuse_integer_index(timestep)
        if s_churn:
            raise _refuse(type(self).__name__, "s_churn", s_churn,
                          "diffusers adds the churn noise after the model call; use zsnr_kernels.sample(model, "
                          "noise, sigmas, sampler='euler', s_churn=...), which churns before it (EDM)")
        k = self._next_eval(timestep)
        sigma, sigma_next = float(self.sigmas[k]), float(self.sigmas[k + 1])
        f, prediction, _ = self._model_output(model_output, sample, sigma)
        if sigma_next == sigma:
            y, d = self._unchanged(sample, f, prediction, sigma)
            return self._output(self._finish(y, sigma_next, k), d, return_dict)
        r = steps.euler_step(sample, f, sigma, sigma_next, **self._options(prediction))
        return self._output(self._finish(r.y, sigma_next, k), r.denoised, return_dict)


class ZSNREulerAncestralDiscreteScheduler(_StepIndexed):
    """``EulerAncestralDiscreteScheduler`` on :func:`zsnr_kernels.euler_ancestral_step` (eta = 1; same config
    keys): Euler to sigma_down, then sigma_up noise from ``generator`` (none at the last step).  Unlike diffusers
    it also takes ``prediction_type="sample"``."""

    _ve_state = True

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        _require(type(self).__name__, "timestep_spacing", timestep_spacing, schedules.SPACINGS)
        self._init_tables(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                          beta_schedule=beta_schedule, trained_betas=trained_betas,
                          rescale_betas_zero_snr=rescale_betas_zero_snr, prediction_type=prediction_type)
        self._init_indexed()

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """diffusers' Euler-ancestral timesteps and sigmas for ``timestep_spacing``, then a final 0."""
        ts, sig = self._spaced(num_inference_steps)
        self._set_schedule(ts, torch.cat([sig, sig.new_zeros(1)]), device, torch.float32)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True):
        """One Euler-ancestral step; the noise is ``randn_tensor(shape, generator, dtype=model_output.dtype)``."""
        self._refuse_integer_index(timestep)
        k = self._next_eval(timestep)
        sigma, sigma_next = float(self.sigmas[k]), float(self.sigmas[k + 1])
        f, prediction, _ = self._model_output(model_output, sample, sigma)
        r = steps.euler_ancestral_step(sample, f, sigma, sigma_next, eta=1.0,
                                       noise=self._noise(sample, generator, model_output.dtype),
                                       **self._options(prediction))
        return self._output(r.y, r.denoised, return_dict)


class ZSNRHeunDiscreteScheduler(_StepIndexed):
    """``HeunDiscreteScheduler`` on :func:`zsnr_kernels.heun_step` (its config keys plus
    ``rescale_betas_zero_snr``).

    As in diffusers a step takes two model evaluations, at timesteps t_i then t_{i+1} (``timesteps`` lists each
    t_{i+1} twice), and the last step (to sigma = 0) one.  The step from sigma = inf is an Euler step: the trapezoid
    over an infinite interval has no limit (docs/design.md §2.3).  Its second evaluation is kept as a no-op (the model
    is called at t_1 and ``step`` returns the sample unchanged), so that a zero-SNR schedule has diffusers' 2N - 1
    evaluations and pipelines that index ``timesteps`` by ``step * order`` (img2img, inpainting) land where
    diffusers' Heun would; that costs one model call per run.  ``sigmas`` lists each step's sigma once (diffusers
    repeats them).
    """

    _ve_state = True
    order = 2

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        self._check_options()
        self._init_tables(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                          beta_schedule=beta_schedule, trained_betas=trained_betas,
                          rescale_betas_zero_snr=rescale_betas_zero_snr, prediction_type=prediction_type)
        self._init_indexed()
        self._first, self._first_version = None, None

    @property
    def state_in_first_order(self) -> bool:
        """True when the next evaluation starts a step (diffusers' name)."""
        return self._first is None

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """diffusers' Heun timesteps (each step's end repeated for its second evaluation) and sigmas."""
        ts, sig = self._spaced(num_inference_steps)
        if self.config.use_karras_sigmas or self.config.use_exponential_sigmas:
            ts, sig = self._grid(sig, num_inference_steps)
        sigmas = torch.cat([sig, sig.new_zeros(1)])
        evals = []
        for i in range(num_inference_steps):
            evals.append((i, 1))
            if sigmas[i + 1] != 0:
                evals.append((i, 2 if sigmas[i] != INF else _NO_OP))
        self._set_schedule(ts, sigmas, device, torch.float32, evals)
        self._first, self._first_version = None, None

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """First evaluation of a step: the Euler predictor to sigma_{i+1} (the whole step from sigma = inf and to
        sigma = 0).  Second evaluation (model at the predictor): the trapezoid correction."""
        k = self._next_eval(timestep)
        i, stage = self._evals[k]
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        f, prediction, _ = self._model_output(model_output, sample, sigma if stage == 1 else sigma_next)
        if stage == _NO_OP:  # the second evaluation of the Euler step from sigma = inf (class docstring)
            return self._output(*self._unchanged(sample, f, prediction, sigma_next), return_dict)
        if stage == 1:
            r = steps.heun_step(sample, f, sigma, sigma_next, **self._options(prediction))
            self._first = None if r.complete else r
            self._first_version = None if r.complete else _version(r.y)
        else:
            if self._first is None:
                raise ValueError("this evaluation finishes a Heun step but its first evaluation was not run; "
                                 "call step() once per entry of scheduler.timesteps, in order")
            if sample is self._first.y and _version(sample) != self._first_version:
                raise ValueError(
                    "the latents were edited in place between the two evaluations of a Heun step, which loses the "
                    "predictor state that diffusers' Heun finishes from: assign new latents instead (latents = "
                    "latents * m + known * (1 - m), not latents.mul_(...)); a new tensor is taken as diffusers "
                    "takes it")
            first, replaced = self._first, sample is not self._first.y
            if replaced:  # see _heun_on_replaced_latents
                first = first._replace(y=sample)
            r = steps.heun_step(sample, f, sigma, sigma_next, first=first, **self._options(prediction))
            if replaced:
                r = r._replace(y=_heun_on_replaced_latents(r.y, self._first.y, sample, sigma, sigma_next))
            self._first = None
        return self._output(r.y, r.denoised, return_dict)


def _version(t: torch.Tensor):
    """The in-place version counter of ``t`` (None for inference-mode tensors, which keep none)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _heun_on_replaced_latents(y_new, y_pred, sample, sigma, sigma_next):
    """The Heun result diffusers gives when a pipeline hands the second evaluation other latents than the predictor
    state it returned (inpainting blends the known region in after every ``step``; ``callback_on_step_end`` may
    replace the latents).  diffusers finishes from the sample it stored at the first evaluation,
    x' = x + dt/2 (d_1 + d_2), with d_2 = (x_2' - D_2)/sigma' taken at the latents given, x_2'.  The step function
    (given x_2' as its state) forms x_2' + dt/(2 sigma') (D_1 - D_2), which is that when x_2' is the predictor
    state x_2 = x + dt d_1; the two differ by the linear term (1 - dt/(2 sigma')) (x_2 - x_2'), with
    dt = sigma' - sigma, added here in the state space (y = c_in(sigma') x at both ends).  Churn's sigma_hat is
    the sigma of the first evaluation, and the step's sigma here."""
    k = 1.0 - (sigma_next - sigma) / (2.0 * sigma_next)
    return y_new + k * (y_pred - sample)


for _cls in (ZSNREulerDiscreteScheduler, ZSNREulerAncestralDiscreteScheduler, ZSNRHeunDiscreteScheduler):
    _cls.__doc__ += _EULER_FAMILY_DOC


class ZSNRDPMSolverMultistepScheduler(_StepIndexed):
    """``DPMSolverMultistepScheduler`` for ``algorithm_type="dpmsolver++"`` (DPM++ 2M, 3M) and
    ``"sde-dpmsolver++"`` (DPM++ 2M SDE), same config keys.

    ``solver_order`` 1-3 and ``solver_type`` ``midpoint``/``heun`` select the library's ``dpmpp_2m``,
    ``dpmpp_2m_sde`` (eta = 1 for the SDE, 0 for the ODE with ``heun``) and ``dpmpp_3m_sde`` steps, with diffusers'
    order schedule (``lower_order_final``, ``euler_at_final``, first order at a final sigma of 0).  The step from
    sigma = inf is first order and the remembered prediction from it carries weight 0 (docs/design.md §2.3).
    ``thresholding`` clips D; ``variance_type`` models keep the first half of their output channels.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: str | None = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ):
        owner = type(self).__name__
        self._check_options()
        _require(owner, "algorithm_type", algorithm_type, ("dpmsolver++", "sde-dpmsolver++"))
        _require(owner, "solver_type", solver_type, ("midpoint", "heun"))
        _require(owner, "solver_order", solver_order, (1, 2, 3))
        _require(owner, "final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        _require(owner, "variance_type", variance_type, (None, "learned", "learned_range"))
        self._init_tables(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                          beta_schedule=beta_schedule, trained_betas=trained_betas,
                          rescale_betas_zero_snr=rescale_betas_zero_snr, prediction_type=prediction_type)
        self._init_indexed()
        self.timesteps = self.timesteps.to(torch.int64)
        self._history: list[tuple[float, torch.Tensor]] = []
        self.lower_order_nums = 0

    def _timesteps(self, n: int) -> np.ndarray:
        """diffusers' DPM-Solver spacings: ``linspace``/``leading`` over n + 1 points without the last,
        ``trailing`` as DDIM; timesteps whose lambda = -log sigma is below ``lambda_min_clipped`` are cut off."""
        T = self.config.num_train_timesteps
        spacing, offset = self.config.timestep_spacing, self.config.steps_offset
        lam = -self._train_sigmas.log()
        last = T - int(torch.searchsorted(lam.flip(0), torch.tensor([self.config.lambda_min_clipped],
                                                                     dtype=torch.float64)).item())
        if last == T:
            if spacing == "trailing":
                return schedules.timesteps(n, T, spacing).numpy()
            return schedules.timesteps(n + 1, T, spacing, offset).numpy()[:-1]
        if spacing == "linspace":
            ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1]
        elif spacing == "leading":
            ts = (np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1] + offset
        else:
            ts = np.arange(last, 0, -T / n).round() - 1
        return ts[ts >= 0].astype(np.int64)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """diffusers' DPM-Solver timesteps and sigmas (Karras/exponential on request), then the final sigma."""
        T = self.config.num_train_timesteps
        num_inference_steps = _steps_count(num_inference_steps, T)
        ts = self._timesteps(num_inference_steps)
        sig = _interp_sigmas(self._train_sigmas, ts)
        if self.config.use_karras_sigmas or self.config.use_exponential_sigmas:
            # unlike the Euler family, diffusers' DPM-Solver spans the whole training table here
            ts, sig = self._grid(self._train_sigmas.flip(0), num_inference_steps,
                                 round_timesteps=self.config.use_karras_sigmas
                                 and self.config.beta_schedule != "squaredcos_cap_v2")
        last = self._train_sigmas[:1] if self.config.final_sigmas_type == "sigma_min" else sig.new_zeros(1)
        self._set_schedule(ts, torch.cat([sig, last]), device, torch.int64)
        self._history = []
        self.lower_order_nums = 0

    def _order(self, k: int) -> int:
        """diffusers' order for evaluation k: warm-up from first order, first order at the end."""
        n = len(self._evals)
        cfg = self.config
        final = k == n - 1 and (cfg.euler_at_final or (cfg.lower_order_final and n < 15)
                                or cfg.final_sigmas_type == "zero")
        second = k == n - 2 and cfg.lower_order_final and n < 15
        if cfg.solver_order == 1 or self.lower_order_nums < 1 or final:
            return 1
        if cfg.solver_order == 2 or self.lower_order_nums < 2 or second:
            return 2
        return 3

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: torch.Generator | None = None, variance_noise: torch.Tensor | None = None,
             return_dict: bool = True):
        """One multistep DPM-Solver++ step; the SDE's noise is ``variance_noise`` or
        ``randn_tensor(shape, generator, dtype=float32)`` as in diffusers."""
        k = self._next_eval(timestep)
        sigma, sigma_next = float(self.sigmas[k]), float(self.sigmas[k + 1])
        if self.config.variance_type is not None and model_output.shape[1] == 2 * sample.shape[1]:
            model_output = model_output[:, : sample.shape[1]]
        f, prediction, _ = self._model_output(model_output, sample, sigma)
        order = self._order(k)
        self.lower_order_nums = min(self.lower_order_nums + 1, self.config.solver_order)
        if sigma_next == sigma:
            y, d = self._unchanged(sample, f, prediction, sigma)
            self._history = [(sigma, d)] + self._history[: self.config.solver_order - 2]
            return self._output(y, d, return_dict, with_denoised=False)
        history = self._history[: order - 1]
        sde = self.config.algorithm_type == "sde-dpmsolver++"
        opts = self._options(prediction)
        if sde:
            opts["noise"] = self._noise(sample, generator, torch.float32, variance_noise)
        if order == 3:
            r = steps.dpmpp_3m_sde_step(sample, f, sigma, sigma_next, history=history, eta=float(sde), **opts)
        elif sde or self.config.solver_type == "heun":
            r = steps.dpmpp_2m_sde_step(sample, f, sigma, sigma_next, history=history, eta=float(sde),
                                        solver_type=self.config.solver_type, **opts)
        else:
            r = steps.dpmpp_2m_step(sample, f, sigma, sigma_next, history=history, **opts)
        self._history = [(sigma, r.denoised)] + self._history[: self.config.solver_order - 2]
        return self._output(r.y, r.denoised, return_dict, with_denoised=False)


#: diffusers scheduler class name -> the class here that takes its config
SCHEDULERS = {
    "DDIMScheduler": ZSNRDDIMScheduler,
    "DDPMScheduler": ZSNRDDPMScheduler,
    "EulerDiscreteScheduler": ZSNREulerDiscreteScheduler,
    "EulerAncestralDiscreteScheduler": ZSNREulerAncestralDiscreteScheduler,
    "HeunDiscreteScheduler": ZSNRHeunDiscreteScheduler,
    "DPMSolverMultistepScheduler": ZSNRDPMSolverMultistepScheduler,
}
