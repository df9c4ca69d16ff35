// RMSNorm as Hugging Face's LlamaRMSNorm computes it: n = x / sqrt(mean(x^2) + eps) in f32,
// rounded to the storage type, times the weight. One block per row; the CPU reference is
// kernels/src/rms_norm.rs.
#include "common.cuh"

template <typename T>
__device__ void rms_norm_fwd(const T *x, const T *w, T *y, int cols, float eps) {
  const int64_t row = blockIdx.x;
  const T *xr = x + row * cols;
  T *yr = y + row * cols;
  float sq = 0.0f;
  for (int i = threadIdx.x; i < cols; i += blockDim.x) {
    const float v = to_f32(xr[i]);
    sq += v * v;
  }
  const float rstd = rsqrtf(block_sum(sq) / cols + eps);
  for (int i = threadIdx.x; i < cols; i += blockDim.x) {
    const float n = round_to<T>(to_f32(xr[i]) * rstd);
    yr[i] = from_f32<T>(n * to_f32(w[i]));
  }
}

// dx = rstd * (g - n * mean(g * n)) with g = dy * w (rounded to T, as the unfused graph's
// product is) and n = x * rstd.
template <typename T>
__device__ void rms_norm_bwd_dx(const T *x, const T *w, const T *dy, T *dx, int cols, float eps) {
  const int64_t row = blockIdx.x;
  const T *xr = x + row * cols;
  const T *dyr = dy + row * cols;
  T *dxr = dx + row * cols;
  float sq = 0.0f, dot = 0.0f;
  for (int i = threadIdx.x; i < cols; i += blockDim.x) {
    const float v = to_f32(xr[i]);
    const float g = round_to<T>(to_f32(dyr[i]) * to_f32(w[i]));
    sq += v * v;
    dot += g * v;
  }
  sq = block_sum(sq);
  dot = block_sum(dot);
  const float rstd = rsqrtf(sq / cols + eps);
  const float c = dot * rstd * rstd * rstd / cols;
  for (int i = threadIdx.x; i < cols; i += blockDim.x) {
    const float g = round_to<T>(to_f32(dyr[i]) * to_f32(w[i]));
    dxr[i] = from_f32<T>(g * rstd - to_f32(xr[i]) * c);
  }
}

#define ENTRY(T, NAME)                                                                         \
  extern "C" __global__ void rms_norm_fwd_##NAME(const T *x, const T *w, T *y, int cols,      \
                                                 float eps) {                                  \
    rms_norm_fwd<T>(x, w, y, cols, eps);                                                       \
  }                                                                                            \
  extern "C" __global__ void rms_norm_bwd_dx_##NAME(const T *x, const T *w, const T *dy,      \
                                                    T *dx, int cols, float eps) {              \
    rms_norm_bwd_dx<T>(x, w, dy, dx, cols, eps);                                               \
  }
FOR_EACH_DTYPE(ENTRY)
