"""Argument checks shared by the step functions and the sampling loop.

Every check runs before any tensor is written, so a refused call leaves every input untouched.  Messages name
the argument and say what to do instead.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from . import _layout

FLOAT_DTYPES = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))  # a set: one hash per check
RESCALE_SPACES = ("output", "v", "x0")


def matches(t, like: torch.Tensor) -> bool:
    """Whether ``t`` is a tensor with the shape, dtype and device of ``like`` (a floating tensor already
    checked): what :func:`tensor` accepts, answered without building an argument name."""
    return isinstance(t, torch.Tensor) and t.dtype == like.dtype and t.shape == like.shape and t.device == like.device


def tensor(name: str, t, like: torch.Tensor | None = None, like_name: str = "y") -> torch.Tensor:
    """A floating tensor; with ``like`` (checked before, called ``like_name`` in messages): the same shape, dtype
    and device as ``like``."""
    if like is not None and matches(t, like):
        return t
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if like is not None:
        ln = like_name
        if t.shape != like.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {ln} has shape {tuple(like.shape)}; they must "
                             "match")
        if t.dtype != like.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {ln} has dtype {like.dtype}; cast one of them")
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device} but {ln} is on {like.device}; move them to one device")
    elif t.ndim < 1:
        raise ValueError(f"{name} must have a batch dimension, got a 0-d tensor")
    return t


def model_output(out, y: torch.Tensor, guidance_scale: float, name: str = "model_output", like_name: str = "y"):
    """(F_cond, F_uncond or None) from a tensor or a (cond, uncond) pair; a pair is required when guiding."""
    if isinstance(out, (tuple, list)):
        if len(out) != 2:
            raise ValueError(f"{name} must be a tensor or a (cond, uncond) pair, got a sequence of {len(out)}")
        f_cond, f_uncond = out
        if not (matches(f_cond, y) and matches(f_uncond, y)):  # raise, naming the one that does not match
            tensor(f"{name}[0] (cond)", f_cond, y, like_name)
            tensor(f"{name}[1] (uncond)", f_uncond, y, like_name)
        return f_cond, f_uncond
    if not matches(out, y):
        tensor(name, out, y, like_name)
    if guidance_scale != 1.0:
        raise ValueError(
            f"guidance_scale={guidance_scale} needs the pair (F_cond, F_uncond) as {name}; the model returned "
            "a single tensor. Return both outputs, or use guidance_scale=1.0")
    return out, None


def real(name: str, v, *, lo: float | None = None, hi: float | None = None, allow_inf: bool = False) -> float:
    """A real number (not bool), not NaN, within [lo, hi]; finite unless ``allow_inf``."""
    if type(v) is float and v == v and (allow_inf or v - v == 0.0) and (lo is None or v >= lo) and (
            hi is None or v <= hi):
        return v  # the common case, checked without the general path below (this runs on every step)
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = _real_tensor(name, v).item()
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    v = float(v)
    if math.isnan(v) or (not allow_inf and math.isinf(v)):
        raise ValueError(f"{name} must be {'a number' if allow_inf else 'finite'}, got {v}")
    if lo is not None and v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise ValueError(f"{name} must be <= {hi}, got {v}")
    return v


def _real_tensor(name: str, t: torch.Tensor) -> torch.Tensor:
    """A tensor of real numbers (an integer or floating dtype, not bool, not complex) whose values can be read."""
    if t.dtype == torch.bool or t.dtype.is_complex:
        raise TypeError(f"{name} must hold real numbers, got a {t.dtype} tensor")
    if t.is_meta:
        raise ValueError(f"{name} is a meta tensor, which holds no values; pass numbers or a CPU/CUDA tensor")
    return t


def guidance(scale, rescale, space) -> tuple[float, float, str]:
    """``guidance_scale`` (a real number), ``guidance_rescale`` (in [0, 1]) and ``rescale_space``, validated."""
    if type(scale) is float and type(rescale) is float and scale - scale == 0.0 and 0.0 <= rescale <= 1.0 and (
            space in RESCALE_SPACES):
        return scale, rescale, space  # the common case in one call (this runs on every step)
    return (real("guidance_scale", scale), real("guidance_rescale", rescale, lo=0.0, hi=1.0),
            choice("rescale_space", space, RESCALE_SPACES))


def sigma_values(name: str, s, batch: int) -> list[float] | float:
    """A step's sigma: a number (one for the batch) or a (B,) tensor / sequence (one per sample, §2.9)."""
    if type(s) is float:
        return real(name, s, lo=0.0, allow_inf=True)
    per_sample = (isinstance(s, torch.Tensor) and s.ndim == 1 and s.numel() > 1) or (
        isinstance(s, Sequence) and not isinstance(s, str))
    if per_sample:
        vals = _real_tensor(name, s).detach().double().cpu().tolist() if isinstance(s, torch.Tensor) else list(s)
        if len(vals) != batch:
            raise ValueError(f"{name} has {len(vals)} values but the batch has {batch} samples")
        return [real(f"{name}[{i}]", v, lo=0.0, allow_inf=True) for i, v in enumerate(vals)]
    if isinstance(s, torch.Tensor) and s.numel() != 1:
        raise ValueError(f"{name} must be a number or a (B,) tensor, got shape {tuple(s.shape)}")
    return real(name, s, lo=0.0, allow_inf=True)


def sigmas(s) -> list[float]:
    """A sampling schedule: 1-D, strictly descending, ends with 0, no NaN; the first value may be inf."""
    if isinstance(s, torch.Tensor):
        if s.ndim != 1:
            raise ValueError(f"sigmas must be 1-D, got shape {tuple(s.shape)}")
        vals = _real_tensor("sigmas", s).detach().double().cpu().tolist()
    elif isinstance(s, Sequence):
        vals = [real(f"sigmas[{i}]", v, allow_inf=True) for i, v in enumerate(s)]
    else:
        raise TypeError(f"sigmas must be a 1-D tensor or a sequence of floats, got {type(s).__name__}")
    if len(vals) < 2:
        raise ValueError(f"sigmas needs at least 2 values (a start and the final 0), got {len(vals)}")
    if any(math.isnan(v) for v in vals):
        raise ValueError("sigmas contains NaN")
    if any(v < 0 for v in vals):
        raise ValueError(f"sigmas must be >= 0, got {min(vals)}")
    if vals[-1] != 0.0:
        raise ValueError(f"sigmas must end with 0 (the clean sample), got {vals[-1]}; append a 0")
    if any(math.isinf(v) for v in vals[1:]):
        raise ValueError("only sigmas[0] may be inf")
    if any(b >= a for a, b in zip(vals, vals[1:])):
        i = next(i for i, (a, b) in enumerate(zip(vals, vals[1:])) if b >= a)
        raise ValueError(f"sigmas must be strictly descending, but sigmas[{i + 1}]={vals[i + 1]} >= "
                         f"sigmas[{i}]={vals[i]}")
    return vals


def step_index(v) -> int | None:
    """None, or the index of the step in the schedule (the Philox counter word of its noise): an int in
    [0, 2**32)."""
    if v is None or (type(v) is int and 0 <= v < 2**32):
        return v  # the common case (this runs on every step)
    from .noise import _check_index

    return _check_index(v, "step_index", 2**32)


def out(o, y: torch.Tensor, inputs, names) -> torch.Tensor:
    """``out=`` of a step: a tensor like y that can be written, apart from the step's ``inputs`` (the tensors it
    reads, None entries allowed; ``names(k)`` names inputs[k] in a message) or one of them exactly (:func:`apart`)."""
    tensor("out", o, y)
    dense = _layout.per_sample_dense(o)
    if not dense and any(s == 0 and n > 1 for n, s in zip(o.shape, o.stride())):
        raise ValueError("out has elements that share memory (a stride-0 view, e.g. from expand()); pass a tensor "
                         "with memory of its own, e.g. torch.empty_like(y)")
    if o.requires_grad and o.is_leaf and torch.is_grad_enabled():
        raise ValueError("out is a leaf tensor that requires grad, which cannot be written in place; pass a "
                         "tensor without requires_grad, or out=None")
    if torch.compiler.is_compiling():  # traced: fake tensors have no inference flag and no data pointer; the
        return o                       # eager call of the same step checks them
    if o.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError("out was made under torch.inference_mode and this call runs outside it, where an "
                         "inference tensor cannot be written; call the step under torch.inference_mode(), or pass "
                         "a tensor made outside it")
    if dense:
        apart("out", o, inputs, names)
    return o


def apart(name: str, o: torch.Tensor, inputs, names) -> None:
    """Refuse an output ``o`` (dense, every sample one block: as a kernel writes it) that shares memory with one of
    ``inputs`` (tensors of its shape and dtype, None entries allowed; ``names(k)`` names inputs[k]) without being
    that input.

    A kernel reads each element's inputs just before it writes the element, so an output may be an input itself
    (the same data pointer and strides: ``out=y`` steps in place), but one overlapping an input any other way would
    be written before it is read.  Two dense tensors of one size share memory exactly when their starts are less
    than that size apart.  An input of another layout reaches a kernel as a copy, so it cannot be overwritten
    early, and interleaved views sharing no element are not refused (PyTorch's own ``out=`` check draws the same
    line)."""
    lo, size = o.data_ptr(), o.nbytes
    for k, t in enumerate(inputs):
        if t is None or t is o:
            continue
        d = t.data_ptr() - lo
        if -size < d < size and not (d == 0 and t.stride() == o.stride()) and _layout.per_sample_dense(t):
            raise ValueError(f"{name} overlaps {names(k)} without being the same view of it (some elements would "
                             f"be written before they are read); pass a separate tensor, or {names(k)} itself")


def choice(name: str, v, options: Sequence[str]) -> str:
    if not isinstance(v, str) or v not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {v!r}")
    return v


NEEDS_NOISE = ("this step adds noise: pass noise= (a unit-Gaussian tensor shaped like y) or seed= with "
               "step_index= (Philox noise)")
MIXED_STAGES = ("per-sample sigmas put samples in different stages of a two-stage step; use one "
                "sigma_next == 0 decision for the whole batch")


def step_coeffs(cs, n_history: int) -> int:
    """Check the per-sample coefficients of one step against what the call supplies; the history depth used."""
    if len({c.complete for c in cs}) > 1:
        raise ValueError(MIXED_STAGES)
    n_hist = max(len(c.h) for c in cs)
    if n_hist > n_history:
        raise ValueError(f"this step needs {n_hist} history tensor(s), got {n_history}")
    return n_hist


def spec_step(pz, args, sigma_eval, n_history: int, has_noise: bool):
    """A whole step checked by the Python spec, as the device backends and the traced path need it before any
    launch (a kernel cannot raise): ``(coefficients per entry of args, history depth used, whether it adds
    noise)``; raises the spec's ValueError for a step it refuses."""
    from . import coefficients as co

    cs = [co.step_coeffs(pz, a) for a in args]
    for s in sigma_eval:
        pz.denoise_coeffs(s)  # raises for eps at inf
    n_hist = step_coeffs(cs, n_history)
    noisy = any(c.e != 0.0 for c in cs)
    if noisy and not has_noise:
        raise ValueError(NEEDS_NOISE)
    return cs, n_hist, noisy
