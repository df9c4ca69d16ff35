// Σ x² of every f32 tensor in a list, in one launch: each block of kTensorListBlockElems
// elements writes its partial sum, which the host adds in f64 in block order, tensor by tensor
// (the gradients' global norm for clipping: one launch and one copy to the host instead of two
// kernels and a conversion per gradient). The CPU reference is kernels/src/sum_squares.rs.
#include "common.cuh"

// One tensor, as the launcher's #[repr(C)] SquaresTensor (kernels/src/launch.rs).
struct SquaresTensor {
  const float *x;
  int64_t n;
  int64_t first_block;
};

extern "C" __global__ void sum_squares_f32(const SquaresTensor *list, int count, float *partial) {
  const SquaresTensor t = entry_of_block(list, count);
  const int64_t start = ((int64_t)blockIdx.x - t.first_block) * kTensorListBlockElems;
  const int64_t end = min(start + kTensorListBlockElems, t.n);
  float acc = 0.0f;
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) acc += t.x[i] * t.x[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}
