//! Σ x² of each of a list of f32 tensors: the gradients' global norm, for clipping. On a GPU
//! one launch (kernels/cuda/sum_squares.cu) writes a partial sum per block of
//! [`TENSOR_LIST_BLOCK_ELEMS`] elements and one copy brings them to the host, where each
//! tensor's partials are added in f64; per gradient, candle's ops would take a square, a sum
//! and a conversion, three launches each. The CPU reference sums in f64 throughout (the
//! kernel's f32 partials differ from it by f32 rounding of sums taken in another order).

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

use crate::launch::TENSOR_LIST_BLOCK_ELEMS;

/// Σ x² of each tensor in `tensors` (f32, all on one device), in f64.
pub fn sums_of_squares(tensors: &[&Tensor]) -> Result<Vec<f64>> {
    let Some(first) = tensors.first() else {
        return Ok(Vec::new());
    };
    let device = first.device().clone();
    for t in tensors {
        if t.dtype() != DType::F32 {
            candle_core::bail!("sum of squares: a {:?} tensor, expected f32", t.dtype());
        }
        if !t.device().same_device(&device) {
            candle_core::bail!("sum of squares: the tensors are on different devices");
        }
    }
    match &device {
        Device::Cpu => tensors.iter().map(|t| sum_on_cpu(t)).collect(),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => crate::tensor_list_cuda::sums_of_squares(tensors),
        other => candle_core::bail!("sum of squares: no kernel for {other:?}"),
    }
}

/// Σ x² in f64, block by block as the GPU's blocks split it (so parallel and deterministic).
fn sum_on_cpu(t: &Tensor) -> Result<f64> {
    crate::elem::with_cpu_f32([t], "sum of squares", |[x]| {
        let partials: Vec<f64> = x
            .par_chunks(TENSOR_LIST_BLOCK_ELEMS)
            .map(|block| block.iter().map(|&v| v as f64 * v as f64).sum())
            .collect();
        partials.iter().sum()
    })
}
