"""``ZSNRDPMSolverSinglestepScheduler``: diffusers' ``DPMSolverSinglestepScheduler`` (``dpmsolver++``,
``sde-dpmsolver++``, orders 1-3) on the fused step of :func:`zsnr_kernels.coefficients.dpmpp_singlestep`.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import coefficients as co, steps
from ..coefficients import SOLVER_TYPES
from ._base import REFUSED, _dtype_of, _refuse, _StepIndexed, _ZSNRScheduler, register_to_config
from .scheduling_dpmsolver_multistep import _DPMSolverTimesteps, _first_half

__all__ = ["ZSNRDPMSolverSinglestepScheduler"]

_ROW = co.DPMPP_SINGLESTEP


class ZSNRDPMSolverSinglestepScheduler(_DPMSolverTimesteps, _StepIndexed):
    """``DPMSolverSinglestepScheduler`` for ``algorithm_type="dpmsolver++"`` (DPM-Solver++ 1S/2S/3S) and
    ``"sde-dpmsolver++"``, same config keys (plus ``rescale_betas_zero_snr``, which diffusers' class lacks).

    diffusers' order list (:meth:`get_order_list`: groups of orders 1, 2, .., ``solver_order``; ``lower_order_final``,
    first order at a final sigma of 0, and ``set_timesteps`` turning ``lower_order_final`` on as diffusers does).  The
    step of order k integrates from the state its group started at, with the group's denoised predictions, in one
    fused pass (:func:`zsnr_kernels.coefficients.dpmpp_singlestep`): the scheduler keeps that start state (the
    sample the group's first step was given, as diffusers' ``self.sample``) and the group's D.  With
    ``rescale_betas_zero_snr=True`` the schedule starts at sigma = inf exactly (timestep T - 1: diffusers' DPM-Solver
    spacing reaches it); the first group's later steps take the limit of their update there (r_k -> 1: order 2
    ``midpoint`` weighs D_inf and D by 1/2, the others give D_inf weight 0).  ``thresholding`` clips D;
    learned-variance models keep the first half of their output channels.  A UniPC or DEIS config switches over as in
    diffusers (``solver_type`` ``bh1``/``bh2``/``logrho`` becomes ``midpoint``, ``algorithm_type="deis"``
    ``dpmsolver++``).

    Deviations: ``sde-dpmsolver++`` of order 3 with ``solver_type="heun"`` takes the integral's second-difference
    weight -phi3 (diffusers writes -(phi3 + 1), the sign of its 1/2, as in its multistep SDE update); a zero-length
    step (a repeated timestep) leaves the sample as it is and the next step starts a new group (diffusers divides by
    the zero log-ratio there and returns NaN).
    """

    _timestep_dtype = torch.int64
    _choices = {"prediction_type": _ZSNRScheduler._choices["prediction_type"],
                "algorithm_type": ("dpmsolver++", "sde-dpmsolver++"), "solver_type": SOLVER_TYPES,
                "final_sigmas_type": ("zero", "sigma_min"), "use_flow_sigmas": (False,),
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
        lower_order_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: str | None = None,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
        rescale_betas_zero_snr: bool = False,
    ):
        if isinstance(solver_order, bool) or not isinstance(solver_order, int) or not (
                1 <= solver_order <= co.SINGLESTEP_MAX_ORDER):
            raise ValueError(f"solver_order must be 1, 2 or 3 (singlestep DPM-Solver++ has no higher order; diffusers "
                             f"refuses them too), got {solver_order!r}")
        super().__init__()
        self.order_list = self.get_order_list(num_train_timesteps)
        self._group = None

    def get_order_list(self, num_inference_steps: int) -> list[int]:
        """diffusers' solver order of every step: groups of orders 1, 2, .., ``solver_order``; with
        ``lower_order_final`` the last group is cut to the steps left, and a last full group of 2 or 3 is split
        ([1, 1]; [1, 2], [1]); first order at the last step when the final sigma is 0."""
        n, order = num_inference_steps, self.config.solver_order
        group = list(range(1, order + 1))
        if self.config.lower_order_final and order > 1 and n % order == 0:
            orders = group * (n // order - 1) + ([1, 1] if order == 2 else [1, 2, 1])
        elif self.config.lower_order_final:
            orders = group * (n // order) + group[: n % order]
        else:
            orders = group * (n // order)
        if self.config.final_sigmas_type == "zero" and orders:
            orders[-1] = 1
        return orders

    def index_for_timestep(self, timestep, schedule_timesteps: torch.Tensor | None = None) -> int:
        """Index of ``timestep`` in ``timesteps`` (the second match when it occurs twice); a timestep not in the
        schedule is its last evaluation (diffusers' DPM-Solver rule)."""
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        if not (schedule == timestep).any():
            return len(schedule) - 1
        return super().index_for_timestep(timestep, schedule)

    def _spaced(self, n: int, T: int) -> np.ndarray:
        """diffusers' singlestep timesteps: ``linspace`` over n + 1 points without the last, up to the last timestep
        whose lambda = -log sigma is not below ``lambda_min_clipped`` (the class has no ``timestep_spacing``)."""
        lam = -self._train_sigmas.log()
        clipped = torch.searchsorted(lam.flip(0), torch.tensor([self.config.lambda_min_clipped], dtype=torch.float64))
        last = T - int(clipped.item())
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)

    def _grid_timesteps(self, ts: np.ndarray) -> np.ndarray:
        """Rounded for Karras grids, truncated (by the int64 cast) otherwise, as diffusers' singlestep class."""
        return ts.round() if self._grid_kind() == "karras" else ts

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      mu: float | None = None, timesteps: list[int] | None = None) -> None:
        """diffusers' singlestep timesteps and sigmas (Karras/exponential/beta grids on request), then the final
        sigma; or custom ``timesteps``.  As diffusers, ``lower_order_final`` is turned on (in the config) when the
        step count is no multiple of ``solver_order`` or the final sigma is 0."""
        if mu is not None:
            raise _refuse(type(self).__name__, "mu", mu, "it sets the flow shift of use_dynamic_shifting: "
                          + REFUSED[("use_dynamic_shifting", True)])
        self._set_schedule(*self._schedule(num_inference_steps, timesteps), device)
        cfg = self.config
        if not cfg.lower_order_final and (self.num_inference_steps % cfg.solver_order != 0
                                          or cfg.final_sigmas_type == "zero"):
            self.register_to_config(lower_order_final=True)
        self.order_list = self.get_order_list(self.num_inference_steps)
        self._group = None

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True, *, guidance_scale: float = 1.0,
             guidance_rescale: float = 0.0):
        """One singlestep DPM-Solver++ step of the order :attr:`order_list` gives it (lower where the group started
        later, as after ``set_begin_index``): one fused pass from the group's start state.  The SDE's noise is
        ``randn_tensor(shape, generator, dtype=model output's)`` as in diffusers, drawn where the step adds noise.
        ``guidance_scale``/``guidance_rescale`` with ``model_output=(cond, uncond)``: guidance inside the step (package
        docstring)."""
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) before step()")
        if self.config.variance_type in ("learned", "learned_range"):
            model_output = _first_half(model_output, sample)
        dtype = _dtype_of(model_output)
        k, sigma, sigma_next, f, opts = self._open(timestep, model_output, sample, guidance_scale, guidance_rescale)
        if sigma_next == sigma:  # a repeated timestep: nothing to integrate, and a new group after it
            self._group = None
            y, d = self._unchanged(sample, f, opts, sigma)
            return self._output(self._finish(y, sigma, k), d, return_dict, with_denoised=False)
        order = 1 if self._group is None else min(self.order_list[k], len(self._group[1]) + 1)
        if order == 1:
            self._group = ((sigma, sample), [])
        start, ds = self._group
        history = [*reversed(ds[len(ds) - (order - 1):]), start] if order > 1 else None
        sde = self.config.algorithm_type == "sde-dpmsolver++"
        noise = self._noise(sample, generator, dtype) if sde else None
        r = steps.sampler_step(_ROW.name, sample, f, sigma, sigma_next, history=history, order=order,
                               solver_type=self.config.solver_type, eta=float(sde), noise=noise, **opts)
        ds.append((sigma, r.denoised))
        return self._output(self._finish(r.y, sigma_next, k), r.denoised, return_dict, with_denoised=False)
