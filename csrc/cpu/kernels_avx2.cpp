// The CPU kernels for x86-64 with AVX2, FMA and F16C (Haswell and later), chosen at run time by step.cpp.
//
// Every header with inline functions outside the ISA namespace (the standard library, the shared math) is
// included BEFORE the target pragma: those functions then keep the baseline target in every translation unit
// (one definition, safe on any CPU), and GCC inlines them into the AVX2 loops below, where they get AVX2 code.
#include <immintrin.h>
#include <math.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "step.h"
#include "zsnr/combine.h"
#include "zsnr/philox.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC target("avx2,fma,f16c")
#define ZSNR_CPU_ISA avx2
#define ZSNR_CPU_VEC_BITS 256  // philox_simd.h
#include "kernels_impl.h"
#endif
