//! The command line of `helix-train`: the launcher's options, the global `--config` and
//! `--set`, and each subcommand with its flags (clap derives the parser and `--help` from
//! these declarations; main.rs runs them).

use std::path::PathBuf;

use candle_core::DType;
use clap::{Parser, Subcommand, ValueEnum};
use helix_model::linear::Quantization;

use crate::data_stats::DataStatsArgs;

#[derive(Parser)]
#[command(
    name = "helix-train",
    version,
    about = "Fine-tune Llama-family models: SFT, LoRA, P-tuning"
)]
pub(crate) struct Cli {
    /// A helix TOML config: fine-tune as it says (see configs/).
    #[arg(long, global = true)]
    pub(crate) config: Option<PathBuf>,
    /// Override a config key: --set optimizer.lr=3e-4 (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE", global = true)]
    pub(crate) set: Vec<String>,
    /// Start this many ranks on this node, as torchrun does (data parallelism).
    #[arg(long)]
    pub(crate) nproc_per_node: Option<usize>,
    /// Nodes in the job (with --nproc-per-node).
    #[arg(long, default_value_t = 1, requires = "nproc_per_node")]
    pub(crate) nnodes: usize,
    /// This node's index (0 serves the rendezvous).
    #[arg(long, default_value_t = 0, requires = "nproc_per_node")]
    pub(crate) node_rank: usize,
    /// Host of node 0.
    #[arg(long, default_value = "127.0.0.1", requires = "nproc_per_node")]
    pub(crate) master_addr: String,
    /// Rendezvous port on node 0.
    #[arg(long, default_value_t = helix_parallel::env::DEFAULT_PORT, requires = "nproc_per_node")]
    pub(crate) master_port: u16,
    #[command(subcommand)]
    pub(crate) command: Option<Command>,
}

/// Query rows a block of the GPU's FlashAttention forward takes (auto: by the grid).
#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum ForwardRowsArg {
    Auto,
    #[value(name = "64")]
    Rows64,
    #[value(name = "128")]
    Rows128,
}

impl From<ForwardRowsArg> for helix_kernels::flash::ForwardTile {
    fn from(rows: ForwardRowsArg) -> Self {
        match rows {
            ForwardRowsArg::Auto => Self::Auto,
            ForwardRowsArg::Rows64 => Self::Rows64,
            ForwardRowsArg::Rows128 => Self::Rows128,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum DTypeArg {
    F32,
    Bf16,
    F16,
}

impl From<DTypeArg> for DType {
    fn from(d: DTypeArg) -> Self {
        match d {
            DTypeArg::F32 => DType::F32,
            DTypeArg::Bf16 => DType::BF16,
            DTypeArg::F16 => DType::F16,
        }
    }
}

/// `--quantize-base`: the projections as stored, or in NF4 (QLoRA's `model.quantize_base`).
#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum QuantizeArg {
    None,
    Nf4,
}

impl From<QuantizeArg> for Quantization {
    fn from(q: QuantizeArg) -> Self {
        match q {
            QuantizeArg::None => Quantization::None,
            QuantizeArg::Nf4 => Quantization::Nf4,
        }
    }
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Fine-tune as the config says (the same as `helix-train --config FILE`).
    Train,
    /// Print the validation loss as JSON: of the configured model, or with the trainable
    /// tensors of a checkpoint.
    Eval {
        /// A checkpoint directory (output_dir/checkpoints/step-NNNNNN).
        #[arg(long)]
        checkpoint: Option<PathBuf>,
    },
    /// Convert a llama-architecture GGUF file into a Hugging Face directory (config.json,
    /// model.safetensors, tokenizer.json, tokenizer_config.json with the chat template).
    Import {
        #[arg(long)]
        gguf: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// dtype of the de-quantized weights
        #[arg(long, value_enum, default_value = "f32")]
        dtype: DTypeArg,
    },
    /// Generate text from a Hugging Face model directory, optionally with an adapter.
    Generate {
        #[arg(long)]
        model: PathBuf,
        /// A LoRA or P-tuning adapter directory (adapter_config.json, adapter_model.safetensors),
        /// saved by helix or by PEFT.
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long)]
        prompt: String,
        /// Wrap the prompt as a user message in the model's chat template.
        #[arg(long)]
        chat: bool,
        /// System message for --chat (the template's default when absent).
        #[arg(long)]
        system: Option<String>,
        /// A Jinja file for --chat in place of the model's chat template (the file a run's
        /// data.chat_template named, say).
        #[arg(long, requires = "chat")]
        chat_template: Option<PathBuf>,
        /// A JSON file holding a list of tool schemas for --chat, which the template lists
        /// as a conversation row's `tools` are.
        #[arg(long, requires = "chat")]
        tools: Option<PathBuf>,
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        /// 0 = greedy decoding.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, value_enum, default_value = "f32")]
        dtype: DTypeArg,
        /// The decoder layers' projections in NF4, as a QLoRA run (model.quantize_base =
        /// "nf4") trained its adapter on them: a quarter of the weights' memory in bf16.
        #[arg(long, value_enum, default_value = "none")]
        quantize_base: QuantizeArg,
        /// Print the generated token ids as JSON after the text.
        #[arg(long)]
        print_ids: bool,
    },
    /// Write a Hugging Face model directory (config.json, safetensors sharded with an index,
    /// tokenizer files): the model with a LoRA adapter merged in, or converted to another dtype.
    Export {
        #[arg(long)]
        model: PathBuf,
        /// A LoRA adapter to merge (P-tuning adapters cannot be merged).
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        /// dtype of the written weights (default: the model's own torch_dtype, else f32)
        #[arg(long, value_enum)]
        dtype: Option<DTypeArg>,
        /// Largest shard, as transformers writes it (5GB, 500MB, 2GiB)
        #[arg(long, default_value = "5GB")]
        max_shard_size: String,
    },
    /// With --config: an analytic model of one step per GPU on an H100 cluster — memory,
    /// FLOPs, communication, step time — beside the seed's measured NeMo times.
    Plan {
        #[arg(long, default_value_t = 1)]
        nodes: usize,
        #[arg(long, default_value_t = 8)]
        gpus_per_node: usize,
        /// Tokens in each sample (default: data.max_seq_length, what packing fills).
        #[arg(long)]
        tokens_per_sample: Option<usize>,
        /// Fraction of peak FLOP/s a step reaches (default 0.45).
        #[arg(long)]
        mfu: Option<f64>,
        /// Print the numbers as JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Compare the fused kernels on this build's device (the GPU with `cuda`) with their CPU
    /// references, forward and gradients, f32 and bf16; exits 1 if any differs beyond its
    /// tolerance. On a GPU also times each op fused and unfused.
    KernelCheck {
        /// Timed repetitions per op on a GPU (0: no timing).
        #[arg(long, default_value_t = 20)]
        repeats: usize,
        /// Check only this op's cases (rms_norm, flash_attention, ...; repeatable; default:
        /// every op).
        #[arg(long)]
        op: Vec<String>,
    },
    /// Time causal attention alone, forward and backward apart (the FlashAttention kernels on
    /// a GPU, the CPU's tiles otherwise), on random inputs: milliseconds and TFLOP/s. The
    /// defaults are a Llama-2-7B layer's shape in bf16.
    AttentionBench {
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Query heads.
        #[arg(long, default_value_t = 32)]
        heads: usize,
        /// Key/value heads (grouped-query attention when fewer than --heads; default: --heads).
        #[arg(long)]
        kv_heads: Option<usize>,
        #[arg(long, default_value_t = 2048)]
        seq: usize,
        #[arg(long, default_value_t = 128)]
        head_dim: usize,
        #[arg(long, value_enum, default_value = "bf16")]
        dtype: DTypeArg,
        /// Query rows a block of the GPU's forward kernel takes: 64, 128, or auto (the
        /// default, as training: 128 when that grid has two blocks per SM).
        #[arg(long, value_enum, default_value = "auto")]
        forward_rows: ForwardRowsArg,
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        #[arg(long, default_value_t = 20)]
        repeats: usize,
        /// Print one JSON object instead of the line.
        #[arg(long)]
        json: bool,
    },
    /// Time one optimizer step (forward, backward, clipping, AdamW) of the configured model
    /// and method on random tokens: tokens/s, model TFLOP/s, MFU, peak GPU and host memory.
    Bench {
        /// Draw the weights for the model's shape (model.preset, else model.path's
        /// config.json) instead of reading them.
        #[arg(long)]
        random_weights: bool,
        /// Keep only the first N decoder layers.
        #[arg(long)]
        layers: Option<usize>,
        /// Rows per step (default: batch.micro_batch_size).
        #[arg(long)]
        rows: Option<usize>,
        /// Tokens per row (default: data.max_seq_length).
        #[arg(long)]
        seq: Option<usize>,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// The peak MFU is taken against, TFLOP/s (H100 SXM dense bf16).
        #[arg(long, default_value_t = 989.0)]
        peak_tflops: f64,
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Check every collective of the job (NCCL on GPUs, TCP otherwise) against values each
    /// rank works out alone, then time an all-reduce per group. Start it like training:
    /// `helix-train --nproc-per-node N comm-check`, or under srun.
    CommCheck {
        /// Tensor-parallel group size; the other ranks form the data-parallel groups.
        #[arg(long, default_value_t = 1)]
        tp: usize,
        /// Size of the timed all-reduce, MiB of f32.
        #[arg(long, default_value_t = 64.0)]
        megabytes: f64,
        /// Timed all-reduces per group (0: no timing).
        #[arg(long, default_value_t = 20)]
        repeats: usize,
        /// Seconds any rank may wait for another.
        #[arg(long, default_value_t = 60.0)]
        timeout_s: f64,
    },
    /// Read, template and tokenize instruction data; print statistics as JSON. Takes the
    /// `[data]` section of a config (and model.path for the tokenizer; change its keys with
    /// --set data.KEY=…), or the flags below.
    DataStats(DataStatsArgs),
}

impl Command {
    /// The subcommand's name when it takes no config (its flags say what it does), so that
    /// `--config` and `--set` beside it are refused instead of ignored.
    pub(crate) fn without_config(&self) -> Option<&'static str> {
        match self {
            Command::Import { .. } => Some("import"),
            Command::Generate { .. } => Some("generate"),
            Command::Export { .. } => Some("export"),
            Command::KernelCheck { .. } => Some("kernel-check"),
            Command::AttentionBench { .. } => Some("attention-bench"),
            Command::CommCheck { .. } => Some("comm-check"),
            Command::Train
            | Command::Eval { .. }
            | Command::Plan { .. }
            | Command::Bench { .. }
            | Command::DataStats(_) => None,
        }
    }
}
