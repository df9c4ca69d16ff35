//! Causal self-attention with grouped-query heads, padding and packed-sequence masks.

use candle_core::{DType, Device, Result, Tensor};

use crate::softmax_last_dim;

/// What a query may see, described on the host: causal order, key padding and document
/// (segment) boundaries of packed rows. Turned into an additive bias by [`attention_bias`].
#[derive(Debug, Clone, Default)]
pub struct MaskSpec {
    pub batch: usize,
    pub q_len: usize,
    pub kv_len: usize,
    /// Index among the keys of the first query (the KV-cache length during generation).
    pub q_offset: usize,
    /// `batch * kv_len` flags, 1 for a real key, 0 for padding; `None` means all real.
    pub key_valid: Option<Vec<u8>>,
    /// `batch * kv_len` document ids of packed rows; attention never crosses documents.
    pub segment_ids: Option<Vec<u32>>,
}

/// Additive attention bias [B, 1, q_len, kv_len] in `dtype`: 0 where attention is allowed, the
/// dtype's most negative finite value where not (finite, as transformers does, so that a fully
/// masked padding row gives a uniform softmax rather than NaN).
pub fn attention_bias(spec: &MaskSpec, dtype: DType, device: &Device) -> Result<Tensor> {
    let (b, q, k) = (spec.batch, spec.q_len, spec.kv_len);
    for (what, v) in [("key_valid", spec.key_valid.as_ref().map(|v| v.len()))] {
        if let Some(n) = v {
            if n != b * k {
                candle_core::bail!("attention mask: {what} has {n} entries, expected {}", b * k);
            }
        }
    }
    if let Some(seg) = &spec.segment_ids {
        if seg.len() != b * k {
            candle_core::bail!(
                "attention mask: segment_ids has {} entries, expected {}",
                seg.len(),
                b * k
            );
        }
    }
    let blocked = match dtype {
        DType::BF16 => half::bf16::MIN.to_f32(),
        DType::F16 => half::f16::MIN.to_f32(),
        _ => f32::MIN,
    };
    let mut bias = vec![0f32; b * q * k];
    for bi in 0..b {
        for qi in 0..q {
            let q_abs = spec.q_offset + qi;
            for ki in 0..k {
                let mut ok = ki <= q_abs;
                if let Some(valid) = &spec.key_valid {
                    ok &= valid[bi * k + ki] != 0;
                }
                if let (Some(seg), true) = (&spec.segment_ids, q_abs < k) {
                    ok &= seg[bi * k + ki] == seg[bi * k + q_abs];
                }
                if !ok {
                    bias[(bi * q + qi) * k + ki] = blocked;
                }
            }
        }
    }
    Tensor::from_vec(bias, (b, 1, q, k), device)?.to_dtype(dtype)
}

/// Repeats each of the `n_kv` heads of x [B, n_kv, S, D] `n_rep` times (grouped-query attention).
pub fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, n_kv, s, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, n_kv, n_rep, s, d))?
        .reshape((b, n_kv * n_rep, s, d))
}

/// softmax(q kᵀ / sqrt(d) + bias) v for q [B, Hq, S, D], k and v [B, Hkv, Skv, D], Hq a
/// multiple of Hkv; bias from [`attention_bias`]. Returns [B, Hq, S, D].
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (_, hq, _, d) = q.dims4()?;
    let hkv = k.dim(1)?;
    if hq % hkv != 0 {
        candle_core::bail!("attention: {hq} query heads is not a multiple of {hkv} kv heads");
    }
    let k = repeat_kv(k, hq / hkv)?;
    let v = repeat_kv(v, hq / hkv)?;
    let scale = 1.0 / (d as f64).sqrt();
    let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
    let scores = scores.broadcast_add(bias)?;
    let probs = softmax_last_dim(&scores)?;
    probs.matmul(&v.contiguous()?)
}
