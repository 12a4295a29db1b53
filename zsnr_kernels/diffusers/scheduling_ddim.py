"""``ZSNRDDIMScheduler``: diffusers' ``DDIMScheduler`` on :func:`zsnr_kernels.ddim_step`."""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import steps
from ._base import INF, _check_level, _dtype_of, _posterior_std, _sigma_of, _TimestepIndexed, register_to_config

__all__ = ["ZSNRDDIMScheduler"]


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
        super().__init__()
        # the alphas_cumprod a step past timestep 0 goes to (diffusers' attribute, which pipelines read)
        self.final_alpha_cumprod = (torch.tensor(1.0, dtype=torch.float64) if set_alpha_to_one
                                    else self.alphas_cumprod[0])

    def _alpha_cumprod_prev(self, prev_timestep) -> float:
        """alphas_cumprod where a step to ``prev_timestep`` ends: the table's, or ``final_alpha_cumprod`` past 0."""
        return self._alpha_cumprod_at(int(prev_timestep)) if prev_timestep >= 0 else float(self.final_alpha_cumprod)

    def _get_variance(self, timestep, prev_timestep) -> torch.Tensor:
        """diffusers' DDIM variance at eta = 1 (the DDPM posterior's) from ``timestep`` to ``prev_timestep``:
        (1 - abar') / (1 - abar) (1 - abar / abar'), float64 (CycleDiffusion and LEDITS++ call it)."""
        abar = torch.tensor(self._alpha_cumprod_at(int(timestep)), dtype=torch.float64)
        abar_prev = self._alpha_cumprod_prev(prev_timestep)
        return (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Integer timesteps with ``timestep_spacing`` (and ``steps_offset`` for ``leading``), as diffusers."""
        self.timesteps = self._spaced_timesteps(num_inference_steps).to(device)
        self.num_inference_steps = self.timesteps.numel()

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator: torch.Generator | None = None,
             variance_noise: torch.Tensor | None = None, return_dict: bool = True, *, guidance_scale: float = 1.0,
             guidance_rescale: float = 0.0):
        """One DDIM step from ``timestep`` for the model output at (``sample``, ``timestep``); ``eta`` in [0, 1]
        scales the noise (1: the DDPM posterior), drawn from ``generator`` or given as ``variance_noise``.
        ``guidance_scale``/``guidance_rescale`` with ``model_output=(cond, uncond)``: guidance inside the step
        (package docstring)."""
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) before step()")
        if variance_noise is not None and generator is not None and eta > 0:
            raise ValueError("pass either generator or variance_noise, not both")
        t = int(timestep)
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        sigma = self._sigma_at(t)
        sigma_next = _sigma_of(self._alpha_cumprod_prev(prev_t))
        _check_level(sigma_next, f"timestep {prev_t}" if prev_t >= 0 else "final_alpha_cumprod")
        f, opts, d_raw = self._model_output(model_output, sample, sigma, guidance_scale, guidance_rescale)
        if sigma_next == sigma:  # set_alpha_to_one=False ending at t = 0
            prev, denoised = self._unchanged(sample, f, opts, sigma)
            if d_raw is not None and not use_clipped_model_output and sigma != INF:
                # diffusers' direction from the raw prediction: y' = y + sqrt(abar) (D_clipped - D_raw)
                prev = prev + (self._pz.c_in(sigma) * (denoised.to(d_raw.dtype) - d_raw)).to(prev.dtype)
            return self._output(prev, denoised, return_dict)
        r = steps.ddim_step(sample, f, sigma, sigma_next, eta=eta,
                            noise=self._noise(sample, generator, _dtype_of(model_output), variance_noise),
                            **opts)
        prev = r.y
        if d_raw is not None and not use_clipped_model_output and sigma != INF:
            # diffusers takes the direction to x_t from the unclipped prediction: y' gains
            # sqrt(1 - abar' - std^2) * (eps_raw - eps_clipped) = k / sigma * (D_clipped - D_raw)
            std = eta * _posterior_std(self._pz, sigma, sigma_next)
            k = math.sqrt(max(self._pz.noise_scale(sigma_next) ** 2 - std**2, 0.0))
            prev = prev + (k / sigma) * (r.denoised.to(d_raw.dtype) - d_raw).to(prev.dtype)
        return self._output(prev, r.denoised, return_dict)
