// The Philox4x32-10 words of many consecutive groups at once, for the CPU noise tile (docs/design.md §2.8).
// Included by kernels_impl.h inside an instruction-set namespace; the including file sets ZSNR_CPU_VEC_BITS
// (512, 256, or undefined for the scalar loop) and includes <immintrin.h> before its target pragma.
//
// Why intrinsics: a 32 x 32 -> 64-bit multiply is one vpmuludq per 64-bit lane, but GCC vectorises the portable
// round of zsnr/philox.h over 32-bit lanes by widening to 64 bits and multiplying with vpmullq (three uops, the
// slowest integer multiply).  NOTE: measured with GCC 12 on a 2-core AVX-512 Xeon, the noise of a tile took 1.70 ns
// per element that way and takes 0.82 ns with the code below (of which the Philox words 0.32 ns).  Here each
// group's four counter words live in the low halves of 64-bit lanes, one group per lane: a round is two
// vpmuludq, two shifts and two three-way xors per vector of groups.  The high halves collect garbage that no
// later step reads (vpmuludq ignores them, the final narrowing drops them).  The words are bit-identical to
// philox4x32_10 (tests/backends/test_cpu_backend.py checks the noise of every instruction set against the reference).
//
// No #include here: the file is read inside the instruction-set namespace, after <immintrin.h>, <cstdint> and
// zsnr/philox.h.
#pragma once

#if ZSNR_CPU_VEC_BITS == 512

// Groups per vector, and the vector operations the round needs.
constexpr int kPhiloxLanes = 8;
using PhiloxVec = __m512i;
inline PhiloxVec pv_set1(uint64_t v) { return _mm512_set1_epi64(static_cast<int64_t>(v)); }
inline PhiloxVec pv_lanes() { return _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0); }
inline PhiloxVec pv_add(PhiloxVec a, PhiloxVec b) { return _mm512_add_epi64(a, b); }
inline PhiloxVec pv_mul32(PhiloxVec a, PhiloxVec b) { return _mm512_mul_epu32(a, b); }
inline PhiloxVec pv_hi32(PhiloxVec a) { return _mm512_srli_epi64(a, 32); }
inline PhiloxVec pv_xor3(PhiloxVec a, PhiloxVec b, PhiloxVec c) { return _mm512_ternarylogic_epi64(a, b, c, 0x96); }
inline void pv_store_lo32(uint32_t* out, PhiloxVec a) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi64_epi32(a));
}

#elif ZSNR_CPU_VEC_BITS == 256

constexpr int kPhiloxLanes = 4;
using PhiloxVec = __m256i;
inline PhiloxVec pv_set1(uint64_t v) { return _mm256_set1_epi64x(static_cast<int64_t>(v)); }
inline PhiloxVec pv_lanes() { return _mm256_set_epi64x(3, 2, 1, 0); }
inline PhiloxVec pv_add(PhiloxVec a, PhiloxVec b) { return _mm256_add_epi64(a, b); }
inline PhiloxVec pv_mul32(PhiloxVec a, PhiloxVec b) { return _mm256_mul_epu32(a, b); }
inline PhiloxVec pv_hi32(PhiloxVec a) { return _mm256_srli_epi64(a, 32); }
inline PhiloxVec pv_xor3(PhiloxVec a, PhiloxVec b, PhiloxVec c) {
  return _mm256_xor_si256(_mm256_xor_si256(a, b), c);
}
inline void pv_store_lo32(uint32_t* out, PhiloxVec a) {  // the even 32-bit words (the low halves), in order
  const __m256i lo = _mm256_permutevar8x32_epi32(a, _mm256_set_epi32(7, 5, 3, 1, 6, 4, 2, 0));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_castsi256_si128(lo));
}

#endif

#if defined(ZSNR_CPU_VEC_BITS)

// Groups [g, g + kPhiloxBlock): kPhiloxVecs independent vectors per round keep both multiply ports busy
// (a round's multiply -> shift -> xor chain is ~7 cycles long).
constexpr int kPhiloxVecs = 4;
constexpr int64_t kPhiloxBlock = kPhiloxLanes * kPhiloxVecs;

inline void philox_block(uint32_t k0, uint32_t k1, uint32_t step, uint32_t draw, uint64_t g, uint32_t* x0,
                         uint32_t* x1, uint32_t* x2, uint32_t* x3) {
  const PhiloxVec mul_a = pv_set1(kPhiloxRoundA), mul_b = pv_set1(kPhiloxRoundB);
  PhiloxVec c0[kPhiloxVecs], c1[kPhiloxVecs], c2[kPhiloxVecs], c3[kPhiloxVecs];
  for (int v = 0; v < kPhiloxVecs; ++v) {  // counter (g_lo, g_hi, step, draw) of group g + lane
    const PhiloxVec group = pv_add(pv_set1(g + static_cast<uint64_t>(kPhiloxLanes * v)), pv_lanes());
    c0[v] = group;
    c1[v] = pv_hi32(group);
    c2[v] = pv_set1(step);
    c3[v] = pv_set1(draw);
  }
  for (int round = 0; round < 10; ++round) {  // philox4x32_round, then the key bump
    const PhiloxVec key0 = pv_set1(k0), key1 = pv_set1(k1);
    for (int v = 0; v < kPhiloxVecs; ++v) {
      const PhiloxVec pa = pv_mul32(c0[v], mul_a), pb = pv_mul32(c2[v], mul_b);
      c0[v] = pv_xor3(pv_hi32(pb), c1[v], key0);
      c1[v] = pb;
      c2[v] = pv_xor3(pv_hi32(pa), c3[v], key1);
      c3[v] = pa;
    }
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  for (int v = 0; v < kPhiloxVecs; ++v) {
    pv_store_lo32(x0 + kPhiloxLanes * v, c0[v]);
    pv_store_lo32(x1 + kPhiloxLanes * v, c1[v]);
    pv_store_lo32(x2 + kPhiloxLanes * v, c2[v]);
    pv_store_lo32(x3 + kPhiloxLanes * v, c3[v]);
  }
}

#endif

// The words of groups [g0, g0 + ng): whole blocks by the vector code where there is one, the rest one group
// at a time by the shared scalar definition.  `after(lo, hi)` is called once groups [lo, hi) (counted from g0)
// are done, after each block and once for the rest: the caller can spread other work (memory requests) over
// the arithmetic.
template <typename After>
inline void philox_words(uint64_t seed, uint32_t step, uint32_t draw, uint64_t g0, int64_t ng, uint32_t* x0,
                         uint32_t* x1, uint32_t* x2, uint32_t* x3, After&& after) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  int64_t g = 0;
#if defined(ZSNR_CPU_VEC_BITS)
  for (; g + kPhiloxBlock <= ng; g += kPhiloxBlock) {
    philox_block(k0, k1, step, draw, g0 + static_cast<uint64_t>(g), x0 + g, x1 + g, x2 + g, x3 + g);
    after(g, g + kPhiloxBlock);
  }
#endif
  const int64_t rest = g;
  for (; g < ng; ++g) {
    const U32x4 x = philox_group(k0, k1, step, draw, g0 + static_cast<uint64_t>(g));
    x0[g] = x.x, x1[g] = x.y, x2[g] = x.z, x3[g] = x.w;
  }
  if (rest < ng) after(rest, ng);
}

inline void philox_words(uint64_t seed, uint32_t step, uint32_t draw, uint64_t g0, int64_t ng, uint32_t* x0,
                         uint32_t* x1, uint32_t* x2, uint32_t* x3) {
  philox_words(seed, step, draw, g0, ng, x0, x1, x2, x3, [](int64_t, int64_t) {});
}

// The words of local groups [g0, g0 + ng) of a slice of a sample (zsnr/philox.h NoiseSlice, groups whole): a slice's
// local groups run contiguous in the sample for L/4 groups at a time, so each such run is one philox_words call at
// its first group's place in the sample (slice_group), vector blocks and all.  `after` as philox_words', counted
// from g0.  The whole sample is one run.
template <typename After>
inline void philox_words(uint64_t seed, uint32_t step, uint32_t draw, const NoiseSlice& slice, uint64_t g0,
                         int64_t ng, uint32_t* x0, uint32_t* x1, uint32_t* x2, uint32_t* x3, After&& after) {
  if (slice_whole(slice)) {
    philox_words(seed, step, draw, g0, ng, x0, x1, x2, x3, after);
    return;
  }
  const uint64_t run_groups = static_cast<uint64_t>(slice.local) / 4;
  for (int64_t g = 0; g < ng;) {
    const uint64_t local = g0 + static_cast<uint64_t>(g);
    const int64_t left = static_cast<int64_t>(run_groups - local % run_groups);
    const int64_t m = left < ng - g ? left : ng - g;
    const int64_t at = g;
    philox_words(seed, step, draw, slice_group(slice, local), m, x0 + at, x1 + at, x2 + at, x3 + at,
                 [&](int64_t lo, int64_t hi) { after(at + lo, at + hi); });
    g += m;
  }
}
