"""``ZSNRUniPCMultistepScheduler``: diffusers' ``UniPCMultistepScheduler`` on :func:`zsnr_kernels.unipc_step`, whose one
fused pass per model evaluation does both the corrector of the previous step and the predictor of this one.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import steps
from ..coefficients import UNIPC_MAX_ORDER, UNIPC_VARIANTS
from ._base import _FLOW, REFUSED, _refuse, _StepIndexed, _ZSNRScheduler, register_to_config
from .scheduling_dpmsolver_multistep import _DPMSolverTimesteps

__all__ = ["ZSNRUniPCMultistepScheduler"]


class ZSNRUniPCMultistepScheduler(_DPMSolverTimesteps, _StepIndexed):
    """``UniPCMultistepScheduler`` with data prediction (``predict_x0=True``, diffusers' default), same config keys.

    ``solver_order`` 1-3 is the predictor's order (UniPC-p converges at order p + 1 with its corrector), warmed up
    from first order and lowered at the end with ``lower_order_final``, as diffusers does; ``solver_type`` is the
    variant ``bh1``/``bh2``; ``disable_corrector`` lists the steps whose result is not corrected.  The corrector
    needs no model evaluation of its own: it runs inside the next step's fused pass (:func:`zsnr_kernels.unipc_step`).
    With ``rescale_betas_zero_snr=True`` and ``trailing``/``linspace`` spacing the schedule starts at sigma = inf
    exactly (diffusers: sigma = 4096); the limits there are :func:`zsnr_kernels.coefficients.unipc`'s.  ``bh1``
    to a final sigma of 0 gives x0 = D of the last evaluation, where diffusers returns NaN (it multiplies
    B(h) = -inf by a zero residual).  A DPM-Solver or DEIS config switches over as in diffusers: its
    ``solver_type`` (``midpoint``, ``heun``, ``logrho``) becomes ``bh2``.

    Refused, with the reason: ``predict_x0=False`` (UniPC's noise-prediction form combines earlier noise
    predictions, which the fused steps do not keep), ``solver_p`` (another scheduler as predictor), orders above 3
    (the kernels read at most three remembered tensors), and the flow-matching options.
    """

    _timestep_dtype = torch.int64
    _choices = {**_ZSNRScheduler._choices, "solver_type": UNIPC_VARIANTS, "final_sigmas_type": ("zero", "sigma_min"),
                "predict_x0": (True,), "use_flow_sigmas": (False,), "use_dynamic_shifting": (False,)}
    _aliases = {"solver_type": dict.fromkeys(("midpoint", "heun", "logrho"), "bh2")}

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
        predict_x0: bool = True,
        solver_type: str = "bh2",
        lower_order_final: bool = True,
        disable_corrector: list[int] = [],  # noqa: B006 - diffusers' signature (register_to_config reads it)
        solver_p=None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: str = "zero",
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        shift_terminal: float | None = None,
    ):
        owner = type(self).__name__
        if solver_p is not None:
            raise _refuse(owner, "solver_p", type(solver_p).__name__,
                          "another scheduler as UniPC's predictor steps outside the fused pass; leave it None")
        if isinstance(solver_order, bool) or not isinstance(solver_order, int) or solver_order < 1:
            raise ValueError(f"solver_order must be a positive int, got {solver_order!r}")
        if solver_order > UNIPC_MAX_ORDER:
            raise _refuse(owner, "solver_order", solver_order, REFUSED[("solver_order", UNIPC_MAX_ORDER + 1)])
        if shift_terminal is not None:
            raise _refuse(owner, "shift_terminal", shift_terminal, _FLOW)
        super().__init__()
        self._reset_history()

    def _reset_history(self) -> None:
        self._history: list[tuple[float, torch.Tensor]] = []
        self.lower_order_nums = 0
        self.this_order = 0  # the order of the last predictor, which the next step corrects (0: none)
        self.last_sample = None

    def index_for_timestep(self, timestep, schedule_timesteps: torch.Tensor | None = None) -> int:
        """Index of ``timestep`` in ``timesteps`` (the second match when it occurs twice); a timestep not in the
        schedule is its last evaluation (diffusers' rule)."""
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        if not (schedule == timestep).any():
            return len(schedule) - 1
        return super().index_for_timestep(timestep, schedule)

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas: list[float] | None = None, mu: float | None = None) -> None:
        """diffusers' UniPC timesteps and sigmas (Karras/exponential/beta grids on request), then the final sigma.
        Custom ``sigmas`` and ``mu`` belong to the flow-matching options, as in diffusers."""
        owner = type(self).__name__
        if sigmas is not None:
            raise _refuse(owner, "sigmas", "[...]", "custom sigmas are a flow-matching option in diffusers' UniPC "
                          "(use_flow_sigmas=True): " + _FLOW)
        if mu is not None:
            raise _refuse(owner, "mu", mu, "it sets the flow shift of use_dynamic_shifting: "
                          + REFUSED[("use_dynamic_shifting", True)])
        self._set_schedule(*self._schedule(num_inference_steps), device)
        self._reset_history()

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, *,
             guidance_scale: float = 1.0, guidance_rescale: float = 0.0):
        """One UniPC step: the correction of the previous step's result (``sample``, where the model was just
        evaluated) and the predictor to the next noise level, in one fused pass.  ``guidance_scale``/
        ``guidance_rescale`` with ``model_output=(cond, uncond)``: guidance inside the step (package docstring)."""
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) before step()")
        k, sigma, sigma_next, f, opts = self._open(timestep, model_output, sample, guidance_scale, guidance_rescale)
        cfg, n = self.config, len(self._evals)
        corrector = self.this_order if k > 0 and (k - 1) not in cfg.disable_corrector and self._history else 0
        order = min(cfg.solver_order, n - k) if cfg.lower_order_final else cfg.solver_order
        order = min(order, self.lower_order_nums + 1)
        self.lower_order_nums = min(self.lower_order_nums + 1, cfg.solver_order)
        if sigma_next == sigma:
            # a repeated timestep: the sample stays, and so does the history (the next step then corrects nothing)
            y, d = self._unchanged(sample, f, opts, sigma)
            self.this_order = 0
            return self._output(self._finish(y, sigma, k), d, return_dict, with_denoised=False)
        r = steps.unipc_step(sample, f, sigma, sigma_next, history=self._history, order=order,
                             corrector=corrector, solver_type=cfg.solver_type, **opts)
        self._history = [(sigma, r.denoised)] + self._history[: UNIPC_MAX_ORDER - 1]
        self.this_order = order
        self.last_sample = sample
        return self._output(self._finish(r.y, sigma_next, k), r.denoised, return_dict, with_denoised=False)
