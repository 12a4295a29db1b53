// The per-element combine of one fused sampler step (DESIGN.md 2.3, 2.7), shared by every backend.
// No PyTorch, no Python.  Mirrors zsnr_kernels/reference.py::fused_step, which is the spec:
//
//   F     = F_u + w (F_c - F_u)                  guidance (F = F_c without an unconditional output)
//   D     = p y + q F                            p, q with the guidance rescale factor folded in
//   y_out = a y + b D + sum_k h_k H_k + e z
//   carry = g_y y + g_d D                        (LMS derivative)
//
// Per element everything is float32 with the fused multiply-adds written out, so that CPU and GPU round
// the same way; the per-sample coefficients arrive as float32, computed in float64 by coefficients.h and
// rescale_factor() below.
#pragma once

#include <math.h>

#include <cstdint>

#include "zsnr/common.h"

namespace zsnr {

constexpr int kMaxHist = 3;

// The float32 coefficients of one sample, ready for the element loop.
struct ElemCoeffs {
  float w;               // guidance scale (used when there is an unconditional output)
  float p, q;            // D = p y + q F
  float a, b, e;         // y_out = a y + b D + ... + e z
  float h[kMaxHist];     // weights of the remembered tensors H_k
  float g_y, g_d;        // carry = g_y y + g_d D
};

ZSNR_HD float guide(float fc, float fu, float w) { return fmaf(w, fc - fu, fu); }

ZSNR_HD float denoise(float y, float f, float p, float q) { return fmaf(p, y, q * f); }

// y_out for one element, given its D, the remembered values h0..h2 (the first NHist are used) and the noise z
// (used when Noise).  The additions run in this order on every backend.
template <int NHist, bool Noise>
ZSNR_HD float update(const ElemCoeffs& c, float y, float d, float h0, float h1, float h2, float z) {
  float acc = fmaf(c.b, d, c.a * y);
  if (NHist > 0) acc = fmaf(c.h[0], h0, acc);
  if (NHist > 1) acc = fmaf(c.h[1], h1, acc);
  if (NHist > 2) acc = fmaf(c.h[2], h2, acc);
  if (Noise) acc = fmaf(c.e, z, acc);
  return acc;
}

ZSNR_HD float carry(const ElemCoeffs& c, float y, float d) { return fmaf(c.g_d, d, c.g_y * y); }

// --------------------------------------------------------------------------------- guidance rescale

// Per-sample sums the rescale needs (DESIGN 2.7), accumulated in double.  The rescale acts on
// G = u y + t F; for the `output` space (u = 0) only the five sums over F_c and F_u are read.
// Every backend sums each tensor less its sample's first element (its pivot: c - c_0, u - u_0, y - y_0).  The
// variances rescale_factor takes from the sums do not change under those shifts, but without them the sums of
// squares carry the tensors' mean: the variance came out as a difference of two nearly equal sums, lost to the
// float partial sums (an output of mean 100 and std 0.1: y off by 2e-2), and a constant output's variance was
// rounding noise instead of 0 (the factor is 1 there).  With them a constant output sums to exactly 0.
enum RescaleSum : int { kSumC = 0, kSumCC, kSumU, kSumUU, kSumCU, kSumY, kSumYY, kSumYC, kSumYU, kNumSums };

// The rescale factor f = phi std(G_c)/std(G) + (1 - phi) from the sums over n elements, with
// G_c = u y + t F_c and G = u y + t ((1 - w) F_u + w F_c); f = 1 where std(G) = 0 (DESIGN 2.7).
ZSNR_HD double rescale_factor(const double* s, double n, double u, double t, double w, double phi) {
  const double al = t * w, be = t * (1.0 - w);  // G = u y + al F_c + be F_u
  const double mean_c = (u * s[kSumY] + t * s[kSumC]) / n;
  const double sq_c = (u * u * s[kSumYY] + 2.0 * u * t * s[kSumYC] + t * t * s[kSumCC]) / n;
  const double mean_g = (u * s[kSumY] + al * s[kSumC] + be * s[kSumU]) / n;
  const double sq_g = (u * u * s[kSumYY] + al * al * s[kSumCC] + be * be * s[kSumUU] +
                       2.0 * (u * al * s[kSumYC] + u * be * s[kSumYU] + al * be * s[kSumCU])) / n;
  const double var_c = fmax(sq_c - mean_c * mean_c, 0.0);
  const double var_g = sq_g - mean_g * mean_g;
  if (!(var_g > 0.0)) return 1.0;
  return phi * sqrt(var_c / var_g) + (1.0 - phi);
}

// Fold the factor into (p, q): D = p y + (q/t)(f G - u y) = (p + (q u / t)(f - 1)) y + q f F.
ZSNR_HD void fold_rescale(double f, double u, double t, double* p, double* q) {
  *p = *p + (*q * u / t) * (f - 1.0);
  *q = *q * f;
}

}  // namespace zsnr
