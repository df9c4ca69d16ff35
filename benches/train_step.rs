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
//! Built with `--features cuda`, the `gpu_7b_step` group times LoRA on a Llama-2-7B-shaped
//! model with random weights (32 layers, hidden 4096, bf16, one row of 2048 tokens) on GPU 0.
//! The device machines have no Rust toolchain, so the GPU figures are taken with the same
//! `StepBench` through the one carried binary: `helix-train bench --random-weights`
//! (scripts/gpu-bench.sh), which also reports MFU and peak GPU memory.
//!
//! LoRA: r 8, alpha 16, the seven projections, no dropout. P-tuning: 20 virtual tokens, MLP
//! encoder of width 64. Loss on every token after the first of each row.

use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::{DType, Device};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use helix::model::{LlamaConfig, SafetensorsWeights};
use helix::peft::{load_for_method, LoraConfig, Method, PtuningConfig, LLAMA_TARGETS};
use helix::train::gradients::{ActivationCheckpointing, GradientOptions};
use helix::train::step_bench::StepBench;

/// A step of `method` on the model in `dir` (f32, CPU), `rows` rows of `seq` random tokens.
fn case(dir: &Path, method: Method, rows: usize, seq: usize) -> StepBench {
    // What helix-train does on the CPU (helix_train::device).
    helix::train::freed_memory::keep_freed_host_memory();
    let cfg = LlamaConfig::from_file(&dir.join("config.json")).expect("config.json");
    let weights = SafetensorsWeights::open_dir(dir).expect("weights");
    let model =
        load_for_method(&cfg, &weights, &method, 7, DType::F32, &Device::Cpu).expect("model");
    StepBench::new(model, rows, seq, GradientOptions::default()).expect("step")
}

fn lora() -> Method {
    let mut l = LoraConfig::new(8, 16.0, &LLAMA_TARGETS);
    l.lora_dropout = 0.0;
    Method::Lora(l)
}

fn bench_case(c: &mut Criterion, group: &str, name: &str, mut case: StepBench) {
    let mut g = c.benchmark_group(group);
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .throughput(Throughput::Elements(case.tokens() as u64));
    g.bench_function(name, |b| b.iter(|| case.step().expect("step")));
    g.finish();
}

fn train_step(c: &mut Criterion) {
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-gqa-untied-b3");
    for (name, method) in [
        ("lora", lora()),
        ("ptuning", Method::Ptuning(PtuningConfig::mlp(20, 64))),
        ("sft", Method::FullSft),
    ] {
        bench_case(c, "tiny_step", name, case(&tiny, method, 4, 64));
    }
    // What activation checkpointing costs: one more forward of the decoder layers.
    let mut recompute = case(&tiny, lora(), 4, 64);
    recompute.opts.activation_checkpointing = ActivationCheckpointing::Full;
    bench_case(c, "tiny_step", "lora_recompute", recompute);
    let smollm2 = std::env::var_os("HELIX_SMOLLM2").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("models/smollm2-135m-instruct"),
        PathBuf::from,
    );
    if smollm2.join("config.json").exists() {
        bench_case(
            c,
            "smollm2_step",
            "lora_4x256",
            case(&smollm2, lora(), 4, 256),
        );
    } else {
        eprintln!(
            "{}: not found; skipping the SmolLM2 step (scripts/fetch-smollm2.sh imports it)",
            smollm2.display()
        );
    }
    #[cfg(feature = "cuda")]
    gpu_7b_step(c);
}

/// LoRA (r 8, the seven projections) on the Llama-2-7B shape with random bf16 weights, GPU 0.
#[cfg(feature = "cuda")]
fn gpu_7b_step(c: &mut Criterion) {
    let device = Device::new_cuda(0).expect("GPU 0");
    let cfg = LlamaConfig::preset("llama2-7b").expect("preset");
    let weights = SafetensorsWeights::random(&cfg, DType::BF16, 7).expect("weights");
    let model = load_for_method(&cfg, &weights, &lora(), 7, DType::BF16, &device).expect("model");
    drop(weights);
    let step = StepBench::new(model, 1, 2048, GradientOptions::default()).expect("step");
    bench_case(c, "gpu_7b_step", "lora_1x2048_bf16", step);
}

criterion_group!(benches, train_step);
criterion_main!(benches);
