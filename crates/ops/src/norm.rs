//! RMSNorm as Llama defines it.

use candle_core::{Result, Tensor};

/// `weight * (x / sqrt(mean(x^2) + eps))`, normalised in f32 and rounded to the input dtype
/// before the weight is applied, as Hugging Face's LlamaRMSNorm does (bf16 runs then agree).
///
/// The fused op of `helix_kernels::rms_norm`: one pass forward and one for the input gradient,
/// a CUDA kernel on a GPU and its CPU reference loops (row sums in f64) on the CPU, where the
/// unfused graph would keep five f32 copies of x per norm and add a gradient for each of
/// its nine nodes.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    helix_kernels::rms_norm(x, weight, eps)
}
