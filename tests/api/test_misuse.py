"""Natural misuses get a clear error (naming the argument and the fix, every tensor untouched), a warning, or a
documented and tested behaviour: two-stage steps continued from the wrong state or the wrong first stage, seeds of
a batch against batches of one, reversed schedules, a guidance pair at scale 1, negative seeds, NaN model output,
and a process forked after the parallel kernels ran."""

from __future__ import annotations

import math
import multiprocessing
import queue as queue_module
import warnings

import pytest
import torch
from conftest import TinyNet

import zsnr_kernels as zk
from zsnr_kernels.backends import ext as _ext
from zsnr_kernels import k_diffusion as K

INF = math.inf
BACKENDS = ["torch"] + (["cpu"] if _ext.available() else [])


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _unchanged(fn, *tensors):
    """Run ``fn`` (which must raise) and check that it left every tensor as it was."""
    before = [t.clone() for t in tensors]
    fn()
    for t, b in zip(tensors, before):
        assert torch.equal(t, b)


# ----------------------------------------------------------------------- two-stage steps: the second call's y

TWO_STAGE = {
    "heun_step": {},
    "dpm_2_step": {},
    "dpm_2_ancestral_step": {"seed": 3, "step_index": 1},
    "dpmpp_2s_ancestral_step": {"seed": 3, "step_index": 1},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("step", list(TWO_STAGE))
def test_second_stage_refuses_a_y_other_than_first_y(step, backend):
    fn, kw = getattr(zk, step), dict(TWO_STAGE[step], backend=backend)
    y, f, f2 = _rand(2, 3, 8, 8), _rand(2, 3, 8, 8, seed=1), _rand(2, 3, 8, 8, seed=2)
    first = fn(y, f, 5.0, 1.0, **kw)
    assert not first.complete
    for wrong in (y, first.y.clone()):  # the state before the step; a copy (values are not compared)
        with pytest.raises(ValueError, match=r"y is not first\.y.*first\.y, model\(first\.y, first\.sigma\)"):
            _unchanged(lambda: fn(wrong, f2, 5.0, 1.0, first=first, **kw), y, f2, first.y, first.denoised)
    # first.y itself, or the same view of its memory, is the second call
    want = fn(first.y, f2, 5.0, 1.0, first=first, **kw)
    assert want.complete
    assert torch.equal(fn(first.y.view_as(first.y), f2, 5.0, 1.0, first=first, **kw).y, want.y)


@pytest.mark.parametrize("sampler", ["heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral"])
def test_a_loop_of_two_stage_steps_equals_sample(sampler):
    """The documented loop (second call from first.y) is sample() exactly."""
    net = TinyNet(3, seed=2)
    noise = _rand(2, 3, 6, 6, seed=4, dtype=torch.float64)
    sigmas = [INF] + zk.schedules.karras(5, 0.1, 10.0).tolist()
    kw = {"seed": 7} if "ancestral" in sampler else {}
    want = zk.sample(net, noise, sigmas, sampler=sampler, **kw)
    fn = getattr(zk, sampler + "_step")
    y, sigma = zk.initial_state(noise, sigmas[0])
    for i in range(len(sigmas) - 1):
        ikw = {"seed": 7, "step_index": i} if kw else {}
        s = torch.full((2,), sigma, dtype=torch.float64)
        r = fn(y, net(y, s), sigma, sigmas[i + 1], **ikw)
        if not r.complete:
            r = fn(r.y, net(r.y, torch.full((2,), r.sigma, dtype=torch.float64)), sigma, sigmas[i + 1], first=r,
                   **ikw)
        y, sigma = r.y, r.sigma
    torch.testing.assert_close(zk.final_sample(y), want, atol=0, rtol=0)


# --------------------------------------------------------------- two-stage steps: the first stage of another step


@pytest.mark.parametrize("backend", BACKENDS)
def test_heun_second_stage_refuses_the_first_stage_of_another_step(backend):
    y, f, f2 = _rand(1, 2, 8, 8), _rand(1, 2, 8, 8, seed=1), _rand(1, 2, 8, 8, seed=2)
    r1 = zk.heun_step(y, f, 6.0, 1.0, backend=backend)  # first.sigma is 1.0 = sigma_next either way
    with pytest.raises(ValueError, match=r"sigma=6\.0 to sigma_next=1\.0.*sigma=5\.0, sigma_next=1\.0.*sigma_hat"):
        _unchanged(lambda: zk.heun_step(r1.y, f2, 5.0, 1.0, first=r1, backend=backend), y, f2, r1.y, r1.denoised)
    with pytest.raises(ValueError, match=r"sigma_next=0\.5"):
        zk.heun_step(r1.y, f2, 6.0, 0.5, first=r1, backend=backend)


def test_second_stage_refuses_a_first_stage_of_another_sampler():
    y, f = _rand(1, 2, 4, 4), _rand(1, 2, 4, 4, seed=1)
    r1 = zk.heun_step(y, f, 6.0, 1.0)
    with pytest.raises(ValueError, match=r"first\.sigma=1\.0 is not where the first dpm_2 stage"):
        zk.dpm_2_step(r1.y, f, 6.0, 1.0, first=r1)
    r1 = zk.dpm_2_step(y, f, 6.0, 1.0)  # its model runs where dpm_2_ancestral's (eta = 0) does
    with pytest.raises(ValueError, match=r"first was returned by dpm_2_step, not dpm_2_ancestral_step"):
        zk.dpm_2_ancestral_step(r1.y, f, 6.0, 1.0, first=r1, eta=0.0)


def test_second_stage_checks_per_sample_sigmas_of_the_first():
    y, f = _rand(2, 2, 4, 4), _rand(2, 2, 4, 4, seed=1)
    r1 = zk.heun_step(y, f, [6.0, 4.0], [1.0, 1.0])
    assert zk.heun_step(r1.y, f, [6.0, 4.0], [1.0, 1.0], first=r1).complete
    with pytest.raises(ValueError, match=r"sample 1"):
        zk.heun_step(r1.y, f, [6.0, 5.0], [1.0, 1.0], first=r1)


def test_churn_second_stage_at_sigma_hat_is_accepted_and_at_sigma_refused():
    """With churn the model runs at sigma_hat: both calls take sigma_hat; a second call at sigma is the slip."""
    net = TinyNet(2, seed=3)
    noise = _rand(1, 2, 5, 5, seed=6, dtype=torch.float64)
    sig = [10.0, 3.0, 1.0, 0.0]
    want = zk.sample(net, noise, sig, sampler="heun", s_churn=2.0, seed=9)
    n = len(sig) - 1
    hats = []
    for i in range(n):
        g = zk.coefficients.churn_gamma(sig[i], n, 2.0, 0.0, INF)
        hats.append(sig[i] * (1 + g))
    y, _ = zk.initial_state(noise, sig[0])
    y = zk.churn_step(y, sig[0], hats[0], seed=9, step_index=0)
    for i in range(n):
        sh, nxt = hats[i], sig[i + 1]
        kw = {"sigma_hat_next": hats[i + 1], "seed": 9, "step_index": i + 1} if i + 1 < n else {}
        r = zk.heun_step(y, net(y, torch.full((1,), sh, dtype=torch.float64)), sh, nxt, **kw)
        if not r.complete:
            f2 = net(r.y, torch.full((1,), r.sigma, dtype=torch.float64))
            if sh != sig[i]:
                with pytest.raises(ValueError, match="sigma_hat both times"):
                    zk.heun_step(r.y, f2, sig[i], nxt, first=r, **kw)
            r = zk.heun_step(r.y, f2, sh, nxt, first=r, **kw)
        y = r.y
    assert any(h != s for h, s in zip(hats, sig))
    torch.testing.assert_close(zk.final_sample(y), want, atol=1e-14, rtol=0)


@pytest.mark.skipif(not _ext.available(), reason="zsnr_kernels._C is not built")
def test_the_second_stage_checks_trace_without_a_graph_break():
    """torch.compile(fullgraph=True) of a two-stage loop: the y check (skipped while traced: fake tensors have no
    data pointer; the eager call checks) and the origin check (host floats) add no graph break."""
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * 0.3

    def model(y, sigma):
        return torch.tanh(torch.einsum("ij,bjhw->bihw", w, y) + 0.1 * torch.atan(sigma).view(-1, 1, 1, 1).float())

    noise = _rand(2, 4, 8, 8, seed=1)
    sigmas = [INF] + zk.schedules.karras(3, 0.05, 10.0).tolist()

    def run(n):
        return zk.sample(model, n, sigmas, sampler="dpm_2_ancestral", seed=[3, 4])

    torch.testing.assert_close(torch.compile(run, fullgraph=True)(noise), run(noise), atol=1e-5, rtol=1e-5)


def test_a_first_stage_built_by_hand_without_origin_is_accepted():
    y, f = _rand(1, 2, 4, 4), _rand(1, 2, 4, 4, seed=1)
    r = zk.heun_step(y, f, 6.0, 1.0)
    assert r.origin == ("heun", 6.0, 1.0)
    manual = zk.StepResult(r.y, r.sigma, r.denoised, complete=False)
    torch.testing.assert_close(zk.heun_step(r.y, f, 6.0, 1.0, first=manual).y,
                               zk.heun_step(r.y, f, 6.0, 1.0, first=r).y, atol=0, rtol=0)


# --------------------------------------------------------------------------------------- seeds of a batch


def test_batch_of_8_with_seed_s_equals_8_batches_of_1_with_seeds_s_plus_i():
    """The precise statement: one int seed s for a batch gives sample i the seed s + i."""
    net = TinyNet(2, seed=1)
    noise = _rand(8, 2, 4, 4, seed=5, dtype=torch.float64)
    sig = [INF] + zk.schedules.karras(4, 0.1, 10.0).tolist()
    s = 2**64 - 3  # s + i wraps mod 2**64
    batch = zk.sample(net, noise, sig, sampler="dpmpp_2m_sde", seed=s)
    same_seed = []
    for i in range(8):
        one = zk.sample(net, noise[i:i + 1], sig, sampler="dpmpp_2m_sde", seed=(s + i) % 2**64)
        torch.testing.assert_close(batch[i:i + 1], one, atol=1e-14, rtol=0)
        same_seed.append(zk.sample(net, noise[i:i + 1], sig, sampler="dpmpp_2m_sde", seed=s))
    # ... and not 8 batches of 1 with seed s each (only sample 0 has seed s)
    assert torch.equal(batch[:1], same_seed[0])
    assert all(not torch.allclose(batch[i:i + 1], same_seed[i]) for i in range(1, 8))


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_with_seed_s_equals_steps_of_one_with_seeds_s_plus_i(backend):
    y, f = _rand(8, 2, 4, 4), _rand(8, 2, 4, 4, seed=1)
    batch = zk.euler_ancestral_step(y, f, 5.0, 1.0, seed=40, step_index=2, backend=backend)
    for i in range(8):
        one = zk.euler_ancestral_step(y[i:i + 1], f[i:i + 1], 5.0, 1.0, seed=40 + i, step_index=2, backend=backend)
        torch.testing.assert_close(batch.y[i:i + 1], one.y, atol=0, rtol=0)


# ------------------------------------------------------------------------------------- reversed schedules


@pytest.mark.parametrize("sigmas,fix", [
    (torch.tensor([0.0, 1.0, 10.0, INF], dtype=torch.float64), r"sigmas\.flip\(0\)"),
    (torch.tensor([0.0, 1.0, 10.0]), r"sigmas\.flip\(0\)"),
    ([0.0, 1.0, 10.0, INF], r"sigmas\[::-1\]"),
])
def test_sample_names_an_ascending_schedule_and_the_fix(sigmas, fix):
    noise = _rand(1, 2, 3, 3)
    with pytest.raises(ValueError, match=r"sigmas ascend.*descending order, " + fix):
        _unchanged(lambda: zk.sample(TinyNet(2), noise, sigmas), noise)
    with pytest.raises(ValueError, match=r"sigmas ascend"):
        zk.SamplingPlan(sigmas, (1, 2, 3, 3))
    flipped = sigmas.flip(0) if isinstance(sigmas, torch.Tensor) else sigmas[::-1]
    assert torch.isfinite(zk.sample(TinyNet(2), noise, flipped)).all()


def test_k_diffusion_names_an_ascending_schedule_and_the_fix():
    x = _rand(1, 2, 3, 3) * 10
    asc = K.get_sigmas_karras(4, 0.1, 10.0).flip(0)
    for sample in (K.sample_euler, K.sample_heun, K.sample_dpmpp_2m):
        with pytest.raises(ValueError, match=r"sigmas ascend.*sigmas\.flip\(0\)"):
            _unchanged(lambda: sample(lambda x, s: x * 0.5, x, asc), x)
    # a repeated value is named as one; a rise elsewhere is not called a repetition
    with pytest.raises(ValueError, match="drop repeated values"):
        K.sample_euler(lambda x, s: x, x, torch.tensor([10.0, 1.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match=r"strictly descending, but sigmas\[2\]=5\.0 >= sigmas\[1\]=1\.0$"):
        K.sample_euler(lambda x, s: x, x, torch.tensor([10.0, 1.0, 5.0, 0.0]))


# ------------------------------------------------------------------------------------ silent acceptance


def test_a_guidance_pair_at_scale_1_warns_once_per_call_site():
    net = TinyNet(2, seed=2)
    noise = _rand(1, 2, 4, 4, dtype=torch.float64)
    sig = [INF, 5.0, 1.0, 0.0]
    pair = lambda y, s: (net(y, s), net(y, s) * 0.0 + 1.0)  # noqa: E731
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("default")  # what a user sees: once per call site, though every step warns
        got = zk.sample(pair, noise, sig)
    assert len(rec) == 1 and "guidance_scale=1.0 with a (cond, uncond) pair" in str(rec[0].message)
    assert rec[0].filename == __file__  # attributed to the caller, not to the library
    torch.testing.assert_close(got, zk.sample(net, noise, sig), atol=1e-14, rtol=0)  # F_cond alone
    y = noise.float()
    with pytest.warns(UserWarning, match="guidance_scale"):
        zk.euler_step(y, (y, y), 5.0, 1.0)
    plan = zk.SamplingPlan(sig, noise.shape, dtype=torch.float64)
    with pytest.warns(UserWarning, match="guidance_scale") as rec:
        torch.testing.assert_close(plan.run(pair, noise), zk.sample(net, noise, sig), atol=1e-14, rtol=0)
    assert all(w.filename == __file__ for w in rec)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        zk.sample(pair, noise, sig, guidance_scale=3.0)
        zk.sample(net, noise, sig)
        zk.euler_step(y, y, 5.0, 1.0)


def test_negative_seeds_wrap_mod_2_64_everywhere_and_out_of_range_ones_are_refused():
    net = TinyNet(2, seed=1)
    noise = _rand(2, 2, 4, 4, dtype=torch.float64)
    sig = [INF, 5.0, 1.0, 0.0]
    a = zk.sample(net, noise, sig, sampler="euler_ancestral", seed=-1)
    b = zk.sample(net, noise, sig, sampler="euler_ancestral", seed=[2**64 - 1, 0])
    assert torch.equal(a, b)
    plan = zk.SamplingPlan(sig, noise.shape, sampler="euler_ancestral", dtype=torch.float64, seed=-1)
    assert plan.seeds == [2**64 - 1, 0]
    assert torch.equal(plan.run(net, noise), a)
    y = noise.float()
    assert torch.equal(zk.euler_ancestral_step(y, y, 5.0, 1.0, seed=-1, step_index=0).y,
                       zk.euler_ancestral_step(y, y, 5.0, 1.0, seed=[2**64 - 1, 0], step_index=0).y)
    for bad in (-(2**63) - 1, 2**64):
        with pytest.raises(ValueError, match=r"seed must be in \[-2\*\*63, 2\*\*64\)"):
            _unchanged(lambda: zk.sample(net, noise, sig, sampler="euler_ancestral", seed=bad), noise)
        with pytest.raises(ValueError, match=r"seed"):
            zk.euler_ancestral_step(y, y, 5.0, 1.0, seed=bad, step_index=0)
        with pytest.raises(ValueError, match=r"seed"):
            zk.SamplingPlan(sig, noise.shape, sampler="euler_ancestral", seed=bad)


def test_nan_model_output_reaches_the_result_alike_on_every_backend():
    """Documented: F is not checked (that would wait for the device every step); NaN propagates, no error."""
    net = TinyNet(2, seed=1)
    noise = _rand(2, 2, 4, 4)

    def model(y, s):
        f = net(y, s)
        f[1, 0, 2, 2] = math.nan
        return f

    got = {b: zk.sample(model, noise, [INF, 5.0, 1.0, 0.0], sampler="dpmpp_2m", backend=b) for b in BACKENDS}
    for r in got.values():
        assert torch.isnan(r).any() and torch.isfinite(r[0]).all()
        assert torch.equal(torch.isnan(r), torch.isnan(got["torch"]))


# ------------------------------------------------------------------------------------------------------ fork


def _child_step(y, queue):
    r = zk.euler_step(y, y, 5.0, 1.0)  # no torch op on a large tensor here: PyTorch's own would hang
    words, normals = torch.empty(1 << 16, 4, dtype=torch.uint32), torch.empty(4, 1 << 14)
    _ext.C.philox4x32(words.data_ptr(), 1 << 16, 1, 2, 0, 0, 0, 0)  # the module's other long loops run here too
    seeds = torch.tensor([0, 1, 2, 3], dtype=torch.uint64)
    _ext.C.philox_normal(normals.data_ptr(), 4, 1 << 14, seeds.data_ptr(), 0, 0)
    queue.put((zk.get_num_threads(), r.y.numpy().tobytes()))


@pytest.mark.skipif(not _ext.available(), reason="the cpu kernels are not built")
@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork on this platform")
def test_a_child_forked_after_parallel_work_steps_on_the_parents_thread_count():
    """An OpenMP loop hangs in a child forked after the parent ran a parallel region; the kernels run no OpenMP
    region (their own pool, which the child starts anew), so after parallel PyTorch work and a parallel step in the
    parent, the child steps on the parent's thread count and gets the parent's bits (a hang fails on the queue's
    timeout instead of blocking)."""
    y = _rand(2, 4, 128, 128)  # several 16384-element chunks: the kernels run in parallel
    zk.set_num_threads(2)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.mul(_rand(8, 4, 256, 256), 2.0)  # a parallel region in PyTorch's OpenMP
        want = zk.euler_step(y, y, 5.0, 1.0).y.numpy().tobytes()  # and one on the kernels' pool
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_child_step, args=(y, queue))
        child.start()
        try:
            threads, got = queue.get(timeout=60)  # before the join: the child exits once its result is read
        except queue_module.Empty:
            pytest.fail("the forked child hung in the kernels")
        finally:
            child.join(10)
            if child.is_alive():
                child.kill()
                child.join()
        assert child.exitcode == 0
        assert threads == 2 and got == want
        assert zk.get_num_threads() == 2
    finally:
        zk.set_num_threads(None)
        torch.set_num_threads(torch_threads)
