// The fused CPU step: per-sample coefficients from the shared functions, then the kernels of the best
// instruction set this CPU has.  See step.h.
#include "step.h"

#include <atomic>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace zsnr {
namespace cpu {

#define ZSNR_DECLARE_ISA(isa)                                                                              \
  namespace isa {                                                                                          \
  void combine(const Tensors& t, const ElemCoeffs* c, const uint64_t* seeds, uint32_t step, uint32_t draw, \
               const NoiseSlice& slice, int32_t n_hist, int32_t noise_mode);                               \
  void rescale_sums(const Tensors& t, float w, const RescaleWeights* ab, int32_t with_y, double* out);    \
  void philox_rows(uint64_t seed, uint32_t step, uint32_t draw, uint64_t g0, int64_t ng, uint32_t* out);   \
  void philox_normals(uint64_t seed, uint32_t step, uint32_t draw, const NoiseSlice& slice, int64_t n,     \
                      float* out);                                                                         \
  void half_stores(int32_t dtype, const float* src, uint16_t* dst, int64_t n);                             \
  void half_loads(int32_t dtype, const uint16_t* src, float* dst, int64_t n);                              \
  }
ZSNR_DECLARE_ISA(base)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ZSNR_X86 1
ZSNR_DECLARE_ISA(avx2)
ZSNR_DECLARE_ISA(avx512)
#endif
#undef ZSNR_DECLARE_ISA

namespace {
std::atomic<int32_t> g_threads{0};            // 0: the default (num_threads)
std::atomic<int32_t> g_isa_cap{kIsaAvx512};  // limit_isa

Isa best_isa() {
#if defined(ZSNR_X86)
  static const Isa best = [] {
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      return kIsaAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
      return kIsaAvx2;
    return kIsaBase;
  }();
  return best;
#else
  return kIsaBase;
#endif
}
}  // namespace

void set_num_threads(int32_t n) { g_threads.store(n > 0 ? n : 0, std::memory_order_relaxed); }

int32_t num_threads() {
  const int32_t n = g_threads.load(std::memory_order_relaxed);
#if defined(_OPENMP)
  return n > 0 ? n : omp_get_max_threads();
#else
  return n > 0 ? n : 1;
#endif
}

Isa isa() {
  const int32_t cap = g_isa_cap.load(std::memory_order_relaxed);
  const Isa best = best_isa();
  return cap < best ? static_cast<Isa>(cap) : best;
}

Isa limit_isa(int32_t level) {
  g_isa_cap.store(level < 0 || level > kIsaAvx512 ? kIsaAvx512 : level, std::memory_order_relaxed);
  return isa();
}

const char* isa_name() {
  switch (isa()) {
    case kIsaAvx512: return "avx512";
    case kIsaAvx2: return "avx2+fma+f16c";
    default: return "baseline";
  }
}

// The body of a function that calls its namesake in the namespace of the instruction set isa() picks.
#if defined(ZSNR_X86)
#define ZSNR_DISPATCH(fn, ...)                           \
  switch (isa()) {                                       \
    case kIsaAvx512: return avx512::fn(__VA_ARGS__);     \
    case kIsaAvx2: return avx2::fn(__VA_ARGS__);         \
    default: return base::fn(__VA_ARGS__);               \
  }
#else
#define ZSNR_DISPATCH(fn, ...) return base::fn(__VA_ARGS__)
#endif

void rescale_sums(const Tensors& t, float w, const RescaleWeights* ab, int32_t with_y, double* out) {
  ZSNR_DISPATCH(rescale_sums, t, w, ab, with_y, out);
}

void combine(const Tensors& t, const ElemCoeffs* c, const uint64_t* seeds, uint32_t step_index, uint32_t draw,
             const NoiseSlice& slice, int32_t n_hist_used, int32_t noise_mode) {
  ZSNR_DISPATCH(combine, t, c, seeds, step_index, draw, slice, n_hist_used, noise_mode);
}

void philox_rows(uint64_t seed, uint32_t step_index, uint32_t draw, uint64_t g0, int64_t ng, uint32_t* out) {
  ZSNR_DISPATCH(philox_rows, seed, step_index, draw, g0, ng, out);
}

void philox_normals(uint64_t seed, uint32_t step_index, uint32_t draw, const NoiseSlice& slice, int64_t n,
                    float* out) {
  ZSNR_DISPATCH(philox_normals, seed, step_index, draw, slice, n, out);
}

void half_stores(int32_t dtype, const float* src, uint16_t* dst, int64_t n) {
  ZSNR_DISPATCH(half_stores, dtype, src, dst, n);
}

void half_loads(int32_t dtype, const uint16_t* src, float* dst, int64_t n) {
  ZSNR_DISPATCH(half_loads, dtype, src, dst, n);
}

#undef ZSNR_DISPATCH

StepOutcome fused_step(const Tensors& t, const StepPlan& plan, double* sigma_out) {
  StepOutcome r{kOk, 1, -1};
  if (t.batch < 1 || t.n < 1 || t.dtype < kFloat32 || t.dtype > kBFloat16 || plan.n_prev < 0 ||
      plan.n_prev > kMaxHistory || t.n_hist < 0 || t.n_hist > kMaxHistory ||
      (plan.n_sigma != 1 && plan.n_sigma != t.batch) || !slice_drawable(plan.slice, t.n)) {
    r.error = kErrBadArgs;
    return r;
  }
  const int64_t ns = plan.n_sigma;
  const bool table = plan.table != nullptr;
  const bool rescale = plan.guidance_rescale != 0.0 && t.f_uncond != nullptr;
  std::vector<SampleCoeffs> cs(ns);
  int32_t n_hist = table ? t.n_hist : 0;  // a table's rows weight exactly the tensors given
  bool noisy = false;
  for (int64_t i = 0; i < ns; ++i) {
    cs[i] = sample_coeffs(plan, i, rescale);
    if (cs[i].error != kOk) {
      r.error = cs[i].error;
      r.bad_sample = i;
      return r;
    }
    if (cs[i].complete != cs[0].complete) {
      r.error = kErrMixedStages;
      r.bad_sample = i;
      return r;
    }
    if (!table && cs[i].n_hist > n_hist) n_hist = cs[i].n_hist;
    if (cs[i].ec.e != 0.0f) noisy = true;
  }
  r.complete = cs[0].complete;
  if (n_hist > t.n_hist) {
    r.error = kErrNeedsHistory;
    return r;
  }
  if (noisy && t.noise == nullptr && plan.seeds == nullptr) {
    r.error = kErrNeedsNoise;
    return r;
  }
  if (noisy && cs[0].has_carry && t.carry_out != nullptr) {  // the element pass has no variant with both
    r.error = kErrBadArgs;
    return r;
  }
  std::vector<double> sums;
  if (rescale) {
    const int32_t with_y = plan.rescale_space != kSpaceOutput;
    std::vector<RescaleWeights> ab(with_y ? t.batch : 0);
    for (int64_t b = 0; b < static_cast<int64_t>(ab.size()); ++b) {
      const SampleCoeffs& c = cs[ns == 1 ? 0 : b];
      ab[b] = rescale_weights(c.u, c.t);
    }
    sums.resize(static_cast<size_t>(t.batch) * kNumSums);
    rescale_sums(t, cs[0].ec.w, ab.data(), with_y, sums.data());
  }
  std::vector<ElemCoeffs> ec(t.batch);
  for (int64_t b = 0; b < t.batch; ++b) {
    const SampleCoeffs& c = cs[ns == 1 ? 0 : b];
    ec[b] = c.ec;
    if (rescale) {
      double pb = c.p, qb = c.q;
      const double f = rescale_factor(sums.data() + b * kNumSums, static_cast<double>(t.n), plan.guidance_rescale);
      fold_rescale(f, c.u, c.t, &pb, &qb);
      ec[b].p = static_cast<float>(pb);
      ec[b].q = static_cast<float>(qb);
    }
  }
  Tensors tt = t;
  if (!cs[0].has_carry) tt.carry_out = nullptr;
  const int32_t noise_mode = !noisy ? 0 : (t.noise != nullptr ? 1 : 2);
  combine(tt, ec.data(), plan.seeds, plan.step_index, plan.draw, plan.slice, n_hist, noise_mode);
  for (int64_t i = 0; i < ns; ++i) sigma_out[i] = cs[i].sigma_out;
  return r;
}

}  // namespace cpu
}  // namespace zsnr
