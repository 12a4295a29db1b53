"""Edge inputs a differential fuzzer found: noise levels at the ends of float range, extreme step ratios, numpy and
0-d tensor ``sigma_data``, huge guidance scales.

The rule for each: a finite result that every backend agrees on, or a ValueError/TypeError that names the
argument, its value and the fix, raised before any tensor is written.  The compiled backends run what the Python
validation passes, so the torch and cpu backends refuse alike (triton and cuda share the same validation).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from conftest import TinyNet, rand as _rand, refused as _refused

import zsnr_kernels as zk
from zsnr_kernels import _validate
from zsnr_kernels.backends import ext as _ext
from zsnr_kernels.coefficients import SAMPLERS
from zsnr_kernels.steps import step_function

INF = math.inf
BACKENDS = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(not _ext.available(), reason="_C not built"))]
SHAPE = (2, 4, 4, 4)
NOISY = tuple(name for name, spec in SAMPLERS.items() if spec.eta or spec.adds_noise)
NO_LIMIT = ("heun", "dpm_2", "dpm_2_ancestral")


def _step(sampler, y, f, sigma, sigma_next, backend, history=(), **kw):
    """One whole step of ``sampler`` (both calls of a two-stage one) from explicit tensors; the final state."""
    fn, kind = step_function(sampler), SAMPLERS[sampler].kind
    if sampler in NOISY:
        kw["noise"] = _rand(*y.shape, seed=7)
    if kind == "multistep":
        kw["history"] = list(history)
    r = fn(y, f, sigma, sigma_next, backend=backend, **kw)
    if not r.complete:
        f2 = 0.5 * f if isinstance(f, torch.Tensor) else tuple(0.5 * t for t in f)
        r = fn(r.y, f2, sigma, sigma_next, first=r, backend=backend, **kw)
    return r.y


def _model(y, sigma):
    return TinyNet(SHAPE[1], seed=3)(y, sigma)


def _run(sampler, sigmas, backend, **kw):
    noise = _rand(*SHAPE, seed=1)
    return zk.sample(_model, noise, sigmas, sampler=sampler, seed=[5, 6], backend=backend, **kw)


# ------------------------------------------------------------------------------- noise levels (subnormal, huge)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_a_subnormal_sigma_is_refused_by_every_sampler_and_backend(sampler, backend):
    """euler_step(y, f, 1e-310, 0.0) was all NaN on the cpu backend and a bare ZeroDivisionError on torch;
    sample() on [1e-300, 1e-310, 0] was all NaN.  Positive sigmas below 1e-30 are refused by name."""
    y, f = _rand(*SHAPE), _rand(*SHAPE, seed=2)
    _refused(ValueError, r"sigma=1e-310 is below 1e-30.*Pass 0.0 for the clean sample", lambda: _step(
        sampler, y, f, 1e-310, 0.0, backend), y, f)
    _refused(ValueError, r"sigma_next=1e-310 is below 1e-30", lambda: _step(sampler, y, f, 1.0, 1e-310, backend),
             y, f)
    _refused(ValueError, r"sigma_next=3e-39 is below 1e-30", lambda: _step(sampler, y, f, 1e-29, 3e-39, backend),
             y, f)
    per_sample = torch.tensor([1.0, 1e-35], dtype=torch.float64)
    _refused(ValueError, r"sigma_next\[1\]=1e-35 is below", lambda: _step(
        sampler, y, f, torch.tensor([2.0, 2.0], dtype=torch.float64), per_sample, backend), y, f)
    noise = _rand(*SHAPE, seed=1)
    _refused(ValueError, r"sigmas\[0\]=1e-300 is below 1e-30", lambda: zk.sample(
        _model, noise, [1e-300, 1e-310, 0.0], sampler=sampler, seed=0, backend=backend), noise)
    _refused(ValueError, r"sigmas\[1\]=1e-310 is below 1e-30", lambda: zk.sample(
        _model, noise, torch.tensor([1.0, 1e-310, 0.0], dtype=torch.float64), sampler=sampler, seed=0,
        backend=backend), noise)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_a_huge_finite_sigma_is_refused_with_inf_as_the_fix(sampler, backend):
    y, f = _rand(*SHAPE), _rand(*SHAPE, seed=2)
    _refused(ValueError, r"sigma=1e\+35 is above 1e\+30.*Pass inf to start from pure noise", lambda: _step(
        sampler, y, f, 1e35, 1.0, backend), y, f)
    if SAMPLERS[sampler].kind == "multistep":
        h = _rand(*SHAPE, seed=3)
        _refused(ValueError, r"history\[0\] sigma=1e\+35 is above 1e\+30", lambda: _step(
            sampler, y, f, 2.0, 1.0, backend, history=[(1e35, h)]), y, f, h)
    noise = _rand(*SHAPE, seed=1)
    _refused(ValueError, r"sigmas\[0\]=1e\+300 is above 1e\+30", lambda: zk.sample(
        _model, noise, [1e300, 1.0, 0.0], sampler=sampler, seed=0, backend=backend), noise)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_the_ends_of_the_accepted_range_are_finite_and_agree_on_every_backend(sampler):
    """1e-30 and 1e30 themselves: finite on every backend (lms's 1/sigma overflowed float32 below ~3e-39)."""
    tiny = [4e-30, 2e-30, 1e-30, 0.0]
    huge = [1e30, 2e29, 4e28, 0.0] if sampler != "lms" else [1e30, 2e29, 4e28, 1e24, 1e19, 1e14, 1e9, 1e4, 0.5, 0.0]
    for sigmas in (tiny, huge):
        ref = _run(sampler, sigmas, "torch")
        assert torch.isfinite(ref).all(), (sampler, sigmas)
        if _ext.available():
            got = _run(sampler, sigmas, "cpu")
            assert torch.isfinite(got).all(), (sampler, sigmas)
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_lms_refuses_a_span_its_float32_rounding_cannot_carry(backend):
    """lms's update with remembered derivatives cancels terms of size sigma down to a result of size
    max(sigma_next, sigma_data): at sample()'s last step from 4e28 the backends returned 1e21 and 8e20 for a
    result of size 1.  Past a factor 1e6 it is refused, naming both sigmas; without history the step is Euler's."""
    noise = _rand(*SHAPE, seed=1)
    _refused(ValueError, re.escape("lms: sigma=4e+28 to sigma_next=0.0 with remembered derivatives spans a factor "
                                   "4e+28 (sigma / max(sigma_next, sigma_data))") + ".*intermediate sigmas",
             lambda: zk.sample(_model, noise, [1e30, 2e29, 4e28, 0.0], sampler="lms", backend=backend), noise)
    _refused(ValueError, r"lms: sigma=4000000.0 to sigma_next=0.0 .*spans a factor 8e\+06 \(sigma / max\(sigma_next, "
             r"sigma_data\)\)", lambda: zk.sample(_model, noise, [1e8, 2e7, 4e6, 0.0], sampler="lms",
                                                   sigma_data=0.5, backend=backend), noise)
    _refused(ValueError, r"spans a factor 4e\+06 \(sigma / max\(sigma_next, 1\)\)", lambda: zk.sample(
        _model, noise, [1e8, 2e7, 4e6, 0.0], sampler="lms", prediction="flow", backend=backend), noise)
    want = zk.sample(_model, noise.double(), [1e4, 2e3, 400.0, 0.0], sampler="lms", backend="torch")
    got = zk.sample(_model, noise, [1e4, 2e3, 400.0, 0.0], sampler="lms", backend=backend)
    assert (got - want).abs().max() < 1e-4  # rounding ~6e-8 * 400: inside the limit the result holds
    y, f, d = _rand(*SHAPE), _rand(*SHAPE, seed=2), _rand(*SHAPE, seed=3)
    assert torch.isfinite(zk.lms_step(y, f, 1e20, 0.0, backend=backend).y).all()  # Euler: no history
    assert torch.isfinite(zk.lms_step(y, f, 1e20, 0.0, history=[(INF, d)], backend=backend).y).all()  # weight 0


def test_the_range_holds_for_churn_targets_too():
    y, f = _rand(*SHAPE), _rand(*SHAPE, seed=2)
    _refused(ValueError, r"sigma_hat_next=1e\+40 is above 1e\+30", lambda: zk.euler_step(
        y, f, 5.0, 3.0, sigma_hat_next=1e40, noise=_rand(*SHAPE, seed=4)), y, f)


# ------------------------------------------------------------------------------------ extreme but accepted steps


@pytest.mark.parametrize("backend", BACKENDS)
def test_dpmpp_2s_ancestral_with_a_tiny_sigma_next_is_refused_by_name(backend):
    """Any sigma_next <= ~1e-162 made sigma_mid = sqrt(sigma' * sigma d) underflow to 0: ZeroDivisionError."""
    y, f = _rand(*SHAPE), _rand(*SHAPE, seed=2)
    for sn in (1e-170, 1e-200):
        _refused(ValueError, rf"sigma_next={sn} is below 1e-30", lambda: _step(
            "dpmpp_2s_ancestral", y, f, 1.0, sn, backend), y, f)
    noise = _rand(*SHAPE, seed=1)
    _refused(ValueError, r"sigmas\[1\]=1e-170 is below", lambda: zk.sample(
        _model, noise, [1.0, 1e-170, 0.0], sampler="dpmpp_2s_ancestral", seed=0, backend=backend), noise)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_a_step_too_wide_for_a_second_order_sampler_is_refused_and_others_take_it(sampler, backend):
    """dpm_2_ancestral with sigma/sigma_next above ~1e162 raised ValueError('math domain error'), and between
    ~1e38 and there (heun, dpm_2 beyond ~1e77) its weight overflowed float32 (NaN).  heun, dpm_2 and
    dpm_2_ancestral have no limit as the ratio grows; they refuse past 1e6 (dpm_2: 1e12), naming both sigmas.
    The other samplers take the same steps, finite and alike on every backend."""
    y, f = _rand(*SHAPE), _rand(*SHAPE, seed=2)
    wide = [(1e20, 1e-10), (1e25, 1e-12)] + ([(1e3, 1e-5)] if sampler != "dpm_2" else [(1e10, 1e-5)])
    for sg, sn in wide:
        if sampler in NO_LIMIT:
            fix = "euler_ancestral" if sampler == "dpm_2_ancestral" else "euler"
            _refused(ValueError, re.escape(f"{sampler}: sigma={sg!r} to sigma_next={sn!r} spans a factor ") + ".*"
                     rf"intermediate sigmas.*with {fix} \(what {sampler} does from sigma = inf\)",
                     lambda: _step(sampler, y, f, sg, sn, backend), y, f)
            noise = _rand(*SHAPE, seed=1)
            _refused(ValueError, re.escape(f"{sampler}: sigma={sg!r} to sigma_next={sn!r}"), lambda: zk.sample(
                _model, noise, [sg, sn, 0.0], sampler=sampler, seed=0, backend=backend), noise)
        elif sampler in _validate.FLOW_TIME_RATIO_MAX:  # heun_flow: its limit is on t/t' of flow times (1e5 here)
            _refused(ValueError, re.escape(f"{sampler}: sigma={sg!r} to sigma_next={sn!r} spans a factor ") +
                     ".* in the flow time.*take this step with euler", lambda: _step(sampler, y, f, sg, sn, backend),
                     y, f)
        else:
            out = _step(sampler, y, f, sg, sn, backend)
            assert torch.isfinite(out).all()
            if backend == "cpu":
                torch.testing.assert_close(out, _step(sampler, y, f, sg, sn, "torch"), rtol=1e-4, atol=1e-5)
    # the ratio is checked only where the second-order step runs: from inf, to 0, and under the min() clamp
    for sg, sn, kw in ((INF, 1e-10, {}), (1e20, 0.0, {}), (1e20, 1e-10, {"eta": 1.5})):
        if sampler in NO_LIMIT and (sampler == "dpm_2_ancestral" or not kw):
            assert torch.isfinite(_step(sampler, y, f, sg, sn, backend, **kw)).all()


def test_the_ratio_limits_are_where_they_say_and_the_step_below_them_is_finite():
    """A step of exactly the largest accepted ratio runs and is finite; 1% more is refused by name.  (Where the limits
    sit: the second-order correction grows with the ratio and multiplies float32 rounding by it, so the cpu
    backend's float32 step is a few percent from the float64 one there; the accepted extremes are compared across
    backends in the test above.)"""
    y, f = _rand(*SHAPE), _rand(*SHAPE, seed=2)
    for sampler, most in _validate.STEP_RATIO_MAX.items():
        assert torch.isfinite(_step(sampler, y, f, most, 1.0, "torch")).all()
        with pytest.raises(ValueError, match="spans a factor"):
            _step(sampler, y, f, most * 1.01, 1.0, "torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_lms_below_the_float32_range_is_refused_by_name(backend):
    """lms with sigmas below ~3e-39 returned NaN silently (a float32 1/sigma overflows)."""
    y, f = _rand(*SHAPE), _rand(*SHAPE, seed=2)
    _refused(ValueError, r"sigma=1e-39 is below 1e-30", lambda: zk.lms_step(y, f, 1e-39, 0.0, backend=backend), y, f)
    h = _rand(*SHAPE, seed=3)
    _refused(ValueError, r"sigma=2e-39 is below", lambda: zk.lms_step(
        y, f, 2e-39, 1e-39, history=[(4e-39, h)], backend=backend), y, f, h)
    noise = _rand(*SHAPE, seed=1)
    _refused(ValueError, r"sigmas\[0\]=1e-38 is below", lambda: zk.sample(
        _model, noise, [1e-38, 1e-39, 0.0], sampler="lms", backend=backend), noise)


# -------------------------------------------------------------------------------------------------- sigma_data


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_sigma_data_takes_numpy_scalars_and_0d_tensors(sampler, backend):
    """sigma_data refused numpy float32 and 0-d tensors that every other real option takes."""
    sigmas = [14.6, 3.0, 0.5, 0.0]
    want = _run(sampler, sigmas, backend, sigma_data=0.5)
    for sd in (np.float32(0.5), np.float64(0.5), torch.tensor(0.5), torch.tensor([0.5], dtype=torch.float64)):
        torch.testing.assert_close(_run(sampler, sigmas, backend, sigma_data=sd), want, rtol=0, atol=0)
    assert zk.parameterization("v", np.int64(2)) == zk.parameterization("v", 2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigma_data_mistakes_are_named(backend):
    y, f = _rand(*SHAPE), _rand(*SHAPE, seed=2)
    for sd, exc, match in [
        (True, TypeError, "sigma_data must be a real number, got bool"),
        ("0.5", TypeError, "sigma_data must be a real number, got str"),
        (torch.tensor([0.5, 1.0]), TypeError, r"sigma_data must be a real number or a one-element tensor, got a "
                                              r"tensor of shape \(2,\)"),
        (torch.tensor(0.5j), TypeError, "sigma_data must hold real numbers"),
        (np.float32("nan"), ValueError, "sigma_data must be finite, got nan"),
        (INF, ValueError, "sigma_data must be finite"),
        (0.0, ValueError, r"sigma_data must be > 0 \(the standard deviation of the data"),
        (-1.0, ValueError, "sigma_data must be > 0"),
        (1e-310, ValueError, r"sigma_data=1e-310 is outside \[1e-08, 1e\+08\]"),
        (1e300, ValueError, r"sigma_data=1e\+300 is outside"),
    ]:
        _refused(exc, match, lambda: zk.euler_step(y, f, 5.0, 3.0, sigma_data=sd, backend=backend), y, f)


# ---------------------------------------------------------------------------------------------- guidance scale


def _pair_model(y, sigma):
    c = _model(y, sigma)
    return c, 0.5 * c + 0.1 * torch.sin(3.0 * y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_a_guidance_scale_that_overflows_is_refused_naming_the_largest(sampler, backend):
    """guidance_scale=3e38 with rescale: the backends disagreed 3.3x (the reference's float32 std overflowed).
    |guidance_scale| <= 1e4 is accepted and agrees across backends."""
    y, f, g = _rand(*SHAPE), _rand(*SHAPE, seed=2), _rand(*SHAPE, seed=3)
    for w in (3e38, -3e38, np.float32(3e38), 1.0001e4):
        _refused(ValueError, r"guidance_scale=.* is outside \[-10000, 10000\]; the largest accepted scale is "
                 r"10000", lambda: _step(sampler, y, (f, g), 5.0, 3.0, backend, guidance_scale=w,
                                          guidance_rescale=0.7), y, f, g)
    noise = _rand(*SHAPE, seed=1)
    _refused(ValueError, r"guidance_scale=3e\+38 is outside", lambda: zk.sample(
        _pair_model, noise, [5.0, 3.0, 0.0], sampler=sampler, guidance_scale=3e38, guidance_rescale=0.7, seed=0,
        backend=backend), noise)
    if backend == "cpu":  # the largest scale runs alike on every backend (explicit outputs: no model in the loop)
        for w in (1e4, -1e4):
            kw = dict(guidance_scale=w, guidance_rescale=0.7)
            want = _step(sampler, y, (f, g), 5.0, 3.0, "torch", **kw)
            got = _step(sampler, y, (f, g), 5.0, 3.0, "cpu", **kw)
            assert torch.isfinite(want).all() and torch.isfinite(got).all()
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


# -------------------------------------------------------------------------- guidance rescale at the range's ends

RESCALE_SIGMAS = [(1e-20, 0.0), (1e-29, 0.0), (1e29, 1e28), ([1e-29, 1e29], [0.0, 1e28])]


@pytest.mark.skipif(not _ext.available(), reason="_C not built")
@pytest.mark.parametrize("sigmas", RESCALE_SIGMAS, ids=["1e-20", "1e-29", "1e29", "per_sample"])
@pytest.mark.parametrize("prediction", ["eps", "flow", "v", "x0"])
@pytest.mark.parametrize("space", ["output", "v", "x0"])
def test_guidance_rescale_at_the_ends_of_the_range_is_finite_and_agrees(space, prediction, sigmas):
    """The rescale acts on G = u y + t F.  The statistics pass summed G/t = F + (u/t) y: in the x0 space of an eps
    or flow model t ~ -sigma, so u/t ~ sd/sigma, and below sigma ~1e-19 the square of (u/t) y overflowed float32:
    the cpu step was NaN where the float64 reference is finite.  The sums are now of G/s, s = u or t, whichever
    is larger in magnitude (combine.h rescale_weights)."""
    sigma, sigma_next = sigmas
    y, fc, fu = _rand(*SHAPE), _rand(*SHAPE, seed=2), _rand(*SHAPE, seed=3)
    kw = dict(prediction=prediction, guidance_scale=7.5, guidance_rescale=0.7, rescale_space=space)
    want = zk.euler_step(y.double(), (fc.double(), fu.double()), sigma, sigma_next, backend="torch", **kw).y
    got = zk.euler_step(y, (fc, fu), sigma, sigma_next, backend="cpu", **kw).y
    assert torch.isfinite(want).all()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
