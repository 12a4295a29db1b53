// What one fused step is, shared by the CPU and CUDA launchers (csrc/cpu/step.h, csrc/cuda/step.cuh): the
// tensors, the per-sample plan, and sample_coeffs(), which turns sample i of a plan into the float32
// coefficients of the element pass: computed with the shared functions of coefficients.h from the sampler and
// its sigmas, or read from a row of the float64 coefficient table (table mode).  No PyTorch, no Python.
// The pointers are host pointers for the CPU backend and device pointers for the CUDA one.
#pragma once

#include <math.h>

#include <cstdint>

#include "zsnr/coefficients.h"
#include "zsnr/combine.h"
#include "zsnr/common.h"
#include "zsnr/philox.h"

namespace zsnr {

// Storage dtype codes.
enum DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Error codes of a step, after coefficients.h's CoeffError values.
enum StepError : int32_t {
  kErrNeedsNoise = 100,    // a sample's step adds noise but neither seeds nor a noise tensor was given
  kErrNeedsHistory = 101,  // a sample's step needs more remembered tensors than were given
  kErrMixedStages = 102,   // per-sample sigmas put samples in different stages of a two-stage step
  kErrBadArgs = 103,       // sizes or dtype out of range (the Python layer checks first)
};

// Columns of the float64 coefficient table (zsnr_kernels/backends/table.py; SamplingPlan, the Triton kernels): one
// row of kNumCoeffs values per sample, or one row for the whole batch.  The element pass reads w .. g_d rounded to
// float32; the guidance-rescale fold reads p, q, u, t in float64 (the C++ launchers take w and phi of the fold from
// the step's plan, the Triton kernels from the row: the callers write the same values in both).
enum CoeffColumn : int32_t {
  kColW = 0,             // guidance scale
  kColP, kColQ,          // D = p y + q F
  kColA, kColB,          // y_out = a y + b D + sum_k h_k H_k + e z
  kColH0,                // h_0 .. h_{kMaxHistory - 1}
  kColE = kColH0 + kMaxHistory,
  kColGY, kColGD,        // carry = g_y y + g_d D (zero without one)
  kColU, kColT,          // the rescale space G = u y + t F ((0, 1): the model output)
  kColPhi,               // guidance rescale
  kColBFU,               // weight of F_u in y_out: CFG++'s b_u q (b_u p folded into a by the host; 0 otherwise)
  kColGFU,               // weight of F_u in the carry (CFG++'s unconditional D_u: carry_u q)
  kNumColumns
};
constexpr int kNumCoeffs = 16;  // the row stride: 16 doubles keep rows 128-byte aligned
static_assert(kNumColumns <= kNumCoeffs, "a table row holds every column");

// Every tensor is [batch][n]: sample b is the dense block of n elements starting at b * n, in one element
// order shared by all tensors; the Python layer guarantees that order is the logical (row-major) one whenever
// Philox noise is drawn (docs/design.md §2.8).
struct Tensors {
  int32_t dtype;
  int64_t batch, n;
  const void* y;
  const void* f_cond;
  const void* f_uncond;        // nullptr: no guidance
  const void* hist[kMaxHistory];  // remembered tensors, newest first
  int32_t n_hist;              // how many were given
  const void* noise;           // explicit unit noise, or nullptr to use the Philox seeds
  void* y_out;                 // may equal y exactly (each element is read before it is written)
  void* d_out;                 // nullptr: D is not stored
  void* carry_out;             // nullptr: no LMS derivative stored
};

// What every sample's step is.  Sigma arrays hold n_sigma float64 values: 1 (shared) or batch (docs/design.md §2.9).
// Table mode (table != nullptr): the coefficients are the n_sigma rows of `table` and the sampler, its options and
// the sigma arrays are not read; the rows were computed and checked by the caller, for the n_hist remembered
// tensors given, and a carry is written when carry_out is given.
struct StepPlan {
  Param pz;
  int32_t sampler, stage, solver_heun, order, n_prev;
  double eta, s_noise;
  int64_t n_sigma;
  const double* sigma;           // the step's sigma
  const double* sigma_eval;      // where the model was called (stage 2: the first stage's sigma_out)
  const double* sigma_next;
  const double* sigma_hat_next;  // churn target; equal to sigma_next for none
  const double* sigma_prev;      // [n_prev][n_sigma], newest first (may be nullptr when n_prev = 0)
  // guidance (the rescale applies only when f_uncond is given and guidance_rescale != 0)
  double guidance_scale, guidance_rescale;
  int32_t rescale_space;
  // noise
  const uint64_t* seeds;         // [batch] Philox seeds, or nullptr
  uint32_t step_index, draw;
  NoiseSlice slice;              // where each sample's n elements lie in the sample the noise is drawn for
                                 // (zsnr/philox.h; {n, n, 0}: the whole sample); groups whole (slice_groups_whole)
  const double* table;           // [n_sigma][kNumCoeffs] coefficient rows, or nullptr to compute them
};

// One sample's coefficients: the float32 record of the element pass (p, q before the rescale fold) and the
// float64 values the fold starts from.
struct SampleCoeffs {
  ElemCoeffs ec;
  int32_t error;      // kOk or the CoeffError of this sample
  int32_t complete;
  int32_t n_hist;
  int32_t has_carry;
  double p, q;        // D = p y + q F
  double u, t;        // the rescale space G = u y + t F
  double sigma_out;   // the noise level of y_out
};

// A table row as the record of the element pass: each column rounded to float32 as sample_coeffs rounds the
// computed values, so that a row holding the computed coefficients gives the same bits.  complete = 1, n_hist =
// kMaxHistory (the caller gives exactly the remembered tensors the row weights), sigma_out = NaN (not in the table).
ZSNR_HD SampleCoeffs table_coeffs(const double* row) {
  SampleCoeffs r{};
  r.error = kOk;
  r.complete = 1;
  r.n_hist = kMaxHistory;
  r.has_carry = 1;
  r.p = row[kColP];
  r.q = row[kColQ];
  r.u = row[kColU];
  r.t = row[kColT];
  r.sigma_out = NAN;
  ElemCoeffs& e = r.ec;
  e.w = static_cast<float>(row[kColW]);
  e.p = static_cast<float>(r.p);
  e.q = static_cast<float>(r.q);
  e.a = static_cast<float>(row[kColA]);
  e.b = static_cast<float>(row[kColB]);
  e.e = static_cast<float>(row[kColE]);
  for (int k = 0; k < kMaxHistory; ++k) e.h[k] = static_cast<float>(row[kColH0 + k]);
  e.g_y = static_cast<float>(row[kColGY]);
  e.g_d = static_cast<float>(row[kColGD]);
  e.u = static_cast<float>(row[kColBFU]);
  e.g_u = static_cast<float>(row[kColGFU]);
  return r;
}

// Sample i of `plan` (i < n_sigma).  `rescale`: also compute the rescale space (u, t).  (The computed samplers have
// no F_u term: u = g_u = 0.)
ZSNR_HD SampleCoeffs sample_coeffs(const StepPlan& pl, int64_t i, bool rescale) {
  if (pl.table != nullptr) return table_coeffs(pl.table + i * kNumCoeffs);
  StepArgs s{};
  s.sampler = pl.sampler;
  s.stage = pl.stage;
  s.sigma = pl.sigma[i];
  s.sigma_next = pl.sigma_next[i];
  s.sigma_hat_next = pl.sigma_hat_next[i];
  s.n_prev = pl.n_prev;
  for (int k = 0; k < pl.n_prev && k < kMaxHistory; ++k) s.sigma_prev[k] = pl.sigma_prev[k * pl.n_sigma + i];
  s.eta = pl.eta;
  s.s_noise = pl.s_noise;
  s.solver_heun = pl.solver_heun;
  s.order = pl.order;
  const StepCoeffs c = step_coeffs(pl.pz, s);
  SampleCoeffs r{};
  r.p = r.q = NAN;
  r.u = 0.0;
  r.t = 1.0;
  int32_t err = c.error;
  if (err == kOk) err = denoise_coeffs(pl.pz, pl.sigma_eval[i], &r.p, &r.q);
  if (err == kOk && rescale) err = rescale_space_coeffs(pl.pz, pl.sigma_eval[i], pl.rescale_space, &r.u, &r.t);
  r.error = err;
  r.complete = c.complete;
  r.n_hist = c.n_hist;
  r.has_carry = c.has_carry;
  r.sigma_out = c.sigma_out;
  ElemCoeffs& e = r.ec;
  e.w = static_cast<float>(pl.guidance_scale);
  e.p = static_cast<float>(r.p);
  e.q = static_cast<float>(r.q);
  e.a = static_cast<float>(c.a);
  e.b = static_cast<float>(c.b);
  e.e = static_cast<float>(c.e);
  for (int k = 0; k < kMaxHistory; ++k) e.h[k] = k < c.n_hist ? static_cast<float>(c.h[k]) : 0.0f;
  e.g_y = c.has_carry ? static_cast<float>(c.g_y) : 0.0f;
  e.g_d = c.has_carry ? static_cast<float>(c.g_d) : 0.0f;
  return r;
}

}  // namespace zsnr
