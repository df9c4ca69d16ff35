//! Rotary position embeddings (rotate-half layout), fused: one pass forward and one backward
//! (kernels/cuda/rope.cu on the GPU, the loops here on the CPU).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::elem::{dispatch_cpu, packed, Elem};
use crate::simd::with_avx2;

/// `x * cos + rotate_half(x) * sin` for x [B, H, S, D] and cos / sin [B, 1, S, D] (the same
/// for every head), each product rounded to the dtype as PyTorch's separate ops store it.
/// cos and sin are constants: no gradient flows to them.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
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
    let op = Rope { backward: false };
    x.contiguous()?.apply_op3_arc(
        &cos.detach().contiguous()?,
        &sin.detach().contiguous()?,
        Arc::new(Box::new(op)),
    )
}

/// The forward, or with `backward` its transpose applied to the output gradient.
#[derive(Clone, Copy)]
struct Rope {
    backward: bool,
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

fn rope_cpu<T: Elem>(
    x: &[T],
    cos: &[T],
    sin: &[T],
    dims: &[usize],
    backward: bool,
) -> Result<Vec<T>> {
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
                || slab(x, &cos[table.clone()], &sin[table], y, d, backward),
            );
        });
    Ok(y)
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
            self.backward
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
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dims = l1.shape().dims();
        let n = l1.shape().elem_count();
        let extra = vec![
            dims[1] as i32,
            dims[2] as i32,
            dims[3] as i32,
            self.backward as i32,
        ];
        let out = crate::cuda::launch(
            crate::cuda::ROPE,
            "rope",
            &[(s1, l1), (s2, l2), (s3, l3)],
            n,
            crate::cuda::Grid::Elements { n, extra },
        )?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = dy
            .contiguous()?
            .apply_op3_no_bwd(cos, sin, &Rope { backward: true })?;
        Ok((Some(dx), None, None))
    }
}
