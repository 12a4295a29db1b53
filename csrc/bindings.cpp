// The pybind11 modules: the only C++ file that knows Python.  Compiled twice by setup.py:
//
//   zsnr_kernels._C       the CPU kernels (csrc/cpu) and test bindings of the shared headers;
//   zsnr_kernels._C_cuda  (with ZSNR_CUDA_MODULE defined, linked with csrc/cuda/step.cu and the static CUDA
//                         runtime) the CUDA launchers, so that a machine without a CUDA driver still loads _C.
//
// Functions take raw data_ptr integers and sizes.  Python (zsnr_kernels) validates every argument
// before a pointer crosses this boundary; the functions here trust them.  The GIL is released while
// a CPU loop runs (a CUDA launch only enqueues work).  No libtorch: one build serves every PyTorch version.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "zsnr/coefficients.h"
#include "zsnr/philox.h"
#include "zsnr/step_plan.h"
#ifdef ZSNR_CUDA_MODULE
#include <cuda_runtime_api.h>

#include "cuda/step.cuh"
#else
#include "cpu/step.h"
#endif

#ifndef ZSNR_VERSION
#define ZSNR_VERSION "unknown"
#endif
#ifndef ZSNR_CXX_FLAGS
#define ZSNR_CXX_FLAGS ""
#endif
#ifndef ZSNR_CUDA_ARCHS
#define ZSNR_CUDA_ARCHS ""
#endif

namespace py = pybind11;

namespace {

template <typename T>
T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// The Tensors of a step from data_ptr integers (0 for none).
zsnr::Tensors make_tensors(int32_t dtype, int64_t batch, int64_t n, std::uintptr_t y, std::uintptr_t f_cond,
                           std::uintptr_t f_uncond, const std::vector<std::uintptr_t>& hist, std::uintptr_t noise,
                           std::uintptr_t y_out, std::uintptr_t d_out, std::uintptr_t carry_out) {
  zsnr::Tensors t{};
  t.dtype = dtype;
  t.batch = batch;
  t.n = n;
  t.y = as_ptr<const void>(y);
  t.f_cond = as_ptr<const void>(f_cond);
  t.f_uncond = as_ptr<const void>(f_uncond);
  t.n_hist = static_cast<int32_t>(hist.size() < zsnr::kMaxHist ? hist.size() : zsnr::kMaxHist);
  for (int k = 0; k < t.n_hist; ++k) t.hist[k] = as_ptr<const void>(hist[k]);
  t.noise = as_ptr<const void>(noise);
  t.y_out = as_ptr<void>(y_out);
  t.d_out = as_ptr<void>(d_out);
  t.carry_out = as_ptr<void>(carry_out);
  return t;
}

// The StepPlan of a step, less its sigma and seed arrays (host arrays on the CPU, device arrays for CUDA).
zsnr::StepPlan make_plan(int32_t prediction, double sigma_data, int32_t sampler, int32_t stage, int32_t solver_heun,
                         int32_t order, double eta, double s_noise, int32_t n_prev, double guidance_scale,
                         double guidance_rescale, int32_t rescale_space, uint32_t step_index, uint32_t draw) {
  zsnr::StepPlan plan{};
  plan.pz = zsnr::Param{prediction, sigma_data};
  plan.sampler = sampler;
  plan.stage = stage;
  plan.solver_heun = solver_heun;
  plan.order = order;
  plan.n_prev = n_prev;
  plan.eta = eta;
  plan.s_noise = s_noise;
  plan.guidance_scale = guidance_scale;
  plan.guidance_rescale = guidance_rescale;
  plan.rescale_space = rescale_space;
  plan.step_index = step_index;
  plan.draw = draw;
  return plan;
}

// Points a plan's sigma arrays into one block [sigma | sigma_eval | sigma_next | sigma_hat_next | sigma_prev
// ([n_prev][n_sigma])], each n_sigma long: the layout both fused_step bindings take (a host array on the CPU, a
// device array for CUDA).
void set_sigmas(zsnr::StepPlan& plan, const double* s, int64_t n_sigma) {
  plan.n_sigma = n_sigma;
  plan.sigma = s;
  plan.sigma_eval = s + n_sigma;
  plan.sigma_next = s + 2 * n_sigma;
  plan.sigma_hat_next = s + 3 * n_sigma;
  plan.sigma_prev = plan.n_prev > 0 ? s + 4 * n_sigma : nullptr;
}

#ifdef ZSNR_CUDA_MODULE

// One fused CUDA step (cuda/step.cuh), enqueued on `stream` (a cudaStream_t as an integer).  `sigmas` is a
// device float64 array [sigma | sigma_eval | sigma_next | sigma_hat_next | sigma_prev ([n_prev][n_sigma])], each
// block n_sigma long; `seeds` a device uint64[batch] array or 0; `workspace` device memory of
// cuda_workspace_bytes(batch, n) bytes, zeroed once when allocated.  Returns the cudaError_t of the launches
// (errors of the step itself stay on the device; Python validated the step before calling).
int32_t cuda_fused_step(int32_t dtype, int64_t batch, int64_t n, std::uintptr_t y, std::uintptr_t f_cond,
                        std::uintptr_t f_uncond, const std::vector<std::uintptr_t>& hist, std::uintptr_t noise,
                        std::uintptr_t y_out, std::uintptr_t d_out, std::uintptr_t carry_out, int32_t prediction,
                        double sigma_data, int32_t sampler, int32_t stage, int32_t solver_heun, int32_t order,
                        double eta, double s_noise, std::uintptr_t sigmas, int64_t n_sigma, int32_t n_prev,
                        double guidance_scale, double guidance_rescale, int32_t rescale_space, std::uintptr_t seeds,
                        uint32_t step_index, uint32_t draw, std::uintptr_t workspace, std::uintptr_t stream) {
  const zsnr::Tensors t = make_tensors(dtype, batch, n, y, f_cond, f_uncond, hist, noise, y_out, d_out, carry_out);
  zsnr::StepPlan plan = make_plan(prediction, sigma_data, sampler, stage, solver_heun, order, eta, s_noise, n_prev,
                                  guidance_scale, guidance_rescale, rescale_space, step_index, draw);
  set_sigmas(plan, as_ptr<const double>(sigmas), n_sigma);
  plan.seeds = as_ptr<const uint64_t>(seeds);
  const zsnr::cuda::Workspace ws = zsnr::cuda::workspace_carve(as_ptr<void>(workspace), batch, n);
  return static_cast<int32_t>(
      zsnr::cuda::fused_step(t, plan, ws, nullptr, reinterpret_cast<cudaStream_t>(stream)));
}

// (error code, device count): cudaGetDeviceCount, which fails without a driver or a device.
py::tuple cuda_device_count() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  return py::make_tuple(static_cast<int32_t>(err), count);
}

std::string cuda_error_string(int32_t code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

#else

// The test entry points on 16-bit storage take only the float16 and bfloat16 codes.
void check_half_dtype(const char* fn, int32_t dtype) {
  if (dtype != zsnr::kFloat16 && dtype != zsnr::kBFloat16)
    throw std::invalid_argument(std::string(fn) + ": dtype must be the float16 or bfloat16 code");
}

// out[4 i + k] = word k of Philox4x32-10(key, (c0_start + i mod 2^32, c1, c2, c3)), i < n.
void philox4x32(std::uintptr_t out_ptr, int64_t n, uint32_t key0, uint32_t key1, uint32_t c0_start,
                uint32_t c1, uint32_t c2, uint32_t c3) {
  uint32_t* out = as_ptr<uint32_t>(out_ptr);
  py::gil_scoped_release no_gil;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t c0 = c0_start + static_cast<uint32_t>(i);
    const zsnr::U32x4 x = zsnr::philox4x32_10(key0, key1, zsnr::U32x4{c0, c1, c2, c3});
    uint32_t* o = out + 4 * i;
    o[0] = x.x;
    o[1] = x.y;
    o[2] = x.z;
    o[3] = x.w;
  }
}

// out[b, j] (float32, row-major [batch, n_per_sample]) = noise of element j of sample b, whose
// seed is seeds[b] (uint64), at (step, draw): docs/design.md §2.8.
void philox_normal(std::uintptr_t out_ptr, int64_t batch, int64_t n_per_sample,
                   std::uintptr_t seeds_ptr, uint32_t step, uint32_t draw) {
  float* out = as_ptr<float>(out_ptr);
  const uint64_t* seeds = as_ptr<const uint64_t>(seeds_ptr);
  const int64_t groups = (n_per_sample + 3) / 4;  // groups of four elements per sample
  py::gil_scoped_release no_gil;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < batch * groups; ++t) {
    const int64_t b = t / groups;
    const int64_t g = t - b * groups;
    const uint64_t seed = seeds[b];
    float n[4];
    zsnr::philox_normal4(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), step,
                         draw, static_cast<uint64_t>(g), n);
    float* o = out + b * n_per_sample + 4 * g;
    const int64_t count = n_per_sample - 4 * g < 4 ? n_per_sample - 4 * g : 4;
    for (int64_t k = 0; k < count; ++k) o[k] = n[k];
  }
}

// One fused CPU step (cpu/step.h).  Pointers are data_ptr integers (0 for none); `sigmas` is the block of
// set_sigmas, n_sigma = 1 (shared by the batch) or batch (one per sample).  Returns (error, complete,
// noise_used, n_hist_used, bad_sample, sigma_out).
py::tuple fused_step(int32_t dtype, int64_t batch, int64_t n, std::uintptr_t y, std::uintptr_t f_cond,
                     std::uintptr_t f_uncond, const std::vector<std::uintptr_t>& hist, std::uintptr_t noise,
                     std::uintptr_t y_out, std::uintptr_t d_out, std::uintptr_t carry_out, int32_t prediction,
                     double sigma_data, int32_t sampler, int32_t stage, int32_t solver_heun, int32_t order,
                     double eta, double s_noise, const std::vector<double>& sigmas, int64_t n_sigma,
                     int32_t n_prev, double guidance_scale, double guidance_rescale, int32_t rescale_space,
                     const std::vector<uint64_t>& seeds, uint32_t step_index, uint32_t draw) {
  const zsnr::Tensors t = make_tensors(dtype, batch, n, y, f_cond, f_uncond, hist, noise, y_out, d_out, carry_out);
  zsnr::StepPlan plan = make_plan(prediction, sigma_data, sampler, stage, solver_heun, order, eta, s_noise, n_prev,
                                  guidance_scale, guidance_rescale, rescale_space, step_index, draw);
  if (n_sigma < 1 || n_prev < 0 || static_cast<int64_t>(sigmas.size()) != (4 + n_prev) * n_sigma)
    throw std::invalid_argument("fused_step: sigmas must hold (4 + n_prev) * n_sigma values");
  if (!seeds.empty() && static_cast<int64_t>(seeds.size()) != batch)
    throw std::invalid_argument("fused_step: seeds must hold one seed per sample (or none)");
  set_sigmas(plan, sigmas.data(), n_sigma);
  plan.seeds = seeds.empty() ? nullptr : seeds.data();
  std::vector<double> sigma_out(static_cast<size_t>(n_sigma));
  zsnr::cpu::StepOutcome r;
  {
    py::gil_scoped_release no_gil;
    r = zsnr::cpu::fused_step(t, plan, sigma_out.data());
  }
  return py::make_tuple(r.error, r.complete, r.noise_used, r.n_hist_used, r.bad_sample, sigma_out);
}

// ---- test bindings of the shared coefficient functions (zsnr/coefficients.h), plain Python numbers.

// zsnr::step_coeffs for one sample; a dict with every StepCoeffs field (h: the n_hist used entries).
py::dict coeffs_step(int32_t prediction, double sigma_data, int32_t sampler, int32_t stage, double sigma,
                     double sigma_next, double sigma_hat_next, const std::vector<double>& sigma_prev,
                     double eta, double s_noise, int32_t solver_heun, int32_t order) {
  zsnr::StepArgs a{};
  a.sampler = sampler;
  a.stage = stage;
  a.sigma = sigma;
  a.sigma_next = sigma_next;
  a.sigma_hat_next = sigma_hat_next;
  a.n_prev = static_cast<int32_t>(sigma_prev.size() < zsnr::kMaxHistory ? sigma_prev.size()
                                                                         : zsnr::kMaxHistory);
  for (int32_t k = 0; k < a.n_prev; ++k) a.sigma_prev[k] = sigma_prev[k];
  a.eta = eta;
  a.s_noise = s_noise;
  a.solver_heun = solver_heun;
  a.order = order;
  const zsnr::StepCoeffs c = zsnr::step_coeffs(zsnr::Param{prediction, sigma_data}, a);
  py::dict out;
  out["a"] = c.a;
  out["b"] = c.b;
  py::list h;
  for (int32_t k = 0; k < c.n_hist && k < zsnr::kMaxHistory; ++k) h.append(c.h[k]);
  out["h"] = h;
  out["e"] = c.e;
  out["sigma_out"] = c.sigma_out;
  out["n_hist"] = c.n_hist;
  out["complete"] = c.complete != 0;
  out["has_carry"] = c.has_carry != 0;
  out["g_y"] = c.g_y;
  out["g_d"] = c.g_d;
  out["error"] = c.error;
  return out;
}

// (error, p, q) of zsnr::denoise_coeffs.
py::tuple coeffs_denoise(int32_t prediction, double sigma_data, double sigma) {
  double p = 0.0, q = 0.0;
  const int32_t err = zsnr::denoise_coeffs(zsnr::Param{prediction, sigma_data}, sigma, &p, &q);
  return py::make_tuple(err, p, q);
}

// (error, u, t) of zsnr::rescale_space_coeffs.
py::tuple coeffs_rescale_space(int32_t prediction, double sigma_data, double sigma, int32_t space) {
  double u = 0.0, t = 0.0;
  const int32_t err =
      zsnr::rescale_space_coeffs(zsnr::Param{prediction, sigma_data}, sigma, space, &u, &t);
  return py::make_tuple(err, u, t);
}

double coeffs_quantize_sigma(double sigma, const std::vector<double>& table, bool log_space) {
  return zsnr::quantize_sigma(sigma, table.data(), static_cast<int64_t>(table.size()),
                              log_space ? 1 : 0);
}

py::dict build_info() {
  py::dict info;
#if defined(__clang__)
  info["compiler"] = "clang " __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = "gcc " __VERSION__;
#elif defined(_MSC_VER)
  info["compiler"] = "msvc " + std::to_string(_MSC_VER);
#else
  info["compiler"] = "unknown";
#endif
  info["flags"] = ZSNR_CXX_FLAGS;
#if defined(_OPENMP)
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["version"] = ZSNR_VERSION;
  return info;
}

#endif  // ZSNR_CUDA_MODULE

}  // namespace

#ifdef ZSNR_CUDA_MODULE

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "zsnr-kernels compiled CUDA module (raw device pointers and a stream; callers validate)";
  m.attr("__version__") = ZSNR_VERSION;
  m.attr("cuda_runtime_version") = CUDART_VERSION;
  m.attr("archs") = ZSNR_CUDA_ARCHS;  // "80;90": SASS for each, PTX of the last (setup.py)
  m.def("fused_step", &cuda_fused_step, "Enqueue one fused sampler step on CUDA tensors (see cuda/step.cuh).");
  m.def("workspace_bytes", &zsnr::cuda::workspace_bytes, py::arg("batch"), py::arg("n"),
        "Bytes of the device workspace of a step over [batch][n] tensors.");
  m.def("device_count", &cuda_device_count, "(cudaError_t, count) of cudaGetDeviceCount.");
  m.def("error_string", &cuda_error_string, py::arg("code"), "cudaGetErrorString of a cudaError_t code.");
}

#else

PYBIND11_MODULE(_C, m) {
  m.doc() = "zsnr-kernels compiled CPU module (raw pointers; callers validate)";
  m.attr("__version__") = ZSNR_VERSION;
  m.def("philox4x32", &philox4x32, py::arg("out_ptr"), py::arg("n"), py::arg("key0"),
        py::arg("key1"), py::arg("c0_start"), py::arg("c1"), py::arg("c2"), py::arg("c3"),
        "Fill uint32 out[n, 4] with Philox4x32-10(key, (c0_start + i mod 2**32, c1, c2, c3)).");
  m.def("philox_normal", &philox_normal, py::arg("out_ptr"), py::arg("batch"),
        py::arg("n_per_sample"), py::arg("seeds_ptr"), py::arg("step"), py::arg("draw"),
        "Fill float32 out[batch, n_per_sample] with the docs/design.md §2.8 normals; seeds: uint64[batch].");
  m.def("cpu_philox_rows", [](std::uintptr_t out_ptr, uint64_t seed, uint32_t step, uint32_t draw, uint64_t g0,
                              int64_t ng) {
          uint32_t* out = as_ptr<uint32_t>(out_ptr);
          py::gil_scoped_release no_gil;
          zsnr::cpu::philox_rows(seed, step, draw, g0, ng, out);
        }, py::arg("out_ptr"), py::arg("seed"), py::arg("step"), py::arg("draw"), py::arg("g0"), py::arg("ng"),
        "Fill uint32 out[ng, 4] with the Philox words of groups g0.. as the CPU element pass makes them (tests).");
  m.def("cpu_philox_normals", [](std::uintptr_t out_ptr, uint64_t seed, uint32_t step, uint32_t draw, int64_t n) {
          float* out = as_ptr<float>(out_ptr);
          py::gil_scoped_release no_gil;
          zsnr::cpu::philox_normals(seed, step, draw, n, out);
        }, py::arg("out_ptr"), py::arg("seed"), py::arg("step"), py::arg("draw"), py::arg("n"),
        "Fill float32 out[n] with the normals of one sample as the CPU element pass makes them, on this thread.");
  m.def("cpu_half_stores", [](int32_t dtype, std::uintptr_t src, std::uintptr_t dst, int64_t n) {
          check_half_dtype("cpu_half_stores", dtype);
          py::gil_scoped_release no_gil;
          zsnr::cpu::half_stores(dtype, as_ptr<const float>(src), as_ptr<uint16_t>(dst), n);
        }, py::arg("dtype"), py::arg("src"), py::arg("dst"), py::arg("n"),
        "float16 or bfloat16 dst[n] from float32 src[n], rounded as the element pass stores them (tests).");
  m.def("cpu_half_loads", [](int32_t dtype, std::uintptr_t src, std::uintptr_t dst, int64_t n) {
          check_half_dtype("cpu_half_loads", dtype);
          py::gil_scoped_release no_gil;
          zsnr::cpu::half_loads(dtype, as_ptr<const uint16_t>(src), as_ptr<float>(dst), n);
        }, py::arg("dtype"), py::arg("src"), py::arg("dst"), py::arg("n"),
        "float32 dst[n] from float16 or bfloat16 src[n], as the element pass loads them (tests).");
  m.def("cpu_rescale_sums", [](int32_t dtype, int64_t batch, int64_t n, std::uintptr_t f_cond,
                               std::uintptr_t f_uncond, std::uintptr_t y, int32_t with_y, double w,
                               const std::vector<double>& u, const std::vector<double>& t_) {
          if (dtype < zsnr::kFloat32 || dtype > zsnr::kBFloat16 || batch < 1 || n < 1)
            throw std::invalid_argument("cpu_rescale_sums: dtype code, batch or n out of range");
          if (static_cast<int64_t>(u.size()) != batch || static_cast<int64_t>(t_.size()) != batch)
            throw std::invalid_argument("cpu_rescale_sums: u and t must hold one value per sample");
          const zsnr::Tensors t = make_tensors(dtype, batch, n, y, f_cond, f_uncond, {}, 0, 0, 0, 0);
          std::vector<zsnr::RescaleWeights> ab(static_cast<size_t>(batch));
          for (int64_t b = 0; b < batch; ++b) ab[b] = zsnr::rescale_weights(u[b], t_[b]);
          std::vector<double> out(static_cast<size_t>(batch) * zsnr::kNumSums);
          {
            py::gil_scoped_release no_gil;
            zsnr::cpu::rescale_sums(t, static_cast<float>(w), ab.data(), with_y, out.data());
          }
          return out;
        }, py::arg("dtype"), py::arg("batch"), py::arg("n"), py::arg("f_cond"), py::arg("f_uncond"), py::arg("y"),
        py::arg("with_y"), py::arg("w"), py::arg("u"), py::arg("t"),
        "The statistics pass of the guidance rescale: per sample the sums of combine.h's RescaleSum order, with "
        "guidance scale w (rounded to float) and G = u[b] y + t[b] F (combine.h rescale_weights; read when "
        "with_y) (tests).");
  m.def("build_info", &build_info, "Compiler, flags and OpenMP state of this build.");
  m.def("fused_step", &fused_step, "One fused sampler step on CPU tensors (see csrc/cpu/step.h).");
  m.def("set_num_threads", &zsnr::cpu::set_num_threads, py::arg("n"),
        "OpenMP threads of the CPU kernels, for every calling thread (0: OpenMP's default).");
  m.def("num_threads", &zsnr::cpu::num_threads, "OpenMP threads the CPU kernels use.");
  m.def("cpu_isa", []() { return std::string(zsnr::cpu::isa_name()); },
        "The instruction set the CPU kernels use on this machine.");
  m.def("cpu_limit_isa", [](int32_t level) {
          zsnr::cpu::limit_isa(level);
          return std::string(zsnr::cpu::isa_name());
        }, py::arg("level"),
        "Cap the CPU kernels' instruction set at level (0 baseline, 1 avx2, 2 avx512; -1 removes the cap); "
        "returns the one now used (tests).");
  m.def("step_coeffs", &coeffs_step, py::arg("prediction"), py::arg("sigma_data"), py::arg("sampler"),
        py::arg("stage"), py::arg("sigma"), py::arg("sigma_next"), py::arg("sigma_hat_next"),
        py::arg("sigma_prev"), py::arg("eta"), py::arg("s_noise"), py::arg("solver_heun"),
        py::arg("order"), "zsnr::step_coeffs of one sample as a dict (tests; codes as in coefficients.h).");
  m.def("denoise_coeffs", &coeffs_denoise, py::arg("prediction"), py::arg("sigma_data"),
        py::arg("sigma"), "(error, p, q) of zsnr::denoise_coeffs: D = p*y + q*F.");
  m.def("rescale_space_coeffs", &coeffs_rescale_space, py::arg("prediction"), py::arg("sigma_data"),
        py::arg("sigma"), py::arg("space"), "(error, u, t) of zsnr::rescale_space_coeffs.");
  m.def("quantize_sigma", &coeffs_quantize_sigma, py::arg("sigma"), py::arg("table"),
        py::arg("log_space"), "zsnr::quantize_sigma: nearest finite positive table entry.");
  m.def("churn_gamma", &zsnr::churn_gamma, py::arg("sigma"), py::arg("num_steps"), py::arg("s_churn"),
        py::arg("s_tmin"), py::arg("s_tmax"), "zsnr::churn_gamma: EDM churn gamma of one step.");
}

#endif  // ZSNR_CUDA_MODULE
