"""Host coefficients of every sampler step, as exact finite limits at sigma = inf and sigma_next = 0.

docs/design.md §2.3-2.5.  Every update of every sampler is one linear combination in the state space of model inputs::

    y_out = a * y + b * D + sum_k h[k] * H_k + e * z          (D = p*y + q*F, z unit noise)

where ``y`` is the model input the model was just called with, ``D`` that call's denoised prediction, ``H_k`` the
tensors the sampler remembers (newest first: earlier denoised predictions, or LMS derivatives) and ``y_out`` the
next model input, at noise level ``sigma_out``.  This module computes ``a, b, h, e`` in float64 on the host.

Each sampler is first written the way k-diffusion writes it, in the variance-exploding latent
``x = y / c_in(sigma)``, as ``x' = A x + B D + ... + E z``; then ``y' = c_in(sigma') x'``.  Every ``A`` has the form
``(sigma'/sigma) * K``, so the y-weight is ``(s'/s) * K`` with the noise scale ``s = sigma * c_in(sigma)``, which is
1 at sigma = inf.  Ratios ``r = sigma'/sigma`` are 0 at sigma = inf, ``h = log(sigma/sigma')`` is inf there and
``expm1(-h)`` is -1: nothing here ever forms inf/inf or 0*inf.

Two rules fix what the samplers do at the ends of a schedule (§2.3):

* a step *from* sigma = inf is first order for every sampler (the exponential-integrator corrections have
  weight h/h_last -> 0 there, and Heun's trapezoid over an infinite interval has no limit), and a history entry
  at sigma = inf carries weight 0 in later steps;
* a step *to* sigma = 0 follows k-diffusion: Heun and DPM2 take an Euler step, DPM++ 2M is first order, the SDE
  samplers return D and ancestral samplers add no noise.

These functions take any float64 sigmas (the C++ mirror, csrc/include/zsnr/coefficients.h, agrees with them
field by field, extremes included).  The step functions and ``sample()`` accept only the steps every backend
computes finitely and to float32 precision (``zsnr_kernels._validate.step_sigmas``): positive sigmas within
[1e-30, 1e30], and bounded spans for heun, dpm_2, dpm_2_ancestral and lms, whose updates amplify rounding by
sigma/sigma_next.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import NamedTuple

import numpy as np

from . import _validate
from .parameterization import Parameterization

INF = math.inf
#: dpmpp_2m_sde's second-order corrections (k-diffusion's ``solver_type``)
SOLVER_TYPES = ("midpoint", "heun")
#: the highest order of linear multistep (lms): the current derivative and LMS_MAX_ORDER - 1 remembered ones
LMS_MAX_ORDER = 4


@dataclass(frozen=True)
class StepCoeffs:
    """``y_out = a*y + b*D + sum(h[k]*H_k) + e*z``; ``y_out`` is the model input at ``sigma_out``.

    ``complete`` is False after the first stage of a two-stage sampler (the model must be called at
    ``(y_out, sigma_out)`` and the second stage run).  ``carry`` = ``(g_y, g_D)`` asks the kernel to also output
    ``g_y*y + g_D*D`` (the derivative LMS remembers); None otherwise.
    """

    a: float
    b: float
    h: tuple[float, ...] = ()
    e: float = 0.0
    sigma_out: float = 0.0
    complete: bool = True
    carry: tuple[float, float] | None = None


def _ratio(sigma: float, sigma_next: float) -> float:
    """sigma_next / sigma, 0 at sigma = inf."""
    return 0.0 if sigma == INF else sigma_next / sigma


def _log_ratio(sigma: float, sigma_next: float) -> float:
    """h = log(sigma / sigma_next) = lambda_next - lambda (lambda = -log sigma); inf when sigma = inf."""
    return INF if sigma == INF else math.log(sigma / sigma_next)


def _check_pair(sigma: float, sigma_next: float) -> None:
    if not (sigma_next >= 0.0 and sigma > sigma_next):
        raise ValueError(f"need sigma > sigma_next >= 0, got sigma={sigma}, sigma_next={sigma_next}")


def _check_history(sigma: float, sigma_prev) -> None:
    """Remembered sigmas come from earlier steps: strictly above sigma and growing with age (newest first)."""
    below = sigma
    for p in sigma_prev:
        if not p > below:
            raise ValueError(f"history sigmas must be above sigma={sigma} and grow with age (newest first), "
                             f"got {tuple(sigma_prev)}")
        below = p


# --------------------------------------------------------------------------------------------- building blocks


def euler(pz: Parameterization, sigma: float, sigma_next: float) -> StepCoeffs:
    """Euler / DDIM(eta=0) / DPM-Solver++(1): x' = D + sigma' * (x - D) / sigma.

    y' = (s'/s) y + c'(1 - sigma'/sigma) D; from sigma = inf: y' = s' y + c' D.
    """
    _check_pair(sigma, sigma_next)
    r = _ratio(sigma, sigma_next)
    a = pz.noise_scale(sigma_next) / pz.noise_scale(sigma)
    return StepCoeffs(a=a, b=pz.c_in(sigma_next) * (1.0 - r), sigma_out=sigma_next)


def ancestral_split(sigma: float, sigma_next: float, eta: float, clamp: bool = True) -> tuple[float, float]:
    """(d, u) = (sigma_down, sigma_up) / sigma_next of an ancestral step; (1, 0) when sigma_next = 0 or eta = 0.

    k-diffusion's ``get_ancestral_step``: sigma_up = min(sigma', eta * sqrt(sigma'^2 (sigma^2 - sigma'^2) /
    sigma^2)), sigma_down = sqrt(sigma'^2 - sigma_up^2).  Divided by sigma' both are finite at sigma = inf:
    u = min(1, eta sqrt(1 - r^2)) and d = sqrt((1 - eta^2) + (eta r)^2), written without k-diffusion's
    cancellation (for eta = 1, d = r exactly).  ``clamp=False`` is DDIM's variance (no min; requires u <= 1).
    """
    if sigma_next == 0.0 or eta == 0.0:
        return 1.0, 0.0
    r = _ratio(sigma, sigma_next)
    u = eta * math.sqrt((1.0 - r) * (1.0 + r))
    if u > 1.0:
        if not clamp:
            raise ValueError(f"eta={eta} gives a DDIM variance larger than the target noise level; use eta <= 1")
        return 0.0, 1.0
    return math.sqrt(max(0.0, (1.0 - eta) * (1.0 + eta) + (eta * r) ** 2)), u


def ancestral(pz: Parameterization, sigma: float, sigma_next: float, eta: float, s_noise: float = 1.0,
              clamp: bool = True) -> StepCoeffs:
    """Euler step to sigma_down, then noise of std sigma_up: euler_ancestral, and DDIM(eta) / DDPM.

    x' = D + sigma_down (x - D)/sigma + s_noise sigma_up z, i.e. with (d, u) of :func:`ancestral_split`:
    y' = (s'/s) d y + c'(1 - d r) D + s' u s_noise z.  DDIM with eta is this step without the min() clamp
    (its posterior std eta*sqrt((1-a')/(1-a) (1 - a/a')) equals c' sigma_up in VP terms), DDPM is DDIM at eta=1.
    """
    _check_pair(sigma, sigma_next)
    d, u = ancestral_split(sigma, sigma_next, eta, clamp)
    r = _ratio(sigma, sigma_next)
    s_next = pz.noise_scale(sigma_next)
    return StepCoeffs(a=s_next / pz.noise_scale(sigma) * d, b=pz.c_in(sigma_next) * (1.0 - d * r),
                      e=s_next * u * s_noise, sigma_out=sigma_next)


def churn_gamma(sigma: float, num_steps: int, s_churn: float, s_tmin: float, s_tmax: float) -> float:
    """EDM churn: min(s_churn/N, sqrt(2)-1) if s_tmin <= sigma <= s_tmax else 0.  0 at sigma = inf (already
    pure noise) and at sigma = 0."""
    if s_churn <= 0.0 or sigma == INF or sigma == 0.0 or not (s_tmin <= sigma <= s_tmax):
        return 0.0
    return min(s_churn / num_steps, math.sqrt(2.0) - 1.0)


def churn(pz: Parameterization, sigma: float, sigma_hat: float, s_noise: float = 1.0) -> tuple[float, float]:
    """(k, e) with y_hat = k*y + e*z: add noise to go from sigma up to sigma_hat >= sigma (§2.5).

    x_hat = x + s_noise sqrt(sigma_hat^2 - sigma^2) z, so k = c_in(sigma_hat)/c_in(sigma) and
    e = c_in(sigma_hat) sqrt(sigma_hat^2 - sigma^2) s_noise.  (1, 0) when sigma_hat == sigma.
    """
    if sigma_hat == sigma:
        return 1.0, 0.0
    if not (math.isfinite(sigma_hat) and sigma_hat > sigma >= 0.0):
        raise ValueError(f"churn needs inf > sigma_hat > sigma >= 0, got sigma={sigma}, sigma_hat={sigma_hat}")
    c_hat = pz.c_in(sigma_hat)
    return c_hat / pz.c_in(sigma), c_hat * math.sqrt((sigma_hat - sigma) * (sigma_hat + sigma)) * s_noise


def with_churn(coeffs: StepCoeffs, pz: Parameterization, sigma_hat_next: float, s_noise: float = 1.0) -> StepCoeffs:
    """Fold the churn of the next step into this update: the result is the model input at sigma_hat_next.

    With s_noise = 0 the churn adds no noise (e = 0) but still moves the state to sigma_hat_next (k != 1): the
    model is then called at sigma_hat_next on the unchanged x, as in k-diffusion."""
    if sigma_hat_next == coeffs.sigma_out:
        return coeffs
    k, e = churn(pz, coeffs.sigma_out, sigma_hat_next, s_noise)
    if coeffs.e != 0.0 or not coeffs.complete:
        raise ValueError("churn can only follow a complete, noise-free update (euler, heun, dpm_2)")
    return replace(coeffs, a=k * coeffs.a, b=k * coeffs.b, h=tuple(k * w for w in coeffs.h), e=e,
                   sigma_out=sigma_hat_next)


# ------------------------------------------------------------------------------------------ two-stage samplers


def heun(pz: Parameterization, sigma: float, sigma_next: float, stage: int) -> StepCoeffs:
    """Heun (EDM Algorithm 2).  Stage 1: Euler predictor to sigma' (the whole step if sigma' = 0 or sigma = inf).

    Stage 2, from the predictor y_2 at sigma' with D_2 and the remembered D_1:
    x' = x_hat + (sigma'-sigma)(d_1+d_2)/2 = x_2 + (sigma'-sigma)/(2 sigma') (D_1 - D_2), because
    d_1 = (x_2 - D_1)/sigma'.  So y' = y_2 + w (D_1 - D_2) with w = c'(1 - sigma/sigma')/2.
    """
    _check_pair(sigma, sigma_next)
    if stage == 1:
        c = euler(pz, sigma, sigma_next)
        return replace(c, complete=sigma_next == 0.0 or sigma == INF)
    w = 0.5 * pz.c_in(sigma_next) * (1.0 - sigma / sigma_next)
    return StepCoeffs(a=1.0, b=-w, h=(w,), sigma_out=sigma_next)


def _midpoint_stage2(pz, sigma, sigma_mid, sigma_down, sigma_next, d, dpmpp: bool) -> StepCoeffs:
    """Second stage shared by dpm_2, dpm_2_ancestral and dpmpp_2s_ancestral (y_2 at sigma_mid, D_1 remembered).

    With x = (sigma/sigma_m) x_2 - (sigma/sigma_m - 1) D_1 (undoing the Euler predictor):
      DPM-Solver-2:  x_down = x + (sigma_d - sigma)(x_2 - D_2)/sigma_m
                           = (sigma_d/sigma_m) x_2 + (1 - sigma/sigma_m) D_1 + ((sigma - sigma_d)/sigma_m) D_2
      DPM-Solver++(2S): x_down = (sigma_d/sigma) x + (1 - sigma_d/sigma) D_2
                           = (sigma_d/sigma_m) x_2 + sigma_d (1/sigma - 1/sigma_m) D_1 + (1 - sigma_d/sigma) D_2
    and y' = c'(sigma_next) x_down, whose y_2 weight is (s'/s_m) * d with d = sigma_d / sigma_next.
    """
    c_next = pz.c_in(sigma_next)
    a = pz.noise_scale(sigma_next) / pz.noise_scale(sigma_mid) * d
    if dpmpp:
        h1, b = sigma_down * (1.0 / sigma - 1.0 / sigma_mid), 1.0 - sigma_down / sigma
    else:
        h1, b = 1.0 - sigma / sigma_mid, (sigma - sigma_down) / sigma_mid
    return StepCoeffs(a=a, b=c_next * b, h=(c_next * h1,), sigma_out=sigma_next)


def dpm_2(pz: Parameterization, sigma: float, sigma_next: float, stage: int) -> StepCoeffs:
    """k-diffusion's DPM-Solver-2: Euler predictor to sigma_mid = sqrt(sigma sigma'), corrector with D at sigma_mid.

    Stage 1 is the whole (Euler) step when sigma' = 0 or sigma = inf.
    """
    _check_pair(sigma, sigma_next)
    if sigma_next == 0.0 or sigma == INF:
        return euler(pz, sigma, sigma_next) if stage == 1 else _no_stage2("dpm_2")
    sigma_mid = midpoint_sigma(sigma, sigma_next)
    if stage == 1:
        return replace(euler(pz, sigma, sigma_mid), complete=False)
    return _midpoint_stage2(pz, sigma, sigma_mid, sigma_next, sigma_next, 1.0, dpmpp=False)


def midpoint_sigma(sigma: float, sigma_next: float) -> float:
    """sigma_mid = exp(lerp(log sigma, log sigma', 1/2)) = sqrt(sigma sigma'), computed like k-diffusion."""
    return math.exp(0.5 * (math.log(sigma) + math.log(sigma_next)))


def _no_stage2(name: str):
    raise ValueError(f"{name}: this step was complete after its first stage (first.complete is True)")


def _ancestral_two_stage(pz, sigma, sigma_next, eta, s_noise, stage, dpmpp: bool) -> StepCoeffs:
    """dpm_2_ancestral and dpmpp_2s_ancestral: a midpoint method from sigma to sigma_down, then sigma_up noise.

    From sigma = inf, DPM-Solver-2's update has no limit (like Heun's), so dpm_2_ancestral takes the
    euler_ancestral step there by definition.  DPM-Solver++(2S)'s midpoint sigma_mid = sqrt(sigma sigma_down) =
    sqrt(sigma' sqrt(sigma^2 (1 - eta^2) + (eta sigma')^2)) tends to inf for eta < 1 (then D_2 -> D_1 and the
    limit is euler_ancestral) but equals sigma' for every sigma when eta = 1, so the limit of the default sampler
    is the two-evaluation step: predictor to sigma', y' = c' D_2 + s' s_noise z.
    """
    _check_pair(sigma, sigma_next)
    d, u = ancestral_split(sigma, sigma_next, eta)
    sigma_down = d * sigma_next
    noise = s_noise * pz.noise_scale(sigma_next) * u
    r = _ratio(sigma, sigma_next)
    clamped = eta * math.sqrt((1.0 - r) * (1.0 + r)) > 1.0
    if sigma_next == 0.0 or clamped:
        # k-diffusion's sigma_down == 0 branch: Euler to 0; dpmpp_2s_ancestral still adds sigma_up noise.
        if stage != 1:
            _no_stage2("dpmpp_2s_ancestral" if dpmpp else "dpm_2_ancestral")
        return StepCoeffs(a=0.0, b=pz.c_in(sigma_next), e=noise if dpmpp else 0.0, sigma_out=sigma_next)
    if dpmpp:
        # sigma * sigma_down / sigma'
        sigma_d_times = (INF if eta < 1.0 else eta * sigma_next) if sigma == INF else sigma * d
        sigma_mid = math.sqrt(sigma_next * sigma_d_times)
    else:
        sigma_mid = INF if sigma == INF else midpoint_sigma(sigma, sigma_down)
    if sigma_mid == INF:
        return ancestral(pz, sigma, sigma_next, eta, s_noise) if stage == 1 else _no_stage2("ancestral")
    if stage == 1:
        return replace(euler(pz, sigma, sigma_mid), complete=False)
    return replace(_midpoint_stage2(pz, sigma, sigma_mid, sigma_down, sigma_next, d, dpmpp), e=noise)


def dpm_2_ancestral(pz, sigma, sigma_next, eta=1.0, s_noise=1.0, *, stage: int) -> StepCoeffs:
    """k-diffusion's dpm_2_ancestral: DPM-Solver-2 to sigma_down, then noise sigma_up (none when sigma_down = 0)."""
    return _ancestral_two_stage(pz, sigma, sigma_next, eta, s_noise, stage, dpmpp=False)


def dpmpp_2s_ancestral(pz, sigma, sigma_next, eta=1.0, s_noise=1.0, *, stage: int) -> StepCoeffs:
    """DPM-Solver++(2S) to sigma_down with r = 1/2 (midpoint exp(-(t + h/2))), then noise sigma_up."""
    return _ancestral_two_stage(pz, sigma, sigma_next, eta, s_noise, stage, dpmpp=True)


# ------------------------------------------------------------------------------------------ multistep samplers


def dpmpp_2m(pz: Parameterization, sigma: float, sigma_next: float, sigma_prev: float | None) -> StepCoeffs:
    """DPM-Solver++(2M): x' = (sigma'/sigma) x + (1 - sigma'/sigma) D_d, D_d = (1 + w) D - w D_prev.

    w = 1/(2r) = h/(2 h_last), h = log(sigma/sigma'), h_last = log(sigma_prev/sigma); first order (w = 0) on the
    first step, when sigma' = 0, and when sigma_prev = inf (h_last = inf).  ``h`` of the result is (-b0 w,) or ().
    """
    c = euler(pz, sigma, sigma_next)
    if sigma_prev is None or sigma_next == 0.0:
        return c
    _check_history(sigma, (sigma_prev,))
    w = _log_ratio(sigma, sigma_next) / (2.0 * _log_ratio(sigma_prev, sigma))
    return replace(c, b=c.b * (1.0 + w), h=(-c.b * w,))


def _sde_base(pz, sigma, sigma_next, eta, s_noise):
    """Shared part of the DPM++ SDE samplers: y-weight, x-space D weight 1 - e^{-h(1+eta)}, noise weight, h."""
    h = _log_ratio(sigma, sigma_next)
    r = _ratio(sigma, sigma_next)
    s_next = pz.noise_scale(sigma_next)
    a = s_next / pz.noise_scale(sigma) * r ** eta          # (s'/s) e^{-eta h}; r**0 == 1 also at r == 0
    big_h = h * (1.0 + eta)
    base = 1.0 if h == INF else -math.expm1(-big_h)        # 1 - e^{-h(1+eta)}
    noise = 0.0
    if eta:
        noise = s_next * s_noise * (1.0 if h == INF else math.sqrt(-math.expm1(-2.0 * eta * h)))
    return h, big_h, a, base, noise


def dpmpp_2m_sde(pz: Parameterization, sigma: float, sigma_next: float, sigma_prev: float | None,
                 eta: float = 1.0, s_noise: float = 1.0, solver_type: str = "midpoint") -> StepCoeffs:
    """DPM-Solver++(2M) SDE (k-diffusion), y-space.  sigma' = 0 returns D.

    x' = (sigma'/sigma) e^{-eta h} x + B D + corr (D - D_prev) + sigma' sqrt(1 - e^{-2 eta h}) s_noise z with
    B = 1 - e^{-h(1+eta)}, corr = B/2 * h/h_last (midpoint) or (1 - B/(h(1+eta))) * h/h_last (heun).
    """
    _check_pair(sigma, sigma_next)
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}")
    if sigma_next == 0.0:
        return StepCoeffs(a=0.0, b=pz.c_in(0.0), sigma_out=0.0)
    h, big_h, a, base, noise = _sde_base(pz, sigma, sigma_next, eta, s_noise)
    c_next = pz.c_in(sigma_next)
    hist: tuple[float, ...] = ()
    corr = 0.0
    if sigma_prev is not None:
        _check_history(sigma, (sigma_prev,))
        inv_r = h / _log_ratio(sigma_prev, sigma)
        corr = (0.5 * base if solver_type == "midpoint" else 1.0 - base / big_h) * inv_r
        hist = (-c_next * corr,)
    return StepCoeffs(a=a, b=c_next * (base + corr), h=hist, e=noise, sigma_out=sigma_next)


def dpmpp_3m_sde(pz: Parameterization, sigma: float, sigma_next: float, sigma_prev: tuple[float, ...] = (),
                 eta: float = 1.0, s_noise: float = 1.0) -> StepCoeffs:
    """DPM-Solver++(3M) SDE (k-diffusion), y-space; ``sigma_prev`` = (sigma_{i-1}, sigma_{i-2}), newest first.

    With h_eta = h(1+eta), phi_2 = 1 - B/h_eta (B = 1 - e^{-h_eta}), phi_3 = phi_2/h_eta - 1/2, A0 = h/h_1,
    A1 = h/h_2, w = h_1/(h_1+h_2), v = h/(h_1+h_2), k-diffusion's correction phi_2 d1 - phi_3 d2 expands to
      D:   phi_2 A0 (1+w) - phi_3 v A0
      D_1: -phi_2 (A0 + w (A0+A1)) + phi_3 v (A0+A1)
      D_2: phi_2 w A1 - phi_3 v A1
    (second order, phi_2 A0 (D - D_1), with one history entry).  h_k = inf gives A_k = 0 and w = v = 0.
    """
    _check_pair(sigma, sigma_next)
    if sigma_next == 0.0:
        return StepCoeffs(a=0.0, b=pz.c_in(0.0), sigma_out=0.0)
    h, big_h, a, base, noise = _sde_base(pz, sigma, sigma_next, eta, s_noise)
    c_next = pz.c_in(sigma_next)
    x_d, hist = base, ()
    if sigma_prev:
        _check_history(sigma, sigma_prev)
        phi2 = 1.0 if big_h == INF else 1.0 - base / big_h
        h1 = _log_ratio(sigma_prev[0], sigma)
        a0 = h / h1
        if len(sigma_prev) == 1:
            x_d, hist = base + phi2 * a0, (-phi2 * a0,)
        else:
            phi3 = phi2 / big_h - 0.5
            h2 = _log_ratio(sigma_prev[1], sigma_prev[0])
            a1, w, v = h / h2, h1 / (h1 + h2), h / (h1 + h2)
            x_d = base + phi2 * a0 * (1.0 + w) - phi3 * v * a0
            hist = (-phi2 * (a0 + w * (a0 + a1)) + phi3 * v * (a0 + a1), phi2 * w * a1 - phi3 * v * a1)
    return StepCoeffs(a=a, b=c_next * x_d, h=tuple(c_next * k for k in hist), e=noise, sigma_out=sigma_next)


_GAUSS_X, _GAUSS_W = np.polynomial.legendre.leggauss(4)  # exact for the cubic Lagrange basis of order 4


def lms_weights(ts: tuple[float, ...], t_next: float) -> list[float]:
    """Integral over [ts[0], t_next] of each Lagrange basis polynomial through the points ``ts`` (newest first).

    k-diffusion integrates the same polynomials with scipy.integrate.quad; 4-point Gauss-Legendre is exact for
    degree <= 7, so the two agree to float64 rounding.
    """
    lo, hi = ts[0], t_next
    taus = 0.5 * (hi - lo) * _GAUSS_X + 0.5 * (hi + lo)
    out = []
    for j, tj in enumerate(ts):
        basis = np.ones_like(taus)
        for k, tk in enumerate(ts):
            if k != j:
                basis *= (taus - tk) / (tj - tk)
        out.append(float(0.5 * (hi - lo) * np.dot(_GAUSS_W, basis)))
    return out


def lms(pz: Parameterization, sigma: float, sigma_next: float, sigma_prev: tuple[float, ...] = (),
        order: int = LMS_MAX_ORDER) -> StepCoeffs:
    """Linear multistep on the derivative d = (x - D)/sigma (k-diffusion ``sample_lms``).

    ``sigma_prev`` are the sigmas of the remembered derivatives, newest first.  x' = x + sum_j w_j d_{i-j}; with
    d_i = y/s - D/sigma this is y' = (c'/c)(1 + w_0/sigma) y - (c' w_0/sigma) D + sum_{j>0} c' w_j d_{i-j}; as
    the weights sum to sigma' - sigma, the y weight is c'(sigma' - sum_{j>0} w_j)/s, free of the cancellation in
    1 + w_0/sigma at large sigma.
    Remembered points at sigma = inf (d = y there) get weight 0: the interpolant through a point at infinity
    tends to the one through the finite points.  The step from sigma = inf is Euler.  ``carry`` returns
    d_i = (1/s) y - (1/sigma) D for the next steps (d = y at sigma = inf).
    """
    _check_pair(sigma, sigma_next)
    if sigma == INF:
        return replace(euler(pz, sigma, sigma_next), carry=(1.0, 0.0))
    _check_history(sigma, sigma_prev[: order - 1])
    carry = (1.0 / pz.noise_scale(sigma), -1.0 / sigma)
    pts = (sigma,) + tuple(p for p in sigma_prev[: order - 1] if p != INF)
    w = lms_weights(pts, sigma_next)
    c_next = pz.c_in(sigma_next)
    a = c_next * (sigma_next - sum(w[1:])) / pz.noise_scale(sigma)
    hist = tuple(c_next * wj for wj in w[1:]) + (0.0,) * (len(sigma_prev[: order - 1]) - (len(pts) - 1))
    return StepCoeffs(a=a, b=-c_next * w[0] / sigma, h=hist, sigma_out=sigma_next, carry=carry)


# ------------------------------------------------------------------------------------------- the sampler table


class StepArgs(NamedTuple):
    """One sample's step, everything :func:`step_coeffs` needs (mirrored by ``zsnr::StepArgs`` in C++).

    ``sigma`` is the step's noise level (for the second call of a two-stage sampler, the same sigma as the
    first); ``sigma_hat_next`` the next step's churn target (None: no churn); ``sigma_prev`` the sigmas of the
    remembered tensors, newest first.
    """

    sampler: str
    sigma: float
    sigma_next: float
    stage: int = 1
    sigma_hat_next: float | None = None
    sigma_prev: tuple[float, ...] = ()
    eta: float = 1.0
    s_noise: float = 1.0
    solver_type: str = "midpoint"
    order: int = LMS_MAX_ORDER


@dataclass(frozen=True)
class SamplerSpec:
    """Everything the library knows about one sampler: the one row that ``sample()``, the step functions,
    :class:`zsnr_kernels.SamplingPlan`, the k-diffusion drop-ins, the backends and the benchmark read (each diffusers
    scheduler is one named sampler and calls its step function).  A new sampler is one row
    (:func:`register_sampler`) plus its coefficient function; with
    ``kernel=False`` the compiled backends run it from the coefficients this function computes (the float64 table
    of :mod:`zsnr_kernels.backends.table`), with ``kernel=True`` it also has a C++ mirror (``zsnr::SamplerKind``,
    in this table's order).

    name:       ``sample(sampler=...)``; the step function is ``zsnr_kernels.<name>_step`` when ``step`` is set
    kind:       ``"single"`` (one model call per step), ``"two_stage"`` (two calls: the first returns
                ``complete=False``) or ``"multistep"`` (one call, earlier evaluations remembered)
    coeffs:     ``coeffs(pz, args: StepArgs) -> StepCoeffs``, exact at sigma = inf and sigma_next = 0
    churn:      takes EDM churn (``s_churn``...; the next step's churn is folded into the update, §2.5)
    eta:        takes ``eta`` (ancestral/SDE noise amount; at eta = 0 the step adds no noise)
    s_noise:    takes ``s_noise`` (for its eta noise; churn samplers take it for the churn noise)
    adds_noise: adds noise whatever eta is (ddpm)
    history:    how many earlier evaluations it reads (0: none)
    keeps:      what a multistep sampler remembers: ``"denoised"`` (D) or ``"derivative"`` (LMS's d)
    options:    the other :class:`StepArgs` fields it reads, with their defaults (``solver_type``, ``order``)
    at_inf:     what its step from sigma = inf is (the limit the coefficients take there)
    step:       whether ``zsnr_kernels.steps`` has a named ``<name>_step`` (else ``steps.sampler_step`` runs it)
    kernel:     whether the compiled kernels compute its coefficients themselves (a C++ mirror)
    """

    name: str
    kind: str
    coeffs: Callable[[Parameterization, StepArgs], StepCoeffs]
    at_inf: str
    churn: bool = False
    eta: bool = False
    s_noise: bool = False
    adds_noise: bool = False
    history: int = 0
    keeps: str | None = None
    options: tuple[tuple[str, object], ...] = ()
    step: bool = False
    kernel: bool = False

    def __post_init__(self):
        if self.kind not in ("single", "two_stage", "multistep"):
            raise ValueError(f"SamplerSpec.kind must be 'single', 'two_stage' or 'multistep', got {self.kind!r}")
        if (self.kind == "multistep") != (self.keeps is not None and self.history > 0) or (
                self.kind != "multistep" and self.history):
            raise ValueError("a multistep SamplerSpec keeps 'denoised' or 'derivative' with history >= 1; other "
                             "kinds keep nothing (history 0)")
        if self.keeps not in (None, "denoised", "derivative"):
            raise ValueError(f"SamplerSpec.keeps must be None, 'denoised' or 'derivative', got {self.keeps!r}")
        unknown = [name for name, _ in self.options if name not in _OPTIONS]
        if unknown:
            raise ValueError(f"SamplerSpec.options may name {_OPTIONS} (the StepArgs fields a step function takes as "
                             f"options), not {unknown}")

    def stochastic(self, eta: float) -> bool:
        """Whether a run with this ``eta`` adds noise other than churn."""
        return self.adds_noise or (self.eta and eta > 0)

    def keeps_denoised(self, stage: int) -> bool:
        """Whether the sampler reads this evaluation's D later (its history, or the first of two stages)."""
        return self.keeps == "denoised" or (self.kind == "two_stage" and stage == 1)


def _prev1(s: StepArgs) -> float | None:
    return s.sigma_prev[0] if s.sigma_prev else None


_OPTIONS = ("solver_type", "order")  # the StepArgs fields a row may take as options


_TABLE: dict[str, SamplerSpec] = {spec.name: spec for spec in (
    SamplerSpec("euler", "single", lambda pz, s: euler(pz, s.sigma, s.sigma_next), churn=True, s_noise=True,
                at_inf="y' = s' y + c_in(sigma') D: D itself, scaled to sigma'", step=True, kernel=True),
    SamplerSpec("euler_ancestral", "single",
                lambda pz, s: ancestral(pz, s.sigma, s.sigma_next, s.eta, s.s_noise, clamp=True), eta=True,
                s_noise=True, at_inf="Euler to sigma_down, then noise to sigma'", step=True, kernel=True),
    SamplerSpec("heun", "two_stage", lambda pz, s: heun(pz, s.sigma, s.sigma_next, s.stage), churn=True,
                s_noise=True, at_inf="Euler (the trapezoid over an infinite interval has no limit)", step=True,
                kernel=True),
    SamplerSpec("dpm_2", "two_stage", lambda pz, s: dpm_2(pz, s.sigma, s.sigma_next, s.stage), churn=True,
                s_noise=True, at_inf="midpoint at sigma_mid = sqrt(sigma sigma') -> inf: Euler", step=True,
                kernel=True),
    SamplerSpec("dpm_2_ancestral", "two_stage",
                lambda pz, s: dpm_2_ancestral(pz, s.sigma, s.sigma_next, s.eta, s.s_noise, stage=s.stage),
                eta=True, s_noise=True, at_inf="Euler to sigma_down, then noise", step=True, kernel=True),
    SamplerSpec("dpmpp_2s_ancestral", "two_stage",
                lambda pz, s: dpmpp_2s_ancestral(pz, s.sigma, s.sigma_next, s.eta, s.s_noise, stage=s.stage),
                eta=True, s_noise=True, at_inf="its two stages to sigma_down (finite there), then noise",
                step=True, kernel=True),
    SamplerSpec("dpmpp_2m", "multistep", lambda pz, s: dpmpp_2m(pz, s.sigma, s.sigma_next, _prev1(s)), history=1,
                keeps="denoised", at_inf="first order; a history entry at inf has weight 0 later", step=True,
                kernel=True),
    SamplerSpec("dpmpp_2m_sde", "multistep",
                lambda pz, s: dpmpp_2m_sde(pz, s.sigma, s.sigma_next, _prev1(s), s.eta, s.s_noise,
                                           s.solver_type), eta=True, s_noise=True, history=1, keeps="denoised",
                options=(("solver_type", "midpoint"),), at_inf="first order with its noise", step=True, kernel=True),
    SamplerSpec("dpmpp_3m_sde", "multistep",
                lambda pz, s: dpmpp_3m_sde(pz, s.sigma, s.sigma_next, tuple(s.sigma_prev[:2]), s.eta, s.s_noise),
                eta=True, s_noise=True, history=2, keeps="denoised", at_inf="first order with its noise", step=True,
                kernel=True),
    SamplerSpec("ddim", "single",
                lambda pz, s: ancestral(pz, s.sigma, s.sigma_next, s.eta, 1.0, clamp=False), eta=True,
                at_inf="y' = s' (sqrt(1 - eta^2) y + eta z) + c_in(sigma') D", step=True,
                kernel=True),
    SamplerSpec("ddpm", "single", lambda pz, s: ancestral(pz, s.sigma, s.sigma_next, 1.0, 1.0, clamp=False),
                adds_noise=True, at_inf="DDIM at eta = 1", step=True, kernel=True),
    SamplerSpec("lms", "multistep", lambda pz, s: lms(pz, s.sigma, s.sigma_next, tuple(s.sigma_prev), s.order),
                history=LMS_MAX_ORDER - 1, keeps="derivative", options=(("order", LMS_MAX_ORDER),),
                at_inf="Euler; a history entry at inf has weight 0 later", step=True, kernel=True),
)}


def register_sampler(spec: SamplerSpec) -> SamplerSpec:
    """Add ``spec`` to :data:`SAMPLERS` (a new name; ``kernel=False``: the compiled kernels have no mirror of a
    sampler defined here).  ``sample(sampler=spec.name)``, ``steps.sampler_step(spec.name, ...)`` and
    :class:`zsnr_kernels.SamplingPlan` run it on every backend from then on."""
    if not isinstance(spec, SamplerSpec):
        raise TypeError(f"spec must be a SamplerSpec, got {type(spec).__name__}")
    if spec.name in _TABLE:
        raise ValueError(f"a sampler named {spec.name!r} is registered already")
    if spec.kernel or spec.step:
        raise ValueError("kernel=True and step=True name a sampler the library implements (a C++ mirror, a named "
                         "step function); a registered one runs through steps.sampler_step and the coefficient "
                         "table: leave both False")
    _TABLE[spec.name] = spec
    return spec


def unregister_sampler(name: str) -> None:
    """Remove a sampler added by :func:`register_sampler` (the built-in ones stay)."""
    spec = _TABLE.get(name)
    if spec is None or spec.kernel:
        raise ValueError(f"{name!r} is not a registered sampler")
    del _TABLE[name]


#: the sampler table, read-only (:func:`register_sampler` adds a row): name -> :class:`SamplerSpec`
SAMPLERS = MappingProxyType(_TABLE)


#: the samplers the compiled kernels implement, in the order of zsnr::SamplerKind
SAMPLER_KINDS = tuple(name for name, spec in SAMPLERS.items() if spec.kernel)


def sampler_spec(name) -> SamplerSpec:
    """The row of sampler ``name`` (ValueError naming the choices for another name)."""
    spec = SAMPLERS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"sampler must be one of {tuple(SAMPLERS)}, got {name!r}")
    return spec


def step_coeffs(pz: Parameterization, s: StepArgs) -> StepCoeffs:
    """The coefficients of one sampler call: the dispatch the step functions and the kernels share."""
    spec = _TABLE.get(s.sampler)
    if spec is None:
        raise ValueError(f"sampler must be one of {tuple(SAMPLERS)}, got {s.sampler!r}")
    c = spec.coeffs(pz, s)
    target = s.sigma_hat_next
    if spec.churn and c.complete and target is not None and target != c.sigma_out:
        c = with_churn(c, pz, target, s.s_noise)
    return c


def spec_step(pz, args, sigma_eval, n_history: int, has_noise: bool):
    """A whole step checked by the Python spec, as the device backends and the traced path need it before any
    launch (a kernel cannot raise): ``(coefficients per entry of args, history depth used, whether it adds
    noise)``; raises the spec's ValueError for a step it refuses."""
    cs = [step_coeffs(pz, a) for a in args]
    for s in sigma_eval:
        pz.denoise_coeffs(s)  # raises for eps at inf
    n_hist = _validate.step_coeffs(cs, n_history)
    noisy = any(c.e != 0.0 for c in cs)
    if noisy and not has_noise:
        raise ValueError(_validate.NEEDS_NOISE)
    return cs, n_hist, noisy
