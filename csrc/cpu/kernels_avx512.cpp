// The CPU kernels for x86-64 with AVX-512 (F, BW, VL, DQ; Skylake-SP, Ice Lake, Zen 4 and later), chosen at run
// time by step.cpp.
// fp16 results are stored with VCVTPS2PH, bf16 results with AVX512-BF16 where the CPU also has it (Cooper Lake,
// Sapphire Rapids, Zen 4; checked at run time).
//
// Every header with inline functions outside the ISA namespace (the standard library, the shared math) is
// included BEFORE the target pragma: those functions then keep the baseline target in every translation unit
// (one definition, safe on any CPU), and GCC inlines them into the AVX-512 loops below, where they get AVX-512 code.
// GCC 12's AVX-512 intrinsics read a deliberately uninitialised vector (_mm512_undefined_epi32) and -Wall reports
// it (-Wmaybe-uninitialized, -Wuninitialized) where they are inlined (GCC bug 105593); the silence covers the
// intrinsics header's lines only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
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
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")
#define ZSNR_CPU_ISA avx512
#define ZSNR_CPU_VEC_BITS 512  // philox_simd.h
#define ZSNR_CPU_FP16_TILES 1  // kernels_impl.h: store_fp16_tile, load_fp16_tile below
#if defined(__clang__) || __GNUC__ >= 10    // the AVX512-BF16 intrinsics (GCC 9 lacks them)
#define ZSNR_CPU_BF16_STORE_TILE 1  // kernels_impl.h: store_bf16_tile below
#endif
#define ZSNR_CPU_HALF_BLOCK_SUMS 1  // kernels_impl.h: half_block_sums below
#include "kernels_impl.h"

namespace zsnr {
namespace cpu {
namespace avx512 {
namespace {

#if defined(ZSNR_CPU_BF16_STORE_TILE)
// VCVTNEPS2BF16 rounds to nearest even like float_to_bf16 but treats denormal inputs as zero and need not
// quiet a NaN the same way, so a vector holding a NaN or a denormal takes the portable conversion.  The loop is
// store_half_vectors' written out (GCC's lambdas do not inherit this function's target attribute), 32 values at a
// time: VCVTNE2PS2BF16 rounds two vectors into one 64-byte store; the tail (under 32 values, at the end of a
// sample only: tiles hold 1024) goes portable.  NOTE: measured against one vector at a time (ABBA, whole bf16
// Euler and Euler + rescale steps, (4,4,128,128) and the video latent, 1 and 2 threads): 0.91-0.99x the time in
// 14 of 16 comparisons (this store pass was a third of the kernel's samples).
__attribute__((target("avx512bf16,avx512f,avx512bw,avx512vl,avx512dq")))
void store_bf16_hw(const float* src, uint16_t* dst, int64_t n) {
  constexpr int kNanOrDenormal = 0x01 | 0x20 | 0x80;  // VFPCLASSPS: quiet NaN, denormal, signalling NaN
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 lo = _mm512_loadu_ps(src + i), hi = _mm512_loadu_ps(src + i + 16);
    if ((_mm512_fpclass_ps_mask(lo, kNanOrDenormal) | _mm512_fpclass_ps_mask(hi, kNanOrDenormal)) != 0) {
      store_half_portable<kBFloat16>(src + i, dst + i, 32);
      continue;
    }
    const __m512bh h = _mm512_cvtne2ps_pbh(hi, lo);  // lo's values in the low half
    std::memcpy(dst + i, &h, sizeof h);
  }
  store_half_portable<kBFloat16>(src + i, dst + i, n - i);
}
#endif

// 16 fp16 or bf16 values as floats, exactly (a bf16 is the high half of a float; VCVTPH2PS converts every fp16).
template <int32_t DT>
inline __m512 widen(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  if constexpr (DT == kBFloat16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  else return _mm512_cvtph_ps(h);
}

// lanes[0..15] += the 16 floats of v, in double (block_sums's lane accumulators).
inline void add_lanes(__m512 v, double* lanes) {
  const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
  const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  _mm512_storeu_pd(lanes, _mm512_add_pd(_mm512_loadu_pd(lanes), lo));
  _mm512_storeu_pd(lanes + 8, _mm512_add_pd(_mm512_loadu_pd(lanes + 8), hi));
}

}  // namespace

// kernels_impl.h's block_sums loop for one whole fp16 or bf16 block, lane l of each sum in lane l of a register,
// combine.h's rescale_terms with each product rounded before it is added (no FMA), as the loop does them; the
// block's lane sums are added to the double lane accumulators as the loop adds them.
template <int32_t DT, bool WithY>
void half_block_sums(const uint16_t* fc, const uint16_t* fu, const uint16_t* y, const RescaleSample& p,
                     double* lanes) {
  const __m512 pc = _mm512_set1_ps(p.c), pu = _mm512_set1_ps(p.u), pd = _mm512_set1_ps(p.d);
  const __m512 py = _mm512_set1_ps(p.y), w = _mm512_set1_ps(p.w);
  const __m512 wa = _mm512_set1_ps(p.a), wb = _mm512_set1_ps(p.b);
  __m512 s[kNumSums];
  for (int k = 0; k < kNumSums; ++k) s[k] = _mm512_setzero_ps();
  for (int64_t i = 0; i < kSumBlock; i += kLanes) {
    const __m512 vc = widen<DT>(fc + i), vu = widen<DT>(fu + i);
    __m512 c = _mm512_sub_ps(vc, pc);
    __m512 g = _mm512_add_ps(_mm512_sub_ps(vu, pu), _mm512_mul_ps(w, _mm512_sub_ps(_mm512_sub_ps(vc, vu), pd)));
    if constexpr (WithY) {
      const __m512 e = _mm512_mul_ps(wa, _mm512_sub_ps(widen<DT>(y + i), py));
      c = _mm512_add_ps(_mm512_mul_ps(wb, c), e);
      g = _mm512_add_ps(_mm512_mul_ps(wb, g), e);
    }
    s[kSumC] = _mm512_add_ps(s[kSumC], c);
    s[kSumCC] = _mm512_add_ps(s[kSumCC], _mm512_mul_ps(c, c));
    s[kSumG] = _mm512_add_ps(s[kSumG], g);
    s[kSumGG] = _mm512_add_ps(s[kSumGG], _mm512_mul_ps(g, g));
  }
  for (int k = 0; k < kNumSums; ++k) add_lanes(s[k], lanes + k * kLanes);
}
template void half_block_sums<kFloat16, false>(const uint16_t*, const uint16_t*, const uint16_t*,
                                               const RescaleSample&, double*);
template void half_block_sums<kFloat16, true>(const uint16_t*, const uint16_t*, const uint16_t*,
                                              const RescaleSample&, double*);
template void half_block_sums<kBFloat16, false>(const uint16_t*, const uint16_t*, const uint16_t*,
                                                const RescaleSample&, double*);
template void half_block_sums<kBFloat16, true>(const uint16_t*, const uint16_t*, const uint16_t*,
                                               const RescaleSample&, double*);

#if defined(ZSNR_CPU_BF16_STORE_TILE)
void store_bf16_tile(const float* src, uint16_t* dst, int64_t n) {
  static const bool hw = __builtin_cpu_supports("avx512bf16");
  if (hw) store_bf16_hw(src, dst, n);
  else store_half_portable<kBFloat16>(src, dst, n);
}
#endif

// VCVTPS2PH rounds to nearest even like float_to_fp16, subnormal results included, but keeps a NaN's payload
// where float_to_fp16 gives the canonical quiet NaN: vectors holding a NaN take the portable conversion.
void store_fp16_tile(const float* src, uint16_t* dst, int64_t n) {
  constexpr int kNan = 0x01 | 0x80;  // VFPCLASSPS: quiet NaN, signalling NaN
  store_half_vectors<kFloat16, 16>(
      src, dst, n, [](const float* s) { return _mm512_fpclass_ps_mask(_mm512_loadu_ps(s), kNan) != 0; },
      [](const float* s, uint16_t* d) {
        const __m256i h = _mm512_cvtps_ph(_mm512_loadu_ps(s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(d), h);
      });
}

void load_fp16_tile(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
  for (; i < n; ++i) dst[i] = fp16_to_float(src[i]);
}

}  // namespace avx512
}  // namespace cpu
}  // namespace zsnr
#endif
