// The fused CUDA step: launcher API (raw device pointers, sizes, a dtype code and a cudaStream_t; a
// cudaError_t back).  No PyTorch, no Python.  The model is csrc/cpu/step.h; what differs is that nothing
// here ever waits on the device:
//
//   * the per-sample step coefficients are computed ON THE DEVICE (one thread per sample) by the shared
//     functions of zsnr/coefficients.h from device sigma arrays, into a device workspace;
//   * errors (a CoeffError or a StepError, the sample that failed) are written to a device StepStatus that
//     the caller reads whenever it likes (after the step, after the sampling loop); a sample whose
//     coefficients failed gets NaN coefficients, so its outputs are NaN, never silently plausible;
//   * the kernel variants (history count, noise source, guidance, stored outputs) are chosen from what the
//     caller passes (which tensors, seeds or noise), never from device values.
//
// A step is at most three launches on `stream`, all capturable in a CUDA graph:
//   coefficients (1 block)  ->  rescale statistics + fold (only with guidance rescale)  ->  combine.
// With a precomputed table of SampleCoeffs (the device-resident sampling mode) the first one is skipped:
// one launch per model evaluation, two with guidance rescale.
//
// Aliasing contract: an output pointer may equal an input pointer exactly (y_out = y is the usual case):
// every element is read and written by one thread, all of its inputs before any of its outputs, and never
// read again.  Partially overlapping tensors are not supported.  The Python layer checks everything else
// (devices, dtypes, sizes) before a pointer gets here.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "zsnr/coefficients.h"
#include "zsnr/combine.h"

namespace zsnr {
namespace cuda {

// Storage dtype codes (the same as the CPU backend's).
enum DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Extra error codes, after coefficients.h's CoeffError values (the same as the CPU backend's).
enum StepError : int32_t {
  kErrNeedsNoise = 100,    // a sample's step adds noise but neither seeds nor a noise tensor was given
  kErrNeedsHistory = 101,  // a sample's step needs more remembered tensors than were given
  kErrMixedStages = 102,   // per-sample sigmas put samples in different stages of a two-stage step
  kErrBadArgs = 103,       // (CPU only: the CUDA launchers answer cudaErrorInvalidValue and launch nothing)
};

// Every tensor is [batch][n] on the device: sample b is the dense block of n elements starting at b * n, in
// the tensor's logical (row-major) order whenever Philox noise is drawn (DESIGN 2.8).  All of one dtype.
struct Tensors {
  int32_t dtype;
  int64_t batch, n;
  const void* y;
  const void* f_cond;
  const void* f_uncond;        // nullptr: no guidance
  const void* hist[kMaxHist];  // remembered tensors, newest first
  int32_t n_hist;              // how many were given: the combine reads exactly these
  const void* noise;           // explicit unit noise, or nullptr (then Philox from StepPlan::seeds, if any)
  void* y_out;
  void* d_out;                 // nullptr: D is not stored
  void* carry_out;             // nullptr: no LMS derivative stored
};

// What every sample's step is.  The sigma arrays are DEVICE float64 arrays of n_sigma values each:
// 1 (shared by the batch) or batch (one per sample, DESIGN 2.9).
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
  // guidance (rescale only when f_uncond is given and guidance_rescale != 0)
  double guidance_scale, guidance_rescale;
  int32_t rescale_space;
  // noise
  const uint64_t* seeds;         // DEVICE [batch] Philox seeds, or nullptr
  uint32_t step_index, draw;
};

// What the step produced, written by the coefficient kernel (the layout of cpu::StepOutcome).
struct StepStatus {
  int32_t error;        // kOk, a CoeffError or a StepError: the first failing sample's, as on the CPU
  int32_t complete;     // sample 0's
  int32_t noise_used;   // whether any sample draws noise
  int32_t n_hist_used;  // the most remembered tensors any sample uses
  int64_t bad_sample;   // the failing sample, or -1
};

// One sample's coefficients as the device computes them (n_sigma records per step).  A table of these per
// step index is what the device-resident sampling mode precomputes.
struct SampleCoeffs {
  ElemCoeffs ec;      // float32, ready for the element pass (p, q without the rescale factor)
  int32_t error;      // kOk or why this sample failed (then ec is NaN)
  int32_t complete;
  int32_t n_hist;
  int32_t has_carry;
  double p, q;        // float64 D = p y + q F, where the rescale fold starts
  double u, t;        // the rescale space G = u y + t F
};

// (p, q) of one sample with the guidance rescale factor folded in: replaces ec.p, ec.q in the combine.
struct FoldedPQ {
  float p, q;
};

// Elements per block of the rescale statistics pass (each sample's partial sums are kept per chunk).
constexpr int64_t kStatsChunk = 16384;

// The device workspace of a step, carved from one allocation of workspace_bytes(batch, n) bytes.
struct Workspace {
  SampleCoeffs* coeffs;   // [batch]  (n_sigma used)
  FoldedPQ* pq;           // [batch]
  double* partials;       // [batch][chunks][kNumSums]
  unsigned int* counters; // [batch]  chunks done per sample; zero between steps (workspace_init, once)
  StepStatus* status;     // [1]
};

int64_t stats_chunks(int64_t n);
size_t workspace_bytes(int64_t batch, int64_t n);
// Carves `base` (at least 256-byte aligned, workspace_bytes(batch, n) bytes) into its arrays.
Workspace workspace_carve(void* base, int64_t batch, int64_t n);
// Zeroes the workspace on `stream` (cudaMemsetAsync): needed once after allocating it, not per step.
cudaError_t workspace_init(void* base, int64_t batch, int64_t n, cudaStream_t stream);

// Computes the per-sample coefficients into ws.coeffs[n_sigma], their sigma_out into the DEVICE array
// sigma_out[n_sigma] (may be nullptr) and the step's status into *ws.status.  One block.
cudaError_t launch_coeffs(const Tensors& t, const StepPlan& plan, const Workspace& ws, double* sigma_out,
                          cudaStream_t stream);

// Guidance rescale: per-sample sums of F_c, F_u (and y when the space is not `output`), then, in the last
// block of each sample, the factor folded into ws.pq[b] from coeffs[n_coeffs == 1 ? 0 : b].
struct RescaleParams {
  double guidance_scale, guidance_rescale;
  int32_t rescale_space;
};
cudaError_t launch_rescale(const Tensors& t, const SampleCoeffs* coeffs, int64_t n_coeffs,
                           const RescaleParams& rp, const Workspace& ws, cudaStream_t stream);

// The element pass.  coeffs has n_coeffs (1 or batch) records; pq (nullptr: none) overrides ec.p, ec.q per
// sample.  noise_mode: 0 none, 1 read t.noise, 2 Philox from seeds[batch] with (step_index, draw).  A
// sample whose e is 0 draws nothing.
// t.carry_out, when given, is written for every sample (zeros where the step has no carry: g_y = g_d = 0);
// pass it only for LMS, which never draws noise (noise_mode must then be 0).
cudaError_t launch_combine(const Tensors& t, const SampleCoeffs* coeffs, int64_t n_coeffs, const FoldedPQ* pq,
                           int32_t noise_mode, const uint64_t* seeds, uint32_t step_index, uint32_t draw,
                           cudaStream_t stream);

// The whole step: launch_coeffs, launch_rescale when guided with rescale, launch_combine (noise mode 1 when
// t.noise is given, else 2 when plan.seeds is given, else 0).
cudaError_t fused_step(const Tensors& t, const StepPlan& plan, const Workspace& ws, double* sigma_out,
                       cudaStream_t stream);

}  // namespace cuda
}  // namespace zsnr
