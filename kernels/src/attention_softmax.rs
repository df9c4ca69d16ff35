//! The softmax of causal attention as three kernels, for `helix_ops::causal_attention`, which
//! runs the FlashAttention-2 algorithm one chunk of query rows at a time with the matmuls on
//! cuBLAS (or candle's CPU gemm): per chunk, [`row_stats`] and [`probs`] replace a dozen f32
//! element-wise ops over the scores in the forward, and [`probs`] and [`softmax_grad`] in the
//! backward. One pass each, in the scores' dtype, arithmetic in f32 (kernels/cuda/
//! attention_softmax.cu on the GPU, the loops here on the CPU). They are forward-only ops: the
//! attention's own backward calls them on detached tensors.
//!
//! Shapes: scores, probabilities and their gradients [B, H, R, K] (R query rows, K keys); the
//! additive mask `bias` [B, 1, R, K], shared by the heads; row statistics (max, Σ exp) [B, H, R, 2]
//! and the rowsum(dO ∘ O) term [B, H, R, 1] in f32.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::elem::{dispatch_cpu, packed, packed_as, Elem};
use crate::exp::{exp, max_of, sum_exp};
use crate::simd::with_avx2;

/// Each row's softmax statistics over v = scores · scale + bias: its maximum m and
/// Σ_k exp(v − m), [B, H, R, 2] in f32. Kept as the pair rather than their log-sum-exp, so the
/// probabilities [`probs`] rebuilds are exp(v − m) / Σ, rounded as a plain softmax rounds them
/// (exp(v − lse) would carry the rounding of lse: twice PyTorch's distance from f64 in the
/// SmolLM2 adapter gradients).
pub fn row_stats(scores: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let dims = Dims::of(scores, bias)?;
    scores.contiguous()?.apply_op2_no_bwd(
        &bias.to_dtype(scores.dtype())?.contiguous()?,
        &RowStats {
            dims,
            scale: scale as f32,
        },
    )
}

/// p = exp(v − m) / Σ in the scores' dtype, v = scores · scale + bias and (m, Σ) from
/// [`row_stats`]: the attention probabilities.
pub fn probs(scores: &Tensor, bias: &Tensor, stats: &Tensor, scale: f64) -> Result<Tensor> {
    let dims = Dims::of(scores, bias)?;
    check_rows(stats, &dims, 2, "stats")?;
    scores.contiguous()?.apply_op3_no_bwd(
        &bias.to_dtype(scores.dtype())?.contiguous()?,
        &stats.contiguous()?,
        &Probs {
            dims,
            scale: scale as f32,
        },
    )
}

/// ds = p · (dp − d) · scale: the scores' gradient from the probabilities' (softmax's backward,
/// with d = rowsum(dO ∘ O) [B, H, R, 1] in f32, and the scale of the scores folded in).
pub fn softmax_grad(p: &Tensor, dp: &Tensor, d: &Tensor, scale: f64) -> Result<Tensor> {
    if p.dims() != dp.dims() || p.dtype() != dp.dtype() {
        candle_core::bail!("softmax_grad: p {:?} but dp {:?}", p.shape(), dp.shape());
    }
    let (b, h, r, k) = p.dims4()?;
    let dims = Dims {
        heads: h,
        rows: r,
        keys: k,
        batch: b,
    };
    check_rows(d, &dims, 1, "d")?;
    p.contiguous()?.apply_op3_no_bwd(
        &dp.contiguous()?,
        &d.contiguous()?,
        &SoftmaxGrad {
            keys: k,
            scale: scale as f32,
        },
    )
}

#[derive(Debug, Clone, Copy)]
struct Dims {
    batch: usize,
    heads: usize,
    rows: usize,
    keys: usize,
}

impl Dims {
    fn of(scores: &Tensor, bias: &Tensor) -> Result<Self> {
        let (batch, heads, rows, keys) = scores.dims4()?;
        if bias.dims() != [batch, 1, rows, keys] {
            candle_core::bail!(
                "attention softmax: bias {:?} for scores {:?}",
                bias.dims(),
                scores.dims()
            );
        }
        Ok(Self {
            batch,
            heads,
            rows,
            keys,
        })
    }

    /// The bias row of score row `r` (rows run over batch, head, query row).
    fn bias_row(&self, r: usize) -> usize {
        (r / (self.heads * self.rows)) * self.rows + r % self.rows
    }
}

fn check_rows(t: &Tensor, dims: &Dims, per_row: usize, what: &str) -> Result<()> {
    let want = [dims.batch, dims.heads, dims.rows, per_row];
    if t.dims() != want || t.dtype() != DType::F32 {
        candle_core::bail!(
            "attention softmax: {what} is {:?} {:?}, expected f32 {want:?}",
            t.dtype(),
            t.dims()
        );
    }
    Ok(())
}

struct RowStats {
    dims: Dims,
    scale: f32,
}

fn row_stats_cpu<T: Elem>(s: &[T], bias: &[T], d: &Dims, scale: f32) -> Vec<f32> {
    let k = d.keys;
    let mut stats = vec![0f32; 2 * (s.len() / k.max(1))];
    stats
        .par_chunks_mut(2)
        .enumerate()
        .for_each_init(Vec::new, |v: &mut Vec<f32>, (r, out)| {
            with_avx2(
                #[inline(always)]
                || {
                    // v = scores · scale + bias once, then its max and Σ exp(v − max).
                    let (sr, br) = (&s[r * k..][..k], &bias[d.bias_row(r) * k..][..k]);
                    v.clear();
                    v.extend(
                        sr.iter()
                            .zip(br)
                            .map(|(s, b)| s.to_f32() * scale + b.to_f32()),
                    );
                    let m = max_of(v);
                    out[0] = m;
                    out[1] = sum_exp(v, m);
                },
            )
        });
    stats
}

impl CustomOp2 for RowStats {
    fn name(&self) -> &'static str {
        "helix-attention-row-stats"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = self.dims;
        let stats = dispatch_cpu!("row_stats", (s1, s2), |T, (s, b)| -> f32 Ok::<
            _,
            candle_core::Error,
        >(
            row_stats_cpu::<T>(packed(s, l1, "scores")?, packed(b, l2, "bias")?, &d, self.scale)
        ))?;
        Ok((stats, Shape::from((d.batch, d.heads, d.rows, 2))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let d = self.dims;
        let out = crate::cuda::attention(
            crate::cuda::AttentionKernel::RowStats {
                heads: d.heads,
                q_rows: d.rows,
            },
            crate::cuda::AttentionArgs {
                typed: vec![(s1, l1), (s2, l2)],
                f32s: vec![],
                rows: d.batch * d.heads * d.rows,
                keys: d.keys,
                scale: self.scale,
            },
        )?;
        Ok((out, Shape::from((d.batch, d.heads, d.rows, 2))))
    }
}

struct Probs {
    dims: Dims,
    scale: f32,
}

fn probs_cpu<T: Elem>(s: &[T], bias: &[T], stats: &[f32], d: &Dims, scale: f32) -> Vec<T> {
    let k = d.keys;
    let mut p = vec![T::from_f32(0.0); s.len()];
    p.par_chunks_mut(k.max(1)).enumerate().for_each(|(r, pr)| {
        with_avx2(
            #[inline(always)]
            || {
                let (sr, br) = (&s[r * k..(r + 1) * k], &bias[d.bias_row(r) * k..][..k]);
                let (m, sum) = (stats[2 * r], stats[2 * r + 1]);
                for ((p, s), b) in pr.iter_mut().zip(sr).zip(br) {
                    *p = T::from_f32(exp(s.to_f32() * scale + b.to_f32() - m) / sum);
                }
            },
        )
    });
    p
}

impl CustomOp3 for Probs {
    fn name(&self) -> &'static str {
        "helix-attention-probs"
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
        let d = self.dims;
        let stats = packed_as::<f32>(s3, l3, "probs: stats")?;
        let p = dispatch_cpu!("probs", (s1, s2), |T, (s, b)| Ok::<_, candle_core::Error>(
            probs_cpu::<T>(
                packed(s, l1, "scores")?,
                packed(b, l2, "bias")?,
                stats,
                &d,
                self.scale
            )
        ))?;
        Ok((p, l1.shape().clone()))
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
        let d = self.dims;
        let out = crate::cuda::attention(
            crate::cuda::AttentionKernel::Probs {
                heads: d.heads,
                q_rows: d.rows,
            },
            crate::cuda::AttentionArgs {
                typed: vec![(s1, l1), (s2, l2)],
                f32s: vec![(s3, l3)],
                rows: d.batch * d.heads * d.rows,
                keys: d.keys,
                scale: self.scale,
            },
        )?;
        Ok((out, l1.shape().clone()))
    }
}

struct SoftmaxGrad {
    keys: usize,
    scale: f32,
}

fn softmax_grad_cpu<T: Elem>(p: &[T], dp: &[T], d: &[f32], k: usize, scale: f32) -> Vec<T> {
    let mut ds = vec![T::from_f32(0.0); p.len()];
    ds.par_chunks_mut(k.max(1))
        .enumerate()
        .for_each(|(r, out)| {
            with_avx2(
                #[inline(always)]
                || {
                    let (pr, dpr) = (&p[r * k..(r + 1) * k], &dp[r * k..(r + 1) * k]);
                    for ((o, p), dp) in out.iter_mut().zip(pr).zip(dpr) {
                        *o = T::from_f32(p.to_f32() * (dp.to_f32() - d[r]) * scale);
                    }
                },
            )
        });
    ds
}

impl CustomOp3 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "helix-attention-softmax-grad"
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
        let d = packed_as::<f32>(s3, l3, "softmax_grad: d")?;
        let (k, scale) = (self.keys, self.scale);
        let ds = dispatch_cpu!("softmax_grad", (s1, s2), |T, (p, dp)| Ok::<
            _,
            candle_core::Error,
        >(
            softmax_grad_cpu::<T>(packed(p, l1, "p")?, packed(dp, l2, "dp")?, d, k, scale)
        ))?;
        Ok((ds, l1.shape().clone()))
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
        let rows = l1.shape().elem_count() / self.keys.max(1);
        let out = crate::cuda::attention(
            crate::cuda::AttentionKernel::SoftmaxGrad,
            crate::cuda::AttentionArgs {
                typed: vec![(s1, l1), (s2, l2)],
                f32s: vec![(s3, l3)],
                rows,
                keys: self.keys,
                scale: self.scale,
            },
        )?;
        Ok((out, l1.shape().clone()))
    }
}
