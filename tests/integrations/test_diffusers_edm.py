"""``ZSNREDMEulerScheduler`` and ``ZSNREDMDPMSolverMultistepScheduler`` against diffusers' EDM schedulers, and their
start at sigma_max = inf.

Same loop, net and tolerances as tests/integrations/test_diffusers_schedulers.py.  diffusers builds EDM grids in
float32 (Euler: float64, then cast), so sigmas and the c_noise timesteps agree to float32 rounding (measured 2e-7);
model inputs and results to 1e-5 relative (measured 6e-6 and 8e-7).  The config walk and the switch from other
configs are tests/integrations/test_diffusers_contract.py's, which take every class of ``SCHEDULERS``.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TinyNet
from test_diffusers_schedulers import _loop, _noise

import zsnr_kernels as zk

diffusers = pytest.importorskip("diffusers")
zd = pytest.importorskip("zsnr_kernels.diffusers")

EDM = ["EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"]
DPM_OPTIONS = [{"algorithm_type": "sde-dpmsolver++"}, {"solver_order": 3}, {"solver_type": "heun"},
               {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"},
               {"solver_order": 3, "euler_at_final": True}]


def _cases():
    for name in EDM:
        for extra in [{}, {"sigma_schedule": "exponential"}, {"final_sigmas_type": "sigma_min"}, {"rho": 5.0,
                      "sigma_data": 1.0}] + (DPM_OPTIONS if "DPM" in name else []):
            yield name, extra


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize(("name", "extra"), list(_cases()))
def test_edm_parity(name, extra, prediction):
    """Timesteps (c_noise), every model input and the result equal diffusers' (SDE: same generator draws)."""
    ref = getattr(diffusers, name)(prediction_type=prediction, **extra)
    ours = zd.SCHEDULERS[name].from_config(ref.config)
    for s in (ref, ours):
        s.set_timesteps(10)
    torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.sigmas, ref.sigmas.double(), rtol=5e-6, atol=0)
    assert ours.init_noise_sigma == pytest.approx(ref.init_noise_sigma / math.hypot(ref.config.sigma_max,
                                                                                    ref.config.sigma_data))
    net, noise = TinyNet(4, seed=3, dtype=torch.float32), _noise()
    a, ins_a = _loop(ref, net, noise, seed=5)
    b, ins_b = _loop(ours, net, noise, seed=5)
    for u, v in [(a, b), *zip(ins_a, ins_b)]:
        assert (u - v).abs().max().item() <= 1e-5 * max(u.abs().max().item(), 1.0)


def test_edm_euler_custom_ramp_and_given_denoised():
    """set_timesteps(sigmas=ramp) (diffusers' ramp in [0, 1], not noise levels) and step(pred_original_sample=)
    (the step from that D) as diffusers."""
    ramp = torch.tensor([0.0, 0.3, 0.5, 0.9, 1.0])
    ref, ours = diffusers.EDMEulerScheduler(), zd.ZSNREDMEulerScheduler()
    for s in (ref, ours):
        s.set_timesteps(sigmas=ramp)
    torch.testing.assert_close(ours.sigmas, ref.sigmas.double(), rtol=1e-6, atol=0)
    d = _noise(seed=9)
    net, noise = TinyNet(4, seed=3, dtype=torch.float32), _noise()
    a, _ = _loop(ref, net, noise, pred_original_sample=d)
    b, _ = _loop(ours, net, noise, pred_original_sample=d)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", EDM)
def test_edm_from_inf(name):
    """sigma_max = inf (diffusers' grids are NaN there): the schedule is inf, then the grid from sigma_max_finite;
    the first model input is the noise itself at timestep c_noise = inf; the run is the library's sampler on those
    sigmas (EDM's "epsilon" output is the v-prediction of -F, with sigma_data)."""
    with pytest.raises(ValueError, match="sigma_max_finite"):
        zd.SCHEDULERS[name](sigma_max=math.inf)
    sched = zd.SCHEDULERS[name](sigma_max=math.inf, sigma_max_finite=80.0)
    sched.set_timesteps(8)
    want = zk.schedules.karras(8, 0.002, math.inf, sigma_max_finite=80.0)
    torch.testing.assert_close(sched.sigmas, want, rtol=1e-12, atol=0)
    assert sched.timesteps[0] == math.inf and sched.init_noise_sigma == 1.0
    net, noise = TinyNet(4, seed=11), _noise(torch.float64)
    seen = []

    def model(y, t):
        seen.append(y)
        return net(y, torch.atan(t))  # a net that takes t = inf

    out, _ = _loop(sched, model, noise)
    assert torch.equal(seen[0], noise) and torch.isfinite(out).all()
    sampler = "euler" if "Euler" in name else "dpmpp_2m"
    t_of = dict(zip(sched.sigmas.tolist(), sched.timesteps))
    x0 = zk.sample(lambda y, s: -model(y, t_of[float(s[0])]), noise, sched.sigmas, sampler=sampler, prediction="v",
                  sigma_data=0.5)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-12)
