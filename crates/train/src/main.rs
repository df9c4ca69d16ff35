//! `helix-train`: the one binary of helix.
//! - `helix-train --config FILE [--set section.key=value ...]`   fine-tune (SFT, LoRA, P-tuning)
//! - `eval --config FILE [--checkpoint DIR]`   print the validation loss as JSON
//! - `import --gguf FILE --out DIR`   turn a llama GGUF into a Hugging Face model directory
//! - `generate --model DIR [--adapter DIR] --prompt TEXT [--chat]`   generate text with a KV
//!   cache, optionally through a LoRA or P-tuning adapter (helix's or PEFT's)
//! - `export --model DIR [--adapter DIR] --out DIR`   a Hugging Face directory, LoRA merged,
//!   sharded with an index
//! - `bench --config FILE [--random-weights]`   one training step timed: tokens/s, MFU, memory
//! - `comm-check [--tp N]`   the job's collectives checked and timed (under the launcher)
//! - `data-stats --config FILE | --data FILE --format F --tokenizer DIR`   what the data
//!   becomes (samples, tokens, truncation, packing, splits), as JSON

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::Parser;
use helix_model::gguf::{import_gguf, ImportOptions};
use helix_model::hf_export::{parse_size, source_dtype, ExportOptions};
use helix_model::{
    read_chat_template_file, LlamaConfig, ModelDir, OrderedJson, SamplingOptions, TextCodec,
    CHAT_TEMPLATE_FILE,
};
use helix_parallel::launch::{launch, LaunchOptions};
use helix_peft::{export_merged, load_with_adapter_as, Customized, ModelLoad};

use helix_train::config::ConfigFile;
use helix_train::device;
use helix_train::recipe::{evaluate, train};

mod cli;
mod data_stats;

use cli::{Cli, Command};

fn main() {
    let cli = Cli::parse();
    if let Some(nproc) = cli.nproc_per_node {
        let opts = LaunchOptions {
            nproc_per_node: nproc,
            nnodes: cli.nnodes,
            node_rank: cli.node_rank,
            master_addr: cli.master_addr.clone(),
            master_port: cli.master_port,
        };
        let status = std::env::current_exe()
            .context("cannot find this executable to start the ranks")
            .and_then(|exe| launch(&opts, &exe, &rank_args()));
        match status {
            Ok(code) => std::process::exit(code),
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::exit(1);
            }
        }
    }
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// This command line without the launcher's options: what every rank runs.
fn rank_args() -> Vec<std::ffi::OsString> {
    const LAUNCHER: [&str; 5] = [
        "--nproc-per-node",
        "--nnodes",
        "--node-rank",
        "--master-addr",
        "--master-port",
    ];
    let mut out = Vec::new();
    let mut args = std::env::args_os().skip(1);
    while let Some(a) = args.next() {
        let text = a.to_string_lossy();
        if LAUNCHER.contains(&text.as_ref()) {
            args.next(); // its value
        } else if !LAUNCHER.iter().any(|f| text.starts_with(&format!("{f}="))) {
            out.push(a);
        }
    }
    out
}

fn run(cli: Cli) -> Result<()> {
    let config = || -> Result<(PathBuf, ConfigFile)> {
        let path = cli
            .config
            .clone()
            .context("--config FILE is required (see configs/)")?;
        let cfg = ConfigFile::load_with(&path, &cli.set)?;
        Ok((path, cfg))
    };
    let Some(command) = cli.command else {
        let (path, cfg) = config()?;
        return run_training(&path, &cfg);
    };
    if let Some(name) = command.without_config() {
        if cli.config.is_some() || !cli.set.is_empty() {
            bail!("`helix-train {name}` reads no config: its flags say what it does (drop --config and --set)");
        }
    }
    if !cli.set.is_empty() && cli.config.is_none() {
        bail!("--set needs --config");
    }
    match command {
        Command::Train => {
            let (path, cfg) = config()?;
            run_training(&path, &cfg)
        }
        Command::Plan {
            nodes,
            gpus_per_node,
            tokens_per_sample,
            mfu,
            json,
        } => {
            let (path, cfg) = config()?;
            let m = cfg
                .model
                .as_ref()
                .with_context(|| format!("{}: no [model] section", path.display()))?;
            let model = match (&m.preset, &m.path) {
                (Some(p), _) => LlamaConfig::preset(p)?,
                (None, Some(dir)) => LlamaConfig::from_file(&dir.join("config.json"))?,
                (None, None) => bail!("{}: set model.preset or model.path", path.display()),
            };
            let data = cfg.data(&path)?;
            for (flag, v) in [("--nodes", nodes), ("--gpus-per-node", gpus_per_node)] {
                if v == 0 {
                    bail!("{flag} must be at least 1");
                }
            }
            if tokens_per_sample == Some(0) {
                bail!("--tokens-per-sample must be at least 1");
            }
            // As training: one micro-batch per data-parallel rank a step unless set.
            let data_parallel =
                (nodes * gpus_per_node / cfg.parallel.tensor_parallel.max(1)).max(1);
            let job = helix_train::plan::Job {
                model,
                preset: m.preset.clone(),
                method: cfg.method()?,
                dtype_bytes: cfg.model_dtype()?.size_in_bytes(),
                tokens_per_sample: tokens_per_sample.unwrap_or(data.max_seq_length),
                micro_batch: cfg.batch.micro_batch_size,
                global_batch: cfg
                    .batch
                    .global_batch_size
                    .unwrap_or(cfg.batch.micro_batch_size * data_parallel),
                nodes,
                gpus_per_node,
                tensor_parallel: cfg.parallel.tensor_parallel,
                zero1: cfg.parallel.zero1,
                recompute: cfg.trainer.activation_checkpointing
                    == helix_train::gradients::ActivationCheckpointing::Full,
                sequence_parallel: cfg.parallel.sequence_parallel,
                quantize_base: cfg.quantize_base()?,
            };
            let mut hw = helix_train::plan::Hardware::default();
            if let Some(mfu) = mfu {
                if !(mfu > 0.0 && mfu <= 1.0) {
                    bail!("--mfu must be in (0, 1], got {mfu}");
                }
                hw.mfu = mfu;
            }
            let plan = helix_train::plan::plan(&job, &hw)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({"hardware": hw, "plan": plan})
                    )?
                );
            } else {
                print!("{}", helix_train::plan::render(&job, &hw, &plan));
            }
            Ok(())
        }
        Command::Eval { checkpoint } => {
            let (path, cfg) = config()?;
            let v = evaluate(&cfg, &path, checkpoint.as_deref())?;
            println!("{}", serde_json::json!({ "val_loss": v }));
            Ok(())
        }
        Command::Import { gguf, out, dtype } => {
            let t = Instant::now();
            let report = import_gguf(
                &gguf,
                &out,
                &ImportOptions {
                    dtype: dtype.into(),
                },
            )?;
            eprintln!(
                "imported {} tensors ({:.1} M parameters) from {} into {} in {:.1} s",
                report.tensors,
                report.parameters as f64 / 1e6,
                gguf.display(),
                out.display(),
                t.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::Generate {
            model,
            adapter,
            prompt,
            chat,
            system,
            chat_template,
            tools,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            dtype,
            quantize_base,
            print_ids,
        } => {
            let dir = ModelDir::open(&model)?;
            let mut codec = TextCodec::open(&model)?;
            // --chat-template, else the template the adapter was trained with, if it has one.
            let adapters_own = adapter.as_deref().map(|a| a.join(CHAT_TEMPLATE_FILE));
            match (&chat_template, adapters_own.filter(|f| chat && f.exists())) {
                (Some(file), _) => codec
                    .set_chat_template_file(file)
                    .context("--chat-template")?,
                (None, Some(file)) => {
                    codec.set_chat_template_file(&file)?;
                    eprintln!("chat template: {} (the adapter's)", file.display());
                }
                (None, None) => {}
            }
            let device = device(0)?;
            let how = ModelLoad {
                quantize_base: quantize_base.into(),
                ..ModelLoad::new(dtype.into(), device)
            };
            let model = load_model(&dir, adapter.as_deref(), &how)?;
            let prompt_ids = if chat {
                let mut messages = Vec::new();
                if let Some(s) = &system {
                    messages.push(OrderedJson::message("system", s));
                }
                messages.push(OrderedJson::message("user", &prompt));
                let tools = tools.as_deref().map(read_tools).transpose()?;
                let text = codec.render_chat(&messages, tools.as_ref(), true)?;
                codec.encode(&text, false)?
            } else {
                if system.is_some() {
                    bail!("--system needs --chat");
                }
                codec.encode(&prompt, true)?
            };
            let mut stop = dir.config.eos_token_ids.clone();
            if let Some(eos) = codec.eos_token.as_deref().and_then(|t| codec.token_id(t)) {
                stop.push(eos);
            }
            if chat {
                // ChatML-style templates end a turn with their own token.
                if let Some(id) = codec.token_id("<|im_end|>") {
                    stop.push(id);
                }
            }
            let opts = SamplingOptions {
                max_new_tokens,
                temperature,
                top_k,
                top_p,
                seed,
                stop_tokens: stop.clone(),
            };
            let t = Instant::now();
            let mut printed = String::new();
            let mut ids_so_far = Vec::new();
            let mut stdout = std::io::stdout();
            let new_ids = model
                .generate(&prompt_ids, &opts, |id| {
                    // Decode the whole continuation each time so multi-byte characters print whole.
                    ids_so_far.push(id);
                    if stop.contains(&id) {
                        return Ok(());
                    }
                    let text = codec.decode(&ids_so_far, true)?;
                    if let Some(new) = text.strip_prefix(printed.as_str()) {
                        write!(stdout, "{new}")?;
                        stdout.flush()?;
                        printed = text;
                    }
                    Ok(())
                })
                .context("generation failed")?;
            println!();
            let secs = t.elapsed().as_secs_f64();
            if print_ids {
                println!(
                    "{}",
                    serde_json::json!({ "prompt_ids": prompt_ids, "new_ids": new_ids })
                );
            }
            eprintln!(
                "{} prompt tokens, {} new tokens in {:.2} s ({:.1} tokens/s)",
                prompt_ids.len(),
                new_ids.len(),
                secs,
                new_ids.len() as f64 / secs
            );
            Ok(())
        }
        Command::Export {
            model,
            adapter,
            out,
            dtype,
            max_shard_size,
        } => {
            let t = Instant::now();
            let dir = ModelDir::open(&model)?;
            let base_dtype = source_dtype(&model)?.unwrap_or(DType::F32);
            let opts = ExportOptions {
                dtype: dtype.map_or(base_dtype, DType::from),
                max_shard_bytes: parse_size(&max_shard_size).context("--max-shard-size")?,
                // The template the adapter was trained with, when it has its own.
                chat_template: adapter
                    .as_deref()
                    .map(read_chat_template_file)
                    .transpose()?
                    .flatten(),
            };
            let how = ModelLoad::new(base_dtype, Device::Cpu);
            let c = load_model(&dir, adapter.as_deref(), &how)?;
            let report = export_merged(&c, &model, &out, &opts)?;
            eprintln!(
                "wrote {} ({} file{}, {:.1} MB{}) in {:.1} s",
                out.display(),
                report.files.len(),
                if report.files.len() == 1 { "" } else { "s" },
                report.total_bytes as f64 / 1e6,
                c.lora
                    .as_ref()
                    .map_or(String::new(), |l| format!(", {} merged", l.cfg.name())),
                t.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::KernelCheck { repeats, op } => {
            let device = helix_train::device(0)?;
            if !helix_train::kernel_check::kernel_check(&device, repeats, &op)? {
                bail!("a fused kernel differs from its reference beyond the tolerance");
            }
            println!("every fused kernel matches its reference");
            Ok(())
        }
        Command::AttentionBench {
            batch,
            heads,
            kv_heads,
            seq,
            head_dim,
            dtype,
            forward_rows,
            warmup,
            repeats,
            json,
        } => {
            let device = helix_train::device(0)?;
            let opts = helix_train::attention_bench::AttentionBenchOptions {
                batch,
                q_heads: heads,
                kv_heads: kv_heads.unwrap_or(heads),
                seq,
                head_dim,
                dtype: dtype.into(),
                forward_tile: forward_rows.into(),
                warmup,
                repeats,
            };
            helix_train::attention_bench::print_attention_bench(&device, &opts, json)
        }
        Command::Bench {
            random_weights,
            layers,
            rows,
            seq,
            warmup,
            steps,
            peak_tflops,
            json,
        } => {
            let (_, cfg) = config()?;
            let opts = helix_train::step_bench::BenchOptions {
                rows,
                seq,
                layers,
                random_weights,
                warmup,
                steps,
                peak_tflops,
                json,
            };
            helix_train::step_bench::bench(&cfg, &opts)
        }
        Command::CommCheck {
            tp,
            megabytes,
            repeats,
            timeout_s,
        } => {
            let opts = helix_train::comm_check::CommCheckOptions {
                tp,
                megabytes,
                repeats,
                timeout: helix_train::config::timeout_from_seconds(timeout_s)
                    .context("--timeout-s")?,
            };
            if !helix_train::comm_check::comm_check(&opts)? {
                bail!("a collective returned a wrong result");
            }
            Ok(())
        }
        Command::DataStats(args) => data_stats::run(args, cli.config.as_deref(), &cli.set),
    }
}

/// The model of `dir`, frozen, with the adapter in `adapter` applied; prints what trains in it,
/// as PEFT's `print_trainable_parameters` does.
fn load_model(
    dir: &ModelDir,
    adapter: Option<&std::path::Path>,
    how: &ModelLoad,
) -> Result<Customized> {
    let Some(adapter) = adapter else {
        let model = dir.load_inference_quantized(how.dtype, &how.device, how.quantize_base)?;
        return Ok(Customized::frozen(model));
    };
    let c = load_with_adapter_as(&dir.config, &dir.weights, adapter, how)
        .with_context(|| format!("loading the adapter {}", adapter.display()))?;
    let kind = c.lora.as_ref().map_or("P-tuning", |l| l.cfg.name());
    eprintln!("{kind} adapter {}: {}", adapter.display(), c.summary());
    Ok(c)
}

fn run_training(path: &std::path::Path, cfg: &ConfigFile) -> Result<()> {
    let t = Instant::now();
    let r = train(cfg, path)?;
    if r.rank != 0 {
        return Ok(());
    }
    let how = if r.preempted {
        "stopped by a signal after saving"
    } else {
        "finished"
    };
    let val = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
    eprintln!(
        "{how} at step {}/{} (started at {}) in {:.1} s; validation loss {} → {}; median {:.0} tokens/s",
        r.last_step,
        r.total_steps,
        r.resumed_from,
        t.elapsed().as_secs_f64(),
        val(r.val_loss_before),
        val(r.val_loss_after),
        r.median_tokens_per_s
    );
    if let Some(peak) = r.peak_host_bytes {
        eprintln!(
            "peak host memory {:.0} MiB (activation checkpointing: {})",
            peak as f64 / (1u64 << 20) as f64,
            cfg.trainer.activation_checkpointing.name()
        );
    }
    for p in &r.outputs {
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}

/// `generate --tools FILE`: a JSON list of tool schemas, as a conversation row's `tools`.
fn read_tools(path: &Path) -> Result<OrderedJson> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--tools: cannot read {}", path.display()))?;
    let tools: OrderedJson = serde_json::from_str(&text)
        .with_context(|| format!("--tools: {} is not JSON", path.display()))?;
    match &tools {
        OrderedJson::Array(schemas)
            if schemas.iter().all(|s| matches!(s, OrderedJson::Object(_))) =>
        {
            Ok(tools)
        }
        _ => bail!(
            "--tools: {} must hold a JSON list of tool schemas (objects)",
            path.display()
        ),
    }
}
