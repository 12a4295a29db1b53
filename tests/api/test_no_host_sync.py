"""Per-sample sigmas and seeds on the device are never read on the host (docs/design.md §2.9): the torch backend steps
from them with tensor math on their device, a sample whose values the float path would refuse comes out NaN (the
device-side status), and the results equal the host path's to float64 rounding.

A tensor subclass whose value reads raise (``tolist``, ``item``, ``cpu``, ``numpy``, ``__float__``, ``__int__``,
``__index__``, ``__bool__``) stands in for a CUDA tensor: a read would be a device-to-host wait per step, and an
error inside CUDA-graph capture."""

from __future__ import annotations

import contextlib
import functools
import math

import pytest
import torch

import zsnr_kernels as zk
from conftest import TinyNet
from zsnr_kernels import coefficients as co
from zsnr_kernels.backends import ext as _ext

INF = math.inf


class NoRead(torch.Tensor):
    """A tensor whose values the host may not read (operations on it return NoRead too).  It stands in for a CUDA
    tensor: ``is_cpu`` False is what makes the library treat a sigma as a device value (a CPU tensor is read, which
    waits for nothing, and checked as numbers are)."""

    is_cpu = False

    def _read(self, *args, **kwargs):
        raise AssertionError("a device value was read on the host")

    tolist = item = cpu = numpy = __float__ = __int__ = __index__ = __bool__ = _read


def noread(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype).as_subclass(NoRead)


def plain(t):
    return None if t is None else t.as_subclass(torch.Tensor)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_the_stand_in_refuses_reads():
    t = noread([1.0, 2.0])
    for read in (t.tolist, t.cpu, t.numpy, lambda: float(t[0]), lambda: bool(t[0]), lambda: t[0].item()):
        with pytest.raises(AssertionError, match="read on the host"):
            read()


SIG, NXT = [INF, 6.0, 0.7, 3.0], [2.5, 2.0, 0.0, 1.0]
SIG2, NXT2 = [9.0, 6.0, 0.7, 3.0], [2.5, 2.0, 0.1, 1.0]  # two-stage: every sample takes both stages
HIST1 = [[INF, 9.0, 1.5, 5.0]]
HIST2 = [[9.0, 9.0, 1.5, 5.0], [INF, 14.0, 3.0, 8.0]]
HIST3 = [[9.0, 9.0, 1.5, 5.0], [14.0, 14.0, 3.0, 8.0], [INF, 30.0, 7.0, 20.0]]
MULTI = [6.0, 6.0, 0.7, 3.0]
CASES = [  # step, sigma, sigma_next, options (lists are per sample), history sigmas
    ("euler", SIG, NXT, {}, []),
    ("euler", SIG, NXT, {"sigma_hat_next": [3.0, 2.0, 0.0, 1.4]}, []),
    ("euler_ancestral", SIG, NXT, {"eta": 0.9}, []),
    ("ddim", SIG, NXT, {"eta": 0.5}, []),
    ("ddpm", SIG, NXT, {}, []),
    ("heun", SIG2, NXT2, {}, []),
    ("heun", SIG2, NXT2, {"sigma_hat_next": [3.0, 2.0, 0.1, 1.4]}, []),
    ("dpm_2", SIG2, NXT2, {}, []),
    ("dpm_2_ancestral", SIG2, NXT2, {"eta": 0.8}, []),
    ("dpmpp_2s_ancestral", SIG2, NXT2, {}, []),
    ("dpmpp_sde", SIG2, NXT2, {"eta": 0.7}, []),
    ("dpmpp_2m", MULTI, NXT, {}, HIST1),
    ("dpmpp_2m_sde", MULTI, NXT, {"solver_type": "heun"}, HIST1),
    ("dpmpp_3m_sde", MULTI, NXT, {}, HIST2),
    ("lms", MULTI, NXT, {}, HIST2),
    # unipc: from inf (no history), the bh2 corrector after a remembered inf (sample 0 of HIST1), the oldest point at
    # inf dropped (sample 0 of HIST2, HIST3), the step to 0 (sample 2), every corrector order
    ("unipc", SIG, NXT, {"order": 2}, []),
    ("unipc", MULTI, NXT, {"order": 2}, HIST1),
    ("unipc", MULTI, NXT, {"order": 1, "solver_type": "bh1"}, HIST1),
    ("unipc", MULTI, NXT, {"order": 3, "solver_type": "bh1"}, HIST2),
    ("unipc", MULTI, NXT, {"order": 3, "corrector": 3}, HIST3),
    ("unipc", MULTI, NXT, {"order": 2, "corrector": 0, "solver_type": "bh1"}, HIST3),
]
IDS = [f"{c[0]}{'_churn' if 'sigma_hat_next' in c[3] else ''}" for c in CASES]


def _step(step, sig, nxt, kw, hist, col, seeds, **common):
    """A whole step (both calls of a two-stage sampler) with the per-sample values made by ``col``."""
    fn = getattr(zk, step + "_step")
    t = {k: _rand(4, 3, 5, 6, seed=i) for i, k in enumerate(("y", "fc", "fu", "h0", "h1", "h2"))}
    opts = {k: col(v) if isinstance(v, list) else v for k, v in kw.items()}
    if hist:
        opts["history"] = [(col(s), t[f"h{k}"]) for k, s in enumerate(hist)]
    model = (t["fc"], t["fu"])
    r = fn(t["y"], model, col(sig), col(nxt), seed=seeds, step_index=2, backend="torch", **opts, **common)
    if zk.coefficients.SAMPLERS[step].kind == "two_stage":
        assert not r.complete
        model2 = (0.5 * t["fc"] - 0.1 * plain(r.y), t["fu"] + 0.2)
        r = fn(r.y, model2, col(sig), col(nxt), first=r, seed=seeds, step_index=2, backend="torch", **opts,
               **common)
    return r


@pytest.mark.parametrize("step,sig,nxt,kw,hist", CASES, ids=IDS)
def test_step_with_device_sigmas_and_seeds_reads_nothing_and_equals_host_values(step, sig, nxt, kw, hist):
    """Every step function on the torch backend: sigmas and seeds as unreadable tensors give the host lists'
    result to float64 rounding (guidance and the v-space rescale exercise every per-sample column)."""
    common = dict(guidance_scale=4.0, guidance_rescale=0.7, rescale_space="v")
    seeds = [21, 22, 23, 2**63 + 5]
    host = _step(step, sig, nxt, kw, hist, list, seeds, **common)
    dev = _step(step, sig, nxt, kw, hist, noread, noread(seeds[:3] + [-(2**63) + 5], torch.int64), **common)
    assert host.complete and dev.complete
    assert type(dev.sigma) is NoRead and dev.sigma.dtype == torch.float64 and dev.sigma.shape == (4,)
    _assert_equals_host(dev, host)


def _assert_equals_host(dev, host):
    """A step on unreadable device values gave the host values' result to float64 rounding: its sigma, y, D and
    derivative (or None where the host's is None)."""
    torch.testing.assert_close(plain(dev.sigma), host.sigma, rtol=1e-15, atol=0)
    for k in ("y", "denoised", "derivative"):
        a, b = getattr(host, k), plain(getattr(dev, k))
        assert (a is None) == (b is None), k
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-13, atol=1e-14, msg=k)


CFG_PP_CASES = [
    ("euler_cfg_pp", SIG, NXT, {}, []),
    ("euler_ancestral_cfg_pp", SIG, NXT, {"eta": 0.9}, []),
    ("euler_ancestral_cfg_pp", SIG, NXT, {"eta": 1.5, "s_noise": 0.8}, []),  # clamped: sigma_down = 0
    ("dpmpp_2m_cfg_pp", MULTI, NXT, {}, HIST1),
    ("dpmpp_2m_cfg_pp", SIG, NXT, {}, []),
    ("dpmpp_2s_ancestral_cfg_pp", SIG2, NXT2, {}, []),
    ("dpmpp_2s_ancestral_cfg_pp", SIG2, NXT2, {"eta": 0.6}, []),
]


@pytest.mark.parametrize("step,sig,nxt,kw,hist", CFG_PP_CASES, ids=[c[0] for c in CFG_PP_CASES])
@pytest.mark.parametrize("guidance_scale", [4.0, 1.0])
def test_cfg_pp_step_with_device_sigmas_reads_nothing_and_equals_host_values(step, sig, nxt, kw, hist, guidance_scale):
    """The CFG++ rows as the others above: D_u's weight and carry from the tensor mirror (D_u = D at guidance 1)."""
    common = dict(guidance_scale=guidance_scale, guidance_rescale=0.7, rescale_space="v")
    seeds = [21, 22, 23, 2**63 + 5]
    with pytest.warns(UserWarning) if guidance_scale == 1.0 else contextlib.nullcontext():
        host = _step(step, sig, nxt, kw, hist, list, seeds, **common)
    assert co.has_tensor_coeffs(step)
    with pytest.warns(UserWarning) if guidance_scale == 1.0 else contextlib.nullcontext():
        dev = _step(step, sig, nxt, kw, hist, noread, noread(seeds[:3] + [-(2**63) + 5], torch.int64), **common)
    assert host.complete and dev.complete and type(dev.sigma) is NoRead
    _assert_equals_host(dev, host)


def _per_sample_run(sampler, net, noise, schedules, col, seeds, kw, guidance_scale=3.0, backend="torch"):
    """A loop over per-sample schedules (one column per step, ``col`` making the column: host lists or device
    values) as sample() runs one schedule: unipc's orders per step as diffusers sets them, the remembered D (D_u for
    dpmpp_2m_cfg_pp) with its sigma column, both calls of a two-stage step."""
    spec = co.SAMPLERS[sampler]
    fn = zk.steps.step_function(sampler)
    n = len(schedules[0]) - 1
    def model(y, s):  # a guided pair (F_c, F_u); s a host list or number, or a tensor on the device
        s = plain(s) if isinstance(s, torch.Tensor) else torch.tensor(s, dtype=torch.float64).reshape(-1)
        f = net(plain(y), s)
        return f, 0.6 * f + 0.1

    y, history = noise, []
    for i in range(n):
        sig, nxt = col([s[i] for s in schedules]), col([s[i + 1] for s in schedules])
        extra = dict(kw)
        if spec.per_step is not None:
            extra.update(spec.per_step(i, n, {"order": kw.get("order", 2)}))
        if spec.kind == "multistep":
            extra["history"] = history
        common = dict(guidance_scale=guidance_scale, seed=seeds, step_index=i, backend=backend, **extra)
        r = fn(y, model(y, sig), sig, nxt, **common)
        if not r.complete:
            r = fn(r.y, model(r.y, r.sigma), sig, nxt, first=r, **common)
        if spec.kind == "multistep":
            item = r.derivative if spec.keeps == "derivative" else r.denoised
            history = [(sig, item)] + history[: spec.history - 1]
        y = r.y
    return plain(y)


RUN_SCHEDULES = [  # per sample: from inf, from a finite sigma, from inf again; all to 0
    [INF, 8.0, 3.0, 1.2, 0.4, 0.1, 0.0],
    [20.0, 6.0, 2.5, 0.9, 0.3, 0.05, 0.0],
    [INF, 5.0, 2.0, 0.7, 0.2, 0.06, 0.0],
]
RUNS = [("unipc", {"order": 3}), ("unipc", {"order": 3, "solver_type": "bh1"}), ("unipc", {"order": 2}),
        ("euler_cfg_pp", {}), ("euler_ancestral_cfg_pp", {"eta": 0.8}), ("dpmpp_2m_cfg_pp", {}),
        ("dpmpp_2s_ancestral_cfg_pp", {})]


@pytest.mark.parametrize("sampler,kw", RUNS, ids=[f"{s}-{'-'.join(map(str, k.values()))}" for s, k in RUNS])
def test_per_sample_run_reads_nothing_and_equals_host_values(sampler, kw):
    """A whole run with per-sample schedules on the device (history sigmas included, some at inf) reads no value on
    the host and gives each sample the run of its own schedule with host values."""
    net = TinyNet(2, seed=0)
    noise = _rand(3, 2, 5, 5, seed=3)
    seeds = [7, 8, 9]
    dev = _per_sample_run(sampler, net, noise, RUN_SCHEDULES, noread, noread(seeds, torch.int64), kw)
    assert torch.isfinite(dev).all()
    if co.SAMPLERS[sampler].kind == "two_stage":  # the host path takes one stage decision for the batch: one by one
        for i, sched in enumerate(RUN_SCHEDULES):
            one = _per_sample_run(sampler, net, noise[i:i + 1], [sched], list, [seeds[i]], kw)
            torch.testing.assert_close(dev[i:i + 1], one, rtol=1e-12, atol=1e-13)
    else:
        host = _per_sample_run(sampler, net, noise, RUN_SCHEDULES, list, seeds, kw)
        torch.testing.assert_close(dev, host, rtol=1e-12, atol=1e-13)


@pytest.mark.skipif(not _ext.available(), reason="the compiled CPU module is not built")
@pytest.mark.parametrize("sampler,kw", RUNS, ids=[f"{s}-{'-'.join(map(str, k.values()))}" for s, k in RUNS])
def test_per_sample_run_on_the_cpu_backend_equals_the_device_path(sampler, kw):
    """The cpu backend takes CPU tensors, whose per-sample sigmas it reads (no wait) and steps with the float
    coefficient functions: the same run as the torch backend's from device sigmas, to float32 rounding."""
    net = TinyNet(2, seed=0)
    noise = _rand(3, 2, 5, 5, seed=3)
    scheds = RUN_SCHEDULES[1:2] * 3 if co.SAMPLERS[sampler].kind == "two_stage" else RUN_SCHEDULES
    cpu_col = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731 -- CPU tensors: read, never waited for
    got = _per_sample_run(sampler, net, noise.float(), scheds, cpu_col, torch.tensor([7, 8, 9]), kw, backend="cpu")
    want = _per_sample_run(sampler, net, noise, scheds, noread, noread([7, 8, 9], torch.int64), kw)
    torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("sampler", ["heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde"])
def test_two_stage_sample_whose_step_ends_after_its_first_stage_is_kept_by_the_second(sampler):
    """The host cannot see that a sample's two-stage step ended after its first stage (from sigma = inf, to 0): with
    device sigmas every sample takes two calls, and such a sample's second call keeps the state of its first."""
    fn = getattr(zk, sampler + "_step")
    y, f = _rand(3, 2, 4, 4, seed=1), _rand(3, 2, 4, 4, seed=2)
    sig, nxt = [INF, 6.0, 4.0], [2.0, 0.0, 1.0]
    r1 = fn(y, f, noread(sig), noread(nxt), seed=noread([4, 5, 6], torch.int64), step_index=1, backend="torch")
    assert not r1.complete
    f2 = plain(r1.y) * 0.3
    r2 = fn(r1.y, f2, noread(sig), noread(nxt), first=r1, seed=noread([4, 5, 6], torch.int64), step_index=1,
            backend="torch")
    assert r2.complete
    for i in range(3):
        sl = slice(i, i + 1)
        one = fn(y[sl], f[sl], sig[i], nxt[i], seed=4 + i, step_index=1, backend="torch")
        if not one.complete:
            one = fn(one.y, f2[sl], sig[i], nxt[i], first=one, seed=4 + i, step_index=1, backend="torch")
        torch.testing.assert_close(plain(r2.y)[sl], one.y, rtol=1e-13, atol=1e-14)
        assert float(plain(r2.sigma)[i]) == one.sigma


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m_sde", "heun", "lms"])
def test_sample_with_a_seed_tensor_reads_nothing(sampler):
    """sample() keeps a seed tensor on its device: the same result as the same seeds as ints."""
    net = TinyNet(2, seed=0)
    noise = _rand(3, 2, 5, 5, seed=3)
    sigmas = [INF, 10.0, 3.0, 1.0, 0.3, 0.0]
    kw = {"s_churn": 1.0} if sampler == "heun" else {}
    want = zk.sample(net, noise, sigmas, sampler=sampler, seed=[7, 8, 2**64 - 1], backend="torch", **kw)
    got = zk.sample(net, noise, sigmas, sampler=sampler, seed=noread([7, 8, -1], torch.int64), backend="torch",
                    **kw)
    assert torch.equal(plain(got), want)
    got = zk.sample(net, noise, sigmas, sampler=sampler, seed=noread(7, torch.int64), backend="torch", **kw)
    assert torch.equal(plain(got), zk.sample(net, noise, sigmas, sampler=sampler, seed=7, backend="torch", **kw))


# ------------------------------------------------------------------------------------ the device-side status


def _nan_samples(r) -> list[bool]:
    return [not bool(torch.isfinite(plain(r.y)[i]).all()) for i in range(r.y.shape[0])]


@pytest.mark.parametrize("sig,nxt,bad", [
    ([5.0, math.nan, 3.0, 4.0], [2.0, 1.0, 1.0, 1.0], 1),  # NaN
    ([5.0, -1.0, 3.0, 4.0], [2.0, 1.0, 1.0, 1.0], 1),  # negative
    ([5.0, 3.0, 3.0, 4.0], [2.0, 1.0, 3.0, 1.0], 2),  # sigma_next == sigma
    ([5.0, 3.0, 3.0, 4.0], [2.0, 1.0, 1.0, 1e-31], 3),  # below SIGMA_MIN
    ([5.0, 3.0, 1e31, 4.0], [2.0, 1.0, 1.0, 1.0], 2),  # above SIGMA_MAX
    ([5.0, 3.0, 3.0, 4.0], [2.0, INF, 1.0, 1.0], 1),  # sigma_next inf
])
def test_a_refused_sample_comes_out_nan_and_the_others_exact(sig, nxt, bad):
    y, f = _rand(4, 2, 3, 3, seed=5), _rand(4, 2, 3, 3, seed=6)
    r = zk.euler_step(y, f, noread(sig), noread(nxt), backend="torch")
    assert _nan_samples(r) == [i == bad for i in range(4)]
    assert math.isnan(float(plain(r.sigma)[bad]))
    for i in range(4):
        if i != bad:
            one = zk.euler_step(y[i:i + 1], f[i:i + 1], sig[i], nxt[i], backend="torch")
            torch.testing.assert_close(plain(r.y)[i:i + 1], one.y, rtol=1e-14, atol=0)
    with pytest.raises(ValueError):  # the host path refuses the same sample
        zk.euler_step(y, f, sig, nxt, backend="torch")


def test_device_checks_of_history_span_noise_churn_and_eps_at_inf():
    y, f, h = _rand(2, 2, 3, 3, seed=1), _rand(2, 2, 3, 3, seed=2), _rand(2, 2, 3, 3, seed=3)
    # a remembered sigma below sigma
    r = zk.dpmpp_2m_step(y, f, noread([6.0, 6.0]), noread([2.0, 2.0]), history=[(noread([9.0, 5.0]), h)],
                         backend="torch")
    assert _nan_samples(r) == [False, True]
    # heun spanning more than STEP_RATIO_MAX
    r = zk.heun_step(y, f, noread([6.0, 1e7]), noread([2.0, 1.0]), backend="torch")
    assert _nan_samples(r) == [False, True]
    # a step that adds noise with neither noise= nor seed=; a sample going to 0 adds none
    r = zk.euler_ancestral_step(y, f, noread([6.0, 6.0]), noread([2.0, 0.0]), backend="torch")
    assert _nan_samples(r) == [True, False]
    # a churn target below the step's sigma_next
    r = zk.euler_step(y, f, noread([6.0, 6.0]), noread([2.0, 2.0]), sigma_hat_next=noread([3.0, 1.0]), seed=1,
                      step_index=0, backend="torch")
    assert _nan_samples(r) == [False, True]
    # an eps model evaluated at sigma = inf
    r = zk.euler_step(y, f, noread([INF, 6.0]), noread([2.0, 2.0]), prediction="eps", backend="torch")
    assert _nan_samples(r) == [True, False]


def test_second_call_with_other_sigmas_than_the_first_comes_out_nan():
    y, f = _rand(2, 2, 3, 3, seed=1), _rand(2, 2, 3, 3, seed=2)
    r1 = zk.heun_step(y, f, noread([6.0, 4.0]), noread([1.0, 1.0]), backend="torch")
    ok = zk.heun_step(r1.y, f, noread([6.0, 4.0]), noread([1.0, 1.0]), first=r1, backend="torch")
    assert _nan_samples(ok) == [False, False]
    r = zk.heun_step(r1.y, f, noread([6.0, 5.0]), noread([1.0, 1.0]), first=r1, backend="torch")
    assert _nan_samples(r) == [False, True]
    with pytest.raises(ValueError, match="not dpm_2_step"):  # the sampler is a host value: refused at once
        zk.dpm_2_step(r1.y, f, noread([6.0, 4.0]), noread([1.0, 1.0]), first=r1, backend="torch")


def test_metadata_is_checked_on_the_host():
    y, f = _rand(3, 2, 3, 3), _rand(3, 2, 3, 3, seed=1)
    with pytest.raises(ValueError, match=r"sigma must be a number or a \(3,\) tensor"):
        zk.euler_step(y, f, noread([5.0, 4.0]), 1.0, backend="torch")
    with pytest.raises(TypeError, match="sigma_next must hold real numbers"):
        zk.euler_step(y, f, noread([5.0, 4.0, 3.0]), noread([True, True, False], torch.bool), backend="torch")
    with pytest.raises(ValueError, match=r"seed tensor must be 0-d or have shape \(3,\)"):
        zk.euler_ancestral_step(y, f, noread([5.0, 4.0, 3.0]), 1.0, seed=noread([1, 2], torch.int64), step_index=0,
                                backend="torch")


@pytest.mark.skipif(not _ext.available(), reason="the compiled CPU module is not built")
def test_compiled_backend_reads_a_cpu_tensor_and_checks_it_on_the_host():
    """The compiled launchers take host sigmas: a CPU tensor is read (no wait) and refused as a list is."""
    y, f = _rand(2, 2, 3, 3).float(), _rand(2, 2, 3, 3, seed=1).float()
    with pytest.raises(ValueError, match=r"sigma\[1\] must be a number"):
        zk.euler_step(y, f, torch.tensor([5.0, math.nan], dtype=torch.float64), 1.0, backend="cpu")
    got = zk.euler_ancestral_step(y, f, torch.tensor([5.0, 4.0], dtype=torch.float64), 1.0,
                                  seed=torch.tensor([3, 4]), step_index=0, backend="cpu")
    want = zk.euler_ancestral_step(y, f, [5.0, 4.0], 1.0, seed=[3, 4], step_index=0, backend="cpu")
    assert torch.equal(got.y, want.y)
