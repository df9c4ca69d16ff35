//! `helix-train bench`: one optimizer step — forward, backward, global-norm clipping and AdamW,
//! what a run does per step — timed on a fixed batch of random tokens, with the figures a GPU
//! run is judged by: tokens/s, model FLOP/s and MFU, peak memory. Weights come from the
//! configured model or, with `--random-weights`, are drawn for its shape (Llama-2-7B on a GPU
//! machine with no checkpoint). The criterion bench (benches/train_step.rs) times the same
//! [`StepBench`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use helix_data::{collate_padded, Batch, LossMode, PadOptions, Sample};
use helix_model::{LlamaConfig, SafetensorsWeights};
use helix_parallel::Job;
use helix_peft::{load_customized, Customized, Method, ModelLoad};
use serde_json::json;

use crate::config::ConfigFile;
use crate::device_name;
use crate::gradients::{forward_backward, ActivationCheckpointing, GradientOptions};
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig};
use crate::plan::model_flops_per_token;

/// A model, its optimizer and one batch: a training step that can be repeated.
pub struct StepBench {
    pub model: Customized,
    optimizer: AdamW,
    batch: Batch,
    job: Job,
    pub opts: GradientOptions,
}

impl StepBench {
    /// `rows` rows of `seq` random tokens; AdamW with betas (0.9, 0.999), no weight decay.
    pub fn new(model: Customized, rows: usize, seq: usize, opts: GradientOptions) -> Result<Self> {
        let vocab = model.model.config().vocab_size;
        let optimizer = AdamW::new(
            model.trainable(),
            AdamWConfig {
                betas: [0.9, 0.999],
                eps: 1e-8,
                weight_decay: 0.0,
            },
        )?;
        Ok(Self {
            model,
            optimizer,
            batch: random_batch(rows, seq, vocab)?,
            job: Job::single(Duration::from_secs(600)),
            opts,
        })
    }

    /// One optimizer step, finished on the device; its loss.
    pub fn step(&mut self) -> Result<f64> {
        Ok(self.step_timed()?.0)
    }

    /// One optimizer step, finished on the device: its loss and where its time went, the
    /// device synchronised at the end of each phase (the gradients' norm waits for the
    /// backward anyway, as its sum comes to the host).
    pub fn step_timed(&mut self) -> Result<(f64, StepPhases)> {
        let device = self.model.model.device().clone();
        let t = Instant::now();
        let batches = std::slice::from_ref(&self.batch);
        let (loss, _, grads) = forward_backward(&self.model, batches, &self.opts, &self.job, None)?;
        device.synchronize()?;
        let forward_backward_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let (_, scale) = clip_grad_norm(&grads, 1.0)?;
        let clip_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        self.optimizer.step(&grads, 1e-4, scale)?;
        device.synchronize()?;
        let optimizer_s = t.elapsed().as_secs_f64();
        let phases = StepPhases {
            forward_backward_s,
            clip_s,
            optimizer_s,
        };
        Ok((loss, phases))
    }

    /// Tokens the model runs per step (rows × seq).
    pub fn tokens(&self) -> usize {
        self.batch.rows * self.batch.seq_len
    }
}

/// Where a step's time went ([`StepBench::step_timed`]), in seconds.
#[derive(Clone, Copy, Debug)]
pub struct StepPhases {
    /// Forward and backward of every micro-batch.
    pub forward_backward_s: f64,
    /// The gradients' global norm and clipping coefficient.
    pub clip_s: f64,
    /// AdamW over every trainable tensor.
    pub optimizer_s: f64,
}

/// `rows` rows of `seq` pseudo-random token ids below `vocab`, the loss on every token after the
/// first of each row.
pub fn random_batch(rows: usize, seq: usize, vocab: usize) -> Result<Batch> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
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
    collate_padded(&refs, &PadOptions::default())
}

pub struct BenchOptions {
    /// Rows per step (default: batch.micro_batch_size).
    pub rows: Option<usize>,
    /// Tokens per row (default: data.max_seq_length).
    pub seq: Option<usize>,
    /// Keep only the first N decoder layers (what fits one GPU for full SFT).
    pub layers: Option<usize>,
    /// Draw the weights for the model's shape instead of reading them.
    pub random_weights: bool,
    pub warmup: usize,
    pub steps: usize,
    /// The peak the MFU is taken against (H100 SXM dense bf16: 989).
    pub peak_tflops: f64,
    pub json: bool,
}

/// Builds the configured model, times `opts.steps` steps after `opts.warmup`, prints the
/// figures (a table, or one JSON object).
pub fn bench(cfg: &ConfigFile, opts: &BenchOptions) -> Result<()> {
    if opts.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if opts.rows == Some(0) {
        bail!("--rows must be at least 1");
    }
    // One token predicts nothing: a row needs two for a loss.
    if opts.seq.is_some_and(|s| s < 2) {
        bail!("--seq must be at least 2");
    }
    if !(opts.peak_tflops > 0.0 && opts.peak_tflops.is_finite()) {
        bail!(
            "--peak-tflops must be a positive number, got {}",
            opts.peak_tflops
        );
    }
    let device = crate::device(0)?;
    let m = cfg
        .model
        .as_ref()
        .context("the config has no [model] section")?;
    let (mut shape, weights) = match (opts.random_weights, &m.preset, &m.path) {
        (true, Some(preset), _) => (LlamaConfig::preset(preset)?, None),
        (_, _, Some(dir)) => {
            let shape = LlamaConfig::from_file(&dir.join("config.json"))?;
            let weights = match opts.random_weights {
                true => None,
                false => Some(SafetensorsWeights::open_dir(dir)?),
            };
            (shape, weights)
        }
        (false, Some(_), None) => bail!(
            "model.preset only gives a shape: add --random-weights to bench it, or set model.path"
        ),
        (_, None, None) => bail!("set model.path or model.preset"),
    };
    if let Some(layers) = opts.layers {
        if layers == 0 || layers > shape.num_hidden_layers {
            bail!(
                "--layers {layers}: the model has {} decoder layers",
                shape.num_hidden_layers
            );
        }
        shape.num_hidden_layers = layers;
    }
    let dtype = cfg.model_dtype()?;
    let method = cfg.method()?;
    let seed = cfg.trainer.seed;
    let t0 = Instant::now();
    let weights = match weights {
        Some(w) => w,
        None => SafetensorsWeights::random(&shape, dtype, seed)?,
    };
    let how = ModelLoad {
        quantize_base: cfg.quantize_base()?,
        ..ModelLoad::new(dtype, device.clone())
    };
    let mut model = load_customized(&shape, &weights, &method, seed, &how)?;
    cfg.configure_model(&mut model.model)?;
    drop(weights);
    let load_s = t0.elapsed().as_secs_f64();
    let rows = opts.rows.unwrap_or(cfg.batch.micro_batch_size);
    let seq = match (opts.seq, &cfg.data) {
        (Some(seq), _) => seq,
        (None, Some(data)) => data.max_seq_length,
        (None, None) => bail!("no [data] section to take max_seq_length from: pass --seq"),
    };
    let grad_opts = GradientOptions {
        loss_chunk_rows: cfg.trainer.loss_chunk_rows,
        bucket_elems: usize::MAX,
        activation_checkpointing: cfg.trainer.activation_checkpointing,
    };
    let summary = model.summary();
    let attention = model.model.attention_name();
    let memory = MemoryPeak::start(&device);
    let mut bench = StepBench::new(model, rows, seq, grad_opts)?;
    if !opts.json {
        println!(
            "{} on {} ({} layers, {dtype:?}, {attention} attention), {rows} × {seq} tokens per \
             step, activation checkpointing {}: {summary}; built in {load_s:.1} s",
            method.name(),
            device_name(&device),
            shape.num_hidden_layers,
            bench.opts.activation_checkpointing.name()
        );
    }
    let mut losses = Vec::new();
    for i in 0..opts.warmup {
        let t = Instant::now();
        losses.push(bench.step()?);
        if !opts.json {
            println!("warm-up step {}: {:.3} s", i + 1, t.elapsed().as_secs_f64());
        }
    }
    let mut times = Vec::with_capacity(opts.steps);
    let mut phases = Vec::with_capacity(opts.steps);
    for i in 0..opts.steps {
        let t = Instant::now();
        let (loss, phase) = bench.step_timed()?;
        times.push(t.elapsed().as_secs_f64());
        losses.push(loss);
        phases.push(phase);
        if !opts.json {
            println!(
                "step {}: {:.3} s, loss {:.4}",
                i + 1,
                times[i],
                losses.last().unwrap()
            );
        }
    }
    let peak_device = memory.finish();
    let peak_host = crate::progress::peak_host_memory();
    let median = crate::progress::median(times.clone()).expect("--steps is at least 1");
    // Each phase's median over the timed steps (the phases follow one another and cover the
    // step, the batch's copy to the device being part of the forward).
    let median_of = |each: Vec<f64>| crate::progress::median(each).expect("--steps is at least 1");
    let (fb_s, clip_s, optimizer_s) = (
        median_of(phases.iter().map(|p| p.forward_backward_s).collect()),
        median_of(phases.iter().map(|p| p.clip_s).collect()),
        median_of(phases.iter().map(|p| p.optimizer_s).collect()),
    );
    let tokens = bench.tokens() as f64;
    let per_token = model_flops_per_token(&shape, &method, seq, true);
    let tflops = per_token * tokens / median / 1e12;
    let recompute = bench.opts.activation_checkpointing == ActivationCheckpointing::Full;
    let report = json!({
        "method": method.name(),
        "device": device_name(&device),
        "layers": shape.num_hidden_layers,
        "dtype": format!("{dtype:?}").to_lowercase(),
        "rows": rows,
        "seq": seq,
        "activation_checkpointing": recompute,
        "attention": attention,
        "median_step_s": median,
        "step_s": times,
        "median_phase_s": {
            "forward_backward": fb_s,
            "clip": clip_s,
            "optimizer": optimizer_s,
        },
        "tokens_per_s": tokens / median,
        "model_flops_per_token": per_token,
        "model_tflops_per_s": tflops,
        "mfu": tflops / opts.peak_tflops,
        "peak_tflops": opts.peak_tflops,
        "peak_device_bytes": peak_device,
        "peak_host_bytes": peak_host,
        "losses": losses,
    });
    if opts.json {
        println!("{report}");
        return Ok(());
    }
    println!(
        "median step {median:.3} s: {:.0} tokens/s, {tflops:.1} model TFLOP/s, MFU {:.1} % of \
         {:.0} TFLOP/s",
        tokens / median,
        100.0 * tflops / opts.peak_tflops,
        opts.peak_tflops
    );
    println!(
        "median phases: forward + backward {fb_s:.3} s, gradient norm and clipping {clip_s:.3} \
         s, AdamW {optimizer_s:.3} s"
    );
    println!(
        "model FLOPs per token: {} + 6·L·h·s (causal attention, forward and backward) = {:.3} \
         GFLOP{}",
        match method {
            Method::FullSft => "6·N",
            _ => "4·N (frozen base: no weight gradients)",
        },
        per_token / 1e9,
        if recompute {
            "; the recomputed forward is not counted"
        } else {
            ""
        }
    );
    if let Some(bytes) = peak_device {
        println!(
            "peak GPU memory in use: {} (whole device, polled every millisecond)",
            helix_peft::human_bytes(bytes as usize)
        );
    }
    if let Some(bytes) = peak_host {
        println!(
            "peak host memory: {}",
            helix_peft::human_bytes(bytes as usize)
        );
    }
    Ok(())
}

/// The most GPU memory in use (total − free: the whole device, as nvidia-smi counts it, so the
/// same measure for any framework) seen by a thread polling every millisecond; nothing on a CPU.
struct MemoryPeak {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MemoryPeak {
    fn start(device: &Device) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let thread = match device {
            #[cfg(feature = "cuda")]
            Device::Cuda(cuda) => {
                let context = cuda.cuda_stream().context().clone();
                let (stop, peak) = (stop.clone(), peak.clone());
                Some(std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok((free, total)) = context.mem_get_info() {
                            peak.fetch_max((total - free) as u64, Ordering::Relaxed);
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }))
            }
            _ => None,
        };
        Self { stop, peak, thread }
    }

    fn finish(mut self) -> Option<u64> {
        let thread = self.thread.take()?;
        self.stop.store(true, Ordering::Relaxed);
        thread.join().ok()?;
        Some(self.peak.load(Ordering::Relaxed))
    }
}
