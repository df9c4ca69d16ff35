//! Writing safetensors files the way Hugging Face tools read them: atomically (temporary file,
//! fsync, rename), streamed one tensor at a time so peak memory is one tensor, and sharded with
//! a `model.safetensors.index.json` above a size limit, as `save_pretrained` does.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::json;

/// A tensor to be written: name, dtype on disk and shape; its values are produced later.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn new(name: impl Into<String>, dtype: DType, shape: &[usize]) -> Self {
        Self {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
        }
    }

    pub fn bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size_in_bytes()
    }
}

fn st_dtype(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "F32",
        DType::BF16 => "BF16",
        DType::F16 => "F16",
        other => bail!("cannot write dtype {other:?} to safetensors (F32, BF16 or F16)"),
    })
}

/// The little-endian bytes of `t` converted to `dtype`.
pub fn tensor_bytes(source: &Tensor, dtype: DType) -> Result<Vec<u8>> {
    let t = source
        .to_device(&Device::Cpu)?
        .to_dtype(dtype)?
        .flatten_all()?;
    Ok(match dtype {
        DType::F32 => t
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::BF16 => t
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::F16 => {
            let v = t.to_vec1::<half::f16>()?;
            // float16 tops out at 65504: a larger weight would be written as infinity, and
            // the model would load and then compute NaN.
            if let Some(x) = v.iter().find(|x| x.is_infinite()) {
                let extreme = source_extreme(source, x.is_sign_negative())?;
                match extreme.is_finite() {
                    true => bail!(
                        "a value ({extreme:e}) beyond float16's range (±65504) would be written \
                         as infinity: write bf16 or f32 instead"
                    ),
                    false => bail!("it holds an infinite value"),
                }
            }
            v.iter().flat_map(|x| x.to_le_bytes()).collect()
        }
        other => bail!("cannot write dtype {other:?}"),
    })
}

/// The most positive (or, `negative`, most negative) value of `source`.
fn source_extreme(source: &Tensor, negative: bool) -> Result<f32> {
    let v = source
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?;
    let pick = |a: f32, b: f32| if negative { a.min(b) } else { a.max(b) };
    Ok(v.iter().copied().fold(0.0, pick))
}

/// Writes `path` through a temporary file in the same directory, so readers see the old file or
/// the complete new one, never a partial one. The temporary file is removed on error.
pub fn write_atomic(path: &Path, f: impl FnOnce(&mut BufWriter<File>) -> Result<()>) -> Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?
        .to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let io_ctx = |e: anyhow::Error| match e.is::<std::io::Error>() {
        true => e.context(format!("writing {}", path.display())),
        // Errors from producing the content (a bad tensor) already say what went wrong.
        false => e,
    };
    let result = (|| {
        let mut w = BufWriter::new(File::create(&tmp)?);
        f(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(std::fs::rename(&tmp, path)?)
    })()
    .map_err(io_ctx);
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Pretty JSON with a trailing newline, atomically.
pub fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    write_atomic(path, |w| {
        serde_json::to_writer_pretty(&mut *w, v)?;
        w.write_all(b"\n")?;
        Ok(())
    })
}

/// The name of shard `i` (from 1) of `n` of `stem`, as transformers names them:
/// `model-00002-of-00013.safetensors`.
pub fn shard_file(stem: &str, i: usize, n: usize) -> String {
    format!("{stem}-{i:05}-of-{n:05}.safetensors")
}

/// Whether `name` is a [`shard_file`] name of `stem`.
pub fn is_shard_file(stem: &str, name: &str) -> bool {
    let Some(rest) = name
        .strip_prefix(stem)
        .and_then(|r| r.strip_prefix('-'))
        .and_then(|r| r.strip_suffix(".safetensors"))
    else {
        return false;
    };
    let digits = |p: &str| p.len() == 5 && p.bytes().all(|b| b.is_ascii_digit());
    matches!(rest.split_once("-of-"), Some((i, n)) if digits(i) && digits(n))
}

/// Streams the tensors of `specs` into one safetensors file with `{"format": "pt"}` metadata;
/// `produce` gives each tensor's values when its turn comes. They are written widest dtype
/// first, then by name, as the safetensors library orders them: every tensor then starts at a
/// multiple of its element size, which readers that map the file in place need.
pub fn write_safetensors(
    w: &mut impl Write,
    specs: &[TensorSpec],
    mut produce: impl FnMut(&TensorSpec) -> Result<Tensor>,
) -> Result<()> {
    let mut order: Vec<&TensorSpec> = specs.iter().collect();
    order.sort_by(|a, b| {
        (std::cmp::Reverse(a.dtype.size_in_bytes()), &a.name)
            .cmp(&(std::cmp::Reverse(b.dtype.size_in_bytes()), &b.name))
    });
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0usize;
    for s in &order {
        let len = s.bytes();
        header.insert(
            s.name.clone(),
            json!({"dtype": st_dtype(s.dtype)?, "shape": s.shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let mut header = serde_json::to_vec(&header)?;
    // The format asks for the data to start 8-byte aligned; pad the header with spaces.
    header.resize(header.len().div_ceil(8) * 8, b' ');
    w.write_all(&(header.len() as u64).to_le_bytes())?;
    w.write_all(&header)?;
    for s in order {
        let t = produce(s)?;
        if t.dims() != s.shape.as_slice() {
            bail!(
                "tensor {} has shape {:?}, expected {:?}",
                s.name,
                t.dims(),
                s.shape
            );
        }
        w.write_all(&tensor_bytes(&t, s.dtype).with_context(|| format!("tensor {}", s.name))?)?;
    }
    Ok(())
}

/// Saves in-memory tensors (each in its own dtype) to `path`, atomically.
pub fn save_tensors(path: &Path, named: &[(String, Tensor)]) -> Result<()> {
    let specs: Vec<TensorSpec> = named
        .iter()
        .map(|(n, t)| TensorSpec::new(n.clone(), t.dtype(), t.dims()))
        .collect();
    let by_name: BTreeMap<&str, &Tensor> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
    if by_name.len() != named.len() {
        bail!("{}: duplicate tensor names", path.display());
    }
    write_atomic(path, |w| {
        write_safetensors(w, &specs, |s| Ok(by_name[s.name.as_str()].clone()))
    })
}

/// What [`save_sharded`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardReport {
    /// File names, in order: `<stem>.safetensors`, or `<stem>-00001-of-0000N.safetensors`… and
    /// `<stem>.safetensors.index.json`.
    pub files: Vec<String>,
    pub total_bytes: usize,
}

/// Writes `specs` into `dir` as Hugging Face does (with `stem` = "model"): one
/// `<stem>.safetensors` when everything fits in `max_shard_bytes`, else shards filled in spec
/// order up to that size (a tensor larger than the limit gets a shard of its own) and
/// `<stem>.safetensors.index.json` mapping every tensor to its shard. Each file is written
/// atomically; the index comes last.
pub fn save_sharded(
    dir: &Path,
    stem: &str,
    specs: &[TensorSpec],
    max_shard_bytes: usize,
    mut produce: impl FnMut(&TensorSpec) -> Result<Tensor>,
) -> Result<ShardReport> {
    let mut shards: Vec<Vec<TensorSpec>> = Vec::new();
    let mut size = 0usize;
    for s in specs {
        if shards.is_empty() || (size + s.bytes() > max_shard_bytes && size > 0) {
            shards.push(Vec::new());
            size = 0;
        }
        size += s.bytes();
        shards.last_mut().expect("a shard").push(s.clone());
    }
    let total_bytes = specs.iter().map(TensorSpec::bytes).sum();
    if shards.len() <= 1 {
        let file = format!("{stem}.safetensors");
        write_atomic(&dir.join(&file), |w| {
            write_safetensors(w, specs, &mut produce)
        })?;
        return Ok(ShardReport {
            files: vec![file],
            total_bytes,
        });
    }
    let n = shards.len();
    let mut files = Vec::with_capacity(n);
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = shard_file(stem, i + 1, n);
        write_atomic(&dir.join(&file), |w| {
            write_safetensors(w, shard, &mut produce)
        })?;
        for s in shard {
            weight_map.insert(s.name.clone(), json!(file));
        }
        files.push(file);
    }
    let index = format!("{stem}.safetensors.index.json");
    write_json(
        &dir.join(&index),
        &json!({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}),
    )?;
    files.push(index);
    Ok(ShardReport { files, total_bytes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_split_at_the_limit_and_load_back() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let dev = Device::Cpu;
        let named: Vec<(String, Tensor)> = (0..5)
            .map(|i| {
                let t = Tensor::arange(0f32, 10.0, &dev).unwrap() + i as f64;
                (format!("t{i}"), t.unwrap())
            })
            .collect();
        let specs: Vec<TensorSpec> = named
            .iter()
            .map(|(n, _)| TensorSpec::new(n.clone(), DType::F32, &[10]))
            .collect();
        // 40 bytes each; 100-byte shards hold two.
        let report = save_sharded(tmp.path(), "model", &specs, 100, |s| {
            Ok(named.iter().find(|(n, _)| *n == s.name).unwrap().1.clone())
        })?;
        assert_eq!(report.files.len(), 4);
        assert_eq!(report.files[3], "model.safetensors.index.json");
        assert_eq!(report.files[0], "model-00001-of-00003.safetensors");
        assert_eq!(report.total_bytes, 200);
        let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
            tmp.path().join("model.safetensors.index.json"),
        )?)?;
        assert_eq!(
            index["weight_map"]["t4"],
            "model-00003-of-00003.safetensors"
        );
        assert_eq!(index["metadata"]["total_size"], 200);
        let back = crate::SafetensorsWeights::open_dir(tmp.path())?;
        for (n, t) in &named {
            let got = back.load(n, 10, DType::F32, &dev)?;
            assert_eq!(got.to_vec1::<f32>()?, t.to_vec1::<f32>()?);
        }
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(tmp.path())?.count(), 4);
        Ok(())
    }

    #[test]
    fn mixed_dtypes_each_start_at_a_multiple_of_their_size() -> Result<()> {
        let dev = Device::Cpu;
        // By name alone the odd-length bf16 "a" would come first and push "b" off 4 bytes.
        let named = [
            ("a".to_string(), Tensor::ones(3, DType::BF16, &dev)?),
            ("b".to_string(), Tensor::ones(2, DType::F32, &dev)?),
            ("c".to_string(), Tensor::ones(1, DType::BF16, &dev)?),
        ];
        let tmp = tempfile::tempdir()?;
        let path = tmp.path().join("m.safetensors");
        save_tensors(&path, &named)?;
        let bytes = std::fs::read(&path)?;
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n])?;
        for (name, size) in [("a", 2), ("b", 4), ("c", 2)] {
            let start = header[name]["data_offsets"][0].as_u64().unwrap();
            assert_eq!(start % size, 0, "{name} starts at {start}");
        }
        assert_eq!(header["b"]["data_offsets"][0], 0);
        let back = crate::SafetensorsWeights::open_files(tmp.path(), &[path])?;
        for (name, t) in &named {
            let got = back.load(name, t.dims(), t.dtype(), &dev)?;
            assert_eq!(
                got.to_dtype(DType::F32)?.to_vec1::<f32>()?,
                t.to_dtype(DType::F32)?.to_vec1::<f32>()?
            );
        }
        Ok(())
    }

    #[test]
    fn a_failed_write_leaves_the_old_file() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let path = tmp.path().join("a.safetensors");
        let t = Tensor::ones(3, DType::F32, &Device::Cpu)?;
        save_tensors(&path, &[("x".into(), t.clone())])?;
        let before = std::fs::read(&path)?;
        let specs = [TensorSpec::new("x", DType::F32, &[3])];
        let err = write_atomic(&path, |w| {
            write_safetensors(w, &specs, |_| {
                Ok(Tensor::ones(4, DType::F32, &Device::Cpu)?)
            })
        })
        .unwrap_err();
        assert!(err.to_string().contains("tensor x has shape [4]"), "{err}");
        assert_eq!(std::fs::read(&path)?, before);
        assert_eq!(std::fs::read_dir(tmp.path())?.count(), 1);
        Ok(())
    }

    #[test]
    fn a_value_beyond_f16_range_is_refused_not_written_as_infinity() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let path = tmp.path().join("a.safetensors");
        let big = Tensor::new(&[1.0f32, -7.0e4, 3.0], &Device::Cpu)?;
        let specs = [TensorSpec::new("w", DType::F16, &[3])];
        let err =
            write_atomic(&path, |w| write_safetensors(w, &specs, |_| Ok(big.clone()))).unwrap_err();
        let err = format!("{err:#}");
        assert!(
            err.contains("tensor w") && err.contains("-7e4") && err.contains("±65504"),
            "{err}"
        );
        assert!(!path.exists());
        // In range, and in bf16, it is written.
        let ok = Tensor::new(&[1.0f32, -6.5e4, 3.0], &Device::Cpu)?;
        write_atomic(&path, |w| write_safetensors(w, &specs, |_| Ok(ok.clone())))?;
        let bf = [TensorSpec::new("w", DType::BF16, &[3])];
        write_atomic(&path, |w| write_safetensors(w, &bf, |_| Ok(big.clone())))?;
        Ok(())
    }
}
