"""The ``cpu`` backend: validated tensors and the step plan handed to the compiled module (csrc/cpu/step.h).

Everything is checked in Python before a pointer crosses the boundary (the steps module validated the values;
this module checks device and dtype, :mod:`zsnr_kernels._layout` the memory layout: the kernel sees each tensor
as ``[batch][n]``; other layouts are copied to contiguous and the result copied back into ``out``).
"""

from __future__ import annotations

import os

import torch

from .. import _validate, coefficients as co
from ..parameterization import Parameterization
from . import ext, layout

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
SAMPLER_CODES = {name: i for i, name in enumerate(co.SAMPLER_KINDS)}  # zsnr::SamplerKind order
PREDICTION_CODES = {"v": 0, "eps": 1, "x0": 2, "flow": 3}             # zsnr::Prediction
SPACE_CODES = {"output": 0, "v": 1, "x0": 2}                          # zsnr::RescaleSpace
_ERR_NEEDS_NOISE, _ERR_NEEDS_HISTORY, _ERR_MIXED_STAGES = 100, 101, 102


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


def sigma_block(args: list, sigma_eval: list) -> tuple[list, int]:
    """The sigmas of a step as the ``fused_step`` bindings take them (bindings.cpp ``set_sigmas``): one list
    [sigma | sigma_eval | sigma_next | sigma_hat_next (sigma_next where there is no churn) | sigma_prev
    ([n_prev][n_sigma])], each block one entry per entry of ``args``; and n_prev."""
    a0 = args[0]
    n_prev = len(a0.sigma_prev)
    if len(args) == 1:  # the common case, without the comprehensions (this runs on every step)
        return [a0.sigma, sigma_eval[0], a0.sigma_next,
                a0.sigma_next if a0.sigma_hat_next is None else a0.sigma_hat_next, *a0.sigma_prev], n_prev
    return ([a.sigma for a in args] + list(sigma_eval) + [a.sigma_next for a in args]
            + [a.sigma_next if a.sigma_hat_next is None else a.sigma_hat_next for a in args]
            + [a.sigma_prev[k] for k in range(n_prev) for a in args]), n_prev


def split_sigma_block(sigmas: list, n_prev: int) -> tuple[list, list, list, list, list]:
    """The inverse of :func:`sigma_block`: (sigma, sigma_eval, sigma_next, sigma_hat_next, sigma_prev), each one
    entry per entry of the block, sigma_prev's entries tuples of n_prev sigmas."""
    n = len(sigmas) // (4 + n_prev)
    sigma, sigma_eval, sigma_next, sigma_hat_next = (sigmas[k * n:(k + 1) * n] for k in range(4))
    prev = [tuple(sigmas[(4 + k) * n + i] for k in range(n_prev)) for i in range(n)]
    return sigma, sigma_eval, sigma_next, sigma_hat_next, prev


def fused_step(y, f_cond, f_uncond, history, pz: Parameterization, args: list, sigma_eval: list, *,
               guidance_scale: float, guidance_rescale: float, rescale_space: str, noise, seeds, step_index,
               want_denoised: bool, out):
    """Run one step.  Returns ``(y_out, denoised or None, carry or None, sigma_out list, complete)``, or raises
    the ValueError the torch path would raise (the Python spec is re-run on the failing sample for the message)."""
    a0 = args[0]
    philox = seeds is not None and noise is None
    (y_k, fc_k, fu_k, z_k, *hist_k), y_out = layout.prepare([y, f_cond, f_uncond, noise, *history], philox, out)
    batch = y.shape[0]
    d_out = torch.empty_like(y_k) if want_denoised else None
    carry_out = torch.empty_like(y_k) if a0.sampler == "lms" else None
    sigmas, n_prev = sigma_block(args, sigma_eval)
    res = ext.C.fused_step(  # pointers written out (0: none): this runs on every step
        DTYPE_CODES[y.dtype], batch, y.numel() // batch, y_k.data_ptr(), fc_k.data_ptr(),
        0 if fu_k is None else fu_k.data_ptr(), [h.data_ptr() for h in hist_k] if hist_k else [],
        0 if z_k is None else z_k.data_ptr(), y_out.data_ptr(), 0 if d_out is None else d_out.data_ptr(),
        0 if carry_out is None else carry_out.data_ptr(), PREDICTION_CODES[pz.prediction], pz.sigma_data,
        SAMPLER_CODES[a0.sampler], a0.stage, a0.solver_type == "heun", a0.order, a0.eta, a0.s_noise, sigmas,
        len(args), n_prev, guidance_scale, guidance_rescale if f_uncond is not None else 0.0,
        SPACE_CODES[rescale_space], [] if seeds is None else seeds, 0 if step_index is None else int(step_index), 0)
    error, complete, _noise_used, _n_hist, bad, sigma_out = res
    if error:
        _raise(error, pz, args, sigma_eval, bad, len(history))
    if out is not None and y_out is not out:  # the kernel wrote a temporary (another layout)
        y_out = layout.finish(y_out, out)
    return y_out, d_out, carry_out, sigma_out, bool(complete)


def _raise(error: int, pz, args, sigma_eval, bad: int, n_history: int):
    if error == _ERR_NEEDS_NOISE:
        raise ValueError(_validate.NEEDS_NOISE)
    if error == _ERR_NEEDS_HISTORY:
        raise ValueError(f"this step needs more history tensors than the {n_history} given")
    if error == _ERR_MIXED_STAGES:
        raise ValueError(_validate.MIXED_STAGES)
    i = max(bad, 0)
    co.step_coeffs(pz, args[i])          # raises the spec's message
    pz.denoise_coeffs(sigma_eval[i])
    raise RuntimeError(f"zsnr_kernels._C.fused_step failed with code {error} where the Python spec did not")


def set_num_threads(n: int | None) -> None:
    """Set how many OpenMP threads the ``cpu`` kernels use, for every Python thread; ``None`` restores OpenMP's
    default (``OMP_NUM_THREADS``, else one per core).

    Without it the kernels follow OpenMP's setting of the calling thread, which ``torch.set_num_threads`` also
    sets (PyTorch's wheel loads the libgomp these kernels then share); this setting applies to every Python
    thread and leaves PyTorch's alone.  On a busy machine fewer threads can be much faster (a waiting OpenMP
    thread spins: 2 threads were 4-8x slower than 1 at the video latent beside one other busy process on 2 cores).
    Results do not depend on the thread count.

    Fork: OpenMP cannot run a parallel region in a child process forked after the parent ran one (its thread pool
    is not copied, and the child hangs waiting for it, as a plain torch op on a large tensor hangs there).  The
    pool is PyTorch's libgomp, which these kernels share, so a parallel PyTorch op in the parent starts it as
    surely as these kernels do, and nothing here can tell whether one has run.  So every child forked from a
    process that imported zsnr_kernels runs these kernels on one thread: importing it registers an
    ``os.register_at_fork`` handler that calls ``set_num_threads(1)`` in the child (``os.fork``,
    ``multiprocessing``'s ``fork`` start method, the default on Linux before Python 3.14, and the children of a
    ``forkserver`` that preloads zsnr_kernels).  Call ``set_num_threads(n)`` in the child to use more threads only
    where the parent ran no parallel region, neither these kernels nor PyTorch ops; for PyTorch's own ops in the
    child call ``torch.set_num_threads(1)``.  Or start workers with the ``spawn`` method
    (``multiprocessing.get_context("spawn")``), or ``forkserver`` without preloading zsnr_kernels: a fresh
    process, free to use every thread.
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be a positive int (or None for OpenMP's default), got {n!r}")
    if not ext.available():
        raise RuntimeError(f"the cpu backend is unavailable: {ext.why_unavailable()}")
    ext.C.set_num_threads(0 if n is None else n)


def _single_thread_after_fork() -> None:
    """In a forked child: the kernels on the calling thread (see :func:`set_num_threads`)."""
    if ext.available():
        ext.C.set_num_threads(1)


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_single_thread_after_fork)


def get_num_threads() -> int:
    """How many OpenMP threads the ``cpu`` kernels use (1 when built without OpenMP or unavailable)."""
    return ext.C.num_threads() if ext.available() else 1
