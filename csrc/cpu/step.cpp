// The fused CPU step: per-sample coefficients from the shared functions, then the kernels of the best
// instruction set this CPU has.  See step.h.
#include "step.h"

#include <vector>

namespace zsnr {
namespace cpu {

#define ZSNR_DECLARE_ISA(isa)                                                                           \
  namespace isa {                                                                                       \
  void combine(const Tensors& t, const ElemCoeffs* c, const uint64_t* seeds, uint32_t step, uint32_t draw, \
               int32_t n_hist, int32_t noise_mode);                                                     \
  void rescale_sums(const Tensors& t, int32_t with_y, double* out);                                     \
  }
ZSNR_DECLARE_ISA(base)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ZSNR_X86 1
ZSNR_DECLARE_ISA(avx2)
ZSNR_DECLARE_ISA(avx512)
#endif
#undef ZSNR_DECLARE_ISA

Isa isa() {
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

const char* isa_name() {
  switch (isa()) {
    case kIsaAvx512: return "avx512";
    case kIsaAvx2: return "avx2+fma+f16c";
    default: return "baseline";
  }
}

void rescale_sums(const Tensors& t, int32_t with_y, double* out) {
#if defined(ZSNR_X86)
  if (isa() == kIsaAvx512) return avx512::rescale_sums(t, with_y, out);
  if (isa() == kIsaAvx2) return avx2::rescale_sums(t, with_y, out);
#endif
  base::rescale_sums(t, with_y, out);
}

void combine(const Tensors& t, const ElemCoeffs* c, const uint64_t* seeds, uint32_t step_index, uint32_t draw,
             int32_t n_hist_used, int32_t noise_mode) {
#if defined(ZSNR_X86)
  if (isa() == kIsaAvx512) return avx512::combine(t, c, seeds, step_index, draw, n_hist_used, noise_mode);
  if (isa() == kIsaAvx2) return avx2::combine(t, c, seeds, step_index, draw, n_hist_used, noise_mode);
#endif
  base::combine(t, c, seeds, step_index, draw, n_hist_used, noise_mode);
}

StepOutcome fused_step(const Tensors& t, const StepPlan& plan, double* sigma_out) {
  StepOutcome r{kOk, 1, 0, 0, -1};
  if (t.batch < 1 || t.n < 1 || t.dtype < kFloat32 || t.dtype > kBFloat16 || plan.n_prev > kMaxHist ||
      (plan.n_sigma != 1 && plan.n_sigma != t.batch)) {
    r.error = kErrBadArgs;
    return r;
  }
  const int64_t ns = plan.n_sigma;
  std::vector<StepCoeffs> cs(ns);
  std::vector<double> p(ns), q(ns), u(ns, 0.0), tw(ns, 1.0);
  const bool rescale = plan.guidance_rescale != 0.0 && t.f_uncond != nullptr;
  for (int64_t i = 0; i < ns; ++i) {
    StepArgs a{};
    a.sampler = plan.sampler;
    a.stage = plan.stage;
    a.sigma = plan.sigma[i];
    a.sigma_next = plan.sigma_next[i];
    a.sigma_hat_next = plan.sigma_hat_next[i];
    a.n_prev = plan.n_prev;
    for (int k = 0; k < plan.n_prev; ++k) a.sigma_prev[k] = plan.sigma_prev[k * ns + i];
    a.eta = plan.eta;
    a.s_noise = plan.s_noise;
    a.solver_heun = plan.solver_heun;
    a.order = plan.order;
    cs[i] = step_coeffs(plan.pz, a);
    int32_t err = cs[i].error;
    if (err == kOk) err = denoise_coeffs(plan.pz, plan.sigma_eval[i], &p[i], &q[i]);
    if (err == kOk && rescale) err = rescale_space_coeffs(plan.pz, plan.sigma_eval[i], plan.rescale_space, &u[i], &tw[i]);
    if (err != kOk) {
      r.error = err;
      r.bad_sample = i;
      return r;
    }
    if (cs[i].complete != cs[0].complete) {
      r.error = kErrMixedStages;
      r.bad_sample = i;
      return r;
    }
    if (cs[i].n_hist > r.n_hist_used) r.n_hist_used = cs[i].n_hist;
    if (cs[i].e != 0.0) r.noise_used = 1;
  }
  r.complete = cs[0].complete;
  if (r.n_hist_used > t.n_hist) {
    r.error = kErrNeedsHistory;
    return r;
  }
  if (r.noise_used && t.noise == nullptr && plan.seeds == nullptr) {
    r.error = kErrNeedsNoise;
    return r;
  }
  std::vector<double> sums;
  if (rescale) {
    sums.resize(static_cast<size_t>(t.batch) * kNumSums);
    rescale_sums(t, plan.rescale_space != kSpaceOutput, sums.data());
  }
  std::vector<ElemCoeffs> ec(t.batch);
  for (int64_t b = 0; b < t.batch; ++b) {
    const int64_t i = ns == 1 ? 0 : b;
    const StepCoeffs& c = cs[i];
    double pb = p[i], qb = q[i];
    if (rescale) {
      const double f = rescale_factor(sums.data() + b * kNumSums, static_cast<double>(t.n), u[i], tw[i],
                                      plan.guidance_scale, plan.guidance_rescale);
      fold_rescale(f, u[i], tw[i], &pb, &qb);
    }
    ElemCoeffs& e = ec[b];
    e.w = static_cast<float>(plan.guidance_scale);
    e.p = static_cast<float>(pb);
    e.q = static_cast<float>(qb);
    e.a = static_cast<float>(c.a);
    e.b = static_cast<float>(c.b);
    e.e = static_cast<float>(c.e);
    for (int k = 0; k < kMaxHist; ++k) e.h[k] = k < c.n_hist ? static_cast<float>(c.h[k]) : 0.0f;
    e.g_y = c.has_carry ? static_cast<float>(c.g_y) : 0.0f;
    e.g_d = c.has_carry ? static_cast<float>(c.g_d) : 0.0f;
  }
  Tensors tt = t;
  if (!cs[0].has_carry) tt.carry_out = nullptr;
  const int32_t noise_mode = !r.noise_used ? 0 : (t.noise != nullptr ? 1 : 2);
  combine(tt, ec.data(), plan.seeds, plan.step_index, plan.draw, r.n_hist_used, noise_mode);
  for (int64_t i = 0; i < ns; ++i) sigma_out[i] = cs[i].sigma_out;
  return r;
}

}  // namespace cpu
}  // namespace zsnr
