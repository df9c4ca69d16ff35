// cp.async (sm_80 and later): copies from global to shared memory that run while the block
// computes, so a kernel can load its next tile during this one's matmuls. A thread issues
// copies, closes what it issued into a group with cp_async_commit, and cp_async_wait<N>
// returns once at most N of its latest groups are still in flight; a __syncthreads after the
// wait makes every thread's finished copies visible to the block. Until then the destination
// holds nothing defined. kernels/emu/cuda_emu.h defines the same four functions for the host,
// with the copies landing only at the wait.
#pragma once
#include "common.cuh"

#ifndef HELIX_CUDA_EMU

// 16 bytes (16-byte aligned, both sides) from global `src` to shared `dst`; with !valid, 16
// zero bytes, and `src` (which must still be a valid address) is not read.
__device__ __forceinline__ void cp_async_16(void *dst, const void *src, bool valid) {
  const uint32_t to = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(to), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}

// The same for 4 bytes (4-byte aligned), through L1.
__device__ __forceinline__ void cp_async_4(void *dst, const void *src, bool valid) {
  const uint32_t to = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(to), "l"(src),
               "r"(valid ? 4 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

#endif  // HELIX_CUDA_EMU
