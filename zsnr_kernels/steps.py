"""Step functions for people who write their own sampling loops: one call per model evaluation.

Each call takes the model input ``y`` the model was just called with, at noise level ``sigma``, and the model
output there, and does guidance, guidance rescale, the conversion to the denoised ``D`` and the sampler update in
one pass (docs/design.md §2.3).  It returns a :class:`StepResult`: ``y`` is the **next model input** and ``sigma``
the noise level to call the model at next, so a loop is::

    y, sigma = zsnr_kernels.initial_state(noise, sigmas[0])
    for i in range(len(sigmas) - 1):
        r = zsnr_kernels.euler_step(y, model(y, sigma), sigma, sigmas[i + 1])
        y, sigma = r.y, r.sigma
    x0 = zsnr_kernels.final_sample(y)

Two-stage samplers (``heun``, ``heun_flow``, ``dpm_2``, ``dpm_2_ancestral``, ``dpmpp_2s_ancestral``, ``dpmpp_sde``)
return ``complete=False`` after the first call; evaluate the model at ``(r.y, r.sigma)`` and call again from that state,
with the same ``sigma``/``sigma_next``: ``heun_step(r.y, model(r.y, r.sigma), sigma, sigma_next, first=r)``.  The
second call refuses (ValueError) a ``y`` that is not ``r.y`` itself (the same tensor, or the same view of its
memory; values are not compared), and a ``first`` from another sampler or from other ``sigma``/``sigma_next`` (with
EDM churn, pass ``sigma_hat`` to both calls).  Multistep samplers take ``history``: earlier
``(sigma, denoised)`` pairs, newest first (``(sigma, derivative)`` for :func:`lms_step`).

Keyword arguments every step function takes:

* ``prediction`` (``"v"``, ``"eps"``, ``"x0"``, ``"flow"``) and ``sigma_data``: the model's parameterization (§2.2).
* ``guidance_scale`` w: with a pair ``model_output=(F_cond, F_uncond)``, F = F_u + w (F_c - F_u).  A pair with
  w = 1 is F_c alone: a UserWarning says so (once per call site).
* ``guidance_rescale`` phi and ``rescale_space`` (``"output"``, ``"v"``, ``"x0"``): Lin et al.'s rescale (§2.7).
* ``backend``: ``"auto"`` (for CPU tensors the fused ``cpu`` kernels, for CUDA tensors ``"cuda"`` then
  ``"triton"``, in fp32/fp16/bf16; otherwise the reference), ``"cpu"``, ``"cuda"``, ``"triton"``, ``"torch"`` (the
  reference).  An explicit backend that cannot serve the call raises an error listing why.
  The kernels have no backward: where autograd records the step (grad enabled and an input requiring grad),
  ``"auto"`` runs the reference and the kernel backends refuse.
* ``out``: a tensor shaped like y to write the next state into: apart from every input, or one of them exactly
  (``y`` itself: in place); one overlapping an input any other way is refused, as PyTorch refuses it.
* ``return_denoised``: False skips writing D where the sampler does not need it.
* ``process_group``, ``shard_dim``: sequence parallelism (:mod:`zsnr_kernels.distributed`): the tensors are this
  rank's slice of the latent along the non-batch dim ``shard_dim``; the guidance-rescale statistics are the full
  latent's (a collective: every rank calls the step) and seeded noise is drawn at the global element indices.  The
  slices' layout is learned once by ``zsnr_kernels.distributed.layout(y, process_group, shard_dim, refresh=True)``,
  which every rank calls before its loop of steps (``sample()`` does); a step with a group whose layout is not
  known refuses (ValueError) rather than communicate where another rank may not.

Noise (samplers that add it): ``noise=`` a unit-Gaussian tensor of y's shape (or a function returning one, called
only when the step adds noise), or ``seed=`` with ``step_index=`` (the index of the step in the schedule) for the
Philox noise of §2.8.  ``seed`` is one int per sample (a sequence or a (B,) integer tensor), or one int s that
gives sample i the seed s + i.  Each sample's noise depends only on its own seed, so a batch of 8 with seed s
gives the same samples as 8 batches of 1 with seeds s, s + 1, ..., s + 7 (not 8 batches of 1 with seed s).
Seeds are taken mod 2**64: any int in [-2**63, 2**64) (an int64 or a uint64; -1 is 2**64 - 1), others are
refused.

``sigma`` and the other noise levels may be numbers or (B,) tensors (one per sample, §2.9).

A sigma tensor on the CPU is read (no wait) and checked as numbers are.  A sigma tensor on another device (per
sample, or one value), and a seed tensor anywhere, is never read on the host: no wait for the device per step, and
nothing that breaks CUDA-graph capture.  On the ``torch`` backend the step's coefficients are then computed on
that device (float64, :func:`zsnr_kernels.coefficients.step_coeffs_tensor`); ``StepResult.sigma`` is a (B,)
tensor there.  The host checks such a tensor's metadata only (a real dtype, one value or B; a seed tensor an
integer dtype); these value checks, which raise ValueError for numbers, are made on the device instead, and a
sample that fails one comes out NaN (its y, D, carry and sigma; every later step keeps it NaN: read
``torch.isfinite`` when you synchronise anyway):

* a sigma (sigma, sigma_next, sigma_hat_next, a history sigma, first.sigma) that is NaN or negative, or positive
  below SIGMA_MIN or above SIGMA_MAX other than inf; sigma_next or sigma_hat_next inf;
* sigma <= sigma_next; history sigmas not strictly above sigma and growing with age;
* a step wider than STEP_RATIO_MAX (heun, dpm_2, dpm_2_ancestral), FLOW_TIME_RATIO_MAX in flow time (heun_flow) or
  LMS_SPAN_MAX (lms with remembered points);
* a churn target (sigma_hat_next) below the step's sigma_next; ddim's eta beyond the target noise level;
* an eps model evaluated at sigma = inf;
* a step that adds noise with neither ``noise=`` nor ``seed=`` (a sample that adds none is stepped);
* a second call whose sigma, sigma_next or first.sigma differ from its first call's (the sampler is compared on
  the host and still raises).

Two behaviours follow from not knowing the values: a two-stage step always takes two calls (a sample whose step
ended after its first stage, from sigma = inf or to 0, keeps its state in the second), and a ``noise=`` function is
called whenever the step may add noise.  The compiled backends (cpu, cuda, triton), a sampler added with
``register_sampler`` and a plan's recording read the values (a wait per step for a CUDA tensor) and check them
as numbers.

``y`` is any float dtype; the math runs in float32 (float64 for float64 inputs).  Inputs are never modified.
Model outputs are not checked for NaN/inf (that would wait for the device): a NaN in F reaches the result, on every
backend.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import threading
from collections.abc import Sequence
from typing import NamedTuple

import torch

from . import _validate, coefficients as co, distributed as _distributed, noise as _noise, reference
from .backends import eager, layout as _layout, ops, registry as _backend
from .parameterization import PREDICTIONS, parameterization

INF = float("inf")


class _StepFields(NamedTuple):
    y: torch.Tensor
    sigma: float | torch.Tensor
    denoised: torch.Tensor
    complete: bool = True
    derivative: torch.Tensor | None = None


class StepResult(_StepFields):
    """What a step returns: a named tuple of five fields (unpack it as ``y, sigma, denoised, complete, derivative``).

    y:          the next model input (the state), at noise level ``sigma``
    sigma:      where to call the model next (a float, or a (B,) float64 tensor for per-sample sigmas);
                0 when sampling is finished: then ``final_sample(y)`` is the clean latent
    denoised:   D of this model evaluation (remember it for multistep samplers; ``callback`` shows it); None
                when ``return_denoised=False`` and the sampler does not need it (saves writing a tensor)
    complete:   False after the first stage of a two-stage sampler
    derivative: d = (x - D)/sigma of this evaluation, only for :func:`lms_step`; on the first stage of
                :func:`dpmpp_sde_step`, the state y that call was given (the tensor itself, not a copy), which the
                second stage starts over from

    and an attribute outside the tuple, ``origin``: on a first stage (``complete=False``), the ``(sampler, sigma,
    sigma_next)`` of the call that returned it (floats, or per-sample lists), which the second call checks its own
    against; None otherwise, and on a result built by hand or by ``_replace`` (not checked).
    """

    origin = None

    def __new__(cls, y, sigma, denoised, complete=True, derivative=None, origin=None):
        self = super().__new__(cls, y, sigma, denoised, complete, derivative)
        if origin is not None:
            self.origin = origin
        return self


_new = tuple.__new__  # a complete step's result without StepResult.__new__'s call (this runs on every step)


def initial_state(noise: torch.Tensor, sigma_max, *, prediction: str = "v", sigma_data: float = 1.0):
    """(y, sigma) to start sampling at ``sigma_max`` from unit Gaussian ``noise``: y = s(sigma_max) * noise.

    s = sigma c_in(sigma) is 1 at sigma = inf, where the state is the noise itself.
    """
    _validate.tensor("noise", noise)
    pz = parameterization(prediction, sigma_data)
    smax = _validate.real("sigma_max", sigma_max, lo=0.0, allow_inf=True)
    return noise * pz.noise_scale(smax) if smax != INF else noise.clone(), smax


def final_sample(y: torch.Tensor, *, prediction: str = "v", sigma_data: float = 1.0,
                 out: torch.Tensor | None = None, sigma: float = 0.0) -> torch.Tensor:
    """The clean latent x0 = y / c_in(0) from a state at sigma = 0 (y * sigma_data; y itself for flow), written into
    ``out`` when given (``y`` itself: in place).  For a run that stops above 0 (a schedule split in two), ``sigma``
    is where it stopped and the result the variance-exploding latent x = y / c_in(sigma) there, k-diffusion's (and
    ComfyUI's) state at that sigma."""
    s = _validate.real("sigma", sigma, lo=0.0, allow_inf=True)
    if s == INF:
        raise ValueError("sigma is inf: the state at sigma = inf is the noise itself, with no finite latent x; pass "
                         "the sigma the run stopped at")
    c = parameterization(prediction, sigma_data).c_in(s)
    return y / c if out is None else torch.div(y, c, out=_validate.tensor("out", out, y))


def to_x(y: torch.Tensor, sigma: float, *, prediction: str = "v", sigma_data: float = 1.0):
    """Variance-exploding latent x = y / c_in(sigma) (k-diffusion's state); None at sigma = inf."""
    return parameterization(prediction, sigma_data).to_x(y, sigma)


def to_y(x: torch.Tensor, sigma: float, *, prediction: str = "v", sigma_data: float = 1.0) -> torch.Tensor:
    """Model input y = c_in(sigma) * x from a variance-exploding latent x at finite sigma."""
    return parameterization(prediction, sigma_data).to_y(x, sigma)


def churn_step(y, sigma, sigma_hat, *, s_noise=1.0, noise=None, seed=None, step_index=None,
               prediction: str = "v", sigma_data: float = 1.0, process_group=None, shard_dim=None) -> torch.Tensor:
    """EDM churn of a state with no model output at hand (the first step of a loop; the step functions fold
    later churn in through ``sigma_hat_next``): raise the noise level of y from sigma to sigma_hat (§2.5),
    y_hat = (c_in(sigma_hat)/c_in(sigma)) y + c_in(sigma_hat) sqrt(sigma_hat^2 - sigma^2) s_noise z.
    Returns y itself when sigma_hat == sigma, and draws no noise when s_noise == 0 (y is only rescaled)."""
    y = _validate.tensor("y", y)
    pz = parameterization(prediction, sigma_data)
    sg = _validate.real("sigma", sigma, lo=0.0)
    sh = _validate.real("sigma_hat", sigma_hat, lo=0.0)
    k, e = co.churn(pz, sg, sh, _validate.real("s_noise", s_noise, lo=0.0))
    if sh == sg:
        return y
    if e == 0.0:
        return y * k
    if (process_group is not None or shard_dim is not None) and noise is None and seed is not None:
        shard = _distributed.layout(y, process_group, shard_dim, learn=False)
        noise = _distributed.step_noise(shard, y, seed, step_index)
    return reference.add_noise(y, k, e, eager.noise_tensor(y, noise, seed, step_index))


# ------------------------------------------------------------------------------------------------- machinery


def _at(v, i: int):
    return v[i] if isinstance(v, list) else v


def _run(
    y: torch.Tensor,
    model_output,
    sigma_eval,
    args: list[co.StepArgs],
    *,
    history: Sequence[torch.Tensor] = (),
    noise=None,
    seed=None,
    step_index=None,
    return_denoised: bool = True,
    out: torch.Tensor | None = None,
    prediction: str = "v",
    sigma_data: float = 1.0,
    guidance_scale: float = 1.0,
    guidance_rescale: float = 0.0,
    rescale_space: str = "output",
    backend: str = "auto",
    first_origin=None,
    process_group=None,
    shard_dim=None,
    _draw: int = 0,
    **unknown,
) -> StepResult:
    """Validate, then run the fused step on the chosen backend.  ``args`` holds one StepArgs for the batch or one
    per sample; ``sigma_eval`` is where the model was called (a float or a per-sample list); ``_draw`` is the
    Philox draw of ``seed=`` noise within the step (docs/design.md §2.8: 1 for dpmpp_sde's second call; private, so
    that no step function takes it as an option); ``unknown``
    catches a misspelt option, to name the step function the user called instead of this one."""
    if unknown:
        name = _step_name(args[0].sampler)
        raise TypeError(f"{name + '()' if name.endswith('_step') else name} got an unexpected keyword argument "
                        f"{next(iter(unknown))!r}; see help(zsnr_kernels.{name.split('(')[0]}) and the options every "
                        "step takes in help(zsnr_kernels.steps)")
    y = _validate.tensor("y", y)
    compiling = torch.compiler.is_compiling()  # asked once: it is read four times below, on every step
    # sequence parallelism (zsnr_kernels.distributed): y is this rank's slice along shard_dim
    shard = (None if process_group is None and shard_dim is None
             else _distributed.layout(y, process_group, shard_dim, learn=False))
    pz = parameterization(prediction, sigma_data)
    w, phi, space = _validate.guidance(guidance_scale, guidance_rescale, rescale_space)
    # per-sample sigmas on the device (§2.9): one StepArgs of (B,) tensors, whose values the host never reads (a
    # sigma of a StepArgs is a float or such a tensor)
    on_device = type(args[0].sigma) is not float
    if not on_device:
        _validate.step_sigmas(args, pz)  # noise levels every backend can step (subnormal, huge, too wide a step)
    f_cond, f_uncond = _validate.model_output(model_output, y, w)
    for k, t in enumerate(history):
        if not _validate.matches(t, y):
            _validate.tensor(f"history[{k}]", t, y)
    if noise is not None and not callable(noise):
        _validate.tensor("noise", noise, y)
    if noise is not None and seed is not None:
        raise ValueError("pass noise= (a tensor or a function returning one) or seed= with step_index= (Philox "
                         "noise), not both")
    if out is not None:
        _validate.out(out, y, (y, f_cond, f_uncond, None if callable(noise) else noise, *history),
                      lambda k: _input_name(k, f_uncond is not None), compiling)
    step_index = _validate.step_index(step_index)
    draw = _validate.index("draw", _draw, 2**32) if _draw else 0
    seeds = None if seed is None else _noise.step_seeds(seed, y.shape[0])
    if seeds is not None and step_index is None:
        raise ValueError("seed= needs step_index= (the index of the step in the schedule) to pick the noise")
    # autograd records the step (the kernels have no backward: only the reference can run it), written out: this
    # runs on every step
    grad = torch.is_grad_enabled() and (
        y.requires_grad or f_cond.requires_grad or (f_uncond is not None and f_uncond.requires_grad)
        or (out is not None and out.requires_grad)
        or (noise is not None and isinstance(noise, torch.Tensor) and noise.requires_grad)
        or (len(history) > 0 and any(t.requires_grad for t in history)))
    name = _backend.resolve(backend, y, grad, compiling)
    noise_slice = None
    if shard is not None and seeds is not None:  # the slice's Philox noise at its global indices (§2.8)
        noise_slice = _distributed.kernel_noise_slice(shard, name)  # drawn by the kernel where it can
        if noise_slice is None:  # else drawn here, handed to the step as noise=
            noise, seeds = _distributed.step_noise(shard, y, seeds, step_index, draw), None
    if on_device:  # the device values, checked on the device; or read, for a backend that takes host values
        args, sigma_eval, on_device = _device_sigmas(pz, y, args, sigma_eval, first_origin, name)
    if seeds is not None and name != "torch" and isinstance(seeds, torch.Tensor) and not compiling:
        seeds = _noise.normalize_seeds(seeds, y.shape[0])  # the compiled launchers take host seeds (_device_sigmas)
    if on_device:
        sig_eval = sigma_eval
    else:
        sig_eval = sigma_eval if isinstance(sigma_eval, list) else [sigma_eval] * len(args)
        if len(sig_eval) != len(args):
            raise ValueError("first.sigma is per sample but this call's sigma and sigma_next are not: pass the "
                             "second call the per-sample sigmas of the first")
        if args[0].stage == 2:
            first_origin = _host_origin(first_origin)
            if not _own_origin(args, first_origin):  # an unmodified first stage of this call (the common case)
                _check_first_sigma(pz, args, sig_eval)  # passes both; else they say what differs
                _check_origin(args, first_origin)
    want_d = return_denoised or co.sampler_spec(args[0].sampler).keeps_denoised(args[0].stage)
    if name != "torch" and callable(noise):  # explicit noise drawn lazily: only if the spec says a sample adds some
        noise = noise() if any(co.step_coeffs(pz, a).e != 0.0 for a in args) else None
        if noise is not None:
            _validate.tensor("noise", noise, y)
            if out is not None:
                _validate.apart("out", out, (noise,), lambda k: "noise")
    run = ops.fused_step(name) if compiling else _backend.FUSED[name]
    if shard is not None:  # the guidance-rescale statistics of the full latent
        run = functools.partial(_distributed.fused_step, shard, name)
    y_out, d, carry, sigma_out, complete = run(
        y, f_cond, f_uncond, list(history), pz, args, sig_eval, guidance_scale=w, guidance_rescale=phi,
        rescale_space=space, noise=noise, seeds=seeds, step_index=step_index, want_denoised=want_d, out=out,
        draw=draw, noise_slice=noise_slice)
    sigma_next = (sigma_out if on_device else sigma_out[0] if len(args) == 1
                  else torch.tensor(sigma_out, dtype=torch.float64))
    result = (_new(StepResult, (y_out, sigma_next, d if want_d else None, True, carry)) if complete else
              StepResult(y_out, sigma_next, d if want_d else None, False, carry, _origin(args)))
    rec = _recording() if _recordings else None
    if rec is not None:  # zsnr_kernels.plan is recording a run in this context
        if isinstance(seeds, torch.Tensor):  # a plan keeps host seeds (it records on host tensors: no wait)
            seeds = _noise.normalize_seeds(seeds, y.shape[0])
        rec.step(y, list(history), args, sig_eval, result, seeds=seeds, step_index=step_index, draw=draw,
                 guided=f_uncond is not None)
    return result


_recorder: contextvars.ContextVar = contextvars.ContextVar("zsnr_kernels_recorder", default=None)
_recordings = 0  # open recording blocks, in any thread: a step reads the context variable only while one is
_recordings_lock = threading.Lock()


def _recording():
    """The recorder of this context, if any; a traced step is never recorded (Dynamo cannot trace a ContextVar)."""
    return None if torch.compiler.is_compiling() else _recorder.get()


@contextlib.contextmanager
def recording(recorder):
    """Inside the block, every step this thread (or asyncio task) runs calls ``recorder.step(y, history, args,
    sigma_eval, result, seeds=, step_index=, draw=, guided=)`` after it ran: how :class:`zsnr_kernels.SamplingPlan`
    learns what ``sample()`` does.  Steps of other threads are not recorded."""
    global _recordings
    token = _recorder.set(recorder)
    with _recordings_lock:
        _recordings += 1
    try:
        yield recorder
    finally:
        _recorder.reset(token)
        with _recordings_lock:
            _recordings -= 1


def _input_name(k: int, guided: bool) -> str:
    """The name of input k of a step, in the order (y, F_c, F_u, noise, *history) that ``out`` is checked in."""
    if k >= 4:
        return f"history[{k - 4}]"
    return ("y", "model_output[0] (cond)" if guided else "model_output", "model_output[1] (uncond)", "noise")[k]


def _device_sigmas(pz, y, args: list[co.StepArgs], sigma_eval, first_origin, name: str):
    """``(args, sigma_eval, on_device)`` of a step whose sigmas are device values (one StepArgs of (B,) tensors).

    The torch backend steps from them as they are (the second call's checks on the device,
    :func:`_device_second_stage`).  The compiled backends' launchers, a registered sampler's float coefficient
    function and a plan's recording take host values: for them the sigmas are read and checked as numbers are, and
    the step goes on as with per-sample lists (a wait for the device on every step: the CUDA and Triton launchers
    taking device coefficients is what remains, docs/design.md §2.9)."""
    a = args[0]
    if name == "torch" and co.has_tensor_coeffs(a.sampler) and not _recording():
        return args, sigma_eval if a.stage == 1 else _device_second_stage(pz, a, sigma_eval, first_origin), True
    b = y.shape[0]
    host = lambda n, v: None if v is None else _validate.sigma_values(n, v, b)  # noqa: E731
    args = _args(a.sampler, host("sigma", a.sigma), host("sigma_next", a.sigma_next),
                 hat=host("sigma_hat_next", a.sigma_hat_next),
                 prev=[host(f"history[{k}] sigma", p) for k, p in enumerate(a.sigma_prev)], stage=a.stage, eta=a.eta,
                 s_noise=a.s_noise, solver_type=a.solver_type, order=a.order, corrector=a.corrector)
    _validate.step_sigmas(args, pz)
    return args, host("first.sigma", sigma_eval), False


def _host_origin(origin):
    """``first.origin`` with a first call's device sigmas read (a second call with host sigmas compares values)."""
    if isinstance(origin, tuple) and len(origin) == 3 and any(isinstance(v, torch.Tensor) for v in origin[1:]):
        return (origin[0], *(v.detach().double().cpu().tolist() if isinstance(v, torch.Tensor) else v
                             for v in origin[1:]))
    return origin


def _same_view(a, b) -> bool:
    """Whether two tensors are views of the same memory alike (no value read; traced tensors have no address)."""
    return a is b or (isinstance(b, torch.Tensor) and not torch.compiler.is_compiling() and a.device == b.device
                      and a.shape == b.shape and a.stride() == b.stride() and a.data_ptr() == b.data_ptr())


def _device_second_stage(pz, a: co.StepArgs, sig_eval: torch.Tensor, origin) -> torch.Tensor:
    """The second call's checks of :func:`_check_first_sigma` and :func:`_check_origin` with device sigmas: the
    sampler is compared on the host, the sigmas on the device, and a sample whose ``first`` does not match gets a
    NaN sigma_eval (the step then writes NaN for it, §2.9).  Nothing is compared for the first call's own sigmas
    (the same memory, as the float path skips an unmodified first stage)."""
    if isinstance(origin, tuple) and len(origin) == 3 and origin[0] == a.sampler and (
            _same_view(a.sigma, origin[1]) and _same_view(a.sigma_next, origin[2])):
        return sig_eval
    if origin is not None and not (isinstance(origin, tuple) and len(origin) == 3 and origin[0] == a.sampler):
        _check_origin([a], origin)  # raises: a malformed origin, or another sampler's
    close = lambda x, y: (x == y) | ((x - y).abs() <= 1e-12 * torch.maximum(x.abs(), y.abs()))  # noqa: E731
    same = close(sig_eval, co.step_coeffs_tensor(pz, a._replace(stage=1)).sigma_out)
    if origin is not None:
        f_sg, f_sn = (_column(v, sig_eval) for v in origin[1:])
        same = same & close(f_sg, a.sigma) & close(f_sn, a.sigma_next)
    return torch.where(same, sig_eval, torch.nan)


def _check_first_sigma(pz, args: list[co.StepArgs], sig_eval: list) -> None:
    """A second call's ``first.sigma`` must be where this step's first stage put the model: else ``first`` came
    from another sampler or another (sigma, sigma_next), and the second stage would silently compute garbage."""
    for i, (a, s) in enumerate(zip(args, sig_eval)):
        want = co.step_coeffs(pz, a._replace(stage=1)).sigma_out
        if not math.isclose(s, want, rel_tol=1e-12):
            at = f" (sample {i})" if len(args) > 1 else ""
            raise ValueError(f"first.sigma={s}{at} is not where the first {a.sampler} stage from sigma={a.sigma} to "
                             f"sigma_next={a.sigma_next} calls the model ({want}): pass the result of that first "
                             "call, with the same sigma and sigma_next")


def _sigmas(y, sigma, sigma_next, *hat):
    """Validated sigma, sigma_next (and ``sigma_hat_next`` when one is passed; None: no churn) as floats or
    per-sample lists; as (B,) float64 tensors on y's device when one of them is a device value (§2.9), whose values
    are not read here (the module docstring lists what is checked on the device instead)."""
    if (type(sigma) is float and type(sigma_next) is float and sigma >= 0.0 and sigma_next >= 0.0 and (
            not hat or hat[0] is None or (type(hat[0]) is float and hat[0] >= 0.0))):
        return [sigma, sigma_next, *hat]  # numbers, the common case (NaN fails the comparisons)
    b = y.shape[0] if isinstance(y, torch.Tensor) and y.ndim else 1
    if isinstance(y, torch.Tensor) and any(map(_validate.device_sigma, (sigma, sigma_next, *hat))):
        return [None if v is None else _validate.sigma_tensor(n, v, b, y.device) if _validate.device_sigma(v)
                else _validate.sigma_values(n, v, b)  # a host value beside them: _args puts it on the device
                for n, v in zip(("sigma", "sigma_next", "sigma_hat_next"), (sigma, sigma_next, *hat))]
    out = [_validate.sigma_values("sigma", sigma, b), _validate.sigma_values("sigma_next", sigma_next, b)]
    out += [None if v is None else _validate.sigma_values("sigma_hat_next", v, b) for v in hat]
    if list in map(type, out):  # broadcast scalars to per-sample lists
        out = [v if v is None or isinstance(v, list) else [v] * b for v in out]
    return out


_DEFAULT = co.StepArgs._field_defaults


def _args(sampler: str, sg, sn, *, hat=None, prev=(), stage=_DEFAULT["stage"], eta=_DEFAULT["eta"],
          s_noise=_DEFAULT["s_noise"], solver_type=_DEFAULT["solver_type"],
          order=_DEFAULT["order"], corrector=_DEFAULT["corrector"]) -> list[co.StepArgs]:
    """One StepArgs for the batch, or one per sample when any sigma is a per-sample list (built positionally:
    keywords to a NamedTuple cost more, and this runs on every step); one StepArgs of (B,) tensors when any sigma
    is a tensor (a device value, §2.9: the others become tensors on its device)."""
    if type(sg) is float and type(sn) is float and type(hat) is not list and (
            not prev or all(type(p) is float for p in prev)):
        return [co.StepArgs(sampler, sg, sn, stage, hat, tuple(prev), eta, s_noise, solver_type, order, corrector)]
    like = next((v for v in (sg, sn, hat, *prev) if isinstance(v, torch.Tensor)), None)
    if like is not None:
        col = lambda v: None if v is None else _column(v, like)  # noqa: E731
        return [co.StepArgs(sampler, col(sg), col(sn), stage, col(hat), tuple(map(col, prev)), eta, s_noise,
                            solver_type, order, corrector)]
    n = max(len(v) for v in (sg, sn, hat, *prev) if isinstance(v, list))
    return [co.StepArgs(sampler, _at(sg, i), _at(sn, i), stage, None if hat is None else _at(hat, i),
                        tuple(_at(p, i) for p in prev), eta, s_noise, solver_type, order, corrector)
            for i in range(n)]


def _column(v, like: torch.Tensor) -> torch.Tensor:
    """A host sigma (a number or a per-sample list) as a (B,) float64 tensor beside the device sigmas ``like``: a fill
    on the device, or a list copied through pinned memory (no wait for the device)."""
    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, list):
        return _layout.to_device(torch.tensor(v, dtype=torch.float64), like.device)
    return torch.full_like(like, v)


def _history(history, depth: int, y, name: str = "history"):
    """Split [(sigma, tensor), ...] (newest first) into validated sigmas and tensors, at most ``depth``."""
    if history is None:
        return [], []
    if not isinstance(history, Sequence):
        raise TypeError(f"{name} must be a sequence of (sigma, tensor) pairs, newest first")
    pairs = list(history)[:depth]
    for k, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise TypeError(f"{name}[{k}] must be a (sigma, tensor) pair")
    b = y.shape[0] if isinstance(y, torch.Tensor) and y.ndim else 1
    sigmas = [_validate.sigma_tensor(f"{name}[{k}] sigma", p[0], b, y.device) if _validate.device_sigma(p[0])
              and isinstance(y, torch.Tensor) else _validate.sigma_values(f"{name}[{k}] sigma", p[0], b)
              for k, p in enumerate(pairs)]
    return sigmas, [p[1] for p in pairs]


def _eval_sigma(y, sigma, first):
    """The sigma the model was called at: ``sigma`` for a first call, ``first.sigma`` for a second one (a tensor on
    sigma's device when sigma is one)."""
    if first is None:
        return sigma
    if isinstance(sigma, torch.Tensor):
        if _validate.device_sigma(first.sigma):
            return _validate.sigma_tensor("first.sigma", first.sigma, y.shape[0], sigma.device)
        return _column(_validate.sigma_values("first.sigma", first.sigma, y.shape[0]), sigma)
    return _validate.sigma_values("first.sigma", first.sigma, y.shape[0])


def _first_stage(first, stage_name: str):
    if first is None:
        return 1, ()
    if not isinstance(first, StepResult):
        raise TypeError(f"first must be the StepResult of the first {stage_name} call")
    if first.complete:
        raise ValueError(f"first.complete is True: that {stage_name} step already finished; start the next step")
    if not isinstance(first.denoised, torch.Tensor):
        raise TypeError(f"first.denoised must be the tensor the first {stage_name} call returned, got "
                        f"{type(first.denoised).__name__}: pass that StepResult unchanged")
    if stage_name == "dpmpp_sde":  # its second stage starts over from the step's start state (first.derivative)
        if not isinstance(first.derivative, torch.Tensor):
            raise TypeError(f"first.derivative must be the state the first dpmpp_sde call started from (the y it "
                            f"was given), got {type(first.derivative).__name__}: pass that StepResult unchanged")
        return 2, (first.denoised, first.derivative)
    return 2, (first.denoised,)


def _check_first_y(sampler: str, y, first: StepResult) -> None:
    """A second call continues the step its ``first`` call began from first.y itself (checked by identity or as
    the same view of the same memory: no device value is read); another y computes a plausible-looking wrong
    sample."""
    fy = first.y
    if not torch.compiler.is_compiling() and y is not fy and isinstance(y, torch.Tensor) and not (
            isinstance(fy, torch.Tensor) and y.device == fy.device and y.dtype == fy.dtype and y.shape == fy.shape
            and y.stride() == fy.stride() and y.data_ptr() == fy.data_ptr()):
        raise ValueError(
            f"y is not first.y: the second {sampler} call continues from the state the first call returned, with "
            f"the model evaluated there. Call {_step_name(sampler)} with first.y, model(first.y, first.sigma), "
            "sigma, sigma_next and first=first")


def _origin(args: list[co.StepArgs]) -> tuple:
    """``StepResult.origin`` of a first stage (only a first stage is passed on as ``first``)."""
    a0 = args[0]
    if len(args) == 1:
        return a0.sampler, a0.sigma, a0.sigma_next
    return a0.sampler, [a.sigma for a in args], [a.sigma_next for a in args]


def _same_sigmas(origin: tuple, i: int, a: co.StepArgs) -> bool:
    return (math.isclose(_at(origin[1], i), a.sigma, rel_tol=1e-12)
            and math.isclose(_at(origin[2], i), a.sigma_next, rel_tol=1e-12))


def _own_origin(args: list[co.StepArgs], origin) -> bool:
    """Whether ``first.origin`` is this second call's own sampler and sigmas: ``first`` is then this step's first
    stage, unmodified (``_replace`` drops the origin), and :func:`_check_first_sigma`, which recomputes the first
    stage's coefficients, has nothing to find."""
    return (isinstance(origin, tuple) and len(origin) == 3 and origin[0] == args[0].sampler
            and all(_same_sigmas(origin, i, a) for i, a in enumerate(args)))


def _check_origin(args: list[co.StepArgs], origin) -> None:
    """A second call takes the sampler, sigma and sigma_next of its first call (``first.origin``; a StepResult
    built by hand without one is not checked).  Run after :func:`_check_first_sigma`, this catches what that
    cannot see: a Heun first stage of another step to the same sigma_next (with churn: the first call at
    sigma_hat, the second at sigma), or a first stage of another sampler that calls the model at the same sigma."""
    if origin is None:
        return
    if not (isinstance(origin, tuple) and len(origin) == 3):
        raise TypeError("first.origin must be the (sampler, sigma, sigma_next) of the first call: pass its "
                        "StepResult unchanged")
    f_sampler, f_sg, f_sn = origin
    sampler = args[0].sampler
    if f_sampler != sampler:
        raise ValueError(f"first was returned by {_step_name(f_sampler)}, not {_step_name(sampler)}: pass the result "
                         f"of this step's first {_step_name(sampler)} call")
    n = len(args)
    for i in range(n):
        if not _same_sigmas(origin, i, args[i]):
            a, b, c, d = _at(f_sg, i), _at(f_sn, i), args[i].sigma, args[i].sigma_next
            at = f" (sample {i})" if n > 1 else ""
            raise ValueError(
                f"first was returned by the first {sampler} call from sigma={a} to sigma_next={b}, but this call "
                f"has sigma={c}, sigma_next={d}{at}: the second call of a step takes the sigma and sigma_next of its "
                "first call (with churn, sigma_hat both times, where the first call's model ran). Pass this step's "
                "first result, or the sigmas it was called with")


def _real(name, v):
    return _validate.real(name, v, lo=0.0)


# ------------------------------------------------------------------------------------------ public functions


def euler_step(y, model_output, sigma, sigma_next, *, sigma_hat_next=None, s_noise=1.0, noise=None, seed=None,
               step_index=None, **options) -> StepResult:
    """Euler (Karras et al. Algorithm 2 without the Heun correction), the model called at (y, sigma).

    x' = x + (sigma' - sigma)(x - D)/sigma, i.e. y' = (s'/s) y + c_in(sigma')(1 - sigma'/sigma) D with
    s = sigma c_in(sigma); from sigma = inf, y' = s' y + c_in(sigma') D.  With ``sigma_hat_next`` > sigma' the
    churn of the next step is folded in (§2.5): y_hat = (c_hat/c') y' + c_hat sqrt(sigma_hat^2 - sigma'^2)
    s_noise z, and the result is the model input at sigma_hat_next (its noise is drawn with ``step_index``).
    """
    sg, sn, shn = _sigmas(y, sigma, sigma_next, sigma_hat_next)
    args = _args("euler", sg, sn, hat=shn, s_noise=_real("s_noise", s_noise))
    return _run(y, model_output, sg, args, noise=noise, seed=seed, step_index=step_index, **options)


def euler_ancestral_step(y, model_output, sigma, sigma_next, *, eta=1.0, s_noise=1.0, noise=None, seed=None,
                         step_index=None, **options) -> StepResult:
    """Euler ancestral (k-diffusion): Euler to sigma_down, then s_noise * sigma_up noise (none at sigma' = 0).

    sigma_up = min(sigma', eta sqrt(sigma'^2 (sigma^2 - sigma'^2)/sigma^2)), sigma_down = sqrt(sigma'^2 -
    sigma_up^2); in y: y' = (s'/s) d y + c'(1 - d sigma'/sigma) D + s' u s_noise z, d, u = sigma_down/sigma',
    sigma_up/sigma' (finite at sigma = inf: u = min(1, eta)).
    """
    sg, sn = _sigmas(y, sigma, sigma_next)
    args = _args("euler_ancestral", sg, sn, eta=_real("eta", eta), s_noise=_real("s_noise", s_noise))
    return _run(y, model_output, sg, args, noise=noise, seed=seed, step_index=step_index, **options)


def ddim_step(y, model_output, sigma, sigma_next, *, eta=0.0, noise=None, seed=None, step_index=None,
              **options) -> StepResult:
    """DDIM (diffusers ``DDIMScheduler.step``): y' = alpha' D + sqrt(s'^2 - std^2) eps_hat + std z.

    With the VP signal and noise scales alpha = c_in and s, eps_hat = (y - alpha D)/s and
    std = eta s' sqrt(1 - (sigma'/sigma)^2) (= eta sqrt((1-a')/(1-a)(1 - a/a'))).  This is
    :func:`euler_ancestral_step` without k-diffusion's min() clamp, so 0 <= eta <= 1; eta = 0 is Euler.
    """
    sg, sn = _sigmas(y, sigma, sigma_next)
    args = _args("ddim", sg, sn, eta=_validate.real("eta", eta, lo=0.0, hi=1.0))
    return _run(y, model_output, sg, args, noise=noise, seed=seed, step_index=step_index, **options)


def ddpm_step(y, model_output, sigma, sigma_next, *, noise=None, seed=None, step_index=None,
              **options) -> StepResult:
    """DDPM ancestral step (diffusers ``DDPMScheduler``, variance ``fixed_small``): the posterior
    q(x_{t'} | x_t, x0 = D), which is :func:`ddim_step` at eta = 1."""
    sg, sn = _sigmas(y, sigma, sigma_next)
    return _run(y, model_output, sg, _args("ddpm", sg, sn), noise=noise, seed=seed, step_index=step_index,
                **options)


def lcm_step(y, model_output, sigma, sigma_next, *, noise=None, seed=None, step_index=None,
             **options) -> StepResult:
    """Latent consistency sampling (``sample_lcm`` of k-diffusion and ComfyUI): the model's D noised afresh to
    sigma', x' = D + sigma' z, y' = c_in(sigma') D + s' z; D at sigma' = 0 (no noise there)."""
    sg, sn = _sigmas(y, sigma, sigma_next)
    return _run(y, model_output, sg, _args("lcm", sg, sn), noise=noise, seed=seed, step_index=step_index,
                **options)


def heun_step(y, model_output, sigma, sigma_next, *, first=None, sigma_hat_next=None, s_noise=1.0, noise=None,
              seed=None, step_index=None, **options) -> StepResult:
    """Heun (Karras et al. Algorithm 2), in two calls.

    First call (model at (y, sigma)): the Euler predictor to sigma'; it is the whole step (``complete``) when
    sigma' = 0 or sigma = inf.  Second call (``first`` = that result, model at (first.y, sigma')):
    x' = x_2 + (sigma' - sigma)/(2 sigma') (D_1 - D_2), i.e. y' = y_2 + w (D_1 - D_2), w = c'(1 - sigma/sigma')/2.
    ``sigma_hat_next`` folds the next step's churn into the final call (see :func:`euler_step`).
    The second call is ``heun_step(first.y, model(first.y, first.sigma), sigma, sigma_next, first=first)``: a y
    other than first.y itself, or sigmas other than the first call's, are refused (ValueError).
    """
    return _two_stage("heun", y, model_output, sigma, sigma_next, first, options, noise=noise, seed=seed,
                      step_index=step_index, hat=sigma_hat_next, s_noise=s_noise)


def heun_flow_step(y, model_output, sigma, sigma_next, *, first=None, noise=None, seed=None, step_index=None,
                   **options) -> StepResult:
    """Heun's method in the rectified-flow time t = sigma/(1+sigma), diffusers' ``FlowMatchHeunDiscreteScheduler``,
    in two calls (no churn).

    First call (model at (y, sigma)): the Euler predictor to sigma' (the whole step only when sigma' = 0).  Second
    call (``first`` = that result, model at (first.y, sigma')): y' = y_2 + w (D_1 - D_2) with
    w = -c'(1+sigma')(sigma - sigma')/(2 sigma'(1+sigma)); for a flow model (y = x_t) that is
    x_t' = x_t + (t'-t)(v_1+v_2)/2.  Unlike :func:`heun_step` (whose trapezoid in sigma has no limit there) the step
    from sigma = inf (t = 1) takes both calls: w = -c'(1+sigma')/(2 sigma').  See
    :func:`zsnr_kernels.coefficients.heun_flow`.
    The second call is ``heun_flow_step(first.y, model(first.y, first.sigma), sigma, sigma_next, first=first)``: a y
    other than first.y itself, or sigmas other than the first call's, are refused (ValueError).
    """
    return _two_stage("heun_flow", y, model_output, sigma, sigma_next, first, options, noise=noise, seed=seed,
                      step_index=step_index)


def dpm_2_step(y, model_output, sigma, sigma_next, *, first=None, sigma_hat_next=None, s_noise=1.0, noise=None,
               seed=None, step_index=None, **options) -> StepResult:
    """k-diffusion's DPM-Solver-2, in two calls: Euler predictor to sigma_mid = sqrt(sigma sigma'), then
    x' = x + (sigma' - sigma)(x_2 - D_2)/sigma_mid, i.e.
    y' = (s'/s_mid) y_2 + c'[(1 - sigma/sigma_mid) D_1 + ((sigma - sigma')/sigma_mid) D_2].
    Euler (complete after the first call) when sigma' = 0 or sigma = inf.
    The second call is ``dpm_2_step(first.y, model(first.y, first.sigma), sigma, sigma_next, first=first)``: a y
    other than first.y itself, or sigmas other than the first call's, are refused (ValueError)."""
    return _two_stage("dpm_2", y, model_output, sigma, sigma_next, first, options, noise=noise, seed=seed,
                      step_index=step_index, hat=sigma_hat_next, s_noise=s_noise)


def dpm_2_ancestral_step(y, model_output, sigma, sigma_next, *, first=None, eta=1.0, s_noise=1.0, noise=None,
                         seed=None, step_index=None, **options) -> StepResult:
    """k-diffusion's dpm_2_ancestral, in two calls: DPM-Solver-2 from sigma to sigma_down, then sigma_up noise
    (see :func:`euler_ancestral_step` for sigma_down/up).  Complete after one call when sigma_down = 0 or
    sigma = inf: DPM-Solver-2 has no limit there (like Heun), so that step is :func:`euler_ancestral_step`.
    The second call is ``dpm_2_ancestral_step(first.y, model(first.y, first.sigma), sigma, sigma_next,
    first=first)``: a y other than first.y itself, or sigmas other than the first call's, are refused
    (ValueError)."""
    return _two_stage("dpm_2_ancestral", y, model_output, sigma, sigma_next, first, options, noise=noise,
                      seed=seed, step_index=step_index, eta=eta, s_noise=s_noise)


def dpmpp_2s_ancestral_step(y, model_output, sigma, sigma_next, *, first=None, eta=1.0, s_noise=1.0, noise=None,
                            seed=None, step_index=None, **options) -> StepResult:
    """DPM-Solver++(2S) ancestral (k-diffusion), in two calls: predictor to sigma_mid = sqrt(sigma sigma_down),
    then x_down = (sigma_down/sigma) x + (1 - sigma_down/sigma) D_2, plus sigma_up noise.  From sigma = inf this
    is its exact limit: for eta < 1 the midpoint is at inf too and the step is :func:`euler_ancestral_step`; for
    eta = 1, sigma_mid = sigma' at every sigma, so the limit keeps both evaluations.
    The second call is ``dpmpp_2s_ancestral_step(first.y, model(first.y, first.sigma), sigma, sigma_next,
    first=first)``: a y other than first.y itself, or sigmas other than the first call's, are refused
    (ValueError)."""
    return _two_stage("dpmpp_2s_ancestral", y, model_output, sigma, sigma_next, first, options, noise=noise,
                      seed=seed, step_index=step_index, eta=eta, s_noise=s_noise)


def dpmpp_sde_step(y, model_output, sigma, sigma_next, *, first=None, eta=1.0, s_noise=1.0, noise=None, seed=None,
                   step_index=None, **options) -> StepResult:
    """DPM-Solver++(2S) SDE with r = 1/2 (k-diffusion's ``sample_dpmpp_sde``), in two calls; see
    :func:`zsnr_kernels.coefficients.dpmpp_sde` for the formulas and the limits.

    First call (model at (y, sigma)): euler_ancestral from sigma to sigma_s = sqrt(sigma sigma') with its noise;
    ``first.sigma`` is sigma_s and ``first.derivative`` is ``y`` itself (the step's start state, kept by reference:
    do not write into y before the second call).  Second call (model at (first.y, sigma_s)): euler_ancestral from
    sigma to sigma' on the START state with D_2, y' = (s'/s) d y + c'(1 - d sigma'/sigma) D_2 + s' u s_noise z_2.
    Euler, complete after the first call, to sigma' = 0 (as k-diffusion), and from sigma = inf at eta = 0; from
    sigma = inf with eta > 0 both calls run, the second model call at sigma = inf too.

    Noise: ``noise=`` is used by each call that adds noise (pass a function or a fresh tensor per call); with
    ``seed=`` the two stages draw different Philox noise of step ``step_index`` (docs/design.md §2.8): draw 0 in the
    first call, draw 1 in the second, each drawn inside the fused step (the step record's ``draw``).  ``sample()``
    with a
    ``noise_sampler`` calls it as k-diffusion does: ``(sigma, sigma_s)`` for the first stage, ``(sigma, sigma')``
    for the second.

    ``out=y`` (in place) on the first call copies y first (one more read and write of y's size), since the second
    call reads the start state; ``sample()`` never writes a two-stage step in place.  The second call is
    ``dpmpp_sde_step(first.y, model(first.y, first.sigma), sigma, sigma_next, first=first)``."""
    if first is None:
        out, start = options.get("out"), y
        if out is not None and isinstance(y, torch.Tensor) and (out is y or _same_view(out, y)):
            start = y.clone()  # in place: the start state the second call reads is kept apart first
        r = _two_stage("dpmpp_sde", y, model_output, sigma, sigma_next, None, options, noise=noise, seed=seed,
                       step_index=step_index, eta=eta, s_noise=s_noise)
        return r if r.complete else StepResult(r.y, r.sigma, r.denoised, False, start, r.origin)
    return _two_stage("dpmpp_sde", y, model_output, sigma, sigma_next, first, options, noise=noise, seed=seed,
                      step_index=step_index, eta=eta, s_noise=s_noise, draw=1)  # the step's second draw (§2.8)


def dpmpp_2m_step(y, model_output, sigma, sigma_next, *, history=None, **options) -> StepResult:
    """DPM-Solver++(2M): y' = (s'/s) y + c'(1 - sigma'/sigma)[(1 + w) D - w D_prev], w = h/(2 h_last),
    h = log(sigma/sigma'), h_last = log(sigma_prev/sigma).  ``history`` = [(sigma_prev, D_prev)] (first order
    without it, at sigma' = 0 and when sigma_prev = inf)."""
    sg, sn = _sigmas(y, sigma, sigma_next)
    hs, ht = _history(history, 1, y)
    return _run(y, model_output, sg, _args("dpmpp_2m", sg, sn, prev=hs), history=ht, **options)


def res_multistep_step(y, model_output, sigma, sigma_next, *, history=None, **options) -> StepResult:
    """RES multistep (ComfyUI's ``res_multistep``): the second-order exponential integrator of Zhang et al. 2023
    through D and the previous D, first order on the first step and to sigma' = 0; ``history`` as for
    :func:`dpmpp_2m_step`.  See :func:`zsnr_kernels.coefficients.res_multistep`."""
    sg, sn = _sigmas(y, sigma, sigma_next)
    hs, ht = _history(history, 1, y)
    return _run(y, model_output, sg, _args("res_multistep", sg, sn, prev=hs), history=ht, **options)


def euler_cfg_pp_step(y, model_output, sigma, sigma_next, **options) -> StepResult:
    """Euler with CFG++ (Chung et al. 2024; ComfyUI's ``euler_cfg_pp``): denoise with the guided D, renoise with
    the unconditional D_u of ``model_output=(F_cond, F_uncond)``: x' = D + sigma' (x - D_u)/sigma, i.e.
    y' = (s'/s) y + c' D - c'(sigma'/sigma) D_u.  Without an unconditional output, or at guidance_scale 1 (F_c
    alone), D_u = D and this is :func:`euler_step`; from sigma = inf it is euler's step (D_u has weight 0 there).
    See :func:`zsnr_kernels.coefficients.ancestral_cfg_pp`."""
    sg, sn = _sigmas(y, sigma, sigma_next)
    return _run(y, model_output, sg, _args("euler_cfg_pp", sg, sn), **options)


def euler_ancestral_cfg_pp_step(y, model_output, sigma, sigma_next, *, eta=1.0, s_noise=1.0, noise=None, seed=None,
                                step_index=None, **options) -> StepResult:
    """Euler ancestral with CFG++ (ComfyUI's ``euler_ancestral_cfg_pp``): x' = D + sigma_down (x - D_u)/sigma
    + s_noise sigma_up z (sigma_down, sigma_up as :func:`euler_ancestral_step`; D at sigma' = 0).  D_u = D without
    guidance: then this is :func:`euler_ancestral_step`."""
    sg, sn = _sigmas(y, sigma, sigma_next)
    args = _args("euler_ancestral_cfg_pp", sg, sn, eta=_real("eta", eta), s_noise=_real("s_noise", s_noise))
    return _run(y, model_output, sg, args, noise=noise, seed=seed, step_index=step_index, **options)


def dpmpp_2m_cfg_pp_step(y, model_output, sigma, sigma_next, *, history=None, **options) -> StepResult:
    """DPM-Solver++(2M) with CFG++ (ComfyUI's ``dpmpp_2m_cfg_pp``): x' = D + r (x - D_u) + (1 - r) w (D - D_u,prev),
    r = sigma'/sigma, w = h/(2 h_last).  It remembers the unconditional D_u, which it returns as
    ``StepResult.derivative``: ``history`` = [(sigma_prev, previous result's derivative)] (first order without it,
    at sigma' = 0 and when sigma_prev = inf).  D_u = D without guidance: then this is :func:`dpmpp_2m_step`.
    See :func:`zsnr_kernels.coefficients.dpmpp_2m_cfg_pp`."""
    sg, sn = _sigmas(y, sigma, sigma_next)
    hs, ht = _history(history, 1, y)
    return _run(y, model_output, sg, _args("dpmpp_2m_cfg_pp", sg, sn, prev=hs), history=ht, **options)


def dpmpp_2s_ancestral_cfg_pp_step(y, model_output, sigma, sigma_next, *, first=None, eta=1.0, s_noise=1.0,
                                   noise=None, seed=None, step_index=None, **options) -> StepResult:
    """DPM-Solver++(2S) ancestral with CFG++ (ComfyUI's ``dpmpp_2s_ancestral_cfg_pp``), in two calls: predictor
    with the unconditional D_u1 to sigma_mid, then x' = (sigma_down/sigma) x + (1 - sigma_down/sigma) D_u2 + sigma_up
    noise + (D_1 - D_u1).  The first call returns D_u1 as ``derivative``; the second call is
    ``dpmpp_2s_ancestral_cfg_pp_step(first.y, model(first.y, first.sigma), sigma, sigma_next, first=first)`` and
    reads first.denoised and first.derivative.  Complete after one call where sigma_down = 0 (y' = c' D_1 + noise)
    and from sigma = inf with eta < 1 (:func:`euler_ancestral_cfg_pp_step`'s step).  D_u = D without guidance:
    then this is :func:`dpmpp_2s_ancestral_step`.  See
    :func:`zsnr_kernels.coefficients.dpmpp_2s_ancestral_cfg_pp`."""
    name = "dpmpp_2s_ancestral_cfg_pp"
    sg, sn = _sigmas(y, sigma, sigma_next)
    stage, hist = _first_stage(first, name)
    if first is not None:
        _check_first_y(name, y, first)
        if not isinstance(first.derivative, torch.Tensor):
            raise TypeError(f"first.derivative must be the tensor the first {name} call returned (its unconditional "
                            f"D_u), got {type(first.derivative).__name__}: pass that StepResult unchanged")
        hist = (*hist, first.derivative)
    args = _args(name, sg, sn, stage=stage, eta=_real("eta", eta), s_noise=_real("s_noise", s_noise))
    return _run(y, model_output, _eval_sigma(y, sg, first), args, history=hist, noise=noise, seed=seed,
                step_index=step_index, first_origin=None if first is None else first.origin, **options)


def dpmpp_2m_sde_step(y, model_output, sigma, sigma_next, *, history=None, eta=1.0, s_noise=1.0,
                      solver_type="midpoint", noise=None, seed=None, step_index=None, **options) -> StepResult:
    """DPM-Solver++(2M) SDE (k-diffusion); returns D at sigma' = 0.  See
    :func:`zsnr_kernels.coefficients.dpmpp_2m_sde` for the formula.  ``history`` = [(sigma_prev, D_prev)]."""
    sg, sn = _sigmas(y, sigma, sigma_next)
    hs, ht = _history(history, 1, y)
    args = _args("dpmpp_2m_sde", sg, sn, prev=hs, eta=_real("eta", eta), s_noise=_real("s_noise", s_noise),
                 solver_type=_OPTION_CHECKS["solver_type"](solver_type))
    return _run(y, model_output, sg, args, history=ht, noise=noise, seed=seed, step_index=step_index, **options)


def dpmpp_3m_sde_step(y, model_output, sigma, sigma_next, *, history=None, eta=1.0, s_noise=1.0, noise=None,
                      seed=None, step_index=None, **options) -> StepResult:
    """DPM-Solver++(3M) SDE (k-diffusion); returns D at sigma' = 0.  ``history`` = up to two earlier
    (sigma, D) pairs, newest first.  See :func:`zsnr_kernels.coefficients.dpmpp_3m_sde`."""
    sg, sn = _sigmas(y, sigma, sigma_next)
    hs, ht = _history(history, 2, y)
    args = _args("dpmpp_3m_sde", sg, sn, prev=hs, eta=_real("eta", eta), s_noise=_real("s_noise", s_noise))
    return _run(y, model_output, sg, args, history=ht, noise=noise, seed=seed, step_index=step_index, **options)


def lms_step(y, model_output, sigma, sigma_next, *, history=None, order=4, **options) -> StepResult:
    """Linear multistep of ``order`` on d = (x - D)/sigma (k-diffusion ``sample_lms``): x' = x + sum_j w_j d_j,
    w_j the integrals over [sigma, sigma'] of the Lagrange basis through the current and remembered sigmas.
    ``history`` = earlier (sigma, derivative) pairs, newest first (``StepResult.derivative``)."""
    order = _OPTION_CHECKS["order"](order)
    sg, sn = _sigmas(y, sigma, sigma_next)
    hs, ht = _history(history, order - 1, y)
    return _run(y, model_output, sg, _args("lms", sg, sn, prev=hs, order=order), history=ht, **options)


def unipc_step(y, model_output, sigma, sigma_next, *, history=None, order=2, corrector=None, solver_type="bh2",
               **options) -> StepResult:
    """UniPC (Zhao et al. 2023) with data prediction, as diffusers' ``UniPCMultistepScheduler``: the corrector UniC
    of the previous step and the predictor UniP of this one, in one pass over the same tensors.

    ``history`` = up to three earlier (sigma, denoised) pairs, newest first (``StepResult.denoised``).  ``order``
    (1-3) is this step's predictor order, used as far as the history reaches (diffusers' default is 2; it lowers
    the order of the first steps, and of the last ones with ``lower_order_final``).  ``corrector`` is the order of
    the previous step's predictor, which this call corrects now that the model has been evaluated where that
    step went: None (the default) takes min(order, len(history)), what the previous call used when it asked for
    the same order; 0 skips the correction (diffusers' ``disable_corrector``).  ``solver_type`` is the variant,
    ``"bh2"`` (B(h) = e^h - 1, diffusers' default) or ``"bh1"`` (B(h) = h).  :func:`zsnr_kernels.sample` sets
    both orders per step as diffusers does.  Limits at sigma = inf and 0: see
    :func:`zsnr_kernels.coefficients.unipc`."""
    order = _validate.integer("order", order, lo=1, hi=co.UNIPC_MAX_ORDER)
    solver_type = _validate.choice("solver_type", solver_type, co.UNIPC_VARIANTS)
    sg, sn = _sigmas(y, sigma, sigma_next)
    hs, ht = _history(history, co.UNIPC_MAX_ORDER, y)
    if corrector is None:
        corrector = min(order, len(hs))
    else:
        corrector = _validate.integer("corrector", corrector, lo=0, hi=co.UNIPC_MAX_ORDER)
        if corrector > len(hs):
            raise ValueError(f"corrector={corrector} corrects a step of that order, which needs {corrector} "
                             f"remembered (sigma, denoised) pairs in history; got {len(hs)} (pass corrector=0 "
                             "on the first step)")
    args = _args("unipc", sg, sn, prev=hs, order=order, solver_type=solver_type, corrector=corrector)
    return _run(y, model_output, sg, args, history=ht, **options)


def sampler_step(sampler: str, y, model_output, sigma, sigma_next, **options) -> StepResult:
    """One step of any sampler of :data:`zsnr_kernels.coefficients.SAMPLERS`, by name.

    A sampler with a named step function (``sampler_step("heun", ...)``) runs exactly that function, with its
    options and defaults (:func:`heun_step` ...).  A sampler added with ``coefficients.register_sampler`` takes what
    its row declares: ``first`` (two-stage), ``history`` (multistep: up to ``history`` earlier (sigma, tensor)
    pairs, newest first), ``sigma_hat_next`` (churn), ``eta`` (default 1) and ``s_noise`` (default 1) where it
    takes them, its ``options`` (``solver_type``, ``order``), the noise options ``noise``/``seed``/``step_index``,
    and every option the step functions share (see the module docstring).  Any other option is a TypeError."""
    spec = co.sampler_spec(sampler)
    if spec.step:
        return _NAMED_STEPS[spec.name](y, model_output, sigma, sigma_next, **options)
    takes = {"first": spec.kind == "two_stage", "history": spec.kind == "multistep", "sigma_hat_next": spec.churn,
             "eta": spec.eta, "s_noise": spec.s_noise or spec.churn}
    for name, taken in takes.items():
        if name in options and not taken:
            raise TypeError(f"sampler_step({sampler!r}, ...) got an unexpected keyword argument {name!r}: a "
                            f"{spec.kind} sampler{' without churn' if name == 'sigma_hat_next' else ''} takes none")
    first, history, hat = options.pop("first", None), options.pop("history", None), options.pop("sigma_hat_next",
                                                                                                  None)
    own = {name: _OPTION_CHECKS[name](options.pop(name, default)) for name, default in spec.options}
    extra = dict(own)
    if spec.eta:
        extra["eta"] = _real("eta", options.pop("eta", 1.0))
    if spec.s_noise or spec.churn:
        extra["s_noise"] = _real("s_noise", options.pop("s_noise", 1.0))
    noise = {k: options.pop(k, None) for k in ("noise", "seed", "step_index")}
    if spec.kind == "two_stage":
        return _two_stage(sampler, y, model_output, sigma, sigma_next, first, options, hat=hat, own=own, **noise,
                          **{k: v for k, v in extra.items() if k not in own})
    sg, sn, shn = _sigmas(y, sigma, sigma_next, hat)
    hs, ht = _history(history, spec.history, y)
    args = _args(sampler, sg, sn, hat=shn, prev=hs, **extra)
    return _run(y, model_output, sg, args, history=ht, **noise, **options)


#: how :func:`sampler_step` checks each option a row may declare (``SamplerSpec.options``)
_OPTION_CHECKS = {
    "solver_type": lambda v: _validate.choice("solver_type", v, co.SOLVER_TYPES),
    "order": lambda v: _validate.integer("order", v, lo=1, hi=co.LMS_MAX_ORDER),
}


def _step_name(sampler: str) -> str:
    """How the user called a sampler's step: its named function, or sampler_step with its name."""
    spec = co.SAMPLERS.get(sampler)
    return f"{sampler}_step" if spec is not None and spec.step else f"sampler_step({sampler!r}, ...)"


def step_function(sampler: str):
    """The step function of ``sampler``: its named ``<sampler>_step`` where the library has one, else
    :func:`sampler_step` bound to the name (a sampler added with ``coefficients.register_sampler``)."""
    spec = co.sampler_spec(sampler)
    return _NAMED_STEPS[spec.name] if spec.step else functools.partial(sampler_step, spec.name)


def _two_stage(sampler, y, model_output, sigma, sigma_next, first, options, *, noise, seed, step_index, hat=None,
               eta=1.0, s_noise=1.0, own=None, draw=0) -> StepResult:
    """The two-stage samplers: stage from ``first``; the final call folds the next step's churn (heun, dpm_2).
    ``draw``: the Philox draw of the second call's ``seed=`` noise (the first call's is 0)."""
    sg, sn, shn = _sigmas(y, sigma, sigma_next, hat)
    stage, hist = _first_stage(first, sampler)
    if first is not None:
        _check_first_y(sampler, y, first)
    eta, s_noise = _real("eta", eta), _real("s_noise", s_noise)
    args = (_args(sampler, sg, sn, hat=shn, stage=stage, eta=eta, s_noise=s_noise) if own is None else
            _args(sampler, sg, sn, hat=shn, stage=stage, eta=eta, s_noise=s_noise, **own))  # a call with ** is slower
    return _run(y, model_output, _eval_sigma(y, sg, first), args, history=hist, noise=noise, seed=seed,
                step_index=step_index, first_origin=None if first is None else first.origin,
                _draw=0 if first is None else draw, **options)


#: the named step functions of the samplers whose row says ``step=True`` (a plain dict: torch.compile traces it)
_NAMED_STEPS = {spec.name: globals()[f"{spec.name}_step"] for spec in co.SAMPLERS.values() if spec.step}

__all__ = [
    "StepResult", "churn_step", "initial_state", "final_sample", "to_x", "to_y", "euler_step", "euler_ancestral_step",
    "ddim_step", "ddpm_step", "heun_step", "heun_flow_step", "dpm_2_step", "dpm_2_ancestral_step", "dpmpp_2s_ancestral_step", "dpmpp_sde_step",
    "dpmpp_2m_step", "dpmpp_2m_sde_step", "dpmpp_3m_sde_step", "lms_step", "lcm_step", "res_multistep_step", "unipc_step", "PREDICTIONS", "recording",
    "euler_cfg_pp_step", "euler_ancestral_cfg_pp_step", "dpmpp_2m_cfg_pp_step", "dpmpp_2s_ancestral_cfg_pp_step",
    "sampler_step", "step_function",
]
