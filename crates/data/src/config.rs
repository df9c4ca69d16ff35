//! The `[data]` section of a helix config: which files, how they are read, templated,
//! tokenized, split, batched and cached. Unknown keys are errors (a typo must not silently fall
//! back to a default).

use std::path::PathBuf;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::chat_template::AssistantSpans;
use crate::records::{FieldMap, Format, ReadOptions};
use crate::tokenize::{LengthPolicy, LossMode};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Training data file (JSON array or JSONL).
    pub train: PathBuf,
    /// Separate validation / test files; when absent, split off `train` by fraction.
    pub validation: Option<PathBuf>,
    pub test: Option<PathBuf>,
    pub format: Format,
    /// Field-name overrides for the format's defaults.
    #[serde(default)]
    pub fields: FieldOverrides,
    /// `alpaca`, `dolly`, `chat` (the model's own template) or a string with `{instruction}`
    /// and `{input}`/`{context}`. Conversations (`messages`, `sharegpt`) need `chat`.
    #[serde(default = "default_template")]
    pub template: String,
    /// A Jinja file to use as the chat template in place of the tokenizer's (a base model
    /// without one, or data written for another); `template = "chat"` renders with it.
    pub chat_template: Option<PathBuf>,
    /// How the chat template's assistant text is found: `turns` (what rendering each
    /// assistant turn adds) or `generation` (its `{% generation %}` blocks).
    #[serde(default)]
    pub assistant_spans: AssistantSpans,
    /// Directory with tokenizer.json; defaults to the model directory.
    pub tokenizer: Option<PathBuf>,
    #[serde(default = "default_max_seq_length")]
    pub max_seq_length: usize,
    #[serde(default = "default_length_policy")]
    pub length_policy: LengthPolicy,
    #[serde(default = "default_loss")]
    pub loss: LossMode,
    /// Pack samples into rows of `max_seq_length` (first-fit-decreasing).
    #[serde(default)]
    pub packing: bool,
    /// Round dynamically padded lengths up to a multiple of this.
    #[serde(default = "one")]
    pub pad_to_multiple_of: usize,
    #[serde(default)]
    pub validation_fraction: f64,
    #[serde(default)]
    pub test_fraction: f64,
    /// Seeds the split and the per-epoch shuffle.
    #[serde(default = "default_seed")]
    pub seed: u64,
    #[serde(default = "yes")]
    pub shuffle: bool,
    #[serde(default)]
    pub skip_invalid: bool,
    /// Cache tokenized data on disk; the key covers file contents, tokenizer, template,
    /// fields and length settings.
    #[serde(default = "yes")]
    pub cache: bool,
    /// Defaults to `$HELIX_CACHE_DIR/data`, else `~/.cache/helix/data`.
    pub cache_dir: Option<PathBuf>,
    /// Tokenizer threads (0 = one per core).
    #[serde(default)]
    pub threads: usize,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FieldOverrides {
    pub instruction: Option<String>,
    pub context: Option<String>,
    pub response: Option<String>,
    pub category: Option<String>,
    /// A conversation's array of turns (`messages` and `sharegpt` formats).
    pub messages: Option<String>,
    /// A conversation's list of tool schemas (default `tools`).
    pub tools: Option<String>,
}

fn default_template() -> String {
    "alpaca".into()
}
fn default_max_seq_length() -> usize {
    2048
}
fn default_length_policy() -> LengthPolicy {
    LengthPolicy::TruncateResponse
}
fn default_loss() -> LossMode {
    LossMode::AnswerOnly
}
fn default_seed() -> u64 {
    1234
}
fn one() -> usize {
    1
}
fn yes() -> bool {
    true
}

impl DataConfig {
    /// A config with every default, for `train` in `format`.
    pub fn new(train: PathBuf, format: Format) -> Self {
        Self {
            train,
            validation: None,
            test: None,
            format,
            fields: FieldOverrides::default(),
            template: default_template(),
            chat_template: None,
            assistant_spans: AssistantSpans::Turns,
            tokenizer: None,
            max_seq_length: default_max_seq_length(),
            length_policy: default_length_policy(),
            loss: default_loss(),
            packing: false,
            pad_to_multiple_of: 1,
            validation_fraction: 0.0,
            test_fraction: 0.0,
            seed: default_seed(),
            shuffle: true,
            skip_invalid: false,
            cache: true,
            cache_dir: None,
            threads: 0,
        }
    }

    pub fn read_options(&self) -> ReadOptions {
        let mut fields = FieldMap::for_format(self.format);
        let o = &self.fields;
        // Naming the prompt or answer field takes the mapping in hand: rows are read as named.
        if o.instruction.is_some() || o.response.is_some() {
            fields.refused.clear();
        }
        if let Some(f) = &o.instruction {
            fields.instruction = f.clone();
        }
        if let Some(f) = &o.response {
            fields.response = f.clone();
        }
        if o.context.is_some() {
            fields.context = o.context.clone();
            fields.refused.retain(|f| Some(f) != o.context.as_ref());
        }
        if o.category.is_some() {
            fields.category = o.category.clone();
        }
        if let Some(turns) = &mut fields.turns {
            if let Some(list) = &o.messages {
                turns.list = list.clone();
            }
            if let Some(tools) = &o.tools {
                turns.tools = tools.clone();
            }
        }
        ReadOptions {
            fields,
            skip_invalid: self.skip_invalid,
        }
    }

    /// Checks the values serde cannot, naming the key.
    pub fn validate(&self) -> Result<()> {
        if self.max_seq_length < 2 {
            bail!(
                "data.max_seq_length must be at least 2, got {}",
                self.max_seq_length
            );
        }
        if self.pad_to_multiple_of == 0 {
            bail!("data.pad_to_multiple_of must be at least 1");
        }
        let format = serde_json::to_value(self.format)?;
        let o = &self.fields;
        if self.format.is_conversation() {
            if self.template != "chat" {
                bail!(
                    "data.template = {:?} cannot render the conversations of data.format = \
                     {format}: set data.template = \"chat\" (the model's chat template)",
                    self.template
                );
            }
            let instruction_keys = [
                ("instruction", &o.instruction),
                ("context", &o.context),
                ("response", &o.response),
                ("category", &o.category),
            ];
            if let Some((key, _)) = instruction_keys.iter().find(|(_, v)| v.is_some()) {
                bail!(
                    "[data.fields] {key} does not apply to data.format = {format}, whose rows \
                     are conversations (name their array of turns with [data.fields] messages)"
                );
            }
        } else if let Some(key) = [("messages", &o.messages), ("tools", &o.tools)]
            .iter()
            .find_map(|(key, v)| v.is_some().then_some(key))
        {
            bail!(
                "[data.fields] {key} names a conversation's field; data.format = {format} \
                 reads instructions (use data.format = \"messages\" or \"sharegpt\")"
            );
        }
        if self.assistant_spans != AssistantSpans::Turns && self.template != "chat" {
            bail!(
                "data.assistant_spans = \"generation\" reads the chat template's \
                 {{% generation %}} blocks, but data.template = {:?}: set data.template = \"chat\"",
                self.template
            );
        }
        if self.assistant_spans == AssistantSpans::Generation
            && self.loss == LossMode::LastAssistantTurn
        {
            bail!(
                "data.loss = \"last_assistant_turn\" needs data.assistant_spans = \"turns\": \
                 {{% generation %}} blocks do not say which turn each belongs to"
            );
        }
        if self.chat_template.is_some() && self.template != "chat" {
            bail!(
                "data.chat_template is set but data.template = {:?} does not use it: set \
                 data.template = \"chat\"",
                self.template
            );
        }
        for (key, f) in [
            ("data.validation_fraction", self.validation_fraction),
            ("data.test_fraction", self.test_fraction),
        ] {
            if !(0.0..1.0).contains(&f) {
                bail!("{key} must be in [0, 1), got {f}");
            }
        }
        if self.validation.is_some() && self.validation_fraction > 0.0 {
            bail!("data.validation and data.validation_fraction are both set; use one");
        }
        if self.test.is_some() && self.test_fraction > 0.0 {
            bail!("data.test and data.test_fraction are both set; use one");
        }
        Ok(())
    }

    pub fn cache_dir(&self) -> PathBuf {
        if let Some(d) = &self.cache_dir {
            return d.clone();
        }
        if let Some(d) = std::env::var_os("HELIX_CACHE_DIR") {
            return PathBuf::from(d).join("data");
        }
        let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
        home.join(".cache/helix/data")
    }
}
