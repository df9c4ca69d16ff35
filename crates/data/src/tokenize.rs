//! Templated records → `input_ids` and `labels`, in parallel.
//!
//! The prompt and target are tokenized as one text, as Stanford Alpaca's `preprocess` does, so
//! the ids are what the model sees at inference; the prompt/target split comes from the
//! tokenizer's byte offsets: a token belongs to the target when it covers any target byte. A
//! token that covers bytes of both is counted in [`TokenizeStats::boundary_merges`] (trained on).
//! A conversation's untrained turns inside the target ([`Rendered::untrained`]) are split off
//! the same way: a token is untrained when all its bytes are.

use std::ops::Range;

use anyhow::{anyhow, bail, Context, Result};
use helix_ops::IGNORE_INDEX;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::records::Record;
use crate::spm_bpe::{SpmBpe, WordCache};
use crate::template::{Rendered, Template};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossMode {
    /// Prompt tokens get [`IGNORE_INDEX`] (NeMo `answer_only_loss`, Alpaca's `IGNORE_INDEX`);
    /// in a conversation, every turn but the assistant's.
    AnswerOnly,
    /// Every token is a target.
    WholeSequence,
    /// A conversation's last assistant turn only (torchtune's `train_on_last` masking); the
    /// same as [`Self::AnswerOnly`] for an instruction.
    LastAssistantTurn,
}

impl std::str::FromStr for LossMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "answer_only" => Ok(Self::AnswerOnly),
            "whole_sequence" => Ok(Self::WholeSequence),
            "last_assistant_turn" => Ok(Self::LastAssistantTurn),
            _ => bail!(
                "unknown loss '{s}' (expected answer_only, whole_sequence or last_assistant_turn)"
            ),
        }
    }
}

/// What to do with a sample longer than `max_seq_length`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LengthPolicy {
    /// Drop prompt tokens from the left, keeping leading special tokens (BOS) and the end of the
    /// prompt (the response key); dropped when the target alone does not fit.
    TruncatePrompt,
    /// Cut the end of the target (EOS included); dropped when no target token would remain.
    TruncateResponse,
    /// Drop the sample.
    Drop,
}

impl std::str::FromStr for LengthPolicy {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "truncate_prompt" => Ok(Self::TruncatePrompt),
            "truncate_response" => Ok(Self::TruncateResponse),
            "drop" => Ok(Self::Drop),
            _ => bail!(
                "unknown length policy '{s}' (expected truncate_prompt, truncate_response or drop)"
            ),
        }
    }
}

#[derive(Clone, Debug)]
pub struct TokenizeOptions {
    pub max_seq_length: usize,
    pub policy: LengthPolicy,
    pub loss: LossMode,
    /// Appended after the target when [`Rendered::add_eos`].
    pub eos_id: u32,
    /// Worker threads; 0 = one per core.
    pub threads: usize,
}

/// One tokenized example. `labels[i]` is the target for position i in HF convention (the model
/// shifts); `labels.len() == input_ids.len()`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
    /// Number of leading prompt tokens (after truncation).
    pub prompt_len: usize,
    /// Token ranges past the prompt that answer-only loss does not train on either: a
    /// conversation's turns between (and after) its assistant turns. In order, disjoint.
    pub untrained: Vec<Range<usize>>,
    /// Index of the record it came from.
    pub record: usize,
}

impl Sample {
    /// A sample whose labels follow `loss`: with answer-only loss the first `prompt_len` tokens
    /// get [`IGNORE_INDEX`], every other token is its own label.
    pub fn new(input_ids: Vec<u32>, prompt_len: usize, record: usize, loss: LossMode) -> Self {
        Self::with_untrained(input_ids, prompt_len, Vec::new(), record, loss)
    }

    /// [`Sample::new`] with `untrained` token ranges past the prompt that answer-only loss
    /// ignores too (a conversation's other turns).
    pub fn with_untrained(
        input_ids: Vec<u32>,
        prompt_len: usize,
        untrained: Vec<Range<usize>>,
        record: usize,
        loss: LossMode,
    ) -> Self {
        let mut labels: Vec<i64> = input_ids.iter().map(|&id| id as i64).collect();
        if loss != LossMode::WholeSequence {
            let n = labels.len();
            for r in std::iter::once(0..prompt_len).chain(untrained.iter().cloned()) {
                labels[r.start.min(n)..r.end.min(n)].fill(IGNORE_INDEX);
            }
        }
        Self {
            input_ids,
            labels,
            prompt_len,
            untrained,
            record,
        }
    }

    /// Tokens answer-only loss trains on: those past the prompt and outside `untrained`.
    pub fn answer_tokens(&self) -> usize {
        let untrained: usize = self.untrained.iter().map(|r| r.len()).sum();
        self.input_ids.len() - self.prompt_len - untrained
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizeStats {
    pub samples: usize,
    pub truncated_prompt: usize,
    pub truncated_response: usize,
    pub dropped: usize,
    pub boundary_merges: usize,
    pub prompt_tokens: usize,
    pub target_tokens: usize,
}

#[derive(Clone, Debug)]
pub struct Tokenized {
    pub samples: Vec<Sample>,
    pub stats: TokenizeStats,
}

enum Outcome {
    Kept(Sample, Cut),
    Dropped,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Cut {
    None,
    Prompt,
    Response,
}

/// Renders and tokenizes every record on `opts.threads` threads; order is kept.
pub fn tokenize_records(
    records: &[Record],
    template: &Template,
    tokenizer: &Tokenizer,
    opts: &TokenizeOptions,
) -> Result<Tokenized> {
    if opts.max_seq_length < 2 {
        bail!(
            "max_seq_length must be at least 2, got {}",
            opts.max_seq_length
        );
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads)
        .build()
        .context("cannot start the tokenizer threads")?;
    let fast = SpmBpe::from_tokenizer(tokenizer);
    let encoder = Encoder {
        tokenizer,
        fast: fast.as_ref(),
    };
    let outcomes: Vec<(Outcome, bool)> = pool.install(|| {
        records
            .par_iter()
            .enumerate()
            .map_init(WordCache::default, |cache, (i, rec)| {
                let rendered = template
                    .render(rec)
                    .with_context(|| format!("templating the record of line {}", rec.line))?;
                tokenize_one(&encoder, cache, &rendered, i, opts)
                    .with_context(|| format!("tokenizing the record of line {}", rec.line))
            })
            .collect::<Result<_>>()
    })?;
    let mut stats = TokenizeStats::default();
    let mut samples = Vec::with_capacity(outcomes.len());
    for (outcome, merged) in outcomes {
        stats.boundary_merges += merged as usize;
        match outcome {
            Outcome::Dropped => stats.dropped += 1,
            Outcome::Kept(s, cut) => {
                stats.truncated_prompt += (cut == Cut::Prompt) as usize;
                stats.truncated_response += (cut == Cut::Response) as usize;
                stats.target_tokens += s.answer_tokens();
                stats.prompt_tokens += s.input_ids.len() - s.answer_tokens();
                samples.push(s);
            }
        }
    }
    stats.samples = samples.len();
    Ok(Tokenized { samples, stats })
}

/// The tokenizer, with the fast path for SentencePiece-style BPE when it applies.
struct Encoder<'a> {
    tokenizer: &'a Tokenizer,
    fast: Option<&'a SpmBpe>,
}

/// A text's token ids and the byte range of each in the text.
type IdsAndOffsets = (Vec<u32>, Vec<(usize, usize)>);

impl Encoder<'_> {
    /// Ids and byte offsets of `text`, with the post-processor's special tokens when `special`.
    fn encode(&self, text: &str, special: bool, cache: &mut WordCache) -> Result<IdsAndOffsets> {
        if let Some(fast) = self.fast.filter(|f| f.accepts(text)) {
            return Ok(fast.encode(text, special, cache));
        }
        let enc = self
            .tokenizer
            .encode(text, special)
            .map_err(|e| anyhow!("tokenizer: {e}"))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }
}

/// Tokenizes one rendered example; the bool says whether a token straddled prompt and target
/// (or a conversation's trained and untrained turns).
fn tokenize_one(
    encoder: &Encoder,
    cache: &mut WordCache,
    r: &Rendered,
    record: usize,
    opts: &TokenizeOptions,
) -> Result<(Outcome, bool)> {
    let last_turn;
    let r = match opts.loss {
        LossMode::LastAssistantTurn => {
            last_turn = r.last_turn_only();
            &last_turn
        }
        _ => r,
    };
    let text = r.text();
    let boundary = r.prompt.len();
    let (mut ids, offsets) = encoder.encode(&text, r.add_special_tokens, cache)?;
    // Leading tokens the post-processor added (BOS) carry no text: offsets (0, 0).
    let lead = offsets.iter().take_while(|o| o.1 == 0).count();
    let prompt_len = offsets[lead..]
        .iter()
        .position(|o| o.1 > boundary)
        .map_or(offsets.len(), |p| p + lead);
    let mut merged = offsets.get(prompt_len).is_some_and(|o| o.0 < boundary);
    let (untrained, straddled) = untrained_tokens(&offsets, prompt_len, boundary, &r.untrained);
    merged |= straddled;
    if r.add_eos {
        ids.push(opts.eos_id);
    }
    if ids.len() == prompt_len {
        bail!("the target produced no tokens");
    }

    let max = opts.max_seq_length;
    let (ids, prompt_len, untrained, cut) = if ids.len() <= max {
        (ids, prompt_len, untrained, Cut::None)
    } else {
        match opts.policy {
            LengthPolicy::Drop => return Ok((Outcome::Dropped, merged)),
            LengthPolicy::TruncateResponse => {
                if prompt_len >= max {
                    return Ok((Outcome::Dropped, merged));
                }
                ids.truncate(max);
                let untrained = untrained
                    .into_iter()
                    .filter(|u| u.start < max)
                    .map(|u| u.start..u.end.min(max))
                    .collect();
                (ids, prompt_len, untrained, Cut::Response)
            }
            LengthPolicy::TruncatePrompt => {
                let target_len = ids.len() - prompt_len;
                let lead = lead.min(prompt_len);
                if lead + target_len >= max {
                    return Ok((Outcome::Dropped, merged));
                }
                let keep = max - target_len - lead;
                let mut out = ids[..lead].to_vec();
                out.extend_from_slice(&ids[prompt_len - keep..]);
                // Every target token moves left by the prompt tokens cut.
                let shift = prompt_len - keep - lead;
                let untrained = untrained
                    .into_iter()
                    .map(|u| u.start - shift..u.end - shift)
                    .collect();
                (out, lead + keep, untrained, Cut::Prompt)
            }
        }
    };
    let sample = Sample::with_untrained(ids, prompt_len, untrained, record, opts.loss);
    Ok((Outcome::Kept(sample, cut), merged))
}

/// Token ranges past `prompt_len` whose every byte lies in one of `untrained` (byte ranges of
/// the target, which starts at byte `boundary` of the text), and whether a token straddled
/// the edge of one (it covers trained bytes, so it is trained on).
fn untrained_tokens(
    offsets: &[(usize, usize)],
    prompt_len: usize,
    boundary: usize,
    untrained: &[Range<usize>],
) -> (Vec<Range<usize>>, bool) {
    let mut ranges: Vec<Range<usize>> = Vec::new();
    let mut straddled = false;
    let mut spans = untrained
        .iter()
        .map(|u| u.start + boundary..u.end + boundary)
        .peekable();
    for (i, &(start, end)) in offsets.iter().enumerate().skip(prompt_len) {
        // Spans wholly before this token are done with (tokens come in text order).
        while spans.peek().is_some_and(|u| u.end <= start) {
            spans.next();
        }
        let Some(u) = spans.peek() else { break };
        if start >= u.start && end <= u.end {
            match ranges.last_mut() {
                Some(r) if r.end == i => r.end = i + 1,
                _ => ranges.push(i..i + 1),
            }
        } else if start < u.end && end > u.start {
            straddled = true;
        }
    }
    (ranges, straddled)
}

#[cfg(test)]
#[path = "tokenize_tests.rs"]
pub(crate) mod tests;
