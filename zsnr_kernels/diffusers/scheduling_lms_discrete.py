"""``ZSNRLMSDiscreteScheduler``: diffusers' ``LMSDiscreteScheduler`` on :func:`zsnr_kernels.lms_step`."""

from __future__ import annotations

import numpy as np
import torch

from .. import steps
from ._base import _EULER_FAMILY_DOC, _StepIndexed, register_to_config

__all__ = ["ZSNRLMSDiscreteScheduler"]


class ZSNRLMSDiscreteScheduler(_StepIndexed):
    """``LMSDiscreteScheduler`` on :func:`zsnr_kernels.lms_step` (its config keys plus ``rescale_betas_zero_snr``).

    Linear multistep of ``step(order=4)`` on the remembered derivatives, with coefficients integrated exactly on
    the host (diffusers: ``scipy.integrate.quad`` to 1e-4).  The order grows with the derivatives remembered in this
    run (diffusers counts the step index instead, so an img2img run started mid-schedule weighs one derivative with
    a fourth-order coefficient there).  A derivative remembered at sigma = inf carries weight 0 (the limit of the
    Lagrange interpolant, docs/design.md §2.3), so the step from inf is Euler.  A zero-length step leaves the
    sample and the history as they are (diffusers would divide by the repeated sigma at the next step).
    """

    _ve_state = True

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
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
        self.use_karras_sigmas = use_karras_sigmas
        self._history: list[tuple[float, torch.Tensor]] = []

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """diffusers' LMS timesteps and sigmas for ``timestep_spacing`` (Karras/exponential/beta grids on request),
        then a final 0."""
        self._set_schedule(*self._schedule(num_inference_steps), device)
        self._history = []

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, order: int = 4,
             return_dict: bool = True, *, guidance_scale: float = 1.0, guidance_rescale: float = 0.0):
        """One LMS step of up to ``order`` (1-4) for the model output at (``sample``, ``timestep``).
        ``guidance_scale``/``guidance_rescale`` with ``model_output=(cond, uncond)``: guidance inside the step
        (package docstring)."""
        _, sigma, sigma_next, f, opts = self._open(timestep, model_output, sample, guidance_scale, guidance_rescale)
        if sigma_next == sigma:
            return self._output(*self._unchanged(sample, f, opts, sigma), return_dict)
        r = steps.lms_step(sample, f, sigma, sigma_next, history=self._history[: order - 1], order=order, **opts)
        self._history = [(sigma, r.derivative)] + self._history[:2]
        return self._output(r.y, r.denoised, return_dict)


ZSNRLMSDiscreteScheduler.__doc__ += _EULER_FAMILY_DOC
