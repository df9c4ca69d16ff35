//! On-disk cache of tokenized data, so a second run with the same inputs starts at once.
//!
//! The key is a SHA-256 over everything the tokens depend on: the data file's bytes, the
//! tokenizer files' bytes, the template, field names, length settings, loss mode and EOS id.
//! Any change gives a new key (a new file), never a stale hit. Files are written to a temporary
//! name and renamed, so a crash mid-write leaves no partial cache; a file that fails any check
//! on reading is reported and rebuilt, never trusted.
//!
//! Layout (little-endian): `HELIXTOK` magic, u32 version, u64 header length, JSON header
//! ([`CacheHeader`]), then per sample u32 length, u32 prompt length, u32 record index and u32
//! count of untrained ranges, then every sample's untrained ranges (u32 start, u32 end), then all
//! token ids as u32. Labels are not stored: they follow from ids, prompt length, untrained
//! ranges and loss mode.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::stats::ReadSummary;
use crate::tokenize::{LossMode, Sample, TokenizeStats, Tokenized};

const MAGIC: &[u8; 8] = b"HELIXTOK";
const VERSION: u32 = 2;

/// Hex SHA-256 of a file's bytes, read a buffer at a time: a training file of many GB is
/// hashed on every rank (each checks it holds rank 0's data) without being held whole.
pub fn file_sha256(path: &Path) -> Result<String> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new();
    std::io::copy(&mut reader, &mut hasher)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(hex(&hasher.finalize()))
}

/// Hex SHA-256 of any serializable key description.
pub fn key_sha256<T: Serialize>(key: &T) -> Result<String> {
    Ok(hex(&Sha256::digest(serde_json::to_vec(key)?)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a cache file holds besides the samples.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CacheHeader {
    pub key: String,
    pub loss: LossMode,
    pub read: ReadSummary,
    pub stats: TokenizeStats,
    pub samples: usize,
    pub tokens: usize,
}

/// The cache file for `key` under `dir`, named after the data file so people can tell them apart.
pub fn cache_path(dir: &Path, data_file: &Path, key: &str) -> PathBuf {
    let stem = data_file
        .file_stem()
        .map_or_else(|| "data".into(), |s| s.to_string_lossy().into_owned());
    dir.join(format!("{stem}-{}.tokens", &key[..16]))
}

/// Writes `tokenized` atomically (temporary file, fsync, rename).
pub fn write_cache(
    path: &Path,
    key: &str,
    loss: LossMode,
    read: &ReadSummary,
    tokenized: &Tokenized,
) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the cache directory {}", dir.display()))?;
    let header = CacheHeader {
        key: key.to_string(),
        loss,
        read: read.clone(),
        stats: tokenized.stats.clone(),
        samples: tokenized.samples.len(),
        tokens: tokenized.samples.iter().map(|s| s.input_ids.len()).sum(),
    };
    let header_json = serde_json::to_vec(&header)?;
    let ranges: usize = tokenized.samples.iter().map(|s| s.untrained.len()).sum();
    let mut buf = Vec::with_capacity(
        24 + header_json.len() + 16 * header.samples + 8 * ranges + 4 * header.tokens,
    );
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&VERSION.to_le_bytes());
    buf.extend_from_slice(&(header_json.len() as u64).to_le_bytes());
    buf.extend_from_slice(&header_json);
    for s in &tokenized.samples {
        for v in [s.input_ids.len(), s.prompt_len, s.record, s.untrained.len()] {
            buf.extend_from_slice(&(v as u32).to_le_bytes());
        }
    }
    for r in tokenized.samples.iter().flat_map(|s| &s.untrained) {
        for v in [r.start, r.end] {
            buf.extend_from_slice(&(v as u32).to_le_bytes());
        }
    }
    for s in &tokenized.samples {
        for id in &s.input_ids {
            buf.extend_from_slice(&id.to_le_bytes());
        }
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&buf)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().with_context(|| format!("cannot write the token cache {}", path.display()))?;
    Ok(())
}

/// Reads a cache file written by [`write_cache`] for `key`. Any mismatch is an error that says
/// what is wrong; callers treat it as a miss.
pub fn read_cache(path: &Path, key: &str) -> Result<(ReadSummary, Tokenized)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut r = Reader {
        bytes: &bytes,
        at: 0,
    };
    if r.take(8)? != MAGIC {
        bail!("{}: not a helix token cache", path.display());
    }
    let version = r.u32()?;
    if version != VERSION {
        bail!(
            "{}: cache version {version}, expected {VERSION}",
            path.display()
        );
    }
    let header_len = r.u64()? as usize;
    let header: CacheHeader = serde_json::from_slice(r.take(header_len)?)
        .with_context(|| format!("{}: unreadable cache header", path.display()))?;
    if header.key != key {
        bail!("{}: cache key differs", path.display());
    }
    let corrupt = || anyhow::anyhow!("{}: cache is truncated or corrupt", path.display());
    // Counts are checked against the bytes left before anything is sized by them.
    let fits = |r: &Reader, items: usize, bytes: usize| {
        items
            .checked_mul(bytes)
            .is_some_and(|n| n <= r.bytes.len() - r.at)
    };
    if !fits(&r, header.samples, 16) {
        return Err(corrupt());
    }
    let mut meta = Vec::with_capacity(header.samples);
    for _ in 0..header.samples {
        let [len, prompt_len, record, ranges] = [r.u32()?, r.u32()?, r.u32()?, r.u32()?];
        meta.push((
            len as usize,
            prompt_len as usize,
            record as usize,
            ranges as usize,
        ));
    }
    let mut untrained = Vec::with_capacity(meta.len());
    for &(len, prompt_len, record, ranges) in &meta {
        // Samples index the records they came from (the splits do).
        if record >= header.read.records || !fits(&r, ranges, 8) {
            return Err(corrupt());
        }
        let mut sample = Vec::with_capacity(ranges);
        let mut at = prompt_len;
        for _ in 0..ranges {
            let (start, end) = (r.u32()? as usize, r.u32()? as usize);
            // In order, disjoint, past the prompt and inside the sample: labels index by them.
            if start < at || end <= start || end > len {
                return Err(corrupt());
            }
            at = end;
            sample.push(start..end);
        }
        untrained.push(sample);
    }
    let total: usize = meta.iter().map(|m| m.0).sum();
    let prompts_fit = meta
        .iter()
        .all(|&(len, prompt_len, _, _)| prompt_len <= len);
    if total != header.tokens || r.bytes.len() - r.at != 4 * total || !prompts_fit {
        return Err(corrupt());
    }
    let mut samples = Vec::with_capacity(header.samples);
    for ((len, prompt_len, record, _), untrained) in meta.into_iter().zip(untrained) {
        let input_ids: Vec<u32> = r
            .take(4 * len)?
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        samples.push(Sample::with_untrained(
            input_ids,
            prompt_len,
            untrained,
            record,
            header.loss,
        ));
    }
    Ok((
        header.read,
        Tokenized {
            samples,
            stats: header.stats,
        },
    ))
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            bail!("cache is truncated");
        };
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_hashed_a_buffer_at_a_time_has_its_bytes_sha256() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("rows.jsonl");
        // Past two read buffers, ending mid-buffer.
        let bytes: Vec<u8> = (0..(2 << 20) + 12_345)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        std::fs::write(&path, &bytes)?;
        assert_eq!(file_sha256(&path)?, hex(&Sha256::digest(&bytes)));
        // The empty file: SHA-256's well-known empty digest.
        std::fs::write(&path, b"")?;
        assert_eq!(
            file_sha256(&path)?,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let missing = dir.path().join("missing.jsonl");
        let err = format!("{:#}", file_sha256(&missing).unwrap_err());
        assert!(err.contains("missing.jsonl"), "{err}");
        Ok(())
    }
}
