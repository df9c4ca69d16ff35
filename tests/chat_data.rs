//! Multi-turn conversations (datasets/conversations_sample.jsonl) with a real chat template and
//! tokenizer (SmolLM2's ChatML), and conversations with tool calls
//! (datasets/tool_calls_sample.jsonl) under configs/chat_templates/chatml_tools.jinja, against
//! transformers' `apply_chat_template` turn by turn (scripts/chat_data_reference.py). Gated:
//! runs when HELIX_CHAT_TOKENIZER and HELIX_CHAT_REF (HELIX_TOOLS_REF) are set;
//! scripts/check-smollm2.sh (run by `.ci/run`) sets them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;
use helix::data::{
    read_records, tokenize_records, AssistantSpans, Format, LengthPolicy, LossMode, ReadOptions,
    Sample, Template, TokenizeOptions,
};
use helix::model::TextCodec;
use helix::ops::IGNORE_INDEX;
use serde_json::Value;

#[test]
fn conversations_match_transformers_chat_template_turn_by_turn() -> Result<()> {
    let Some((codec, reference)) = gated("HELIX_CHAT_REF", None)? else {
        return Ok(());
    };
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/conversations_sample.jsonl");
    let template = Template::from_spec("chat", Some(codec.clone()))?;
    let opts = options(&codec);
    let read = read_records(&data, &ReadOptions::new(Format::Messages))?;
    let tokenized = tokenize_records(&read.records, &template, &codec.tokenizer, &opts)?;
    let (tokens, trained) = compare(&tokenized.samples, &reference);
    assert_eq!(tokenized.stats.target_tokens, trained);
    assert_eq!(tokenized.stats.boundary_merges, 0);

    // The last assistant turn alone.
    let last = TokenizeOptions {
        loss: LossMode::LastAssistantTurn,
        ..opts.clone()
    };
    let last_turns = tokenize_records(&read.records, &template, &codec.tokenizer, &last)?;
    let mut trained_last = 0;
    for (s, want) in last_turns.samples.iter().zip(&reference) {
        assert_eq!(s.labels, ints(&want["labels_last"]), "record {}", s.record);
        trained_last += s.labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
    }

    // The same conversations in ShareGPT's form give the same samples.
    let dir = tempfile::tempdir()?;
    let sharegpt = dir.path().join("sharegpt.json");
    let rows: Vec<Value> = std::fs::read_to_string(&data)?
        .lines()
        .map(|line| {
            let row: Value = serde_json::from_str(line).unwrap();
            let turns: Vec<Value> = row["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| {
                    let from = match m["role"].as_str().unwrap() {
                        "user" => "human",
                        "assistant" => "gpt",
                        other => other,
                    };
                    serde_json::json!({"from": from, "value": m["content"]})
                })
                .collect();
            serde_json::json!({ "conversations": turns })
        })
        .collect();
    std::fs::write(&sharegpt, serde_json::to_string_pretty(&rows)?)?;
    let read = read_records(&sharegpt, &ReadOptions::new(Format::Sharegpt))?;
    let again = tokenize_records(&read.records, &template, &codec.tokenizer, &opts)?;
    assert_eq!(again.samples, tokenized.samples);
    println!(
        "{} conversations, {tokens} tokens: input_ids and assistant-only labels identical to \
         transformers' apply_chat_template turn by turn ({trained} trained tokens; {trained_last} \
         under last_assistant_turn); ShareGPT form identical",
        reference.len()
    );
    Ok(())
}

/// The tokenizer (with `template`, a file under the repository, in place of its own) and the
/// reference rows, when HELIX_CHAT_TOKENIZER and `reference_var` are set.
fn gated(
    reference_var: &str,
    template: Option<&str>,
) -> Result<Option<(Arc<TextCodec>, Vec<Value>)>> {
    let var = |k: &str| std::env::var_os(k).map(PathBuf::from);
    let (Some(tokenizer_dir), Some(reference)) = (var("HELIX_CHAT_TOKENIZER"), var(reference_var))
    else {
        eprintln!("skipped: set HELIX_CHAT_TOKENIZER and {reference_var}");
        return Ok(None);
    };
    let mut codec = TextCodec::open(&tokenizer_dir)?;
    if let Some(file) = template {
        codec.set_chat_template_file(&Path::new(env!("CARGO_MANIFEST_DIR")).join(file))?;
    }
    let reference = std::fs::read_to_string(reference)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    Ok(Some((Arc::new(codec), reference)))
}

/// Every sample whole, answer-only, ChatML's end of turn as EOS.
fn options(codec: &TextCodec) -> TokenizeOptions {
    TokenizeOptions {
        max_seq_length: 1 << 16,
        policy: LengthPolicy::Drop,
        loss: LossMode::AnswerOnly,
        eos_id: codec.token_id("<|im_end|>").unwrap(),
        threads: 0,
    }
}

/// Asserts each sample's ids and labels are the reference's; (tokens, trained tokens).
fn compare(samples: &[Sample], reference: &[Value]) -> (usize, usize) {
    assert_eq!(samples.len(), reference.len());
    let (mut tokens, mut trained) = (0, 0);
    for (s, want) in samples.iter().zip(reference) {
        let ids: Vec<i64> = s.input_ids.iter().map(|&i| i as i64).collect();
        assert_eq!(ids, ints(&want["input_ids"]), "record {}", s.record);
        assert_eq!(s.labels, ints(&want["labels"]), "record {}", s.record);
        tokens += ids.len();
        trained += s.labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
    }
    (tokens, trained)
}

fn ints(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

#[test]
fn tool_calls_match_transformers_chat_template_turn_by_turn() -> Result<()> {
    let template_file = "configs/chat_templates/chatml_tools.jinja";
    let Some((codec, reference)) = gated("HELIX_TOOLS_REF", Some(template_file))? else {
        return Ok(());
    };
    let template = Template::from_spec("chat", Some(codec.clone()))?;
    let read = read_records(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/tool_calls_sample.jsonl"),
        &ReadOptions::new(Format::Messages),
    )?;
    let calls: usize = read
        .records
        .iter()
        .flat_map(|r| &r.turns)
        .map(|t| match t.json.get("tool_calls") {
            Some(helix::model::OrderedJson::Array(calls)) => calls.len(),
            _ => 0,
        })
        .sum();
    assert!(calls >= 10, "the sample should call tools: {calls}");
    let tokenized = tokenize_records(&read.records, &template, &codec.tokenizer, &options(&codec))?;
    let (tokens, trained) = compare(&tokenized.samples, &reference);

    // The template's {% generation %} blocks, as return_assistant_tokens_mask reads them.
    let Template::Chat(chat) = template else {
        unreachable!("a chat template")
    };
    let generation = Template::Chat(chat.with_spans(AssistantSpans::Generation)?);
    let by_blocks = tokenize_records(
        &read.records,
        &generation,
        &codec.tokenizer,
        &options(&codec),
    )?;
    let mut trained_generation = 0;
    for (s, want) in by_blocks.samples.iter().zip(&reference) {
        assert_eq!(
            s.labels,
            ints(&want["labels_generation"]),
            "record {}",
            s.record
        );
        trained_generation += s.labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
    }
    println!(
        "{} conversations with {calls} tool calls, {tokens} tokens: input_ids and \
         assistant-only labels identical to transformers' apply_chat_template(tools=...) \
         turn by turn ({trained} trained tokens), and to its {{% generation %}} mask \
         ({trained_generation})",
        reference.len()
    );
    Ok(())
}
