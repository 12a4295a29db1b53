"""What the :mod:`zsnr_kernels.diffusers` schedulers share: the output class, the config checks and table helpers,
the base scheduler (float64 training tables, the parameterization, model-input semantics) and the two ways of
walking a schedule -- by timestep (DDIM, DDPM) and by step counter (Euler family, DPM-Solver).

Private to the package: the scheduler modules import from here, users import from :mod:`zsnr_kernels.diffusers`.
"""

from __future__ import annotations

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

from .. import schedules
from ..parameterization import parameterization

INF = math.inf

#: diffusers' prediction_type -> this library's prediction
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


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
    (see the package docstring) and ``scale_model_input`` is the identity, so the pipeline's model inputs equal
    diffusers' ``scale_model_input`` outputs.  With ``rescale_betas_zero_snr=True`` the schedule starts at
    sigma = inf exactly (diffusers: 4096).
"""
