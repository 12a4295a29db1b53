"""``ZSNRDPMSolverSDEScheduler``: diffusers' ``DPMSolverSDEScheduler`` (k-diffusion's ``sample_dpmpp_sde``) on
:func:`zsnr_kernels.dpmpp_sde_step`."""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import coefficients as co, steps
from ._base import _EULER_FAMILY_DOC, INF, _StepIndexed, register_to_config

__all__ = ["ZSNRDPMSolverSDEScheduler"]


class _BrownianNoise:
    """diffusers' ``BrownianTreeNoiseSampler`` (torchsde's Brownian interval, built as diffusers builds it) over the
    finite sigmas of the schedule, defined at sigma = inf too: the increment over an infinite interval, normalised,
    is a unit Gaussian independent of the tree (the limit as the upper end grows), drawn from a generator seeded
    with the tree's seed -- the same numbers for every such interval, as the normalised increments of nested
    infinite intervals are perfectly correlated in the limit."""

    def __init__(self, sample: torch.Tensor, sigma_min: float, sigma_max: float, seed: int | None):
        from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

        if seed is None:  # diffusers' BatchedBrownianTree draws it so, from torch's global generator
            seed = torch.randint(0, 2 ** 63 - 1, []).item()
        self.seed, self.shape, self.dtype, self.device = seed, tuple(sample.shape), sample.dtype, sample.device
        self.tree = BrownianTreeNoiseSampler(sample, sigma_min, sigma_max, seed) if sigma_max > 0 else None

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        if math.isinf(float(sigma)) or math.isinf(float(sigma_next)) or self.tree is None:
            g = torch.Generator(device=self.device).manual_seed(self.seed)
            return torch.randn(self.shape, generator=g, dtype=self.dtype, device=self.device)
        return self.tree(sigma, sigma_next)


class ZSNRDPMSolverSDEScheduler(_StepIndexed):
    """``DPMSolverSDEScheduler`` on :func:`zsnr_kernels.dpmpp_sde_step` (its config keys plus
    ``rescale_betas_zero_snr``): DPM-Solver++(2S) SDE with r = 1/2 and eta = 1, k-diffusion's ``sample_dpmpp_sde``.

    As in diffusers a step takes two model evaluations, at t_i and at the timestep of sigma_s = sqrt(sigma_i
    sigma_{i+1}) (``timesteps`` lists it between t_i and t_{i+1}), the first an euler_ancestral step to sigma_s, the
    second the update from the step's start sample with the midpoint's denoised prediction; the last step (to
    sigma = 0) is one Euler evaluation.  Every update is one fused step.

    Noise: diffusers' Brownian tree (``noise_sampler``, built at the first ``step`` from ``noise_sampler_seed``, or
    a seed from torch's global generator, over the schedule's finite sigmas), queried at diffusers' own float32
    times (sigma_fn(t), sigma_fn(t + h/2)) and (sigma_fn(t), sigma_fn(t_next)), so a seed gives diffusers' noise.
    A ``noise_sampler`` set on the scheduler after ``set_timesteps`` is called the same way, as diffusers calls it.

    Zero terminal SNR (``rescale_betas_zero_snr=True``, ``trailing``/``linspace`` spacing): the first step is from
    sigma = inf, where sigma_s is inf too; both evaluations run at timestep T - 1 (the step's exact limit,
    :func:`zsnr_kernels.coefficients.dpmpp_sde`): y_2 = the noise of the infinite interval, then y_1 =
    c_in(sigma_1) D_2 + s(sigma_1) z.  The tree answers a query over an infinite interval with its limit (one unit
    Gaussian per seed).  Latents a pipeline replaces between a step's two evaluations (inpainting) are taken as
    diffusers takes them: the model's prediction at them, the update from the sample stored at the first.
    Unlike diffusers it also takes ``prediction_type="sample"``.
    """

    _ve_state = True
    order = 2
    _timestep_dtype = torch.float64  # diffusers' DPMSolverSDE keeps float64 timesteps

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
        noise_sampler_seed: int | None = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        super().__init__()
        self.noise_sampler_seed = noise_sampler_seed
        self.use_karras_sigmas = use_karras_sigmas
        self.set_timesteps(self.config.num_train_timesteps)  # diffusers starts on the full schedule of its spacing

    @property
    def state_in_first_order(self) -> bool:
        """True when the next evaluation starts a step (diffusers' name)."""
        return self._first is None

    @property
    def mid_point_sigma(self) -> float | None:
        """The sigma of the step's second evaluation while one is pending (diffusers' attribute), else None."""
        return None if self._first is None else float(self._first.sigma)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None,
                      num_train_timesteps: int | None = None) -> None:
        """diffusers' timesteps for ``timestep_spacing`` over ``num_train_timesteps`` (default: the config's;
        Karras/exponential/beta grids on request), each step's midpoint timestep (log-linear interpolation of
        sigma_s in the training table; T - 1 at sigma = inf) after it, and the step sigmas then 0 (``sigmas`` lists
        each once; diffusers repeats them).  Resets the noise sampler, as diffusers does."""
        ts, sigmas = self._schedule(num_inference_steps, T=num_train_timesteps)
        levels = sigmas.tolist()
        self._mids = [co.dpmpp_sde_midpoint(s, s_next) if s_next != 0 else math.nan
                      for s, s_next in zip(levels, levels[1:])]
        needed = [m for m in self._mids if math.isfinite(m)]
        mid_t = iter(self._table().sigma_to_t(torch.tensor(needed, dtype=torch.float64), mode="interp").tolist()
                     if needed else ())
        evals, times = [], []
        for i in range(len(levels) - 1):
            evals.append((i, 1))
            times.append(float(ts[i]))
            if levels[i + 1] != 0:
                evals.append((i, 2))
                times.append(float(ts[i]) if self._mids[i] == INF else next(mid_t))  # at inf: t_i (T - 1) again
        self._set_schedule(ts, sigmas, device, evals)
        self.timesteps = torch.tensor(times, dtype=torch.float64).to(self._timestep_dtype).to(device)
        self._first = None
        self.noise_sampler = None

    def index_for_timestep(self, timestep, schedule_timesteps: torch.Tensor | None = None) -> int:
        """diffusers' rule (the second match of a repeated timestep, so img2img starting mid-schedule skips no
        sigma), except that the step from sigma = inf calls the model at T - 1 twice: a run starting there starts at
        its first evaluation."""
        k = super().index_for_timestep(timestep, schedule_timesteps)
        if k > 0 and self._evals[k][1] == 2 and self._mids[self._evals[k][0]] == INF:
            return k - 1
        return k

    def _eval_sigma(self, k: int) -> float:
        i, stage = self._evals[k]
        return self._mids[i] if stage == 2 else float(self.sigmas[i])

    def _noise_times(self, sigma: float, sigma_next: float):
        """diffusers' noise-sampler arguments of the step, in its float32 arithmetic: (sigma_fn(t), sigma_fn(t +
        h/2)) and (sigma_fn(t), sigma_fn(t_next)); (inf, inf) and (inf, sigma_next) from sigma = inf."""
        s, sn = torch.tensor(sigma, dtype=torch.float32), torch.tensor(sigma_next, dtype=torch.float32)
        t, t_next = s.log().neg(), sn.log().neg()
        mid = s if sigma == INF else (t + (t_next - t) * 0.5).neg().exp()
        return t.neg().exp(), mid, t_next.neg().exp()

    def _make_noise_sampler(self, sample: torch.Tensor) -> _BrownianNoise:
        """diffusers' tree over the schedule's sigmas as it stores them (float32), the finite ones (diffusers:
        ``sigmas[sigmas > 0].min()``, ``sigmas.max()``)."""
        levels = self.sigmas.to(torch.float32)
        finite = levels[(levels > 0) & torch.isfinite(levels)]
        lo, hi = (finite.min().item(), finite.max().item()) if finite.numel() else (0.0, 0.0)
        return _BrownianNoise(sample, lo, hi, self.noise_sampler_seed)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True,
             s_noise: float = 1.0, *, guidance_scale: float = 1.0, guidance_rescale: float = 0.0):
        """One evaluation of a DPM-Solver++(2S) SDE step: the first (model at sigma_i) is euler_ancestral to the
        midpoint sigma_s (the whole step, Euler, to sigma = 0); the second (model at sigma_s) the update from the
        step's start sample.  ``s_noise`` scales the noise, as diffusers'.
        ``guidance_scale``/``guidance_rescale`` with ``model_output=(cond, uncond)``: guidance inside the step
        (package docstring)."""
        if self.noise_sampler is None:  # diffusers builds it at the first step of a run
            self.noise_sampler = self._make_noise_sampler(sample)
        k, sigma, sigma_next, f, opts = self._open(timestep, model_output, sample, guidance_scale, guidance_rescale)
        i, stage = self._evals[k]
        if sigma_next == sigma:  # a zero-length step (a repeated timestep) leaves the sample
            self._first = None
            return self._output(*self._unchanged(sample, f, opts, self._eval_sigma(k)), return_dict)
        ns = self.noise_sampler
        if sigma_next == 0:
            s_from = mid = s_to = None
        else:
            s_from, mid, s_to = self._noise_times(sigma, sigma_next)
        if stage == 1:
            r = steps.dpmpp_sde_step(sample, f, sigma, sigma_next, s_noise=s_noise,
                                     noise=lambda: self._as_noise(ns(s_from, mid), sample), **opts)
            self._first = None if r.complete else r
            return self._output(r.y, r.denoised, return_dict)
        if self._first is None:
            raise ValueError("this evaluation finishes a DPM-Solver SDE step but its first evaluation was not run; "
                             "call step() once per entry of scheduler.timesteps, in order")
        first = self._first if sample is self._first.y else self._first._replace(y=sample)  # replaced latents
        self._first = None
        r = steps.dpmpp_sde_step(sample, f, sigma, sigma_next, first=first, s_noise=s_noise,
                                 noise=lambda: self._as_noise(ns(s_from, s_to), sample), **opts)
        return self._output(r.y, r.denoised, return_dict)

    @staticmethod
    def _as_noise(z: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        return z.to(device=sample.device, dtype=sample.dtype)


ZSNRDPMSolverSDEScheduler.__doc__ += _EULER_FAMILY_DOC
