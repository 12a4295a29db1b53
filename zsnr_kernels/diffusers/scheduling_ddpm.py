"""``ZSNRDDPMScheduler``: diffusers' ``DDPMScheduler`` on :func:`zsnr_kernels.ddpm_step`."""

from __future__ import annotations

import numpy as np
import torch

from .. import steps
from ._base import _dtype_of, _posterior_std, _refuse, _TimestepIndexed, register_to_config

__all__ = ["ZSNRDDPMScheduler"]

_LEARNED = ("learned", "learned_range")  # variance types read from the second half of the model output's channels


class ZSNRDDPMScheduler(_TimestepIndexed):
    """``DDPMScheduler`` on :func:`zsnr_kernels.ddpm_step` (same config keys): the ancestral step through the
    posterior q(x_{t'} | x_t, x0 = D), t' the next timestep of the list.  ``clip_sample``/``thresholding`` clip D
    before the posterior mean, exactly as diffusers.

    The noise is the posterior's (``variance_type="fixed_small"``; ``"fixed_small_log"`` is the same noise) within
    the fused step.  The other variance types scale the unit noise the step adds to diffusers' std: ``fixed_large``
    sqrt(beta_t), ``learned``/``learned_range`` from the model's predicted (log-)variance (the second half of its
    output channels), and like diffusers they add noise at the last step too, from any timestep but 0.
    """

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
        super().__init__()
        self.one = torch.tensor(1.0, dtype=torch.float64)  # diffusers' alphas_cumprod past timestep 0
        self.custom_timesteps = False
        self.variance_type = variance_type

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list[int] | None = None) -> None:
        """Spaced timesteps, or custom descending ``timesteps`` (then ``num_inference_steps`` must be None; as in
        diffusers, ``num_inference_steps`` then keeps its value)."""
        T = self.config.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps and timesteps")
        if timesteps is not None:
            ts = torch.as_tensor(list(timesteps), dtype=torch.int64)
            if ts.ndim != 1 or ts.numel() == 0 or (ts[1:] >= ts[:-1]).any() or ts[0] >= T or ts[-1] < 0:
                raise ValueError(f"timesteps must be strictly descending integers in [0, {T - 1}], "
                                 f"got {list(timesteps)}")
            self.custom_timesteps = True
        else:
            ts = self._spaced_timesteps(num_inference_steps)
            self.custom_timesteps = False
            self.num_inference_steps = ts.numel()
        self.timesteps = ts.to(device)

    def previous_timestep(self, timestep):
        """The timestep after ``timestep`` in the list (``tensor(-1)`` after the last, an element of ``timesteps``
        otherwise); ``timestep - 1`` before set_timesteps.  diffusers' types."""
        if not (self.custom_timesteps or self.num_inference_steps):
            return timestep - 1
        index = (self.timesteps == timestep).nonzero(as_tuple=True)[0]
        if len(index) == 0:
            raise ValueError(f"timestep {timestep} is not one of scheduler.timesteps; pass one of them")
        i = index[0].item()
        return torch.tensor(-1) if i == self.timesteps.numel() - 1 else self.timesteps[i + 1]

    def _get_variance(self, t, predicted_variance: torch.Tensor | None = None,
                      variance_type: str | None = None) -> torch.Tensor:
        """diffusers' DDPM variance at timestep ``t`` for ``variance_type`` (default: the config's), float64
        tables: the posterior's (clamped to 1e-20), its square root (``fixed_small_log``), beta_t
        (``fixed_large``), log beta_t (``fixed_large_log``), the model's (``learned``) or its log-variance
        interpolated between the two (``learned_range``, ``predicted_variance`` in [-1, 1])."""
        prev_t = self.previous_timestep(t)
        abar = self.alphas_cumprod[int(t)]
        abar_prev = self.alphas_cumprod[int(prev_t)] if prev_t >= 0 else self.one
        beta = 1 - abar / abar_prev
        variance = ((1 - abar_prev) / (1 - abar) * beta).clamp(min=1e-20)
        kind = variance_type or self.config.variance_type
        if kind == "fixed_small_log":
            return variance.sqrt()
        if kind == "fixed_large":
            return beta
        if kind == "fixed_large_log":
            return beta.log()
        if kind == "learned":
            return predicted_variance
        if kind == "learned_range":
            frac = (predicted_variance + 1) / 2
            return frac * beta.log() + (1 - frac) * variance.log()
        return variance

    def _noise_std(self, t, predicted_variance):
        """The std of the noise a step from ``t`` adds where it is not the posterior's (None then)."""
        kind = self.config.variance_type
        if kind not in ("fixed_large", "fixed_large_log", *_LEARNED):  # diffusers: any other value (None from a
            return None                                                 # DPM-Solver config) is fixed_small
        if kind == "fixed_large_log":
            raise _refuse(type(self).__name__, "variance_type", kind,
                          "diffusers' step takes the square root of log(beta_t) < 0 there (NaN noise): it is a "
                          "log-variance for models that predict one, not a noise std; use 'fixed_large'")
        if kind in _LEARNED and predicted_variance is None:
            raise ValueError(f"variance_type={kind!r} reads the model's variance from the second half of its output "
                             "channels: the model output needs twice the sample's channels")
        var = self._get_variance(t, predicted_variance)
        return (0.5 * var).exp() if kind == "learned_range" else var.sqrt()

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True, *, guidance_scale: float = 1.0,
             guidance_rescale: float = 0.0):
        """One DDPM step from ``timestep`` to the next timestep of the list (to x0 after the last).
        ``guidance_scale``/``guidance_rescale`` with ``model_output=(cond, uncond)``: guidance inside the step
        (package docstring)."""
        predicted_variance = None
        if self.config.variance_type in _LEARNED:  # the variance of a guided pair: the conditional one's
            model_output, predicted_variance = _split_variance(model_output, sample)
        t = int(timestep)
        prev_t = int(self.previous_timestep(t))
        sigma = self._sigma_at(t)
        sigma_next = self._sigma_at(prev_t) if prev_t >= 0 else 0.0
        f, opts, _ = self._model_output(model_output, sample, sigma, guidance_scale, guidance_rescale)
        if sigma_next == sigma:  # beta_t = 0 (a flat table): diffusers' posterior is the identity too
            return self._output(*self._unchanged(sample, f, opts, sigma), return_dict)
        noise = self._noise(sample, generator, _dtype_of(model_output))
        std = self._noise_std(t, predicted_variance) if t > 0 else None
        if std is None:
            r = steps.ddpm_step(sample, f, sigma, sigma_next, noise=noise, **opts)
            return self._output(r.y, r.denoised, return_dict)
        z, std = noise(), std.to(sample.dtype)
        e = _posterior_std(self._pz, sigma, sigma_next)
        if e > 0:  # the fused step adds e * noise: hand it the unit noise scaled to diffusers' std
            r = steps.ddpm_step(sample, f, sigma, sigma_next, noise=z * (std / e), **opts)
            return self._output(r.y, r.denoised, return_dict)
        r = steps.ddpm_step(sample, f, sigma, sigma_next, **opts)  # to x0: adds no noise
        return self._output(r.y + std * z, r.denoised, return_dict)


def _split_variance(model_output, sample: torch.Tensor):
    """(model output, predicted variance or None) of a learned-variance model, whose output stacks both along the
    channels; for a guided pair (cond, uncond), the pair of outputs and the conditional variance (as diffusers'
    guided pipelines keep it)."""
    if isinstance(model_output, (tuple, list)):
        (fc, var), (fu, _) = (_split_variance(m, sample) for m in model_output)
        return ((fc, fu) if var is not None else tuple(model_output)), var
    if model_output.shape[1] == 2 * sample.shape[1]:
        return torch.split(model_output, sample.shape[1], dim=1)
    return model_output, None
