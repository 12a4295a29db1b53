"""The fused step as ``torch.library`` custom ops, so that ``torch.compile(fullgraph=True)`` traces a sampling loop
on any fused backend without a graph break (docs/design.md §3).  Eager calls do not come here: the custom-op layer
costs tens of microseconds per call, more than the kernel on small latents, so :mod:`zsnr_kernels.steps` calls the
backends directly unless ``torch.compiler.is_compiling()``.

``zsnr_kernels::step`` is functional (returns y_out, D and the LMS carry; unused outputs are empty tensors);
``zsnr_kernels::step_out`` writes y_out into a given tensor (which may be y: in place).  ``backend`` picks the
kernels: ``cpu`` (CPU tensors), ``cuda`` or ``triton`` (CUDA tensors; ``triton`` also on CPU tensors under
``TRITON_INTERPRET=1``).  The schema carries the scalar fields of the step record
(:mod:`zsnr_kernels.backends.call`): the op builds the record through the backend's own ``launch``, as an eager
call does, or runs the step's coefficient rows through its ``table_step``.  The sigma a step leaves at and
whether it is complete are host values the caller computes from the Python spec (:func:`fused_step_traced`),
and every error is raised by the spec before the op is reached.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import coefficients as co, noise as _noise
from ..parameterization import Parameterization
from . import layout, registry, table as _table
from .call import SAMPLER_CODES, SPACE_CODES, STEP_FIELDS, describe

_U64 = 2**64
_SPACES = {code: name for name, code in SPACE_CODES.items()}
_LMS = SAMPLER_CODES["lms"]


def _has_carry(want_carry: bool, sampler: int, table) -> bool:
    """Whether the op writes an LMS carry: asked for, and the step has one (in table mode the caller asks only for
    a step that has one)."""
    return want_carry and (table is not None or sampler == _LMS)


def _run(backend, y, f_cond, f_uncond, history, noise, y_out, want_d, want_carry, fields, sigmas, n_prev, seeds,
         step_index, table, draw, noise_slice):
    """Run the step on ``backend`` into ``y_out``: from the record's fields through the backend's ``launch`` (the
    launcher computes the coefficients), or from the coefficient rows ``table`` through its ``table_step``; returns
    (D or None, carry or None).  ``history`` holds the tensors the step reads; ``noise``/``seeds`` are given only
    when it adds noise (Philox: draw ``draw``, at the places of ``noise_slice``, [local, total, offset] or None)."""
    entry = registry.get(backend)
    if not entry.compiled:
        raise ValueError(f"zsnr_kernels::step: backend {backend!r} runs no compiled kernels; the op takes one of "
                         f"{tuple(b.name for b in registry.REGISTRY if b.compiled)}")
    module = entry.load()
    # the launchers take the seeds as host ints: a CPU seed tensor is read without waiting, a CUDA one waits here
    # (the CUDA and Triton launchers would take the device tensor's address instead: docs/design.md §2.9)
    seeds = None if seeds is None else [s % _U64 for s in seeds.tolist()]
    noise_slice = None if noise_slice is None else _noise.NoiseSlice(*noise_slice)
    carry = _has_carry(want_carry, fields[2], table)
    if table is None:
        if not hasattr(module, "launch"):
            raise ValueError(f"zsnr_kernels::step: the {backend} kernels read the step's coefficient rows: pass table")
        _, d, c, res = module.launch(y, f_cond, f_uncond, history, noise, seeds, step_index, fields, sigmas, n_prev,
                                     len(sigmas) // (4 + n_prev), want_d, carry, y_out, draw, noise_slice)
        if res is not None and res[0]:
            raise RuntimeError(f"zsnr_kernels::step: the {backend} kernels failed with code {res[0]} where the "
                               "Python spec did not")
        return d, c
    rows = torch.tensor(table, dtype=torch.float64).view(-1, _table.NUM_COEFFS)
    noisy = bool((rows[:, _table.E] != 0.0).any())
    d = torch.empty_like(y) if want_d else None
    c = torch.empty_like(y) if carry else None
    module.table_step(y, f_cond, f_uncond, history, layout.to_device(rows, y.device), guidance_scale=fields[8],
                      guidance_rescale=fields[9], rescale_space=_SPACES[fields[10]],
                      noise_mode=(1 if noise is not None else 2) if noisy else 0, noise=noise, seeds=seeds,
                      step_index=step_index, y_out=y_out, d_out=d, carry_out=c, draw=draw, noise_slice=noise_slice)
    return d, c


def _contiguous(y, f_cond, f_uncond, history, noise):
    return (y.contiguous(), f_cond.contiguous(), None if f_uncond is None else f_uncond.contiguous(),
            [h.contiguous() for h in history], None if noise is None else noise.contiguous())


@torch.library.custom_op("zsnr_kernels::step", mutates_args=())
def step(y: torch.Tensor, f_cond: torch.Tensor, f_uncond: Optional[torch.Tensor], history: list[torch.Tensor],
         noise: Optional[torch.Tensor], want_d: bool, want_carry: bool, backend: str, prediction: int,
         sigma_data: float, sampler: int, stage: int, solver_heun: int, order: int, eta: float, s_noise: float,
         sigmas: list[float], n_prev: int, guidance_scale: float, guidance_rescale: float, rescale_space: int,
         seeds: Optional[torch.Tensor], step_index: int, table: Optional[list[float]] = None, draw: int = 0,
         noise_slice: Optional[list[int]] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One fused step (the fields of the step record, :class:`zsnr_kernels.backends.call.StepCall`, plus the
    backend; ``table``: the step's float64 coefficient rows flattened, for a backend or sampler whose kernels do
    not compute coefficients; ``noise_slice``: the record's slice fields [local, total, offset], or None for the
    whole sample): (y_out, D, carry)."""
    y, f_cond, f_uncond, history, noise = _contiguous(y, f_cond, f_uncond, history, noise)
    y_out = torch.empty_like(y)
    fields = (prediction, sigma_data, sampler, stage, solver_heun, order, eta, s_noise, guidance_scale,
              guidance_rescale, rescale_space)
    d, carry = _run(backend, y, f_cond, f_uncond, history, noise, y_out, want_d, want_carry, fields, sigmas, n_prev,
                    seeds, step_index, table, draw, noise_slice)
    return y_out, (d if d is not None else y.new_empty(0)), (carry if carry is not None else y.new_empty(0))


@step.register_fake
def _(y, f_cond, f_uncond, history, noise, want_d, want_carry, backend, prediction, sigma_data, sampler, stage,
      solver_heun, order, eta, s_noise, sigmas, n_prev, guidance_scale, guidance_rescale, rescale_space, seeds,
      step_index, table=None, draw=0, noise_slice=None):
    like = lambda want: torch.empty_like(y, memory_format=torch.contiguous_format) if want else y.new_empty(0)  # noqa
    return like(True), like(want_d), like(_has_carry(want_carry, sampler, table))


@torch.library.custom_op("zsnr_kernels::step_out", mutates_args=("out",))
def step_out(out: torch.Tensor, y: torch.Tensor, f_cond: torch.Tensor, f_uncond: Optional[torch.Tensor],
             history: list[torch.Tensor], noise: Optional[torch.Tensor], backend: str, prediction: int,
             sigma_data: float, sampler: int, stage: int, solver_heun: int, order: int, eta: float, s_noise: float,
             sigmas: list[float], n_prev: int, guidance_scale: float, guidance_rescale: float, rescale_space: int,
             seeds: Optional[torch.Tensor], step_index: int, table: Optional[list[float]] = None, draw: int = 0,
             noise_slice: Optional[list[int]] = None) -> None:
    """The ``out=`` form: y_out written into ``out`` (contiguous, shaped like y; it may be y itself)."""
    if not out.is_contiguous():
        raise ValueError("out must be contiguous for zsnr_kernels::step_out")
    y, f_cond, f_uncond, history, noise = _contiguous(y, f_cond, f_uncond, history, noise)
    fields = (prediction, sigma_data, sampler, stage, solver_heun, order, eta, s_noise, guidance_scale,
              guidance_rescale, rescale_space)
    _run(backend, y, f_cond, f_uncond, history, noise, out, False, False, fields, sigmas, n_prev, seeds, step_index,
         table, draw, noise_slice)


@step_out.register_fake
def _(out, *args, **kwargs):
    return None


def fused_step_traced(backend: str, y, f_cond, f_uncond, history, pz: Parameterization, args: list,
                      sigma_eval: list, *, guidance_scale: float, guidance_rescale: float, rescale_space: str, noise,
                      seeds, step_index, want_denoised: bool, out, draw: int = 0, noise_slice=None):
    """A backend's ``fused_step`` through the ops above, for ``torch.compile``: the same arguments and results.

    The host values (sigma_out, complete) and every error come from the Python spec, which the kernels mirror.  A
    backend with a ``launch`` (cpu, cuda) gets the record's fields and computes the coefficients as an eager call
    does; the others (triton), and samplers the kernels do not know, get the spec's coefficient rows.
    """
    cs, n_hist, noisy = co.spec_step(pz, args, sigma_eval, len(history), noise is not None or seeds is not None)
    phi = guidance_rescale if f_uncond is not None else 0.0
    fields, sigmas, n_prev = describe(pz, args, sigma_eval, guidance_scale, phi, rescale_space)
    table = None
    if fields[2] < 0 or not hasattr(registry.module(backend), "launch"):
        table = [v for row in _table.step_rows(pz, cs, sigma_eval, guidance_scale=guidance_scale,
                                               guidance_rescale=phi, rescale_space=rescale_space) for v in row]
    if seeds is not None and not isinstance(seeds, torch.Tensor):  # a tensor (int64 bits) from a seed tensor is a
        seeds = torch.tensor(_noise.seed_bits(seeds), dtype=torch.int64)  # graph input, Python ints constants
    plan = dict(zip(STEP_FIELDS, fields, strict=True), backend=backend, sigmas=sigmas, n_prev=n_prev,
                seeds=seeds if noisy and noise is None else None,
                step_index=0 if step_index is None else int(step_index), table=table, draw=int(draw),
                noise_slice=None if noise_slice is None else list(noise_slice))
    history = list(history[:n_hist])
    noise = noise if noisy else None
    want_carry = cs[0].carry is not None
    if out is not None and out.is_contiguous() and not want_denoised and not want_carry:
        step_out(out, y, f_cond, f_uncond, history, noise, **plan)
        return out, None, None, [c.sigma_out for c in cs], cs[0].complete
    y_out, d, carry = step(y, f_cond, f_uncond, history, noise, want_denoised, want_carry, **plan)
    if out is not None:
        out.copy_(y_out)
        y_out = out
    return (y_out, d if want_denoised else None, carry if want_carry else None, [c.sigma_out for c in cs],
            cs[0].complete)


def fused_step(name: str):
    """What runs a step on backend ``name`` under ``torch.compile``: a compiled backend's op (so that the trace has
    no graph break), the torch reference itself.  Eager calls skip the op, which costs more than the kernel on small
    latents."""
    if not registry.get(name).compiled:
        return registry.FUSED[name]
    return lambda *args, **kwargs: fused_step_traced(name, *args, **kwargs)
