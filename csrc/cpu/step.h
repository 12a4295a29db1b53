// The fused CPU step: launcher API (raw pointers and sizes, an error code back).  No PyTorch, no Python.
//
// A step is two passes at most: the rescale statistics (only with guidance rescale) and one element pass
// that reads y, F_c (, F_u) and the remembered tensors and writes y_out (, D, carry).  Per-sample step
// coefficients are computed here, on the host, by the shared functions of zsnr/coefficients.h, or read from the
// plan's coefficient table (zsnr/step_plan.h, table mode).
#pragma once

#include <cstdint>

#include "zsnr/step_plan.h"

namespace zsnr {
namespace cpu {

// What the step produced: whether it failed, and whether it is complete (the noise levels go to sigma_out).
struct StepOutcome {
  int32_t error;                 // kOk, a CoeffError or a StepError
  int32_t complete;              // 1 in table mode
  int64_t bad_sample;            // the sample whose coefficients failed, or -1
};

// Runs one fused step.  sigma_out[n_sigma] receives the noise level of y_out (NaN in table mode, whose rows do
// not hold it).  The GIL-free, thread-safe entry point: it allocates only per-sample arrays, never a temporary
// the size of the latent.
StepOutcome fused_step(const Tensors& t, const StepPlan& plan, double* sigma_out);

// Per-sample rescale sums (combine.h's RescaleSum order) of G_c/s and G/s: out[b * kNumSums + k].  w is the
// guidance scale; ab[batch] holds each sample's weights of y and F (combine.h rescale_weights), read only when
// with_y (the `x0` and `v` spaces; without y, ab may be nullptr).
void rescale_sums(const Tensors& t, float w, const RescaleWeights* ab, int32_t with_y, double* out);

// The element pass with ready per-sample coefficients c[batch]; Philox noise (noise_mode 2) of each sample's elements
// at their places in `slice` (zsnr/philox.h; groups whole).
void combine(const Tensors& t, const ElemCoeffs* c, const uint64_t* seeds, uint32_t step_index, uint32_t draw,
             const NoiseSlice& slice, int32_t n_hist_used, int32_t noise_mode);

// The Philox words of groups [g0, g0 + ng) of the sample with `seed` (docs/design.md §2.8), as the element pass makes
// them: out[4 * i + k] = word k of group g0 + i (tests check them against the shared scalar definition).
void philox_rows(uint64_t seed, uint32_t step_index, uint32_t draw, uint64_t g0, int64_t ng, uint32_t* out);

// The normals of elements [0, n) of that sample's `slice` (zsnr/philox.h; {n, n, 0}: the sample itself), as the
// element pass makes them, on the calling thread (tests, the benchmark's measure of the noise cost per element, and
// zsnr_kernels.distributed's explicit noise).
void philox_normals(uint64_t seed, uint32_t step_index, uint32_t draw, const NoiseSlice& slice, int64_t n,
                    float* out);

// dst[i] = src[i] rounded to float16 (dtype kFloat16) or bfloat16 (kBFloat16) as the element pass stores it
// (tests: every instruction set rounds alike).
void half_stores(int32_t dtype, const float* src, uint16_t* dst, int64_t n);
// dst[i] = src[i] (float16 or bfloat16) as a float, as the element pass loads it.
void half_loads(int32_t dtype, const uint16_t* src, float* dst, int64_t n);

// The threads of the element and statistics passes (thread_pool.h: the caller and up to n - 1 pool threads):
// set_num_threads(n >= 1) for every calling thread, 0 restores the default, OpenMP's omp_get_max_threads() (what
// OMP_NUM_THREADS sets; 1 in a build without OpenMP).  Results do not depend on it (fixed chunks).
void set_num_threads(int32_t n);
int32_t num_threads();

// The instruction set the kernels run with: the best one compiled in and supported by this CPU, unless
// limit_isa lowered it.  limit_isa(level) caps the choice at `level` for every thread (the tests run each
// instruction set's code on one machine; results agree bit for bit across them) and returns the set now used;
// a negative level removes the cap.
enum Isa : int32_t { kIsaBase = 0, kIsaAvx2 = 1, kIsaAvx512 = 2 };
Isa isa();
const char* isa_name();
Isa limit_isa(int32_t level);

}  // namespace cpu
}  // namespace zsnr
