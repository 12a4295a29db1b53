"""ComfyUI's schedulers, Align Your Steps and the Beta quantile, against their peer definitions.

The oracles are independent transcriptions of ComfyUI's code (comfy/samplers.py, comfy_extras/
nodes_align_your_steps.py) on its own terms: a ModelSamplingDiscrete-like table in float32, torch.linspace in
float32, numpy's interp; the library computes in float64, so they agree to float32 rounding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from zsnr_kernels import schedules as S

SD = S.DiscreteSchedule.from_betas("scaled_linear")
ZSNR = S.DiscreteSchedule.from_betas("scaled_linear", zero_terminal_snr=True)
STEPS = [1, 2, 7, 10, 25, 61, 1000]


class ComfyModelSampling:
    """The parts of ComfyUI's ModelSamplingDiscrete the schedulers read (float32 buffers, as ComfyUI keeps them)."""

    def __init__(self, sched: S.DiscreteSchedule):
        self.sigmas = sched.train_sigmas.float()
        self.log_sigmas = self.sigmas.log()
        self.sigma_min, self.sigma_max = self.sigmas[0], self.sigmas[-1]

    def timestep(self, sigma):
        return (sigma.log() - self.log_sigmas[:, None]).abs().argmin(dim=0).view(sigma.shape)

    def sigma(self, timestep):
        t = torch.clamp(timestep.float(), min=0, max=len(self.sigmas) - 1)
        low, high = t.floor().long(), t.ceil().long()
        w = t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()


def comfy_simple(s, steps):
    ss = len(s.sigmas) / steps
    return [float(s.sigmas[-(1 + int(x * ss))]) for x in range(steps)] + [0.0]


def comfy_ddim(s, steps):
    sigs, x, ss = [], 1, max(len(s.sigmas) // steps, 1)
    while x < len(s.sigmas):
        sigs.append(float(s.sigmas[x]))
        x += ss
    return sigs[::-1] + [0.0]


def comfy_normal(s, steps, sgm):
    start, end = s.timestep(s.sigma_max), s.timestep(s.sigma_min)
    ts = torch.linspace(start, end, steps + 1)[:-1] if sgm else torch.linspace(start, end, steps)
    return [float(s.sigma(t)) for t in ts] + [0.0]


def comfy_beta(s, steps, alpha=0.6, beta=0.6):
    from scipy import stats

    total = len(s.sigmas) - 1
    ts = np.rint(stats.beta.ppf(1 - np.linspace(0, 1, steps, endpoint=False), alpha, beta) * total)
    sigs, last = [], -1
    for t in ts:
        if t != last:
            sigs.append(float(s.sigmas[int(t)]))
        last = t
    return sigs + [0.0]


def close(got, want, rtol=2e-6):
    want = torch.tensor(want, dtype=torch.float64)
    assert got.dtype == torch.float64 and got.shape == want.shape, (got.shape, want.shape)
    torch.testing.assert_close(got, want, rtol=rtol, atol=0.0)


@pytest.mark.parametrize("steps", STEPS)
def test_table_schedulers_equal_comfyui(steps):
    s = ComfyModelSampling(SD)
    close(SD.simple(steps), comfy_simple(s, steps))
    close(SD.ddim_uniform(steps), comfy_ddim(s, steps))
    close(SD.normal(steps), comfy_normal(s, steps, False), rtol=2e-5)  # float32 timesteps in ComfyUI
    close(SD.normal(steps, sgm=True), comfy_normal(s, steps, True), rtol=2e-5)
    close(SD.beta(steps), comfy_beta(s, steps))
    assert SD.comfy("sgm_uniform", steps).equal(SD.normal(steps, sgm=True))


def test_ddim_uniform_may_return_more_steps_as_comfyui_does():
    assert len(SD.ddim_uniform(7)) == 8 + 1


@pytest.mark.parametrize("ab", [(0.6, 0.6), (0.5, 0.7), (2.0, 3.0), (1.0, 1.0)])
def test_beta_quantile_equals_scipy(ab):
    from scipy import stats

    a, b = ab
    qs = np.linspace(0, 1, 41)
    ours = np.array([S.beta_ppf(q, a, b) for q in qs])
    np.testing.assert_allclose(ours, stats.beta.ppf(qs, a, b), rtol=1e-12, atol=1e-14)
    for x in (1e-9, 0.2, 0.5, 0.93, 1 - 1e-9):
        assert S.betainc(a, b, x) == pytest.approx(stats.beta.cdf(x, a, b), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("n", [1, 2, 10, 30])
def test_kl_optimal_and_linear_quadratic_formulas(n):
    smin, smax = SD.sigma_min, SD.sigma_max
    w = [i / (n - 1) if n > 1 else 0.0 for i in range(n)]
    close(S.kl_optimal(n, smin, smax), [math.tan(v * math.atan(smin) + (1 - v) * math.atan(smax)) for v in w] + [0.0],
          rtol=1e-12)
    # ComfyUI's linear_quadratic_schedule, transcribed
    if n == 1:
        sched = [1.0, 0.0]
    else:
        lin, thr = n // 2, 0.025
        diff = lin - thr * n
        quad = n - lin
        qc, lc = diff / (lin * quad**2), thr / lin - 2 * diff / quad**2
        sched = [1.0 - x for x in [i * thr / lin for i in range(lin)]
                 + [qc * i**2 + lc * i + qc * lin**2 for i in range(lin, n)] + [1.0]]
    close(S.linear_quadratic(n, 1.0), sched, rtol=1e-12)


# ComfyUI's NOISE_LEVELS (comfy_extras/nodes_align_your_steps.py), as it tabulates them
COMFY_AYS = {
    "sd1": [14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092, 0.9642583904,
            0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582],
    "sdxl": [14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141, 0.5550693289,
             0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582],
    "svd": [700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002],
}


@pytest.mark.parametrize("model", S.AYS_MODELS)
@pytest.mark.parametrize("steps", [10, 4, 25])
def test_align_your_steps_equals_comfyui(model, steps):
    levels = np.array(COMFY_AYS[model])
    if steps + 1 != len(levels):  # ComfyUI's loglinear_interp
        levels = np.exp(np.interp(np.linspace(0, 1, steps + 1), np.linspace(0, 1, len(levels)),
                                  np.log(levels[::-1])))[::-1].copy()
    levels[-1] = 0
    close(S.align_your_steps(steps, model), levels.tolist(), rtol=1e-8)  # ComfyUI prints 10 decimals


@pytest.mark.parametrize("steps", [1, 2, 10, 25])
@pytest.mark.parametrize("name", S.COMFY_SCHEDULERS + ("ays_sd1", "ays_sdxl"))
def test_zero_snr_schedules_start_at_inf_without_nan(name, steps):
    sig = (S.align_your_steps(steps, name[4:], ZSNR.train_sigmas) if name.startswith("ays")
           else ZSNR.comfy(name, steps))
    assert not torch.isnan(sig).any()
    assert sig[-1] == 0 and (sig[:-1] > 0).all() and (sig[1:] < sig[:-1]).all()
    if name != "ddim_uniform":  # diffusers' leading spacing's twin: it never reaches the last timestep
        assert sig[0] == math.inf
        assert torch.isfinite(sig[1:]).all()
    else:
        assert torch.isfinite(sig).all()


def test_zero_snr_ays_is_the_models_own_table_at_the_published_timesteps():
    sig = S.align_your_steps(10, "sd1", ZSNR.train_sigmas)
    ts = list(S.AYS_TIMESTEPS["sd1"])
    assert sig[0] == math.inf
    close(sig[1:-1], ZSNR.train_sigmas[ts[1:-1]].tolist(), rtol=0)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="scheduler"):
        SD.comfy("uniform", 10)
    with pytest.raises(ValueError, match="model"):
        S.align_your_steps(10, "sd3")
    with pytest.raises(ValueError, match="sigma_max_finite"):
        S.kl_optimal(10, 0.03, math.inf)
    with pytest.raises(ValueError, match="linear_steps"):
        S.linear_quadratic(10, 1.0, linear_steps=10)
    with pytest.raises(ValueError, match="alpha"):
        SD.beta(10, alpha=0.0)
