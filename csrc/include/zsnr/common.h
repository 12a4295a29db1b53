// Shared definitions for the zsnr math headers: no PyTorch, no Python.
#pragma once

// ZSNR_HD marks every shared math function: callable from host and device code under nvcc,
// a plain inline function for the host compiler.
#if defined(__CUDACC__)
#define ZSNR_HD __host__ __device__ __forceinline__
#else
#define ZSNR_HD inline
#endif

namespace zsnr {

// The most remembered tensors (D or LMS derivatives) a step reads: the history of dpmpp_3m_sde and of lms of
// order 4.  Sizes every history array of the shared math, the launchers and the bindings.
constexpr int kMaxHistory = 3;

}  // namespace zsnr
