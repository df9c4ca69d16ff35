//! Model shape, read from a Hugging Face `config.json` or taken from a named preset.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;

use crate::rope_config::read_rope;
pub use helix_ops::RopeScaling;

/// The validated shape of a Llama-architecture model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Fewer than `num_attention_heads` means grouped-query attention (Llama-2-70B: 8).
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// `rope_scaling`'s frequency scaling (Llama 3.1's, YaRN, linear), or none.
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// The subset of `config.json` helix reads; other keys are ignored, as transformers does.
#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    /// transformers 5 writes the base and the scaling as one object.
    rope_parameters: Option<Value>,
    max_position_embeddings: usize,
    vocab_size: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    bos_token_id: Option<u32>,
    eos_token_id: Option<Value>,
    hidden_act: Option<String>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    /// bitsandbytes' 4-bit checkpoints are read (crate::bnb); other methods are refused.
    quantization_config: Option<Value>,
}

impl LlamaConfig {
    /// Reads and validates `config.json`; every error names the file and the key.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read model config {}", path.display()))?;
        Self::from_json_str(&text)
            .with_context(|| format!("invalid model config {}", path.display()))
    }

    pub fn from_json_str(text: &str) -> Result<Self> {
        let hf: HfConfig = serde_json::from_str(text)?;
        if let Some(t) = &hf.model_type {
            if t != "llama" {
                bail!("model_type '{t}' is not a Llama-architecture model (expected 'llama')");
            }
        }
        if let Some(act) = &hf.hidden_act {
            if act != "silu" {
                bail!("hidden_act '{act}' is not supported (Llama uses 'silu')");
            }
        }
        if hf.attention_bias || hf.mlp_bias {
            bail!("attention_bias / mlp_bias = true is not supported (Llama has no biases)");
        }
        if let Some(q) = &hf.quantization_config {
            crate::bnb::check_quantization_config(q)?;
        }
        let (rope_theta, rope_scaling) = read_rope(
            hf.rope_theta,
            hf.rope_scaling.as_ref(),
            hf.rope_parameters.as_ref(),
            hf.max_position_embeddings,
        )?;
        let kv = hf.num_key_value_heads.unwrap_or(hf.num_attention_heads);
        let head_dim = match hf.head_dim {
            Some(d) => d,
            None => {
                if hf.num_attention_heads == 0
                    || !hf.hidden_size.is_multiple_of(hf.num_attention_heads)
                {
                    bail!(
                        "hidden_size {} is not divisible by num_attention_heads {}",
                        hf.hidden_size,
                        hf.num_attention_heads
                    );
                }
                hf.hidden_size / hf.num_attention_heads
            }
        };
        let eos_token_ids = match &hf.eos_token_id {
            None | Some(Value::Null) => vec![],
            Some(Value::Number(n)) => vec![as_token_id(n, "eos_token_id")?],
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    Value::Number(n) => as_token_id(n, "eos_token_id"),
                    other => bail!("eos_token_id: expected integers, found {other}"),
                })
                .collect::<Result<_>>()?,
            Some(other) => bail!("eos_token_id: expected an integer or a list, found {other}"),
        };
        let cfg = LlamaConfig {
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_hidden_layers: hf.num_hidden_layers,
            num_attention_heads: hf.num_attention_heads,
            num_key_value_heads: kv,
            head_dim,
            rms_norm_eps: hf.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: hf.max_position_embeddings,
            vocab_size: hf.vocab_size,
            tie_word_embeddings: hf.tie_word_embeddings,
            bos_token_id: hf.bos_token_id,
            eos_token_ids,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Shape checks shared by config files and presets.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
        ];
        for (key, v) in positive {
            if v == 0 {
                bail!("{key} must be positive");
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            bail!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.num_key_value_heads
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            bail!(
                "head_dim {} must be even for rotary embeddings",
                self.head_dim
            );
        }
        if !(self.rms_norm_eps > 0.0) {
            bail!("rms_norm_eps must be positive");
        }
        Ok(())
    }

    /// Named shapes of Meta's checkpoints, as their `config.json` files state them: Llama 2
    /// (vocabulary 32,000, context 4,096) and Llama 3.1 / 3.2 (vocabulary 128,256, context
    /// 131,072 by Llama 3's RoPE scaling of an 8,192 context).
    pub fn preset(name: &str) -> Result<Self> {
        let (hidden, inter, layers, heads, kv, llama3_factor, tied) = match name {
            "llama2-7b" => (4096, 11008, 32, 32, 32, None, false),
            "llama2-13b" => (5120, 13824, 40, 40, 40, None, false),
            "llama2-70b" => (8192, 28672, 80, 64, 8, None, false),
            "llama3.2-1b" => (2048, 8192, 16, 32, 8, Some(32.0), true),
            "llama3.2-3b" => (3072, 8192, 28, 24, 8, Some(32.0), true),
            "llama3.1-8b" => (4096, 14336, 32, 32, 8, Some(8.0), false),
            "llama3.1-70b" => (8192, 28672, 80, 64, 8, Some(8.0), false),
            other => bail!(
                "unknown model preset '{other}' (known: {})",
                Self::PRESETS.join(", ")
            ),
        };
        let llama2 = LlamaConfig {
            hidden_size: hidden,
            intermediate_size: inter,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim: hidden / heads,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: RopeScaling::None,
            max_position_embeddings: 4096,
            vocab_size: 32_000,
            tie_word_embeddings: tied,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
        };
        Ok(match llama3_factor {
            None => llama2,
            Some(factor) => LlamaConfig {
                rope_theta: 500_000.0,
                rope_scaling: RopeScaling::Llama3 {
                    factor,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 8192.0,
                },
                max_position_embeddings: 131_072,
                vocab_size: 128_256,
                bos_token_id: Some(128_000),
                // <|end_of_text|>, <|eom_id|>, <|eot_id|>: the instruct models' list.
                eos_token_ids: vec![128_001, 128_008, 128_009],
                ..llama2
            },
        })
    }

    /// The names [`LlamaConfig::preset`] knows.
    pub const PRESETS: [&'static str; 7] = [
        "llama2-7b",
        "llama2-13b",
        "llama2-70b",
        "llama3.2-1b",
        "llama3.2-3b",
        "llama3.1-8b",
        "llama3.1-70b",
    ];

    /// The tensors of a Hugging Face checkpoint of this shape: names and shapes, in the order
    /// the model reads them.
    pub fn checkpoint_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let i = self.intermediate_size;
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size, h],
        )];
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            for (name, shape) in [
                ("input_layernorm", vec![h]),
                ("self_attn.q_proj", vec![q, h]),
                ("self_attn.k_proj", vec![kv, h]),
                ("self_attn.v_proj", vec![kv, h]),
                ("self_attn.o_proj", vec![h, q]),
                ("post_attention_layernorm", vec![h]),
                ("mlp.gate_proj", vec![i, h]),
                ("mlp.up_proj", vec![i, h]),
                ("mlp.down_proj", vec![h, i]),
            ] {
                out.push((format!("{p}.{name}.weight"), shape));
            }
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![self.vocab_size, h]));
        }
        out
    }

    /// Parameter count, for reports and memory planning.
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let per_layer = h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size + 2 * h;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.vocab_size * h + self.num_hidden_layers * per_layer + h + head
    }
}

fn as_token_id(n: &serde_json::Number, key: &str) -> Result<u32> {
    n.as_u64()
        .and_then(|v| u32::try_from(v).ok())
        .with_context(|| format!("{key}: {n} is not a token id"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"{"model_type":"llama","hidden_size":64,"intermediate_size":160,
        "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"rms_norm_eps":1e-5,
        "max_position_embeddings":64,"vocab_size":128,"eos_token_id":[2,7]}"#;

    /// BASE with the keys of `extra` (a JSON object body) set or replaced.
    fn with(extra: &str) -> String {
        let mut v: Value = serde_json::from_str(BASE).unwrap();
        let e: Value = serde_json::from_str(&format!("{{{extra}}}")).unwrap();
        for (k, x) in e.as_object().unwrap() {
            v[k] = x.clone();
        }
        v.to_string()
    }

    #[test]
    fn reads_gqa_config_and_defaults() {
        let c = LlamaConfig::from_json_str(BASE).unwrap();
        assert_eq!(
            (c.head_dim, c.num_key_value_heads, c.rope_theta),
            (16, 2, 10_000.0)
        );
        assert_eq!(c.eos_token_ids, vec![2, 7]);
        assert!(!c.tie_word_embeddings);
    }

    #[test]
    fn rope_scaling_is_read_and_checked() {
        let c = LlamaConfig::from_json_str(&with(
            r#""rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3","factor":8.0,
            "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}"#,
        ))
        .unwrap();
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        let err = LlamaConfig::from_json_str(&with(r#""rope_scaling":{"rope_type":"dynamic"}"#))
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("rope_scaling: rope_type 'dynamic' is not supported"),
            "{err}"
        );
    }

    #[test]
    fn bad_head_split_is_named() {
        let err = LlamaConfig::from_json_str(&with(r#""num_key_value_heads":3"#)).unwrap_err();
        assert!(
            err.to_string()
                .contains("not a multiple of num_key_value_heads 3"),
            "{err}"
        );
    }

    #[test]
    fn presets_have_their_checkpoints_sizes() {
        // Parameter counts of Meta's checkpoints, in billions, as their model cards give them.
        let billions = |name: &str| {
            let c = LlamaConfig::preset(name).unwrap();
            c.validate().unwrap();
            c.num_parameters() as f64 / 1e9
        };
        for (name, range) in [
            ("llama2-7b", 6.7..6.8),
            ("llama2-13b", 13.0..13.1),
            ("llama2-70b", 68.9..69.1),
            ("llama3.2-1b", 1.23..1.24),
            ("llama3.2-3b", 3.21..3.22),
            ("llama3.1-8b", 8.03..8.04),
            ("llama3.1-70b", 70.5..70.6),
        ] {
            let b = billions(name);
            assert!(range.contains(&b), "{name}: {b}");
        }
        assert_eq!(LlamaConfig::PRESETS.len(), 7);
        let err = LlamaConfig::preset("llama3").unwrap_err().to_string();
        assert!(
            err.contains("known: llama2-7b, ") && err.contains("llama3.1-70b"),
            "{err}"
        );
    }
}
