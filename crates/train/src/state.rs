//! What a training checkpoint holds and how a run continues from one: the trainable tensors,
//! the optimizer's moments and master weights, and `trainer_state.json` — step, data cursor,
//! dropout counters and the config the numbers depend on. Restoring all of it makes a resumed
//! run compute exactly what the uninterrupted one would.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use helix_ckpt::{
    read_json, verify, Checkpoint, CheckpointReader, CheckpointStore, Piece, SaveRendezvous,
    SplitPiece, TensorFile,
};
use helix_data::{BatchStream, Position};
use helix_model::linear::Split;
use helix_parallel::{Job, StoreClient};
use helix_peft::{Customized, Method};
use serde::{Deserialize, Serialize};

use crate::config::{ConfigFile, Resume};
use crate::optim::AdamW;

pub const TRAINER_STATE: &str = "trainer_state.json";
pub const TRAINABLE: &str = "trainable";
pub const OPTIMIZER: &str = "optimizer";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    pub total_steps: u64,
    /// Where the job stands in the data (independent of the data-parallel layout).
    pub data_position: Position,
    /// Dropout draws per layer.
    pub rng: BTreeMap<String, u64>,
    #[serde(flatten)]
    pub run: RunRecord,
}

/// What a run is, the same in every checkpoint it writes: made once, when it starts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub method: String,
    /// sha256 of `config` (canonical JSON).
    pub config_sha256: String,
    /// The config without its operational keys ([`ConfigFile::numerics`]).
    pub config: serde_json::Value,
    /// The kernels and parallel layout it ran with ([`run_layout`]; empty in checkpoints
    /// written before helix recorded them).
    #[serde(default)]
    pub layout: BTreeMap<String, serde_json::Value>,
    /// SHA-256 of each data file read, by its key (`data.train`, …; empty in checkpoints
    /// written before helix recorded them).
    #[serde(default)]
    pub data_sha256: BTreeMap<String, String>,
    pub helix_version: String,
}

impl RunRecord {
    pub fn new(cfg: &ConfigFile, job: &Job, data_sha256: BTreeMap<String, String>) -> Result<Self> {
        let config = cfg.numerics();
        Ok(Self {
            method: cfg.method()?.name().to_string(),
            config_sha256: config_sha256(&config),
            config,
            layout: run_layout(cfg, job)?,
            data_sha256,
            helix_version: env!("CARGO_PKG_VERSION").to_string(),
        })
    }

    /// What makes this rank's run differ from `rank_0`'s: config keys, data files whose
    /// contents differ, another helix version. Every rank of a job must compute the same
    /// thing; a node with another copy of the config or the data would silently not.
    pub fn differences_from(&self, rank_0: &RunRecord) -> Vec<String> {
        let mut out = differing_keys(&rank_0.config, &self.config);
        let files: std::collections::BTreeSet<&String> = rank_0
            .data_sha256
            .keys()
            .chain(self.data_sha256.keys())
            .collect();
        for key in files {
            if rank_0.data_sha256.get(key) != self.data_sha256.get(key) {
                out.push(format!("{key}'s contents"));
            }
        }
        if rank_0.helix_version != self.helix_version {
            out.push(format!(
                "the helix version ({} here, {} on rank 0)",
                self.helix_version, rank_0.helix_version
            ));
        }
        out
    }
}

/// The settings a resumed run may change that choose kernels or the parallel layout, by name:
/// they move its numbers by rounding only, so a run resumed with any of them changed follows
/// an uninterrupted run closely but not bit for bit.
fn layout_settings(cfg: &ConfigFile, job: &Job) -> BTreeMap<String, serde_json::Value> {
    use serde_json::json;
    BTreeMap::from([
        ("model.attention".into(), json!(cfg.attention_setting())),
        ("model.fused_layers".into(), json!(cfg.fused_layers())),
        (
            "trainer.activation_checkpointing".into(),
            json!(format!("{:?}", cfg.trainer.activation_checkpointing).to_lowercase()),
        ),
        ("parallel.tensor_parallel".into(), json!(job.tp.size)),
        ("parallel.zero1".into(), json!(cfg.parallel.zero1)),
        (
            "parallel.sequence_parallel".into(),
            json!(cfg.parallel.sequence_parallel),
        ),
        ("data-parallel ranks".into(), json!(job.dp.size)),
    ])
}

/// The [`layout_settings`] key naming how a run with dropout draws its masks; checkpoints
/// that recorded a layout without it drew them on the host, element by element, from another
/// generator.
pub const DROPOUT_MASKS: &str = "dropout masks";

/// [`layout_settings`] with [`DROPOUT_MASKS`] when the method drops anything (LoRA's
/// `lora_dropout`, P-tuning's `encoder_dropout`).
pub fn run_layout(cfg: &ConfigFile, job: &Job) -> Result<BTreeMap<String, serde_json::Value>> {
    let mut layout = layout_settings(cfg, job);
    let drops = match cfg.method()? {
        Method::Lora(l) => l.lora_dropout > 0.0,
        Method::Ptuning(p) => p.encoder_dropout > 0.0,
        Method::FullSft => false,
    };
    if drops {
        layout.insert(
            DROPOUT_MASKS.into(),
            serde_json::json!("keyed, on the device"),
        );
    }
    Ok(layout)
}

impl TrainerState {
    /// `setting: before → now` for each layout setting that differs from this checkpoint's.
    pub fn layout_changes(&self, now: &BTreeMap<String, serde_json::Value>) -> Vec<String> {
        self.run
            .layout
            .iter()
            .filter_map(|(k, before)| match now.get(k) {
                Some(v) if v != before => Some(format!("{k}: {before} → {v}")),
                _ => None,
            })
            .collect()
    }

    /// Whether this checkpoint's run drew other dropout masks than `now` draws: a layout
    /// recorded without [`DROPOUT_MASKS`] (an older helix's host generator) or another one,
    /// where `now` drops anything. Checkpoints older than recorded layouts cannot tell.
    pub fn other_dropout_masks(&self, now: &BTreeMap<String, serde_json::Value>) -> bool {
        let recorded = !self.run.layout.is_empty();
        match now.get(DROPOUT_MASKS) {
            Some(v) => recorded && self.run.layout.get(DROPOUT_MASKS) != Some(v),
            None => false,
        }
    }
}

/// Host copies of this rank's part of the checkpoint of `step`, taken now so training can go
/// on while a background thread writes them. Nothing is gathered: each rank keeps its
/// tensor-parallel shards, under ZeRO-1 the optimizer state it owns, and rank 0 the trainer
/// state; the checkpoint's index says how the pieces fit, so any layout can resume from it.
pub fn snapshot(
    step: u64,
    total_steps: u64,
    run: &RunRecord,
    model: &Customized,
    optimizer: &AdamW,
    job: &Job,
    stream: &BatchStream,
) -> Result<Checkpoint> {
    let (tp, tp_size, dp) = (job.tp.index, job.tp.size, job.dp.index);
    // A split tensor: this rank's piece. A replicated one: written by tensor-parallel rank 0.
    let piece = |name: &str, param: &str, t: &Tensor| -> Result<Option<Piece>> {
        let split = match model.split_of(param) {
            Split::Dim(dim) => Some(SplitPiece {
                dim,
                index: tp,
                count: tp_size,
            }),
            Split::Replicated if tp == 0 => None,
            Split::Replicated => return Ok(None),
        };
        Ok(Some(Piece {
            name: name.to_string(),
            tensor: t.to_device(&Device::Cpu)?.copy()?,
            split,
        }))
    };
    let mut files = Vec::new();
    let mut add = |group: &str, stem: String, pieces: Vec<Piece>| {
        if !pieces.is_empty() {
            files.push(TensorFile {
                group: group.to_string(),
                stem,
                pieces,
            });
        }
    };
    let alone = job.world == 1;
    // The trainable tensors are the same on every data-parallel rank: the first writes them.
    if dp == 0 {
        let mut pieces = Vec::new();
        for (name, var) in model.trainable() {
            pieces.extend(piece(&name, &name, var.as_tensor())?);
        }
        let stem = match alone {
            true => TRAINABLE.to_string(),
            false => format!("{TRAINABLE}-tp{tp:02}"),
        };
        add(TRAINABLE, stem, pieces);
    }
    // Optimizer state: under ZeRO-1 every owner writes its own; else the first data-parallel
    // rank writes it all.
    if optimizer.is_sharded() || dp == 0 {
        let mut pieces = Vec::new();
        for (key, t) in optimizer.state_tensors() {
            pieces.extend(piece(&key, optimizer_param(&key), &t)?);
        }
        let stem = match alone {
            true => OPTIMIZER.to_string(),
            false => format!("{OPTIMIZER}-tp{tp:02}-dp{dp:03}"),
        };
        add(OPTIMIZER, stem, pieces);
    }
    let mut json = Vec::new();
    if job.is_main() {
        let state = TrainerState {
            step,
            total_steps,
            data_position: stream.position(),
            rng: model.rng_state(),
            run: run.clone(),
        };
        json.push((TRAINER_STATE.into(), serde_json::to_value(&state)?));
    }
    Ok(Checkpoint { step, files, json })
}

/// How this rank's checkpoint writer meets the others: through the job's rendezvous store, on
/// a connection of its own (the main thread keeps using the job's).
pub struct StoreSaveRendezvous {
    client: StoreClient,
    world: usize,
}

impl StoreSaveRendezvous {
    /// `None` for a process alone. A writer may wait long for slower ranks' files; a rank that
    /// dies meanwhile fails the wait at once through the store.
    pub fn for_job(job: &Job) -> Result<Option<Self>> {
        Ok(job
            .store_connection(Duration::from_secs(6 * 3600))?
            .map(|client| Self {
                client,
                world: job.world,
            }))
    }
}

impl SaveRendezvous for StoreSaveRendezvous {
    fn rank(&self) -> usize {
        self.client.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn report(&self, step: u64, part: &str) -> Result<()> {
        self.client.set(
            &format!("checkpoint/{step}/{}", self.client.rank),
            part.as_bytes(),
        )
    }
    fn collect(&self, step: u64) -> Result<Vec<String>> {
        (1..self.world)
            .map(|r| {
                let v = self.client.get(&format!("checkpoint/{step}/{r}"))?;
                String::from_utf8(v).with_context(|| format!("rank {r}'s checkpoint report"))
            })
            .collect()
    }
}

/// The key of the chat template's sha256 among a run's data files: a conversation's samples
/// depend on it (`data.chat_template`, or the tokenizer's) as much as on the data.
pub const CHAT_TEMPLATE_KEY: &str = "the chat template";

/// The same, where only held-out files (data.validation, data.test) are rendered with the chat
/// template: a change moves what is measured, not what trains, so a resumed run warns.
pub const HELD_OUT_CHAT_TEMPLATE_KEY: &str = "the held-out files' chat template";

pub fn config_sha256(numerics: &serde_json::Value) -> String {
    helix_ckpt::sha256_hex(numerics.to_string().as_bytes())
}

/// The checkpoint a run starts from, per `trainer.resume`; `None` for a fresh start. Damaged
/// checkpoints passed over are reported through `warn`.
pub fn choose_checkpoint(
    cfg: &ConfigFile,
    store: &CheckpointStore,
    warn: impl Fn(String),
) -> Result<Option<PathBuf>> {
    match cfg.resume()? {
        Resume::Never => {
            if let Some((_, dir)) = store.list_complete()?.first() {
                bail!(
                    "trainer.resume = \"never\" but {} already holds checkpoints ({}); set \
                     trainer.resume = \"auto\" to continue, or choose another \
                     trainer.output_dir",
                    store.root.display(),
                    dir.display()
                );
            }
            Ok(None)
        }
        Resume::From(dir) => {
            verify(&dir).with_context(|| format!("trainer.resume = {}", dir.display()))?;
            Ok(Some(dir))
        }
        Resume::Auto => {
            let found = store.find_resumable()?;
            if found.chosen.is_none() && !found.damaged.is_empty() {
                for (dir, why) in &found.damaged {
                    warn(format!(
                        "warning: the checkpoint {} is damaged: {why}",
                        dir.display()
                    ));
                }
                bail!(
                    "every checkpoint in {} is damaged (see the warnings); move them away to \
                     start afresh",
                    store.root.display()
                );
            }
            // Damaged checkpoints newer than the one resumed from are kept for a look, but
            // out of the way of the saves to come.
            for (dir, why) in &found.damaged {
                let aside = store.set_aside(dir)?;
                warn(format!(
                    "warning: skipping the damaged checkpoint {} (moved to {}): {why}",
                    dir.display(),
                    aside.display()
                ));
            }
            Ok(found.chosen.map(|(_, dir)| dir))
        }
    }
}

/// The config the checkpoint in `dir` was trained with, as [`ConfigFile::numerics`] gives it.
fn recorded_config(dir: &Path, state: &TrainerState) -> Result<serde_json::Value> {
    ConfigFile::recorded_numerics(&state.run.config).with_context(|| {
        format!(
            "{}, written by helix {}: use that version with it",
            dir.display(),
            state.run.helix_version
        )
    })
}

fn read_state(dir: &Path) -> Result<TrainerState> {
    serde_json::from_value(read_json(dir, TRAINER_STATE)?)
        .with_context(|| format!("{}: invalid {TRAINER_STATE}", dir.display()))
}

/// The checkpoint's state, or an error naming what would make the run `now` compute other
/// numbers than the one that wrote it: the config keys that differ, or a training file whose
/// contents changed. A changed validation or test file only changes what is measured:
/// reported through `warn`.
pub fn check_same_run(dir: &Path, now: &RunRecord, warn: impl Fn(String)) -> Result<TrainerState> {
    let state = read_state(dir)?;
    let differ = differing_keys(&recorded_config(dir, &state)?, &now.config);
    if !differ.is_empty() {
        bail!(
            "the config differs from the one checkpoint {} was trained with, in {}; a resumed \
             run must compute the same numbers (only output and checkpoint settings may change)",
            dir.display(),
            differ.join(", ")
        );
    }
    for (key, before) in &state.run.data_sha256 {
        let Some(after) = now.data_sha256.get(key).filter(|a| *a != before) else {
            continue;
        };
        let what = format!(
            "{key}'s contents changed since checkpoint {} was written (sha256 {} then, {} now)",
            dir.display(),
            &before[..before.len().min(12)],
            &after[..after.len().min(12)]
        );
        // Both decide the training samples; validation and test files only what is measured.
        if key == "data.train" || key.starts_with("data.mix[") || key == CHAT_TEMPLATE_KEY {
            bail!(
                "{what}: a resumed run must read the same samples; put the file back, or start \
                 a new run (another trainer.output_dir) on the new data"
            );
        }
        warn(format!(
            "warning: {what}: losses measured on it from here on are not comparable with \
             earlier ones"
        ));
    }
    Ok(state)
}

/// An error unless the checkpoint in `dir` was trained with `cfg`'s model and adapter settings
/// (`[model]`, the method, `[lora]`, `[ptuning]`), for `eval --checkpoint`, which may change
/// the data and everything else: its trainable tensors mean something else under another
/// LoRA scaling or prompt encoder.
pub fn check_same_model(dir: &Path, cfg: &ConfigFile) -> Result<()> {
    let state = read_state(dir)?;
    // Where the base model lives may change (another machine); what it is read as may not.
    let model_keys = |k: &String| {
        let moved = ["model.path", "model.preset"].contains(&k.as_str());
        !moved
            && ["model", "lora", "ptuning", "method.name"]
                .iter()
                .any(|s| k == s || k.starts_with(&format!("{s}.")))
    };
    let differ: Vec<String> = differing_keys(&recorded_config(dir, &state)?, &cfg.numerics())
        .into_iter()
        .filter(model_keys)
        .collect();
    if !differ.is_empty() {
        bail!(
            "checkpoint {} was trained with other model or adapter settings, in {}: evaluate \
             it with the config it was trained with",
            dir.display(),
            differ.join(", ")
        );
    }
    Ok(())
}

/// Loads the checkpoint in `dir`, whose `state` [`check_same_run`] returned, into the model,
/// optimizer and data stream.
pub fn restore(
    dir: &Path,
    state: &TrainerState,
    model: &Customized,
    optimizer: &mut AdamW,
    stream: &mut BatchStream,
) -> Result<()> {
    let reader = CheckpointReader::open(dir)?;
    restore_trainable_from(&reader, model)?;
    let device = model.model.device().clone();
    let (rank, size) = model.tp_rank_size();
    let mut optim = HashMap::new();
    for key in reader.names(OPTIMIZER) {
        let param = optimizer_param(key);
        if optimizer.owns(param) {
            let t = reader.load(OPTIMIZER, key, model.split_of(param), rank, size, &device)?;
            optim.insert(key.to_string(), t);
        }
    }
    optimizer
        .load_state(&optim, state.step)
        .with_context(|| format!("{}: optimizer state", dir.display()))?;
    model.set_rng_state(&state.rng)?;
    stream
        .seek_position(state.data_position)
        .with_context(|| format!("{}: data position", dir.display()))?;
    Ok(())
}

/// Sets every trainable tensor of `model` from the checkpoint in `dir`, written at any layout
/// (each tensor-parallel rank reads its shard).
pub fn restore_trainable(dir: &Path, model: &Customized) -> Result<()> {
    restore_trainable_from(&CheckpointReader::open(dir)?, model)
}

fn restore_trainable_from(reader: &CheckpointReader, model: &Customized) -> Result<()> {
    let (rank, size) = model.tp_rank_size();
    let device = model.model.device();
    let mut shards = HashMap::new();
    for name in reader.names(TRAINABLE) {
        let t = reader.load(TRAINABLE, name, model.split_of(name), rank, size, device)?;
        shards.insert(name.to_string(), t);
    }
    model.load_shards(
        &shards,
        &reader.dir.join(format!("{TRAINABLE}*.safetensors")),
    )
}

/// The parameter an optimizer-state key belongs to (`exp_avg.<name>` → `<name>`).
fn optimizer_param(key: &str) -> &str {
    key.split_once('.').map_or(key, |(_, name)| name)
}

/// Dotted keys whose values differ between two configs.
fn differing_keys(a: &serde_json::Value, b: &serde_json::Value) -> Vec<String> {
    fn walk(prefix: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
        match (a.as_object(), b.as_object()) {
            (Some(x), Some(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let null = serde_json::Value::Null;
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(
                        &p,
                        x.get(k).unwrap_or(&null),
                        y.get(k).unwrap_or(&null),
                        out,
                    );
                }
            }
            // `lora_alpha = 16` and `16.0` are the same number.
            _ if a.is_number() && b.is_number() && a.as_f64() == b.as_f64() => {}
            _ if a != b => out.push(prefix.to_string()),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk("", a, b, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differing_keys_are_named_with_their_path() {
        let a = serde_json::json!({"optimizer": {"lr": 1e-4, "eps": 1e-8}, "data": {"seed": 1}});
        let b = serde_json::json!({"optimizer": {"lr": 3e-4, "eps": 1e-8}, "lora": {"r": 8}});
        assert_eq!(differing_keys(&a, &b), vec!["data", "lora", "optimizer.lr"]);
        let (c, d) = (serde_json::json!({"a": 16}), serde_json::json!({"a": 16.0}));
        assert!(differing_keys(&c, &d).is_empty());
    }

    #[test]
    fn configs_compare_after_a_json_round_trip() {
        // serde_json's default float parser reads these a bit off, and a resume then saw a
        // config that had not changed as different.
        let a = serde_json::json!({"optimizer": {"eps": 1e-30, "lr": 0.1 + 0.2}});
        let b: serde_json::Value = serde_json::from_str(&a.to_string()).unwrap();
        assert!(differing_keys(&a, &b).is_empty(), "{a} vs {b}");
    }

    #[test]
    fn a_changed_training_file_is_refused_and_a_changed_validation_file_noted() -> Result<()> {
        let record = |train: &str, validation: &str| RunRecord {
            method: "lora".into(),
            config_sha256: String::new(),
            config: ConfigFile::recorded_numerics(&serde_json::json!({"optimizer": {"lr": 1e-4}}))
                .unwrap(),
            layout: BTreeMap::new(),
            data_sha256: BTreeMap::from([
                ("data.train".into(), train.into()),
                ("data.validation".into(), validation.into()),
            ]),
            helix_version: String::new(),
        };
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path();
        let write = |run: RunRecord| -> Result<()> {
            let state = TrainerState {
                step: 4,
                total_steps: 8,
                data_position: Default::default(),
                rng: BTreeMap::new(),
                run,
            };
            Ok(std::fs::write(
                dir.join(TRAINER_STATE),
                serde_json::to_string(&state)?,
            )?)
        };
        write(record("aaaa", "bbbb"))?;
        let warnings = std::cell::RefCell::new(Vec::new());
        let warn = |w: String| warnings.borrow_mut().push(w);
        assert_eq!(check_same_run(dir, &record("aaaa", "bbbb"), warn)?.step, 4);
        assert!(warnings.borrow().is_empty());
        let err = check_same_run(dir, &record("cccc", "bbbb"), warn).unwrap_err();
        let err = format!("{err:#}");
        assert!(
            err.contains("data.train's contents changed") && err.contains("aaaa then, cccc now"),
            "{err}"
        );
        check_same_run(dir, &record("aaaa", "dddd"), warn)?;
        let w = warnings.borrow().join("\n");
        assert!(w.contains("data.validation's contents changed"), "{w}");
        // The chat template decides the samples as the training file does.
        let with_template_at = |key: &str, template: &str| {
            let mut run = record("aaaa", "bbbb");
            run.data_sha256.insert(key.into(), template.into());
            run
        };
        let with_template = |template: &str| with_template_at(CHAT_TEMPLATE_KEY, template);
        write(with_template("eeee"))?;
        check_same_run(dir, &with_template("eeee"), warn)?;
        let err = check_same_run(dir, &with_template("ffff"), warn).unwrap_err();
        assert!(
            format!("{err:#}").contains("the chat template's contents changed"),
            "{err:#}"
        );
        // Rendering only the held-out files, it changes what is measured: a warning.
        let held_out = |template: &str| with_template_at(HELD_OUT_CHAT_TEMPLATE_KEY, template);
        write(held_out("eeee"))?;
        check_same_run(dir, &held_out("ffff"), warn)?;
        let w = warnings.borrow().join("\n");
        assert!(
            w.contains("the held-out files' chat template's contents changed"),
            "{w}"
        );
        // A checkpoint from before helix recorded the files: nothing to compare.
        write(RunRecord {
            data_sha256: BTreeMap::new(),
            ..record("", "")
        })?;
        check_same_run(dir, &record("cccc", "dddd"), warn)?;
        Ok(())
    }

    #[test]
    fn a_rank_differing_from_rank_0_is_named() {
        let rank_0 = RunRecord {
            method: "lora".into(),
            config_sha256: String::new(),
            config: serde_json::json!({"optimizer": {"lr": 1e-4}, "data": {"seed": 1}}),
            layout: BTreeMap::new(),
            data_sha256: BTreeMap::from([("data.train".into(), "aaaa".into())]),
            helix_version: "0.1.0".into(),
        };
        assert!(rank_0.differences_from(&rank_0).is_empty());
        let other = RunRecord {
            config: serde_json::json!({"optimizer": {"lr": 3e-4}, "data": {"seed": 1}}),
            data_sha256: BTreeMap::from([("data.train".into(), "bbbb".into())]),
            helix_version: "0.2.0".into(),
            ..rank_0.clone()
        };
        assert_eq!(
            other.differences_from(&rank_0),
            vec![
                "optimizer.lr",
                "data.train's contents",
                "the helix version (0.2.0 here, 0.1.0 on rank 0)"
            ]
        );
    }

    #[test]
    fn layout_changes_name_each_setting() {
        let state = TrainerState {
            step: 4,
            total_steps: 8,
            data_position: Default::default(),
            rng: BTreeMap::new(),
            run: RunRecord {
                method: "lora".into(),
                config_sha256: String::new(),
                config: serde_json::Value::Null,
                layout: BTreeMap::from([
                    ("model.attention".into(), serde_json::json!("auto")),
                    ("parallel.zero1".into(), serde_json::json!(false)),
                ]),
                data_sha256: BTreeMap::new(),
                helix_version: String::new(),
            },
        };
        let mut now = state.run.layout.clone();
        assert!(state.layout_changes(&now).is_empty());
        now.insert("model.attention".into(), serde_json::json!("flash"));
        assert_eq!(
            state.layout_changes(&now),
            vec!["model.attention: \"auto\" → \"flash\""]
        );
        // A run with dropout resuming a checkpoint whose layout does not say how its masks
        // were drawn (an older helix's host generator) is told; one without dropout is not.
        assert!(!state.other_dropout_masks(&now));
        now.insert(
            DROPOUT_MASKS.into(),
            serde_json::json!("keyed, on the device"),
        );
        assert!(state.other_dropout_masks(&now));
        let mut same = state.clone();
        same.run.layout = now.clone();
        assert!(!same.other_dropout_masks(&now));
        let mut unrecorded = state.clone();
        unrecorded.run.layout.clear();
        assert!(!unrecorded.other_dropout_masks(&now));
    }
}
