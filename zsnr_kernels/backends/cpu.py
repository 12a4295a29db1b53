"""The ``cpu`` backend: validated tensors and the step plan handed to the compiled module (csrc/cpu/step.h).

Everything is checked in Python before a pointer crosses the boundary (the steps module validated the values;
this module checks device and dtype, :mod:`zsnr_kernels.backends.layout` the memory layout: the kernel sees each tensor
as ``[batch][n]``; other layouts are copied to contiguous and the result copied back into ``out``).
"""

from __future__ import annotations

import torch

from .. import _validate, coefficients as co
from ..parameterization import Parameterization
from . import device as _device, ext, layout
from . import table as _table
from .call import (DTYPE_CODES, ERR_MIXED_STAGES, ERR_NEEDS_HISTORY, ERR_NEEDS_NOISE, MAX_HISTORY, SAMPLER_CODES,
                   SPACE_CODES, TABLE_STEP, describe, step_call)


def not_supported_reasons(y: torch.Tensor) -> list[str]:
    """Why the compiled CPU kernels cannot run a step on ``y`` (empty when they can)."""
    reasons = []
    if not ext.available():
        reasons.append(ext.why_unavailable() or "zsnr_kernels._C is not built")
    if y.device.type != "cpu":
        reasons.append(f"y is on {y.device}, the cpu backend runs on CPU tensors")
    if y.dtype not in DTYPE_CODES:
        reasons.append(f"the cpu kernels store float32, float16 and bfloat16, not {y.dtype} (float64 runs on "
                       "the torch reference)")
    if y.numel() == 0:
        reasons.append("y is empty")
    return reasons


def fused_step(y, f_cond, f_uncond, history, pz: Parameterization, args: list, sigma_eval: list, *,
               guidance_scale: float, guidance_rescale: float, rescale_space: str, noise, seeds, step_index,
               want_denoised: bool, out, draw: int = 0, noise_slice=None):
    """Run one step.  Returns ``(y_out, denoised or None, carry or None, sigma_out list, complete)``, or raises
    the ValueError the torch path would raise (the Python spec is re-run on the failing sample for the message).
    Philox noise (``seeds``) is draw ``draw`` of step ``step_index``, each element at its place in ``noise_slice``
    (a :class:`zsnr_kernels.noise.NoiseSlice` with whole groups; None: the whole sample).

    A sampler the kernels do not know (not in ``coefficients.SAMPLER_KINDS``) runs from the Python spec's
    coefficient table (:func:`table_step`)."""
    a0 = args[0]
    if a0.sampler not in SAMPLER_CODES:
        return _device.spec_table_step(table_step, y, f_cond, f_uncond, history, pz, args, sigma_eval,
                                       guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                                       rescale_space=rescale_space, noise=noise, seeds=seeds, step_index=step_index,
                                       want_denoised=want_denoised, out=out,
                                       backend="cpu", draw=draw, noise_slice=noise_slice)
    fields, sigmas, n_prev = describe(pz, args, sigma_eval, guidance_scale, guidance_rescale, rescale_space)
    y_out, d_out, carry_out, (error, complete, bad, sigma_out) = launch(  # positional: this runs on every step
        y, f_cond, f_uncond, history, noise, seeds, step_index, fields, sigmas, n_prev, len(args), want_denoised,
        a0.sampler == "lms", out, draw, noise_slice)
    if error:
        _raise(error, pz, args, sigma_eval, bad, len(history))
    return y_out, d_out, carry_out, sigma_out, bool(complete)


def launch(y, f_cond, f_uncond, history, noise, seeds, step_index, fields: tuple, sigmas: list, n_prev: int,
           n_sigma: int, want_denoised: bool, want_carry: bool, out, draw: int = 0, noise_slice=None):
    """One step from its record's fields and sigma block (:func:`zsnr_kernels.backends.call.describe`): the tensors
    laid out, the outputs allocated, the record built and run by ``_C.fused_step`` (Philox noise: draw ``draw``, at
    ``noise_slice``'s places).  Returns ``(y_out, D or None, carry or None, (error, complete, bad_sample,
    sigma_out))``; y_out is ``out`` when given."""
    philox = seeds is not None and noise is None
    inputs, y_out = layout.prepare([y, f_cond, f_uncond, noise, *history[:MAX_HISTORY]], philox, out)
    y_k, fc_k, fu_k, z_k, *hist_k = inputs  # alive until the kernel has read them (copies where a layout needed)
    d_out = torch.empty_like(y_k) if want_denoised else None
    carry_out = torch.empty_like(y_k) if want_carry else None
    res = ext.C.fused_step(step_call(y_k, fc_k, fu_k, hist_k, z_k, y_out, d_out, carry_out, fields, n_sigma, n_prev,
                                     sigmas, 0, 0 if seeds is None else seeds, step_index, draw,
                                     noise_slice=noise_slice))
    if out is not None and y_out is not out:  # the kernel wrote a temporary (another layout)
        y_out = layout.finish(y_out, out)
    return y_out, d_out, carry_out, res


def plan_state(shape, dtype, device, seeds):
    """What a :class:`zsnr_kernels.SamplingPlan` keeps for its steps on this backend: its seeds as the kernels read
    them (or None)."""
    return None if seeds is None else list(seeds)


def table_step(y, f_cond, f_uncond, history, table, *, guidance_scale: float, guidance_rescale: float,
               rescale_space: str, noise_mode: int, noise=None, seeds=None, step_index=0, y_out, d_out=None,
               carry_out=None, state=None, draw: int = 0, noise_slice=None) -> None:
    """One step of contiguous ``[batch][n]`` tensors from float64 coefficient rows (table mode of csrc/cpu/step.h):
    ``table`` a contiguous ``[1 or batch, NUM_COEFFS]`` CPU tensor (:mod:`zsnr_kernels.backends.table`), ``history``
    exactly the tensors its rows weight.  ``noise_mode``: 0 none, 1 ``noise``, 2 Philox from ``seeds`` (uint64 per
    sample) or the plan's ``state`` (:func:`plan_state`) at ``step_index`` and ``draw``, each element at its place
    in ``noise_slice`` (a :class:`zsnr_kernels.noise.NoiseSlice` with whole groups; None: the whole sample).  Writes
    y_out (, D, carry)."""
    if noise_mode == 2:
        seed_arg = state if state is not None else list(seeds)
    else:
        seed_arg = 0
    fields = (*TABLE_STEP, guidance_scale, guidance_rescale, SPACE_CODES[rescale_space])
    call = step_call(y, f_cond, f_uncond, history, noise if noise_mode == 1 else None, y_out, d_out, carry_out,
                     fields, table.shape[0], 0, 0, _table.address(table, y), seed_arg, step_index, draw,
                     noise_slice=noise_slice)
    error = ext.C.fused_step(call)[0]
    if error:
        raise RuntimeError(f"zsnr_kernels._C.fused_step failed with code {error} on a coefficient table")


def _raise(error: int, pz, args, sigma_eval, bad: int, n_history: int):
    if error == ERR_NEEDS_NOISE:
        raise ValueError(_validate.NEEDS_NOISE)
    if error == ERR_NEEDS_HISTORY:
        raise ValueError(f"this step needs more history tensors than the {n_history} given")
    if error == ERR_MIXED_STAGES:
        raise ValueError(_validate.MIXED_STAGES)
    i = max(bad, 0)
    co.step_coeffs(pz, args[i])          # raises the spec's message
    pz.denoise_coeffs(sigma_eval[i])
    raise RuntimeError(f"zsnr_kernels._C.fused_step failed with code {error} where the Python spec did not")


def set_num_threads(n: int | None) -> None:
    """Set how many threads the ``cpu`` kernels use, for every Python thread; ``None`` restores the default,
    OpenMP's setting of the calling thread (``OMP_NUM_THREADS``, else one per core; ``torch.set_num_threads`` sets
    it too, since PyTorch's wheel loads the same libgomp).  This setting applies to every Python thread and leaves
    PyTorch's alone.  Results do not depend on the thread count.

    The kernels run on a thread pool of their own (``csrc/cpu/thread_pool.h``), not in OpenMP loops: the calling
    thread takes the fixed chunks of a step itself and waits only for chunks a pool thread has already started, so
    a pool thread that the OS has parked behind another busy process does not hold the step up (an OpenMP loop
    ends in a barrier that waits for it).  Measured beside busy processes on a 2-core machine (load 7-8, the
    guided, rescaled step at the video latent): 2 threads took 0.91x the 1-thread mean, where the OpenMP loops took
    4.7-5.9x.

    Fork: a child forked from a process that ran these kernels starts a pool of its own (the parent's pool threads
    are not copied) and keeps the parent's setting.  The compiled module runs no OpenMP parallel region (OpenMP
    gives only the default thread count), so its steps cannot hang in a child the way an OpenMP loop does after
    the parent ran one.  PyTorch's parallel ops can, and a step runs some: the copy of a tensor whose layout the
    kernels cannot read (``layout.prepare``), the ``torch`` backend, ``noise.normal``.  In a child forked after the
    parent ran parallel PyTorch work, call ``torch.set_num_threads(1)`` before those, and ``set_num_threads(n)``
    for these kernels (``torch.set_num_threads`` sets their default too: OpenMP's setting, which both read); or
    start workers with the ``spawn`` method (``multiprocessing.get_context("spawn")``).
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be a positive int (or None for the default), got {n!r}")
    if not ext.available():
        raise RuntimeError(f"the cpu backend is unavailable: {ext.why_unavailable()}")
    ext.C.set_num_threads(0 if n is None else n)


def get_num_threads() -> int:
    """How many threads the ``cpu`` kernels use (1 where the cpu backend is unavailable)."""
    return ext.C.num_threads() if ext.available() else 1
