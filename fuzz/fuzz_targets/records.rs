//! The data reader (`read_records_from_bytes`) in every format, instructions and conversations, strict and with
//! `skip_invalid`, with the invariants that tie the two together.
#![no_main]

use helix_data::records::{read_records_from_bytes, Format, ReadOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let lines = 1 + data.iter().filter(|&&b| b == b'\n').count();
    for format in [
        Format::Dolly,
        Format::Alpaca,
        Format::Nemo,
        Format::Messages,
        Format::Sharegpt,
    ] {
        let strict = read_records_from_bytes("fuzz.jsonl", data, &ReadOptions::new(format));
        let mut opts = ReadOptions::new(format);
        opts.skip_invalid = true;
        let lenient = read_records_from_bytes("fuzz.jsonl", data, &opts);
        match (&strict, &lenient) {
            (Ok(s), Ok(l)) => {
                assert_eq!(s.records, l.records);
                assert_eq!(l.skipped.total(), 0);
            }
            (Ok(_), Err(e)) => panic!("strict read succeeded, skip_invalid failed: {e:#}"),
            _ => {}
        }
        if let Err(e) = &strict {
            assert!(format!("{e:#}").contains("fuzz.jsonl"), "{e:#}");
        }
        if let Ok(l) = &lenient {
            assert!(!l.records.is_empty());
            assert_eq!(l.skipped.total(), l.skipped_rows.len());
            for r in &l.records {
                assert!((1..=lines).contains(&r.line), "line {} of {lines}", r.line);
                // A conversation is read only with an assistant turn to train on.
                assert_eq!(
                    format.is_conversation(),
                    r.turns.iter().any(|t| t.role == "assistant")
                );
                // Only an assistant turn that calls tools may have no text.
                for t in &r.turns {
                    assert!(t.content.is_some() || (t.role == "assistant" && t.calls_tools()));
                }
            }
        }
    }
});
