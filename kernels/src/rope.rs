//! Rotary position embeddings (rotate-half layout), fused: one pass forward and one backward
//! (kernels/cuda/rope.cu on the GPU, the loops here on the CPU).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::elem::{dispatch_cpu, packed, Elem};
use crate::simd::with_avx2;

/// `x * cos + rotate_half(x) * sin` for x [B, H, S, D] and cos / sin [B, 1, S, D] (the same
/// for every head), each product rounded to the dtype as PyTorch's separate ops store it.
/// cos and sin are constants: no gradient flows to them. On a GPU x may be a view (unit last
/// stride), read in place: the heads of a projection's [B, S, H · D] output need no copy.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    apply(x, cos, sin, Rope::forward(false))
}

/// [`rope`] written with the heads merged, [B, S, H, D], as the projections' outputs are laid
/// out: rotating a gradient back with −sin ([`rope`]'s transpose) gives it in the layout the
/// projection's backward reads, with no transposing copy.
pub fn rope_merging_heads(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    apply(x, cos, sin, Rope::forward(true))
}

fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor, op: Rope) -> Result<Tensor> {
    let (b, _, s, d) = x.dims4()?;
    for (name, t) in [("cos", cos), ("sin", sin)] {
        if t.dims() != [b, 1, s, d] {
            candle_core::bail!("rope: {name} {:?} for x {:?}", t.dims(), x.dims());
        }
    }
    if d % 2 != 0 {
        candle_core::bail!("rope: head dim {d} is odd");
    }
    let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
    readable(x)?.apply_op3_arc(
        &cos.detach().contiguous()?,
        &sin.detach().contiguous()?,
        Arc::new(Box::new(op)),
    )
}

/// The forward, or with `backward` its transpose applied to the output gradient; the result
/// heads first [B, H, S, D], or with `merged` [B, S, H, D].
#[derive(Clone, Copy)]
struct Rope {
    backward: bool,
    merged: bool,
}

impl Rope {
    fn forward(merged: bool) -> Self {
        Self {
            backward: false,
            merged,
        }
    }

    /// The output's shape for x [B, H, S, D].
    fn out_shape(&self, x: &Layout) -> Shape {
        let d = x.shape().dims();
        match self.merged {
            true => Shape::from((d[0], d[2], d[1], d[3])),
            false => x.shape().clone(),
        }
    }
}

/// One [S, D] slab of one head: `x` and `y` rows of `d`, `cos` / `sin` of the slab's batch row.
#[inline(always)]
fn slab<T: Elem>(x: &[T], cos: &[T], sin: &[T], y: &mut [T], d: usize, backward: bool) {
    let half = d / 2;
    for ((x, y), (c, s)) in x
        .chunks(d)
        .zip(y.chunks_mut(d))
        .zip(cos.chunks(d).zip(sin.chunks(d)))
    {
        for i in 0..d {
            let p = if i < half { i + half } else { i - half };
            let a = T::round(x[i].to_f32() * c[i].to_f32());
            let r = match backward {
                // rotate_half(x)[i] = -x[i + half] before half, x[i - half] after.
                false => {
                    let xp = x[p].to_f32();
                    T::round(if i < half { -xp } else { xp } * s[i].to_f32())
                }
                // rotate_half^T(v)[i] = v[i + half] before half, -v[i - half] after; v = dy · sin.
                true => {
                    let vp = T::round(x[p].to_f32() * s[p].to_f32());
                    if i < half {
                        vp
                    } else {
                        -vp
                    }
                }
            };
            y[i] = T::from_f32(a + r);
        }
    }
}

/// [B, H, S, D] from x (its elements in [B, H, S, D] order, packed); with `merged`, permuted
/// to [B, S, H, D].
fn rope_cpu<T: Elem>(x: &[T], cos: &[T], sin: &[T], dims: &[usize], op: Rope) -> Result<Vec<T>> {
    let (h, s, d) = (dims[1], dims[2], dims[3]);
    let mut y = vec![T::from_f32(0.0); x.len()];
    y.par_chunks_mut(s * d)
        .zip(x.par_chunks(s * d))
        .enumerate()
        .for_each(|(slab_index, (y, x))| {
            let b = slab_index / h;
            let table = b * s * d..(b + 1) * s * d;
            with_avx2(
                #[inline(always)]
                || slab(x, &cos[table.clone()], &sin[table], y, d, op.backward),
            );
        });
    if !op.merged {
        return Ok(y);
    }
    // [B, H, S, D] → [B, S, H, D], a row of D at a time.
    let mut merged = vec![T::from_f32(0.0); y.len()];
    for (i, row) in y.chunks(d.max(1)).enumerate() {
        let (bh, si) = (i / s, i % s);
        let (bi, hi) = (bh / h, bh % h);
        let at = ((bi * s + si) * h + hi) * d;
        merged[at..at + d].copy_from_slice(row);
    }
    Ok(merged)
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        match self.backward {
            false => "helix-rope",
            true => "helix-rope-backward",
        }
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
        let dims = l1.shape().dims();
        let out = dispatch_cpu!("rope", (s1, s2, s3), |T, (x, c, s)| rope_cpu::<T>(
            packed(x, l1, "rope input")?,
            packed(c, l2, "rope cos")?,
            packed(s, l3, "rope sin")?,
            dims,
            *self
        ))?;
        Ok((out, self.out_shape(l1)))
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
        let out = crate::cuda::rope((s1, l1), [(s2, l2), (s3, l3)], self.backward, self.merged)?;
        Ok((out, self.out_shape(l1)))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // dy is laid out as the output was: merged, it is read back as [B, H, S, D].
        let dy = match self.merged {
            true => dy.transpose(1, 2)?,
            false => dy.clone(),
        };
        let back = Rope {
            backward: true,
            merged: false,
        };
        let dx = readable(&dy)?.apply_op3_no_bwd(cos, sin, &back)?;
        Ok((Some(dx), None, None))
    }
}

/// x as the op reads it: packed on the CPU; on a GPU any view whose last stride is 1.
fn readable(x: &Tensor) -> Result<Tensor> {
    match x.device().is_cpu() || x.stride().last() != Some(&1) {
        true => x.contiguous(),
        false => Ok(x.clone()),
    }
}
