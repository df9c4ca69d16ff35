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
use crate::records::{read_records, FieldMap};
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

/// What [`prepare`] did: per-file statistics, cache use and the split sizes (in samples).
#[derive(Clone, Debug, Serialize)]
pub struct DataReport {
    pub sources: BTreeMap<String, SourceReport>,
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
        let n = self.train.len();
        if n >= ranks.max(1) {
            return Ok(());
        }
        let Some(src) = self.report.sources.get("train") else {
            bail!("no training data was read");
        };
        let st = &src.stats;
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
        let split_off = st.samples.saturating_sub(n);
        if split_off > 0 {
            why.push(format!(
                "{split_off} went to the validation / test split (data.validation_fraction, \
                 data.test_fraction)"
            ));
        }
        bail!(
            "data.train = {}: {n} training sample(s) for {ranks} data-parallel rank(s): of its \
             {} records, {}",
            cfg.train.display(),
            st.records,
            match why.is_empty() {
                true => "none was dropped or split off: add rows".to_string(),
                false => why.join("; "),
            }
        );
    }
}

/// Reads, templates, tokenizes and splits the data of `cfg`.
pub fn prepare(cfg: &DataConfig, tok: &DataTokenizer) -> Result<PreparedData> {
    cfg.validate()?;
    let mut template =
        Template::from_spec(&cfg.template, Some(tok.codec.clone())).context("data.template")?;
    if let Template::Chat(chat) = template {
        template = Template::Chat(
            chat.with_spans(cfg.assistant_spans)
                .context("data.assistant_spans")?,
        );
    }
    let mut sources = BTreeMap::new();
    let mut load = |role: &str, file: &Path| -> Result<(usize, Tokenized)> {
        let (report, tokenized) = load_source(cfg, tok, &template, file)
            .with_context(|| format!("data.{role} = {}", file.display()))?;
        let records = report.stats.records;
        sources.insert(role.to_string(), report);
        Ok((records, tokenized))
    };

    let (records, train_file) = load("train", &cfg.train)?;
    let split = split_by_fraction(
        records,
        cfg.validation_fraction,
        cfg.test_fraction,
        cfg.seed,
    )
    .context("splitting data.train")?;
    let mut role_of = vec![0u8; records];
    for &r in &split.validation {
        role_of[r] = 1;
    }
    for &r in &split.test {
        role_of[r] = 2;
    }
    let (mut train, mut validation, mut test) = (Vec::new(), Vec::new(), Vec::new());
    for s in train_file.samples {
        match role_of[s.record] {
            0 => train.push(s),
            1 => validation.push(s),
            _ => test.push(s),
        }
    }
    if let Some(f) = &cfg.validation {
        validation = load("validation", f)?.1.samples;
    }
    if let Some(f) = &cfg.test {
        test = load("test", f)?.1.samples;
    }
    let splits = SplitCounts {
        train: train.len(),
        validation: validation.len(),
        test: test.len(),
    };
    Ok(PreparedData {
        train,
        validation,
        test,
        report: DataReport { sources, splits },
    })
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
    file: &Path,
) -> Result<(SourceReport, Tokenized)> {
    let t = Instant::now();
    let read_opts = cfg.read_options();
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
            template: &cfg.template,
            chat_template_sha256: (cfg.template == "chat")
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
