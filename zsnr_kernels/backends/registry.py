"""Backend choice (docs/design.md §3): each backend says why it cannot serve a call; ``auto`` falls back, an explicit
request that cannot be met raises with the reasons.

``torch`` is the eager reference (any device, any float dtype); ``cpu`` the compiled fused kernels for CPU
tensors, ``cuda`` the compiled CUDA kernels and ``triton`` the Triton kernels for CUDA tensors, all three in
float32/float16/bfloat16.  ``auto`` takes cpu on CPU tensors, cuda then triton on CUDA tensors, and the reference
for whatever none of them serves (float64, other devices).
"""

from __future__ import annotations

import torch

BACKENDS = ("auto", "torch", "cpu", "cuda", "triton")


def not_supported_reasons(backend: str, y: torch.Tensor) -> list[str]:
    """Why ``backend`` cannot run a step on ``y`` (empty when it can)."""
    if backend == "torch":
        return []
    if backend == "cpu":
        from . import cpu

        return cpu.not_supported_reasons(y)
    if backend == "triton":
        from . import triton

        return triton.not_supported_reasons(y)
    if backend == "cuda":
        from . import cuda

        return cuda.not_supported_reasons(y)
    return [f"unknown backend {backend!r}; choose one of {BACKENDS}"]


def resolve(backend: str, y: torch.Tensor, needs_grad: bool = False) -> str:
    """The backend that will run a step on ``y``: ``auto`` picks cpu then torch on CPU, cuda then triton on GPU.
    With ``needs_grad`` (autograd records the step) only the torch reference can: the kernels have no backward."""
    if needs_grad and backend != "torch":
        if backend == "auto":
            return "torch"
        _resolve(backend, y)  # an unknown or unavailable backend is named first
        raise ValueError(f"backend={backend!r} cannot run this step: an input requires grad and the fused kernels "
                         "have no backward; use backend='torch' (differentiable), or call the step under "
                         "torch.no_grad()")
    if not isinstance(backend, str) or torch.compiler.is_compiling():  # traced: no cache (see parameterization)
        return _resolve(backend, y)  # raises the error naming the argument where there is one
    # the device's kind and index (cuda checks each GPU's architecture), cheaper than y.device.type
    key = (backend, y.is_cpu, y.is_cuda, y.get_device(), y.dtype, y.numel() == 0)
    hit = _resolved.get(key)
    if hit is None:
        hit = _resolved[key] = _resolve(backend, y)
    return hit


_resolved: dict = {}  # what resolve() decided per (backend, cpu, cuda, device index, dtype, empty): every step


def _resolve(backend: str, y: torch.Tensor) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        reasons = not_supported_reasons(backend, y)
        if reasons:
            raise ValueError(f"backend={backend!r} cannot run this step: " + "; ".join(reasons))
        return backend
    order = ("cuda", "triton", "torch") if y.is_cuda else ("cpu", "torch")
    return next(b for b in order if not not_supported_reasons(b, y))
