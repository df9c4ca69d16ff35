//! The helix TOML config file. Sections are owned by the crate that uses them (`[data]` is
//! `helix_data::DataConfig`); this file only reads the file and names it in errors. Unknown keys
//! inside a section are errors that give the line.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use helix_data::DataConfig;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
pub struct ConfigFile {
    pub model: Option<ModelSection>,
    pub data: Option<DataConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A Hugging Face model directory (config.json, safetensors, tokenizer files).
    pub path: PathBuf,
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the config {}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// The `[data]` section, or an error naming the file.
    pub fn data(&self, path: &Path) -> Result<&DataConfig> {
        self.data
            .as_ref()
            .with_context(|| format!("{}: no [data] section", path.display()))
    }

    /// Where the tokenizer lives: `data.tokenizer`, else `model.path`.
    pub fn tokenizer_dir(&self, path: &Path) -> Result<PathBuf> {
        if let Some(t) = self.data.as_ref().and_then(|d| d.tokenizer.clone()) {
            return Ok(t);
        }
        self.model
            .as_ref()
            .map(|m| m.path.clone())
            .with_context(|| {
                format!(
                    "{}: set data.tokenizer or model.path (the tokenizer's directory)",
                    path.display()
                )
            })
    }
}
