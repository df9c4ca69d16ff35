// Inverted dropout with a counter-based mask: element i is kept when the high 32 bits of
// SplitMix64's output function at key + (i + 1)·γ fall below `threshold`, and then scaled by
// `scale` = 1 / (1 − p), the product in f32 rounded once to T. The same bits as the CPU
// reference (kernels/src/dropout.rs), so a mask is drawn again from its key instead of kept.
#include "common.cuh"

__device__ __forceinline__ uint32_t element_bits(uint64_t key, uint64_t i) {
  uint64_t z = key + (i + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return (uint32_t)((z ^ (z >> 31)) >> 32);
}

template <typename T>
__device__ void dropout(const T *x, T *y, int64_t n, uint64_t key, uint32_t threshold,
                        float scale) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    const float factor = element_bits(key, (uint64_t)i) < threshold ? scale : 0.0f;
    y[i] = from_f32<T>(to_f32(x[i]) * factor);
  }
}

#define ENTRY(T, NAME)                                                                       \
  extern "C" __global__ void dropout_##NAME(const T *x, T *y, int64_t n, uint64_t key,       \
                                            uint32_t threshold, float scale) {               \
    dropout<T>(x, y, n, key, threshold, scale);                                              \
  }
FOR_EACH_DTYPE(ENTRY)
