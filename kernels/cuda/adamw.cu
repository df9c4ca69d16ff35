// One AdamW update of an f32 parameter (or f32 master copy) in one pass, the operations in the
// order and f32 rounding of helix's unfused update (crates/train/src/optim.rs, as
// torch.optim.AdamW): out = [w', m', v'] packed as [3, n]. __fmul_rn / __fadd_rn keep nvcc from
// contracting a product and a sum into one fused multiply-add the reference does not do. The
// CPU reference is kernels/src/adamw.rs.
#include <stdint.h>

extern "C" __global__ void adamw_f32(const float *w, const float *m, const float *v, const float *g,
                                     float *out, int64_t n, float decay, float c1, float b2,
                                     float c2, float inv_bias2, float eps, float step_size) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    const float gi = g[i];
    // w * (1 - lr * wd); decay is 1 when the parameter takes none.
    const float wi = __fmul_rn(w[i], decay);
    // m + (g - m)(1 - b1): torch's lerp.
    const float mi = __fadd_rn(m[i], __fmul_rn(__fsub_rn(gi, m[i]), c1));
    // v b2 + g² (1 - b2)
    const float vi = __fadd_rn(__fmul_rn(v[i], b2), __fmul_rn(__fmul_rn(gi, gi), c2));
    const float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(vi), inv_bias2), eps);
    out[i] = __fsub_rn(wi, __fdiv_rn(__fmul_rn(mi, step_size), denom));
    out[n + i] = mi;
    out[2 * n + i] = vi;
  }
}
