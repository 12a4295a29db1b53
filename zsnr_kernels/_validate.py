"""Argument checks shared by the step functions and the sampling loop.

Every check runs before any tensor is written, so a refused call leaves every input untouched.  Messages name
the argument and say what to do instead.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
import sys
import warnings
from collections.abc import Sequence

import torch


FLOAT_DTYPES = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))  # a set: one hash per check
RESCALE_SPACES = ("output", "v", "x0")

#: The noise levels a step takes besides 0 and inf.  Below SIGMA_MIN, 1/sigma (the LMS derivative, the noise scale
#: sigma*c_in) overflows float32, and subnormal sigmas overflow float64 in sigma_data/sigma; above SIGMA_MAX the
#: products of two sigmas overflow float64 (dpmpp_2s_ancestral's midpoint).  Nothing is lost: a positive sigma
#: below 1e-30 is 0 to float32 rounding, and inf is every sampler's exact limit of a sigma above 1e30.
SIGMA_MIN, SIGMA_MAX = 1e-30, 1e30
#: The largest sigma/sigma_next of one step of the samplers whose second-order correction has no limit as the
#: ratio grows: its weight grows like sigma/sigma_next (dpm_2: like its square root), and so does the float32
#: rounding of D it carries into the result (about weight * 6e-8 * |D|: at these limits some % of D, and the
#: backends, which round differently, disagree by that much; beyond 1e30 the weight overflows float32 and the
#: result is NaN).
STEP_RATIO_MAX = {"heun": 1e6, "dpm_2": 1e12, "dpm_2_ancestral": 1e6}
#: lms with remembered derivatives: the largest sigma / max(sigma_next, data scale) of a step.  Its update cancels
#: terms of size sigma (the derivatives carry the noise, which the weights integrate over the step) down to a
#: result of size max(sigma_next, sigma_data) in x, so float32 rounding moves the result by about
#: 6e-8 * sigma / max(sigma_next, sigma_data) of it (k-diffusion's x-space sample_lms alike).
LMS_SPAN_MAX = 1e6
#: heun_flow (Heun in the flow time t = sigma/(1+sigma)): the largest t/t' of one step (from sigma = inf:
#: (1 + sigma')/sigma').  Its correction is (t' - t)(v_2 - v_1)/2, formed from the denoised predictions as
#: (t' - t)/(2 t') (D_1 - D_2): their float32 rounding is amplified by t/t' (at this limit about 3e-4 of D, the
#: backends' disagreement).  A flow schedule's smallest time is 1/num_train_timesteps or more (diffusers' 1e-3).
FLOW_TIME_RATIO_MAX = {"heun_flow": 1e4}
_SPAN_CHECKED = frozenset((*STEP_RATIO_MAX, *FLOW_TIME_RATIO_MAX, "lms"))
#: The largest |guidance_scale|: F = F_u + w (F_c - F_u) and the squares the guidance rescale sums stay far from
#: float32's range for any model output below 1e12.
GUIDANCE_SCALE_MAX = 1e4
_INF = math.inf


def per_sample_dense(t: torch.Tensor) -> bool:
    """Every sample a dense block of numel/B elements, samples one after another (contiguous, channels-last)."""
    if t.is_contiguous():
        return True
    if t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return True
    return t.ndim == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)


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


UNGUIDED_PAIR = (
    "guidance_scale=1.0 with a (cond, uncond) pair: F = F_uncond + 1.0 (F_cond - F_uncond) is F_cond alone, so the "
    "unconditional output is computed and ignored. Pass guidance_scale > 1 (e.g. 7.5) for classifier-free guidance, "
    "or the conditional output alone")
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn(message: str) -> None:
    """``warnings.warn`` attributed to the first caller outside this package (the user's call site, so the default
    filter shows it once per call site)."""
    level, frame = 2, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


def model_output(out, y: torch.Tensor, guidance_scale: float, name: str = "model_output", like_name: str = "y"):
    """(F_cond, F_uncond or None) from a tensor or a (cond, uncond) pair; a pair is required when guiding."""
    if isinstance(out, (tuple, list)):
        if len(out) != 2:
            raise ValueError(f"{name} must be a tensor or a (cond, uncond) pair, got a sequence of {len(out)}")
        f_cond, f_uncond = out
        if not (matches(f_cond, y) and matches(f_uncond, y)):  # raise, naming the one that does not match
            tensor(f"{name}[0] (cond)", f_cond, y, like_name)
            tensor(f"{name}[1] (uncond)", f_uncond, y, like_name)
        if guidance_scale == 1.0 and not torch.compiler.is_compiling():
            warn(UNGUIDED_PAIR)
        return f_cond, f_uncond
    if not matches(out, y):
        tensor(name, out, y, like_name)
    if guidance_scale != 1.0:
        raise ValueError(
            f"guidance_scale={guidance_scale} needs the pair (F_cond, F_uncond) as {name}; the model returned "
            "a single tensor. Return both outputs, or use guidance_scale=1.0")
    return out, None


def real(name: str, v, *, lo: float | None = None, hi: float | None = None, allow_inf: bool = False) -> float:
    """A real number (not bool: a Python or numpy scalar, or a one-element tensor), not NaN, within [lo, hi]; finite
    unless ``allow_inf``."""
    if type(v) is float and v == v and (allow_inf or v - v == 0.0) and (lo is None or v >= lo) and (
            hi is None or v <= hi):
        return v  # the common case, checked without the general path below (this runs on every step)
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise TypeError(f"{name} must be a real number or a one-element tensor, got a tensor of shape "
                            f"{tuple(v.shape)}")
        v = real_tensor(name, v).item()
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


def integer(name: str, v, *, lo: int | None = None, hi: int | None = None) -> int:
    """An int (any integer type or one-element integer tensor, not bool) within [lo, hi]: TypeError for another
    type, ValueError out of range, each naming ``name``."""
    if isinstance(v, bool) or (isinstance(v, torch.Tensor) and v.dtype == torch.bool):
        raise TypeError(f"{name} must be an int, got {v!r}")
    try:
        v = operator.index(v)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(v).__name__}") from None
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        bound = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {bound}, got {v}")
    return v


def index(name: str, v, bound: int) -> int:
    """An int in [0, bound) (a counter word, a batch size, a position): :func:`integer` with that range."""
    if type(v) is int and 0 <= v < bound:
        return v
    v = integer(name, v)
    if not 0 <= v < bound:
        raise ValueError(f"{name} must be in [0, {bound}), got {v}")
    return v


def positive(name: str, v, *, allow_inf: bool = False) -> float:
    """A real number > 0 (+inf too with ``allow_inf``): :func:`real`, then the sign."""
    v = real(name, v, allow_inf=allow_inf)
    if not v > 0.0:  # -inf too
        raise ValueError(f"{name} must be > 0, got {v}")
    return v


def real_tensor(name: str, t: torch.Tensor) -> torch.Tensor:
    """A tensor of real numbers (an integer or floating dtype, not bool, not complex) whose values can be read."""
    if t.dtype == torch.bool or t.dtype.is_complex:
        raise TypeError(f"{name} must hold real numbers, got a {t.dtype} tensor")
    if t.is_meta:
        raise ValueError(f"{name} is a meta tensor, which holds no values; pass numbers or a CPU/CUDA tensor")
    return t


def guidance(scale, rescale, space) -> tuple[float, float, str]:
    """``guidance_scale`` (a real number), ``guidance_rescale`` (in [0, 1]) and ``rescale_space``, validated."""
    if type(scale) is float and type(rescale) is float and -GUIDANCE_SCALE_MAX <= scale <= GUIDANCE_SCALE_MAX and (
            0.0 <= rescale <= 1.0 and space in RESCALE_SPACES):
        return scale, rescale, space  # the common case in one call (this runs on every step; NaN fails it)
    return (guidance_scale(scale), real("guidance_rescale", rescale, lo=0.0, hi=1.0),
            choice("rescale_space", space, RESCALE_SPACES))


def guidance_scale(v) -> float:
    """A real ``guidance_scale`` with ``|w| <= GUIDANCE_SCALE_MAX``."""
    w = real("guidance_scale", v)
    if abs(w) > GUIDANCE_SCALE_MAX:
        raise ValueError(
            f"guidance_scale={w!r} is outside [-{GUIDANCE_SCALE_MAX:g}, {GUIDANCE_SCALE_MAX:g}]; the largest accepted "
            f"scale is {GUIDANCE_SCALE_MAX:g} (a larger one overflows float32 in F = F_u + w (F_c - F_u) and in the "
            "guidance-rescale statistics, giving inf or NaN). Scales in use are about 1 to 30")
    return w


def _sigma_range_error(name: str, v: float) -> ValueError:
    if v < SIGMA_MIN:
        return ValueError(
            f"{name}={v!r} is below {SIGMA_MIN:g}, the smallest positive noise level a step takes (below it 1/sigma "
            "and the noise scale overflow float32, or float64 for a subnormal sigma, and the step would be NaN). "
            f"Pass 0.0 for the clean sample (the end of the schedule), or a sigma >= {SIGMA_MIN:g}")
    return ValueError(
        f"{name}={v!r} is above {SIGMA_MAX:g}, the largest finite noise level a step takes (beyond it products of "
        "sigmas overflow float64). Pass inf to start from pure noise (every sampler's exact limit of a large "
        f"sigma), or a sigma <= {SIGMA_MAX:g}")


def _sigma_ok(v) -> bool:
    """0, inf, or within [SIGMA_MIN, SIGMA_MAX] (NaN and negative values are refused elsewhere)."""
    return not (0.0 < v < SIGMA_MIN or SIGMA_MAX < v < _INF)


def step_sigmas(args, pz) -> None:
    """The noise levels of a step (``coefficients.StepArgs``, one for the batch or one per sample; ``pz`` the
    model's Parameterization), before any backend runs: every positive finite sigma in [SIGMA_MIN, SIGMA_MAX];
    for the samplers whose second-order step has no limit as sigma/sigma_next grows (heun, dpm_2,
    dpm_2_ancestral), sigma/sigma_next within STEP_RATIO_MAX; for heun_flow, the ratio t/t' of flow times within
    FLOW_TIME_RATIO_MAX; for lms with remembered derivatives,
    sigma/max(sigma_next, data scale) within LMS_SPAN_MAX.  The same rule for every backend: the compiled ones run
    only what passes it."""
    if len(args) == 1:  # the common case, without building names (this runs on every step)
        a = args[0]
        sg, sn = a.sigma, a.sigma_next
        if (SIGMA_MIN <= sg <= SIGMA_MAX or sg == _INF) and (SIGMA_MIN <= sn <= SIGMA_MAX or sn == 0.0) and (
                a.sigma_hat_next is None and not a.sigma_prev and a.sampler not in _SPAN_CHECKED):
            return
    per_sample = len(args) > 1
    for i, a in enumerate(args):
        at = f"[{i}]" if per_sample else ""
        sg, sn, hat = a.sigma, a.sigma_next, a.sigma_hat_next
        if not (_sigma_ok(sg) and _sigma_ok(sn) and (hat is None or _sigma_ok(hat))):
            for name, v in (("sigma", sg), ("sigma_next", sn), ("sigma_hat_next", hat)):
                if v is not None and not _sigma_ok(v):
                    raise _sigma_range_error(name + at, v)
        for k, p in enumerate(a.sigma_prev):
            if not _sigma_ok(p):
                raise _sigma_range_error(f"history[{k}] sigma{at}", p)
        if a.sampler == "lms" and sg != _INF:
            _lms_span(a, pz, at)
        if a.sampler in FLOW_TIME_RATIO_MAX and sn > 0.0:
            _flow_time_span(a, at)
        most = STEP_RATIO_MAX.get(a.sampler)
        if most is not None and sn > 0.0 and sg != _INF and sg > most * sn:
            if a.sampler == "dpm_2_ancestral":
                r = sn / sg
                if a.eta * math.sqrt((1.0 - r) * (1.0 + r)) > 1.0:
                    continue  # k-diffusion's min() clamp: an Euler step to 0, no second stage
            fallback = "euler_ancestral" if a.sampler == "dpm_2_ancestral" else "euler"
            raise ValueError(
                f"{a.sampler}: sigma{at}={sg!r} to sigma_next{at}={sn!r} spans a factor {sg / sn:.3g}, above the "
                f"{most:g} one {a.sampler} step may span: its second-order correction grows with sigma/sigma_next and "
                "has no limit, and beyond that float32 rounding alone moves the result by some % of the denoised "
                f"prediction (beyond 1e30, NaN). Add intermediate sigmas to the schedule, or take this step with "
                f"{fallback} (what {a.sampler} does from sigma = inf)")


def flow_time_ratio(sigma: float, sigma_next: float) -> float:
    """t/t' of a step in the flow time t = sigma/(1+sigma) (1 at sigma = inf); sigma_next > 0."""
    return (1.0 if sigma == _INF else sigma / (1.0 + sigma)) * ((1.0 + sigma_next) / sigma_next)


def _flow_time_span(a, at: str) -> None:
    most, ratio = FLOW_TIME_RATIO_MAX[a.sampler], flow_time_ratio(a.sigma, a.sigma_next)
    if ratio > most:
        raise ValueError(
            f"{a.sampler}: sigma{at}={a.sigma!r} to sigma_next{at}={a.sigma_next!r} spans a factor {ratio:.3g} in the "
            f"flow time t = sigma/(1+sigma), above the {most:g} one {a.sampler} step may span: its correction weighs "
            "the difference of the two denoised predictions by (t - t')/(2 t'), so beyond that float32 rounding alone "
            "moves the result by more than 3e-4 of them. Add intermediate sigmas to the schedule (a flow schedule's "
            "smallest time is about 1/num_train_timesteps), or take this step with euler")


def _lms_span(a, pz, at: str) -> None:
    scale = max(a.sigma_next, 1.0 if pz.prediction == "flow" else pz.sigma_data)  # x = x0 + sigma z for flow too
    if a.sigma <= LMS_SPAN_MAX * scale or not any(p != _INF for p in a.sigma_prev[: a.order - 1]):
        return  # no finite remembered point: the step is Euler's, exact at any span
    raise ValueError(
        f"lms: sigma{at}={a.sigma!r} to sigma_next{at}={a.sigma_next!r} with remembered derivatives spans a factor "
        f"{a.sigma / scale:.3g} (sigma / max(sigma_next, {'1' if pz.prediction == 'flow' else 'sigma_data'})), "
        f"above {LMS_SPAN_MAX:g}: the update cancels terms of size sigma down to the result, and float32 rounding "
        "alone would move it by some % or more. Add intermediate sigmas to the schedule (its last positive sigma "
        f"at most {LMS_SPAN_MAX:g} times that data scale), or use dpmpp_2m")


def device_sigma(s) -> bool:
    """Whether a step's sigma is a device value (§2.9), which the host never reads: a tensor off the CPU.  A CPU
    tensor is read without waiting for anything, and checked as numbers are."""
    return isinstance(s, torch.Tensor) and not s.is_cpu


def sigma_tensor(name: str, s, batch: int, device: torch.device) -> torch.Tensor:
    """A device value (:func:`device_sigma`) as a (batch,) float64 tensor on ``device``, checked from its metadata
    alone (a real dtype, one value or one per sample) and never read.  What its values are not checked for here,
    the step checks on the device (``zsnr_kernels.steps``: a refused sample comes out NaN)."""
    real_tensor(name, s)
    if s.ndim > 1 or s.numel() not in (1, batch):
        raise ValueError(f"{name} must be a number or a ({batch},) tensor (one per sample), got shape "
                         f"{tuple(s.shape)}")
    t = s.detach().to(device=device, dtype=torch.float64)
    return t.reshape(1).expand(batch) if t.numel() == 1 and batch != 1 else t.reshape(batch)


def sigma_values(name: str, s, batch: int) -> list[float] | float:
    """A step's sigma: a number (one for the batch) or a (B,) tensor / sequence (one per sample, §2.9), read on the
    host and checked (a device tensor waits for the device: the step functions take :func:`sigma_tensor`)."""
    if type(s) is float:
        return real(name, s, lo=0.0, allow_inf=True)
    per_sample = (isinstance(s, torch.Tensor) and s.ndim == 1 and s.numel() > 1) or (
        isinstance(s, Sequence) and not isinstance(s, str))
    if per_sample:
        vals = real_tensor(name, s).detach().double().cpu().tolist() if isinstance(s, torch.Tensor) else list(s)
        if len(vals) != batch:
            raise ValueError(f"{name} has {len(vals)} values but the batch has {batch} samples")
        return [real(f"{name}[{i}]", v, lo=0.0, allow_inf=True) for i, v in enumerate(vals)]
    if isinstance(s, torch.Tensor) and s.numel() != 1:
        raise ValueError(f"{name} must be a number or a (B,) tensor, got shape {tuple(s.shape)}")
    return real(name, s, lo=0.0, allow_inf=True)


def not_ascending(vals: list[float], tensor: bool) -> None:
    """Refuse a schedule passed in reverse (from the smallest noise level up), naming the fix: it fails the other
    checks first for its end (``must end with 0``, ``only sigmas[0] may be inf``), which names a symptom."""
    if len(vals) >= 2 and vals[0] < vals[-1] and all(a <= b for a, b in zip(vals, vals[1:])):
        raise ValueError(f"sigmas ascend ({vals[0]:g} ... {vals[-1]:g}), but a schedule runs from the largest noise "
                         "level down to the smallest: pass them in descending order, "
                         + ("sigmas.flip(0)" if tensor else "sigmas[::-1]"))


def sigmas(s, final_zero: bool = True) -> list[float]:
    """A sampling schedule: 1-D, strictly descending, ends with 0 (``final_zero``; else it may end above 0), no NaN;
    the first value may be inf; every other positive value within [SIGMA_MIN, SIGMA_MAX]."""
    if isinstance(s, torch.Tensor):
        if s.ndim != 1:
            raise ValueError(f"sigmas must be 1-D, got shape {tuple(s.shape)}")
        vals = real_tensor("sigmas", s).detach().double().cpu().tolist()
    elif isinstance(s, Sequence):
        vals = [real(f"sigmas[{i}]", v, allow_inf=True) for i, v in enumerate(s)]
    else:
        raise TypeError(f"sigmas must be a 1-D tensor or a sequence of floats, got {type(s).__name__}")
    if len(vals) < 2:
        raise ValueError(f"sigmas needs at least 2 values (a start and an end, 0 for a clean sample), got "
                         f"{len(vals)}")
    if any(math.isnan(v) for v in vals):
        raise ValueError("sigmas contains NaN")
    if any(v < 0 for v in vals):
        raise ValueError(f"sigmas must be >= 0, got {min(vals)}")
    not_ascending(vals, isinstance(s, torch.Tensor))
    if final_zero and vals[-1] != 0.0:
        raise ValueError(f"sigmas must end with 0 (the clean sample), got {vals[-1]}; append a 0")
    if any(math.isinf(v) for v in vals[1:]):
        raise ValueError("only sigmas[0] may be inf")
    for i, v in enumerate(vals):
        if not _sigma_ok(v):
            raise _sigma_range_error(f"sigmas[{i}]", v)
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
    return index("step_index", v, 2**32)


def out(o, y: torch.Tensor, inputs, names, compiling: bool | None = None) -> torch.Tensor:
    """``out=`` of a step: a tensor like y that can be written, apart from the step's ``inputs`` (the tensors it
    reads, None entries allowed; ``names(k)`` names inputs[k] in a message) or one of them exactly (:func:`apart`).
    ``compiling``: ``torch.compiler.is_compiling()`` where the caller has asked it (None: asked here)."""
    if not matches(o, y):
        tensor("out", o, y)
    dense = o.is_contiguous() or per_sample_dense(o)
    if not dense and any(s == 0 and n > 1 for n, s in zip(o.shape, o.stride())):
        raise ValueError("out has elements that share memory (a stride-0 view, e.g. from expand()); pass a tensor "
                         "with memory of its own, e.g. torch.empty_like(y)")
    if o.requires_grad and o.is_leaf and torch.is_grad_enabled():
        raise ValueError("out is a leaf tensor that requires grad, which cannot be written in place; pass a "
                         "tensor without requires_grad, or out=None")
    if torch.compiler.is_compiling() if compiling is None else compiling:  # traced: fake tensors have no inference
        return o  # flag and no data pointer; the eager call of the same step checks them
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
        if -size < d < size and not (d == 0 and t.stride() == o.stride()) and per_sample_dense(t):
            raise ValueError(f"{name} overlaps {names(k)} without being the same view of it (some elements would "
                             f"be written before they are read); pass a separate tensor, or {names(k)} itself")


def choice(name: str, v, options: Sequence[str]) -> str:
    """One of ``options`` (strings): TypeError for a non-string, ValueError for another string."""
    if isinstance(v, str) and v in options:
        return v
    raise (ValueError if isinstance(v, str) else TypeError)(f"{name} must be one of {tuple(options)}, got {v!r}")


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
