// Dropout's mask as a function of a key and the element's index (src/dropout.rs holds the CPU
// side, with the same bits): element i is kept when the high 32 bits of SplitMix64's output
// function at key + (i + 1)·γ fall below `threshold`, and then multiplied by `scale` =
// 1 / (1 − p). Shared by the dropout kernel and the kernels that drop an operand as they read
// it (low_rank.cu), so a mask is drawn again from its key instead of kept.
#pragma once
#include <stdint.h>

__device__ __forceinline__ uint32_t element_bits(uint64_t key, uint64_t i) {
  uint64_t z = key + (i + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return (uint32_t)((z ^ (z >> 31)) >> 32);
}

struct DropoutMask {
  uint64_t key;
  uint32_t threshold;
  float scale;

  // What element i is multiplied by: the scale where kept, 0 where dropped.
  __device__ __forceinline__ float factor(uint64_t i) const {
    return element_bits(key, i) < threshold ? scale : 0.0f;
  }
};
