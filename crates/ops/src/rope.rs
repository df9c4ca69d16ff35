//! Rotary position embeddings in the Hugging Face (rotate-half) layout.

use candle_core::{DType, Device, Result, Tensor, D};

/// Inverse frequencies of RoPE; `cos_sin` turns position ids into the tables `apply_rope` uses.
#[derive(Debug, Clone)]
pub struct RopeTable {
    inv_freq: Tensor,
}

impl RopeTable {
    /// `head_dim` must be even. `scale` divides positions (the "linear" rope_scaling type).
    pub fn new(head_dim: usize, theta: f64, scale: f64, device: &Device) -> Result<Self> {
        if !head_dim.is_multiple_of(2) {
            candle_core::bail!("rope: head_dim {head_dim} is odd");
        }
        // f32 like transformers, so the frequencies match bit for bit where it matters.
        let inv: Vec<f32> = (0..head_dim / 2)
            .map(|i| {
                let exponent = (2 * i) as f32 / head_dim as f32;
                1.0f32 / (theta as f32).powf(exponent) / scale as f32
            })
            .collect();
        Ok(Self {
            inv_freq: Tensor::from_vec(inv, head_dim / 2, device)?,
        })
    }

    /// Tables for `position_ids` [B, S] (any integer dtype): `(cos, sin)` each [B, 1, S, head_dim]
    /// in `dtype`, broadcastable over heads.
    pub fn cos_sin(&self, position_ids: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        let (b, s) = position_ids.dims2()?;
        let pos = position_ids.to_dtype(DType::F32)?.reshape((b, s, 1))?;
        let freqs = pos.broadcast_mul(&self.inv_freq.reshape((1, 1, ()))?)?;
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?.unsqueeze(1)?;
        Ok((emb.cos()?.to_dtype(dtype)?, emb.sin()?.to_dtype(dtype)?))
    }
}

/// `x * cos + rotate_half(x) * sin` for x [B, H, S, D]; cos/sin from [`RopeTable::cos_sin`].
/// The fused op of `helix_kernels::rope`, which keeps no intermediate, as for [`crate::rms_norm`];
/// `helix_kernels::unfused::rope` is its definition in plain candle ops.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    helix_kernels::rope(x, cos, sin)
}
