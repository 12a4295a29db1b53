"""The float64 coefficient table: the one coefficient record every backend's ``table_step`` reads (the Triton kernels,
the CUDA and CPU launchers in table mode, the torch reference) and :class:`zsnr_kernels.SamplingPlan` builds.

One row per sample (or one for the whole batch) of ``NUM_COEFFS`` float64 columns: the element pass reads
w .. g_d, b_fu and g_fu, rounded to float32 (``table_coeffs`` in csrc/include/zsnr/step_plan.h, whose
``CoeffColumn`` these columns are); the guidance-rescale fold reads p, q, u, t in float64 (and w, phi: the Triton
kernels from the row, the C++ launchers from the step record, into which the callers write the same values).

CFG++ (:class:`zsnr_kernels.coefficients.StepCoeffs` ``b_u``, ``carry_u``: the weights of the unconditional denoised
D_u = p y + q F_u in y_out and in the carry) is folded here, on the host, in float64, with the row's raw p, q (the
guidance rescale, folded into p, q by the kernels, acts on the guided D only): where the step has a separate
unconditional output (w != 1: a single output is refused there, and a pair at w = 1 is F_c alone) the row holds
a + b_u p in A, b_u q in ``BFU`` (the weight of F_u), g_y + carry_u p in GY and carry_u q in ``GFU``; where D_u = D
(w = 1), b + b_u in B and g_d + carry_u in GD.  So the element pass reads one more coefficient, on F_u, and F_u
itself, which a guided step reads anyway.  BFU = GFU = 0 for every other sampler.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..parameterization import rescale_space_coeffs

#: column indices (zsnr::CoeffColumn; the Triton kernels read these names)
W, P, Q, A, B, H0, H1, H2, E, GY, GD, U, T, PHI, BFU, GFU = range(16)
#: the row stride (16 doubles: rows 128-byte aligned)
NUM_COEFFS = 16


def coefficient_rows(coeffs: Sequence, denoise: Sequence, *, guidance_scale: float = 1.0,
                     guidance_rescale: float = 0.0, rescale_uv: Sequence | None = None) -> list[list[float]]:
    """The rows of :func:`coefficient_table` as Python floats (what a traced step hands the ``torch.library`` op)."""
    uv = rescale_uv if rescale_uv is not None else [(0.0, 1.0)] * len(coeffs)
    rows = []
    for c, (p, q), (u, t) in zip(coeffs, denoise, uv, strict=True):
        row = [0.0] * NUM_COEFFS
        row[W], row[P], row[Q], row[A], row[B], row[E] = guidance_scale, p, q, c.a, c.b, c.e
        for k, hk in enumerate(c.h):
            row[H0 + k] = hk
        if c.carry is not None:
            row[GY], row[GD] = c.carry
        row[U], row[T], row[PHI] = u, t, guidance_rescale
        if c.b_u != 0.0 or c.carry_u != 0.0:
            row[A], row[B], row[BFU], gy, gd, row[GFU] = fold_uncond(c, p, q, guidance_scale != 1.0)
            if c.carry is not None:
                row[GY], row[GD] = gy, gd
        rows.append(row)
    return rows


def fold_uncond(c, p: float, q: float, separate: bool) -> tuple[float, float, float, float, float, float]:
    """The element-pass weights ``(a, b, u_f, g_y, g_d, g_f)`` of StepCoeffs ``c`` with its D_u terms folded in
    (see the module docstring): y_out = a y + b D + u_f F_u + ..., carry = g_y y + g_d D + g_f F_u.  ``separate``:
    the step has its own unconditional output (w != 1).  The one place this fold is computed (the table rows and
    the torch backend's step use it, so that a plan and sample() give the same bits)."""
    a, b, u_f = c.a, c.b, 0.0
    g_y, g_d = c.carry if c.carry is not None else (0.0, 0.0)
    g_f = 0.0
    if c.b_u != 0.0:
        if separate:
            a, u_f = a + c.b_u * p, c.b_u * q
        else:
            b = b + c.b_u
    if c.carry is not None and c.carry_u != 0.0:
        if separate:
            g_y, g_f = g_y + c.carry_u * p, c.carry_u * q
        else:
            g_d = g_d + c.carry_u
    return a, b, u_f, g_y, g_d, g_f


def coefficient_table(coeffs: Sequence, denoise: Sequence, *, guidance_scale: float = 1.0,
                      guidance_rescale: float = 0.0, rescale_uv: Sequence | None = None) -> torch.Tensor:
    """The ``[len(coeffs), NUM_COEFFS]`` float64 host table: one row per entry of ``coeffs``.

    ``coeffs``: :class:`zsnr_kernels.coefficients.StepCoeffs`; ``denoise`` the matching (p, q) of D = p y + q F;
    ``rescale_uv`` the matching (u, t) of the rescale space G = u y + t F (default (0, 1): the model output).
    """
    return torch.tensor(coefficient_rows(coeffs, denoise, guidance_scale=guidance_scale,
                                         guidance_rescale=guidance_rescale, rescale_uv=rescale_uv),
                        dtype=torch.float64)


def step_rows(pz, coeffs: Sequence, sigma_eval: Sequence, *, guidance_scale: float, guidance_rescale: float,
              rescale_space: str) -> list[list[float]]:
    """The rows of one step from the spec's coefficients (one entry per sample or one for the batch) and the sigmas
    the model was called at; ``guidance_rescale`` 0 when the step has no unconditional output."""
    uv = [rescale_space_coeffs(pz, s, rescale_space) for s in sigma_eval] if guidance_rescale else None
    return coefficient_rows(coeffs, [pz.denoise_coeffs(s) for s in sigma_eval], guidance_scale=guidance_scale,
                            guidance_rescale=guidance_rescale, rescale_uv=uv)


def step_table(pz, coeffs: Sequence, sigma_eval: Sequence, *, guidance_scale: float, guidance_rescale: float,
               rescale_space: str) -> torch.Tensor:
    """:func:`step_rows` as the float64 host table."""
    return torch.tensor(step_rows(pz, coeffs, sigma_eval, guidance_scale=guidance_scale,
                                  guidance_rescale=guidance_rescale, rescale_space=rescale_space), dtype=torch.float64)


def address(table: torch.Tensor, y: torch.Tensor) -> int:
    """The data pointer of a step's table for the compiled launchers, which read ``[1 or batch, NUM_COEFFS]``
    contiguous float64 rows on y's device (ValueError for another table)."""
    if (table.dtype != torch.float64 or table.device != y.device or table.dim() != 2
            or table.shape[1] != NUM_COEFFS or table.shape[0] not in (1, y.shape[0]) or not table.is_contiguous()):
        raise ValueError(f"table must be a contiguous float64 [1 or batch, {NUM_COEFFS}] tensor on y's device, got "
                         f"{tuple(table.shape)} {table.dtype} on {table.device}")
    return table.data_ptr()
