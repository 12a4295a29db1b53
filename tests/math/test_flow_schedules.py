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
