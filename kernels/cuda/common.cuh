// Shared by the kernels: element types in storage (f32, bf16, f16) and f32 arithmetic, and a
// block-wide sum.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

// Rounds through T: what storing an intermediate in T and reading it back does.
template <typename T> __device__ __forceinline__ float round_to(float v) {
  return to_f32(from_f32<T>(v));
}

// Sum of `v` over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // partial[] may still be read by a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  const int warps = blockDim.x / 32;
  v = lane < warps ? partial[lane] : 0.0f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  return v;
}

// The block's dynamic shared memory (the launch's shared_mem_bytes). The CPU emulator
// (kernels/emu) defines its own.
#ifndef HELIX_CUDA_EMU
__device__ __forceinline__ unsigned char *dynamic_shared_memory() {
  extern __shared__ __align__(16) unsigned char smem[];
  return smem;
}
#endif

// extern "C" entry points for each storage type: NAME_f32, NAME_bf16, NAME_f16.
#define FOR_EACH_DTYPE(M) M(float, f32) M(__nv_bfloat16, bf16) M(__half, f16)

// Multi-tensor launches (adamw.cu, sum_squares.cu): one launch over a list of tensors, each
// given consecutive blocks of kTensorListBlockElems elements from its `first_block`; a block
// finds its tensor by binary search over the list (sorted by first_block, none empty).
constexpr int64_t kTensorListBlockElems = 4096;

template <typename Entry>
__device__ __forceinline__ const Entry &entry_of_block(const Entry *list, int count) {
  int lo = 0, hi = count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (list[mid].first_block <= (int64_t)blockIdx.x) lo = mid;
    else hi = mid - 1;
  }
  return list[lo];
}
