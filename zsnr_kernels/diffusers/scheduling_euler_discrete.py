"""``ZSNREulerDiscreteScheduler``: diffusers' ``EulerDiscreteScheduler`` on :func:`zsnr_kernels.euler_step`."""

from __future__ import annotations

import numpy as np
import torch

from ._base import _EULER_FAMILY_DOC, INF, _refuse, _StepIndexed, _ZSNRScheduler, register_to_config

__all__ = ["ZSNREulerDiscreteScheduler"]


class ZSNREulerDiscreteScheduler(_StepIndexed):
    """``EulerDiscreteScheduler`` on :func:`zsnr_kernels.euler_step` (same config keys)."""

    _ve_state = True
    _refuses_integer_timesteps = True
    # (any timestep_type but "continuous" is "discrete" to diffusers)
    _choices = {**_ZSNRScheduler._choices, "interpolation_type": ("linear", "log_linear"),
                "final_sigmas_type": ("zero", "sigma_min")}

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
        super().__init__()
        if self._continuous:
            self.timesteps = _c_noise(self.sigmas)
        self.use_karras_sigmas = use_karras_sigmas
        self.use_exponential_sigmas = use_exponential_sigmas
        self.use_beta_sigmas = use_beta_sigmas

    @property
    def _continuous(self) -> bool:
        """Whether the model's timesteps are 0.25 log sigma (``timestep_type="continuous"`` with v-prediction, as
        diffusers: EDM's c_noise, inf at sigma = inf)."""
        return self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction"

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list[int] | None = None, sigmas: list[float] | None = None) -> None:
        """diffusers' Euler timesteps and sigmas: ``timestep_spacing`` (Karras/exponential/beta grids and
        ``interpolation_type`` on request) then the final sigma (0, or the smallest training sigma for
        ``final_sigmas_type="sigma_min"``), or custom ``timesteps`` or ``sigmas`` (ending with the final one)."""
        if timesteps is not None and self._continuous:
            raise ValueError("custom timesteps cannot be used with timestep_type='continuous' and "
                             "prediction_type='v_prediction' (the model's timesteps are 0.25 log sigma then); pass "
                             "sigmas")
        ts, sig = self._schedule(num_inference_steps, timesteps, sigmas)
        self._set_schedule(_c_noise(sig) if self._continuous else ts, sig, device)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = INF, s_noise: float = 1.0,
             generator: torch.Generator | None = None, return_dict: bool = True, *, guidance_scale: float = 1.0,
             guidance_rescale: float = 0.0):
        """One Euler step for the model output at (``sample``, ``timestep``).
        ``guidance_scale``/``guidance_rescale`` with ``model_output=(cond, uncond)``: guidance inside the step
        (package docstring)."""
        if s_churn:
            raise _refuse(type(self).__name__, "s_churn", s_churn,
                          "diffusers adds the churn noise after the model call; use zsnr_kernels.sample(model, "
                          "noise, sigmas, sampler='euler', s_churn=...), which churns before it (EDM)")
        k, sigma, sigma_next, f, opts = self._open(timestep, model_output, sample, guidance_scale, guidance_rescale)
        y, d = self._euler(sample, f, sigma, sigma_next, opts)
        return self._output(self._finish(y, sigma_next, k), d, return_dict)


def _c_noise(sigmas: torch.Tensor) -> torch.Tensor:
    """The continuous timesteps of a schedule's evaluations: 0.25 log sigma of each sigma but the final one."""
    return (0.25 * sigmas[:-1].log()).to(torch.float32)


ZSNREulerDiscreteScheduler.__doc__ += _EULER_FAMILY_DOC
