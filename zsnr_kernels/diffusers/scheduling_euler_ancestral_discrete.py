"""``ZSNREulerAncestralDiscreteScheduler``: diffusers' ``EulerAncestralDiscreteScheduler`` on
:func:`zsnr_kernels.euler_ancestral_step`.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import steps
from ._base import _EULER_FAMILY_DOC, _dtype_of, _StepIndexed, register_to_config

__all__ = ["ZSNREulerAncestralDiscreteScheduler"]


class ZSNREulerAncestralDiscreteScheduler(_StepIndexed):
    """``EulerAncestralDiscreteScheduler`` on :func:`zsnr_kernels.euler_ancestral_step` (eta = 1; same config
    keys): Euler to sigma_down, then sigma_up noise from ``generator`` (none at the last step).  Unlike diffusers
    it also takes ``prediction_type="sample"``."""

    _ve_state = True
    _refuses_integer_timesteps = True

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
        super().__init__()

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """diffusers' Euler-ancestral timesteps and sigmas for ``timestep_spacing``, then a final 0."""
        self._set_schedule(*self._schedule(num_inference_steps), device)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True, *, guidance_scale: float = 1.0,
             guidance_rescale: float = 0.0):
        """One Euler-ancestral step; the noise is ``randn_tensor(shape, generator, dtype=model_output.dtype)``.
        ``guidance_scale``/``guidance_rescale`` with ``model_output=(cond, uncond)``: guidance inside the step
        (package docstring)."""
        _, sigma, sigma_next, f, opts = self._open(timestep, model_output, sample, guidance_scale, guidance_rescale)
        if sigma_next == sigma:
            return self._output(*self._unchanged(sample, f, opts, sigma), return_dict)
        r = steps.euler_ancestral_step(sample, f, sigma, sigma_next, eta=1.0,
                                       noise=self._noise(sample, generator, _dtype_of(model_output)),
                                       **opts)
        return self._output(r.y, r.denoised, return_dict)


ZSNREulerAncestralDiscreteScheduler.__doc__ += _EULER_FAMILY_DOC
