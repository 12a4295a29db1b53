// The CPU kernels for x86-64 with AVX2, FMA and F16C (Haswell and later), chosen at run time by step.cpp.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC target("avx2,fma,f16c")
#define ZSNR_CPU_ISA avx2
#include "kernels_impl.h"
#endif
