"""``ZSNRKDPM2DiscreteScheduler``: diffusers' ``KDPM2DiscreteScheduler`` on :func:`zsnr_kernels.dpm_2_step`, and
the two-evaluation walk it shares with the ancestral variant."""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import steps
from ._base import _EULER_FAMILY_DOC, INF, _StepIndexed, register_to_config
from .scheduling_heun_discrete import _NO_OP, _version

__all__ = ["ZSNRKDPM2DiscreteScheduler"]


class _KDPM2(_StepIndexed):
    """DPM-Solver-2 as diffusers walks it: two model evaluations a step, at t_i (the predictor to sigma_mid) and at
    the timestep of sigma_mid (the correction; ``timesteps`` lists it between t_i and t_{i+1}), one for the last
    step (Euler to sigma = 0).  The step from sigma = inf is first order (Euler, Euler ancestral: DPM-Solver-2 has no
    limit there, docs/design.md §2.3); its second evaluation is kept as a no-op at t_1, as Heun's (see
    :class:`ZSNRHeunDiscreteScheduler`), so pipelines that index ``timesteps`` by ``step * order`` land where
    diffusers' would.  Latents a pipeline replaces between the two evaluations (inpainting) are taken as diffusers
    takes them: it finishes from the sample stored at the first evaluation."""

    _ve_state = True
    order = 2
    _step_function = staticmethod(steps.dpm_2_step)

    def __init__(self) -> None:
        super().__init__()
        self.set_timesteps(self.config.num_train_timesteps)  # diffusers starts on the full schedule of its spacing

    @staticmethod
    def _midpoint(sigma: float, sigma_next: float) -> float:
        """Where the second evaluation of a step is: sqrt(sigma sigma_next)."""
        return math.sqrt(sigma * sigma_next)

    def _grid_timesteps(self, ts: np.ndarray) -> np.ndarray:
        """Rounded for Karras grids, as diffusers' KDPM2."""
        return ts.round() if self._grid_kind() == "karras" else ts

    @property
    def state_in_first_order(self) -> bool:
        """True when the next evaluation starts a step (diffusers' name)."""
        return self._first is None

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None,
                      num_train_timesteps: int | None = None) -> None:
        """diffusers' timesteps for ``timestep_spacing`` over ``num_train_timesteps`` (default: the config's;
        Karras/exponential/beta grids on request), each step's midpoint timestep (log-linear interpolation of its
        sigma in the training table) after it, and the step sigmas then a final 0 (``sigmas`` lists each once;
        diffusers repeats them)."""
        ts, sigmas = self._schedule(num_inference_steps, T=num_train_timesteps)
        levels = sigmas.tolist()
        self._mids = [self._midpoint(s, s_next) if s != INF and s_next != 0 else math.nan
                      for s, s_next in zip(levels, levels[1:])]
        needed = [m for m in self._mids if not math.isnan(m)]  # (none on a one-entry table, which has no t(sigma))
        mid_t = iter(self._table().sigma_to_t(torch.tensor(needed, dtype=torch.float64), mode="interp").tolist()
                     if needed else ())
        evals, times = [], []
        for i in range(len(levels) - 1):
            evals.append((i, 1))
            times.append(float(ts[i]))
            if levels[i + 1] != 0:
                second = _NO_OP if levels[i] == INF else 2
                evals.append((i, second))
                times.append(float(ts[i + 1]) if second == _NO_OP else next(mid_t))
        self._set_schedule(ts, sigmas, device, evals)
        self.timesteps = torch.tensor(times, dtype=torch.float64).to(self._timestep_dtype).to(device)
        self._first, self._first_version = None, None

    def _eval_sigma(self, k: int) -> float:
        i, stage = self._evals[k]
        return self._mids[i] if stage == 2 else float(self.sigmas[i + (stage != 1)])

    def _two_stage(self, model_output, timestep, sample: torch.Tensor, return_dict: bool, guidance_scale,
                   guidance_rescale, **kw):
        k, sigma, sigma_next, f, opts = self._open(timestep, model_output, sample, guidance_scale, guidance_rescale)
        i, stage = self._evals[k]
        if stage == _NO_OP or sigma_next == sigma:  # see the class docstring; a zero-length step
            self._first = None
            return self._output(*self._unchanged(sample, f, opts, self._eval_sigma(k)), return_dict)
        if stage == 1:
            r = self._step_function(sample, f, sigma, sigma_next, **kw, **opts)
            self._first = None if r.complete else r
            self._first_version = None if r.complete else _version(r.y)
            return self._output(r.y, r.denoised, return_dict)
        if self._first is None:
            raise ValueError("this evaluation finishes a DPM-Solver-2 step but its first evaluation was not run; "
                             "call step() once per entry of scheduler.timesteps, in order")
        predictor = self._first.y
        if sample is predictor and _version(sample) != self._first_version:
            raise ValueError(
                "the latents were edited in place between the two evaluations of a DPM-Solver-2 step, which loses "
                "the predictor state that diffusers finishes from: assign new latents instead (latents = latents * "
                "m + known * (1 - m), not latents.mul_(...)); a new tensor is taken as diffusers takes it")
        replaced = sample is not predictor
        first = self._first._replace(y=sample) if replaced else self._first
        self._first = None
        r = self._step_function(sample, f, sigma, sigma_next, first=first, **kw, **opts)
        if replaced:
            # diffusers finishes from the sample x it stored: x' = x + dt (x_2' - D_2)/sigma_mid at the latents x_2'
            # given.  The step function writes x as (sigma/sigma_mid) x_2 + (1 - sigma/sigma_mid) D_1 of the state
            # it is given, so it is off by (sigma/sigma_mid)(x_2 - x_2'), added here in y = c_in x at both ends
            pz, mid = self._pz, self._mids[i]
            w = pz.c_in(sigma_next) / pz.c_in(mid) * (sigma / mid)
            r = r._replace(y=r.y + w * (predictor - sample))
        return self._output(r.y, r.denoised, return_dict)


class ZSNRKDPM2DiscreteScheduler(_KDPM2):
    """``KDPM2DiscreteScheduler`` on :func:`zsnr_kernels.dpm_2_step` (its config keys plus
    ``rescale_betas_zero_snr``).  Unlike diffusers it also takes ``prediction_type="sample"``."""

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

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, *,
             guidance_scale: float = 1.0, guidance_rescale: float = 0.0):
        """First evaluation of a step: the Euler predictor to sigma_mid (the whole step from sigma = inf and to
        sigma = 0).  Second evaluation (model at the midpoint): the DPM-Solver-2 update.
        ``guidance_scale``/``guidance_rescale`` with ``model_output=(cond, uncond)``: guidance inside the step
        (package docstring)."""
        return self._two_stage(model_output, timestep, sample, return_dict, guidance_scale, guidance_rescale)


ZSNRKDPM2DiscreteScheduler.__doc__ += "\n\n    " + _KDPM2.__doc__ + "\n" + _EULER_FAMILY_DOC
