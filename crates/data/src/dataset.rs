//! From a `[data]` config to tokenized train / validation / test samples: read, template,
//! tokenize (or load from the cache), split. This is the whole data recipe, top to bottom.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use helix_model::TextCodec;
use serde::Serialize;

use crate::cache::{cache_path, file_sha256, key_sha256, read_cache, write_cache};
use crate::chat_template::AssistantSpans;
use crate::config::DataConfig;
use crate::mix::{apportion, draw, draw_seed, MixShare};
use crate::records::{read_records, FieldMap};
use crate::source::Source;
use crate::split::split_by_fraction;
use crate::stats::{DataStats, ReadSummary};
use crate::template::Template;
use crate::tokenize::{
    tokenize_records, LengthPolicy, LossMode, Sample, TokenizeOptions, Tokenized,
};

/// A tokenizer directory opened for data preparation.
pub struct DataTokenizer {
    pub dir: PathBuf,
    pub codec: Arc<TextCodec>,
    pub eos_id: u32,
    /// Padding id for batches: the tokenizer's pad token, else EOS (labels mask it anyway).
    pub pad_id: u32,
}

impl DataTokenizer {
    pub fn open(dir: &Path) -> Result<Self> {
        Self::with_codec(dir, TextCodec::open(dir)?)
    }

    /// The tokenizer `cfg` prepares data with: `dir`'s, its chat template replaced by the
    /// Jinja file `data.chat_template` names, when it names one.
    pub fn for_config(cfg: &DataConfig, dir: &Path) -> Result<Self> {
        cfg.validate()?; // a mistake in the keys is named before any file is read
        let mut codec = TextCodec::open(dir)?;
        if let Some(file) = &cfg.chat_template {
            codec
                .set_chat_template_file(file)
                .context("data.chat_template")?;
        }
        Self::with_codec(dir, codec)
    }

    fn with_codec(dir: &Path, codec: TextCodec) -> Result<Self> {
        let codec = Arc::new(codec);
        let eos_id = codec
            .eos_token
            .as_deref()
            .and_then(|t| codec.token_id(t))
            .with_context(|| {
                format!(
                    "{}: no eos_token in tokenizer_config.json (or it is not in the vocabulary)",
                    dir.display()
                )
            })?;
        let pad_id = codec
            .tokenizer
            .get_padding()
            .map(|p| p.pad_id)
            .unwrap_or(eos_id);
        Ok(Self {
            dir: dir.to_path_buf(),
            codec,
            eos_id,
            pad_id,
        })
    }
}

/// Where one file's tokens came from.
#[derive(Clone, Debug, Serialize)]
pub struct SourceReport {
    pub file: PathBuf,
    /// SHA-256 of the file's bytes: what a resumed run checks it still reads.
    pub sha256: String,
    pub cache: Option<PathBuf>,
    pub cache_hit: bool,
    pub seconds: f64,
    pub stats: DataStats,
    /// Messages of rows skipped under `skip_invalid`, for the end-of-run report.
    #[serde(skip)]
    pub skipped_rows: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SplitCounts {
    pub train: usize,
    pub validation: usize,
    pub test: usize,
}

/// What [`prepare`] did: per-file statistics, cache use, each `[[data.mix]]` file's share and
/// the split sizes (in samples).
#[derive(Clone, Debug, Serialize)]
pub struct DataReport {
    pub sources: BTreeMap<String, SourceReport>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mix: Vec<MixShare>,
    pub splits: SplitCounts,
}

pub struct PreparedData {
    pub train: Vec<Sample>,
    pub validation: Vec<Sample>,
    pub test: Vec<Sample>,
    pub report: DataReport,
}

impl PreparedData {
    /// An error saying why, when the train split holds fewer samples than the `ranks` that
    /// share it (none at all, mostly: every sample dropped as too long).
    pub fn check_trainable(&self, cfg: &DataConfig, ranks: usize) -> Result<()> {
        self.check_weighted_files(cfg)?;
        let n = self.train.len();
        if n >= ranks.max(1) {
            return Ok(());
        }
        if let Some(size) = cfg.samples_per_epoch.filter(|&s| s == n) {
            bail!(
                "data.samples_per_epoch = {size} is fewer than the {ranks} data-parallel \
                 ranks that share the mixture"
            );
        }
        let files = self.file_reasons(cfg, |_| true)?;
        let counted = format!("{n} training sample(s) for {ranks} data-parallel rank(s)");
        match files.as_slice() {
            [(file, why)] if cfg.mix.is_empty() => bail!("{file}: {counted}: {why}"),
            _ => bail!("{counted}: {}", joined(&files)),
        }
    }

    /// An error naming the weighted `[[data.mix]]` files that give no training sample (every
    /// one dropped as too long, or split off), and why.
    fn check_weighted_files(&self, cfg: &DataConfig) -> Result<()> {
        let empty: Vec<&MixShare> = self
            .report
            .mix
            .iter()
            .filter(|m| m.share.is_some() && m.samples == 0)
            .collect();
        if empty.is_empty() {
            return Ok(());
        }
        let files = self.file_reasons(cfg, |role| empty.iter().any(|m| m.source == role))?;
        bail!(
            "weighted [[data.mix]] file(s) with no training sample to draw their share from: {}",
            joined(&files)
        );
    }

    /// For each training file that `wanted` picks by its role: its key and file, and what
    /// became of its records.
    fn file_reasons(
        &self,
        cfg: &DataConfig,
        wanted: impl Fn(&str) -> bool,
    ) -> Result<Vec<(String, String)>> {
        let mut files = Vec::new();
        for source in cfg.train_sources()? {
            if !wanted(&source.role) {
                continue;
            }
            let Some(src) = self.report.sources.get(&source.role) else {
                bail!("no training data was read from {}", source.file_key());
            };
            let st = &src.stats;
            let kept = match self.report.mix.iter().find(|m| m.source == source.role) {
                Some(share) => share.samples,
                None => self.train.len(),
            };
            let mut why = Vec::new();
            if st.tokenize.dropped > 0 {
                let policy = serde_json::to_value(cfg.length_policy)?;
                let other = match cfg.length_policy {
                    LengthPolicy::TruncatePrompt => "",
                    _ => ", or set data.length_policy = \"truncate_prompt\"",
                };
                why.push(format!(
                    "{} were dropped as longer than data.max_seq_length = {} under \
                     data.length_policy = {policy} (raise data.max_seq_length{other})",
                    st.tokenize.dropped, cfg.max_seq_length
                ));
            }
            let split_off = st.samples.saturating_sub(kept);
            if split_off > 0 {
                why.push(format!(
                    "{split_off} went to the validation / test split (data.validation_fraction, \
                     data.test_fraction)"
                ));
            }
            files.push((
                format!("{} = {}", source.file_key(), source.file.display()),
                format!(
                    "of its {} records, {}",
                    st.records,
                    match why.is_empty() {
                        true => "none was dropped or split off: add rows".to_string(),
                        false => why.join("; "),
                    }
                ),
            ));
        }
        Ok(files)
    }
}

/// `file: why; file: why`.
fn joined(files: &[(String, String)]) -> String {
    files
        .iter()
        .map(|(file, why)| format!("{file}: {why}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Reads, templates, tokenizes and splits the data of `cfg`, and mixes its training files.
pub fn prepare(cfg: &DataConfig, tok: &DataTokenizer) -> Result<PreparedData> {
    cfg.validate()?;
    let mut sources = BTreeMap::new();
    // One template per spec: files that share one (train, validation, test) build it once.
    let mut templates: BTreeMap<String, Template> = BTreeMap::new();
    let mut load = |source: &Source| -> Result<(usize, Tokenized)> {
        if !templates.contains_key(source.template) {
            let template = source_template(cfg, source, tok)?;
            templates.insert(source.template.to_string(), template);
        }
        let template = &templates[source.template];
        let (report, tokenized) = load_source(cfg, tok, template, source)
            .with_context(|| format!("{} = {}", source.file_key(), source.file.display()))?;
        let records = report.stats.records;
        sources.insert(source.role.clone(), report);
        Ok((records, tokenized))
    };

    let train_sources = cfg.train_sources()?;
    let (mut per_file, mut validation, mut test) = (Vec::new(), Vec::new(), Vec::new());
    for source in &train_sources {
        let (records, tokenized) = load(source)?;
        let split = split_by_fraction(
            records,
            cfg.validation_fraction,
            cfg.test_fraction,
            cfg.seed,
        )
        .with_context(|| format!("splitting {}", source.file_key()))?;
        let mut role_of = vec![0u8; records];
        for &r in &split.validation {
            role_of[r] = 1;
        }
        for &r in &split.test {
            role_of[r] = 2;
        }
        let mut train = Vec::new();
        for s in tokenized.samples {
            match role_of[s.record] {
                0 => train.push(s),
                1 => validation.push(s),
                _ => test.push(s),
            }
        }
        per_file.push(train);
    }
    for source in cfg.held_out_sources()? {
        let samples = load(&source)?.1.samples;
        match source.role.as_str() {
            "validation" => validation = samples,
            _ => test = samples,
        }
    }
    let (train, mix) = mix_files(cfg, &train_sources, per_file)?;
    let splits = SplitCounts {
        train: train.len(),
        validation: validation.len(),
        test: test.len(),
    };
    Ok(PreparedData {
        train,
        validation,
        test,
        report: DataReport {
            sources,
            mix,
            splits,
        },
    })
}

/// The template `source` is rendered with.
fn source_template(cfg: &DataConfig, source: &Source, tok: &DataTokenizer) -> Result<Template> {
    let template = Template::from_spec(source.template, Some(tok.codec.clone()))
        .with_context(|| source.template_key())?;
    Ok(match template {
        Template::Chat(chat) => Template::Chat(
            chat.with_spans(cfg.assistant_spans)
                .context("data.assistant_spans")?,
        ),
        other => other,
    })
}

/// The training set of the files' training samples: all of each, in file order, or, with
/// weights, each file's share of the mixture (see [`crate::mix`]).
fn mix_files(
    cfg: &DataConfig,
    sources: &[Source],
    per_file: Vec<Vec<Sample>>,
) -> Result<(Vec<Sample>, Vec<MixShare>)> {
    if cfg.mix.is_empty() {
        return Ok((per_file.into_iter().flatten().collect(), Vec::new()));
    }
    let weights: Option<Vec<f64>> = sources.iter().map(|s| s.weight).collect();
    let available: Vec<usize> = per_file.iter().map(Vec::len).collect();
    let counts: Vec<usize> = match &weights {
        Some(w) => apportion(
            w,
            cfg.samples_per_epoch
                .unwrap_or_else(|| available.iter().sum()),
        ),
        None => available.clone(),
    }
    .into_iter()
    .zip(&available)
    // A file with nothing to draw gives nothing: check_trainable names it, after data-stats
    // has printed every file's statistics.
    .map(|(count, &n)| if n == 0 { 0 } else { count })
    .collect();
    let total: usize = counts.iter().sum();
    let sum: f64 = weights.iter().flatten().sum();
    let mut shares = Vec::new();
    // Each drawn copy is a sample of its own: a mixture beyond memory is an error naming the
    // key, not an abort (or the kernel's OOM killer) halfway through.
    let bytes: f64 = per_file
        .iter()
        .zip(&counts)
        .filter(|(_, &count)| count > 0)
        .map(|(samples, &count)| {
            let total: usize = samples.iter().map(sample_bytes).sum();
            total as f64 / samples.len() as f64 * count as f64
        })
        .sum();
    if let Some(available) = available_memory_bytes().filter(|&a| bytes > a as f64) {
        bail!(
            "data.samples_per_epoch: the mixture's {total} samples would take about {:.1} GiB, \
             more than the {:.1} GiB of memory available",
            bytes / (1u64 << 30) as f64,
            available as f64 / (1u64 << 30) as f64
        );
    }
    let mut train = Vec::new();
    train
        .try_reserve_exact(total)
        .map_err(|e| anyhow::anyhow!("data.samples_per_epoch: {e}"))?;
    for (i, (samples, &count)) in per_file.into_iter().zip(&counts).enumerate() {
        let source = &sources[i];
        for j in draw(samples.len(), count, draw_seed(cfg.seed, i))? {
            train.push(samples[j].clone());
        }
        shares.push(MixShare {
            source: source.role.clone(),
            file: source.file.to_path_buf(),
            share: source.weight.map(|w| w / sum),
            samples: samples.len(),
            drawn: count,
            passes: count as f64 / samples.len().max(1) as f64,
        });
    }
    Ok((train, shares))
}

/// What one sample holds in memory: its ids, labels and untrained ranges, and their headers.
fn sample_bytes(s: &Sample) -> usize {
    std::mem::size_of::<Sample>()
        + s.input_ids.len() * 4
        + s.labels.len() * 8
        + s.untrained.len() * std::mem::size_of::<std::ops::Range<usize>>()
}

/// The memory the system can still give (Linux's MemAvailable); `None` where it cannot say.
fn available_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Bumped whenever helix's own reading, templating or tokenizing changes its output, so caches
/// written by an older helix are never hits.
const TOKENS_REVISION: u32 = 3;

/// Everything the tokens of one file depend on besides its bytes and the tokenizer's.
#[derive(Serialize)]
struct CacheKey<'a> {
    revision: u32,
    data_sha256: String,
    tokenizer_sha256: Vec<(String, String)>,
    template: &'a str,
    /// The chat template's text, hashed: tokenizer_config.json's, a chat_template.jinja
    /// beside it, or data.chat_template's file.
    chat_template_sha256: Option<String>,
    assistant_spans: AssistantSpans,
    fields: FieldMap,
    skip_invalid: bool,
    max_seq_length: usize,
    length_policy: LengthPolicy,
    loss: LossMode,
    eos_id: u32,
}

fn load_source(
    cfg: &DataConfig,
    tok: &DataTokenizer,
    template: &Template,
    source: &Source,
) -> Result<(SourceReport, Tokenized)> {
    let t = Instant::now();
    let file = source.file;
    let read_opts = source.read_options(cfg.skip_invalid);
    let opts = TokenizeOptions {
        max_seq_length: cfg.max_seq_length,
        policy: cfg.length_policy,
        loss: cfg.loss,
        eos_id: tok.eos_id,
        threads: cfg.threads,
    };
    let data_sha256 = file_sha256(file)?;
    let cache = if cfg.cache {
        let mut tokenizer_sha256 = Vec::new();
        for name in ["tokenizer.json", "tokenizer_config.json"] {
            let p = tok.dir.join(name);
            if p.exists() {
                tokenizer_sha256.push((name.to_string(), file_sha256(&p)?));
            }
        }
        let key = key_sha256(&CacheKey {
            revision: TOKENS_REVISION,
            data_sha256: data_sha256.clone(),
            tokenizer_sha256,
            template: source.template,
            chat_template_sha256: (source.template == "chat")
                .then(|| tok.codec.chat_template.as_deref())
                .flatten()
                .map(|t| key_sha256(&t))
                .transpose()?,
            assistant_spans: cfg.assistant_spans,
            fields: read_opts.fields.clone(),
            skip_invalid: read_opts.skip_invalid,
            max_seq_length: opts.max_seq_length,
            length_policy: opts.policy,
            loss: opts.loss,
            eos_id: opts.eos_id,
        })?;
        Some((cache_path(&cfg.cache_dir(), file, &key), key))
    } else {
        None
    };

    if let Some((path, key)) = &cache {
        if path.exists() {
            match read_cache(path, key) {
                Ok((read, tokenized)) => {
                    let stats = DataStats::new(&read, &tokenized, cfg.max_seq_length);
                    let report = SourceReport {
                        file: file.to_path_buf(),
                        sha256: data_sha256,
                        cache: Some(path.clone()),
                        cache_hit: true,
                        seconds: t.elapsed().as_secs_f64(),
                        stats,
                        skipped_rows: read.skipped_rows,
                    };
                    return Ok((report, tokenized));
                }
                Err(e) => eprintln!("warning: ignoring the token cache: {e:#}; rebuilding it"),
            }
        }
    }

    let read = read_records(file, &read_opts)?;
    let tokenized = tokenize_records(&read.records, template, &tok.codec.tokenizer, &opts)?;
    let summary = ReadSummary::new(&read);
    if let Some((path, key)) = &cache {
        write_cache(path, key, opts.loss, &summary, &tokenized)?;
    }
    let report = SourceReport {
        file: file.to_path_buf(),
        sha256: data_sha256,
        cache: cache.map(|c| c.0),
        cache_hit: false,
        seconds: t.elapsed().as_secs_f64(),
        stats: DataStats::new(&summary, &tokenized, cfg.max_seq_length),
        skipped_rows: summary.skipped_rows,
    };
    Ok((report, tokenized))
}

#[cfg(test)]
#[path = "dataset_tests.rs"]
mod tests;
