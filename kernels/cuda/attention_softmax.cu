// The softmax of causal attention, between the cuBLAS matmuls of helix_ops::causal_attention
// (which runs the FlashAttention-2 algorithm a chunk of query rows at a time): one pass each over
// a chunk's scores instead of a dozen f32 element-wise ops. Scores are [rows of all heads, keys]
// in T; the additive mask `bias` is [batch, q_rows, keys] in T, shared by the heads; arithmetic
// is f32. The CPU reference is kernels/src/attention_softmax.rs.
#include "common.cuh"

// One warp per row of keys (blockDim.x = 256: eight rows per block): no block-wide
// synchronisation and no per-element division to find a row.
__device__ __forceinline__ int64_t warp_row() {
  return (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
}

// Row r of the scores covers query row r % q_rows of batch r / (heads * q_rows).
__device__ __forceinline__ int64_t bias_row(int64_t r, int heads, int q_rows) {
  return (r / ((int64_t)heads * q_rows)) * q_rows + r % q_rows;
}

// stats[r] = (m, sum_j exp(v_j - m)) with v = s[r, :] * scale + bias[r, :] and m its maximum:
// one pass, each lane keeping a running maximum and a sum rescaled to it (the online softmax),
// then merged across the warp.
template <typename T>
__device__ void row_stats(const T *s, const T *bias, float *stats, int64_t rows, int keys,
                          int heads, int q_rows, float scale) {
  const int64_t r = warp_row();
  if (r >= rows) return;
  const int lane = threadIdx.x % 32;
  const T *sr = s + r * keys;
  const T *br = bias + bias_row(r, heads, q_rows) * keys;
  float m = -INFINITY, sum = 0.0f;
  for (int j = lane; j < keys; j += 32) {
    const float v = to_f32(sr[j]) * scale + to_f32(br[j]);
    if (v > m) {
      sum = sum * expf(m - v) + 1.0f;
      m = v;
    } else {
      sum += expf(v - m);
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffff, m, o);
    const float s2 = __shfl_xor_sync(0xffffffff, sum, o);
    const float mm = fmaxf(m, m2);
    // A lane that saw no key (m = -inf) adds nothing.
    sum = (m == -INFINITY ? 0.0f : sum * expf(m - mm)) + (m2 == -INFINITY ? 0.0f : s2 * expf(m2 - mm));
    m = mm;
  }
  if (lane == 0) {
    stats[2 * r] = m;
    stats[2 * r + 1] = sum;
  }
}

// p = exp(v - m) / sum with (m, sum) from row_stats, a warp per row.
template <typename T>
__device__ void probs(const T *s, const T *bias, const float *stats, T *p, int64_t rows, int keys,
                      int heads, int q_rows, float scale) {
  const int64_t r = warp_row();
  if (r >= rows) return;
  const T *sr = s + r * keys;
  const T *br = bias + bias_row(r, heads, q_rows) * keys;
  T *pr = p + r * keys;
  const float m = stats[2 * r], sum = stats[2 * r + 1];
  for (int j = threadIdx.x % 32; j < keys; j += 32)
    pr[j] = from_f32<T>(expf(to_f32(sr[j]) * scale + to_f32(br[j]) - m) / sum);
}

// ds = p * (dp - d[r]) * scale: softmax's backward with d[r] = rowsum(dO * O), a warp per row.
template <typename T>
__device__ void softmax_grad(const T *p, const T *dp, const float *d, T *ds, int64_t rows,
                             int keys, float scale) {
  const int64_t r = warp_row();
  if (r >= rows) return;
  const int64_t base = r * keys;
  const float dr = d[r];
  for (int j = threadIdx.x % 32; j < keys; j += 32)
    ds[base + j] = from_f32<T>(to_f32(p[base + j]) * (to_f32(dp[base + j]) - dr) * scale);
}

#define ENTRY(T, NAME)                                                                         \
  extern "C" __global__ void attn_row_stats_##NAME(const T *s, const T *bias, float *stats,   \
                                                   int64_t rows, int keys, int heads,          \
                                                   int q_rows, float scale) {                  \
    row_stats<T>(s, bias, stats, rows, keys, heads, q_rows, scale);                            \
  }                                                                                            \
  extern "C" __global__ void attn_probs_##NAME(const T *s, const T *bias, const float *stats, \
                                               T *p, int64_t rows, int keys, int heads,        \
                                               int q_rows, float scale) {                      \
    probs<T>(s, bias, stats, p, rows, keys, heads, q_rows, scale);                               \
  }                                                                                            \
  extern "C" __global__ void attn_softmax_grad_##NAME(const T *p, const T *dp, const float *d, \
                                                      T *ds, int64_t rows, int keys,           \
                                                      float scale) {                           \
    softmax_grad<T>(p, dp, d, ds, rows, keys, scale);                                          \
  }
FOR_EACH_DTYPE(ENTRY)
