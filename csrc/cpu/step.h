// The fused CPU step: launcher API (raw pointers and sizes, an error code back).  No PyTorch, no Python.
//
// A step is two passes at most: the rescale statistics (only with guidance rescale) and one element pass
// that reads y, F_c (, F_u) and the remembered tensors and writes y_out (, D, carry).  Per-sample step
// coefficients are computed here, on the host, by the shared functions of zsnr/coefficients.h.
#pragma once

#include <cstdint>

#include "zsnr/coefficients.h"
#include "zsnr/combine.h"

namespace zsnr {
namespace cpu {

enum DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Extra error codes of the launcher (after coefficients.h's CoeffError values).
enum StepError : int32_t {
  kErrNeedsNoise = 100,    // a sample's step adds noise but neither seeds nor a noise tensor was given
  kErrNeedsHistory = 101,  // the step needs more remembered tensors than were given
  kErrMixedStages = 102,   // per-sample sigmas put samples in different stages of a two-stage step
  kErrBadArgs = 103,       // sizes or dtype out of range (the Python layer checks first)
};

// Every tensor is [batch][n]: sample b is the dense block of n elements starting at b * n, in one element
// order shared by all tensors.  `logical_order` says that order is the tensor's logical (row-major) order,
// which the Philox noise index needs (DESIGN 2.8); the Python layer guarantees it whenever noise is drawn.
struct Tensors {
  int32_t dtype;
  int64_t batch, n;
  const void* y;
  const void* f_cond;
  const void* f_uncond;        // nullptr: no guidance
  const void* hist[kMaxHist];  // remembered tensors, newest first
  int32_t n_hist;              // how many were given
  const void* noise;           // explicit unit noise, or nullptr to use the Philox seeds
  void* y_out;                 // may alias y
  void* d_out;                 // nullptr: D is not stored
  void* carry_out;             // nullptr: no LMS derivative stored
};

// What every sample's step is.  Sigma arrays hold n_sigma values: 1 (shared) or batch (one per sample).
struct StepPlan {
  Param pz;
  int32_t sampler, stage, solver_heun, order, n_prev;
  double eta, s_noise;
  int64_t n_sigma;
  const double* sigma;           // the step's sigma
  const double* sigma_eval;      // where the model was called (stage 2: the first stage's sigma_out)
  const double* sigma_next;
  const double* sigma_hat_next;  // churn target; equal to sigma_next for none
  const double* sigma_prev;      // [n_prev][n_sigma], newest first
  // guidance
  double guidance_scale, guidance_rescale;
  int32_t rescale_space;
  // noise
  const uint64_t* seeds;         // [batch] Philox seeds, or nullptr
  uint32_t step_index, draw;
};

// What the step produced, per sample: the noise level of y_out, and whether the step is complete.
struct StepOutcome {
  int32_t error;                 // kOk, a CoeffError or a StepError
  int32_t complete;
  int32_t noise_used;            // whether any sample drew noise
  int32_t n_hist_used;
  int64_t bad_sample;            // the sample whose coefficients failed
};

// Runs one fused step.  sigma_out[n_sigma] receives the noise level of y_out.  The GIL-free, thread-safe
// entry point: it allocates only per-sample arrays, never a temporary the size of the latent.
StepOutcome fused_step(const Tensors& t, const StepPlan& plan, double* sigma_out);

// Per-sample rescale sums (combine.h's RescaleSum order) of F_c, F_u (and y when with_y): out[b * kNumSums + k].
void rescale_sums(const Tensors& t, int32_t with_y, double* out);

// The element pass with ready per-sample coefficients c[batch].
void combine(const Tensors& t, const ElemCoeffs* c, const uint64_t* seeds, uint32_t step_index, uint32_t draw,
             int32_t n_hist_used, int32_t add_noise);

// The instruction set the kernels run with on this machine (the best one compiled in and supported).
enum Isa : int32_t { kIsaBase = 0, kIsaAvx2 = 1, kIsaAvx512 = 2 };
Isa isa();
const char* isa_name();

}  // namespace cpu
}  // namespace zsnr
