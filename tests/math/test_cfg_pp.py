"""CFG++ (Chung et al. 2024, arXiv 2406.08070; ComfyUI's ``sample_*_cfg_pp``): euler_cfg_pp, euler_ancestral_cfg_pp,
dpmpp_2m_cfg_pp and dpmpp_2s_ancestral_cfg_pp.

* against an independent float64 loop in k-diffusion's x, written here from the formulas of the paper and of
  ComfyUI's samplers (denoise with the guided D, renoise with the unconditional D_u), on finite schedules: float64 to
  ~1e-12, float32 to float32 rounding of the run;
* the limit w -> 1 (D_u = D: one model output, or a pair at guidance_scale 1) and F_u = F_c are the plain samplers;
* the guidance rescale acts on the guided prediction only (D_u keeps the raw p, q);
* every backend (cpu under each instruction set this CPU has, torch, Triton's interpreter) agrees with the float64
  reference per step in float32/float16/bfloat16 at tools/tolerances.py's bounds, D_u term and carry included;
* a batch of 8 equals 8 batches of 1 (Philox seeds);
* from sigma = inf every step is finite and equals its documented limit (coefficients.py's CFG++ section).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import zsnr_kernels as zk
from zsnr_kernels import coefficients as co
from zsnr_kernels.backends import ext as _ext
from zsnr_kernels.parameterization import parameterization
from zsnr_kernels.tools import tolerances

INF = math.inf
CFG_PP = ("euler_cfg_pp", "euler_ancestral_cfg_pp", "dpmpp_2m_cfg_pp", "dpmpp_2s_ancestral_cfg_pp")
PLAIN = {"euler_cfg_pp": "euler", "euler_ancestral_cfg_pp": "euler_ancestral", "dpmpp_2m_cfg_pp": "dpmpp_2m",
         "dpmpp_2s_ancestral_cfg_pp": "dpmpp_2s_ancestral"}
STOCHASTIC = ("euler_ancestral_cfg_pp", "dpmpp_2s_ancestral_cfg_pp")
needs_cpu = pytest.mark.skipif(not _ext.available(), reason=f"zsnr_kernels._C: {_ext.why_unavailable()}")


# ------------------------------------------------------------------------------- the independent float64 oracle


def _ancestral_step(s, sn, eta):
    """k-diffusion's get_ancestral_step (sigma_down, sigma_up), in plain float64."""
    if not eta:
        return sn, 0.0
    up = min(sn, eta * math.sqrt(sn ** 2 * (s ** 2 - sn ** 2) / s ** 2))
    return math.sqrt(sn ** 2 - up ** 2), up


def comfy_cfg_pp(sampler, guided, x, sigmas, *, eta=1.0, s_noise=1.0, noises=None):
    """ComfyUI's CFG++ samplers in x (the variance-exploding latent), written from their formulas: ``guided(x, s)``
    returns (D, D_u), the guided and the unconditional denoised predictions.  ``noises[i]``: step i's unit noise."""
    old_u = None
    for i in range(len(sigmas) - 1):
        s, sn = sigmas[i], sigmas[i + 1]
        d, du = guided(x, s)
        if sampler in ("euler_cfg_pp", "euler_ancestral_cfg_pp"):
            e, sno = (eta, s_noise) if sampler == "euler_ancestral_cfg_pp" else (0.0, 0.0)
            if sn == 0:
                x = d
            else:
                s_down, s_up = _ancestral_step(s, sn, e)
                x = d + s_down * (x - du) / s  # Euler from D along the unconditional direction
                if e > 0 and sno > 0:
                    x = x + noises[i] * sno * s_up
        elif sampler == "dpmpp_2m_cfg_pp":
            h = INF if sn == 0 else math.log(s / sn)
            if old_u is None or sn == 0:
                mix = -math.exp(-h) * du
            else:
                r = math.log(sigmas[i - 1] / s) / h  # h_last / h
                mix = -math.exp(-h) * du - math.expm1(-h) * (1.0 / (2.0 * r)) * (d - old_u)
            x = d + mix + math.exp(-h) * x
            old_u = du
        else:  # dpmpp_2s_ancestral_cfg_pp
            s_down, s_up = _ancestral_step(s, sn, eta)
            vector = d - du
            if s_down == 0:
                x = x + (x - du) / s * (s_down - s)
            else:
                t, t_next = -math.log(s), -math.log(s_down)
                h = t_next - t
                s_mid = math.exp(-(t + 0.5 * h))
                x2 = (s_mid / s) * x - math.expm1(-0.5 * h) * du
                _, du2 = guided(x2, s_mid)
                x = (s_down / s) * x - math.expm1(-h) * du2
            if sn > 0:
                x = x + noises[i] * s_noise * s_up
            x = x + vector
    return x


def denoisers(w):
    """(guided(x, s) -> (D, D_u), the conditional and unconditional denoisers) of a smooth nonlinear toy model."""
    def dc(x, s):
        return torch.tanh(0.5 * x / math.sqrt(1.0 + s * s)) * (1.0 + 0.2 * math.cos(s)) + 0.1

    def du(x, s):
        return 0.7 * torch.tanh(0.3 * x / math.sqrt(1.0 + s * s)) - 0.05 * math.sin(s)

    def guided(x, s):
        u = du(x, s)
        return u + w * (dc(x, s) - u), u
    return dc, du, guided


def raw_model(pz, dc, du):
    """``model(y, sigma) -> (F_c, F_u)``: the raw outputs (for ``pz``) whose denoised predictions are dc, du."""
    def model(y, sigma):
        s = float(sigma[0])
        p, q = pz.denoise_coeffs(s)
        x = y.double() / pz.c_in(s)
        return tuple(((f(x, s) - p * y.double()) / q).to(y.dtype) for f in (dc, du))
    return model


def _noises(sigmas, shape, seed=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype) for _ in sigmas[:-1]]


def _sampler_of(noises, sigmas):
    by_next = {sigmas[i + 1]: z for i, z in enumerate(noises)}
    return lambda sigma, sigma_next: by_next[float(sigma_next)]


SHAPE = (2, 3, 5, 4)
SIGMAS = zk.schedules.karras(9, 0.03, 14.6).tolist()


@pytest.mark.parametrize("prediction", ["v", "eps", "x0", "flow"])
@pytest.mark.parametrize("sampler", CFG_PP)
def test_float64_equals_comfyui_formulas(sampler, prediction):
    pz = parameterization(prediction, 1.0)
    w = 4.5
    dc, du, guided = denoisers(w)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noises = _noises(SIGMAS, SHAPE)
    kw = dict(eta=0.8, s_noise=0.9) if sampler in STOCHASTIC else {}
    ours = zk.sample(raw_model(pz, dc, du), noise, torch.tensor(SIGMAS, dtype=torch.float64), sampler=sampler,
                     prediction=prediction, guidance_scale=w, noise_sampler=_sampler_of(noises, SIGMAS), **kw)
    x0 = pz.to_x(noise * pz.noise_scale(SIGMAS[0]), SIGMAS[0])  # x = sigma_0 noise
    want = comfy_cfg_pp(sampler, guided, x0, SIGMAS, noises=noises, **kw)
    torch.testing.assert_close(ours, want, rtol=1e-12, atol=1e-12)
    plain = comfy_cfg_pp(sampler, denoisers(1.0)[2], x0, SIGMAS, noises=noises, **kw)
    assert (ours - plain).abs().max() > 1e-2  # the guidance matters: the test is not vacuous


@needs_cpu
@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("sampler", CFG_PP)
def test_float32_run_equals_comfyui_formulas(sampler, backend):
    """A float32 run (the kernels' precision) against the float64 formulas: float32 rounding of the run, the bound
    tools/tolerances.py sets for two backends' runs (RUN_ULPS), at the run's scale."""
    pz = parameterization("v", 1.0)
    w = 4.5
    dc, du, guided = denoisers(w)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noises = _noises(SIGMAS, SHAPE)
    kw = dict(eta=1.0, s_noise=1.0) if sampler in STOCHASTIC else {}
    ours = zk.sample(raw_model(pz, dc, du), noise.float(), torch.tensor(SIGMAS, dtype=torch.float64),
                     sampler=sampler, guidance_scale=w, backend=backend,
                     noise_sampler=_sampler_of([z.float() for z in noises], SIGMAS), **kw)
    want = comfy_cfg_pp(sampler, guided, noise * SIGMAS[0], SIGMAS, noises=noises, **kw)
    scale = max(1.0, want.abs().max().item())
    assert (ours.double() - want).abs().max().item() <= tolerances.RUN_ULPS[torch.float32] * tolerances.F32_EPS * scale


# ----------------------------------------------------------------------------------- coefficient identities


PAIRS = [(14.6, 9.0), (3.0, 1.2), (1.0, 0.03), (0.5, 0.0), (INF, 14.6), (INF, 0.5), (1e28, 1e27), (2.0, 1e-29)]


@pytest.mark.parametrize("prediction", ["v", "eps", "x0", "flow"])
@pytest.mark.parametrize("sampler", CFG_PP)
def test_coefficients_split_the_plain_denoised_weight(sampler, prediction):
    """b + b_u is the plain sampler's D weight and every other coefficient is the plain one's (so D_u = D gives the
    plain sampler), and D_u has weight 0 from sigma = inf and to sigma' = 0."""
    pz = parameterization(prediction, 0.5)
    plain = PLAIN[sampler]
    for sigma, sn in PAIRS:
        if prediction == "eps" and sigma == INF:
            continue
        for eta in ((0.0, 0.5, 1.0) if sampler in STOCHASTIC else (1.0,)):
            prev = () if sigma == INF else (sigma * 3.0,)
            stages = (1, 2) if sampler == "dpmpp_2s_ancestral_cfg_pp" else (1,)
            for stage in stages:
                a = co.StepArgs(sampler, sigma, sn, stage=stage, sigma_prev=prev if "2m" in sampler else (),
                                eta=eta, s_noise=0.7)
                c1 = co.step_coeffs(pz, a._replace(stage=1))
                if stage == 2 and c1.complete:
                    continue
                c = co.step_coeffs(pz, a)
                p = co.step_coeffs(pz, a._replace(sampler=plain))
                assert math.isfinite(c.a) and math.isfinite(c.b) and math.isfinite(c.b_u), (sigma, sn, c)
                assert c.complete == p.complete and c.sigma_out == p.sigma_out
                assert c.a == pytest.approx(p.a, rel=1e-14, abs=1e-300) and c.e == pytest.approx(p.e, rel=1e-14)
                assert c.b + c.b_u == pytest.approx(p.b, rel=1e-12, abs=1e-12 * abs(c.b))
                if stage == 2:  # D_1 and D_u1 weights add up to the plain D_1 weight
                    assert sum(c.h) == pytest.approx(sum(p.h), rel=1e-12, abs=1e-12 * abs(c.h[0]))
                else:
                    assert c.h == pytest.approx(p.h, rel=1e-14)
                if (sigma == INF or sn == 0.0) and stage == 1:  # (2s at eta = 1 keeps D_u2 from inf: its stage 2)
                    assert c.b_u == 0.0 or not c.complete, (sigma, sn, c)


# ------------------------------------------------------------------------------------ the limit w -> 1, rescale


def _pair(seed, shape=SHAPE, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(5)]


def run_step(sampler, y, out, sigma, sn, *, history=None, eta=1.0, first=None, noise=None, seed=None, **kw):
    """One step of ``sampler`` (both calls of a two-stage one when ``first`` is "both"): the StepResult."""
    extra = {}
    if sampler in STOCHASTIC or sampler in ("euler_ancestral", "dpmpp_2s_ancestral"):
        extra = dict(eta=eta, noise=noise, seed=seed, step_index=None if seed is None else 3)
    if "2m" in sampler and history is not None:
        extra["history"] = history
    fn = zk.steps.step_function(sampler)
    r = fn(y, out(y, sigma) if callable(out) else out, sigma, sn, **extra, **kw)
    if not r.complete:
        r = fn(r.y, out(r.y, r.sigma) if callable(out) else out, sigma, sn, first=r, **extra, **kw)
    return r


def _outputs(seed=7):
    """A model output pair depending on y (so a second stage sees a new one)."""
    g = torch.Generator().manual_seed(seed)
    a, b = (torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(2))

    def out(y, sigma):
        yy = y.double()
        return ((0.6 * yy + 0.3 * a).to(y.dtype), (0.4 * yy - 0.2 * b).to(y.dtype))
    return out


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_cpu)])
@pytest.mark.parametrize("sampler", CFG_PP)
def test_unguided_and_w_equal_1_are_the_plain_sampler(sampler, backend):
    y, _, _, z, hist = _pair(1)
    out = _outputs()
    single = lambda yy, s: out(yy, s)[0]  # noqa: E731
    for sigma, sn in [(3.0, 1.2), (INF, 2.0), (0.7, 0.0)]:
        history = [(sigma * 2.5 if sigma != INF else 9.0, hist)] if sigma != INF else None
        kw = dict(backend=backend, history=history, noise=z)
        got = run_step(sampler, y, single, sigma, sn, **kw)
        want = run_step(PLAIN[sampler], y, single, sigma, sn, **kw)
        torch.testing.assert_close(got.y, want.y, rtol=2e-6, atol=2e-6)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a pair at w = 1 (F_c alone) warns
            got = run_step(sampler, y, out, sigma, sn, guidance_scale=1.0, **kw)
            want = run_step(PLAIN[sampler], y, out, sigma, sn, guidance_scale=1.0, **kw)
        torch.testing.assert_close(got.y, want.y, rtol=2e-6, atol=2e-6)
        if sampler == "dpmpp_2m_cfg_pp":  # D_u = D is what it remembers
            torch.testing.assert_close(got.derivative, want.denoised, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_cpu)])
@pytest.mark.parametrize("sampler", CFG_PP)
def test_equal_outputs_are_the_plain_guided_sampler_with_rescale(sampler, backend):
    """F_u = F_c: D_u = D whatever w and the rescale (whose factor is then 1): the plain sampler."""
    y, fc, _, z, hist = _pair(2)
    history = [(6.0, hist)]
    got = run_step(sampler, y, (fc, fc.clone()), 3.0, 1.2, history=history, noise=z, backend=backend,
                   guidance_scale=6.0, guidance_rescale=0.7, rescale_space="v")
    want = run_step(PLAIN[sampler], y, (fc, fc.clone()), 3.0, 1.2, history=history, noise=z, backend=backend,
                    guidance_scale=6.0, guidance_rescale=0.7, rescale_space="v")
    torch.testing.assert_close(got.y, want.y, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("space", ["output", "v", "x0"])
def test_rescale_acts_on_the_guided_prediction_only(space):
    """euler_cfg_pp with guidance rescale against its formula written here: D from the rescaled guided F (Lin et
    al.: f = phi std(G_c)/std(G) + 1 - phi, G in ``space``), D_u from the raw unconditional output."""
    pz = parameterization("v", 1.0)
    y, fc, fu, _, _ = _pair(3, dtype=torch.float64)
    sigma, sn, w, phi = 3.0, 1.2, 5.0, 0.7
    got = zk.euler_cfg_pp_step(y, (fc, fu), sigma, sn, guidance_scale=w, guidance_rescale=phi, rescale_space=space,
                               backend="torch")
    p, q = pz.denoise_coeffs(sigma)
    f = fu + w * (fc - fu)
    cv = 1.0 / math.sqrt(sigma * sigma + 1.0)
    if space == "output":
        gc, g = fc, f
    elif space == "x0":
        gc, g = p * y + q * fc, p * y + q * f
    else:  # the v space of a v model is its own output
        gc, g = fc, f
    dims = tuple(range(1, y.ndim))
    fac = (phi * gc.std(dim=dims, correction=0) / g.std(dim=dims, correction=0) + 1.0 - phi).reshape(-1, 1, 1, 1)
    if space == "x0":
        d = fac * (p * y + q * f)
    else:
        d = p * y + q * (fac * f)
    du = p * y + q * fu
    x = y / cv
    x_next = d + sn * (x - du) / sigma
    want = x_next * pz.c_in(sn)
    torch.testing.assert_close(got.y, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.denoised, d, rtol=1e-12, atol=1e-12)
    unscaled = zk.euler_cfg_pp_step(y, (fc, fu), sigma, sn, guidance_scale=w, backend="torch")
    assert (unscaled.y - got.y).abs().max() > 1e-3


# -------------------------------------------------------------------------------------- backends per step

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GUIDANCE = {"cfg": dict(guidance_scale=5.0), "rescale_v": dict(guidance_scale=5.0, guidance_rescale=0.7,
                                                                rescale_space="v"),
            "rescale_x0": dict(guidance_scale=3.0, guidance_rescale=0.5, rescale_space="x0"),
            "w1": dict(guidance_scale=1.0), "single": {}}
# (sampler, sigma, sigma_next, eta, with history) of the per-step cases
STEP_CASES = [("euler_cfg_pp", 3.0, 1.2, 1.0, False), ("euler_cfg_pp", INF, 2.0, 1.0, False),
              ("euler_ancestral_cfg_pp", 3.0, 1.2, 1.0, False), ("euler_ancestral_cfg_pp", 2.0, 0.0, 1.0, False),
              ("euler_ancestral_cfg_pp", INF, 2.0, 0.5, False),
              ("dpmpp_2m_cfg_pp", 3.0, 1.2, 1.0, True), ("dpmpp_2m_cfg_pp", 3.0, 1.2, 1.0, False),
              ("dpmpp_2m_cfg_pp", 1.2, 0.0, 1.0, True),
              ("dpmpp_2s_ancestral_cfg_pp", 3.0, 1.2, 1.0, False), ("dpmpp_2s_ancestral_cfg_pp", 3.0, 1.2, 0.6, False),
              ("dpmpp_2s_ancestral_cfg_pp", INF, 2.0, 1.0, False)]


def _inputs(case, guidance, dtype):
    """(step function, y, model output, options, second-stage output) of a case, in ``dtype``."""
    sampler, sigma, sn, eta, with_hist = case
    y, fc, fu, z, hist = (t.to(dtype) for t in _pair(11))
    g2 = torch.Generator().manual_seed(12)
    fc2, fu2 = (torch.randn(SHAPE, generator=g2, dtype=torch.float64).to(dtype) for _ in range(2))
    out, out2 = (fc, fc2) if guidance == "single" else ((fc, fu), (fc2, fu2))
    extra = dict(GUIDANCE[guidance])
    if sampler in STOCHASTIC:
        extra.update(eta=eta, noise=z)
    if with_hist:
        extra["history"] = [(sigma * 2.5, hist)]
    return zk.steps.step_function(sampler), y, out, extra, out2


def _up(v):
    if isinstance(v, torch.Tensor):
        return v.double()
    if isinstance(v, tuple):
        return tuple(_up(t) for t in v)
    if isinstance(v, list):
        return [(s, t.double()) for s, t in v]
    return v


def step_outputs(case, guidance, dtype, backend, reference=False):
    """The outputs of one case on ``backend`` from its inputs in ``dtype`` (``reference``: the float64 torch step of
    those inputs).  A two-stage step's second call starts from the float64 reference's first stage rounded to
    ``dtype``, so every backend's second stage sees the same inputs: its outputs are y2 and denoised2."""
    _, sigma, sn, _, _ = case
    fn, y, out, extra, out2 = _inputs(case, guidance, dtype)
    up = _up if reference else (lambda v: v)
    kw = {k: up(v) for k, v in extra.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a pair at w = 1 warns
        r = fn(up(y), up(out), sigma, sn, backend="torch" if reference else backend, **kw)
        res = {"y": r.y, "denoised": r.denoised}
        if r.derivative is not None:
            res["derivative"] = r.derivative
        if not r.complete:
            ref = fn(_up(y), _up(out), sigma, sn, backend="torch", **{k: _up(v) for k, v in extra.items()})
            first = zk.StepResult(up(ref.y.to(dtype)), ref.sigma, up(ref.denoised.to(dtype)), False,
                                  up(ref.derivative.to(dtype)))
            r2 = fn(first.y, up(out2), sigma, sn, first=first, backend="torch" if reference else backend, **kw)
            res.update({"y2": r2.y, "denoised2": r2.denoised})
    return res


def _compare(got, ref64, torch_lp, what):
    assert set(got) == set(ref64), what
    for k in ref64:
        e = tolerances.step_error(got[k], ref64[k], None if got[k].dtype == torch.float32 else torch_lp[k])
        assert e.used <= 1.0, f"{what} {k}: error {e.err:.3g} (used {e.used:.3g}, torch {e.torch_err})"


def _reference(case, guidance, dtype):
    """The float64 reference of the case's inputs rounded to ``dtype``."""
    return step_outputs(case, guidance, dtype, "torch", reference=True)


CASE_IDS = [f"{c[0]}-{c[1]}-{c[2]}-eta{c[3]}{'-hist' if c[4] else ''}" for c in STEP_CASES]
@pytest.mark.parametrize("guidance", list(GUIDANCE))
@pytest.mark.parametrize("case", STEP_CASES, ids=CASE_IDS)
def test_cpu_each_isa_and_torch_match_float64_reference(case, guidance, isa_level):
    for dtype in DTYPES:
        ref64 = _reference(case, guidance, dtype)
        torch_lp = step_outputs(case, guidance, dtype, "torch")
        _compare(torch_lp, ref64, torch_lp, f"torch {dtype}")
        _compare(step_outputs(case, guidance, dtype, "cpu"), ref64, torch_lp, f"cpu isa {isa_level} {dtype}")


TRITON_CHILD = textwrap.dedent(
    """
    import sys, importlib.util, torch
    spec = importlib.util.spec_from_file_location("cfgpp", sys.argv[1])
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    out = {}
    for i, case in enumerate(m.STEP_CASES):
        for guidance in m.GUIDANCE:
            for dtype in m.DTYPES:
                out[(i, guidance, str(dtype))] = m.step_outputs(case, guidance, dtype, "triton")
    torch.save(out, sys.argv[2])
    """)


def test_triton_interpreter_matches_float64_reference(tmp_path):
    pytest.importorskip("triton")
    path = tmp_path / "triton.pt"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", TRITON_CHILD, __file__, str(path)], env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = torch.load(path)
    for i, case in enumerate(STEP_CASES):
        for guidance in GUIDANCE:
            for dtype in DTYPES:
                ref64 = _reference(case, guidance, dtype)
                torch_lp = step_outputs(case, guidance, dtype, "torch")
                _compare(got[(i, guidance, str(dtype))], ref64, torch_lp, f"triton {CASE_IDS[i]} {guidance} {dtype}")


# ------------------------------------------------------------------------------- batch, and sigma = inf


@needs_cpu
@pytest.mark.parametrize("sampler", CFG_PP)
def test_batch_of_8_equals_8_batches_of_1(sampler):
    pz = parameterization("v", 1.0)
    _, _, model = _model_at_inf(pz, 4.0)

    def model32(y, sigma):
        return tuple(t.float() for t in model(y.double(), sigma))
    noise = torch.randn(8, 3, 6, 5, generator=torch.Generator().manual_seed(4))
    sigmas = [INF] + zk.schedules.karras(6, 0.05, 14.6).tolist()
    kw = dict(sampler=sampler, guidance_scale=4.0, guidance_rescale=0.5, backend="cpu")
    if sampler in STOCHASTIC:
        kw["eta"] = 0.9
    batch = zk.sample(model32, noise, sigmas, seed=100, **kw)
    for i in range(8):
        one = zk.sample(model32, noise[i:i + 1], sigmas, seed=100 + i, **kw)
        assert torch.equal(one[0], batch[i]), i


def _model_at_inf(pz, w):
    """A v-model whose denoisers are functions of the model input y (finite at sigma = inf)."""
    def dc_y(y, s):
        g = 1.0 / (1.0 + 0.1 * math.atan(s))
        return torch.tanh(0.5 * y + 0.1) * g + 0.05

    def du_y(y, s):
        return 0.7 * torch.tanh(0.3 * y) - 0.05 * math.atan(s)

    def model(y, sigma):
        s = float(sigma[0])
        p, q = pz.denoise_coeffs(s)
        return tuple((f(y, s) - p * y) / q for f in (dc_y, du_y))
    return dc_y, du_y, model


@pytest.mark.parametrize("sampler", CFG_PP)
def test_step_from_inf_is_finite_and_its_documented_limit(sampler):
    pz = parameterization("v", 1.0)
    w, sn = 4.0, 2.0
    dc_y, du_y, model = _model_at_inf(pz, w)
    y, _, _, z, _ = _pair(5, dtype=torch.float64)
    c_next, s_next = pz.c_in(sn), pz.noise_scale(sn)
    for eta in ((0.5, 1.0) if sampler in STOCHASTIC else (1.0,)):
        got = run_step(sampler, y, lambda yy, s: model(yy, torch.tensor([s])), INF, sn, eta=eta, noise=z,
                       guidance_scale=w, backend="torch")
        assert torch.isfinite(got.y).all()
        f_c, f_u = model(y, torch.tensor([INF]))
        d1 = dc_y(y, INF)
        d1 = du_y(y, INF) + w * (d1 - du_y(y, INF))
        if sampler == "dpmpp_2s_ancestral_cfg_pp" and eta == 1.0:
            # predictor y_2 = s' y + c' D_u1 to sigma', then y' = c'(D_1 - D_u1 + D_u2) + s' z
            du1 = du_y(y, INF)
            y2 = s_next * y + c_next * du1
            want = c_next * (d1 - du1 + du_y(y2, sn)) + s_next * z
        else:  # the plain sampler's step from inf: D_u unread
            want = run_step(PLAIN[sampler], y, (f_c, f_u), INF, sn, eta=eta, noise=z, guidance_scale=w,
                            backend="torch").y
            d, u = co.ancestral_split(INF, sn, eta if sampler in STOCHASTIC else 0.0)
            torch.testing.assert_close(want, s_next * d * y + c_next * d1 + s_next * u * z, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(got.y, want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("sampler,eta", [("euler_cfg_pp", 1.0), ("euler_ancestral_cfg_pp", 1.0),
                                         ("euler_ancestral_cfg_pp", 0.5), ("dpmpp_2m_cfg_pp", 1.0),
                                         ("dpmpp_2s_ancestral_cfg_pp", 1.0), ("dpmpp_2s_ancestral_cfg_pp", 0.5)])
def test_run_from_inf_is_the_limit_of_large_sigma_max(sampler, eta):
    """A run from sigma = inf equals the limit of runs from the same unit noise at sigma_max = 1e4, 1e8, 1e16: the
    difference shrinks monotonically (like 1/sigma_max, 1/log(sigma_max) for the multistep one)."""
    pz = parameterization("v", 1.0)
    _, _, model = _model_at_inf(pz, 4.0)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    rest = zk.schedules.karras(7, 0.05, 14.6).tolist()
    noises = _noises([0.0] + rest, SHAPE, seed=8)
    kw = dict(sampler=sampler, guidance_scale=4.0, backend="torch",
              noise_sampler=_sampler_of(noises, [0.0] + rest))
    if sampler in STOCHASTIC:
        kw["eta"] = eta
    at_inf = zk.sample(model, noise, [INF] + rest, **kw)
    assert torch.isfinite(at_inf).all()
    diffs = [(zk.sample(model, noise, [smax] + rest, **kw) - at_inf).abs().max().item() for smax in (1e4, 1e8, 1e16)]
    assert diffs[0] > diffs[1] > diffs[2], diffs
    assert diffs[2] < (0.2 if sampler == "dpmpp_2m_cfg_pp" else 1e-9), diffs


def test_second_stage_needs_the_first_stage_carry():
    y, fc, fu, _, _ = _pair(9)
    r = zk.dpmpp_2s_ancestral_cfg_pp_step(y, (fc, fu), 3.0, 1.2, guidance_scale=4.0, noise=torch.zeros_like(y),
                                          backend="torch")
    assert not r.complete and r.derivative is not None
    bad = r._replace(derivative=None)
    with pytest.raises(TypeError, match="first.derivative"):
        zk.dpmpp_2s_ancestral_cfg_pp_step(bad.y, (fc, fu), 3.0, 1.2, first=bad, guidance_scale=4.0,
                                          noise=torch.zeros_like(y), backend="torch")


@pytest.mark.parametrize("sampler", CFG_PP)
def test_sample_runs_every_backend_alike(sampler):
    """sample(sampler=...) on torch and cpu (float32, guided with rescale, from inf) agree to float32 rounding."""
    pz = parameterization("v", 1.0)
    _, _, model = _model_at_inf(pz, 3.0)

    def model32(y, sigma):
        return tuple(t.float() for t in model(y.double(), sigma))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    sigmas = [INF] + zk.schedules.karras(6, 0.05, 14.6).tolist()
    kw = dict(sampler=sampler, guidance_scale=3.0, guidance_rescale=0.7, seed=5)
    runs = {b: zk.sample(model32, noise, sigmas, backend=b, **kw) for b in ("torch", "cpu") if b == "torch"
            or _ext.available()}
    for b, x in runs.items():
        assert torch.isfinite(x).all(), b
        scale = max(1.0, runs["torch"].abs().max().item())
        assert (x - runs["torch"]).abs().max().item() <= tolerances.RUN_ULPS[torch.float32] * tolerances.F32_EPS * scale


@pytest.mark.parametrize("w", [5.0, 1.0])
@pytest.mark.parametrize("sampler", ["dpmpp_2m_cfg_pp", "euler_ancestral_cfg_pp"])
def test_reference_spec_form_equals_the_folded_form(sampler, w):
    """reference.fused_step's spec form (b_u D_u with D_u = p y + q F_u, carry_u D_u) equals the form the backends
    run (b_u p folded into a, b_u q on F_u: table.fold_uncond) in float64, with the rescale on D only."""
    from zsnr_kernels import reference
    from zsnr_kernels.backends import table

    pz = parameterization("v", 1.0)
    y, fc, fu, z, hist = _pair(13, dtype=torch.float64)
    sigma, sn = 3.0, 1.2
    c = co.step_coeffs(pz, co.StepArgs(sampler, sigma, sn, sigma_prev=(7.0,) if "2m" in sampler else ()))
    p, q = pz.denoise_coeffs(sigma)
    common = dict(p=p, q=q, history=(hist,)[:len(c.h)], h=c.h, noise=z, e=c.e, guidance_scale=w,
                  guidance_rescale=0.7, rescale_uv=(0.0, 1.0))
    spec = reference.fused_step(y, fc, fu, a=c.a, b=c.b, carry=c.carry, b_u=c.b_u, carry_u=c.carry_u, **common)
    a, b, u_f, g_y, g_d, g_f = table.fold_uncond(c, p, q, w != 1.0)
    folded = reference.fused_step(y, fc, fu, a=a, b=b, carry=None if c.carry is None else (g_y, g_d), u_f=u_f,
                                  g_f=g_f, **common)
    for s_, f_ in zip(spec, folded):
        if s_ is not None:
            torch.testing.assert_close(f_, s_, rtol=1e-12, atol=1e-12)
