//! What a training checkpoint holds and how a run continues from one: the trainable tensors,
//! the optimizer's moments and master weights, and `trainer_state.json` — step, data cursor,
//! dropout counters and the config the numbers depend on. Restoring all of it makes a resumed
//! run compute exactly what the uninterrupted one would.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use helix_ckpt::{load_tensors, read_json, verify, Checkpoint, CheckpointStore};
use helix_data::{BatchStream, Position};
use helix_model::linear::shard_of;
use helix_parallel::TcpRing;
use helix_peft::Customized;
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
    pub method: String,
    /// sha256 of `config` (canonical JSON).
    pub config_sha256: String,
    /// The config without its operational keys ([`ConfigFile::numerics`]).
    pub config: serde_json::Value,
    pub helix_version: String,
}

/// Host copies of everything a checkpoint of `step` holds, taken now so training can go on
/// while a background thread writes them. Tensor-parallel shards are gathered into whole
/// tensors and ZeRO-1's optimizer state from its owners, so any layout can resume from the
/// checkpoint; every rank must call this (the gathers are collective).
pub fn snapshot(
    step: u64,
    total_steps: u64,
    cfg: &ConfigFile,
    model: &Customized,
    optimizer: &AdamW,
    dp: &TcpRing,
    stream: &BatchStream,
) -> Result<Checkpoint> {
    let host = |split_name: &str, t: &Tensor| -> Result<Tensor> {
        let whole = model.gather_whole(split_name, t)?;
        Ok(whole.to_device(&Device::Cpu)?.copy()?)
    };
    let trainable = model
        .trainable()
        .into_iter()
        .map(|(n, v)| Ok((n.clone(), host(&n, v.as_tensor())?)))
        .collect::<Result<Vec<_>>>()?;
    // Under ZeRO-1 each owner sends its parameters' state first (collective over `dp`).
    let state = match optimizer.is_sharded() {
        true => optimizer.gather_state(dp)?,
        false => optimizer.state_tensors(),
    };
    let optim = state
        .into_iter()
        .map(|(n, t)| Ok((n.clone(), host(optimizer_param(&n), &t)?)))
        .collect::<Result<Vec<_>>>()?;
    let config = cfg.numerics();
    let state = TrainerState {
        step,
        total_steps,
        data_position: stream.position(),
        rng: model.rng_state(),
        method: cfg.method()?.name().to_string(),
        config_sha256: config_sha256(&config),
        config,
        helix_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    Ok(Checkpoint {
        step,
        tensors: vec![(TRAINABLE.into(), trainable), (OPTIMIZER.into(), optim)],
        json: vec![(TRAINER_STATE.into(), serde_json::to_value(&state)?)],
    })
}

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
            for (dir, why) in &found.damaged {
                warn(format!(
                    "warning: skipping the damaged checkpoint {}: {why}",
                    dir.display()
                ));
            }
            if found.chosen.is_none() && !found.damaged.is_empty() {
                bail!(
                    "every checkpoint in {} is damaged (see the warnings); move them away to \
                     start afresh",
                    store.root.display()
                );
            }
            Ok(found.chosen.map(|(_, dir)| dir))
        }
    }
}

/// Loads the checkpoint in `dir` into the model, optimizer and data stream; returns its state.
pub fn restore(
    dir: &Path,
    cfg: &ConfigFile,
    model: &Customized,
    optimizer: &mut AdamW,
    stream: &mut BatchStream,
) -> Result<TrainerState> {
    let state: TrainerState = serde_json::from_value(read_json(dir, TRAINER_STATE)?)
        .with_context(|| format!("{}: invalid {TRAINER_STATE}", dir.display()))?;
    let now = cfg.numerics();
    if state.config != now {
        bail!(
            "the config differs from the one checkpoint {} was trained with, in {}; a resumed \
             run must compute the same numbers (only output and checkpoint settings may change)",
            dir.display(),
            differing_keys(&state.config, &now).join(", ")
        );
    }
    restore_trainable(dir, model)?;
    let device = model.model.device().clone();
    let (rank, size) = model.tp_rank_size();
    let mut optim = HashMap::new();
    for (key, t) in load_tensors(dir, OPTIMIZER, &device)? {
        let split = model.split_of(optimizer_param(&key));
        optim.insert(key, shard_of(&t, split, rank, size)?);
    }
    optimizer
        .load_state(&optim, state.step)
        .with_context(|| format!("{}: optimizer state", dir.display()))?;
    model.set_rng_state(&state.rng)?;
    stream
        .seek_position(state.data_position)
        .with_context(|| format!("{}: data position", dir.display()))?;
    Ok(state)
}

/// Sets every trainable tensor of `model` from the checkpoint in `dir` (whole tensors; each
/// tensor-parallel rank keeps its shard).
pub fn restore_trainable(dir: &Path, model: &Customized) -> Result<()> {
    let saved = load_tensors(dir, TRAINABLE, model.model.device())?;
    model.load_whole(&saved, &dir.join(TRAINABLE))
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
    }
}
