"""``ZSNRFlowMatchHeunDiscreteScheduler``: diffusers' ``FlowMatchHeunDiscreteScheduler`` on
:func:`zsnr_kernels.heun_flow_step`."""

from __future__ import annotations

import torch

from .. import schedules, steps
from ._base import INF, _refuse, _steps_count, register_to_config
from .scheduling_flow_match_euler_discrete import _FLOW_DOC, _FlowMatchScheduler
from .scheduling_heun_discrete import _version

__all__ = ["ZSNRFlowMatchHeunDiscreteScheduler"]


class _ZeroLength:
    """The first evaluation of a step to its own flow time: diffusers stores the sample and returns it after the
    second evaluation (dt = 0)."""

    def __init__(self, sample: torch.Tensor) -> None:
        self.y = sample


class ZSNRFlowMatchHeunDiscreteScheduler(_FlowMatchScheduler):
    """``FlowMatchHeunDiscreteScheduler`` on :func:`zsnr_kernels.heun_flow_step` (same config keys).

    Heun's method in the flow time t, as diffusers takes it: the Euler predictor to t', the model at the predictor,
    then x' = x + (t' - t)(v_1 + v_2)/2 (not :func:`zsnr_kernels.heun_step`, the trapezoid in sigma: the two second
    orders differ, see :func:`zsnr_kernels.coefficients.heun_flow`).  Each step takes two evaluations but the last one
    (to t = 0, one Euler evaluation), so ``timesteps`` lists every inner time twice and ``sigmas`` likewise, as in
    diffusers.  From t = 1 (sigma = inf) the step is the same two-evaluation step, exactly: in flow time the interval
    is finite.  A pipeline that hands the second evaluation other latents than the predictor the first returned
    (inpainting's blend) gets diffusers' result, which finishes from the sample stored at the first evaluation.
    ``step``'s EDM churn (``s_churn`` > 0 with t in [s_tmin, s_tmax]) is refused: diffusers adds that noise after
    the model call, in flow time (t(1 + gamma) can pass 1), which no fused step does; churn-free arguments are taken.
    """

    order = 2

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0):
        self._init_flow()
        self._first = None
        self._first_version = None

    @property
    def state_in_first_order(self) -> bool:
        """True when the next evaluation starts a step (diffusers' name)."""
        return self._first is None

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device = None) -> None:
        """diffusers' Heun schedule: ``num_inference_steps`` flow times from ``sigma_max`` to ``sigma_min``, shifted
        by ``shift``, then 0 (float64 here), every inner time listed twice."""
        T = self.config.num_train_timesteps
        n = _steps_count(num_inference_steps)
        base = torch.linspace(self.sigma_max * T, self.sigma_min * T, n, dtype=torch.float64) / T
        t = schedules.flow_times(times=base, num_train_timesteps=T, shift=self.config.shift)
        ts = t[:-1].to(torch.float32) * T  # diffusers': float32 t * T
        self._install(torch.cat([t[:1], t[1:-1].repeat_interleave(2), t[-1:]]),
                      torch.cat([ts[:1], ts[1:].repeat_interleave(2)]), device)
        self.num_inference_steps = n
        self._first, self._first_version = None, None

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor) -> torch.Tensor:
        """diffusers' forward process at the current evaluation (found from ``timestep`` on the first call, which
        starts the step counter there, as diffusers' does): sigma noise + (1 - sigma) sample."""
        if self._step_index is None:
            self._step_index = (self._begin_index if self._begin_index is not None
                                else self.index_for_timestep(torch.as_tensor(timestep).to(self.timesteps.device)))
        sigma = self.sigmas[self._step_index]
        return sigma * noise + (1.0 - sigma) * sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = INF, s_noise: float = 1.0,
             generator: torch.Generator | None = None, return_dict: bool = True, *, guidance_scale: float = 1.0,
             guidance_rescale: float = 0.0):
        """First evaluation of a step: the Euler predictor to the next time (the whole step to t = 0).  Second
        evaluation (the model at the predictor): Heun's correction.  ``guidance_scale``/``guidance_rescale`` with
        ``model_output=(cond, uncond)``: guidance inside the step."""
        k = self._start(timestep)
        first = self._first
        kf, kt = (k, k + 1) if first is None else (k - 1, k)
        d = float(self.sigmas[kf])
        if s_churn and s_tmin <= d <= s_tmax and min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1) > 0:
            raise _refuse(type(self).__name__, "s_churn", s_churn,
                          "diffusers' flow Heun adds that noise after the model call and in flow time, where "
                          "t (1 + gamma) can pass 1 (beyond pure noise); no fused step does that. Use s_churn=0")
        t, tn, sigma, sigma_next = self._pair_levels(kf, kt)
        # half-precision latents are stepped in float32, as diffusers upcasts them: the correction weighs the
        # predictor and D_1 by up to (t - t')/(2 t') (some 10 to 100 on a flow schedule's last steps), which would
        # amplify their bfloat16 rounding; the predictor is kept here in float32 (diffusers keeps its sample)
        work = sample.float() if sample.dtype in (torch.float16, torch.bfloat16) else sample
        f, opts = self._flow_output(model_output, work, sigma if first is None else sigma_next, guidance_scale,
                                    guidance_rescale)
        if first is None:
            if sigma_next == sigma:  # a zero-length step: see _ZeroLength
                self._first = _ZeroLength(sample)
                y, d_out = self._unchanged(work, f, opts, sigma)
                return self._output(y.to(sample.dtype), d_out.to(sample.dtype), return_dict, with_denoised=False)
            r = steps.heun_flow_step(work, f, sigma, sigma_next, **opts)
            if not r.complete:
                self._first, self._first_version = r, _version(r.y)
            return self._output(r.y.to(sample.dtype), r.denoised.to(sample.dtype), return_dict, with_denoised=False)
        self._first = None
        if isinstance(first, _ZeroLength):
            _, d_out = self._unchanged(work, f, opts, sigma_next)
            return self._output(first.y.clone(), d_out.to(sample.dtype), return_dict, with_denoised=False)
        if sample is first.y and _version(sample) != self._first_version:
            raise ValueError(
                "the latents were edited in place between the two evaluations of a Heun step, which loses the "
                "predictor state that diffusers' Heun finishes from: assign new latents instead (latents = "
                "latents * m + known * (1 - m), not latents.mul_(...)); a new tensor is taken as diffusers takes it")
        replaced = work is not first.y  # other latents, or half-precision ones (the predictor is kept in float32)
        r = steps.heun_flow_step(work, f, sigma, sigma_next, first=first._replace(y=work) if replaced else first,
                                 **opts)
        y = r.y
        if replaced:
            # diffusers finishes from the sample stored at the first evaluation, x + dt (v_1 + v_2)/2, which reads the
            # given latents x_2' only through v_2 (the model output); the fused step, given x_2' as its state, forms
            # (1 - w) x_2' + w (D_1 + t' v_2) with w = (t' - t)/(2 t'): the two differ by (1 - w)(x_2 - x_2')
            y = y + (1.0 - (tn - t) / (2.0 * tn)) * (first.y - work)
        return self._output(y.to(sample.dtype), r.denoised.to(sample.dtype), return_dict, with_denoised=False)

ZSNRFlowMatchHeunDiscreteScheduler.__doc__ += _FLOW_DOC
