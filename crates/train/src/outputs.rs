//! The run's output directory: one job at a time writes it ([`lock_output_dir`]), and what
//! the run leaves there at the end ([`write_outputs`]: the PEFT adapter, the Hugging Face
//! model), checked replaceable when the run starts ([`check_outputs_replaceable`]).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use helix_model::hf_export::{export_hf_weights, parse_size, ExportOptions, MODEL_EXPORT};
use helix_model::written_dir::check_replaceable;
use helix_model::ModelDir;
use helix_peft::{
    export_merged, gathered_weights, save_lora_tensors, save_ptuning, Customized, Method,
    ADAPTER_DIR,
};

use crate::config::ConfigFile;

/// An exclusive lock on `dir/.helix-train.lock`, held while the returned file is open; `None`
/// (after a warning) where the filesystem takes no locks. An advisory lock (flock, which Linux
/// carries over NFS as a POSIX lock): the kernel drops it when the process dies, however it
/// dies, so a crashed or killed run never leaves it behind.
pub fn lock_output_dir(dir: &Path) -> Result<Option<std::fs::File>> {
    use std::io::{Read, Seek, Write};
    let path = dir.join(".helix-train.lock");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            bail!(
                "another helix-train job is writing to {} ({}): give this run another \
                 trainer.output_dir, or wait for that one to end",
                dir.display(),
                match holder.trim() {
                    "" => "its lock is held",
                    h => h,
                }
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            eprintln!(
                "warning: cannot lock {} ({e}): nothing stops a second job from writing to {}",
                path.display(),
                dir.display()
            );
            return Ok(None);
        }
    }
    f.set_len(0)?;
    f.rewind()?;
    write!(f, "pid {} on {}", std::process::id(), host_name())?;
    Ok(Some(f))
}

/// This machine's name as the kernel reports it (empty where it cannot be read): who holds an
/// output directory, and whose TensorBoard event file is whose.
pub fn host_name() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    name.trim().to_string()
}

/// Where the run leaves its PEFT adapter, if it writes one: LoRA and P-tuning, unless
/// `output.adapter = false`.
fn adapter_out(cfg: &ConfigFile, method: &Method) -> Option<PathBuf> {
    (cfg.output.adapter && !matches!(method, Method::FullSft))
        .then(|| cfg.trainer.output_dir.join("adapter"))
}

/// Where the run leaves the model as a Hugging Face directory, if it writes one: full SFT
/// always, LoRA merged when `output.merged`.
fn model_out(cfg: &ConfigFile, method: &Method) -> Option<PathBuf> {
    (matches!(method, Method::FullSft) || cfg.output.merged)
        .then(|| cfg.trainer.output_dir.join("model"))
}

/// The directories [`write_outputs`] will replace, with an error naming any that holds files
/// those writes do not make.
pub fn check_outputs_replaceable(cfg: &ConfigFile) -> Result<()> {
    let method = cfg.method()?;
    if let Some(dir) = adapter_out(cfg, &method) {
        check_replaceable(&dir, &ADAPTER_DIR).context("output.adapter")?;
    }
    if let Some(dir) = model_out(cfg, &method) {
        check_replaceable(&dir, &MODEL_EXPORT).context("the model export")?;
    }
    Ok(())
}

/// At the end: the adapter in PEFT format (`output_dir/adapter`), and the model as a Hugging
/// Face directory (`output_dir/model`: full SFT always, LoRA merged when `output.merged`).
/// `chat_template`, the run's own (`data.chat_template`, as its data was rendered with), goes
/// beside both as `chat_template.jinja`. Every rank of rank 0's tensor-parallel group calls
/// this (it gathers shards); `write` is set on rank 0 alone.
pub fn write_outputs(
    cfg: &ConfigFile,
    model: &Customized,
    model_dir: &ModelDir,
    method: &Method,
    chat_template: Option<&str>,
    write: bool,
) -> Result<Vec<PathBuf>> {
    let base = model_dir.path.display().to_string();
    let mut written = Vec::new();
    if let Some(dir) = adapter_out(cfg, method) {
        match method {
            Method::Lora(lora) => {
                let named = model
                    .trainable()
                    .into_iter()
                    .map(|(n, v)| Ok((n.clone(), model.gather_whole(&n, v.as_tensor())?)))
                    .collect::<Result<Vec<_>>>()?;
                if write {
                    save_lora_tensors(&dir, lora, &named, &base, chat_template)?;
                }
            }
            _ if write => save_ptuning(
                &dir,
                model.ptuning.as_ref().expect("P-tuning"),
                model.model.config(),
                &base,
                chat_template,
            )?,
            _ => {}
        }
        if write {
            eprintln!("adapter (PEFT format): {}", dir.display());
            written.push(dir);
        }
    }
    if let Some(dir) = model_out(cfg, method) {
        let opts = ExportOptions {
            dtype: cfg.model_dtype()?,
            max_shard_bytes: parse_size(&cfg.output.max_shard_size)?,
            chat_template: chat_template.map(str::to_string),
        };
        let report = match model.model.tensor_parallel() {
            None if write => Some(export_merged(model, &model_dir.path, &dir, &opts)?),
            None => None,
            Some(_) => {
                let weights = gathered_weights(model)?;
                match write {
                    true => Some(export_hf_weights(&weights, &model_dir.path, &dir, &opts)?),
                    false => None,
                }
            }
        };
        if let Some(report) = report {
            eprintln!(
                "model (Hugging Face directory, {} files): {}",
                report.files.len(),
                dir.display()
            );
            written.push(dir);
        }
    }
    Ok(written)
}
