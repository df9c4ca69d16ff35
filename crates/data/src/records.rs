//! Instruction records from Dolly JSONL, Alpaca (JSON array or JSONL) and NeMo-style JSONL,
//! and multi-turn conversations (OpenAI-style `messages`, ShareGPT `conversations`).
//!
//! Every bad record is an error naming file, line and field, or — with `skip_invalid` — is
//! skipped and counted in [`SkipCounts`]; nothing is dropped without being counted.

use std::fmt;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::conversation::{conversation_record, Message, TurnFields};
use helix_model::OrderedJson;

/// The on-disk formats; each has default field names ([`FieldMap::for_format`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// `instruction`, `context`, `response`, `category` (databricks-dolly-15k).
    Dolly,
    /// `instruction`, `input`, `output` (Stanford Alpaca).
    Alpaca,
    /// `input` (the whole prompt), `output` (NeMo SFT JSONL).
    Nemo,
    /// `messages`: `[{"role": …, "content": …}, …]` (OpenAI's chat format; TRL's and
    /// torchtune's conversational datasets).
    Messages,
    /// `conversations`: `[{"from": "human" | "gpt" | "system", "value": …}, …]` (ShareGPT).
    Sharegpt,
}

impl Format {
    /// Whether rows are conversations (trained on every assistant turn), not instructions.
    pub fn is_conversation(self) -> bool {
        matches!(self, Self::Messages | Self::Sharegpt)
    }
}

impl std::str::FromStr for Format {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "dolly" => Ok(Self::Dolly),
            "alpaca" => Ok(Self::Alpaca),
            "nemo" => Ok(Self::Nemo),
            "messages" => Ok(Self::Messages),
            "sharegpt" => Ok(Self::Sharegpt),
            _ => bail!(
                "unknown data format '{s}' (expected dolly, alpaca, nemo, messages or sharegpt)"
            ),
        }
    }
}

/// Which JSON field feeds each part of a [`Record`]. `instruction` and `response` are required;
/// `context` and `category` may be absent (or null) in a row, as Alpaca's `input` often is.
/// Empty strings are valid, as in the reference code (one real Alpaca row has an empty output;
/// its target is EOS alone).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldMap {
    pub instruction: String,
    pub context: Option<String>,
    pub response: String,
    pub category: Option<String>,
    /// Fields a row must not have: the prompt and answer fields of the other formats that this
    /// map does not read (Alpaca rows read as `nemo` would lose their `instruction`). Empty
    /// once the prompt or answer field is named by hand.
    #[serde(default)]
    pub refused: Vec<String>,
    /// For conversation formats: where a row keeps its turns (the fields above are unused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turns: Option<TurnFields>,
    /// The config keys that chose this map, for messages (not part of the tokens' cache key).
    #[serde(skip)]
    pub keys: FieldKeys,
}

/// Where a file's format and field names were set: `data.format` and `[data.fields]`, or a
/// `[[data.mix]]` file's own `data.mix[1].format` and `data.mix[1].fields`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldKeys {
    pub format: String,
    pub fields: String,
}

impl Default for FieldKeys {
    fn default() -> Self {
        Self {
            format: "data.format".into(),
            fields: "[data.fields]".into(),
        }
    }
}

/// Every format's prompt and answer fields.
const FORMAT_FIELDS: [&str; 5] = ["instruction", "input", "context", "response", "output"];

impl FieldMap {
    pub fn for_format(format: Format) -> Self {
        let (instruction, context, response, category) = match format {
            Format::Dolly => ("instruction", Some("context"), "response", Some("category")),
            Format::Alpaca => ("instruction", Some("input"), "output", None),
            Format::Nemo => ("input", None, "output", None),
            Format::Messages | Format::Sharegpt => {
                let sharegpt = format == Format::Sharegpt;
                let [list, speaker, text] = match sharegpt {
                    true => ["conversations", "from", "value"],
                    false => ["messages", "role", "content"],
                };
                return Self {
                    instruction: String::new(),
                    context: None,
                    response: String::new(),
                    category: None,
                    refused: Vec::new(),
                    turns: Some(TurnFields {
                        list: list.into(),
                        speaker: speaker.into(),
                        text: text.into(),
                        sharegpt_names: sharegpt,
                        tools: crate::conversation::default_tools(),
                    }),
                    keys: FieldKeys::default(),
                };
            }
        };
        let read = [Some(instruction), context, Some(response)];
        Self {
            instruction: instruction.into(),
            context: context.map(Into::into),
            response: response.into(),
            category: category.map(Into::into),
            refused: FORMAT_FIELDS
                .iter()
                .filter(|f| !read.contains(&Some(**f)))
                .map(|f| f.to_string())
                .collect(),
            turns: None,
            keys: FieldKeys::default(),
        }
    }
}

/// One example: an instruction (`context` empty when the row has none), or a conversation
/// (`turns`; the three instruction fields are then empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub instruction: String,
    pub context: String,
    pub response: String,
    pub category: Option<String>,
    /// A conversation's turns in order, at least one of them the assistant's; empty for an
    /// instruction.
    pub turns: Vec<Message>,
    /// A conversation's tool schemas (`tools`: a JSON array of objects), when it has them.
    pub tools: Option<OrderedJson>,
    /// 1-based line of the row in its file (for error messages downstream).
    pub line: usize,
}

#[derive(Clone, Debug)]
pub struct ReadOptions {
    pub fields: FieldMap,
    pub skip_invalid: bool,
}

impl ReadOptions {
    pub fn new(format: Format) -> Self {
        Self {
            fields: FieldMap::for_format(format),
            skip_invalid: false,
        }
    }
}

/// Why a row was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvalidKind {
    MalformedJson,
    NotAnObject,
    MissingField,
    WrongType,
    InvalidUtf8,
    /// A field of another format's prompt ([`FieldMap::refused`]).
    UnreadField,
    /// A conversation with a turn of unknown role, or without an assistant turn.
    BadConversation,
}

/// Rows skipped under `skip_invalid`, by reason.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkipCounts {
    pub malformed_json: usize,
    pub not_an_object: usize,
    pub missing_field: usize,
    pub wrong_type: usize,
    pub invalid_utf8: usize,
    #[serde(default)]
    pub unread_field: usize,
    #[serde(default)]
    pub bad_conversation: usize,
}

impl SkipCounts {
    pub fn total(&self) -> usize {
        self.malformed_json
            + self.not_an_object
            + self.missing_field
            + self.wrong_type
            + self.invalid_utf8
            + self.unread_field
            + self.bad_conversation
    }

    fn add(&mut self, kind: InvalidKind) {
        *match kind {
            InvalidKind::MalformedJson => &mut self.malformed_json,
            InvalidKind::NotAnObject => &mut self.not_an_object,
            InvalidKind::MissingField => &mut self.missing_field,
            InvalidKind::WrongType => &mut self.wrong_type,
            InvalidKind::InvalidUtf8 => &mut self.invalid_utf8,
            InvalidKind::UnreadField => &mut self.unread_field,
            InvalidKind::BadConversation => &mut self.bad_conversation,
        } += 1;
    }
}

/// A rejected row; displays as `file:line: field "x": what is wrong`.
#[derive(Clone, Debug)]
pub struct InvalidRow {
    pub file: String,
    pub line: usize,
    pub field: Option<String>,
    pub kind: InvalidKind,
    pub detail: String,
}

impl fmt::Display for InvalidRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.file, self.line)?;
        if let Some(field) = &self.field {
            write!(f, "field \"{field}\": ")?;
        }
        f.write_str(&self.detail)
    }
}

impl std::error::Error for InvalidRow {}

#[derive(Clone, Debug)]
pub struct ReadReport {
    pub records: Vec<Record>,
    pub skipped: SkipCounts,
    /// The message of every skipped row, in file order, for the end-of-run report.
    pub skipped_rows: Vec<String>,
}

/// Reads every record of `path`. The format of the container (JSON array or JSONL) is detected
/// from the first non-blank byte; the field names come from `opts.fields`.
pub fn read_records(path: &Path, opts: &ReadOptions) -> Result<ReadReport> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    read_records_from_bytes(&path.display().to_string(), &bytes, opts)
}

/// [`read_records`] on bytes already in memory; `file` names them in messages.
pub fn read_records_from_bytes(file: &str, bytes: &[u8], opts: &ReadOptions) -> Result<ReadReport> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let Some(first) = bytes.iter().position(|b| !b.is_ascii_whitespace()) else {
        bail!("{file}: file is empty (no records)");
    };
    let mut report = ReadReport {
        records: Vec::new(),
        skipped: SkipCounts::default(),
        skipped_rows: Vec::new(),
    };
    let mut accept = |row: std::result::Result<Record, InvalidRow>| -> Result<()> {
        match row {
            Ok(rec) => report.records.push(rec),
            Err(bad) if opts.skip_invalid => {
                report.skipped.add(bad.kind);
                report.skipped_rows.push(bad.to_string());
            }
            Err(bad) => return Err(bad.into()),
        }
        Ok(())
    };
    if bytes[first] == b'[' {
        for row in array_rows(file, bytes, &opts.fields)? {
            accept(row)?;
        }
    } else {
        for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            if raw.iter().all(u8::is_ascii_whitespace) {
                continue; // blank lines separate nothing; they are not rows
            }
            accept(jsonl_row(file, i + 1, raw, &opts.fields))?;
        }
    }
    if report.records.is_empty() {
        bail!(
            "{file}: no valid records ({} rows skipped as invalid)",
            report.skipped.total()
        );
    }
    Ok(report)
}

pub(crate) fn invalid(
    file: &str,
    line: usize,
    field: Option<&str>,
    kind: InvalidKind,
    detail: String,
) -> InvalidRow {
    InvalidRow {
        file: file.to_string(),
        line,
        field: field.map(str::to_string),
        kind,
        detail,
    }
}

/// serde_json's message without its " at line L column C" suffix, which we replace with ours.
fn json_message(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

fn jsonl_row(file: &str, line: usize, raw: &[u8], fields: &FieldMap) -> Result<Record, InvalidRow> {
    let text = std::str::from_utf8(raw).map_err(|e| {
        let detail = format!("invalid UTF-8 at byte {} of the line", e.valid_up_to() + 1);
        invalid(file, line, None, InvalidKind::InvalidUtf8, detail)
    })?;
    row_from_text(file, line, text, fields, |e| {
        format!(
            "malformed JSON at column {}: {}",
            e.column(),
            json_message(e)
        )
    })
}

/// A row's JSON text read as `fields` asks; a conversation's objects keep their key order.
fn row_from_text(
    file: &str,
    line: usize,
    text: &str,
    fields: &FieldMap,
    describe: impl Fn(&serde_json::Error) -> String,
) -> Result<Record, InvalidRow> {
    let malformed =
        |e: serde_json::Error| invalid(file, line, None, InvalidKind::MalformedJson, describe(&e));
    match &fields.turns {
        Some(turns) => {
            let row: OrderedJson = serde_json::from_str(text).map_err(malformed)?;
            conversation_record(file, line, &row, turns)
        }
        None => {
            let value: Value = serde_json::from_str(text).map_err(malformed)?;
            extract(file, line, &value, fields)
        }
    }
}

/// Rows of a JSON array. Invalid UTF-8 or broken JSON syntax makes the whole array unreadable,
/// so those are errors even under `skip_invalid`; bad rows inside a valid array are skippable.
fn array_rows(
    file: &str,
    bytes: &[u8],
    fields: &FieldMap,
) -> Result<Vec<std::result::Result<Record, InvalidRow>>> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let at = e.valid_up_to();
        let line = 1 + bytes[..at].iter().filter(|&&b| b == b'\n').count();
        let col = at
            - bytes[..at]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |p| p + 1)
            + 1;
        let detail = format!(
            "invalid UTF-8 at byte {col} of the line (a JSON array cannot be read past it)"
        );
        invalid(file, line, None, InvalidKind::InvalidUtf8, detail)
    })?;
    let items: Vec<&RawValue> = serde_json::from_str(text).map_err(|e| {
        let detail = format!(
            "malformed JSON at column {}: {} (a JSON array cannot be read past it)",
            e.column(),
            json_message(&e)
        );
        invalid(file, e.line(), None, InvalidKind::MalformedJson, detail)
    })?;
    // Lines of each element from its offset in `text` (RawValue borrows from it).
    let base = text.as_ptr() as usize;
    let mut line = 1;
    let mut scanned = 0;
    let mut rows = Vec::with_capacity(items.len());
    for item in items {
        let start = item.get().as_ptr() as usize - base;
        line += text.as_bytes()[scanned..start]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        scanned = start;
        rows.push(row_from_text(file, line, item.get(), fields, json_message));
    }
    Ok(rows)
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn extract(
    file: &str,
    line: usize,
    value: &Value,
    fields: &FieldMap,
) -> Result<Record, InvalidRow> {
    let Some(obj) = value.as_object() else {
        let detail = format!("expected a JSON object, found {}", type_name(value));
        return Err(invalid(file, line, None, InvalidKind::NotAnObject, detail));
    };
    let wrong_type = |name: &str, v: &Value| {
        let detail = format!("expected a string, found {}", type_name(v));
        invalid(file, line, Some(name), InvalidKind::WrongType, detail)
    };
    let required = |name: &str| -> Result<String, InvalidRow> {
        match obj.get(name) {
            None => Err(invalid(
                file,
                line,
                Some(name),
                InvalidKind::MissingField,
                "missing".into(),
            )),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(wrong_type(name, v)),
        }
    };
    let optional = |name: &Option<String>| -> Result<Option<String>, InvalidRow> {
        let Some(name) = name else { return Ok(None) };
        match obj.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(wrong_type(name, v)),
        }
    };
    if let Some(f) = fields.refused.iter().find(|f| obj.contains_key(f.as_str())) {
        let detail = format!(
            "this format does not read it (its prompt is \"{}\"{}): is {} right? To read these \
             rows as they are, name their fields ({})",
            fields.instruction,
            fields
                .context
                .as_ref()
                .map_or(String::new(), |c| format!(" and \"{c}\"")),
            fields.keys.format,
            fields.keys.fields
        );
        return Err(invalid(
            file,
            line,
            Some(f),
            InvalidKind::UnreadField,
            detail,
        ));
    }
    Ok(Record {
        instruction: required(&fields.instruction)?,
        context: optional(&fields.context)?.unwrap_or_default(),
        response: required(&fields.response)?,
        category: optional(&fields.category)?,
        turns: Vec::new(),
        tools: None,
        line,
    })
}

#[cfg(test)]
#[path = "records_tests.rs"]
mod tests;
