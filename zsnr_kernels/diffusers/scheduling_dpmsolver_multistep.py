"""``ZSNRDPMSolverMultistepScheduler``: diffusers' ``DPMSolverMultistepScheduler`` (``dpmsolver++``,
``sde-dpmsolver++``) on :func:`zsnr_kernels.dpmpp_2m_step`, :func:`~zsnr_kernels.dpmpp_2m_sde_step` and
:func:`~zsnr_kernels.dpmpp_3m_sde_step`.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import steps
from ..coefficients import SOLVER_TYPES
from ._base import REFUSED, _refuse, _StepIndexed, _ZSNRScheduler, register_to_config

__all__ = ["ZSNRDPMSolverMultistepScheduler"]


class _MultistepDPM:
    """DPM-Solver++'s multistep walk, shared with the EDM variant: diffusers' order schedule and the remembered
    denoised predictions, on the fused steps."""

    def _reset_history(self) -> None:
        self._history: list[tuple[float, torch.Tensor]] = []
        self.lower_order_nums = 0

    def index_for_timestep(self, timestep, schedule_timesteps: torch.Tensor | None = None) -> int:
        """Index of ``timestep`` in ``timesteps`` (the second match when it occurs twice); a timestep not in the
        schedule is its last evaluation (diffusers' DPM-Solver rule)."""
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        if not (schedule == timestep).any():
            return len(schedule) - 1
        return super().index_for_timestep(timestep, schedule)

    def _order(self, k: int) -> int:
        """diffusers' order for evaluation k: warm-up from first order, first order at the end."""
        n = len(self._evals)
        cfg = self.config
        final = k == n - 1 and (cfg.euler_at_final or (cfg.lower_order_final and n < 15)
                                or cfg.final_sigmas_type == "zero")
        second = k == n - 2 and cfg.lower_order_final and n < 15
        if cfg.solver_order == 1 or self.lower_order_nums < 1 or final:
            return 1
        if cfg.solver_order == 2 or self.lower_order_nums < 2 or second:
            return 2
        return 3

    def _multistep(self, model_output, timestep, sample: torch.Tensor, noise, return_dict: bool,
                   guidance_scale, guidance_rescale):
        """One step: ``dpmpp_2m`` (``dpmsolver++``, midpoint), ``dpmpp_2m_sde`` (the SDE, or the ODE at eta = 0 with
        ``solver_type="heun"``) or ``dpmpp_3m_sde`` (order 3; eta = 0 for the ODE); ``noise`` draws the SDE's."""
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) before step()")
        k, sigma, sigma_next, f, opts = self._open(timestep, model_output, sample, guidance_scale, guidance_rescale)
        order = self._order(k)
        self.lower_order_nums = min(self.lower_order_nums + 1, self.config.solver_order)
        if sigma_next == sigma:
            # the history stays: the next step's remembered sigmas must lie above its own (diffusers divides by
            # the zero log-ratio of this step there and returns NaN)
            y, d = self._unchanged(sample, f, opts, sigma)
            return self._output(self._finish(y, sigma, k), d, return_dict, with_denoised=False)
        history = self._history[: order - 1]
        sde = self.config.algorithm_type == "sde-dpmsolver++"
        if sde:
            opts = {**opts, "noise": noise}
        if order == 3:
            r = steps.dpmpp_3m_sde_step(sample, f, sigma, sigma_next, history=history, eta=float(sde), **opts)
        elif sde or self.config.solver_type == "heun":
            r = steps.dpmpp_2m_sde_step(sample, f, sigma, sigma_next, history=history, eta=float(sde),
                                        solver_type=self.config.solver_type, **opts)
        else:
            r = steps.dpmpp_2m_step(sample, f, sigma, sigma_next, history=history, **opts)
        self._history = [(sigma, r.denoised)] + self._history[: self.config.solver_order - 2]
        return self._output(self._finish(r.y, sigma_next, k), r.denoised, return_dict, with_denoised=False)


class _DPMSolverTimesteps:
    """DPM-Solver's timesteps and grids (diffusers' UniPC computes the same): the spacing over n + 1 points, grids
    over the whole training table."""

    def _spaced(self, n: int, T: int) -> np.ndarray:
        """diffusers' DPM-Solver spacings: ``linspace``/``leading`` over n + 1 points without the last (so with
        repeated timesteps when n approaches T), ``trailing`` as the Euler family's; timesteps whose lambda =
        -log sigma is below ``lambda_min_clipped`` are cut off.  UniPC's are the same."""
        cfg = self.config
        lam = -self._train_sigmas.log()
        floor = getattr(cfg, "lambda_min_clipped", -float("inf"))  # a DPM-Solver key (UniPC has none)
        clipped = torch.searchsorted(lam.flip(0), torch.tensor([floor], dtype=torch.float64))
        last = T - int(clipped.item())
        if cfg.timestep_spacing == "linspace":
            ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1]
        elif cfg.timestep_spacing == "leading":
            ts = (np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1] + cfg.steps_offset
        else:
            ts = np.arange(last, 0, -T / n).round() - 1
            ts = ts[ts >= 0]  # numpy's extra value (see _base._spacing)
        return ts.astype(np.int64)

    def _grid_span(self, sigmas: torch.Tensor) -> torch.Tensor:
        return self._train_sigmas.flip(0)  # unlike the Euler family, DPM-Solver's grids span the whole table

    def _grid_timesteps(self, ts: np.ndarray) -> np.ndarray:
        """Rounded for Karras and Lu grids (not on the cosine table), truncated (by the int64 cast) otherwise, as
        diffusers."""
        if self._grid_kind() in ("karras", "lu") and self.config.beta_schedule != "squaredcos_cap_v2":
            return ts.round()
        return ts


class ZSNRDPMSolverMultistepScheduler(_MultistepDPM, _DPMSolverTimesteps, _StepIndexed):
    """``DPMSolverMultistepScheduler`` for ``algorithm_type="dpmsolver++"`` (DPM++ 2M, 3M) and
    ``"sde-dpmsolver++"`` (DPM++ 2M SDE), same config keys.

    ``solver_order`` 1-3 (higher orders step as 3, as in diffusers) and ``solver_type`` ``midpoint``/``heun``
    select the library's ``dpmpp_2m``, ``dpmpp_2m_sde`` (eta = 1 for the SDE, 0 for the ODE with ``heun``) and
    ``dpmpp_3m_sde`` steps, with diffusers' order schedule (``lower_order_final``, ``euler_at_final``, first order
    at a final sigma of 0).  The step from sigma = inf is first order and the remembered prediction from it carries
    weight 0 (docs/design.md §2.3).  ``thresholding`` clips D; ``variance_type="learned"``/``"learned_range"``
    models keep the first half of their output channels.  A UniPC or DEIS config switches over as in diffusers: its
    ``solver_type`` (``bh1``, ``bh2``, ``logrho``) becomes ``midpoint`` and ``algorithm_type="deis"``
    ``dpmsolver++``.
    """

    _timestep_dtype = torch.int64
    _choices = {**_ZSNRScheduler._choices, "algorithm_type": ("dpmsolver++", "sde-dpmsolver++"),
                "solver_type": SOLVER_TYPES, "final_sigmas_type": ("zero", "sigma_min"), "use_flow_sigmas": (False,),
                "use_dynamic_shifting": (False,)}
    _aliases = {"algorithm_type": {"deis": "dpmsolver++"},
                "solver_type": dict.fromkeys(("logrho", "bh1", "bh2"), "midpoint")}

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: str | None = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ):
        super().__init__()
        if isinstance(solver_order, bool) or not isinstance(solver_order, int) or solver_order < 1:
            raise ValueError(f"solver_order must be a positive int (orders above 3 step as 3, as in diffusers), got "
                             f"{solver_order!r}")
        self._reset_history()

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      mu: float | None = None, timesteps: list[int] | None = None) -> None:
        """diffusers' DPM-Solver timesteps and sigmas (Karras/exponential/beta/Lu grids on request), then the final
        sigma; or custom ``timesteps``."""
        if mu is not None:
            raise _refuse(type(self).__name__, "mu", mu, "it sets the flow shift of use_dynamic_shifting: "
                          + REFUSED[("use_dynamic_shifting", True)])
        self._set_schedule(*self._schedule(num_inference_steps, timesteps), device)
        self._reset_history()

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: torch.Generator | None = None, variance_noise: torch.Tensor | None = None,
             return_dict: bool = True, *, guidance_scale: float = 1.0, guidance_rescale: float = 0.0):
        """One multistep DPM-Solver++ step; the SDE's noise is ``variance_noise`` or
        ``randn_tensor(shape, generator, dtype=float32)`` as in diffusers.  ``guidance_scale``/``guidance_rescale``
        with ``model_output=(cond, uncond)``: guidance inside the step (package docstring)."""
        if self.config.variance_type in ("learned", "learned_range"):
            model_output = _first_half(model_output, sample)
        return self._multistep(model_output, timestep, sample, self._noise(sample, generator, torch.float32,
                                                                           variance_noise),
                               return_dict, guidance_scale, guidance_rescale)


def _first_half(model_output, sample: torch.Tensor):
    """A learned-variance model's output (or guided pair of them) without its variance channels."""
    if isinstance(model_output, (tuple, list)):
        return tuple(_first_half(m, sample) for m in model_output)
    return model_output[:, : sample.shape[1]] if model_output.shape[1] == 2 * sample.shape[1] else model_output
