// The CPU kernels for x86-64 with AVX2, FMA and F16C (Haswell and later), chosen at run time by step.cpp; fp16
// results are stored with F16C's VCVTPS2PH.
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
#include "zsnr/dispatch.h"
#include "zsnr/philox.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC target("avx2,fma,f16c")
#define ZSNR_CPU_ISA avx2
#define ZSNR_CPU_VEC_BITS 256  // philox_simd.h
#define ZSNR_CPU_FP16_TILES 1  // kernels_impl.h: store_fp16_tile, load_fp16_tile below
#include "kernels_impl.h"

namespace zsnr {
namespace cpu {
namespace avx2 {

// F16C's VCVTPS2PH rounds to nearest even like float_to_fp16, subnormal results included, but keeps a NaN's
// payload where float_to_fp16 gives the canonical quiet NaN: vectors holding a NaN take the portable conversion.
void store_fp16_tile(const float* src, uint16_t* dst, int64_t n) {
  store_half_vectors<kFloat16, 8>(
      src, dst, n,
      [](const float* s) {
        const __m256 v = _mm256_loadu_ps(s);
        return _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) != 0;
      },
      [](const float* s, uint16_t* d) {
        const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(d), h);
      });
}

void load_fp16_tile(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = fp16_to_float(src[i]);
}

}  // namespace avx2
}  // namespace cpu
}  // namespace zsnr
#endif
