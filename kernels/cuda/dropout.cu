// Inverted dropout with a counter-based mask (dropout_mask.cuh): the product in f32 rounded
// once to T. The same bits as the CPU reference (kernels/src/dropout.rs).
#include "common.cuh"
#include "dropout_mask.cuh"

template <typename T>
__device__ void dropout(const T *x, T *y, int64_t n, DropoutMask mask) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x)
    y[i] = from_f32<T>(to_f32(x[i]) * mask.factor((uint64_t)i));
}

#define ENTRY(T, NAME)                                                                       \
  extern "C" __global__ void dropout_##NAME(const T *x, T *y, int64_t n, uint64_t key,       \
                                            uint32_t threshold, float scale) {               \
    dropout<T>(x, y, n, DropoutMask{key, threshold, scale});                                 \
  }
FOR_EACH_DTYPE(ENTRY)
