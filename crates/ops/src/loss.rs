//! Cross-entropy of the LM head without materialising full-vocabulary logits for a whole sequence.

use candle_core::{DType, Result, Tensor, D};

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
    let chunk_rows = chunk_rows.max(1);
    let hidden_d = hidden.detach();
    let weight_d = weight.detach();
    let mut total = Tensor::zeros((), DType::F32, hidden.device())?;
    for start in (0..n).step_by(chunk_rows) {
        let len = chunk_rows.min(n - start);
        let chunk = Chunk::new(&hidden_d, &weight_d, &labels, start, len)?;
        let lse = log_sum_exp(&chunk.logits)?;
        let picked = chunk.logits.gather(&chunk.safe_labels, 1)?.squeeze(1)?;
        let row_loss = ((lse - picked)? * &chunk.valid)?;
        total = (total + row_loss.sum_all()?)?;
    }
    let (hidden_s, weight_s, labels_s) = (hidden_d, weight_d, labels);
    with_backward2(hidden, weight, total, move |grad, need_h, need_w| {
        let g = grad.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64;
        let mut grad_h = Vec::new();
        let mut grad_w: Option<Tensor> = None;
        for start in (0..n).step_by(chunk_rows) {
            let len = chunk_rows.min(n - start);
            let chunk = Chunk::new(&hidden_s, &weight_s, &labels_s, start, len)?;
            // d loss / d logits = softmax - onehot(label), zero on ignored rows.
            let probs = candle_nn::ops::softmax_last_dim(&chunk.logits)?;
            let classes = Tensor::arange(0u32, v as u32, hidden_s.device())?.unsqueeze(0)?;
            let onehot = classes
                .broadcast_eq(&chunk.safe_labels.to_dtype(DType::U32)?)?
                .to_dtype(DType::F32)?;
            let dlogits = ((probs - onehot)?.broadcast_mul(&chunk.valid.unsqueeze(1)?)? * g)?;
            let dlogits = dlogits.to_dtype(weight_s.dtype())?;
            if need_h {
                grad_h.push(dlogits.matmul(&weight_s)?);
            }
            if need_w {
                let h_chunk = hidden_s.narrow(0, start, len)?;
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

/// One chunk of rows: f32 logits, labels made safe to gather (ignored → 0), validity weights.
struct Chunk {
    logits: Tensor,
    safe_labels: Tensor,
    valid: Tensor,
}

impl Chunk {
    fn new(
        hidden: &Tensor,
        weight: &Tensor,
        labels: &Tensor,
        start: usize,
        len: usize,
    ) -> Result<Self> {
        let h = hidden.narrow(0, start, len)?;
        // The LM head runs in the model dtype and the logits are upcast, as transformers does.
        let logits = h.matmul(&weight.t()?)?.to_dtype(DType::F32)?;
        let lab = labels.narrow(0, start, len)?;
        let ignore = Tensor::full(IGNORE_INDEX, len, labels.device())?;
        let valid_mask = lab.ne(&ignore)?;
        let valid = valid_mask.to_dtype(DType::F32)?;
        let safe = valid_mask.where_cond(&lab, &lab.zeros_like()?)?;
        let vocab = weight.dim(0)? as i64;
        let bad = safe
            .ge(vocab)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()?;
        let neg = safe
            .lt(0i64)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()?;
        if bad > 0.0 || neg > 0.0 {
            candle_core::bail!("cross-entropy: a label is outside the vocabulary [0, {vocab}) and is not {IGNORE_INDEX}");
        }
        Ok(Self {
            logits,
            safe_labels: safe.to_dtype(DType::I64)?.unsqueeze(1)?.contiguous()?,
            valid,
        })
    }
}

fn log_sum_exp(logits: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?;
    let sum = logits.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?;
    (sum.log()? + max)?.squeeze(1)
}
