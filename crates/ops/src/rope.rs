//! Rotary position embeddings in the Hugging Face (rotate-half) layout, with the frequency
//! scalings of `config.json`'s `rope_scaling` that Llama-architecture checkpoints use.

use candle_core::{DType, Device, Result, Tensor, D};

/// How a checkpoint stretches RoPE's frequencies past its pretraining context (transformers'
/// `rope_scaling`, by `rope_type`). Each computes the inverse frequencies as transformers'
/// `ROPE_INIT_FUNCTIONS` do, in f32.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// `rope_type = "default"` or no `rope_scaling`.
    None,
    /// Positions divided by `factor` (every frequency divided by it).
    Linear { factor: f64 },
    /// Llama 3.1's: wavelengths longer than `original / low_freq_factor` divided by `factor`,
    /// shorter than `original / high_freq_factor` kept, a smooth blend between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// YaRN: interpolated below the correction range set by `beta_fast` / `beta_slow`,
    /// extrapolated above it, a linear ramp between; cos and sin are multiplied by
    /// `attention_factor`.
    Yarn {
        factor: f64,
        original_max_position_embeddings: f64,
        beta_fast: f64,
        beta_slow: f64,
        attention_factor: f64,
        /// Rounds the correction range to whole dimensions (transformers' default).
        truncate: bool,
    },
}

impl RopeScaling {
    /// The inverse frequencies for `head_dim` (even) and base `theta`, and the factor cos and
    /// sin are multiplied by (1 but for YaRN). Each step is the f32 operation transformers
    /// performs, in its order (`a / t` on a tensor is `reciprocal(t) * a` in PyTorch), so the
    /// tables match its bit for bit.
    pub fn inverse_frequencies(&self, head_dim: usize, theta: f64) -> (Vec<f32>, f32) {
        // base^(2i / d): the wavelength divided by 2π.
        let powers: Vec<f32> = (0..head_dim / 2)
            .map(|i| (theta as f32).powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let base: Vec<f32> = powers.iter().map(|p| 1.0 / p).collect();
        match *self {
            RopeScaling::None => (base, 1.0),
            RopeScaling::Linear { factor } => {
                (base.iter().map(|f| f / factor as f32).collect(), 1.0)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: original,
            } => {
                let low_freq_wavelen = (original / low) as f32;
                let high_freq_wavelen = (original / high) as f32;
                let inv = base
                    .iter()
                    .map(|&f| {
                        let wavelen = (1.0 / f) * (2.0 * std::f64::consts::PI) as f32;
                        if wavelen < high_freq_wavelen {
                            f
                        } else if wavelen > low_freq_wavelen {
                            f / factor as f32
                        } else {
                            let smooth = ((1.0 / wavelen) * original as f32 - low as f32)
                                / (high - low) as f32;
                            (1.0 - smooth) * f / factor as f32 + smooth * f
                        }
                    })
                    .collect();
                (inv, 1.0)
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original,
                beta_fast,
                beta_slow,
                attention_factor,
                truncate,
            } => {
                let dim = head_dim as f64;
                // The dimension whose wavelength turns `rotations` times over the original context.
                let correction_dim = |rotations: f64| {
                    dim * (original / (rotations * 2.0 * std::f64::consts::PI)).ln()
                        / (2.0 * theta.ln())
                };
                let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
                if truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
                if low == high {
                    high += 0.001; // transformers' guard against a zero-width ramp
                }
                let inv = powers
                    .iter()
                    .zip(&base)
                    .enumerate()
                    .map(|(i, (&power, &extrapolated))| {
                        let ramp = ((i as f32 - low as f32) / (high - low) as f32).clamp(0.0, 1.0);
                        let keep = 1.0 - ramp;
                        let interpolated = 1.0 / (factor as f32 * power);
                        interpolated * (1.0 - keep) + extrapolated * keep
                    })
                    .collect();
                (inv, attention_factor as f32)
            }
        }
    }
}

/// Inverse frequencies of RoPE; `cos_sin` turns position ids into the tables `apply_rope` uses.
#[derive(Debug, Clone)]
pub struct RopeTable {
    inv_freq: Tensor,
    /// YaRN's factor on cos and sin; 1 otherwise.
    attention_scaling: f32,
}

impl RopeTable {
    /// `head_dim` must be even.
    pub fn new(
        head_dim: usize,
        theta: f64,
        scaling: &RopeScaling,
        device: &Device,
    ) -> Result<Self> {
        if !head_dim.is_multiple_of(2) {
            candle_core::bail!("rope: head_dim {head_dim} is odd");
        }
        let (inv, attention_scaling) = scaling.inverse_frequencies(head_dim, theta);
        Ok(Self {
            inv_freq: Tensor::from_vec(inv, head_dim / 2, device)?,
            attention_scaling,
        })
    }

    /// Tables for `position_ids` [B, S] (any integer dtype): `(cos, sin)` each [B, 1, S, head_dim]
    /// in `dtype`, broadcastable over heads.
    pub fn cos_sin(&self, position_ids: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        let (b, s) = position_ids.dims2()?;
        let pos = position_ids.to_dtype(DType::F32)?.reshape((b, s, 1))?;
        let freqs = pos.broadcast_mul(&self.inv_freq.reshape((1, 1, ()))?)?;
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?.unsqueeze(1)?;
        let (mut cos, mut sin) = (emb.cos()?, emb.sin()?);
        if self.attention_scaling != 1.0 {
            // In f32 before the cast, as transformers scales them.
            let a = self.attention_scaling as f64;
            (cos, sin) = ((cos * a)?, (sin * a)?);
        }
        Ok((cos.to_dtype(dtype)?, sin.to_dtype(dtype)?))
    }
}

/// `x * cos + rotate_half(x) * sin` for x [B, H, S, D]; cos/sin from [`RopeTable::cos_sin`].
/// The fused op of `helix_kernels::rope`, which keeps no intermediate, as for [`crate::rms_norm`];
/// `helix_kernels::unfused::rope` is its definition in plain candle ops.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    helix_kernels::rope(x, cos, sin)
}
