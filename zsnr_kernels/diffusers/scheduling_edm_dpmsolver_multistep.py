"""``ZSNREDMDPMSolverMultistepScheduler``: diffusers' ``EDMDPMSolverMultistepScheduler`` on
:func:`zsnr_kernels.dpmpp_2m_step`, :func:`~zsnr_kernels.dpmpp_2m_sde_step` and
:func:`~zsnr_kernels.dpmpp_3m_sde_step`."""

from __future__ import annotations

import torch

from ..coefficients import SOLVER_TYPES
from ._base import _EDM_PREDICTIONS, _dtype_of, _EDMScheduler, register_to_config
from .scheduling_dpmsolver_multistep import _MultistepDPM

__all__ = ["ZSNREDMDPMSolverMultistepScheduler"]


class ZSNREDMDPMSolverMultistepScheduler(_MultistepDPM, _EDMScheduler):
    """``EDMDPMSolverMultistepScheduler`` (``dpmsolver++``: DPM++ 2M and 3M; ``sde-dpmsolver++``: DPM++ 2M SDE)
    with its config keys plus ``sigma_max_finite``: :class:`ZSNRDPMSolverMultistepScheduler`'s solver on EDM's
    grid and preconditioning (the update is the same, alpha = 1 in diffusers' EDM variant).

    ``sde-dpmsolver++`` with ``solver_order=3`` follows k-diffusion's ``sample_dpmpp_3m_sde`` (diffusers' EDM variant
    has no third-order SDE update and fails there).  Its SDE noise is drawn at every step that adds some, in the model
    output's dtype, as diffusers draws it.
    """

    _choices = {**_EDMScheduler._choices, "prediction_type": tuple(_EDM_PREDICTIONS),
                "algorithm_type": ("dpmsolver++", "sde-dpmsolver++"), "solver_type": SOLVER_TYPES}
    _aliases = {"algorithm_type": {"deis": "dpmsolver++"},
                "solver_type": dict.fromkeys(("logrho", "bh1", "bh2"), "midpoint")}

    @register_to_config
    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        sigma_schedule: str = "karras",
        num_train_timesteps: int = 1000,
        prediction_type: str = "epsilon",
        rho: float = 7.0,
        solver_order: int = 2,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        final_sigmas_type: str = "zero",
        sigma_max_finite: float | None = None,
    ):
        if isinstance(solver_order, bool) or not isinstance(solver_order, int) or solver_order < 1:
            raise ValueError(f"solver_order must be a positive int (orders above 3 step as 3, as in diffusers), got "
                             f"{solver_order!r}")
        super().__init__(num_train_timesteps)
        self._reset_history()

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None) -> None:
        """The grid of ``num_inference_steps`` sigmas, then the final sigma; timesteps c_noise."""
        sig = self._edm_sigmas(num_inference_steps)
        self._set_schedule(self.precondition_noise(sig[:-1]), sig, device)
        self._reset_history()

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True, *, guidance_scale: float = 1.0,
             guidance_rescale: float = 0.0):
        """One multistep DPM-Solver++ step; the SDE's noise is ``randn_tensor(shape, generator,
        dtype=model_output.dtype)`` as in diffusers.  ``guidance_scale``/``guidance_rescale`` with
        ``model_output=(cond, uncond)``: guidance inside the step (package docstring)."""
        return self._multistep(model_output, timestep, sample,
                               self._noise(sample, generator, _dtype_of(model_output)), return_dict,
                               guidance_scale, guidance_rescale)
