//! The helix TOML config: one file describes a run (model, method, data, batch, optimizer,
//! schedule, trainer, outputs), as a NeMo or torchtune recipe config does. `--set
//! section.key=value` overrides any key. Sections are owned by the crate that uses them where
//! one exists (`[data]` is `helix_data::DataConfig`, `[lora]` and `[ptuning]` are helix-peft's);
//! this file reads the file, applies overrides, checks every value and names the key (and, for
//! an unknown key, the closest valid one) in every error.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::DType;
use helix_data::DataConfig;
use helix_model::linear::Quantization;
use helix_model::Llama;
use helix_ops::AttentionKernel;
use helix_peft::{LoraConfig, Method, PtuningConfig};

use serde::{Deserialize, Serialize};

mod sections;
pub(crate) use sections::default_loss_chunk;
pub use sections::{
    BatchSection, MethodSection, ModelSection, OptimizerSection, OutputSection, ParallelSection,
    ScheduleSection, TrainerSection,
};

/// A run's whole config; each section's keys are in config/sections.rs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub model: Option<ModelSection>,
    pub method: Option<MethodSection>,
    pub lora: Option<LoraConfig>,
    pub ptuning: Option<PtuningConfig>,
    pub data: Option<DataConfig>,
    #[serde(default)]
    pub batch: BatchSection,
    #[serde(default)]
    pub optimizer: OptimizerSection,
    #[serde(default)]
    pub schedule: ScheduleSection,
    #[serde(default)]
    pub trainer: TrainerSection,
    #[serde(default)]
    pub output: OutputSection,
    #[serde(default)]
    pub parallel: ParallelSection,
}

/// Keys that change how a run is operated, not the numbers it computes: a resumed run may
/// change them.
const OPERATIONAL_KEYS: [&str; 21] = [
    "parallel.zero1",
    "parallel.sequence_parallel",
    "model.fused_layers",
    "model.attention",
    "trainer.activation_checkpointing",
    "parallel.timeout_s",
    "parallel.bucket_mb",
    "parallel.tensor_parallel",
    "trainer.output_dir",
    "trainer.resume",
    "trainer.save_interval",
    "trainer.save_total_limit",
    "trainer.val_check_interval",
    "trainer.limit_val_batches",
    "data.cache",
    "data.cache_dir",
    "data.threads",
    "output.adapter",
    "output.merged",
    "output.max_shard_size",
    "output.tensorboard",
];

impl ConfigFile {
    /// Reads `path`, applies `sets` (`section.key=value`), and deserializes; errors name the
    /// file, line and key.
    pub fn load_with(path: &Path, sets: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the config {}", path.display()))?;
        Self::from_str_with(path, &text, sets)
    }

    /// [`ConfigFile::load_with`] on the text of the config already in memory; `path` names it
    /// in messages.
    pub fn from_str_with(path: &Path, text: &str, sets: &[String]) -> Result<Self> {
        let in_file =
            |e: &dyn std::fmt::Display| anyhow!("{}: {}", path.display(), explain(&e.to_string()));
        let mut raw: toml::Table = toml::from_str(text).map_err(|e| in_file(&e))?;
        // The file alone, so its own mistakes are reported with their line; `--set` may still
        // supply a key the file lacks or replace one it got wrong.
        let alone = toml::from_str::<Self>(text);
        if sets.is_empty() {
            return alone.map_err(|e| in_file(&e));
        }
        let file_error = alone.err().map(|e| in_file(&e));
        let mut typed = Vec::new();
        for s in sets {
            typed.push(apply_set(&mut raw, s)?);
        }
        // (key, the error its value gave before it was retried as the text typed)
        let mut retried: Vec<(String, String)> = Vec::new();
        loop {
            match toml::Value::Table(raw.clone()).try_into::<Self>() {
                Ok(cfg) => return Ok(cfg),
                Err(e) => {
                    let msg = e.to_string();
                    let key = msg
                        .split("in `")
                        .nth(1)
                        .and_then(|r| r.split('`').next())
                        .unwrap_or_default()
                        .to_string();
                    let with_sets = |m: &str| {
                        anyhow!(
                            "{} with --set {}: {}",
                            path.display(),
                            sets.join(" --set "),
                            explain(m)
                        )
                    };
                    // `--set trainer.output_dir=nan`: a bare value that parsed as another type
                    // where the key wants a string is the text the user typed. The last --set
                    // of a key is the one that stands.
                    // serde names `data.mix[1].file` as `data.mix.file`.
                    let is_key = |t: &Option<String>| {
                        t.as_deref().is_some_and(|t| without_indices(t) == key)
                    };
                    if let Some(i) = typed.iter().rposition(is_key) {
                        let path = typed[i].clone().expect("matched");
                        let text = sets[i].split_once('=').expect("checked").1.trim();
                        set_value(&mut raw, &path, toml::Value::String(text.to_string()))?;
                        for t in typed.iter_mut().filter(|t| t.as_deref() == Some(&path)) {
                            *t = None;
                        }
                        retried.push((key, msg));
                        continue;
                    }
                    // Not a string either: the value's own error (`-5` for a count), not the
                    // string's.
                    if let Some((_, first)) = retried.iter().find(|(k, _)| *k == key) {
                        return Err(with_sets(first));
                    }
                    return Err(match file_error {
                        Some(e)
                            if !sets
                                .iter()
                                .any(|s| without_indices(s.trim_start()).starts_with(&key)) =>
                        {
                            e
                        }
                        _ => with_sets(&msg),
                    });
                }
            }
        }
    }

    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with(path, &[])
    }

    /// The `[data]` section, or an error naming the file.
    pub fn data(&self, path: &Path) -> Result<&DataConfig> {
        self.data
            .as_ref()
            .with_context(|| format!("{}: no [data] section", path.display()))
    }

    /// Where the tokenizer lives: `data.tokenizer`, else `model.path`.
    pub fn tokenizer_dir(&self, path: &Path) -> Result<PathBuf> {
        if let Some(t) = self.data.as_ref().and_then(|d| d.tokenizer.clone()) {
            return Ok(t);
        }
        self.model
            .as_ref()
            .and_then(|m| m.path.clone())
            .with_context(|| {
                format!(
                    "{}: set data.tokenizer or model.path (the tokenizer's directory)",
                    path.display()
                )
            })
    }

    pub fn model_dtype(&self) -> Result<DType> {
        let d = self.model.as_ref().map_or("f32", |m| m.dtype.as_str());
        parse_dtype(d).with_context(|| "model.dtype".to_string())
    }

    /// `model.fused_layers` (true unless set false).
    pub fn fused_layers(&self) -> bool {
        self.model.as_ref().is_none_or(|m| m.fused_layers)
    }

    /// Sets the options that choose how a loaded model computes, not what: `model.fused_layers`,
    /// `parallel.sequence_parallel` and `model.attention` (an error naming `model.attention`
    /// where FlashAttention cannot run).
    pub fn configure_model(&self, model: &mut Llama) -> Result<()> {
        model.set_fused_layers(self.fused_layers());
        model.set_sequence_parallel(self.parallel.sequence_parallel);
        model
            .set_attention(self.attention()?)
            .context("model.attention")
    }

    /// `model.attention` as written: auto (the default), flash or chunked.
    pub fn attention_setting(&self) -> &str {
        self.model.as_ref().map_or("auto", |m| m.attention.as_str())
    }

    /// `model.attention`, parsed.
    pub fn attention(&self) -> Result<AttentionKernel> {
        let name = self.attention_setting();
        AttentionKernel::parse(name).with_context(|| {
            format!("model.attention = {name:?}: expected \"auto\", \"flash\" or \"chunked\"")
        })
    }

    /// `model.quantize_base`, parsed: none (the default) or nf4.
    pub fn quantize_base(&self) -> Result<Quantization> {
        let name = self
            .model
            .as_ref()
            .map_or("none", |m| m.quantize_base.as_str());
        Quantization::parse(name).with_context(|| {
            format!(
                "model.quantize_base = {name:?}: expected \"none\" or \"nf4\"{}",
                suggest(name, &["none", "nf4"])
            )
        })
    }

    /// The method with its options, checked against the sections present.
    pub fn method(&self) -> Result<Method> {
        let name = self
            .method
            .as_ref()
            .map(|m| m.name.as_str())
            .context("[method] name is missing (sft, lora or ptuning)")?;
        let m = match name {
            "sft" => Method::FullSft,
            "lora" => Method::Lora(
                self.lora
                    .clone()
                    .context("method.name = \"lora\" needs a [lora] section (r, lora_alpha, …)")?,
            ),
            "ptuning" => Method::Ptuning(self.ptuning.clone().context(
                "method.name = \"ptuning\" needs a [ptuning] section (num_virtual_tokens, …)",
            )?),
            other => bail!(
                "method.name = \"{other}\" is not a method: sft, lora or ptuning{}",
                suggest(other, &["sft", "lora", "ptuning"])
            ),
        };
        if self.lora.is_some() && !matches!(m, Method::Lora(_)) {
            bail!("[lora] is set but method.name = \"{name}\"");
        }
        if self.ptuning.is_some() && !matches!(m, Method::Ptuning(_)) {
            bail!("[ptuning] is set but method.name = \"{name}\"");
        }
        match &m {
            Method::Lora(l) => l.validate()?,
            Method::Ptuning(p) => {
                p.validate()?;
                if self.data.as_ref().is_some_and(|d| d.packing) {
                    bail!(
                        "data.packing = true cannot be used with P-tuning (each document would \
                         need its own virtual tokens); set data.packing = false"
                    );
                }
            }
            Method::FullSft => {}
        }
        Ok(m)
    }

    /// Gradient accumulation steps for `dp` data-parallel ranks, checked as NeMo does.
    pub fn accumulation(&self, dp: usize) -> Result<usize> {
        let micro = self.batch.micro_batch_size;
        if micro == 0 {
            bail!("batch.micro_batch_size must be at least 1");
        }
        // Checked: a huge micro-batch times the ranks must not wrap (to 0, a division by 0).
        let Some(rows) = micro.checked_mul(dp).filter(|&r| r > 0) else {
            bail!(
                "batch.micro_batch_size ({micro}) × data-parallel size ({dp}) is not a usable \
                 number of rows per micro-step"
            );
        };
        let global = self.batch.global_batch_size.unwrap_or(rows);
        if global == 0 || !global.is_multiple_of(rows) {
            bail!(
                "batch.global_batch_size ({global}) must be a positive multiple of \
                 batch.micro_batch_size ({micro}) × data-parallel size ({dp}) = {rows}"
            );
        }
        Ok(global / rows)
    }

    /// Checks every value a training run on `data_parallel` ranks uses, before anything is
    /// loaded; the error names the key.
    pub fn validate_training(&self, data_parallel: usize) -> Result<()> {
        let model = self
            .model
            .as_ref()
            .context("[model] is missing (path = a Hugging Face model directory)")?;
        if model.path.is_none() {
            bail!(
                "model.path is required to train (model.preset only describes a shape, for \
                 `helix-train plan`)"
            );
        }
        self.model_dtype()?;
        self.attention()?;
        helix_peft::check_quantize_base(&self.method()?, self.quantize_base()?)?;
        if self.quantize_base()? == Quantization::Nf4 && self.output.merged {
            bail!(
                "output.merged = true with model.quantize_base = \"nf4\": the run holds no \
                 16-bit projections to merge into; merge the adapter it writes with \
                 `helix-train export --model … --adapter …`, which merges into the \
                 checkpoint's own weights"
            );
        }
        let data = self.data.as_ref().context("[data] is missing")?;
        data.validate()?;
        self.accumulation(data_parallel)?;
        let o = &self.optimizer;
        if o.name != "adamw" {
            bail!(
                "optimizer.name = \"{}\": helix has adamw{}",
                o.name,
                suggest(&o.name, &["adamw"])
            );
        }
        if !(o.lr > 0.0 && o.lr.is_finite()) {
            bail!("optimizer.lr must be a positive number, got {}", o.lr);
        }
        for (i, b) in o.betas.iter().enumerate() {
            if !(0.0..1.0).contains(b) {
                bail!("optimizer.betas[{i}] must be in [0, 1), got {b}");
            }
        }
        if !(o.eps > 0.0) {
            bail!("optimizer.eps must be positive, got {}", o.eps);
        }
        if !(o.weight_decay >= 0.0) {
            bail!(
                "optimizer.weight_decay must be >= 0, got {}",
                o.weight_decay
            );
        }
        let s = &self.schedule;
        crate::schedule::ScheduleKind::parse(&s.name)?;
        if s.warmup_steps.is_some() && s.warmup_ratio.is_some() {
            bail!("set schedule.warmup_steps or schedule.warmup_ratio, not both");
        }
        if let Some(r) = s.warmup_ratio {
            if !(0.0..=1.0).contains(&r) {
                bail!("schedule.warmup_ratio must be in [0, 1], got {r}");
            }
        }
        if !(s.min_lr >= 0.0 && s.min_lr <= o.lr) {
            bail!(
                "schedule.min_lr must be in [0, optimizer.lr = {}], got {}",
                o.lr,
                s.min_lr
            );
        }
        let t = &self.trainer;
        match (t.max_steps, t.max_epochs) {
            (None, None) => bail!("set trainer.max_steps or trainer.max_epochs"),
            (Some(0), _) => bail!("trainer.max_steps must be at least 1"),
            (_, Some(0)) => bail!("trainer.max_epochs must be at least 1"),
            _ => {}
        }
        if !(t.gradient_clip_val >= 0.0) {
            bail!(
                "trainer.gradient_clip_val must be >= 0 (0 = off), got {}",
                t.gradient_clip_val
            );
        }
        if t.limit_val_batches == Some(0) {
            bail!("trainer.limit_val_batches must be at least 1 (leave it out for every batch)");
        }
        if t.output_dir.as_os_str().is_empty() {
            bail!("trainer.output_dir is empty: name the run's directory");
        }
        if t.save_total_limit == Some(0) {
            bail!("trainer.save_total_limit must be at least 1");
        }
        if t.loss_chunk_rows == 0 {
            bail!("trainer.loss_chunk_rows must be at least 1");
        }
        let p = &self.parallel;
        self.timeout()?;
        if !(p.bucket_mb > 0.0) {
            bail!("parallel.bucket_mb must be positive, got {}", p.bucket_mb);
        }
        if p.tensor_parallel == 0 {
            bail!("parallel.tensor_parallel must be at least 1");
        }
        if p.sequence_parallel && p.tensor_parallel > 1 {
            if self.lora.as_ref().is_some_and(|l| l.use_dora) {
                bail!(
                    "parallel.sequence_parallel = true runs each decoder layer as one op, and \
                     lora.use_dora = true runs them op by op: set one of them false"
                );
            }
            if !self.fused_layers() {
                bail!(
                    "parallel.sequence_parallel = true runs each decoder layer as one op: it \
                     cannot be used with model.fused_layers = false"
                );
            }
        }
        if self.output.merged && self.ptuning.is_some() {
            bail!("output.merged = true cannot be used with P-tuning (its virtual tokens are inputs, not weights)");
        }
        self.resume()?;
        helix_model::hf_export::parse_size(&self.output.max_shard_size)
            .context("output.max_shard_size")?;
        Ok(())
    }

    pub fn resume(&self) -> Result<Resume> {
        Ok(match self.trainer.resume.as_str() {
            "auto" => Resume::Auto,
            "never" => Resume::Never,
            path if path.contains('/') || Path::new(path).exists() => {
                Resume::From(PathBuf::from(path))
            }
            other => bail!(
                "trainer.resume = \"{other}\": use \"auto\", \"never\" or a checkpoint directory{}",
                suggest(other, &["auto", "never"])
            ),
        })
    }

    /// `parallel.timeout_s` as a Duration (see [`timeout_from_seconds`]).
    pub fn timeout(&self) -> Result<std::time::Duration> {
        timeout_from_seconds(self.parallel.timeout_s).context("parallel.timeout_s")
    }

    /// The config as canonical JSON without the operational keys: what must match for a
    /// checkpoint to resume bit-exactly. Every key is present with the value the run uses, so
    /// a key written out at its default equals the key left out.
    pub fn numerics(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("a config is JSON-representable");
        for key in OPERATIONAL_KEYS {
            let (section, name) = key.split_once('.').expect("section.key");
            if let Some(s) = v.get_mut(section).and_then(|s| s.as_object_mut()) {
                s.remove(name);
                if s.is_empty() {
                    v.as_object_mut().expect("a table").remove(section);
                }
            }
        }
        v
    }

    /// [`ConfigFile::numerics`] of a config a checkpoint recorded. Checkpoints written before
    /// helix filled in defaults hold the keys as the user wrote them; reading them back as a
    /// config fills the defaults in.
    pub fn recorded_numerics(recorded: &serde_json::Value) -> Result<serde_json::Value> {
        serde_json::from_value::<Self>(recorded.clone())
            .map(|c| c.numerics())
            .context("this helix cannot read the config the checkpoint recorded")
    }
}

/// The Duration of a timeout given in seconds: positive, and at most a week, so deadlines
/// computed from it (twice it, for the rings) stay representable.
pub fn timeout_from_seconds(seconds: f64) -> Result<std::time::Duration> {
    const WEEK: f64 = 7.0 * 24.0 * 3600.0;
    if !(seconds > 0.0 && seconds <= WEEK) {
        bail!(
            "a timeout must be a positive number of seconds up to a week ({WEEK}), got {seconds}"
        );
    }
    Ok(std::time::Duration::from_secs_f64(seconds))
}

/// Where a run starts.
#[derive(Debug, Clone, PartialEq)]
pub enum Resume {
    Auto,
    Never,
    From(PathBuf),
}

pub fn parse_dtype(d: &str) -> Result<DType> {
    Ok(match d {
        "f32" | "float32" | "32" => DType::F32,
        "bf16" | "bfloat16" | "bf16-mixed" => DType::BF16,
        "f16" | "float16" | "16" | "16-mixed" => DType::F16,
        other => bail!(
            "unknown dtype \"{other}\" (f32, bf16 or f16){}",
            suggest(other, &["f32", "bf16", "f16"])
        ),
    })
}

/// Applies one `section.key=value` override; the value is TOML (`1e-4`, `true`, `[0.9, 0.95]`,
/// `"text"`), or a bare string. Returns the dotted key when a bare value was read as something
/// other than a string (the caller turns it back into the string if the key wants one).
fn apply_set(table: &mut toml::Table, set: &str) -> Result<Option<String>> {
    let (path, value) = set
        .split_once('=')
        .with_context(|| format!("--set {set}: expected section.key=value"))?;
    let path = path.trim();
    let keys: Vec<&str> = path.split('.').collect();
    if keys.len() < 2 || keys.iter().any(|k| k.is_empty()) {
        bail!("--set {set}: the key must be section.key (e.g. optimizer.lr)");
    }
    let value = value.trim();
    let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    let retypable = !parsed.is_str();
    set_value(table, path, parsed).with_context(|| format!("--set {set}"))?;
    Ok(retypable.then(|| path.to_string()))
}

fn set_value(table: &mut toml::Table, path: &str, value: toml::Value) -> Result<()> {
    let keys: Vec<&str> = path.split('.').collect();
    let (last, parents) = keys.split_last().expect("split gives one at least");
    let mut at = table;
    // The dotted path walked so far, for messages: `data.mix[1]`.
    let mut walked = String::new();
    for k in parents {
        let (name, index) = indexed(k)?;
        let here = dotted(&walked, name);
        let entry = match index {
            Some(i) => list_entry(at, name, &here, i)?,
            None => at
                .entry(name)
                .or_insert_with(|| toml::Value::Table(Default::default())),
        };
        walked = dotted(&walked, k);
        at = entry
            .as_table_mut()
            .with_context(|| format!("{walked} is not a section"))?;
    }
    let (name, index) = indexed(last)?;
    let here = dotted(&walked, name);
    match index {
        None => {
            at.insert(name.to_string(), value);
        }
        Some(i) => *list_entry(at, name, &here, i)? = value,
    }
    Ok(())
}

/// `a.b` from `a` and `b` (`b` alone at the top).
fn dotted(prefix: &str, key: &str) -> String {
    match prefix.is_empty() {
        true => key.to_string(),
        false => format!("{prefix}.{key}"),
    }
}

/// `data.mix[1].file` → `data.mix.file`, as serde names a key inside a list.
fn without_indices(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut depth = 0;
    for c in path.chars() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

/// `mix[1]` → ("mix", Some(1)); `lr` → ("lr", None).
fn indexed(key: &str) -> Result<(&str, Option<usize>)> {
    match key.strip_suffix(']').and_then(|k| k.split_once('[')) {
        Some((name, i)) => {
            let i = i
                .parse()
                .with_context(|| format!("{key}: the index in [] must be a number"))?;
            Ok((name, Some(i)))
        }
        None => Ok((key, None)),
    }
}

/// Entry `i` of the list `table[name]` (`here` in messages, its dotted path), which must
/// exist: `--set` changes entries of a list, it does not make new ones.
fn list_entry<'a>(
    table: &'a mut toml::Table,
    name: &str,
    here: &str,
    i: usize,
) -> Result<&'a mut toml::Value> {
    let list = table
        .get_mut(name)
        .with_context(|| format!("{here} is not set, so {here}[{i}] cannot be"))?
        .as_array_mut()
        .with_context(|| format!("{here} is not a list"))?;
    let len = list.len();
    list.get_mut(i)
        .with_context(|| format!("{here}[{i}] is past the end of {here}, which has {len} entries"))
}

/// serde's "unknown field `x`, expected one of `a`, `b`" (and "unknown variant"), with the
/// closest valid name added.
fn explain(msg: &str) -> String {
    let mut out = msg.trim_end().to_string();
    for what in ["unknown field `", "unknown variant `"] {
        let Some(start) = msg.find(what) else {
            continue;
        };
        let rest = &msg[start + what.len()..];
        let Some(end) = rest.find('`') else {
            continue;
        };
        let bad = &rest[..end];
        let valid: Vec<&str> = rest[end + 1..].split('`').skip(1).step_by(2).collect();
        out.push_str(&suggest(bad, &valid));
    }
    out
}

/// " (did you mean `x`?)" when a valid name is close to `bad`.
pub fn suggest(bad: &str, valid: &[&str]) -> String {
    valid
        .iter()
        .map(|v| (levenshtein(bad, v), *v))
        .filter(|(d, v)| *d <= 3.max(v.len() / 3))
        .min()
        .map(|(_, v)| format!(" (did you mean `{v}`?)"))
        .unwrap_or_default()
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests;
