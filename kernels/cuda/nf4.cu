// NF4 storage of a frozen weight (QLoRA), as kernels/src/nf4.rs lays it out: two 4-bit codes a
// byte (element 2i in the high nibble), a block of 64 elements scaled by its absmax, the
// absmaxes stored as int8 against a scale per group of 256 blocks and their mean. Every step
// rounds to T where torchao's NF4Tensor, computing in the weight's dtype, rounds; the CPU
// reference (kernels/src/nf4.rs) gives the same bits.
#include "common.cuh"

// The 16 NormalFloat levels as torchao lists them, before rounding to T.
__constant__ float kNf4Levels[16] = {-1.0f,    -0.6962f, -0.5251f, -0.3949f, -0.2844f, -0.1848f,
                                     -0.0911f, 0.0f,     0.0796f,  0.1609f,  0.2461f,  0.3379f,
                                     0.4407f,  0.5626f,  0.7230f,  1.0f};
constexpr int kNf4Block = 64;
constexpr int kNf4ScalerBlock = 256;

// The level nearest x / absmax, the difference rounded to T before it is compared and the
// first level kept on a tie (torch's min over the 16 differences); a NaN quotient (an all-zero
// block) takes level 0, as torch's min does when every difference is NaN.
template <typename T> __device__ __forceinline__ uint8_t nearest_level(float x, float absmax) {
  const float v = round_to<T>(x / absmax);
  if (v != v) return 0;
  uint8_t best = 0;
  float best_diff = fabsf(round_to<T>(v - round_to<T>(kNf4Levels[0])));
  for (int j = 1; j < 16; ++j) {
    const float d = fabsf(round_to<T>(v - round_to<T>(kNf4Levels[j])));
    if (d < best_diff) {
      best_diff = d;
      best = (uint8_t)j;
    }
  }
  return best;
}

// codes[i] = the levels of w[2i] (high nibble) and w[2i + 1] (low), each scaled by its block's
// absmax [numel / 64] (in T).
template <typename T>
__device__ void nf4_quantize(const T *w, const T *absmax, uint8_t *codes, int64_t pairs) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < pairs;
       i += (int64_t)gridDim.x * blockDim.x) {
    const float a = to_f32(absmax[(2 * i) / kNf4Block]);
    const uint8_t hi = nearest_level<T>(to_f32(w[2 * i]), a);
    const uint8_t lo = nearest_level<T>(to_f32(w[2 * i + 1]), a);
    codes[i] = (uint8_t)(hi << 4 | lo);
  }
}

// w[2i], w[2i + 1] from codes[i]: the level times its block's absmax, which is its int8
// scaler over the group's factor plus the mean, each step rounded to T.
template <typename T>
__device__ void nf4_dequantize(const uint8_t *codes, const int8_t *scalers, const T *factors,
                               float mean, T *w, int64_t pairs) {
  // The levels in T, in shared memory: each thread indexes them by its own code, which
  // constant memory would serialize.
  __shared__ float levels[16];
  if (threadIdx.x < 16) levels[threadIdx.x] = round_to<T>(kNf4Levels[threadIdx.x]);
  __syncthreads();
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < pairs;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t block = (2 * i) / kNf4Block;
    const float factor = to_f32(factors[block / kNf4ScalerBlock]);
    const float scale = round_to<T>(round_to<T>((float)scalers[block] / factor) + mean);
    const uint8_t c = codes[i];
    w[2 * i] = from_f32<T>(levels[c >> 4] * scale);
    w[2 * i + 1] = from_f32<T>(levels[c & 15] * scale);
  }
}

#define ENTRY(T, NAME)                                                                       \
  extern "C" __global__ void nf4_quantize_##NAME(const T *w, const T *absmax, uint8_t *codes, \
                                                 int64_t pairs) {                            \
    nf4_quantize<T>(w, absmax, codes, pairs);                                                \
  }                                                                                          \
  extern "C" __global__ void nf4_dequantize_##NAME(const uint8_t *codes,                    \
                                                   const int8_t *scalers, const T *factors, \
                                                   float mean, T *w, int64_t pairs) {        \
    nf4_dequantize<T>(codes, scalers, factors, mean, w, pairs);                              \
  }
FOR_EACH_DTYPE(ENTRY)
