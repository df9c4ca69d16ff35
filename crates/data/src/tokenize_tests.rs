use std::path::Path;
use std::str::FromStr;

use super::*;
use crate::records::{read_records, Format, ReadOptions};
use crate::template::ChatTemplate;
use std::sync::Arc;

use helix_model::TextCodec;

const WORDS: &[&str] = &[
    "Q",
    "A",
    ":",
    "what",
    "is",
    "two",
    "plus",
    "four",
    "ab",
    "abcd",
    "cd",
    "one",
    "three",
    "five",
    "six",
    "Paris",
    "user",
    "assistant",
    "system",
    "Capital",
    "of",
    "France",
    "?",
];

/// A word-level tokenizer (unknown words → [UNK]) that adds `<s>` in front, as Llama's does;
/// ids: [UNK]=0, <s>=1, </s>=2, then `specials`, then WORDS.
pub(crate) fn word_tokenizer(specials: &[&str]) -> Tokenizer {
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (i, t) in ["[UNK]", "<s>", "</s>"].iter().chain(specials).enumerate() {
        vocab.insert(t.to_string(), i.into());
        if i > 0 {
            added.push(
                serde_json::json!({"id": i, "content": t, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true}),
            );
        }
    }
    for w in WORDS {
        let n = vocab.len();
        vocab.insert(w.to_string(), n.into());
    }
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "decoder": null,
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    Tokenizer::from_str(&json.to_string()).unwrap()
}

fn opts(max: usize, policy: LengthPolicy, loss: LossMode) -> TokenizeOptions {
    TokenizeOptions {
        max_seq_length: max,
        policy,
        loss,
        eos_id: 2,
        threads: 2,
    }
}

fn rec(instruction: &str, response: &str) -> Record {
    Record {
        instruction: instruction.into(),
        context: String::new(),
        response: response.into(),
        category: None,
        turns: Vec::new(),
        tools: None,
        line: 7,
    }
}

fn run(recs: &[Record], template: &str, o: &TokenizeOptions) -> Tokenized {
    let t = Template::from_spec(template, None).unwrap();
    tokenize_records(recs, &t, &word_tokenizer(&[]), o).unwrap()
}

fn id(w: &str) -> i64 {
    word_tokenizer(&[]).token_to_id(w).unwrap() as i64
}

const I: i64 = IGNORE_INDEX;

#[test]
fn answer_only_labels_cover_exactly_target_and_eos() {
    let t = run(
        &[rec("what is two plus two", "four")],
        "Q : {instruction} A :",
        &opts(64, LengthPolicy::Drop, LossMode::AnswerOnly),
    );
    let s = &t.samples[0];
    // <s> Q : what is two plus two A : | four </s>
    assert_eq!(s.input_ids.len(), 12);
    assert_eq!(s.prompt_len, 10);
    assert_eq!(&s.labels[..10], &[I; 10]);
    assert_eq!(&s.labels[10..], &[id("four"), 2]);
    assert_eq!(t.stats.prompt_tokens, 10);
    assert_eq!(t.stats.target_tokens, 2);
}

#[test]
fn whole_sequence_labels_are_the_inputs() {
    let t = run(
        &[rec("one", "two")],
        "Q {instruction} A",
        &opts(64, LengthPolicy::Drop, LossMode::WholeSequence),
    );
    let s = &t.samples[0];
    let ids: Vec<i64> = s.input_ids.iter().map(|&x| x as i64).collect();
    assert_eq!(s.labels, ids);
    assert_eq!(*s.labels.last().unwrap(), 2);
}

#[test]
fn a_token_straddling_the_boundary_is_a_counted_target() {
    // "ab" + "cd" is one word: the token covers target bytes, so it is trained on.
    let t = run(
        &[rec("ab", "cd")],
        "{instruction}",
        &opts(64, LengthPolicy::Drop, LossMode::AnswerOnly),
    );
    assert_eq!(t.samples[0].labels, vec![I, id("abcd"), 2]);
    assert_eq!(t.stats.boundary_merges, 1);
}

#[test]
fn length_policies_truncate_or_drop_and_count() {
    // <s> Q one two three A | four five six </s>: 6 prompt + 4 target tokens = 10.
    let recs = [rec("one two three", "four five six"), rec("one", "two")];
    let tpl = "Q {instruction} A ";
    let lo = |p| opts(8, p, LossMode::AnswerOnly);

    let t = run(&recs, tpl, &lo(LengthPolicy::Drop));
    assert_eq!((t.stats.samples, t.stats.dropped), (1, 1));
    assert_eq!(t.samples[0].record, 1);

    let t = run(&recs, tpl, &lo(LengthPolicy::TruncatePrompt));
    let s = &t.samples[0];
    // BOS kept, prompt cut from the left: <s> three A four five six </s> ... fits 8.
    let words = [id("<s>"), id("two"), id("three"), id("A")];
    assert_eq!(
        s.input_ids
            .iter()
            .map(|&x| x as i64)
            .take(4)
            .collect::<Vec<_>>(),
        words
    );
    assert_eq!(s.input_ids.len(), 8);
    assert_eq!(s.prompt_len, 4);
    assert_eq!(&s.labels[4..], &[id("four"), id("five"), id("six"), 2]);
    assert_eq!(
        (t.stats.truncated_prompt, t.stats.truncated_response),
        (1, 0)
    );

    let t = run(&recs, tpl, &lo(LengthPolicy::TruncateResponse));
    let s = &t.samples[0];
    assert_eq!(&s.labels, &[I, I, I, I, I, I, id("four"), id("five")]);
    assert_eq!(
        (t.stats.truncated_prompt, t.stats.truncated_response),
        (0, 1)
    );

    // When the target alone cannot fit (prompt truncation) or no target token would remain
    // (response truncation), the sample is dropped, and counted.
    let t = run(
        &recs[..1],
        tpl,
        &opts(5, LengthPolicy::TruncatePrompt, LossMode::AnswerOnly),
    );
    assert_eq!((t.stats.samples, t.stats.dropped), (0, 1));
    let t = run(
        &recs[..1],
        tpl,
        &opts(6, LengthPolicy::TruncateResponse, LossMode::AnswerOnly),
    );
    assert_eq!((t.stats.samples, t.stats.dropped), (0, 1));
}

#[test]
fn chat_template_target_is_the_assistant_turn_without_extra_eos() -> Result<()> {
    let codec = crate::template::tests::chatml_codec();
    let t = Template::Chat(ChatTemplate::new(codec.clone(), None)?);
    let recs = [rec("Capital of France ?", "Paris")];
    let out = tokenize_records(
        &recs,
        &t,
        &codec.tokenizer,
        &opts(64, LengthPolicy::Drop, LossMode::AnswerOnly),
    )?;
    let s = &out.samples[0];
    let end = codec.tokenizer.token_to_id("<|im_end|>").unwrap() as i64;
    let paris = codec.tokenizer.token_to_id("Paris").unwrap() as i64;
    assert_eq!(&s.labels[s.prompt_len..], &[paris, end]);
    assert!(s.labels[..s.prompt_len].iter().all(|&l| l == I));
    // The template's text is the whole sequence: no BOS from the post-processor in front.
    let rendered = t.render(&recs[0])?;
    let bare = codec.tokenizer.encode(rendered.text(), false).unwrap();
    assert_eq!(s.input_ids, bare.get_ids());
    assert_ne!(s.input_ids[0], 1);
    Ok(())
}

#[test]
fn parallel_and_serial_agree() {
    let recs: Vec<Record> = (0..200)
        .map(|i| rec(&"one two ".repeat(i % 7 + 1), &"three ".repeat(i % 5 + 1)))
        .collect();
    let mut o = opts(12, LengthPolicy::TruncatePrompt, LossMode::AnswerOnly);
    let a = run(&recs, "Q {instruction} A ", &o);
    o.threads = 1;
    let b = run(&recs, "Q {instruction} A ", &o);
    assert_eq!(a.samples, b.samples);
    assert_eq!(a.stats, b.stats);
}

#[test]
fn max_seq_length_below_two_is_rejected() {
    let t = Template::from_spec("{instruction}", None).unwrap();
    let e = tokenize_records(
        &[rec("one", "x")],
        &t,
        &word_tokenizer(&[]),
        &opts(1, LengthPolicy::Drop, LossMode::AnswerOnly),
    );
    assert_eq!(
        format!("{:#}", e.unwrap_err()),
        "max_seq_length must be at least 2, got 1"
    );
}

/// With the real Llama 2 tokenizer (when the shared assets are present), on the real Alpaca
/// sample: the label mask starts where the prompt tokenized alone ends, and the labelled tokens
/// are the response followed by EOS — except where Llama 2 fuses the prompt's final ":" with the
/// response's first character, which is counted and trained on.
#[test]
fn llama2_mask_covers_exactly_response_and_eos() -> Result<()> {
    let tok_path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/assets/llama2-tokenizer/tokenizer.json");
    if !tok_path.exists() {
        eprintln!("skipped: {} not present", tok_path.display());
        return Ok(());
    }
    let tok = Tokenizer::from_file(&tok_path).map_err(|e| anyhow!("{e}"))?;
    let eos = tok.token_to_id("</s>").unwrap();
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/alpaca_sample.json");
    let recs = read_records(&sample, &ReadOptions::new(Format::Alpaca))?.records;
    for template in [Template::Alpaca, Template::Dolly] {
        let o = TokenizeOptions {
            eos_id: eos,
            ..opts(4096, LengthPolicy::Drop, LossMode::AnswerOnly)
        };
        let out = tokenize_records(&recs, &template, &tok, &o)?;
        assert_eq!(out.stats.samples, recs.len());
        let mut merged = 0;
        for s in &out.samples {
            let r = template.render(&recs[s.record])?;
            let prompt = tok
                .encode(r.prompt.as_str(), true)
                .map_err(|e| anyhow!("{e}"))?;
            let prompt = prompt.get_ids();
            assert!(s.labels[..s.prompt_len].iter().all(|&l| l == I));
            let target: Vec<u32> = s.labels[s.prompt_len..].iter().map(|&l| l as u32).collect();
            assert_eq!(&target[..], &s.input_ids[s.prompt_len..]);
            assert_eq!(*target.last().unwrap(), eos);
            let text = tok
                .decode(&target[..target.len() - 1], false)
                .map_err(|e| anyhow!("{e}"))?;
            if s.input_ids[..s.prompt_len] == *prompt {
                // The mask starts where the prompt alone ends, as Stanford's does.
                assert_eq!(text, r.target, "{template:?} record {}", s.record);
            } else {
                // Llama 2 has tokens like ":-" and ':"': the prompt's last ":" fused with the
                // response's first character is trained on, never masked.
                merged += 1;
                assert_eq!(s.input_ids[..s.prompt_len], prompt[..prompt.len() - 1]);
                assert_eq!(
                    text,
                    format!(":{}", r.target),
                    "{template:?} record {}",
                    s.record
                );
            }
        }
        assert_eq!(out.stats.boundary_merges, merged);
        // Dolly's prompt ends with a newline, which Llama 2 never fuses with what follows.
        let expect = if matches!(template, Template::Dolly) {
            0
        } else {
            10
        };
        assert_eq!(merged, expect, "{template:?}");
    }
    Ok(())
}

/// The ChatML codec, its template, and a conversation of two assistant turns between three
/// user turns.
fn two_assistant_turns() -> Result<(Arc<TextCodec>, Template, [Record; 1])> {
    let codec = crate::template::tests::chatml_codec();
    let t = Template::Chat(ChatTemplate::new(codec.clone(), None)?);
    let turns = [
        ("user", "Capital of France ?"),
        ("assistant", "Paris"),
        ("user", "two plus four"),
        ("assistant", "six"),
        ("user", "one"),
    ];
    Ok((codec, t, [crate::template::tests::conversation(&turns)]))
}

#[test]
fn a_conversation_s_labels_are_its_assistant_turns_through_every_length_policy() -> Result<()> {
    let (codec, t, recs) = two_assistant_turns()?;
    let id = |w: &str| codec.tokenizer.token_to_id(w).unwrap();
    let words =
        "<|im_start|> user Capital of France ? <|im_end|> <|im_start|> assistant Paris <|im_end|> \
                 <|im_start|> user two plus four <|im_end|> <|im_start|> assistant six <|im_end|> \
                 <|im_start|> user one <|im_end|>";
    let ids: Vec<u32> = words.split(' ').map(id).collect();
    // The trained positions, found by hand: each assistant turn's text and its end of turn.
    let labels_at = |ids: &[u32], trained: &[usize]| -> Vec<i64> {
        (0..ids.len())
            .map(|i| match trained.contains(&i) {
                true => ids[i] as i64,
                false => I,
            })
            .collect()
    };
    let tokenize_with = |t: &Template, max: usize, policy: LengthPolicy, loss: LossMode| {
        tokenize_records(&recs, t, &codec.tokenizer, &opts(max, policy, loss))
    };
    let tokenize = |max, policy, loss| tokenize_with(&t, max, policy, loss);

    let out = tokenize(64, LengthPolicy::Drop, LossMode::AnswerOnly)?;
    let s = &out.samples[0];
    assert_eq!(s.input_ids, ids);
    assert_eq!(s.labels, labels_at(&ids, &[9, 10, 19, 20]));
    assert_eq!(
        (s.prompt_len, s.untrained.clone()),
        (9, vec![11..19, 21..25])
    );
    assert_eq!((out.stats.target_tokens, out.stats.prompt_tokens), (4, 21));
    assert_eq!(out.stats.boundary_merges, 0);

    let out = tokenize(64, LengthPolicy::Drop, LossMode::WholeSequence)?;
    let whole: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    assert_eq!(out.samples[0].labels, whole);

    // Cutting the end keeps the first 15 tokens and what they hold of the second user turn.
    let out = tokenize(15, LengthPolicy::TruncateResponse, LossMode::AnswerOnly)?;
    let s = &out.samples[0];
    assert_eq!(s.input_ids, ids[..15]);
    assert_eq!(s.labels, labels_at(&ids[..15], &[9, 10]));
    // One untrained range, clipped to the cut.
    assert_eq!(
        (s.untrained.len(), s.untrained.first()),
        (1, Some(&(11..15)))
    );
    assert_eq!(out.stats.truncated_response, 1);

    // Cutting the prompt keeps every turn from the first assistant one, shifted left.
    let out = tokenize(20, LengthPolicy::TruncatePrompt, LossMode::AnswerOnly)?;
    let s = &out.samples[0];
    assert_eq!(s.input_ids, ids[5..]);
    assert_eq!(s.labels, labels_at(&ids[5..], &[4, 5, 14, 15]));
    assert_eq!(s.untrained, vec![6..14, 16..20]);
    let out = tokenize(16, LengthPolicy::TruncatePrompt, LossMode::AnswerOnly)?;
    assert_eq!((out.stats.samples, out.stats.dropped), (0, 1));

    // Without newlines between turns, the last user turn's end of turn ends the text, and
    // is still untrained.
    let compact = TextCodec {
        tokenizer: word_tokenizer(&["<|im_start|>", "<|im_end|>"]),
        chat_template: Some("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}".into()),
        bos_token: None,
        eos_token: Some("<|im_end|>".into()),
    };
    let compact = Template::Chat(ChatTemplate::new(std::sync::Arc::new(compact), None)?);
    let out = tokenize_with(&compact, 64, LengthPolicy::Drop, LossMode::AnswerOnly)?;
    assert_eq!(out.samples[0].input_ids, ids);
    assert_eq!(out.samples[0].labels, labels_at(&ids, &[9, 10, 19, 20]));
    Ok(())
}

#[test]
fn last_assistant_turn_loss_trains_the_last_assistant_turn_only() -> Result<()> {
    let (codec, t, recs) = two_assistant_turns()?;
    let tokenize = |max: usize, policy: LengthPolicy| {
        let o = opts(max, policy, LossMode::LastAssistantTurn);
        tokenize_records(&recs, &t, &codec.tokenizer, &o)
    };
    let all = tokenize_records(
        &recs,
        &t,
        &codec.tokenizer,
        &opts(64, LengthPolicy::Drop, LossMode::AnswerOnly),
    )?;
    let ids = &all.samples[0].input_ids;
    // As the answer-only test finds them: "six" and its <|im_end|> at 19 and 20, the trailing
    // user turn 21..25.
    let only = |ids: &[u32], trained: &[usize]| -> Vec<i64> {
        (0..ids.len())
            .map(|i| {
                if trained.contains(&i) {
                    ids[i] as i64
                } else {
                    I
                }
            })
            .collect()
    };
    let out = tokenize(64, LengthPolicy::Drop)?;
    let s = &out.samples[0];
    assert_eq!(&s.input_ids, ids);
    assert_eq!(s.labels, only(ids, &[19, 20]));
    assert_eq!(s.prompt_len, 19);
    assert_eq!(
        (s.untrained.len(), s.untrained.first()),
        (1, Some(&(21..25)))
    );
    assert_eq!(out.stats.target_tokens, 2);
    // Cutting the prompt now may cut the earlier turns, the first assistant turn among them.
    let out = tokenize(8, LengthPolicy::TruncatePrompt)?;
    let s = &out.samples[0];
    assert_eq!(s.input_ids, ids[17..]);
    assert_eq!(s.labels, only(&ids[17..], &[2, 3]));
    // An instruction trains as under answer-only loss.
    let instruction = [rec("Capital of France ?", "Paris")];
    let run = |loss| {
        let o = opts(64, LengthPolicy::Drop, loss);
        tokenize_records(&instruction, &t, &codec.tokenizer, &o).map(|t| t.samples)
    };
    assert_eq!(
        run(LossMode::LastAssistantTurn)?,
        run(LossMode::AnswerOnly)?
    );
    Ok(())
}
