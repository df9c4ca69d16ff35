//! Fused training kernels, each with a CUDA forward and backward (kernels/cuda/*.cu) beside a
//! plain CPU reference written as loops over rows (src/*.rs): RMSNorm ([`rms_norm`]), SwiGLU
//! ([`swiglu`]) and rotary embeddings ([`rope`]). Each is a candle custom op whose backward is
//! another custom op of the same kernel file, so candle's autograd sees one node per fused op.
//! Causal attention runs FlashAttention-2 whole on a GPU ([`flash`]: tensor-core kernels,
//! forward and backward, bf16 / f16) beside its tile-by-tile CPU reference
//! ([`flash_attention`], checked against the full score matrix in f64); elsewhere
//! `helix_ops::causal_attention` runs the same algorithm a chunk of query rows at a time, its
//! matmuls on cuBLAS or the CPU's gemm and its softmax in the kernels of
//! [`attention_softmax`]. The LM
//! head's cross-entropy takes each row's softmax statistics and the logits' gradient from the
//! kernels of [`cross_entropy`]. The optimizer's work runs over all parameters in one launch:
//! AdamW in place ([`adamw_step`]) and the gradients' sums of squares ([`sums_of_squares`]).
//! Dropout's masks come from a key and the element's index ([`dropout`]), drawn on the device.
//! QLoRA's frozen weights are stored in NF4 and dequantized where a matmul reads them ([`nf4`]).
//!
//! Storage is f32, bf16 or f16; arithmetic is f32, rounding intermediates to the storage type
//! exactly where PyTorch's unfused ops store them, so bf16 runs stay close to transformers'.
//! The CPU path trains with the references; on the GPU `helix-train kernel-check` compares the
//! CUDA kernels with them (scripts/gpu-check.sh).

mod adamw;
pub mod attention_softmax;
pub mod check;
pub mod cross_entropy;
pub mod dropout;
mod elem;
mod exp;
pub mod flash;
pub mod flash_attention;
mod flash_cpu;
pub mod launch;
pub mod low_rank;
pub mod nf4;
mod rms_norm;
mod rope;
mod simd;
mod sum_squares;
mod swiglu;
mod tile_matmul;
pub mod unfused;

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
mod flash_cuda;
#[cfg(feature = "cuda")]
mod tensor_list_cuda;

pub use adamw::{adamw_step, AdamWParam, AdamWStep};
pub use dropout::dropout;
pub use rms_norm::{rms_norm, rms_norm_backward};
pub use rope::{rope, rope_merging_heads};
pub use sum_squares::sums_of_squares;
pub use swiglu::{swiglu, swiglu_backward, swiglu_backward_and_output};

#[cfg(test)]
mod tests;
