"""UniPC (``sampler="unipc"``, :func:`zsnr_kernels.unipc_step`): the corrector of the previous step and the predictor
of this one in one pass, equal to diffusers' ``UniPCMultistepScheduler`` on finite schedules, exact at sigma = inf.

Oracle: diffusers 0.42.1 run in float64 (``torch.set_default_dtype(torch.float64)`` while it builds and steps, so
that the tensors it makes for its order conditions are float64 too, and its sigma table cast to float64): the
library's coefficient form (the corrector as the difference of UniC and the UniP it corrects, folded into the next
predictor) then agrees to 1e-14.  Measured convergence (exact Gaussian denoiser, Karras 80 -> 0.002, N = 16..128,
least-squares slope of the max error): with the corrector, order p gives p + 1 (bh2: 1.99, 3.12, 4.28; bh1: 2.17,
3.33, 4.31), as Zhao et al. prove for UniC; without it p (see ``test_convergence_order``).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TinyNet

import zsnr_kernels as zk
from zsnr_kernels import coefficients as co, schedules
from zsnr_kernels.tools.models import GaussianModel

diffusers = pytest.importorskip("diffusers")
INF = math.inf


def _scheduler(steps, dtype=torch.float64, **config):
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        sched = diffusers.UniPCMultistepScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction",
                                                  timestep_spacing="trailing", **config)
        sched.set_timesteps(steps)
    finally:
        torch.set_default_dtype(default)
    sched.sigmas = sched.sigmas.to(dtype)
    return sched


def _run_diffusers(sched, net, y0, dtype=torch.float64):
    """diffusers' loop; returns the sample after every step (the last may be NaN: see the bh1 test)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        sample, states = y0.clone(), []
        for t in sched.timesteps:
            out = net(sample, t.reshape(1).to(torch.float64).expand(y0.shape[0])).to(dtype)
            sample = sched.step(out, t, sample).prev_sample
            states.append(sample)
        return states
    finally:
        torch.set_default_dtype(default)


def _model(net, sigmas, timesteps, dtype=torch.float64):
    lookup = {float(s): float(t) for s, t in zip(sigmas, timesteps)}
    return lambda y, s: net(y, torch.full((y.shape[0],), lookup[float(s[0])], dtype=torch.float64)).to(dtype)


def _steps(model, y0, sigmas, variant, order, final=True, disable=(), backend="auto"):
    """The library's loop by hand (per-step orders as sample() sets them), returning every state."""
    n, y, hist, states = len(sigmas) - 1, y0, [], []
    opts = {"order": order, "lower_order_final": final, "disable_corrector": tuple(disable)}
    for i in range(n):
        per = co.SAMPLERS["unipc"].per_step(i, n, opts)
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        r = zk.unipc_step(y, model(y, torch.tensor([s])), s, s_next, history=hist, solver_type=variant,
                          backend=backend, **per)
        hist = [(s, r.denoised)] + hist[:2]
        y = r.y
        states.append(y)
    return states


def _setup(steps, dtype=torch.float64, **config):
    sched = _scheduler(steps, dtype, **config)
    net = TinyNet(4, seed=5, dtype=dtype)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sig = sched.sigmas.double()
    y0 = (noise * float(sig[0] / (sig[0] ** 2 + 1).sqrt())).to(dtype)  # diffusers' init_noise_sigma is 1 (VP)
    return sched, net, noise.to(dtype), sig, y0


@pytest.mark.parametrize("variant", co.UNIPC_VARIANTS)
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("final,disable", [(True, ()), (False, ()), (True, (0, 4))])
def test_equals_diffusers_float64(variant, order, final, disable):
    """Every state of the run, final_sigmas_type="sigma_min" (the schedule ends at a finite sigma, so every step
    has the corrector and the predictor of the given order)."""
    sched, net, _, sig, y0 = _setup(12, solver_order=order, solver_type=variant, lower_order_final=final,
                                    disable_corrector=list(disable), final_sigmas_type="sigma_min")
    expected = _run_diffusers(sched, net, y0)
    got = _steps(_model(net, sig, sched.timesteps), y0, sig, variant, order, final, disable, backend="torch")
    for i, (g, e) in enumerate(zip(got, expected)):
        assert (g - e).abs().max().item() <= 1e-13, (i, (g - e).abs().max().item())


@pytest.mark.parametrize("order", [1, 2, 3])
def test_sample_equals_diffusers_to_zero(order):
    """sample() with the default bh2 over diffusers' default final_sigmas_type="zero"."""
    sched, net, noise, sig, y0 = _setup(12, solver_order=order)
    expected = _run_diffusers(sched, net, y0)[-1]
    got = zk.sample(_model(net, sig, sched.timesteps), noise, sig, sampler="unipc", order=order)
    assert (got - expected).abs().max().item() <= 1e-13


def test_bh1_to_zero_is_finite_where_diffusers_is_nan():
    """bh1 has B(h) = -h = -inf on the step to sigma = 0, and diffusers multiplies it by its zero order-1 residual:
    NaN.  That step is x' = D (first order) by the limit; every state before it equals diffusers'."""
    sched, net, noise, sig, y0 = _setup(10, solver_order=2, solver_type="bh1")
    expected = _run_diffusers(sched, net, y0)
    assert torch.isnan(expected[-1]).all()  # diffusers 0.42.1; if this fails, diffusers fixed it: compare instead
    model = _model(net, sig, sched.timesteps)
    got = _steps(model, y0, sig, "bh1", 2, backend="torch")
    for g, e in zip(got[:-1], expected[:-1]):
        assert (g - e).abs().max().item() <= 1e-13
    last = zk.unipc_step(got[-2], model(got[-2], torch.tensor([float(sig[-2])])), float(sig[-2]), 0.0,
                         solver_type="bh1", order=1, corrector=0)
    torch.testing.assert_close(got[-1], last.denoised, rtol=0, atol=1e-15)  # x' = D at sigma' = 0


@pytest.mark.parametrize("order", [2, 3])
def test_equals_diffusers_float32(order):
    """fp32 through the default backend (the compiled cpu kernels from the float64 coefficient table) against
    diffusers computing in float32: float32 rounding of both, accumulated over 12 steps."""
    sched, net, noise, sig, y0 = _setup(12, torch.float32, solver_order=order)
    expected = _run_diffusers(sched, net, y0, torch.float32)[-1]
    got = zk.sample(_model(net, sig, sched.timesteps, torch.float32), noise, sig, sampler="unipc", order=order)
    assert got.dtype == torch.float32
    assert (got - expected).abs().max().item() <= 2e-5 * expected.abs().max().item()


def test_step_coefficients_at_the_ends():
    """From inf: Euler.  The corrector of that step (h = inf): bh2 takes the limit x + (D - D_inf)/2, bh1 (no
    limit) none.  A history entry at inf has weight 0.  To sigma' = 0: x' = D whatever the order."""
    pz = zk.parameterization("v")
    assert co.unipc(pz, INF, 10.0, (), 2, 0) == co.euler(pz, INF, 10.0)
    plain = co.unipc(pz, 10.0, 5.0, (INF,), 2, 0)
    assert plain.a == co.euler(pz, 10.0, 5.0).a and plain.b == co.euler(pz, 10.0, 5.0).b and plain.h == (0.0,)
    r, c_next = 5.0 / 10.0, pz.c_in(5.0)
    bh2 = co.unipc(pz, 10.0, 5.0, (INF,), 2, 1, "bh2")
    assert bh2.a == plain.a
    assert math.isclose(bh2.b, plain.b + c_next * r * 0.5, rel_tol=1e-15)
    assert math.isclose(bh2.h[0], -c_next * r * 0.5, rel_tol=1e-15)
    assert co.unipc(pz, 10.0, 5.0, (INF,), 2, 1, "bh1") == plain
    for order in (1, 2, 3):
        end = co.unipc(pz, 1.0, 0.0, (2.0, 5.0, 10.0), order, 3)
        assert (end.a, end.b, end.h) == (0.0, 1.0, (0.0, 0.0, 0.0))


@pytest.fixture(scope="module")
def limit_setup():
    net = TinyNet(4, seed=2)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return net, noise, schedules.karras(10, 0.03, 14.6)


def _gaps(limit_setup, **kw):
    net, noise, rest = limit_setup
    run = lambda smax: zk.sample(net, noise, torch.cat([torch.tensor([smax], dtype=torch.float64), rest]),  # noqa
                                 sampler="unipc", **kw)
    at_inf = run(INF)
    assert torch.isfinite(at_inf).all()
    return at_inf, [(run(s) - at_inf).abs().max().item() for s in (1e4, 1e8, 1e16)]


@pytest.mark.parametrize("order", [1, 2, 3])
def test_bh2_from_inf_is_the_limit(limit_setup, order):
    """Runs from sigma_max = 1e4, 1e8, 1e16 converge to the run from inf -- the corrector of the first step
    included: like 1/sigma_max for order 1 (its corrector weight B(h)/2 = (e^{-h} - 1)/2 tends to -1/2 like
    sigma_1/sigma_max), like 1/log(sigma_max) for orders 2 and 3 (the weights of the point at sigma_max in the
    order conditions decay with r = log(sigma_1/sigma_max)/h)."""
    _, gaps = _gaps(limit_setup, order=order, solver_type="bh2")
    assert gaps[0] > gaps[1] > gaps[2], gaps
    if order == 1:
        assert gaps[1] < 1e-3 * gaps[0] and gaps[2] < 1e-12, gaps
        return
    scaled = [g * math.log(s) for g, s in zip(gaps, (1e4, 1e8, 1e16))]
    assert scaled[2] <= scaled[1] < 4.0 * scaled[2], scaled  # 1/log once the 1/sigma_max part has died out


def test_bh1_from_inf_skips_the_first_correction(limit_setup):
    """bh1's first correction grows like log(sigma_max): no limit, so from inf it is skipped.  The run from inf
    equals the run from inf with that correction disabled, and is the limit of the finite runs without it."""
    at_inf, gaps = _gaps(limit_setup, order=2, solver_type="bh1", disable_corrector=(0,))
    assert gaps[0] > gaps[1] > gaps[2], gaps
    net, noise, rest = limit_setup
    sig = torch.cat([torch.tensor([INF], dtype=torch.float64), rest])
    assert torch.equal(zk.sample(net, noise, sig, sampler="unipc", order=2, solver_type="bh1"), at_inf)
    _, with_corr = _gaps(limit_setup, order=2, solver_type="bh1")
    assert with_corr[2] > with_corr[0], with_corr  # the finite runs with it move away: no limit


@pytest.mark.parametrize("order,corrected,band", [(1, True, (1.8, 2.4)), (2, True, (2.8, 3.6)),
                                                  (3, True, (3.8, 4.8)), (3, False, (2.7, 3.5))])
def test_convergence_order(order, corrected, band):
    """Exact Gaussian denoiser: UniPC-p converges at order p + 1 with its corrector (Zhao et al., Thm 3.3), p
    without."""
    g = torch.Generator().manual_seed(0)
    std = 0.2 + 1.8 * torch.rand((4, 8, 8), generator=g, dtype=torch.float64)
    mean = 0.5 * torch.randn((4, 8, 8), generator=g, dtype=torch.float64)
    noise = torch.randn((2, 4, 8, 8), generator=g, dtype=torch.float64)
    model = GaussianModel(mean, std)
    ref = model.exact_sample_from(noise, 80.0)
    ns, errs = (16, 32, 64, 128), []
    for n in ns:
        off = () if corrected else tuple(range(n))
        out = zk.sample(model, noise, schedules.karras(n, 0.002, 80.0), sampler="unipc", order=order,
                        disable_corrector=off, backend="torch")
        errs.append((out - ref).abs().max().item())
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    lx = [math.log(n) for n in ns]
    ly = [math.log(e) for e in errs]
    mx, my = sum(lx) / 4, sum(ly) / 4
    slope = -sum((x - mx) * (y - my) for x, y in zip(lx, ly)) / sum((x - mx) ** 2 for x in lx)
    assert band[0] <= slope <= band[1], (slope, errs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_backends_agree_with_the_float64_reference(dtype, backend):
    """One fused step with a full corrector and an order-3 predictor, guided and rescaled, against float64."""
    from zsnr_kernels.tools.tolerances import step_error

    g = torch.Generator().manual_seed(4)
    make = lambda: torch.randn(3, 4, 16, 16, generator=g).to(dtype)  # noqa: E731
    y, fc, fu = make(), make(), make()
    hist = [(s, make()) for s in (3.0, 6.0, 11.0)]
    kw = dict(order=3, corrector=3, guidance_scale=5.0, guidance_rescale=0.7)
    ref = zk.unipc_step(y.double(), (fc.double(), fu.double()), 1.7, 0.9, history=[(s, h.double()) for s, h in hist],
                        backend="torch", **kw)
    got = zk.unipc_step(y, (fc, fu), 1.7, 0.9, history=hist, backend=backend, **kw)
    lp = None if dtype == torch.float32 else zk.unipc_step(y, (fc, fu), 1.7, 0.9, history=hist, backend="torch", **kw)
    err = step_error(got.y, ref.y, None if lp is None else lp.y)
    assert err.used <= 1, err
    assert (got.denoised.double() - ref.denoised).abs().max().item() <= 8 * torch.finfo(dtype).eps * 10


def test_batch_of_8_equals_8_batches_of_1():
    net = TinyNet(4, seed=1, dtype=torch.float32)
    noise = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    sig = schedules.karras(9, 0.03, INF, sigma_max_finite=14.6)
    whole = zk.sample(net, noise, sig, sampler="unipc", order=3)
    for i in range(8):
        assert torch.equal(zk.sample(net, noise[i:i + 1], sig, sampler="unipc", order=3), whole[i:i + 1])


def test_plan_equals_sample():
    net = TinyNet(4, seed=3, dtype=torch.float32)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    sig = schedules.karras(8, 0.03, INF, sigma_max_finite=14.6)
    kw = dict(sampler="unipc", order=3, solver_type="bh1", disable_corrector=(2,))
    plan = zk.SamplingPlan(sig, noise.shape, **kw)
    torch.testing.assert_close(plan.run(net, noise), zk.sample(net, noise, sig, **kw), rtol=0, atol=0)


def test_misuse_names_the_argument():
    y = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="order"):
        zk.unipc_step(y, y, 2.0, 1.0, order=4)
    with pytest.raises(ValueError, match="solver_type"):
        zk.unipc_step(y, y, 2.0, 1.0, solver_type="midpoint")
    with pytest.raises(ValueError, match="corrector=2"):
        zk.unipc_step(y, y, 2.0, 1.0, history=[(3.0, y)], corrector=2)


def test_sample_checks_the_options_before_the_first_model_call():
    """order, solver_type and disable_corrector are checked (and refused for a sampler that does not take them)
    before the model is called: no model call is wasted on a value a later step would refuse."""
    calls = []

    def model(y, s):
        calls.append(1)
        return torch.zeros_like(y)

    noise, sig = torch.zeros(1, 2), schedules.karras(10, 0.1, 10.0)
    for kw, err, match in [(dict(order=4), ValueError, "order"), (dict(order=0), ValueError, "order"),
                           (dict(order="3"), TypeError, "order"), (dict(solver_type="midpoint"), ValueError,
                                                                   "solver_type"),
                           (dict(disable_corrector=5), TypeError, "disable_corrector")]:
        with pytest.raises(err, match=match):
            zk.sample(model, noise, sig, sampler="unipc", **kw)
    with pytest.raises(ValueError, match="order=3: sampler 'euler' has no order"):
        zk.sample(model, noise, sig, sampler="euler", order=3)
    with pytest.raises(ValueError, match="disable_corrector: sampler 'euler'"):
        zk.sample(model, noise, sig, sampler="euler", disable_corrector=(1,))
    with pytest.raises(ValueError, match="order"):
        zk.sample(model, noise, sig, sampler="lms", order=5)
    assert not calls
    zk.sample(model, noise, sig, sampler="unipc", order=3, disable_corrector=None)
