"""``ZSNRHeunDiscreteScheduler``: diffusers' ``HeunDiscreteScheduler`` on :func:`zsnr_kernels.heun_step`."""

from __future__ import annotations

import numpy as np
import torch

from .. import steps
from ._base import _EULER_FAMILY_DOC, INF, _StepIndexed, register_to_config

__all__ = ["ZSNRHeunDiscreteScheduler"]


_NO_OP = 3  # the stage of Heun's placeholder evaluation after the Euler step from sigma = inf


class ZSNRHeunDiscreteScheduler(_StepIndexed):
    """``HeunDiscreteScheduler`` on :func:`zsnr_kernels.heun_step` (its config keys plus
    ``rescale_betas_zero_snr``).

    As in diffusers a step takes two model evaluations, at timesteps t_i then t_{i+1} (``timesteps`` lists each
    t_{i+1} twice), and the last step (to sigma = 0) one.  The step from sigma = inf is an Euler step: the trapezoid
    over an infinite interval has no limit (docs/design.md §2.3).  Its second evaluation is kept as a no-op (the model
    is called at t_1 and ``step`` returns the sample unchanged), so that a zero-SNR schedule has diffusers' 2N - 1
    evaluations and pipelines that index ``timesteps`` by ``step * order`` (img2img, inpainting) land where
    diffusers' Heun would; that costs one model call per run.  ``sigmas`` lists each step's sigma once (diffusers
    repeats them).
    """

    _ve_state = True
    order = 2

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        super().__init__()
        self.set_timesteps(num_train_timesteps)  # diffusers' Heun starts on the full schedule of its spacing

    @property
    def state_in_first_order(self) -> bool:
        """True when the next evaluation starts a step (diffusers' name)."""
        return self._first is None

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      num_train_timesteps: int | None = None, timesteps: list[int] | None = None) -> None:
        """diffusers' Heun timesteps (each step's end repeated for its second evaluation) and sigmas, from
        ``timestep_spacing`` over ``num_train_timesteps`` (default: the config's) or custom ``timesteps``."""
        ts, sigmas = self._schedule(num_inference_steps, timesteps, T=num_train_timesteps)
        evals, levels = [], sigmas.tolist()
        for i in range(len(levels) - 1):
            evals.append((i, 1))
            if levels[i + 1] != 0:
                evals.append((i, 2 if levels[i] != INF else _NO_OP))
        self._set_schedule(ts, sigmas, device, evals)
        self._first, self._first_version = None, None

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, *,
             guidance_scale: float = 1.0, guidance_rescale: float = 0.0):
        """First evaluation of a step: the Euler predictor to sigma_{i+1} (the whole step from sigma = inf and to
        sigma = 0).  Second evaluation (model at the predictor): the trapezoid correction.
        ``guidance_scale``/``guidance_rescale`` with ``model_output=(cond, uncond)``: guidance inside the step
        (package docstring)."""
        k, sigma, sigma_next, f, opts = self._open(timestep, model_output, sample, guidance_scale, guidance_rescale)
        stage = self._evals[k][1]
        if stage == _NO_OP or sigma_next == sigma:  # see the class docstring; a zero-length step
            self._first = None
            return self._output(*self._unchanged(sample, f, opts, self._eval_sigma(k)), return_dict)
        if stage == 1:
            r = steps.heun_step(sample, f, sigma, sigma_next, **opts)
            self._first = None if r.complete else r
            self._first_version = None if r.complete else _version(r.y)
        else:
            if self._first is None:
                raise ValueError("this evaluation finishes a Heun step but its first evaluation was not run; "
                                 "call step() once per entry of scheduler.timesteps, in order")
            if sample is self._first.y and _version(sample) != self._first_version:
                raise ValueError(
                    "the latents were edited in place between the two evaluations of a Heun step, which loses the "
                    "predictor state that diffusers' Heun finishes from: assign new latents instead (latents = "
                    "latents * m + known * (1 - m), not latents.mul_(...)); a new tensor is taken as diffusers "
                    "takes it")
            first, replaced = self._first, sample is not self._first.y
            if replaced:  # see _heun_on_replaced_latents
                first = first._replace(y=sample)
            r = steps.heun_step(sample, f, sigma, sigma_next, first=first, **opts)
            if replaced:
                r = r._replace(y=_heun_on_replaced_latents(r.y, self._first.y, sample, sigma, sigma_next))
            self._first = None
        return self._output(r.y, r.denoised, return_dict)


def _version(t: torch.Tensor):
    """The in-place version counter of ``t`` (None for inference-mode tensors, which keep none)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _heun_on_replaced_latents(y_new, y_pred, sample, sigma, sigma_next):
    """The Heun result diffusers gives when a pipeline hands the second evaluation other latents than the predictor
    state it returned (inpainting blends the known region in after every ``step``; ``callback_on_step_end`` may
    replace the latents).  diffusers finishes from the sample it stored at the first evaluation,
    x' = x + dt/2 (d_1 + d_2), with d_2 = (x_2' - D_2)/sigma' taken at the latents given, x_2'.  The step function
    (given x_2' as its state) forms x_2' + dt/(2 sigma') (D_1 - D_2), which is that when x_2' is the predictor
    state x_2 = x + dt d_1; the two differ by the linear term (1 - dt/(2 sigma')) (x_2 - x_2'), with
    dt = sigma' - sigma, added here in the state space (y = c_in(sigma') x at both ends).  Churn's sigma_hat is
    the sigma of the first evaluation, and the step's sigma here."""
    k = 1.0 - (sigma_next - sigma) / (2.0 * sigma_next)
    return y_new + k * (y_pred - sample)


ZSNRHeunDiscreteScheduler.__doc__ += _EULER_FAMILY_DOC
