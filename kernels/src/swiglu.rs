//! SwiGLU, fused: `silu(gate) * up` forward, both input gradients in one pass backward
//! (kernels/cuda/swiglu.cu on the GPU, the loops here on the CPU).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::elem::{dispatch_cpu, packed, Elem};
use crate::exp::exp;
use crate::simd::with_avx2;

/// `silu(gate) * up`, silu's value rounded to the dtype before the product (as PyTorch's two
/// ops store it).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.shape() != up.shape() {
        candle_core::bail!(
            "swiglu: gate {:?} and up {:?} differ",
            gate.dims(),
            up.dims()
        );
    }
    gate.contiguous()?
        .apply_op2_arc(&up.contiguous()?, Arc::new(Box::new(Swiglu)))
}

struct Swiglu;

/// The gradients of [`swiglu`] for the output gradient `dy`: (d gate, d up), from one pass.
pub fn swiglu_backward(gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    let d = gate.contiguous()?.apply_op3_no_bwd(
        &up.contiguous()?,
        &dy.contiguous()?,
        &SwigluBackward,
    )?;
    Ok((d.get(0)?, d.get(1)?))
}

/// Elements per parallel task on the CPU.
const CHUNK: usize = 1 << 14;

#[inline(always)]
fn sigmoid(g: f32) -> f32 {
    1.0 / (1.0 + exp(-g))
}

fn forward_cpu<T: Elem>(gate: &[T], up: &[T]) -> Result<Vec<T>> {
    let mut y = vec![T::from_f32(0.0); gate.len()];
    y.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .for_each(|(y, (gate, up))| {
            with_avx2(
                #[inline(always)]
                || {
                    for ((y, g), u) in y.iter_mut().zip(gate).zip(up) {
                        let g = g.to_f32();
                        *y = T::from_f32(T::round(g * sigmoid(g)) * u.to_f32());
                    }
                },
            )
        });
    Ok(y)
}

/// d gate and d up, stacked as [2, n].
fn backward_cpu<T: Elem>(gate: &[T], up: &[T], dy: &[T]) -> Result<Vec<T>> {
    let n = gate.len();
    let mut d = vec![T::from_f32(0.0); 2 * n];
    let (dg, du) = d.split_at_mut(n);
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .zip(
            gate.par_chunks(CHUNK)
                .zip(up.par_chunks(CHUNK))
                .zip(dy.par_chunks(CHUNK)),
        )
        .for_each(|((dg, du), ((gate, up), dy))| {
            with_avx2(
                #[inline(always)]
                || {
                    for i in 0..gate.len() {
                        let g = gate[i].to_f32();
                        let sg = sigmoid(g);
                        let s = T::round(g * sg);
                        let dyi = dy[i].to_f32();
                        let ds = T::round(dyi * up[i].to_f32());
                        dg[i] = T::from_f32(ds * sg * (1.0 + g * (1.0 - sg)));
                        du[i] = T::from_f32(dyi * s);
                    }
                },
            )
        });
    Ok(d)
}

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "helix-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = dispatch_cpu!("swiglu", (s1, s2), |T, (g, u)| forward_cpu::<T>(
            packed(g, l1, "swiglu gate")?,
            packed(u, l2, "swiglu up")?
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
        on_gpu("swiglu_fwd", &[(s1, l1), (s2, l2)], l1.shape().clone())
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = swiglu_backward(gate, up, dy)?;
        Ok((Some(dg), Some(du)))
    }
}

/// (gate, up, dy) → [d gate, d up] stacked on a new first dimension.
struct SwigluBackward;

impl CustomOp3 for SwigluBackward {
    fn name(&self) -> &'static str {
        "helix-swiglu-backward"
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
        let out = dispatch_cpu!("swiglu backward", (s1, s2, s3), |T, (g, u, dy)| {
            backward_cpu::<T>(
                packed(g, l1, "swiglu gate")?,
                packed(u, l2, "swiglu up")?,
                packed(dy, l3, "swiglu gradient")?,
            )
        })?;
        Ok((out, stacked(l1.shape())))
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
        on_gpu(
            "swiglu_bwd",
            &[(s1, l1), (s2, l2), (s3, l3)],
            stacked(l1.shape()),
        )
    }
}

fn stacked(shape: &Shape) -> Shape {
    let mut dims = vec![2];
    dims.extend_from_slice(shape.dims());
    Shape::from(dims)
}

/// Runs `function` of kernels/cuda/swiglu.cu over the elements of inputs[0] into `out`.
#[cfg(feature = "cuda")]
fn on_gpu(
    function: &str,
    inputs: &[(&candle_core::CudaStorage, &Layout)],
    out: Shape,
) -> Result<(candle_core::CudaStorage, Shape)> {
    let n = inputs[0].1.shape().elem_count();
    let grid = crate::cuda::Grid::Elements { n, extra: vec![] };
    let storage = crate::cuda::launch(
        crate::cuda::SWIGLU,
        function,
        inputs,
        out.elem_count(),
        grid,
    )?;
    Ok((storage, out))
}
