//! The differentiable building blocks of one Llama training step, one function each.
//!
//! The model calls only these functions for projections, RMSNorm, RoPE, SwiGLU, attention and the
//! loss, so a
//! fused CUDA kernel (kernels/) or a tensor-parallel variant can take the place of any one of
//! them without touching the model. Each is written with candle ops that have a backward pass;
//! where the plain op graph would be slow or memory-hungry, the forward is computed detached and
//! an explicit backward is attached with [`with_backward`].

mod attention;
mod backward;
mod collective;
mod layer;
mod linear;
mod loss;
mod norm;
mod rope;
mod sequence_parallel;

pub use attention::{
    attention_bias, causal_attention, plain_causal_attention, repeat_kv, rope_attention,
    AttentionKernel, AttentionMask, MaskSpec,
};
pub use backward::{
    with_backward, with_backward2, with_backward3, with_backward_n, BackwardFn, Grads3,
};
pub use collective::{
    copy_to_parallel_region, reduce_from_parallel_region, Collective, SharedCollective,
};
pub use layer::{decoder_layer, DecoderWeights, Projection};
pub use linear::{linear, linear_base, lora_linear, BaseWeight};

/// QLoRA's NF4 storage of frozen weights ([`BaseWeight::Nf4`]).
pub use helix_kernels::nf4;
pub use loss::{
    count_targets, linear_cross_entropy, vocab_parallel_cross_entropy, VocabShard, IGNORE_INDEX,
};
pub use norm::rms_norm;
pub use rope::{apply_rope, RopeScaling, RopeTable};
pub use sequence_parallel::{
    gather_from_sequence_parallel_region, scatter_to_sequence_parallel_region, RowShard,
};

/// The fused kernels compared with their references (`helix-train kernel-check`).
pub use helix_kernels::check as kernel_check;

use candle_core::{Result, Tensor};

/// SwiGLU activation of the Llama MLP: `silu(gate) * up`, the fused op of
/// `helix_kernels::swiglu` (one pass each way, keeping only gate and up), as for [`rms_norm`].
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    helix_kernels::swiglu(gate, up)
}

/// Inverted dropout with the mask of `key` ([`helix_kernels::dropout`]): drawn on the tensor's
/// device from the key and each element's index, and drawn again for the backward.
pub fn dropout(x: &Tensor, p: f64, key: u64) -> Result<Tensor> {
    helix_kernels::dropout(x, p, key)
}

pub use helix_kernels::dropout::dropout_key;

/// Softmax over the last dimension, computed in f32 and returned in the input's dtype.
///
/// The forward uses candle's fused kernel; the backward is the closed form
/// `dx = y * (dy - sum(dy * y))`, cheaper than differentiating through max/exp/sum.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let y = candle_nn::ops::softmax_last_dim(&x.detach().to_dtype(candle_core::DType::F32)?)?;
    let y_saved = y.clone();
    let y = with_backward(x, y.to_dtype(dtype)?, move |grad| {
        let g = grad.to_dtype(candle_core::DType::F32)?;
        let dot = (&g * &y_saved)?.sum_keepdim(candle_core::D::Minus1)?;
        let dx = (g.broadcast_sub(&dot)? * &y_saved)?;
        dx.to_dtype(dtype)
    })?;
    Ok(y)
}

#[cfg(test)]
mod layer_tests;
#[cfg(test)]
mod layer_tp_tests;
#[cfg(test)]
mod tests;
