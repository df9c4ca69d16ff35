//! The sections of the TOML config, each a struct with its defaults: what a user may write,
//! key by key. Reading, overriding and checking them is crates/train/src/config.rs.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::gradients::ActivationCheckpointing;
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A Hugging Face model directory (config.json, safetensors, tokenizer files).
    pub path: Option<PathBuf>,
    /// A named shape (`llama2-7b`, `llama2-13b`, `llama2-70b`) for `helix-train plan`; training
    /// needs `path`.
    pub preset: Option<String>,
    /// dtype the model's weights are held and computed in: f32, bf16 or f16 (NeMo's
    /// `trainer.precision`). Trainable adapters are always f32; full SFT keeps f32 master
    /// weights when this is not f32.
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// Each decoder layer as one op with a hand-written backward (`helix_ops::decoder_layer`),
    /// LoRA dropout and tensor parallelism included; false runs every layer op by op on
    /// candle's autograd, for comparison (NeMo's fusion flags).
    #[serde(default = "yes")]
    pub fused_layers: bool,
    /// Which attention the decoder layers run over whole sequences: `auto` (FlashAttention's
    /// CUDA kernels where they run: a GPU, bf16 or f16, head_dim 64 or 128; else the chunked
    /// matmuls), `flash` (always; on the CPU its tiled kernel, `flash_cpu`) or `chunked`
    /// (transformers' `attn_implementation`).
    #[serde(default = "default_attention")]
    pub attention: String,
    /// `nf4`: the decoder layers' frozen projections held in 4-bit NormalFloat and
    /// dequantized where a product reads them (QLoRA; torchtune's `quantize_base`,
    /// bitsandbytes' `load_in_4bit` with `nf4`), for LoRA, DoRA and P-tuning; `none` (the
    /// default): as loaded, in `dtype`.
    #[serde(default = "default_quantize_base")]
    pub quantize_base: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MethodSection {
    /// sft, lora or ptuning.
    pub name: String,
    /// Start from an existing adapter (PEFT's or helix's) instead of a fresh one.
    pub init_from: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchSection {
    /// Rows per micro-batch on each data-parallel rank.
    #[serde(default = "one")]
    pub micro_batch_size: usize,
    /// Rows per optimizer step over all ranks; gradient accumulation = global / (micro × DP).
    pub global_batch_size: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerSection {
    /// Only AdamW (decoupled weight decay, as torch.optim.AdamW).
    #[serde(default = "default_optimizer")]
    pub name: String,
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    #[serde(default = "default_eps")]
    pub eps: f64,
    #[serde(default)]
    pub weight_decay: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSection {
    /// cosine, linear or constant (after the warmup).
    #[serde(default = "default_schedule")]
    pub name: String,
    pub warmup_steps: Option<u64>,
    pub warmup_ratio: Option<f64>,
    #[serde(default)]
    pub min_lr: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerSection {
    pub max_steps: Option<u64>,
    pub max_epochs: Option<u64>,
    /// Validation loss every this many steps (0: only before and after training).
    #[serde(default)]
    pub val_check_interval: u64,
    /// Validation micro-batches per check (all when not set).
    pub limit_val_batches: Option<usize>,
    /// Clip gradients to this global L2 norm (0: off).
    #[serde(default = "default_clip")]
    pub gradient_clip_val: f64,
    /// Seeds adapter initialisation and dropout (`data.seed` seeds splits and shuffling).
    #[serde(default = "default_seed")]
    pub seed: u64,
    #[serde(default = "default_output_dir")]
    pub output_dir: PathBuf,
    /// Checkpoint every this many steps (0: only at the end and on a signal).
    #[serde(default)]
    pub save_interval: u64,
    /// Keep this many newest checkpoints.
    pub save_total_limit: Option<usize>,
    /// auto (newest valid checkpoint in output_dir, else a fresh start), never, or a
    /// checkpoint directory.
    #[serde(default = "default_resume")]
    pub resume: String,
    /// Loss rows per chunk of the fused LM head + cross-entropy.
    #[serde(default = "default_loss_chunk")]
    pub loss_chunk_rows: usize,
    /// "none" keeps every activation for the backward; "full" keeps each decoder layer's input
    /// and recomputes the layer in backward (less memory, one more forward per step, the same
    /// gradients).
    #[serde(default)]
    pub activation_checkpointing: ActivationCheckpointing,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    /// At the end, LoRA / P-tuning adapters in PEFT format in `output_dir/adapter`.
    #[serde(default = "yes")]
    pub adapter: bool,
    /// At the end, the model as a Hugging Face directory in `output_dir/model` (LoRA merged;
    /// full SFT always writes it).
    #[serde(default)]
    pub merged: bool,
    #[serde(default = "default_shard")]
    pub max_shard_size: String,
    /// The step metrics also as TensorBoard event files in `output_dir/tensorboard`.
    #[serde(default)]
    pub tensorboard: bool,
}

/// Multi-process runs (launched with `--nproc-per-node`, `srun`, or anything that sets RANK /
/// WORLD_SIZE / MASTER_ADDR).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParallelSection {
    /// A rank silent this long (dead, hung, stopped) fails the job on every rank.
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
    /// Gradients are summed over data-parallel ranks in buckets of this many MB.
    #[serde(default = "default_bucket")]
    pub bucket_mb: f64,
    /// Ranks splitting one model (Megatron tensor parallelism); the job's ranks must be a
    /// multiple. The rest of the ranks are data-parallel.
    #[serde(default = "one")]
    pub tensor_parallel: usize,
    /// Shard AdamW's state over the data-parallel ranks (ZeRO-1, NeMo's distributed optimizer):
    /// its memory falls as 1/DP; the numbers do not change.
    #[serde(default)]
    pub zero1: bool,
    /// Under tensor parallelism, each rank keeps only its share of the tokens between the
    /// layers' parallel regions (Megatron's sequence parallelism): the residual stream, the
    /// norms and the saved layer inputs shrink by the group's size; the numbers do not change.
    #[serde(default)]
    pub sequence_parallel: bool,
}

impl Default for ParallelSection {
    fn default() -> Self {
        Self {
            timeout_s: default_timeout(),
            bucket_mb: default_bucket(),
            tensor_parallel: 1,
            zero1: false,
            sequence_parallel: false,
        }
    }
}

fn default_timeout() -> f64 {
    60.0
}
fn default_bucket() -> f64 {
    25.0
}

fn default_dtype() -> String {
    "f32".into()
}
fn default_attention() -> String {
    "auto".into()
}
fn default_quantize_base() -> String {
    "none".into()
}
fn one() -> usize {
    1
}
fn default_optimizer() -> String {
    "adamw".into()
}
fn default_lr() -> f64 {
    1e-4
}
fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_eps() -> f64 {
    1e-8
}
fn default_schedule() -> String {
    "cosine".into()
}
fn default_clip() -> f64 {
    1.0
}
fn default_seed() -> u64 {
    1234
}
fn default_output_dir() -> PathBuf {
    "runs/helix".into()
}
fn default_resume() -> String {
    "auto".into()
}
pub(crate) fn default_loss_chunk() -> usize {
    1024
}
fn yes() -> bool {
    true
}
fn default_shard() -> String {
    "5GB".into()
}

impl Default for BatchSection {
    fn default() -> Self {
        Self {
            micro_batch_size: 1,
            global_batch_size: None,
        }
    }
}

impl Default for OptimizerSection {
    fn default() -> Self {
        Self {
            name: default_optimizer(),
            lr: default_lr(),
            betas: default_betas(),
            eps: default_eps(),
            weight_decay: 0.0,
        }
    }
}

impl Default for ScheduleSection {
    fn default() -> Self {
        Self {
            name: default_schedule(),
            warmup_steps: None,
            warmup_ratio: None,
            min_lr: 0.0,
        }
    }
}

impl Default for TrainerSection {
    fn default() -> Self {
        Self {
            max_steps: None,
            max_epochs: None,
            val_check_interval: 0,
            limit_val_batches: None,
            gradient_clip_val: default_clip(),
            seed: default_seed(),
            output_dir: default_output_dir(),
            save_interval: 0,
            save_total_limit: None,
            resume: default_resume(),
            loss_chunk_rows: default_loss_chunk(),
            activation_checkpointing: ActivationCheckpointing::None,
        }
    }
}

impl Default for OutputSection {
    fn default() -> Self {
        Self {
            adapter: true,
            merged: false,
            max_shard_size: default_shard(),
            tensorboard: false,
        }
    }
}
