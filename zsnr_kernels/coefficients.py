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
  at sigma = inf carries weight 0 in later steps.  Exceptions, whose second stage has a limit there: heun_flow
  (Heun in the flow time t = sigma/(1+sigma), whose interval from t = 1 is finite) and dpmpp_2s_ancestral at
  eta = 1;
* a step *to* sigma = 0 follows k-diffusion: Heun and DPM2 take an Euler step, DPM++ 2M is first order, the SDE
  samplers return D and ancestral samplers add no noise.

These functions take any float64 sigmas (the C++ mirror, csrc/include/zsnr/coefficients.h, agrees with them
field by field, extremes included).  The step functions and ``sample()`` accept only the steps every backend
computes finitely and to float32 precision (``zsnr_kernels._validate.step_sigmas``): positive sigmas within
[1e-30, 1e30], and bounded spans for heun, dpm_2, dpm_2_ancestral and lms, whose updates amplify rounding by
sigma/sigma_next.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import NamedTuple

import numpy as np
import torch

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
    ``g_y*y + g_D*D (+ carry_u*D_u)`` (the derivative LMS remembers; the unconditional D_u CFG++ remembers); None
    otherwise.

    CFG++ (the "CFG++" section below): ``b_u`` is the weight of the unconditional denoised prediction
    ``D_u = p*y + q*F_u`` (the raw p, q of the evaluation: the guidance rescale acts on the guided D only), so the
    update is ``y_out = a*y + b*D + b_u*D_u + sum(h[k]*H_k) + e*z``, and ``carry_u`` its weight in the carry.
    Without a separate unconditional output (one model output, or a pair at guidance_scale 1, which is F_c alone)
    ``D_u = D``; every sampler but the CFG++ ones has ``b_u = carry_u = 0``.
    """

    a: float
    b: float
    h: tuple[float, ...] = ()
    e: float = 0.0
    sigma_out: float = 0.0
    complete: bool = True
    carry: tuple[float, float] | None = None
    b_u: float = 0.0
    carry_u: float = 0.0


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


def lcm(pz: Parameterization, sigma: float, sigma_next: float) -> StepCoeffs:
    """Latent consistency sampling (Luo et al. 2023; k-diffusion's and ComfyUI's ``sample_lcm``): the model's D,
    noised afresh to sigma', x' = D + sigma' z, i.e. y' = c'(sigma') D + s' z (D itself at sigma' = 0).  The state
    has weight 0 at every sigma, so the step from sigma = inf is this step.  (diffusers' LCMScheduler also applies
    the consistency model's boundary condition c_skip x + c_out D, which belongs to the model: ComfyUI's LCM model
    sampling does it.)"""
    _check_pair(sigma, sigma_next)
    return StepCoeffs(a=0.0, b=pz.c_in(sigma_next), e=pz.noise_scale(sigma_next), sigma_out=sigma_next)


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


# ------------------------------------------------------------------------------------------------- flow Heun


def heun_flow(pz: Parameterization, sigma: float, sigma_next: float, stage: int) -> StepCoeffs:
    """Heun's method in the rectified-flow time t = sigma/(1+sigma) (diffusers' ``FlowMatchHeunDiscreteScheduler``).

    diffusers integrates dz/dt = (z - D)/t for z = x/(1+sigma) = (1-t) x0 + t noise (the flow model's own state):
    z' = z + (t'-t)(d_1+d_2)/2.  That is not :func:`heun` (the trapezoid in sigma on x): with the same Euler predictor
    both are y' = y_2 + w (D_1 - D_2), and flow Heun's weight is heun's times (1+sigma')/(1+sigma), so the two agree
    to O(h^3) per step only.  Stage 1: the Euler predictor to sigma' (the whole step only if sigma' = 0, diffusers'
    last step).  Stage 2 (x' = (1+sigma') z', y' = c' x'):
    w = c'(1+sigma') (t'-t)/(2t') = -c'(1+sigma') (sigma-sigma') / (2 sigma' (1+sigma))   (c'(1+sigma') = 1 for flow).

    At sigma = inf (t = 1) the interval in t is finite and the step has its limit: w = -c'(1+sigma')/(2 sigma'), the
    full two-evaluation step diffusers takes from t = 1 (for flow: y' = y_2 - (D_1 - D_2)/(2 sigma'), i.e.
    z' = z + (t'-1)(v_1+v_2)/2 with the velocities v = (z - D)/t).
    """
    _check_pair(sigma, sigma_next)
    if stage == 1:
        return replace(euler(pz, sigma, sigma_next), complete=sigma_next == 0.0)
    scale = 1.0 if pz.prediction == "flow" else pz.c_in(sigma_next) * (1.0 + sigma_next)
    frac = 1.0 if sigma == INF else (sigma - sigma_next) / (1.0 + sigma)
    w = -0.5 * scale * frac / sigma_next
    return StepCoeffs(a=1.0, b=-w, h=(w,), sigma_out=sigma_next)


def _t_heun_flow(pz, a):
    """:func:`heun_flow` per sample (its tensor mirror, registered in ``_TENSOR_COEFFS``), with ``ok`` False where a
    step spans more than ``_validate.FLOW_TIME_RATIO_MAX`` in flow time."""
    s, sn = a.sigma, a.sigma_next
    done = sn == 0.0
    ca, cb = _t_euler(pz, s, sn)

    def second():
        scale = torch.ones_like(s) if pz.prediction == "flow" else _t_c_in(pz, sn) * (1.0 + sn)
        frac = torch.where(s == INF, 1.0, (s - sn) / (1.0 + s))
        w = -0.5 * scale * frac / sn
        return torch.ones_like(s), -w, w, torch.zeros_like(s)
    ratio = torch.where(s == INF, 1.0, s / (1.0 + s)) * ((1.0 + sn) / sn)
    ok = done | ~(ratio > _validate.FLOW_TIME_RATIO_MAX["heun_flow"])
    return _t_two_stage(pz, a, done, (ca, cb, torch.zeros_like(s), sn), second), ok


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


# ------------------------------------------------------------------------------------------------- DPM++ SDE


def dpmpp_sde_midpoint(sigma: float, sigma_next: float) -> float:
    """sigma_s = exp(-(t + h/2)) with t = -log sigma, h = log(sigma/sigma'): k-diffusion's ``sigma_fn(s)`` of
    ``sample_dpmpp_sde`` (r = 1/2), computed as it computes it (= sqrt(sigma sigma') to rounding); inf at sigma = inf,
    0 at sigma' = 0 (where the step is Euler and there is no midpoint)."""
    if sigma == INF or sigma_next == 0.0:
        return INF if sigma == INF else 0.0
    t, t_next = -math.log(sigma), -math.log(sigma_next)
    return math.exp(-(t + (t_next - t) * 0.5))


#: dpmpp_sde's second stage reads these remembered tensors, in this order: D_1 (weight 0 at r = 1/2, kept so the
#: row reads like every two-stage sampler's) and the state y the step started from
DPMPP_SDE_HISTORY = ("denoised", "start state")


def dpmpp_sde(pz: Parameterization, sigma: float, sigma_next: float, eta: float = 1.0, s_noise: float = 1.0, *,
              stage: int) -> StepCoeffs:
    """k-diffusion's ``sample_dpmpp_sde``: DPM-Solver++(2S) SDE with r = 1/2, two model evaluations per step.

    With sigma_s = :func:`dpmpp_sde_midpoint` and (sd, su) = ``get_ancestral_step`` (:func:`ancestral_split`):

    * stage 1, euler_ancestral from sigma to sigma_s:  x_2 = (sd_1/sigma) x + (1 - sd_1/sigma) D_1 + s_noise su_1 z_1,
      i.e. :func:`ancestral` (sigma -> sigma_s): y_2 = (s_s/s) d_1 y + c_s (1 - d_1 r_1) D_1 + s_s u_1 s_noise z_1;
    * stage 2, from the step's ORIGINAL x (not x_2), with D_d = (1 - 1/(2r)) D_1 + 1/(2r) D_2 = D_2 at r = 1/2:
      x' = (sd/sigma) x + (1 - sd/sigma) D_2 + s_noise su z_2, i.e. :func:`ancestral` (sigma -> sigma') applied to
      the start state y and D_2.  In the fused combine: weight 0 on its own y (= y_2), b on D_2, and the history
      (D_1, y) of :data:`DPMPP_SDE_HISTORY` with weights h = (0, (s'/s) d).

    Ends of the schedule (docs/design.md §2.3):

    * sigma' = 0: k-diffusion's Euler step, y' = c_in(0) D_1, complete after the first call, no noise.
    * sigma = inf: sigma_s = sqrt(sigma sigma') is inf too, and every coefficient has a limit, since
      r_1 = sigma_s/sigma = sqrt(sigma'/sigma) -> 0: stage 1 is y_2 = sqrt(1 - eta^2) y + eta s_noise z_1 (eta <= 1;
      (d, u) = (0, 1) beyond) at sigma_s = inf, the model is evaluated there again, and stage 2 is euler_ancestral
      from inf with D_2 on the start state, y' = s' sqrt(1 - eta^2) y + c' D_2 + s' eta s_noise z_2.  The gap to a
      run from a finite sigma_max shrinks like sigma_max^(-1/2) (the weight sqrt(sigma'/sigma) of the first stage).
      At eta = 0 the limit's y_2 is y itself at the same sigma (inf), so D_2 = D_1 and the step is Euler: one call,
      complete (:func:`euler` from inf).
    """
    _check_pair(sigma, sigma_next)
    if sigma_next == 0.0 or (sigma == INF and eta == 0.0):
        return euler(pz, sigma, sigma_next) if stage == 1 else _no_stage2("dpmpp_sde")
    if stage == 1:
        sigma_s = dpmpp_sde_midpoint(sigma, sigma_next)
        if sigma == INF:  # ancestral's limit from inf to inf: s = s_s = 1, c_in(inf) = 0, r_1 = 0
            d, u = ancestral_split(INF, INF, eta)
            return StepCoeffs(a=d, b=0.0, e=u * s_noise, sigma_out=INF, complete=False)
        return replace(ancestral(pz, sigma, sigma_s, eta, s_noise), complete=False)
    c = ancestral(pz, sigma, sigma_next, eta, s_noise)
    return StepCoeffs(a=0.0, b=c.b, h=(0.0, c.a), e=c.e, sigma_out=sigma_next)


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


def res_multistep(pz: Parameterization, sigma: float, sigma_next: float, sigma_prev: float | None) -> StepCoeffs:
    """RES's second-order multistep exponential integrator (Zhang, Tao and Chen 2023, arXiv 2308.02157; ComfyUI's
    ``res_multistep``), in lambda = -log sigma with h = log(sigma/sigma'):

        x' = e^{-h} x + h (b1 D + b2 D_prev),  b1 = phi1 - phi2/c2,  b2 = phi2/c2,  c2 = -log(sigma_prev/sigma)/h,

    phi1 = (1 - e^{-h})/h and phi2 = (e^{-h} - 1 + h)/h^2 of -h: the integral of e^{-(h - u)} times D interpolated
    linearly in lambda through the two evaluations.  First order (Euler) on the first step, to sigma' = 0, and from
    a remembered sigma = inf (c2 = -inf: b2 = 0).
    """
    c = euler(pz, sigma, sigma_next)
    if sigma_prev is None or sigma_next == 0.0 or sigma == INF:
        return c
    _check_history(sigma, (sigma_prev,))
    if sigma_prev == INF:
        return c
    h = _log_ratio(sigma, sigma_next)
    c2 = -_log_ratio(sigma_prev, sigma) / h
    phi1 = -math.expm1(-h) / h
    # (e^{-h} - 1 + h)/h^2 without the cancellation of 1 - h + h^2/2 ... against 1 - h at small h
    phi2 = (math.expm1(-h) + h) / (h * h) if h > 1e-4 else 0.5 - h / 6.0 + h * h / 24.0
    c_next = pz.c_in(sigma_next)
    return replace(c, b=c_next * h * (phi1 - phi2 / c2), h=(c_next * h * phi2 / c2,))


# ------------------------------------------------------------------------------------------------------- CFG++
#
# CFG++ (Chung et al. 2024, arXiv 2406.08070; ComfyUI's sample_*_cfg_pp): the sampler denoises with the guided
# prediction D but renoises with the unconditional one, D_u = p y + q F_u, i.e. the direction (x - D_u)/sigma
# replaces (x - D)/sigma.  In x = y / c_in: x' = D + sigma_down (x - D_u)/sigma + ... .  The coefficients give D_u
# its own weight b_u (StepCoeffs.b_u; the kernels fold b_u p into the y weight and read F_u once more, nothing
# else); with D_u = D (no unconditional output, or guidance_scale 1) every step is its plain sampler's, since
# b + b_u is the plain sampler's D weight.
#
# Limits.  At sigma = inf the renoising direction (x - D_u)/sigma tends to x/sigma = y/s: D_u's weight is a
# multiple of sigma'/sigma = 0, so the step from inf is the plain sampler's step from inf (D_u unread), first order
# for dpmpp_2m_cfg_pp, and a remembered D_u at inf has weight 0 later (h/h_last = 0).  dpmpp_2s_ancestral_cfg_pp at
# eta = 1 is the exception, as its plain sampler is: sigma_mid = sigma' for every sigma, and its limit keeps both
# evaluations (its docstring); for eta < 1 its limit is euler_ancestral_cfg_pp's step.  At sigma' = 0 each returns
# D, one call (ComfyUI: euler_ancestral_cfg_pp's "denoising step", dpmpp_2m_cfg_pp's e^{-h} = 0,
# dpmpp_2s_ancestral_cfg_pp's sigma_down = 0 branch, D_u + (D - D_u)); ancestral noise is 0 there.
#
# ComfyUI computes euler(_ancestral)_cfg_pp for flow (CONST) models with alpha_t = 1 - t and the ancestral split of
# the variance-exploding sigmas, which is this step in y-space.  Its dpmpp_2s_ancestral_cfg_pp switches to a
# rectified-flow ancestral split for them (``sample_dpmpp_2s_ancestral_RF_cfg_pp``) and its dpmpp_2m_cfg_pp steps in
# the flow's own t: here, as for the plain samplers, every parameterization takes k-diffusion's formulas in the
# variance-exploding sigma.  ComfyUI disables its cfg = 1 optimization for these samplers and renoises with F_u
# even at cfg = 1; here a pair at guidance_scale 1 is F_c alone, as for every sampler (the step warns), and the step
# is the plain sampler's (for ComfyUI's cfg = 1 behaviour pass a scale a rounding away from 1).


def ancestral_cfg_pp(pz: Parameterization, sigma: float, sigma_next: float, eta: float,
                     s_noise: float = 1.0) -> StepCoeffs:
    """euler_ancestral_cfg_pp (eta = 0: euler_cfg_pp): x' = D + sigma_down (x - D_u)/sigma + s_noise sigma_up z,

    with k-diffusion's ``get_ancestral_step`` (d, u of :func:`ancestral_split`, r = sigma'/sigma):
    y' = (s'/s) d y + c' D - c' d r D_u + s' u s_noise z.  At sigma = inf r = 0: y' = s' d y + c' D + s' u s_noise z
    (the plain step; D_u unread), at sigma' = 0 (d = 1, r = 0): y' = c_in(0) D."""
    c = ancestral(pz, sigma, sigma_next, eta, s_noise, clamp=True)
    d, _ = ancestral_split(sigma, sigma_next, eta)
    dr = d * _ratio(sigma, sigma_next)
    c_next = pz.c_in(sigma_next)
    return replace(c, b=c_next, b_u=-c_next * dr if dr != 0.0 else 0.0)


def euler_cfg_pp(pz: Parameterization, sigma: float, sigma_next: float) -> StepCoeffs:
    """euler_cfg_pp: x' = D + sigma' (x - D_u)/sigma, y' = (s'/s) y + c' D - c' (sigma'/sigma) D_u (ComfyUI's
    euler_ancestral_cfg_pp at eta = 0)."""
    return ancestral_cfg_pp(pz, sigma, sigma_next, 0.0, 0.0)


def dpmpp_2m_cfg_pp(pz: Parameterization, sigma: float, sigma_next: float, sigma_prev: float | None) -> StepCoeffs:
    """DPM-Solver++(2M) with CFG++ (ComfyUI ``sample_dpmpp_2m_cfg_pp``), in x with r = sigma'/sigma = e^{-h}:

        x' = D + r (x - D_u) + (1 - r) w (D - D_u,prev),    w = h/(2 h_last)

    (w = 0 on the first step, to sigma' = 0 and from a remembered sigma = inf, as :func:`dpmpp_2m`).  The history
    is the previous evaluation's unconditional D_u,prev, not its D: the step outputs D_u as its carry
    (``carry_u = 1``, StepResult.derivative).  y' = (s'/s) y + c'(1 + (1 - r) w) D - c' r D_u - c'(1 - r) w D_u,prev.
    """
    c = euler(pz, sigma, sigma_next)
    c_next = pz.c_in(sigma_next)
    r = _ratio(sigma, sigma_next)
    hist: tuple[float, ...] = ()
    corr = 0.0
    if sigma_prev is not None and sigma_next != 0.0:
        _check_history(sigma, (sigma_prev,))
        corr = c.b * (_log_ratio(sigma, sigma_next) / (2.0 * _log_ratio(sigma_prev, sigma)))  # c'(1 - r) w
        hist = (-corr,)
    return StepCoeffs(a=c.a, b=c_next + corr, h=hist, sigma_out=sigma_next, carry=(0.0, 0.0),
                      b_u=-c_next * r if r != 0.0 else 0.0, carry_u=1.0)


def dpmpp_2s_ancestral_cfg_pp(pz: Parameterization, sigma: float, sigma_next: float, eta: float = 1.0,
                              s_noise: float = 1.0, *, stage: int) -> StepCoeffs:
    """DPM-Solver++(2S) ancestral with CFG++ (ComfyUI ``sample_dpmpp_2s_ancestral_cfg_pp``), in two calls.

    In x, with sigma_mid = sqrt(sigma sigma_down) as :func:`dpmpp_2s_ancestral`, D_1, D_u1 of the first evaluation
    and D_u2 the unconditional D at the midpoint (its guided D_2 is not used):

        x_2 = (sigma_mid/sigma) x + (1 - sigma_mid/sigma) D_u1                          (stage 1)
        x'  = (sigma_down/sigma) x + (1 - sigma_down/sigma) D_u2 + s_noise sigma_up z + (D_1 - D_u1)

    Stage 1 outputs D_u1 as its carry (StepResult.derivative); stage 2 reads history (D_1, D_u1) and, x undone from
    x_2 as in :func:`_midpoint_stage2`, is y' = (s'/s_mid) d y_2 + c' D_1 + c'(h1 - 1) D_u1 + c'(1 - sigma_down/sigma)
    D_u2 + s' u s_noise z with h1 = sigma_down (1/sigma - 1/sigma_mid).  Where sigma_down = 0 (sigma' = 0, or eta
    clamped) ComfyUI's Euler step to 0 with D_u plus the guidance vector is y' = c' D_1 + noise, one call.  From
    sigma = inf: for eta < 1 sigma_mid is inf too and the limit is :func:`ancestral_cfg_pp` (the plain step from inf);
    for eta = 1 sigma_mid = sigma', d = 0, h1 = 0: predictor y_2 = s' y + c' D_u1, then
    y' = c'(D_1 - D_u1 + D_u2) + s' s_noise z.
    """
    _check_pair(sigma, sigma_next)
    d, u = ancestral_split(sigma, sigma_next, eta)
    c_next = pz.c_in(sigma_next)
    noise = s_noise * pz.noise_scale(sigma_next) * u
    r = _ratio(sigma, sigma_next)
    if sigma_next == 0.0 or eta * math.sqrt((1.0 - r) * (1.0 + r)) > 1.0:
        if stage != 1:
            _no_stage2("dpmpp_2s_ancestral_cfg_pp")
        return StepCoeffs(a=0.0, b=c_next, e=noise, sigma_out=sigma_next)
    sigma_d_times = (INF if eta < 1.0 else eta * sigma_next) if sigma == INF else sigma * d  # sigma sigma_down / sigma'
    sigma_mid = math.sqrt(sigma_next * sigma_d_times)
    if sigma_mid == INF:
        return ancestral_cfg_pp(pz, sigma, sigma_next, eta, s_noise) if stage == 1 else _no_stage2(
            "dpmpp_2s_ancestral_cfg_pp")
    if stage == 1:
        e1 = euler(pz, sigma, sigma_mid)
        return StepCoeffs(a=e1.a, b=0.0, b_u=e1.b, sigma_out=sigma_mid, complete=False, carry=(0.0, 0.0),
                          carry_u=1.0)
    base = _midpoint_stage2(pz, sigma, sigma_mid, d * sigma_next, sigma_next, d, dpmpp=True)
    return StepCoeffs(a=base.a, b=0.0, b_u=base.b, h=(c_next, base.h[0] - c_next), e=noise, sigma_out=sigma_next)


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


# ------------------------------------------------------------------------------------- singlestep DPM-Solver++

#: the highest order of singlestep DPM-Solver++ (diffusers refuses more)
SINGLESTEP_MAX_ORDER = 3


def _singlestep_history(sigma: float, sigma_prev: tuple[float, ...], order: int) -> None:
    """An order-k singlestep step reads the group's k - 1 earlier D (sigmas strictly above sigma, growing with age),
    then the group's start state, at the sigma of the group's first evaluation."""
    if len(sigma_prev) < order:
        raise ValueError(f"dpmpp_singlestep of order {order} reads {order - 1} earlier denoised prediction(s) of its "
                         f"group and then the group's start state ({order} history entries), got {len(sigma_prev)}")
    _check_history(sigma, sigma_prev[: order - 1])
    if sigma_prev[order - 1] != sigma_prev[order - 2]:
        raise ValueError(f"dpmpp_singlestep of order {order}: history[{order - 1}] is the group's start state, at the "
                         f"sigma of its first evaluation history[{order - 2}] ({sigma_prev[order - 2]}), got "
                         f"{sigma_prev[order - 1]}; pass [(sigma, D) of the group's earlier evaluations, newest first] "
                         "+ [(sigma_g, y_g)]")


def dpmpp_singlestep(pz: Parameterization, sigma: float, sigma_next: float, sigma_prev: tuple[float, ...] = (),
                     order: int = 1, solver_type: str = "midpoint", eta: float = 0.0,
                     s_noise: float = 1.0) -> StepCoeffs:
    """Singlestep DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095; diffusers' ``DPMSolverSinglestepScheduler``): the
    step of ``order`` k = 1..3 that ends a group of k consecutive steps.  Every step of a group integrates from the
    group's start state y_g (at sigma_g) to its own sigma', with the denoised predictions of the group's evaluations
    so far; the group's steps have orders 1, 2, .., k (diffusers' order list), so order 1 starts a group (y_g = y).

    ``sigma_prev`` (order >= 2): the sigmas of the group's earlier evaluations, newest first, then sigma_g once more
    for the start state: (sigma_g, sigma_g) for order 2, (sigma_m, sigma_g, sigma_g) for order 3.  The history
    tensors are those evaluations' D, then y_g; ``h`` weighs them in that order and the current state gets a = 0 (it
    enters through D alone).  Order 1 is the first-order step from the current state (history not read).

    In x = y / c_in(sigma), with lambda = -log sigma, h = log(sigma_g/sigma'), h_k = log(sigma_g/sigma_k),
    r_k = h_k/h (r0 of the current sigma, r1 of sigma_m), d_k = log(sigma_k/sigma') = h (1 - r_k), H = h (1 + eta),
    B = 1 - e^{-H}, phi2 = 1 - B/H and phi3 = phi2/H - 1/2:

        x' = (sigma'/sigma_g) e^{-eta h} x_g + B D_g + C + sigma' s_noise sqrt(1 - e^{-2 eta h}) z

    with the correction C of diffusers' update: order 2, ``midpoint`` B/(2 r0) (D - D_g), ``heun`` phi2/r0 (D - D_g);
    order 3, ``midpoint`` phi2/r0 (D - D_g), ``heun`` phi2 D1 - phi3 D2 (diffusers' D1, D2 through D, D_m, D_g),
    which is w0 (D - D_g) + w1 (D_m - D_g) with

        w0 = [B/(1+eta) + phi2 (d1 - 2/(1+eta))] / (r0 (d1 - d0)),
        w1 = [phi2 (2/(1+eta) - d0) - B/(1+eta)] / (r1 (d1 - d0))

    (the 1/h of phi3 cancels against r0 - r1 = (d1 - d0)/h: no cancellation at large h).  eta = 0 is diffusers'
    ``dpmsolver++``; eta = 1 its ``sde-dpmsolver++``, whose third-order ``heun`` update diffusers writes with
    -(phi3 + 1) D2 (the sign of its 1/2, as in its multistep SDE update): this is the integral, -phi3 D2.

    Ends of the schedule (docs/design.md §2.3):

    * sigma' = 0: D, first order at every order (as dpmpp_2m; the correction's weight h/h0 grows without bound as
      sigma' -> 0, and diffusers' order list ends with first order there).
    * sigma_g = inf (the first group of a zero-terminal-SNR schedule): h = h_k = inf, r_k -> 1 (r_k = 1 - d_k/h with
      finite d_k), B = phi2 = 1, phi3 = -1/2, the start state's weight (s'/s_g) e^{-eta h} -> s' (eta = 0; 0 for
      eta > 0) and its noise s' s_noise.  So order 1 is Euler from inf; order 2 ``midpoint`` weighs D_g and D by 1/2
      each, ``heun`` and order 3 ``midpoint`` take D alone (D_g weight 0); order 3 ``heun`` weighs D by
      (d1 - 1/(1+eta))/(d1 - d0), D_m by (1/(1+eta) - d0)/(d1 - d0) and D_g by 0.  Finite, and the limit of the
      steps from a finite sigma_g, approached like 1/log(sigma_g) (the weights are ratios of logs).
    """
    _check_pair(sigma, sigma_next)
    if isinstance(order, bool) or order not in range(1, SINGLESTEP_MAX_ORDER + 1):
        raise ValueError(f"dpmpp_singlestep: order must be 1, 2 or 3, got {order!r}")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}")
    if order > 1:
        _singlestep_history(sigma, sigma_prev, order)
    if sigma_next == 0.0:
        return StepCoeffs(a=0.0, b=pz.c_in(0.0), sigma_out=0.0)
    if order == 1:
        _, _, a, base, noise = _sde_base(pz, sigma, sigma_next, eta, s_noise)
        return StepCoeffs(a=a, b=pz.c_in(sigma_next) * base, e=noise, sigma_out=sigma_next)
    sigma_g = sigma_prev[order - 1]
    h, big_h, a_g, base, noise = _sde_base(pz, sigma_g, sigma_next, eta, s_noise)
    phi2 = 1.0 if big_h == INF else 1.0 - base / big_h
    r0 = 1.0 if h == INF else _log_ratio(sigma_g, sigma) / h
    if order == 2:
        w0 = (0.5 * base if solver_type == "midpoint" else phi2) / r0
        w = (w0,)
    elif solver_type == "midpoint":
        w = (phi2 / r0, 0.0)
    else:
        sigma_m = sigma_prev[0]
        r1 = 1.0 if h == INF else _log_ratio(sigma_g, sigma_m) / h
        d0, d1 = _log_ratio(sigma, sigma_next), _log_ratio(sigma_m, sigma_next)
        k = 1.0 / (1.0 + eta)
        w = ((base * k + phi2 * (d1 - 2.0 * k)) / (r0 * (d1 - d0)),
             (phi2 * (2.0 * k - d0) - base * k) / (r1 * (d1 - d0)))
    c_next = pz.c_in(sigma_next)
    # newest first: D (b), the group's earlier D (D_m for order 3, then D_g), then y_g
    hist = tuple(c_next * v for v in w[1:]) + (c_next * (base - sum(w)), a_g)
    return StepCoeffs(a=0.0, b=c_next * w[0], h=hist, e=noise, sigma_out=sigma_next)


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


# -------------------------------------------------------------------------------------------------------- UniPC

#: UniPC's B(h) variants (diffusers' and ComfyUI's ``solver_type``/``variant``): B(h) = h (bh1) or e^h - 1 (bh2)
UNIPC_VARIANTS = ("bh1", "bh2")
#: the highest order of UniPC's predictor and corrector
UNIPC_MAX_ORDER = 3


def _phi_scaled(k: int, z: float) -> float:
    """k! z phi_{k+1}(z), the right-hand sides of UniPC's order conditions, in terms of the exponential-integrator
    functions phi_1(z) = (e^z - 1)/z, phi_{j+1}(z) = (phi_j(z) - 1/j!)/z.  diffusers builds them by that recursion,
    whose cancellation loses about a digit per order at small z (many steps); below |z| = 1/2 the Taylor series
    phi_j(z) = sum_m z^m/(m + j)! is summed instead (to float64 rounding), which agrees with the recursion to
    1e-15 where the recursion is accurate."""
    if abs(z) < 0.5:
        term, total, m = 1.0 / math.factorial(k + 1), 0.0, 0
        while True:  # phi_{k+1}(z) = sum_m z^m / (m + k + 1)!
            total += term
            m += 1
            term *= z / (m + k + 1)
            if abs(term) < 1e-18 * abs(total):
                break
        return math.factorial(k) * z * total
    phi = math.expm1(z) / z
    for j in range(1, k + 1):
        phi = (phi - 1.0 / math.factorial(j)) / z
    return math.factorial(k) * z * phi


def _solve(lhs: list[list[float]], rhs: list[float]) -> list[float]:
    """x with lhs x = rhs for UniPC's order conditions (at most 3 x 3, Vandermonde in distinct points): Gaussian
    elimination with partial pivoting in Python floats, as LAPACK's gesv does it (numpy's solve costs ~15 us a call
    in overhead, several per step)."""
    m = len(rhs)
    a = [row[:] + [v] for row, v in zip(lhs, rhs)]
    for k in range(m):
        piv = max(range(k, m), key=lambda i: abs(a[i][k]))
        a[k], a[piv] = a[piv], a[k]
        for i in range(k + 1, m):
            f = a[i][k] / a[k][k]
            for j in range(k, m + 1):
                a[i][j] -= f * a[k][j]
    x = [0.0] * m
    for k in reversed(range(m)):
        x[k] = (a[k][m] - sum(a[k][j] * x[j] for j in range(k + 1, m))) / a[k][k]
    return x


def _unipc_terms(sigma: float, sigma_next: float, older: tuple[float, ...], variant: str, order: int,
                 corrector: bool) -> tuple[float, list[float], float]:
    """One UniPC predictor (``corrector=False``: from sigma to sigma_next) or corrector (``corrector=True``: of the
    step from ``sigma`` to ``sigma_next``, whose result the model has just been evaluated at) of ``order``, as the
    VE-latent weights of its residual B(h) sum_k rho_k D1_k on the denoised predictions: ``(w0, ws, w_new)`` with
    residual = w0 D_0 + sum_k ws[k] D_k + w_new D_new, where D_0 is the prediction at ``sigma``, D_k those at the
    ``older`` sigmas (newest first), D_new the corrector's new evaluation, and D1_k = (D_k - D_0)/r_k with
    r_k = (lambda_k - lambda_0)/h (lambda = -log sigma, h = lambda(sigma_next) - lambda(sigma)); the corrector's new
    point has r = 1.

    rho solves the order conditions sum_k rho_k r_k^j = b_j, one per point (Zhao et al. 2023, Algorithm 2 with data
    prediction, as diffusers' ``UniPCMultistepScheduler`` computes them), with B(h) b_j = (j+1)! hh phi_{j+2}(hh),
    hh = -h; it is solved for B(h) rho, which stays finite where B(h) (bh1 at h = inf) does not.  Two orders are
    diffusers' fixed choices: the order-2 predictor takes rho = 1/2, the order-1 corrector rho = 1/2.  A remembered
    point at sigma = inf has r = -inf: its rho and D1 vanish together (the order conditions tend to the system
    without it), so it is dropped; ``order`` counts the points before any is dropped, as the fixed choices do.
    """
    h = _log_ratio(sigma, sigma_next)
    entries = older[: order - 1]
    keep = [k for k, p in enumerate(entries) if p != INF]
    rks = [-_log_ratio(entries[k], sigma) / h for k in keep]
    hh = -h
    big_b = hh if variant == "bh1" else math.expm1(hh)
    if corrector and order == 1:
        brho = [0.5 * big_b]
    elif not corrector and order == 2:
        brho = [0.5 * big_b] * len(keep)
    else:
        cols = rks + ([1.0] if corrector else [])
        brho = _solve([[c**j for c in cols] for j in range(len(cols))],
                      [_phi_scaled(j + 1, hh) for j in range(len(cols))])
    ws, w0 = [0.0] * len(entries), 0.0
    for j, k in enumerate(keep):
        ws[k] = brho[j] / rks[j]
        w0 -= ws[k]
    w_new = brho[-1] if corrector else 0.0
    return w0 - w_new, ws, w_new


def unipc(pz: Parameterization, sigma: float, sigma_next: float, sigma_prev: tuple[float, ...] = (),
          order: int = 2, corrector: int = 0, variant: str = "bh2") -> StepCoeffs:
    """UniPC (Zhao et al. 2023, arXiv 2302.04867) with data prediction, as diffusers' ``UniPCMultistepScheduler``
    runs it: one model evaluation per step does the corrector UniC of the previous step and the predictor UniP of
    this one, **both in one pass**, since both combine the same tensors.

    In the VE latent, with lambda = -log sigma, h = lambda' - lambda, the predictor of order p is

        x' = (sigma'/sigma) x_c + (1 - sigma'/sigma) D_i - B(h) sum_k rho_k (D_{i-k} - D_i)/r_k,

    and the corrector of the step that led here (order ``corrector``, the order that step's predictor had, from
    sigma_prev[0] to sigma, whose h and points it shares) replaces the predicted x by
    x_c = x - B(h_c)[sum_k (rho^c_k - rho^p_k) D1_k + rho^c_new (D_i - D_{i-1})] -- the difference of the
    corrector and the predictor it corrects, which is all of UniC that is not already in x.  So
    y' = (s'/s) y + c'(sigma')[(sigma'/sigma) dx_c + the predictor's D terms]: one linear combination of y, D_i
    and up to three remembered D (``sigma_prev``, newest first).

    ``order`` is this step's predictor order (1-3; fewer when fewer points are remembered), ``corrector`` the
    order of the correction (0: none).  At the ends of a schedule (§2.3):

    * the step from sigma = inf is Euler (nothing is remembered yet);
    * the corrector of that step, whose h is inf: with bh2, B(h) = e^{-h} - 1 -> -1 and the correction tends to
      x_c = x + (D_i - D_inf)/2, which it takes (the runs from sigma_max = 1e4, 1e8, 1e16 converge to it); with
      bh1, B(h) = -h grows without bound and there is no limit: that correction is skipped;
    * a remembered point at sigma = inf has r = -inf: its weight is 0 (the limit of the order conditions);
    * the step to sigma' = 0 is first order (x' = D_i): h = inf there and the higher-order terms have no limit
      (diffusers' default ``lower_order_final`` makes that step first order too).
    """
    return _unipc(pz, sigma, sigma_next, tuple(sigma_prev), order, corrector, variant)


def _check_unipc_options(order, corrector, variant) -> None:
    """UniPC's host-value options (the float path and the tensor mirror alike)."""
    if variant not in UNIPC_VARIANTS:
        raise ValueError(f"solver_type must be one of {UNIPC_VARIANTS} for unipc, got {variant!r}")
    if not (isinstance(order, int) and 1 <= order <= UNIPC_MAX_ORDER):
        raise ValueError(f"order must be 1, 2 or 3 for unipc, got {order!r}")
    if not (isinstance(corrector, int) and 0 <= corrector <= UNIPC_MAX_ORDER):
        raise ValueError(f"corrector must be 0 (none) or the order 1-3 of the step it corrects, got {corrector!r}")


@functools.lru_cache(maxsize=4096)  # ~30 us of Python per call (its small solves); a schedule run again costs none
def _unipc(pz: Parameterization, sigma: float, sigma_next: float, sigma_prev: tuple[float, ...], order: int,
           corrector: int, variant: str) -> StepCoeffs:
    _check_pair(sigma, sigma_next)
    _check_unipc_options(order, corrector, variant)
    prev = tuple(sigma_prev[:UNIPC_MAX_ORDER])
    _check_history(sigma, prev)
    if corrector > len(prev):
        raise ValueError(f"a corrector of order {corrector} needs {corrector} remembered predictions (the one of "
                         f"the step it corrects and {corrector - 1} before it), got {len(prev)}")
    p = 1 if sigma == INF or sigma_next == 0.0 else min(order, len(prev) + 1)
    r = _ratio(sigma, sigma_next)
    b = 1.0 - r
    hist = [0.0] * len(prev)
    if p > 1:
        w0, ws, _ = _unipc_terms(sigma, sigma_next, prev, variant, p, corrector=False)
        b -= w0
        for k, wk in enumerate(ws):
            hist[k] -= wk
    if corrector and r != 0.0 and not (prev[0] == INF and variant == "bh1"):
        # the correction x_c - x: the corrector's residual replaces the predictor's (both of the step from
        # prev[0] to sigma, of order `corrector`), carried into this step by sigma'/sigma
        w0, ws, w_new = _unipc_terms(prev[0], sigma, prev[1:], variant, corrector, corrector=True)
        if corrector > 1:  # the predictor's residual, which x holds (none for order 1 and from sigma = inf)
            p0, ps, _ = _unipc_terms(prev[0], sigma, prev[1:], variant, corrector, corrector=False)
            w0, ws = w0 - p0, [wk - pk for wk, pk in zip(ws, ps)]
        b -= r * w_new
        hist[0] -= r * w0
        for k, wk in enumerate(ws):
            hist[k + 1] -= r * wk
    c_next = pz.c_in(sigma_next)
    return StepCoeffs(a=pz.noise_scale(sigma_next) / pz.noise_scale(sigma), b=c_next * b,
                      h=tuple(c_next * v for v in hist), sigma_out=sigma_next)


# ------------------------------------------------------------------------------------------- the sampler table


class StepArgs(NamedTuple):
    """One sample's step, everything :func:`step_coeffs` needs (mirrored by ``zsnr::StepArgs`` in C++).

    ``sigma`` is the step's noise level (for the second call of a two-stage sampler, the same sigma as the
    first); ``sigma_hat_next`` the next step's churn target (None: no churn); ``sigma_prev`` the sigmas of the
    remembered tensors, newest first; ``order`` the order of lms and of unipc's predictor, ``corrector`` the order
    of unipc's corrector (0: none).
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
    corrector: int = 0


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
    keeps:      what a multistep sampler remembers: ``"denoised"`` (D) or ``"derivative"`` (the step's carry output:
                LMS's d, dpmpp_2m_cfg_pp's unconditional D_u)
    options:    the other :class:`StepArgs` fields it reads, with their defaults (``solver_type``, ``order``)
    per_step:   ``per_step(i, n, options) -> dict``: the step arguments that depend on the step's place in an
                n-step schedule, given the run's options (unipc: its warm-up and final orders and its corrector);
                ``sample()`` passes them to step i.  None: nothing depends on it
    uncond:     weights the unconditional prediction D_u apart from the guided D (CFG++): it needs
                ``model_output=(F_cond, F_uncond)`` with ``guidance_scale != 1``, else it is its plain sampler
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
    per_step: Callable[[int, int, dict], dict] | None = None
    uncond: bool = False

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


def _unipc_per_step(i: int, n: int, options: dict) -> dict:
    """UniPC's orders at step i of n as diffusers' scheduler sets them: the predictor's order grows by one per step
    from 1 up to ``order`` (warm-up), and with ``lower_order_final`` (default) it is at most the number of steps
    left; the corrector of step i has the order of step i - 1's predictor, unless i - 1 is in
    ``disable_corrector``."""
    order, final = options.get("order", 2), options.get("lower_order_final", True)

    def at(k: int) -> int:
        return min(order, k + 1, n - k) if final else min(order, k + 1)

    off = i == 0 or (i - 1) in options.get("disable_corrector", ())
    return {"order": at(i), "corrector": 0 if off else at(i - 1)}


_TABLE: dict[str, SamplerSpec] = {spec.name: spec for spec in (
    SamplerSpec("euler", "single", lambda pz, s: euler(pz, s.sigma, s.sigma_next), churn=True, s_noise=True,
                at_inf="y' = s' y + c_in(sigma') D: D itself, scaled to sigma'", step=True, kernel=True),
    SamplerSpec("euler_ancestral", "single",
                lambda pz, s: ancestral(pz, s.sigma, s.sigma_next, s.eta, s.s_noise, clamp=True), eta=True,
                s_noise=True, at_inf="Euler to sigma_down, then noise to sigma'", step=True, kernel=True),
    SamplerSpec("heun", "two_stage", lambda pz, s: heun(pz, s.sigma, s.sigma_next, s.stage), churn=True,
                s_noise=True, at_inf="Euler (the trapezoid over an infinite interval has no limit)", step=True,
                kernel=True),
    SamplerSpec("heun_flow", "two_stage", lambda pz, s: heun_flow(pz, s.sigma, s.sigma_next, s.stage),
                at_inf="both stages (the interval in flow time t = sigma/(1+sigma) is finite): correction weight "
                       "w = -c'(1+sigma')/(2 sigma')", step=True),
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
    SamplerSpec("dpmpp_sde", "two_stage",
                lambda pz, s: dpmpp_sde(pz, s.sigma, s.sigma_next, s.eta, s.s_noise, stage=s.stage),
                eta=True, s_noise=True, at_inf="eta > 0: both stages (the midpoint is inf too: y_2 = sqrt(1-eta^2) y "
                "+ eta z_1, the model again at inf, then euler_ancestral with D_2 on y); eta = 0: Euler",
                step=True),
    SamplerSpec("dpmpp_2m", "multistep", lambda pz, s: dpmpp_2m(pz, s.sigma, s.sigma_next, _prev1(s)), history=1,
                keeps="denoised", at_inf="first order; a history entry at inf has weight 0 later", step=True,
                kernel=True),
    SamplerSpec("res_multistep", "multistep", lambda pz, s: res_multistep(pz, s.sigma, s.sigma_next, _prev1(s)),
                history=1, keeps="denoised", at_inf="first order; a history entry at inf has weight 0 later",
                step=True),
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
    SamplerSpec("lcm", "single", lambda pz, s: lcm(pz, s.sigma, s.sigma_next), adds_noise=True,
                at_inf="the same step: y' = c'(sigma') D + s' z (the state's weight is 0 at every sigma)", step=True),
    SamplerSpec("unipc", "multistep",
                lambda pz, s: unipc(pz, s.sigma, s.sigma_next, s.sigma_prev, s.order, s.corrector, s.solver_type),
                history=UNIPC_MAX_ORDER, keeps="denoised", options=(("solver_type", "bh2"), ("order", 2)),
                per_step=_unipc_per_step, step=True,
                at_inf="Euler; the corrector of that step tends to x + (D - D_inf)/2 with bh2 and is skipped with bh1 "
                       "(no limit); a history entry at inf has weight 0 later"),
    SamplerSpec("lms", "multistep", lambda pz, s: lms(pz, s.sigma, s.sigma_next, tuple(s.sigma_prev), s.order),
                history=LMS_MAX_ORDER - 1, keeps="derivative", options=(("order", LMS_MAX_ORDER),),
                at_inf="Euler; a history entry at inf has weight 0 later", step=True, kernel=True),
    # CFG++ (the section after res_multistep): D_u has its own weight; keeps="derivative" is the unconditional D_u
    # the step returns as StepResult.derivative
    SamplerSpec("euler_cfg_pp", "single", lambda pz, s: euler_cfg_pp(pz, s.sigma, s.sigma_next), step=True, uncond=True,
                at_inf="euler's: y' = s' y + c_in(sigma') D (D_u has weight sigma'/sigma = 0)"),
    SamplerSpec("euler_ancestral_cfg_pp", "single",
                lambda pz, s: ancestral_cfg_pp(pz, s.sigma, s.sigma_next, s.eta, s.s_noise), eta=True, s_noise=True,
                step=True, uncond=True, at_inf="euler_ancestral's (D_u has weight 0 there)"),
    SamplerSpec("dpmpp_2m_cfg_pp", "multistep", lambda pz, s: dpmpp_2m_cfg_pp(pz, s.sigma, s.sigma_next, _prev1(s)),
                history=1, keeps="derivative", step=True, uncond=True,
                at_inf="first order, euler's (D_u has weight 0); remembers D_u; a history entry at inf has weight 0"),
    SamplerSpec("dpmpp_2s_ancestral_cfg_pp", "two_stage",
                lambda pz, s: dpmpp_2s_ancestral_cfg_pp(pz, s.sigma, s.sigma_next, s.eta, s.s_noise, stage=s.stage),
                eta=True, s_noise=True, step=True, uncond=True,
                at_inf="eta < 1: euler_ancestral's; eta = 1: predictor y_2 = s' y + c' D_u1 to sigma', then "
                       "y' = c'(D_1 - D_u1 + D_u2) + s' s_noise z"),
)}


def register_sampler(spec: SamplerSpec) -> SamplerSpec:
    """Add ``spec`` to :data:`SAMPLERS` (a new name; ``kernel=False``: the compiled kernels have no mirror of a
    sampler defined here).  ``sample(sampler=spec.name)``, ``steps.sampler_step(spec.name, ...)`` and
    :class:`zsnr_kernels.SamplingPlan` run it on every backend from then on."""
    if not isinstance(spec, SamplerSpec):
        raise TypeError(f"spec must be a SamplerSpec, got {type(spec).__name__}")
    if _row(spec.name) is not None:
        raise ValueError(f"a sampler named {spec.name!r} is registered already" + (
            " (a row the library runs without listing it in SAMPLERS; steps.sampler_step takes its name as it is)"
            if spec.name in _HIDDEN else ""))
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

#: rows the step functions run by name but the table does not list (so ``sample()``'s menu, the ComfyUI node, the
#: self-test and the k-diffusion drop-ins, which iterate :data:`SAMPLERS`, do not offer them): a sampler whose loop
#: the library's own loops cannot run yet (:data:`DPMPP_SINGLESTEP`).  Fixed at import; never changed at run time.
_HIDDEN: dict[str, SamplerSpec] = {}


def _row(name: str) -> SamplerSpec | None:
    """The row named ``name`` that a step can run, listed or hidden (None for another name).  Two dict lookups, not
    a ChainMap: its ``get`` is Python code (0.6 us), and this runs on every step."""
    spec = _TABLE.get(name)
    return _HIDDEN.get(name) if spec is None else spec


#: the samplers the compiled kernels implement, in the order of zsnr::SamplerKind
SAMPLER_KINDS = tuple(name for name, spec in SAMPLERS.items() if spec.kernel)


#: the highest ``order`` each sampler taking one accepts
MAX_ORDERS = {"lms": LMS_MAX_ORDER, "unipc": UNIPC_MAX_ORDER}

#: singlestep DPM-Solver++ (:func:`dpmpp_singlestep`) as a sampler row, run by ``steps.sampler_step("dpmpp_singlestep",
#: ...)`` but not listed in :data:`SAMPLERS` (:data:`_HIDDEN`): a listed row has a named
#: ``zsnr_kernels.steps.<name>_step``, and the loops that keep a multistep history (``sample()``, the k-diffusion
#: drop-ins, the self-test) remember denoised predictions only, where this sampler also reads the state its group
#: started from (history ``[D of the group's earlier evaluations, newest first] + [y_g]``).
#: ``zsnr_kernels.diffusers.ZSNRDPMSolverSinglestepScheduler`` steps with it.
DPMPP_SINGLESTEP = SamplerSpec(
    "dpmpp_singlestep", "multistep",
    lambda pz, s: dpmpp_singlestep(pz, s.sigma, s.sigma_next, tuple(s.sigma_prev), s.order, s.solver_type, s.eta,
                                   s.s_noise),
    history=SINGLESTEP_MAX_ORDER, keeps="denoised", eta=True, s_noise=True,
    options=(("solver_type", "midpoint"), ("order", 1)),
    at_inf="order 1: first order (Euler; with eta its noise); a group that starts at inf: r_k -> 1, so order 2 "
           "midpoint averages D_inf and D, heun and order 3 midpoint take D alone, order 3 heun weighs D and D_m by "
           "ratios of the finite log steps (D_inf weight 0)")
_HIDDEN[DPMPP_SINGLESTEP.name] = DPMPP_SINGLESTEP


def solver_types(sampler: str) -> tuple[str, ...]:
    """The ``solver_type`` values ``sampler`` takes (empty for a sampler without that option): dpmpp_2m_sde's
    corrections, unipc's variants."""
    if "solver_type" not in dict(sampler_spec(sampler).options):
        return ()
    return UNIPC_VARIANTS if sampler == "unipc" else SOLVER_TYPES


def sampler_spec(name) -> SamplerSpec:
    """The row of sampler ``name`` (ValueError naming the choices for another name)."""
    spec = _row(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"sampler must be one of {tuple(SAMPLERS)}, got {name!r}")
    return spec


def step_coeffs(pz: Parameterization, s: StepArgs) -> StepCoeffs:
    """The coefficients of one sampler call: the dispatch the step functions and the kernels share."""
    spec = _row(s.sampler)
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


# ------------------------------------------------------------------- per-sample coefficients on the device (§2.9)
#
# The functions above branch on values, which a (B,) sigma tensor on the device cannot give the host without waiting
# for it.  Below, the same formulas in float64 tensor math on the sigmas' device, every branch a torch.where over the
# samples (both sides are computed; a NaN or inf in the side not taken is discarded).  Each follows its float
# function operation by operation, so the two agree to float64 rounding (libm vs PyTorch's log/exp/hypot/pow, and
# LMS's 4-term dot product summed in another order): bit for bit almost everywhere, exactly at sigma = inf and 0.
# Nothing here raises for a value: what the float path refuses is returned as ``ok`` False for that sample.  Constants
# enter as Python scalars or full_like fills, never as host tensors: a host-to-device copy waits for the stream.


class TensorCoeffs(NamedTuple):
    """:class:`StepCoeffs` of a batch with per-sample sigma tensors: every coefficient a (B,) float64 tensor.

    ``complete`` is for the whole call: a two-stage sampler's first call is never complete, since whether a sample's
    step ended after its first stage (sigma = inf, sigma_next = 0) is a value.  Such a sample's second stage keeps
    the state its first stage wrote (a = 1, no other term).  ``noisy``: whether some sample may add noise, from the
    arguments alone (eta, churn); ``e`` is 0 for the samples that add none.  ``ok``: (B,) bool, False where the float
    path would refuse the sample's sigmas (:func:`step_coeffs_tensor` lists the checks).  ``b_u``, ``carry_u``: CFG++'s
    weights of the unconditional D_u in the update and in the carry (:class:`StepCoeffs`); 0.0 for every other
    sampler."""

    a: object
    b: object
    h: tuple = ()
    e: object = 0.0
    sigma_out: object = None
    complete: bool = True
    carry: tuple | None = None
    noisy: bool = False
    ok: object = True
    b_u: object = 0.0
    carry_u: object = 0.0


def _t_c_in(pz: Parameterization, s):
    """:meth:`Parameterization.c_in` of a tensor (IEEE inf arithmetic gives its ends: 1/inf = 0)."""
    if pz.prediction == "flow":
        return 1.0 / (1.0 + s)
    return 1.0 / torch.hypot(s, torch.full_like(s, pz.sigma_data))


def _t_noise_scale(pz: Parameterization, s):
    """:meth:`Parameterization.noise_scale` of a tensor; at s = 0, 1/s = sd/s = inf makes it 0, as the float branch."""
    if pz.prediction == "flow":
        return 1.0 / (1.0 + 1.0 / s)
    return 1.0 / torch.hypot(torch.ones_like(s), pz.sigma_data / s)


def denoise_coeffs_tensor(pz: Parameterization, s):
    """:meth:`Parameterization.denoise_coeffs` of a (B,) tensor: (p, q) tensors; eps at inf gives non-finite p, q
    (the float path's ValueError: the caller refuses those samples)."""
    pred, sd = pz.prediction, pz.sigma_data
    if pred == "v":
        return sd * sd * _t_c_in(pz, s), -sd * _t_noise_scale(pz, s)
    if pred == "x0":
        return torch.zeros_like(s), torch.ones_like(s)
    if pred == "flow":
        return torch.ones_like(s), -_t_noise_scale(pz, s)
    return torch.hypot(s, torch.full_like(s, sd)), -s


def rescale_space_coeffs_tensor(pz: Parameterization, s, space: str):
    """:func:`zsnr_kernels.parameterization.rescale_space_coeffs` of a (B,) tensor."""
    if space == "output":
        return torch.zeros_like(s), torch.ones_like(s)
    p, q = denoise_coeffs_tensor(pz, s)
    if space == "x0":
        return p, q
    sd2 = pz.sigma_data * pz.sigma_data
    if pz.prediction == "flow":
        cv2_over_c = torch.where(s == INF, 0.0, (1.0 + s) / (s * s + sd2))
    else:
        cv2_over_c = _t_c_in(pz, s)
    return p - sd2 * cv2_over_c, q


def _t_ratio(s, sn):
    return torch.where(s == INF, 0.0, sn / s)


def _t_log_ratio(s, sn):
    return torch.where(s == INF, INF, torch.log(s / sn))


def _t_euler(pz, s, sn):
    r = _t_ratio(s, sn)
    return _t_noise_scale(pz, sn) / _t_noise_scale(pz, s), _t_c_in(pz, sn) * (1.0 - r)


def _t_split(s, sn, eta: float):
    """:func:`ancestral_split` per sample: (d, u, over), ``over`` where eta sqrt(1 - r^2) > 1 (clamped to (0, 1))."""
    if eta == 0.0:
        return torch.ones_like(s), torch.zeros_like(s), torch.zeros_like(s, dtype=torch.bool)
    r = _t_ratio(s, sn)
    u = eta * torch.sqrt((1.0 - r) * (1.0 + r))
    d = torch.sqrt(torch.clamp_min((1.0 - eta) * (1.0 + eta) + (eta * r) ** 2, 0.0))
    zero, over = sn == 0.0, u > 1.0
    return (torch.where(zero, 1.0, torch.where(over, 0.0, d)), torch.where(zero, 0.0, torch.where(over, 1.0, u)),
            over & ~zero)


def _t_ancestral(pz, s, sn, eta, s_noise, clamp: bool):
    """:func:`ancestral`: (a, b, e, ok)."""
    d, u, over = _t_split(s, sn, eta)
    r = _t_ratio(s, sn)
    s_next = _t_noise_scale(pz, sn)
    ok = torch.ones_like(over) if clamp else ~over  # DDIM's variance above the target noise level
    return s_next / _t_noise_scale(pz, s) * d, _t_c_in(pz, sn) * (1.0 - d * r), s_next * u * s_noise, ok


def _t_history_ok(s, prev):
    """:func:`_check_history`: remembered sigmas strictly above sigma and growing with age."""
    ok, below = torch.ones_like(s, dtype=torch.bool), s
    for p in prev:
        ok, below = ok & (p > below), p
    return ok


def _t_midpoint_stage2(pz, s, mid, sd, sn, d, dpmpp: bool):
    c_next = _t_c_in(pz, sn)
    a = _t_noise_scale(pz, sn) / _t_noise_scale(pz, mid) * d
    if dpmpp:
        h1, b = sd * (1.0 / s - 1.0 / mid), 1.0 - sd / s
    else:
        h1, b = 1.0 - s / mid, (s - sd) / mid
    return a, c_next * b, c_next * h1


def _t_two_stage(pz, a: StepArgs, done, first, second) -> TensorCoeffs:
    """A two-stage step: ``first`` = (a, b, e, sigma_out) of stage 1 on every sample (the whole step where ``done``),
    ``second`` a function giving (a, b, h1, e) of stage 2; a done sample's stage 2 keeps its state."""
    if a.stage == 1:
        ca, cb, ce, so = first
        return TensorCoeffs(ca, cb, (), ce, so, complete=False)
    ca, cb, h1, ce = second()
    one, zero = torch.ones_like(ca), torch.zeros_like(ca)
    return TensorCoeffs(torch.where(done, one, ca), torch.where(done, zero, cb), (torch.where(done, zero, h1),),
                        torch.where(done, zero, ce), a.sigma_next)


def _t_heun(pz, a):
    s, sn = a.sigma, a.sigma_next
    done = (sn == 0.0) | (s == INF)
    ca, cb = _t_euler(pz, s, sn)

    def second():
        w = 0.5 * _t_c_in(pz, sn) * (1.0 - s / sn)
        return torch.ones_like(s), -w, w, torch.zeros_like(s)
    return _t_two_stage(pz, a, done, (ca, cb, torch.zeros_like(s), sn), second)


def _t_dpm_2(pz, a):
    s, sn = a.sigma, a.sigma_next
    done = (sn == 0.0) | (s == INF)
    mid = torch.where(done, sn, torch.exp(0.5 * (torch.log(s) + torch.log(sn))))  # midpoint_sigma
    ca, cb = _t_euler(pz, s, mid)

    def second():
        c2 = _t_midpoint_stage2(pz, s, mid, sn, sn, 1.0, dpmpp=False)
        return (*c2, torch.zeros_like(s))
    return _t_two_stage(pz, a, done, (ca, cb, torch.zeros_like(s), mid), second)


def _t_ancestral_two_stage(pz, a, dpmpp: bool):
    s, sn, eta = a.sigma, a.sigma_next, a.eta
    d, u, clamped = _t_split(s, sn, eta)
    sigma_down = d * sn
    noise = a.s_noise * _t_noise_scale(pz, sn) * u
    euler_to_0 = (sn == 0.0) | clamped  # k-diffusion's sigma_down == 0 branch
    if dpmpp:
        sigma_d_times = torch.where(s == INF, INF if eta < 1.0 else eta * sn, s * d)
        mid = torch.sqrt(sn * sigma_d_times)
    else:
        mid = torch.where(s == INF, INF, torch.exp(0.5 * (torch.log(s) + torch.log(sigma_down))))
    at_inf = ~euler_to_0 & (mid == INF)  # the euler_ancestral step
    anc_a, anc_b, anc_e, _ = _t_ancestral(pz, s, sn, eta, a.s_noise, clamp=True)
    eu_a, eu_b = _t_euler(pz, s, torch.where(at_inf | euler_to_0, sn, mid))
    zero = torch.zeros_like(s)
    first = (torch.where(euler_to_0, 0.0, torch.where(at_inf, anc_a, eu_a)),
             torch.where(euler_to_0, _t_c_in(pz, sn), torch.where(at_inf, anc_b, eu_b)),
             torch.where(euler_to_0, noise if dpmpp else zero, torch.where(at_inf, anc_e, zero)),
             torch.where(euler_to_0 | at_inf, sn, mid))
    return _t_two_stage(pz, a, euler_to_0 | at_inf, first,
                        lambda: (*_t_midpoint_stage2(pz, s, mid, sigma_down, sn, d, dpmpp), noise))


def _t_dpmpp_sde(pz, a):
    """:func:`dpmpp_sde` per sample: stage 1 euler_ancestral to the midpoint (inf at sigma = inf), stage 2
    euler_ancestral's coefficients on the remembered start state (history (D_1, y)); Euler where sigma' = 0 or
    (sigma = inf and eta = 0), whose second call keeps the state."""
    s, sn, eta = a.sigma, a.sigma_next, a.eta
    at_inf = s == INF
    done = (sn == 0.0) | (at_inf if eta == 0.0 else torch.zeros_like(at_inf))
    t, t_next = -torch.log(s), -torch.log(torch.where(done, s, sn))
    mid = torch.where(at_inf, INF, torch.exp(-(t + (t_next - t) * 0.5)))  # dpmpp_sde_midpoint
    eu_a, eu_b = _t_euler(pz, s, sn)
    mid_or_one = torch.where(done, torch.ones_like(s), mid)  # a finite target below s where the sample is done
    s_or_two = torch.where(done, 2.0 * torch.ones_like(s), s)
    an_a, an_b, an_e, _ = _t_ancestral(pz, s_or_two, mid_or_one, eta, a.s_noise, clamp=True)
    zero = torch.zeros_like(s)
    if a.stage == 1:
        return TensorCoeffs(torch.where(done, eu_a, an_a), torch.where(done, eu_b, an_b), (),
                            torch.where(done, zero, an_e), torch.where(done, sn, mid), complete=False)
    c_a, c_b, c_e, _ = _t_ancestral(pz, s, sn, eta, a.s_noise, clamp=True)
    return TensorCoeffs(torch.where(done, torch.ones_like(s), zero), torch.where(done, zero, c_b),
                        (zero, torch.where(done, zero, c_a)), torch.where(done, zero, c_e), sn)


def _t_dpmpp_2m(pz, a):
    s, sn = a.sigma, a.sigma_next
    ca, cb = _t_euler(pz, s, sn)
    if not a.sigma_prev:
        return TensorCoeffs(ca, cb, (), 0.0, sn), torch.ones_like(s, dtype=torch.bool)
    prev = a.sigma_prev[0]
    use = sn != 0.0
    w = _t_log_ratio(s, sn) / (2.0 * _t_log_ratio(prev, s))
    return (TensorCoeffs(ca, torch.where(use, cb * (1.0 + w), cb), (torch.where(use, -cb * w, 0.0),), 0.0, sn),
            ~use | _t_history_ok(s, (prev,)))


def _t_res_multistep(pz, a):
    s, sn = a.sigma, a.sigma_next
    ca, cb = _t_euler(pz, s, sn)
    if not a.sigma_prev:
        return TensorCoeffs(ca, cb, (), 0.0, sn), torch.ones_like(s, dtype=torch.bool)
    prev = a.sigma_prev[0]
    use = (sn != 0.0) & (s != INF) & (prev != INF)
    h = torch.where(use, _t_log_ratio(s, sn), 1.0)
    c2 = -torch.where(use, _t_log_ratio(prev, s), 1.0) / h
    phi1 = -torch.expm1(-h) / h
    phi2 = torch.where(h > 1e-4, (torch.expm1(-h) + h) / (h * h), 0.5 - h / 6.0 + h * h / 24.0)
    c_next = _t_c_in(pz, sn)
    return (TensorCoeffs(ca, torch.where(use, c_next * h * (phi1 - phi2 / c2), cb),
                         (torch.where(use, c_next * h * phi2 / c2, 0.0),), 0.0, sn),
            ~((sn != 0.0) & (s != INF)) | _t_history_ok(s, (prev,)))


def _t_sde_base(pz, s, sn, eta, s_noise):
    h = _t_log_ratio(s, sn)
    r = _t_ratio(s, sn)
    s_next = _t_noise_scale(pz, sn)
    a = s_next / _t_noise_scale(pz, s) * r ** eta
    big_h = h * (1.0 + eta)
    base = torch.where(h == INF, 1.0, -torch.expm1(-big_h))
    noise = torch.zeros_like(s)
    if eta:
        noise = s_next * s_noise * torch.where(h == INF, 1.0, torch.sqrt(-torch.expm1(-2.0 * eta * h)))
    return h, big_h, a, base, noise


def _t_sde_end(pz, sn, a, b, h, e):
    """The SDE samplers' step to sigma' = 0: y' = c_in(0) D."""
    end = sn == 0.0
    zero = torch.zeros_like(sn)
    return TensorCoeffs(torch.where(end, zero, a), torch.where(end, pz.c_in(0.0), b),
                        tuple(torch.where(end, zero, k) for k in h), torch.where(end, zero, e), sn), end


def _t_dpmpp_2m_sde(pz, a):
    s, sn = a.sigma, a.sigma_next
    h, big_h, ca, base, noise = _t_sde_base(pz, s, sn, a.eta, a.s_noise)
    c_next = _t_c_in(pz, sn)
    hist, corr, ok = (), 0.0, True
    if a.sigma_prev:
        prev = a.sigma_prev[0]
        inv_r = h / _t_log_ratio(prev, s)
        corr = (0.5 * base if a.solver_type == "midpoint" else 1.0 - base / big_h) * inv_r
        hist, ok = (-c_next * corr,), _t_history_ok(s, (prev,))
    c, end = _t_sde_end(pz, sn, ca, c_next * (base + corr), hist, noise)
    return c, end | ok


def _t_dpmpp_3m_sde(pz, a):
    s, sn = a.sigma, a.sigma_next
    prev = a.sigma_prev[:2]
    h, big_h, ca, base, noise = _t_sde_base(pz, s, sn, a.eta, a.s_noise)
    c_next = _t_c_in(pz, sn)
    x_d, hist, ok = base, (), True
    if prev:
        phi2 = torch.where(big_h == INF, 1.0, 1.0 - base / big_h)
        h1 = _t_log_ratio(prev[0], s)
        a0 = h / h1
        if len(prev) == 1:
            x_d, hist = base + phi2 * a0, (-phi2 * a0,)
        else:
            phi3 = phi2 / big_h - 0.5
            h2 = _t_log_ratio(prev[1], prev[0])
            a1, w, v = h / h2, h1 / (h1 + h2), h / (h1 + h2)
            x_d = base + phi2 * a0 * (1.0 + w) - phi3 * v * a0
            hist = (-phi2 * (a0 + w * (a0 + a1)) + phi3 * v * (a0 + a1), phi2 * w * a1 - phi3 * v * a1)
        ok = _t_history_ok(s, prev)
    c, end = _t_sde_end(pz, sn, ca, c_next * x_d, tuple(c_next * k for k in hist), noise)
    return c, end | ok


def _t_lms(pz, a):
    """:func:`lms`: a remembered point at sigma = inf takes no part in sample i's interpolation (the float path drops
    it from the points), so each factor of a Lagrange basis through it is skipped per sample."""
    s, sn = a.sigma, a.sigma_next
    prev = tuple(a.sigma_prev[: a.order - 1])
    at_inf = s == INF
    pts = (s,) + prev
    act = (torch.ones_like(at_inf),) + tuple(p != INF for p in prev)
    half = 0.5 * (sn - s)
    taus = [half * float(x) + 0.5 * (sn + s) for x in _GAUSS_X]  # the Gauss points of each sample's interval
    w = []
    for j, tj in enumerate(pts):
        dot = 0.0
        for gw, tau in zip(_GAUSS_W, taus):
            basis = torch.ones_like(s)
            for k, tk in enumerate(pts):
                if k != j:
                    basis = torch.where(act[k], basis * ((tau - tk) / (tj - tk)), basis)
            dot = dot + float(gw) * basis
        w.append(torch.where(act[j], half * dot, 0.0))
    c_next = _t_c_in(pz, sn)
    ns = _t_noise_scale(pz, s)
    rest = w[1] if len(w) > 1 else 0.0
    for wj in w[2:]:
        rest = rest + wj
    eu_a, eu_b = _t_euler(pz, s, sn)
    zero = torch.zeros_like(s)
    c = TensorCoeffs(torch.where(at_inf, eu_a, c_next * (sn - rest) / ns),
                     torch.where(at_inf, eu_b, -c_next * w[0] / s),
                     tuple(torch.where(at_inf, zero, c_next * wj) for wj in w[1:]), 0.0, sn,
                     carry=(torch.where(at_inf, 1.0, 1.0 / ns), torch.where(at_inf, 0.0, -1.0 / s)))
    return c, at_inf | _t_history_ok(s, prev)


def _t_phi_scaled(pairs: list) -> list:
    """:func:`_phi_scaled` of each (k, z) of ``pairs`` (z a (B,) tensor), per sample: the same series (summed term by
    term, each sample stopping where the float loop stops: the same bits) below |z| = 1/2 and the same recursion above
    (torch's expm1 for libm's).  Each side sees a harmless stand-in where the other is taken, so neither forms inf/inf
    or 0*inf to be discarded.  All pairs go through one loop, stacked (the same elementwise operations: a step's
    phi functions cost one series, not one per k and order condition)."""
    fill = lambda vals: torch.stack([torch.full_like(z, v) for v, (_, z) in zip(vals, pairs)])  # noqa: E731
    ks = [k for k, _ in pairs]
    z = torch.stack([z for _, z in pairs])
    small = torch.abs(z) < 0.5
    zs = torch.where(small, z, 0.0)
    term, total = fill([1.0 / math.factorial(k + 1) for k in ks]), torch.zeros_like(z)
    k1 = fill([k + 1 for k in ks])
    going = torch.ones_like(small)
    for m in range(1, _PHI_SERIES_TERMS + 1):  # phi_{k+1}(z) = sum_m z^m / (m + k + 1)!
        total = torch.where(going, total + term, total)
        term = term * (zs / (k1 + m))
        going = going & ~(torch.abs(term) < 1e-18 * torch.abs(total))
    fact = fill([float(math.factorial(k)) for k in ks])
    series = fact * zs * total
    zr = torch.where(small, 1.0, z)
    phi = torch.expm1(zr) / zr
    for j in range(1, max(ks) + 1):  # phi_{j+1} = (phi_j - 1/j!)/z, kept where j <= k
        nxt = (phi - 1.0 / math.factorial(j)) / zr
        phi = nxt if j <= min(ks) else torch.where(fill([float(j <= k) for k in ks]) != 0.0, nxt, phi)
    return list(torch.where(small, series, fact * zr * phi).unbind(0))


#: the terms the series of :func:`_t_phi_scaled` runs to: the float loop of :func:`_phi_scaled` stops by the 15th
#: (|z| < 1/2 and k >= 1 give |term_m| <= 2^-m (k+1)!/(m+k+1)! of the first term, below 1e-18 of the sum at m = 15),
#: so every sample has stopped before the loop ends
_PHI_SERIES_TERMS = 16


def _t_solve(lhs: list, rhs: list) -> list:
    """:func:`_solve` per sample, operation by operation: the same pivot (the first row of largest magnitude), the
    same products, differences and sums in the same order, so the same bits; a row swap is a torch.where over the
    samples whose pivot row it is.  lhs, rhs: lists of (B,) tensors."""
    m = len(rhs)
    a = [list(row) + [v] for row, v in zip(lhs, rhs)]
    for k in range(m):
        best, piv = torch.abs(a[k][k]), torch.full_like(a[k][k], k, dtype=torch.int64)
        for i in range(k + 1, m):
            take = torch.abs(a[i][k]) > best
            best, piv = torch.where(take, torch.abs(a[i][k]), best), torch.where(take, i, piv)
        row_k = a[k]
        for i in range(k + 1, m):
            sel = piv == i
            a[k] = [torch.where(sel, x, y) for x, y in zip(a[i], a[k])]
            a[i] = [torch.where(sel, x, y) for x, y in zip(row_k, a[i])]
        for i in range(k + 1, m):
            f = a[i][k] / a[k][k]
            for j in range(k, m + 1):
                a[i][j] = a[i][j] - f * a[k][j]
    x = [None] * m
    for k in reversed(range(m)):
        acc = None
        for j in range(k + 1, m):
            acc = a[k][j] * x[j] if acc is None else acc + a[k][j] * x[j]
        x[k] = (a[k][m] if acc is None else a[k][m] - acc) / a[k][k]
    return x


def _t_unipc_terms(sigma, sigma_next, older: tuple, variant: str, order: int, corrector: bool, phis: list):
    """:func:`_unipc_terms` per sample: ``(w0, ws, w_new)`` as (B,) tensors (``w_new`` 0.0 for a predictor);
    ``phis[j]`` is ``_phi_scaled(j + 1, -h)`` of this step's h per sample, as many as its order conditions take.

    A remembered point at sigma = inf is dropped from the order conditions of the samples where it is inf.  On a
    valid history only the oldest of the ``order - 1`` points can be inf (the points grow with age), so both systems
    are solved, with every point and without the oldest, and each sample takes its own (a sample whose history has
    an earlier inf is refused by its ``ok``)."""
    h = _t_log_ratio(sigma, sigma_next)
    entries = older[: order - 1]
    keep = [p != INF for p in entries]
    rks = [-_t_log_ratio(p, sigma) / h for p in entries]
    hh = -h
    big_b = hh if variant == "bh1" else torch.expm1(hh)
    n = len(entries)
    if corrector and order == 1:
        brho, brho_drop = [0.5 * big_b], [0.5 * big_b]
    elif not corrector and order == 2:
        brho, brho_drop = [0.5 * big_b] * n, [0.5 * big_b] * (n - 1)
    else:
        one = [torch.ones_like(sigma)] if corrector else []
        rhs = phis[: n + len(one)]

        def solve(cols):
            return _t_solve([[torch.ones_like(sigma) if j == 0 else c if j == 1 else c * c if j == 2 else c**j
                              for c in cols] for j in range(len(cols))], rhs[: len(cols)])
        brho, brho_drop = solve(rks + one), solve(rks[:-1] + one) if n else None
    full = keep[-1] if n else None  # the samples that keep every point
    ws, w0 = [], 0.0
    for k in range(n):
        w = brho[k] / rks[k]
        if k == n - 1:
            w = torch.where(full, w, 0.0)  # dropped: the float path skips it (w0 - 0.0 is w0)
        else:
            w = torch.where(full, w, brho_drop[k] / rks[k])
        ws.append(w)
        w0 = w0 - w
    w_new = 0.0
    if corrector:
        w_new = brho[-1] if not n else torch.where(full, brho[-1], brho_drop[-1])
    return w0 - w_new, ws, w_new


def _t_unipc(pz, a):
    """:func:`unipc` per sample: the predictor's and the corrector's terms where the float path takes them (the
    predictor where sigma is finite and sigma' > 0, the corrector where sigma'/sigma != 0, not with bh1 after a
    remembered sigma = inf), each a torch.where over the samples; the orders, the variant and the history depth are
    host values and checked as the float path checks them."""
    s, sn = a.sigma, a.sigma_next
    order, corrector, variant = a.order, a.corrector, a.solver_type
    _check_unipc_options(order, corrector, variant)
    prev = tuple(a.sigma_prev[:UNIPC_MAX_ORDER])
    if corrector > len(prev):
        raise ValueError(f"a corrector of order {corrector} needs {corrector} remembered predictions (the one of "
                         f"the step it corrects and {corrector - 1} before it), got {len(prev)}")
    ok = _t_history_ok(s, prev)
    r = _t_ratio(s, sn)
    b = 1.0 - r
    hist = [torch.zeros_like(s) for _ in prev]
    p = min(order, len(prev) + 1)
    # the right-hand sides of the order conditions that are solved (the predictor of order 3; the corrector of order
    # >= 2, whose predictor of order 3 shares its step), all in one stacked series
    want = [(k, -_t_log_ratio(s, sn), "p") for k in range(1, 3) if p == 3]
    want += [(k, -_t_log_ratio(prev[0], s), "c") for k in range(1, corrector + 1) if corrector > 1]
    phis = _t_phi_scaled([(k, z) for k, z, _ in want]) if want else []
    phi_p = [v for v, w in zip(phis, want) if w[2] == "p"]
    phi_c = [v for v, w in zip(phis, want) if w[2] == "c"]
    if p > 1:
        first = (s == INF) | (sn == 0.0)  # first order there
        w0, ws, _ = _t_unipc_terms(s, sn, prev, variant, p, False, phi_p)
        b = torch.where(first, b, b - w0)
        hist = [torch.where(first, v, v - w) for v, w in zip(hist, ws)] + hist[len(ws):]
    if corrector:
        use = r != 0.0
        if variant == "bh1":
            use = use & (prev[0] != INF)
        w0, ws, w_new = _t_unipc_terms(prev[0], s, prev[1:], variant, corrector, True, phi_c)
        if corrector > 1:
            p0, ps, _ = _t_unipc_terms(prev[0], s, prev[1:], variant, corrector, False, phi_c)
            w0, ws = w0 - p0, [wk - pk for wk, pk in zip(ws, ps)]
        b = torch.where(use, b - r * w_new, b)
        hist[0] = torch.where(use, hist[0] - r * w0, hist[0])
        for k, wk in enumerate(ws):
            hist[k + 1] = torch.where(use, hist[k + 1] - r * wk, hist[k + 1])
    c_next = _t_c_in(pz, sn)
    return (TensorCoeffs(_t_noise_scale(pz, sn) / _t_noise_scale(pz, s), c_next * b, tuple(c_next * v for v in hist),
                         0.0, sn), ok)


def _t_ancestral_cfg_pp(pz, s, sn, eta, s_noise):
    """:func:`ancestral_cfg_pp`: (a, b, e, b_u)."""
    ca, _, ce, _ = _t_ancestral(pz, s, sn, eta, s_noise, clamp=True)
    d, _, _ = _t_split(s, sn, eta)
    dr = d * _t_ratio(s, sn)
    c_next = _t_c_in(pz, sn)
    return ca, c_next, ce, torch.where(dr != 0.0, -c_next * dr, 0.0)


def _t_ancestral_cfg_pp_row(eta_of, s_noise_of):
    def coeffs(pz, a):
        ca, cb, ce, cu = _t_ancestral_cfg_pp(pz, a.sigma, a.sigma_next, eta_of(a), s_noise_of(a))
        return TensorCoeffs(ca, cb, (), ce, a.sigma_next, b_u=cu), True
    return coeffs


def _t_dpmpp_2m_cfg_pp(pz, a):
    """:func:`dpmpp_2m_cfg_pp`: its history weight is 0 (not absent) where the float path has none (sigma' = 0)."""
    s, sn = a.sigma, a.sigma_next
    ca, cb = _t_euler(pz, s, sn)
    c_next = _t_c_in(pz, sn)
    r = _t_ratio(s, sn)
    zero = torch.zeros_like(s)
    extra = dict(carry=(zero, zero), b_u=torch.where(r != 0.0, -c_next * r, 0.0), carry_u=torch.ones_like(s))
    if not a.sigma_prev:
        return TensorCoeffs(ca, c_next, (), 0.0, sn, **extra), torch.ones_like(s, dtype=torch.bool)
    prev = a.sigma_prev[0]
    use = sn != 0.0
    corr = torch.where(use, cb * (_t_log_ratio(s, sn) / (2.0 * _t_log_ratio(prev, s))), 0.0)
    return (TensorCoeffs(ca, c_next + corr, (torch.where(use, -corr, 0.0),), 0.0, sn, **extra),
            ~use | _t_history_ok(s, (prev,)))


def _t_dpmpp_2s_ancestral_cfg_pp(pz, a):
    """:func:`dpmpp_2s_ancestral_cfg_pp`: every sample takes two calls; one whose step ends after the first (sigma_down
    = 0; the limit from sigma = inf with eta < 1) keeps its state in the second.  The first call outputs D_u1 as its
    carry for every sample."""
    s, sn, eta = a.sigma, a.sigma_next, a.eta
    d, u, clamped = _t_split(s, sn, eta)
    c_next = _t_c_in(pz, sn)
    noise = a.s_noise * _t_noise_scale(pz, sn) * u
    euler_to_0 = (sn == 0.0) | clamped
    mid = torch.sqrt(sn * torch.where(s == INF, INF if eta < 1.0 else eta * sn, s * d))
    at_inf = ~euler_to_0 & (mid == INF)
    done = euler_to_0 | at_inf
    zero, one = torch.zeros_like(s), torch.ones_like(s)
    if a.stage == 1:
        an_a, an_b, an_e, an_u = _t_ancestral_cfg_pp(pz, s, sn, eta, a.s_noise)
        eu_a, eu_b = _t_euler(pz, s, torch.where(done, sn, mid))
        return TensorCoeffs(torch.where(euler_to_0, 0.0, torch.where(at_inf, an_a, eu_a)),
                            torch.where(done, c_next, 0.0), (),
                            torch.where(euler_to_0, noise, torch.where(at_inf, an_e, zero)),
                            torch.where(done, sn, mid), complete=False, carry=(zero, zero),
                            b_u=torch.where(euler_to_0, 0.0, torch.where(at_inf, an_u, eu_b)), carry_u=one)
    ma, mb, mh = _t_midpoint_stage2(pz, s, mid, d * sn, sn, d, dpmpp=True)
    return TensorCoeffs(torch.where(done, one, ma), zero,
                        (torch.where(done, zero, c_next), torch.where(done, zero, mh - c_next)),
                        torch.where(done, zero, noise), sn, b_u=torch.where(done, zero, mb))


def _t_single(fn):
    return lambda pz, a: (fn(pz, a), True)


def _t_ancestral_row(eta_of, s_noise_of, clamp: bool):
    def coeffs(pz, a):
        ca, cb, ce, ok = _t_ancestral(pz, a.sigma, a.sigma_next, eta_of(a), s_noise_of(a), clamp)
        return TensorCoeffs(ca, cb, (), ce, a.sigma_next), ok
    return coeffs


#: the tensor mirror of each built-in row's coefficient function: (pz, StepArgs of tensors) -> (TensorCoeffs,
#: ok of the sampler's own checks); a sampler without one (register_sampler) is stepped from host values
_TENSOR_COEFFS = {
    "euler": lambda pz, a: (TensorCoeffs(*_t_euler(pz, a.sigma, a.sigma_next), (), 0.0, a.sigma_next), True),
    "euler_ancestral": _t_ancestral_row(lambda a: a.eta, lambda a: a.s_noise, clamp=True),
    "ddim": _t_ancestral_row(lambda a: a.eta, lambda a: 1.0, clamp=False),
    "ddpm": _t_ancestral_row(lambda a: 1.0, lambda a: 1.0, clamp=False),
    "heun": _t_single(_t_heun),
    "heun_flow": _t_heun_flow,
    "dpm_2": _t_single(_t_dpm_2),
    "dpm_2_ancestral": _t_single(lambda pz, a: _t_ancestral_two_stage(pz, a, dpmpp=False)),
    "dpmpp_2s_ancestral": _t_single(lambda pz, a: _t_ancestral_two_stage(pz, a, dpmpp=True)),
    "dpmpp_sde": _t_single(_t_dpmpp_sde),
    "dpmpp_2m": _t_dpmpp_2m,
    "res_multistep": _t_res_multistep,
    "dpmpp_2m_sde": _t_dpmpp_2m_sde,
    "dpmpp_3m_sde": _t_dpmpp_3m_sde,
    "lms": _t_lms,
    "lcm": lambda pz, a: (TensorCoeffs(torch.zeros_like(a.sigma), _t_c_in(pz, a.sigma_next), (),
                                       _t_noise_scale(pz, a.sigma_next), a.sigma_next), True),
    "unipc": _t_unipc,
    "euler_cfg_pp": _t_ancestral_cfg_pp_row(lambda a: 0.0, lambda a: 0.0),
    "euler_ancestral_cfg_pp": _t_ancestral_cfg_pp_row(lambda a: a.eta, lambda a: a.s_noise),
    "dpmpp_2m_cfg_pp": _t_dpmpp_2m_cfg_pp,
    "dpmpp_2s_ancestral_cfg_pp": _t_single(_t_dpmpp_2s_ancestral_cfg_pp),
}

def has_tensor_coeffs(sampler: str) -> bool:
    """Whether a step with device sigmas computes ``sampler``'s coefficients with :func:`step_coeffs_tensor` (every
    built-in sampler)."""
    return sampler in _TENSOR_COEFFS


def _t_sigma_ok(v):
    """0, inf, or within [SIGMA_MIN, SIGMA_MAX] (:func:`zsnr_kernels._validate.step_sigmas`); NaN and < 0 fail."""
    return (v == 0.0) | (v == INF) | ((v >= _validate.SIGMA_MIN) & (v <= _validate.SIGMA_MAX))


def _t_span_ok(pz, a: StepArgs):
    """:func:`zsnr_kernels._validate.step_sigmas`' span rules (STEP_RATIO_MAX, LMS_SPAN_MAX) per sample."""
    s, sn = a.sigma, a.sigma_next
    most = _validate.STEP_RATIO_MAX.get(a.sampler)
    if most is not None:
        wide = (sn > 0.0) & (s != INF) & (s > most * sn)
        if a.sampler == "dpm_2_ancestral":
            r = sn / s
            wide = wide & ~(a.eta * torch.sqrt((1.0 - r) * (1.0 + r)) > 1.0)  # clamped: an Euler step to 0
        return ~wide
    if a.sampler == "lms":
        prev = a.sigma_prev[: a.order - 1]
        if not prev:
            return True
        remembered = prev[0] != INF
        for p in prev[1:]:
            remembered = remembered | (p != INF)
        scale = torch.clamp_min(sn, 1.0 if pz.prediction == "flow" else pz.sigma_data)
        return ~((s != INF) & (s > _validate.LMS_SPAN_MAX * scale) & remembered)
    return True


def step_coeffs_tensor(pz: Parameterization, a: StepArgs) -> TensorCoeffs:
    """:func:`step_coeffs` of a batch whose sigmas (``a.sigma``, ``sigma_next``, ``sigma_hat_next``, each of
    ``sigma_prev``) are (B,) float64 tensors on one device, computed there without reading a value on the host.

    ``ok`` is False for a sample the float path or ``zsnr_kernels._validate.step_sigmas`` refuses: the checks of
    its StepArgs in the list of :mod:`zsnr_kernels.steps` (the others need sigma_eval, the noise or ``first``)."""
    fn = _TENSOR_COEFFS.get(a.sampler)
    if fn is None:
        raise ValueError(f"step_coeffs_tensor: {a.sampler!r} has no tensor coefficients; step it from host sigmas")
    c, ok = fn(pz, a)
    s, sn, target = a.sigma, a.sigma_next, a.sigma_hat_next
    ok = ok & (sn >= 0.0) & (s > sn) & _t_sigma_ok(s) & _t_sigma_ok(sn) & _t_span_ok(pz, a)
    for p in a.sigma_prev:
        ok = ok & _t_sigma_ok(p)
    spec = _row(a.sampler)
    complete = spec.kind != "two_stage" or a.stage == 2
    if spec.churn and target is not None:
        ok = ok & _t_sigma_ok(target)
        # with_churn on the samples whose step ends in this call.  heun's and dpm_2's step ends after the first stage
        # where sigma_next = 0 or sigma = inf: those samples are churned by the first call, and the second leaves
        # them at the target
        so = c.sigma_out
        ends = torch.ones_like(ok)
        if spec.kind == "two_stage":
            first_ends = (sn == 0.0) | (s == INF)
            ends = first_ends if a.stage == 1 else ~first_ends
            if a.stage == 2:
                so = torch.where(first_ends, target, so)
        move = ends & (target != so)
        ok = ok & ~(move & ~((target != INF) & (target > so) & (so >= 0.0)))
        c_hat = _t_c_in(pz, target)
        k = torch.where(move, c_hat / _t_c_in(pz, so), 1.0)
        e = torch.where(move, c_hat * torch.sqrt((target - so) * (target + so)) * a.s_noise, c.e)
        c = c._replace(a=k * c.a, b=k * c.b, h=tuple(k * w for w in c.h), e=e,
                       sigma_out=torch.where(move, target, so))
    noisy = spec.stochastic(a.eta) or (spec.churn and target is not None)
    return c._replace(complete=complete, noisy=noisy, ok=ok)
