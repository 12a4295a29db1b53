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
// In table mode (StepPlan::table: the float64 coefficient rows a SamplingPlan builds, the record the Triton kernels
// read too) the first one is skipped: one launch per model evaluation, two with guidance rescale.
//
// Aliasing contract: an output pointer may equal an input pointer exactly (y_out = y is the usual case):
// every element is read and written by one thread, all of its inputs before any of its outputs, and never
// read again.  Partially overlapping tensors are not supported.  The Python layer checks everything else
// (devices, dtypes, sizes) before a pointer gets here.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "zsnr/step_plan.h"

namespace zsnr {
namespace cuda {

// DType, StepError, Tensors (device pointers here), StepPlan (device sigma and seed arrays) and SampleCoeffs
// are zsnr/step_plan.h's, shared with the CPU backend.

// What the step produced, written by the coefficient kernel (the device twin of cpu::StepOutcome, with the
// history depth and noise use the launch derived).
struct StepStatus {
  int32_t error;        // kOk, a CoeffError or a StepError: the first failing sample's, as on the CPU
  int32_t complete;     // sample 0's
  int32_t noise_used;   // whether any sample draws noise
  int32_t n_hist_used;  // the most remembered tensors any sample uses
  int64_t bad_sample;   // the failing sample, or -1
};

// Where the rescale and element passes find each sample's coefficients: the records the coefficient kernel wrote, or
// the rows of a float64 coefficient table (table mode, zsnr/step_plan.h); exactly one of the two, n (1: shared by the
// batch, or batch) entries.
struct CoeffSource {
  const SampleCoeffs* records;
  const double* table;  // [n][kNumCoeffs]
  int64_t n;
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
  unsigned int* counters; // [batch]  chunks done per sample; zero between steps (the allocation is zeroed once)
  StepStatus* status;     // [1]
};

int64_t stats_chunks(int64_t n);
size_t workspace_bytes(int64_t batch, int64_t n);
// Carves `base` (at least 256-byte aligned, workspace_bytes(batch, n) bytes, zeroed once when allocated: the
// kernels leave the counters at zero after each step) into its arrays.
Workspace workspace_carve(void* base, int64_t batch, int64_t n);

// Computes the per-sample coefficients into ws.coeffs[n_sigma], their sigma_out into the DEVICE array
// sigma_out[n_sigma] (may be nullptr) and the step's status into *ws.status.  One block.
cudaError_t launch_coeffs(const Tensors& t, const StepPlan& plan, const Workspace& ws, double* sigma_out,
                          cudaStream_t stream);

// Guidance rescale: per-sample sums of combine.h's RescaleSum (G_c/s and G/s, formed from F_c, F_u and, when the
// space is not `output`, y, with the weights rescale_weights takes from coeffs' u, t), then, in the last block of
// each sample, the factor folded into ws.pq[b] from sample b's coefficients.
struct RescaleParams {
  double guidance_scale, guidance_rescale;
  int32_t rescale_space;
};
cudaError_t launch_rescale(const Tensors& t, const CoeffSource& coeffs, const RescaleParams& rp, const Workspace& ws,
                           cudaStream_t stream);

// The element pass.  pq (nullptr: none) overrides each sample's p, q.  noise_mode: 0 none, 1 read t.noise, 2
// Philox from seeds[batch] with (step_index, draw), each sample's elements at their places in `slice` (zsnr/philox.h:
// {n, n, 0} for the whole sample; groups whole, else cudaErrorInvalidValue).  A sample whose e is 0 draws nothing.
// t.carry_out, when given, is written for every sample (zeros where the step has no carry: g_y = g_d = 0);
// pass it only for LMS, which never draws noise (noise_mode must then be 0).
cudaError_t launch_combine(const Tensors& t, const CoeffSource& coeffs, const FoldedPQ* pq, int32_t noise_mode,
                           const uint64_t* seeds, uint32_t step_index, uint32_t draw, const NoiseSlice& slice,
                           cudaStream_t stream);

// The whole step: launch_coeffs (not in table mode), launch_rescale when guided with rescale, launch_combine (noise
// mode 1 when t.noise is given, else 2 when plan.seeds is given, else 0).  In table mode nothing is checked on the
// device (the caller computed and checked the rows) and neither ws.status nor sigma_out is written.
cudaError_t fused_step(const Tensors& t, const StepPlan& plan, const Workspace& ws, double* sigma_out,
                       cudaStream_t stream);

}  // namespace cuda
}  // namespace zsnr
