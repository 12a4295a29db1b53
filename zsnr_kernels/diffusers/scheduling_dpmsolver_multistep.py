"""``ZSNRDPMSolverMultistepScheduler``: diffusers' ``DPMSolverMultistepScheduler`` (``dpmsolver++``,
``sde-dpmsolver++``) on :func:`zsnr_kernels.dpmpp_2m_step`, :func:`~zsnr_kernels.dpmpp_2m_sde_step` and
:func:`~zsnr_kernels.dpmpp_3m_sde_step`.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import schedules, steps
from ._base import _interp_sigmas, _require, _StepIndexed, _steps_count, register_to_config

__all__ = ["ZSNRDPMSolverMultistepScheduler"]


class ZSNRDPMSolverMultistepScheduler(_StepIndexed):
    """``DPMSolverMultistepScheduler`` for ``algorithm_type="dpmsolver++"`` (DPM++ 2M, 3M) and
    ``"sde-dpmsolver++"`` (DPM++ 2M SDE), same config keys.

    ``solver_order`` 1-3 and ``solver_type`` ``midpoint``/``heun`` select the library's ``dpmpp_2m``,
    ``dpmpp_2m_sde`` (eta = 1 for the SDE, 0 for the ODE with ``heun``) and ``dpmpp_3m_sde`` steps, with diffusers'
    order schedule (``lower_order_final``, ``euler_at_final``, first order at a final sigma of 0).  The step from
    sigma = inf is first order and the remembered prediction from it carries weight 0 (docs/design.md §2.3).
    ``thresholding`` clips D; ``variance_type`` models keep the first half of their output channels.
    """

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
        owner = type(self).__name__
        self._check_options()
        _require(owner, "algorithm_type", algorithm_type, ("dpmsolver++", "sde-dpmsolver++"))
        _require(owner, "solver_type", solver_type, ("midpoint", "heun"))
        _require(owner, "solver_order", solver_order, (1, 2, 3))
        _require(owner, "final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        _require(owner, "variance_type", variance_type, (None, "learned", "learned_range"))
        self._init_tables(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                          beta_schedule=beta_schedule, trained_betas=trained_betas,
                          rescale_betas_zero_snr=rescale_betas_zero_snr, prediction_type=prediction_type)
        self._init_indexed()
        self.timesteps = self.timesteps.to(torch.int64)
        self._history: list[tuple[float, torch.Tensor]] = []
        self.lower_order_nums = 0

    def _timesteps(self, n: int) -> np.ndarray:
        """diffusers' DPM-Solver spacings: ``linspace``/``leading`` over n + 1 points without the last,
        ``trailing`` as DDIM; timesteps whose lambda = -log sigma is below ``lambda_min_clipped`` are cut off."""
        T = self.config.num_train_timesteps
        spacing, offset = self.config.timestep_spacing, self.config.steps_offset
        lam = -self._train_sigmas.log()
        last = T - int(torch.searchsorted(lam.flip(0), torch.tensor([self.config.lambda_min_clipped],
                                                                     dtype=torch.float64)).item())
        if last == T:
            if spacing == "trailing":
                return schedules.timesteps(n, T, spacing).numpy()
            return schedules.timesteps(n + 1, T, spacing, offset).numpy()[:-1]
        if spacing == "linspace":
            ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1]
        elif spacing == "leading":
            ts = (np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1] + offset
        else:
            ts = np.arange(last, 0, -T / n).round() - 1
        return ts[ts >= 0].astype(np.int64)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """diffusers' DPM-Solver timesteps and sigmas (Karras/exponential on request), then the final sigma."""
        T = self.config.num_train_timesteps
        num_inference_steps = _steps_count(num_inference_steps, T)
        ts = self._timesteps(num_inference_steps)
        sig = _interp_sigmas(self._train_sigmas, ts)
        if self.config.use_karras_sigmas or self.config.use_exponential_sigmas:
            # unlike the Euler family, diffusers' DPM-Solver spans the whole training table here
            ts, sig = self._grid(self._train_sigmas.flip(0), num_inference_steps,
                                 round_timesteps=self.config.use_karras_sigmas
                                 and self.config.beta_schedule != "squaredcos_cap_v2")
        last = self._train_sigmas[:1] if self.config.final_sigmas_type == "sigma_min" else sig.new_zeros(1)
        self._set_schedule(ts, torch.cat([sig, last]), device, torch.int64)
        self._history = []
        self.lower_order_nums = 0

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

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: torch.Generator | None = None, variance_noise: torch.Tensor | None = None,
             return_dict: bool = True):
        """One multistep DPM-Solver++ step; the SDE's noise is ``variance_noise`` or
        ``randn_tensor(shape, generator, dtype=float32)`` as in diffusers."""
        k = self._next_eval(timestep)
        sigma, sigma_next = float(self.sigmas[k]), float(self.sigmas[k + 1])
        if self.config.variance_type is not None and model_output.shape[1] == 2 * sample.shape[1]:
            model_output = model_output[:, : sample.shape[1]]
        f, prediction, _ = self._model_output(model_output, sample, sigma)
        order = self._order(k)
        self.lower_order_nums = min(self.lower_order_nums + 1, self.config.solver_order)
        if sigma_next == sigma:
            y, d = self._unchanged(sample, f, prediction, sigma)
            self._history = [(sigma, d)] + self._history[: self.config.solver_order - 2]
            return self._output(y, d, return_dict, with_denoised=False)
        history = self._history[: order - 1]
        sde = self.config.algorithm_type == "sde-dpmsolver++"
        opts = self._options(prediction)
        if sde:
            opts["noise"] = self._noise(sample, generator, torch.float32, variance_noise)
        if order == 3:
            r = steps.dpmpp_3m_sde_step(sample, f, sigma, sigma_next, history=history, eta=float(sde), **opts)
        elif sde or self.config.solver_type == "heun":
            r = steps.dpmpp_2m_sde_step(sample, f, sigma, sigma_next, history=history, eta=float(sde),
                                        solver_type=self.config.solver_type, **opts)
        else:
            r = steps.dpmpp_2m_step(sample, f, sigma, sigma_next, history=history, **opts)
        self._history = [(sigma, r.denoised)] + self._history[: self.config.solver_order - 2]
        return self._output(r.y, r.denoised, return_dict, with_denoised=False)
