"""res_multistep (RES's second-order multistep exponential integrator, ComfyUI's ``res_multistep``) against an
independent float64 loop in k-diffusion's x written from the paper's formulas, from a finite schedule and from
sigma = inf; its device coefficients against the float ones."""

from __future__ import annotations

import math

import pytest
import torch

import zsnr_kernels as zk
from zsnr_kernels import coefficients as co
from zsnr_kernels.parameterization import parameterization

INF = math.inf


def res_reference(D, x, sigmas):
    """x' = e^{-h} x + h (b1 D + b2 D_prev) in lambda = -log sigma (Zhang et al. 2023, eq. for the 2-step RES):
    phi1(z) = (e^z - 1)/z, phi2(z) = (phi1(z) - 1)/z at z = -h, c2 = (lambda_prev - lambda)/h, b2 = phi2/c2,
    b1 = phi1 - b2; Euler on the first step and to sigma' = 0 (computed in plain float64, no series)."""
    old = None
    for i in range(len(sigmas) - 1):
        s, sn = sigmas[i], sigmas[i + 1]
        d = D(x, s)
        if old is None or sn == 0 or s == INF:
            x = x + (sn - s) * (x - d) / s  # Euler
        else:
            lam, lam_next, lam_prev = -math.log(s), -math.log(sn), -math.log(sigmas[i - 1])
            h = lam_next - lam
            c2 = (lam_prev - lam) / h
            phi1 = math.expm1(-h) / -h
            phi2 = (phi1 - 1.0) / -h
            b2 = phi2 / c2
            x = math.exp(-h) * x + h * ((phi1 - b2) * d + b2 * old)
        old = d
    return x


def make_model(pz):
    def D(x, sigma):
        return torch.tanh(0.4 * x) / (1.0 + 0.1 * sigma) + 0.05

    def model(y, sigma):  # the raw output whose denoised prediction is D(x, sigma)
        s = float(sigma[0])
        p, q = pz.denoise_coeffs(s)
        x = y / pz.c_in(s)
        return (D(x, s) - p * y) / q
    return D, model


@pytest.mark.parametrize("prediction", ["v", "eps", "x0"])
def test_equals_the_paper_on_a_finite_schedule(prediction):
    pz = parameterization(prediction, 1.0)
    D, model = make_model(pz)
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigmas = zk.schedules.karras(12, 0.03, 14.6).tolist()
    ours = zk.sample(model, noise, torch.tensor(sigmas, dtype=torch.float64), sampler="res_multistep",
                     prediction=prediction)
    torch.testing.assert_close(ours, res_reference(D, noise * sigmas[0], sigmas), rtol=1e-12, atol=1e-12)


def test_from_inf_the_first_step_is_euler_and_the_rest_the_paper():
    pz = parameterization("v", 1.0)
    D, model = make_model(pz)
    noise = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sigmas = [INF] + zk.schedules.karras(8, 0.03, 14.6).tolist()
    ours = zk.sample(model, noise, torch.tensor(sigmas, dtype=torch.float64), sampler="res_multistep")
    # from inf: x_1 = D(., inf) + sigma_1 * noise (the model input at inf is the noise itself); the next step has a
    # history entry at inf, weight 0: Euler again; then the paper from the third step on
    y0 = noise
    p, q = pz.denoise_coeffs(INF)
    d_inf = p * y0 + q * model_at_inf(pz, D, y0)
    x1 = d_inf + sigmas[1] * noise
    d1 = D(x1, sigmas[1])
    x2 = x1 + (sigmas[2] - sigmas[1]) * (x1 - d1) / sigmas[1]
    rest = res_reference_from(D, x2, sigmas[2:], d1, sigmas[1])
    torch.testing.assert_close(ours, rest, rtol=1e-11, atol=1e-11)


def model_at_inf(pz, D, y):
    """The raw output of make_model's model at sigma = inf (x = y / c_in(inf) has no limit: D's limit there)."""
    d = torch.full_like(y, 0.05)  # D(x, inf) = 0.05: the 1/(1 + 0.1 sigma) factor is 0
    p, q = pz.denoise_coeffs(INF)
    return (d - p * y) / q


def res_reference_from(D, x, sigmas, d_prev, sigma_prev):
    """res_reference continuing a run whose previous evaluation was d_prev at sigma_prev."""
    old, s_old = d_prev, sigma_prev
    for i in range(len(sigmas) - 1):
        s, sn = sigmas[i], sigmas[i + 1]
        d = D(x, s)
        if sn == 0:
            x = x + (sn - s) * (x - d) / s
        else:
            h = math.log(s / sn)
            c2 = -math.log(s_old / s) / h
            phi1 = math.expm1(-h) / -h
            phi2 = (phi1 - 1.0) / -h
            b2 = phi2 / c2
            x = math.exp(-h) * x + h * ((phi1 - b2) * d + b2 * old)
        old, s_old = d, s
    return x


@pytest.mark.parametrize("prediction", ["v", "x0", "flow"])
def test_device_coefficients_equal_the_float_ones(prediction):
    pz = parameterization(prediction, 0.5 if prediction != "flow" else 1.0)
    cases = [(5.0, 2.0, 9.0), (INF, 3.0, None), (3.0, 0.0, 6.0), (2.0, 1.0, INF), (1.0, 0.99995, 1.00005)]
    for s, sn, prev in cases:
        a = co.StepArgs("res_multistep", s, sn, sigma_prev=() if prev is None else (prev,))
        want = co.step_coeffs(pz, a)
        t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
        got, ok = co._TENSOR_COEFFS["res_multistep"](pz, a._replace(
            sigma=t(s), sigma_next=t(sn), sigma_prev=() if prev is None else (t(prev),)))
        assert bool(torch.as_tensor(ok).all())
        for name, w, g in (("a", want.a, got.a), ("b", want.b, got.b)):
            assert float(g) == pytest.approx(w, rel=1e-14, abs=1e-300), (s, sn, prev, name)
        wh = want.h[0] if want.h else 0.0
        gh = float(got.h[0]) if got.h else 0.0
        assert gh == pytest.approx(wh, rel=1e-13, abs=1e-300), (s, sn, prev, "h")
