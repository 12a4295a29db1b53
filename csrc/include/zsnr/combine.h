// The per-element combine of one fused sampler step (docs/design.md §2.3, 2.7), shared by every backend.
// No PyTorch, no Python.  Mirrors zsnr_kernels/reference.py::fused_step, which is the spec:
//
//   F     = F_u + w (F_c - F_u)                  guidance (F = F_c without an unconditional output)
//   D     = p y + q F                            p, q with the guidance rescale factor folded in
//   y_out = a y + b D + u F_u + sum_k h_k H_k + e z
//   carry = g_y y + g_d D + g_u F_u              (LMS derivative; CFG++'s unconditional D_u)
//
// CFG++ renoises with the unconditional D_u = p y + q F_u (raw p, q: the rescale acts on the guided D only), weight
// b_u: the host folds b_u p into a and gives u = b_u q (zsnr_kernels/backends/table.py, the columns BFU and GFU), so
// the element pass reads F_u once more and nothing else.  u = g_u = 0 for every other sampler, and where D_u = D (no
// separate unconditional output: w = 1), for which the host adds b_u to b instead.
//
// Per element everything is float32 with the fused multiply-adds written out, so that CPU and GPU round
// the same way; the per-sample coefficients arrive as float32, computed in float64 by coefficients.h and
// rescale_factor() below.
#pragma once

#include <math.h>

#include <cstdint>

#include "zsnr/common.h"

namespace zsnr {

// The float32 coefficients of one sample, ready for the element loop.
struct ElemCoeffs {
  float w;               // guidance scale (used when there is an unconditional output)
  float p, q;            // D = p y + q F
  float a, b, e;         // y_out = a y + b D + ... + e z
  float h[kMaxHistory];  // weights of the remembered tensors H_k
  float g_y, g_d;        // carry = g_y y + g_d D (+ g_u F_u)
  float u, g_u;          // weights of F_u in y_out and in the carry (CFG++, guided only; 0 otherwise)
};

ZSNR_HD float guide(float fc, float fu, float w) { return fmaf(w, fc - fu, fu); }

ZSNR_HD float denoise(float y, float f, float p, float q) { return fmaf(p, y, q * f); }

// y_out for one element, given its D, its unconditional output fu (used when Guided), the remembered values h0..h2
// (the first NHist are used) and the noise z (used when Noise).  The additions run in this order on every backend.
template <int NHist, bool Noise, bool Guided>
ZSNR_HD float update(const ElemCoeffs& c, float y, float d, float fu, float h0, float h1, float h2, float z) {
  float acc = fmaf(c.b, d, c.a * y);
  if (Guided) acc = fmaf(c.u, fu, acc);
  if (NHist > 0) acc = fmaf(c.h[0], h0, acc);
  if (NHist > 1) acc = fmaf(c.h[1], h1, acc);
  if (NHist > 2) acc = fmaf(c.h[2], h2, acc);
  if (Noise) acc = fmaf(c.e, z, acc);
  return acc;
}

// Without an unconditional output (no u term).
template <int NHist, bool Noise>
ZSNR_HD float update(const ElemCoeffs& c, float y, float d, float h0, float h1, float h2, float z) {
  return update<NHist, Noise, false>(c, y, d, 0.0f, h0, h1, h2, z);
}

template <bool Guided>
ZSNR_HD float carry(const ElemCoeffs& c, float y, float d, float fu) {
  const float v = fmaf(c.g_d, d, c.g_y * y);
  return Guided ? fmaf(c.g_u, fu, v) : v;
}

ZSNR_HD float carry(const ElemCoeffs& c, float y, float d) { return carry<false>(c, y, d, 0.0f); }

// The one NaN every backend stores (docs/design.md §2.3): a NaN result, whatever its sign and payload, becomes the
// positive quiet NaN with a zero payload, what float("nan") is in each storage format: float32 0x7fc00000,
// bfloat16 0x7fc0, float16 0x7e00 (the CPU's conversions map this float to those; CUDA's and Triton's 16-bit
// conversions give 0x7fff, so they store kNaN16 explicitly).  x86 arithmetic keeps an input NaN's payload and GPU
// arithmetic returns 0x7fffffff: without this the bits of a NaN output depended on the backend.
constexpr uint32_t kNaN32 = 0x7fc00000u;
constexpr uint16_t kNaNBFloat16 = 0x7fc0u, kNaNFloat16 = 0x7e00u;

ZSNR_HD float canonical_nan(float v) {
#if defined(__CUDA_ARCH__)
  return v == v ? v : __int_as_float(static_cast<int>(kNaN32));
#else
  return v == v ? v : __builtin_nanf("");  // 0x7fc00000 (GCC, Clang, IEEE targets)
#endif
}

// --------------------------------------------------------------------------------- guidance rescale

// Per-sample sums the rescale needs (docs/design.md §2.7), accumulated in double.  The rescale acts on G = u y + t F
// and G_c = u y + t F_c; the factor is a ratio of their stds, so it does not change when both are divided by one
// number s, and the sums are of G/s = b F + a y and G_c/s = b F_c + a y with a = u/s, b = t/s (rescale_weights):
// the guided output's own moments.  s is whichever of u and t is larger in magnitude, so one of a, b is exactly 1
// and the other at most 1 in magnitude: the terms stay as large as the tensors (times 1 + 2|w|) for every (u, t).
// (Dividing by t alone, r = u/t grows like sd/sigma in the `x0` space of eps, flow and v models: below sigma
// ~1e-19 the square of r y overflowed float and the step came out NaN.  In the `output` space u = 0, t = 1:
// a = 0, b = 1 and y is not read.)  (The variance of G assembled from sums of F_c, F_u and their product,
// w^2 S_cc + (1-w)^2 S_uu + 2w(1-w) S_cu, cancels: with F_c close to F_u and w = 12 the float32 step was
// 19-460x further from float64 than the float32 torch reference at 16-4096 elements; now it is as close.)
// Every backend sums each element's terms less the sample's first element's (its pivot): the variances
// rescale_factor takes from the sums do not change under that shift, but without it the sums of squares carry
// the tensors' mean: the variance came out as a difference of two nearly equal sums, lost to the float partial
// sums (an output of mean 100 and std 0.1: y off by 2e-2), and a constant output's variance was rounding noise
// instead of 0 (the factor is 1 there).  With it a constant output sums to exactly 0.  The terms are formed from
// differences of nearby numbers, exact in float where the numbers are within a factor 2 of each other (see
// rescale_terms).
enum RescaleSum : int {
  kSumC = 0,  // sum of G_c/s less its pivot
  kSumCC,     // ... of its square
  kSumG,      // sum of G/s less its pivot
  kSumGG,     // ... of its square
  kNumSums
};

// The weights of y and F in G/s = b F + a y of one sample, each rounded once to float: s = u where |u| > |t|
// (a = 1, b = t/u), else s = t (a = u/t, b = 1).  u = t = 0 (G = 0; no sampler asks for it) gives a = 0, b = 1.
struct RescaleWeights {
  float a, b;
};

ZSNR_HD RescaleWeights rescale_weights(double u, double t) {
  if (fabs(u) > fabs(t)) return RescaleWeights{1.0f, static_cast<float>(t / u)};
  return RescaleWeights{t != 0.0 ? static_cast<float>(u / t) : 0.0f, 1.0f};
}

// What the statistics pass needs of one sample, in float32: the pivots (the first element's F_c, F_u, F_c - F_u
// and y), the guidance scale w and the weights a, b (rescale_weights).
struct RescaleSample {
  float c, u, d, y;
  float w, a, b;
};

ZSNR_HD RescaleSample rescale_sample(float fc0, float fu0, float y0, float w, RescaleWeights ab) {
  return RescaleSample{fc0, fu0, fc0 - fu0, y0, w, ab.a, ab.b};
}

// The terms one element (F_c, F_u, y) adds to the rescale sums, in float32: *gc = G_c/s and *g = G/s less their
// pivots,
//   c = F_c - c0,   g = (F_u - u0) + w ((F_c - F_u) - d0),
//   then with y:    e = a (y - y0),   c = b c + e,   g = b g + e.
// F_c - F_u is taken from the elements themselves, not from F_c - c0 and F_u - u0: with F_c close to F_u it is
// exact, where the difference of the two rounded shifts lost the digits that w multiplies.  Each product is
// rounded before it is added (the CPU builds contract nothing, so every instruction set gives the same bits;
// nvcc and Triton may fuse them into FMAs).  y and (a, b) are read only WithY (without y, b = 1: the `output`
// space).
template <bool WithY>
ZSNR_HD void rescale_terms(float fc, float fu, float y, const RescaleSample& s, float* gc, float* g) {
  float c = fc - s.c;
  float f = (fu - s.u) + s.w * ((fc - fu) - s.d);
  if (WithY) {
    const float e = s.a * (y - s.y);
    c = s.b * c + e;
    f = s.b * f + e;
  }
  *gc = c;
  *g = f;
}

// The rescale factor f = phi std(G_c)/std(G) + (1 - phi) from the sums over n elements; f = 1 where std(G) = 0
// (docs/design.md §2.7).
ZSNR_HD double rescale_factor(const double* s, double n, double phi) {
  const double mean_c = s[kSumC] / n, mean_g = s[kSumG] / n;
  const double var_c = fmax(s[kSumCC] / n - mean_c * mean_c, 0.0);
  const double var_g = s[kSumGG] / n - mean_g * mean_g;
  if (!(var_g > 0.0)) return 1.0;
  return phi * sqrt(var_c / var_g) + (1.0 - phi);
}

// Fold the factor into (p, q): D = p y + (q/t)(f G - u y) = (p + (q u / t)(f - 1)) y + q f F.
ZSNR_HD void fold_rescale(double f, double u, double t, double* p, double* q) {
  *p = *p + (*q * u / t) * (f - 1.0);
  *q = *q * f;
}

}  // namespace zsnr
