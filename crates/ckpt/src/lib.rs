//! Training checkpoints that survive crashes and preemption on shared (NFS) storage.
//!
//! A checkpoint is a directory `step-NNNNNN/` under the run's checkpoint root holding groups of
//! tensors as sharded safetensors (`trainable-…`, `optimizer-…`), JSON files (the trainer's
//! state) and `SHA256SUMS` over all of them (the `sha256sum -c` format). It is written as
//! `step-NNNNNN.tmp/`, every file fsynced, the directory renamed into place and fsynced, and the
//! `latest` pointer replaced last. A crash at any point leaves either the previous checkpoints
//! untouched or the new one complete: a `.tmp` directory is never read.
//!
//! Reading verifies every file's hash first; [`CheckpointStore::find_resumable`] takes the
//! newest checkpoint that verifies and reports the damaged ones it passed over.

mod writer;

pub use writer::{BackgroundWriter, SaveReport};

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use helix_model::safetensors_write::{save_sharded, write_atomic, TensorSpec};
use sha2::{Digest, Sha256};

pub const CHECKSUMS: &str = "SHA256SUMS";
pub const LATEST: &str = "latest";

/// What a trainer hands over to be saved: host copies, so training may go on meanwhile.
pub struct Checkpoint {
    pub step: u64,
    /// Tensor groups by file stem (`trainable`, `optimizer`), each `(name, tensor)`.
    pub tensors: Vec<(String, Vec<(String, Tensor)>)>,
    /// JSON files by name (`trainer_state.json`).
    pub json: Vec<(String, serde_json::Value)>,
}

/// The checkpoints of one run.
#[derive(Clone, Debug)]
pub struct CheckpointStore {
    pub root: PathBuf,
    /// Keep this many newest checkpoints (`None`: all).
    pub keep: Option<usize>,
    pub max_shard_bytes: usize,
}

/// What [`CheckpointStore::find_resumable`] found.
#[derive(Debug, Default)]
pub struct Resumable {
    /// The newest checkpoint whose every file verifies: (step, directory).
    pub chosen: Option<(u64, PathBuf)>,
    /// Newer checkpoints passed over, with what is wrong with each.
    pub damaged: Vec<(PathBuf, String)>,
}

impl CheckpointStore {
    pub fn new(root: impl Into<PathBuf>, keep: Option<usize>, max_shard_bytes: usize) -> Self {
        Self {
            root: root.into(),
            keep,
            max_shard_bytes,
        }
    }

    pub fn dir_for(&self, step: u64) -> PathBuf {
        self.root.join(format!("step-{step:06}"))
    }

    /// Writes `ckpt` atomically (see the module docs), then prunes old checkpoints.
    pub fn save(&self, ckpt: &Checkpoint) -> Result<SaveReport> {
        let t = Instant::now();
        std::fs::create_dir_all(&self.root)
            .with_context(|| format!("cannot create {}", self.root.display()))?;
        let dir = self.dir_for(ckpt.step);
        let tmp = dir.with_extension("tmp");
        if tmp.exists() {
            // A crash's leftover: never complete, never read.
            std::fs::remove_dir_all(&tmp)
                .with_context(|| format!("cannot remove {}", tmp.display()))?;
        }
        std::fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let delay = test_write_delay();
        let mut files = Vec::new();
        for (stem, named) in &ckpt.tensors {
            let specs: Vec<TensorSpec> = named
                .iter()
                .map(|(n, t)| TensorSpec::new(n.clone(), t.dtype(), t.dims()))
                .collect();
            let by_name: HashMap<&str, &Tensor> =
                named.iter().map(|(n, t)| (n.as_str(), t)).collect();
            let report = save_sharded(&tmp, stem, &specs, self.max_shard_bytes, |s| {
                std::thread::sleep(delay);
                Ok(by_name[s.name.as_str()].clone())
            })?;
            files.extend(report.files);
        }
        for (name, value) in &ckpt.json {
            helix_model::safetensors_write::write_json(&tmp.join(name), value)?;
            files.push(name.clone());
        }
        let mut sums = String::new();
        let mut bytes = 0u64;
        files.sort();
        for f in &files {
            let (hash, len) = sha256_file(&tmp.join(f))?;
            sums.push_str(&format!("{hash}  {f}\n"));
            bytes += len;
        }
        write_atomic(&tmp.join(CHECKSUMS), |w| Ok(w.write_all(sums.as_bytes())?))?;
        sync_dir(&tmp)?;
        if dir.exists() {
            // The same step saved again (a resumed run reaching it): the new one replaces it.
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot replace {}", dir.display()))?;
        }
        std::fs::rename(&tmp, &dir)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()))?;
        sync_dir(&self.root)?;
        let name = dir.file_name().expect("step dir").to_string_lossy();
        write_atomic(&self.root.join(LATEST), |w| {
            Ok(w.write_all(format!("{name}\n").as_bytes())?)
        })?;
        sync_dir(&self.root)?;
        let removed = self.prune(ckpt.step)?;
        Ok(SaveReport {
            step: ckpt.step,
            dir,
            bytes,
            seconds: t.elapsed().as_secs_f64(),
            removed,
        })
    }

    /// Removes the oldest complete checkpoints beyond `keep` (never `just_saved`).
    fn prune(&self, just_saved: u64) -> Result<Vec<PathBuf>> {
        let Some(keep) = self.keep else {
            return Ok(Vec::new());
        };
        let mut removed = Vec::new();
        for (step, dir) in self.list_complete()?.into_iter().skip(keep.max(1)) {
            if step != just_saved {
                std::fs::remove_dir_all(&dir)
                    .with_context(|| format!("cannot remove old checkpoint {}", dir.display()))?;
                removed.push(dir);
            }
        }
        Ok(removed)
    }

    /// Complete checkpoints (renamed into place), newest first.
    pub fn list_complete(&self) -> Result<Vec<(u64, PathBuf)>> {
        if !self.root.exists() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.root)
            .with_context(|| format!("cannot list {}", self.root.display()))?
        {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(num) = name.strip_prefix("step-") else {
                continue;
            };
            if let (Ok(step), true) = (num.parse::<u64>(), e.path().is_dir()) {
                out.push((step, e.path()));
            }
        }
        out.sort_by(|a, b| b.0.cmp(&a.0));
        Ok(out)
    }

    /// The newest checkpoint that verifies, passing over (and reporting) damaged ones.
    pub fn find_resumable(&self) -> Result<Resumable> {
        let mut found = Resumable::default();
        for (step, dir) in self.list_complete()? {
            match verify(&dir) {
                Ok(()) => {
                    found.chosen = Some((step, dir));
                    break;
                }
                Err(e) => found.damaged.push((dir, format!("{e:#}"))),
            }
        }
        Ok(found)
    }
}

/// Checks every file listed in `dir/SHA256SUMS` and that nothing is missing; the error names
/// the file.
pub fn verify(dir: &Path) -> Result<()> {
    let sums_path = dir.join(CHECKSUMS);
    let f = File::open(&sums_path).with_context(|| {
        format!(
            "{}: no {CHECKSUMS} (not a complete helix checkpoint)",
            dir.display()
        )
    })?;
    let mut listed = 0;
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line.with_context(|| format!("cannot read {}", sums_path.display()))?;
        let Some((want, name)) = line.split_once("  ") else {
            bail!("{}:{}: malformed line", sums_path.display(), i + 1);
        };
        if name.contains('/') || name.contains("..") {
            bail!("{}:{}: bad file name {name}", sums_path.display(), i + 1);
        }
        let path = dir.join(name);
        let (got, _) = sha256_file(&path)?;
        if got != want {
            bail!(
                "{}: sha256 mismatch (the file is damaged: expected {want}, found {got})",
                path.display()
            );
        }
        listed += 1;
    }
    if listed == 0 {
        bail!("{}: lists no files", sums_path.display());
    }
    Ok(())
}

/// Every tensor of the group `stem` in a checkpoint directory (single file or sharded).
pub fn load_tensors(dir: &Path, stem: &str, device: &Device) -> Result<HashMap<String, Tensor>> {
    let single = dir.join(format!("{stem}.safetensors"));
    let files: Vec<PathBuf> = if single.exists() {
        vec![single]
    } else {
        let index = dir.join(format!("{stem}.safetensors.index.json"));
        helix_model::weights::shard_names_from_index(&index)?
            .into_iter()
            .map(|f| dir.join(f))
            .collect()
    };
    let mut out = HashMap::new();
    for f in files {
        let part = candle_core::safetensors::load(&f, device)
            .with_context(|| format!("cannot read {}", f.display()))?;
        out.extend(part);
    }
    Ok(out)
}

pub fn read_json(dir: &Path, name: &str) -> Result<serde_json::Value> {
    let path = dir.join(name);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
}

/// Hex sha256 of bytes (e.g. a canonical config).
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Hex sha256 and length of a file.
pub fn sha256_file(path: &Path) -> Result<(String, u64)> {
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        len += n as u64;
    }
    let hex = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok((hex, len))
}

/// fsync a directory, so a rename inside it is durable.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync {}", dir.display()))
}

/// Fault injection for the crash-during-save tests: `HELIX_CKPT_TEST_WRITE_DELAY_MS` sleeps
/// before each tensor is written, leaving time to kill the process mid-save.
fn test_write_delay() -> Duration {
    std::env::var("HELIX_CKPT_TEST_WRITE_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
