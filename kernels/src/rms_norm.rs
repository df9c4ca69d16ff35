//! RMSNorm, fused: forward and the input gradient each one pass over a row (kernels/cuda/rms_norm.cu
//! on the GPU, the loops here on the CPU).

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use crate::elem::{dispatch_cpu, packed, Elem};
use crate::simd::with_avx2;

/// `weight * (x / sqrt(mean(x^2) + eps))` over the last dimension of x, the normalised value
/// rounded to x's dtype before the weight multiplies it (Hugging Face's LlamaRMSNorm).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let cols = x.dim(D::Minus1)?;
    if cols == 0 || weight.dims() != [cols] {
        candle_core::bail!("rms_norm: weight {:?} for rows of {cols}", weight.dims());
    }
    let weight = weight.to_dtype(x.dtype())?;
    x.contiguous()?.apply_op2_arc(
        &weight.contiguous()?,
        std::sync::Arc::new(Box::new(RmsNorm { eps: eps as f32 })),
    )
}

struct RmsNorm {
    eps: f32,
}

/// The gradients of [`rms_norm`] for the output gradient `dy`: the input's, and the weight's
/// (in the weight's dtype) when `weight_grad` asks for it (full SFT trains the norms). For a
/// caller that differentiates a whole layer by hand (`helix_ops::decoder_layer`).
pub fn rms_norm_backward(
    x: &Tensor,
    weight: &Tensor,
    dy: &Tensor,
    eps: f64,
    weight_grad: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let w = weight.to_dtype(x.dtype())?.contiguous()?;
    let (dx, dw) = backward(&x.contiguous()?, &w, dy, eps as f32, weight_grad)?;
    Ok((dx, dw.map(|g| g.to_dtype(weight.dtype())).transpose()?))
}

fn backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    eps: f32,
    weight_grad: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let dy = dy.contiguous()?;
    let dx = x.apply_op3_no_bwd(w, &dy, &RmsNormBackward { eps })?;
    // The weight's gradient: Σ over rows of dy · n.
    let dw = match weight_grad {
        false => None,
        true => {
            let ones = w.ones_like()?;
            let n = x
                .apply_op2_no_bwd(&ones, &RmsNorm { eps })?
                .to_dtype(DType::F32)?;
            let cols = w.dim(0)?;
            let rows = (dy.to_dtype(DType::F32)? * n)?.reshape(((), cols))?;
            Some(rows.sum(0)?.to_dtype(w.dtype())?)
        }
    };
    Ok((dx, dw))
}

/// The forward of one row.
#[inline(always)]
pub(crate) fn forward_row<T: Elem>(x: &[T], w: &[T], y: &mut [T], eps: f32) {
    // Summed in f64: closer to PyTorch's pairwise f32 sum than a running f32 sum over 4096.
    let sq: f64 = x.iter().map(|v| (v.to_f32() * v.to_f32()) as f64).sum();
    let rstd = 1.0 / ((sq / x.len() as f64) as f32 + eps).sqrt();
    for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
        *y = T::from_f32(T::round(x.to_f32() * rstd) * w.to_f32());
    }
}

/// The input gradient of one row: rstd · (g − n · mean(g · n)), g = dy · w rounded to T.
#[inline(always)]
pub(crate) fn backward_row<T: Elem>(x: &[T], w: &[T], dy: &[T], dx: &mut [T], eps: f32) {
    let g = |i: usize| T::round(dy[i].to_f32() * w[i].to_f32());
    let (mut sq, mut dot) = (0f64, 0f64);
    for (i, v) in x.iter().enumerate() {
        let v = v.to_f32();
        sq += (v * v) as f64;
        dot += (g(i) * v) as f64;
    }
    let n = x.len() as f32;
    let dot = dot as f32;
    let rstd = 1.0 / ((sq / n as f64) as f32 + eps).sqrt();
    let c = dot * rstd * rstd * rstd / n;
    for (i, (dx, x)) in dx.iter_mut().zip(x).enumerate() {
        *dx = T::from_f32(g(i) * rstd - x.to_f32() * c);
    }
}

fn forward_cpu<T: Elem>(x: &[T], w: &[T], eps: f32) -> Result<Vec<T>> {
    let cols = w.len();
    let mut y = vec![T::from_f32(0.0); x.len()];
    y.par_chunks_mut(cols)
        .zip(x.par_chunks(cols))
        .for_each(|(y, x)| {
            with_avx2(
                #[inline(always)]
                || forward_row(x, w, y, eps),
            )
        });
    Ok(y)
}

fn backward_cpu<T: Elem>(x: &[T], w: &[T], dy: &[T], eps: f32) -> Result<Vec<T>> {
    let cols = w.len();
    let mut dx = vec![T::from_f32(0.0); x.len()];
    dx.par_chunks_mut(cols)
        .zip(x.par_chunks(cols).zip(dy.par_chunks(cols)))
        .for_each(|(dx, (x, dy))| {
            with_avx2(
                #[inline(always)]
                || backward_row(x, w, dy, dx, eps),
            )
        });
    Ok(dx)
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "helix-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = dispatch_cpu!("rms_norm", (s1, s2), |T, (x, w)| forward_cpu::<T>(
            packed(x, l1, "rms_norm input")?,
            packed(w, l2, "rms_norm weight")?,
            self.eps
        ))?;
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        on_gpu("rms_norm_fwd", &[(s1, l1), (s2, l2)], self.eps)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = backward(x, w, dy, self.eps, w.track_op())?;
        Ok((Some(dx), dw))
    }
}

/// The input gradient of [`RmsNorm`]: (x, w, dy) → dx.
struct RmsNormBackward {
    eps: f32,
}

impl CustomOp3 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "helix-rms-norm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = dispatch_cpu!("rms_norm backward", (s1, s2, s3), |T, (x, w, dy)| {
            backward_cpu::<T>(
                packed(x, l1, "rms_norm input")?,
                packed(w, l2, "rms_norm weight")?,
                packed(dy, l3, "rms_norm gradient")?,
                self.eps,
            )
        })?;
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        on_gpu("rms_norm_bwd_dx", &[(s1, l1), (s2, l2), (s3, l3)], self.eps)
    }
}

/// Runs `function` of kernels/cuda/rms_norm.cu over the rows of inputs[0] (x), inputs[1] being
/// the weight; the output has x's shape.
#[cfg(feature = "cuda")]
fn on_gpu(
    function: &str,
    inputs: &[(&candle_core::CudaStorage, &Layout)],
    eps: f32,
) -> Result<(candle_core::CudaStorage, Shape)> {
    let (x, w) = (inputs[0].1.shape(), inputs[1].1.shape());
    let (n, cols) = (x.elem_count(), w.elem_count());
    let grid = crate::cuda::Grid::Rows {
        rows: n / cols.max(1),
        cols,
        eps,
    };
    let out = crate::cuda::launch(crate::cuda::RMS_NORM, function, inputs, n, grid)?;
    Ok((out, x.clone()))
}
