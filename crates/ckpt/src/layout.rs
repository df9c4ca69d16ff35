//! How the pieces of a checkpoint written by many ranks fit together, and reading them back at
//! any tensor-parallel layout.
//!
//! Every rank writes only what it holds: its tensor-parallel shard of each split tensor (one rank
//! per replicated tensor) and, under ZeRO-1, the optimizer state it owns. Rank 0 merges what the
//! ranks report into `checkpoint_index.json`: for every tensor of every group, its whole shape,
//! the dimension it is split along and the file stem holding each piece, in order. A reader at
//! another layout concatenates the pieces and takes its own shard; at the same layout it reads
//! its piece alone.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use helix_model::linear::{shard_of, Split};
use helix_model::weights::stem_files;
use serde::{Deserialize, Serialize};

pub const INDEX: &str = "checkpoint_index.json";
/// The index format this version writes.
const FORMAT: u32 = 1;

/// Piece `index` of `count` equal pieces along `dim`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitPiece {
    pub dim: usize,
    pub index: usize,
    pub count: usize,
}

/// One tensor as a rank holds it: whole (`split: None`) or one piece of it.
#[derive(Clone, Debug)]
pub struct Piece {
    pub name: String,
    pub tensor: Tensor,
    pub split: Option<SplitPiece>,
}

impl Piece {
    /// The whole tensor's shape.
    pub fn whole_shape(&self) -> Vec<usize> {
        let mut dims = self.tensor.dims().to_vec();
        if let Some(s) = self.split {
            dims[s.dim] *= s.count;
        }
        dims
    }
}

/// The tensors one rank writes under one file stem (`trainable-tp01`), belonging to `group`
/// (`trainable`, `optimizer`).
#[derive(Clone, Debug)]
pub struct TensorFile {
    pub group: String,
    pub stem: String,
    pub pieces: Vec<Piece>,
}

/// Where one tensor of the checkpoint is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IndexEntry {
    /// The whole tensor's shape.
    pub shape: Vec<usize>,
    pub dtype: String,
    /// `None`: one piece holds the whole tensor.
    pub split_dim: Option<usize>,
    /// The file stem of each piece, in order along `split_dim`.
    pub stems: Vec<String>,
}

/// `checkpoint_index.json`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CheckpointIndex {
    pub format: u32,
    /// How many ranks wrote the checkpoint (informational; any layout can read it).
    pub ranks: usize,
    pub groups: BTreeMap<String, BTreeMap<String, IndexEntry>>,
}

/// `(group, name, stem, whole shape, dtype, split)` of a piece a rank wrote, as [`RankPart`]
/// carries it (a tuple: a JSON array in the report).
pub type PieceRecord = (
    String,
    String,
    String,
    Vec<usize>,
    String,
    Option<SplitPiece>,
);

/// What one rank wrote, as it reports it to rank 0.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RankPart {
    /// `(sha256, file name, bytes)` of every file the rank wrote.
    pub files: Vec<(String, String, u64)>,
    pub pieces: Vec<PieceRecord>,
    /// Set when the rank failed to write its part.
    pub error: Option<String>,
}

impl CheckpointIndex {
    /// Merges every rank's report; refuses pieces that disagree or are missing.
    pub fn merge(parts: &[RankPart]) -> Result<Self> {
        let mut index = CheckpointIndex {
            format: FORMAT,
            ranks: parts.len(),
            groups: BTreeMap::new(),
        };
        for (rank, part) in parts.iter().enumerate() {
            for (group, name, stem, shape, dtype, split) in &part.pieces {
                let count = split.map_or(1, |s| s.count);
                let entry = index
                    .groups
                    .entry(group.clone())
                    .or_default()
                    .entry(name.clone())
                    .or_insert_with(|| IndexEntry {
                        shape: shape.clone(),
                        dtype: dtype.clone(),
                        split_dim: split.map(|s| s.dim),
                        stems: vec![String::new(); count],
                    });
                if entry.shape != *shape
                    || entry.split_dim != split.map(|s| s.dim)
                    || entry.stems.len() != count
                {
                    bail!("rank {rank} wrote {group} tensor '{name}' with another shape or split than another rank");
                }
                let slot = &mut entry.stems[split.map_or(0, |s| s.index)];
                if !slot.is_empty() {
                    bail!("{group} tensor '{name}': two ranks wrote the same piece ({slot} and {stem})");
                }
                *slot = stem.clone();
            }
        }
        for (group, tensors) in &index.groups {
            for (name, e) in tensors {
                if let Some(i) = e.stems.iter().position(String::is_empty) {
                    bail!(
                        "{group} tensor '{name}': no rank wrote piece {i} of {}",
                        e.stems.len()
                    );
                }
            }
        }
        Ok(index)
    }
}

/// An open checkpoint directory: its index and memory maps of its tensor files.
pub struct CheckpointReader {
    pub dir: PathBuf,
    pub index: CheckpointIndex,
    stems: HashMap<String, MmapedSafetensors>,
}

impl CheckpointReader {
    /// Opens `dir` (verify it first: see [`crate::verify`]). A checkpoint without an index (from
    /// helix before per-rank files) holds whole tensors in the stems `trainable` and
    /// `optimizer`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join(INDEX);
        let (index, stems) = if index_path.exists() {
            let index: CheckpointIndex = serde_json::from_value(crate::read_json(dir, INDEX)?)
                .with_context(|| format!("{}: not a checkpoint index", index_path.display()))?;
            if index.format != FORMAT {
                bail!(
                    "{}: index format {} (this helix reads {FORMAT})",
                    index_path.display(),
                    index.format
                );
            }
            let mut stems = HashMap::new();
            for (name, e) in index.groups.values().flat_map(|g| g.iter()) {
                if e.stems.is_empty() {
                    bail!("{}: tensor '{name}' is in no file", index_path.display());
                }
                for stem in &e.stems {
                    if !is_plain_name(stem) {
                        bail!(
                            "{}: file stem '{stem}' is not a plain name inside the checkpoint",
                            index_path.display()
                        );
                    }
                    if !stems.contains_key(stem) {
                        stems.insert(stem.clone(), open_stem(dir, stem)?);
                    }
                }
            }
            (index, stems)
        } else {
            legacy_index(dir)?
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            index,
            stems,
        })
    }

    /// The tensor names of `group`, sorted.
    pub fn names(&self, group: &str) -> Vec<&str> {
        self.index
            .groups
            .get(group)
            .map(|g| g.keys().map(String::as_str).collect())
            .unwrap_or_default()
    }

    /// Tensor `name` of `group` as rank `rank` of `size` holds it when split by `split`
    /// (`Split::Replicated`: the whole tensor), in its stored dtype.
    pub fn load(
        &self,
        group: &str,
        name: &str,
        split: Split,
        rank: usize,
        size: usize,
        device: &Device,
    ) -> Result<Tensor> {
        let e = self
            .index
            .groups
            .get(group)
            .and_then(|g| g.get(name))
            .with_context(|| format!("{}: no {group} tensor '{name}'", self.dir.display()))?;
        let piece = |i: usize| -> Result<Tensor> {
            let stem = &e.stems[i];
            let t = self.stems[stem].load(name, device).with_context(|| {
                format!("{}: {group} tensor '{name}' in {stem}", self.dir.display())
            })?;
            Ok(t)
        };
        if let (Some(d), Split::Dim(want)) = (e.split_dim, split) {
            if d == want && e.stems.len() == size {
                return piece(rank);
            }
        }
        let whole = match e.split_dim {
            None => piece(0)?,
            Some(d) => {
                let parts = (0..e.stems.len()).map(piece).collect::<Result<Vec<_>>>()?;
                Tensor::cat(&parts, d)?
            }
        };
        if whole.dims() != e.shape.as_slice() {
            bail!(
                "{}: {group} tensor '{name}' has shape {:?}, the index says {:?}",
                self.dir.display(),
                whole.dims(),
                e.shape
            );
        }
        shard_of(&whole, split, rank, size)
            .with_context(|| format!("{}: {group} tensor '{name}'", self.dir.display()))
    }
}

/// A file name with no path in it: what an index may name.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\', '\0'])
}

fn open_stem(dir: &Path, stem: &str) -> Result<MmapedSafetensors> {
    let files = stem_files(dir, stem)?;
    // SAFETY: checkpoint files are read-only once sealed and verified before being opened.
    unsafe { MmapedSafetensors::multi(&files) }.with_context(|| {
        format!(
            "cannot read the tensor files of {stem} in {}",
            dir.display()
        )
    })
}

/// The index of a checkpoint written before per-rank files: whole tensors under `trainable`
/// and `optimizer`.
fn legacy_index(dir: &Path) -> Result<(CheckpointIndex, HashMap<String, MmapedSafetensors>)> {
    let mut index = CheckpointIndex {
        format: FORMAT,
        ranks: 1,
        groups: BTreeMap::new(),
    };
    let mut stems = HashMap::new();
    for group in ["trainable", "optimizer"] {
        let st = open_stem(dir, group)?;
        let g = index.groups.entry(group.to_string()).or_default();
        for (name, view) in st.tensors() {
            let dtype = DType::try_from(view.dtype()).map_or_else(
                |_| format!("{:?}", view.dtype()),
                |d| d.as_str().to_string(),
            );
            g.insert(
                name,
                IndexEntry {
                    shape: view.shape().to_vec(),
                    dtype,
                    split_dim: None,
                    stems: vec![group.to_string()],
                },
            );
        }
        stems.insert(group.to_string(), st);
    }
    Ok((index, stems))
}
