"""``ZSNRLCMScheduler``: diffusers' ``LCMScheduler`` on :func:`zsnr_kernels.lcm_step`, and the walk over a
consistency model's timesteps it shares with ``ZSNRTCDScheduler`` (:mod:`.scheduling_tcd`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import steps
from ._base import (_PREDICTIONS, _dtype_of, _dynamic_threshold, _guided, _StepCounter, _steps_count,
                    _TimestepIndexed, register_to_config)
from .scheduling_ddpm import ZSNRDDPMScheduler

from diffusers.utils import BaseOutput  # noqa: E402,I001 - after _base, which says when diffusers is missing

__all__ = ["ZSNRLCMScheduler", "ZSNRLCMSchedulerOutput"]


@dataclass
class ZSNRLCMSchedulerOutput(BaseOutput):
    """What :meth:`ZSNRLCMScheduler.step` returns, with the fields of diffusers' ``LCMSchedulerOutput``.

    prev_sample: the next model input y (the state the pipeline keeps); after the last step, ``denoised``
    denoised:    the consistency model's output D' = c_skip y + c_out D of this evaluation, which
                 ``LatentConsistencyModelPipeline`` decodes
    """

    prev_sample: torch.Tensor
    denoised: torch.Tensor | None = None


class _ConsistencyScheduler(_StepCounter, _TimestepIndexed):
    """diffusers' ``LCMScheduler`` and ``TCDScheduler`` walk: integer timesteps taken from a consistency model's
    distillation schedule (``original_inference_steps`` points T // n apart, ``strength`` for img2img) or given
    (``timesteps=``), read by a step counter as diffusers' (``step_index``, ``set_begin_index``); the noise levels
    come from the timesteps through ``alphas_cumprod``, as in DDIM.  ``timestep_spacing``, ``steps_offset`` and
    ``set_alpha_to_one`` are config keys diffusers keeps and never reads here either (``final_alpha_cumprod`` is
    kept for code that reads it)."""

    # timestep_spacing is not checked: LCM's and TCD's set_timesteps never read it (diffusers takes any value)
    _choices = {"prediction_type": tuple(_PREDICTIONS)}
    #: TCD: set_timesteps(original_inference_steps=n) spaces all training timesteps, not n of them (diffusers')
    _origin_all_timesteps = False

    def __init__(self) -> None:
        super().__init__()
        self.final_alpha_cumprod = (torch.tensor(1.0, dtype=torch.float64) if self.config.set_alpha_to_one
                                    else self.alphas_cumprod[0])
        self.custom_timesteps = False
        self._step_index = None
        self._begin_index = None

    # diffusers' LCM/TCD: the timestep after ``timestep`` in the list (tensor(-1) after the last), t - 1 before
    # set_timesteps; the same as DDPM's
    previous_timestep = ZSNRDDPMScheduler.previous_timestep

    def _init_step_index(self, timestep) -> None:
        if self._begin_index is None:
            if isinstance(timestep, torch.Tensor):
                timestep = timestep.to(self.timesteps.device)
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def _threshold_sample(self, sample: torch.Tensor) -> torch.Tensor:
        """diffusers' dynamic thresholding of a predicted x0 (the config's ratio and ``sample_max_value``)."""
        return _dynamic_threshold(sample, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      original_inference_steps: int | None = None, timesteps: list[int] | None = None,
                      strength: float = 1.0) -> None:
        """diffusers' schedule: ``num_inference_steps`` timesteps evenly spaced by index in the distillation
        schedule of ``original_inference_steps`` (default: the config's) points, k - 1, 2k - 1, ... (k = T // n;
        TCD given ``original_inference_steps`` takes every training timestep), cut to its first ``strength`` part;
        or custom descending ``timesteps`` (then ``num_inference_steps`` must be None), of which the last ``strength``
        part is kept.  The same checks as diffusers, as ValueErrors."""
        cfg, owner = self.config, type(self).__name__
        T = cfg.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError(f"{owner}.set_timesteps: pass exactly one of num_inference_steps and timesteps")
        original = original_inference_steps if original_inference_steps is not None else cfg.original_inference_steps
        if self._origin_all_timesteps and original_inference_steps is not None:
            origin = np.arange(0, int(T * strength), dtype=np.int64)
        else:
            if not 1 <= original <= T:
                raise ValueError(f"{owner}: original_inference_steps={original} must be in [1, num_train_timesteps="
                                 f"{T}] (the distillation schedule is a subset of the training timesteps)")
            origin = np.arange(1, int(original * strength) + 1, dtype=np.int64) * (T // original) - 1
        if timesteps is not None:
            ts = np.asarray(torch.as_tensor(timesteps).cpu(), dtype=np.int64).reshape(-1)
            if ts.size == 0 or (ts[1:] >= ts[:-1]).any() or ts[0] >= T or ts[-1] < 0:
                raise ValueError(f"{owner}: custom timesteps must be strictly descending integers in [0, {T - 1}], "
                                 f"got {ts.tolist()}")
            n = ts.size
            self.num_inference_steps = n
            self.custom_timesteps = True
            ts = ts[max(n - min(int(n * strength), n), 0):]
        else:
            n = _steps_count(num_inference_steps, T)
            if len(origin) // n < 1:
                raise ValueError(f"{owner}: the distillation schedule (original_inference_steps x strength = "
                                 f"{original} x {strength}) has fewer than num_inference_steps={n} timesteps: take "
                                 f"fewer steps, or a larger strength or original_inference_steps")
            if n > original:
                raise ValueError(f"{owner}: num_inference_steps={n} cannot be larger than original_inference_steps="
                                 f"{original}: the schedule is a subset of the distillation schedule")
            self.num_inference_steps = n
            self.custom_timesteps = False
            origin = origin[::-1]
            ts = origin[np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)]
        self.timesteps = torch.from_numpy(ts.copy()).to(device=device, dtype=torch.long)
        self._step_index = None
        self._begin_index = None

    def _walk(self, timestep) -> tuple[int, int | None]:
        """(t, the next timestep of the list, or None at the last step) of this step, found as diffusers finds it:
        the step counter (started from ``timestep`` or ``begin_index``), not ``timestep`` alone."""
        owner = type(self).__name__
        if self.num_inference_steps is None:
            raise ValueError(f"{owner}: call set_timesteps(num_inference_steps) before step()")
        if self._step_index is None:
            self._init_step_index(timestep)
        k = self._step_index
        if k >= len(self.timesteps):
            raise ValueError(f"step() was called {k + 1} times but the schedule has {len(self.timesteps)} steps; "
                             "call set_timesteps again to start a new run")
        return int(timestep), (int(self.timesteps[k + 1]) if k + 1 < len(self.timesteps) else None)

    @staticmethod
    def _draw_dtype(sample: torch.Tensor, model_output) -> torch.dtype:
        """The dtype diffusers draws the step's noise in: its result's, the promotion of sample and model output."""
        return torch.promote_types(sample.dtype, _dtype_of(model_output))


class ZSNRLCMScheduler(_ConsistencyScheduler):
    """``LCMScheduler`` (latent consistency models) on :func:`zsnr_kernels.lcm_step` (same config keys).

    A step forms the consistency model's output D' = c_skip(t) y + c_out(t) D (diffusers' boundary condition:
    c_skip, c_out of the discrete timestep times ``timestep_scaling``, sigma_data 0.5; D the model's denoised
    prediction, clipped or thresholded per the config) in one elementwise pass, then the fused
    :func:`~zsnr_kernels.lcm_step` on D' as an x0-prediction: y' = c_in(sigma') D' + s(sigma') z =
    sqrt(abar') D' + sqrt(1 - abar') z, diffusers' prev_sample; after the last step D' itself.  ``step`` returns
    both (``prev_sample``, ``denoised``), as diffusers' does.

    With ``rescale_betas_zero_snr=True`` the first timestep (T - 1) is sigma = inf exactly (diffusers keeps
    alphas_cumprod[-1] = 0 there too): D' = c_skip y + c_out D is finite for a v- or x0-prediction model.
    """

    sigma_data = 0.5  # of the boundary condition (diffusers sets it when it computes the scalings)

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: np.ndarray | list[float] | None = None,
        original_inference_steps: int = 50,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        timestep_scaling: float = 10.0,
        rescale_betas_zero_snr: bool = False,
    ):
        super().__init__()

    def get_scalings_for_boundary_condition_discrete(self, timestep):
        """(c_skip, c_out) of the consistency boundary condition at ``timestep`` (diffusers' formula and types):
        with s = timestep * timestep_scaling, c_skip = 0.25 / (s^2 + 0.25), c_out = s / sqrt(s^2 + 0.25)."""
        scaled = timestep * self.config.timestep_scaling
        c_skip = self.sigma_data**2 / (scaled**2 + self.sigma_data**2)
        c_out = scaled / (scaled**2 + self.sigma_data**2) ** 0.5
        return c_skip, c_out

    def _boundary(self, model_output, sample: torch.Tensor, sigma: float, t: int, guidance_scale,
                  guidance_rescale) -> torch.Tensor:
        """D' = c_skip y + c_out D, with D = p y + q F (F guided eagerly for a pair), or the clipped D."""
        c_skip, c_out = self.get_scalings_for_boundary_condition_discrete(float(t))
        f, opts, d_raw = self._model_output(model_output, sample, sigma, guidance_scale, guidance_rescale)
        if d_raw is not None:  # clip_sample/thresholding: f is the clipped D
            return f * c_out + sample * c_skip
        if isinstance(f, tuple):
            f = _guided(f, opts["guidance_scale"], opts["guidance_rescale"])
        p, q = self._pz.denoise_coeffs(sigma)
        return f * (c_out * q) + sample * (c_skip + c_out * p)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True, *, guidance_scale: float = 1.0,
             guidance_rescale: float = 0.0):
        """One LCM step from ``timestep`` to the next timestep of the list (to D' after the last), its noise drawn
        from ``generator`` as diffusers draws it.  ``guidance_scale``/``guidance_rescale`` with
        ``model_output=(cond, uncond)``: guidance in the step (eager here: D' is formed before the fused pass)."""
        t, prev_t = self._walk(timestep)
        sigma = self._sigma_at(t)
        denoised = self._boundary(model_output, sample, sigma, t, guidance_scale, guidance_rescale)
        if prev_t is None:  # the last step: D' (diffusers returns the same tensor twice)
            prev = denoised
        else:
            sigma_next = self._sigma_at(prev_t)
            noise = self._noise(sample, generator, self._draw_dtype(sample, model_output))
            if sigma_next < sigma:
                prev = steps.lcm_step(sample, denoised, sigma, sigma_next, noise=noise, prediction="x0",
                                      sigma_data=self._pz.sigma_data, backend=self.backend,
                                      return_denoised=False).y
            else:  # a flat table (betas of 0) repeats the noise level: no fused step goes nowhere; diffusers' update
                pz = self._pz
                prev = denoised * pz.c_in(sigma_next) + noise() * pz.noise_scale(sigma_next)
        self._step_index += 1
        if not return_dict:
            return prev, denoised
        return ZSNRLCMSchedulerOutput(prev_sample=prev, denoised=denoised)

