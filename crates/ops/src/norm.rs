//! RMSNorm as Llama defines it.

use candle_core::{DType, Result, Tensor, D};

/// `weight * (x / sqrt(mean(x^2) + eps))`, normalised in f32 and cast back to the input dtype
/// before the weight is applied, as Hugging Face's LlamaRMSNorm does (bf16 runs then agree).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x32 = x.to_dtype(DType::F32)?;
    let mean_sq = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x32.broadcast_mul(&(mean_sq + eps)?.sqrt()?.recip()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(weight)
}
