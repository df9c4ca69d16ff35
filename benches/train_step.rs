//! One full training step on the CPU — forward, backward, global-norm clipping and AdamW, what
//! `helix-train` runs per optimizer step — for LoRA, P-tuning and full SFT on a tiny Llama
//! (the test fixture `tiny-gqa-untied-b3`, 4 rows of 64 tokens), and LoRA on SmolLM2-135M (4
//! rows of 256 tokens) when it has been imported (`scripts/fetch-smollm2.sh`, or
//! `HELIX_SMOLLM2=DIR`).
//!
//!     cargo bench --bench train_step [-- FILTER]
//!
//! The headline figure is criterion's median step time. `scripts/cpu-step-vs-pytorch.sh` runs
//! the SmolLM2 case beside transformers + PEFT on the same CPU and prints the ratio.
//!
//! `lora_recompute` is the LoRA step with `activation_checkpointing = "full"`.
//!
//! LoRA: r 8, alpha 16, the seven projections, no dropout. P-tuning: 20 virtual tokens, MLP
//! encoder of width 64. Loss on every token after the first of each row.

use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::{DType, Device};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use helix::data::{collate_padded, Batch, LossMode, PadOptions, Sample};
use helix::model::{LlamaConfig, SafetensorsWeights};
use helix::parallel::Job;
use helix::peft::{load_for_method, Customized, LoraConfig, Method, PtuningConfig, LLAMA_TARGETS};
use helix::train::gradients::{forward_backward, ActivationCheckpointing, GradientOptions};
use helix::train::optim::{clip_grad_norm, AdamW, AdamWConfig};

/// `rows` rows of `seq` pseudo-random token ids below `vocab`.
fn batch(rows: usize, seq: usize, vocab: usize) -> Batch {
    let mut x = 0x2545f4914f6cdd1du64;
    let samples: Vec<Sample> = (0..rows)
        .map(|r| {
            let ids = (0..seq)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % vocab as u64) as u32
                })
                .collect();
            Sample::new(ids, 1, r, LossMode::AnswerOnly)
        })
        .collect();
    let refs: Vec<&Sample> = samples.iter().collect();
    collate_padded(&refs, &PadOptions::default()).expect("collate")
}

struct Case {
    model: Customized,
    optimizer: AdamW,
    batch: Batch,
    job: Job,
    opts: GradientOptions,
}

impl Case {
    fn new(dir: &Path, method: Method, rows: usize, seq: usize) -> Self {
        let cfg = LlamaConfig::from_file(&dir.join("config.json")).expect("config.json");
        let weights = SafetensorsWeights::open_dir(dir).expect("weights");
        let model =
            load_for_method(&cfg, &weights, &method, 7, DType::F32, &Device::Cpu).expect("model");
        let optimizer = AdamW::new(
            model.trainable(),
            AdamWConfig {
                betas: [0.9, 0.999],
                eps: 1e-8,
                weight_decay: 0.0,
            },
        )
        .expect("optimizer");
        Self {
            model,
            optimizer,
            batch: batch(rows, seq, cfg.vocab_size),
            job: Job::single(Duration::from_secs(60)),
            opts: GradientOptions::default(),
        }
    }

    fn recomputing(mut self) -> Self {
        self.opts.activation_checkpointing = ActivationCheckpointing::Full;
        self
    }

    /// One optimizer step; its loss.
    fn step(&mut self) -> f64 {
        let batches = std::slice::from_ref(&self.batch);
        let (loss, _, mut grads) =
            forward_backward(&self.model, batches, &self.opts, &self.job, None)
                .expect("forward and backward");
        clip_grad_norm(&mut grads, 1.0).expect("clip");
        self.optimizer.step(&grads, 1e-4).expect("AdamW");
        loss
    }

    fn tokens(&self) -> u64 {
        self.batch.real_tokens as u64
    }
}

fn lora() -> Method {
    let mut l = LoraConfig::new(8, 16.0, &LLAMA_TARGETS);
    l.lora_dropout = 0.0;
    Method::Lora(l)
}

fn bench_case(c: &mut Criterion, group: &str, name: &str, mut case: Case) {
    let mut g = c.benchmark_group(group);
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .throughput(Throughput::Elements(case.tokens()));
    g.bench_function(name, |b| b.iter(|| case.step()));
    g.finish();
}

fn train_step(c: &mut Criterion) {
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-gqa-untied-b3");
    for (name, method) in [
        ("lora", lora()),
        ("ptuning", Method::Ptuning(PtuningConfig::mlp(20, 64))),
        ("sft", Method::FullSft),
    ] {
        bench_case(c, "tiny_step", name, Case::new(&tiny, method, 4, 64));
    }
    // What activation checkpointing costs: one more forward of the decoder layers.
    let case = Case::new(&tiny, lora(), 4, 64).recomputing();
    bench_case(c, "tiny_step", "lora_recompute", case);
    let smollm2 = std::env::var_os("HELIX_SMOLLM2").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("models/smollm2-135m-instruct"),
        PathBuf::from,
    );
    if smollm2.join("config.json").exists() {
        let case = Case::new(&smollm2, lora(), 4, 256);
        bench_case(c, "smollm2_step", "lora_4x256", case);
    } else {
        eprintln!(
            "{}: not found; skipping the SmolLM2 step (scripts/fetch-smollm2.sh imports it)",
            smollm2.display()
        );
    }
}

criterion_group!(benches, train_step);
criterion_main!(benches);
