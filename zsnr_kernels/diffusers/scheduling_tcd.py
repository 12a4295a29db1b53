"""``ZSNRTCDScheduler``: diffusers' ``TCDScheduler`` (Trajectory Consistency Distillation) on
:func:`zsnr_kernels.euler_step` with the renoising folded in as EDM churn."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import steps
from ._base import register_to_config
from .scheduling_ddim import ZSNRDDIMScheduler
from .scheduling_lcm import _ConsistencyScheduler

from diffusers.utils import BaseOutput  # noqa: E402,I001 - after _base, which says when diffusers is missing

__all__ = ["ZSNRTCDScheduler", "ZSNRTCDSchedulerOutput"]


@dataclass
class ZSNRTCDSchedulerOutput(BaseOutput):
    """What :meth:`ZSNRTCDScheduler.step` returns, with the fields of diffusers' ``TCDSchedulerOutput``.

    prev_sample:        the next model input y (the state the pipeline keeps)
    pred_noised_sample: y_s, the deterministic (DDIM, eta = 0) prediction at the intermediate timestep s before
                        the renoising to the next timestep (equal to ``prev_sample`` where the step adds no noise)
    """

    prev_sample: torch.Tensor
    pred_noised_sample: torch.Tensor | None = None


class ZSNRTCDScheduler(_ConsistencyScheduler):
    """``TCDScheduler`` on :func:`zsnr_kernels.euler_step` (same config keys).

    diffusers' step from timestep t to the next one t' with ``eta`` (the paper's gamma) goes deterministically
    (DDIM, eta = 0) down to s = floor((1 - eta) t') and noises forward from s up to t':
    x' = sqrt(abar'/abar_s) x_s + sqrt(1 - abar'/abar_s) z.  In this library's terms that is an Euler step from
    sigma_t to sigma_s with EDM churn to sigma_hat_next = sigma_t' folded in (docs/design.md §2.5: the churn
    factor c_in(sigma')/c_in(sigma_s) is sqrt(abar'/abar_s), its noise c_in(sigma') sqrt(sigma'^2 - sigma_s^2) =
    sqrt(1 - abar'/abar_s)): one fused pass.  With ``eta=0``, at the last step (where diffusers' target is timestep
    0, s = 0) and where s = t', no noise is added nor drawn.

    ``pred_noised_sample`` (x_s) is ``prev_sample`` itself where no noise is added; where noise is added it takes a
    second fused pass (the Euler step to sigma_s of this step's D).  ``clip_sample`` and ``thresholding`` are
    config keys diffusers' TCD keeps and never applies: taken, and not applied here either.  With
    ``rescale_betas_zero_snr=True`` the first timestep (T - 1) is sigma = inf exactly, and the step from there
    y' = s_s y + c_in(sigma_s) D, renoised, is finite for a v- or x0-prediction model (diffusers' DDIM there too).
    """

    _clips_denoised = False  # diffusers' TCD step never clips nor thresholds
    _origin_all_timesteps = True

    # diffusers' TCD has DDIM's variance helper (and final_alpha_cumprod past timestep 0)
    _alpha_cumprod_prev = ZSNRDDIMScheduler._alpha_cumprod_prev
    _get_variance = ZSNRDDIMScheduler._get_variance

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

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.3,
             generator: torch.Generator | None = None, return_dict: bool = True, *, guidance_scale: float = 1.0,
             guidance_rescale: float = 0.0):
        """One TCD step from ``timestep`` to the next timestep of the list (to timestep 0 after the last, as
        diffusers), ``eta`` in [0, 1] the stochasticity gamma, the noise drawn from ``generator`` as diffusers
        draws it.  ``guidance_scale``/``guidance_rescale`` with ``model_output=(cond, uncond)``: guidance inside the
        fused step (package docstring)."""
        try:
            eta = float(eta)
        except (TypeError, ValueError, RuntimeError):
            eta = None
        if eta is None or not 0.0 <= eta <= 1.0:  # (diffusers asserts it)
            raise ValueError(f"{type(self).__name__}.step: eta (TCD's gamma) must be a number in [0, 1]")
        t, prev_t = self._walk(timestep)
        last = prev_t is None
        if last:
            prev_t = 0  # diffusers' target after the last timestep: timestep 0 (x at abar_0, not x0)
        # diffusers' s = floor((1 - eta) t') in float32 (a Python float times an int64 tensor)
        s = int(torch.floor((1 - eta) * torch.tensor(prev_t, dtype=torch.int64)).to(torch.long))
        sigma, sigma_s = self._sigma_at(t), self._sigma_at(s)
        f, opts, _ = self._model_output(model_output, sample, sigma, guidance_scale, guidance_rescale)
        sigma_hat = self._sigma_at(prev_t) if eta > 0 and not last else sigma_s
        if sigma_s == sigma:  # a flat table (betas of 0): the step and its renoising (to sigma' = sigma) leave y
            prev, _ = self._unchanged(sample, f, opts, sigma)
            noised = prev
        elif sigma_hat == sigma_s:  # no renoising: eta = 0, the last step, s = t'
            prev = noised = steps.euler_step(sample, f, sigma, sigma_s, return_denoised=False, **opts).y
        else:
            noise = self._noise(sample, generator, self._draw_dtype(sample, model_output))
            r = steps.euler_step(sample, f, sigma, sigma_s, sigma_hat_next=sigma_hat, noise=noise, **opts)
            prev = r.y
            noised = steps.euler_step(sample, r.denoised, sigma, sigma_s, prediction="x0",
                                      sigma_data=opts["sigma_data"], backend=self.backend, return_denoised=False).y
        self._step_index += 1
        if not return_dict:
            return prev, noised
        return ZSNRTCDSchedulerOutput(prev_sample=prev, pred_noised_sample=noised)
