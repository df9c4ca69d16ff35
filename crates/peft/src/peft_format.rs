//! Adapters in Hugging Face PEFT's on-disk format, both ways: `adapter_config.json` plus
//! `adapter_model.safetensors` (header metadata `{"format": "pt"}`).
//!
//! - LoRA: keys `base_model.model.<prefix>.lora_A.weight` [r, in] and `….lora_B.weight` [out, r];
//!   with DoRA (`"use_dora": true`) also `….lora_magnitude_vector` [out].
//! - P-tuning: `prompt_embeddings` [num_virtual_tokens, hidden], the encoder's output, which is
//!   what PEFT loads for inference. helix also writes the whole encoder to
//!   `prompt_encoder.safetensors` (PEFT's parameter names) so training can resume; PEFT ignores
//!   that file.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use helix_model::safetensors_write::{save_tensors, write_json};
use helix_model::written_dir::{write_dir, DirKind};
use helix_model::{write_chat_template_file, LlamaConfig, SafetensorsWeights, CHAT_TEMPLATE_FILE};
use serde_json::{json, Value};

use crate::lora::{LoraAdapters, LoraConfig};
use crate::ptuning::ENCODER_PREFIX;
use crate::ptuning::{EncoderType, Ptuning, PtuningConfig, VirtualTokens};
use crate::{load_customized, Customized, Method, ModelLoad};

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// helix's own file beside a P-tuning adapter: the full prompt encoder.
pub const PROMPT_ENCODER_WEIGHTS: &str = "prompt_encoder.safetensors";
pub const PROMPT_EMBEDDINGS: &str = "prompt_embeddings";

/// An adapter's directory, written whole: a crash leaves the previous adapter, never new
/// weights beside an old config.
pub const ADAPTER_DIR: DirKind = DirKind {
    what: "an adapter save",
    holds: |name| {
        [
            ADAPTER_CONFIG,
            ADAPTER_WEIGHTS,
            PROMPT_ENCODER_WEIGHTS,
            // The chat template a run rendered its data with, when it was not the base
            // model's (`data.chat_template`), saved as transformers saves a tokenizer's.
            CHAT_TEMPLATE_FILE,
        ]
        .contains(&name)
    },
};

/// An adapter read from disk.
pub enum Adapter {
    Lora {
        cfg: LoraConfig,
        tensors: HashMap<String, Tensor>,
    },
    Ptuning {
        cfg: PtuningConfig,
        /// [num_virtual_tokens, hidden], f32.
        prompt_embeddings: Tensor,
        /// The encoder, when helix saved it (keys without [`ENCODER_PREFIX`]).
        encoder: Option<HashMap<String, Tensor>>,
    },
}

impl Adapter {
    pub fn kind(&self) -> &'static str {
        match self {
            Adapter::Lora { cfg, .. } => cfg.name(),
            Adapter::Ptuning { .. } => "P-tuning",
        }
    }
}

/// Writes a LoRA adapter as PEFT's `save_pretrained` does.
pub fn save_lora(dir: &Path, adapters: &LoraAdapters, base_model: &str) -> Result<()> {
    let named: Vec<(String, Tensor)> = adapters
        .named_vars()
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().clone()))
        .collect();
    save_lora_tensors(dir, &adapters.cfg, &named, base_model, None)
}

/// Writes `chat_template` (when given) into an adapter's staging directory.
fn write_chat_template(staging: &Path, chat_template: Option<&str>) -> Result<()> {
    match chat_template {
        Some(text) => write_chat_template_file(staging, text),
        None => Ok(()),
    }
}

/// [`save_lora`] from given tensors (PEFT keys), e.g. gathered from tensor-parallel shards,
/// with the run's chat template beside them when it has its own.
pub fn save_lora_tensors(
    dir: &Path,
    cfg: &LoraConfig,
    named: &[(String, Tensor)],
    base_model: &str,
    chat_template: Option<&str>,
) -> Result<()> {
    let mut targets = cfg.target_modules.clone();
    targets.sort();
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": targets,
        "bias": "none",
        "use_rslora": cfg.use_rslora,
        "fan_in_fan_out": false,
        "use_dora": cfg.use_dora,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    });
    write_dir(dir, &ADAPTER_DIR, |staging| {
        save_tensors(&staging.join(ADAPTER_WEIGHTS), named)?;
        write_chat_template(staging, chat_template)?;
        write_json(&staging.join(ADAPTER_CONFIG), &config)
    })
}

/// Writes a P-tuning adapter as PEFT's `save_pretrained` does (config + `prompt_embeddings`),
/// plus the encoder in `prompt_encoder.safetensors` when there is one, and the run's chat
/// template when it has its own.
pub fn save_ptuning(
    dir: &Path,
    ptuning: &Ptuning,
    model: &LlamaConfig,
    base_model: &str,
    chat_template: Option<&str>,
) -> Result<()> {
    let cfg = &ptuning.cfg;
    let config = json!({
        "peft_type": "P_TUNING",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "num_virtual_tokens": cfg.num_virtual_tokens,
        "token_dim": model.hidden_size,
        "num_transformer_submodules": 1,
        "num_attention_heads": model.num_attention_heads,
        "num_layers": model.num_hidden_layers,
        "encoder_reparameterization_type": cfg.encoder_reparameterization_type.peft_name(),
        "encoder_hidden_size": cfg.encoder_hidden_size.unwrap_or(model.hidden_size),
        "encoder_num_layers": cfg.encoder_num_layers,
        "encoder_dropout": cfg.encoder_dropout,
        "inference_mode": true,
        "modules_to_save": null,
        "auto_mapping": null,
        "revision": null,
    });
    let table = ptuning.prompt_embeddings()?;
    write_dir(dir, &ADAPTER_DIR, |staging| {
        save_tensors(
            &staging.join(ADAPTER_WEIGHTS),
            &[(PROMPT_EMBEDDINGS.to_string(), table)],
        )?;
        // A table alone has no encoder to save.
        if let VirtualTokens::Encoder(_) = &ptuning.tokens {
            let named: Vec<(String, Tensor)> = ptuning
                .named_vars()
                .into_iter()
                .map(|(k, v)| (k, v.as_tensor().clone()))
                .collect();
            save_tensors(&staging.join(PROMPT_ENCODER_WEIGHTS), &named)?;
        }
        write_chat_template(staging, chat_template)?;
        write_json(&staging.join(ADAPTER_CONFIG), &config)
    })
}

/// Reads a PEFT adapter directory (LoRA or P-tuning): its config, checked for what helix
/// supports, and its tensors (f32, on `device`).
pub fn read_adapter(dir: &Path, device: &Device) -> Result<Adapter> {
    let cfg_path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&cfg_path)
        .with_context(|| format!("cannot read {}", cfg_path.display()))?;
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid JSON", cfg_path.display()))?;
    let peft_type = v.get("peft_type").and_then(Value::as_str);
    let w_path = dir.join(ADAPTER_WEIGHTS);
    let load = |path: &Path| -> Result<HashMap<String, Tensor>> {
        if !path.exists() {
            bail!(
                "{}: not found (helix reads adapters saved with safetensors)",
                path.display()
            );
        }
        candle_core::safetensors::load(path, device)
            .with_context(|| format!("cannot read {}", path.display()))?
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?)))
            .collect()
    };
    match peft_type {
        Some("LORA") => {
            let cfg =
                lora_config_from_peft(&v).with_context(|| format!("{}", cfg_path.display()))?;
            Ok(Adapter::Lora {
                cfg,
                tensors: load(&w_path)?,
            })
        }
        Some("P_TUNING") => {
            let cfg =
                ptuning_config_from_peft(&v).with_context(|| format!("{}", cfg_path.display()))?;
            let mut tensors = load(&w_path)?;
            let Some(table) = tensors.remove(PROMPT_EMBEDDINGS) else {
                bail!("{}: no tensor {PROMPT_EMBEDDINGS}", w_path.display());
            };
            if table.dims() != [cfg.num_virtual_tokens, token_dim(&v)?] {
                bail!(
                    "{}: {PROMPT_EMBEDDINGS} has shape {:?}, the config says [{}, {}]",
                    w_path.display(),
                    table.dims(),
                    cfg.num_virtual_tokens,
                    token_dim(&v)?
                );
            }
            let enc_path = dir.join(PROMPT_ENCODER_WEIGHTS);
            let encoder = if enc_path.exists() {
                let state = load(&enc_path)?;
                let mut stripped = HashMap::new();
                for (k, t) in state {
                    let Some(name) = k.strip_prefix(ENCODER_PREFIX) else {
                        bail!("{}: unexpected tensor {k}", enc_path.display());
                    };
                    stripped.insert(name.to_string(), t);
                }
                Some(stripped)
            } else {
                None
            };
            Ok(Adapter::Ptuning {
                cfg,
                prompt_embeddings: table,
                encoder,
            })
        }
        other => bail!(
            "{}: peft_type {other:?} is not supported (helix reads \"LORA\" and \"P_TUNING\")",
            cfg_path.display()
        ),
    }
}

fn check_task_type(v: &Value) -> Result<()> {
    match v.get("task_type").and_then(Value::as_str) {
        None | Some("CAUSAL_LM") => Ok(()),
        Some(t) => bail!("task_type is \"{t}\", helix trains CAUSAL_LM adapters"),
    }
}

fn num(v: &Value, k: &str) -> Result<f64> {
    v.get(k)
        .and_then(Value::as_f64)
        .with_context(|| format!("{k} is missing or not a number"))
}

fn count(v: &Value, k: &str) -> Result<usize> {
    v.get(k)
        .and_then(Value::as_u64)
        .map(|n| n as usize)
        .with_context(|| format!("{k} is missing or not a whole number"))
}

fn token_dim(v: &Value) -> Result<usize> {
    count(v, "token_dim")
}

/// The parts of PEFT's `LoraConfig` helix implements; anything else set is an error naming it.
fn lora_config_from_peft(v: &Value) -> Result<LoraConfig> {
    check_task_type(v)?;
    let s = |k: &str| v.get(k).and_then(Value::as_str);
    let off = |k: &str| v.get(k).is_none_or(|x| x.is_null() || *x == json!(false));
    let empty = |k: &str| {
        v.get(k)
            .is_none_or(|x| x.is_null() || x.as_object().is_some_and(|o| o.is_empty()))
    };
    for key in ["fan_in_fan_out", "lora_bias"] {
        if !off(key) {
            bail!("{key} = true is not supported");
        }
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if !empty(key) {
            bail!("{key} is not supported (one r and lora_alpha for every layer)");
        }
    }
    for key in [
        "modules_to_save",
        "layers_to_transform",
        "trainable_token_indices",
    ] {
        if !v
            .get(key)
            .is_none_or(|x| x.is_null() || x.as_array().is_some_and(|a| a.is_empty()))
        {
            bail!("{key} is not supported");
        }
    }
    if let Some(b) = s("bias").filter(|b| *b != "none") {
        bail!("bias = {b:?} is not supported (only \"none\")");
    }
    let target_modules = match v.get("target_modules") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|t| {
                t.as_str()
                    .map(str::to_string)
                    .context("target_modules holds a non-string")
            })
            .collect::<Result<Vec<_>>>()?,
        Some(Value::String(re)) => {
            bail!("target_modules is a pattern ({re:?}); helix needs a list")
        }
        _ => bail!("target_modules is missing"),
    };
    let cfg = LoraConfig {
        r: count(v, "r")?,
        lora_alpha: num(v, "lora_alpha")?,
        lora_dropout: match v.get("lora_dropout") {
            None | Some(Value::Null) => 0.0,
            Some(x) => x
                .as_f64()
                .with_context(|| format!("lora_dropout = {x} is not a number"))?,
        },
        target_modules,
        use_rslora: flag(v, "use_rslora")?,
        use_dora: flag(v, "use_dora")?,
    };
    cfg.validate()?;
    Ok(cfg)
}

/// A boolean setting of adapter_config.json: false when absent or null, an error naming the key
/// when it is anything but true or false (a string "true" is not read as false).
fn flag(v: &Value, key: &str) -> Result<bool> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => bail!("{key} = {other} is not true or false"),
    }
}

fn ptuning_config_from_peft(v: &Value) -> Result<PtuningConfig> {
    check_task_type(v)?;
    if let Some(n) = v.get("num_transformer_submodules").and_then(Value::as_u64) {
        if n != 1 {
            bail!("num_transformer_submodules = {n}: a causal LM has 1");
        }
    }
    let encoder = match v
        .get("encoder_reparameterization_type")
        .and_then(Value::as_str)
    {
        None | Some("MLP") => EncoderType::Mlp,
        Some("LSTM") => EncoderType::Lstm,
        Some(other) => bail!("encoder_reparameterization_type \"{other}\" (MLP or LSTM)"),
    };
    let cfg = PtuningConfig {
        num_virtual_tokens: count(v, "num_virtual_tokens")?,
        encoder_reparameterization_type: encoder,
        encoder_hidden_size: v
            .get("encoder_hidden_size")
            .and_then(Value::as_u64)
            .map(|n| n as usize),
        encoder_num_layers: v
            .get("encoder_num_layers")
            .and_then(Value::as_u64)
            .map_or(2, |n| n as usize),
        encoder_dropout: v
            .get("encoder_dropout")
            .and_then(Value::as_f64)
            .unwrap_or(0.0),
    };
    cfg.validate()?;
    Ok(cfg)
}

impl LoraAdapters {
    /// Sets every adapter weight from `tensors` (PEFT keys); see [`crate::load_named_vars`].
    pub fn load_tensors(&self, tensors: &HashMap<String, Tensor>, source: &Path) -> Result<()> {
        crate::load_named_vars(&self.named_vars(), tensors, "", source)
    }
}

/// Loads the base model frozen with the adapter in `adapter_dir` applied: LoRA layers holding
/// its weights (trainable, if training continues), or the P-tuning virtual tokens (helix's
/// encoder when it saved one, else PEFT's `prompt_embeddings` table).
pub fn load_with_adapter(
    cfg: &LlamaConfig,
    weights: &SafetensorsWeights,
    adapter_dir: &Path,
    dtype: DType,
    device: &Device,
) -> Result<Customized> {
    load_with_adapter_as(
        cfg,
        weights,
        adapter_dir,
        &ModelLoad::new(dtype, device.clone()),
    )
}

/// [`load_with_adapter`] with the model held as `how` says (its projections in NF4, say).
pub fn load_with_adapter_as(
    cfg: &LlamaConfig,
    weights: &SafetensorsWeights,
    adapter_dir: &Path,
    how: &ModelLoad,
) -> Result<Customized> {
    let device = &how.device;
    match read_adapter(adapter_dir, device)? {
        Adapter::Lora { cfg: lora, tensors } => {
            let c = load_customized(cfg, weights, &Method::Lora(lora), 0, how)?;
            let adapters = c.lora.as_ref().expect("a LoRA model has adapters");
            adapters.load_tensors(&tensors, &adapter_dir.join(ADAPTER_WEIGHTS))?;
            Ok(c)
        }
        Adapter::Ptuning {
            cfg: p_cfg,
            prompt_embeddings,
            encoder,
        } => {
            if prompt_embeddings.dim(1)? != cfg.hidden_size {
                bail!(
                    "{}: the virtual tokens are {} wide, the model's hidden size is {}",
                    adapter_dir.display(),
                    prompt_embeddings.dim(1)?,
                    cfg.hidden_size
                );
            }
            let mut c = load_customized(cfg, weights, &Method::Ptuning(p_cfg), 0, how)?;
            let p = c
                .ptuning
                .as_mut()
                .expect("a P-tuning model has virtual tokens");
            match (&p.tokens, encoder) {
                (VirtualTokens::Encoder(e), Some(state)) => {
                    e.load_state(&state, "", &adapter_dir.join(PROMPT_ENCODER_WEIGHTS))?
                }
                (_, _) => p.tokens = VirtualTokens::Table(prompt_embeddings.to_device(device)?),
            }
            Ok(c)
        }
    }
}
