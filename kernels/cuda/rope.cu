// Rotary embeddings, rotate-half layout, on x [B, H, S, D] with cos / sin [B, 1, S, D]:
// y = x * cos + rotate_half(x) * sin, each product rounded to the storage type as PyTorch's
// three ops are. The backward is the transpose: dx = dy * cos + rotate_half^T(dy * sin).
// CPU reference: kernels/src/rope.rs.
//
// x is read through its strides (a view of a projection's [B, S, H · D] output is rotated in
// place of a copy into heads first), and y is written packed, heads first [B, H, S, D] or heads
// merged [B, S, H, D] (`merged`: the layout the projections take, so a gradient goes back to
// them without a transposing copy).
#include "common.cuh"

// Element strides of x as [B, H, S, D] (D's stride is 1), as the launcher's #[repr(C)] struct
// of three i64 (kernels/src/launch.rs's Strides).
struct RopeStrides {
  int64_t b, h, s;
};

template <typename T>
__device__ void rope(const T *__restrict__ x, const T *__restrict__ cos,
                     const T *__restrict__ sin, T *__restrict__ y, int64_t n, int heads, int seq,
                     int dim, bool backward, RopeStrides xs, bool merged) {
  const int half = dim / 2;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    // i runs over [B, H, S, D] in order.
    const int d = i % dim;
    const int64_t row = i / dim;
    const int s = row % seq;
    const int64_t bh = row / seq;
    const int h = bh % heads;
    const int64_t b = bh / heads;
    const T *xr = x + b * xs.b + h * xs.h + s * xs.s;
    const int64_t t = (b * seq + s) * dim;  // cos / sin row
    const int partner = d < half ? d + half : d - half;
    const float a = round_to<T>(to_f32(xr[d]) * to_f32(cos[t + d]));
    float r;
    if (!backward) {
      // rotate_half(x)[d] = -x[d + half] for d < half, x[d - half] after.
      const float xp = to_f32(xr[partner]);
      r = round_to<T>((d < half ? -xp : xp) * to_f32(sin[t + d]));
    } else {
      // rotate_half^T(v)[d] = v[d + half] for d < half, -v[d - half] after; v = dy * sin.
      const float vp = round_to<T>(to_f32(xr[partner]) * to_f32(sin[t + partner]));
      r = d < half ? vp : -vp;
    }
    const int64_t out = merged ? ((b * seq + s) * heads + h) * dim + d : i;
    y[out] = from_f32<T>(a + r);
  }
}

#define ENTRY(T, NAME)                                                                         \
  extern "C" __global__ void rope_##NAME(const T *x, const T *cos, const T *sin, T *y,         \
                                         int64_t n, int heads, int seq, int dim,               \
                                         int backward, RopeStrides xs, int merged) {           \
    rope<T>(x, cos, sin, y, n, heads, seq, dim, backward != 0, xs, merged != 0);               \
  }
FOR_EACH_DTYPE(ENTRY)
