"""The sampling loop: ``zsnr_kernels.sample``, built on the step functions of :mod:`zsnr_kernels.steps`."""

from __future__ import annotations

import math
import sys

import torch

from . import _validate, coefficients as co, schedules, steps
from .parameterization import parameterization

INF = math.inf

#: the sampler table, :data:`zsnr_kernels.coefficients.SAMPLERS`: name -> ``coefficients.SamplerSpec``
SAMPLERS = co.SAMPLERS


def sample(model, noise, sigmas, *, sampler="euler", prediction="v", sigma_data=1.0, guidance_scale=1.0,
           guidance_rescale=0.0, rescale_space="output", s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"),
           s_noise=1.0, eta=1.0, solver_type=None, order=None, disable_corrector=(), model_sigmas=None, seed=None,
           noise_sampler=None, backend="auto", callback=None, disable=True, process_group=None,
           shard_dim=None) -> torch.Tensor:
    """Sample from ``model`` along ``sigmas``; the schedule may start at sigma = inf (zero terminal SNR).

    model:     ``model(y, sigma) -> F`` (or ``(F_cond, F_uncond)`` when ``guidance_scale != 1``), called with the
               model input y (shape of ``noise``) and sigma as a float64 tensor of shape (B,) on y's device
               (inf allowed).  F is the model's raw output for ``prediction`` (``v``, ``eps``, ``x0``, ``flow``).
               A pair with ``guidance_scale=1`` is F_cond alone (F_uncond is ignored): a UserWarning says so,
               once per call site.  F is not checked for NaN/inf (that would wait for the device on every
               step): a NaN or inf in F reaches the result, on every backend; check ``torch.isfinite(x0)``.
    noise:     unit Gaussian; the start state is y = sigma_0 c_in(sigma_0) noise (``noise`` itself at inf).
    sigmas:    1-D, strictly descending, ends with 0; the first may be inf.  An ascending schedule is refused
               with the fix (``sigmas.flip(0)``).  A schedule that ends above 0 (the first part of a split one) stops
               there and returns the variance-exploding latent x = y / c_in(sigmas[-1]) at that level, k-diffusion's
               convention: ``sample(model, x / sigmas_b[0], sigmas_b)`` continues it (the noise argument of a start
               at finite sigma is x / sigma_0), as one run would, apart from the history a multistep sampler
               starts afresh.
    sampler:   one of :data:`SAMPLERS` (its row says which options it takes).  ``s_churn``/``s_tmin``/
               ``s_tmax``/``s_noise`` drive EDM churn for euler/heun/dpm_2; ``eta``/``s_noise`` the ancestral and
               SDE samplers; ``eta`` alone ``ddim`` (its noise has no s_noise, as in diffusers; pass ``eta=0.0``
               for deterministic DDIM; ``ddpm`` is DDIM at eta = 1); ``solver_type`` dpmpp_2m_sde's correction
               (``"midpoint"``, the default, or ``"heun"``) and unipc's variant (``"bh2"``, the default, or
               ``"bh1"``); ``order`` lms's order (default 4) and unipc's (default 2: the predictor's order, lower
               on the first steps and, as diffusers' ``lower_order_final``, on the last ones); unipc's
               ``disable_corrector``: the indices of the steps whose result is not corrected.
    model_sigmas: the discrete model's training sigmas; sigma_hat under churn is quantized to them (log
               space) before the noise is added, so noise, model call and update share one sigma.
    seed:      one int per sample (a sequence or a (B,) integer tensor), or one int s that gives sample i the
               seed s + i, for the Philox noise of §2.8.  Each sample's noise depends only on its own seed, so a
               batch of 8 with seed s gives the same samples as 8 batches of 1 with seeds s, s + 1, ..., s + 7
               (not 8 batches of 1 with seed s).  Seeds are taken mod 2**64: any int in [-2**63, 2**64) (an int64
               or a uint64; -1 is 2**64 - 1), others are refused.  ``noise_sampler(sigma, sigma_next) ->
               Tensor`` gives explicit unit noise instead (for churn it is called as ``(sigma_i,
               sigma_hat_i)``; for dpmpp_sde's first stage as ``(sigma_i, sigma_s)``, as k-diffusion calls it).
               With neither, seeds come from torch's generator.
    callback:  called once per step with k-diffusion's keys ``i``, ``sigma``, ``sigma_hat``, ``denoised`` and
               ``x`` (the VE latent; None at sigma = inf), plus ``y``, the model input.
    disable:   the tqdm progress bar, as in k-diffusion: ``True`` (the default) none, ``False`` one,
               ``None`` one only when stderr is a terminal.
    process_group, shard_dim: sequence parallelism (:mod:`zsnr_kernels.distributed`): ``noise`` (and every tensor the
               model sees and returns) is this rank's slice of the latent along the non-batch dim ``shard_dim``,
               ranks holding the slices in rank order (uneven sizes allowed).  The guidance-rescale statistics are
               those of the full latent and the seeded noise of every element is drawn at its index in the full
               sample, so the gathered slices are the same for any number of ranks, and equal the run of one process
               with ``shard_dim`` and no group.  ``process_group=None`` is one process holding the whole latent (pass
               ``torch.distributed.group.WORLD`` for the default group).  Every rank calls ``sample()`` with the same
               arguments; the model may communicate (sequence-parallel attention).  ``noise_sampler`` must return
               this rank's slice; without ``seed`` the seeds of the group's first rank are used by all.

    Returns x0, the latent at sigma = 0 (or x at the last sigma, above), in ``noise``'s dtype.
    """
    spec = co.sampler_spec(sampler)
    step_fn = steps.step_function(spec.name)
    if not callable(model):
        raise TypeError(f"model must be callable as model(y, sigma), got {type(model).__name__}")
    _validate.tensor("noise", noise)
    vals = _validate.sigmas(sigmas, final_zero=False)
    pz = parameterization(prediction, sigma_data)
    if vals[0] == INF and pz.prediction == "eps":
        raise ValueError("sigmas[0] is inf but prediction='eps': an eps-prediction model has no denoised "
                         "prediction at sigma = inf. Use a v- or x0-prediction model, or a finite sigmas[0]")
    for name, v in (("s_churn", s_churn), ("s_noise", s_noise), ("eta", eta)):
        _validate.real(name, v, lo=0.0)
    s_tmin = _validate.real("s_tmin", s_tmin, allow_inf=True)
    s_tmax = _validate.real("s_tmax", s_tmax, allow_inf=True)
    if noise_sampler is not None and not callable(noise_sampler):
        raise TypeError("noise_sampler must be callable as noise_sampler(sigma, sigma_next)")
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable with one dict argument")
    table = _model_table(model_sigmas)
    batch = noise.shape[0]
    n = len(vals) - 1
    common = dict(prediction=prediction, sigma_data=pz.sigma_data, guidance_scale=guidance_scale,
                  guidance_rescale=guidance_rescale, rescale_space=rescale_space, backend=backend,
                  return_denoised=callback is not None)
    shard = None
    if process_group is not None or shard_dim is not None:  # learn the slices' layout once per run (a collective)
        from . import distributed

        shard = distributed.layout(noise, process_group, shard_dim, refresh=True)
        common.update(process_group=process_group, shard_dim=shard_dim)
    kwargs = {}
    if spec.eta:
        kwargs["eta"] = eta
    if spec.s_noise:
        kwargs["s_noise"] = s_noise
    own = dict(spec.options)  # the options this sampler takes: checked here, before the first model call
    if "solver_type" in own:
        kwargs["solver_type"] = (own["solver_type"] if solver_type is None else
                                 _validate.choice("solver_type", solver_type, co.solver_types(spec.name)))
    if "order" in own:
        kwargs["order"] = (own["order"] if order is None else
                           _validate.integer("order", order, lo=1, hi=co.MAX_ORDERS.get(spec.name, own["order"])))
    elif order is not None:
        raise ValueError(f"order={order!r}: sampler {spec.name!r} has no order (lms and unipc do); leave it None")
    disable_corrector = () if disable_corrector is None else disable_corrector
    if disable_corrector and spec.per_step is None:
        raise ValueError(f"disable_corrector: sampler {spec.name!r} has no corrector (unipc has); leave it ()")
    if not (isinstance(disable_corrector, (tuple, list, set, frozenset, range)) and all(
            type(k) is int for k in disable_corrector)):
        raise TypeError(f"disable_corrector must be a sequence of step indices (ints), got {disable_corrector!r}")
    run_options = dict(kwargs, disable_corrector=tuple(disable_corrector))

    # sigma_hat of every step: churn (euler/heun/dpm_2 only), quantized to the model's table, never below sigma
    hats = list(vals[:-1])
    if spec.churn and s_churn > 0:
        for i in range(n):
            gamma = co.churn_gamma(vals[i], n, s_churn, s_tmin, s_tmax)
            if gamma > 0:
                hat = vals[i] * (1.0 + gamma)
                if table is not None:
                    hat = schedules.quantize(hat, table)
                hats[i] = max(hat, vals[i])
    stochastic = spec.stochastic(eta) or any(hv != v for hv, v in zip(hats, vals))
    seeds = _seeds(seed, batch, stochastic and noise_sampler is None)
    if shard is not None and seed is None and seeds is not None:  # drawn here: each rank's generator differs
        seeds = distributed.agree_seeds(shard, seeds, noise)

    def noise_for(step_index, sigma_from, sigma_to):
        if noise_sampler is not None:
            return {"noise": lambda: _validate.tensor("noise_sampler(sigma, sigma_next)'s tensor",
                                                      noise_sampler(sigma_from, sigma_to), noise, "noise")}
        return {"seed": seeds, "step_index": step_index}

    def call_model(y, sigma):
        sig = sigma if isinstance(sigma, torch.Tensor) else torch.full((batch,), sigma, dtype=torch.float64)
        out = model(y, sig.to(device=y.device, dtype=torch.float64))
        if not _validate.matches(out, y):  # named as the user knows them (the step would say model_output, y)
            _validate.model_output(out, y, guidance_scale, "model(y, sigma)'s output", "noise")
        return out

    # the start state: at sigma = inf the noise itself (the first step writes a new state: the caller holds the noise,
    # so it is never the loop's alone), else a scaled copy
    y = noise if vals[0] == INF else steps.initial_state(noise, vals[0], prediction=prediction,
                                                         sigma_data=pz.sigma_data)[0]
    if hats[0] != vals[0]:
        y = steps.churn_step(y, vals[0], hats[0], s_noise=s_noise, prediction=prediction, sigma_data=pz.sigma_data,
                             process_group=process_group, shard_dim=shard_dim, **noise_for(0, vals[0], hats[0]))
    history: list[tuple[float, torch.Tensor]] = []
    iterator = range(n)
    if disable is not True:
        from tqdm.auto import trange
        iterator = trange(n, disable=disable)
    for i in iterator:
        sigma, sigma_next = hats[i], vals[i + 1]
        out = call_model(y, sigma)
        extra = dict(kwargs)
        if spec.per_step is not None:
            extra.update(spec.per_step(i, n, run_options))
        if spec.churn:
            nxt = hats[i + 1] if i + 1 < n else None
            extra["sigma_hat_next"] = nxt
            if nxt is not None and nxt != sigma_next:
                extra.update(noise_for(i + 1, sigma_next, nxt))
        elif spec.eta or spec.adds_noise:
            extra.update(noise_for(i, vals[i], sigma_next))
        if spec.kind == "multistep":
            extra["history"] = history
        # the next state into this one's memory where nothing but this loop holds it (asked before the call, whose
        # arguments would hold it too), and no callback will be shown it
        in_place = callback is None and spec.kind != "two_stage" and y is not noise and _sole_owner(y)
        first_extra = extra
        if noise_sampler is not None and spec.name == "dpmpp_sde":  # its first stage's noise: (sigma, sigma_s)
            first_extra = {**extra, **noise_for(i, vals[i], co.dpmpp_sde_midpoint(vals[i], sigma_next))}
        r = step_fn(y, out, sigma, sigma_next, **first_extra, **common, out=y if in_place else None)
        if callback is not None:
            callback({"i": i, "sigma": vals[i], "sigma_hat": sigma, "denoised": r.denoised,
                      "x": pz.to_x(y, sigma), "y": y})
        if not r.complete:
            out2 = call_model(r.y, r.sigma)
            r = step_fn(r.y, out2, sigma, sigma_next, first=r, **extra, **common)
        if spec.kind == "multistep":
            item = r.derivative if spec.keeps == "derivative" else r.denoised
            history = [(sigma, item)] + history[: spec.history - 1]
        y = r.y
        del r  # the result held the state too: _sole_owner counts references
    last = y is not noise and _sole_owner(y)  # x0 into the last state's memory where it is the loop's alone
    return steps.final_sample(y, prediction=prediction, sigma_data=pz.sigma_data, out=y if last else None,
                              sigma=vals[-1]).to(noise.dtype)


def _refcount(t) -> int:
    return sys.getrefcount(t)


def _refcount_one_call_down(t) -> int:
    return _refcount(t)  # as _sole_owner(y) calls it: one frame between the variable holding t and _refcount


def _calibrate_refcount() -> int:
    t = torch.empty(0)
    return _refcount_one_call_down(t)  # a tensor held by one local variable alone


_SOLE_REFS: list[int] = []  # measured on first use, untraced (_sole_owner)
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _sole_owner(y: torch.Tensor) -> bool:
    """Whether the state ``y`` (a tensor this loop made) is held by the loop's one variable alone, so the step may
    write the next state into it.

    A fresh state per step costs more than its bytes: the kernel writes memory that is not in cache (read for
    ownership first), and two fresh outputs of a few MB per step (the state and D of a multistep sampler) can meet
    glibc's trim threshold, which returns them to the OS and page-faults them back in on the next step (measured:
    4070 minor faults and 5.5-10 ms per guided Euler step at (1,16,21,60,104) fp32 against 1.1 ms, see
    :func:`zsnr_kernels.retain_freed_memory`).  The state is the loop's own after the first step (the noise is
    never written), but the model and the callback see it and may keep it, or a view of it: the memory is reused only when no
    Python reference beyond the loop's (``sys.getrefcount`` against the count of a fresh local, measured at
    import), no other C++ reference to the tensor and no other tensor on its storage exist, as CPython concatenates
    a string in place when it holds the only reference and NumPy elides temporaries.  Never while tracing (Dynamo
    cannot trace reference counts) or while autograd records the step; where the counts are unavailable, never;
    and never while a trace or profile function runs (a debugger's: reading ``frame.f_locals`` adds references, so
    the count is measured untraced, on first use, not at import, where a debugger may be tracing)."""
    if (torch.compiler.is_compiling() or _storage_use_count is None or y.requires_grad
            or sys.gettrace() is not None or sys.getprofile() is not None):
        return False
    if not _SOLE_REFS:
        _SOLE_REFS.append(_calibrate_refcount())
    return (_refcount(y) <= _SOLE_REFS[0] and y._use_count() == 1
            and _storage_use_count(y.untyped_storage()._cdata) == 2)  # the tensor's and this query's


def _model_table(model_sigmas):
    if model_sigmas is None:
        return None
    if isinstance(model_sigmas, torch.Tensor):
        model_sigmas = _validate.real_tensor("model_sigmas", model_sigmas)
    try:
        t = torch.as_tensor(model_sigmas, dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"model_sigmas must be a 1-D table of the model's sigmas (a tensor or a sequence of "
                        f"floats), got {type(model_sigmas).__name__}") from exc
    if t.numel() == 0 or torch.isnan(t).any() or (t < 0).any():
        raise ValueError("model_sigmas must be a non-empty table of sigmas >= 0 without NaN")
    return t


def _seeds(seed, batch: int, needed: bool):
    """Per-sample 64-bit seeds: given, or drawn from torch's default generator when noise is needed."""
    from .noise import step_seeds

    if seed is None:
        if not needed:
            return None
        seed = torch.randint(0, 2**62, (batch,), dtype=torch.int64)  # traced, it stays a tensor (step_seeds)
    return step_seeds(seed, batch)
