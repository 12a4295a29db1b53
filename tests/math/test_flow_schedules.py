"""Flow matching as a schedule: diffusers' FlowMatchEulerDiscreteScheduler's times, t = 1 as sigma = inf, and the
whole Euler loop of a flow model against diffusers' own."""

from __future__ import annotations

import math

import pytest
import torch

import zsnr_kernels as zk
from zsnr_kernels import schedules as S

diffusers = pytest.importorskip("diffusers")

CONFIGS = [
    {},
    {"shift": 3.0},
    {"use_dynamic_shifting": True, "mu": 0.8},
    {"use_dynamic_shifting": True, "mu": 1.2, "time_shift_type": "linear"},
    {"shift": 3.0, "shift_terminal": 0.1},
    {"use_dynamic_shifting": True, "mu": S.flow_shift_mu(1024), "shift_terminal": 0.05},
]


def diffusers_sigmas(n, cfg):
    sched = diffusers.FlowMatchEulerDiscreteScheduler(**{k: v for k, v in cfg.items() if k != "mu"})
    sched.set_timesteps(n, mu=cfg.get("mu"))
    return sched


@pytest.mark.parametrize("n", [1, 2, 10, 28, 50])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_flow_times_equal_diffusers(cfg, n):
    if n == 1 and cfg.get("shift_terminal"):
        with pytest.raises(ValueError, match="shift_terminal needs n >= 2"):  # diffusers: 0 / 0, NaN
            S.flow_times(n, **cfg)
        return
    want = diffusers_sigmas(n, cfg).sigmas.double()
    got = S.flow_times(n, **cfg)
    torch.testing.assert_close(got, want, rtol=0, atol=6e-8)  # diffusers rounds to float32
    assert got[0] == 1.0 and got[-1] == 0.0
    sig = S.flow(n, **cfg)
    assert sig[0] == math.inf and not torch.isnan(sig).any() and (sig[1:] < sig[:-1]).all()


def test_flow_shift_mu_is_diffusers_calculate_shift():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for seq in (256, 1024, 4096, 777):
        assert S.flow_shift_mu(seq) == pytest.approx(calculate_shift(seq), rel=1e-15)


def test_time_and_sigma_round_trip():
    t = torch.tensor([1.0, 0.999, 0.5, 1e-6, 0.0], dtype=torch.float64)
    s = S.flow_time_to_sigma(t)
    assert s[0] == math.inf and s[-1] == 0
    torch.testing.assert_close(S.sigma_to_flow_time(s), t, rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match="lie in"):
        S.flow_time_to_sigma([1.5])
    with pytest.raises(ValueError, match="mu="):
        S.flow_times(10, use_dynamic_shifting=True)


def velocity(x, t):
    """A flow model's output v = eps - x0 as a smooth function of (x_t, t): what both loops call."""
    t = t.reshape(-1, *[1] * (x.ndim - 1))
    return (0.3 + t) * x - 0.2 * torch.sin(3 * t) + 0.1 * x * x


@pytest.mark.parametrize("cfg", CONFIGS[:3], ids=["default", "shift3", "dynamic"])
def test_euler_loop_equals_flow_match_euler(cfg):
    """The library's Euler from sigma = inf on a flow model is diffusers' FlowMatchEuler loop step for step: both
    are exact for a constant denoiser, so they are one map (in float64 here, diffusers' float32 schedule)."""
    n = 12
    sched = diffusers_sigmas(n, cfg)
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = noise.clone()
    for i, t in enumerate(sched.timesteps):
        v = velocity(x, (t / 1000).double().expand(x.shape[0]))
        x = sched.step(v, t, x).prev_sample.double()  # diffusers' arithmetic is float32
    t_sched = sched.sigmas.double()
    sigmas = S.flow_time_to_sigma(t_sched)

    def model(y, sigma):  # y is x_t for flow; sigma back to the flow time the network takes
        return velocity(y, torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma / (1 + sigma)))

    ours = zk.sample(model, noise, sigmas, sampler="euler", prediction="flow")
    torch.testing.assert_close(ours, x, rtol=2e-5, atol=2e-5)


# ------------------------------------------------------------------------------------- the rest of the schedule


@pytest.mark.parametrize("cfg", [
    {"shift": 3.0, "use_karras_sigmas": True},
    {"use_exponential_sigmas": True},
    {"shift": 2.0, "use_beta_sigmas": True},
    {"use_dynamic_shifting": True, "mu": 0.9, "use_karras_sigmas": True, "shift_terminal": 0.1},
], ids=["karras", "exponential", "beta", "dynamic-karras-terminal"])
def test_flow_grids_equal_diffusers(cfg):
    """use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas on flow times, as diffusers converts them (its
    float32 rounding); the grid keeps t = 1 exactly."""
    pytest.importorskip("scipy")  # diffusers' beta grid
    for n in (1, 2, 9):
        if n == 1 and cfg.get("shift_terminal"):
            continue
        got = S.flow_times(n, **cfg)
        torch.testing.assert_close(got, diffusers_sigmas(n, cfg).sigmas.double(), rtol=0, atol=1e-7)
        assert got[0] == 1.0 and S.flow(n, **cfg)[0] == math.inf


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_custom_times_equal_diffusers_sigmas_argument(cfg):
    """``times=``: diffusers' ``set_timesteps(sigmas=...)`` (Flux passes linspace(1, 1/n, n) with mu), shifted the
    same way; n may be left out.  A shift never moves t = 1 off 1 (torch's scalar / tensor would: mu = 0.9 gave
    0.9999999999999999 before the shift was a true division)."""
    times = [1.0, 0.8, 0.55, 0.3, 0.1]
    sched = diffusers.FlowMatchEulerDiscreteScheduler(**{k: v for k, v in cfg.items() if k != "mu"})
    sched.set_timesteps(sigmas=times, mu=cfg.get("mu"))
    got = S.flow_times(times=times, **cfg)
    # diffusers rounds custom sigmas to float32 and shifts them in float32 arithmetic (its own schedule in float64)
    torch.testing.assert_close(got, sched.sigmas.double(), rtol=0, atol=2e-7)
    assert got[0] == 1.0
    torch.testing.assert_close(S.flow_times(5, times=times, **cfg), got, rtol=0, atol=0)
    with pytest.raises(ValueError, match="n=4 but 5 times"):
        S.flow_times(4, times=times, **cfg)
    with pytest.raises(ValueError, match=r"each in \[0, 1\]"):
        S.flow_times(times=[1.2, 0.5])
    for mu in (0.8, 0.9, 1.7):
        assert S.flow_times(times=times, use_dynamic_shifting=True, mu=mu)[0] == 1.0


def test_mu_from_the_image_sequence_length():
    """use_dynamic_shifting with image_seq_len (and the config's base/max sequence lengths and shifts): Flux's
    calculate_shift, then the shift by that mu."""
    kw = dict(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    for seq in (256, 1024, 3000):
        mu = S.flow_shift_mu(seq, **kw)
        torch.testing.assert_close(S.flow_times(10, use_dynamic_shifting=True, image_seq_len=seq, **kw),
                                   S.flow_times(10, use_dynamic_shifting=True, mu=mu), rtol=0, atol=0)
    with pytest.raises(ValueError, match="not both"):
        S.flow_times(10, use_dynamic_shifting=True, mu=0.5, image_seq_len=1024)
    with pytest.raises(ValueError, match="only one of"):
        S.flow_times(10, use_karras_sigmas=True, use_beta_sigmas=True)


# -------------------------------------------------------------------------------------------------- flow Heun

F64 = torch.float64


def _flow_time(sigma):
    return torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma / (1 + sigma))


def _flow_model(y, sigma):
    return velocity(y, _flow_time(sigma))


def _diffusers_heun(x, ts):
    """diffusers' FlowMatchHeunDiscreteScheduler.step, transcribed in float64 (its own upcasts the sample to float32):
    per step, d1 = v(x, t), x2 = x + (t' - t) d1, and unless t' = 0, x' = x + (t' - t)(d1 + v(x2, t'))/2."""
    for t, tn in zip(ts[:-1], ts[1:]):
        t_b = torch.full((x.shape[0],), t, dtype=F64)
        d1 = velocity(x, t_b)
        x2 = x + (tn - t) * d1
        if tn == 0:
            x = x2
            continue
        x = x + (tn - t) * (d1 + velocity(x2, torch.full_like(t_b, tn))) / 2
    return x


def test_flow_heun_is_not_heun():
    """One finite step, t = 0.8 -> 0.5 (sigma 4 -> 1): both have the Euler predictor and a correction
    w (D_1 - D_2), but diffusers' flow Heun (the trapezoid in t) weighs it (1 + sigma')/(1 + sigma) = 0.4 times
    k-diffusion's (in sigma).  heun_flow_step is diffusers' to float64 rounding; heun_step differs by 0.40 here (a
    second-order difference: on t = 0.3 -> 0.29 it is 4e-6)."""
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    want = _diffusers_heun(x, [0.8, 0.5])
    sigma, sigma_next = 4.0, 1.0
    out = {}
    for name, fn in (("heun_flow", zk.heun_flow_step), ("heun", zk.heun_step)):
        r = fn(x, _flow_model(x, torch.full((2,), sigma, dtype=F64)), sigma, sigma_next, prediction="flow",
               backend="torch")
        assert not r.complete
        out[name] = fn(r.y, _flow_model(r.y, torch.full((2,), sigma_next, dtype=F64)), sigma, sigma_next, first=r,
                       prediction="flow", backend="torch")
        predictor = r.y
    torch.testing.assert_close(out["heun_flow"].y, want, rtol=0, atol=1e-14)
    gap = (out["heun"].y - want).abs().max().item()
    assert gap > 0.3, gap  # 0.40 here
    ratio = (want - predictor).abs().max() / (out["heun"].y - predictor).abs().max()
    assert ratio.item() == pytest.approx((1 + sigma_next) / (1 + sigma), rel=1e-12)


@pytest.mark.parametrize("cfg", CONFIGS[:3], ids=["default", "shift3", "dynamic"])
def test_heun_flow_loop_equals_flow_match_heun(cfg):
    """The whole loop from sigma = inf: zk.sample(sampler="heun_flow", prediction="flow") on schedules.flow is
    diffusers' FlowMatchHeunDiscreteScheduler loop (float32 state there: 2e-5), and its float64 transcription on the
    same times to 1e-12; the step from t = 1 takes both evaluations, as diffusers'.  The library's heun (Euler from
    inf, the trapezoid in sigma after) is another sampler: 3e-2 and more apart."""
    n = 8
    t = S.flow_times(n, **cfg)
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    ours = zk.sample(_flow_model, noise, S.flow_time_to_sigma(t), sampler="heun_flow", prediction="flow")
    torch.testing.assert_close(ours, _diffusers_heun(noise, t.tolist()), rtol=0, atol=1e-12)
    kheun = zk.sample(_flow_model, noise, S.flow_time_to_sigma(t), sampler="heun", prediction="flow")
    assert (kheun - ours).abs().max() > 3e-2
    if cfg.get("use_dynamic_shifting"):
        return  # diffusers' FlowMatchHeun has only shift
    sched = diffusers.FlowMatchHeunDiscreteScheduler(**cfg)
    sched.set_timesteps(n)
    x = noise.clone()
    for ts in sched.timesteps:
        x = sched.step(velocity(x, (ts / 1000).double().expand(2)), ts, x).prev_sample.double()
    torch.testing.assert_close(ours, x, rtol=2e-5, atol=2e-5)


def test_heun_flow_from_inf_is_the_limit_of_finite_starts():
    """heun_flow has a limit at sigma = inf (in flow time the first interval is finite): runs started from the same
    noise at sigma_max = 1e4, 1e8, 1e16 approach the run from inf like 1/sigma_max."""
    rest = [6.0, 2.0, 0.7, 0.2, 0.0]
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    at_inf = zk.sample(_flow_model, noise, [math.inf] + rest, sampler="heun_flow", prediction="flow")
    gaps = []
    for smax in (1e4, 1e8, 1e16):
        y0 = noise * zk.parameterization("flow").noise_scale(smax)
        gaps.append((zk.sample(_flow_model, y0, [smax] + rest, sampler="heun_flow", prediction="flow")
                     - at_inf).abs().max().item())
    assert gaps[0] < 1e-2 and gaps[1] < gaps[0] * 1e-3 and gaps[2] < max(gaps[1] * 1e-3, 1e-14), gaps


@pytest.mark.parametrize("prediction", ["flow", "v", "x0"])
def test_heun_flow_coefficients_tensor_mirror_and_limits(prediction):
    """The per-sample tensor coefficients equal the float ones (pairs with sigma = inf and sigma' = 0 among them);
    the weight at inf is the limit of large sigmas; the step to 0 is complete after its first stage, the step from
    inf is not."""
    from zsnr_kernels import coefficients as co

    pz = zk.parameterization(prediction)
    pairs = [(math.inf, 3.0), (math.inf, 0.01), (50.0, 3.0), (3.0, 2.5), (0.5, 0.001), (2.0, 0.0), (math.inf, 0.0)]
    for stage in (1, 2):
        a = co.StepArgs("heun_flow", torch.tensor([p[0] for p in pairs], dtype=F64),
                        torch.tensor([p[1] for p in pairs], dtype=F64), stage=stage)
        tc, ok = co._TENSOR_COEFFS["heun_flow"](pz, a)
        assert ok.all()
        for i, (s, sn) in enumerate(pairs):
            done = sn == 0.0
            if stage == 2 and done:
                assert (tc.a[i], tc.b[i], tc.h[0][i]) == (1.0, 0.0, 0.0)  # a done sample keeps its state
                continue
            c = co.heun_flow(pz, s, sn, stage)
            assert c.complete == (stage == 2 or done)
            assert tc.a[i].item() == pytest.approx(c.a, rel=1e-15, abs=1e-300)
            assert tc.b[i].item() == pytest.approx(c.b, rel=1e-15, abs=1e-300)
            if stage == 2:
                assert tc.h[0][i].item() == pytest.approx(c.h[0], rel=1e-15)
    w_inf = co.heun_flow(pz, math.inf, 2.0, 2).h[0]
    assert w_inf == pytest.approx(-pz.c_in(2.0) * 3.0 / 4.0, rel=1e-15)
    assert co.heun_flow(pz, 1e12, 2.0, 2).h[0] == pytest.approx(w_inf, rel=1e-11)
    with pytest.raises(ValueError, match="sigma > sigma_next"):
        co.heun_flow(pz, 1.0, 1.0, 1)


def test_heun_flow_span_limit_in_flow_time():
    """heun_flow's correction weighs D_1 - D_2 by (t - t')/(2 t'), which multiplies their float32 rounding: a step
    whose flow times t/t' exceed FLOW_TIME_RATIO_MAX (1e4) is refused by name, on the float path and (ok False, NaN)
    per sample on the device path; one at the limit runs, finite.  From sigma = inf the ratio is (1 + sigma')/sigma'
    (finite: the step from inf is bounded, unlike heun's).  Euler takes any of these steps."""
    from zsnr_kernels import _validate, coefficients as co

    most = _validate.FLOW_TIME_RATIO_MAX["heun_flow"]
    assert most == 1e4
    x = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    edge = 1.0 / (most - 1.0)  # from inf: (1 + s')/s' = most exactly
    for sg, sn, fine in ((math.inf, edge, True), (math.inf, edge * 0.99, False), (1.0, 0.51 / most, True),
                         (1.0, 0.49 / most, False), (1e20, 1e-10, False), (5.0, 0.0, True)):
        run = lambda: zk.heun_flow_step(x, x, sg, sn, prediction="flow", backend="torch")  # noqa: E731
        if fine:
            assert torch.isfinite(run().y).all()
        else:
            with pytest.raises(ValueError, match=r"heun_flow: sigma=.* spans a factor .* in the flow time.*euler"):
                run()
            assert torch.isfinite(zk.euler_step(x, x, sg, sn, prediction="flow", backend="torch").y).all()
    a = co.StepArgs("heun_flow", torch.tensor([math.inf, math.inf, 1e20], dtype=F64),
                    torch.tensor([edge, edge * 0.99, 0.0], dtype=F64), stage=1)
    _, ok = co._TENSOR_COEFFS["heun_flow"](zk.parameterization("flow"), a)
    assert ok.tolist() == [True, False, True]


def test_flow_times_take_a_flow_match_euler_config():
    """flow_times(n, mu=..., **config) of a FlowMatchEulerDiscreteScheduler config (less invert_sigmas and
    stochastic_sampling, which are the sampler's): that scheduler's set_timesteps(n, mu=...)."""
    sched = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift_terminal=0.1,
                                                       time_shift_type="linear", use_karras_sigmas=True)
    cfg = {k: v for k, v in sched.config.items()
           if not k.startswith("_") and k not in ("invert_sigmas", "stochastic_sampling")}
    sched.set_timesteps(10, mu=0.8)
    torch.testing.assert_close(S.flow_times(10, mu=0.8, **cfg), sched.sigmas.double(), rtol=0, atol=6e-8)
