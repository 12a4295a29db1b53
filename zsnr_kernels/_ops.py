"""The fused CPU step as a ``torch.library`` custom op, so ``torch.compile(fullgraph=True)`` traces a sampling loop
without a graph break (DESIGN §3).  Eager calls do not come here: the custom-op layer costs tens of microseconds
per call, more than the kernel on small latents, so :mod:`zsnr_kernels.steps` calls the compiled module directly
unless ``torch.compiler.is_compiling()``.

``zsnr_kernels::cpu_step`` is functional (returns y_out, D and the LMS carry; unused outputs are empty tensors);
``zsnr_kernels::cpu_step.out`` writes y_out into a given tensor (which may be y: in place).  The sigma a step
leaves at and whether it is complete are host values the caller computes from the Python spec
(``coefficients.step_coeffs``); the op computes the same coefficients in C++ from the same arguments.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _cpu, _ext

_U64 = 2**64


def _run(y, f_cond, f_uncond, history, noise, y_out, want_d, want_carry, prediction, sigma_data, sampler, stage,
         solver_heun, order, eta, s_noise, sigma, sigma_eval, sigma_next, sigma_hat_next, sigma_prev, n_prev,
         guidance_scale, guidance_rescale, rescale_space, seeds, step_index):
    d_out = torch.empty_like(y) if want_d else None
    carry_out = torch.empty_like(y) if want_carry else None
    res = _ext.C.fused_step(
        _cpu.DTYPE_CODES[y.dtype], y.shape[0], y.numel() // y.shape[0], y.data_ptr(), f_cond.data_ptr(),
        0 if f_uncond is None else f_uncond.data_ptr(), [h.data_ptr() for h in history],
        0 if noise is None else noise.data_ptr(), y_out.data_ptr(), 0 if d_out is None else d_out.data_ptr(),
        0 if carry_out is None else carry_out.data_ptr(), prediction, sigma_data, sampler, stage, solver_heun, order,
        eta, s_noise, sigma, sigma_eval, sigma_next, sigma_hat_next, sigma_prev, n_prev, guidance_scale,
        guidance_rescale, rescale_space, [s % _U64 for s in seeds], step_index, 0)
    if res[0]:
        raise ValueError(f"zsnr_kernels::cpu_step failed with code {res[0]} (the eager call names the cause)")
    return (d_out if d_out is not None else y.new_empty(0)), (carry_out if carry_out is not None else y.new_empty(0))


@torch.library.custom_op("zsnr_kernels::cpu_step", mutates_args=())
def cpu_step(y: torch.Tensor, f_cond: torch.Tensor, f_uncond: Optional[torch.Tensor], history: list[torch.Tensor],
             noise: Optional[torch.Tensor], want_d: bool, want_carry: bool, prediction: int, sigma_data: float,
             sampler: int, stage: int, solver_heun: int, order: int, eta: float, s_noise: float,
             sigma: list[float], sigma_eval: list[float], sigma_next: list[float], sigma_hat_next: list[float],
             sigma_prev: list[float], n_prev: int, guidance_scale: float, guidance_rescale: float,
             rescale_space: int, seeds: list[int], step_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One fused step on contiguous CPU tensors (the arguments of ``_C.fused_step``): (y_out, D, carry)."""
    y, f_cond = y.contiguous(), f_cond.contiguous()
    f_uncond = None if f_uncond is None else f_uncond.contiguous()
    history = [h.contiguous() for h in history]
    noise = None if noise is None else noise.contiguous()
    y_out = torch.empty_like(y)
    d, carry = _run(y, f_cond, f_uncond, history, noise, y_out, want_d, want_carry, prediction, sigma_data, sampler,
                    stage, solver_heun, order, eta, s_noise, sigma, sigma_eval, sigma_next, sigma_hat_next,
                    sigma_prev, n_prev, guidance_scale, guidance_rescale, rescale_space, seeds, step_index)
    return y_out, d, carry


@cpu_step.register_fake
def _(y, f_cond, f_uncond, history, noise, want_d, want_carry, *args):
    like = lambda want: torch.empty_like(y, memory_format=torch.contiguous_format) if want else y.new_empty(0)  # noqa
    return like(True), like(want_d), like(want_carry)


@torch.library.custom_op("zsnr_kernels::cpu_step_out", mutates_args=("out",))
def cpu_step_out(out: torch.Tensor, y: torch.Tensor, f_cond: torch.Tensor, f_uncond: Optional[torch.Tensor],
                 history: list[torch.Tensor], noise: Optional[torch.Tensor], prediction: int, sigma_data: float,
                 sampler: int, stage: int, solver_heun: int, order: int, eta: float, s_noise: float,
                 sigma: list[float], sigma_eval: list[float], sigma_next: list[float], sigma_hat_next: list[float],
                 sigma_prev: list[float], n_prev: int, guidance_scale: float, guidance_rescale: float,
                 rescale_space: int, seeds: list[int], step_index: int) -> None:
    """The ``out=`` form: y_out written into ``out`` (contiguous, shaped like y; it may be y itself)."""
    if not out.is_contiguous():
        raise ValueError("out must be contiguous for zsnr_kernels::cpu_step_out")
    _run(y.contiguous(), f_cond.contiguous(), None if f_uncond is None else f_uncond.contiguous(),
         [h.contiguous() for h in history], None if noise is None else noise.contiguous(), out, False, False,
         prediction, sigma_data, sampler, stage, solver_heun, order, eta, s_noise, sigma, sigma_eval, sigma_next,
         sigma_hat_next, sigma_prev, n_prev, guidance_scale, guidance_rescale, rescale_space, seeds, step_index)


@cpu_step_out.register_fake
def _(out, *args):
    return None
