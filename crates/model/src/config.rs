//! Model shape, read from a Hugging Face `config.json` or taken from a named preset.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;

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
    /// Positions are divided by this ("linear" rope_scaling); 1.0 without scaling.
    pub rope_linear_factor: f64,
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
        let rope_linear_factor = parse_rope_scaling(hf.rope_scaling.as_ref())?;
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
            rope_theta: hf.rope_theta.unwrap_or(10_000.0),
            rope_linear_factor,
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

    /// Named shapes of the Llama 2 family (vocabulary 32,000, context 4,096).
    pub fn preset(name: &str) -> Result<Self> {
        let (hidden, inter, layers, heads, kv) = match name {
            "llama2-7b" => (4096, 11008, 32, 32, 32),
            "llama2-13b" => (5120, 13824, 40, 40, 40),
            "llama2-70b" => (8192, 28672, 80, 64, 8),
            other => {
                bail!("unknown model preset '{other}' (known: llama2-7b, llama2-13b, llama2-70b)")
            }
        };
        Ok(LlamaConfig {
            hidden_size: hidden,
            intermediate_size: inter,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim: hidden / heads,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_linear_factor: 1.0,
            max_position_embeddings: 4096,
            vocab_size: 32_000,
            tie_word_embeddings: false,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
        })
    }

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

/// Accepts no scaling ("default") and "linear"; anything else would silently change the model's
/// positions, so it is an error.
fn parse_rope_scaling(v: Option<&Value>) -> Result<f64> {
    let Some(v) = v else { return Ok(1.0) };
    if v.is_null() {
        return Ok(1.0);
    }
    let obj = v
        .as_object()
        .context("rope_scaling: expected an object or null")?;
    let kind = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(Value::as_str)
        .context("rope_scaling: missing 'rope_type'")?;
    match kind {
        "default" => Ok(1.0),
        "linear" => {
            let f = obj
                .get("factor")
                .and_then(Value::as_f64)
                .context("rope_scaling: 'linear' needs a numeric 'factor'")?;
            if !(f > 0.0) {
                bail!("rope_scaling.factor must be positive, got {f}");
            }
            Ok(f)
        }
        other => bail!("rope_scaling type '{other}' is not supported (supported: default, linear)"),
    }
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
    fn unknown_rope_scaling_is_an_error() {
        let err = LlamaConfig::from_json_str(&with(
            r#""rope_scaling":{"rope_type":"yarn","factor":4.0}"#,
        ))
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("rope_scaling type 'yarn' is not supported"),
            "{err}"
        );
        let c =
            LlamaConfig::from_json_str(&with(r#""rope_scaling":{"type":"linear","factor":2.0}"#))
                .unwrap();
        assert_eq!(c.rope_linear_factor, 2.0);
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
    fn presets_have_llama2_sizes() {
        let p7 = LlamaConfig::preset("llama2-7b").unwrap().num_parameters() as f64 / 1e9;
        let p70 = LlamaConfig::preset("llama2-70b").unwrap().num_parameters() as f64 / 1e9;
        assert!((6.7..6.8).contains(&p7), "{p7}");
        assert!((68.9..69.1).contains(&p70), "{p70}");
        assert!(LlamaConfig::preset("llama3").is_err());
    }
}
