//! Real Alpaca rows with the real Llama 2 tokenizer, against Stanford Alpaca's preprocessing run
//! by transformers (scripts/alpaca_llama2_reference.py). Gated: runs when HELIX_ALPACA,
//! HELIX_LLAMA2_TOKENIZER and HELIX_ALPACA_LLAMA2_REF are set; scripts/check-llama2-data.sh
//! (run by `.ci/run`) sets them.

use std::path::PathBuf;

use anyhow::Result;
use helix::data::spm_bpe::{SpmBpe, WordCache};
use helix::data::{
    read_records, tokenize_records, Format, LengthPolicy, LossMode, ReadOptions, Template,
    TokenizeOptions,
};
use helix::model::TextCodec;
use helix::ops::IGNORE_INDEX;
use serde_json::Value;

fn inputs() -> Option<(PathBuf, PathBuf, PathBuf)> {
    let var = |k: &str| std::env::var_os(k).map(PathBuf::from);
    match (
        var("HELIX_ALPACA"),
        var("HELIX_LLAMA2_TOKENIZER"),
        var("HELIX_ALPACA_LLAMA2_REF"),
    ) {
        (Some(a), Some(t), Some(r)) => Some((a, t, r)),
        _ => {
            eprintln!("skipped: set HELIX_ALPACA, HELIX_LLAMA2_TOKENIZER, HELIX_ALPACA_LLAMA2_REF");
            None
        }
    }
}

#[test]
fn stanford_preprocessing_of_real_rows_with_llama2() -> Result<()> {
    let Some((alpaca, tokenizer_dir, reference)) = inputs() else {
        return Ok(());
    };
    let reference: Vec<Value> = std::fs::read_to_string(&reference)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let read = read_records(&alpaca, &ReadOptions::new(Format::Alpaca))?;
    assert_eq!(read.records.len(), reference.len());
    let codec = TextCodec::open(&tokenizer_dir)?;
    let template = Template::from_spec("alpaca", None)?;

    // The prompt text, byte for byte.
    let mut rendered = Vec::new();
    for (rec, want) in read.records.iter().zip(&reference) {
        let r = template.render(rec)?;
        assert_eq!(
            r.prompt,
            want["source"].as_str().unwrap(),
            "line {}",
            rec.line
        );
        rendered.push(r);
    }

    // input_ids exactly; labels as Stanford's mask, except where a token straddles the
    // prompt/response boundary (helix trains on it; Stanford's mask counts the prompt alone).
    let opts = TokenizeOptions {
        max_seq_length: 1 << 16,
        policy: LengthPolicy::Drop,
        loss: LossMode::AnswerOnly,
        eos_id: codec.token_id("</s>").unwrap(),
        threads: 0,
    };
    let tokenized = tokenize_records(&read.records, &template, &codec.tokenizer, &opts)?;
    assert_eq!(tokenized.samples.len(), reference.len());
    let mut mask_differs = 0;
    for ((s, want), r) in tokenized.samples.iter().zip(&reference).zip(&rendered) {
        let want_ids: Vec<u32> = want["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(s.input_ids, want_ids, "record {}", s.record);
        let source_len = want["source_len"].as_u64().unwrap() as usize;
        let first_target = s.labels.iter().position(|&l| l != IGNORE_INDEX).unwrap();
        assert_eq!(first_target, s.prompt_len);
        assert!(s.labels[s.prompt_len..]
            .iter()
            .zip(&s.input_ids[s.prompt_len..])
            .all(|(&l, &id)| l == id as i64));
        if s.prompt_len != source_len {
            mask_differs += 1;
            let enc = codec.tokenizer.encode(r.text(), true).unwrap();
            let straddling = enc.get_offsets()[s.prompt_len];
            assert!(
                straddling.0 < r.prompt.len() && straddling.1 > r.prompt.len(),
                "record {}: mask differs without a straddling token",
                s.record
            );
        }
    }
    println!(
        "{} rows: prompts identical, input_ids identical, answer-only masks identical except \
         {mask_differs} rows with a token across the boundary (boundary_merges = {})",
        reference.len(),
        tokenized.stats.boundary_merges
    );
    assert_eq!(mask_differs, tokenized.stats.boundary_merges);

    // The fast SentencePiece path gives the tokenizers crate's ids and offsets everywhere.
    let fast = SpmBpe::from_tokenizer(&codec.tokenizer).expect("Llama 2 takes the fast path");
    let mut cache = WordCache::default();
    let edge = [
        "",
        " ",
        "  two  spaces  ",
        "\ttab\nnewline\r\n",
        "naïve café 日本語 😀🚀",
        "x</s>y",
        "    def f(x):\n        return x",
        "1234567890 3.14159",
        "ÿ\u{0}\u{7f}",
    ];
    let texts = rendered
        .iter()
        .map(|r| r.text())
        .chain(edge.iter().map(|s| s.to_string()));
    let mut checked = 0;
    for text in texts {
        if !fast.accepts(&text) {
            continue;
        }
        let enc = codec.tokenizer.encode(text.as_str(), true).unwrap();
        let got = fast.encode(&text, true, &mut cache);
        assert_eq!(got.0, enc.get_ids(), "{text:?}");
        assert_eq!(got.1, enc.get_offsets(), "{text:?}");
        checked += 1;
    }
    println!("fast SentencePiece path: {checked} texts, ids and offsets identical");
    assert_eq!(checked, rendered.len() + edge.len() - 1);
    Ok(())
}
