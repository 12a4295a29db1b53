"""``ZSNRFlowMatchEulerDiscreteScheduler``: diffusers' ``FlowMatchEulerDiscreteScheduler`` on
:func:`zsnr_kernels.euler_step` (and :func:`zsnr_kernels.lcm_step` for ``stochastic_sampling``), and the base the flow
schedulers share."""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import numpy as np
import torch

from .. import schedules, steps
from ..parameterization import parameterization
from ._base import INF, _refuse, _StepIndexed, _steps_count, register_to_config

__all__ = ["ZSNRFlowMatchEulerDiscreteScheduler"]

_FLOW_DOC = """
    **The state.**  A flow model's sample is x_t = (1 - t) x0 + t noise, with diffusers' ``sigmas`` the flow times t
    (1 = pure noise) and the model output the velocity v = noise - x0.  That x_t is exactly this library's state y
    for ``prediction="flow"`` at the noise level sigma = t / (1 - t) (c_in = 1 - t, noise scale t: docs/design.md
    §2.2), so ``step`` takes and returns diffusers' own latents, and ``scale_noise`` is diffusers'.  ``sigmas`` and
    ``timesteps`` are diffusers' (``sigmas`` the flow times, in float64, read at every step: a pipeline that edits
    them in place steers the steps, as in diffusers; ``timesteps`` = t * num_train_timesteps in float32).

    **Exact at t = 1.**  A schedule that starts at t = 1 (diffusers' default: every shift keeps 1 at 1) starts at
    sigma = inf exactly: the first model input is the noise itself and the first step is the library's exact step
    from sigma = inf (no 1 - t = 0 division anywhere).  Every update is one fused step (``backend``: see
    :class:`zsnr_kernels.diffusers` package docstring); ``guidance_scale``/``guidance_rescale`` with
    ``model_output=(cond, uncond)`` guide inside it.
"""


def _level(t: float) -> float:
    """This library's noise level of flow time t: t / (1 - t), inf at t = 1."""
    return INF if t == 1.0 else t / (1.0 - t)


class _FlowMatchScheduler(_StepIndexed):
    """What the flow-matching schedulers share: diffusers' training times (no betas), the flow parameterization, the
    step counter of :class:`_StepIndexed`, ``scale_noise`` and the reading of a step's flow times.

    ``sigmas`` holds diffusers' sigmas: the flow time of every model evaluation, then the final one (0).  Evaluation
    k of the Euler scheduler steps from ``sigmas[k]`` to ``sigmas[k + 1]``; Heun's evaluations are laid out as
    diffusers lays them out (each inner time twice).  The library's noise level of a time is sigma = t / (1 - t)."""

    _compatibles: ClassVar[list[str]] = []  # as diffusers' flow schedulers
    _choices: ClassVar[dict[str, tuple]] = {}
    _refuses_integer_timesteps = True
    _inverted = False  # diffusers' sigmas are 1 - t (Mochi's invert_sigmas)

    def _init_flow(self) -> None:
        """diffusers' ``__init__``: the training schedule, timesteps T..1 over T, shifted by ``shift`` unless the
        shift is dynamic; ``sigma_min``/``sigma_max`` its ends (in float64; diffusers: float32)."""
        self._check_config()
        cfg = self.config
        T = cfg.num_train_timesteps
        t = torch.arange(T, 0, -1, dtype=torch.float64) / T
        if not cfg.get("use_dynamic_shifting", False):
            t = cfg.shift * t / (1 + (cfg.shift - 1) * t)
        self._shift = cfg.shift
        # the ends set_timesteps spaces between are diffusers' float32 values, so the float64 schedule rounds to
        # diffusers' float32 one (nearly always: the same timesteps)
        ends = torch.tensor([T, 1], dtype=torch.float32) / T
        if not cfg.get("use_dynamic_shifting", False):
            ends = cfg.shift * ends / (1 + (cfg.shift - 1) * ends)
        self.sigma_max, self.sigma_min = ends[0].item(), ends[1].item()
        self._install(t, t.to(torch.float32) * T, None, steps=T - 1)  # no final time: T - 1 steps, as diffusers
        self.num_inference_steps = None

    @property
    def _pz(self):
        return parameterization("flow")

    @property
    def init_noise_sigma(self) -> float:
        """1.0: the first sample is the noise itself (diffusers' flow schedulers have no such attribute; pipelines
        written for the others multiply by it)."""
        return 1.0

    def _install(self, sigmas: torch.Tensor, timesteps: torch.Tensor, device, steps: int | None = None) -> None:
        self.sigmas = sigmas.to(torch.float64)
        self.timesteps = timesteps.to(device=device, dtype=torch.float32)
        n = self.timesteps.numel() if steps is None else steps
        self._evals = [(k, 1) for k in range(n)]  # the counter's bound (``_next_eval``)
        self._step_index = None
        self._begin_index = None

    def _flow_time(self, k: int) -> float:
        """The library's flow time of ``sigmas[k]`` (1 - it with ``invert_sigmas``), checked to lie in [0, 1]."""
        d = float(self.sigmas[k])
        t = 1.0 - d if self._inverted else d
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"scheduler.sigmas[{k}]={d!r} is not a flow time (t in [0, 1]: 1 is pure noise, 0 the "
                             "clean sample), so it has no noise level")
        return t

    def _eval_sigma(self, k: int) -> float:
        return _level(self._flow_time(k))

    def _pair_levels(self, k_from: int, k_to: int) -> tuple[float, float, float, float]:
        """(t, t_next, sigma, sigma_next) of a step from ``sigmas[k_from]`` to ``sigmas[k_to]``; refuses one that
        raises the noise level (the fused steps integrate towards t = 0)."""
        t, tn = self._flow_time(k_from), self._flow_time(k_to)
        if tn > t:
            raise ValueError(f"{type(self).__name__}: the step from flow time {t} to {tn} raises the noise level "
                             f"(scheduler.sigmas[{k_from}] to [{k_to}]); the fused steps only lower it (sampling, not "
                             "inversion): pass descending sigmas or timesteps")
        return t, tn, _level(t), _level(tn)

    def _flow_output(self, model_output, sample, sigma, guidance_scale, guidance_rescale):
        """(F, options) for the fused step: the base's (guidance pair included), the velocity negated where the
        schedule is inverted (its sample moves from noise at d = 0 to data at d = 1, so v_d = x0 - noise)."""
        if self._inverted:
            model_output = (tuple(-m for m in model_output) if isinstance(model_output, (tuple, list))
                            else -model_output)
        f, opts, _ = self._model_output(model_output, sample, sigma, guidance_scale, guidance_rescale)
        return f, opts

    def _start(self, timestep) -> int:
        """diffusers' ``_init_step_index`` then one evaluation counted (integer timesteps refused, as diffusers)."""
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError(f"Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to "
                             f"`{type(self).__name__}.step()` is not supported. Make sure to pass one of the "
                             "`scheduler.timesteps` as a timestep.")
        return self._next_eval(timestep)

    def _sigma_to_t(self, sigma):
        return sigma * self.config.num_train_timesteps


class ZSNRFlowMatchEulerDiscreteScheduler(_FlowMatchScheduler):
    """``FlowMatchEulerDiscreteScheduler`` on :func:`zsnr_kernels.euler_step` (same config keys).

    Every config key is taken: ``shift``, ``use_dynamic_shifting`` (``set_timesteps(mu=)``, ``time_shift_type``),
    ``shift_terminal``, the Karras/exponential/beta grids (:func:`zsnr_kernels.schedules.flow_times` builds the
    schedule, in float64), ``invert_sigmas`` (diffusers' sigmas are 1 - t: the model output is negated and the step
    runs on t) and ``stochastic_sampling`` (x0 renoised to the next time: :func:`zsnr_kernels.lcm_step`, noise drawn
    from ``generator`` as diffusers draws it).  ``step``'s ``s_churn``, ``s_tmin``, ``s_tmax`` and ``s_noise`` are
    ignored, as diffusers ignores them; ``per_token_timesteps`` (one flow time per token) is refused: the fused steps
    take one noise level per sample.
    """

    _choices: ClassVar[dict[str, tuple]] = {"time_shift_type": schedules.FLOW_TIME_SHIFTS}
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: Literal["exponential", "linear"] = "exponential",
        stochastic_sampling: bool = False,
    ):
        self._init_flow()
        self.use_karras_sigmas = use_karras_sigmas  # diffusers keeps them as attributes too (config-readers)
        self.use_exponential_sigmas = use_exponential_sigmas
        self.use_beta_sigmas = use_beta_sigmas

    @property
    def _inverted(self) -> bool:
        return bool(self.config.invert_sigmas)

    @property
    def shift(self) -> float:
        """The shift ``set_timesteps`` applies (``set_shift`` changes it, as in diffusers)."""
        return self._shift

    def set_shift(self, shift: float) -> None:
        self._shift = shift

    def time_shift(self, mu: float, sigma: float, t):
        """diffusers' resolution-dependent shift of flow times t: e^mu / (e^mu + (1/t - 1)^sigma) (``"linear"``:
        mu / (mu + (1/t - 1)^sigma))."""
        m = math.exp(mu) if self.config.time_shift_type == "exponential" else mu
        return m / (m + (1 / t - 1) ** sigma)

    def stretch_shift_to_terminal(self, t):
        """diffusers' ``stretch_shift_to_terminal``: t stretched so that its last value is ``shift_terminal``."""
        one_minus_z = 1 - t
        scale_factor = one_minus_z[-1] / (1 - self.config.shift_terminal)
        return 1 - (one_minus_z / scale_factor)

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device = None,
                      sigmas: list[float] | None = None, mu: float | None = None,
                      timesteps: list[float] | None = None) -> None:
        """diffusers' schedule (float64 here): ``num_inference_steps`` flow times from ``sigma_max`` to ``sigma_min``,
        or custom ``sigmas`` (base times, shifted as diffusers shifts them; Flux passes ``linspace(1, 1/n, n)``) or
        ``timesteps`` (used as given; their times t / T shifted), then the shift (``mu`` with
        ``use_dynamic_shifting``), ``shift_terminal``, a grid, and the final time 0 (1 with ``invert_sigmas``, whose
        sigmas are 1 - t)."""
        cfg = self.config
        if cfg.use_dynamic_shifting and mu is None:
            raise ValueError("`mu` must be passed when `use_dynamic_shifting` is set to be `True`")
        if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
            raise ValueError("`sigmas` and `timesteps` should have the same length")
        if num_inference_steps is not None:
            if (sigmas is not None and len(sigmas) != num_inference_steps) or (
                    timesteps is not None and len(timesteps) != num_inference_steps):
                raise ValueError("`sigmas` and `timesteps` should have the same length as num_inference_steps, if "
                                 "`num_inference_steps` is provided")
        elif sigmas is None and timesteps is None:
            raise ValueError(f"{type(self).__name__}.set_timesteps: pass num_inference_steps, sigmas or timesteps")
        T = cfg.num_train_timesteps
        given_ts = None
        if timesteps is not None:
            given_ts = torch.as_tensor(np.asarray(timesteps, dtype=np.float32))
        if sigmas is not None:
            base = torch.as_tensor(np.asarray(sigmas, dtype=np.float64))
        elif given_ts is not None:
            base = given_ts.double() / T
        else:
            n = _steps_count(num_inference_steps)
            base = torch.linspace(self.sigma_max * T, self.sigma_min * T, n, dtype=torch.float64) / T
        self.num_inference_steps = base.numel()
        shift = {"use_dynamic_shifting": True, "mu": mu} if cfg.use_dynamic_shifting else {"shift": self.shift}
        t = schedules.flow_times(times=base, num_train_timesteps=T, shift_terminal=cfg.shift_terminal,
                                 time_shift_type=cfg.time_shift_type, use_karras_sigmas=cfg.use_karras_sigmas,
                                 use_exponential_sigmas=cfg.use_exponential_sigmas,
                                 use_beta_sigmas=cfg.use_beta_sigmas, **shift)
        if cfg.invert_sigmas:  # Mochi: diffusers' sigmas 1 - t, the timesteps those times T, a final 1
            d = 1.0 - t
            ts = d[:-1].to(torch.float32) * T
        else:
            d = t
            ts = given_ts if given_ts is not None else t[:-1].to(torch.float32) * T  # diffusers': float32 t * T
        self._install(d, ts, device)

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor | None = None) -> torch.Tensor:
        """diffusers' forward process: sigma noise + (1 - sigma) sample at the evaluation of ``timestep``
        (``begin_index``/``step_index`` when set, else found by timestep), in the sample's dtype."""
        sigmas = self.sigmas.to(device=sample.device, dtype=sample.dtype)
        schedule = self.timesteps.to(sample.device)
        timestep = torch.as_tensor(timestep).to(sample.device).reshape(-1)
        if self.begin_index is None:
            idx = [self.index_for_timestep(t, schedule) for t in timestep]
        elif self.step_index is not None:
            idx = [self.step_index] * timestep.shape[0]
        else:
            idx = [self.begin_index] * timestep.shape[0]
        sigma = sigmas[idx].flatten()
        while sigma.ndim < sample.ndim:
            sigma = sigma.unsqueeze(-1)
        return sigma * noise + (1.0 - sigma) * sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = INF, s_noise: float = 1.0,
             generator: torch.Generator | None = None, per_token_timesteps: torch.Tensor | None = None,
             return_dict: bool = True, *, guidance_scale: float = 1.0, guidance_rescale: float = 0.0):
        """One Euler step of the velocity ``model_output`` at (``sample``, ``timestep``): x' = x + (t' - t) v, the
        fused :func:`zsnr_kernels.euler_step` on sigma = t / (1 - t) (from t = 1: sigma = inf, exact); with
        ``stochastic_sampling`` x' = (1 - t') x0 + t' z (:func:`zsnr_kernels.lcm_step`, z drawn from ``generator``).
        Returns the next latents (``prev_sample``) and the denoised prediction x0 (``pred_original_sample``)."""
        if per_token_timesteps is not None:
            raise _refuse(type(self).__name__, "per_token_timesteps", "<tensor>",
                          "the fused steps take one noise level per sample, not one per token; step each sample "
                          "at one timestep")
        k = self._start(timestep)
        t, tn, sigma, sigma_next = self._pair_levels(k, k + 1)
        f, opts = self._flow_output(model_output, sample, sigma, guidance_scale, guidance_rescale)
        if self.config.stochastic_sampling:
            draw = self._noise(sample, generator, torch.float32)  # diffusers draws in its float32 upcast
            if sigma_next == sigma:  # a zero-length step still renoises its x0, as diffusers
                _, d = self._unchanged(sample, f, opts, sigma)
                y = (1.0 - tn) * d + tn * draw() if tn else d
            else:
                r = steps.lcm_step(sample, f, sigma, sigma_next, noise=draw, **opts)
                y, d = r.y, r.denoised
        else:
            y, d = self._euler(sample, f, sigma, sigma_next, opts)
        return self._output(y, d, return_dict, with_denoised=False)


ZSNRFlowMatchEulerDiscreteScheduler.__doc__ += _FLOW_DOC
