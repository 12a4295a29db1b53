"""Singlestep DPM-Solver++ (:func:`zsnr_kernels.coefficients.dpmpp_singlestep`, the math of the diffusers drop-in
``ZSNRDPMSolverSinglestepScheduler``): diffusers' update formulas in float64, exactness for a denoiser polynomial in
lambda = -log sigma, the order of convergence on a Gaussian, the limit at sigma = inf (the first group of a
zero-SNR schedule), the end at sigma' = 0, the history it reads, and its row run as one fused step.

The row (:data:`~zsnr_kernels.coefficients.DPMPP_SINGLESTEP`) is not in the built-in sampler table (a built-in row
has a named step function in zsnr_kernels.steps); the steps run it by name (coefficients._HIDDEN).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import zsnr_kernels as zk
from zsnr_kernels import coefficients as co, schedules, steps
from zsnr_kernels.backends import ext as _ext
from zsnr_kernels.parameterization import parameterization
from zsnr_kernels.tools.models import GaussianModel

INF = math.inf
PZ = parameterization("v")
F64 = torch.float64
BACKENDS = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(not _ext.available(), reason="_C not built"))]
#: (solver_type, order) of every update
UPDATES = [(t, k) for t in co.SOLVER_TYPES for k in (1, 2, 3)]


def _prev(order: int, sigmas: tuple[float, ...]) -> tuple[float, ...]:
    """sigma_prev of an order-k step of the group whose evaluations were at ``sigmas`` (oldest first, the current
    last): the earlier ones newest first, then the group's first again (its start state)."""
    earlier = tuple(reversed(sigmas[:-1]))[: order - 1]
    return earlier + earlier[-1:] if order > 1 else ()


@pytest.fixture
def row():
    """The row's name: steps.sampler_step runs it without a registration (coefficients._HIDDEN)."""
    return co.DPMPP_SINGLESTEP.name


def test_the_row_is_not_a_built_in_sampler():
    """Built-in rows have a named step function in zsnr_kernels.steps (tests/math/test_sampler_table.py), and
    ``sample()`` keeps a history of denoised predictions only: the row waits outside the table until both read
    the group's start state."""
    assert co.DPMPP_SINGLESTEP.name not in zk.SAMPLERS
    assert co.sampler_spec(co.DPMPP_SINGLESTEP.name) is co.DPMPP_SINGLESTEP  # the steps run it by name
    with pytest.raises(ValueError, match="registered already.*without listing it"):
        co.register_sampler(co.DPMPP_SINGLESTEP)
    assert co.DPMPP_SINGLESTEP.kind == "multistep" and co.DPMPP_SINGLESTEP.history == co.SINGLESTEP_MAX_ORDER


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "sde-dpmsolver++"])
@pytest.mark.parametrize("solver_type", co.SOLVER_TYPES)
def test_diffusers_update_formulas(algorithm, solver_type):
    """Each order of diffusers' DPMSolverSinglestepScheduler update, on float64 sigmas and random tensors, equals the
    linear combination of the coefficients to float64 rounding.  The SDE's third-order heun update differs by
    diffusers' sign error, exactly alpha_t * D2 (its -(phi3 + 1) D2 against the integral's -phi3 D2)."""
    diffusers = pytest.importorskip("diffusers")
    eta = float(algorithm.startswith("sde"))
    ref = diffusers.DPMSolverSinglestepScheduler(algorithm_type=algorithm, solver_type=solver_type, solver_order=3)
    sig = [14.6, 6.0, 2.5, 1.0]
    ref.sigmas = torch.tensor(sig + [0.4], dtype=F64)
    ref._step_index = 2  # step from sig[2] to sig[3]; the group started at sig[0] (order 3), sig[1] (order 2)
    g = torch.Generator().manual_seed(0)
    m = [torch.randn(5, generator=g, dtype=F64) for _ in range(3)]  # D at sig[0], sig[1], sig[2]
    y_g, z = torch.randn(5, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)
    cases = {1: (ref.dpm_solver_first_order_update(m[2], sample=y_g, noise=z), [], (2.5,)),
             2: (ref.singlestep_dpm_solver_second_order_update(m[1:], sample=y_g, noise=z), [m[1]], (6.0, 2.5)),
             3: (ref.singlestep_dpm_solver_third_order_update(m, sample=y_g, noise=z), [m[1], m[0]],
                 (14.6, 6.0, 2.5))}
    for order, (want, ds, group) in cases.items():
        c = co.dpmpp_singlestep(PZ, 2.5, 1.0, _prev(order, group), order, solver_type, eta)
        got = c.b * m[2] + sum(h * t for h, t in zip(c.h, [*ds, y_g])) + c.e * z + (c.a * y_g if order == 1 else 0)
        if algorithm == "sde-dpmsolver++" and solver_type == "heun" and order == 3:
            lam = [-math.log(s) for s in (14.6, 6.0, 2.5, 1.0)]
            h, r0, r1 = lam[3] - lam[0], (lam[2] - lam[0]) / (lam[3] - lam[0]), (lam[1] - lam[0]) / (lam[3] - lam[0])
            d2 = 2.0 * ((m[2] - m[0]) / r0 - (m[1] - m[0]) / r1) / (r0 - r1)
            want = want + PZ.c_in(1.0) * d2
            assert h > 0
        torch.testing.assert_close(got, want, rtol=0, atol=1e-13)


def _exact_integral(poly, lam_g: float, lam_t: float, eta: float) -> float:
    """(1 + eta) * integral over [lam_g, lam_t] of e^{-(1+eta)(lam_t - lam)} P(lam): the x-space contribution of
    the denoiser to the exact solution of DPM-Solver++'s ODE (eta = 0) and SDE mean (docs: Lu et al. 2022)."""
    x, w = np.polynomial.legendre.leggauss(30)
    lam = 0.5 * (lam_t - lam_g) * x + 0.5 * (lam_t + lam_g)
    f = (1.0 + eta) * np.exp(-(1.0 + eta) * (lam_t - lam)) * poly(lam)
    return float(0.5 * (lam_t - lam_g) * np.dot(w, f))


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize(("solver_type", "order", "degree"), [
    ("midpoint", 1, 0), ("heun", 1, 0), ("midpoint", 2, 0), ("heun", 2, 1), ("midpoint", 3, 1), ("heun", 3, 2)])
def test_exact_for_a_polynomial_denoiser(eta, solver_type, order, degree):
    """With D a polynomial in lambda of the degree the update integrates exactly (heun: order - 1; midpoint order 3:
    linear, through D and D_g; midpoint order 2, whose B/2 approximates phi2: constant), the update's D part equals
    the exact integral, for the ODE and the SDE's mean (eta > 0), with the start state's weight (sigma'/sigma_g)
    e^{-eta h}: so the heun order-3 SDE weight -phi3 (not diffusers' -(phi3 + 1)) is the integral's."""
    group = (8.0, 3.0, 1.2)[-order:] if order > 1 else (1.2,)
    sigma_t = 0.5
    lam = [-math.log(s) for s in group]
    coef = [0.3, -0.7, 0.45][: degree + 1]
    poly = np.polynomial.Polynomial(coef)
    c = co.dpmpp_singlestep(PZ, group[-1], sigma_t, _prev(order, group), order, solver_type, eta)
    c_t = PZ.c_in(sigma_t)
    d_part = (c.b * poly(lam[-1]) + sum(h * poly(v) for h, v in zip(c.h[: order - 1], reversed(lam[:-1])))) / c_t
    want = _exact_integral(poly, lam[0], -math.log(sigma_t), eta)
    assert abs(d_part - want) <= 1e-13, (d_part, want)
    a_g = c.a if order == 1 else c.h[-1]
    r = sigma_t / group[0]
    assert math.isclose(a_g, PZ.noise_scale(sigma_t) / PZ.noise_scale(group[0]) * r**eta, rel_tol=1e-14)


def _singlestep_run(model, noise, sigmas, order: int, solver_type: str, backend="torch"):
    """A sampling loop of the registered row with diffusers' order list (lower_order_final, first order last)."""
    n = len(sigmas) - 1
    orders = [k for _ in range(n) for k in range(1, order + 1)][:n]
    if n % order == 0 and order > 1:
        orders = orders[: n - order] + ([1, 1] if order == 2 else [1, 2, 1])
    orders[-1] = 1
    y, start, ds = noise if sigmas[0] == INF else noise * PZ.noise_scale(sigmas[0]), None, []
    for i in range(n):
        sg = float(sigmas[i])
        k = orders[i]
        if k == 1:
            start, ds = (sg, y), []
        hist = [*reversed(ds[len(ds) - (k - 1):]), start] if k > 1 else None
        r = steps.sampler_step(co.DPMPP_SINGLESTEP.name, y, model(y, torch.full((y.shape[0],), sg, dtype=F64)), sg,
                               float(sigmas[i + 1]), history=hist, order=k, solver_type=solver_type, eta=0.0,
                               backend=backend)
        ds.append((sg, r.denoised))
        y = r.y
    return steps.final_sample(y)


@pytest.mark.parametrize(("solver_type", "order", "band"), [
    ("midpoint", 2, (1.7, 2.6)), ("heun", 2, (1.7, 2.6)), ("midpoint", 3, (2.6, 4.0)), ("heun", 3, (2.6, 4.0))])
def test_convergence_order_on_a_gaussian(row, solver_type, order, band):
    """On a Karras schedule (80 -> 0.002, then 0) the error against the exact probability-flow solution of Gaussian
    data falls like N^-order (tests/math/test_convergence_order.py's problem): about 2 for order 2, about 3 for order
    3 (``midpoint`` too, which uses D and D_g only: DPM-Solver-3's update, third order for the inner point at 2/3 of
    the group's interval in lambda, which a geometric-like grid of three equal log steps nearly has).  Measured
    slopes over N = 12..96: midpoint 2 1.89, heun 2 2.00, midpoint 3 3.20, heun 3 2.91."""
    g = torch.Generator().manual_seed(0)
    std = 0.2 + 1.8 * torch.rand((4, 8, 8), generator=g, dtype=F64)
    mean = 0.5 * torch.randn((4, 8, 8), generator=g, dtype=F64)
    noise = torch.randn((2, 4, 8, 8), generator=g, dtype=F64)
    model = GaussianModel(mean, std)
    ref = model.exact_sample_from(noise, 80.0)
    ns, errs = (12, 24, 48, 96), []
    for n in ns:
        out = _singlestep_run(model, noise, schedules.karras(n, 0.002, 80.0), order, solver_type)
        errs.append((out - ref).abs().max().item())
    lx = np.log(ns)
    slope = -np.polyfit(lx, np.log(errs), 1)[0]
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert band[0] <= slope <= band[1], (slope, errs)


def _limit_gap(order, solver_type, eta, big):
    group_inf = (INF, 6.0, 2.5) if order == 3 else (INF, 2.5)
    group = tuple(big if s == INF else s for s in group_inf)
    lim = co.dpmpp_singlestep(PZ, 2.5, 1.0, _prev(order, group_inf), order, solver_type, eta)
    c = co.dpmpp_singlestep(PZ, 2.5, 1.0, _prev(order, group), order, solver_type, eta)
    return lim, max(abs(c.b - lim.b), abs(c.e - lim.e), *(abs(u - v) for u, v in zip(c.h, lim.h)))


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize(("solver_type", "order"), [u for u in UPDATES if u[1] > 1])
def test_the_step_of_a_group_started_at_inf_is_the_limit(eta, solver_type, order):
    """The group's start at sigma_g = inf: finite coefficients, the closed forms of the docstring, and the limit of
    the steps from a finite sigma_g = 1e4 .. 1e30 (shrinking like 1/log sigma_g, docs/design.md §2.3)."""
    lim, _ = _limit_gap(order, solver_type, eta, 1e4)
    c_t, s_t = PZ.c_in(1.0), PZ.noise_scale(1.0)
    assert all(math.isfinite(v) for v in (lim.a, lim.b, lim.e, *lim.h))
    assert lim.h[-1] == (s_t if eta == 0 else 0.0) and lim.e == s_t * eta and lim.a == 0.0
    d0, d1, k = math.log(2.5), math.log(6.0), 1.0 / (1.0 + eta)
    want = {("midpoint", 2): (c_t / 2, c_t / 2), ("heun", 2): (c_t, 0.0), ("midpoint", 3): (c_t, 0.0, 0.0),
            ("heun", 3): (c_t * (d1 - k) / (d1 - d0), c_t * (k - d0) / (d1 - d0), 0.0)}[(solver_type, order)]
    for got, w in zip((lim.b, *lim.h[:-1]), want):
        assert math.isclose(got, w, rel_tol=1e-14, abs_tol=1e-15), (got, w)
    gaps = [_limit_gap(order, solver_type, eta, big)[1] for big in (1e4, 1e8, 1e16, 1e30)]
    assert all(b < a for a, b in zip(gaps, gaps[1:])) and gaps[-1] < gaps[0] / 3, gaps


@pytest.mark.parametrize(("solver_type", "order"), UPDATES)
def test_to_sigma_zero_every_order_returns_d(solver_type, order):
    group = (8.0, 3.0, 1.2)[-order:] if order > 1 else (1.2,)
    c = co.dpmpp_singlestep(PZ, 1.2, 0.0, _prev(order, group), order, solver_type, 1.0)
    assert (c.a, c.b, c.h, c.e, c.sigma_out) == (0.0, PZ.c_in(0.0), (), 0.0, 0.0)


def test_the_history_it_reads_is_checked():
    with pytest.raises(ValueError, match="start state"):
        co.dpmpp_singlestep(PZ, 1.0, 0.5, (3.0,), 2)
    with pytest.raises(ValueError, match=r"history\[1\] is the group's start state"):
        co.dpmpp_singlestep(PZ, 1.0, 0.5, (3.0, 4.0), 2)
    with pytest.raises(ValueError, match="grow with age"):
        co.dpmpp_singlestep(PZ, 1.0, 0.5, (3.0, 2.0, 2.0), 3)
    with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
        co.dpmpp_singlestep(PZ, 1.0, 0.5, (3.0, 4.0, 5.0, 5.0), 4)
    with pytest.raises(ValueError, match="solver_type"):
        co.dpmpp_singlestep(PZ, 1.0, 0.5, (), 1, "bh2")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("solver_type", "order"), [u for u in UPDATES if u[1] > 1])
def test_one_fused_step_from_a_group_started_at_inf(row, backend, solver_type, order):
    """The row through ``steps.sampler_step`` (one fused pass, guidance and its rescale included) on a group that
    started at sigma = inf: finite, and the float64 combination of the limit's coefficients with the guided D."""
    g = torch.Generator().manual_seed(3)
    shape = (2, 4, 6, 6)
    y, y_g, d_g, d_m, fc, fu, z = (torch.randn(shape, generator=g) for _ in range(7))
    group = (INF, 6.0, 2.5) if order == 3 else (INF, 2.5)
    ds = [(6.0, d_m), (INF, d_g)] if order == 3 else [(INF, d_g)]
    hist = [*ds, (INF, y_g)]
    r = steps.sampler_step(row, y, (fc, fu), 2.5, 1.0, history=hist, order=order, solver_type=solver_type, eta=1.0,
                           noise=z, guidance_scale=5.0, guidance_rescale=0.7, backend=backend)
    assert torch.isfinite(r.y).all()
    c = co.dpmpp_singlestep(PZ, 2.5, 1.0, _prev(order, group), order, solver_type, 1.0)
    f = zk.reference.guidance(fc.double(), fu.double(), 5.0)
    f = f * zk.reference.rescale_factor(fc.double(), f, 0.7).reshape(-1, 1, 1, 1)
    p, q = PZ.denoise_coeffs(2.5)
    d = p * y.double() + q * f
    want = c.b * d + sum(h * t.double() for h, t in zip(c.h, [t for _, t in hist])) + c.e * z.double()
    torch.testing.assert_close(r.denoised.double(), d, rtol=0, atol=2e-5)
    torch.testing.assert_close(r.y.double(), want, rtol=0, atol=2e-5)
