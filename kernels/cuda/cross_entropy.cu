// The softmax of the LM head's cross-entropy, between the cuBLAS matmuls of
// helix_ops::linear_cross_entropy (which runs the head a chunk of rows at a time and takes the
// chunk's gradient while its logits are at hand): one pass each over a chunk's logits [rows,
// vocab] in T, arithmetic in f32. targets[r] is the target's index into this rank's part of the
// vocabulary, or -1. The CPU reference is kernels/src/cross_entropy.rs.
#include "common.cuh"

// Merges two online-softmax partials (m, s): s counts exp(x - m) over the values seen. A side
// that saw nothing (m = -inf) adds nothing.
__device__ __forceinline__ void merge(float &m, float &s, float m2, float s2) {
  const float mm = fmaxf(m, m2);
  s = (m == -INFINITY ? 0.0f : s * expf(m - mm)) + (m2 == -INFINITY ? 0.0f : s2 * expf(m2 - mm));
  m = mm;
}

// stats[r] = (m, sum_j exp(x_j - m), x[target]) for row r = blockIdx.x: each thread keeps a
// running maximum and a sum rescaled to it over its stride of the row, then the block merges.
template <typename T>
__device__ void logit_stats(const T *x, const int64_t *targets, float *stats, int vocab) {
  const int64_t r = blockIdx.x;
  const T *row = x + r * vocab;
  float m = -INFINITY, s = 0.0f;
  for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
    const float v = to_f32(row[j]);
    if (v > m) {
      s = s * expf(m - v) + 1.0f;
      m = v;
    } else {
      s += expf(v - m);
    }
  }
  for (int o = 16; o > 0; o >>= 1)
    merge(m, s, __shfl_xor_sync(0xffffffff, m, o), __shfl_xor_sync(0xffffffff, s, o));
  __shared__ float pm[32], ps[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) {
    pm[warp] = m;
    ps[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / 32;
    m = lane < warps ? pm[lane] : -INFINITY;
    s = lane < warps ? ps[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1)
      merge(m, s, __shfl_xor_sync(0xffffffff, m, o), __shfl_xor_sync(0xffffffff, s, o));
    if (lane == 0) {
      const int64_t t = targets[r];
      stats[3 * r] = m;
      stats[3 * r + 1] = s;
      stats[3 * r + 2] = t >= 0 ? to_f32(row[t]) : 0.0f;
    }
  }
}

// g[r, j] = (exp(x[r, j] - lse) - [j == target]) * weight with (lse, weight) = terms[r]: the
// logits' gradient, a block per row.
template <typename T>
__device__ void logit_grad(const T *x, const int64_t *targets, const float *terms, T *g,
                           int vocab) {
  const int64_t r = blockIdx.x;
  const float lse = terms[2 * r], weight = terms[2 * r + 1];
  const int64_t t = targets[r];
  const T *row = x + r * vocab;
  T *out = g + r * vocab;
  for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
    const float p = weight == 0.0f ? 0.0f : expf(to_f32(row[j]) - lse);
    out[j] = from_f32<T>((p - (j == t ? 1.0f : 0.0f)) * weight);
  }
}

#define ENTRY(T, NAME)                                                                         \
  extern "C" __global__ void logit_stats_##NAME(const T *x, const int64_t *targets,          \
                                                float *stats, int vocab) {                     \
    logit_stats<T>(x, targets, stats, vocab);                                                  \
  }                                                                                            \
  extern "C" __global__ void logit_grad_##NAME(const T *x, const int64_t *targets,           \
                                               const float *terms, T *g, int vocab) {          \
    logit_grad<T>(x, targets, terms, g, vocab);                                                \
  }
FOR_EACH_DTYPE(ENTRY)
