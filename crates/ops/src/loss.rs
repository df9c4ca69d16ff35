//! Cross-entropy of the LM head without materialising full-vocabulary logits for a whole sequence.

use candle_core::{DType, Result, Tensor, D};

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
/// (the LM head) and labels [N] (any integer dtype; [`IGNORE_INDEX`] rows count nothing).
///
/// Rows are processed `chunk_rows` at a time, in f32, both forward and backward (which
/// recomputes each chunk's logits), so memory holds at most `chunk_rows × V` logits: a 2,048-token
/// row with a 32,000-token vocabulary never takes the 262 MB the plain graph would keep.
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
/// rank returns the full loss; the backward is local. `hidden` must be replicated and reach the
/// head through [`crate::copy_to_parallel_region`], whose backward sums the ranks' parts of
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
    let labels = labels.to_dtype(DType::I64)?.flatten_all()?;
    if labels.dim(0)? != n {
        candle_core::bail!(
            "cross-entropy: {n} hidden rows but {} labels",
            labels.dim(0)?
        );
    }
    let (start, total_vocab) = match shard {
        Some(s) => (s.start, v * s.group.size()),
        None => (0, v),
    };
    let chunk_rows = chunk_rows.max(1);
    let hidden_d = hidden.detach();
    let weight_d = weight.detach();
    let mut total = Tensor::zeros((), DType::F32, hidden.device())?;
    // Each chunk's log-normaliser, kept for the backward (which then needs no communication).
    let mut lses = Vec::new();
    for first in (0..n).step_by(chunk_rows) {
        let len = chunk_rows.min(n - first);
        let chunk = Chunk::new(
            &hidden_d,
            &weight_d,
            &labels,
            first,
            len,
            start,
            total_vocab,
        )?;
        let local_max = chunk.logits.max_keepdim(D::Minus1)?;
        let max = match shard {
            Some(s) => s.group.all_reduce_max(&local_max)?,
            None => local_max,
        };
        let local_sum = chunk
            .logits
            .broadcast_sub(&max)?
            .exp()?
            .sum_keepdim(D::Minus1)?;
        let sum = match shard {
            Some(s) => s.group.all_reduce_sum(&local_sum)?,
            None => local_sum,
        };
        let lse = (sum.log()? + max)?.squeeze(1)?;
        let local_picked =
            (chunk.logits.gather(&chunk.local_labels, 1)?.squeeze(1)? * &chunk.here)?;
        let picked = match shard {
            Some(s) => s.group.all_reduce_sum(&local_picked)?,
            None => local_picked,
        };
        let row_loss = ((&lse - picked)? * &chunk.valid)?;
        total = (total + row_loss.sum_all()?)?;
        lses.push(lse);
    }
    let (hidden_s, weight_s, labels_s) = (hidden_d, weight_d, labels);
    with_backward2(hidden, weight, total, move |grad, need_h, need_w| {
        let g = grad.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64;
        let mut grad_h = Vec::new();
        let mut grad_w: Option<Tensor> = None;
        for (i, first) in (0..n).step_by(chunk_rows).enumerate() {
            let len = chunk_rows.min(n - first);
            let chunk = Chunk::new(
                &hidden_s,
                &weight_s,
                &labels_s,
                first,
                len,
                start,
                total_vocab,
            )?;
            // d loss / d logits = softmax - onehot(label), zero on ignored rows.
            let probs = chunk.logits.broadcast_sub(&lses[i].unsqueeze(1)?)?.exp()?;
            let classes = Tensor::arange(0u32, v as u32, hidden_s.device())?.unsqueeze(0)?;
            let onehot = classes
                .broadcast_eq(&chunk.local_labels.to_dtype(DType::U32)?)?
                .to_dtype(DType::F32)?
                .broadcast_mul(&chunk.here.unsqueeze(1)?)?;
            let dlogits = ((probs - onehot)?.broadcast_mul(&chunk.valid.unsqueeze(1)?)? * g)?;
            let dlogits = dlogits.to_dtype(weight_s.dtype())?;
            if need_h {
                grad_h.push(dlogits.matmul(&weight_s)?);
            }
            if need_w {
                let h_chunk = hidden_s.narrow(0, first, len)?;
                let dw = dlogits.t()?.matmul(&h_chunk)?.to_dtype(DType::F32)?;
                grad_w = Some(match grad_w {
                    Some(acc) => (acc + dw)?,
                    None => dw,
                });
            }
        }
        let grad_h = if need_h {
            Some(Tensor::cat(&grad_h, 0)?.to_dtype(hidden_s.dtype())?)
        } else {
            None
        };
        let grad_w = grad_w.map(|w| w.to_dtype(weight_s.dtype())).transpose()?;
        Ok((grad_h, grad_w))
    })
}

/// One chunk of rows: f32 logits of this rank's vocabulary, each label as an index into it
/// (0 where the label is elsewhere or ignored), whether the label is here, validity weights.
struct Chunk {
    logits: Tensor,
    local_labels: Tensor,
    here: Tensor,
    valid: Tensor,
}

impl Chunk {
    fn new(
        hidden: &Tensor,
        weight: &Tensor,
        labels: &Tensor,
        first: usize,
        len: usize,
        vocab_start: usize,
        total_vocab: usize,
    ) -> Result<Self> {
        let h = hidden.narrow(0, first, len)?;
        // The LM head runs in the model dtype and the logits are upcast, as transformers does.
        let logits = h.matmul(&weight.t()?)?.to_dtype(DType::F32)?;
        let lab = labels.narrow(0, first, len)?.to_vec1::<i64>()?;
        let local_vocab = weight.dim(0)?;
        let mut local = Vec::with_capacity(len);
        let (mut here, mut valid) = (Vec::with_capacity(len), Vec::with_capacity(len));
        for &l in &lab {
            if l == IGNORE_INDEX {
                local.push(0i64);
                here.push(0f32);
                valid.push(0f32);
                continue;
            }
            if l < 0 || l as usize >= total_vocab {
                candle_core::bail!("cross-entropy: label {l} is outside the vocabulary [0, {total_vocab}) and is not {IGNORE_INDEX}");
            }
            let i = l as usize;
            let inside = i >= vocab_start && i < vocab_start + local_vocab;
            local.push(if inside { (i - vocab_start) as i64 } else { 0 });
            here.push(f32::from(u8::from(inside)));
            valid.push(1.0);
        }
        let dev = hidden.device();
        Ok(Self {
            logits,
            local_labels: Tensor::from_vec(local, (len, 1), dev)?,
            here: Tensor::from_vec(here, len, dev)?,
            valid: Tensor::from_vec(valid, len, dev)?,
        })
    }
}
