// The CPU kernels for x86-64 with AVX2, FMA and F16C (Haswell and later), chosen at run time by step.cpp; fp16
// results are stored with F16C's VCVTPS2PH, bf16 results by integer rounding in vectors.
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
#include "thread_pool.h"
#include "zsnr/combine.h"
#include "zsnr/dispatch.h"
#include "zsnr/philox.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC target("avx2,fma,f16c")
#define ZSNR_CPU_ISA avx2
#define ZSNR_CPU_VEC_BITS 256  // philox_simd.h
#define ZSNR_CPU_FP16_TILES 1  // kernels_impl.h: store_fp16_tile, load_fp16_tile below
#define ZSNR_CPU_BF16_STORE_TILE 1  // kernels_impl.h: store_bf16_tile below
#define ZSNR_CPU_HALF_BLOCK_SUMS 1  // kernels_impl.h: half_block_sums below
#include "kernels_impl.h"

namespace zsnr {
namespace cpu {
namespace avx2 {

// float_to_bf16 in integer arithmetic, 16 floats at a time (AVX2 has no bf16 conversion): round to nearest even
// by adding 0x7fff plus the lowest kept bit and shifting, which is exact for every float but NaN, denormals
// included; a vector holding a NaN takes the portable conversion (the payload's high half, quieted), as does the
// tail.
// NOTE: measured on the 2-core build machine (AMD EPYC, 32 MiB L3, the AVX2 code), a bf16 Euler step in place at
// the (1,16,21,60,104) latent, 2 threads: without this tile (float_to_bf16 inline in the element loop) 368 us
// against fp32's 200 us; with it 225 us (fp32 130-180 us: both L3-resident when repeated), and 0.75-0.81x the
// fp32 time with 64 MiB written between calls.  A NaN select in vectors (blend of the quieted NaN) instead of
// the per-vector NaN test was 10% slower.
namespace {
inline __m256i bf16_rounded(__m256i bits) {
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), lsb), 16);
}
}  // namespace

namespace {
// 8 fp16 or bf16 values as floats, exactly (a bf16 is the high half of a float; VCVTPH2PS converts every fp16).
template <int32_t DT>
inline __m256 widen(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (DT == kBFloat16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  else return _mm256_cvtph_ps(h);
}

// lanes[0..7] += the 8 floats of v, in double (block_sums's lane accumulators).
inline void add_lanes(__m256 v, double* lanes) {
  const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
  _mm256_storeu_pd(lanes, _mm256_add_pd(_mm256_loadu_pd(lanes), lo));
  _mm256_storeu_pd(lanes + 4, _mm256_add_pd(_mm256_loadu_pd(lanes + 4), hi));
}
}  // namespace

// kernels_impl.h's block_sums loop for one whole fp16 or bf16 block, as kernels_avx512.cpp's: lane l of each sum in
// lane l of a pair of registers (lanes 0-7, 8-15), combine.h's rescale_terms with each product rounded before it is
// added (no FMA), the block's lane sums added to the double lane accumulators as the loop adds them.
// NOTE: measured on the 2-core build machine (AMD EPYC, the AVX2 code, 1 thread, bf16 guided and rescaled Euler in
// place at the video latent, the build before and this one in alternating processes): 1338-1407 us -> 1155-1254 us
// with the latent in L3, 1513-1534 -> 1373-1402 us after a 64 MiB write (GCC's vectorisation of the generic loop
// widened each input twice).
template <int32_t DT, bool WithY>
void half_block_sums(const uint16_t* fc, const uint16_t* fu, const uint16_t* y, const RescaleSample& p,
                     double* lanes) {
  const __m256 pc = _mm256_set1_ps(p.c), pu = _mm256_set1_ps(p.u), pd = _mm256_set1_ps(p.d);
  const __m256 py = _mm256_set1_ps(p.y), w = _mm256_set1_ps(p.w);
  const __m256 wa = _mm256_set1_ps(p.a), wb = _mm256_set1_ps(p.b);
  __m256 s[kNumSums][2];
  for (int k = 0; k < kNumSums; ++k) s[k][0] = s[k][1] = _mm256_setzero_ps();
  for (int64_t i = 0; i < kSumBlock; i += kLanes) {
    for (int half = 0; half < 2; ++half) {
      const int64_t j = i + 8 * half;
      const __m256 vc = widen<DT>(fc + j), vu = widen<DT>(fu + j);
      __m256 c = _mm256_sub_ps(vc, pc);
      __m256 g = _mm256_add_ps(_mm256_sub_ps(vu, pu),
                               _mm256_mul_ps(w, _mm256_sub_ps(_mm256_sub_ps(vc, vu), pd)));
      if constexpr (WithY) {
        const __m256 e = _mm256_mul_ps(wa, _mm256_sub_ps(widen<DT>(y + j), py));
        c = _mm256_add_ps(_mm256_mul_ps(wb, c), e);
        g = _mm256_add_ps(_mm256_mul_ps(wb, g), e);
      }
      s[kSumC][half] = _mm256_add_ps(s[kSumC][half], c);
      s[kSumCC][half] = _mm256_add_ps(s[kSumCC][half], _mm256_mul_ps(c, c));
      s[kSumG][half] = _mm256_add_ps(s[kSumG][half], g);
      s[kSumGG][half] = _mm256_add_ps(s[kSumGG][half], _mm256_mul_ps(g, g));
    }
  }
  for (int k = 0; k < kNumSums; ++k) {
    add_lanes(s[k][0], lanes + k * kLanes);
    add_lanes(s[k][1], lanes + k * kLanes + 8);
  }
}
template void half_block_sums<kFloat16, false>(const uint16_t*, const uint16_t*, const uint16_t*,
                                               const RescaleSample&, double*);
template void half_block_sums<kFloat16, true>(const uint16_t*, const uint16_t*, const uint16_t*,
                                              const RescaleSample&, double*);
template void half_block_sums<kBFloat16, false>(const uint16_t*, const uint16_t*, const uint16_t*,
                                                const RescaleSample&, double*);
template void half_block_sums<kBFloat16, true>(const uint16_t*, const uint16_t*, const uint16_t*,
                                               const RescaleSample&, double*);

void store_bf16_tile(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 a = _mm256_loadu_ps(src + i), b = _mm256_loadu_ps(src + i + 8);
    const __m256 nan = _mm256_or_ps(_mm256_cmp_ps(a, a, _CMP_UNORD_Q), _mm256_cmp_ps(b, b, _CMP_UNORD_Q));
    if (_mm256_movemask_ps(nan) != 0) {
      store_half_portable<kBFloat16>(src + i, dst + i, 16);
      continue;
    }
    // VPACKUSDW packs within 128-bit lanes (a0-3 b0-3 a4-7 b4-7; every value is below 2^16, none saturates):
    // 64-bit blocks 0 2 1 3 put them in order
    const __m256i h =
        _mm256_packus_epi32(bf16_rounded(_mm256_castps_si256(a)), bf16_rounded(_mm256_castps_si256(b)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm256_permute4x64_epi64(h, 0xd8));
  }
  store_half_portable<kBFloat16>(src + i, dst + i, n - i);
}

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
