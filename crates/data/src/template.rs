//! Prompt templates: a [`Record`] becomes a prompt (no loss under answer-only training) and a
//! target (trained on). Tokenization appends EOS to the target ([`Rendered::add_eos`]). A
//! conversation becomes the text before its first assistant turn and the rest, in which the
//! turns between assistant turns are not trained on ([`Rendered::untrained`]).

use std::ops::Range;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use helix_model::TextCodec;

use crate::records::Record;

pub use crate::chat_template::{AssistantSpans, ChatTemplate};

/// Stanford Alpaca's `PROMPT_DICT["prompt_input"]` (train.py), byte for byte.
pub const ALPACA_PROMPT_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:";
/// Stanford Alpaca's `PROMPT_DICT["prompt_no_input"]` (train.py), byte for byte.
pub const ALPACA_PROMPT_NO_INPUT: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:";

/// Databricks dolly `training/consts.py`: `INTRO_BLURB` and the section keys.
pub const DOLLY_INTRO: &str =
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.";
pub const DOLLY_INSTRUCTION_KEY: &str = "### Instruction:";
pub const DOLLY_INPUT_KEY: &str = "Input:";
pub const DOLLY_RESPONSE_KEY: &str = "### Response:";
pub const DOLLY_END_KEY: &str = "### End";

/// A rendered example. `prompt + target` is the training text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    pub prompt: String,
    pub target: String,
    /// Byte ranges of `target` that answer-only loss does not train on: a conversation's turns
    /// after its first assistant turn that are not the assistant's. Empty for an instruction.
    pub untrained: Vec<Range<usize>>,
    /// Append the tokenizer's EOS id after the target. False for chat templates, which end the
    /// assistant turn with their own end-of-turn token.
    pub add_eos: bool,
    /// Let the tokenizer's post-processor add its special tokens (BOS). False for chat
    /// templates, whose text already holds them, as transformers' `apply_chat_template` does.
    pub add_special_tokens: bool,
}

impl Rendered {
    pub fn text(&self) -> String {
        format!("{}{}", self.prompt, self.target)
    }

    /// The same text with only its last trained part as the target: a conversation's turns
    /// before its last assistant turn join the prompt (an instruction is unchanged).
    pub fn last_turn_only(&self) -> Self {
        let mut untrained = self.untrained.as_slice();
        let trailing = untrained
            .last()
            .filter(|u| u.end == self.target.len())
            .cloned();
        if trailing.is_some() {
            untrained = &untrained[..untrained.len() - 1];
        }
        let start = untrained.last().map_or(0, |u| u.end);
        Self {
            prompt: format!("{}{}", self.prompt, &self.target[..start]),
            target: self.target[start..].to_string(),
            untrained: trailing
                .map(|u| u.start - start..u.end - start)
                .into_iter()
                .collect(),
            add_eos: self.add_eos,
            add_special_tokens: self.add_special_tokens,
        }
    }
}

#[derive(Clone)]
pub enum Template {
    /// Stanford Alpaca: with-input variant when `context` is non-empty (as `example.get("input",
    /// "") != ""` decides there); target = response.
    Alpaca,
    /// Databricks Dolly: prompt ends with `### Response:\n` (dolly's `RESPONSE_KEY_NL`, where its
    /// collator starts the loss); target = `{response}\n\n### End`.
    Dolly,
    /// A user string with `{instruction}` and optionally `{input}` / `{context}` (the same
    /// field); `{{` and `}}` are literal braces. Target = response.
    User(UserTemplate),
    /// The model's Jinja chat template: a user turn (instruction, then the context after a
    /// blank line) and an assistant turn with the response.
    Chat(ChatTemplate),
}

impl std::fmt::Debug for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Alpaca => f.write_str("Alpaca"),
            Self::Dolly => f.write_str("Dolly"),
            Self::User(u) => write!(f, "User({:?})", u.source),
            Self::Chat(c) => write!(f, "Chat(system: {:?})", c.system),
        }
    }
}

impl Template {
    /// `alpaca`, `dolly`, `chat` (needs `codec`), or any other string as a user template.
    pub fn from_spec(spec: &str, codec: Option<Arc<TextCodec>>) -> Result<Self> {
        Ok(match spec {
            "alpaca" => Self::Alpaca,
            "dolly" => Self::Dolly,
            "chat" => Self::Chat(ChatTemplate::new(
                codec.context("the chat template needs a model's tokenizer_config.json")?,
                None,
            )?),
            other => Self::User(UserTemplate::parse(other)?),
        })
    }

    pub fn render(&self, rec: &Record) -> Result<Rendered> {
        if !rec.turns.is_empty() {
            return match self {
                Self::Chat(c) => c.render_record(rec),
                _ => bail!(
                    "line {}: a conversation needs the model's chat template (template = \"chat\"), not {self:?}",
                    rec.line
                ),
            };
        }
        let plain = |prompt: String, target: String| Rendered {
            prompt,
            target,
            untrained: Vec::new(),
            add_eos: true,
            add_special_tokens: true,
        };
        Ok(match self {
            Self::Alpaca => {
                let prompt = if rec.context.is_empty() {
                    ALPACA_PROMPT_NO_INPUT.replacen("{instruction}", &rec.instruction, 1)
                } else {
                    // Substitute in one left-to-right pass: an instruction containing "{input}"
                    // must stay literal, as Python's format_map leaves it.
                    let (head, tail) = ALPACA_PROMPT_INPUT.split_once("{input}").unwrap();
                    let head = head.replacen("{instruction}", &rec.instruction, 1);
                    format!("{head}{}{tail}", rec.context)
                };
                plain(prompt, rec.response.clone())
            }
            Self::Dolly => {
                let mut p = format!(
                    "{DOLLY_INTRO}\n\n{DOLLY_INSTRUCTION_KEY}\n{}\n\n",
                    rec.instruction
                );
                if !rec.context.is_empty() {
                    p.push_str(&format!("{DOLLY_INPUT_KEY}\n{}\n\n", rec.context));
                }
                p.push_str(DOLLY_RESPONSE_KEY);
                p.push('\n');
                plain(p, format!("{}\n\n{DOLLY_END_KEY}", rec.response))
            }
            Self::User(u) => plain(u.render(rec), rec.response.clone()),
            Self::Chat(c) => c.render_record(rec)?,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Text(String),
    Instruction,
    Context,
}

/// A parsed user template string.
#[derive(Clone, Debug)]
pub struct UserTemplate {
    source: String,
    pieces: Vec<Piece>,
}

impl UserTemplate {
    pub fn parse(source: &str) -> Result<Self> {
        let mut pieces = Vec::new();
        let mut text = String::new();
        let mut chars = source.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|p| p.1) == Some('{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek().map(|p| p.1) == Some('}') => {
                    chars.next();
                    text.push('}');
                }
                '{' => {
                    let rest = &source[i + 1..];
                    let end = rest
                        .find('}')
                        .with_context(|| format!("template: unclosed '{{' at byte {i}"))?;
                    let piece = match &rest[..end] {
                        "instruction" => Piece::Instruction,
                        "input" | "context" => Piece::Context,
                        other => bail!(
                            "template: unknown placeholder {{{other}}} (known: {{instruction}}, {{input}}, {{context}}; write {{{{ for a literal brace)"
                        ),
                    };
                    pieces.push(Piece::Text(std::mem::take(&mut text)));
                    pieces.push(piece);
                    for _ in 0..=end {
                        chars.next();
                    }
                }
                '}' => bail!("template: single '}}' at byte {i} (write }}}} for a literal brace)"),
                c => text.push(c),
            }
        }
        pieces.push(Piece::Text(text));
        pieces.retain(|p| *p != Piece::Text(String::new()));
        if !pieces.contains(&Piece::Instruction) {
            bail!("template: no {{instruction}} placeholder in {source:?}");
        }
        Ok(Self {
            source: source.to_string(),
            pieces,
        })
    }

    fn render(&self, rec: &Record) -> String {
        let mut out = String::new();
        for p in &self.pieces {
            out.push_str(match p {
                Piece::Text(t) => t,
                Piece::Instruction => &rec.instruction,
                Piece::Context => &rec.context,
            });
        }
        out
    }
}

#[cfg(test)]
#[path = "template_tests.rs"]
pub(crate) mod tests;
