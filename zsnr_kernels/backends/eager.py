"""The ``torch`` backend: the Python spec's float64 coefficients, then :func:`zsnr_kernels.reference.fused_step`,
the eager PyTorch step every other backend is checked against.  Any device, any float dtype, differentiable."""

from __future__ import annotations

import math

import torch

from .. import _validate, coefficients as co, noise as _noise, reference
from ..parameterization import Parameterization, rescale_space_coeffs
from . import table as _table


def not_supported_reasons(y: torch.Tensor) -> list[str]:
    """The reference runs every step (empty)."""
    return []


def _column(vals: list[float], per_sample: bool):
    """One value for the batch (a float), or a (B,) float64 tensor of per-sample values."""
    return torch.tensor(vals, dtype=torch.float64) if per_sample else vals[0]


def fused_step(y, f_cond, f_uncond, history, pz: Parameterization, args: list, sigma_eval: list, *,
               guidance_scale: float, guidance_rescale: float, rescale_space: str, noise, seeds, step_index,
               want_denoised: bool, out, draw: int = 0, noise_slice=None):
    """Run one step.  Returns ``(y_out, denoised, carry or None, sigma_out list, complete)``; raises the spec's
    ValueError for a step it refuses.  ``noise`` may be a function returning the noise tensor: it is called only
    when a sample adds noise.  Philox noise (``seeds``) is draw ``draw`` of step ``step_index``, each element at its
    place in ``noise_slice`` (a :class:`zsnr_kernels.noise.NoiseSlice`; None: the whole sample), as in the kernels.
    With sigmas on the device (one StepArgs of (B,) tensors, §2.9) the coefficients are computed there and
    ``sigma_out`` is a (B,) tensor (:func:`_device_step`)."""
    if noise_slice is not None:  # refused alike whether or not the step draws noise, as on every backend
        _noise.check_slice(noise_slice, math.prod(y.shape[1:]))
    if type(args[0].sigma) is not float and isinstance(args[0].sigma, torch.Tensor):
        return _device_step(y, f_cond, f_uncond, history, pz, args[0], sigma_eval, guidance_scale=guidance_scale,
                            guidance_rescale=guidance_rescale, rescale_space=rescale_space, noise=noise, seeds=seeds,
                            step_index=step_index, out=out, draw=draw, noise_slice=noise_slice)
    cs = [co.step_coeffs(pz, a) for a in args]
    per_sample = len(cs) > 1
    n_hist = _validate.step_coeffs(cs, len(history))
    pq = [pz.denoise_coeffs(s) for s in sigma_eval]
    phi = guidance_rescale
    uv = [rescale_space_coeffs(pz, s, rescale_space) for s in sigma_eval] if phi else [(0.0, 1.0)]
    col = lambda vals: _column(list(vals), per_sample)  # noqa: E731
    h = tuple(col(c.h[k] if k < len(c.h) else 0.0 for c in cs) for k in range(n_hist))
    e, z = 0.0, None
    if any(c.e != 0.0 for c in cs):
        e = col(c.e for c in cs)
        z = noise_tensor(y, noise, seeds, step_index, draw, noise_slice)
    carry = None
    if cs[0].carry is not None:
        carry = (col(c.carry[0] for c in cs), col(c.carry[1] for c in cs))
    a, b, u_f, g_f = col(c.a for c in cs), col(c.b for c in cs), 0.0, 0.0
    if any(c.b_u != 0.0 or c.carry_u != 0.0 for c in cs):
        # CFG++'s D_u term folded as the coefficient table folds it (table.fold_uncond): the same numbers as a plan
        folded = [_table.fold_uncond(c, pv, qv, guidance_scale != 1.0) for c, (pv, qv) in
                  zip(cs, pq if per_sample else pq[:1])]
        a, b, u_f = (col(f[k] for f in folded) for k in range(3))
        if carry is not None:
            carry, g_f = (col(f[3] for f in folded), col(f[4] for f in folded)), col(f[5] for f in folded)
    y_out, d, carry_out = reference.fused_step(
        y, f_cond, f_uncond,
        p=col(v[0] for v in pq), q=col(v[1] for v in pq), a=a, b=b,
        history=tuple(history[:n_hist]), h=h, noise=z, e=e, guidance_scale=guidance_scale, guidance_rescale=phi,
        rescale_uv=(col(v[0] for v in uv), col(v[1] for v in uv)) if per_sample and phi else uv[0],
        carry=carry, u_f=u_f if f_uncond is not None else 0.0, g_f=g_f if f_uncond is not None else 0.0)
    if out is not None:
        y_out = out.copy_(y_out)
    return y_out, d, carry_out, [c.sigma_out for c in cs], cs[0].complete


def _device_step(y, f_cond, f_uncond, history, pz: Parameterization, a, sigma_eval: torch.Tensor, *,
                 guidance_scale: float, guidance_rescale: float, rescale_space: str, noise, seeds, step_index, out,
                 draw: int = 0, noise_slice=None):
    """:func:`fused_step` from sigmas on the device: :func:`zsnr_kernels.coefficients.step_coeffs_tensor`, every
    value check on the device.  A sample that fails one (the ``ok`` of the coefficients; a NaN or negative
    sigma_eval, which the second-stage checks also give; eps at sigma = inf; a step that adds noise with neither
    noise= nor seed=) gets NaN for p, a and its sigma_out, so its y, D and carry are NaN, and so is the rest of its
    run: the status the caller reads when it synchronises anyway (``torch.isfinite``), as the kernels report."""
    c = co.step_coeffs_tensor(pz, a)
    p, q = co.denoise_coeffs_tensor(pz, sigma_eval)
    ok = c.ok & (sigma_eval >= 0.0)
    if pz.prediction == "eps":
        ok = ok & (sigma_eval != float("inf"))
    z, e = None, 0.0
    if c.noisy:  # some sample may add noise: draw it for all (e is 0 where a sample adds none)
        if noise is not None or seeds is not None:
            z, e = noise_tensor(y, noise, seeds, step_index, draw, noise_slice), c.e
        else:
            ok = ok & (c.e == 0.0)
    bad = lambda v: torch.where(ok, v, torch.nan)  # noqa: E731
    uv = (0.0, 1.0)
    if guidance_rescale and f_uncond is not None:
        uv = co.rescale_space_coeffs_tensor(pz, sigma_eval, rescale_space)
    y_out, d, carry = reference.fused_step(
        y, f_cond, f_uncond, p=bad(p), q=q, a=bad(c.a), b=c.b, history=tuple(history[:len(c.h)]), h=c.h, noise=z,
        e=e, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, rescale_uv=uv, carry=c.carry,
        b_u=c.b_u, carry_u=c.carry_u)
    if out is not None:
        y_out = out.copy_(y_out)
    return y_out, d, carry, bad(c.sigma_out), c.complete


def noise_tensor(y: torch.Tensor, noise=None, seed=None, step_index=None, draw: int = 0,
                 noise_slice=None) -> torch.Tensor:
    """The unit noise of a step: ``noise`` (a tensor shaped like y, or a function returning one), else the Philox
    noise of ``seed`` at ``step_index`` and ``draw`` (docs/design.md §2.8) in y's compute dtype, each element at its
    place in ``noise_slice`` (:class:`zsnr_kernels.noise.NoiseSlice`; None: the whole sample)."""
    if callable(noise):
        noise = noise()
    if noise is not None:
        return _validate.tensor("noise", noise, y)
    if seed is None:
        raise ValueError(_validate.NEEDS_NOISE)
    if step_index is None:
        raise ValueError("seed= needs step_index= (the index of the step in the schedule) to pick the noise")
    # the float32 normals enter the math unrounded, as in the kernels (rounding them to a bf16 y would add error)
    return _noise.normal(tuple(y.shape), seed, int(step_index), draw, dtype=reference.compute_dtype(y.dtype),
                         device=y.device, noise_slice=noise_slice)


def plan_state(shape, dtype, device, seeds):
    """What a :class:`zsnr_kernels.SamplingPlan` keeps for its steps on this backend: its seeds (or None)."""
    return None if seeds is None else list(seeds)


def table_step(y, f_cond, f_uncond, history, table, *, guidance_scale: float, guidance_rescale: float,
               rescale_space: str, noise_mode: int, noise=None, seeds=None, step_index=0, y_out, d_out=None,
               carry_out=None, state=None, draw: int = 0, noise_slice=None) -> None:
    """One step from float64 coefficient rows (``[1 or batch, NUM_COEFFS]`` on y's device): the reference with the
    table's columns as device tensors, so a step reads no device value on the host.  ``history`` exactly the tensors
    the rows weight; ``noise_mode``: 0 none, 1 ``noise``, 2 the Philox noise of ``seeds`` (or the plan's ``state``)
    at ``step_index`` and ``draw``, each element at its place in ``noise_slice`` (None: the whole sample), computed
    with PyTorch ops.  Writes y_out (, D, carry)."""
    from . import table as _table

    if noise_slice is not None:  # refused alike whether or not the step draws noise, as on every backend
        _noise.check_slice(noise_slice, math.prod(y.shape[1:]))
    col = lambda j: table[:, j]  # noqa: E731 -- (1,) broadcasts over the batch, (batch,) is per sample
    z = None
    if noise_mode == 1:
        z = noise
    elif noise_mode == 2:
        z = _noise.normal(tuple(y.shape), state if state is not None else seeds, int(step_index), draw,
                          dtype=reference.compute_dtype(y.dtype), device=y.device, noise_slice=noise_slice)
    y_new, d, carry = reference.fused_step(
        y, f_cond, f_uncond, p=col(_table.P), q=col(_table.Q), a=col(_table.A), b=col(_table.B),
        history=tuple(history), h=tuple(col(_table.H0 + j) for j in range(len(history))), noise=z,
        e=col(_table.E) if z is not None else 0.0, guidance_scale=guidance_scale,
        guidance_rescale=guidance_rescale if f_uncond is not None else 0.0, rescale_uv=(col(_table.U), col(_table.T)),
        carry=(col(_table.GY), col(_table.GD)) if carry_out is not None else None,
        u_f=col(_table.BFU) if f_uncond is not None else 0.0,
        g_f=col(_table.GFU) if carry_out is not None and f_uncond is not None else 0.0)
    y_out.copy_(y_new)
    if d_out is not None:
        d_out.copy_(d)
    if carry_out is not None:
        carry_out.copy_(carry)
