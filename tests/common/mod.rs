//! Helpers shared by the workspace integration tests (each test file includes this module).
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use helix::model::ForwardMask;
use helix::peft::ModelBatch;

/// A committed fixture directory: tests/fixtures/<name>.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// max |t| over every element, as f32.
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .and_then(|a| a.flatten_all())
        .and_then(|a| a.max(0))
        .and_then(|a| a.to_dtype(candle_core::DType::F32))
        .and_then(|a| a.to_scalar::<f32>())
        .expect("max |t| of a tensor")
}

pub fn load_st(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The batch a reference was computed on.
pub struct Batch {
    pub input_ids: Tensor,
    pub position_ids: Tensor,
    pub labels: Tensor,
    pub mask: ForwardMask,
    /// [B, S] real-token flags, for comparing logits at real positions only.
    pub valid: Vec<u8>,
}

impl Batch {
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let r = load_st(path);
        let valid: Vec<u8> = r["attention_mask"]
            .flatten_all()?
            .to_vec1::<i64>()?
            .iter()
            .map(|&m| m as u8)
            .collect();
        Ok(Self {
            input_ids: r["input_ids"].to_dtype(DType::U32)?,
            position_ids: r["position_ids"].clone(),
            labels: r["labels"].clone(),
            mask: ForwardMask {
                key_valid: Some(valid.clone()),
                segment_ids: None,
            },
            valid,
        })
    }

    pub fn model_batch(&self) -> ModelBatch<'_> {
        ModelBatch {
            input_ids: &self.input_ids,
            position_ids: &self.position_ids,
            labels: Some(&self.labels),
            mask: &self.mask,
        }
    }
}
