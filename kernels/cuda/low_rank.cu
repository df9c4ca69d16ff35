// LoRA's rank-r products (src/low_rank.rs holds the CPU loops they are checked against). The
// large operand x or y is in the storage type T and read as f32 exactly; the adapters and the
// rank-r activations l are f32. So the LoRA path reads a bf16 activation once, where casting
// it to f32 for an f32 matmul would read it, write twice its size and read that again.
//
// All three are bound by reading the activation (a rank-8 product does 8 multiply-adds per
// value read), so each is laid out to keep enough loads in flight to stream it at the memory's
// rate: hundreds of blocks however few rows there are (a 7B projection has 2,048 rows and
// 4,096 columns), the next tile's loads issued before the current tile's arithmetic, and the
// small operand read once per tile of rows rather than once per value. Sums are split into
// partial sums written in a fixed order and added in that order, so results repeat run to run.
//
// Each has a `_dropped` form for LoRA's dropout, which lies between the layer's input and A:
// x read under a dropout mask (dropout_mask.cuh) in x Aᵀ and lᵀ x, and the product l A under
// it in y + l A (the input's gradient). The mask is drawn from its key as the value is read,
// so no dropped copy of x, nor of its gradient, is written.
#include "common.cuh"
#include "dropout_mask.cuh"

// Threads per block of every kernel here.
#define LOW_RANK_THREADS 256
// Ranks a block accumulates at once; more take further blocks (grid.z) or passes.
#define RANK_GROUP 16

// `project`: rows of x per block, columns per staged tile, and columns per block (grid.y).
#define PROJECT_ROWS 32
#define PROJECT_TILE 64
#define PROJECT_SPAN 512
// Row stride of the staged x tile: the 4 rows × 8 column phases a warp reads fall on 32
// different banks.
#define PROJECT_STRIDE (PROJECT_TILE + 8)

// x [n, k]'s element at `at` as f32, multiplied by its mask factor under kDrop.
template <typename T, bool kDrop>
__device__ __forceinline__ float read_x(const T* __restrict__ x, long long at,
                                        const DropoutMask& mask) {
  const float v = to_f32(x[at]);
  if constexpr (kDrop) return __fmul_rn(v, mask.factor((uint64_t)at));
  return v;
}

// Loads one PROJECT_ROWS × PROJECT_TILE tile of x (columns [c0, c0 + PROJECT_TILE) below
// c_end) into registers, eight values a thread, zero outside x or the block's columns.
template <typename T, bool kDrop>
__device__ __forceinline__ void project_load(const T* __restrict__ x, float (&next)[8], int n,
                                             int k, int row0, int c0, int c_end,
                                             const DropoutMask& mask) {
#pragma unroll
  for (int u = 0; u < 8; ++u) {
    const int e = threadIdx.x + u * LOW_RANK_THREADS;
    const int i = e / PROJECT_TILE, c = c0 + e % PROJECT_TILE;
    next[u] = row0 + i < n && c < c_end
                  ? read_x<T, kDrop>(x, (long long)(row0 + i) * k + c, mask)
                  : 0.0f;
  }
}

// partial [splits, n, r] with splits = gridDim.y: block (bx, by, bz) sums, for rows
// [32 bx, 32 bx + 32) of x [n, k] and ranks [16 bz, 16 bz + 16) of m [r, k], x · mᵀ over the
// columns [512 by, 512 by + 512). Eight threads share a row, each summing every eighth column
// of a tile into 16 accumulators; the eight are added by shuffles at the end. Under kDrop, x
// is read under `mask`.
template <typename T, bool kDrop>
__device__ void low_rank_project(const T* __restrict__ x, const float* __restrict__ m,
                                 float* __restrict__ partial, int n, int k, int r,
                                 DropoutMask mask) {
  __shared__ float xs[PROJECT_ROWS][PROJECT_STRIDE];
  __shared__ float ms[RANK_GROUP][PROJECT_TILE];
  const int row0 = blockIdx.x * PROJECT_ROWS;
  const int c_begin = blockIdx.y * PROJECT_SPAN, c_end = min(k, c_begin + PROJECT_SPAN);
  const int j0 = blockIdx.z * RANK_GROUP, js = min(RANK_GROUP, r - j0);
  const int row = threadIdx.x / 8, phase = threadIdx.x % 8;
  float acc[RANK_GROUP];
#pragma unroll
  for (int j = 0; j < RANK_GROUP; ++j) acc[j] = 0.0f;
  float next[8];
  project_load<T, kDrop>(x, next, n, k, row0, c_begin, c_end, mask);
  for (int c0 = c_begin; c0 < c_end; c0 += PROJECT_TILE) {
    __syncthreads();  // the previous tile is no longer read
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int e = threadIdx.x + u * LOW_RANK_THREADS;
      xs[e / PROJECT_TILE][e % PROJECT_TILE] = next[u];
    }
    for (int e = threadIdx.x; e < RANK_GROUP * PROJECT_TILE; e += LOW_RANK_THREADS) {
      const int j = e / PROJECT_TILE, c = c0 + e % PROJECT_TILE;
      ms[j][e % PROJECT_TILE] = j < js && c < c_end ? m[(long long)(j0 + j) * k + c] : 0.0f;
    }
    __syncthreads();
    // The next tile's loads go out before this tile's arithmetic.
    if (c0 + PROJECT_TILE < c_end)
      project_load<T, kDrop>(x, next, n, k, row0, c0 + PROJECT_TILE, c_end, mask);
#pragma unroll 2
    for (int cc = 0; cc < PROJECT_TILE / 8; ++cc) {
      const int c = phase + 8 * cc;
      const float v = xs[row][c];
#pragma unroll
      for (int j = 0; j < RANK_GROUP; ++j) acc[j] += v * ms[j][c];
    }
  }
  // The eight phases of a row are eight neighbouring lanes.
#pragma unroll
  for (int j = 0; j < RANK_GROUP; ++j)
    for (int o = 1; o < 8; o <<= 1) acc[j] += __shfl_xor_sync(0xffffffff, acc[j], o);
  if (phase == 0 && row0 + row < n) {
    float* out = partial + ((long long)blockIdx.y * n + row0 + row) * r + j0;
#pragma unroll
    for (int j = 0; j < RANK_GROUP; ++j)
      if (j < js) out[j] = acc[j];
  }
}

// out [len] = Σ over the parts, in order, of partial [parts, len].
extern "C" __global__ void low_rank_sum_parts_f32(const float* __restrict__ partial,
                                                  float* __restrict__ out, int parts,
                                                  long long len) {
  for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < len;
       e += (long long)gridDim.x * blockDim.x) {
    float s = 0.0f;
    for (int b = 0; b < parts; ++b) s += partial[b * len + e];
    out[e] = s;
  }
}

// Stages ls [ROWS, 16] = l [row0 + i, j0 + j] (l [n, r]) for i < rows and j < js, zero past
// them, between barriers: after the block's last read of the previous ls, before its first read
// of this one.
template <int ROWS>
__device__ __forceinline__ void stage_l(float (&ls)[ROWS][RANK_GROUP], const float* __restrict__ l,
                                        int r, int row0, int rows, int j0, int js) {
  __syncthreads();
  for (int e = threadIdx.x; e < ROWS * RANK_GROUP; e += LOW_RANK_THREADS) {
    const int i = e / RANK_GROUP, j = e % RANK_GROUP;
    ls[i][j] = i < rows && j < js ? l[(long long)(row0 + i) * r + j0 + j] : 0.0f;
  }
  __syncthreads();
}

// `add_product`: rows per block.
#define ADD_ROWS 32

// out [n, c] = y + l · m for y [n, c] (T), l [n, r], m [r, c]: the product summed over j in
// order, then y added, in f32, rounded to T once (PEFT adds its f32 update to a bf16 output in
// f32 and rounds the sum). With kAcc, that sum is added to acc [n, c] (T) and rounded again:
// what adding it to acc afterwards gives (a residual, or the input gradient of the projections
// before it in a group), without writing the sum and reading it back. A thread per column
// (blockIdx.x · 256 + threadIdx.x) and ADD_ROWS rows (blockIdx.y): its column of m is read
// once for all of them, 16 ranks at a time, and the rows' l is staged in shared memory, read
// by every thread alike. Under kDrop, the product l · m is multiplied by `mask` before y is
// added (the input's gradient through dropout: y the base projection's, l · m the LoRA path's).
template <typename T, bool kAcc, bool kDrop>
__device__ void low_rank_add_product(const T* __restrict__ y, const float* __restrict__ l,
                                     const float* __restrict__ m, const T* __restrict__ acc,
                                     T* __restrict__ out, int n, int c, int r,
                                     DropoutMask mask) {
  __shared__ float ls[ADD_ROWS][RANK_GROUP];
  const int col = blockIdx.x * LOW_RANK_THREADS + threadIdx.x;
  const int row0 = blockIdx.y * ADD_ROWS, rows = min(ADD_ROWS, n - row0);
  float s[ADD_ROWS];
#pragma unroll
  for (int i = 0; i < ADD_ROWS; ++i) s[i] = 0.0f;
  for (int j0 = 0; j0 < r; j0 += RANK_GROUP) {
    const int js = min(RANK_GROUP, r - j0);
    stage_l(ls, l, r, row0, rows, j0, js);
    if (col < c) {
#pragma unroll
      for (int j = 0; j < RANK_GROUP; ++j) {
        if (j < js) {
          const float mj = m[(long long)(j0 + j) * c + col];
#pragma unroll
          for (int i = 0; i < ADD_ROWS; ++i) s[i] += ls[i][j] * mj;
        }
      }
    }
  }
  if (col >= c) return;
#pragma unroll
  for (int i = 0; i < ADD_ROWS; ++i) {
    if (i < rows) {
      const long long e = (long long)(row0 + i) * c + col;
      float product = s[i];
      if constexpr (kDrop) product = __fmul_rn(product, mask.factor((uint64_t)e));
      const float sum = product + to_f32(y[e]);
      out[e] = from_f32<T>(kAcc ? to_f32(acc[e]) + round_to<T>(sum) : sum);
    }
  }
}

// `outer_sum`: rows of l staged at a time.
#define OUTER_ROWS 64

// partial [parts, r, k] with parts = gridDim.y: part b's Σ over its rows i (rows_per_part of
// them from b · rows_per_part) of l[i, j] · x[i, col], a thread per column (blockIdx.x · 256 +
// threadIdx.x), 16 ranks at a time in registers; l's rows are staged OUTER_ROWS at a time in
// shared memory, where every thread reads the same value (broadcast). Under kDrop, x is read
// under `mask`.
template <typename T, bool kDrop>
__device__ void low_rank_outer_partial(const float* __restrict__ l, const T* __restrict__ x,
                                       float* __restrict__ partial, int n, int r, int k,
                                       int rows_per_part, DropoutMask mask) {
  __shared__ float ls[OUTER_ROWS][RANK_GROUP];
  const int col = blockIdx.x * LOW_RANK_THREADS + threadIdx.x;
  const int b = blockIdx.y;
  const int i_begin = b * rows_per_part, i_end = min(n, i_begin + rows_per_part);
  for (int j0 = 0; j0 < r; j0 += RANK_GROUP) {
    const int js = min(RANK_GROUP, r - j0);
    float acc[RANK_GROUP];
#pragma unroll
    for (int j = 0; j < RANK_GROUP; ++j) acc[j] = 0.0f;
    for (int s0 = i_begin; s0 < i_end; s0 += OUTER_ROWS) {
      const int rows = min(OUTER_ROWS, i_end - s0);
      stage_l(ls, l, r, s0, rows, j0, js);
      if (col < k) {
        const long long at0 = (long long)s0 * k + col;
#pragma unroll 8
        for (int i = 0; i < rows; ++i) {
          const float v = read_x<T, kDrop>(x, at0 + (long long)i * k, mask);
#pragma unroll
          for (int j = 0; j < RANK_GROUP; ++j) acc[j] += ls[i][j] * v;
        }
      }
    }
    if (col < k)
      for (int j = 0; j < js; ++j) partial[((long long)b * r + j0 + j) * k + col] = acc[j];
  }
}

// The mask's three values, as the `_dropped` entry points take them after the others.
#define MASK_PARAMS uint64_t key, uint32_t threshold, float scale
#define MASK DropoutMask{key, threshold, scale}

#define LOW_RANK_KERNELS(T, S)                                                                 \
  extern "C" __global__ void __launch_bounds__(LOW_RANK_THREADS, 3)                            \
      low_rank_project_##S(const T* x, const float* m, float* partial, int n, int k, int r) {  \
    low_rank_project<T, false>(x, m, partial, n, k, r, DropoutMask{});                         \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(LOW_RANK_THREADS, 3)                            \
      low_rank_project_dropped_##S(const T* x, const float* m, float* partial, int n, int k,   \
                                   int r, MASK_PARAMS) {                                       \
    low_rank_project<T, true>(x, m, partial, n, k, r, MASK);                                   \
  }                                                                                            \
  extern "C" __global__ void low_rank_add_product_##S(const T* y, const float* l,              \
                                                      const float* m, T* out, int n, int c,    \
                                                      int r) {                                 \
    low_rank_add_product<T, false, false>(y, l, m, nullptr, out, n, c, r, DropoutMask{});      \
  }                                                                                            \
  extern "C" __global__ void low_rank_add_product_to_##S(const T* y, const float* l,           \
                                                         const float* m, const T* acc, T* out, \
                                                         int n, int c, int r) {                \
    low_rank_add_product<T, true, false>(y, l, m, acc, out, n, c, r, DropoutMask{});           \
  }                                                                                            \
  extern "C" __global__ void low_rank_add_dropped_product_##S(                                 \
      const T* y, const float* l, const float* m, T* out, int n, int c, int r, MASK_PARAMS) {  \
    low_rank_add_product<T, false, true>(y, l, m, nullptr, out, n, c, r, MASK);                \
  }                                                                                            \
  extern "C" __global__ void low_rank_add_dropped_product_to_##S(                              \
      const T* y, const float* l, const float* m, const T* acc, T* out, int n, int c, int r,   \
      MASK_PARAMS) {                                                                           \
    low_rank_add_product<T, true, true>(y, l, m, acc, out, n, c, r, MASK);                     \
  }                                                                                            \
  extern "C" __global__ void low_rank_outer_partial_##S(const float* l, const T* x,            \
                                                        float* partial, int n, int r, int k,   \
                                                        int rows_per_part) {                   \
    low_rank_outer_partial<T, false>(l, x, partial, n, r, k, rows_per_part, DropoutMask{});    \
  }                                                                                            \
  extern "C" __global__ void low_rank_outer_partial_dropped_##S(                               \
      const float* l, const T* x, float* partial, int n, int r, int k, int rows_per_part,      \
      MASK_PARAMS) {                                                                           \
    low_rank_outer_partial<T, true>(l, x, partial, n, r, k, rows_per_part, MASK);              \
  }

FOR_EACH_DTYPE(LOW_RANK_KERNELS)
