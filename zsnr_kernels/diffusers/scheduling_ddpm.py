"""``ZSNRDDPMScheduler``: diffusers' ``DDPMScheduler`` on :func:`zsnr_kernels.ddpm_step`."""

from __future__ import annotations

import numpy as np
import torch

from .. import schedules, steps
from ._base import _require, _TimestepIndexed, register_to_config

__all__ = ["ZSNRDDPMScheduler"]


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
