// LoRA's rank-r products (src/low_rank.rs holds the CPU loops they are checked against). The
// large operand x or y is in the storage type T and read as f32 exactly; the adapters and the
// rank-r activations l are f32. So the LoRA path reads a bf16 activation once, where casting
// it to f32 for an f32 matmul would read it, write twice its size and read that again.
#include "common.cuh"

// Rows of x per block of `project`, columns per tile, and the largest rank it takes.
#define PROJECT_ROWS 32
#define PROJECT_TILE 64
#define PROJECT_PARTS 8
#define MAX_RANK 64

// out [n, r] = x [n, k] · mᵀ, m [r, k], with 256 threads a block. A block takes PROJECT_ROWS
// rows of x and goes over k a tile of PROJECT_TILE columns at a time, staging the rows and
// m's columns in shared memory. Warp w sums, for its lane's row, the tile's columns
// [8w, 8w + 8) into all r sums: each x value is read once for the r products, and m's values
// are the same for the whole warp (broadcast reads). The eight warps' partial sums are then
// added in order, 16 ranks at a time.
template <typename T>
__device__ void low_rank_project(const T* x, const float* m, float* out, int n, int k, int r) {
  __shared__ float xs[PROJECT_ROWS][PROJECT_TILE + 1];
  __shared__ float ms[MAX_RANK][PROJECT_TILE];
  __shared__ float parts[PROJECT_PARTS][PROJECT_ROWS][17];
  const int row0 = blockIdx.x * PROJECT_ROWS;
  const int lane = threadIdx.x % 32, part = threadIdx.x / 32;
  const int cols = PROJECT_TILE / PROJECT_PARTS;
  float acc[MAX_RANK];
#pragma unroll
  for (int j = 0; j < MAX_RANK; ++j) acc[j] = 0.0f;
  for (int c0 = 0; c0 < k; c0 += PROJECT_TILE) {
    for (int e = threadIdx.x; e < PROJECT_ROWS * PROJECT_TILE; e += blockDim.x) {
      const int i = e / PROJECT_TILE, c = e % PROJECT_TILE;
      const bool inside = row0 + i < n && c0 + c < k;
      xs[i][c] = inside ? to_f32(x[(long long)(row0 + i) * k + c0 + c]) : 0.0f;
    }
    for (int e = threadIdx.x; e < r * PROJECT_TILE; e += blockDim.x) {
      const int j = e / PROJECT_TILE, c = e % PROJECT_TILE;
      ms[j][c] = c0 + c < k ? m[(long long)j * k + c0 + c] : 0.0f;
    }
    __syncthreads();
    for (int cc = 0; cc < cols; ++cc) {
      const int c = part * cols + cc;
      const float v = xs[lane][c];
#pragma unroll
      for (int j = 0; j < MAX_RANK; ++j)
        if (j < r) acc[j] += v * ms[j][c];
    }
    __syncthreads();
  }
#pragma unroll
  for (int j0 = 0; j0 < MAX_RANK; j0 += 16) {
    if (j0 >= r) break;
#pragma unroll
    for (int j = 0; j < 16; ++j)
      if (j0 + j < r) parts[part][lane][j] = acc[j0 + j];
    __syncthreads();
    if (part == 0 && row0 + lane < n) {
      for (int j = 0; j < 16 && j0 + j < r; ++j) {
        float s = 0.0f;
        for (int p = 0; p < PROJECT_PARTS; ++p) s += parts[p][lane][j];
        out[(long long)(row0 + lane) * r + j0 + j] = s;
      }
    }
    __syncthreads();
  }
}

// out [n, c] = y + l · m for y [n, c] (T), l [n, r], m [r, c]: the product summed over j in
// order, then y added, in f32, rounded to T once (PEFT adds its f32 update to a bf16 output in
// f32 and rounds the sum).
template <typename T>
__device__ void low_rank_add_product(const T* y, const float* l, const float* m, T* out,
                                     long long total, int c, int r) {
  for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < total;
       e += (long long)gridDim.x * blockDim.x) {
    const long long i = e / c;
    const int col = e % c;
    float s = 0.0f;
    for (int j = 0; j < r; ++j) s += l[i * r + j] * m[(long long)j * c + col];
    out[e] = from_f32<T>(s + to_f32(y[e]));
  }
}

// Rows of x per partial sum of `outer_sum`.
#define OUTER_ROWS 256

// partial [blocks, r, k]: block b's Σ over its OUTER_ROWS rows i of l[i, j] · x[i, col], a
// thread per column (blockIdx.x · blockDim.x + threadIdx.x, blockDim.x = 256), 16 ranks at a
// time in registers; the block's rows of l for those ranks are staged in shared memory, where
// every thread reads the same value (broadcast).
template <typename T>
__device__ void low_rank_outer_partial(const float* l, const T* x, float* partial, int n, int r,
                                       int k) {
  __shared__ float ls[OUTER_ROWS][16];
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  const int b = blockIdx.y;
  const int i0 = b * OUTER_ROWS, rows = max(0, min(n, i0 + OUTER_ROWS) - i0);
  for (int j0 = 0; j0 < r; j0 += 16) {
    const int js = min(16, r - j0);
    __syncthreads();  // the previous ranks' ls may still be read
    for (int e = threadIdx.x; e < OUTER_ROWS * 16; e += blockDim.x) {
      const int i = e / 16, j = e % 16;
      ls[i][j] = i < rows && j < js ? l[(long long)(i0 + i) * r + j0 + j] : 0.0f;
    }
    __syncthreads();
    if (col < k) {
      float acc[16];
#pragma unroll
      for (int j = 0; j < 16; ++j) acc[j] = 0.0f;
      for (int i = 0; i < rows; ++i) {
        const float v = to_f32(x[(long long)(i0 + i) * k + col]);
#pragma unroll
        for (int j = 0; j < 16; ++j) acc[j] += ls[i][j] * v;
      }
      for (int j = 0; j < js; ++j) partial[((long long)b * r + j0 + j) * k + col] = acc[j];
    }
  }
}

// out [r, k] = Σ over the blocks, in order, of partial [blocks, r, k]: the same sum whatever
// the launch, so results repeat run to run.
__device__ void low_rank_outer_reduce(const float* partial, float* out, int blocks,
                                      long long rk) {
  for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < rk;
       e += (long long)gridDim.x * blockDim.x) {
    float s = 0.0f;
    for (int b = 0; b < blocks; ++b) s += partial[b * rk + e];
    out[e] = s;
  }
}

extern "C" __global__ void low_rank_outer_reduce_f32(const float* partial, float* out,
                                                     int blocks, long long rk) {
  low_rank_outer_reduce(partial, out, blocks, rk);
}

#define LOW_RANK_KERNELS(T, S)                                                                  \
  extern "C" __global__ void low_rank_project_##S(const T* x, const float* m, float* out,     \
                                                  int n, int k, int r) {                        \
    low_rank_project<T>(x, m, out, n, k, r);                                                    \
  }                                                                                             \
  extern "C" __global__ void low_rank_add_product_##S(const T* y, const float* l,             \
                                                      const float* m, T* out,                   \
                                                      long long total, int c, int r) {          \
    low_rank_add_product<T>(y, l, m, out, total, c, r);                                         \
  }                                                                                             \
  extern "C" __global__ void low_rank_outer_partial_##S(const float* l, const T* x,           \
                                                        float* partial, int n, int r, int k) {  \
    low_rank_outer_partial<T>(l, x, partial, n, r, k);                                          \
  }

FOR_EACH_DTYPE(LOW_RANK_KERNELS)
