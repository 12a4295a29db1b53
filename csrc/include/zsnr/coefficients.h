// Per-sample step coefficients in float64, shared by host and device code (docs/design.md §2.2-2.5, 2.9).
//
// This header mirrors the Python spec function by function, formula by formula and, where it matters
// for rounding, operation by operation:
//   zsnr_kernels/parameterization.py   c_in, noise_scale, denoise_coeffs, rescale_space_coeffs
//   zsnr_kernels/coefficients.py       euler, ancestral(_split), churn(_gamma), with_churn, heun, dpm_2,
//                                      dpm_2_ancestral, dpmpp_2s_ancestral, dpmpp_2m, dpmpp_2m_sde,
//                                      dpmpp_3m_sde, lms(_weights)
//   zsnr_kernels/schedules.py          quantize (argmin over a model's sigma table)
// so that a kernel computing coefficients from per-sample sigmas agrees with the host to ~1 ulp
// (the only differences come from libm: CPython's math.hypot is not glibc's hypot).
//
// Every update is one linear combination in the space of model inputs y = c_in(sigma) x:
//   y_out = a*y + b*D + sum_k h[k]*H_k + e*z
// (D the denoised prediction of this model call, H_k remembered tensors newest first, z unit noise),
// with y_out the model input at sigma_out.  Nothing here forms inf/inf or 0*inf: sigma = inf enters
// only through ratios r = sigma'/sigma (0 there), noise scales s = sigma c_in(sigma) (1 there) and
// h = log(sigma/sigma') (inf there, with expm1(-h) = -1).
//
// Device-code rules: no PyTorch, Python, STL containers or exceptions; only <math.h>/<cstdint>, plain
// structs, fixed-size arrays and error codes (CoeffError) where Python raises ValueError.  Under nvcc,
// floating-point contraction (--fmad=true, the default) may change results by an ulp; the host build
// does not contract (no -mfma, no -ffast-math).
#pragma once

#include <math.h>  // hypot, log, exp, expm1, sqrt, pow, fma, INFINITY, NAN, isinf, isfinite

#include <cstdint>

#include "zsnr/common.h"

namespace zsnr {

// What the model predicts (parameterization.PREDICTIONS, same order).
enum Prediction : int32_t { kPredV = 0, kPredEps = 1, kPredX0 = 2, kPredFlow = 3 };

// Space the guidance rescale acts in (_validate.RESCALE_SPACES: "output", "v", "x0").
enum RescaleSpace : int32_t { kSpaceOutput = 0, kSpaceV = 1, kSpaceX0 = 2 };

enum SamplerKind : int32_t {
  kEuler = 0,
  kEulerAncestral = 1,
  kHeun = 2,
  kDpm2 = 3,
  kDpm2Ancestral = 4,
  kDpmpp2sAncestral = 5,
  kDpmpp2m = 6,
  kDpmpp2mSde = 7,
  kDpmpp3mSde = 8,
  kDdim = 9,
  kDdpm = 10,
  kLms = 11
};

// Error codes: each names a ValueError of the Python spec.
enum CoeffError : int32_t {
  kOk = 0,
  kErrEpsAtInf = 1,    // eps-prediction evaluated at sigma = inf (Parameterization.denoise_coeffs)
  kErrSigmaOrder = 2,  // not sigma > sigma_next >= 0 (_check_pair), or history sigmas not above sigma
  kErrDdimEta = 3,     // DDIM variance above the target noise level (ancestral_split, clamp=False)
  kErrStage = 4,       // stage 2 of a step that was complete after stage 1 (_no_stage2), or stage not 1/2
  kErrChurn = 5,       // churn target below sigma_out or not finite, or churn after a noisy/partial update
  kErrBadArg = 6       // unknown prediction, sampler or rescale space; lms order < 1
};

// ---------------------------------------------------------------------------------- parameterization

// Parameterization(prediction, sigma_data).
struct Param {
  int32_t prediction;  // Prediction
  double sigma_data;   // sd > 0
};

// Parameterization.c_in: 1/(1 + sigma) for flow, 1/hypot(sigma, sd) otherwise (0 at sigma = inf).
ZSNR_HD double c_in(Param pz, double sigma) {
  if (pz.prediction == kPredFlow) return 1.0 / (1.0 + sigma);
  return 1.0 / hypot(sigma, pz.sigma_data);
}

// Parameterization.noise_scale: s = sigma c_in(sigma), written as 1/(1 + 1/sigma) (flow) or
// 1/hypot(1, sd/sigma): 0 at sigma = 0, 1 at sigma = inf.
ZSNR_HD double noise_scale(Param pz, double sigma) {
  if (sigma == 0.0) return 0.0;
  if (pz.prediction == kPredFlow) return 1.0 / (1.0 + 1.0 / sigma);
  return 1.0 / hypot(1.0, pz.sigma_data / sigma);
}

// Parameterization.denoise_coeffs: D = p*y + q*F.
//   v: p = sd^2 c_in, q = -sd s;  eps: p = hypot(sigma, sd), q = -sigma (kErrEpsAtInf at sigma = inf);
//   x0: p = 0, q = 1;  flow: p = 1, q = -s.
ZSNR_HD int32_t denoise_coeffs(Param pz, double sigma, double* p, double* q) {
  const double sd = pz.sigma_data;
  switch (pz.prediction) {
    case kPredV:
      *p = sd * sd * c_in(pz, sigma);
      *q = -sd * noise_scale(pz, sigma);
      return kOk;
    case kPredX0:
      *p = 0.0;
      *q = 1.0;
      return kOk;
    case kPredFlow:
      *p = 1.0;
      *q = -noise_scale(pz, sigma);
      return kOk;
    case kPredEps:
      if (isinf(sigma)) return kErrEpsAtInf;
      *p = hypot(sigma, sd);
      *q = -sigma;
      return kOk;
    default:
      return kErrBadArg;
  }
}

// parameterization.rescale_space_coeffs: the rescale acts on G = u*y + t*F.
//   output: (0, 1);  x0: (p, q);  v: (p - sd^2 cv2_over_c, q) with cv2_over_c = c_in for v/eps/x0 models
//   and (1 + sigma)/(sigma^2 + sd^2) for flow (0 at sigma = inf).
ZSNR_HD int32_t rescale_space_coeffs(Param pz, double sigma, int32_t space, double* u, double* t) {
  if (space == kSpaceOutput) {
    *u = 0.0;
    *t = 1.0;
    return kOk;
  }
  if (space != kSpaceV && space != kSpaceX0) return kErrBadArg;
  double p = 0.0, q = 0.0;
  const int32_t err = denoise_coeffs(pz, sigma, &p, &q);
  if (err != kOk) return err;
  if (space == kSpaceX0) {
    *u = p;
    *t = q;
    return kOk;
  }
  const double sd2 = pz.sigma_data * pz.sigma_data;
  double cv2_over_c;
  if (pz.prediction == kPredFlow) {
    cv2_over_c = isinf(sigma) ? 0.0 : (1.0 + sigma) / (sigma * sigma + sd2);
  } else {
    cv2_over_c = c_in(pz, sigma);
  }
  *u = p - sd2 * cv2_over_c;
  *t = q;
  return kOk;
}

// ---------------------------------------------------------------------------------------- step coeffs

// One sample's step.  For stage 2 of a two-stage sampler, sigma/sigma_next are the SAME as in stage 1
// (steps.py passes the step's sigmas; the model was called at stage 1's sigma_out).
struct StepArgs {
  int32_t sampler;                 // SamplerKind
  int32_t stage;                   // 1 or 2 (two-stage samplers); 1 otherwise
  double sigma, sigma_next;        // the step's sigmas, sigma > sigma_next >= 0
  double sigma_hat_next;           // churn target of the next step (euler/heun/dpm_2 only; others ignore it);
                                   // == sigma_next for none
  double sigma_prev[kMaxHistory];  // history sigmas, newest first
  int32_t n_prev;                  // used entries of sigma_prev
  double eta, s_noise;
  int32_t solver_heun;  // dpmpp_2m_sde: 0 midpoint, 1 heun
  int32_t order;        // lms (>= 1; at most kMaxHistory + 1 points are used)
};

// coefficients.StepCoeffs: y_out = a*y + b*D + sum_k h[k]*H_k + e*z, y_out the model input at sigma_out.
// On error every double field is NaN, n_hist = 0, complete = 1, has_carry = 0.
struct StepCoeffs {
  double a, b, h[kMaxHistory], e, sigma_out;
  int32_t n_hist;     // number of used h entries (the rest are 0)
  int32_t complete;   // 0 after a first stage: call the model at (y_out, sigma_out), then run stage 2
  int32_t has_carry;  // LMS: also output the derivative g_y*y + g_d*D
  double g_y, g_d;
  int32_t error;  // CoeffError
};

namespace detail {

// StepCoeffs(a, b, sigma_out=...) with the Python defaults: no history, no noise, complete, no carry.
ZSNR_HD StepCoeffs make_coeffs(double a, double b, double e, double sigma_out) {
  StepCoeffs c;
  c.a = a;
  c.b = b;
  for (int k = 0; k < kMaxHistory; ++k) c.h[k] = 0.0;
  c.e = e;
  c.sigma_out = sigma_out;
  c.n_hist = 0;
  c.complete = 1;
  c.has_carry = 0;
  c.g_y = 0.0;
  c.g_d = 0.0;
  c.error = kOk;
  return c;
}

ZSNR_HD StepCoeffs error_coeffs(int32_t error) {
  StepCoeffs c = make_coeffs(NAN, NAN, NAN, NAN);
  for (int k = 0; k < kMaxHistory; ++k) c.h[k] = NAN;
  c.g_y = NAN;
  c.g_d = NAN;
  c.error = error;
  return c;
}

// replace(c, complete=False): the first stage of a two-stage step (errors pass through unchanged).
ZSNR_HD StepCoeffs first_stage(StepCoeffs c) {
  if (c.error == kOk) c.complete = 0;
  return c;
}

// coefficients._ratio: sigma_next / sigma, 0 at sigma = inf.
ZSNR_HD double ratio(double sigma, double sigma_next) {
  return isinf(sigma) ? 0.0 : sigma_next / sigma;
}

// coefficients._log_ratio: h = log(sigma / sigma_next), inf at sigma = inf.
ZSNR_HD double log_ratio(double sigma, double sigma_next) {
  return isinf(sigma) ? INFINITY : log(sigma / sigma_next);
}

// coefficients._check_pair: sigma > sigma_next >= 0 (false for NaN).
ZSNR_HD bool pair_ok(double sigma, double sigma_next) {
  return sigma_next >= 0.0 && sigma > sigma_next;
}

// History sigmas (newest first) must lie above sigma and above each other: a schedule is decreasing.
// (The Python spec does not check this; it divides by zero or forms inf/inf where it fails.)
ZSNR_HD bool history_ok(double sigma, const double* prev, int n) {
  double below = sigma;
  for (int k = 0; k < n; ++k) {
    if (!(prev[k] > below)) return false;
    below = prev[k];
  }
  return true;
}

// coefficients.midpoint_sigma: exp(0.5 (log sigma + log sigma')) = sqrt(sigma sigma'), as k-diffusion.
ZSNR_HD double midpoint_sigma(double sigma, double sigma_next) {
  return exp(0.5 * (log(sigma) + log(sigma_next)));
}

// coefficients.euler: y' = (s'/s) y + c'(1 - sigma'/sigma) D.
ZSNR_HD StepCoeffs euler(Param pz, double sigma, double sigma_next) {
  if (!pair_ok(sigma, sigma_next)) return error_coeffs(kErrSigmaOrder);
  const double r = ratio(sigma, sigma_next);
  const double a = noise_scale(pz, sigma_next) / noise_scale(pz, sigma);
  return make_coeffs(a, c_in(pz, sigma_next) * (1.0 - r), 0.0, sigma_next);
}

// coefficients.ancestral_split: (d, u) = (sigma_down, sigma_up)/sigma'; (1, 0) at sigma' = 0 or eta = 0.
//   u = eta sqrt((1 - r)(1 + r)), d = sqrt(max(0, (1 - eta)(1 + eta) + (eta r)^2));
//   u > 1: (0, 1) with clamp (k-diffusion's min), kErrDdimEta without (DDIM).
ZSNR_HD int32_t ancestral_split(double sigma, double sigma_next, double eta, bool clamp, double* d,
                                double* u) {
  if (sigma_next == 0.0 || eta == 0.0) {
    *d = 1.0;
    *u = 0.0;
    return kOk;
  }
  const double r = ratio(sigma, sigma_next);
  const double up = eta * sqrt((1.0 - r) * (1.0 + r));
  if (up > 1.0) {
    if (!clamp) return kErrDdimEta;
    *d = 0.0;
    *u = 1.0;
    return kOk;
  }
  const double er = eta * r;
  const double d2 = (1.0 - eta) * (1.0 + eta) + er * er;
  *d = sqrt(d2 > 0.0 ? d2 : 0.0);  // Python max(0.0, d2)
  *u = up;
  return kOk;
}

// coefficients.ancestral: y' = (s'/s) d y + c'(1 - d r) D + s' u s_noise z (euler_ancestral; DDIM and
// DDPM with clamp = false).
ZSNR_HD StepCoeffs ancestral(Param pz, double sigma, double sigma_next, double eta, double s_noise,
                             bool clamp) {
  if (!pair_ok(sigma, sigma_next)) return error_coeffs(kErrSigmaOrder);
  double d = 0.0, u = 0.0;
  const int32_t err = ancestral_split(sigma, sigma_next, eta, clamp, &d, &u);
  if (err != kOk) return error_coeffs(err);
  const double r = ratio(sigma, sigma_next);
  const double s_next = noise_scale(pz, sigma_next);
  return make_coeffs(s_next / noise_scale(pz, sigma) * d, c_in(pz, sigma_next) * (1.0 - d * r),
                     s_next * u * s_noise, sigma_next);
}

// coefficients.heun.  Stage 1: Euler predictor to sigma' (complete when sigma' = 0 or sigma = inf).
// Stage 2: y' = y_2 + w (D_1 - D_2), w = c'(1 - sigma/sigma')/2, i.e. a = 1, b = -w, h = (w).
ZSNR_HD StepCoeffs heun(Param pz, double sigma, double sigma_next, int32_t stage) {
  if (!pair_ok(sigma, sigma_next)) return error_coeffs(kErrSigmaOrder);
  const bool one_stage = sigma_next == 0.0 || isinf(sigma);
  if (stage == 1) {
    const StepCoeffs c = euler(pz, sigma, sigma_next);
    return one_stage ? c : first_stage(c);
  }
  if (stage != 2 || one_stage) return error_coeffs(kErrStage);
  const double w = 0.5 * c_in(pz, sigma_next) * (1.0 - sigma / sigma_next);
  StepCoeffs c = make_coeffs(1.0, -w, 0.0, sigma_next);
  c.h[0] = w;
  c.n_hist = 1;
  return c;
}

// coefficients._midpoint_stage2 (y_2 at sigma_mid, D_1 remembered), d = sigma_down / sigma_next:
//   DPM-Solver-2:     h1 = 1 - sigma/sigma_m,                    b = (sigma - sigma_d)/sigma_m
//   DPM-Solver++(2S): h1 = sigma_d (1/sigma - 1/sigma_m),        b = 1 - sigma_d/sigma
//   y' = (s'/s_m) d y_2 + c' b D_2 + c' h1 D_1.
ZSNR_HD StepCoeffs midpoint_stage2(Param pz, double sigma, double sigma_mid, double sigma_down,
                                   double sigma_next, double d, bool dpmpp) {
  const double c_next = c_in(pz, sigma_next);
  const double a = noise_scale(pz, sigma_next) / noise_scale(pz, sigma_mid) * d;
  double h1, b;
  if (dpmpp) {
    h1 = sigma_down * (1.0 / sigma - 1.0 / sigma_mid);
    b = 1.0 - sigma_down / sigma;
  } else {
    h1 = 1.0 - sigma / sigma_mid;
    b = (sigma - sigma_down) / sigma_mid;
  }
  StepCoeffs c = make_coeffs(a, c_next * b, 0.0, sigma_next);
  c.h[0] = c_next * h1;
  c.n_hist = 1;
  return c;
}

// coefficients.dpm_2: Euler predictor to sigma_mid = sqrt(sigma sigma'), then the DPM-Solver-2
// corrector; Euler (complete after stage 1) when sigma' = 0 or sigma = inf.
ZSNR_HD StepCoeffs dpm_2(Param pz, double sigma, double sigma_next, int32_t stage) {
  if (!pair_ok(sigma, sigma_next)) return error_coeffs(kErrSigmaOrder);
  if (stage != 1 && stage != 2) return error_coeffs(kErrStage);
  if (sigma_next == 0.0 || isinf(sigma)) {
    return stage == 1 ? euler(pz, sigma, sigma_next) : error_coeffs(kErrStage);
  }
  const double sigma_mid = midpoint_sigma(sigma, sigma_next);
  if (stage == 1) return first_stage(euler(pz, sigma, sigma_mid));
  return midpoint_stage2(pz, sigma, sigma_mid, sigma_next, sigma_next, 1.0, false);
}

// coefficients._ancestral_two_stage: dpm_2_ancestral (dpmpp = false) and dpmpp_2s_ancestral (true).
// A midpoint method from sigma to sigma_down, then sigma_up noise (e = s_noise s' u).
//   sigma' = 0 or the min() clamp active: a = 0, b = c' (Euler to 0), e = noise for dpmpp only.
//   sigma_mid: sqrt(sigma sigma_down) (dpmpp: sqrt(sigma' * sigma d), with the limit sigma d -> eta sigma'
//   for eta >= 1, inf for eta < 1, at sigma = inf); DPM-Solver-2: midpoint_sigma(sigma, sigma_down), inf at
//   sigma = inf.  sigma_mid = inf: the whole step is euler_ancestral.
ZSNR_HD StepCoeffs ancestral_two_stage(Param pz, double sigma, double sigma_next, double eta,
                                       double s_noise, int32_t stage, bool dpmpp) {
  if (!pair_ok(sigma, sigma_next)) return error_coeffs(kErrSigmaOrder);
  if (stage != 1 && stage != 2) return error_coeffs(kErrStage);
  double d = 0.0, u = 0.0;
  ancestral_split(sigma, sigma_next, eta, true, &d, &u);  // cannot fail with clamp
  const double sigma_down = d * sigma_next;
  const double noise = s_noise * noise_scale(pz, sigma_next) * u;
  const double r = ratio(sigma, sigma_next);
  const bool clamped = eta * sqrt((1.0 - r) * (1.0 + r)) > 1.0;
  if (sigma_next == 0.0 || clamped) {
    if (stage != 1) return error_coeffs(kErrStage);
    return make_coeffs(0.0, c_in(pz, sigma_next), dpmpp ? noise : 0.0, sigma_next);
  }
  double sigma_mid;
  if (dpmpp) {
    double sigma_d_times;  // sigma * sigma_down / sigma'
    if (isinf(sigma)) {
      sigma_d_times = eta < 1.0 ? INFINITY : eta * sigma_next;
    } else {
      sigma_d_times = sigma * d;
    }
    sigma_mid = sqrt(sigma_next * sigma_d_times);
  } else {
    if (!isinf(sigma) && sigma_down == 0.0) return error_coeffs(kErrSigmaOrder);  // Python: log(0)
    sigma_mid = isinf(sigma) ? INFINITY : midpoint_sigma(sigma, sigma_down);
  }
  if (isinf(sigma_mid)) {
    return stage == 1 ? ancestral(pz, sigma, sigma_next, eta, s_noise, true) : error_coeffs(kErrStage);
  }
  if (stage == 1) return first_stage(euler(pz, sigma, sigma_mid));
  if (sigma_mid == 0.0) return error_coeffs(kErrSigmaOrder);  // Python: division by s(0) = 0
  StepCoeffs c = midpoint_stage2(pz, sigma, sigma_mid, sigma_down, sigma_next, d, dpmpp);
  c.e = noise;
  return c;
}

// coefficients.dpmpp_2m: Euler coefficients with b -> b (1 + w), h = (-b w), w = h/(2 h_last),
// h = log(sigma/sigma'), h_last = log(sigma_prev/sigma); first order without history or at sigma' = 0.
ZSNR_HD StepCoeffs dpmpp_2m(Param pz, double sigma, double sigma_next, const double* prev, int n_prev) {
  StepCoeffs c = euler(pz, sigma, sigma_next);
  if (c.error != kOk || n_prev < 1 || sigma_next == 0.0) return c;
  if (!history_ok(sigma, prev, 1)) return error_coeffs(kErrSigmaOrder);
  const double w = log_ratio(sigma, sigma_next) / (2.0 * log_ratio(prev[0], sigma));
  const double b0 = c.b;
  c.b = b0 * (1.0 + w);
  c.h[0] = -b0 * w;
  c.n_hist = 1;
  return c;
}

// coefficients._sde_base: h, h_eta = h (1 + eta), a = (s'/s) r^eta, base = 1 - e^{-h_eta} (1 at h = inf),
// noise = s' s_noise sqrt(1 - e^{-2 eta h}) (s' s_noise at h = inf; 0 when eta = 0).
struct SdeBase {
  double h, big_h, a, base, noise;
};

ZSNR_HD SdeBase sde_base(Param pz, double sigma, double sigma_next, double eta, double s_noise) {
  SdeBase o;
  o.h = log_ratio(sigma, sigma_next);
  const double r = ratio(sigma, sigma_next);
  const double s_next = noise_scale(pz, sigma_next);
  o.a = s_next / noise_scale(pz, sigma) * pow(r, eta);  // pow(0, 0) = 1, as Python's 0.0 ** 0.0
  o.big_h = o.h * (1.0 + eta);
  o.base = isinf(o.h) ? 1.0 : -expm1(-o.big_h);
  o.noise = 0.0;
  if (eta != 0.0) o.noise = s_next * s_noise * (isinf(o.h) ? 1.0 : sqrt(-expm1(-2.0 * eta * o.h)));
  return o;
}

// coefficients.dpmpp_2m_sde: b = c'(base + corr), h = (-c' corr), corr = base/2 * h/h_last (midpoint) or
// (1 - base/h_eta) * h/h_last (heun); returns D (a = 0, b = c_in(0)) at sigma' = 0.
ZSNR_HD StepCoeffs dpmpp_2m_sde(Param pz, double sigma, double sigma_next, const double* prev,
                                int n_prev, double eta, double s_noise, bool solver_heun) {
  if (!pair_ok(sigma, sigma_next)) return error_coeffs(kErrSigmaOrder);
  if (sigma_next == 0.0) return make_coeffs(0.0, c_in(pz, 0.0), 0.0, 0.0);
  if (n_prev > 1) n_prev = 1;
  if (!history_ok(sigma, prev, n_prev)) return error_coeffs(kErrSigmaOrder);
  const SdeBase s = sde_base(pz, sigma, sigma_next, eta, s_noise);
  const double c_next = c_in(pz, sigma_next);
  double corr = 0.0;
  if (n_prev == 1) {
    const double inv_r = s.h / log_ratio(prev[0], sigma);
    corr = (solver_heun ? 1.0 - s.base / s.big_h : 0.5 * s.base) * inv_r;
  }
  StepCoeffs c = make_coeffs(s.a, c_next * (s.base + corr), s.noise, sigma_next);
  if (n_prev == 1) {
    c.h[0] = -c_next * corr;
    c.n_hist = 1;
  }
  return c;
}

// coefficients.dpmpp_3m_sde (prev = (sigma_{i-1}, sigma_{i-2})).  With phi_2 = 1 - base/h_eta (1 at
// h_eta = inf), phi_3 = phi_2/h_eta - 1/2, A0 = h/h_1, A1 = h/h_2, w = h_1/(h_1+h_2), v = h/(h_1+h_2):
//   D:   base + phi_2 A0 (1+w) - phi_3 v A0
//   D_1: -phi_2 (A0 + w (A0+A1)) + phi_3 v (A0+A1)
//   D_2: phi_2 w A1 - phi_3 v A1
// (one history entry: D: base + phi_2 A0, D_1: -phi_2 A0), all times c'.  Returns D at sigma' = 0.
ZSNR_HD StepCoeffs dpmpp_3m_sde(Param pz, double sigma, double sigma_next, const double* prev,
                                int n_prev, double eta, double s_noise) {
  if (!pair_ok(sigma, sigma_next)) return error_coeffs(kErrSigmaOrder);
  if (sigma_next == 0.0) return make_coeffs(0.0, c_in(pz, 0.0), 0.0, 0.0);
  if (n_prev > 2) n_prev = 2;
  if (n_prev < 0) n_prev = 0;
  if (!history_ok(sigma, prev, n_prev)) return error_coeffs(kErrSigmaOrder);
  const SdeBase s = sde_base(pz, sigma, sigma_next, eta, s_noise);
  const double c_next = c_in(pz, sigma_next);
  double x_d = s.base;
  double hist[2] = {0.0, 0.0};
  if (n_prev >= 1) {
    const double phi2 = isinf(s.big_h) ? 1.0 : 1.0 - s.base / s.big_h;
    const double h1 = log_ratio(prev[0], sigma);
    const double a0 = s.h / h1;
    if (n_prev == 1) {
      x_d = s.base + phi2 * a0;
      hist[0] = -phi2 * a0;
    } else {
      const double phi3 = phi2 / s.big_h - 0.5;
      const double h2 = log_ratio(prev[1], prev[0]);
      const double a1 = s.h / h2;
      const double w = h1 / (h1 + h2);
      const double v = s.h / (h1 + h2);
      x_d = s.base + phi2 * a0 * (1.0 + w) - phi3 * v * a0;
      hist[0] = -phi2 * (a0 + w * (a0 + a1)) + phi3 * v * (a0 + a1);
      hist[1] = phi2 * w * a1 - phi3 * v * a1;
    }
  }
  StepCoeffs c = make_coeffs(s.a, c_next * x_d, s.noise, sigma_next);
  for (int k = 0; k < n_prev; ++k) c.h[k] = c_next * hist[k];
  c.n_hist = n_prev;
  return c;
}

// coefficients.lms_weights: w_j = integral over [ts[0], t_next] of the Lagrange basis polynomial l_j
// through ts[0..n) (newest first), by Gauss-Legendre:
//   tau_i = (hi - lo)/2 x_i + (hi + lo)/2,  w_j = (hi - lo)/2 * sum_i W_i l_j(tau_i).
// The sum is a chain of fused multiply-adds, s = fma(W_i, l_j(tau_i), s) for i = 0..3, which is what
// numpy.dot does for 4 elements (OpenBLAS's ddot on x86-64), so the two agree bit for bit there.
ZSNR_HD void lms_weights(const double* ts, int n, double t_next, double* out) {
  // 4-point Gauss-Legendre rule on [-1, 1] (numpy.polynomial.legendre.leggauss(4), repr digits): exact for
  // degree <= 7, so for the cubic Lagrange basis of 4-point LMS.  Local arrays: namespace-scope constexpr
  // arrays are not visible in CUDA device code.
  const double kGaussX[4] = {-0.8611363115940526, -0.33998104358485626, 0.33998104358485626,
                             0.8611363115940526};
  const double kGaussW[4] = {0.34785484513745357, 0.6521451548625464, 0.6521451548625464,
                             0.34785484513745357};
  const double lo = ts[0], hi = t_next;
  const double half_width = 0.5 * (hi - lo);
  const double center = 0.5 * (hi + lo);
  double taus[4];
  for (int i = 0; i < 4; ++i) taus[i] = half_width * kGaussX[i] + center;
  for (int j = 0; j < n; ++j) {
    double basis[4] = {1.0, 1.0, 1.0, 1.0};
    for (int k = 0; k < n; ++k) {
      if (k == j) continue;
      for (int i = 0; i < 4; ++i) basis[i] *= (taus[i] - ts[k]) / (ts[j] - ts[k]);
    }
    double dot = 0.0;
    for (int i = 0; i < 4; ++i) dot = fma(kGaussW[i], basis[i], dot);
    out[j] = half_width * dot;
  }
}

// coefficients.lms: linear multistep on d = (x - D)/sigma through sigma and the history sigmas
// prev[0 .. min(n_prev, order - 1)) that are finite (points at sigma = inf get weight 0):
//   a = c'(sigma' - sum_{j>0} w_j)/s,  b = -c' w_0/sigma,  h_j = c' w_j (zeros for the dropped points,
//   appended at the end), carry d = (1/s) y - (1/sigma) D.  From sigma = inf: Euler, carry d = y.
ZSNR_HD StepCoeffs lms(Param pz, double sigma, double sigma_next, const double* prev, int n_prev,
                       int32_t order) {
  if (!pair_ok(sigma, sigma_next)) return error_coeffs(kErrSigmaOrder);
  if (order < 1) return error_coeffs(kErrBadArg);
  int n_used = n_prev < order - 1 ? n_prev : order - 1;
  if (n_used > kMaxHistory) n_used = kMaxHistory;
  if (n_used < 0) n_used = 0;
  if (isinf(sigma)) {
    StepCoeffs c = euler(pz, sigma, sigma_next);
    c.has_carry = 1;
    c.g_y = 1.0;
    c.g_d = 0.0;
    return c;
  }
  if (!history_ok(sigma, prev, n_used)) return error_coeffs(kErrSigmaOrder);
  double pts[kMaxHistory + 1];
  int n_pts = 0;
  pts[n_pts++] = sigma;
  for (int k = 0; k < n_used; ++k) {
    if (!isinf(prev[k])) pts[n_pts++] = prev[k];
  }
  double w[kMaxHistory + 1];
  lms_weights(pts, n_pts, sigma_next, w);
  const double c_next = c_in(pz, sigma_next);
  const double s = noise_scale(pz, sigma);
  double sum_hist = 0.0;  // Python sum(w[1:]), left to right
  for (int j = 1; j < n_pts; ++j) sum_hist += w[j];
  StepCoeffs c = make_coeffs(c_next * (sigma_next - sum_hist) / s, -c_next * w[0] / sigma, 0.0,
                             sigma_next);
  for (int j = 1; j < n_pts; ++j) c.h[j - 1] = c_next * w[j];
  c.n_hist = n_used;
  c.has_carry = 1;
  c.g_y = 1.0 / s;
  c.g_d = -1.0 / sigma;
  return c;
}

// coefficients.churn: (k, e) with y_hat = k y + e z, from sigma up to sigma_hat:
//   k = c_in(sigma_hat)/c_in(sigma), e = c_in(sigma_hat) sqrt((sigma_hat - sigma)(sigma_hat + sigma)) s_noise;
//   (1, 0) when sigma_hat == sigma; kErrChurn unless inf > sigma_hat > sigma >= 0.
ZSNR_HD int32_t churn(Param pz, double sigma, double sigma_hat, double s_noise, double* k, double* e) {
  if (sigma_hat == sigma) {
    *k = 1.0;
    *e = 0.0;
    return kOk;
  }
  if (!(isfinite(sigma_hat) && sigma_hat > sigma && sigma >= 0.0)) return kErrChurn;
  const double c_hat = c_in(pz, sigma_hat);
  *k = c_hat / c_in(pz, sigma);
  *e = c_hat * sqrt((sigma_hat - sigma) * (sigma_hat + sigma)) * s_noise;
  return kOk;
}

// coefficients.with_churn: fold the next step's churn into a complete, noise-free update; the result is
// the model input at sigma_hat_next (a, b, h scaled by k, e = churn noise, 0 when s_noise = 0).  Unchanged when
// sigma_hat_next == sigma_out.
ZSNR_HD StepCoeffs with_churn(StepCoeffs c, Param pz, double sigma_hat_next, double s_noise) {
  if (sigma_hat_next == c.sigma_out) return c;
  double k = 1.0, e = 0.0;
  const int32_t err = churn(pz, c.sigma_out, sigma_hat_next, s_noise, &k, &e);
  if (err != kOk) return error_coeffs(err);
  if (c.e != 0.0 || !c.complete) return error_coeffs(kErrChurn);
  c.a = k * c.a;
  c.b = k * c.b;
  for (int j = 0; j < c.n_hist; ++j) c.h[j] = k * c.h[j];
  c.e = e;
  c.sigma_out = sigma_hat_next;
  return c;
}

}  // namespace detail

// The coefficients of one sample's step (or stage).  Dispatches over s.sampler as steps.py does:
//   euler            coefficients.euler                       heun, dpm_2     coefficients.heun/dpm_2(stage)
//   euler_ancestral  coefficients.ancestral(eta, s_noise)      ddim            ancestral(eta, 1, clamp=False)
//   ddpm             ancestral(1, 1, clamp=False)              dpm_2_ancestral, dpmpp_2s_ancestral (stage)
//   dpmpp_2m         sigma_prev[0] if n_prev >= 1              dpmpp_2m_sde    sigma_prev[0], solver_heun
//   dpmpp_3m_sde     up to 2 history sigmas                    lms             up to order - 1 of them
// then, for euler, heun and dpm_2 only, when the result is complete and sigma_hat_next != sigma_out, folds
// the next step's churn in (coefficients.with_churn; coefficients.step_coeffs, steps.euler_step and
// steps._two_stage do the same).  The other samplers ignore sigma_hat_next.
ZSNR_HD StepCoeffs step_coeffs(Param pz, const StepArgs& s) {
  if (pz.prediction < kPredV || pz.prediction > kPredFlow) return detail::error_coeffs(kErrBadArg);
  const int n_prev = s.n_prev < 0 ? 0 : (s.n_prev > kMaxHistory ? kMaxHistory : s.n_prev);
  StepCoeffs c;
  switch (s.sampler) {
    case kEuler:
      c = detail::euler(pz, s.sigma, s.sigma_next);
      break;
    case kEulerAncestral:
      c = detail::ancestral(pz, s.sigma, s.sigma_next, s.eta, s.s_noise, true);
      break;
    case kHeun:
      c = detail::heun(pz, s.sigma, s.sigma_next, s.stage);
      break;
    case kDpm2:
      c = detail::dpm_2(pz, s.sigma, s.sigma_next, s.stage);
      break;
    case kDpm2Ancestral:
      c = detail::ancestral_two_stage(pz, s.sigma, s.sigma_next, s.eta, s.s_noise, s.stage, false);
      break;
    case kDpmpp2sAncestral:
      c = detail::ancestral_two_stage(pz, s.sigma, s.sigma_next, s.eta, s.s_noise, s.stage, true);
      break;
    case kDpmpp2m:
      c = detail::dpmpp_2m(pz, s.sigma, s.sigma_next, s.sigma_prev, n_prev);
      break;
    case kDpmpp2mSde:
      c = detail::dpmpp_2m_sde(pz, s.sigma, s.sigma_next, s.sigma_prev, n_prev, s.eta, s.s_noise,
                               s.solver_heun != 0);
      break;
    case kDpmpp3mSde:
      c = detail::dpmpp_3m_sde(pz, s.sigma, s.sigma_next, s.sigma_prev, n_prev, s.eta, s.s_noise);
      break;
    case kDdim:
      c = detail::ancestral(pz, s.sigma, s.sigma_next, s.eta, 1.0, false);
      break;
    case kDdpm:
      c = detail::ancestral(pz, s.sigma, s.sigma_next, 1.0, 1.0, false);
      break;
    case kLms:
      c = detail::lms(pz, s.sigma, s.sigma_next, s.sigma_prev, n_prev, s.order);
      break;
    default:
      return detail::error_coeffs(kErrBadArg);
  }
  const bool churn_sampler = s.sampler == kEuler || s.sampler == kHeun || s.sampler == kDpm2;
  if (churn_sampler && c.error == kOk && c.complete && s.sigma_hat_next != c.sigma_out) {
    c = detail::with_churn(c, pz, s.sigma_hat_next, s.s_noise);
  }
  return c;
}

// coefficients.churn_gamma: EDM churn min(s_churn/N, sqrt(2) - 1) if s_tmin <= sigma <= s_tmax, else 0;
// 0 when s_churn <= 0 and at sigma = inf or 0.
ZSNR_HD double churn_gamma(double sigma, int64_t num_steps, double s_churn, double s_tmin,
                           double s_tmax) {
  if (s_churn <= 0.0 || isinf(sigma) || sigma == 0.0 || !(s_tmin <= sigma && sigma <= s_tmax)) return 0.0;
  const double g = s_churn / static_cast<double>(num_steps);
  const double cap = sqrt(2.0) - 1.0;
  return cap < g ? cap : g;  // Python min(g, cap): the first of equals
}

// schedules.quantize for one sigma: the nearest usable (finite, > 0) entry of table[0..n), by
// |log sigma - log t| (log_space != 0) or |sigma - t|; ties go to the first entry in table order.
// sigma = 0, inf (and anything not finite and > 0, e.g. NaN or negative) is returned unchanged, as is
// sigma when the table has no usable entry (the Python side rejects such tables).
ZSNR_HD double quantize_sigma(double sigma, const double* table, int64_t n, int32_t log_space) {
  if (!(isfinite(sigma) && sigma > 0.0)) return sigma;
  const double key = log_space ? log(sigma) : sigma;
  double best = sigma, best_dist = INFINITY;
  bool found = false;
  for (int64_t i = 0; i < n; ++i) {
    const double t = table[i];
    if (!(isfinite(t) && t > 0.0)) continue;
    const double dist = fabs(key - (log_space ? log(t) : t));
    if (!found || dist < best_dist) {
      best = t;
      best_dist = dist;
      found = true;
    }
  }
  return best;
}

}  // namespace zsnr
