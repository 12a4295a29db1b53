"""The backends, in one table (docs/design.md §3): what each is, where ``auto`` tries it, and why it cannot serve a
call.  Everything that picks a backend asks here: the step functions, ``sample()``, :class:`SamplingPlan`, the
``torch.library`` op, the benchmark and ``zsnr-kernels info``.

Each backend is one module of :mod:`zsnr_kernels.backends` with the same three functions:

* ``not_supported_reasons(y) -> list[str]``: why it cannot run a step on ``y`` (empty when it can);
* ``fused_step(y, f_cond, f_uncond, history, pz, args, sigma_eval, *, guidance_scale, guidance_rescale,
  rescale_space, noise, seeds, step_index, want_denoised, out, draw=0, noise_slice=None)``: one step from the spec's
  arguments, returning ``(y_out, denoised or None, carry or None, sigma_out list, complete)``; Philox noise from
  ``seeds`` is draw ``draw`` of step ``step_index`` (docs/design.md §2.8), each element at its place in
  ``noise_slice`` (:class:`zsnr_kernels.noise.NoiseSlice`: a slice of a sharded latent; None: the whole sample);
* ``table_step(...)``: one step of a :class:`zsnr_kernels.SamplingPlan` from a row of its float64 coefficient
  table (:mod:`zsnr_kernels.backends.table`), taking ``draw`` and ``noise_slice`` alike.

Adding a backend is that module plus one line in :data:`REGISTRY`.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
from dataclasses import dataclass
from types import ModuleType

import torch


@dataclass(frozen=True)
class Backend:
    """One backend: its name (the ``backend=`` value), the module that runs it, what it is, and its place in
    ``auto``'s order on CPU and on CUDA tensors (lower first; None: ``auto`` never picks it there)."""

    name: str
    module: str
    summary: str
    auto_cpu: int | None
    auto_cuda: int | None
    compiled: bool  # runs compiled kernels: traced through the torch.library op under torch.compile, no backward

    def load(self) -> ModuleType:
        """The backend's module (all are imported with the registry: they are small, and each imports what it
        runs on, such as Triton or the CUDA module, only when a step needs it)."""
        return _MODULES[self.name]


REGISTRY: tuple[Backend, ...] = (
    Backend("torch", "eager", "the eager PyTorch reference: any device, any float dtype, differentiable", 1, 2,
            compiled=False),
    Backend("cpu", "cpu", "the SIMD kernels of csrc/cpu on their thread pool: CPU tensors, fp32/fp16/bf16", 0, None,
            compiled=True),
    Backend("cuda", "cuda", "the CUDA kernels of csrc/cuda: CUDA tensors, fp32/fp16/bf16", None, 0, compiled=True),
    Backend("triton", "triton", "the Triton kernels: CUDA tensors (CPU tensors under TRITON_INTERPRET=1), "
            "fp32/fp16/bf16", None, 1, compiled=True),
)
_BY_NAME = {b.name: b for b in REGISTRY}
# imported here, not when first used: torch.compile traces the steps, and Dynamo cannot trace importlib
_MODULES = {b.name: importlib.import_module(f"{__package__}.{b.module}") for b in REGISTRY}
#: each backend's fused_step, as an eager step runs it (the steps read it on every call; under torch.compile
#: ops.fused_step says what runs)
FUSED = {name: m.fused_step for name, m in _MODULES.items()}
#: every value ``backend=`` takes
BACKENDS = ("auto", *_BY_NAME)
_AUTO = {dev: tuple(b.name for b in sorted((b for b in REGISTRY if getattr(b, f"auto_{dev}") is not None),
                                           key=lambda b: getattr(b, f"auto_{dev}"))) for dev in ("cpu", "cuda")}

_preferred: contextvars.ContextVar[str] = contextvars.ContextVar("zsnr_kernels_backend", default="auto")


@torch.compiler.assume_constant_result  # Dynamo cannot trace ContextVar.get: read once, when the step is traced
def _preferred_name() -> str:
    return _preferred.get()


def get(name: str) -> Backend:
    """The registry entry of backend ``name`` (ValueError naming the choices for another name)."""
    entry = _BY_NAME.get(name) if isinstance(name, str) else None
    if entry is None:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return entry


def module(name: str) -> ModuleType:
    """The module that runs backend ``name``."""
    return get(name).load()


@contextlib.contextmanager
def use_backend(name: str):
    """Run every step that asks for ``backend="auto"`` (the default) inside the block on backend ``name``: the
    step functions, ``sample()``, the k-diffusion drop-ins, the diffusers schedulers and plans built inside it.
    An explicit ``backend=`` still wins.  The chosen backend must serve every such step, as an explicit one must
    (a float64 step inside ``use_backend("cpu")`` is refused, naming this block).  Per thread and per asyncio task
    (a context variable); nests.  Enter the block outside compiled code: ``torch.compile`` reads the choice when it
    traces a step (a compiled function keeps the backend of its trace) but cannot trace the ``with`` itself.

        with zsnr_kernels.use_backend("torch"):   # the float64-capable, differentiable reference
            x0 = zsnr_kernels.sample(model, noise, sigmas)
    """
    if not isinstance(name, str):
        raise TypeError(f"use_backend takes a backend name, one of {BACKENDS}, got {type(name).__name__}")
    if name != "auto":
        get(name)  # an unknown name is refused at the `with`, not at the first step
    token = _preferred.set(name)
    try:
        yield name
    finally:
        _preferred.reset(token)


def not_supported_reasons(backend: str, y: torch.Tensor) -> list[str]:
    """Why ``backend`` cannot run a step on ``y`` (empty when it can)."""
    entry = _BY_NAME.get(backend) if isinstance(backend, str) else None
    if entry is None:
        return [f"unknown backend {backend!r}; choose one of {BACKENDS}"]
    return entry.load().not_supported_reasons(y)


def resolve(backend: str, y: torch.Tensor, needs_grad: bool = False, compiling: bool | None = None) -> str:
    """The backend that will run a step on ``y``: an explicit one if it can (else ValueError with its reasons);
    for ``auto``, the one :func:`use_backend` set (held to the same rule as an explicit one), else the first of
    ``auto``'s order for y's device that can.  With ``needs_grad`` (autograd records the step) only the torch
    reference can: the kernels have no backward.  ``compiling``: ``torch.compiler.is_compiling()`` where the caller
    has asked it already (None: asked here)."""
    if backend == "auto":
        preferred = _preferred_name()
        if preferred != "auto":
            try:
                return resolve(preferred, y, needs_grad)
            except ValueError as exc:
                raise ValueError(f"{exc} (the backend set by zsnr_kernels.use_backend({preferred!r}))") from None
    if needs_grad and backend != "torch":
        if backend == "auto":
            return "torch"
        _resolve(backend, y)  # an unknown or unavailable backend is named first
        raise ValueError(f"backend={backend!r} cannot run this step: an input requires grad and the fused kernels "
                         "have no backward; use backend='torch' (differentiable), or call the step under "
                         "torch.no_grad()")
    if compiling is None:
        compiling = torch.compiler.is_compiling()
    if not isinstance(backend, str) or compiling:  # traced: no cache (see parameterization)
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
    order = _AUTO["cuda"] if y.is_cuda else _AUTO["cpu"]
    return next(b for b in order if not not_supported_reasons(b, y))
