//! The softmax of the LM head's cross-entropy as two kernels, for
//! `helix_ops::linear_cross_entropy`, which runs the head a chunk of rows at a time and takes
//! each chunk's gradient while its logits are at hand: [`logit_stats`] gives each row's
//! softmax statistics and its target's logit, [`logit_grad`] the logits' gradient
//! softmax − onehot(target). One pass each over a chunk's logits in their storage dtype,
//! arithmetic in f32 (kernels/cuda/cross_entropy.cu on the GPU, the loops here on the CPU), in
//! place of a dozen f32 element-wise ops and a full-width one-hot. Forward-only ops: the loss's
//! backward only scales what they produced.
//!
//! Shapes: logits [N, V] (N rows, V this rank's part of the vocabulary); targets [N] i64, the
//! target's index into this part or −1 (ignored, or held by another rank); statistics (max,
//! Σ exp(x − max), x[target] or 0) [N, 3] f32; the gradient's row terms (log-sum-exp, weight)
//! [N, 2] f32.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::elem::{dispatch_cpu, packed, packed_as, row_f32, Elem};
use crate::exp::{exp, max_of, sum_exp};
use crate::simd::with_avx2;

/// Each row's (max m, Σ_j exp(x_j − m), x[target]) over this part of the vocabulary, [N, 3] f32;
/// the target logit is 0 where the target is −1. Combined over tensor-parallel ranks, the
/// log-sum-exp is m + ln Σ and a row's loss lse − x[target].
pub fn logit_stats(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (rows, vocab) = logits.dims2()?;
    check_targets(targets, rows)?;
    logits
        .contiguous()?
        .apply_op2_no_bwd(&targets.contiguous()?, &LogitStats { rows, vocab })
}

/// (exp(x − lse) − [j = target]) · weight in the logits' dtype: the gradient of
/// weight · (lse − x[target]) with respect to the logits, with `row_terms` [N, 2] f32 holding
/// each row's (lse, weight) (weight 0 for an ignored row).
pub fn logit_grad(logits: &Tensor, targets: &Tensor, row_terms: &Tensor) -> Result<Tensor> {
    let (rows, vocab) = logits.dims2()?;
    check_targets(targets, rows)?;
    if row_terms.dims() != [rows, 2] || row_terms.dtype() != DType::F32 {
        candle_core::bail!(
            "logit_grad: row terms are {:?} {:?}, expected f32 [{rows}, 2]",
            row_terms.dtype(),
            row_terms.dims()
        );
    }
    logits.contiguous()?.apply_op3_no_bwd(
        &targets.contiguous()?,
        &row_terms.contiguous()?,
        &LogitGrad { vocab },
    )
}

fn check_targets(targets: &Tensor, rows: usize) -> Result<()> {
    if targets.dims() != [rows] || targets.dtype() != DType::I64 {
        candle_core::bail!(
            "cross-entropy: targets are {:?} {:?}, expected i64 [{rows}]",
            targets.dtype(),
            targets.dims()
        );
    }
    Ok(())
}

fn logit_stats_cpu<T: Elem>(x: &[T], targets: &[i64], vocab: usize) -> Vec<f32> {
    let mut stats = vec![0f32; 3 * targets.len()];
    stats
        .par_chunks_mut(3)
        .enumerate()
        .for_each_init(Vec::new, |buf: &mut Vec<f32>, (r, out)| {
            with_avx2(
                #[inline(always)]
                || {
                    let row = &x[r * vocab..][..vocab];
                    // The row in f32, converted once for both passes.
                    let v = row_f32(row, buf);
                    let m = max_of(v);
                    out[0] = m;
                    out[1] = sum_exp(v, m);
                    out[2] = usize::try_from(targets[r]).map_or(0.0, |t| v[t]);
                },
            )
        });
    stats
}

fn logit_grad_cpu<T: Elem>(x: &[T], targets: &[i64], terms: &[f32], vocab: usize) -> Vec<T> {
    let mut grad = vec![T::from_f32(0.0); x.len()];
    grad.par_chunks_mut(vocab.max(1))
        .enumerate()
        .for_each(|(r, out)| {
            let (lse, weight) = (terms[2 * r], terms[2 * r + 1]);
            if weight == 0.0 {
                return; // already zero
            }
            let row = &x[r * vocab..(r + 1) * vocab];
            with_avx2(
                #[inline(always)]
                || {
                    for (o, v) in out.iter_mut().zip(row) {
                        *o = T::from_f32(exp(v.to_f32() - lse) * weight);
                    }
                },
            );
            if let Ok(t) = usize::try_from(targets[r]) {
                out[t] = T::from_f32((exp(row[t].to_f32() - lse) - 1.0) * weight);
            }
        });
    grad
}

struct LogitStats {
    rows: usize,
    vocab: usize,
}

impl CustomOp2 for LogitStats {
    fn name(&self) -> &'static str {
        "helix-logit-stats"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let targets = packed_as::<i64>(s2, l2, "logit_stats: targets")?;
        let stats = dispatch_cpu!("logit_stats", (s1), |T, (x)| -> f32 Ok::<
            _,
            candle_core::Error,
        >(logit_stats_cpu::<T>(
            packed(x, l1, "logits")?,
            targets,
            self.vocab
        )))?;
        Ok((stats, Shape::from((self.rows, 3))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda::cross_entropy(
            crate::cuda::CrossEntropyKernel::Stats,
            crate::cuda::CrossEntropyArgs {
                logits: (s1, l1),
                targets: (s2, l2),
                terms: None,
                rows: self.rows,
                vocab: self.vocab,
            },
        )?;
        Ok((out, Shape::from((self.rows, 3))))
    }
}

struct LogitGrad {
    vocab: usize,
}

impl CustomOp3 for LogitGrad {
    fn name(&self) -> &'static str {
        "helix-logit-grad"
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
        let targets = packed_as::<i64>(s2, l2, "logit_grad: targets")?;
        let terms = packed_as::<f32>(s3, l3, "logit_grad: row terms")?;
        let grad = dispatch_cpu!("logit_grad", (s1), |T, (x)| Ok::<_, candle_core::Error>(
            logit_grad_cpu::<T>(packed(x, l1, "logits")?, targets, terms, self.vocab)
        ))?;
        Ok((grad, l1.shape().clone()))
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
        let rows = l1.shape().elem_count() / self.vocab.max(1);
        let out = crate::cuda::cross_entropy(
            crate::cuda::CrossEntropyKernel::Grad,
            crate::cuda::CrossEntropyArgs {
                logits: (s1, l1),
                targets: (s2, l2),
                terms: Some((s3, l3)),
                rows,
                vocab: self.vocab,
            },
        )?;
        Ok((out, l1.shape().clone()))
    }
}
