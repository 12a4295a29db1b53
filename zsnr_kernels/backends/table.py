"""The float64 coefficient table: the one coefficient record every backend's ``table_step`` reads (the Triton kernels,
the CUDA and CPU launchers in table mode, the torch reference) and :class:`zsnr_kernels.SamplingPlan` builds.

One row per sample (or one for the whole batch) of ``NUM_COEFFS`` float64 columns: the element pass reads
w .. g_d, rounded to float32 (``table_coeffs`` in csrc/include/zsnr/step_plan.h, whose ``CoeffColumn`` these
columns are); the guidance-rescale fold reads p, q, u, t in float64 (and w, phi: the Triton kernels from the row,
the C++ launchers from the step record, into which the callers write the same values).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..parameterization import rescale_space_coeffs

#: column indices (zsnr::CoeffColumn; the Triton kernels read these names)
W, P, Q, A, B, H0, H1, H2, E, GY, GD, U, T, PHI = range(14)
#: the row stride: two spare columns keep rows 128-byte aligned
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
        rows.append(row)
    return rows


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
