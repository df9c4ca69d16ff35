// Rotary embeddings, rotate-half layout, on x [B, H, S, D] with cos / sin [B, 1, S, D]:
// y = x * cos + rotate_half(x) * sin, each product rounded to the storage type as PyTorch's
// three ops are. The backward is the transpose: dx = dy * cos + rotate_half^T(dy * sin).
// CPU reference: kernels/src/rope.rs.
#include "common.cuh"

template <typename T>
__device__ void rope(const T *x, const T *cos, const T *sin, T *y, int64_t n, int heads, int seq,
                     int dim, bool backward) {
  const int half = dim / 2;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int d = i % dim;
    const int64_t row = i / dim;  // (b, h, s)
    const int s = row % seq;
    const int64_t b = row / ((int64_t)seq * heads);
    const int64_t t = (b * seq + s) * dim;  // cos / sin row
    const int partner = d < half ? d + half : d - half;
    const float a = round_to<T>(to_f32(x[i]) * to_f32(cos[t + d]));
    float r;
    if (!backward) {
      // rotate_half(x)[d] = -x[d + half] for d < half, x[d - half] after.
      const float xp = to_f32(x[row * dim + partner]);
      r = round_to<T>((d < half ? -xp : xp) * to_f32(sin[t + d]));
    } else {
      // rotate_half^T(v)[d] = v[d + half] for d < half, -v[d - half] after; v = dy * sin.
      const float vp = round_to<T>(to_f32(x[row * dim + partner]) * to_f32(sin[t + partner]));
      r = d < half ? vp : -vp;
    }
    y[i] = from_f32<T>(a + r);
  }
}

#define ENTRY(T, NAME)                                                                         \
  extern "C" __global__ void rope_##NAME(const T *x, const T *cos, const T *sin, T *y,         \
                                         int64_t n, int heads, int seq, int dim,               \
                                         int backward) {                                       \
    rope<T>(x, cos, sin, y, n, heads, seq, dim, backward != 0);                                \
  }
FOR_EACH_DTYPE(ENTRY)
