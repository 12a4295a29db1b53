"""``ZSNRKDPM2AncestralDiscreteScheduler``: diffusers' ``KDPM2AncestralDiscreteScheduler`` on
:func:`zsnr_kernels.dpm_2_ancestral_step`."""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import steps
from ._base import _EULER_FAMILY_DOC, _dtype_of, register_to_config
from .scheduling_k_dpm_2_discrete import _KDPM2

__all__ = ["ZSNRKDPM2AncestralDiscreteScheduler"]


class ZSNRKDPM2AncestralDiscreteScheduler(_KDPM2):
    """``KDPM2AncestralDiscreteScheduler`` on :func:`zsnr_kernels.dpm_2_ancestral_step` (eta = 1; its config keys
    plus ``rescale_betas_zero_snr``): DPM-Solver-2 to sigma_down, then sigma_up noise from ``generator`` after the
    second evaluation (none at the last step, which is Euler to 0).  Unlike diffusers it also takes
    ``prediction_type="sample"``.
    """

    _step_function = staticmethod(steps.dpm_2_ancestral_step)

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        super().__init__()

    @staticmethod
    def _midpoint(sigma: float, sigma_next: float) -> float:
        """sqrt(sigma sigma_down), sigma_down = sqrt(sigma'^2 - sigma_up^2) and sigma_up = sigma' sqrt(1 -
        (sigma'/sigma)^2) (k-diffusion's ancestral step at eta = 1; sigma_mid is sigma' up to rounding)."""
        up = sigma_next * math.sqrt(1.0 - (sigma_next / sigma) ** 2)
        return math.sqrt(sigma * math.sqrt(max(sigma_next * sigma_next - up * up, 0.0)))

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True, *, guidance_scale: float = 1.0,
             guidance_rescale: float = 0.0):
        """One evaluation of a DPM-Solver-2 ancestral step (see :meth:`ZSNRKDPM2DiscreteScheduler.step`); the noise
        is ``randn_tensor(shape, generator, dtype=model_output.dtype)``, as in diffusers.
        ``guidance_scale``/``guidance_rescale`` with ``model_output=(cond, uncond)``: guidance inside the step
        (package docstring)."""
        return self._two_stage(model_output, timestep, sample, return_dict, guidance_scale, guidance_rescale,
                               eta=1.0, noise=self._noise(sample, generator, _dtype_of(model_output)))


ZSNRKDPM2AncestralDiscreteScheduler.__doc__ += "\n    " + _KDPM2.__doc__ + "\n" + _EULER_FAMILY_DOC
