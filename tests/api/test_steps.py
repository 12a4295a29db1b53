"""The step-level API and sample(): per-sample sigmas and seeds, dtypes, guidance rescale spaces, churn
quantization, and bad input (docs/design.md §2.5, §2.7, §2.9, §4)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TinyNet

import zsnr_kernels as zk
from zsnr_kernels.backends import ext as _ext

INF = math.inf


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("step", ["euler_step", "euler_ancestral_step", "dpmpp_2m_sde_step"])
def test_per_sample_sigmas_equal_one_call_per_sample(step):
    y, f = _rand(3, 2, 5, 5, seed=1), _rand(3, 2, 5, 5, seed=2)
    sig, nxt = [INF, 4.0, 0.7], [3.0, 1.0, 0.0]
    fn = getattr(zk, step)
    kw = {"seed": [5, 6, 7], "step_index": 3} if step != "euler_step" else {}
    batched = fn(y, f, torch.tensor(sig, dtype=torch.float64), torch.tensor(nxt, dtype=torch.float64), **kw)
    for i in range(3):
        kw_i = {"seed": kw["seed"][i], "step_index": 3} if kw else {}
        one = fn(y[i:i + 1], f[i:i + 1], sig[i], nxt[i], **kw_i)
        torch.testing.assert_close(batched.y[i:i + 1], one.y, atol=1e-15, rtol=0)
        assert float(batched.sigma[i]) == one.sigma


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_3m_sde", "heun"])
def test_batch_with_per_sample_seeds_equals_batches_of_one(sampler):
    net = TinyNet(2, seed=0)
    noise = _rand(4, 2, 6, 6, seed=3)
    sigmas = torch.cat([torch.tensor([INF], dtype=torch.float64), zk.schedules.karras(6, 0.05, 10.0)])
    kw = {"s_churn": 1.0} if sampler == "heun" else {}
    seeds = [10, 20, 30, 2**63 + 5]
    batch = zk.sample(net, noise, sigmas, sampler=sampler, seed=seeds, **kw)
    for i, s in enumerate(seeds):
        one = zk.sample(net, noise[i:i + 1], sigmas, sampler=sampler, seed=s, **kw)
        torch.testing.assert_close(batch[i:i + 1], one, atol=1e-14, rtol=0)


def test_seed_none_draws_from_torch_generator():
    net = TinyNet(2)
    noise = _rand(2, 2, 4, 4)
    sig = zk.schedules.karras(5, 0.1, 10.0)
    torch.manual_seed(0)
    a = zk.sample(net, noise, sig, sampler="euler_ancestral")
    torch.manual_seed(0)
    b = zk.sample(net, noise, sig, sampler="euler_ancestral")
    c = zk.sample(net, noise, sig, sampler="euler_ancestral")
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_storage_close_to_float64(dtype):
    net = TinyNet(4, seed=1)
    noise = _rand(1, 4, 16, 16, seed=4)
    sigmas = torch.cat([torch.tensor([INF], dtype=torch.float64), zk.schedules.karras(8, 0.03, 14.6)])
    ref = zk.sample(net, noise, sigmas, sampler="dpmpp_2m")
    got = zk.sample(lambda y, s: net(y, s).to(dtype), noise.to(dtype), sigmas, sampler="dpmpp_2m")
    assert got.dtype == dtype
    # error bound: a few ulps of the dtype at unit scale per step; bf16 has 8 bits of mantissa
    tol = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    assert (got.double() - ref).abs().max().item() < tol


def test_rescale_spaces():
    y, fc, fu = _rand(2, 3, 6, 6, seed=1), _rand(2, 3, 6, 6, seed=2) * 2, _rand(2, 3, 6, 6, seed=3)
    w, phi, sigma = 5.0, 0.7, 2.5
    out = lambda space, pred: zk.euler_step(y, (fc, fu), sigma, 1.0, prediction=pred, guidance_scale=w,  # noqa
                                            guidance_rescale=phi, rescale_space=space).denoised
    # for a v-prediction model the v space is its output space
    torch.testing.assert_close(out("v", "v"), out("output", "v"), atol=1e-13, rtol=0)
    # x0 space: rescale the denoised predictions themselves
    pz = zk.parameterization("x0")
    p, q = pz.denoise_coeffs(sigma)
    d_c, d_cfg = p * y + q * fc, p * y + q * (fu + w * (fc - fu))
    std = lambda t: t.flatten(1).std(1, correction=0).view(-1, 1, 1, 1)  # noqa: E731
    expected = d_cfg * (phi * std(d_c) / std(d_cfg) + 1 - phi)
    torch.testing.assert_close(out("x0", "x0"), expected, atol=1e-13, rtol=0)


def test_rescale_guard_when_guided_output_is_constant():
    """diffusers divides by std(F) = 0 and returns NaN; the factor is 1 there."""
    y = _rand(1, 2, 4, 4)
    fc = torch.full_like(y, 0.5)
    r = zk.euler_step(y, (fc, fc.clone()), 3.0, 1.0, guidance_scale=7.5, guidance_rescale=0.7)
    assert torch.isfinite(r.y).all()
    torch.testing.assert_close(r.denoised, zk.euler_step(y, fc, 3.0, 1.0).denoised)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("space", ["output", "x0"])
@pytest.mark.parametrize("offset,std", [(0.0, 1.0), (100.0, 0.1), (100.0, 0.01), (0.3, 0.0)])
def test_rescale_statistics_keep_their_precision_for_offset_and_constant_outputs(backend, space, offset, std):
    """Outputs whose mean dwarfs their spread (and y offset too, for the x0 space), and a constant output
    (std 0: the factor is 1): float32 steps agree with the float64 reference to float32 rounding.  The statistics
    sum each tensor less its first element (combine.h RescaleSum); summed as they are, offset 100 and std 0.01
    left y off by 0.59, and the float32 reference's std of a constant (~1e-8, not 0) off by 0.45."""
    if backend == "cpu" and not _ext.available():
        pytest.skip(f"the cpu backend is not built: {_ext.why_unavailable()}")
    y = (_rand(2, 4, 16, 16, seed=1) + (50.0 if space == "x0" else 0.0)).float()
    fc, fu = ((offset + std * _rand(2, 4, 16, 16, seed=s)).float() for s in (2, 3))
    kw = dict(guidance_scale=7.5, guidance_rescale=0.7, rescale_space=space, prediction="eps")
    want = zk.euler_step(y.double(), (fc.double(), fu.double()), 5.0, 3.0, backend="torch", **kw).y
    got = zk.euler_step(y, (fc, fu), 5.0, 3.0, backend=backend, **kw).y
    scale = want.abs().max().item()
    assert (got.double() - want).abs().max().item() <= 32 * torch.finfo(torch.float32).eps * max(scale, 1.0)


def test_churn_sigma_hat_is_quantized_to_the_model_table():
    table = zk.schedules.DiscreteSchedule.from_betas("scaled_linear").train_sigmas
    seen = []

    def model(y, sigma):
        seen.append(float(sigma[0]))
        return torch.zeros_like(y)

    sig = zk.schedules.karras(8, float(table[0]), float(table[-1]))
    sig = torch.cat([zk.schedules.quantize(sig[:-1], table), sig[-1:]])
    zk.sample(model, _rand(1, 1, 4, 4), sig, sampler="heun", s_churn=4.0, model_sigmas=table, seed=1)
    assert all(any(abs(s - float(t)) <= 1e-12 * s for t in table) for s in seen)
    assert any(s not in sig.tolist() for s in seen)  # churn really moved some sigma_hat


def test_two_stage_api():
    y, f = _rand(1, 2, 3, 3), _rand(1, 2, 3, 3, seed=1)
    first = zk.heun_step(y, f, 5.0, 2.0)
    assert not first.complete and first.sigma == 2.0
    second = zk.heun_step(first.y, f, 5.0, 2.0, first=first)
    assert second.complete
    with pytest.raises(ValueError, match="first.complete"):
        zk.heun_step(y, f, 5.0, 2.0, first=second)
    assert zk.heun_step(y, f, INF, 2.0).complete and zk.heun_step(y, f, 5.0, 0.0).complete


def test_callback_x_is_none_at_inf():
    seen = []
    sig = torch.cat([torch.tensor([INF], dtype=torch.float64), zk.schedules.karras(3, 0.1, 5.0)])
    zk.sample(TinyNet(2), _rand(1, 2, 3, 3), sig, callback=seen.append)
    assert seen[0]["x"] is None and seen[0]["sigma"] == INF and torch.isfinite(seen[0]["y"]).all()
    assert all(d["x"] is not None for d in seen[1:])


# ------------------------------------------------------------------------------------------------- bad input

GOOD = torch.tensor([10.0, 1.0, 0.0], dtype=torch.float64)


@pytest.mark.parametrize("sigmas,match", [
    (torch.tensor([1.0, 10.0, 0.0]), "strictly descending"),
    (torch.tensor([10.0]), "at least 2"),  # (one ending above 0 is the first part of a split schedule)
    (torch.tensor([10.0, float("nan"), 0.0]), "NaN"),
    (torch.tensor([10.0, -1.0, 0.0]), ">= 0"),
    (torch.tensor([[10.0, 0.0]]), "1-D"),
    (torch.tensor([10.0, INF, 0.0]), "only sigmas\\[0\\]"),
])
def test_bad_sigmas(sigmas, match):
    noise = _rand(1, 2, 3, 3)
    before = noise.clone()
    with pytest.raises(ValueError, match=match):
        zk.sample(TinyNet(2), noise, sigmas)
    assert torch.equal(noise, before)


def test_bad_model_outputs_name_the_argument():
    y = _rand(1, 2, 3, 3)
    with pytest.raises(ValueError, match="model_output.*shape"):
        zk.euler_step(y, _rand(1, 2, 3, 4), 2.0, 1.0)
    with pytest.raises(TypeError, match="model_output.*dtype"):
        zk.euler_step(y, y.float(), 2.0, 1.0)
    with pytest.raises(ValueError, match="guidance_scale.*pair"):
        zk.euler_step(y, y, 2.0, 1.0, guidance_scale=7.5)
    with pytest.raises(ValueError, match="guidance_scale.*pair"):
        zk.sample(lambda y, s: y, y, GOOD, guidance_scale=7.5)
    with pytest.raises(TypeError, match="noise"):
        zk.sample(TinyNet(2), [1.0], GOOD)


def test_eps_at_inf_is_refused_with_the_fix():
    y = _rand(1, 2, 3, 3)
    sig = torch.tensor([INF, 1.0, 0.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="eps.*(v|x0)"):
        zk.sample(TinyNet(2), y, sig, prediction="eps")
    with pytest.raises(ValueError, match="eps"):
        zk.euler_step(y, y, INF, 1.0, prediction="eps")


@pytest.mark.parametrize("kw,exc,match", [
    ({"sampler": "nope"}, ValueError, "sampler"),
    ({"prediction": "epsilon"}, ValueError, "prediction"),
    ({"sigma_data": 0.0}, ValueError, "sigma_data"),
    ({"rescale_space": "latent", "guidance_rescale": 0.5}, ValueError, "rescale_space"),
    ({"guidance_rescale": 1.5}, ValueError, "guidance_rescale"),
    ({"eta": -1.0, "sampler": "euler_ancestral"}, ValueError, "eta"),
    ({"sampler": "ddim", "eta": 1.5}, ValueError, "eta"),
    ({"solver_type": "rk4", "sampler": "dpmpp_2m_sde"}, ValueError, "solver_type"),
    ({"backend": "tpu"}, ValueError, "backend"),
    ({"backend": "cuda"}, ValueError, "cuda"),
    ({"seed": [1, 2, 3], "sampler": "euler_ancestral"}, ValueError, "seed"),
])
def test_bad_options(kw, exc, match):
    with pytest.raises(exc, match=match):
        zk.sample(TinyNet(2), _rand(2, 2, 3, 3), GOOD, **kw)


def test_noise_needed_but_missing():
    y = _rand(1, 2, 3, 3)
    with pytest.raises(ValueError, match="noise=.*seed="):
        zk.euler_ancestral_step(y, y, 2.0, 1.0)
    with pytest.raises(ValueError, match="step_index"):
        zk.euler_ancestral_step(y, y, 2.0, 1.0, seed=3)


@pytest.mark.parametrize("sampler", list(zk.SAMPLERS))
def test_one_step_schedule_from_inf_returns_the_first_denoised(sampler):
    """[inf, 0]: every sampler returns D(noise, inf) (k-diffusion's SDE samplers fail here: h is unbound)."""
    net = TinyNet(2, seed=4)
    noise = _rand(2, 2, 5, 5, seed=8)
    got = zk.sample(net, noise, torch.tensor([INF, 0.0], dtype=torch.float64), sampler=sampler, seed=0)
    p, q = zk.parameterization("v").denoise_coeffs(INF)
    expected = p * noise + q * net(noise, torch.full((2,), INF, dtype=torch.float64))
    torch.testing.assert_close(got, expected, atol=1e-15, rtol=0)


def test_one_int_seed_gives_sample_i_the_seed_plus_i():
    net = TinyNet(2, seed=1)
    noise = _rand(3, 2, 4, 4, seed=5)
    sig = torch.cat([torch.tensor([INF], dtype=torch.float64), zk.schedules.karras(4, 0.1, 10.0)])
    batch = zk.sample(net, noise, sig, sampler="euler_ancestral", seed=40)
    for i in range(3):
        one = zk.sample(net, noise[i:i + 1], sig, sampler="euler_ancestral", seed=40 + i)
        torch.testing.assert_close(batch[i:i + 1], one, atol=1e-14, rtol=0)


def test_progress_bar(capsys):
    """tqdm as in k-diffusion's samplers: off by default and with disable=True, on with disable=False."""
    sig = zk.schedules.karras(3, 0.1, 5.0)
    zk.sample(TinyNet(2), _rand(1, 2, 3, 3), sig, disable=False)
    assert "3/3" in capsys.readouterr().err
    zk.sample(TinyNet(2), _rand(1, 2, 3, 3), sig)
    zk.sample(TinyNet(2), _rand(1, 2, 3, 3), sig, disable=True)
    assert capsys.readouterr().err == ""


def test_second_stage_needs_the_per_sample_sigmas_of_the_first():
    y = _rand(2, 2, 3, 3)
    first = zk.heun_step(y, torch.zeros_like(y), [5.0, 4.0], [2.0, 1.0])
    assert not first.complete
    with pytest.raises(ValueError, match="per-sample sigmas of the first"):
        zk.heun_step(first.y, torch.zeros_like(y), 5.0, 2.0, first=first)
