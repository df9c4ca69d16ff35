//! Training checkpoints that survive crashes and preemption on shared (NFS) storage.
//!
//! A checkpoint is a directory `step-NNNNNN/` under the run's checkpoint root holding groups of
//! tensors as sharded safetensors (`trainable-…`, `optimizer-…`), JSON files (the trainer's
//! state) and `SHA256SUMS` over all of them (the `sha256sum -c` format). It is written as
//! `step-NNNNNN.tmp/`, every file fsynced, the directory renamed into place and fsynced, and the
//! `latest` pointer replaced last. A crash at any point leaves either the previous checkpoints
//! untouched or the new one complete: a `.tmp` directory is never read.
//!
//! In a job of several ranks each writes its own pieces into the same `.tmp` directory and rank 0
//! seals it (see [`SaveRendezvous`] and layout.rs).
//!
//! Reading verifies every file's hash first; [`CheckpointStore::find_resumable`] takes the
//! newest checkpoint that verifies and reports the damaged ones it passed over.

mod layout;
mod writer;

pub use layout::{
    CheckpointIndex, CheckpointReader, IndexEntry, Piece, RankPart, SplitPiece, TensorFile, INDEX,
};
pub use writer::{BackgroundWriter, SaveReport};

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use helix_model::safetensors_write::{save_sharded, write_atomic, TensorSpec};
use sha2::{Digest, Sha256};

pub const CHECKSUMS: &str = "SHA256SUMS";
pub const LATEST: &str = "latest";

/// What one rank hands over to be saved: host copies, so training may go on meanwhile.
pub struct Checkpoint {
    pub step: u64,
    /// The tensor files this rank writes (its pieces only).
    pub files: Vec<TensorFile>,
    /// JSON files by name (`trainer_state.json`); rank 0 writes them.
    pub json: Vec<(String, serde_json::Value)>,
}

/// How the ranks of a job meet to finish one checkpoint: each writes its own files into the
/// same `.tmp` directory and reports them; rank 0 waits for every report, then writes the index
/// and checksums and renames the directory into place. Without one, a process saves alone.
pub trait SaveRendezvous: Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// A rank other than 0 hands rank 0 its report on checkpoint `step`.
    fn report(&self, step: u64, part: &str) -> Result<()>;
    /// Rank 0: the reports of ranks 1.. on checkpoint `step`, in rank order.
    fn collect(&self, step: u64) -> Result<Vec<String>>;
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

    /// Writes this rank's part of `ckpt`; rank 0 (or a process alone, `peers: None`) then
    /// seals it atomically (see the module docs) and prunes old checkpoints.
    pub fn save(
        &self,
        ckpt: &Checkpoint,
        peers: Option<&dyn SaveRendezvous>,
    ) -> Result<SaveReport> {
        let t = Instant::now();
        let rank = peers.map_or(0, |p| p.rank());
        std::fs::create_dir_all(&self.root)
            .with_context(|| format!("cannot create {}", self.root.display()))?;
        let dir = self.dir_for(ckpt.step);
        let tmp = dir.with_extension("tmp");
        if peers.is_none() && tmp.exists() {
            // A crash's leftover: never complete, never read. (With peers, rank 0 removes
            // leftovers before training: see `remove_incomplete`.)
            std::fs::remove_dir_all(&tmp)
                .with_context(|| format!("cannot remove {}", tmp.display()))?;
        }
        std::fs::create_dir_all(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        let mine = self.write_part(&tmp, ckpt);
        let Some(peers) = peers.filter(|_| rank != 0) else {
            return self.seal(ckpt, &tmp, dir, mine?, peers, t);
        };
        let part = mine.unwrap_or_else(|e| RankPart {
            error: Some(format!("{e:#}")),
            ..Default::default()
        });
        peers.report(ckpt.step, &serde_json::to_string(&part)?)?;
        if let Some(e) = part.error {
            bail!("{e}");
        }
        Ok(SaveReport {
            step: ckpt.step,
            dir,
            bytes: part.files.iter().map(|f| f.2).sum(),
            seconds: t.elapsed().as_secs_f64(),
            removed: Vec::new(),
            prune_error: None,
        })
    }

    /// Writes and fsyncs this rank's tensor files into `tmp`; what it wrote.
    fn write_part(&self, tmp: &Path, ckpt: &Checkpoint) -> Result<RankPart> {
        let delay = test_write_delay();
        let mut part = RankPart::default();
        for file in &ckpt.files {
            let specs: Vec<TensorSpec> = file
                .pieces
                .iter()
                .map(|p| TensorSpec::new(p.name.clone(), p.tensor.dtype(), p.tensor.dims()))
                .collect();
            let by_name: HashMap<&str, &Tensor> = file
                .pieces
                .iter()
                .map(|p| (p.name.as_str(), &p.tensor))
                .collect();
            let report = save_sharded(tmp, &file.stem, &specs, self.max_shard_bytes, |s| {
                std::thread::sleep(delay);
                Ok(by_name[s.name.as_str()].clone())
            })?;
            for f in report.files {
                let (hash, len) = sha256_file(&tmp.join(&f))?;
                part.files.push((hash, f, len));
            }
            for p in &file.pieces {
                part.pieces.push((
                    file.group.clone(),
                    p.name.clone(),
                    file.stem.clone(),
                    p.whole_shape(),
                    p.tensor.dtype().as_str().to_string(),
                    p.split,
                ));
            }
        }
        Ok(part)
    }

    /// Rank 0: waits for the other ranks' parts, writes the index, the JSON files and the
    /// checksums, renames `tmp` to `dir` and moves `latest`.
    fn seal(
        &self,
        ckpt: &Checkpoint,
        tmp: &Path,
        dir: PathBuf,
        mine: RankPart,
        peers: Option<&dyn SaveRendezvous>,
        t: Instant,
    ) -> Result<SaveReport> {
        let mut parts = vec![mine];
        if let Some(peers) = peers {
            for (i, text) in peers.collect(ckpt.step)?.into_iter().enumerate() {
                let part: RankPart = serde_json::from_str(&text)
                    .with_context(|| format!("rank {}'s report on step {}", i + 1, ckpt.step))?;
                if let Some(e) = &part.error {
                    bail!(
                        "rank {} could not write its part of checkpoint {}: {e}",
                        i + 1,
                        ckpt.step
                    );
                }
                parts.push(part);
            }
        }
        let index = CheckpointIndex::merge(&parts)?;
        let mut files: Vec<(String, String, u64)> =
            parts.into_iter().flat_map(|p| p.files).collect();
        let index = (INDEX.to_string(), serde_json::to_value(&index)?);
        for (name, value) in ckpt.json.iter().chain([&index]) {
            let path = tmp.join(name);
            helix_model::safetensors_write::write_json(&path, value)?;
            let (hash, len) = sha256_file(&path)?;
            files.push((hash, name.clone(), len));
        }
        files.sort_by(|a, b| a.1.cmp(&b.1));
        let mut sums = String::new();
        for (hash, name, _) in &files {
            sums.push_str(&format!("{hash}  {name}\n"));
        }
        let bytes = files.iter().map(|f| f.2).sum();
        write_atomic(&tmp.join(CHECKSUMS), |w| Ok(w.write_all(sums.as_bytes())?))?;
        sync_dir(tmp)?;
        if dir.exists() {
            // The same step saved again (a resumed run reaching it): the new one replaces it.
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot replace {}", dir.display()))?;
        }
        std::fs::rename(tmp, &dir)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()))?;
        sync_dir(&self.root)?;
        let name = dir.file_name().expect("step dir").to_string_lossy();
        write_atomic(&self.root.join(LATEST), |w| {
            Ok(w.write_all(format!("{name}\n").as_bytes())?)
        })?;
        sync_dir(&self.root)?;
        let (removed, prune_error) = self.prune(ckpt.step);
        Ok(SaveReport {
            step: ckpt.step,
            dir,
            bytes,
            seconds: t.elapsed().as_secs_f64(),
            removed,
            prune_error: prune_error.map(|e| format!("{e:#}")),
        })
    }

    /// Removes the oldest complete checkpoints beyond `keep` (never `just_saved`): those it
    /// removed, and the first failure, which stops it but not the run.
    fn prune(&self, just_saved: u64) -> (Vec<PathBuf>, Option<anyhow::Error>) {
        let mut removed = Vec::new();
        let Some(keep) = self.keep else {
            return (removed, None);
        };
        let old = match self.list_complete() {
            Ok(list) => list.into_iter().skip(keep.max(1)),
            Err(e) => return (removed, Some(e)),
        };
        for (step, dir) in old {
            if step != just_saved {
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    let e = anyhow::Error::new(e)
                        .context(format!("cannot remove old checkpoint {}", dir.display()));
                    return (removed, Some(e));
                }
                removed.push(dir);
            }
        }
        (removed, None)
    }

    /// Renames a damaged checkpoint to `step-N.damaged` (`.damaged-2`, … if taken), out of
    /// the list of checkpoints, so it neither takes a place `save_total_limit` keeps nor stands
    /// in the way when its step is saved again, and is still there to be looked at.
    pub fn set_aside(&self, dir: &Path) -> Result<PathBuf> {
        let name = dir.file_name().unwrap_or_default().to_string_lossy();
        let mut to = dir.with_file_name(format!("{name}.damaged"));
        let mut n = 2;
        while to.exists() {
            to = dir.with_file_name(format!("{name}.damaged-{n}"));
            n += 1;
        }
        std::fs::rename(dir, &to)
            .with_context(|| format!("cannot move {} aside to {}", dir.display(), to.display()))?;
        Ok(to)
    }

    /// Removes what crashed saves left (`step-N.tmp/`). Several ranks write into one `.tmp`
    /// directory, so a job's rank 0 calls this once before training, not each save.
    pub fn remove_incomplete(&self) -> Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        if !self.root.exists() {
            return Ok(removed);
        }
        for e in std::fs::read_dir(&self.root)
            .with_context(|| format!("cannot list {}", self.root.display()))?
        {
            let path = e?.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if name.starts_with("step-") && name.ends_with(".tmp") && path.is_dir() {
                std::fs::remove_dir_all(&path)
                    .with_context(|| format!("cannot remove {}", path.display()))?;
                removed.push(path);
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
        out.sort_by_key(|b| std::cmp::Reverse(b.0));
        Ok(out)
    }

    /// The newest checkpoint that verifies, passing over (and reporting) damaged ones: a file
    /// missing or not matching its sha256. A file that cannot be read (an I/O error, a
    /// permission, a stale NFS handle) is an error instead: the checkpoint may well be sound,
    /// and passing over it would resume from an older one and later replace it.
    pub fn find_resumable(&self) -> Result<Resumable> {
        let mut found = Resumable::default();
        for (step, dir) in self.list_complete()? {
            match verify(&dir) {
                Ok(()) => {
                    found.chosen = Some((step, dir));
                    break;
                }
                Err(e) if unreadable(&e) => {
                    return Err(e.context(format!(
                        "cannot read checkpoint {}: fix the storage and run again, or move it \
                         aside to resume from an older one",
                        dir.display()
                    )))
                }
                Err(e) => found.damaged.push((dir, format!("{e:#}"))),
            }
        }
        Ok(found)
    }
}

/// Whether `e` comes from an I/O error other than a missing file.
fn unreadable(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| io.kind() != std::io::ErrorKind::NotFound)
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
