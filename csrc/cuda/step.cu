// The fused CUDA step: kernels and launchers over the shared math of csrc/include/zsnr.  See step.cuh.
//
// Kernels:
//   coeffs_kernel    one block; thread i computes sample i's step coefficients with the shared float64
//                    functions (step_coeffs, denoise_coeffs, rescale_space_coeffs) and the block writes the
//                    step's StepStatus.  No host synchronisation: errors stay on the device.
//   rescale_kernel   grid (chunk, sample): float sums per thread, double across the block (warp shuffles),
//                    one partial per chunk; the last block of a sample (atomic ticket) adds the partials in
//                    chunk order (deterministic) and folds the guidance rescale factor into (p, q).
//   combine_kernel   grid (group, sample), grid-stride with 64-bit indices over groups of four elements (one
//                    Philox group, docs/design.md §2.8): vector loads/stores (float4, or 4 x 16-bit in 8 bytes) when
//                    every pointer is aligned and n % 4 == 0, scalar otherwise.  The element math is combine.h.
//
// Byte model of the element pass (N = batch * n elements): reads y, F_c (, F_u), each remembered tensor
// (, the explicit noise), writes y_out (, D, carry), once each.  The statistics pass reads F_c, F_u (, y).
//
// Floating-point contraction: built with nvcc's default --fmad=true.  combine.h and philox.h write every
// multiply-add whose rounding matters as an explicit fmaf and contain no other a*b+c, so the element pass
// rounds exactly as the CPU backend does (conversions are round-to-nearest-even on both).  The float64
// coefficient code may contract; it could not be bit-exact with the host anyway, because CUDA's log, expm1,
// hypot differ from glibc's by an ulp, and the shared header promises ~1 ulp, not bits (coefficients.h).
#include "cuda/step.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "zsnr/combine.h"
#include "zsnr/dispatch.h"
#include "zsnr/philox.h"

namespace zsnr {
namespace cuda {
namespace {

constexpr int kThreads = 256;        // combine and statistics blocks
constexpr int kCoeffThreads = 256;   // the coefficient kernel's single block
constexpr int64_t kMaxGridX = 65535;  // grid-stride beyond this (plenty to fill any current GPU)
constexpr int64_t kMaxGridY = 65535;  // the hardware limit of gridDim.y; samples beyond it loop
constexpr unsigned long long kNoError = ~0ull;

static_assert(kStatsChunk % (4 * kThreads) == 0, "a statistics chunk is whole groups of every thread");

// ---------------------------------------------------------------------------------- storage I/O

// Loads and stores of one storage type, converting to and from float (round to nearest even).  load4 and
// store4 move four consecutive elements in one access of 4 * sizeof(T) bytes (the caller checks alignment).
template <typename T>
struct Io;

template <>
struct Io<float> {
  __device__ __forceinline__ static float load(const float* p) { return *p; }
  __device__ __forceinline__ static void store(float* p, float v) { *p = v; }
  __device__ __forceinline__ static void load4(const float* p, float v[4]) {
    const float4 x = *reinterpret_cast<const float4*>(p);
    v[0] = x.x, v[1] = x.y, v[2] = x.z, v[3] = x.w;
  }
  __device__ __forceinline__ static void store4(float* p, const float v[4]) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  }
};

// 16-bit storage through its bits: Bits16 supplies to_float(uint16) and from_float(float) -> uint16.
template <typename T, typename Bits16>
struct Io16 {
  __device__ __forceinline__ static float load(const T* p) {
    return Bits16::to_float(*reinterpret_cast<const unsigned short*>(p));
  }
  __device__ __forceinline__ static void store(T* p, float v) {
    *reinterpret_cast<unsigned short*>(p) = Bits16::from_float(v);
  }
  __device__ __forceinline__ static void load4(const T* p, float v[4]) {
    const uint2 x = *reinterpret_cast<const uint2*>(p);  // little endian: element 0 is the low half of x.x
    v[0] = Bits16::to_float(static_cast<unsigned short>(x.x & 0xffffu));
    v[1] = Bits16::to_float(static_cast<unsigned short>(x.x >> 16));
    v[2] = Bits16::to_float(static_cast<unsigned short>(x.y & 0xffffu));
    v[3] = Bits16::to_float(static_cast<unsigned short>(x.y >> 16));
  }
  __device__ __forceinline__ static void store4(T* p, const float v[4]) {
    uint2 x;
    x.x = static_cast<unsigned int>(Bits16::from_float(v[0])) |
          (static_cast<unsigned int>(Bits16::from_float(v[1])) << 16);
    x.y = static_cast<unsigned int>(Bits16::from_float(v[2])) |
          (static_cast<unsigned int>(Bits16::from_float(v[3])) << 16);
    *reinterpret_cast<uint2*>(p) = x;
  }
};

struct HalfBits {  // from_float: a NaN (every NaN here is canonical_nan's) as kNaNFloat16, not cvt's 0x7fff
  __device__ __forceinline__ static float to_float(unsigned short b) { return __half2float(__ushort_as_half(b)); }
  __device__ __forceinline__ static unsigned short from_float(float v) {
    return v == v ? __half_as_ushort(__float2half_rn(v)) : kNaNFloat16;
  }
};

struct BFloat16Bits {
  __device__ __forceinline__ static float to_float(unsigned short b) {
    return __uint_as_float(static_cast<unsigned int>(b) << 16);  // exact
  }
  __device__ __forceinline__ static unsigned short from_float(float v) {
    return v == v ? __bfloat16_as_ushort(__float2bfloat16_rn(v)) : kNaNBFloat16;
  }
};

template <>
struct Io<__half> : Io16<__half, HalfBits> {};
template <>
struct Io<__nv_bfloat16> : Io16<__nv_bfloat16, BFloat16Bits> {};

// Scalar loads of the elements [j, j + cnt) of one tensor into v[0..4), zeros past cnt.
template <typename T>
__device__ __forceinline__ void load_tail(const T* p, int64_t j, int cnt, float v[4]) {
#pragma unroll
  for (int k = 0; k < 4; ++k) v[k] = k < cnt ? Io<T>::load(p + j + k) : 0.0f;
}

template <typename T>
__device__ __forceinline__ void store_tail(T* p, int64_t j, int cnt, const float v[4]) {
#pragma unroll
  for (int k = 0; k < 4; ++k)
    if (k < cnt) Io<T>::store(p + j + k, v[k]);
}

template <typename T>
__device__ __forceinline__ void load_group(const T* p, int64_t j, bool vec, int cnt, float v[4]) {
  if (vec) Io<T>::load4(p + j, v);
  else load_tail(p, j, cnt, v);
}

template <typename T>
__device__ __forceinline__ void store_group(T* p, int64_t j, bool vec, int cnt, const float v[4]) {
  if (vec) Io<T>::store4(p + j, v);
  else store_tail(p, j, cnt, v);
}

// Sample b's record: the coefficient kernel's, or its table row as zsnr/step_plan.h's table_coeffs reads it.
__device__ __forceinline__ SampleCoeffs record_of(const CoeffSource& s, int64_t b) {
  const int64_t i = s.n == 1 ? 0 : b;
  return s.table != nullptr ? table_coeffs(s.table + i * kNumCoeffs) : s.records[i];
}

// ------------------------------------------------------------------------------ coefficient kernel

struct CoeffKernelArgs {
  StepPlan plan;
  int32_t rescale;          // compute the rescale space (u, t)
  int32_t n_hist_given;     // remembered tensors the combine will read
  int32_t noise_available;  // 0 none, 1 tensor, 2 Philox
  SampleCoeffs* out;        // [n_sigma]
  double* sigma_out;        // [n_sigma] or nullptr
  StepStatus* status;
};

__device__ __forceinline__ void poison(ElemCoeffs* c) {
  const float nan = __int_as_float(0x7fffffff);
  c->w = c->p = c->q = c->a = c->b = c->e = c->g_y = c->g_d = c->u = c->g_u = nan;
  for (int k = 0; k < kMaxHistory; ++k) c->h[k] = nan;
}

// Sample i's record (zsnr/step_plan.h's sample_coeffs, as on the CPU), NaN-poisoned when it failed.
__device__ SampleCoeffs device_sample_coeffs(const CoeffKernelArgs& a, int64_t i, double* sigma_out) {
  SampleCoeffs r = sample_coeffs(a.plan, i, a.rescale != 0);
  if (r.error != kOk) {
    poison(&r.ec);
    r.p = r.q = NAN;
  }
  *sigma_out = r.error == kOk ? r.sigma_out : NAN;
  return r;
}

// One block: phase 1 writes every sample's record, phase 2 (after the block barrier, which makes the
// block's global writes visible to the block) reduces them to the status and poisons the samples whose
// step needs what the launch does not supply.
__global__ void __launch_bounds__(kCoeffThreads) coeffs_kernel(const CoeffKernelArgs a) {
  __shared__ unsigned long long s_first;  // min over samples of (sample << 32) | error
  __shared__ int s_hist, s_noise, s_hist_short, s_noise_short;
  if (threadIdx.x == 0) {
    s_first = kNoError;
    s_hist = s_noise = s_hist_short = s_noise_short = 0;
  }
  const int64_t ns = a.plan.n_sigma;
  for (int64_t i = threadIdx.x; i < ns; i += blockDim.x) {
    double so;
    a.out[i] = device_sample_coeffs(a, i, &so);
    if (a.sigma_out != nullptr) a.sigma_out[i] = so;
  }
  __syncthreads();

  const int32_t complete0 = a.out[0].complete;
  for (int64_t i = threadIdx.x; i < ns; i += blockDim.x) {
    SampleCoeffs& r = a.out[i];
    const unsigned long long at = static_cast<unsigned long long>(i) << 32;
    if (r.error != kOk) {
      atomicMin(&s_first, at | static_cast<unsigned int>(r.error));
      continue;
    }
    if (r.complete != complete0) atomicMin(&s_first, at | static_cast<unsigned int>(kErrMixedStages));
    atomicMax(&s_hist, r.n_hist);
    const bool noisy = r.ec.e != 0.0f;
    if (noisy) atomicOr(&s_noise, 1);
    const bool hist_short = r.n_hist > a.n_hist_given;
    const bool noise_short = noisy && a.noise_available == 0;
    if (hist_short) atomicOr(&s_hist_short, 1);
    if (noise_short) atomicOr(&s_noise_short, 1);
    if (hist_short || noise_short) poison(&r.ec);
  }
  __syncthreads();

  if (threadIdx.x == 0) {
    StepStatus st;
    st.error = kOk;
    st.bad_sample = -1;
    if (s_first != kNoError) {
      st.error = static_cast<int32_t>(s_first & 0xffffffffull);
      st.bad_sample = static_cast<int64_t>(s_first >> 32);
    } else if (s_hist_short) {
      st.error = kErrNeedsHistory;
    } else if (s_noise_short) {
      st.error = kErrNeedsNoise;
    }
    st.complete = complete0;
    st.noise_used = s_noise;
    st.n_hist_used = s_hist;
    *a.status = st;
  }
}

// ------------------------------------------------------------------------- rescale statistics pass

struct RescaleKernelArgs {
  const void* y;  // read only when the space is not `output`
  const void* fc;
  const void* fu;
  int64_t batch, n, chunks;
  int32_t vec;
  CoeffSource coeffs;
  double w, phi;
  double* partials;
  unsigned int* counters;
  FoldedPQ* pq;
};

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

template <typename T, bool WithY>
__global__ void __launch_bounds__(kThreads) rescale_kernel(const RescaleKernelArgs a) {
  constexpr int kWarps = kThreads / 32;
  __shared__ double s_part[kWarps][kNumSums];
  __shared__ double s_total[kNumSums];
  __shared__ int s_last;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t n = a.n;
  const bool vec = a.vec != 0;
  const float w = static_cast<float>(a.w);

  for (int64_t b = blockIdx.y; b < a.batch; b += gridDim.y) {
    const T* __restrict__ fc = static_cast<const T*>(a.fc) + b * n;
    const T* __restrict__ fu = static_cast<const T*>(a.fu) + b * n;
    const T* __restrict__ y = WithY ? static_cast<const T*>(a.y) + b * n : nullptr;
    // combine.h RescaleSum: the terms of rescale_terms, less the sample's first element's (the pivots)
    RescaleWeights ab{0.0f, 1.0f};  // G/s = b F + a y of the sample
    if (WithY) {
      const SampleCoeffs rc = record_of(a.coeffs, b);
      ab = rescale_weights(rc.u, rc.t);
    }
    const RescaleSample smp = rescale_sample(Io<T>::load(fc), Io<T>::load(fu), WithY ? Io<T>::load(y) : 0.0f, w, ab);
    for (int64_t chunk = blockIdx.x; chunk < a.chunks; chunk += gridDim.x) {
      const int64_t lo = chunk * kStatsChunk;
      const int64_t hi = lo + kStatsChunk < n ? lo + kStatsChunk : n;
      // Each thread sums at most kStatsChunk / kThreads = 64 elements in float.
      float acc[kNumSums];
#pragma unroll
      for (int k = 0; k < kNumSums; ++k) acc[k] = 0.0f;
      for (int64_t j = lo + 4 * static_cast<int64_t>(threadIdx.x); j < hi; j += 4 * kThreads) {
        const int cnt = hi - j < 4 ? static_cast<int>(hi - j) : 4;
        float c[4], u[4], v[4];
        load_group(fc, j, vec, cnt, c);
        load_group(fu, j, vec, cnt, u);
        if (WithY) load_group(y, j, vec, cnt, v);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (k < cnt) {  // elements past cnt add nothing
            float gc, g;
            rescale_terms<WithY>(c[k], u[k], WithY ? v[k] : 0.0f, smp, &gc, &g);
            acc[kSumC] += gc;
            acc[kSumCC] += gc * gc;
            acc[kSumG] += g;
            acc[kSumGG] += g * g;
          }
        }
      }
#pragma unroll
      for (int k = 0; k < kNumSums; ++k) {
        const double s = warp_sum(static_cast<double>(acc[k]));
        if (lane == 0) s_part[warp][k] = s;
      }
      __syncthreads();
      if (threadIdx.x < kNumSums) {  // fixed order over warps
        double s = 0.0;
        for (int i = 0; i < kWarps; ++i) s += s_part[i][threadIdx.x];
        a.partials[(b * a.chunks + chunk) * kNumSums + threadIdx.x] = s;
      }
      // Last-block pattern: publish the partial, take a ticket; the block that completes the sample folds.
      __threadfence();
      __syncthreads();
      if (threadIdx.x == 0) {
        const unsigned int ticket = atomicAdd(&a.counters[b], 1u);
        s_last = ticket == static_cast<unsigned int>(a.chunks - 1);
      }
      __syncthreads();
      if (s_last) {  // block-uniform
        __threadfence();
        if (threadIdx.x < kNumSums) {
          double s = 0.0;  // chunk order: the result does not depend on which block came last
          for (int64_t c = 0; c < a.chunks; ++c)
            s += __ldcg(&a.partials[(b * a.chunks + c) * kNumSums + threadIdx.x]);
          s_total[threadIdx.x] = s;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
          const SampleCoeffs r = record_of(a.coeffs, b);
          double p = r.p, q = r.q;
          const double f = rescale_factor(s_total, static_cast<double>(n), a.phi);
          fold_rescale(f, r.u, r.t, &p, &q);
          a.pq[b] = FoldedPQ{static_cast<float>(p), static_cast<float>(q)};
          a.counters[b] = 0u;  // ready for the next step
        }
      }
      __syncthreads();  // the shared arrays are reused by the next chunk
    }
  }
}

// ------------------------------------------------------------------------------------ element pass

struct CombineArgs {
  const void* y;
  const void* fc;
  const void* fu;
  const void* h0;
  const void* h1;
  const void* h2;
  const void* noise;
  void* y_out;
  void* d_out;
  void* carry_out;
  int64_t batch, n;
  int32_t vec;
  CoeffSource coeffs;
  const FoldedPQ* pq;
  const uint64_t* seeds;
  uint32_t step, draw;
  NoiseSlice slice;  // each sample's place in the sample its noise is drawn for (zsnr/philox.h, groups whole)
};

template <typename T, int NHist, bool Guided, bool StoreD, bool StoreCarry, int NoiseMode>
__global__ void __launch_bounds__(kThreads) combine_kernel(const CombineArgs a) {
  const int64_t n = a.n;
  const int64_t groups = (n + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const bool vec = a.vec != 0;

  for (int64_t b = blockIdx.y; b < a.batch; b += gridDim.y) {
    ElemCoeffs c = record_of(a.coeffs, b).ec;
    if (a.pq != nullptr) {
      const FoldedPQ f = a.pq[b];
      c.p = f.p;
      c.q = f.q;
    }
    const bool noisy = NoiseMode != 0 && c.e != 0.0f;  // block-uniform: a sample with e = 0 draws nothing
    uint32_t seed_lo = 0, seed_hi = 0;
    if (NoiseMode == 2 && noisy) {
      const uint64_t seed = a.seeds[b];
      seed_lo = static_cast<uint32_t>(seed);
      seed_hi = static_cast<uint32_t>(seed >> 32);
    }
    const int64_t base = b * n;
    // No __restrict__: any output may alias any input exactly (out=y, a SamplingPlan reusing a dead buffer); each
    // element is read, then written, by one thread.
    const T* y = static_cast<const T*>(a.y) + base;
    const T* fc = static_cast<const T*>(a.fc) + base;
    const T* fu = Guided ? static_cast<const T*>(a.fu) + base : nullptr;
    const T* h0 = NHist > 0 ? static_cast<const T*>(a.h0) + base : nullptr;
    const T* h1 = NHist > 1 ? static_cast<const T*>(a.h1) + base : nullptr;
    const T* h2 = NHist > 2 ? static_cast<const T*>(a.h2) + base : nullptr;
    const T* zin = NoiseMode == 1 ? static_cast<const T*>(a.noise) + base : nullptr;
    T* yo = static_cast<T*>(a.y_out) + base;
    T* dout = StoreD ? static_cast<T*>(a.d_out) + base : nullptr;
    T* cout = StoreCarry ? static_cast<T*>(a.carry_out) + base : nullptr;

    for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
      const int64_t j = 4 * g;
      const int cnt = n - j < 4 ? static_cast<int>(n - j) : 4;
      float vy[4], vf[4], vu[4] = {}, v0[4] = {}, v1[4] = {}, v2[4] = {}, vz[4] = {};
      load_group(y, j, vec, cnt, vy);
      load_group(fc, j, vec, cnt, vf);
      if (Guided) load_group(fu, j, vec, cnt, vu);
      if (NHist > 0) load_group(h0, j, vec, cnt, v0);
      if (NHist > 1) load_group(h1, j, vec, cnt, v1);
      if (NHist > 2) load_group(h2, j, vec, cnt, v2);
      if (NoiseMode == 1 && noisy) load_group(zin, j, vec, cnt, vz);
      if (NoiseMode == 2 && noisy)
        philox_normal4(seed_lo, seed_hi, a.step, a.draw, slice_group(a.slice, static_cast<uint64_t>(g)), vz);
      float out[4], dv[4], cv[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float f = Guided ? guide(vf[k], vu[k], c.w) : vf[k];
        const float d = denoise(vy[k], f, c.p, c.q);
        out[k] = canonical_nan(noisy ? update<NHist, true, Guided>(c, vy[k], d, vu[k], v0[k], v1[k], v2[k], vz[k])
                                     : update<NHist, false, Guided>(c, vy[k], d, vu[k], v0[k], v1[k], v2[k], 0.0f));
        dv[k] = canonical_nan(d);
        cv[k] = StoreCarry ? canonical_nan(carry<Guided>(c, vy[k], d, vu[k])) : 0.0f;
      }
      if (StoreD) store_group(dout, j, vec, cnt, dv);
      if (StoreCarry) store_group(cout, j, vec, cnt, cv);
      store_group(yo, j, vec, cnt, out);
    }
  }
}

// --------------------------------------------------------------------------------- host helpers

template <typename T>
bool aligned(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) % (4 * sizeof(T))) == 0;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

dim3 grid_for(int64_t blocks_x, int64_t batch) {
  const int64_t x = blocks_x < 1 ? 1 : (blocks_x > kMaxGridX ? kMaxGridX : blocks_x);
  const int64_t y = batch > kMaxGridY ? kMaxGridY : batch;
  return dim3(static_cast<unsigned int>(x), static_cast<unsigned int>(y), 1);
}

bool tensors_ok(const Tensors& t) {
  if (t.dtype < kFloat32 || t.dtype > kBFloat16 || t.batch < 1 || t.n < 1) return false;
  if (t.n_hist < 0 || t.n_hist > kMaxHistory) return false;
  if (t.y == nullptr || t.f_cond == nullptr || t.y_out == nullptr) return false;
  for (int k = 0; k < t.n_hist; ++k)
    if (t.hist[k] == nullptr) return false;
  return true;
}

bool source_ok(const CoeffSource& s, int64_t batch) {
  return (s.records != nullptr) != (s.table != nullptr) && (s.n == 1 || s.n == batch);
}

size_t align_up(size_t v) { return (v + 255) & ~static_cast<size_t>(255); }

// ----------------------------------------------------------------------------- combine dispatch

// The element pass's kernel variant for what the launch passes: history depth, guidance, D stored, and the noise
// source or the carry (LMS, which never draws noise).
template <typename T>
cudaError_t launch_combine_typed(CombineArgs a, const Tensors& t, int32_t mode, cudaStream_t s) {
  bool vec = t.n % 4 == 0;
  const void* ptrs[] = {t.y, t.f_cond, t.f_uncond, t.hist[0], t.hist[1], t.hist[2], t.noise,
                        t.y_out, t.d_out, t.carry_out};
  for (const void* p : ptrs)
    if (p != nullptr) vec = vec && aligned<T>(p);  // unused slots are nullptr (set by launch_combine)
  a.vec = vec ? 1 : 0;
  const dim3 grid = grid_for(ceil_div(ceil_div(t.n, 4), kThreads), t.batch);
  constexpr int kCarry = 3;  // the variant beside noise modes 0, 1, 2: a carry, no noise
  const int variant = t.carry_out != nullptr ? kCarry : mode;
  return int_switch<0, 1, 2, kMaxHistory>(t.n_hist, [&](auto nh) {
    return bool_switch(t.f_uncond != nullptr, [&](auto guided) {
      return bool_switch(t.d_out != nullptr, [&](auto store_d) {
        return int_switch<0, 1, 2, kCarry>(variant, [&](auto v) {
          constexpr int kV = decltype(v)::value;
          combine_kernel<T, decltype(nh)::value, decltype(guided)::value, decltype(store_d)::value, kV == kCarry,
                         kV == kCarry ? 0 : kV><<<grid, kThreads, 0, s>>>(a);
          return cudaGetLastError();
        });
      });
    });
  });
}

template <typename T>
cudaError_t launch_rescale_typed(const RescaleKernelArgs& a, bool with_y, cudaStream_t s) {
  const dim3 grid = grid_for(a.chunks, a.batch);
  if (with_y) rescale_kernel<T, true><<<grid, kThreads, 0, s>>>(a);
  else rescale_kernel<T, false><<<grid, kThreads, 0, s>>>(a);
  return cudaGetLastError();
}

}  // namespace

// ------------------------------------------------------------------------------------ workspace

int64_t stats_chunks(int64_t n) { return n < 1 ? 1 : ceil_div(n, kStatsChunk); }

size_t workspace_bytes(int64_t batch, int64_t n) {
  const size_t b = static_cast<size_t>(batch < 1 ? 1 : batch);
  return align_up(b * sizeof(SampleCoeffs)) + align_up(b * sizeof(FoldedPQ)) +
         align_up(b * static_cast<size_t>(stats_chunks(n)) * kNumSums * sizeof(double)) +
         align_up(b * sizeof(unsigned int)) + align_up(sizeof(StepStatus));
}

Workspace workspace_carve(void* base, int64_t batch, int64_t n) {
  const size_t b = static_cast<size_t>(batch < 1 ? 1 : batch);
  char* p = static_cast<char*>(base);
  Workspace ws;
  ws.coeffs = reinterpret_cast<SampleCoeffs*>(p);
  p += align_up(b * sizeof(SampleCoeffs));
  ws.pq = reinterpret_cast<FoldedPQ*>(p);
  p += align_up(b * sizeof(FoldedPQ));
  ws.partials = reinterpret_cast<double*>(p);
  p += align_up(b * static_cast<size_t>(stats_chunks(n)) * kNumSums * sizeof(double));
  ws.counters = reinterpret_cast<unsigned int*>(p);
  p += align_up(b * sizeof(unsigned int));
  ws.status = reinterpret_cast<StepStatus*>(p);
  return ws;
}

// ------------------------------------------------------------------------------------ launchers

cudaError_t launch_coeffs(const Tensors& t, const StepPlan& plan, const Workspace& ws, double* sigma_out,
                          cudaStream_t stream) {
  if (!tensors_ok(t) || (plan.n_sigma != 1 && plan.n_sigma != t.batch) || plan.n_prev < 0 ||
      plan.n_prev > kMaxHistory || plan.sigma == nullptr || plan.sigma_eval == nullptr ||
      plan.sigma_next == nullptr || plan.sigma_hat_next == nullptr ||
      (plan.n_prev > 0 && plan.sigma_prev == nullptr) || ws.coeffs == nullptr || ws.status == nullptr)
    return cudaErrorInvalidValue;
  CoeffKernelArgs a;
  a.plan = plan;
  a.rescale = (t.f_uncond != nullptr && plan.guidance_rescale != 0.0) ? 1 : 0;
  a.n_hist_given = t.n_hist;
  a.noise_available = t.carry_out != nullptr ? 0 : (t.noise != nullptr ? 1 : (plan.seeds != nullptr ? 2 : 0));
  a.out = ws.coeffs;
  a.sigma_out = sigma_out;
  a.status = ws.status;
  coeffs_kernel<<<1, kCoeffThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t launch_rescale(const Tensors& t, const CoeffSource& coeffs, const RescaleParams& rp, const Workspace& ws,
                           cudaStream_t stream) {
  if (!tensors_ok(t) || t.f_uncond == nullptr || !source_ok(coeffs, t.batch) || ws.partials == nullptr ||
      ws.counters == nullptr || ws.pq == nullptr)
    return cudaErrorInvalidValue;
  const bool with_y = rp.rescale_space != kSpaceOutput;
  RescaleKernelArgs a;
  a.y = t.y;
  a.fc = t.f_cond;
  a.fu = t.f_uncond;
  a.batch = t.batch;
  a.n = t.n;
  a.chunks = stats_chunks(t.n);
  a.coeffs = coeffs;
  a.w = rp.guidance_scale;
  a.phi = rp.guidance_rescale;
  a.partials = ws.partials;
  a.counters = ws.counters;
  a.pq = ws.pq;
  switch (t.dtype) {
    case kFloat32:
      a.vec = t.n % 4 == 0 && aligned<float>(t.f_cond) && aligned<float>(t.f_uncond) &&
              (!with_y || aligned<float>(t.y));
      return launch_rescale_typed<float>(a, with_y, stream);
    case kFloat16:
      a.vec = t.n % 4 == 0 && aligned<__half>(t.f_cond) && aligned<__half>(t.f_uncond) &&
              (!with_y || aligned<__half>(t.y));
      return launch_rescale_typed<__half>(a, with_y, stream);
    default:
      a.vec = t.n % 4 == 0 && aligned<__nv_bfloat16>(t.f_cond) && aligned<__nv_bfloat16>(t.f_uncond) &&
              (!with_y || aligned<__nv_bfloat16>(t.y));
      return launch_rescale_typed<__nv_bfloat16>(a, with_y, stream);
  }
}

cudaError_t launch_combine(const Tensors& t, const CoeffSource& coeffs, const FoldedPQ* pq, int32_t noise_mode,
                           const uint64_t* seeds, uint32_t step_index, uint32_t draw, const NoiseSlice& slice,
                           cudaStream_t stream) {
  if (!tensors_ok(t) || !source_ok(coeffs, t.batch) || !slice_drawable(slice, t.n) || noise_mode < 0 ||
      noise_mode > 2 || (noise_mode == 1 && t.noise == nullptr) || (noise_mode == 2 && seeds == nullptr) ||
      (noise_mode != 0 && t.carry_out != nullptr))  // LMS (the carry) never draws noise
    return cudaErrorInvalidValue;
  // Only the tensors this variant reads enter the argument block (and the alignment test).
  Tensors u = t;
  for (int k = t.n_hist; k < kMaxHistory; ++k) u.hist[k] = nullptr;
  if (noise_mode != 1) u.noise = nullptr;
  CombineArgs a;
  a.y = u.y;
  a.fc = u.f_cond;
  a.fu = u.f_uncond;
  a.h0 = u.hist[0];
  a.h1 = u.hist[1];
  a.h2 = u.hist[2];
  a.noise = u.noise;
  a.y_out = u.y_out;
  a.d_out = u.d_out;
  a.carry_out = u.carry_out;
  a.batch = u.batch;
  a.n = u.n;
  a.vec = 0;
  a.coeffs = coeffs;
  a.pq = pq;
  a.seeds = seeds;
  a.step = step_index;
  a.draw = draw;
  a.slice = slice;
  switch (u.dtype) {
    case kFloat32: return launch_combine_typed<float>(a, u, noise_mode, stream);
    case kFloat16: return launch_combine_typed<__half>(a, u, noise_mode, stream);
    default: return launch_combine_typed<__nv_bfloat16>(a, u, noise_mode, stream);
  }
}

cudaError_t fused_step(const Tensors& t, const StepPlan& plan, const Workspace& ws, double* sigma_out,
                       cudaStream_t stream) {
  const bool table = plan.table != nullptr;
  if (!table) {
    const cudaError_t err = launch_coeffs(t, plan, ws, sigma_out, stream);
    if (err != cudaSuccess) return err;
  }
  const CoeffSource coeffs{table ? nullptr : ws.coeffs, plan.table, plan.n_sigma};
  const FoldedPQ* pq = nullptr;
  if (t.f_uncond != nullptr && plan.guidance_rescale != 0.0) {
    const RescaleParams rp{plan.guidance_scale, plan.guidance_rescale, plan.rescale_space};
    const cudaError_t err = launch_rescale(t, coeffs, rp, ws, stream);
    if (err != cudaSuccess) return err;
    pq = ws.pq;
  }
  const int32_t noise_mode = t.noise != nullptr ? 1 : (plan.seeds != nullptr ? 2 : 0);
  // a computed carry belongs to LMS, which adds no noise; a table's rows could ask for both, which no element-pass
  // variant does (Python refuses such a step before it gets here)
  if (table && t.carry_out != nullptr && noise_mode != 0) return cudaErrorInvalidValue;
  const int32_t mode = t.carry_out != nullptr ? 0 : noise_mode;
  return launch_combine(t, coeffs, pq, mode, plan.seeds, plan.step_index, plan.draw, plan.slice, stream);
}

}  // namespace cuda
}  // namespace zsnr
