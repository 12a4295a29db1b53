"""``ZSNREulerDiscreteScheduler``: diffusers' ``EulerDiscreteScheduler`` on :func:`zsnr_kernels.euler_step`."""

from __future__ import annotations

import numpy as np
import torch

from .. import steps
from ._base import _EULER_FAMILY_DOC, INF, _refuse, _require, _StepIndexed, register_to_config

__all__ = ["ZSNREulerDiscreteScheduler"]


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


ZSNREulerDiscreteScheduler.__doc__ += _EULER_FAMILY_DOC
