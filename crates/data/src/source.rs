//! One data file as it is read: its format, field names and template, resolved from `[data]`
//! and, for a `[[data.mix]]` file, its own keys. Every message names the key that set the
//! value it is about (`data.format`, or `data.mix[1].format` where that file sets its own).

use std::path::Path;

use anyhow::{bail, Result};

use crate::chat_template::AssistantSpans;
use crate::config::{DataConfig, FieldOverrides};
use crate::records::{FieldKeys, FieldMap, Format, ReadOptions};

#[derive(Clone, Debug)]
pub struct Source<'a> {
    /// How reports and checkpoints name it: `train`, `mix[1]`, `validation` or `test`.
    pub role: String,
    pub file: &'a Path,
    pub format: Format,
    pub template: &'a str,
    pub fields: &'a FieldOverrides,
    /// Its share of a weighted mixture.
    pub weight: Option<f64>,
    /// For a `[[data.mix]]` file: its index, and which of format, template and fields it
    /// sets itself.
    mix: Option<MixKeys>,
}

#[derive(Clone, Copy, Debug)]
struct MixKeys {
    index: usize,
    format: bool,
    template: bool,
    fields: bool,
}

impl<'a> Source<'a> {
    /// `data.train`, `data.validation` or `data.test`, read with `[data]`'s settings.
    pub(crate) fn plain(cfg: &'a DataConfig, role: &str, file: &'a Path) -> Result<Self> {
        let Some(format) = cfg.format else {
            bail!(
                "data.format is missing: say how data.{role} is read (\"alpaca\", \"dolly\", \
                 \"messages\", …)"
            );
        };
        Ok(Self {
            role: role.to_string(),
            file,
            format,
            template: &cfg.template,
            fields: &cfg.fields,
            weight: None,
            mix: None,
        })
    }

    /// `[[data.mix]]` file `index`, with what it does not set taken from `[data]`.
    pub(crate) fn mixed(cfg: &'a DataConfig, index: usize) -> Result<Self> {
        let m = &cfg.mix[index];
        let Some(format) = m.format.or(cfg.format) else {
            bail!(
                "data.mix[{index}].format is missing: set it, or data.format for the files \
                 that do not set their own"
            );
        };
        Ok(Self {
            role: format!("mix[{index}]"),
            file: &m.file,
            format,
            template: m.template.as_deref().unwrap_or(&cfg.template),
            fields: m.fields.as_ref().unwrap_or(&cfg.fields),
            weight: m.weight,
            mix: Some(MixKeys {
                index,
                format: m.format.is_some(),
                template: m.template.is_some(),
                fields: m.fields.is_some(),
            }),
        })
    }

    /// The key that names the file: `data.train`, `data.mix[1].file`, `data.validation`.
    pub fn file_key(&self) -> String {
        match self.mix {
            Some(m) => format!("data.mix[{}].file", m.index),
            None => format!("data.{}", self.role),
        }
    }

    /// The key of a value this source reads: its own where it sets one, else `[data]`'s.
    fn key(&self, name: &str, own: fn(&MixKeys) -> bool) -> String {
        match self.mix.filter(own) {
            Some(m) => format!("data.mix[{}].{name}", m.index),
            None => format!("data.{name}"),
        }
    }

    fn format_key(&self) -> String {
        self.key("format", |m| m.format)
    }

    pub(crate) fn template_key(&self) -> String {
        self.key("template", |m| m.template)
    }

    /// How to name a conversation's array of turns, for a file whose fields set the wrong
    /// kind: in its own fields table where `[data.fields]` is inherited (a table of its own
    /// replaces it whole).
    fn own_fields_advice(&self, field: &str) -> String {
        match self.inherits_fields() {
            Some(i) => format!(
                "give data.mix[{i}] its own fields table (data.mix[{i}].fields.{field}), which \
                 replaces [data.fields]"
            ),
            None => format!("name their array of turns with {}", self.field_key(field)),
        }
    }

    /// A mix file's index when it reads `[data.fields]`, having no fields table of its own.
    fn inherits_fields(&self) -> Option<usize> {
        self.mix.filter(|m| !m.fields).map(|m| m.index)
    }

    fn field_key(&self, field: &str) -> String {
        match self.mix.filter(|m| m.fields) {
            Some(m) => format!("data.mix[{}].fields.{field}", m.index),
            None => format!("[data.fields] {field}"),
        }
    }

    /// Checks that this file's format, fields and template can work together.
    pub(crate) fn validate(&self, cfg: &DataConfig) -> Result<()> {
        let format = serde_json::to_value(self.format)?;
        let (format_key, template_key) = (self.format_key(), self.template_key());
        let o = self.fields;
        if self.format.is_conversation() {
            if self.template != "chat" {
                bail!(
                    "{template_key} = {:?} cannot render the conversations of {format_key} = \
                     {format}: set {template_key} = \"chat\" (the model's chat template)",
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
                    "{} does not apply to {format_key} = {format}, whose rows are \
                     conversations ({})",
                    self.field_key(key),
                    self.own_fields_advice("messages")
                );
            }
        } else if let Some(key) = [("messages", &o.messages), ("tools", &o.tools)]
            .iter()
            .find_map(|(key, v)| v.is_some().then_some(key))
        {
            let advice = match self.inherits_fields() {
                Some(i) => {
                    format!("give data.mix[{i}] its own fields table, which replaces [data.fields]")
                }
                None => format!("use {format_key} = \"messages\" or \"sharegpt\""),
            };
            bail!(
                "{} names a conversation's field; {format_key} = {format} reads instructions \
                 ({advice})",
                self.field_key(key)
            );
        }
        // In a mix, only the files rendered with the chat template have spans to find.
        if cfg.assistant_spans != AssistantSpans::Turns
            && self.template != "chat"
            && cfg.mix.is_empty()
        {
            bail!(
                "data.assistant_spans = \"generation\" reads the chat template's \
                 {{% generation %}} blocks, but {template_key} = {:?}: set {template_key} = \
                 \"chat\"",
                self.template
            );
        }
        Ok(())
    }

    /// The field names rows are read with: the format's, with this source's overrides.
    pub fn read_options(&self, skip_invalid: bool) -> ReadOptions {
        let mut fields = FieldMap::for_format(self.format);
        let o = self.fields;
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
        fields.keys = FieldKeys {
            format: self.format_key(),
            // A mix file's rows are named in its own table (which replaces [data.fields]).
            fields: match self.mix {
                Some(m) => format!("data.mix[{}].fields", m.index),
                None => "[data.fields]".into(),
            },
        };
        ReadOptions {
            fields,
            skip_invalid,
        }
    }
}
