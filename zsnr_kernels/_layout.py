"""How the compiled backends see tensors: every tensor ``[batch][n]``, each sample a dense block of ``n`` elements,
one element order shared by all tensors of a step (csrc/include/zsnr/step_plan.h ``Tensors``).

Contiguous and channels-last tensors with identical strides go straight through; any other layout is copied to
contiguous.  Philox noise is indexed by the logical (row-major) element order (DESIGN §2.8), so when a kernel
draws it the tensors must be contiguous.
"""

from __future__ import annotations

import torch


def per_sample_dense(t: torch.Tensor) -> bool:
    """Every sample a dense block of numel/B elements, samples one after another (contiguous, channels-last)."""
    if t.is_contiguous():
        return True
    if t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return True
    return t.ndim == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)


def prepare(tensors: list, philox: bool) -> tuple[list, bool]:
    """The tensors (``None`` entries allowed; the first is y) as a kernel can read them, and whether they kept
    the caller's layout (then an ``out`` with y's strides can be written in place)."""
    y = tensors[0]
    stride = y.stride()
    same = all(t is None or t.stride() == stride for t in tensors) and per_sample_dense(y)
    if same and (y.is_contiguous() or not philox):
        return tensors, True
    return [None if t is None else t.contiguous() for t in tensors], False
