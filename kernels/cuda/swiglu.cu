// SwiGLU of the Llama MLP, silu(gate) * up, rounded as PyTorch rounds it (silu(gate) stored in
// the storage type, then the product). The backward writes d gate and d up into one [2, n]
// output, and with `with_output` the forward's y after them ([3, n]): a layer that recomputes
// y in its backward gets it from the same pass. CPU reference: kernels/src/swiglu.rs.
#include "common.cuh"

__device__ __forceinline__ float sigmoid(float g) { return 1.0f / (1.0f + expf(-g)); }

template <typename T>
__device__ void swiglu_fwd(const T *gate, const T *up, T *y, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    const float g = to_f32(gate[i]);
    const float s = round_to<T>(g * sigmoid(g));
    y[i] = from_f32<T>(s * to_f32(up[i]));
  }
}

template <typename T>
__device__ void swiglu_bwd(const T *gate, const T *up, const T *dy, T *d, int64_t n,
                           bool with_output) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    const float g = to_f32(gate[i]);
    const float sg = sigmoid(g);
    const float s = round_to<T>(g * sg);
    const float dyi = to_f32(dy[i]), u = to_f32(up[i]);
    const float ds = round_to<T>(dyi * u);
    d[i] = from_f32<T>(ds * sg * (1.0f + g * (1.0f - sg)));
    d[n + i] = from_f32<T>(dyi * s);
    if (with_output) d[2 * n + i] = from_f32<T>(s * u);
  }
}

#define ENTRY(T, NAME)                                                                         \
  extern "C" __global__ void swiglu_fwd_##NAME(const T *gate, const T *up, T *y, int64_t n) {  \
    swiglu_fwd<T>(gate, up, y, n);                                                             \
  }                                                                                            \
  extern "C" __global__ void swiglu_bwd_##NAME(const T *gate, const T *up, const T *dy, T *d,  \
                                               int64_t n, int with_output) {                   \
    swiglu_bwd<T>(gate, up, dy, d, n, with_output != 0);                                       \
  }
FOR_EACH_DTYPE(ENTRY)
