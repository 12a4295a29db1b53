"""Parity with k-diffusion's samplers on finite schedules: same model, same sigmas, same noise (docs/design.md §4).

The k-diffusion model is its own ``DiscreteVDDPMDenoiser`` / ``VDenoiser`` wrapper around a network F(y, t); our
model is the same network called with the model input y and sigma (converted to the wrapper's t).  Tolerances
are the issue's: 1e-10 in float64, 1e-5 in float32.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TinyNet

import zsnr_kernels as zk

ALL_KD = ["euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m",
          "dpmpp_2m_sde", "dpmpp_3m_sde", "lms"]
NOISY = {"euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"}
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _sd_alphas_cumprod():
    return zk.schedules.alphas_cumprod(zk.schedules.betas("scaled_linear"))


def _setup(kdiff, schedule: str, dtype, steps: int = 12):
    sampling, external = kdiff
    net = TinyNet(4, seed=1)
    if schedule == "sd_discrete":
        kd_model = external.DiscreteVDDPMDenoiser(lambda y, t: net(y, t), _sd_alphas_cumprod(), quantize=False)
        sigmas = kd_model.get_sigmas(steps).to(dtype)

        def model(y, sigma):  # our model: the same network, conditioned on k-diffusion's t(sigma)
            return net(y, kd_model.sigma_to_t(sigma.to(dtype)))
    else:
        kd_model = external.VDenoiser(lambda y, t: net(y, torch.tan(t * math.pi / 2)))
        sigmas = sampling.get_sigmas_karras(steps, 0.03, 14.6, rho=7.0).to(dtype)

        def model(y, sigma):
            return net(y, sigma)
    return sampling, kd_model, model, sigmas


def _noise_pair(x, count):
    """Two identical explicit noise streams (k-diffusion's noise_sampler interface)."""
    g = torch.Generator().manual_seed(1234)
    zs = [torch.randn(x.shape, generator=g, dtype=x.dtype) for _ in range(count)]
    return iter(zs), iter(list(zs))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("schedule", ["sd_discrete", "karras"])
@pytest.mark.parametrize("sampler", ALL_KD)
def test_matches_k_diffusion(kdiff, sampler, schedule, dtype):
    sampling, kd_model, model, sigmas = _setup(kdiff, schedule, dtype)
    noise = torch.randn(2, 4, 9, 11, generator=torch.Generator().manual_seed(0), dtype=dtype)
    kw_kd, kw_zk = {}, {}
    if sampler in NOISY:
        a, b = _noise_pair(noise, 64)
        kw_kd["noise_sampler"] = lambda s, sn: next(a)
        kw_zk["noise_sampler"] = lambda s, sn: next(b)
    if sampler == "dpmpp_2m_sde":
        kw_kd["solver_type"] = kw_zk["solver_type"] = "heun" if schedule == "karras" else "midpoint"
    expected = getattr(sampling, f"sample_{sampler}")(kd_model, noise * sigmas[0], sigmas, disable=True, **kw_kd)
    got = zk.sample(model, noise, sigmas, sampler=sampler, **kw_zk)
    assert got.dtype == dtype
    err = (got - expected).abs().max().item()
    assert err <= TOL[dtype], f"{sampler}/{schedule}/{dtype}: max abs diff {err:.3g}"


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpm_2"])
def test_churn_matches_k_diffusion(kdiff, sampler):
    """EDM churn on every step (s_tmin=0): k-diffusion draws randn_like once per step, before the model call; we
    draw the next step's churn noise inside the update, in the same order, so one seeded stream serves both."""
    sampling, kd_model, model, sigmas = _setup(kdiff, "karras", torch.float64)
    noise = torch.randn(2, 4, 9, 11, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = noise * sigmas[0]
    torch.manual_seed(7)
    expected = getattr(sampling, f"sample_{sampler}")(kd_model, x, sigmas, disable=True, s_churn=2.0, s_noise=1.003)
    torch.manual_seed(7)
    got = zk.sample(model, noise, sigmas, sampler=sampler, s_churn=2.0, s_noise=1.003,
                    noise_sampler=lambda s, sn: torch.randn_like(noise))
    assert (got - expected).abs().max().item() <= 1e-10


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpm_2"])
@pytest.mark.parametrize("s_tmax", [float("inf"), 10.0], ids=["churn_from_step_0", "churn_folded_in_later"])
def test_churn_without_noise_matches_k_diffusion(kdiff, sampler, s_tmax):
    """s_noise = 0 (A1111's "sigma noise" 0): the churn draws no noise but still raises the noise level to
    sigma_hat, where the model is called on the unchanged x (the state y is rescaled)."""
    sampling, kd_model, model, sigmas = _setup(kdiff, "karras", torch.float64)
    noise = torch.randn(2, 4, 9, 11, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = getattr(sampling, f"sample_{sampler}")(kd_model, noise * sigmas[0], sigmas, disable=True, s_churn=2.0,
                                                     s_noise=0.0, s_tmax=s_tmax)
    got = zk.sample(model, noise, sigmas, sampler=sampler, s_churn=2.0, s_noise=0.0, s_tmax=s_tmax)
    assert (got - expected).abs().max().item() <= 1e-10


def test_callback_keys_match_k_diffusion(kdiff):
    sampling, kd_model, model, sigmas = _setup(kdiff, "karras", torch.float64, steps=5)
    noise = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    seen_kd, seen_zk = [], []
    sampling.sample_heun(kd_model, noise * sigmas[0], sigmas, disable=True, callback=seen_kd.append)
    zk.sample(model, noise, sigmas, sampler="heun", callback=seen_zk.append)
    assert len(seen_kd) == len(seen_zk) == 5
    for a, b in zip(seen_kd, seen_zk):
        assert set(a) <= set(b) and "y" in b
        assert a["i"] == b["i"] and float(a["sigma"]) == pytest.approx(b["sigma"], rel=1e-15)
        torch.testing.assert_close(b["denoised"], a["denoised"], atol=1e-10, rtol=0)
        torch.testing.assert_close(b["x"], a["x"], atol=1e-10, rtol=0)
