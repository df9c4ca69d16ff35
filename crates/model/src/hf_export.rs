//! Writing a model as a Hugging Face directory that transformers, vLLM and helix load:
//! `config.json` and the tokenizer files of the source directory, and the weights as
//! safetensors, sharded with an index above a size limit.
//!
//! The directory is built beside its destination and moved into place at the end, so a crash
//! leaves the previous export (or nothing), never a mix of old and new shards.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};

use crate::llama::Llama;
use crate::safetensors_write::{save_sharded, write_json, ShardReport, TensorSpec};

/// Files copied from the source model directory when present.
pub const TOKENIZER_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
];

/// transformers' default `max_shard_size` ("5GB").
pub const DEFAULT_MAX_SHARD_BYTES: usize = 5_000_000_000;

#[derive(Debug, Clone, Copy)]
pub struct ExportOptions {
    /// dtype of the written weights (F32, BF16 or F16).
    pub dtype: DType,
    pub max_shard_bytes: usize,
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
    export_named(&model.named_weights(), src_dir, out, opts, transform)
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
    config["torch_dtype"] = serde_json::json!(torch_dtype_name(opts.dtype)?);
    let staging = staging_dir(out)?;
    let result = (|| {
        let report = save_sharded(&staging, "model", specs, opts.max_shard_bytes, |s| {
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
        write_json(&staging.join("config.json"), &config)?;
        replace_dir(&staging, out)?;
        Ok(report)
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result
}

/// The dtype a model directory's `config.json` declares (`torch_dtype`, or `dtype` as newer
/// transformers writes it), if it is one helix writes.
pub fn source_dtype(dir: &Path) -> Result<Option<DType>> {
    let path = dir.join("config.json");
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?,
    )
    .with_context(|| format!("{}: invalid JSON", path.display()))?;
    let name = v.get("torch_dtype").or_else(|| v.get("dtype"));
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

/// A fresh directory beside `out` (same filesystem, so the final rename is atomic).
fn staging_dir(out: &Path) -> Result<PathBuf> {
    let name = out
        .file_name()
        .with_context(|| format!("{} has no directory name", out.display()))?
        .to_string_lossy();
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let staging = parent.join(format!(".{name}.{}.partial", std::process::id()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    std::fs::create_dir(&staging)
        .with_context(|| format!("cannot create {}", staging.display()))?;
    Ok(staging)
}

/// Moves `staging` to `out`; an existing `out` is moved aside first and removed last.
fn replace_dir(staging: &Path, out: &Path) -> Result<()> {
    let old = if out.exists() {
        if !out.is_dir() {
            bail!("{} exists and is not a directory", out.display());
        }
        let aside = staging.with_extension("old");
        std::fs::rename(out, &aside)
            .with_context(|| format!("cannot move the old {} aside", out.display()))?;
        Some(aside)
    } else {
        None
    };
    std::fs::rename(staging, out)
        .with_context(|| format!("cannot move {} to {}", staging.display(), out.display()))?;
    if let Some(old) = old {
        std::fs::remove_dir_all(&old)
            .with_context(|| format!("cannot remove {}", old.display()))?;
    }
    Ok(())
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
}
