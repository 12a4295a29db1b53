"""``zsnr_kernels.k_diffusion`` against k-diffusion itself (the oracle, loaded by ``tests/_kdiffusion.py``).

Finite schedules: the same model object, sigmas, extra_args and noise must give k-diffusion's result, callbacks,
model calls, noise-sampler calls and global generator state.  Zero terminal SNR (sigmas[0] = inf): k-diffusion
returns NaN; the drop-in calls the network inside the v-prediction wrapper and equals :func:`zsnr_kernels.sample`
on that network, and runs from a growing finite sigma_max converge to it.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from conftest import TinyNet

import zsnr_kernels as zk
from zsnr_kernels import k_diffusion as K

INF = math.inf
ALL = ["euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m",
       "dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_sde", "lms"]
NOISY = ["euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_sde"]
CHURN = ["euler", "heun", "dpm_2"]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}  # max abs difference, relative to the tensor's scale if > 1
SHAPE = (2, 4, 9, 11)


class Inner:
    """The network inside k-diffusion's wrapper: TinyNet(y + 0.1 cond, t), recording the t of every call."""

    def __init__(self, alphas_cumprod=None):
        self.net = TinyNet(4, seed=1)
        self.ts: list[torch.Tensor] = []
        self.alphas_cumprod = alphas_cumprod  # for CompVisVDenoiser, which reads it from the model

    def __call__(self, y, t, cond):
        self.ts.append(t)
        return self.net(y + 0.1 * cond, t)

    def apply_model(self, y, t, cond):  # CompVisVDenoiser's entry point
        return self(y, t, cond)


class Stream:
    """An explicit noise_sampler: fixed tensors in order, recording the sigmas of every call."""

    def __init__(self, zs):
        self.zs, self.calls = iter(zs), []

    def __call__(self, sigma, sigma_next):
        self.calls.append((float(sigma), float(sigma_next)))
        return next(self.zs)


def _streams(like, count=64):
    g = torch.Generator().manual_seed(1234)
    zs = [torch.randn(like.shape, generator=g, dtype=like.dtype) for _ in range(count)]
    return Stream(zs), Stream(list(zs))


def _alphas_cumprod(zero_snr: bool):
    b = zk.schedules.betas("scaled_linear")
    return zk.schedules.alphas_cumprod(zk.schedules.rescale_zero_terminal_snr(b) if zero_snr else b)


def _wrapper(external, kind: str, zero_snr: bool = False, quantize: bool = False):
    ac = _alphas_cumprod(zero_snr)
    if kind == "discrete":
        inner = Inner()
        return external.DiscreteVDDPMDenoiser(inner, ac, quantize=quantize), inner
    if kind == "compvis":
        inner = Inner(ac)
        return external.CompVisVDenoiser(inner, quantize=quantize), inner
    inner = Inner()
    return external.VDenoiser(inner), inner


def _noise(dtype=torch.float64):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=dtype)


def _cond(dtype=torch.float64):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _close(got, expected, dtype, what=""):
    assert got.dtype == expected.dtype and got.shape == expected.shape, what
    scale = max(1.0, expected.abs().max().item())
    err = (got - expected).abs().max().item()
    assert err <= TOL[dtype] * scale, f"{what}: max abs diff {err:.3g} (scale {scale:.3g})"


def _same_reports(ours, theirs, dtype):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.keys() == b.keys() and a["i"] == b["i"]
        for k in ("sigma", "sigma_hat"):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (k, a[k], b[k])
        _close(a["x"], b["x"], dtype, f"callback x at step {a['i']}")
        _close(a["denoised"], b["denoised"], dtype, f"callback denoised at step {a['i']}")


def _run_both(kdiff, sampler, model, inner, x, sigmas, noise_samplers=(None, None), seed=None, **kw):
    """(result, callback reports, t of every model call) of k-diffusion, then of the drop-in, each run with its
    own noise sampler (if any) and from the same global seed (if given)."""
    sampling, _ = kdiff
    out = []
    for fn, ns in zip((getattr(sampling, f"sample_{sampler}"), getattr(K, f"sample_{sampler}")), noise_samplers):
        reports = []
        inner.ts.clear()
        if ns is not None:
            kw["noise_sampler"] = ns
        if seed is not None:
            torch.manual_seed(seed)
        res = fn(model, x, sigmas, callback=reports.append, disable=True, **kw)
        out.append((res, reports, [t.double() for t in inner.ts]))
    return out


# --------------------------------------------------------------------------------------------- finite sigmas


def test_signatures_are_k_diffusions(kdiff):
    sampling, _ = kdiff
    names = [f"sample_{s}" for s in ALL] + [
        "append_zero", "get_sigmas_karras", "get_sigmas_exponential", "get_sigmas_polyexponential", "get_sigmas_vp",
        "to_d", "get_ancestral_step", "default_noise_sampler", "BrownianTreeNoiseSampler"]

    def params(f):
        return [(p.name, p.kind, "<callable>" if callable(p.default) else p.default)
                for p in inspect.signature(f).parameters.values()]

    for name in names:
        assert params(getattr(K, name)) == params(getattr(sampling, name)), name
    assert K.sampling is K and K.sampling.sample_euler is K.sample_euler
    # what this module does not rewrite is k-diffusion's own, so front ends listing samplers keep them
    for name in ("sample_dpm_fast", "sample_dpm_adaptive", "DPMSolver"):
        assert getattr(K.sampling, name) is getattr(sampling, name)
    assert not hasattr(K, "sample_no_such_sampler") and not hasattr(K, "__no_such_dunder__")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("schedule", ["sd_discrete", "karras"])
@pytest.mark.parametrize("sampler", ALL)
def test_matches_k_diffusion(kdiff, sampler, schedule, dtype):
    """Result, callback dicts and the sigmas (as t) of every model call; explicit noise, called the same way."""
    sampling, external = kdiff
    model, inner = _wrapper(external, "discrete" if schedule == "sd_discrete" else "v")
    sigmas = (model.get_sigmas(12) if schedule == "sd_discrete" else sampling.get_sigmas_karras(12, 0.03, 14.6))
    sigmas = sigmas.to(dtype)
    x = _noise(dtype) * sigmas[0]
    kw = {"extra_args": {"cond": _cond(dtype)}}
    if sampler == "dpmpp_2m_sde":
        kw["solver_type"] = "heun" if schedule == "karras" else "midpoint"
    streams = _streams(x) if sampler in NOISY else (None, None)
    (theirs, their_reports, their_ts), (ours, our_reports, our_ts) = _run_both(
        kdiff, sampler, model, inner, x, sigmas, streams, **kw)
    _close(ours, theirs, dtype, "result")
    _same_reports(our_reports, their_reports, dtype)
    assert len(our_ts) == len(their_ts)
    torch.testing.assert_close(torch.stack(our_ts), torch.stack(their_ts), rtol=1e-6, atol=1e-6)
    if sampler in NOISY:
        assert streams[0].calls == streams[1].calls and streams[0].calls


@pytest.mark.parametrize("sampler,kw", [
    ("euler_ancestral", {}), ("euler_ancestral", {"eta": 0.0}), ("dpm_2_ancestral", {}),
    ("dpm_2_ancestral", {"eta": 1.5}), ("dpmpp_2s_ancestral", {"s_noise": 0.0}), ("dpmpp_2m_sde", {}),
    ("dpmpp_2m_sde", {"eta": 0.0}), ("dpmpp_2m_sde", {"s_noise": 0.0}), ("dpmpp_3m_sde", {"eta": 0.5}),
    ("dpmpp_sde", {}), ("dpmpp_sde", {"eta": 0.0}), ("dpmpp_sde", {"eta": 0.5, "s_noise": 0.9}),
])
def test_default_noise_matches_k_diffusion(kdiff, sampler, kw):
    """No noise_sampler: k-diffusion's randn_like(x) / Brownian tree from torch's global generator.  Same seed,
    same result, and the generator ends in the same state (k-diffusion also draws noise it then multiplies by 0:
    eta = 0, s_noise = 0, and dpm_2_ancestral's eta = 1.5 steps whose sigma_down is 0 draw none)."""
    sampling, external = kdiff
    model, _ = _wrapper(external, "v")
    sigmas = sampling.get_sigmas_karras(10, 0.03, 14.6, device="cpu").double()
    x = _noise() * sigmas[0]
    after = []
    for fn in (getattr(sampling, f"sample_{sampler}"), getattr(K, f"sample_{sampler}")):
        torch.manual_seed(7)
        after.append((fn(model, x, sigmas, extra_args={"cond": _cond()}, disable=True, **kw), torch.randn(4)))
    (theirs, their_next), (ours, our_next) = after
    _close(ours, theirs, torch.float64, "result")
    assert torch.equal(our_next, their_next), "the global generator ends in a different state"


@pytest.mark.parametrize("sampler", ALL)
def test_a_callback_editing_denoised_steers_where_k_diffusions_does(kdiff, sampler):
    """k-diffusion's euler, heun, dpm_2 and lms form d before calling back, so editing ``denoised`` in place
    changes nothing there; the other samplers' updates read the edited tensor."""
    sampling, _ = kdiff
    sigmas = sampling.get_sigmas_karras(6, 0.03, 14.6).double()
    x = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * sigmas[0]

    def model(x, sigma, **kw):
        return x * 0.5 / (sigma[:, None, None, None] ** 2 + 1)

    def halve(d):
        d["denoised"].mul_(0.5)

    results = []
    for fn in (getattr(sampling, f"sample_{sampler}"), getattr(K, f"sample_{sampler}")):
        torch.manual_seed(0)
        results.append(fn(model, x, sigmas, disable=True, callback=halve))
    torch.manual_seed(0)
    unedited = getattr(K, f"sample_{sampler}")(model, x, sigmas, disable=True)
    assert (results[1] - results[0]).abs().max().item() <= 1e-10
    assert ((results[1] - unedited).abs().max().item() > 1e-3) == (sampler not in ("euler", "heun", "dpm_2", "lms"))


def test_a_callback_drawing_random_numbers_keeps_k_diffusions_stream(kdiff):
    """k-diffusion calls back before the next step's churn draw: a callback that uses torch's generator (a preview
    with noise, say) shifts both runs' streams alike."""
    sampling, _ = kdiff
    sigmas = sampling.get_sigmas_karras(6, 0.03, 14.6).double()
    x = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * sigmas[0]

    def model(x, sigma, **kw):
        return x * 0.5 / (sigma[:, None, None, None] ** 2 + 1)

    for sampler in CHURN:
        runs = []
        for fn in (getattr(sampling, f"sample_{sampler}"), getattr(K, f"sample_{sampler}")):
            torch.manual_seed(0)
            runs.append(fn(model, x, sigmas, disable=True, s_churn=1.0, callback=lambda d: torch.randn(4)))
        assert (runs[1] - runs[0]).abs().max().item() <= 1e-10, sampler


def test_forwarding_to_a_broken_k_diffusion_answers_no(monkeypatch):
    """hasattr() on the drop-in must not raise when k-diffusion is installed but fails to import: the whole package
    (a torchvision built for another torch raises RuntimeError) and its sampling module alone (a missing torchsde)."""
    import importlib
    import sys

    def broken(name, *args):
        raise RuntimeError("operator torchvision::nms does not exist")

    for name in ("k_diffusion", "k_diffusion.utils", "k_diffusion.sampling", "k_diffusion.external"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(K, "_k_diffusion_loaded", {})  # as in a fresh process
    monkeypatch.setitem(sys.modules, "torchsde", None)
    monkeypatch.setattr(importlib, "import_module", broken)
    assert not hasattr(K.sampling, "sample_dpm_fast")
    assert "k_diffusion.sampling" not in sys.modules


def test_a_noise_sampler_of_another_dtype_or_a_broadcast_shape_is_taken(kdiff):
    """k-diffusion adds the sampler's tensor to x (promoting, broadcasting); the state keeps x's dtype."""
    sampling, _ = kdiff
    sigmas = sampling.get_sigmas_karras(6, 0.03, 14.6).double()
    x = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(1)) * 14.6
    g = torch.Generator()

    def model(x, sigma, **kw):
        return x * 0.5 / (sigma[:, None, None, None] ** 2 + 1)

    for ns in (lambda a, b: torch.randn(2, 4, 5, 6, dtype=torch.float64, generator=g),
               lambda a, b: torch.randn(1, 4, 5, 6, generator=g)):
        runs = []
        for fn in (sampling.sample_euler_ancestral, K.sample_euler_ancestral):
            g.manual_seed(0)
            runs.append(fn(model, x, sigmas, disable=True, noise_sampler=ns))
        assert runs[1].dtype == x.dtype
        torch.testing.assert_close(runs[1].double(), runs[0].double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [(0.5, 5.0), (0.0, INF)])
@pytest.mark.parametrize("sampler", CHURN)
def test_churn_matches_k_diffusion(kdiff, sampler, window):
    """EDM churn from the global generator.  k-diffusion draws randn_like(x) at the start of every step, used or
    not; the drop-in folds the churn into the previous update and draws the same numbers in the same order.  The
    (0.5, 5) window leaves the first steps and the last ones unchurned."""
    sampling, external = kdiff
    model, inner = _wrapper(external, "v")
    sigmas = sampling.get_sigmas_karras(10, 0.03, 14.6, device="cpu").double()
    x = _noise() * sigmas[0]
    kw = {"extra_args": {"cond": _cond()}, "s_churn": 2.0, "s_tmin": window[0], "s_tmax": window[1],
          "s_noise": 1.003}
    (theirs, their_reports, _), (ours, our_reports, _) = _run_both(kdiff, sampler, model, inner, x, sigmas, seed=7,
                                                                   **kw)
    _close(ours, theirs, torch.float64, "result")
    _same_reports(our_reports, their_reports, torch.float64)
    assert any(r["sigma_hat"] > r["sigma"] for r in our_reports)
    assert any(r["sigma_hat"] == r["sigma"] for r in our_reports) == (window[1] != INF)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "dpmpp_2m_sde"])
def test_schedule_ending_above_zero_matches_k_diffusion(kdiff, sampler):
    """A split schedule (ComfyUI's SplitSigmas, img2img): k-diffusion returns x at the last sigma."""
    _, external = kdiff
    model, inner = _wrapper(external, "discrete")
    sigmas = model.get_sigmas(12)[:7]
    x = _noise() * sigmas[0]
    streams = _streams(x) if sampler in NOISY else (None, None)
    (theirs, _, _), (ours, _, _) = _run_both(kdiff, sampler, model, inner, x, sigmas, streams,
                                             extra_args={"cond": _cond()})
    _close(ours, theirs, torch.float64, "result")


def test_progress_bar_and_disable(kdiff, capsys):
    sampling, external = kdiff
    model, _ = _wrapper(external, "v")
    sigmas = sampling.get_sigmas_karras(5, 0.03, 14.6).double()
    x = _noise() * sigmas[0]
    K.sample_euler(model, x, sigmas, extra_args={"cond": _cond()}, disable=True)
    assert capsys.readouterr().err == ""
    K.sample_euler(model, x, sigmas, extra_args={"cond": _cond()}, disable=False)
    assert "5/5" in capsys.readouterr().err


def _script(K, seed=3):
    """A k-diffusion script, written against the module object ``K`` (``import k_diffusion as K``)."""
    inner = Inner()
    model = K.external.VDenoiser(inner)
    sigmas = K.sampling.get_sigmas_karras(8, 0.03, 14.6, device="cpu")
    cond = torch.ones(1, 4, 1, 1)
    torch.manual_seed(seed)
    images = []
    for sample in (K.sampling.sample_euler_ancestral, K.sampling.sample_dpmpp_2m_sde, K.sampling.sample_heun):
        x = torch.randn(2, 4, 8, 8) * sigmas[0]
        images.append(sample(model, x, sigmas, extra_args={"cond": cond}, disable=True))
    d = K.sampling.to_d(x, sigmas[0], images[-1])
    return images, d, torch.randn(3)


def test_one_line_switch(kdiff):
    """The same script run with k-diffusion's package and with ``zsnr_kernels.k_diffusion``: float32, default noise
    (randn_like and the Brownian tree from one global seed, across three samplers in a row)."""
    import sys

    kd_images, kd_d, kd_next = _script(sys.modules["k_diffusion"])
    images, d, nxt = _script(K)
    for ours, theirs in zip(images, kd_images):
        _close(ours, theirs, torch.float32, "image")
    _close(d, kd_d, torch.float32, "to_d")
    assert torch.equal(nxt, kd_next), "the global generator ends in a different state"
    assert K.external is sys.modules["k_diffusion.external"]


def test_grid_helpers_are_k_diffusions(kdiff):
    sampling, _ = kdiff
    for name, args in [("get_sigmas_karras", (9, 0.03, 14.6)), ("get_sigmas_karras", (9, 0.1, 80.0, 5.0)),
                       ("get_sigmas_exponential", (9, 0.03, 14.6)),
                       ("get_sigmas_polyexponential", (9, 0.03, 14.6, 2.0)),
                       ("get_sigmas_vp", (9,))]:
        ours, theirs = getattr(K, name)(*args), getattr(sampling, name)(*args)
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs), name
    sigma_min, sigma_max = torch.tensor(0.03), torch.tensor(14.6)  # a wrapper's sigma_min/max are 0-d tensors
    assert torch.equal(K.get_sigmas_karras(5, sigma_min, sigma_max),
                       sampling.get_sigmas_karras(5, sigma_min, sigma_max))
    t = torch.tensor([3.0, 2.0])
    assert torch.equal(K.append_zero(t), sampling.append_zero(t))
    x, den = _noise(), _cond()
    assert torch.equal(K.to_d(x, t, den), sampling.to_d(x, t, den))
    for args in [(3.0, 2.0), (3.0, 2.0, 0.5), (3.0, 2.0, 0.0), (torch.tensor(3.0), torch.tensor(2.0), 2.0)]:
        assert K.get_ancestral_step(*args) == sampling.get_ancestral_step(*args)
    draws = []
    for mod in (K, sampling):
        torch.manual_seed(5)
        draws.append(mod.default_noise_sampler(x)(1.0, 0.5))
    assert torch.equal(*draws)


@pytest.mark.parametrize("name", ["karras", "exponential", "polyexponential"])
def test_grid_at_inf_is_refused_with_the_fix(kdiff, name):
    sampling, _ = kdiff
    assert torch.isnan(getattr(sampling, f"get_sigmas_{name}")(5, 0.03, INF)).any()  # k-diffusion: NaN
    with pytest.raises(ValueError, match=f"get_sigmas_zero_snr\\(model, n, spacing='{name}'\\)"):
        getattr(K, f"get_sigmas_{name}")(5, 0.03, torch.tensor(INF))


def test_brownian_tree_noise_sampler_is_k_diffusions_and_defined_at_inf(kdiff):
    sampling, _ = kdiff
    x = torch.zeros(3, 2, 16, 16, dtype=torch.float64)
    queries = [(14.6, 7.0), (7.0, 3.5), (0.5, 0.03), (0.03, 14.6)]
    for seed in (5, [5, 6, 7]):
        ours = K.BrownianTreeNoiseSampler(x, 0.03, 14.6, seed=seed)
        theirs = sampling.BrownianTreeNoiseSampler(x, 0.03, 14.6, seed=seed)
        for q in queries:
            a, b = ours(*map(torch.tensor, q)), theirs(*map(torch.tensor, q))
            assert a.shape == x.shape and torch.equal(a, b), (seed, q)
    batched = K.BrownianTreeNoiseSampler(x, 0.03, 14.6, seed=[5, 6, 7])
    z = batched(torch.tensor(INF), torch.tensor(14.6))
    assert z.shape == x.shape and z.dtype == x.dtype
    assert torch.equal(z, batched(INF, 7.0))  # one seed, one number per element
    assert torch.equal(z[0], K.BrownianTreeNoiseSampler(x[:1], 0.03, 14.6, seed=[5])(INF, 14.6)[0])
    assert abs(z.mean().item()) < 0.1 and abs(z.std().item() - 1) < 0.1
    assert not torch.equal(z[0], z[1])
    with pytest.raises(ValueError, match="sigma_max is inf"):
        K.BrownianTreeNoiseSampler(x, 0.03, INF)
    with pytest.raises(ValueError, match="seed has 2 entries but x has 3 samples"):
        K.BrownianTreeNoiseSampler(x, 0.03, 14.6, seed=[1, 2])


# ------------------------------------------------------------------------------------------- zero terminal SNR


def _inner_as_v_model(model, inner, cond):
    """The same network for :func:`zsnr_kernels.sample`: v at (y, sigma), t of the wrapper, T - 1 at inf."""

    def v(y, sigma):
        s = sigma.to(y.dtype)
        t = model.sigma_to_t(s)
        if hasattr(model, "sigmas"):
            t = torch.where(torch.isinf(s), torch.full_like(t, len(model.sigmas) - 1), t)
        return inner(y, t, cond)

    return v


@pytest.mark.parametrize("sampler", ALL)
def test_zero_snr_equals_sample_on_the_inner_network(kdiff, sampler):
    """DiscreteVDDPMDenoiser on zero-terminal-SNR alphas_cumprod, trailing grid from inf: k-diffusion gives NaN,
    the drop-in is finite and equals zsnr_kernels.sample(prediction='v') on the wrapper's network."""
    sampling, external = kdiff
    model, inner = _wrapper(external, "discrete", zero_snr=True)
    sigmas = K.get_sigmas_zero_snr(model, 12)
    assert sigmas[0] == INF
    noise, cond = _noise(), _cond()
    streams = _streams(noise)
    kw = {"noise_sampler": streams[0]} if sampler in NOISY else {}
    reports = []
    ours = getattr(K, f"sample_{sampler}")(model, noise, sigmas, extra_args={"cond": cond}, callback=reports.append,
                                           disable=True, **kw)
    assert torch.isfinite(ours).all()
    expected = zk.sample(_inner_as_v_model(model, inner, cond), noise, sigmas, sampler=sampler,
                         noise_sampler=streams[1] if sampler in NOISY else None)
    _close(ours, expected, torch.float64, "result")
    if sampler == "dpmpp_sde":  # the drop-in passes k-diffusion's sigma_fn(t_fn(sigma)), sample() sigma itself
        assert len(streams[0].calls) == len(streams[1].calls)
        assert all(math.isclose(u, v, rel_tol=1e-14) for a, b in zip(*(s.calls for s in streams)) for u, v in zip(a, b))
    elif sampler in NOISY:
        assert streams[0].calls == streams[1].calls
    assert [r["i"] for r in reports] == list(range(12)) and reports[0]["x"] is None
    assert all(r.keys() == {"x", "i", "sigma", "sigma_hat", "denoised"} for r in reports)
    # denoised is the wrapper's D: its forward at the finite steps, -sigma_data * v(noise, T - 1) at inf
    with torch.no_grad():
        torch.testing.assert_close(reports[0]["denoised"], -inner(noise, torch.full((2,), 999), cond),
                                   rtol=0, atol=1e-12)
        for r in reports[1:]:
            sigma_vec = torch.full((2,), float(r["sigma_hat"]), dtype=torch.float64)
            torch.testing.assert_close(r["denoised"], model(r["x"], sigma_vec, cond=cond), rtol=0, atol=1e-10)
    if sampler in ("euler", "dpmpp_2m", "heun"):
        with torch.no_grad():
            theirs = getattr(sampling, f"sample_{sampler}")(model, noise * sigmas[0], sigmas,
                                                            extra_args={"cond": cond}, disable=True)
        assert torch.isnan(theirs).all()


@pytest.mark.parametrize("sampler", CHURN)
def test_zero_snr_with_churn_equals_sample(kdiff, sampler):
    """Churn on every finite step of a run from inf: heun and dpm_2 take an Euler step from inf (one model call),
    with the churn of step 1 folded into it.  The drop-in draws k-diffusion's churn noise from the global generator,
    including step 0's (unused at inf: sigma_hat = inf); zsnr_kernels.sample draws only what it uses, so its
    generator skips that one draw."""
    _, external = kdiff
    model, inner = _wrapper(external, "discrete", zero_snr=True)
    sigmas = K.get_sigmas_zero_snr(model, 8)
    noise, cond = _noise(), _cond()
    kw = {"s_churn": 3.0, "s_noise": 1.003}
    torch.manual_seed(7)
    reports = []
    ours = getattr(K, f"sample_{sampler}")(model, noise, sigmas, extra_args={"cond": cond}, callback=reports.append,
                                           disable=True, **kw)
    inf_calls = sum(bool((t == 999).all()) for t in inner.ts)  # model calls at sigma = inf
    torch.manual_seed(7)
    torch.randn_like(noise)
    expected = zk.sample(_inner_as_v_model(model, inner, cond), noise, sigmas, sampler=sampler,
                         noise_sampler=lambda s, sn: torch.randn_like(noise), **kw)
    _close(ours, expected, torch.float64, "result")
    assert reports[0]["sigma_hat"] == INF and all(r["sigma_hat"] > r["sigma"] for r in reports[1:-1])
    assert inf_calls == 1


@pytest.mark.parametrize("kind,quantize", [("discrete", True), ("compvis", False), ("compvis", True), ("v", False)])
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_zero_snr_every_v_wrapper(kdiff, sampler, kind, quantize):
    """Every v-prediction wrapper, quantized or not: the network gets t = T - 1 at sigma = inf (its last training
    timestep, in the dtype the wrapper's sigma_to_t returns; k-diffusion's lookup gives NaN or, quantized, T - 1 by
    accident), t = 1 for VDenoiser; float32 and float64."""
    _, external = kdiff
    model, inner = _wrapper(external, kind, zero_snr=True, quantize=quantize)
    sigmas = K.get_sigmas_zero_snr(_alphas_cumprod(True), 8)
    for dtype in (torch.float64, torch.float32):
        noise, cond = _noise(dtype), _cond(dtype)
        inner.ts.clear()
        ours = getattr(K, f"sample_{sampler}")(model, noise, sigmas, extra_args={"cond": cond}, disable=True)
        t_inf = inner.ts[0]
        assert t_inf.dtype == model.sigma_to_t(torch.ones(2, dtype=dtype)).dtype
        assert t_inf.tolist() == ([1.0, 1.0] if kind == "v" else [999, 999])
        expected = zk.sample(_inner_as_v_model(model, inner, cond), noise, sigmas, sampler=sampler)
        _close(ours, expected, dtype, f"{kind} {dtype}")


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "dpmpp_2m"])
def test_zero_snr_is_the_limit_of_huge_sigma_max(kdiff, sampler):
    """Runs from sigma_max = 1e4, 1e8, 1e16 (k-diffusion's path: x = noise * sigma_max through the wrapper's
    forward) converge to the run from inf (the inner network on y): like 1/sigma_max for single-step samplers,
    1/log(sigma_max) for DPM++ 2M.  VDenoiser, whose t(sigma) is continuous at inf."""
    sampling, external = kdiff
    model, _ = _wrapper(external, "v")
    rest = sampling.get_sigmas_karras(8, 0.03, 14.6).double()
    noise, cond = _noise(), _cond()

    def run(sigma_max):
        sigmas = torch.cat([torch.tensor([sigma_max], dtype=torch.float64), rest])
        x = noise if sigma_max == INF else noise * sigma_max
        kw = {"noise_sampler": _streams(noise)[0]} if sampler in NOISY else {}
        return getattr(K, f"sample_{sampler}")(model, x, sigmas, extra_args={"cond": cond}, disable=True, **kw)

    at_inf = run(INF)
    gaps = [(run(s) - at_inf).abs().max().item() for s in (1e4, 1e8, 1e16)]
    if sampler == "dpmpp_2m":
        assert gaps[0] > gaps[1] > gaps[2], gaps
        scaled = [g * math.log(s) for g, s in zip(gaps, (1e4, 1e8, 1e16))]
        assert max(scaled) < 2.5 * min(scaled), scaled
    else:
        assert gaps[1] < 1e-3 * gaps[0] and gaps[2] < 1e-12, gaps


def test_zero_snr_needs_a_v_wrapper(kdiff):
    """A plain denoiser, an eps wrapper and a v wrapper whose forward is overridden cannot start at inf: the error
    says why and what to do, before any model call, and leaves the inputs untouched."""
    _, external = kdiff
    ac = _alphas_cumprod(True)
    inner = Inner()

    class Guided(external.DiscreteVDDPMDenoiser):
        def forward(self, x, sigma, **kw):
            return super().forward(x, sigma, **kw) * 1.1

    sigmas = K.get_sigmas_zero_snr(ac, 6)
    noise = _noise()
    before = (noise.clone(), sigmas.clone())
    for model in (lambda x, sigma, cond: x, external.DiscreteEpsDDPMDenoiser(inner, ac, quantize=False),
                  Guided(inner, ac, quantize=False)):
        for sampler in ("euler", "dpmpp_2m_sde"):
            with pytest.raises(ValueError, match=r"not one of k-diffusion's v-prediction wrappers.*no finite input"):
                getattr(K, f"sample_{sampler}")(model, noise, sigmas, extra_args={"cond": _cond()}, disable=True)
    assert not inner.ts
    assert torch.equal(noise, before[0]) and torch.equal(sigmas, before[1])
    model, _ = _wrapper(external, "discrete", zero_snr=True)
    with pytest.raises(ValueError, match="x must be the unit noise itself"):
        K.sample_euler(model, noise * sigmas[0], sigmas, extra_args={"cond": _cond()})


def test_get_sigmas_zero_snr(kdiff):
    """Trailing and linspace timesteps are diffusers' (the oracle); 'k-diffusion' spacing is the wrapper's
    get_sigmas(n), which is NaN at inf; the Karras variant is k-diffusion's grid after inf."""
    diffusers = pytest.importorskip("diffusers")
    sampling, external = kdiff
    model, _ = _wrapper(external, "discrete", zero_snr=True)
    ac = _alphas_cumprod(True)
    for spacing in ("trailing", "linspace"):
        sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", rescale_betas_zero_snr=True,
                                        timestep_spacing=spacing)
        for n in (2, 12, 25) if spacing == "linspace" else (1, 12, 25):
            sigmas = K.get_sigmas_zero_snr(model, n, spacing)
            assert torch.equal(sigmas, K.get_sigmas_zero_snr(ac, n, spacing))
            sched.set_timesteps(n)
            expected = sampling.append_zero(model.sigmas[sched.timesteps])
            assert sigmas[0] == INF and torch.equal(sigmas, expected), (spacing, n)
    assert torch.equal(K.get_sigmas_zero_snr(model, 12), K.get_sigmas_zero_snr(model, 12, "trailing"))

    theirs = model.get_sigmas(12)
    assert torch.isnan(theirs[0])
    ours = K.get_sigmas_zero_snr(model, 12, spacing="k-diffusion")
    assert ours[0] == INF
    torch.testing.assert_close(ours[1:], theirs[1:], rtol=1e-6, atol=0)

    karras = K.get_sigmas_zero_snr(model, 10, spacing="karras", rho=5.0)
    finite = model.sigmas[torch.isfinite(model.sigmas)]
    expected = sampling.get_sigmas_karras(9, finite.min().item(), finite.max().item(), rho=5.0)
    assert karras[0] == INF
    torch.testing.assert_close(karras[1:], expected.double(), rtol=1e-6, atol=0)

    with pytest.raises(ValueError, match="not a zero-terminal-SNR model"):
        K.get_sigmas_zero_snr(_alphas_cumprod(False), 10)
    with pytest.raises(ValueError, match="spacing must be one of"):
        K.get_sigmas_zero_snr(model, 10, spacing="leading")
    with pytest.raises(ValueError, match="rho shapes the karras and polyexponential grids"):
        K.get_sigmas_zero_snr(model, 10, rho=5.0)
    with pytest.raises(TypeError, match="discrete k-diffusion wrapper"):
        K.get_sigmas_zero_snr(_wrapper(external, "v")[0], 10)


def test_bad_schedules_are_refused(kdiff):
    _, external = kdiff
    model, _ = _wrapper(external, "discrete", zero_snr=True)
    noise = _noise()
    cases = [(model.get_sigmas(6), "get_sigmas_zero_snr"),  # NaN at inf
             (torch.tensor([1.0, 2.0, 0.0]), "strictly descending"),
             (torch.tensor([3.0, INF, 0.0]), "only sigmas\\[0\\] may be inf"),
             (torch.tensor([[3.0, 0.0]]), "1-D")]
    for sigmas, match in cases:
        with pytest.raises(ValueError, match=match):
            K.sample_euler(model, noise, sigmas)


def test_half_precision_x_with_a_float32_network(kdiff):
    """A float16 x and a wrapper whose network returns float32 (k-diffusion promotes): the drop-in casts the model
    output to the state's dtype instead of refusing, and stays finite and close to a float32 run."""
    sampling, external = kdiff
    net = TinyNet(4, seed=3)
    model = external.VDenoiser(lambda y, t: net(y.float(), torch.tan(t.float() * math.pi / 2)))
    sigmas = sampling.get_sigmas_karras(8, 0.03, 14.6, rho=7.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 6, generator=g) * sigmas[0]
    for name in ("sample_euler", "sample_dpmpp_2m"):
        half = getattr(K, name)(model, x.half(), sigmas, disable=True)
        full = getattr(K, name)(model, x, sigmas, disable=True)
        assert half.dtype == torch.float16 and torch.isfinite(half).all()
        assert (half.float() - full).abs().max().item() < 5e-2 * max(full.abs().max().item(), 1.0)


# ----------------------------------------------------------------------------------------------------- dpmpp_sde


def test_dpmpp_sde_is_rewritten_and_calls_the_brownian_tree_as_k_diffusion(kdiff):
    """``K.sample_dpmpp_sde`` runs the fused steps (not k-diffusion's function): with the default noise (a Brownian
    tree seeded from torch's generator) and float32 sigmas, the tree is queried at k-diffusion's own float32 times
    (sigma_fn(t), sigma_fn(t + h/2)) and (sigma_fn(t), sigma_fn(t_next)), so the noise is k-diffusion's to the bit;
    the model's second call is at the float64 midpoint (k-diffusion: float32), hence float32-level agreement."""
    sampling, external = kdiff
    assert K.sample_dpmpp_sde is not sampling.sample_dpmpp_sde and "sample_dpmpp_sde" in K.__all__
    model, _ = _wrapper(external, "v")
    sigmas = sampling.get_sigmas_karras(8, 0.03, 14.6)  # float32, k-diffusion's default
    x = _noise() * sigmas[0].double()
    queries = {"theirs": [], "ours": []}
    results = {}
    for name, mod in (("theirs", sampling), ("ours", K)):
        real = sampling.BrownianTreeNoiseSampler.__call__

        def spy(self, s, sn, name=name, real=real):
            queries[name].append((s.dtype, float(s), float(sn)))
            return real(self, s, sn)

        torch.manual_seed(3)
        seed = torch.randint(0, 2 ** 63 - 1, []).item()
        ns = sampling.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=seed)
        ns.__class__ = type("Spy", (sampling.BrownianTreeNoiseSampler,), {"__call__": spy})
        results[name] = mod.sample_dpmpp_sde(model, x, sigmas, extra_args={"cond": _cond()}, disable=True,
                                             noise_sampler=ns)
    assert queries["ours"] == queries["theirs"] and len(queries["ours"]) == 2 * (len(sigmas) - 2)
    assert (results["ours"] - results["theirs"]).abs().max().item() < 1e-4


def test_dpmpp_sde_from_inf_with_the_default_brownian_tree(kdiff):
    """From sigma = inf both first-stage draws are over infinite intervals: the tree's limit (one unit Gaussian,
    the normalised increments of nested infinite intervals being perfectly correlated).  The drop-in equals
    zsnr_kernels.sample with the same tree."""
    _, external = kdiff
    model, inner = _wrapper(external, "discrete", zero_snr=True)
    sigmas = K.get_sigmas_zero_snr(model, 8)
    noise, cond = _noise(), _cond()
    torch.manual_seed(9)
    ours = K.sample_dpmpp_sde(model, noise, sigmas, extra_args={"cond": cond}, disable=True)
    assert torch.isfinite(ours).all()
    torch.manual_seed(9)
    finite = sigmas[(sigmas > 0) & torch.isfinite(sigmas)]
    tree = K.BrownianTreeNoiseSampler(noise, finite.min(), finite.max())
    expected = zk.sample(_inner_as_v_model(model, inner, cond), noise, sigmas, sampler="dpmpp_sde",
                         noise_sampler=lambda s, sn: tree(torch.tensor(s, dtype=torch.float64),
                                                          torch.tensor(sn, dtype=torch.float64)))
    assert (ours - expected).abs().max().item() < 1e-8


def test_dpmpp_sde_refuses_another_r(kdiff):
    sampling, external = kdiff
    model, _ = _wrapper(external, "v")
    sigmas = sampling.get_sigmas_karras(4, 0.03, 14.6).double()
    with pytest.raises(ValueError, match="r = 1/2"):
        K.sample_dpmpp_sde(model, _noise() * sigmas[0], sigmas, r=0.3, extra_args={"cond": _cond()})
