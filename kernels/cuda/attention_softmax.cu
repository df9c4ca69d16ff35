// The softmax of causal attention, between the cuBLAS matmuls of helix_ops::causal_attention
// (which runs the FlashAttention-2 algorithm a chunk of query rows at a time): one pass each over
// a chunk's scores instead of a dozen f32 element-wise ops. Scores are [rows of all heads, keys]
// in T; the additive mask `bias` is [batch, q_rows, keys] in T, shared by the heads; arithmetic
// is f32. The CPU reference is kernels/src/attention_softmax.rs.
#include "common.cuh"

// Block-wide max, as block_sum.
__device__ __forceinline__ float block_max(float v) {
  __shared__ float partial[32];
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  const int warps = blockDim.x / 32;
  v = lane < warps ? partial[lane] : -INFINITY;
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
  return v;
}

// Row r of the scores covers query row r % q_rows of batch r / (heads * q_rows).
__device__ __forceinline__ int64_t bias_row(int64_t r, int heads, int q_rows) {
  return (r / ((int64_t)heads * q_rows)) * q_rows + r % q_rows;
}

// lse[r] = log sum_j exp(s[r, j] * scale + bias[r, j]), one block per row.
template <typename T>
__device__ void row_lse(const T *s, const T *bias, float *lse, int keys, int heads, int q_rows,
                        float scale) {
  const int64_t r = blockIdx.x;
  const T *sr = s + r * keys;
  const T *br = bias + bias_row(r, heads, q_rows) * keys;
  float m = -INFINITY;
  for (int j = threadIdx.x; j < keys; j += blockDim.x)
    m = fmaxf(m, to_f32(sr[j]) * scale + to_f32(br[j]));
  m = block_max(m);
  float sum = 0.0f;
  for (int j = threadIdx.x; j < keys; j += blockDim.x)
    sum += expf(to_f32(sr[j]) * scale + to_f32(br[j]) - m);
  sum = block_sum(sum);
  if (threadIdx.x == 0) lse[r] = m + logf(sum);
}

// p = exp(s * scale + bias - lse), element-wise over [rows, keys].
template <typename T>
__device__ void probs(const T *s, const T *bias, const float *lse, T *p, int64_t n, int keys,
                      int heads, int q_rows, float scale) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / keys;
    const int j = i % keys;
    const float v = to_f32(s[i]) * scale + to_f32(bias[bias_row(r, heads, q_rows) * keys + j]);
    p[i] = from_f32<T>(expf(v - lse[r]));
  }
}

// ds = p * (dp - d[r]) * scale: softmax's backward with d[r] = rowsum(dO * O).
template <typename T>
__device__ void softmax_grad(const T *p, const T *dp, const float *d, T *ds, int64_t n, int keys,
                             float scale) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    ds[i] = from_f32<T>(to_f32(p[i]) * (to_f32(dp[i]) - d[i / keys]) * scale);
  }
}

#define ENTRY(T, NAME)                                                                         \
  extern "C" __global__ void attn_row_lse_##NAME(const T *s, const T *bias, float *lse,       \
                                                 int keys, int heads, int q_rows,              \
                                                 float scale) {                                \
    row_lse<T>(s, bias, lse, keys, heads, q_rows, scale);                                      \
  }                                                                                            \
  extern "C" __global__ void attn_probs_##NAME(const T *s, const T *bias, const float *lse,   \
                                               T *p, int64_t n, int keys, int heads,           \
                                               int q_rows, float scale) {                      \
    probs<T>(s, bias, lse, p, n, keys, heads, q_rows, scale);                                  \
  }                                                                                            \
  extern "C" __global__ void attn_softmax_grad_##NAME(const T *p, const T *dp, const float *d, \
                                                      T *ds, int64_t n, int keys,              \
                                                      float scale) {                           \
    softmax_grad<T>(p, dp, d, ds, n, keys, scale);                                             \
  }
FOR_EACH_DTYPE(ENTRY)
