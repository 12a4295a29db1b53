// pybind11 module zsnr_kernels._C: the only C++ file that knows Python.
//
// Functions take raw data_ptr integers and sizes.  Python (zsnr_kernels) validates every argument
// before a pointer crosses this boundary; the functions here trust them.  The GIL is released while
// a loop runs.  No libtorch: one build serves every PyTorch version.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "zsnr/philox.h"

#ifndef ZSNR_VERSION
#define ZSNR_VERSION "unknown"
#endif
#ifndef ZSNR_CXX_FLAGS
#define ZSNR_CXX_FLAGS ""
#endif

namespace py = pybind11;

namespace {

template <typename T>
T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
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
// seed is seeds[b] (uint64), at (step, draw): DESIGN.md 2.8.
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
  info["cuda"] = false;
  info["version"] = ZSNR_VERSION;
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "zsnr-kernels compiled CPU module (raw pointers; callers validate)";
  m.attr("__version__") = ZSNR_VERSION;
  m.def("philox4x32", &philox4x32, py::arg("out_ptr"), py::arg("n"), py::arg("key0"),
        py::arg("key1"), py::arg("c0_start"), py::arg("c1"), py::arg("c2"), py::arg("c3"),
        "Fill uint32 out[n, 4] with Philox4x32-10(key, (c0_start + i mod 2**32, c1, c2, c3)).");
  m.def("philox_normal", &philox_normal, py::arg("out_ptr"), py::arg("batch"),
        py::arg("n_per_sample"), py::arg("seeds_ptr"), py::arg("step"), py::arg("draw"),
        "Fill float32 out[batch, n_per_sample] with the DESIGN 2.8 normals; seeds: uint64[batch].");
  m.def("build_info", &build_info, "Compiler, flags and OpenMP state of this build.");
}
