// Shared definitions for the zsnr math headers: no PyTorch, no Python.
#pragma once

// ZSNR_HD marks every shared math function: callable from host and device code under nvcc,
// a plain inline function for the host compiler.
#if defined(__CUDACC__)
#define ZSNR_HD __host__ __device__ __forceinline__
#else
#define ZSNR_HD inline
#endif
