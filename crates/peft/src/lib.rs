//! Customization methods for helix, in Hugging Face PEFT's formats: LoRA ([`lora`]), P-tuning
//! ([`ptuning`]) and full SFT; loading a model for one of them ([`load_for_method`]), the
//! forward pass with adapters ([`Customized::forward`]), PEFT-format export and import
//! ([`peft_format`]), merged Hugging Face export ([`export`]), generation with an adapter
//! ([`Customized::generate`]), and the parameter summary printed at start ([`ParamSummary`]). See docs/architecture.md.

mod dropout;
pub mod export;
mod init;
pub mod lora;
pub mod peft_format;
pub mod ptuning;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use helix_model::linear::{
    is_row_parallel, keep_dense, shard_of, weight_split, Quantization, Split,
};
use helix_model::{
    generate_after, ForwardMask, Llama, LlamaConfig, LoadOptions, SafetensorsWeights,
    SamplingOptions,
};
use helix_ops::SharedCollective;
use serde::Serialize;

pub use dropout::SeededDropout;
pub use export::{export_merged, gathered_weights};
pub use lora::{LoraAdapters, LoraBuilder, LoraConfig, LoraLinear, LLAMA_TARGETS};
pub use peft_format::{
    load_with_adapter, load_with_adapter_as, read_adapter, save_lora, save_lora_tensors,
    save_ptuning, Adapter, ADAPTER_DIR,
};
pub use ptuning::{EncoderType, PromptEncoder, Ptuning, PtuningConfig, VirtualTokens};

/// What trains.
#[derive(Clone, Debug, PartialEq)]
pub enum Method {
    /// Every parameter of the model.
    FullSft,
    /// Low-rank adapters on the configured projections; the model frozen.
    Lora(LoraConfig),
    /// Virtual tokens from a prompt encoder, prepended to every input; the model frozen.
    Ptuning(PtuningConfig),
}

impl Method {
    pub fn name(&self) -> &'static str {
        match self {
            Method::FullSft => "sft",
            Method::Lora(_) => "lora",
            Method::Ptuning(_) => "ptuning",
        }
    }
}

/// The decoder layers' inputs for one batch ([`Customized::decoder_inputs`]).
pub struct DecoderInputs {
    /// [B, S', H]; S' = S plus P-tuning's virtual tokens.
    pub embeds: Tensor,
    pub position_ids: Tensor,
    /// Aligned with `embeds` (-100 = ignore).
    pub labels: Option<Tensor>,
    pub mask: ForwardMask,
}

/// A loaded model and what trains in it.
pub struct Customized {
    pub model: Llama,
    pub lora: Option<LoraAdapters>,
    pub ptuning: Option<Ptuning>,
}

/// One micro-batch as the model takes it: input_ids [B, S] (u32), position ids [B, S], labels
/// [B, S] aligned with the inputs (-100 = ignore), and the attention mask.
pub struct ModelBatch<'a> {
    pub input_ids: &'a Tensor,
    pub position_ids: &'a Tensor,
    pub labels: Option<&'a Tensor>,
    pub mask: &'a ForwardMask,
}

impl Customized {
    /// A model without adapters, for inference.
    pub fn frozen(model: Llama) -> Self {
        Self {
            model,
            lora: None,
            ptuning: None,
        }
    }

    /// Every trainable tensor, by name: checkpoint names for SFT, PEFT's names for adapters.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        let mut out = self.model.trainable_params().to_vec();
        if let Some(l) = &self.lora {
            out.extend(l.named_vars());
        }
        if let Some(p) = &self.ptuning {
            out.extend(p.named_vars());
        }
        out
    }

    /// Train mode (dropout on) or eval mode.
    pub fn set_training(&self, on: bool) {
        if let Some(l) = &self.lora {
            l.set_training(on);
        }
        if let Some(p) = &self.ptuning {
            p.set_training(on);
        }
    }

    /// Final hidden states and the labels aligned with them. With P-tuning both are n virtual
    /// tokens longer than the batch.
    pub fn forward(&self, batch: &ModelBatch) -> Result<(Tensor, Option<Tensor>)> {
        let x = self.decoder_inputs(batch)?;
        let hidden = self
            .model
            .forward_embeds(&x.embeds, &x.position_ids, &x.mask)?;
        Ok((hidden, x.labels))
    }

    /// What the decoder layers take for `batch`: its token embeddings, with P-tuning's
    /// virtual tokens in front (positions, labels and mask shifted to match).
    pub fn decoder_inputs(&self, batch: &ModelBatch) -> Result<DecoderInputs> {
        let embeds = self.model.embed(batch.input_ids)?;
        match &self.ptuning {
            None => Ok(DecoderInputs {
                embeds,
                position_ids: batch.position_ids.clone(),
                labels: batch.labels.cloned(),
                mask: batch.mask.clone(),
            }),
            Some(p) => p.prepend(&embeds, batch.position_ids, batch.labels, batch.mask),
        }
    }

    /// How many targets [`Self::loss_sum`] will count for `labels` (row-major rows of `seq`):
    /// each row's labels after the first, or with P-tuning every label (the last virtual token
    /// predicts the first one). The trainer needs the step's total before any backward pass.
    pub fn count_targets(&self, labels: &[i64], seq: usize) -> usize {
        let skip = usize::from(self.ptuning.is_none());
        labels
            .chunks(seq.max(1))
            .map(|row| {
                row.iter()
                    .skip(skip)
                    .filter(|&&l| l != helix_ops::IGNORE_INDEX)
                    .count()
            })
            .sum()
    }

    /// How the trainable tensor or model weight `name` is divided over the tensor-parallel group
    /// (everything is [`Split::Replicated`] without one). LoRA follows its base: on a
    /// column-parallel projection A is replicated and B split by rows; on a row-parallel one A is
    /// split by columns and B replicated. P-tuning's encoder is replicated.
    pub fn split_of(&self, name: &str) -> Split {
        if self.model.tensor_parallel().is_none() {
            return Split::Replicated;
        }
        if let Some(rest) = name.strip_prefix("base_model.model.") {
            // `<prefix>.lora_A.weight`, `<prefix>.lora_B.weight`, or DoRA's
            // `<prefix>.lora_magnitude_vector` (PEFT saves it without `.weight`).
            let (prefix, which) = rest
                .strip_suffix(".weight")
                .unwrap_or(rest)
                .rsplit_once('.')
                .unwrap_or((rest, ""));
            let leaf = prefix.rsplit('.').next().unwrap_or(prefix);
            // B and the magnitude follow the output features, A the input features.
            return match (is_row_parallel(leaf), which) {
                (false, "lora_B" | "lora_magnitude_vector") => Split::Dim(0),
                (true, "lora_A") => Split::Dim(1),
                _ => Split::Replicated,
            };
        }
        if name.starts_with(ptuning::ENCODER_PREFIX) {
            return Split::Replicated;
        }
        weight_split(name)
    }

    /// This rank's tensor-parallel rank and group size ((0, 1) without tensor parallelism).
    pub fn tp_rank_size(&self) -> (usize, usize) {
        self.model
            .tensor_parallel()
            .map_or((0, 1), |g| (g.rank(), g.size()))
    }

    /// Sets every trainable tensor from whole (unsplit) tensors keyed by trainable name, this
    /// rank keeping its shard; every tensor must be there and used (see [`load_named_vars`]).
    pub fn load_whole(&self, tensors: &HashMap<String, Tensor>, source: &Path) -> Result<()> {
        let (rank, size) = self.tp_rank_size();
        let mut shards = HashMap::with_capacity(tensors.len());
        for (name, t) in tensors {
            shards.insert(name.clone(), shard_of(t, self.split_of(name), rank, size)?);
        }
        self.load_shards(&shards, source)
    }

    /// Sets every trainable tensor from this rank's shards, keyed by trainable name (see
    /// [`load_named_vars`]).
    pub fn load_shards(&self, shards: &HashMap<String, Tensor>, source: &Path) -> Result<()> {
        load_named_vars(&self.trainable(), shards, "", source)
    }

    /// The whole tensor `name` from this rank's shard `local`: gathered over the
    /// tensor-parallel group (every rank of the group must call this, in the same order).
    pub fn gather_whole(&self, name: &str, local: &Tensor) -> Result<Tensor> {
        match (self.model.tensor_parallel(), self.split_of(name)) {
            (Some(g), Split::Dim(d)) => Ok(g.all_gather(local, d)?),
            _ => Ok(local.clone()),
        }
    }

    /// Dropout draws so far, by layer: the random state a checkpoint saves so a resumed run
    /// draws the masks an uninterrupted one would.
    pub fn rng_state(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        if let Some(l) = &self.lora {
            for layer in &l.layers {
                out.insert(
                    format!("lora_dropout.{}", layer.name),
                    layer.dropout().calls(),
                );
            }
        }
        if let Some(VirtualTokens::Encoder(e)) = self.ptuning.as_ref().map(|p| &p.tokens) {
            out.insert("prompt_encoder.dropout".to_string(), e.dropout().calls());
        }
        out
    }

    /// Restores [`Self::rng_state`]; every counter must be there.
    pub fn set_rng_state(&self, state: &BTreeMap<String, u64>) -> Result<()> {
        let get = |k: &str| {
            state
                .get(k)
                .copied()
                .with_context(|| format!("the saved random state has no counter for {k}"))
        };
        if let Some(l) = &self.lora {
            for layer in &l.layers {
                layer
                    .dropout()
                    .set_calls(get(&format!("lora_dropout.{}", layer.name))?);
            }
        }
        if let Some(VirtualTokens::Encoder(e)) = self.ptuning.as_ref().map(|p| &p.tokens) {
            e.dropout().set_calls(get("prompt_encoder.dropout")?);
        }
        Ok(())
    }

    /// Makes every dropout of the model draw from stream `k` (the data-parallel rank), so
    /// ranks do not drop the same units of their different samples.
    pub fn set_dropout_stream(&self, k: u64) {
        if let Some(l) = &self.lora {
            for layer in &l.layers {
                layer.dropout().set_stream(k);
            }
        }
        if let Some(VirtualTokens::Encoder(e)) = self.ptuning.as_ref().map(|p| &p.tokens) {
            e.dropout().set_stream(k);
        }
    }

    /// Summed next-token loss of the batch and its number of target tokens (see
    /// [`Llama::loss_sum`]).
    pub fn loss_sum(&self, batch: &ModelBatch, chunk_rows: usize) -> Result<(Tensor, usize)> {
        let (hidden, labels) = self.forward_with_labels(batch, "loss_sum")?;
        self.model.loss_sum(&hidden, &labels, chunk_rows)
    }

    /// [`Self::loss_sum`] for evaluation: the loss only, with none of the LM head's gradient
    /// work (call it in eval mode, [`Self::set_training`] off).
    pub fn eval_loss_sum(&self, batch: &ModelBatch, chunk_rows: usize) -> Result<(Tensor, usize)> {
        let (hidden, labels) = self.forward_with_labels(batch, "eval_loss_sum")?;
        self.model.eval_loss_sum(&hidden, &labels, chunk_rows)
    }

    /// [`Self::forward`] of a batch that must carry labels (`caller` names who needs them).
    fn forward_with_labels(&self, batch: &ModelBatch, caller: &str) -> Result<(Tensor, Tensor)> {
        match self.forward(batch)? {
            (hidden, Some(labels)) => Ok((hidden, labels)),
            (_, None) => bail!("{caller} needs labels"),
        }
    }

    /// Generates after `prompt` (see [`helix_model::generate`]) in eval mode, with the
    /// virtual tokens in front when P-tuning.
    pub fn generate(
        &self,
        prompt: &[u32],
        opts: &SamplingOptions,
        on_token: impl FnMut(u32) -> Result<()>,
    ) -> Result<Vec<u32>> {
        self.set_training(false);
        let prefix = match &self.ptuning {
            Some(p) => Some(p.prompts()?),
            None => None,
        };
        generate_after(&self.model, prefix.as_ref(), prompt, opts, on_token)
    }

    pub fn summary(&self) -> ParamSummary {
        let base = self.model.config().num_parameters();
        let trainable = self.trainable();
        let count: usize = trainable.iter().map(|(_, v)| v.elem_count()).sum();
        let bytes: usize = trainable
            .iter()
            .map(|(_, v)| v.elem_count() * v.dtype().size_in_bytes())
            .sum();
        // Adapters add parameters beside the base model's; SFT trains the base's own.
        let added = if self.lora.is_some() || self.ptuning.is_some() {
            count
        } else {
            0
        };
        ParamSummary::new(count, base + added, bytes)
    }
}

/// Loads `cfg` from `weights` for `method`: SFT makes every parameter a trainable variable;
/// LoRA wraps the targeted projections and P-tuning builds a prompt encoder (both initialised
/// from `seed`) and freeze the model.
pub fn load_for_method(
    cfg: &LlamaConfig,
    weights: &SafetensorsWeights,
    method: &Method,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<Customized> {
    load_for_method_split(cfg, weights, method, seed, dtype, device, None)
}

/// [`load_for_method`] for one rank of a tensor-parallel group: this rank's shards of the model
/// and of the LoRA adapters (P-tuning's encoder is replicated).
pub fn load_for_method_split(
    cfg: &LlamaConfig,
    weights: &SafetensorsWeights,
    method: &Method,
    seed: u64,
    dtype: DType,
    device: &Device,
    tensor_parallel: Option<SharedCollective>,
) -> Result<Customized> {
    let how = ModelLoad {
        tensor_parallel,
        ..ModelLoad::new(dtype, device.clone())
    };
    load_customized(cfg, weights, method, seed, &how)
}

/// How [`load_customized`] holds the model.
#[derive(Clone)]
pub struct ModelLoad {
    pub dtype: DType,
    pub device: Device,
    /// This rank's group under tensor parallelism.
    pub tensor_parallel: Option<SharedCollective>,
    /// The frozen projections in NF4 (QLoRA) or as loaded; full SFT trains them, so it takes
    /// none.
    pub quantize_base: Quantization,
}

impl ModelLoad {
    /// The whole model on one device, its projections as loaded.
    pub fn new(dtype: DType, device: Device) -> Self {
        Self {
            dtype,
            device,
            tensor_parallel: None,
            quantize_base: Quantization::None,
        }
    }
}

/// An error unless `method` can train on projections held as `quantize_base` says: full SFT
/// trains them, so NF4 is refused (by the config's check, `plan` and the loader alike).
pub fn check_quantize_base(method: &Method, quantize_base: Quantization) -> Result<()> {
    if matches!(method, Method::FullSft) && quantize_base != Quantization::None {
        bail!(
            "model.quantize_base = \"{}\" freezes the projections in 4 bits; full SFT \
             (method.name = \"sft\") trains them: use lora or ptuning with it, or \
             quantize_base = \"none\"",
            quantize_base.name()
        );
    }
    Ok(())
}

/// [`load_for_method_split`] with every setting of [`ModelLoad`]: what the trainer calls.
pub fn load_customized(
    cfg: &LlamaConfig,
    weights: &SafetensorsWeights,
    method: &Method,
    seed: u64,
    how: &ModelLoad,
) -> Result<Customized> {
    let ModelLoad {
        dtype,
        ref device,
        ref tensor_parallel,
        quantize_base,
    } = *how;
    check_quantize_base(method, quantize_base)?;
    let frozen = |hook| LoadOptions {
        dtype,
        device: device.clone(),
        trainable: &|_| false,
        linear_hook: hook,
        tensor_parallel: tensor_parallel.clone(),
        quantize_base,
    };
    match method {
        Method::FullSft => {
            let opts = LoadOptions {
                dtype,
                device: device.clone(),
                trainable: &|_| true,
                linear_hook: &keep_dense,
                tensor_parallel: tensor_parallel.clone(),
                quantize_base: Quantization::None,
            };
            Ok(Customized {
                model: Llama::load(cfg, weights, &opts)?,
                lora: None,
                ptuning: None,
            })
        }
        Method::Lora(lora_cfg) => {
            let builder = LoraBuilder::new(lora_cfg.clone(), seed)?;
            let hook = |p: &str, d, placement: &helix_model::linear::Placement| {
                builder.hook(p, d, placement)
            };
            let model = Llama::load(cfg, weights, &frozen(&hook))?;
            Ok(Customized {
                model,
                lora: Some(builder.finish()?),
                ptuning: None,
            })
        }
        Method::Ptuning(p_cfg) => {
            let model = Llama::load(cfg, weights, &frozen(&keep_dense))?;
            let encoder = PromptEncoder::init(p_cfg, cfg.hidden_size, seed, device)?;
            Ok(Customized {
                model,
                lora: None,
                ptuning: Some(Ptuning {
                    cfg: p_cfg.clone(),
                    tokens: VirtualTokens::Encoder(encoder),
                }),
            })
        }
    }
}

/// Sets every variable of `vars` from `tensors` (keys: `prefix` + name) in the variable's
/// dtype and device: each must be there with its shape, and every tensor must be used. Errors
/// name `source` (the file) and the key.
pub fn load_named_vars(
    vars: &[(String, Var)],
    tensors: &HashMap<String, Tensor>,
    prefix: &str,
    source: &Path,
) -> Result<()> {
    for (name, var) in vars {
        let key = format!("{prefix}{name}");
        let t = tensors
            .get(&key)
            .with_context(|| format!("{}: no tensor {key}", source.display()))?;
        if t.dims() != var.dims() {
            bail!(
                "{}: {key} has shape {:?}, the model needs {:?}",
                source.display(),
                t.dims(),
                var.dims()
            );
        }
        var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
    }
    if tensors.len() != vars.len() {
        let mut unused: Vec<&String> = tensors
            .keys()
            .filter(|k| !vars.iter().any(|(n, _)| **k == format!("{prefix}{n}")))
            .collect();
        unused.sort();
        if let Some(k) = unused.first() {
            bail!(
                "{}: {k} matches nothing this model trains ({} unused tensors; another method \
                 or model?)",
                source.display(),
                unused.len()
            );
        }
    }
    Ok(())
}

/// Trainable and total parameter counts, as PEFT's `print_trainable_parameters` reports them,
/// plus the bytes the trainable ones take.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ParamSummary {
    pub trainable: usize,
    pub total: usize,
    pub trainable_percent: f64,
    pub trainable_bytes: usize,
}

impl ParamSummary {
    pub fn new(trainable: usize, total: usize, trainable_bytes: usize) -> Self {
        Self {
            trainable,
            total,
            trainable_percent: 100.0 * trainable as f64 / total.max(1) as f64,
            trainable_bytes,
        }
    }
}

impl std::fmt::Display for ParamSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "trainable params: {} || all params: {} || trainable%: {:.4} || trainable bytes: {}",
            self.trainable,
            self.total,
            self.trainable_percent,
            human_bytes(self.trainable_bytes)
        )
    }
}

/// 1536 → "1.5 KiB".
pub fn human_bytes(n: usize) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn human_bytes_picks_the_unit() {
        assert_eq!(super::human_bytes(512), "512 B");
        assert_eq!(super::human_bytes(1536), "1.5 KiB");
        assert_eq!(super::human_bytes(3 << 30), "3.0 GiB");
    }
}
