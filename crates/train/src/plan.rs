//! `helix-train plan`: an analytic model of one training step on each GPU of a cluster helix
//! cannot reach from here — memory (parameters, gradients, optimizer state, activations), FLOPs,
//! tensor- and data-parallel traffic, and a step time from stated hardware figures — printed
//! beside the seed's measured NeMo times where one applies. It is how the project reasons about
//! 7B–70B runs on H100s. Every figure is a formula of the config; the assumptions are printed.

use anyhow::{bail, Result};
use helix_model::linear::{is_row_parallel, Quantization};
use helix_model::LlamaConfig;
use helix_peft::{Method, PromptEncoder};
use serde::Serialize;

/// H100 SXM figures the issue states; the MFU is the assumed fraction of peak a real step
/// reaches (Megatron reports 40–55 % for large dense training).
#[derive(Clone, Debug, Serialize)]
pub struct Hardware {
    pub peak_tflops_bf16: f64,
    pub nvswitch_gb_s: f64,
    pub nic_gbit_s: f64,
    pub nics_per_node: usize,
    pub hbm_gib: f64,
    pub mfu: f64,
}

impl Default for Hardware {
    fn default() -> Self {
        Self {
            peak_tflops_bf16: 989.0,
            nvswitch_gb_s: 900.0,
            nic_gbit_s: 400.0,
            nics_per_node: 8,
            hbm_gib: 80.0,
            mfu: 0.45,
        }
    }
}

/// What the plan is for.
#[derive(Clone, Debug)]
pub struct Job {
    pub model: LlamaConfig,
    /// A preset name when the shape is one (to find the seed's measurements).
    pub preset: Option<String>,
    pub method: Method,
    /// Bytes per parameter and activation element (2 for bf16).
    pub dtype_bytes: usize,
    /// Tokens of one sample (the sequence length when packed).
    pub tokens_per_sample: usize,
    pub micro_batch: usize,
    pub global_batch: usize,
    pub nodes: usize,
    pub gpus_per_node: usize,
    pub tensor_parallel: usize,
    /// AdamW's state sharded over the data-parallel ranks (`parallel.zero1`).
    pub zero1: bool,
    /// Each decoder layer recomputed in backward (`trainer.activation_checkpointing = "full"`).
    pub recompute: bool,
    /// The residual stream split over the tensor-parallel ranks by tokens
    /// (`parallel.sequence_parallel`).
    pub sequence_parallel: bool,
    /// The frozen projections in NF4 (`model.quantize_base`).
    pub quantize_base: Quantization,
}

#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub gpus: usize,
    pub data_parallel: usize,
    pub accumulation: usize,
    pub params_per_gpu: f64,
    pub trainable_per_gpu: f64,
    /// Bytes per GPU.
    pub weights_bytes: f64,
    pub grads_bytes: f64,
    pub optimizer_bytes: f64,
    pub optimizer_bytes_zero1: f64,
    /// Activations held for the backward under the job's recomputation setting.
    pub activation_bytes: f64,
    /// The same without recomputation and with full recomputation.
    pub activation_bytes_kept: f64,
    pub activation_bytes_recomputed: f64,
    pub total_bytes: f64,
    /// Model FLOPs (what MFU counts) and what the GPU runs, recomputation included.
    pub flops_per_gpu: f64,
    pub hardware_flops_per_gpu: f64,
    pub tp_bytes_per_gpu: f64,
    pub dp_bytes_per_gpu: f64,
    pub compute_s_at_peak: f64,
    pub compute_s: f64,
    pub tp_s: f64,
    pub dp_s: f64,
    pub step_s: f64,
    /// The seed's measured NeMo seconds per step for this job, where there is one.
    pub measured_step_s: Option<f64>,
}

/// The seed's measured NeMo runs: (preset, method, GPUs) → minutes per 1,000 steps.
const MEASURED: [(&str, &str, usize, f64); 2] = [
    ("llama2-7b", "lora", 8, 79.0),
    ("llama2-70b", "lora", 8, 985.0),
];

pub fn plan(job: &Job, hw: &Hardware) -> Result<Plan> {
    let m = &job.model;
    let t = job.tensor_parallel;
    let gpus = job.nodes * job.gpus_per_node;
    if t == 0 || !gpus.is_multiple_of(t) {
        bail!("tensor_parallel = {t} does not divide {gpus} GPUs");
    }
    let d = gpus / t;
    if !job.global_batch.is_multiple_of(job.micro_batch * d) {
        bail!(
            "global batch {} is not a multiple of micro batch {} × {d} data-parallel ranks",
            job.global_batch,
            job.micro_batch
        );
    }
    helix_peft::check_quantize_base(&job.method, job.quantize_base)?;
    let accumulation = job.global_batch / (job.micro_batch * d);
    let (h, l) = (m.hidden_size as f64, m.num_hidden_layers as f64);
    let (tf, df) = (t as f64, d as f64);

    // Parameters: norms are replicated, everything else split over the tensor-parallel group.
    let norms = (2 * m.num_hidden_layers + 1) as f64 * h;
    let total = m.num_parameters() as f64;
    let params_per_gpu = (total - norms) / tf + norms;
    // The projections' widths: query heads, key / value heads, MLP features.
    let q = (m.num_attention_heads * m.head_dim) as f64;
    let kv = (m.num_key_value_heads * m.head_dim) as f64;
    let i = m.intermediate_size as f64;
    let trainable_per_gpu = match &job.method {
        Method::FullSft => params_per_gpu,
        Method::Lora(lora) => {
            let r = lora.r as f64;
            let shape = |leaf: &str| match leaf {
                "q_proj" => (q, h),
                "k_proj" | "v_proj" => (kv, h),
                "o_proj" => (h, q),
                "gate_proj" | "up_proj" => (i, h),
                _ => (h, i),
            };
            let per_layer: f64 = lora
                .target_modules
                .iter()
                .map(|leaf| {
                    let (out, inp) = shape(leaf);
                    // DoRA's magnitude: one per output feature.
                    let m = if lora.use_dora { out } else { 0.0 };
                    // A is split with a row-parallel base, B with a column-parallel one.
                    match is_row_parallel(leaf) {
                        true => r * inp / tf + out * r + m,
                        false => r * inp + (out * r + m) / tf,
                    }
                })
                .sum();
            per_layer * l
        }
        Method::Ptuning(p) => PromptEncoder::param_shapes(p, m.hidden_size)
            .iter()
            .map(|(_, s)| s.iter().product::<usize>() as f64)
            .sum(),
    };
    // Under QLoRA the projections hold NF4: half a byte an element, an int8 scaler per 64 and
    // a factor per 16,384, plus one projection dequantized at a time (the widest, MLP's).
    let projections_per_gpu = l * (2.0 * h * q + 2.0 * h * kv + 3.0 * h * i) / tf;
    let weights_bytes = match job.quantize_base {
        Quantization::None => params_per_gpu * job.dtype_bytes as f64,
        Quantization::Nf4 => {
            let nf4 = 0.5 + 1.0 / 64.0 + job.dtype_bytes as f64 / 16384.0;
            (params_per_gpu - projections_per_gpu) * job.dtype_bytes as f64
                + projections_per_gpu * nf4
                + h * i / tf * job.dtype_bytes as f64
        }
    };
    // helix accumulates gradients in f32 and keeps AdamW's two moments in f32, plus f32 master
    // weights for parameters held in 16 bits (full SFT).
    let grads_bytes = trainable_per_gpu * 4.0;
    let master = matches!(job.method, Method::FullSft) && job.dtype_bytes < 4;
    let optimizer_bytes = trainable_per_gpu * if master { 12.0 } else { 8.0 };
    let optimizer_bytes_zero1 = optimizer_bytes / df;
    let optimizer_held = if job.zero1 {
        optimizer_bytes_zero1
    } else {
        optimizer_bytes
    };
    // Activations kept for the backward, per micro-batch, as helix's one-op decoder layers
    // keep them (crates/ops/src/layer.rs): the layer's input and the residual after attention
    // (h each, whole on every rank, or under sequence parallelism this rank's share of the
    // tokens: `stream` values a token); the rotated q and k, v, and the
    // attention's output (this rank's heads); the gate and up outputs (this rank's features);
    // all in the model's dtype. Then the attention's log-sum-exp or row statistics (f32, per
    // query head) and each LoRA projection's rank-r activation (f32). Neither attention keeps
    // an S × S score matrix, and the norms and SwiGLU are recomputed in the backward.
    let s = job.tokens_per_sample as f64;
    let b = job.micro_batch as f64;
    let dtype = job.dtype_bytes as f64;
    let lora_ranks = match &job.method {
        Method::Lora(lora) => (lora.r * lora.target_modules.len()) as f64,
        _ => 0.0,
    };
    let sequence_parallel = job.sequence_parallel && t > 1;
    let stream = if sequence_parallel { h / tf } else { h };
    let per_token_layer = (2.0 * stream + (2.0 * q + 2.0 * kv + 2.0 * i) / tf) * dtype
        + 2.0 * 4.0 * m.num_attention_heads as f64 / tf
        + 4.0 * lora_ranks;
    let per_layer_act = s * b * per_token_layer;
    // The loss takes the final hidden states' gradient in the forward (f32).
    let loss_grad = s * b * h * 4.0;
    let activation_bytes_kept = per_layer_act * l + loss_grad;
    // Full recomputation keeps each layer's input and, during a layer's backward, that one
    // layer's activations.
    let activation_bytes_recomputed = s * b * stream * dtype * l + per_layer_act + loss_grad;
    let activation_bytes = match job.recompute {
        true => activation_bytes_recomputed,
        false => activation_bytes_kept,
    };
    let total_bytes = weights_bytes + grads_bytes + optimizer_held + activation_bytes;

    // FLOPs (PaLM's accounting, attention counted whole as the literature compares it).
    let per_token = model_flops_per_token(m, &job.method, job.tokens_per_sample, false);
    let matmul_params = matmul_parameters(m);
    let tokens = (job.global_batch * job.tokens_per_sample) as f64;
    let flops_per_gpu = per_token * tokens / gpus as f64;
    // Recomputation runs the decoder layers' forward (not the head's) once more: work the GPU
    // does that the model FLOPs (and so MFU) do not count.
    let head = m.vocab_size as f64 * h;
    let recompute_per_token = match job.recompute {
        true => 2.0 * (matmul_params - head) + 4.0 * l * h * s,
        false => 0.0,
    };
    let hardware_flops_per_gpu = (per_token + recompute_per_token) * tokens / gpus as f64;
    let peak = hw.peak_tflops_bf16 * 1e12;
    let compute_s_at_peak = hardware_flops_per_gpu / peak;
    let compute_s = compute_s_at_peak / hw.mfu;

    // Tensor parallel: Megatron's 4 all-reduces of b·s·h activations per layer per micro-batch
    // (2 forward, 2 backward; 2 more for a recomputed forward); a ring all-reduce moves
    // 2(t−1)/t of the buffer per GPU, over NVSwitch inside a node (half its bidirectional
    // bandwidth each way).
    let ar = |n: f64, bytes: f64| {
        if n > 1.0 {
            2.0 * (n - 1.0) / n * bytes
        } else {
            0.0
        }
    };
    // Sequence parallelism turns each into an all-gather and a reduce-scatter (half an
    // all-reduce each, the same traffic), and its backward gathers a norm's output again for
    // the weights or adapters that read it: q/k/v's, gate/up's (half an all-reduce each).
    let regathers = match (&job.method, sequence_parallel) {
        (_, false) | (Method::Ptuning(_), true) => 0.0,
        (Method::FullSft, true) => 1.0,
        (Method::Lora(lora), true) => {
            let reads = |names: &[&str]| {
                if names.iter().any(|n| lora.targets(n)) {
                    0.5
                } else {
                    0.0
                }
            };
            reads(&["q_proj", "k_proj", "v_proj"]) + reads(&["gate_proj", "up_proj"])
        }
    };
    // Recomputation runs each layer's forward collectives again (2 all-reduces' worth).
    let recomputed = if job.recompute { 2.0 } else { 0.0 };
    let tp_bytes_per_gpu = ar(tf, b * s * h * job.dtype_bytes as f64)
        * (4.0 + regathers + recomputed)
        * l
        * accumulation as f64;
    let nvswitch = hw.nvswitch_gb_s * 1e9 / 2.0;
    let tp_link = if t <= job.gpus_per_node {
        nvswitch
    } else {
        nic_per_gpu(hw)
    };
    let tp_s = tp_bytes_per_gpu / tp_link;
    // Data parallel: one all-reduce of the f32 gradients per step, over InfiniBand when the
    // group spans nodes (8 NICs shared by 8 GPUs), else NVSwitch. ZeRO-1 instead
    // reduce-scatters the gradients to their owners (half an all-reduce) and all-gathers the
    // updated f32 parameters from them.
    let dp_bytes_per_gpu = match job.zero1 {
        true => ar(df, grads_bytes) / 2.0 + ar(df, params_per_gpu * 4.0) / 2.0,
        false => ar(df, grads_bytes),
    };
    let dp_link = if gpus > job.gpus_per_node {
        nic_per_gpu(hw)
    } else {
        nvswitch
    };
    let dp_s = dp_bytes_per_gpu / dp_link;
    let measured_step_s = job.preset.as_deref().and_then(|p| {
        MEASURED
            .iter()
            .find(|(name, method, g, _)| *name == p && *method == job.method.name() && *g == gpus)
            .map(|(.., minutes)| minutes * 60.0 / 1000.0)
    });
    Ok(Plan {
        gpus,
        data_parallel: d,
        accumulation,
        params_per_gpu,
        trainable_per_gpu,
        weights_bytes,
        grads_bytes,
        optimizer_bytes,
        optimizer_bytes_zero1,
        activation_bytes,
        activation_bytes_kept,
        activation_bytes_recomputed,
        total_bytes,
        flops_per_gpu,
        hardware_flops_per_gpu,
        tp_bytes_per_gpu,
        dp_bytes_per_gpu,
        compute_s_at_peak,
        compute_s,
        tp_s,
        dp_s,
        step_s: compute_s + tp_s + dp_s,
        measured_step_s,
    })
}

fn nic_per_gpu(hw: &Hardware) -> f64 {
    hw.nic_gbit_s * 1e9 / 8.0 * hw.nics_per_node as f64 / 8.0
}

/// The weights that multiply: all but the norms and the embedding lookup (a tied embedding is
/// also the head, which does multiply).
pub fn matmul_parameters(m: &LlamaConfig) -> f64 {
    let h = m.hidden_size as f64;
    let norms = (2 * m.num_hidden_layers + 1) as f64 * h;
    let lookup = match m.tie_word_embeddings {
        true => 0.0,
        false => m.vocab_size as f64 * h,
    };
    m.num_parameters() as f64 - norms - lookup
}

/// Model FLOPs of one token of a training step (what MFU counts), PaLM's accounting: 2·N
/// forward and 2·N for the input gradients over the N matmul weights, 2·N more for weight
/// gradients under full SFT only (LoRA's and P-tuning's frozen base has none; their adapters
/// are a rounding error), plus attention's scores and values — 4·L·h·s forward, three times that
/// with the backward: 12·L·h·s, or half of it, 6·L·h·s, counting only the causal half.
pub fn model_flops_per_token(m: &LlamaConfig, method: &Method, seq: usize, causal: bool) -> f64 {
    let (h, l) = (m.hidden_size as f64, m.num_hidden_layers as f64);
    let matmul = matmul_parameters(m);
    let weights = match method {
        Method::FullSft => 6.0 * matmul,
        _ => 4.0 * matmul,
    };
    let attention = 12.0 * l * h * seq as f64;
    weights + if causal { attention / 2.0 } else { attention }
}

/// The plan as a person reads it, with the comparison and what explains it.
pub fn render(job: &Job, hw: &Hardware, p: &Plan) -> String {
    let gib = |b: f64| b / (1u64 << 30) as f64;
    let mut s = String::new();
    let w = |s: &mut String, line: String| {
        s.push_str(&line);
        s.push('\n');
    };
    w(&mut s, format!(
        "{} × {} GPUs: tensor parallel {}{}, data parallel {}, micro batch {} × accumulation {} = global batch {}, {} tokens per sample",
        job.nodes, job.gpus_per_node, job.tensor_parallel,
        if job.sequence_parallel && job.tensor_parallel > 1 { " (sequence parallel)" } else { "" },
        p.data_parallel, job.micro_batch,
        p.accumulation, job.global_batch, job.tokens_per_sample
    ));
    w(
        &mut s,
        format!(
            "per GPU: {:.2} B parameters, {:.3} B trainable ({})",
            p.params_per_gpu / 1e9,
            p.trainable_per_gpu / 1e9,
            job.method.name()
        ),
    );
    w(&mut s, "memory per GPU (GiB):".into());
    w(
        &mut s,
        format!("  weights            {:8.2}", gib(p.weights_bytes)),
    );
    w(
        &mut s,
        format!("  gradients (f32)    {:8.2}", gib(p.grads_bytes)),
    );
    w(
        &mut s,
        match job.zero1 {
            true => format!(
                "  optimizer (f32)    {:8.2}   ZeRO-1 over {} ranks ({:.2} unsharded)",
                gib(p.optimizer_bytes_zero1),
                p.data_parallel,
                gib(p.optimizer_bytes)
            ),
            false => format!(
                "  optimizer (f32)    {:8.2}   ({:.2} with parallel.zero1 over {} ranks)",
                gib(p.optimizer_bytes),
                gib(p.optimizer_bytes_zero1),
                p.data_parallel
            ),
        },
    );
    w(
        &mut s,
        match job.recompute {
            true => format!(
                "  activations        {:8.2}   (per micro-batch, each layer recomputed; {:.2} kept)",
                gib(p.activation_bytes),
                gib(p.activation_bytes_kept)
            ),
            false => format!(
                "  activations        {:8.2}   (per micro-batch, kept; {:.2} with \
                 activation_checkpointing = \"full\")",
                gib(p.activation_bytes),
                gib(p.activation_bytes_recomputed)
            ),
        },
    );
    w(
        &mut s,
        format!(
            "  total              {:8.2}   of {:.0} GiB HBM{}",
            gib(p.total_bytes),
            hw.hbm_gib,
            if gib(p.total_bytes) > hw.hbm_gib {
                "  — DOES NOT FIT"
            } else {
                ""
            }
        ),
    );
    if matches!(&job.method, Method::Lora(l) if l.use_dora) {
        w(
            &mut s,
            "  (DoRA runs each decoder layer op by op, not as one op: its activations are more \
             than the one-op layers' above; measure with helix-train bench)"
                .to_string(),
        );
    }
    if job.recompute {
        w(
            &mut s,
            format!(
                "recomputation: {:.3} PFLOP per GPU per step more than the model FLOPs below",
                (p.hardware_flops_per_gpu - p.flops_per_gpu) / 1e15
            ),
        );
    }
    w(&mut s, format!(
        "compute: {:.3} PFLOP per GPU per step: {:.2} s at the {:.0} TFLOP/s peak, {:.2} s at {:.0}% MFU",
        p.flops_per_gpu / 1e15,
        p.compute_s_at_peak,
        hw.peak_tflops_bf16,
        p.compute_s,
        hw.mfu * 100.0
    ));
    w(&mut s, format!(
        "tensor parallel traffic: {:.2} GB per GPU per step, {:.3} s; data parallel: {:.2} GB, {:.3} s",
        p.tp_bytes_per_gpu / 1e9,
        p.tp_s,
        p.dp_bytes_per_gpu / 1e9,
        p.dp_s
    ));
    w(
        &mut s,
        format!(
            "predicted step: {:.2} s = {:.0} min per 1,000 steps (communication not overlapped)",
            p.step_s,
            p.step_s * 1000.0 / 60.0
        ),
    );
    match p.measured_step_s {
        Some(measured) => {
            let implied = p.flops_per_gpu / (hw.peak_tflops_bf16 * 1e12) / measured;
            w(&mut s, format!(
                "seed's NeMo measurement: {:.2} s = {:.0} min per 1,000 steps: {:.1}× the prediction; \
                 the analytic FLOPs then ran at {:.1}% of peak",
                measured,
                measured * 1000.0 / 60.0,
                measured / p.step_s,
                implied * 100.0
            ));
            w(&mut s, "what explains the difference:".into());
            w(
                &mut s,
                format!(
                "  - tokens: the plan counts {} tokens in every sample; Dolly's answers are far \
                 shorter, and without packing NeMo pads each micro-batch only to its own length, \
                 so the real step does fewer FLOPs than counted (measure with `helix-train \
                 data-stats` and pass --tokens-per-sample): that makes the real efficiency lower \
                 still, not higher",
                job.tokens_per_sample
            ),
            );
            w(
                &mut s,
                format!(
                "  - size of the work: at micro batch {} each GEMM is that many samples' tokens \
                 wide; kernel launches{} and the optimizer step take a fixed time that larger \
                 micro-batches would amortise",
                job.micro_batch,
                if job.tensor_parallel > 1 {
                    ", the per-layer tensor-parallel all-reduces (latency-bound at this size)"
                } else {
                    ""
                }
            ),
            );
            w(
                &mut s,
                "  - the measured run may use activation recomputation or a different \
                 parallel layout than this config (the seed's NeMo settings decide)"
                    .into(),
            );
            if measured / p.step_s > 10.0 {
                w(
                    &mut s,
                    format!(
                    "  - a {:.0}× gap is more than these account for: the measured run's settings \
                     (recomputation, pipeline or sequence parallelism, offloading) and the \
                     data's real lengths need checking before reading it as helix's margin",
                    measured / p.step_s
                ),
                );
            }
        }
        None => w(
            &mut s,
            "no seed measurement for this model, method and GPU count".into(),
        ),
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use helix_peft::LoraConfig;

    fn job(preset: &str, method: Method, gpus: usize, tp: usize, global: usize) -> Job {
        Job {
            model: LlamaConfig::preset(preset).unwrap(),
            preset: Some(preset.into()),
            method,
            dtype_bytes: 2,
            tokens_per_sample: 2048,
            micro_batch: 1,
            global_batch: global,
            nodes: gpus.div_ceil(8),
            gpus_per_node: gpus.min(8),
            tensor_parallel: tp,
            zero1: false,
            recompute: false,
            sequence_parallel: false,
            quantize_base: Quantization::None,
        }
    }

    #[test]
    fn full_sft_of_7b_counts_what_the_literature_counts() {
        let p = plan(
            &job("llama2-7b", Method::FullSft, 8, 1, 128),
            &Hardware::default(),
        )
        .unwrap();
        // 6.74 B parameters in bf16: 12.55 GiB of weights; 16 bytes per parameter of
        // gradients and AdamW state with f32 masters; 6·N + 12·L·h·s FLOPs per token.
        assert!(
            (p.params_per_gpu / 1e9 - 6.738).abs() < 0.01,
            "{}",
            p.params_per_gpu
        );
        assert!((p.weights_bytes / (1u64 << 30) as f64 - 12.55).abs() < 0.05);
        assert_eq!(p.optimizer_bytes, p.trainable_per_gpu * 12.0);
        let n = LlamaConfig::preset("llama2-7b").unwrap().num_parameters() as f64;
        let per_token =
            6.0 * (n - 65.0 * 4096.0 - 32000.0 * 4096.0) + 12.0 * 32.0 * 4096.0 * 2048.0;
        let want = per_token * 128.0 * 2048.0 / 8.0;
        assert!(
            (p.flops_per_gpu / want - 1.0).abs() < 1e-3,
            "{} vs {want}",
            p.flops_per_gpu
        );
        assert_eq!((p.data_parallel, p.accumulation), (8, 16));
        assert!(p.measured_step_s.is_none());
    }

    #[test]
    fn full_recomputation_keeps_layer_inputs_and_adds_one_forward_of_the_layers() {
        let mut j = job("llama2-7b", Method::FullSft, 8, 1, 8);
        let kept = plan(&j, &Hardware::default()).unwrap();
        j.recompute = true;
        let p = plan(&j, &Hardware::default()).unwrap();
        // A layer keeps, per token, x and the residual (h each), q, k, v and the attention's
        // output (h each: no GQA in 7B), gate and up (11,008 each) in bf16, and 32 heads'
        // softmax statistics in f32; the loss keeps the final hidden states' f32 gradient.
        // Recomputed: 32 layer inputs of s·h bf16 values plus one layer's activations.
        let (s, h) = (2048.0, 4096.0);
        let per_layer = s * ((6.0 * h + 2.0 * 11008.0) * 2.0 + 32.0 * 8.0);
        let loss = s * h * 4.0;
        assert!((kept.activation_bytes / (32.0 * per_layer + loss) - 1.0).abs() < 1e-9);
        let want = 32.0 * s * h * 2.0 + per_layer + loss;
        assert!((p.activation_bytes / want - 1.0).abs() < 1e-9);
        assert!(p.activation_bytes < kept.activation_bytes / 7.0);
        // The model FLOPs (MFU's numerator) do not change; the GPU does 2·N_layers + 4·L·h·s
        // more per token.
        assert_eq!(p.flops_per_gpu, kept.flops_per_gpu);
        let n = LlamaConfig::preset("llama2-7b").unwrap().num_parameters() as f64;
        let layers = n - 65.0 * 4096.0 - 2.0 * 32000.0 * 4096.0;
        let extra = (2.0 * layers + 4.0 * 32.0 * h * s) * 8.0 * s / 8.0;
        let got = p.hardware_flops_per_gpu - p.flops_per_gpu;
        assert!((got / extra - 1.0).abs() < 1e-6, "{got} vs {extra}");
    }

    #[test]
    fn lora_70b_over_tp8_splits_weights_and_adds_its_traffic() {
        let lora = LoraConfig::new(32, 32.0, &["q_proj", "k_proj", "v_proj"]);
        let p = plan(
            &job("llama2-70b", Method::Lora(lora), 8, 8, 8),
            &Hardware::default(),
        )
        .unwrap();
        // 69 B / 8 ranks, bf16: about 16 GiB of weights per GPU; LoRA on q/k/v, r 32.
        assert!(
            (p.weights_bytes / (1u64 << 30) as f64 - 16.1).abs() < 0.3,
            "{}",
            p.weights_bytes
        );
        // Per layer, A replicated (column-parallel bases) and B split 8 ways:
        // q 32·8192 + 1024·32, k and v 32·8192 + 128·32 each: 827,392 × 80 layers.
        assert_eq!(p.trainable_per_gpu, 66_191_360.0);
        assert!(p.tp_s > 0.0 && p.dp_s == 0.0);
        assert_eq!(p.measured_step_s, Some(985.0 * 60.0 / 1000.0));
        let text = render(
            &job("llama2-70b", Method::FullSft, 8, 8, 8),
            &Hardware::default(),
            &p,
        );
        assert!(text.contains("seed's NeMo measurement"), "{text}");
        assert!(plan(
            &job("llama2-7b", Method::FullSft, 8, 3, 8),
            &Hardware::default()
        )
        .is_err());
    }

    #[test]
    fn sequence_parallelism_splits_the_residual_stream_over_tp8() {
        let lora = LoraConfig::new(32, 32.0, &["q_proj", "k_proj", "v_proj"]);
        let mut j = job("llama2-70b", Method::Lora(lora), 8, 8, 8);
        let plain = plan(&j, &Hardware::default()).unwrap();
        j.sequence_parallel = true;
        let sp = plan(&j, &Hardware::default()).unwrap();
        // Per token and layer the input and the residual (8,192 bf16 values each) shrink to an
        // eighth: 80 layers × 2,048 tokens × 2 × 7/8 × 8,192 × 2 bytes fewer.
        let saved = 80.0 * 2048.0 * 2.0 * (7.0 / 8.0) * 8192.0 * 2.0;
        let got = plain.activation_bytes - sp.activation_bytes;
        assert!((got / saved - 1.0).abs() < 1e-9, "{got} vs {saved}");
        // q/k/v's adapters read the first norm's output, gathered again in the backward: 4.5
        // all-reduces' worth of traffic a layer where plain tensor parallelism moves 4.
        let ratio = sp.tp_bytes_per_gpu / plain.tp_bytes_per_gpu;
        assert!((ratio - 4.5 / 4.0).abs() < 1e-12, "{ratio}");
        // Recomputation keeps each layer's input: an eighth of it.
        j.recompute = true;
        let sp_recomputed = plan(&j, &Hardware::default()).unwrap();
        j.sequence_parallel = false;
        let recomputed = plan(&j, &Hardware::default()).unwrap();
        let inputs = 80.0 * 2048.0 * 8192.0 * 2.0 * (7.0 / 8.0);
        let single_layer = 2048.0 * 2.0 * (7.0 / 8.0) * 8192.0 * 2.0;
        let got = recomputed.activation_bytes - sp_recomputed.activation_bytes;
        assert!((got / (inputs + single_layer) - 1.0).abs() < 1e-9);
        // And the forwards run again all-reduce again: 6 where 4 were, 6.5 where 4.5.
        let ratio = recomputed.tp_bytes_per_gpu / plain.tp_bytes_per_gpu;
        assert!((ratio - 6.0 / 4.0).abs() < 1e-12, "{ratio}");
        let ratio = sp_recomputed.tp_bytes_per_gpu / sp.tp_bytes_per_gpu;
        assert!((ratio - 6.5 / 4.5).abs() < 1e-12, "{ratio}");
        // One rank alone: nothing to split.
        let mut one = job("llama2-7b", Method::FullSft, 1, 1, 1);
        let alone = plan(&one, &Hardware::default()).unwrap();
        one.sequence_parallel = true;
        let p = plan(&one, &Hardware::default()).unwrap();
        assert_eq!(p.activation_bytes, alone.activation_bytes);
    }

    #[test]
    fn qlora_holds_70b_projections_in_about_half_a_byte_each_on_one_gpu() {
        let lora = LoraConfig::new(16, 32.0, &helix_peft::LLAMA_TARGETS);
        let mut j = job("llama2-70b", Method::Lora(lora), 1, 1, 1);
        let dense = plan(&j, &Hardware::default()).unwrap().weights_bytes / (1u64 << 30) as f64;
        j.quantize_base = Quantization::Nf4;
        let nf4 = plan(&j, &Hardware::default()).unwrap().weights_bytes / (1u64 << 30) as f64;
        // 68.4 B projection parameters at 0.516 bytes (32.9 GiB), the embedding, LM head and
        // norms in bf16 (1 GiB), one 28,672 × 8,192 projection dequantized (0.4 GiB).
        assert!((128.0..130.0).contains(&dense), "{dense}");
        assert!((33.8..34.8).contains(&nf4), "{nf4}");
        j.method = Method::FullSft;
        let e = plan(&j, &Hardware::default()).unwrap_err().to_string();
        assert!(e.contains("model.quantize_base"), "{e}");
    }
}
