"""Exactness at sigma = inf (docs/design.md §2.3): a run from inf is the limit of runs from sigma_max = 1e4, 1e8, 1e16.

Same unit noise and the same noise stream (per-sample Philox seeds, indexed by step) for every sigma_max.
Single-step updates converge like 1/sigma_max; multistep ones like 1/log(sigma_max), because their correction
weight h/h_last decays only logarithmically.  Heun, DPM2 and DPM2-ancestral have no limit (the second-order
update over an infinite interval diverges), so their step from inf is Euler (ancestral) by definition.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TinyNet

import zsnr_kernels as zk

INF = math.inf
SINGLE = ["euler", "ddim", "ddpm", "euler_ancestral", "dpmpp_2s_ancestral", "lms"]
MULTI = ["dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde"]
SIGMA_MAX = [1e4, 1e8, 1e16]


@pytest.fixture(scope="module")
def setup():
    net = TinyNet(4, seed=2)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rest = zk.schedules.karras(10, 0.03, 14.6)
    return net, noise, rest


def _run(setup, sampler, sigma_max, **kw):
    net, noise, rest = setup
    sigmas = torch.cat([torch.tensor([sigma_max], dtype=torch.float64), rest])
    return zk.sample(net, noise, sigmas, sampler=sampler, seed=[11, 12], **kw)


def _gaps(setup, sampler, **kw):
    at_inf = _run(setup, sampler, INF, **kw)
    assert torch.isfinite(at_inf).all()
    return [(_run(setup, sampler, s, **kw) - at_inf).abs().max().item() for s in SIGMA_MAX]


@pytest.mark.parametrize("sampler", SINGLE)
def test_single_step_limit_like_one_over_sigma_max(setup, sampler):
    gaps = _gaps(setup, sampler, **({"eta": 0.0} if sampler == "ddim" else {}))
    assert gaps[0] > gaps[1] > gaps[2] or gaps[2] < 1e-13, gaps
    assert gaps[1] < 1e-3 * gaps[0], gaps  # sigma_max x 1e4 -> gap / ~1e4
    assert gaps[2] < 1e-12, gaps


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_dpmpp_2s_ancestral_limit_for_each_eta(setup, eta):
    """eta < 1: the midpoint goes to inf and the limit is euler_ancestral; eta = 1: the midpoint is sigma' at
    every sigma and the limit keeps both evaluations.  Both are what the run from inf computes.  For eta < 1 the
    model is evaluated at sigma_mid ~ sqrt(sigma_max), so the gap shrinks like sigma_max^(-1/2)."""
    gaps = _gaps(setup, "dpmpp_2s_ancestral", eta=eta)
    rate = 1e-3 if eta == 1.0 else 3e-2
    assert gaps[1] < rate * gaps[0] and (gaps[2] < rate * gaps[1] or gaps[2] < 1e-13), gaps


@pytest.mark.parametrize("sampler", MULTI)
def test_multistep_limit_like_one_over_log_sigma_max(setup, sampler):
    gaps = _gaps(setup, sampler)
    assert gaps[0] > gaps[1] > gaps[2], gaps
    scaled = [g * math.log(s) for g, s in zip(gaps, SIGMA_MAX)]  # ~ constant if gap ~ 1/log(sigma_max)
    assert max(scaled) < 2.5 * min(scaled), scaled


@pytest.mark.parametrize("sampler,first", [("heun", "euler"), ("dpm_2", "euler"),
                                           ("dpm_2_ancestral", "euler_ancestral")])
def test_two_stage_samplers_take_an_euler_step_from_inf(setup, sampler, first):
    net, noise, rest = setup
    zs = [torch.randn(noise.shape, generator=torch.Generator().manual_seed(100 + k), dtype=noise.dtype)
          for k in range(len(rest))]
    sigmas = torch.cat([torch.tensor([INF], dtype=torch.float64), rest])
    stream = iter(zs)
    full = zk.sample(net, noise, sigmas, sampler=sampler, noise_sampler=lambda s, sn: next(stream))
    stream = iter(zs)
    sigma1 = float(rest[0])
    step = getattr(zk, f"{first}_step")
    kw = {"noise": lambda: next(stream)} if first == "euler_ancestral" else {}
    y1 = step(noise, net(noise, torch.full((2,), INF, dtype=torch.float64)), INF, sigma1, **kw).y
    s1 = zk.parameterization("v").noise_scale(sigma1)
    split = zk.sample(net, y1 / s1, rest, sampler=sampler, noise_sampler=lambda s, sn: next(stream))
    assert (full - split).abs().max().item() < 1e-12


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m"])
def test_k_diffusion_is_nan_at_inf_where_we_are_exact(kdiff, setup, sampler):
    """The problem this library exists for: k-diffusion's x = noise * sigma_max is inf at zero SNR."""
    sampling, external = kdiff
    net, noise, rest = setup
    sigmas = torch.cat([torch.tensor([INF], dtype=torch.float64), rest])
    kd_model = external.VDenoiser(lambda y, t: net(y, torch.tan(t * math.pi / 2)))
    with torch.no_grad():
        theirs = getattr(sampling, f"sample_{sampler}")(kd_model, noise * sigmas[0], sigmas, disable=True)
    assert torch.isnan(theirs).all()
    ours = zk.sample(net, noise, sigmas, sampler=sampler)
    assert torch.isfinite(ours).all()
