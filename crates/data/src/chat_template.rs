//! The model's Jinja chat template over instructions and conversations: where the assistant's
//! text is, by rendering each assistant turn after the turns before it, or by the template's
//! `{% generation %}` blocks ([`AssistantSpans`]).

use std::ops::Range;
use std::sync::Arc;

use anyhow::{bail, Result};
use helix_model::{OrderedJson, TextCodec};
use serde::{Deserialize, Serialize};

use crate::records::Record;
use crate::template::Rendered;

/// The model's chat template (e.g. SmolLM2's ChatML).
#[derive(Clone)]
pub struct ChatTemplate {
    codec: Arc<TextCodec>,
    pub(crate) system: Option<String>,
    spans: AssistantSpans,
}

/// How a chat template's assistant text is told from the rest (`data.assistant_spans`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AssistantSpans {
    /// What rendering each assistant turn adds to the generation prompt before it (the
    /// turn's text and all the template writes after it up to the next turn), as torchtune
    /// masks a conversation turn by turn.
    #[default]
    Turns,
    /// The text the template's `{% generation %}` blocks write, as transformers'
    /// `return_assistant_tokens_mask` and TRL's `assistant_only_loss` take it.
    Generation,
}

impl std::str::FromStr for AssistantSpans {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "turns" => Ok(Self::Turns),
            "generation" => Ok(Self::Generation),
            _ => bail!("unknown assistant spans '{s}' (expected turns or generation)"),
        }
    }
}

impl ChatTemplate {
    pub fn new(codec: Arc<TextCodec>, system: Option<String>) -> Result<Self> {
        if codec.chat_template.is_none() {
            bail!("the model has no chat template (tokenizer_config.json has no 'chat_template')");
        }
        Ok(Self {
            codec,
            system,
            spans: AssistantSpans::Turns,
        })
    }

    /// The same template, its assistant text found as `spans` says; `Generation` needs a
    /// template with `{% generation %}` blocks.
    pub fn with_spans(self, spans: AssistantSpans) -> Result<Self> {
        let template = self.codec.chat_template.as_deref().unwrap_or("");
        if spans == AssistantSpans::Generation
            && !helix_model::chat::has_generation_blocks(template)
        {
            bail!(
                "the chat template has no {{% generation %}} blocks to find the assistant's \
                 text by: use assistant_spans = \"turns\", or a template that marks it"
            );
        }
        Ok(Self { spans, ..self })
    }

    /// Renders an instruction (as a user turn and an assistant turn) or a conversation.
    pub(crate) fn render_record(&self, rec: &Record) -> Result<Rendered> {
        match (self.spans, rec.turns.is_empty()) {
            (AssistantSpans::Generation, _) => self.render_generation(rec),
            (AssistantSpans::Turns, true) => self.render(rec),
            (AssistantSpans::Turns, false) => self.render_turns(rec),
        }
    }

    /// The user turn of an instruction: its text, then the context after a blank line.
    fn user_text(rec: &Record) -> String {
        match rec.context.is_empty() {
            true => rec.instruction.clone(),
            false => format!("{}\n\n{}", rec.instruction, rec.context),
        }
    }

    /// The turns the template renders for `rec`: the configured system turn unless the
    /// conversation opens with its own, then the conversation's turns (an instruction's: a
    /// user turn and an assistant turn); and how many turns come before the record's own.
    fn messages(&self, rec: &Record) -> (Vec<OrderedJson>, usize) {
        let mut turns = Vec::with_capacity(rec.turns.len() + 2);
        if let Some(s) = &self.system {
            if rec.turns.first().is_none_or(|t| t.role != "system") {
                turns.push(OrderedJson::message("system", s));
            }
        }
        let leading = turns.len();
        if rec.turns.is_empty() {
            turns.push(OrderedJson::message("user", &Self::user_text(rec)));
            turns.push(OrderedJson::message("assistant", &rec.response));
        }
        turns.extend(rec.turns.iter().map(|m| m.json.clone()));
        (turns, leading)
    }

    /// The whole record rendered once; what its `{% generation %}` blocks write is trained.
    fn render_generation(&self, rec: &Record) -> Result<Rendered> {
        let (turns, _) = self.messages(rec);
        let (text, trained) =
            self.codec
                .render_chat_with_generation_spans(&turns, rec.tools.as_ref(), false)?;
        if trained.is_empty() {
            bail!(
                "line {}: the chat template's {{% generation %}} blocks write no text: nothing \
                 to train on",
                rec.line
            );
        }
        Ok(rendered_from_trained(text, &trained))
    }

    /// The prompt is the conversation up to the generation prompt; the target is what the full
    /// conversation adds after it (the response and the template's end-of-turn).
    fn render(&self, rec: &Record) -> Result<Rendered> {
        // The system turn if configured, the user turn, the assistant turn.
        let (turns, _) = self.messages(rec);
        let prompt = self
            .codec
            .render_chat(&turns[..turns.len() - 1], None, true)?;
        let full = self.codec.render_chat(&turns, None, false)?;
        let Some(target) = full.strip_prefix(&prompt) else {
            bail!(
                "line {}: the chat template renders the assistant turn differently from its generation prompt, so the response cannot be separated from the prompt",
                rec.line
            );
        };
        Ok(Rendered {
            target: target.to_string(),
            prompt,
            untrained: Vec::new(),
            add_eos: false,
            add_special_tokens: false,
        })
    }

    /// A conversation: each assistant turn is what rendering the turns through it adds to the
    /// generation prompt after the turns before it (its text and the template's end of turn),
    /// as [`Self::render`] separates a single response. Everything else is untrained. Each
    /// rendering must extend the one before it, or the turns cannot be told apart (a template
    /// that rewrites earlier turns once later ones follow) and the row is refused.
    fn render_turns(&self, rec: &Record) -> Result<Rendered> {
        let (turns, leading) = self.messages(rec);
        let tools = rec.tools.as_ref();
        let render = |turns: &[OrderedJson], generation_prompt: bool| {
            self.codec.render_chat(turns, tools, generation_prompt)
        };
        // Byte ranges of the whole text that are trained on, in order.
        let mut trained: Vec<Range<usize>> = Vec::new();
        // The rendering of the first `rendered_turns` turns.
        let (mut rendered, mut rendered_turns) = (String::new(), 0);
        let extends = |longer: &str, shorter: &str, what: &str| -> Result<()> {
            match longer.starts_with(shorter) {
                true => Ok(()),
                false => bail!(
                    "line {}: the chat template renders {what} differently from the turns before it, so the assistant turns cannot be separated from the rest",
                    rec.line
                ),
            }
        };
        // `turn` as the reader names turns: from 0, in the row's own list.
        for (turn, m) in rec.turns.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let i = leading + turn;
            let prompt = render(&turns[..i], true)?;
            extends(
                &prompt,
                &rendered,
                &format!("the generation prompt before turn {turn} (counting from 0)"),
            )?;
            let through = render(&turns[..=i], false)?;
            extends(
                &through,
                &prompt,
                &format!("turn {turn} (counting from 0; the assistant's)"),
            )?;
            if through.len() > prompt.len() {
                trained.push(prompt.len()..through.len());
            }
            (rendered, rendered_turns) = (through, i + 1);
        }
        // A conversation ending on the assistant's turn has just been rendered whole.
        let text = match rendered_turns == turns.len() {
            true => rendered,
            false => {
                let text = render(&turns, false)?;
                extends(&text, &rendered, "the turns after the last assistant turn")?;
                text
            }
        };
        if trained.is_empty() {
            bail!(
                "line {}: the chat template renders no text for the assistant turns",
                rec.line
            );
        }
        Ok(rendered_from_trained(text, &trained))
    }
}

/// The text split before its first trained range; the ranges after it that are not trained,
/// relative to that split.
fn rendered_from_trained(text: String, trained: &[Range<usize>]) -> Rendered {
    let first = trained.first().map_or(text.len(), |r| r.start);
    let mut untrained = Vec::new();
    let mut at = first;
    for r in trained
        .iter()
        .chain(std::iter::once(&(text.len()..text.len())))
    {
        if r.start > at {
            untrained.push(at - first..r.start - first);
        }
        at = at.max(r.end);
    }
    Rendered {
        prompt: text[..first].to_string(),
        target: text[first..].to_string(),
        untrained,
        add_eos: false,
        add_special_tokens: false,
    }
}
