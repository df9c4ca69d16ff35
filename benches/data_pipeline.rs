//! Templating + tokenizing real Alpaca rows with the Llama 2 tokenizer (issue 3's benchmark).
//!
//!     HELIX_ALPACA=../shared/assets/alpaca/alpaca_4000.json \
//!     HELIX_LLAMA2_TOKENIZER=../shared/assets/llama2-tokenizer \
//!     cargo bench --bench data_pipeline
//!
//! Throughput is in rows (elements) per second. `pipeline` is what `prepare` runs: render the
//! Alpaca template, tokenize on every core, labels and length policy. `encode/*` compare the
//! two encoders on the rendered texts, one thread: the `tokenizers` crate and helix's
//! SentencePiece fast path (same ids, checked by tests/alpaca_llama2.rs).

use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use helix::data::spm_bpe::{SpmBpe, WordCache};
use helix::data::{
    read_records, tokenize_records, Format, LengthPolicy, LossMode, ReadOptions, Template,
    TokenizeOptions,
};
use helix::model::TextCodec;

fn inputs() -> (PathBuf, PathBuf) {
    let var = |k: &str, default: &str| {
        std::env::var_os(k).map_or_else(|| PathBuf::from(default), PathBuf::from)
    };
    (
        var("HELIX_ALPACA", "../shared/assets/alpaca/alpaca_4000.json"),
        var(
            "HELIX_LLAMA2_TOKENIZER",
            "../shared/assets/llama2-tokenizer",
        ),
    )
}

fn data_pipeline(c: &mut Criterion) {
    let (alpaca, tokenizer_dir) = inputs();
    let read = read_records(&alpaca, &ReadOptions::new(Format::Alpaca))
        .unwrap_or_else(|e| panic!("{e:#} (set HELIX_ALPACA)"));
    let codec = TextCodec::open(&tokenizer_dir)
        .unwrap_or_else(|e| panic!("{e:#} (set HELIX_LLAMA2_TOKENIZER)"));
    let template = Template::from_spec("alpaca", None).unwrap();
    let rows = read.records.len() as u64;
    let opts = TokenizeOptions {
        max_seq_length: 512,
        policy: LengthPolicy::TruncateResponse,
        loss: LossMode::AnswerOnly,
        eos_id: codec.token_id("</s>").unwrap(),
        threads: 0,
    };

    let mut g = c.benchmark_group("alpaca_4000_llama2");
    g.throughput(Throughput::Elements(rows));
    g.sample_size(20).measurement_time(Duration::from_secs(10));
    g.bench_function("pipeline", |b| {
        b.iter(|| tokenize_records(&read.records, &template, &codec.tokenizer, &opts).unwrap())
    });
    g.bench_function("template_only", |b| {
        b.iter(|| {
            read.records
                .iter()
                .map(|r| template.render(r).unwrap().text().len())
                .sum::<usize>()
        })
    });
    let texts: Vec<String> = read
        .records
        .iter()
        .map(|r| template.render(r).unwrap().text())
        .collect();
    g.bench_function("encode/tokenizers_crate", |b| {
        b.iter(|| {
            texts
                .iter()
                .map(|t| codec.tokenizer.encode(t.as_str(), true).unwrap().len())
                .sum::<usize>()
        })
    });
    let fast = SpmBpe::from_tokenizer(&codec.tokenizer).expect("fast path applies");
    g.bench_function("encode/spm_fast_path", |b| {
        b.iter(|| {
            // A cold cache each time: what one pass over a new data file sees.
            let mut cache = WordCache::default();
            texts
                .iter()
                .map(|t| fast.encode(t, true, &mut cache).0.len())
                .sum::<usize>()
        })
    });
    g.bench_function("fast_path_setup", |b| {
        b.iter(|| SpmBpe::from_tokenizer(&codec.tokenizer).is_some())
    });
    g.finish();
}

criterion_group!(benches, data_pipeline);
criterion_main!(benches);
