"""The float64 coefficient table that device kernels read (the Triton kernels, :mod:`zsnr_kernels.plan`).

One row per sample (or one for the whole batch) of ``NUM_COEFFS`` float64 columns: the element pass reads
w .. g_d, rounded to float32 on the device (as ``static_cast<float>`` in csrc/include/zsnr/step_plan.h); the
on-device guidance-rescale fold reads p, q, u, t, w and phi in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# column indices (the kernels in triton_kernels/combine.py use the same numbers)
W, P, Q, A, B, H0, H1, H2, E, GY, GD, U, T, PHI = range(14)
NUM_COEFFS = 16  # the row stride: two spare columns keep rows 128-byte aligned


def coefficient_table(coeffs: Sequence, denoise: Sequence, *, guidance_scale: float = 1.0,
                      guidance_rescale: float = 0.0, rescale_uv: Sequence | None = None) -> torch.Tensor:
    """The ``[len(coeffs), NUM_COEFFS]`` float64 host table: one row per entry of ``coeffs``.

    ``coeffs``: :class:`zsnr_kernels.coefficients.StepCoeffs`; ``denoise`` the matching (p, q) of D = p y + q F;
    ``rescale_uv`` the matching (u, t) of the rescale space G = u y + t F (default (0, 1): the model output).
    """
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
    return torch.tensor(rows, dtype=torch.float64)
