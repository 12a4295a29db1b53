// The CPU kernels for x86-64 with AVX-512 (F, BW, VL, DQ; Skylake-SP, Ice Lake, Zen 4 and later), chosen at run time by step.cpp.
// bf16 stores use AVX512-BF16 where the CPU also has it (Cooper Lake, Sapphire Rapids, Zen 4), checked at run time.
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
#define ZSNR_CPU_BF16_STORE_TILE 1  // kernels_impl.h: store_bf16 below
#include "kernels_impl.h"

namespace zsnr {
namespace cpu {
namespace avx512 {
namespace {

// VCVTNEPS2BF16 rounds to nearest even like float_to_bf16 but treats denormal inputs as zero and need not
// quiet a NaN the same way, so a vector holding a NaN or a denormal takes the portable conversion.
__attribute__((target("avx512bf16,avx512f,avx512bw,avx512vl,avx512dq")))
void store_bf16_hw(const float* src, uint16_t* dst, int64_t n) {
  constexpr int kNanOrDenormal = 0x01 | 0x20 | 0x80;  // VFPCLASSPS: quiet NaN, denormal, signalling NaN
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(src + i);
    if (_mm512_fpclass_ps_mask(v, kNanOrDenormal) != 0) {
      store_bf16_portable(src + i, dst + i, 16);
      continue;
    }
    const __m256bh h = _mm512_cvtneps_pbh(v);
    std::memcpy(dst + i, &h, sizeof h);
  }
  store_bf16_portable(src + i, dst + i, n - i);
}

}  // namespace

void store_bf16(const float* src, uint16_t* dst, int64_t n) {
  static const bool hw = __builtin_cpu_supports("avx512bf16");
  if (hw) store_bf16_hw(src, dst, n);
  else store_bf16_portable(src, dst, n);
}

}  // namespace avx512
}  // namespace cpu
}  // namespace zsnr
#endif
