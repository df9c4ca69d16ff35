// AdamW over a list of parameters in one launch, in place: each parameter's moments m and v,
// its f32 master copy when it has one, and the parameter itself (the master rounded to its
// dtype). The operations are in the order and f32 rounding of torch.optim.AdamW and of the CPU
// loop (kernels/src/adamw.rs), and the gradient is first multiplied by the clipping
// coefficient (1 without clipping), as clip_grad_norm_ scales it. __fmul_rn / __fadd_rn keep
// nvcc from contracting a product and a sum into one fused multiply-add the reference does not
// do. One launch per parameter dtype replaces one per parameter: a 7B model's LoRA adapters
// are 448 small tensors, and the launches, not the arithmetic, were their update's cost.
#include "common.cuh"

// One parameter, as the launcher's #[repr(C)] AdamWTensor (kernels/src/launch.rs).
struct AdamWTensor {
  void *param;       // T: w' rounded (or w' itself, for an f32 parameter without a master)
  float *master;     // the f32 master weights, or null: then the parameter is f32 and is w
  float *m, *v;      // f32 moments
  const float *g;    // f32 gradient
  int64_t n;
  int64_t first_block;
  float decay;       // 1 − lr · weight_decay, or 1 for a parameter without decay
  uint32_t unused;
};

// The step's constants, as the launcher's #[repr(C)] AdamWConstants, passed by value.
struct AdamWConstants {
  float c1;         // 1 − β₁
  float b2;         // β₂
  float c2;         // 1 − β₂
  float inv_bias2;  // 1 / √(1 − β₂ᵗ)
  float eps;
  float step_size;  // lr / (1 − β₁ᵗ)
  float grad_scale; // the clipping coefficient, or 1
};

template <typename T>
__device__ void adamw(const AdamWTensor *list, int count, AdamWConstants k) {
  const AdamWTensor t = entry_of_block(list, count);
  const int64_t start = ((int64_t)blockIdx.x - t.first_block) * kTensorListBlockElems;
  const int64_t end = min(start + kTensorListBlockElems, t.n);
  float *w = t.master ? t.master : reinterpret_cast<float *>(t.param);
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    const float gi = __fmul_rn(t.g[i], k.grad_scale);
    const float mi0 = t.m[i];
    // w * (1 - lr * wd)
    const float wi = __fmul_rn(w[i], t.decay);
    // m + (g - m)(1 - b1): torch's lerp.
    const float mi = __fadd_rn(mi0, __fmul_rn(__fsub_rn(gi, mi0), k.c1));
    // v b2 + g² (1 - b2)
    const float vi = __fadd_rn(__fmul_rn(t.v[i], k.b2), __fmul_rn(__fmul_rn(gi, gi), k.c2));
    const float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(vi), k.inv_bias2), k.eps);
    const float wn = __fsub_rn(wi, __fdiv_rn(__fmul_rn(mi, k.step_size), denom));
    t.m[i] = mi;
    t.v[i] = vi;
    w[i] = wn;
    if (t.master) reinterpret_cast<T *>(t.param)[i] = from_f32<T>(wn);
  }
}

#define ADAMW(T, NAME)                                                                    \
  extern "C" __global__ void adamw_##NAME(const AdamWTensor *list, int count,            \
                                          AdamWConstants k) {                            \
    adamw<T>(list, count, k);                                                            \
  }
FOR_EACH_DTYPE(ADAMW)
