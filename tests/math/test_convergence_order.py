"""Convergence at the sampler's order against the exact probability-flow ODE solution (docs/design.md §4).

Gaussian data x0 ~ N(mean, diag(std^2)) has a closed-form denoiser and ODE solution (zsnr_kernels.tools.models).  On a
Karras rho=7 schedule (80 -> 0.002, then 0) the max-abs error falls like N^-order for N = 8..64.  Measured slopes
(least squares over N = 8, 16, 32, 64, float64, this seed):

    finite start (sigma_max = 80):                  euler 0.99, ddim 0.99, heun 2.22, dpm_2 2.19, dpmpp_2m 2.11,
                                                    lms 3.02 (order 4, not yet asymptotic at N <= 64)
    from inf, against "Euler step inf -> 80, then exact":  euler 1.04, ddim 1.04, heun 2.35, dpm_2 2.34,
                                                    dpmpp_2m 2.12, lms 3.11
    from inf, against exact_sample:                 euler 1.04, heun 2.40, dpm_2 2.43, dpmpp_2m 2.18, lms 2.85
    dpmpp_sde (eta = 0): finite 1.98, from inf against "Euler step inf -> 80, then exact" 2.09, against exact 2.00
    x0 and flow prediction give the same numbers as v (to rounding).

From sigma = inf every sampler's first step is Euler (§2.3).  For the Gaussian, Euler from inf lands exactly on
x(sigma_1) = mean + sigma_1 * noise, which differs from the exact x(sigma_1) = mean + sqrt(std^2 + sigma_1^2) noise
by O(std^2 / sigma_1).  With sigma_1 = 80 fixed, the error against ``exact_sample`` therefore decreases with N at the
sampler's order down to a floor std * |noise| * (1 - sigma_1 / sqrt(std^2 + sigma_1^2)) (1.5e-3 here), reached by
the second-order samplers around N = 128 and by lms earlier; a schedule whose sigma_1 grows with N removes it.
"""

from __future__ import annotations

import math

import pytest
import torch

import zsnr_kernels as zk
from zsnr_kernels import schedules
from zsnr_kernels.tools.models import GaussianModel, GuidedPair

NS = (8, 16, 32, 64)
SIGMA_MAX, SIGMA_MIN = 80.0, 0.002
ORDER_BANDS = {1: (0.8, 1.3), 2: (1.7, 2.6), 4: (2.5, 4.5)}  # lms: order 4, pre-asymptotic for N <= 64
SAMPLERS = {"euler": 1, "ddim": 1, "heun": 2, "dpm_2": 2, "dpmpp_2m": 2, "res_multistep": 2, "lms": 4,
            "dpmpp_sde": 2}  # dpmpp_sde at eta = 0: DPM-Solver++(2S), its midpoint stage


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    latent = (4, 8, 8)  # 256 elements per sample
    std = 0.2 + 1.8 * torch.rand(latent, generator=g, dtype=torch.float64)  # mixed 0.2 .. 2
    mean = 0.5 * torch.randn(latent, generator=g, dtype=torch.float64)
    noise = torch.randn((2,) + latent, generator=g, dtype=torch.float64)
    return mean, std, noise


def _slope(ns, errs) -> float:
    """Least-squares slope of -log(err) against log(N)."""
    lx = torch.tensor([math.log(n) for n in ns], dtype=torch.float64)
    ly = torch.tensor([math.log(e) for e in errs], dtype=torch.float64)
    lx = lx - lx.mean()
    return -float((lx * (ly - ly.mean())).sum() / (lx * lx).sum())


def _errors(model, noise, sampler, prediction, ref, from_inf: bool, ns=NS):
    errs = []
    for n in ns:
        if from_inf:
            sigmas = schedules.karras(n, SIGMA_MIN, math.inf, sigma_max_finite=SIGMA_MAX)
        else:
            sigmas = schedules.karras(n, SIGMA_MIN, SIGMA_MAX)
        out = zk.sample(model, noise, sigmas, sampler=sampler, prediction=prediction, eta=0.0, backend="torch")
        assert out.dtype == torch.float64 and torch.isfinite(out).all()
        errs.append((out - ref).abs().max().item())
    return errs


def _check_order(errs, order, label):
    assert all(b < a for a, b in zip(errs, errs[1:])), f"{label}: error not decreasing: {errs}"
    lo, hi = ORDER_BANDS[order]
    slope = _slope(NS, errs)
    assert lo <= slope <= hi, f"{label}: slope {slope:.2f} outside [{lo}, {hi}] (errors {errs})"


CASES = [(s, "v") for s in SAMPLERS] + [(s, p) for s in ("euler", "heun") for p in ("x0", "flow")]


@pytest.mark.parametrize("sampler,prediction", CASES)
def test_order_from_finite_sigma_max(problem, sampler, prediction):
    mean, std, noise = problem
    model = GaussianModel(mean, std, prediction=prediction)
    ref = model.exact_sample_from(noise, SIGMA_MAX)
    errs = _errors(model, noise, sampler, prediction, ref, from_inf=False)
    _check_order(errs, SAMPLERS[sampler], f"{sampler}/{prediction} from {SIGMA_MAX}")


@pytest.mark.parametrize("sampler,prediction", CASES)
def test_order_from_inf(problem, sampler, prediction):
    """From sigma = inf: order against "Euler step to sigma_1, then exact"; toward exact_sample down to a floor."""
    mean, std, noise = problem
    model = GaussianModel(mean, std, prediction=prediction)
    s1 = SIGMA_MAX
    after_euler_start = mean + std * (s1 / torch.sqrt(std**2 + s1**2)) * noise
    errs = _errors(model, noise, sampler, prediction, after_euler_start, from_inf=True)
    _check_order(errs, SAMPLERS[sampler], f"{sampler}/{prediction} from inf")

    exact = model.exact_sample(noise)
    floor = (after_euler_start - exact).abs().max().item()
    errs_exact = _errors(model, noise, sampler, prediction, exact, from_inf=True)
    assert all(b < a for a, b in zip(errs_exact, errs_exact[1:])), errs_exact
    # the distance to the exact solution is the order-N error plus at most the first step's floor
    for e, e_exact in zip(errs, errs_exact):
        assert abs(e_exact - e) <= floor * (1 + 1e-9)


def test_floor_from_inf_is_the_first_euler_step(problem):
    """With many steps, lms (4th order) from inf sits on the floor set by the Euler step inf -> sigma_1."""
    mean, std, noise = problem
    model = GaussianModel(mean, std)
    s1 = SIGMA_MAX
    floor = (std * (1 - s1 / torch.sqrt(std**2 + s1**2)) * noise).abs().max().item()
    (err,) = _errors(model, noise, "lms", "v", model.exact_sample(noise), from_inf=True, ns=(256,))
    assert abs(err - floor) < 0.05 * floor, (err, floor)


def test_guided_gaussians_equal_one_gaussian(problem):
    """CFG of two Gaussians of equal std is the Gaussian of the extrapolated mean: the exact ODE solution is known."""
    mean, std, noise = problem
    pair = GuidedPair(GaussianModel(mean + 0.3, std), GaussianModel(mean, std))
    w = 3.0
    single = pair.guided_model(w)
    sigmas = schedules.karras(64, SIGMA_MIN, math.inf, sigma_max_finite=SIGMA_MAX)
    out = zk.sample(pair, noise, sigmas, sampler="heun", guidance_scale=w, backend="torch")
    same = zk.sample(single, noise, sigmas, sampler="heun", backend="torch")
    assert (out - same).abs().max().item() < 1e-10
    assert (out - single.exact_sample(noise)).abs().max().item() < 3e-2


def test_model_outputs_are_exact_and_finite():
    """D = p*y + q*F reproduces the closed-form denoiser for every prediction, per-sample sigma, inf included."""
    mean = torch.tensor([0.3, -0.5, 1.0], dtype=torch.float64)
    std = torch.tensor([0.2, 1.0, 2.0], dtype=torch.float64)
    y = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sig = torch.tensor([0.01, 1.5, 1e3, math.inf], dtype=torch.float64)
    for pred in ("v", "x0", "flow"):
        m = GaussianModel(mean, std, prediction=pred, sigma_data=0.7)
        f = m(y, sig)
        assert torch.isfinite(f).all()
        for i, s in enumerate(sig.tolist()):
            p, q = m.pz.denoise_coeffs(s)
            d = p * y[i] + q * f[i]
            if math.isinf(s):
                want = mean
            else:
                x = y[i] / m.pz.c_in(s)
                want = mean + std**2 / (std**2 + s**2) * (x - mean)
            assert torch.allclose(d, want, atol=1e-12, rtol=0), (pred, s)
    with pytest.raises(ValueError, match="inf"):
        GaussianModel(mean, std, prediction="eps")(y, sig)
