//! RMSNorm as Llama defines it.

use candle_core::{Result, Tensor};

/// `weight * (x / sqrt(mean(x^2) + eps))`, normalised in f32 and cast back to the input dtype
/// before the weight is applied, as Hugging Face's LlamaRMSNorm does (bf16 runs then agree).
/// One fused op forward and backward (`helix_kernels::rms_norm`: a CUDA kernel on the GPU, its
/// CPU reference here).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    helix_kernels::rms_norm(x, weight, eps)
}
