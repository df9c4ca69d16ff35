//! The fine-tuning recipe, top to bottom, as a torchtune recipe reads: the model and what trains
//! in it, the data, the optimizer and schedule, where to start (a checkpoint or afresh), the
//! loop (micro-batches → loss normalised by the step's target tokens → backward → clip →
//! AdamW), validation, checkpoints, and at the end the adapter or model and the plots.
//!
//! Data parallelism (issue 6) plugs in where the comments say "all ranks": the step's target
//! count and its gradients are summed over ranks there.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::state::{CHAT_TEMPLATE_KEY, HELD_OUT_CHAT_TEMPLATE_KEY};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use helix_ckpt::{BackgroundWriter, CheckpointStore};
use helix_data::{eval_batches, prepare, Batch, BatchStream, DataTokenizer};
use helix_model::hf_export::parse_size;
use helix_model::linear::Quantization;
use helix_model::ModelDir;
use helix_parallel::Job;
use helix_peft::{load_customized, read_adapter, Adapter, Customized, Method, ModelLoad};

use crate::config::ConfigFile;
use crate::gradients::{forward_backward, global_grad_norm, DeviceBatch, GradientOptions};
use crate::optim::{clip_scale, AdamW, AdamWConfig};
use crate::outputs::{check_outputs_replaceable, lock_output_dir, write_outputs};
use crate::progress::{
    peak_host_memory, read_metrics, write_plots, MetricsLog, Progress, StepMetrics,
};
use crate::schedule::{Schedule, ScheduleKind};
use crate::signals::StopRequest;
use crate::state::{
    check_same_model, check_same_run, choose_checkpoint, restore, restore_trainable, run_layout,
    snapshot, RunRecord, StoreSaveRendezvous,
};
use crate::tensorboard::{hparams_of, SessionStatus};

/// How a run ended.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// This process's rank (0 when alone); only rank 0 reports.
    pub rank: usize,
    pub resumed_from: u64,
    pub last_step: u64,
    pub total_steps: u64,
    /// Stopped by SIGTERM / SIGINT after saving.
    pub preempted: bool,
    pub val_loss_before: Option<f64>,
    pub val_loss_after: Option<f64>,
    /// Median over this run's steps.
    pub median_tokens_per_s: f64,
    /// This process's peak resident memory, where the OS reports it.
    pub peak_host_bytes: Option<u64>,
    pub outputs: Vec<PathBuf>,
}

/// `helix-train --config FILE`, in this process alone or as one rank of a job (RANK /
/// WORLD_SIZE / MASTER_ADDR from `--nproc-per-node`, srun or another launcher).
pub fn train(cfg: &ConfigFile, config_path: &Path) -> Result<RunSummary> {
    cfg.validate_training(1)?;
    // 0. The job: rank 0 serves the rendezvous; every rank joins the data-parallel ring. An
    //    error on any rank fails the job with its message on every rank.
    Job::from_env(cfg.timeout()?, cfg.parallel.tensor_parallel)?
        .run(|job| train_rank(cfg, config_path, job))
}

/// This rank's part of [`train`].
fn train_rank(cfg: &ConfigFile, config_path: &Path, job: &mut Job) -> Result<RunSummary> {
    let t = &cfg.trainer;
    cfg.validate_training(job.dp.size)?;
    let main = job.is_main();
    let say = |msg: String| {
        if main {
            eprintln!("{msg}")
        }
    };
    let device = crate::device(job.local_rank)?;
    job.use_device(&device)?;
    std::fs::create_dir_all(&t.output_dir)
        .with_context(|| format!("cannot create {}", t.output_dir.display()))?;
    // One job at a time in an output directory: a second would clear the first's checkpoint
    // in progress and write into its metrics. Rank 0 holds the lock until the run ends; every
    // rank stops with its refusal.
    let lock = main.then(|| lock_output_dir(&t.output_dir));
    let refusal = match &lock {
        Some(Err(e)) => format!("{e:#}"),
        // The outputs are written at the end: a directory they may not replace is named now,
        // not after the run.
        Some(Ok(_)) => match check_outputs_replaceable(cfg) {
            Err(e) => format!("{e:#}"),
            Ok(()) => String::new(),
        },
        None => String::new(),
    };
    let refusal = job.broadcast_text(&refusal)?;
    if !refusal.is_empty() {
        bail!("{refusal}");
    }

    // 1. Data: tokenized once (rank 0 fills the token cache the others then read), then this
    //    rank's share of every micro-step. Before the model, whose load takes minutes at 70B:
    //    a missing file or a bad template is named at once.
    if !main {
        job.barrier("data")?;
    }
    let Data {
        train: mut stream,
        validation,
        sha256,
        own_chat_template,
    } = Data::load(cfg, config_path, job)?;
    if main {
        job.barrier("data")?;
    }
    let accumulation = cfg.accumulation(job.dp.size)?;

    // 2. Where to start: the newest valid checkpoint (resume = "auto"), or afresh. Rank 0
    //    chooses (after clearing what crashed saves left, before any rank can write into a
    //    `.tmp` directory again); every rank loads the same one, once the model is there. A
    //    config that differs from the checkpoint's is named now, before the model loads.
    let run = RunRecord::new(cfg, job, sha256)?;
    // Every rank trains what rank 0 does: the same config, data and helix.
    let rank_0: RunRecord =
        serde_json::from_str(&job.broadcast_text(&serde_json::to_string(&run)?)?)
            .context("rank 0's run record")?;
    let differ = run.differences_from(&rank_0);
    if !differ.is_empty() {
        bail!(
            "this rank would train something else than rank 0: {} differ; start every rank \
             with the same config, data files and helix-train",
            differ.join(", ")
        );
    }
    let store = checkpoint_store(cfg)?;
    let chosen = match main {
        true => {
            store.remove_incomplete()?;
            choose_checkpoint(cfg, &store, |w| eprintln!("{w}"))?
                .map(|d| d.display().to_string())
                .unwrap_or_default()
        }
        false => String::new(),
    };
    let chosen = job.broadcast_text(&chosen)?;
    let resume = match chosen.is_empty() {
        true => None,
        false => {
            let dir = PathBuf::from(chosen);
            let state = check_same_run(&dir, &run, say)?;
            Some((dir, state))
        }
    };

    // 3. The model and what trains in it: identical on every rank; dropout draws differ.
    let method = cfg.method()?;
    let model_dir = ModelDir::open(model_path(cfg)).context("model.path")?;
    let model = load_model(cfg, &model_dir, &method, &device, job)?;
    // Data-parallel ranks draw different masks; tensor-parallel ranks share theirs.
    model.set_dropout_stream(job.dp.index as u64);
    say(format!(
        "{} on {}: {}",
        method.name(),
        model_dir.path.display(),
        model.summary()
    ));
    let (held, dense) = model.model.projection_bytes()?;
    if held < dense {
        let mib = |b: usize| b as f64 / (1u64 << 20) as f64;
        say(format!(
            "model.quantize_base = \"nf4\": the projections hold {:.1} MiB ({:.1} MiB in {:?})",
            mib(held),
            mib(dense),
            model.model.dtype()
        ));
    }

    // 4. How long, how fast.
    let total_steps = total_steps(cfg, stream.steps_per_epoch(), accumulation)?;
    let s = &cfg.schedule;
    let schedule = Schedule::new(
        ScheduleKind::parse(&s.name)?,
        cfg.optimizer.lr,
        s.min_lr,
        s.warmup_steps,
        s.warmup_ratio,
        total_steps,
    );
    let mut optimizer = AdamW::new(
        model.trainable(),
        AdamWConfig {
            betas: cfg.optimizer.betas,
            eps: cfg.optimizer.eps,
            weight_decay: cfg.optimizer.weight_decay,
        },
    )?;
    if cfg.parallel.zero1 {
        optimizer.shard_state(job.dp.index, job.dp.size)?;
    }

    // 5. Where to start, chosen in 2: restore it into the model, optimizer and data stream.
    let mut step = 0;
    if let Some((dir, state)) = &resume {
        restore(dir, state, &model, &mut optimizer, &mut stream)?;
        step = state.step;
        say(format!("resumed from {} (step {step})", dir.display()));
        let now = run_layout(cfg, job)?;
        let changed = state.layout_changes(&now);
        // Each rank quantizes its own shard: NF4's scales depend on the split.
        let tp = "parallel.tensor_parallel";
        let tp_changed = (state.run.layout.get(tp))
            .zip(now.get(tp))
            .is_some_and(|(before, after)| before != after);
        if cfg.quantize_base()? == Quantization::Nf4 && tp_changed {
            bail!(
                "{}: resumed with {}, but under model.quantize_base = \"nf4\" each rank \
                 quantizes its own shard, so the frozen weights depend on \
                 parallel.tensor_parallel: resume at the tensor-parallel size the run started with",
                dir.display(),
                changed.join(", ")
            );
        }
        if !changed.is_empty() {
            say(format!(
                "note: resumed with {}; these change only rounding, so the losses follow an \
                 uninterrupted run's closely but not bit for bit",
                changed.join(", ")
            ));
        }
        if state.other_dropout_masks(&now) {
            say(format!(
                "note: {} was written by a helix that drew dropout masks on the host from \
                 another generator; from here on the masks differ from those an uninterrupted \
                 run would have drawn (at the same rate)",
                dir.display()
            ));
        }
    }
    let resumed_from = step;
    say(format!(
        "{total_steps} steps of {accumulation} micro-batch(es) × {} rows × {} data-parallel \
         rank(s), tensor parallel {}{}, on {} (collectives: {}); {} micro-batches per epoch; \
         optimizer state {} on this rank{}; checkpoints in {}",
        cfg.batch.micro_batch_size,
        job.dp.size,
        job.tp.size,
        match cfg.parallel.sequence_parallel && job.tp.size > 1 {
            true => " with sequence parallelism",
            false => "",
        },
        crate::device_name(&device),
        job.backend(),
        stream.steps_per_epoch(),
        helix_peft::human_bytes(optimizer.state_bytes()),
        if optimizer.is_sharded() {
            " (ZeRO-1)"
        } else {
            ""
        },
        store.root.display()
    ));

    // 5. The loop.
    //    Rank 0 alone shows progress and writes metrics and checkpoints.
    let mut metrics = main
        .then(|| MetricsLog::open(&t.output_dir, step, cfg.output.tensorboard))
        .transpose()?;
    if let Some(events) = metrics.as_ref().and_then(MetricsLog::event_file) {
        let dir = events.parent().unwrap_or(Path::new("."));
        let foreign = crate::tensorboard::foreign_event_files(dir)?;
        if !foreign.is_empty() {
            say(format!(
                "note: {} also holds {} event file(s) helix did not write ({}); TensorBoard \
                 shows their values in this run too",
                dir.display(),
                foreign.len(),
                foreign[0].display()
            ));
        }
    }
    if let Some(events) = metrics.as_mut().and_then(MetricsLog::tensorboard) {
        // The config this run computes with, in TensorBoard's Text tab (a markdown code block).
        let toml = toml::to_string(cfg).context("the config as TOML")?;
        let block: Vec<String> = toml.lines().map(|l| format!("    {l}")).collect();
        events.write_text(step, "config", &block.join("\n"))?;
        // And its values as hyperparameters, for the HParams dashboard's table of runs.
        let values = serde_json::to_value(cfg).context("the config as JSON")?;
        events.write_session_start(step, &hparams_of(&values))?;
    }
    let stop = StopRequest::install()?;
    let progress = Progress::new(total_steps, step, main);
    let peers = StoreSaveRendezvous::for_job(job)?;
    let mut writer = BackgroundWriter::spawn(store.clone(), peers.map(|p| Box::new(p) as _));
    let chunk = t.loss_chunk_rows;
    let bucket = (cfg.parallel.bucket_mb * 1e6 / 4.0) as usize;
    let grad_opts = GradientOptions {
        loss_chunk_rows: chunk,
        bucket_elems: bucket,
        activation_checkpointing: t.activation_checkpointing,
    };
    // ZeRO-1's owners are fixed for the run: which gradients each rank receives.
    let zero1 = optimizer.is_sharded().then(|| optimizer.owner_order());
    let val_every = t.val_check_interval;
    let mut val_loss_before = None;
    let mut val_loss_after = None;
    if step == 0 && !validation.is_empty() {
        let v = validate(&model, &validation, chunk, job)?;
        if let Some(m) = &mut metrics {
            m.write(&StepMetrics {
                step: 0,
                val_loss: Some(v),
                ..Default::default()
            })?;
        }
        progress.println(format!("validation loss before training: {v:.4}"));
        val_loss_before = Some(v);
    }
    let mut rates = Vec::new();
    let mut stall = Duration::ZERO;
    let mut preempted = false;
    while step < total_steps {
        let t0 = Instant::now();
        let batches = (0..accumulation)
            .map(|_| stream.next_batch())
            .collect::<Result<Vec<_>>>()?;
        let (loss, tokens, grads) =
            forward_backward(&model, &batches, &grad_opts, job, zero1.as_deref())?;
        let grad_norm = global_grad_norm(&grads, &model, job, zero1.is_some())?;
        if !loss.is_finite() || !grad_norm.is_finite() {
            writer.wait()?;
            if let Some(events) = metrics.as_mut().and_then(MetricsLog::tensorboard) {
                // The HParams dashboard's status: this run stopped on its numbers.
                events.write_session_end(step, SessionStatus::Failure)?;
            }
            let last = store.list_complete()?.first().map_or_else(
                || "none was written".to_string(),
                |(_, d)| format!("{} is kept", d.display()),
            );
            bail!(
                "step {}: the loss is {loss} and the gradient norm {grad_norm}; stopping \
                 without applying or saving this step (the last good checkpoint: {last})",
                step + 1
            );
        }
        let lr = schedule.lr(step);
        // Clipping scales the gradients inside the update.
        optimizer.step(&grads, lr, clip_scale(grad_norm, t.gradient_clip_val))?;
        if optimizer.is_sharded() {
            optimizer.sync_params(job, bucket)?;
        }
        step += 1;

        let secs = t0.elapsed().as_secs_f64();
        rates.push(tokens as f64 / secs);
        let mut m = StepMetrics {
            step,
            loss: Some(loss),
            lr: Some(lr),
            grad_norm: Some(grad_norm),
            tokens: Some(tokens),
            tokens_per_s: Some(tokens as f64 / secs),
            step_time_s: Some(secs),
            ..Default::default()
        };
        let last = step == total_steps;
        if !validation.is_empty() && (last || (val_every > 0 && step % val_every == 0)) {
            let v = validate(&model, &validation, chunk, job)?;
            progress.println(format!("step {step}: validation loss {v:.4}"));
            m.val_loss = Some(v);
            val_loss_after = Some(v);
        }
        // All ranks stop at the same step when any was asked to.
        let mut asked = [f64::from(u8::from(stop.requested()))];
        job.sum_all_f64(&mut asked)?;
        preempted = asked[0] > 0.0;
        let save = preempted || last || (t.save_interval > 0 && step % t.save_interval == 0);
        // Every rank writes its own pieces; rank 0 seals the checkpoint.
        if save {
            let ckpt = snapshot(step, total_steps, &run, &model, &optimizer, job, &stream)?;
            let (prev, waited) = writer.submit(ckpt)?;
            stall += waited;
            m.ckpt_stall_s = Some(waited.as_secs_f64());
            if let Some(r) = prev {
                progress.println(saved_line(&r));
            }
        }
        if let Some(log) = &mut metrics {
            log.write(&m)?;
        }
        progress.step(&m);
        std::thread::sleep(test_step_delay());
        if preempted {
            progress.println(format!(
                "stop requested: saving step {step} and exiting (a second signal aborts)"
            ));
            break;
        }
    }
    if let Some(r) = writer.wait()? {
        progress.println(saved_line(&r));
    }
    progress.finish();
    if stall > Duration::ZERO {
        say(format!(
            "training waited {:.2} s in all for checkpoints still being written",
            stall.as_secs_f64()
        ));
    }

    // 6. What the run leaves behind (gathered over rank 0's tensor-parallel group; rank 0
    //    writes).
    let mut outputs = Vec::new();
    if let Some(log) = &metrics {
        outputs = write_plots(&t.output_dir, &read_metrics(&log.path)?)?;
        outputs.extend(log.event_file().map(Path::to_path_buf));
    }
    if !preempted && job.dp.index == 0 {
        outputs.extend(write_outputs(
            cfg,
            &model,
            &model_dir,
            &method,
            own_chat_template.as_deref(),
            main,
        )?);
    }
    if let (false, Some(events)) = (
        preempted,
        metrics.as_mut().and_then(MetricsLog::tensorboard),
    ) {
        // The HParams dashboard's status: the run reached its end and wrote its outputs.
        events.write_session_end(step, SessionStatus::Success)?;
    }
    Ok(RunSummary {
        rank: job.rank,
        resumed_from,
        last_step: step,
        total_steps,
        preempted,
        val_loss_before,
        val_loss_after,
        median_tokens_per_s: crate::progress::median(rates).unwrap_or(0.0),
        peak_host_bytes: peak_host_memory(),
        outputs,
    })
}

/// `helix-train eval --config FILE [--checkpoint DIR]`: the validation loss of the model as
/// configured (fresh adapters, or `init_from`), or with a checkpoint's trainable tensors.
pub fn evaluate(cfg: &ConfigFile, config_path: &Path, checkpoint: Option<&Path>) -> Result<f64> {
    cfg.validate_training(1)?;
    let device = crate::device(0)?;
    let method = cfg.method()?;
    let model_dir = ModelDir::open(model_path(cfg)).context("model.path")?;
    let job = Job::single(cfg.timeout()?);
    let model = load_model(cfg, &model_dir, &method, &device, &job)?;
    if let Some(dir) = checkpoint {
        helix_ckpt::verify(dir)?;
        check_same_model(dir, cfg)?;
        restore_trainable(dir, &model)?;
    }
    let validation = Data::load(cfg, config_path, &job)?.validation;
    if validation.is_empty() {
        bail!("no validation data: set data.validation or data.validation_fraction");
    }
    validate(&model, &validation, cfg.trainer.loss_chunk_rows, &job)
}

/// Which key gave the tokenizer's directory, for errors: `data.tokenizer` or `model.path`.
fn tokenizer_key(cfg: &ConfigFile, dir: &Path) -> String {
    match cfg.data.as_ref().is_some_and(|d| d.tokenizer.is_some()) {
        true => format!("data.tokenizer = {}", dir.display()),
        false => format!("the tokenizer of model.path = {}", dir.display()),
    }
}

fn model_path(cfg: &ConfigFile) -> &Path {
    cfg.model
        .as_ref()
        .and_then(|m| m.path.as_deref())
        .expect("validate_training checked model.path")
}

fn checkpoint_store(cfg: &ConfigFile) -> Result<CheckpointStore> {
    Ok(CheckpointStore::new(
        cfg.trainer.output_dir.join("checkpoints"),
        cfg.trainer.save_total_limit,
        parse_size(&cfg.output.max_shard_size)?,
    ))
}

/// The model for `method` (this rank's shards under tensor parallelism): fresh adapters from
/// the seed, or the adapter of `method.init_from` (PEFT's or helix's).
fn load_model(
    cfg: &ConfigFile,
    dir: &ModelDir,
    method: &Method,
    device: &Device,
    job: &Job,
) -> Result<Customized> {
    let how = ModelLoad {
        dtype: cfg.model_dtype()?,
        device: device.clone(),
        tensor_parallel: job.tensor_parallel(),
        quantize_base: cfg.quantize_base()?,
    };
    let mut c = load_customized(&dir.config, &dir.weights, method, cfg.trainer.seed, &how)?;
    cfg.configure_model(&mut c.model)?;
    let Some(from) = cfg.method.as_ref().and_then(|m| m.init_from.as_deref()) else {
        return Ok(c);
    };
    let source = from.join(helix_peft::peft_format::ADAPTER_WEIGHTS);
    let adapter = read_adapter(from, device)
        .with_context(|| format!("method.init_from = {}", from.display()))?;
    let whole = match (method, adapter) {
        (Method::Lora(want), Adapter::Lora { cfg: got, tensors }) => {
            let differ = want.differences(&got);
            if !differ.is_empty() {
                bail!(
                    "method.init_from = {}: the adapter's LoRA settings differ from [lora] \
                     (config vs adapter): {}",
                    from.display(),
                    differ.join(", ")
                );
            }
            tensors
        }
        (
            Method::Ptuning(_),
            Adapter::Ptuning {
                encoder: Some(state),
                ..
            },
        ) => state
            .into_iter()
            .map(|(k, t)| (format!("{}{k}", helix_peft::ptuning::ENCODER_PREFIX), t))
            .collect(),
        (Method::Ptuning(_), Adapter::Ptuning { encoder: None, .. }) => bail!(
            "method.init_from = {}: PEFT saves only P-tuning's virtual tokens, not its \
             encoder; continue from an adapter helix saved (with prompt_encoder.safetensors)",
            from.display()
        ),
        (_, a) => bail!(
            "method.init_from = {} is a {} adapter, not a {} one",
            from.display(),
            a.kind(),
            method.name()
        ),
    };
    c.load_whole(&whole, &source)
        .with_context(|| format!("method.init_from = {}", from.display()))?;
    Ok(c)
}

/// The prepared data of a run: this rank's stream of training micro-batches and the
/// validation batches.
struct Data {
    train: BatchStream,
    validation: Vec<Batch>,
    /// SHA-256 of each file read, by its key (`data.train`, …).
    sha256: BTreeMap<String, String>,
    /// The text of `data.chat_template`, when the run renders with its own template: what it
    /// writes beside its adapter and model.
    own_chat_template: Option<String>,
}

impl Data {
    fn load(cfg: &ConfigFile, config_path: &Path, job: &Job) -> Result<Self> {
        let data_cfg = cfg.data(config_path)?;
        let dir = cfg.tokenizer_dir(config_path)?;
        let tok =
            DataTokenizer::for_config(data_cfg, &dir).with_context(|| tokenizer_key(cfg, &dir))?;
        let prepared = prepare(data_cfg, &tok)?;
        prepared.check_trainable(data_cfg, job.dp.size)?;
        for (role, src) in &prepared.report.sources {
            if !src.skipped_rows.is_empty() {
                eprintln!(
                    "{role}: skipped {} invalid rows (data.skip_invalid)",
                    src.skipped_rows.len()
                );
            }
        }
        if job.is_main() {
            eprintln!(
                "data: {} training and {} validation samples",
                prepared.train.len(),
                prepared.validation.len()
            );
            for share in &prepared.report.mix {
                eprintln!("{share}");
            }
        }
        let micro = cfg.batch.micro_batch_size;
        let validation = eval_batches(
            &prepared.validation,
            data_cfg,
            tok.pad_id,
            micro,
            cfg.trainer.limit_val_batches,
        )?;
        let train = BatchStream::new(
            prepared.train,
            data_cfg,
            tok.pad_id,
            job.dp.size,
            job.dp.index,
            micro,
        )?;
        let mut sha256: BTreeMap<String, String> = prepared
            .report
            .sources
            .iter()
            .map(|(role, src)| (format!("data.{role}"), src.sha256.clone()))
            .collect();
        // The samples depend on the chat template as much as on the data, wherever it came
        // from (data.chat_template, tokenizer_config.json, chat_template.jinja).
        // Where only held-out files use it, it decides what is measured, not what trains.
        if let Some(text) = tok.codec.chat_template.as_deref() {
            let key = match data_cfg.trains_with_chat_template() {
                true => Some(CHAT_TEMPLATE_KEY),
                false => data_cfg
                    .uses_chat_template()
                    .then_some(HELD_OUT_CHAT_TEMPLATE_KEY),
            };
            if let Some(key) = key {
                sha256.insert(key.into(), helix_ckpt::sha256_hex(text.as_bytes()));
            }
        }
        let own_chat_template = match data_cfg.chat_template {
            Some(_) => tok.codec.chat_template.clone(),
            None => None,
        };
        Ok(Self {
            train,
            validation,
            sha256,
            own_chat_template,
        })
    }
}

/// Optimizer steps of the run: `max_steps`, or `max_epochs` worth of micro-batches, whichever
/// ends first. A step takes `accumulation` micro-batches, running on into the next epoch.
fn total_steps(cfg: &ConfigFile, micro_per_epoch: u64, accumulation: usize) -> Result<u64> {
    let t = &cfg.trainer;
    let from_epochs = match t.max_epochs {
        Some(e) => Some(
            e.checked_mul(micro_per_epoch)
                .with_context(|| format!("trainer.max_epochs = {e} is too large"))?
                / accumulation as u64,
        ),
        None => None,
    };
    let total = match (t.max_steps, from_epochs) {
        (Some(a), Some(b)) => a.min(b),
        (Some(a), None) => a,
        (None, Some(b)) => b,
        (None, None) => unreachable!("validate_training requires one"),
    };
    if total == 0 {
        bail!(
            "trainer.max_epochs = {} gives no optimizer step: an epoch has {micro_per_epoch} \
             micro-batches and a step takes {accumulation}",
            t.max_epochs.unwrap_or(0)
        );
    }
    Ok(total)
}

/// Mean loss per target token over the validation batches, in eval mode (no dropout); with
/// data parallelism each rank takes every world-th batch and the sums are shared.
fn validate(model: &Customized, batches: &[Batch], chunk: usize, job: &Job) -> Result<f64> {
    model.set_training(false);
    let dev = model.model.device().clone();
    let result = (|| {
        let mut sums = [0f64, 0f64];
        for b in batches.iter().skip(job.dp.index).step_by(job.dp.size) {
            let t = DeviceBatch::new(b, &dev)?;
            let (s, k) = model.eval_loss_sum(&t.model_batch(), chunk)?;
            sums[0] += s.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64;
            sums[1] += k as f64;
        }
        job.sum_f64(&mut sums)?;
        Ok(sums[0] / sums[1].max(1.0))
    })();
    model.set_training(true);
    result
}

/// Fault injection for the kill and signal tests: `HELIX_TEST_STEP_DELAY_MS` sleeps after
/// each step, so a signal or a kill lands mid-run.
fn test_step_delay() -> Duration {
    std::env::var("HELIX_TEST_STEP_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or_default()
}

fn saved_line(r: &helix_ckpt::SaveReport) -> String {
    format!(
        "saved checkpoint {} ({:.1} MB in {:.2} s{})",
        r.dir.display(),
        r.bytes as f64 / 1e6,
        r.seconds,
        if r.removed.is_empty() {
            String::new()
        } else {
            format!(", removed {} older", r.removed.len())
        }
    ) + &match &r.prune_error {
        Some(e) => format!("\nwarning: {e}; training goes on (remove it by hand)"),
        None => String::new(),
    }
}
