//! A customized model as a plain Hugging Face directory: full-SFT weights as trained, or LoRA
//! merged into the base (PEFT's `merge_and_unload` + `save_pretrained`), sharded with an index
//! above `max_shard_bytes`. P-tuning cannot be merged: its virtual tokens are inputs, not
//! weights, so it ships as an adapter.

use std::path::Path;

use anyhow::{bail, Result};
use candle_core::Tensor;
use helix_model::hf_export::{export_hf_dir, ExportOptions};
use helix_model::linear::{weight_split, Split};
use helix_model::safetensors_write::ShardReport;

use crate::Customized;

pub fn export_merged(
    c: &Customized,
    src_dir: &Path,
    out: &Path,
    opts: &ExportOptions,
) -> Result<ShardReport> {
    if c.ptuning.is_some() {
        bail!(
            "a P-tuning model cannot be merged into its weights (the virtual tokens are inputs); \
             use the adapter directory with `helix-train generate --adapter` or PEFT"
        );
    }
    export_hf_dir(&c.model, src_dir, out, opts, |name, w| {
        // LoRA's merge is computed in f32; the writer rounds once, to the export dtype.
        let merged = match &c.lora {
            Some(l) => l.merged_weight(name)?,
            None => None,
        };
        Ok(merged.unwrap_or(w))
    })
}

/// Every weight of the model, whole (LoRA merged in): gathered over the tensor-parallel group,
/// so every rank of the group must call this; one of them then writes it with
/// [`helix_model::hf_export::export_hf_weights`].
pub fn gathered_weights(c: &Customized) -> Result<Vec<(String, Tensor)>> {
    if c.ptuning.is_some() {
        bail!("a P-tuning model cannot be merged into its weights (the virtual tokens are inputs)");
    }
    let mut out = Vec::new();
    for (name, w) in c.model.named_weights()? {
        let local = match &c.lora {
            Some(l) => l.merged_weight(&name)?.unwrap_or(w),
            None => w,
        };
        let whole = match (c.model.tensor_parallel(), weight_split(&name)) {
            (Some(g), Split::Dim(d)) => g.all_gather(&local, d)?,
            _ => local,
        };
        out.push((name, whole));
    }
    Ok(out)
}
