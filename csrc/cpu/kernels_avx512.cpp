// The CPU kernels for x86-64 with AVX-512 (F, BW, VL, DQ; Skylake-SP, Ice Lake, Zen 4 and later), chosen at run time by step.cpp.
//
// Every header with inline functions outside the ISA namespace (the standard library, the shared math) is
// included BEFORE the target pragma: those functions then keep the baseline target in every translation unit
// (one definition, safe on any CPU), and GCC inlines them into the AVX-512 loops below, where they get AVX-512 code.
// GCC 12's AVX-512 intrinsics read a deliberately uninitialised vector (_mm512_undefined_epi32) and -Wall reports
// it where they are inlined (GCC bug 105593); the silence covers the intrinsics header's lines only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#include <math.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "step.h"
#include "zsnr/combine.h"
#include "zsnr/philox.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")
#define ZSNR_CPU_ISA avx512
#define ZSNR_CPU_VEC_BITS 512  // philox_simd.h
#include "kernels_impl.h"
#endif
