// Philox4x32-10 and the zsnr noise definition (docs/design.md §2.8).  No PyTorch, no Python.
//
// A noise value is a pure function of (64-bit seed of the sample, step, draw, element index j):
//   key     = (seed_lo, seed_hi)                 the seed split in 32-bit halves
//   counter = (g_lo, g_hi, step, draw)           g = j / 4
//   (x0, x1, x2, x3) = Philox4x32-10(key, counter)
//   u_k = float(s_k) * 4.6566127342e-10f         s_k = x_k as int32, bitwise-not if negative
//   (n0, n1) = box_muller(u0, u1), (n2, n3) = box_muller(u2, u3)
//   noise(j) = n_{j % 4}
// This is Triton's own generator (tl.philox, uint_to_uniform_float, pair_uniform_to_normal): the
// integers are bit-identical on every backend, the normals agree to float rounding of log/cos/sin.
#pragma once

#include <math.h>  // logf, sqrtf, cosf, sinf in the global namespace (device built-ins under nvcc)

#include <cstdint>

#include "zsnr/common.h"

namespace zsnr {

// Philox4x32 constants (Salmon et al. 2011; the same values as triton/language/random.py).
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;    // key bump of k0 ("golden ratio")
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;    // key bump of k1 (sqrt(3) - 1)
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;  // multiplier of c0
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;  // multiplier of c2
constexpr float kUintToUniformScale = 4.6566127342e-10f;  // largest s with (2^31 - 1) * s < 1 in float
constexpr float kTwoPi = 6.283185307179586f;
constexpr float kMinUniform = 1.0e-7f;  // clamp of u where its log is taken

// Four 32-bit words (a uint4 without CUDA's header).
struct U32x4 {
  uint32_t x, y, z, w;
};

// High 32 bits of the 64-bit product a * b.
ZSNR_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// One Philox4x32 round with key (k0, k1):
//   (c0, c1, c2, c3) -> (hi(B*c2) ^ c1 ^ k0, lo(B*c2), hi(A*c0) ^ c3 ^ k1, lo(A*c0)).
ZSNR_HD U32x4 philox4x32_round(U32x4 c, uint32_t k0, uint32_t k1) {
  return U32x4{mulhi32(kPhiloxRoundB, c.z) ^ c.y ^ k0, kPhiloxRoundB * c.z,
               mulhi32(kPhiloxRoundA, c.x) ^ c.w ^ k1, kPhiloxRoundA * c.x};
}

// Philox4x32-10: ten rounds, the key bumped by (kPhiloxKeyA, kPhiloxKeyB) after each round.
ZSNR_HD U32x4 philox4x32_10(uint32_t k0, uint32_t k1, U32x4 counter) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    counter = philox4x32_round(counter, k0, k1);
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return counter;
}

// Triton's uint_to_uniform_float for 32 bits: a uniform float in [0, 1).
// Reinterpreted as int32 s, negative s becomes ~s (= ~x as unsigned, < 2^31); then float(s) * scale.
ZSNR_HD float uint_to_uniform(uint32_t x) {
  const uint32_t s = (x & 0x80000000u) ? ~x : x;
  return static_cast<float>(static_cast<int32_t>(s)) * kUintToUniformScale;
}

// Triton's pair_uniform_to_normal, in float32: r = sqrt(-2 log(max(u1, 1e-7))), th = 2 pi u2,
// (n1, n2) = (r cos th, r sin th).
ZSNR_HD void box_muller(float u1, float u2, float* n1, float* n2) {
  u1 = u1 > kMinUniform ? u1 : kMinUniform;
  const float th = kTwoPi * u2;
  const float r = sqrtf(-2.0f * logf(u1));
  *n1 = r * cosf(th);
  *n2 = r * sinf(th);
}

// The Philox outputs for group g = j / 4 of a sample: counter (g_lo, g_hi, step, draw).
ZSNR_HD U32x4 philox_group(uint32_t seed_lo, uint32_t seed_hi, uint32_t step, uint32_t draw,
                           uint64_t g) {
  return philox4x32_10(seed_lo, seed_hi,
                       U32x4{static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), step, draw});
}

// The four normals of group g: out[k] is the normal of element j = 4 g + k.
ZSNR_HD void philox_normal4(uint32_t seed_lo, uint32_t seed_hi, uint32_t step, uint32_t draw,
                            uint64_t g, float out[4]) {
  const U32x4 x = philox_group(seed_lo, seed_hi, step, draw, g);
  box_muller(uint_to_uniform(x.x), uint_to_uniform(x.y), &out[0], &out[1]);
  box_muller(uint_to_uniform(x.z), uint_to_uniform(x.w), &out[2], &out[3]);
}

// Where a slice of a sample lies in the sample (a latent sharded along one dim, zsnr_kernels/distributed.py): the
// slice holds runs of L = `local` elements, one run for every index of the dims before the shard dim, each run the
// slice's part of G = `total` elements of the sample, starting O = `offset` elements into them.  With D the product
// of the dims after the shard dim: L = (the slice's size along the shard dim) D, G = (the sample's size) D,
// O = (the slice's start) D.  Local element j (its flat index in the slice's sample) is element
//   J = (j / L) G + O + j % L
// of the sample, and takes that element's noise (docs/design.md §2.8).  The whole sample: L = G (= n), O = 0, J = j.
// This is the one definition of the mapping: the CPU and CUDA kernels call slice_group, the Triton kernel and the
// reference (zsnr_kernels/noise.py NoiseSlice) mirror it.
struct NoiseSlice {
  int64_t local, total, offset;  // L, G, O in elements
};

// Whether the slice is the whole sample (no mapping).
ZSNR_HD bool slice_whole(const NoiseSlice& s) { return s.local == s.total; }

// Whether a slice maps each local group of four onto one group of the sample (L, G and O multiples of 4, so that
// groups stay whole) -- the slices the kernels draw; the callers give the others their noise as a tensor.  A slice
// must also lie inside its runs (1 <= L, O + L <= G) and the sample's n must be a multiple of L (checked by callers).
ZSNR_HD bool slice_groups_whole(const NoiseSlice& s) {
  return slice_whole(s) || (s.local % 4 == 0 && s.total % 4 == 0 && s.offset % 4 == 0);
}

// Whether the kernels can draw a slice for samples of n elements: whole groups, and the slice inside its runs.
// (L = G with O = 0 maps every element to itself, for any L >= 1 dividing n; the bounds are compared by subtraction,
// which cannot overflow.)
ZSNR_HD bool slice_drawable(const NoiseSlice& s, int64_t n) {
  if (slice_whole(s)) return s.local >= 1 && s.offset == 0 && n % s.local == 0;
  return s.local >= 1 && s.offset >= 0 && s.local <= s.total && s.offset <= s.total - s.local && n % s.local == 0 &&
         slice_groups_whole(s);
}

// The group of the sample that local group g of a slice with whole groups is (slice_groups_whole):
//   g_sample = (g / (L/4)) (G/4) + O/4 + g % (L/4).
ZSNR_HD uint64_t slice_group(const NoiseSlice& s, uint64_t g) {
  if (slice_whole(s)) return g;
  const uint64_t l4 = static_cast<uint64_t>(s.local) / 4;
  const uint64_t row = g / l4;
  return row * (static_cast<uint64_t>(s.total) / 4) + static_cast<uint64_t>(s.offset) / 4 + (g - row * l4);
}

// The normal of element j of a sample (docs/design.md §2.8).  Loops that fill consecutive elements
// should call philox_normal4 once per group of four instead.
ZSNR_HD float philox_normal(uint32_t seed_lo, uint32_t seed_hi, uint32_t step, uint32_t draw,
                            uint64_t j) {
  float n[4];
  philox_normal4(seed_lo, seed_hi, step, draw, j >> 2, n);
  return n[j & 3];
}

}  // namespace zsnr
