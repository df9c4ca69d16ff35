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
    let d = backward(gate, up, dy, false)?;
    Ok((d.get(0)?, d.get(1)?))
}

/// [`swiglu_backward`] and, from the same pass, [`swiglu`]'s output itself: (d gate, d up, y).
/// A layer that recomputes y in its backward (for the down projection's weight or adapter
/// gradients, which the input gradient does not need first) gets it for one more write
/// instead of another pass over gate and up.
pub fn swiglu_backward_and_output(
    gate: &Tensor,
    up: &Tensor,
    dy: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let d = backward(gate, up, dy, true)?;
    Ok((d.get(0)?, d.get(1)?, d.get(2)?))
}

fn backward(gate: &Tensor, up: &Tensor, dy: &Tensor, with_output: bool) -> Result<Tensor> {
    for (what, t) in [("up", up), ("the gradient", dy)] {
        if t.shape() != gate.shape() {
            candle_core::bail!(
                "swiglu backward: gate {:?} but {what} {:?}",
                gate.dims(),
                t.dims()
            );
        }
    }
    gate.contiguous()?.apply_op3_no_bwd(
        &up.contiguous()?,
        &dy.contiguous()?,
        &SwigluBackward { with_output },
    )
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

/// d gate and d up, and with `with_output` the forward's y, stacked as [2 or 3, n].
fn backward_cpu<T: Elem>(gate: &[T], up: &[T], dy: &[T], with_output: bool) -> Result<Vec<T>> {
    let n = gate.len();
    let parts = 2 + usize::from(with_output);
    let mut d = vec![T::from_f32(0.0); parts * n];
    let (dg, rest) = d.split_at_mut(n);
    let (du, y) = rest.split_at_mut(n);
    // Without the output, y is empty: its chunks run out first, so give it chunks of its own.
    let mut y_chunks: Vec<&mut [T]> = y.chunks_mut(CHUNK).collect();
    y_chunks.resize_with(n.div_ceil(CHUNK), Default::default);
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .zip(y_chunks.into_par_iter())
        .zip(
            gate.par_chunks(CHUNK)
                .zip(up.par_chunks(CHUNK))
                .zip(dy.par_chunks(CHUNK)),
        )
        .for_each(|(((dg, du), y), ((gate, up), dy))| {
            with_avx2(
                #[inline(always)]
                || {
                    // Zipped slices, not indices: the loop vectorises only without bounds
                    // checks (indexed, it ran 25 times slower than the forward).
                    let grads = gate
                        .iter()
                        .zip(up)
                        .zip(dy)
                        .map(|((g, u), dy)| gradients_at(g.to_f32(), u.to_f32(), dy.to_f32()));
                    if with_output {
                        for (((dg, du), y), (g, u, out)) in dg
                            .iter_mut()
                            .zip(du.iter_mut())
                            .zip(y.iter_mut())
                            .zip(grads)
                        {
                            (*dg, *du, *y) = (g, u, out);
                        }
                    } else {
                        for ((dg, du), (g, u, _)) in dg.iter_mut().zip(du.iter_mut()).zip(grads) {
                            (*dg, *du) = (g, u);
                        }
                    }
                },
            )
        });
    Ok(d)
}

/// (d gate, d up, y) at one element: silu's value s = g σ(g) rounded as the forward stores it,
/// d up = dy · s, d gate = dy · u · σ(g) (1 + g (1 − σ(g))).
#[inline(always)]
fn gradients_at<T: Elem>(g: f32, u: f32, dy: f32) -> (T, T, T) {
    let sg = sigmoid(g);
    let s = T::round(g * sg);
    let ds = T::round(dy * u);
    (
        T::from_f32(ds * sg * (1.0 + g * (1.0 - sg))),
        T::from_f32(dy * s),
        T::from_f32(s * u),
    )
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
        on_gpu(
            "swiglu_fwd",
            &[(s1, l1), (s2, l2)],
            l1.shape().clone(),
            vec![],
        )
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

/// (gate, up, dy) → [d gate, d up] (and with `with_output` the forward's y) stacked on a new
/// first dimension.
struct SwigluBackward {
    with_output: bool,
}

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
                self.with_output,
            )
        })?;
        Ok((out, self.stacked(l1.shape())))
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
            self.stacked(l1.shape()),
            vec![i32::from(self.with_output)],
        )
    }
}

impl SwigluBackward {
    fn stacked(&self, shape: &Shape) -> Shape {
        let mut dims = vec![2 + usize::from(self.with_output)];
        dims.extend_from_slice(shape.dims());
        Shape::from(dims)
    }
}

/// Runs `function` of kernels/cuda/swiglu.cu over the elements of inputs[0] into `out`.
#[cfg(feature = "cuda")]
fn on_gpu(
    function: &str,
    inputs: &[(&candle_core::CudaStorage, &Layout)],
    out: Shape,
    extra: Vec<i32>,
) -> Result<(candle_core::CudaStorage, Shape)> {
    let n = inputs[0].1.shape().elem_count();
    let grid = crate::cuda::Grid::Elements { n, extra };
    let storage = crate::cuda::launch(
        crate::cuda::SWIGLU,
        function,
        inputs,
        out.elem_count(),
        grid,
    )?;
    Ok((storage, out))
}
