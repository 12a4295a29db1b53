"""Schedules that end above sigma = 0 (the first part of a split schedule, ComfyUI's SplitSigmas): ``sample()`` stops
there and returns the variance-exploding latent x = y / c_in(sigma_last), k-diffusion's convention, and a second
``sample()`` from that x continues the run."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TinyNet

import zsnr_kernels as zk

INF = math.inf


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2s_ancestral"])
@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_two_halves_equal_the_whole_run(sampler, prediction):
    """Single-step and two-stage samplers keep nothing between steps: the halves are the whole run, to float64
    rounding of the state's round trip y -> x -> y at the split."""
    net = TinyNet(4, seed=1)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sig = zk.schedules.karras(10, 0.03, INF, sigma_max_finite=14.6)
    kw = dict(sampler=sampler, prediction=prediction, seed=[3, 4])
    whole = zk.sample(net, noise, sig, **kw)
    x = zk.sample(net, noise, sig[:5], **kw)
    split = float(sig[4])
    assert torch.allclose(x, zk.to_x(_state(net, noise, sig[:5], kw), split, prediction=prediction), rtol=0,
                          atol=1e-12)
    rest = zk.sample(net, x / split, sig[4:], **{**kw, "seed": [3, 4]}) if sampler == "euler" else None
    if rest is not None:  # (the noisy sampler's second half counts its steps from 0 again: other noise)
        torch.testing.assert_close(rest, whole, rtol=0, atol=1e-12)


def _state(net, noise, sig, kw):
    """The model input after the last step of ``sig``, by the step functions."""
    y, sigma = zk.initial_state(noise, sig[0], prediction=kw["prediction"])
    fn = zk.steps.step_function(kw["sampler"])
    for i in range(len(sig) - 1):
        r = fn(y, net(y, torch.full((y.shape[0],), float(sigma), dtype=torch.float64)), float(sig[i]),
               float(sig[i + 1]), prediction=kw["prediction"], seed=kw["seed"], step_index=i)
        if not r.complete:
            r = fn(r.y, net(r.y, torch.full((y.shape[0],), r.sigma, dtype=torch.float64)), float(sig[i]),
                   float(sig[i + 1]), first=r, prediction=kw["prediction"], seed=kw["seed"], step_index=i)
        y, sigma = r.y, r.sigma
    return y


def test_plan_ends_where_sample_does():
    net = TinyNet(4, seed=5, dtype=torch.float32)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    sig = zk.schedules.karras(8, 0.03, INF, sigma_max_finite=14.6)[:5]
    plan = zk.SamplingPlan(sig, noise.shape, sampler="dpmpp_2m")
    torch.testing.assert_close(plan.run(net, noise), zk.sample(net, noise, sig, sampler="dpmpp_2m"), rtol=0,
                               atol=0)


def test_final_sample_above_zero_and_at_inf():
    y = torch.randn(2, 3)
    torch.testing.assert_close(zk.final_sample(y, sigma=2.0), zk.to_x(y, 2.0))
    with pytest.raises(ValueError, match="sigma is inf"):
        zk.final_sample(y, sigma=INF)
    with pytest.raises(ValueError, match="sigma"):
        zk.final_sample(y, sigma=-1.0)
