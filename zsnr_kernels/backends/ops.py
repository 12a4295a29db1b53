"""The fused step as ``torch.library`` custom ops, so that ``torch.compile(fullgraph=True)`` traces a sampling loop
on any fused backend without a graph break (docs/design.md §3).  Eager calls do not come here: the custom-op layer
costs tens of microseconds per call, more than the kernel on small latents, so :mod:`zsnr_kernels.steps` calls the
backends directly unless ``torch.compiler.is_compiling()``.

``zsnr_kernels::step`` is functional (returns y_out, D and the LMS carry; unused outputs are empty tensors);
``zsnr_kernels::step_out`` writes y_out into a given tensor (which may be y: in place).  ``backend`` picks the
kernels: ``cpu`` (CPU tensors), ``cuda`` or ``triton`` (CUDA tensors; ``triton`` also on CPU tensors under
``TRITON_INTERPRET=1``).  The step is described by plain numbers and lists (a schema torch.library can hold);
the op rebuilds the step arguments and calls the backend's own ``fused_step``.  The sigma a step leaves at and
whether it is complete are host values the caller computes from the Python spec (:func:`fused_step_traced`),
and every error is raised by the spec before the op is reached.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import coefficients as co, noise as _noise
from ..parameterization import Parameterization, parameterization
from . import cpu as _cpu

_U64 = 2**64
_PREDICTIONS = {code: name for name, code in _cpu.PREDICTION_CODES.items()}
_SAMPLERS = {code: name for name, code in _cpu.SAMPLER_CODES.items()}
_SPACES = {code: name for name, code in _cpu.SPACE_CODES.items()}


def _run(backend, y, f_cond, f_uncond, history, noise, y_out, want_d, want_carry, prediction, sigma_data, sampler,
         stage, solver_heun, order, eta, s_noise, sigmas, n_prev, guidance_scale, guidance_rescale, rescale_space,
         seeds, step_index):
    """Run the step on ``backend`` into ``y_out`` through that backend's ``fused_step`` (the eager path's own
    entry point, so the op and an eager call cannot differ); returns (D or None, carry or None)."""
    from . import cuda as _cuda, triton as _triton

    runs = {"cpu": _cpu.fused_step, "cuda": _cuda.fused_step, "triton": _triton.fused_step}
    if backend not in runs:
        raise ValueError(f"zsnr_kernels::step: unknown backend {backend!r}; choose one of {tuple(runs)}")
    pz = parameterization(_PREDICTIONS[prediction], sigma_data)
    sigma, sigma_eval, sigma_next, sigma_hat_next, sigma_prev = _cpu.split_sigma_block(sigmas, n_prev)
    args = [co.StepArgs(_SAMPLERS[sampler], sigma[i], sigma_next[i], stage=stage,
                        sigma_hat_next=None if sigma_hat_next[i] == sigma_next[i] else sigma_hat_next[i],
                        sigma_prev=sigma_prev[i], eta=eta, s_noise=s_noise,
                        solver_type="heun" if solver_heun else "midpoint", order=order) for i in range(len(sigma))]
    _, d, carry, _, _ = runs[backend](
        y, f_cond, f_uncond, history, pz, args, sigma_eval, guidance_scale=guidance_scale,
        guidance_rescale=guidance_rescale, rescale_space=_SPACES[rescale_space], noise=noise,
        seeds=None if seeds is None else [s % _U64 for s in seeds.tolist()], step_index=step_index,
        want_denoised=want_d, out=y_out)
    return d, carry if want_carry else None


def _contiguous(y, f_cond, f_uncond, history, noise):
    return (y.contiguous(), f_cond.contiguous(), None if f_uncond is None else f_uncond.contiguous(),
            [h.contiguous() for h in history], None if noise is None else noise.contiguous())


@torch.library.custom_op("zsnr_kernels::step", mutates_args=())
def step(y: torch.Tensor, f_cond: torch.Tensor, f_uncond: Optional[torch.Tensor], history: list[torch.Tensor],
         noise: Optional[torch.Tensor], want_d: bool, want_carry: bool, backend: str, prediction: int,
         sigma_data: float, sampler: int, stage: int, solver_heun: int, order: int, eta: float, s_noise: float,
         sigmas: list[float], n_prev: int, guidance_scale: float, guidance_rescale: float, rescale_space: int,
         seeds: Optional[torch.Tensor], step_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One fused step (the arguments of ``_C.fused_step``, plus the backend): (y_out, D, carry)."""
    y, f_cond, f_uncond, history, noise = _contiguous(y, f_cond, f_uncond, history, noise)
    y_out = torch.empty_like(y)
    d, carry = _run(backend, y, f_cond, f_uncond, history, noise, y_out, want_d, want_carry, prediction, sigma_data,
                    sampler, stage, solver_heun, order, eta, s_noise, sigmas, n_prev, guidance_scale, guidance_rescale,
                    rescale_space, seeds, step_index)
    return y_out, (d if d is not None else y.new_empty(0)), (carry if carry is not None else y.new_empty(0))


@step.register_fake
def _(y, f_cond, f_uncond, history, noise, want_d, want_carry, backend, prediction, sigma_data, sampler, *args):
    like = lambda want: torch.empty_like(y, memory_format=torch.contiguous_format) if want else y.new_empty(0)  # noqa
    return like(True), like(want_d), like(want_carry and _SAMPLERS[sampler] == "lms")  # only LMS has a carry


@torch.library.custom_op("zsnr_kernels::step_out", mutates_args=("out",))
def step_out(out: torch.Tensor, y: torch.Tensor, f_cond: torch.Tensor, f_uncond: Optional[torch.Tensor],
             history: list[torch.Tensor], noise: Optional[torch.Tensor], backend: str, prediction: int,
             sigma_data: float, sampler: int, stage: int, solver_heun: int, order: int, eta: float, s_noise: float,
             sigmas: list[float], n_prev: int, guidance_scale: float, guidance_rescale: float, rescale_space: int,
             seeds: Optional[torch.Tensor], step_index: int) -> None:
    """The ``out=`` form: y_out written into ``out`` (contiguous, shaped like y; it may be y itself)."""
    if not out.is_contiguous():
        raise ValueError("out must be contiguous for zsnr_kernels::step_out")
    y, f_cond, f_uncond, history, noise = _contiguous(y, f_cond, f_uncond, history, noise)
    _run(backend, y, f_cond, f_uncond, history, noise, out, False, False, prediction, sigma_data, sampler, stage,
         solver_heun, order, eta, s_noise, sigmas, n_prev, guidance_scale, guidance_rescale, rescale_space, seeds,
         step_index)


@step_out.register_fake
def _(out, *args):
    return None


def fused_step_traced(backend: str, y, f_cond, f_uncond, history, pz: Parameterization, args: list,
                      sigma_eval: list, *, guidance_scale: float, guidance_rescale: float, rescale_space: str, noise,
                      seeds, step_index, want_denoised: bool, out):
    """A backend's ``fused_step`` through the ops above, for ``torch.compile``: the same arguments and results.

    The host values (sigma_out, complete) and every error come from the Python spec, which the kernels mirror.
    """
    cs, _, _ = co.spec_step(pz, args, sigma_eval, len(history), noise is not None or seeds is not None)
    a0 = args[0]
    sigmas, n_prev = _cpu.sigma_block(args, sigma_eval)
    plan = dict(
        backend=backend, prediction=_cpu.PREDICTION_CODES[pz.prediction], sigma_data=pz.sigma_data,
        sampler=_cpu.SAMPLER_CODES[a0.sampler], stage=a0.stage, solver_heun=int(a0.solver_type == "heun"),
        order=a0.order, eta=a0.eta, s_noise=a0.s_noise, sigmas=sigmas, n_prev=n_prev,
        guidance_scale=guidance_scale, guidance_rescale=guidance_rescale if f_uncond is not None else 0.0,
        rescale_space=_cpu.SPACE_CODES[rescale_space],
        seeds=seeds if seeds is None or isinstance(seeds, torch.Tensor) else torch.tensor(
            _noise.seed_bits(seeds), dtype=torch.int64),  # a tensor (int64 bits): from a seed tensor, a graph input
        step_index=0 if step_index is None else int(step_index))
    want_carry = a0.sampler == "lms"
    if out is not None and out.is_contiguous() and not want_denoised and not want_carry:
        step_out(out, y, f_cond, f_uncond, list(history), noise, **plan)
        return out, None, None, [c.sigma_out for c in cs], cs[0].complete
    y_out, d, carry = step(y, f_cond, f_uncond, list(history), noise, want_denoised, want_carry, **plan)
    if out is not None:
        out.copy_(y_out)
        y_out = out
    return (y_out, d if want_denoised else None, carry if want_carry else None, [c.sigma_out for c in cs],
            cs[0].complete)
