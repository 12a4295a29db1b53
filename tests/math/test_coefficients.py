"""Parameterizations and host coefficients: exact values at sigma = inf and sigma = 0, continuity into them."""

from __future__ import annotations

import math

import pytest

import zsnr_kernels as zk
from zsnr_kernels import coefficients as co

INF = math.inf
BIG = 1e150  # far enough out that every 1/sigma term is below float64 resolution


@pytest.mark.parametrize("prediction", ["v", "x0", "flow", "eps"])
@pytest.mark.parametrize("sd", [1.0, 0.5])
def test_parameterization_table(prediction, sd):
    pz = zk.parameterization(prediction, sd)
    for sigma in [0.0, 0.3, 2.0, 40.0]:
        c = pz.c_in(sigma)
        p, q = pz.denoise_coeffs(sigma)
        assert pz.noise_scale(sigma) == pytest.approx(sigma * c, rel=1e-15)
        # D = p y + q F reproduces the textbook c_skip x + c_out F with x = y / c_in
        if prediction == "v":
            assert p * c == pytest.approx(sd**2 / (sigma**2 + sd**2), rel=1e-14)  # c_skip
            assert q == pytest.approx(-sigma * sd / math.sqrt(sigma**2 + sd**2), rel=1e-14, abs=0)
        elif prediction == "eps":
            assert (p, q) == (pytest.approx(1 / c, rel=1e-14), -sigma)
        elif prediction == "x0":
            assert (p, q) == (0.0, 1.0)
        else:
            assert c == 1 / (1 + sigma) and (p, q) == (1.0, pytest.approx(-sigma / (1 + sigma), rel=1e-15))
    assert pz.c_in(0.0) == (1.0 if prediction == "flow" else 1 / sd)


@pytest.mark.parametrize("prediction,expected", [("v", (0.0, -1.0)), ("x0", (0.0, 1.0)), ("flow", (1.0, -1.0))])
def test_exact_limits_at_inf(prediction, expected):
    pz = zk.parameterization(prediction)
    assert pz.c_in(INF) == 0.0 and pz.noise_scale(INF) == 1.0
    assert pz.denoise_coeffs(INF) == expected
    assert pz.denoise_coeffs(BIG) == pytest.approx(expected, abs=1e-140)


def test_eps_at_inf_says_why_and_what_to_do():
    with pytest.raises(ValueError, match=r"eps.*sigma = inf.*prediction='v' or 'x0'.*sigma_max"):
        zk.parameterization("eps").denoise_coeffs(INF)


@pytest.mark.parametrize("name,fn", [
    ("euler", lambda pz, s: co.euler(pz, s, 3.0)),
    ("euler_ancestral", lambda pz, s: co.ancestral(pz, s, 3.0, 1.0)),
    ("euler_ancestral eta=0.5", lambda pz, s: co.ancestral(pz, s, 3.0, 0.5)),
    ("ddim eta=0.3", lambda pz, s: co.ancestral(pz, s, 3.0, 0.3, clamp=False)),
    ("dpmpp_2m", lambda pz, s: co.dpmpp_2m(pz, 3.0, 1.0, s)),
    ("dpmpp_2m_sde heun", lambda pz, s: co.dpmpp_2m_sde(pz, s, 3.0, None, 1.0, 1.0, "heun")),
    ("dpmpp_3m_sde", lambda pz, s: co.dpmpp_3m_sde(pz, s, 3.0, ())),
    ("lms history", lambda pz, s: co.lms(pz, 3.0, 1.0, (8.0, s))),
    ("dpmpp_2s_ancestral stage 2", lambda pz, s: co.dpmpp_2s_ancestral(pz, s, 3.0, stage=2)),
])
@pytest.mark.parametrize("prediction", ["v", "x0", "flow"])
def test_coefficients_are_continuous_into_inf(name, fn, prediction):
    """Each coefficient at sigma = inf (or with a history entry at inf) is the limit of finite sigmas.  The
    multistep weights h/h_last decay like 1/log(sigma), hence the loose tolerance for dpmpp_2m's history."""
    pz = zk.parameterization(prediction)
    at_inf, near = fn(pz, INF), fn(pz, BIG)
    tol = 0.01 if name == "dpmpp_2m" else 1e-12
    for field in ("a", "b", "e", "sigma_out"):
        assert getattr(near, field) == pytest.approx(getattr(at_inf, field), abs=tol), field
    assert len(near.h) == len(at_inf.h)
    assert near.h == pytest.approx(at_inf.h, abs=tol)


def test_steps_to_zero_follow_k_diffusion():
    pz = zk.parameterization("v")
    assert co.heun(pz, 2.0, 0.0, stage=1).complete and co.dpm_2(pz, 2.0, 0.0, stage=1).complete
    assert co.dpmpp_2m(pz, 2.0, 0.0, 5.0).h == ()                      # first order
    assert co.dpmpp_2m_sde(pz, 2.0, 0.0, 5.0) == co.StepCoeffs(a=0.0, b=1.0, sigma_out=0.0)  # returns D
    assert co.ancestral(pz, 2.0, 0.0, 1.0).e == 0.0                   # no noise


def test_ancestral_split_matches_k_diffusion_get_ancestral_step():
    for sigma, nxt, eta in [(10.0, 5.0, 1.0), (3.0, 2.9, 0.7), (14.6, 0.03, 1.0), (2.0, 1.0, 1.7)]:
        up = min(nxt, eta * (nxt**2 * (sigma**2 - nxt**2) / sigma**2) ** 0.5)
        down = (nxt**2 - up**2) ** 0.5
        d, u = co.ancestral_split(sigma, nxt, eta)
        assert d * nxt == pytest.approx(down, abs=1e-12) and u * nxt == pytest.approx(up, rel=1e-14)


def test_lms_weights_integrate_the_interpolant_exactly():
    ts = (4.0, 6.0, 9.0, 13.0)
    w = co.lms_weights(ts, 3.0)
    # the weights integrate any cubic exactly: check on f(t) = t^3 against its antiderivative
    assert sum(wj * t**3 for wj, t in zip(w, ts)) == pytest.approx((3.0**4 - 4.0**4) / 4, rel=1e-13)
    assert sum(w) == pytest.approx(3.0 - 4.0, rel=1e-14)
