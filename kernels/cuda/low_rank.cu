// LoRA's rank-r products (src/low_rank.rs holds the CPU loops they are checked against). The
// large operand x or y is in the storage type T and read as f32 exactly; the adapters and the
// rank-r activations l are f32. So the LoRA path reads a bf16 activation once, where casting
// it to f32 for an f32 matmul would read it, write twice its size and read that again.
#include "common.cuh"

// Rows of x per block of `project`, columns per tile, and the largest rank it takes.
#define PROJECT_ROWS 32
#define PROJECT_TILE 64
#define MAX_RANK 64

// out [n, r] = x [n, k] · mᵀ, m [r, k]. A block takes PROJECT_ROWS rows of x; tile by tile of
// PROJECT_TILE columns, it stages the rows and m's columns in shared memory, and each thread
// sums the products of (row, j) pairs: PROJECT_ROWS · r ≤ 8 · blockDim.x.
template <typename T>
__device__ void low_rank_project(const T* x, const float* m, float* out, int n, int k, int r) {
  __shared__ float xs[PROJECT_ROWS][PROJECT_TILE + 1];
  __shared__ float ms[MAX_RANK][PROJECT_TILE + 1];
  const int row0 = blockIdx.x * PROJECT_ROWS;
  const int pairs = PROJECT_ROWS * r;
  float acc[8];
  for (int o = 0; o < 8; ++o) acc[o] = 0.0f;
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
    for (int o = 0; o < 8; ++o) {
      const int p = threadIdx.x + o * blockDim.x;
      if (p < pairs) {
        const int i = p / r, j = p % r;
        float s = acc[o];
        for (int c = 0; c < PROJECT_TILE; ++c) s += xs[i][c] * ms[j][c];
        acc[o] = s;
      }
    }
    __syncthreads();
  }
  for (int o = 0; o < 8; ++o) {
    const int p = threadIdx.x + o * blockDim.x;
    if (p < pairs) {
      const int i = p / r, j = p % r;
      if (row0 + i < n) out[(long long)(row0 + i) * r + j] = acc[o];
    }
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
// thread per column (blockIdx.x · blockDim.x + threadIdx.x), up to MAX_RANK sums in registers
// taken 16 at a time.
template <typename T>
__device__ void low_rank_outer_partial(const float* l, const T* x, float* partial, int n, int r,
                                       int k) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  const int b = blockIdx.y;
  const int i0 = b * OUTER_ROWS, i1 = min(n, i0 + OUTER_ROWS);
  if (col >= k) return;
  for (int j0 = 0; j0 < r; j0 += 16) {
    const int js = min(16, r - j0);
    float acc[16];
    for (int j = 0; j < 16; ++j) acc[j] = 0.0f;
    for (int i = i0; i < i1; ++i) {
      const float v = to_f32(x[(long long)i * k + col]);
      const float* li = l + (long long)i * r + j0;
      for (int j = 0; j < 16; ++j)
        if (j < js) acc[j] += li[j] * v;
    }
    for (int j = 0; j < js; ++j) partial[((long long)b * r + j0 + j) * k + col] = acc[j];
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
