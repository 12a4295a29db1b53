"""``ZSNREDMEulerScheduler``: diffusers' ``EDMEulerScheduler`` on :func:`zsnr_kernels.euler_step`."""

from __future__ import annotations

import torch

from ._base import _EDM_PREDICTIONS, INF, _EDMScheduler, _refuse, register_to_config

__all__ = ["ZSNREDMEulerScheduler"]


class ZSNREDMEulerScheduler(_EDMScheduler):
    """``EDMEulerScheduler`` on :func:`zsnr_kernels.euler_step` (its config keys plus ``sigma_max_finite``).

    ``step(pred_original_sample=)`` steps with that D instead of the model's (an x0-prediction).
    ``set_timesteps(sigmas=)`` takes diffusers' ramp in [0, 1], not noise levels.
    """

    _choices = {**_EDMScheduler._choices, "prediction_type": tuple(_EDM_PREDICTIONS)}

    @register_to_config
    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        sigma_schedule: str = "karras",
        num_train_timesteps: int = 1000,
        prediction_type: str = "epsilon",
        rho: float = 7.0,
        final_sigmas_type: str = "zero",
        sigma_max_finite: float | None = None,
    ):
        super().__init__(num_train_timesteps + 1)  # diffusers' training grid: T + 1 points

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas: torch.Tensor | list[float] | None = None) -> None:
        """The grid of ``num_inference_steps`` sigmas (or of diffusers' ramp ``sigmas``, values in [0, 1]), then the
        final sigma; timesteps c_noise."""
        ramp = None if sigmas is None else torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)
        sig = self._edm_sigmas(num_inference_steps if ramp is None else ramp.numel(), ramp)
        self._set_schedule(self.precondition_noise(sig[:-1]), sig, device)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = INF, s_noise: float = 1.0,
             generator: torch.Generator | None = None, return_dict: bool = True,
             pred_original_sample: torch.Tensor | None = None, *, guidance_scale: float = 1.0,
             guidance_rescale: float = 0.0):
        """One Euler step for the model output at (``sample``, ``timestep``).  ``guidance_scale``/
        ``guidance_rescale`` with ``model_output=(cond, uncond)``: guidance inside the step (package docstring)."""
        if s_churn:
            raise _refuse(type(self).__name__, "s_churn", s_churn,
                          "diffusers adds the churn noise after the model call; use zsnr_kernels.sample(model, "
                          "noise, sigmas, sampler='euler', s_churn=...), which churns before it (EDM)")
        if pred_original_sample is not None:
            model_output, guidance_scale, guidance_rescale = pred_original_sample, 1.0, 0.0
        k, sigma, sigma_next, f, opts = self._open(timestep, model_output, sample, guidance_scale, guidance_rescale)
        if pred_original_sample is not None:
            f, opts = pred_original_sample.to(sample.dtype), {**opts, "prediction": "x0"}
        y, d = self._euler(sample, f, sigma, sigma_next, opts)
        return self._output(self._finish(y, sigma_next, k), d, return_dict)
