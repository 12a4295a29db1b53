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
#include <type_traits>
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

// ------------------------------------------------------------------------------------------- the step record
//
// A step crosses the boundary as one Python object, zsnr_kernels/backends/call.py's StepCall (a NamedTuple), whose
// fields are read here, by both modules, into the launchers' Tensors and StepPlan (zsnr/step_plan.h).  The fields, in
// the record's order (exported as STEP_CALL_FIELDS; a test checks them against the record's):
#define ZSNR_STEP_CALL_FIELDS(X)                                                                                  \
  X(dtype) X(batch) X(n) X(y) X(f_cond) X(f_uncond) X(hist) X(noise) X(y_out) X(d_out) X(carry_out)              \
  X(prediction) X(sigma_data) X(sampler) X(stage) X(solver_heun) X(order) X(eta) X(s_noise) X(guidance_scale)    \
  X(guidance_rescale) X(rescale_space) X(n_sigma) X(n_prev) X(sigmas) X(table) X(seeds) X(step_index) X(draw)    \
  X(slice_local) X(slice_total) X(slice_offset) X(workspace) X(stream)

enum class Field : int {
#define ZSNR_FIELD_ENUM(name) name,
  ZSNR_STEP_CALL_FIELDS(ZSNR_FIELD_ENUM)
#undef ZSNR_FIELD_ENUM
  count
};

constexpr const char* kFieldNames[] = {
#define ZSNR_FIELD_NAME(name) #name,
    ZSNR_STEP_CALL_FIELDS(ZSNR_FIELD_NAME)
#undef ZSNR_FIELD_NAME
};
static_assert(sizeof(kFieldNames) / sizeof(kFieldNames[0]) == static_cast<size_t>(Field::count), "one name a field");

py::tuple field_names() {
  py::tuple names(static_cast<size_t>(Field::count));
  for (int i = 0; i < static_cast<int>(Field::count); ++i) names[i] = py::str(kFieldNames[i]);
  return names;
}

// The record is a tuple (a NamedTuple) of exactly these fields: read by position.
void check_record(py::handle call) {
  if (!PyTuple_Check(call.ptr()) || PyTuple_GET_SIZE(call.ptr()) != static_cast<Py_ssize_t>(Field::count))
    throw std::invalid_argument("fused_step: the call must be a StepCall record (zsnr_kernels.backends.call) of " +
                                std::to_string(static_cast<int>(Field::count)) + " fields");
}

py::handle get(py::handle call, Field f) { return PyTuple_GET_ITEM(call.ptr(), static_cast<Py_ssize_t>(f)); }

int64_t get_int(py::handle call, Field f) {
  const py::handle v = get(call, f);
  const long long r = PyLong_AsLongLong(v.ptr());
  if (r == -1 && PyErr_Occurred()) throw py::error_already_set();
  return r;
}

double get_float(py::handle call, Field f) {
  const py::handle v = get(call, f);
  const double r = PyFloat_AsDouble(v.ptr());
  if (r == -1.0 && PyErr_Occurred()) throw py::error_already_set();
  return r;
}

// An address (a data_ptr integer; 0: none).
std::uintptr_t address(py::handle v) {
  const unsigned long long r = PyLong_AsUnsignedLongLong(v.ptr());
  if (r == static_cast<unsigned long long>(-1) && PyErr_Occurred()) throw py::error_already_set();
  return static_cast<std::uintptr_t>(r);
}

std::uintptr_t get_address(py::handle call, Field f) { return address(get(call, f)); }

// An array field of the record: an address (device memory, or host memory the caller keeps alive; 0: none), or a
// host list or tuple of numbers (the cpu module's sigmas and seeds), copied and checked for its length.
template <typename T>
class ArrayField {
 public:
  // Reads field f; a list must hold `count` values (count < 0: not checked here).
  const T* read(py::handle call, Field f, int64_t count) {
    const py::handle v = get(call, f);
    if (PyLong_Check(v.ptr())) return as_ptr<const T>(address(v));
    if (!PyList_Check(v.ptr()) && !PyTuple_Check(v.ptr()))
      throw std::invalid_argument(std::string("fused_step: ") + kFieldNames[static_cast<int>(f)] +
                                  " must be an address or a list");
    const Py_ssize_t len = PySequence_Fast_GET_SIZE(v.ptr());
    if (count >= 0 && len != count)
      throw std::invalid_argument(std::string("fused_step: ") + kFieldNames[static_cast<int>(f)] + " must hold " +
                                  std::to_string(count) + " values, got " + std::to_string(len));
    PyObject** items = PySequence_Fast_ITEMS(v.ptr());
    values_.resize(static_cast<size_t>(len));
    for (Py_ssize_t i = 0; i < len; ++i) values_[i] = item(items[i]);
    return values_.data();
  }

 private:
  static T item(PyObject* o) {
    if constexpr (std::is_floating_point<T>::value) {
      const double r = PyFloat_AsDouble(o);
      if (r == -1.0 && PyErr_Occurred()) throw py::error_already_set();
      return r;
    } else {
      const unsigned long long r = PyLong_AsUnsignedLongLong(o);
      if (r == static_cast<unsigned long long>(-1) && PyErr_Occurred()) throw py::error_already_set();
      return static_cast<T>(r);
    }
  }
  std::vector<T> values_;
};

// One step read from its record.  Sigma block layout: [sigma | sigma_eval | sigma_next | sigma_hat_next |
// sigma_prev ([n_prev][n_sigma])], each block n_sigma long (backends/call.py sigma_block); in table mode (a table
// given) the sigmas are not read and may be 0.
class Step {
 public:
  explicit Step(py::handle call) {
    check_record(call);
    t.dtype = static_cast<int32_t>(get_int(call, Field::dtype));
    t.batch = get_int(call, Field::batch);
    t.n = get_int(call, Field::n);
    t.y = as_ptr<const void>(get_address(call, Field::y));
    t.f_cond = as_ptr<const void>(get_address(call, Field::f_cond));
    t.f_uncond = as_ptr<const void>(get_address(call, Field::f_uncond));
    const py::handle hist = get(call, Field::hist);
    if (!PyTuple_Check(hist.ptr()) || PyTuple_GET_SIZE(hist.ptr()) > zsnr::kMaxHistory)
      throw std::invalid_argument("fused_step: hist must be a tuple of at most " + std::to_string(zsnr::kMaxHistory) +
                                  " addresses");
    t.n_hist = static_cast<int32_t>(PyTuple_GET_SIZE(hist.ptr()));
    for (int k = 0; k < t.n_hist; ++k) t.hist[k] = as_ptr<const void>(address(PyTuple_GET_ITEM(hist.ptr(), k)));
    t.noise = as_ptr<const void>(get_address(call, Field::noise));
    t.y_out = as_ptr<void>(get_address(call, Field::y_out));
    t.d_out = as_ptr<void>(get_address(call, Field::d_out));
    t.carry_out = as_ptr<void>(get_address(call, Field::carry_out));

    plan.pz = zsnr::Param{static_cast<int32_t>(get_int(call, Field::prediction)), get_float(call, Field::sigma_data)};
    plan.sampler = static_cast<int32_t>(get_int(call, Field::sampler));
    plan.stage = static_cast<int32_t>(get_int(call, Field::stage));
    plan.solver_heun = static_cast<int32_t>(get_int(call, Field::solver_heun));
    plan.order = static_cast<int32_t>(get_int(call, Field::order));
    plan.eta = get_float(call, Field::eta);
    plan.s_noise = get_float(call, Field::s_noise);
    plan.n_sigma = get_int(call, Field::n_sigma);
    plan.n_prev = static_cast<int32_t>(get_int(call, Field::n_prev));
    if (plan.n_sigma < 1 || plan.n_prev < 0 || plan.n_prev > zsnr::kMaxHistory)
      throw std::invalid_argument("fused_step: n_sigma must be >= 1 and n_prev in [0, " +
                                  std::to_string(zsnr::kMaxHistory) + "]");
    plan.table = table_.read(call, Field::table, plan.n_sigma * zsnr::kNumCoeffs);
    const double* s = sigmas_.read(call, Field::sigmas, plan.table != nullptr ? -1 : (4 + plan.n_prev) * plan.n_sigma);
    if (s != nullptr) {
      const int64_t ns = plan.n_sigma;
      plan.sigma = s;
      plan.sigma_eval = s + ns;
      plan.sigma_next = s + 2 * ns;
      plan.sigma_hat_next = s + 3 * ns;
      plan.sigma_prev = plan.n_prev > 0 ? s + 4 * ns : nullptr;
    } else if (plan.table == nullptr) {
      throw std::invalid_argument("fused_step: a step without a coefficient table needs its sigmas");
    }
    plan.guidance_scale = get_float(call, Field::guidance_scale);
    plan.guidance_rescale = get_float(call, Field::guidance_rescale);
    plan.rescale_space = static_cast<int32_t>(get_int(call, Field::rescale_space));
    plan.seeds = seeds_.read(call, Field::seeds, t.batch);
    plan.step_index = static_cast<uint32_t>(get_int(call, Field::step_index));
    plan.draw = static_cast<uint32_t>(get_int(call, Field::draw));
    plan.slice = zsnr::NoiseSlice{get_int(call, Field::slice_local), get_int(call, Field::slice_total),
                                  get_int(call, Field::slice_offset)};
    if (!zsnr::slice_drawable(plan.slice, t.n))
      throw std::invalid_argument("fused_step: slice_local, slice_total, slice_offset (" +
                                  std::to_string(plan.slice.local) + ", " + std::to_string(plan.slice.total) + ", " +
                                  std::to_string(plan.slice.offset) + ") do not place samples of " +
                                  std::to_string(t.n) + " elements in theirs (zsnr/philox.h NoiseSlice: multiples of "
                                  "4, or local = total dividing n and offset 0)");
    workspace = get_address(call, Field::workspace);
    stream = get_address(call, Field::stream);
  }

  zsnr::Tensors t{};
  zsnr::StepPlan plan{};
  std::uintptr_t workspace = 0, stream = 0;  // the CUDA module's

 private:
  ArrayField<double> table_, sigmas_;
  ArrayField<uint64_t> seeds_;
};

// The enum values and limits of the shared headers, as module attributes: the Python tables are checked against
// them (tests/backends/test_compiled_constants.py), never copied from here by hand.
void export_constants(py::module_& m) {
  const char* samplers[] = {"euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral",
                            "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "ddim", "ddpm", "lms"};
  static_assert(sizeof(samplers) / sizeof(samplers[0]) == zsnr::kLms + 1, "a name for every SamplerKind");
  py::dict kinds;
  for (int i = 0; i <= zsnr::kLms; ++i) kinds[samplers[i]] = i;
  m.attr("SAMPLER_KINDS") = kinds;
  py::dict pred;
  pred["v"] = static_cast<int>(zsnr::kPredV);
  pred["eps"] = static_cast<int>(zsnr::kPredEps);
  pred["x0"] = static_cast<int>(zsnr::kPredX0);
  pred["flow"] = static_cast<int>(zsnr::kPredFlow);
  m.attr("PREDICTIONS") = pred;
  py::dict space;
  space["output"] = static_cast<int>(zsnr::kSpaceOutput);
  space["v"] = static_cast<int>(zsnr::kSpaceV);
  space["x0"] = static_cast<int>(zsnr::kSpaceX0);
  m.attr("RESCALE_SPACES") = space;
  py::dict dtypes;
  dtypes["float32"] = static_cast<int>(zsnr::kFloat32);
  dtypes["float16"] = static_cast<int>(zsnr::kFloat16);
  dtypes["bfloat16"] = static_cast<int>(zsnr::kBFloat16);
  m.attr("DTYPES") = dtypes;
  py::dict errors;
  errors["ok"] = static_cast<int>(zsnr::kOk);
  errors["eps_at_inf"] = static_cast<int>(zsnr::kErrEpsAtInf);
  errors["sigma_order"] = static_cast<int>(zsnr::kErrSigmaOrder);
  errors["ddim_eta"] = static_cast<int>(zsnr::kErrDdimEta);
  errors["stage"] = static_cast<int>(zsnr::kErrStage);
  errors["churn"] = static_cast<int>(zsnr::kErrChurn);
  errors["bad_arg"] = static_cast<int>(zsnr::kErrBadArg);
  errors["needs_noise"] = static_cast<int>(zsnr::kErrNeedsNoise);
  errors["needs_history"] = static_cast<int>(zsnr::kErrNeedsHistory);
  errors["mixed_stages"] = static_cast<int>(zsnr::kErrMixedStages);
  errors["bad_args"] = static_cast<int>(zsnr::kErrBadArgs);
  m.attr("STEP_ERRORS") = errors;
  py::dict cols;
  const char* columns[] = {"W", "P", "Q", "A", "B", "H0", "H1", "H2", "E", "GY", "GD", "U", "T", "PHI", "BFU", "GFU"};
  static_assert(sizeof(columns) / sizeof(columns[0]) == zsnr::kNumColumns, "a name for every CoeffColumn");
  static_assert(zsnr::kColH0 + 3 == zsnr::kColE && zsnr::kMaxHistory == 3, "H0..H2 name the history columns");
  for (int i = 0; i < zsnr::kNumColumns; ++i) cols[columns[i]] = i;
  m.attr("COEFF_COLUMNS") = cols;
  m.attr("NUM_COEFFS") = zsnr::kNumCoeffs;
  m.attr("MAX_HISTORY") = zsnr::kMaxHistory;
  m.attr("NAN_BITS") = py::make_tuple(zsnr::kNaN32, zsnr::kNaNBFloat16, zsnr::kNaNFloat16);  // f32, bf16, f16
  m.attr("STEP_CALL_FIELDS") = field_names();
}

#ifdef ZSNR_CUDA_MODULE

// One fused CUDA step (cuda/step.cuh) from its record: device addresses for the tensors, the sigma block, the seeds
// (uint64[batch] or 0) and the table (or 0), `workspace` device memory of workspace_bytes(batch, n) bytes, zeroed
// once when allocated, and `stream` a cudaStream_t.  Returns the cudaError_t of the launches (errors of the step
// itself stay on the device; Python validated the step before calling).
int32_t cuda_fused_step(py::handle call) {
  // the kernels read these asynchronously, from device memory: a host list would be freed before they run
  for (const Field f : {Field::sigmas, Field::table, Field::seeds})
    if (!PyLong_Check(get(call, f).ptr()))
      throw std::invalid_argument(std::string("fused_step: the cuda module takes ") + kFieldNames[static_cast<int>(f)] +
                                  " as a device address (or 0), not a host list");
  const Step s(call);
  if (s.workspace == 0) throw std::invalid_argument("fused_step: the cuda module needs a workspace");
  const zsnr::cuda::Workspace ws = zsnr::cuda::workspace_carve(as_ptr<void>(s.workspace), s.t.batch, s.t.n);
  return static_cast<int32_t>(
      zsnr::cuda::fused_step(s.t, s.plan, ws, nullptr, reinterpret_cast<cudaStream_t>(s.stream)));
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

// The shared scalar definitions (zsnr/philox.h) over many counters, for the tests that check every other Philox
// against them.  One thread, no OpenMP loop: nothing in this module runs a parallel region outside the kernels'
// own pool (cpu/thread_pool.h), so a forked child may use every thread.
//
// out[4 i + k] = word k of Philox4x32-10(key, (c0_start + i mod 2^32, c1, c2, c3)), i < n.
void philox4x32(std::uintptr_t out_ptr, int64_t n, uint32_t key0, uint32_t key1, uint32_t c0_start,
                uint32_t c1, uint32_t c2, uint32_t c3) {
  uint32_t* out = as_ptr<uint32_t>(out_ptr);
  py::gil_scoped_release no_gil;
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

// One fused CPU step (cpu/step.h) from its record: host addresses for the tensors, the sigma block and seeds as
// lists (checked for length) or addresses, the table (or 0); n_sigma = 1 (shared by the batch) or batch (one per
// sample).  Returns (error, complete, bad_sample, sigma_out).
py::tuple fused_step(py::handle call) {
  const Step s(call);
  std::vector<double> sigma_out(static_cast<size_t>(s.plan.n_sigma));
  zsnr::cpu::StepOutcome r;
  {
    py::gil_scoped_release no_gil;
    r = zsnr::cpu::fused_step(s.t, s.plan, sigma_out.data());
  }
  return py::make_tuple(r.error, r.complete, r.bad_sample, sigma_out);
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
  export_constants(m);
  m.def("fused_step", &cuda_fused_step, py::arg("call"),
        "Enqueue one fused sampler step on CUDA tensors from its StepCall record (see cuda/step.cuh).");
  m.def("workspace_bytes", &zsnr::cuda::workspace_bytes, py::arg("batch"), py::arg("n"),
        "Bytes of the device workspace of a step over [batch][n] tensors.");
  m.def("device_count", &cuda_device_count, "(cudaError_t, count) of cudaGetDeviceCount.");
  m.def("error_string", &cuda_error_string, py::arg("code"), "cudaGetErrorString of a cudaError_t code.");
}

#else

PYBIND11_MODULE(_C, m) {
  m.doc() = "zsnr-kernels compiled CPU module (raw pointers; callers validate)";
  m.attr("__version__") = ZSNR_VERSION;
  export_constants(m);
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
  m.def("cpu_philox_normals", [](std::uintptr_t out_ptr, uint64_t seed, uint32_t step, uint32_t draw, int64_t n,
                                 int64_t slice_local, int64_t slice_total, int64_t slice_offset) {
          const zsnr::NoiseSlice slice = slice_local == 0 ? zsnr::NoiseSlice{n, n, 0}
                                                          : zsnr::NoiseSlice{slice_local, slice_total, slice_offset};
          if (n < 0 || !zsnr::slice_drawable(slice, n))
            throw std::invalid_argument("cpu_philox_normals: slice_local, slice_total, slice_offset must place n "
                                        "elements in the sample (zsnr/philox.h NoiseSlice: multiples of 4)");
          float* out = as_ptr<float>(out_ptr);
          py::gil_scoped_release no_gil;
          zsnr::cpu::philox_normals(seed, step, draw, slice, n, out);
        }, py::arg("out_ptr"), py::arg("seed"), py::arg("step"), py::arg("draw"), py::arg("n"),
        py::arg("slice_local") = 0, py::arg("slice_total") = 0, py::arg("slice_offset") = 0,
        "Fill float32 out[n] with the normals of one sample as the CPU element pass makes them, on this thread; with "
        "slice_local > 0, of the elements of that slice of the sample (zsnr/philox.h NoiseSlice, groups whole).");
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
          zsnr::Tensors t{};
          t.dtype = dtype;
          t.batch = batch;
          t.n = n;
          t.y = as_ptr<const void>(y);
          t.f_cond = as_ptr<const void>(f_cond);
          t.f_uncond = as_ptr<const void>(f_uncond);
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
  m.def("rescale_weights", [](double u, double t) {
          const zsnr::RescaleWeights ab = zsnr::rescale_weights(u, t);
          return py::make_tuple(ab.a, ab.b);
        }, py::arg("u"), py::arg("t"),
        "combine.h rescale_weights: the float32 weights (a, b) of y and F in G/s for G = u y + t F.");
  m.def("build_info", &build_info, "Compiler, flags and OpenMP state of this build.");
  m.def("fused_step", &fused_step, py::arg("call"),
        "One fused sampler step on CPU tensors from its StepCall record (see csrc/cpu/step.h): (error, complete, "
        "bad_sample, sigma_out).");
  m.def("set_num_threads", &zsnr::cpu::set_num_threads, py::arg("n"),
        "Threads of the CPU kernels (csrc/cpu/thread_pool.h), for every calling thread (0: OpenMP's default).");
  m.def("num_threads", &zsnr::cpu::num_threads, "Threads the CPU kernels use.");
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
