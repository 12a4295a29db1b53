"""``dpmpp_sde``: k-diffusion's ``sample_dpmpp_sde`` (DPM-Solver++(2S) SDE, r = 1/2), two model calls per step whose
second stage starts over from the step's start state (``first.derivative``).

Parity with k-diffusion on finite schedules (its Brownian tree noise in float64, an explicit noise stream in float32),
Philox noise on every backend against the float64 reference, batch independence, the limits at sigma = inf and at
sigma' = 0, and the refusals that keep the start state intact.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import TinyNet

import zsnr_kernels as zk
from zsnr_kernels import coefficients as co
from zsnr_kernels.backends import ext as _ext

INF = math.inf
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
requires_C = pytest.mark.skipif(not _ext.available(), reason="zsnr_kernels._C not built")


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _kd_setup(kdiff, schedule, dtype, steps=12):
    sampling, external = kdiff
    net = TinyNet(4, seed=1)
    if schedule == "sd_discrete":
        ac = zk.schedules.alphas_cumprod(zk.schedules.betas("scaled_linear"))
        kd_model = external.DiscreteVDDPMDenoiser(lambda y, t: net(y, t), ac, quantize=False)
        sigmas = kd_model.get_sigmas(steps).to(dtype)

        def model(y, sigma):
            return net(y, kd_model.sigma_to_t(sigma.to(dtype)))
    else:
        kd_model = external.VDenoiser(lambda y, t: net(y, torch.tan(t * math.pi / 2)))
        sigmas = sampling.get_sigmas_karras(steps, 0.03, 14.6, rho=7.0).to(dtype)

        def model(y, sigma):
            return net(y, sigma)
    return sampling, kd_model, model, sigmas


# ------------------------------------------------------------------------------------------ k-diffusion parity


@pytest.mark.parametrize("eta", [1.0, 0.0])
@pytest.mark.parametrize("schedule", ["sd_discrete", "karras"])
def test_brownian_tree_parity_with_k_diffusion_float64(kdiff, schedule, eta):
    """The same BrownianTreeNoiseSampler (same seed) on both sides: sample() calls it with (sigma, sigma_s) for the
    first stage and (sigma, sigma') for the second, as k-diffusion does.  sample() hands it Python floats, which
    ``torch.as_tensor`` would make float32 times: the wrapper gives the tree float64 times, as k-diffusion's float64
    sigmas do."""
    sampling, kd_model, model, sigmas = _kd_setup(kdiff, schedule, torch.float64)
    noise = _rand(2, 4, 9, 11)
    smin, smax = sigmas[sigmas > 0].min(), sigmas.max()
    theirs_ns = sampling.BrownianTreeNoiseSampler(noise, smin, smax, seed=42)
    ours_ns = sampling.BrownianTreeNoiseSampler(noise, smin, smax, seed=42)
    calls = []

    def ours_noise(s, sn):
        calls.append((s, sn))
        return ours_ns(torch.tensor(s, dtype=torch.float64), torch.tensor(sn, dtype=torch.float64))

    with torch.no_grad():
        expected = sampling.sample_dpmpp_sde(kd_model, noise * sigmas[0], sigmas, disable=True, eta=eta,
                                             noise_sampler=theirs_ns)
    got = zk.sample(model, noise, sigmas, sampler="dpmpp_sde", eta=eta, noise_sampler=ours_noise)
    err = (got - expected).abs().max().item()
    assert err <= TOL[torch.float64], err
    if eta:  # both stages of every step but the last (Euler to 0, no noise)
        vals = sigmas.tolist()
        want = [p for i in range(len(vals) - 2)
                for p in ((vals[i], co.dpmpp_sde_midpoint(vals[i], vals[i + 1])), (vals[i], vals[i + 1]))]
        assert calls == want


@pytest.mark.parametrize("eta", [1.0, 0.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("schedule", ["sd_discrete", "karras"])
def test_stream_parity_with_k_diffusion(kdiff, schedule, dtype, eta):
    """An explicit noise stream (the same tensor per call on both sides) in float64 and float32: the float32 case is
    the math alone (a Brownian tree queried at k-diffusion's float32 midpoints moves by more than float32 rounding)."""
    sampling, kd_model, model, sigmas = _kd_setup(kdiff, schedule, dtype)
    noise = _rand(2, 4, 9, 11, dtype=dtype)
    zs = [_rand(2, 4, 9, 11, seed=100 + k, dtype=dtype) for k in range(64)]
    a, b = iter(zs), iter(list(zs))
    with torch.no_grad():
        expected = sampling.sample_dpmpp_sde(kd_model, noise * sigmas[0], sigmas, disable=True, eta=eta,
                                             noise_sampler=lambda s, sn: next(a))
    got = zk.sample(model, noise, sigmas, sampler="dpmpp_sde", eta=eta, noise_sampler=lambda s, sn: next(b))
    assert got.dtype == dtype
    err = (got - expected).abs().max().item()
    assert err <= TOL[dtype], err


def test_s_noise_and_eta_between_scale_the_noise_as_k_diffusion(kdiff):
    sampling, kd_model, model, sigmas = _kd_setup(kdiff, "karras", torch.float64, steps=6)
    noise = _rand(1, 4, 5, 5)
    zs = [_rand(1, 4, 5, 5, seed=200 + k) for k in range(16)]
    a, b = iter(zs), iter(list(zs))
    with torch.no_grad():
        expected = sampling.sample_dpmpp_sde(kd_model, noise * sigmas[0], sigmas, disable=True, eta=0.6, s_noise=0.8,
                                             noise_sampler=lambda s, sn: next(a))
    got = zk.sample(model, noise, sigmas, sampler="dpmpp_sde", eta=0.6, s_noise=0.8,
                    noise_sampler=lambda s, sn: next(b))
    assert (got - expected).abs().max().item() <= 1e-10


# ------------------------------------------------------------------------------------------------ Philox noise


def _model(y, sigma):
    s = sigma.to(y.dtype).reshape(-1, *([1] * (y.ndim - 1)))
    f = 0.6 * y + 0.2 * torch.sin(3.0 * y) + 0.1 * torch.atan(s)
    return f, 0.5 * f - 0.1


SIGMAS = [INF, 9.0, 4.0, 2.0, 1.0, 0.4, 0.1, 0.0]


def test_the_two_stages_draw_philox_draws_0_and_1_of_the_step():
    """seed= gives stage 1 the Philox noise (step_index, draw 0) and stage 2 (step_index, draw 1) (§2.8)."""
    y, f = _rand(2, 3, 4, 5, seed=1), _rand(2, 3, 4, 5, seed=2)
    z0 = zk.noise.normal(y.shape, [5, 6], 3, 0, dtype=y.dtype)
    z1 = zk.noise.normal(y.shape, [5, 6], 3, 1, dtype=y.dtype)
    assert not torch.equal(z0, z1)
    r = zk.dpmpp_sde_step(y, f, 6.0, 2.0, seed=[5, 6], step_index=3, backend="torch")
    want = zk.dpmpp_sde_step(y, f, 6.0, 2.0, noise=z0, backend="torch")
    assert torch.equal(r.y, want.y) and r.derivative is y and want.derivative is y
    f2 = _rand(2, 3, 4, 5, seed=3)
    r2 = zk.dpmpp_sde_step(r.y, f2, 6.0, 2.0, first=r, seed=[5, 6], step_index=3, backend="torch")
    want2 = zk.dpmpp_sde_step(want.y, f2, 6.0, 2.0, first=want, noise=z1, backend="torch")
    assert torch.equal(r2.y, want2.y) and r2.complete


def test_the_second_stage_is_euler_ancestral_on_the_start_state():
    """Stage 2 = the euler_ancestral coefficients from sigma to sigma' applied to the START state and D_2."""
    pz = zk.parameterization("v")
    y, f1, f2, z = (_rand(2, 3, 4, 4, seed=k) for k in range(4))
    r = zk.dpmpp_sde_step(y, f1, 7.0, 3.0, eta=0.7, noise=_rand(2, 3, 4, 4, seed=9), backend="torch")
    r2 = zk.dpmpp_sde_step(r.y, f2, 7.0, 3.0, first=r, eta=0.7, noise=z, backend="torch")
    p, q = pz.denoise_coeffs(r.sigma)
    d2 = p * r.y + q * f2
    c = co.ancestral(pz, 7.0, 3.0, 0.7)
    torch.testing.assert_close(r2.y, c.a * y + c.b * d2 + c.e * z, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(r2.denoised, d2, rtol=1e-14, atol=1e-14)
    assert r.sigma == pytest.approx(math.sqrt(21.0), rel=1e-15)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=requires_C)])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_philox_runs_on_each_backend_equal_the_float64_reference(backend, eta):
    noise = _rand(2, 4, 6, 5, seed=0, dtype=torch.float32)
    kw = dict(sampler="dpmpp_sde", eta=eta, guidance_scale=3.0, guidance_rescale=0.7, seed=[11, 12])
    ref = zk.sample(_model, noise.double(), SIGMAS, backend="torch", **kw)
    got = zk.sample(_model, noise, SIGMAS, backend=backend, **kw)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


TRITON_CHILD = textwrap.dedent(
    """
    import math, sys
    import torch
    import zsnr_kernels as zk

    def model(y, sigma):
        s = sigma.to(y.dtype).reshape(-1, *([1] * (y.ndim - 1)))
        f = 0.6 * y + 0.2 * torch.sin(3.0 * y) + 0.1 * torch.atan(s)
        return f, 0.5 * f - 0.1

    sigmas = [math.inf, 9.0, 4.0, 2.0, 1.0, 0.4, 0.1, 0.0]
    noise = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(0))
    kw = dict(sampler="dpmpp_sde", guidance_scale=3.0, guidance_rescale=0.7, seed=[11, 12])
    torch.save({"triton": zk.sample(model, noise, sigmas, backend="triton", **kw),
                "ref": zk.sample(model, noise.double(), sigmas, backend="torch", **kw)}, sys.argv[1])
    """
)


def test_philox_run_on_triton_interpreter_equals_the_float64_reference(tmp_path):
    pytest.importorskip("triton")
    path = tmp_path / "out.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", TRITON_CHILD, str(path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = torch.load(path, weights_only=False)
    assert torch.isfinite(out["triton"]).all()
    torch.testing.assert_close(out["triton"].double(), out["ref"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=requires_C)])
def test_a_batch_of_8_equals_8_batches_of_1(backend):
    noise = _rand(8, 3, 5, 5, seed=4, dtype=torch.float32)
    batch = zk.sample(_model, noise, SIGMAS, sampler="dpmpp_sde", seed=40, backend=backend,
                      guidance_scale=2.0)
    for i in range(8):
        one = zk.sample(_model, noise[i:i + 1], SIGMAS, sampler="dpmpp_sde", seed=40 + i, backend=backend,
                        guidance_scale=2.0)
        torch.testing.assert_close(batch[i:i + 1], one, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ the limits


@pytest.fixture(scope="module")
def limit_setup():
    net = TinyNet(4, seed=2)
    noise = _rand(2, 4, 8, 8, seed=0)
    rest = zk.schedules.karras(10, 0.03, 14.6)
    return net, noise, rest


def _run(setup, sigma_max, **kw):
    net, noise, rest = setup
    sigmas = torch.cat([torch.tensor([sigma_max], dtype=torch.float64), rest])
    return zk.sample(net, noise, sigmas, sampler="dpmpp_sde", seed=[11, 12], **kw)


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_the_run_from_inf_is_the_limit_of_runs_from_large_sigma_max(limit_setup, eta):
    """Same unit noise and Philox streams: the gap to runs from sigma_max = 1e4, 1e8, 1e16 shrinks like
    sigma_max^(-1/2) (the first stage's weight sqrt(sigma'/sigma_max))."""
    at_inf = _run(limit_setup, INF, eta=eta)
    assert torch.isfinite(at_inf).all()
    gaps = [(_run(limit_setup, s, eta=eta) - at_inf).abs().max().item() for s in (1e4, 1e8, 1e16)]
    assert gaps[1] < 3e-2 * gaps[0] and gaps[2] < 3e-3 * gaps[1], gaps
    assert gaps[2] < 1e-6, gaps


def test_the_step_from_inf_is_its_documented_limit(limit_setup):
    """eta > 0: y_2 = sqrt(1 - eta^2) y + eta s_noise z_1 at sigma = inf, the model at inf again, then
    y' = s' sqrt(1 - eta^2) y + c' D_2 + s' eta s_noise z_2 -- equal, with explicit noise."""
    net, noise, rest = limit_setup
    pz = zk.parameterization("v")
    sn, eta, s_noise = float(rest[0]), 0.6, 0.9
    z1, z2 = _rand(*noise.shape, seed=31), _rand(*noise.shape, seed=32)
    at = lambda y: net(y, torch.full((2,), INF, dtype=torch.float64))  # noqa: E731
    r = zk.dpmpp_sde_step(noise, at(noise), INF, sn, eta=eta, s_noise=s_noise, noise=z1, backend="torch")
    assert not r.complete and r.sigma == INF
    k = math.sqrt(1 - eta * eta)
    torch.testing.assert_close(r.y, k * noise + eta * s_noise * z1, rtol=0, atol=1e-15)
    r2 = zk.dpmpp_sde_step(r.y, at(r.y), INF, sn, first=r, eta=eta, s_noise=s_noise, noise=z2, backend="torch")
    d2 = pz.denoise_coeffs(INF)[1] * at(r.y)
    s1 = pz.noise_scale(sn)
    want = s1 * k * noise + pz.c_in(sn) * d2 + s1 * eta * s_noise * z2
    torch.testing.assert_close(r2.y, want, rtol=0, atol=1e-14)
    assert torch.isfinite(r2.y).all()


def test_the_step_from_inf_at_eta_0_is_euler_and_the_run_is_euler_then_dpmpp_sde(limit_setup):
    """eta = 0: the limit's y_2 is y itself at sigma = inf, so D_2 = D_1: one call, the Euler step; a run from inf
    equals that step followed by dpmpp_sde on the rest of the schedule."""
    net, noise, rest = limit_setup
    sn = float(rest[0])
    f = net(noise, torch.full((2,), INF, dtype=torch.float64))
    r = zk.dpmpp_sde_step(noise, f, INF, sn, eta=0.0)
    assert r.complete and r.sigma == sn
    assert torch.equal(r.y, zk.euler_step(noise, f, INF, sn).y)
    full = _run(limit_setup, INF, eta=0.0)
    s1 = zk.parameterization("v").noise_scale(sn)
    split = zk.sample(net, r.y / s1, rest, sampler="dpmpp_sde", eta=0.0)
    assert (full - split).abs().max().item() < 1e-12
    # and the eta = 0 run from inf is the limit of finite ones too, like sigma_max^(-1/2): their second model call
    # is at sigma_s = sqrt(sigma_max sigma_1)
    gaps = [(_run(limit_setup, s, eta=0.0) - full).abs().max().item() for s in (1e4, 1e8, 1e16)]
    assert gaps[1] < 3e-2 * gaps[0] and gaps[2] < 3e-3 * gaps[1], gaps


def test_the_step_to_0_is_euler_without_noise():
    y, f = _rand(2, 3, 4, 4, seed=1), _rand(2, 3, 4, 4, seed=2)
    called = []
    r = zk.dpmpp_sde_step(y, f, 0.5, 0.0, noise=lambda: called.append(1), backend="torch")
    assert r.complete and r.sigma == 0.0 and not called
    assert torch.equal(r.y, zk.euler_step(y, f, 0.5, 0.0, backend="torch").y)
    r = zk.dpmpp_sde_step(y, f, INF, 0.0, seed=3, step_index=0)  # [inf, 0]: D itself
    assert r.complete


# ------------------------------------------------------------------------------------------------ the start state


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=requires_C)])
def test_a_first_call_in_place_keeps_the_start_state_for_the_second(backend):
    y, f, f2, z1, z2 = (_rand(2, 3, 4, 4, seed=k, dtype=torch.float32) for k in (1, 2, 6, 3, 5))
    fresh = zk.dpmpp_sde_step(y, f, 5.0, 2.0, noise=z1, backend=backend)
    fresh2 = zk.dpmpp_sde_step(fresh.y, f2, 5.0, 2.0, first=fresh, noise=z2, backend=backend)
    mine = y.clone()
    r = zk.dpmpp_sde_step(mine, f, 5.0, 2.0, noise=z1, out=mine, backend=backend)
    assert r.y is mine and torch.equal(r.y, fresh.y)
    assert r.derivative is not mine and torch.equal(r.derivative, y)  # the start state, kept apart
    r2 = zk.dpmpp_sde_step(r.y, f2, 5.0, 2.0, first=r, noise=z2, out=r.y, backend=backend)
    assert torch.equal(r2.y, fresh2.y)


def test_the_first_call_keeps_y_by_reference():
    y, f = _rand(2, 3, 4, 4, seed=1), _rand(2, 3, 4, 4, seed=2)
    keep = y.clone()
    out = torch.empty_like(y)
    r = zk.dpmpp_sde_step(y, f, 5.0, 2.0, noise=_rand(2, 3, 4, 4, seed=3), out=out)
    assert r.y is out and r.derivative is y and torch.equal(y, keep)
    # the second call may write over its own y (the predictor state) in place: it reads the start state apart
    f2 = _rand(2, 3, 4, 4, seed=4)
    want = zk.dpmpp_sde_step(r.y, f2, 5.0, 2.0, first=r, noise=_rand(2, 3, 4, 4, seed=5))
    got = zk.dpmpp_sde_step(r.y, f2, 5.0, 2.0, first=r, noise=_rand(2, 3, 4, 4, seed=5), out=r.y)
    assert got.y is out and torch.equal(got.y, want.y)


def test_a_first_without_its_start_state_is_refused():
    y, f = _rand(1, 2, 3, 3, seed=1), _rand(1, 2, 3, 3, seed=2)
    r = zk.dpmpp_sde_step(y, f, 5.0, 2.0, eta=0.0)
    with pytest.raises(TypeError, match="first.derivative"):
        zk.dpmpp_sde_step(r.y, f, 5.0, 2.0, first=r._replace(derivative=None), eta=0.0)
    with pytest.raises(ValueError, match="first.y"):
        zk.dpmpp_sde_step(y, f, 5.0, 2.0, first=r, eta=0.0)


def test_sample_never_writes_the_start_state_the_second_stage_reads():
    """sample() keeps a two-stage sampler's state out of place: the run equals one built from the step functions."""
    noise = _rand(2, 3, 5, 5, seed=7)
    got = zk.sample(_model, noise, SIGMAS[1:], sampler="dpmpp_sde", seed=[3, 4], guidance_scale=2.0)
    y, _ = zk.initial_state(noise, SIGMAS[1])
    for i in range(len(SIGMAS) - 2):
        s, sn = SIGMAS[1 + i], SIGMAS[2 + i]
        r = zk.dpmpp_sde_step(y, _model(y, torch.full((2,), s, dtype=torch.float64)), s, sn, seed=[3, 4],
                              step_index=i, guidance_scale=2.0)
        if not r.complete:
            r = zk.dpmpp_sde_step(r.y, _model(r.y, torch.full((2,), r.sigma, dtype=torch.float64)), s, sn,
                                  first=r, seed=[3, 4], step_index=i, guidance_scale=2.0)
        y = r.y
    assert torch.equal(got, zk.final_sample(y))


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=requires_C)])
@pytest.mark.parametrize("eta", [0.0, 1.0, 0.5])
def test_a_plan_equals_sample_with_both_draws(backend, eta):
    """A SamplingPlan runs dpmpp_sde with its noise: stage 2's Philox draw 1 is recorded and drawn by the table step
    (the record's ``draw``), bit for bit sample() on the same backend."""
    noise = _rand(2, 4, 6, 5, seed=0, dtype=torch.float32)
    kw = dict(sampler="dpmpp_sde", eta=eta, seed=[11, 12], backend=backend, guidance_scale=3.0,
              guidance_rescale=0.7)
    plan = zk.SamplingPlan(SIGMAS, noise.shape, **kw)
    if eta:
        assert {e.draw for e in plan._evals if e.coeffs.e != 0.0} == {0, 1}
    assert torch.equal(plan.run(_model, noise), zk.sample(_model, noise, SIGMAS, **kw))


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=requires_C)])
def test_the_second_draw_is_drawn_in_the_step(backend):
    """Stage 2 with seed= is the step with the noise tensor of (step_index, draw 1): the kernel draws it (cpu: the
    in-kernel generator, within NORMAL_ATOL of the reference's normals; torch: the reference itself, bit for bit)."""
    from zsnr_kernels.tools import tolerances

    y, f, f2 = (_rand(2, 3, 4, 5, seed=k, dtype=torch.float32) for k in (1, 2, 3))
    r = zk.dpmpp_sde_step(y, f, 6.0, 2.0, seed=[5, 6], step_index=3, backend=backend)
    got = zk.dpmpp_sde_step(r.y, f2, 6.0, 2.0, first=r, seed=[5, 6], step_index=3, backend=backend)
    z1 = zk.noise.normal(y.shape, [5, 6], 3, 1)
    want = zk.dpmpp_sde_step(r.y, f2, 6.0, 2.0, first=r, noise=z1, backend=backend)
    if backend == "torch":
        assert torch.equal(got.y, want.y)
    else:
        e = co.ancestral(zk.parameterization("v"), 6.0, 2.0, 1.0).e
        torch.testing.assert_close(got.y, want.y, rtol=0, atol=abs(e) * tolerances.NORMAL_ATOL + 1e-6)
        assert not torch.equal(got.y, zk.dpmpp_sde_step(r.y, f2, 6.0, 2.0, first=r, noise=zk.noise.normal(
            y.shape, [5, 6], 3, 0), backend=backend).y)


def test_the_row_and_the_exports():
    spec = zk.SAMPLERS["dpmpp_sde"]
    assert spec.kind == "two_stage" and spec.eta and spec.s_noise and not spec.kernel and spec.step
    assert zk.steps.step_function("dpmpp_sde") is zk.dpmpp_sde_step
    assert "dpmpp_sde_step" in zk.__all__ and "dpmpp_sde_step" in zk.steps.__all__
    assert "dpmpp_sde" not in co.SAMPLER_KINDS  # no C++ mirror: the compiled backends run it from the table
