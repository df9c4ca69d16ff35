//! Multi-turn conversations (datasets/conversations_sample.jsonl) with a real chat template and
//! tokenizer (SmolLM2's ChatML), against transformers' `apply_chat_template` turn by turn
//! (scripts/chat_data_reference.py). Gated: runs when HELIX_CHAT_TOKENIZER and HELIX_CHAT_REF
//! are set; scripts/check-smollm2.sh (run by `.ci/run`) sets them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;
use helix::data::{
    read_records, tokenize_records, Format, LengthPolicy, LossMode, ReadOptions, Template,
    TokenizeOptions,
};
use helix::model::TextCodec;
use helix::ops::IGNORE_INDEX;
use serde_json::Value;

#[test]
fn conversations_match_transformers_chat_template_turn_by_turn() -> Result<()> {
    let var = |k: &str| std::env::var_os(k).map(PathBuf::from);
    let (Some(tokenizer_dir), Some(reference)) =
        (var("HELIX_CHAT_TOKENIZER"), var("HELIX_CHAT_REF"))
    else {
        eprintln!("skipped: set HELIX_CHAT_TOKENIZER and HELIX_CHAT_REF");
        return Ok(());
    };
    let reference: Vec<Value> = std::fs::read_to_string(&reference)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/conversations_sample.jsonl");
    let codec = Arc::new(TextCodec::open(&tokenizer_dir)?);
    let template = Template::from_spec("chat", Some(codec.clone()))?;
    let opts = TokenizeOptions {
        max_seq_length: 1 << 16,
        policy: LengthPolicy::Drop,
        loss: LossMode::AnswerOnly,
        eos_id: codec.token_id("<|im_end|>").unwrap(),
        threads: 0,
    };
    let read = read_records(&data, &ReadOptions::new(Format::Messages))?;
    let tokenized = tokenize_records(&read.records, &template, &codec.tokenizer, &opts)?;
    assert_eq!(tokenized.samples.len(), reference.len());
    let ints = |v: &Value| -> Vec<i64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect()
    };
    let (mut tokens, mut trained) = (0, 0);
    for (s, want) in tokenized.samples.iter().zip(&reference) {
        let ids: Vec<i64> = s.input_ids.iter().map(|&i| i as i64).collect();
        assert_eq!(ids, ints(&want["input_ids"]), "record {}", s.record);
        assert_eq!(s.labels, ints(&want["labels"]), "record {}", s.record);
        tokens += ids.len();
        trained += s.labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
    }
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
