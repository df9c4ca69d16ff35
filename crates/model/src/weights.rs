//! Hugging Face safetensors checkpoints: one file or shards with `model.safetensors.index.json`,
//! memory-mapped, read tensor by tensor so a 7B model is never held twice in RAM.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use memmap2::Mmap;
use safetensors::tensor::Dtype as StDtype;

use crate::safetensors_write::TensorSpec;
use crate::LlamaConfig;

/// Where one tensor's bytes are.
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    dtype: StDtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// The bytes of one weights file: memory-mapped from disk, or already in memory.
enum FileBytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Self::Mapped(m) => m,
            Self::Owned(v) => v,
        }
    }
}

/// Which of `parts` equal parts of a tensor along `dim` to read
/// ([`SafetensorsWeights::load_shard`]): a tensor-parallel rank's is its `index`.
#[derive(Clone, Copy, Debug)]
pub struct ShardPart {
    pub dim: usize,
    pub index: usize,
    pub parts: usize,
}

/// An open checkpoint: memory maps of its files and a table of every tensor in them.
pub struct SafetensorsWeights {
    dir: PathBuf,
    files: Vec<(PathBuf, FileBytes)>,
    entries: HashMap<String, Entry>,
}

impl SafetensorsWeights {
    /// Opens `dir/model.safetensors.index.json` if present, else `dir/model.safetensors`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        Self::open_files(dir, &stem_files(dir, "model")?)
    }

    /// Opens the given safetensors files; a tensor name present in two files is an error.
    pub fn open_files(dir: &Path, paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        for path in paths {
            let file = std::fs::File::open(path)
                .with_context(|| format!("cannot open weights file {}", path.display()))?;
            // SAFETY: the file is opened read-only; a checkpoint modified while training reads it
            // is outside what any trainer can defend against.
            let mmap = unsafe { Mmap::map(&file) }
                .with_context(|| format!("cannot map weights file {}", path.display()))?;
            files.push((path.clone(), FileBytes::Mapped(mmap)));
        }
        Self::index(dir, files)
    }

    /// One safetensors file already in memory; `path` names it in messages.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        let dir = path.parent().unwrap_or(Path::new(""));
        Self::index(dir, vec![(path.to_path_buf(), FileBytes::Owned(bytes))])
    }

    /// A checkpoint of `cfg`'s shape with random weights, in memory, for benchmarks at shapes
    /// no file is at hand for (Llama-2-7B on a GPU machine): matrices uniform with standard
    /// deviation 0.02 (transformers' `initializer_range`), norm weights 1, drawn from `seed` on
    /// all cores.
    pub fn random(cfg: &LlamaConfig, dtype: DType, seed: u64) -> Result<Self> {
        let specs: Vec<TensorSpec> = cfg
            .checkpoint_tensors()
            .into_iter()
            .map(|(name, shape)| TensorSpec::new(name, dtype, &shape))
            .collect();
        let mut bytes = Vec::new();
        crate::safetensors_write::write_safetensors(&mut bytes, &specs, |s| {
            let n: usize = s.shape.iter().product();
            let values = match s.shape.len() {
                1 => vec![1f32; n],
                _ => uniform_parallel(n, 0.02 * 3f32.sqrt(), seed ^ fnv1a(&s.name)),
            };
            Ok(Tensor::from_vec(values, s.shape.as_slice(), &Device::Cpu)?.to_dtype(s.dtype)?)
        })?;
        Self::from_bytes(Path::new("<random weights>/model.safetensors"), bytes)
    }

    /// Reads the header of every file into the table of tensors.
    fn index(dir: &Path, files: Vec<(PathBuf, FileBytes)>) -> Result<Self> {
        let mut entries = HashMap::new();
        for (idx, (path, bytes)) in files.iter().enumerate() {
            let (header_len, meta) =
                safetensors::SafeTensors::read_metadata(bytes).map_err(|e| {
                    anyhow::anyhow!(
                        "{}: not a valid safetensors file ({e:?}); is it truncated?",
                        path.display()
                    )
                })?;
            let data_start = 8 + header_len;
            let data_len = bytes.len() - data_start;
            for (name, info) in meta.tensors() {
                let (start, end) = info.data_offsets;
                if end > data_len {
                    bail!("{}: tensor '{name}' ends at byte {end} past the data ({data_len} bytes); the file is truncated", path.display());
                }
                let entry = Entry {
                    file: idx,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: data_start + start,
                    end: data_start + end,
                };
                if entries.insert(name.clone(), entry).is_some() {
                    bail!(
                        "tensor '{name}' appears in more than one weights file (again in {})",
                        path.display()
                    );
                }
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            entries,
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Shape as stored, if the tensor exists.
    pub fn shape_of(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// Part `part.index` of `part.parts` equal parts of `name` (stored with `full_shape`, 1-D or
    /// 2-D) along `part.dim`: a tensor-parallel rank's shard, read without loading the whole
    /// tensor.
    pub fn load_shard(
        &self,
        name: &str,
        full_shape: impl Into<Shape>,
        part: ShardPart,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let ShardPart { dim, index, parts } = part;
        let full: Shape = full_shape.into();
        if parts == 1 {
            return self.load(name, full, dtype, device);
        }
        let dims = full.dims().to_vec();
        if dim >= dims.len() || dims.len() > 2 || !dims[dim].is_multiple_of(parts) {
            bail!(
                "tensor '{name}' of shape {dims:?} does not split into {parts} equal parts \
                 along dimension {dim}"
            );
        }
        let (bytes, stored, file) = self.raw(name, &full)?;
        let per = dims[dim] / parts;
        let elem = stored.size_in_bytes();
        let (shape, data): (Vec<usize>, Vec<u8>) = if dim == 0 {
            let row = dims.iter().skip(1).product::<usize>() * elem;
            let mut shape = dims.clone();
            shape[0] = per;
            (
                shape,
                bytes[index * per * row..(index + 1) * per * row].to_vec(),
            )
        } else {
            // Columns: the slice of every row.
            let (rows, cols) = (dims[0], dims[1]);
            let mut data = Vec::with_capacity(rows * per * elem);
            for r in 0..rows {
                let at = (r * cols + index * per) * elem;
                data.extend_from_slice(&bytes[at..at + per * elem]);
            }
            (vec![rows, per], data)
        };
        let t = Tensor::from_raw_buffer(&data, stored, &shape, &Device::Cpu)
            .with_context(|| format!("tensor '{name}' in {}", file.display()))?;
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }

    /// The bytes of `name`, checked against `shape`, with their dtype and file: as stored, or
    /// dense again where bitsandbytes stored the weight in 4 bits (crate::bnb).
    fn raw(&self, name: &str, shape: &Shape) -> Result<(Cow<'_, [u8]>, DType, &Path)> {
        let entry = self.entries.get(name).with_context(|| {
            format!(
                "tensor '{name}' is missing from the checkpoint in {}",
                self.dir.display()
            )
        })?;
        let file = &self.files[entry.file].0;
        if let Some(suffix) = crate::bnb::state_suffix(name, |n| self.contains(n))
            .with_context(|| format!("in {}", file.display()))?
        {
            let (bytes, dtype, stored_shape) = crate::bnb::dequantize(name, &suffix, |n| {
                self.entries.get(n).map(|e| crate::bnb::Stored {
                    bytes: &self.files[e.file].1[e.start..e.end],
                    dtype: e.dtype,
                    shape: &e.shape,
                })
            })
            .with_context(|| format!("in {}", file.display()))?;
            if stored_shape != shape.dims() {
                bail!(
                    "tensor '{name}' in {} is a 4-bit {stored_shape:?} weight, expected {:?}",
                    file.display(),
                    shape.dims()
                );
            }
            return Ok((Cow::Owned(bytes), dtype, file));
        }
        if entry.shape != shape.dims() {
            bail!(
                "tensor '{name}' in {} has shape {:?}, expected {:?}",
                file.display(),
                entry.shape,
                shape.dims()
            );
        }
        let stored = match entry.dtype {
            StDtype::F32 => DType::F32,
            StDtype::F16 => DType::F16,
            StDtype::BF16 => DType::BF16,
            other => bail!(
                "tensor '{name}' in {} has dtype {other:?}; weights must be F32, F16 or BF16",
                file.display()
            ),
        };
        let bytes = &self.files[entry.file].1[entry.start..entry.end];
        if bytes.len() != shape.elem_count() * stored.size_in_bytes() {
            bail!(
                "tensor '{name}' in {}: {} bytes do not hold {:?} of {stored:?}",
                file.display(),
                bytes.len(),
                shape.dims()
            );
        }
        Ok((Cow::Borrowed(bytes), stored, file))
    }

    /// Whether bitsandbytes stored `name` in 4 bits (its JSON quantization state beside it).
    pub fn is_4bit(&self, name: &str) -> bool {
        // Both states at once is an error, which reading the weight reports.
        crate::bnb::state_suffix(name, |n| self.contains(n)).map_or(true, |s| s.is_some())
    }

    /// Loads `name`, checking that it has `shape`, converting to `dtype` on `device`.
    pub fn load(
        &self,
        name: &str,
        shape: impl Into<Shape>,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let shape: Shape = shape.into();
        let (bytes, stored, file) = self.raw(name, &shape)?;
        let t = Tensor::from_raw_buffer(&bytes, stored, shape.dims(), &Device::Cpu)
            .with_context(|| format!("tensor '{name}' in {}", file.display()))?;
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }
}

/// The files of the tensors saved under `stem` in `dir`: the shards `{stem}.safetensors.index.json`
/// lists if it exists, else `{stem}.safetensors`.
pub fn stem_files(dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    let (single, index) = (
        format!("{stem}.safetensors"),
        format!("{stem}.safetensors.index.json"),
    );
    if dir.join(&index).exists() {
        let names = shard_names_from_index(&dir.join(&index))?;
        return Ok(names.iter().map(|n| dir.join(n)).collect());
    }
    if !dir.join(&single).exists() {
        bail!(
            "no weights in {}: expected {single} or {index}",
            dir.display()
        );
    }
    Ok(vec![dir.join(single)])
}

/// Reads the shard file names of an index, refusing any that would leave the model directory.
pub fn shard_names_from_index(index: &Path) -> Result<Vec<String>> {
    let bytes = std::fs::read(index).with_context(|| format!("cannot read {}", index.display()))?;
    shard_names_from_index_bytes(index, &bytes)
}

/// [`shard_names_from_index`] on the index's bytes already in memory; `index` names them.
pub fn shard_names_from_index_bytes(index: &Path, bytes: &[u8]) -> Result<Vec<String>> {
    let v: serde_json::Value = serde_json::from_slice(bytes)
        .with_context(|| format!("{}: invalid JSON", index.display()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{}: missing object 'weight_map'", index.display()))?;
    let mut names: Vec<String> = Vec::new();
    for (tensor, file) in map {
        let file = file.as_str().with_context(|| {
            format!(
                "{}: weight_map['{tensor}'] is not a file name",
                index.display()
            )
        })?;
        check_inside_dir(file)
            .with_context(|| format!("{}: weight_map['{tensor}'] = '{file}'", index.display()))?;
        if !names.iter().any(|n| n == file) {
            names.push(file.to_string());
        }
    }
    if names.is_empty() {
        bail!("{}: weight_map is empty", index.display());
    }
    Ok(names)
}

/// A shard name must be a plain relative path below the model directory.
fn check_inside_dir(file: &str) -> Result<()> {
    let p = Path::new(file);
    if file.is_empty() || p.is_absolute() || file.starts_with('/') || file.starts_with('\\') {
        bail!("shard path must be relative to the model directory");
    }
    for c in p.components() {
        match c {
            Component::Normal(_) => {}
            _ => bail!("shard path must stay inside the model directory (no '..', no root)"),
        }
    }
    if file.contains("..") && file.split(['/', '\\']).any(|s| s == "..") {
        bail!("shard path must stay inside the model directory (no '..')");
    }
    Ok(())
}

/// `n` values uniform in (-bound, bound), filled in parallel chunks from xorshift streams.
fn uniform_parallel(n: usize, bound: f32, seed: u64) -> Vec<f32> {
    let mut out = vec![0f32; n];
    let threads = std::thread::available_parallelism().map_or(1, |p| p.get());
    let chunk = n.div_ceil(threads).max(1 << 16);
    std::thread::scope(|s| {
        for (c, part) in out.chunks_mut(chunk).enumerate() {
            s.spawn(move || {
                let mut x = (seed ^ (c as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
                for v in part {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let unit = (x >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
                    *v = (2.0 * unit - 1.0) * bound;
                }
            });
        }
    });
    out
}

/// FNV-1a of a name: a seed of its own for each tensor or layer, whatever order they are made
/// in (random benchmark weights here, adapter initialisation in helix-peft).
pub fn fnv1a(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fixtures were saved by transformers: their tensors are what a checkpoint of each
    /// shape must hold, names and shapes.
    #[test]
    fn random_weights_hold_the_tensors_transformers_saves_with_an_initializer_spread() -> Result<()>
    {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
        for fixture in ["tiny-gqa-tied", "tiny-gqa-untied-b3"] {
            let dir = root.join(fixture);
            let cfg = LlamaConfig::from_file(&dir.join("config.json"))?;
            let saved = SafetensorsWeights::open_dir(&dir)?;
            let random = SafetensorsWeights::random(&cfg, DType::BF16, 5)?;
            let mut want: Vec<(&str, &[usize])> = saved
                .names()
                .map(|n| (n, saved.shape_of(n).expect("listed")))
                .collect();
            let mut got: Vec<(&str, &[usize])> = random
                .names()
                .map(|n| (n, random.shape_of(n).expect("listed")))
                .collect();
            want.sort();
            got.sort();
            assert_eq!(got, want, "{fixture}");
            let q = random.load(
                "model.layers.1.self_attn.q_proj.weight",
                random
                    .shape_of("model.layers.1.self_attn.q_proj.weight")
                    .expect("q"),
                DType::F32,
                &Device::Cpu,
            )?;
            let v = q.flatten_all()?.to_vec1::<f32>()?;
            let mean = v.iter().sum::<f32>() / v.len() as f32;
            let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32).sqrt();
            assert!(
                mean.abs() < 0.003 && (std - 0.02).abs() < 0.002,
                "{mean} {std}"
            );
            let norm = random.load(
                "model.norm.weight",
                cfg.hidden_size,
                DType::F32,
                &Device::Cpu,
            )?;
            assert_eq!(norm.min(0)?.to_scalar::<f32>()?, 1.0);
        }
        Ok(())
    }

    #[test]
    fn weights_from_bytes_read_as_from_a_file_and_name_it() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("w.safetensors");
        let t = Tensor::arange(0f32, 6., &Device::Cpu)?.reshape((2, 3))?;
        candle_core::safetensors::save(&HashMap::from([("w".to_string(), t)]), &path)?;
        let bytes = std::fs::read(&path)?;
        let w = SafetensorsWeights::from_bytes(&path, bytes.clone())?;
        let second = ShardPart {
            dim: 0,
            index: 1,
            parts: 2,
        };
        let half = w.load_shard("w", (2, 3), second, DType::F32, &Device::Cpu)?;
        assert_eq!(half.to_vec2::<f32>()?, [[3., 4., 5.]]);
        let err = SafetensorsWeights::from_bytes(&path, bytes[..bytes.len() - 1].to_vec())
            .err()
            .expect("truncated");
        assert!(
            err.to_string()
                .contains("w.safetensors: not a valid safetensors file"),
            "{err}"
        );
        let index = Path::new("m/model.safetensors.index.json");
        let err = shard_names_from_index_bytes(index, br#"{"weight_map": {"w": "../x"}}"#)
            .expect_err("outside the directory");
        assert!(
            format!("{err:#}").contains("m/model.safetensors.index.json: weight_map['w']"),
            "{err:#}"
        );
        Ok(())
    }
}
