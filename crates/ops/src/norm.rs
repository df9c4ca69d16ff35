//! RMSNorm as Llama defines it.

use candle_core::{DType, Result, Tensor, D};

/// `weight * (x / sqrt(mean(x^2) + eps))`, normalised in f32 and cast back to the input dtype
/// before the weight is applied, as Hugging Face's LlamaRMSNorm does (bf16 runs then agree).
///
/// On a GPU this is the fused kernel (`helix_kernels::rms_norm`, one pass forward and one
/// backward, checked against its CPU reference on the device by `helix-train kernel-check`):
/// the unfused graph would keep five f32 copies of x per norm. On the CPU the unfused ops stay,
/// the path the parity tests against transformers hold to their tolerances.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if x.device().is_cuda() {
        return helix_kernels::rms_norm(x, weight, eps);
    }
    let dtype = x.dtype();
    let x32 = x.to_dtype(DType::F32)?;
    let mean_sq = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x32.broadcast_mul(&(mean_sq + eps)?.sqrt()?.recip()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(weight)
}
