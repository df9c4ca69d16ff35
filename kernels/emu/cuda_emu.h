// What kernels/cuda/*.cu use of CUDA, defined for the host so the same sources compile as C++
// and run on the CPU (build.rs force-includes this file and puts include/ before the system
// headers). A block's threads are fibers (runtime.cpp): __syncthreads is a barrier of the
// block; warp-synchronous operations (__shfl_xor_sync, ldmatrix, mma.sync) are a barrier of the
// warp's 32 lanes around an exchange of values, computed lane by lane as the PTX ISA lays out
// the fragments; cp.async copies land at the thread's wait for their group. Blocks run one
// after another, so a __shared__ array is a static one.
//
// Not emulated: timing, memory-model reordering, partial-warp masks (a mask other than all 32
// lanes is an error), and anything the kernels do not use.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#define HELIX_CUDA_EMU 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __constant__ static const
#define __align__(n) __attribute__((aligned(n)))

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
};
struct uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

namespace helix_emu {
// Stops the process with a message naming the block and thread (a kernel misused the
// emulated hardware, or deadlocked).
[[noreturn]] void fail(const char *what);
// Waits for every live thread of the block.
void sync_block();
// Waits for all 32 lanes of this thread's warp.
void sync_warp();
// This warp's exchange area for the thread's next warp operation: 32 slots of 64 bytes, one
// per lane. Operations alternate between two areas, so a lane that finished reading one
// operation's values can write the next one's while others still read: a lane cannot get
// two operations ahead, as the next operation's barrier waits for every lane.
unsigned char *warp_slots();
// The block's dynamic shared memory.
unsigned char *dynamic_shared();
// cp.async (async_copy.cuh): a copy of `bytes` bytes is recorded when issued and its
// destination filled with 0xff bytes (NaN: nothing defined yet); it lands (or zero-fills, with
// !valid) only when this thread's async_wait lets its group complete, so a read before the
// wait and a barrier sees the NaNs. A thread that returns with copies not waited for fails.
void async_copy(void *dst, const void *src, int bytes, bool valid);
void async_commit();
void async_wait(int in_flight);

inline int lane() { return threadIdx.x % 32; }

template <typename V> V *slots() {
  static_assert(sizeof(V) <= 64, "an exchanged value fits a 64-byte slot");
  return reinterpret_cast<V *>(warp_slots());
}

inline void full_mask(unsigned mask) {
  if (mask != 0xffffffffu) fail("a warp-synchronous op with a mask other than all 32 lanes");
}
}  // namespace helix_emu

inline void __syncthreads() { helix_emu::sync_block(); }
inline unsigned char *dynamic_shared_memory() { return helix_emu::dynamic_shared(); }

inline void cp_async_16(void *dst, const void *src, bool valid) {
  helix_emu::async_copy(dst, src, 16, valid);
}
inline void cp_async_4(void *dst, const void *src, bool valid) {
  helix_emu::async_copy(dst, src, 4, valid);
}
inline void cp_async_commit() { helix_emu::async_commit(); }
template <int N> inline void cp_async_wait() { helix_emu::async_wait(N); }

template <typename V> V __shfl_xor_sync(unsigned mask, V v, int lane_mask) {
  helix_emu::full_mask(mask);
  V *slot = helix_emu::slots<V>();
  const int lane = helix_emu::lane();
  slot[lane] = v;
  helix_emu::sync_warp();
  return slot[(lane ^ lane_mask) & 31];
}

// Storage types: bits only; arithmetic is in f32 through the conversions below, round to
// nearest even, as the CUDA headers' _rn functions.
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
struct __half {
  uint16_t bits;
};
struct __half2 {
  __half x, y;
};

inline float __bfloat162float(__nv_bfloat16 v) {
  const uint32_t u = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return {uint16_t((u >> 16) | 0x40)};
  u += 0x7fff + ((u >> 16) & 1);
  return {uint16_t(u >> 16)};
}
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
inline float __half2float(__half v) {
  _Float16 h;
  std::memcpy(&h, &v.bits, 2);
  return float(h);
}
inline __half __float2half_rn(float f) {
  const _Float16 h = _Float16(f);
  __half out;
  std::memcpy(&out.bits, &h, 2);
  return out;
}
inline __half2 __floats2half2_rn(float lo, float hi) {
  return {__float2half_rn(lo), __float2half_rn(hi)};
}

// Single-precision intrinsics: IEEE operations on the host (built without FMA contraction).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }

template <typename A, typename B> inline std::common_type_t<A, B> min(A a, B b) {
  return a < b ? a : b;
}
template <typename A, typename B> inline std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}

// --- The tensor-core instructions of kernels/cuda/tensor_core.cuh ------------------------------

namespace helix_emu {
// A 16-bit element of a packed pair: the low half holds the first.
inline uint16_t half_of(uint32_t r, int which) { return uint16_t(which ? r >> 16 : r); }
inline uint32_t pair(uint16_t lo, uint16_t hi) { return uint32_t(lo) | (uint32_t(hi) << 16); }

template <typename T> float element(uint16_t bits);
template <> inline float element<__nv_bfloat16>(uint16_t bits) { return __bfloat162float({bits}); }
template <> inline float element<__half>(uint16_t bits) { return __half2float({bits}); }

// ldmatrix .x4: lane i names row i % 8 of matrix i / 8 (8 16-bit elements, 16-byte aligned).
inline void ldmatrix(uint32_t (&r)[4], const void *p, bool trans) {
  if (reinterpret_cast<uintptr_t>(p) % 16) fail("ldmatrix: a row address that is not 16-byte aligned");
  const void **rows = slots<const void *>();
  const int lane = helix_emu::lane(), g = lane / 4, t = lane % 4;
  rows[lane] = p;
  sync_warp();
  for (int m = 0; m < 4; ++m) {
    const auto row = [&](int i) { return static_cast<const uint16_t *>(rows[m * 8 + i]); };
    // Row g, columns 2t and 2t + 1; transposed: column g of rows 2t and 2t + 1.
    r[m] = trans ? pair(row(2 * t)[g], row(2 * t + 1)[g]) : pair(row(g)[2 * t], row(g)[2 * t + 1]);
  }
}
}  // namespace helix_emu

inline void ldmatrix_x4(uint32_t (&r)[4], const void *p) { helix_emu::ldmatrix(r, p, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void *p) { helix_emu::ldmatrix(r, p, true); }

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: d += A · B. Lane 4g + t holds A's rows g
// and g + 8 at columns 2t, 2t + 1 (registers 0, 1) and 2t + 8, 2t + 9 (registers 2, 3); B's
// column g at rows 2t, 2t + 1 (register 0) and 2t + 8, 2t + 9 (register 1); d's rows g, g + 8 at
// columns 2t, 2t + 1. Products of 16-bit floats are exact in f32; they are summed in order of k.
template <typename T>
inline void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  struct Fragments {
    uint32_t a[4], b[2];
  };
  Fragments *f = helix_emu::slots<Fragments>();
  const int lane = helix_emu::lane(), g = lane / 4, t = lane % 4;
  f[lane] = {{a[0], a[1], a[2], a[3]}, {b0, b1}};
  helix_emu::sync_warp();
  const auto a_at = [&](int row, int k) {
    const uint32_t r = f[(row % 8) * 4 + (k % 8) / 2].a[(row >= 8) + 2 * (k >= 8)];
    return helix_emu::element<T>(helix_emu::half_of(r, k & 1));
  };
  const auto b_at = [&](int k, int col) {
    const uint32_t r = f[col * 4 + (k % 8) / 2].b[k >= 8];
    return helix_emu::element<T>(helix_emu::half_of(r, k & 1));
  };
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
    float acc = d[e];
    for (int k = 0; k < 16; ++k) acc += a_at(row, k) * b_at(k, col);
    d[e] = acc;
  }
}
