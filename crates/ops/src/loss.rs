//! Cross-entropy of the LM head without materialising full-vocabulary logits for a whole sequence.

use candle_core::{DType, Result, Tensor};
use helix_kernels::cross_entropy::{logit_grad, logit_stats};

use crate::collective::SharedCollective;
use crate::with_backward2;

/// Label value that contributes no loss (prompt tokens, padding), as in PyTorch and Alpaca.
pub const IGNORE_INDEX: i64 = -100;

/// Number of labels that are not [`IGNORE_INDEX`].
pub fn count_targets(labels: &Tensor) -> Result<usize> {
    let labels = labels
        .to_dtype(DType::I64)?
        .flatten_all()?
        .to_vec1::<i64>()?;
    Ok(labels.iter().filter(|&&l| l != IGNORE_INDEX).count())
}

/// This rank's part of a vocabulary split over a tensor-parallel group: rows
/// `[start, start + V/size)` of the LM head.
#[derive(Clone)]
pub struct VocabShard {
    pub start: usize,
    pub group: SharedCollective,
}

/// Sum over rows of `-log softmax(hidden · weightᵀ)[label]` for hidden [N, H], weight [V, H]
/// (the LM head) and labels [N] (any integer dtype; [`IGNORE_INDEX`] rows count nothing and
/// skip the head: under answer-only loss the prompt's rows cost no vocabulary-wide matmul).
///
/// Rows are processed `chunk_rows` at a time, so memory holds at most `chunk_rows × V` logits
/// (and their gradient): a 2,048-token row with a 32,000-token vocabulary never takes the 262 MB
/// of f32 logits the plain graph would keep. The loss is the graph's last op, so its gradient
/// is known up to the one scalar that flows back into it: while a chunk's logits are at hand,
/// its softmax − onehot goes through the head's two matmuls at once (into dhidden [N, H], and
/// for a trainable head dweight), and the backward only scales them. The head runs once per
/// chunk instead of twice. The softmax runs in f32 from the logits in the model dtype
/// ([`helix_kernels::cross_entropy`]). No gradient work is done when neither input tracks one.
/// Returns an f32 scalar; divide by [`count_targets`] (over all micro-batches) for the mean.
pub fn linear_cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    labels: &Tensor,
    chunk_rows: usize,
) -> Result<Tensor> {
    cross_entropy(hidden, weight, labels, chunk_rows, None)
}

/// [`linear_cross_entropy`] with the vocabulary split over a tensor-parallel group (Megatron's
/// vocab-parallel cross-entropy): `weight` is this rank's rows of the LM head. The softmax's
/// maximum and normaliser and each row's target logit are combined over the group, so every
/// rank returns the full loss; the gradients are local. `hidden` must be replicated and reach
/// the head through [`crate::copy_to_parallel_region`], whose backward sums the ranks' parts of
/// its gradient.
pub fn vocab_parallel_cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    labels: &Tensor,
    chunk_rows: usize,
    shard: &VocabShard,
) -> Result<Tensor> {
    cross_entropy(hidden, weight, labels, chunk_rows, Some(shard))
}

fn cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    labels: &Tensor,
    chunk_rows: usize,
    shard: Option<&VocabShard>,
) -> Result<Tensor> {
    let (n, h) = hidden.dims2()?;
    let (v, hw) = weight.dims2()?;
    if h != hw {
        candle_core::bail!("cross-entropy: hidden size {h} but LM head is [{v}, {hw}]");
    }
    let (start, total_vocab) = match shard {
        Some(s) => (s.start, v * s.group.size()),
        None => (0, v),
    };
    let rows = RowTargets::new(labels, n, start, v, total_vocab, hidden.device())?;
    let (need_h, need_w) = (hidden.track_op(), weight.track_op());
    // The rows that count, gathered when some do not: ignored rows cost the head nothing.
    let hidden_d = match &rows.kept {
        Some(kept) => hidden.detach().index_select(kept, 0)?,
        None => hidden.detach(),
    };
    let weight_d = weight.detach();
    let chunk_rows = chunk_rows.max(1);
    let mut total = Tensor::zeros((), DType::F32, hidden.device())?;
    let mut grad_h = Vec::new();
    let mut grad_w: Option<Tensor> = None;
    let kept_rows = rows.targets.dim(0)?;
    for first in (0..kept_rows).step_by(chunk_rows) {
        let len = chunk_rows.min(kept_rows - first);
        let h_chunk = hidden_d.narrow(0, first, len)?;
        // The LM head runs in the model dtype; the softmax reads its logits in f32, as
        // transformers upcasts them.
        let logits = h_chunk.matmul(&weight_d.t()?)?;
        let targets = rows.targets.narrow(0, first, len)?;
        let stats = logit_stats(&logits, &targets)?;
        let (max, sum, picked) = (
            stats.narrow(1, 0, 1)?,
            stats.narrow(1, 1, 1)?,
            stats.narrow(1, 2, 1)?,
        );
        let (max, sum, picked) = match shard {
            Some(s) => {
                let global = s.group.all_reduce_max(&max)?;
                let rescaled = (sum * (max - &global)?.exp()?)?;
                (
                    global,
                    s.group.all_reduce_sum(&rescaled)?,
                    s.group.all_reduce_sum(&picked)?,
                )
            }
            None => (max, sum, picked),
        };
        let lse = (sum.log()? + max)?;
        total = (total + (&lse - picked)?.sum_all()?)?;
        if !(need_h || need_w) {
            continue;
        }
        // d (loss sum) / d logits = softmax − onehot(label); every kept row weighs 1.
        let weights = Tensor::ones((len, 1), DType::F32, hidden.device())?;
        let dlogits = logit_grad(&logits, &targets, &Tensor::cat(&[&lse, &weights], 1)?)?;
        drop(logits);
        if need_h {
            grad_h.push(dlogits.matmul(&weight_d)?);
        }
        if need_w {
            let dw = dlogits.t()?.matmul(&h_chunk)?.to_dtype(DType::F32)?;
            grad_w = Some(match grad_w {
                Some(acc) => (acc + dw)?,
                None => dw,
            });
        }
    }
    if !(need_h || need_w) {
        return Ok(total);
    }
    // The kept rows' gradients back in their places; the ignored rows' are zero.
    let grad_h = match (need_h, &rows.kept) {
        (false, _) => None,
        (true, None) => Some(Tensor::cat(&grad_h, 0)?),
        (true, Some(_)) if grad_h.is_empty() => Some(hidden.zeros_like()?),
        (true, Some(kept)) => Some(hidden.zeros_like()?.index_add(
            kept,
            &Tensor::cat(&grad_h, 0)?,
            0,
        )?),
    };
    let (h_dtype, w_dtype) = (hidden.dtype(), weight.dtype());
    with_backward2(hidden, weight, total, move |grad, _, _| {
        // The gradients above are of the loss sum; scale them by what flows back into it (in
        // f32, on the device: no host round trip).
        let g = grad.to_dtype(DType::F32)?;
        let scaled =
            |t: &Tensor, dtype: DType| t.to_dtype(DType::F32)?.broadcast_mul(&g)?.to_dtype(dtype);
        Ok((
            grad_h.as_ref().map(|t| scaled(t, h_dtype)).transpose()?,
            grad_w.as_ref().map(|t| scaled(t, w_dtype)).transpose()?,
        ))
    })
}

/// The rows that count in the loss (label not [`IGNORE_INDEX`]) and each one's label as an
/// index into this rank's part of the vocabulary (−1 where another rank holds it): read from
/// the labels once, on the host, for all chunks. Ignored rows (prompt
/// tokens under answer-only loss, padding) are left out of the LM head altogether.
struct RowTargets {
    /// Indices of the rows that count, when some do not (`None`: every row counts).
    kept: Option<Tensor>,
    /// Kept rows only.
    targets: Tensor,
}

impl RowTargets {
    fn new(
        labels: &Tensor,
        n: usize,
        vocab_start: usize,
        local_vocab: usize,
        total_vocab: usize,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let labels = labels
            .to_dtype(DType::I64)?
            .flatten_all()?
            .to_vec1::<i64>()?;
        if labels.len() != n {
            candle_core::bail!("cross-entropy: {n} hidden rows but {} labels", labels.len());
        }
        let mut kept = Vec::with_capacity(n);
        let mut targets = Vec::with_capacity(n);
        for (row, &l) in labels.iter().enumerate() {
            if l == IGNORE_INDEX {
                continue;
            }
            if l < 0 || l as usize >= total_vocab {
                candle_core::bail!("cross-entropy: label {l} is outside the vocabulary [0, {total_vocab}) and is not {IGNORE_INDEX}");
            }
            let i = l as usize;
            let inside = i >= vocab_start && i < vocab_start + local_vocab;
            kept.push(row as u32);
            targets.push(if inside { (i - vocab_start) as i64 } else { -1 });
        }
        let len = kept.len();
        Ok(Self {
            kept: match len == n {
                true => None,
                false => Some(Tensor::from_vec(kept, len, device)?),
            },
            targets: Tensor::from_vec(targets, len, device)?,
        })
    }
}
