//! The `[data]` section of a helix config: which files, how they are read, templated,
//! tokenized, split, batched and cached. Unknown keys are errors (a typo must not silently fall
//! back to a default).

use std::path::PathBuf;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::chat_template::AssistantSpans;
use crate::records::Format;
use crate::source::Source;
use crate::tokenize::{LengthPolicy, LossMode};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Training data file (JSON array or JSONL); or several, as `[[data.mix]]`.
    pub train: Option<PathBuf>,
    /// Training files mixed into one training set, each read in its own format and template,
    /// in the shares their weights give (all of every file, once, when no file has a weight).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mix: Vec<MixSource>,
    /// With weighted `[[data.mix]]` files: how many training samples the mixture holds (an
    /// epoch); by default as many as the files hold together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples_per_epoch: Option<usize>,
    /// Separate validation / test files; when absent, split off the training files by fraction.
    pub validation: Option<PathBuf>,
    pub test: Option<PathBuf>,
    /// How rows are read; `[[data.mix]]` files may each name their own.
    pub format: Option<Format>,
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

/// One `[[data.mix]]` file: what is not given is `[data]`'s.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MixSource {
    pub file: PathBuf,
    /// This file's share of the mixture, relative to the other files' weights (NeMo's
    /// `concat_sampling_probabilities`); a file drawn beyond its size is repeated.
    pub weight: Option<f64>,
    pub format: Option<Format>,
    pub template: Option<String>,
    /// Replaces `[data.fields]` whole for this file.
    pub fields: Option<FieldOverrides>,
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
            train: Some(train),
            mix: Vec::new(),
            samples_per_epoch: None,
            validation: None,
            test: None,
            format: Some(format),
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
        let sources = self.train_sources()?;
        self.check_weights()?;
        for source in sources.iter().chain(&self.held_out_sources()?) {
            source.validate(self)?;
        }
        if self.assistant_spans == AssistantSpans::Generation
            && !self.mix.is_empty()
            && !self.uses_chat_template()
        {
            bail!(
                "data.assistant_spans = \"generation\" reads the chat template's \
                 {{% generation %}} blocks, but no file is read with template = \"chat\" \
                 (data.template, data.mix[i].template)"
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
        if self.chat_template.is_some() && !self.uses_chat_template() {
            match self.mix.is_empty() {
                true => bail!(
                    "data.chat_template is set but data.template = {:?} does not use it: set \
                     data.template = \"chat\"",
                    self.template
                ),
                false => bail!(
                    "data.chat_template is set but no file is read with template = \"chat\" \
                     (data.template, data.mix[i].template)"
                ),
            }
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

    /// The files the training samples come from: `data.train`, or each `[[data.mix]]` file.
    pub fn train_sources(&self) -> Result<Vec<Source<'_>>> {
        match (&self.train, self.mix.is_empty()) {
            (Some(_), false) => {
                bail!("data.train and [[data.mix]] are both set: give one training file, or a mix")
            }
            (None, true) => bail!("data.train is missing (or give [[data.mix]] files)"),
            (Some(file), true) => Ok(vec![Source::plain(self, "train", file)?]),
            (None, false) => (0..self.mix.len())
                .map(|i| Source::mixed(self, i))
                .collect(),
        }
    }

    /// `data.validation` and `data.test`, where given, read with `[data]`'s settings.
    pub fn held_out_sources(&self) -> Result<Vec<Source<'_>>> {
        [("validation", &self.validation), ("test", &self.test)]
            .into_iter()
            .filter_map(|(role, file)| Some(Source::plain(self, role, file.as_deref()?)))
            .collect()
    }

    /// Weights on every `[[data.mix]]` file or on none, each positive.
    fn check_weights(&self) -> Result<()> {
        let weighted = self.mix.iter().filter(|m| m.weight.is_some()).count();
        if weighted > 0 && weighted < self.mix.len() {
            let i = self
                .mix
                .iter()
                .position(|m| m.weight.is_none())
                .expect("some");
            bail!(
                "data.mix[{i}].weight is missing: give every [[data.mix]] file a weight (its \
                 share of the mixture), or none (to take every file whole)"
            );
        }
        for (i, m) in self.mix.iter().enumerate() {
            if let Some(w) = m.weight.filter(|w| !(w.is_finite() && *w > 0.0)) {
                bail!("data.mix[{i}].weight must be a positive number, got {w}");
            }
        }
        let sum: f64 = self.mix.iter().filter_map(|m| m.weight).sum();
        if !sum.is_finite() {
            bail!(
                "the data.mix[i].weight add up to {sum}: use smaller numbers (only ratios count)"
            );
        }
        match self.samples_per_epoch {
            Some(_) if weighted == 0 => bail!(
                "data.samples_per_epoch sizes a weighted mixture: give the [[data.mix]] files \
                 weights (without them every file is taken whole)"
            ),
            Some(0) => bail!("data.samples_per_epoch must be at least 1"),
            _ => Ok(()),
        }
    }

    /// Whether a training file is rendered with the chat template: a file of data.mix by its
    /// own template, data.train (and the files that set none) by `[data]`'s.
    pub fn trains_with_chat_template(&self) -> bool {
        let own = self.mix.iter().filter_map(|m| m.template.as_deref());
        let inherited = self.mix.is_empty() || self.mix.iter().any(|m| m.template.is_none());
        own.chain(inherited.then_some(self.template.as_str()))
            .any(|t| t == "chat")
    }

    /// Whether a training or held-out file is rendered with the chat template (held-out files
    /// by `[data]`'s).
    pub fn uses_chat_template(&self) -> bool {
        let held_out = self.validation.is_some() || self.test.is_some();
        self.trains_with_chat_template() || (held_out && self.template == "chat")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chat_template_only_the_held_out_files_use_does_not_train() {
        let mut cfg = DataConfig::new("a.json".into(), Format::Alpaca);
        cfg.template = "chat".into();
        assert!(cfg.trains_with_chat_template() && cfg.uses_chat_template());
        let file = |f: &str, template: &str| MixSource {
            file: f.into(),
            weight: None,
            format: Some(Format::Alpaca),
            template: Some(template.into()),
            fields: None,
        };
        cfg.train = None;
        cfg.mix = vec![file("a.json", "alpaca"), file("b.json", "alpaca")];
        assert!(!cfg.trains_with_chat_template() && !cfg.uses_chat_template());
        cfg.validation = Some("v.json".into());
        assert!(!cfg.trains_with_chat_template() && cfg.uses_chat_template());
        cfg.mix[1].template = None;
        assert!(cfg.trains_with_chat_template());
    }
}
