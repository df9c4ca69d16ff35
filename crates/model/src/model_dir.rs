//! A Hugging Face model directory as a whole: config, weights, tokenizer and chat template.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::chat_json::OrderedJson;
use crate::config::LlamaConfig;
use crate::linear::Quantization;
use crate::llama::{Llama, LoadOptions};
use crate::tokenizer_setup::apply_llama_post_processor;
use crate::weights::SafetensorsWeights;

/// A chat template saved as its own file, as transformers ≥ 4.43 reads it and ≥ 4.57 saves
/// it: in a model or tokenizer directory, and beside an adapter trained with its own.
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

/// The [`CHAT_TEMPLATE_FILE`] in `dir`, if there is one.
pub fn read_chat_template_file(dir: &Path) -> Result<Option<String>> {
    let path = dir.join(CHAT_TEMPLATE_FILE);
    match path.exists() {
        true => std::fs::read_to_string(&path)
            .map(Some)
            .with_context(|| format!("cannot read {}", path.display())),
        false => Ok(None),
    }
}

/// Writes `text` as the [`CHAT_TEMPLATE_FILE`] in `dir`.
pub fn write_chat_template_file(dir: &Path, text: &str) -> Result<()> {
    let path = dir.join(CHAT_TEMPLATE_FILE);
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// The text side of a model directory: tokenizer.json plus what tokenizer_config.json says.
pub struct TextCodec {
    pub tokenizer: Tokenizer,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

impl TextCodec {
    pub fn open(dir: &Path) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&tok_path)
            .map_err(|e| anyhow::anyhow!("cannot load tokenizer {}: {e}", tok_path.display()))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path)
                .with_context(|| format!("cannot read {}", cfg_path.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("{}: invalid JSON", cfg_path.display()))?
        } else {
            Value::Null
        };
        let token_str = |key: &str| -> Option<String> {
            match cfg.get(key)? {
                Value::String(s) => Some(s.clone()),
                // An AddedToken object: {"content": "<s>", ...}
                Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
                _ => None,
            }
        };
        // As transformers ≥ 4.43 reads them: chat_template.jinja before tokenizer_config.json's
        // template, which is a string or a list of named ones (the "default" one is used).
        let chat_template = match (read_chat_template_file(dir)?, cfg.get("chat_template")) {
            (Some(text), _) => Some(text),
            (None, Some(Value::String(s))) => Some(s.clone()),
            (None, Some(Value::Array(named))) => named
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template")?.as_str())
                .map(str::to_string),
            _ => None,
        };
        let (bos_token, eos_token) = (token_str("bos_token"), token_str("eos_token"));
        apply_llama_post_processor(
            &mut tokenizer,
            &cfg,
            bos_token.as_deref(),
            eos_token.as_deref(),
        )
        .with_context(|| format!("{}", cfg_path.display()))?;
        Ok(Self {
            tokenizer,
            chat_template,
            bos_token,
            eos_token,
        })
    }

    /// Token ids of `text`; `special` adds what the tokenizer's post-processor adds (e.g. BOS).
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, special)
            .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.tokenizer
            .decode(ids, skip_special)
            .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// Renders `messages` (role, content) with the model's Jinja chat template, as transformers'
    /// `apply_chat_template(..., tokenize=False)` does.
    pub fn apply_chat_template(
        &self,
        messages: &[(&str, &str)],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let messages: Vec<OrderedJson> = messages
            .iter()
            .map(|(role, content)| OrderedJson::message(role, content))
            .collect();
        self.render_chat(&messages, None, add_generation_prompt)
    }

    /// Renders whole JSON turns (tool calls and any other keys included) and the tools'
    /// schemas, as `apply_chat_template(messages, tools=tools, tokenize=False)` does.
    pub fn render_chat(
        &self,
        messages: &[OrderedJson],
        tools: Option<&OrderedJson>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        crate::chat::render(
            self.template()?,
            messages,
            tools,
            add_generation_prompt,
            self.bos_token.as_deref(),
            self.eos_token.as_deref(),
        )
    }

    /// [`Self::render_chat`], and the byte ranges the template's `{% generation %}` blocks
    /// wrote (the assistant's text, as transformers' `return_assistant_tokens_mask` has it).
    pub fn render_chat_with_generation_spans(
        &self,
        messages: &[OrderedJson],
        tools: Option<&OrderedJson>,
        add_generation_prompt: bool,
    ) -> Result<(String, Vec<std::ops::Range<usize>>)> {
        crate::chat::render_with_generation_spans(
            self.template()?,
            messages,
            tools,
            add_generation_prompt,
            self.bos_token.as_deref(),
            self.eos_token.as_deref(),
        )
    }

    fn template(&self) -> Result<&str> {
        self.chat_template.as_deref().context(
            "this model has no chat template (tokenizer_config.json has no 'chat_template'; \
             data.chat_template or --chat-template names a Jinja file to use)",
        )
    }

    /// Replaces the model's chat template with the Jinja file at `path` (transformers'
    /// `chat_template.jinja`, vLLM's `--chat-template`), for a model without one or with
    /// another than the data was written for.
    pub fn set_chat_template_file(&mut self, path: &Path) -> Result<()> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the chat template {}", path.display()))?;
        crate::chat::check_parses(&text)
            .with_context(|| format!("chat template {}", path.display()))?;
        self.chat_template = Some(text);
        Ok(())
    }
}

/// Loads a model directory for inference.
pub struct ModelDir {
    pub path: PathBuf,
    pub config: LlamaConfig,
    pub weights: SafetensorsWeights,
}

impl ModelDir {
    pub fn open(path: &Path) -> Result<Self> {
        let config = LlamaConfig::from_file(&path.join("config.json"))?;
        let weights = SafetensorsWeights::open_dir(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            config,
            weights,
        })
    }

    pub fn load_inference(&self, dtype: DType, device: &Device) -> Result<Llama> {
        self.load_inference_quantized(dtype, device, Quantization::None)
    }

    /// [`Self::load_inference`] with the projections held as `quantize_base` says.
    pub fn load_inference_quantized(
        &self,
        dtype: DType,
        device: &Device,
        quantize_base: Quantization,
    ) -> Result<Llama> {
        let opts = LoadOptions {
            quantize_base,
            ..LoadOptions::inference(dtype, device.clone())
        };
        Llama::load(&self.config, &self.weights, &opts)
            .with_context(|| format!("loading model from {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chat_template_is_found_where_transformers_looks_first() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path();
        std::fs::write(
            dir.join("tokenizer.json"),
            r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null, "model": {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"}}"#,
        )?;
        let config = |template: serde_json::Value| {
            let cfg = serde_json::json!({ "chat_template": template });
            std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string())
        };
        let template = || TextCodec::open(dir).map(|c| c.chat_template);
        config("from the config".into())?;
        assert_eq!(template()?.as_deref(), Some("from the config"));
        // Named templates: the default one.
        config(serde_json::json!([
            {"name": "tool_use", "template": "tools"},
            {"name": "default", "template": "plain"}
        ]))?;
        assert_eq!(template()?.as_deref(), Some("plain"));
        // A chat_template.jinja beside it comes first.
        std::fs::write(dir.join("chat_template.jinja"), "from the file")?;
        assert_eq!(template()?.as_deref(), Some("from the file"));
        Ok(())
    }
}
