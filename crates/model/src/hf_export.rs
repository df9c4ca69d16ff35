//! Writing a model as a Hugging Face directory that transformers, vLLM and helix load:
//! `config.json` and the tokenizer files of the source directory, and the weights as
//! safetensors, sharded with an index above a size limit.
//!
//! The directory is written whole (written_dir.rs): a crash leaves the previous export (or
//! nothing), never a mix of old and new shards.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};

use crate::llama::Llama;
use crate::safetensors_write::{is_shard_file, save_sharded, write_json, ShardReport, TensorSpec};
use crate::written_dir::{write_dir, DirKind};

/// Files copied from the source model directory when present: the tokenizer in each form
/// transformers saves it (`tokenizer.json` for the fast one; `vocab.json` + `merges.txt` or
/// `tokenizer.model` for the slow ones), its chat template (in `tokenizer_config.json`, or in
/// `chat_template.jinja` as transformers ≥ 4.57 saves it) and the generation defaults.
pub const TOKENIZER_FILES: [&str; 9] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    crate::model_dir::CHAT_TEMPLATE_FILE,
    "generation_config.json",
];

/// The folder of named chat templates beside `chat_template.jinja`, copied whole when present.
const CHAT_TEMPLATES_DIR: &str = "additional_chat_templates";

/// transformers' default `max_shard_size` ("5GB").
pub const DEFAULT_MAX_SHARD_BYTES: usize = 5_000_000_000;

#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// dtype of the written weights (F32, BF16 or F16).
    pub dtype: DType,
    pub max_shard_bytes: usize,
    /// A chat template to write as `chat_template.jinja` in place of the source's (the one an
    /// adapter was trained with); transformers reads that file before tokenizer_config.json's.
    pub chat_template: Option<String>,
}

/// Writes `model` to `out` with `config.json` and tokenizer files taken from `src_dir`.
/// `transform(name, weight)` gives the weight to write (e.g. a LoRA-merged projection); it is
/// called once per tensor, as the tensor is written.
pub fn export_hf_dir(
    model: &Llama,
    src_dir: &Path,
    out: &Path,
    opts: &ExportOptions,
    transform: impl FnMut(&str, Tensor) -> Result<Tensor>,
) -> Result<ShardReport> {
    export_named(&model.named_weights()?, src_dir, out, opts, transform)
}

/// Writes whole `weights` already in memory (e.g. gathered from tensor-parallel shards) to
/// `out`, as [`export_hf_dir`] does.
pub fn export_hf_weights(
    weights: &[(String, Tensor)],
    src_dir: &Path,
    out: &Path,
    opts: &ExportOptions,
) -> Result<ShardReport> {
    export_named(weights, src_dir, out, opts, |_, t| Ok(t))
}

/// The tensors of `weights` (handles: a model's weights cost nothing to list), each passed
/// through `transform` as it is written.
fn export_named(
    weights: &[(String, Tensor)],
    src_dir: &Path,
    out: &Path,
    opts: &ExportOptions,
    mut transform: impl FnMut(&str, Tensor) -> Result<Tensor>,
) -> Result<ShardReport> {
    let specs: Vec<TensorSpec> = weights
        .iter()
        .map(|(n, t)| TensorSpec::new(n.clone(), opts.dtype, t.dims()))
        .collect();
    export_hf(&specs, src_dir, out, opts, |name| {
        let (_, t) = weights
            .iter()
            .find(|(n, _)| n == name)
            .expect("a spec per weight");
        transform(name, t.clone())
    })
}

fn export_hf(
    specs: &[TensorSpec],
    src_dir: &Path,
    out: &Path,
    opts: &ExportOptions,
    mut produce: impl FnMut(&str) -> Result<Tensor>,
) -> Result<ShardReport> {
    let config_path = src_dir.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&config_path)
            .with_context(|| format!("cannot read {}", config_path.display()))?,
    )
    .with_context(|| format!("{}: invalid JSON", config_path.display()))?;
    // transformers ≥ 4.56 writes `dtype` and reads it before `torch_dtype`: both must say what
    // the shards hold.
    let dtype_name = serde_json::json!(torch_dtype_name(opts.dtype)?);
    config["torch_dtype"] = dtype_name.clone();
    if config.get("dtype").is_some() {
        config["dtype"] = dtype_name;
    }
    // A 4-bit source (crate::bnb) is written dense: its quantization no longer applies.
    if let Some(c) = config.as_object_mut() {
        c.remove("quantization_config");
    }
    write_dir(out, &MODEL_EXPORT, |staging| {
        let report = save_sharded(staging, "model", specs, opts.max_shard_bytes, |s| {
            produce(&s.name).with_context(|| format!("weight {}", s.name))
        })?;
        for f in TOKENIZER_FILES {
            let src = src_dir.join(f);
            if src.exists() {
                std::fs::copy(&src, staging.join(f)).with_context(|| {
                    format!("cannot copy {} to {}", src.display(), staging.display())
                })?;
            }
        }
        copy_files_of(
            &src_dir.join(CHAT_TEMPLATES_DIR),
            &staging.join(CHAT_TEMPLATES_DIR),
        )?;
        if let Some(template) = &opts.chat_template {
            crate::model_dir::write_chat_template_file(staging, template)?;
        }
        write_json(&staging.join("config.json"), &config)?;
        Ok(report)
    })
}

/// Copies the files of `from` (if it is a directory) into a new directory `to`.
fn copy_files_of(from: &Path, to: &Path) -> Result<()> {
    if !from.is_dir() {
        return Ok(());
    }
    std::fs::create_dir(to).with_context(|| format!("cannot create {}", to.display()))?;
    for entry in
        std::fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))?
    {
        let path = entry?.path();
        if path.is_file() {
            let dest = to.join(path.file_name().expect("a listed file has a name"));
            std::fs::copy(&path, &dest)
                .with_context(|| format!("cannot copy {} to {}", path.display(), dest.display()))?;
        }
    }
    Ok(())
}

/// A model export's directory: replaced whole by the next export (a training run's
/// `output_dir/model`, or `export --out` again) when it holds nothing else.
pub const MODEL_EXPORT: DirKind = DirKind {
    what: "a model export",
    holds: is_export_entry,
};

/// Whether `name`, an entry of a directory, is something an export writes there.
fn is_export_entry(name: &str) -> bool {
    matches!(
        name,
        "config.json" | "model.safetensors" | "model.safetensors.index.json" | CHAT_TEMPLATES_DIR
    ) || TOKENIZER_FILES.contains(&name)
        || is_shard_file("model", name)
}

/// The dtype a model directory's `config.json` declares (`dtype`, as transformers ≥ 4.56
/// writes it and reads it first, else `torch_dtype`), if it is one helix writes.
pub fn source_dtype(dir: &Path) -> Result<Option<DType>> {
    let path = dir.join("config.json");
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?,
    )
    .with_context(|| format!("{}: invalid JSON", path.display()))?;
    let name = v.get("dtype").or_else(|| v.get("torch_dtype"));
    Ok(match name.and_then(|n| n.as_str()) {
        Some("float32") => Some(DType::F32),
        Some("bfloat16") => Some(DType::BF16),
        Some("float16") => Some(DType::F16),
        _ => None,
    })
}

pub fn torch_dtype_name(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        other => bail!("cannot export dtype {other:?} (f32, bf16 or f16)"),
    })
}

/// A byte size as transformers writes `max_shard_size`: `5GB`, `500MB`, `2GiB`, `1000000`.
pub fn parse_size(s: &str) -> Result<usize> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .with_context(|| format!("invalid size '{s}' (e.g. 5GB, 500MB, 2GiB)"))?;
    let mult: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        other => bail!("invalid size unit '{other}' in '{s}' (B, KB, MB, GB, KiB, MiB, GiB)"),
    };
    let bytes = value * mult;
    if !(bytes >= 1.0) {
        bail!("size '{s}' must be at least one byte");
    }
    Ok(bytes as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_transformers() -> Result<()> {
        assert_eq!(parse_size("5GB")?, 5_000_000_000);
        assert_eq!(parse_size("500MB")?, 500_000_000);
        assert_eq!(parse_size("2GiB")?, 2 << 30);
        assert_eq!(parse_size("1.5 KB")?, 1500);
        assert_eq!(parse_size("123")?, 123);
        assert!(parse_size("5XB")
            .unwrap_err()
            .to_string()
            .contains("unit 'XB'"));
        assert!(parse_size("GB").is_err());
        assert!(parse_size("0").is_err());
        Ok(())
    }

    #[test]
    fn only_what_an_export_writes_is_replaceable() {
        for name in [
            "config.json",
            "model.safetensors",
            "model.safetensors.index.json",
            "model-00002-of-00013.safetensors",
            "tokenizer.json",
            "chat_template.jinja",
            "additional_chat_templates",
        ] {
            assert!(is_export_entry(name), "{name}");
        }
        for name in [
            "README.md",
            ".git",
            "model-2-of-13.safetensors",
            "model-00002-of-00013.bin",
            "adapter_model.safetensors",
            "checkpoints",
        ] {
            assert!(!is_export_entry(name), "{name}");
        }
    }
}
