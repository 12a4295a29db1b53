"""How the compiled backends see a step's tensors: every tensor ``[batch][n]``, each sample a dense block of ``n``
elements, one element order shared by all tensors of a step (csrc/include/zsnr/step_plan.h ``Tensors``).  The device
backends' whole step, validated and laid out, is :func:`zsnr_kernels.backends.device.device_step`.

Contiguous and channels-last tensors with identical strides go straight through; any other layout is copied to
contiguous.  Philox noise is indexed by the logical (row-major) element order (docs/design.md §2.8), so when a kernel
draws it the tensors must be contiguous.
"""

from __future__ import annotations

import torch

from .._validate import per_sample_dense


def capturing(device) -> bool:
    """Whether work enqueued now for ``device`` is being captured into a CUDA graph (the current stream of that
    device, which need not be the current device, is capturing)."""
    if device.type != "cuda":
        return False
    if device.index is None or device.index == torch.cuda.current_device():
        return torch.cuda.is_current_stream_capturing()
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A small host tensor on ``device`` without a host synchronisation: through pinned memory, asynchronously
    (PyTorch's caching host allocator keeps the pinned block alive until the copy has run); unchanged on the CPU.

    Inside a CUDA-graph capture the values reach the device as kernel arguments (:func:`written`), never through a
    captured copy: that would read its pinned block again at every replay, and the caching host allocator of the
    older PyTorch releases pyproject.toml admits may hand the block to another tensor once the capture is over."""
    if capturing(device):
        return written(t, device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


_BITS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def written(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` (a small host tensor) on ``device``, its values handed over as kernel arguments: zeros, then
    ``_foreach_add_`` of its elements' bits, as integers of its element size, to the one-element views (a launch per
    96 elements; 672 under CUDA 13).  Integers add exactly, so every value arrives bit for bit, NaN payloads
    included."""
    bits = _BITS[t.element_size()]
    out = torch.zeros(t.numel(), dtype=bits, device=device)
    if t.numel():
        torch._foreach_add_(list(out.unbind()), t.reshape(-1).view(bits).tolist())
    return out.view(t.dtype).view(t.shape)


def prepare(tensors: list, philox: bool, out: torch.Tensor | None) -> tuple[list, torch.Tensor]:
    """The tensors (``None`` entries allowed; the first is y) as a kernel can read them, and the tensor the kernel
    writes y_out to: ``out`` itself (which may be y: each element is read before it is written) when the layout
    was kept and ``out`` has y's strides, else a temporary that :func:`finish` copies into ``out``."""
    for t in tensors:  # the common case, all contiguous, without comparing strides (this runs on every step)
        if t is not None and not t.is_contiguous():
            break
    else:
        return tensors, out if out is not None and out.is_contiguous() else torch.empty_like(tensors[0])
    y = tensors[0]
    stride = y.stride()
    same = all(t is None or t.stride() == stride for t in tensors) and per_sample_dense(y)
    if not (same and (y.is_contiguous() or not philox)):
        tensors = [None if t is None else t.contiguous() for t in tensors]
    elif out is not None and out.stride() == stride:
        return tensors, out
    return tensors, torch.empty_like(tensors[0])


def finish(y_out: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """The step's y_out as the caller asked for it: copied into ``out`` when the kernel wrote a temporary."""
    if out is not None and y_out is not out:
        out.copy_(y_out)
        return out
    return y_out


def ptr(t: torch.Tensor | None) -> int:
    """A tensor's data pointer for the compiled launchers; 0 for none."""
    return 0 if t is None else t.data_ptr()
