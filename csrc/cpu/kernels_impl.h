// The CPU loops over the shared math, compiled once per instruction set (kernels_base.cpp, kernels_avx2.cpp,
// kernels_avx512.cpp) inside a namespace chosen by the including file; step.cpp picks one at run time.  The work
// is split into fixed chunks (results do not depend on the thread count), which the threads of thread_pool.h take
// one at a time as they finish the last (so a thread sharing its core with another busy process takes fewer, and
// the step waits only for chunks already started); the statistics' partial sums are stored per chunk and reduced
// in chunk order, so the results do not depend on which thread took which chunk either; `omp simd` vectorises the
// element loops.
// NOTE: measured on the 2-core build machine (AMD EPYC; guided + rescaled Euler in place at (1,16,21,60,104), fp32,
// 200 calls with 1 and with 2 threads alternating, the machine busy with other work at a load average of 7-8 and a
// `python -c "while True: pass"` beside it): an OpenMP loop here took 4.7-5.9x the 1-thread mean with 2 threads
// (medians 26-38x: its barrier waits for a worker parked behind the busy processes), the pool 0.91x.
//
// Byte model of the element pass (N = batch * n elements of `dtype`): reads y, F_c (, F_u), each remembered
// tensor (, the explicit noise), writes y_out (, D, carry); CFG++'s D_u term reads nothing more (F_u is read).
// The statistics pass reads F_c, F_u (, y) once.
#include <math.h>
#if __has_include(<unistd.h>)
#include <unistd.h>  // sysconf: the L2 size
#endif

#include <cstdint>
#include <cstring>
#include <vector>

#include "step.h"
#include "thread_pool.h"
#include "zsnr/combine.h"
#include "zsnr/dispatch.h"
#include "zsnr/philox.h"

namespace zsnr {
namespace cpu {
namespace ZSNR_CPU_ISA {

// NOTE: 16384 elements per chunk: large enough to amortise the per-chunk setup, small enough that a
// (1, 4, 64, 64) latent is one chunk (no threading overhead) and that chunks of larger latents balance.
constexpr int64_t kChunk = 16384;
constexpr int64_t kTile = 1024;  // elements converted / noised at a time into stack buffers

// Whether a pass over `tasks` chunks of batch * n elements in all runs on several threads: only with more than one
// chunk's worth of elements.  NOTE: a batch of tiny samples (2 x 30 elements) made two one-task threads, and
// beside another busy process on the 2-core build machine the waiting OpenMP thread turned a 15 us step into 6 ms.
inline bool parallel(int64_t tasks, int64_t batch, int64_t n) { return tasks > 1 && batch * n > kChunk; }

// ------------------------------------------------------------------------------ storage conversions

// Bit-level conversions, written branch-free so the element loops vectorise on every instruction set (GCC does
// not vectorise _Float16 conversions without AVX512-FP16).  All round to nearest even, as PyTorch does.

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float bf16_to_float(uint16_t v) { return bits_float(static_cast<uint32_t>(v) << 16); }

inline uint16_t float_to_bf16(float f) {
  const uint32_t bits = float_bits(f);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (bits >> 16) | 0x40u;
  return static_cast<uint16_t>((bits & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

// IEEE half -> float, exact: a normal half's exponent and mantissa shifted into place and the exponent rebased
// (integer arithmetic), a subnormal's mantissa converted to float and scaled by 2^-24 (a normal float times a power
// of two: exact, and unaffected by the denormals-are-zero mode that torch.set_flush_denormal(True) sets, as
// VCVTPH2PS is; rescaling the float denormal em << 13 by 2^112 read it as 0 there); inf and NaN get the float
// exponent.
inline float fp16_to_float(uint16_t v) {
  const uint32_t h = v;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  const uint32_t normal = (em << 13) + ((127u - 15u) << 23);
  const uint32_t subnormal = float_bits(static_cast<float>(static_cast<int32_t>(em)) * 0x1p-24f);
  const uint32_t body = em >= 0x7c00u ? ((em << 13) | 0x7f800000u) : em >= 0x0400u ? normal : subnormal;
  return bits_float(sign | body);
}

// float -> IEEE half, round to nearest even; overflow to inf, NaN to a quiet NaN, subnormals by adding a magic
// constant in float (the FPU does the rounding).
inline uint16_t float_to_fp16(float f) {
  const uint32_t bits = float_bits(f);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t a = bits & 0x7fffffffu;
  const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  const uint32_t sub = float_bits(bits_float(a) + bits_float(denorm_magic)) - denorm_magic;
  const uint32_t norm = (a + (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
  const uint32_t big = a > 0x7f800000u ? 0x7e00u : 0x7c00u;
  const uint32_t out = a >= (143u << 23) ? big : (a < (113u << 23) ? sub : norm);
  return static_cast<uint16_t>(sign | out);
}

template <int32_t DT>
struct Storage;
template <>
struct Storage<kFloat32> {
  using T = float;
  static inline float load(T v) { return v; }
  static inline T store(float v) { return v; }
};
template <>
struct Storage<kFloat16> {
  using T = uint16_t;
  static inline float load(T v) { return fp16_to_float(v); }
  static inline T store(float v) { return float_to_fp16(v); }
};
template <>
struct Storage<kBFloat16> {
  using T = uint16_t;
  static inline float load(T v) { return bf16_to_float(v); }
  static inline T store(float v) { return float_to_bf16(v); }
};

template <int32_t DT>
inline void store_half_portable(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = Storage<DT>::store(src[i]);
}

// dst[i] = Storage<DT>::store(src[i]) for fp16 and bf16, i < n, bit for bit.  An instruction set whose file
// defines ZSNR_CPU_FP16_TILES supplies store_fp16_tile and load_fp16_tile (F16C's VCVTPS2PH and VCVTPH2PS, in
// kernels_avx2.cpp and kernels_avx512.cpp), one that defines ZSNR_CPU_BF16_STORE_TILE store_bf16_tile
// (AVX512-BF16 where the CPU has it; integer rounding in vectors in kernels_avx2.cpp); the element pass then
// moves those dtypes through float tiles.  The portable conversions cost ~45 (bf16) and more (fp16) instructions
// per 32 elements: plain Euler at (4,4,128,128), 1 thread, took 108 us in bf16 and 190 us in fp16 with them, 93
// and 94 us with the instructions.
#if defined(ZSNR_CPU_FP16_TILES)
constexpr bool kFp16Tiles = true;
#else
constexpr bool kFp16Tiles = false;
#endif
#if defined(ZSNR_CPU_BF16_STORE_TILE)
constexpr bool kBf16StoreTile = true;
#else
constexpr bool kBf16StoreTile = false;
#endif
template <int32_t DT>
constexpr bool kStoreTile = (DT == kFloat16 && kFp16Tiles) || (DT == kBFloat16 && kBf16StoreTile);
void store_fp16_tile(const float* src, uint16_t* dst, int64_t n);  // defined where the macros above say
void store_bf16_tile(const float* src, uint16_t* dst, int64_t n);
void load_fp16_tile(const uint16_t* src, float* dst, int64_t n);

// The loop of a store_*_tile: `convert(src, dst)` rounds W floats with an instruction; a vector for which
// `portable(src)` says the instruction would round differently (a NaN, say) takes store_half_portable, as does
// the tail.
template <int32_t DT, int W, class Portable, class Convert>
inline void store_half_vectors(const float* src, uint16_t* dst, int64_t n, Portable portable, Convert convert) {
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    if (portable(src + i)) store_half_portable<DT>(src + i, dst + i, W);
    else convert(src + i, dst + i);
  }
  store_half_portable<DT>(src + i, dst + i, n - i);
}

template <int32_t DT>
inline void store_half(const float* src, uint16_t* dst, int64_t n) {
  if constexpr (DT == kFloat16 && kFp16Tiles) store_fp16_tile(src, dst, n);
  else if constexpr (DT == kBFloat16 && kBf16StoreTile) store_bf16_tile(src, dst, n);
  else store_half_portable<DT>(src, dst, n);
}

// Loads the other way, for fp16 only (VCVTPH2PS is exact for every fp16 like fp16_to_float; a signalling NaN
// comes out quiet, which the first arithmetic on it does anyway); bf16 needs none: its portable load is a shift.
template <int32_t DT>
constexpr bool kLoadTile = DT == kFloat16 && kFp16Tiles;

template <int32_t DT>
inline void load_half(const uint16_t* src, float* dst, int64_t n) {
  if constexpr (kLoadTile<DT>) {
    load_fp16_tile(src, dst, n);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = Storage<DT>::load(src[i]);
  }
}

// Element i of an input of the element pass: from its float tile (index j = i - tile start) when the dtype is
// loaded through tiles, else converted in place.
template <int32_t DT>
inline float input(const typename Storage<DT>::T* p, const float* tile, int64_t i, int64_t j) {
  if constexpr (kLoadTile<DT>) return tile[j];
  else return Storage<DT>::load(p[i]);
}

// ------------------------------------------------------------------------------------ statistics pass

// Blocked summation: kLanes float accumulators per sum (kept in vector registers: the fixed-width inner loop is
// what the compiler vectorises, more reliably than an `omp simd reduction`, which goes through memory), each
// summing kSumBlock / kLanes elements of a block (short enough that float rounding stays near 1e-7 of the block
// sum); each lane's block sums are added in double to the lane's double accumulator, and at the end of the
// chunk the lanes are added pairwise in double; chunks are reduced in a fixed order.  (A sample of up to kLanes
// elements is summed exactly, its terms aside: a float tree's four roundings of a sum far from 0 -- a pivot far
// from the mean -- were amplified by the cancellation of mean and mean square.)  The order is written out and
// nothing is contracted into an FMA (setup.py), so every instruction set gives the same bits.
constexpr int64_t kSumBlock = 256;
constexpr int kLanes = 16;

// The sums of one whole fp16 or bf16 block, added to the double lane accumulators lanes[kNumSums][kLanes]: an
// instruction set whose file defines ZSNR_CPU_HALF_BLOCK_SUMS supplies it (kernels_avx2.cpp, kernels_avx512.cpp, in
// registers: GCC vectorises the loop below for bf16 with 256-bit vectors and loads each input twice, 0.28 ns per
// element on one core against 0.15; fp16 converts bit by bit, 0.50 ns), computing exactly what the loop does.
#if defined(ZSNR_CPU_HALF_BLOCK_SUMS)
constexpr bool kHalfBlockSums = true;
#else
constexpr bool kHalfBlockSums = false;
#endif
template <int32_t DT, bool WithY>  // defined where ZSNR_CPU_HALF_BLOCK_SUMS says
void half_block_sums(const uint16_t* fc, const uint16_t* fu, const uint16_t* y, const RescaleSample& p,
                     double* lanes);

template <int32_t DT, bool WithY>
void block_sums(const typename Storage<DT>::T* fc, const typename Storage<DT>::T* fu,
                const typename Storage<DT>::T* y, int64_t lo, int64_t hi, const RescaleSample& p, double* acc) {
  using S = Storage<DT>;
  double lanes[kNumSums][kLanes] = {};
  for (int64_t b0 = lo; b0 < hi; b0 += kSumBlock) {
    const int64_t b1 = b0 + kSumBlock < hi ? b0 + kSumBlock : hi;
    if constexpr (DT != kFloat32 && kHalfBlockSums) {
      if (b1 - b0 == kSumBlock) {
        half_block_sums<DT, WithY>(fc + b0, fu + b0, y + b0, p, &lanes[0][0]);
        continue;
      }
    }
    float a[kNumSums][kLanes] = {};
    int64_t i = b0;
    for (; i + kLanes <= b1; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        float gc, g;
        rescale_terms<WithY>(S::load(fc[i + l]), S::load(fu[i + l]), WithY ? S::load(y[i + l]) : 0.0f, p, &gc, &g);
        a[kSumC][l] += gc, a[kSumCC][l] += gc * gc, a[kSumG][l] += g, a[kSumGG][l] += g * g;
      }
    }
    for (int l = 0; i < b1; ++i, ++l) {  // the tail, fewer than kLanes elements
      float gc, g;
      rescale_terms<WithY>(S::load(fc[i]), S::load(fu[i]), WithY ? S::load(y[i]) : 0.0f, p, &gc, &g);
      a[kSumC][l] += gc, a[kSumCC][l] += gc * gc, a[kSumG][l] += g, a[kSumGG][l] += g * g;
    }
    for (int k = 0; k < kNumSums; ++k)
      for (int l = 0; l < kLanes; ++l) lanes[k][l] += a[k][l];
  }
  for (int k = 0; k < kNumSums; ++k) {  // lanes added pairwise, (l, l + w) for w = 8, 4, 2, 1
    for (int w = kLanes / 2; w > 0; w /= 2)
      for (int l = 0; l < w; ++l) lanes[k][l] += lanes[k][l + w];
    acc[k] += lanes[k][0];
  }
}

template <int32_t DT>
void rescale_sums_impl(const Tensors& t, float w, const RescaleWeights* ab, int32_t with_y, double* out) {
  using T = typename Storage<DT>::T;
  const int64_t chunks = (t.n + kChunk - 1) / kChunk;
  const int64_t tasks = t.batch * chunks;
  std::vector<double> partial(static_cast<size_t>(tasks) * kNumSums, 0.0);
  run_tasks(tasks, parallel(tasks, t.batch, t.n) ? num_threads() : 1, [&](int64_t task) {
    const int64_t b = task / chunks, lo = (task % chunks) * kChunk;
    const int64_t hi = lo + kChunk < t.n ? lo + kChunk : t.n;
    const T* fc = static_cast<const T*>(t.f_cond) + b * t.n;
    const T* fu = static_cast<const T*>(t.f_uncond) + b * t.n;
    const T* y = static_cast<const T*>(t.y) + b * t.n;
    double* acc = partial.data() + task * kNumSums;
    const RescaleSample p = rescale_sample(Storage<DT>::load(fc[0]), Storage<DT>::load(fu[0]),
                                           with_y ? Storage<DT>::load(y[0]) : 0.0f, w,
                                           with_y ? ab[b] : RescaleWeights{0.0f, 1.0f});
    if (with_y) block_sums<DT, true>(fc, fu, y, lo, hi, p, acc);
    else block_sums<DT, false>(fc, fu, y, lo, hi, p, acc);
  });
  for (int64_t b = 0; b < t.batch; ++b) {  // fixed order: the result does not depend on the thread count
    double* o = out + b * kNumSums;
    for (int k = 0; k < kNumSums; ++k) o[k] = 0.0;
    for (int64_t c = 0; c < chunks; ++c)
      for (int k = 0; k < kNumSums; ++k) o[k] += partial[(b * chunks + c) * kNumSums + k];
  }
}

// -------------------------------------------------------------------------------------- element pass

// ------------------------------------------------------------------------------------- Philox noise

// The noise of docs/design.md §2.8 for a tile of elements, written so the compiler vectorises it across Philox groups:
// the integers come from philox_simd.h (bit-exact with the shared philox4x32_10); log, sin and cos are the
// branch-free float polynomials below (Cephes' minimax coefficients, within 2 ulp of libm), because glibc's
// scalar logf/sinf/cosf would keep the loop scalar.  The normals therefore agree with the other backends to
// float rounding, as docs/design.md §2.8 promises, not bit for bit.
//
// The polynomials are forced inline: a call keeps philox_tile's loop scalar, and GCC's size heuristics did stop
// inlining vlogf into one instantiation of combine_impl when the code around it grew (bf16 DPM++(3M) SDE: 10x).
#if defined(__GNUC__)
#define ZSNR_CPU_VECTOR_INLINE inline __attribute__((always_inline))
#else
#define ZSNR_CPU_VECTOR_INLINE inline
#endif

// log(x) for normal positive x: x = m 2^e with m in [sqrt(1/2), sqrt(2)), log(1 + f) by a polynomial in f.
ZSNR_CPU_VECTOR_INLINE float vlogf(float x) {
  const uint32_t bits = float_bits(x);
  int32_t e = static_cast<int32_t>((bits >> 23) & 0xffu) - 127;
  float m = bits_float((bits & 0x007fffffu) | 0x3f800000u);
  const bool big = m > 1.41421356f;
  m = big ? 0.5f * m : m;
  e = big ? e + 1 : e;
  const float f = m - 1.0f, z = f * f;
  float p = 7.0376836292e-2f;
  p = fmaf(p, f, -1.1514610310e-1f);
  p = fmaf(p, f, 1.1676998740e-1f);
  p = fmaf(p, f, -1.2420140846e-1f);
  p = fmaf(p, f, 1.4249322787e-1f);
  p = fmaf(p, f, -1.6668057665e-1f);
  p = fmaf(p, f, 2.0000714765e-1f);
  p = fmaf(p, f, -2.4999993993e-1f);
  p = fmaf(p, f, 3.3333331174e-1f);
  const float ef = static_cast<float>(e);
  float y = f * z * p;
  y = fmaf(ef, -2.12194440e-4f, y);
  y = fmaf(-0.5f, z, y);
  return fmaf(ef, 0.693359375f, f + y);
}

// sin and cos of th in [0, 2 pi]: th = x + k pi/2 with |x| <= pi/4 (three-part Cody-Waite reduction), then
// the quadrant k picks and signs the two polynomials.
struct SinCos {
  float s, c;
};

ZSNR_CPU_VECTOR_INLINE SinCos vsincosf(float th) {
  int32_t j = static_cast<int32_t>(th * 1.27323954473516f);  // 4/pi
  j = (j + 1) & ~1;
  const float q = static_cast<float>(j);
  const float x = ((th - q * 0.78515625f) - q * 2.4187564849853515625e-4f) - q * 3.77489497744594108e-8f;
  const float z = x * x;
  const float sp = fmaf(fmaf(fmaf(-1.9515295891e-4f, z, 8.3321608736e-3f), z, -1.6666654611e-1f), z * x, x);
  const float cp = fmaf(fmaf(fmaf(2.443315711809948e-5f, z, -1.388731625493765e-3f), z, 4.166664568298827e-2f),
                        z * z, fmaf(-0.5f, z, 1.0f));
  const int32_t k = (j >> 1) & 3;
  const float s = (k & 1) ? cp : sp, c = (k & 1) ? sp : cp;
  return SinCos{(k & 2) ? -s : s, ((k + 1) & 2) ? -c : c};
}

#include "philox_simd.h"

// Normals of local groups [g0, g0 + ng) (four elements each, ng <= kTile / 4) of one sample's `slice` (zsnr/philox.h;
// the whole sample: groups g0.. themselves) into buf[4 * ng]: the Philox words (philox_simd.h), then the uniforms
// and Box-Muller a quarter at a time into four arrays (so the loop vectorises), then interleaved.  `after(from, to, total)` is called as the arithmetic advances, from 0 to
// total (the words of every group, then its normals, `chunk` groups at a time), so a caller can spread other work
// over it.
template <typename After>
inline void philox_tile(uint64_t seed, uint32_t step, uint32_t draw, const NoiseSlice& slice, int64_t g0, int64_t ng,
                        float* buf, After&& after, int64_t chunk) {
  alignas(64) uint32_t x0[kTile / 4], x1[kTile / 4], x2[kTile / 4], x3[kTile / 4];
  alignas(64) float n0[kTile / 4], n1[kTile / 4], n2[kTile / 4], n3[kTile / 4];
  const int64_t total = 2 * ng;
  philox_words(seed, step, draw, slice, static_cast<uint64_t>(g0), ng, x0, x1, x2, x3,
               [&](int64_t g_lo, int64_t g_hi) { after(g_lo, g_hi, total); });
  for (int64_t c = 0; c < ng; c += chunk) {
    const int32_t c_lo = static_cast<int32_t>(c), c_hi = static_cast<int32_t>(c + chunk < ng ? c + chunk : ng);
#pragma omp simd
    for (int32_t g = c_lo; g < c_hi; ++g) {
      const float v0 = uint_to_uniform(x0[g]), u1 = uint_to_uniform(x1[g]);
      const float v2 = uint_to_uniform(x2[g]), u3 = uint_to_uniform(x3[g]);
      const float u0 = v0 > kMinUniform ? v0 : kMinUniform, u2 = v2 > kMinUniform ? v2 : kMinUniform;  // not
      // fmaxf: its NaN rules keep GCC from vectorising, and u is never NaN
      const float r0 = sqrtf(-2.0f * vlogf(u0)), r1 = sqrtf(-2.0f * vlogf(u2));
      const SinCos a = vsincosf(kTwoPi * u1), b = vsincosf(kTwoPi * u3);
      n0[g] = r0 * a.c;
      n1[g] = r0 * a.s;
      n2[g] = r1 * b.c;
      n3[g] = r1 * b.s;
    }
    after(ng + c_lo, ng + c_hi, total);
  }
  for (int64_t g = 0; g < ng; ++g) {
    buf[4 * g] = n0[g];
    buf[4 * g + 1] = n1[g];
    buf[4 * g + 2] = n2[g];
    buf[4 * g + 3] = n3[g];
  }
}

// The normals alone, in one pass.
inline void philox_tile(uint64_t seed, uint32_t step, uint32_t draw, const NoiseSlice& slice, int64_t g0, int64_t ng,
                        float* buf) {
  philox_tile(seed, step, draw, slice, g0, ng, buf, [](int64_t, int64_t, int64_t) {}, ng);
}

// Asks for the cache lines of elements [lo, hi) of p (PREFETCHT0: into L1; T1, into L2 only, was 5-8% slower in
// float32).  On x86 an asm statement: GCC 12 deleted the __builtin_prefetch loop once it was inlined into
// philox_tile (a prefetch has no side effect it must keep).
template <typename T>
inline void prefetch_lines(const T* p, int64_t lo, int64_t hi) {
  if (p == nullptr) return;
  constexpr int64_t kPerLine = 64 / static_cast<int64_t>(sizeof(T));
  for (int64_t i = lo; i < hi; i += kPerLine) {
#if defined(__x86_64__) || defined(__i386__)
    asm volatile("prefetcht0 %0" : : "m"(*reinterpret_cast<const char*>(p + i)));
#else
    __builtin_prefetch(p + i, 0, 3);
#endif
  }
}

// The tensors an element pass touches in a tile: y, F_c, F_u, the history, y_out, D, carry (nullptr where a step
// has none).
template <typename T>
using TileTensors = const T* [9];

// The in-kernel noise of elements [lo, hi) (lo a multiple of 4); with `ask`, the memory the element loop will touch
// in the same elements is requested as the arithmetic advances (philox_tile's `after`): the normals are
// compute-bound (Philox and Box-Muller, ~0.8 ns per element and core), the element loop memory-bound, and without
// the requests no load would be in flight while the normals are computed.  NOTE: measured on the 2-core build
// machine on the (1,16,21,60,104) latent, the build before and this one alternating in ABBA order (the second of
// two back-to-back runs finds the tensors in cache): Euler ancestral 0.90x the time in float32 when repeated,
// 0.77x with a 512 MiB buffer written between calls (as after a model call), bfloat16 1.03x and 0.88x;
// DPM++(3M) SDE 0.77x / 0.84x in float32, 0.95x / 0.74x in bfloat16; at (4,4,128,128) DPM++(3M) SDE in float32
// (6 MB) 0.85x, the rest unchanged.
template <typename T>
inline void noise_tile(uint64_t seed, uint32_t step, uint32_t draw, const NoiseSlice& slice, int64_t lo, int64_t hi,
                       float* buf, const TileTensors<T>& tensors, bool ask) {
  if (!ask) {
    philox_tile(seed, step, draw, slice, lo / 4, (hi - lo + 3) / 4, buf);
    return;
  }
  constexpr int64_t kNormalsChunk = 64;  // groups of normals between two rounds of requests
  const auto ask_for = [&](int64_t from, int64_t to, int64_t total) {
    const int64_t s = lo + (hi - lo) * from / total, e = lo + (hi - lo) * to / total;
    for (const T* p : tensors) prefetch_lines(p, s, e);
  };
  philox_tile(seed, step, draw, slice, lo / 4, (hi - lo + 3) / 4, buf, ask_for, kNormalsChunk);
}

// Whether the tensors of a step outgrow the L2 caches of the threads running it: below that, the lines a noise tile
// would ask for are in L2 already and asking costs instructions (Euler ancestral at (4,4,128,128): 6% slower).
inline bool outgrows_l2(int64_t bytes, int threads) {
#if defined(_SC_LEVEL2_CACHE_SIZE)
  static const int64_t l2 = [] {
    const long v = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return v > 0 ? static_cast<int64_t>(v) : int64_t{1} << 20;
  }();
#else
  constexpr int64_t l2 = int64_t{1} << 20;
#endif
  return bytes > l2 * (threads > 0 ? threads : 1);
}

template <int32_t DT, int NHist, bool Guided, bool StoreD, bool StoreCarry, int NoiseMode>
void combine_impl(const Tensors& t, const ElemCoeffs* coeffs, const uint64_t* seeds, uint32_t step, uint32_t draw,
                  const NoiseSlice& slice) {
  using S = Storage<DT>;
  using T = typename S::T;
  const int64_t chunks = (t.n + kChunk - 1) / kChunk;
  const int64_t tasks = t.batch * chunks;
  const int threads = num_threads();
  constexpr int64_t kStreams = 3 + Guided + NHist + StoreD + StoreCarry;  // y, F_c, ..., y_out
  const bool ask = NoiseMode == 2 && outgrows_l2(kStreams * t.batch * t.n * int64_t{sizeof(T)}, threads);
  run_tasks(tasks, parallel(tasks, t.batch, t.n) ? threads : 1, [&](int64_t task) {
    const int64_t b = task / chunks, chunk_lo = (task % chunks) * kChunk;
    const int64_t chunk_hi = chunk_lo + kChunk < t.n ? chunk_lo + kChunk : t.n;
    const ElemCoeffs c = coeffs[b];
    const int64_t base = b * t.n;
    const T* y = static_cast<const T*>(t.y) + base;
    const T* fc = static_cast<const T*>(t.f_cond) + base;
    const T* fu = Guided ? static_cast<const T*>(t.f_uncond) + base : nullptr;
    const T* h0 = NHist > 0 ? static_cast<const T*>(t.hist[0]) + base : nullptr;
    const T* h1 = NHist > 1 ? static_cast<const T*>(t.hist[1]) + base : nullptr;
    const T* h2 = NHist > 2 ? static_cast<const T*>(t.hist[2]) + base : nullptr;
    const T* zin = NoiseMode == 1 ? static_cast<const T*>(t.noise) + base : nullptr;
    T* yo = static_cast<T*>(t.y_out) + base;
    T* dout = StoreD ? static_cast<T*>(t.d_out) + base : nullptr;
    T* cout = StoreCarry ? static_cast<T*>(t.carry_out) + base : nullptr;
    alignas(64) float zbuf[kTile];
    // fp16 / bf16 results through float tiles and store_half (each tile's inputs are read before its outputs
    // are written, so y_out may still alias y), fp16 inputs through float tiles and load_half
    constexpr bool kTiled = kStoreTile<DT>;
    alignas(64) float obuf[kTiled ? kTile : 1], dbuf[kTiled && StoreD ? kTile : 1],
        cbuf[kTiled && StoreCarry ? kTile : 1];
    constexpr int64_t kIn = kLoadTile<DT> ? kTile : 1;
    alignas(64) float ybuf[kIn], fcbuf[kIn], fubuf[Guided ? kIn : 1], h0buf[NHist > 0 ? kIn : 1],
        h1buf[NHist > 1 ? kIn : 1], h2buf[NHist > 2 ? kIn : 1], zibuf[NoiseMode == 1 ? kIn : 1];
    for (int64_t lo = chunk_lo; lo < chunk_hi; lo += kTile) {
      const int64_t hi = lo + kTile < chunk_hi ? lo + kTile : chunk_hi;
      if (NoiseMode == 2)
        noise_tile(seeds[b], step, draw, slice, lo, hi, zbuf, {y, fc, fu, h0, h1, h2, yo, dout, cout}, ask);
      if constexpr (kLoadTile<DT>) {
        load_half<DT>(y + lo, ybuf, hi - lo);
        load_half<DT>(fc + lo, fcbuf, hi - lo);
        if (Guided) load_half<DT>(fu + lo, fubuf, hi - lo);
        if (NHist > 0) load_half<DT>(h0 + lo, h0buf, hi - lo);
        if (NHist > 1) load_half<DT>(h1 + lo, h1buf, hi - lo);
        if (NHist > 2) load_half<DT>(h2 + lo, h2buf, hi - lo);
        if (NoiseMode == 1) load_half<DT>(zin + lo, zibuf, hi - lo);
      }
#pragma omp simd
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t j = i - lo;
        const float yv = input<DT>(y, ybuf, i, j), fcv = input<DT>(fc, fcbuf, i, j);
        const float fuv = Guided ? input<DT>(fu, fubuf, i, j) : 0.0f;
        const float f = Guided ? guide(fcv, fuv, c.w) : fcv;
        const float d = denoise(yv, f, c.p, c.q);
        const float z = NoiseMode == 1 ? input<DT>(zin, zibuf, i, j) : NoiseMode == 2 ? zbuf[j] : 0.0f;
        const float out = canonical_nan(update<NHist, NoiseMode != 0, Guided>(
            c, yv, d, fuv, NHist > 0 ? input<DT>(h0, h0buf, i, j) : 0.0f,
            NHist > 1 ? input<DT>(h1, h1buf, i, j) : 0.0f, NHist > 2 ? input<DT>(h2, h2buf, i, j) : 0.0f, z));
        if (kTiled) {
          if (StoreD) dbuf[j] = canonical_nan(d);
          if (StoreCarry) cbuf[j] = canonical_nan(carry<Guided>(c, yv, d, fuv));
          obuf[j] = out;
        } else {
          if (StoreD) dout[i] = S::store(canonical_nan(d));
          if (StoreCarry) cout[i] = S::store(canonical_nan(carry<Guided>(c, yv, d, fuv)));
          yo[i] = S::store(out);
        }
      }
      if constexpr (kTiled) {
        if (StoreD) store_half<DT>(dbuf, dout + lo, hi - lo);
        if (StoreCarry) store_half<DT>(cbuf, cout + lo, hi - lo);
        store_half<DT>(obuf, yo + lo, hi - lo);
      }
    }
  });
}

// noise_mode: 0 none, 1 read t.noise, 2 Philox from seeds (each sample's elements at their places in `slice`).  A step
// with a carry (LMS) never draws noise.
void combine(const Tensors& t, const ElemCoeffs* c, const uint64_t* seeds, uint32_t step, uint32_t draw,
             const NoiseSlice& slice, int32_t n_hist, int32_t noise_mode) {
  constexpr int kCarry = 3;  // the variant beside noise modes 0, 1, 2: a carry, no noise
  const int variant = t.carry_out != nullptr ? kCarry : noise_mode;
  int_switch<kFloat32, kFloat16, kBFloat16>(t.dtype, [&](auto dt) {
    int_switch<0, 1, 2, kMaxHistory>(n_hist, [&](auto nh) {
      bool_switch(t.f_uncond != nullptr, [&](auto guided) {
        bool_switch(t.d_out != nullptr, [&](auto store_d) {
          int_switch<0, 1, 2, kCarry>(variant, [&](auto v) {
            constexpr int kV = decltype(v)::value;
            combine_impl<decltype(dt)::value, decltype(nh)::value, decltype(guided)::value,
                         decltype(store_d)::value, kV == kCarry, kV == kCarry ? 0 : kV>(t, c, seeds, step, draw,
                                                                                        slice);
          });
        });
      });
    });
  });
}

void rescale_sums(const Tensors& t, float w, const RescaleWeights* ab, int32_t with_y, double* out) {
  switch (t.dtype) {
    case kFloat32: rescale_sums_impl<kFloat32>(t, w, ab, with_y, out); break;
    case kFloat16: rescale_sums_impl<kFloat16>(t, w, ab, with_y, out); break;
    default: rescale_sums_impl<kBFloat16>(t, w, ab, with_y, out); break;
  }
}

void half_stores(int32_t dtype, const float* src, uint16_t* dst, int64_t n) {
  if (dtype == kFloat16) store_half<kFloat16>(src, dst, n);
  else store_half<kBFloat16>(src, dst, n);
}

void half_loads(int32_t dtype, const uint16_t* src, float* dst, int64_t n) {
  if (dtype == kFloat16) load_half<kFloat16>(src, dst, n);
  else load_half<kBFloat16>(src, dst, n);
}

void philox_normals(uint64_t seed, uint32_t step, uint32_t draw, const NoiseSlice& slice, int64_t n, float* out) {
  alignas(64) float buf[kTile];
  for (int64_t lo = 0; lo < n; lo += kTile) {
    const int64_t m = n - lo < kTile ? n - lo : kTile;
    philox_tile(seed, step, draw, slice, lo / 4, (m + 3) / 4, buf);
    std::memcpy(out + lo, buf, static_cast<size_t>(m) * sizeof(float));
  }
}

void philox_rows(uint64_t seed, uint32_t step, uint32_t draw, uint64_t g0, int64_t ng, uint32_t* out) {
  alignas(64) uint32_t x[4][kTile / 4];
  for (int64_t lo = 0; lo < ng; lo += kTile / 4) {
    const int64_t m = ng - lo < kTile / 4 ? ng - lo : kTile / 4;
    philox_words(seed, step, draw, g0 + static_cast<uint64_t>(lo), m, x[0], x[1], x[2], x[3]);
    for (int64_t g = 0; g < m; ++g)
      for (int k = 0; k < 4; ++k) out[4 * (lo + g) + k] = x[k][g];
  }
}

}  // namespace ZSNR_CPU_ISA
}  // namespace cpu
}  // namespace zsnr
