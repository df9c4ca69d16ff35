//! The Llama decoder, one readable file: embedding → N × (RMSNorm → attention → RMSNorm → SwiGLU
//! MLP) → RMSNorm → LM head. Weights are found by the names Hugging Face checkpoints use.
//!
//! Every non-trivial computation goes through one function of `helix_ops` (rms_norm, apply_rope,
//! causal_attention, swiglu, linear_cross_entropy) and every projection through the [`Linear`]
//! trait, so fused kernels, LoRA and tensor-parallel layers replace them without edits here.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use helix_ops::nf4::Nf4Weight;
use helix_ops::{
    apply_rope, attention_bias, causal_attention, copy_to_parallel_region, count_targets,
    decoder_layer, gather_from_sequence_parallel_region, linear_cross_entropy,
    reduce_from_parallel_region, rms_norm, rope_attention, scatter_to_sequence_parallel_region,
    swiglu, vocab_parallel_cross_entropy, AttentionKernel, AttentionMask, BaseWeight,
    DecoderWeights, MaskSpec, RopeTable, SharedCollective, VocabShard,
};

use crate::config::LlamaConfig;
use crate::linear::{keep_dense, Dense, Linear, LinearHook, Placement, Quantization};
use crate::weights::SafetensorsWeights;

/// How to load: dtype and device of the weights, and which parameters train.
pub struct LoadOptions<'a> {
    pub dtype: DType,
    pub device: Device,
    /// Parameters (by checkpoint name) that become trainable [`Var`]s; the rest are constants,
    /// so candle records no gradient for them and the optimizer never sees them.
    pub trainable: &'a dyn Fn(&str) -> bool,
    pub linear_hook: &'a LinearHook<'a>,
    /// The tensor-parallel group this rank belongs to (Megatron style): each rank loads its
    /// shard of every projection, its heads, and its slice of the vocabulary.
    pub tensor_parallel: Option<SharedCollective>,
    /// How the decoder layers' frozen projections are stored: as loaded, or in NF4 (QLoRA).
    /// Embeddings, norms and the LM head stay in `dtype`; a trainable projection is never
    /// quantized.
    pub quantize_base: Quantization,
}

impl LoadOptions<'static> {
    /// Frozen model for inference.
    pub fn inference(dtype: DType, device: Device) -> Self {
        LoadOptions {
            dtype,
            device,
            trainable: &|_| false,
            linear_hook: &keep_dense,
            tensor_parallel: None,
            quantize_base: Quantization::None,
        }
    }
}

struct Attention {
    q_proj: Box<dyn Linear>,
    k_proj: Box<dyn Linear>,
    v_proj: Box<dyn Linear>,
    o_proj: Box<dyn Linear>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

struct Mlp {
    gate_proj: Box<dyn Linear>,
    up_proj: Box<dyn Linear>,
    down_proj: Box<dyn Linear>,
}

struct DecoderLayer {
    input_layernorm: Tensor,
    self_attn: Attention,
    post_attention_layernorm: Tensor,
    mlp: Mlp,
}

/// Past keys and values of every layer, for generation.
#[derive(Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map(|(k, _)| k.dim(2).unwrap_or(0))
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the attention of one forward pass may see.
#[derive(Clone, Debug, Default)]
pub struct ForwardMask {
    /// [B, S] flags, 1 for a real token (padding otherwise).
    pub key_valid: Option<Vec<u8>>,
    /// [B, S] document ids of packed rows.
    pub segment_ids: Option<Vec<u32>>,
}

/// The per-forward inputs every decoder layer takes besides the hidden states
/// ([`Llama::layer_context`]).
pub struct LayerContext {
    cos: Tensor,
    sin: Tensor,
    mask: AttentionMask,
    /// The batch's rows and their length (B, S).
    tokens: (usize, usize),
}

pub struct Llama {
    cfg: LlamaConfig,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    /// `None` when tied to `embed_tokens`.
    lm_head: Option<Tensor>,
    rope: RopeTable,
    trainable: Vec<(String, Var)>,
    dtype: DType,
    device: Device,
    /// The tensor-parallel group; `embed_tokens` and the LM head are this rank's vocabulary rows.
    tp: Option<SharedCollective>,
    /// Whether decoder layers run as one op where their projections allow
    /// ([`Llama::set_fused_layers`]).
    fused_layers: bool,
    /// Whether the layers attend over whole sequences with FlashAttention (segment masks) or
    /// the chunked matmuls (bias masks): `model.attention` resolved for this device, dtype and
    /// head dimension ([`Llama::set_attention`]).
    flash_attention: bool,
    /// Whether, under tensor parallelism, the hidden states between the layers' parallel
    /// regions hold only this rank's chunk of the tokens ([`Llama::set_sequence_parallel`]).
    sequence_parallel: bool,
}

impl Llama {
    /// Loads every tensor of `cfg` from `weights`, with shape and dtype checks.
    pub fn load(
        cfg: &LlamaConfig,
        weights: &SafetensorsWeights,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let tp = opts.tensor_parallel.clone().filter(|g| g.size() > 1);
        let (tp_rank, tp_size) = tp.as_ref().map_or((0, 1), |g| (g.rank(), g.size()));
        for (what, n) in [
            ("num_attention_heads", cfg.num_attention_heads),
            ("num_key_value_heads", cfg.num_key_value_heads),
            ("intermediate_size", cfg.intermediate_size),
            ("vocab_size", cfg.vocab_size),
        ] {
            if n % tp_size != 0 {
                anyhow::bail!(
                    "tensor parallelism over {tp_size} ranks needs {what} ({n}) divisible by \
                     {tp_size}"
                );
            }
        }
        let mut params = ParamLoader {
            weights,
            opts,
            trainable: Vec::new(),
            tp: tp.clone(),
            tp_rank,
            tp_size,
        };
        let h = cfg.hidden_size;
        let q_out = cfg.num_attention_heads * cfg.head_dim;
        let kv_out = cfg.num_key_value_heads * cfg.head_dim;
        let i = cfg.intermediate_size;
        let embed_tokens = params.get_shard("model.embed_tokens.weight", (cfg.vocab_size, h), 0)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let self_attn = Attention {
                q_proj: params.linear(&format!("{p}.self_attn.q_proj"), q_out, h, COLUMN)?,
                k_proj: params.linear(&format!("{p}.self_attn.k_proj"), kv_out, h, COLUMN)?,
                v_proj: params.linear(&format!("{p}.self_attn.v_proj"), kv_out, h, COLUMN)?,
                o_proj: params.linear(&format!("{p}.self_attn.o_proj"), h, q_out, ROW)?,
                // This rank's heads: q/k/v rows are head-major, so its shard holds whole heads.
                n_heads: cfg.num_attention_heads / tp_size,
                n_kv_heads: cfg.num_key_value_heads / tp_size,
                head_dim: cfg.head_dim,
            };
            let mlp = Mlp {
                gate_proj: params.linear(&format!("{p}.mlp.gate_proj"), i, h, COLUMN)?,
                up_proj: params.linear(&format!("{p}.mlp.up_proj"), i, h, COLUMN)?,
                down_proj: params.linear(&format!("{p}.mlp.down_proj"), h, i, ROW)?,
            };
            layers.push(DecoderLayer {
                input_layernorm: params.get(&format!("{p}.input_layernorm.weight"), h)?,
                self_attn,
                post_attention_layernorm: params
                    .get(&format!("{p}.post_attention_layernorm.weight"), h)?,
                mlp,
            });
        }
        let norm = params.get("model.norm.weight", h)?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(params.get_shard("lm_head.weight", (cfg.vocab_size, h), 0)?)
        };
        let rope = RopeTable::new(
            cfg.head_dim,
            cfg.rope_theta,
            &cfg.rope_scaling,
            &opts.device,
        )?;
        Ok(Self {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            trainable: params.trainable,
            dtype: opts.dtype,
            device: opts.device.clone(),
            tp,
            fused_layers: true,
            flash_attention: AttentionKernel::Auto.uses_flash(
                &opts.device,
                opts.dtype,
                cfg.head_dim,
            )?,
            sequence_parallel: false,
        })
    }

    /// Sequence parallelism (`parallel.sequence_parallel`, Megatron's): under tensor
    /// parallelism each rank keeps only its chunk of the tokens between the layers' parallel
    /// regions — the residual stream, the norms and the layers' saved inputs — where plain
    /// tensor parallelism keeps every token on every rank ([`helix_ops::RowShard`]). The
    /// layers must run as one op each ([`Self::set_fused_layers`]). Without a tensor-parallel
    /// group it changes nothing.
    pub fn set_sequence_parallel(&mut self, on: bool) {
        self.sequence_parallel = on;
    }

    /// The group the tokens are split over, under sequence parallelism.
    fn sequence_group(&self) -> Option<&SharedCollective> {
        self.tp.as_ref().filter(|_| self.sequence_parallel)
    }

    /// Whether each decoder layer runs as one op with a hand-written backward
    /// ([`helix_ops::decoder_layer`]) where its projections allow: the default. Off, every layer
    /// runs op by op on candle's autograd (`model.fused_layers = false`), for comparison.
    pub fn set_fused_layers(&mut self, on: bool) {
        self.fused_layers = on;
    }

    /// Which attention the decoder layers run over whole sequences (`model.attention`):
    /// FlashAttention where its CUDA kernels run unless told otherwise. An error when
    /// FlashAttention is asked for where its kernels cannot run (an f32 model on a GPU, a head
    /// dimension they are not built for).
    pub fn set_attention(&mut self, kernel: AttentionKernel) -> Result<()> {
        self.flash_attention = kernel.uses_flash(&self.device, self.dtype, self.cfg.head_dim)?;
        Ok(())
    }

    /// The attention the layers run over whole sequences: `flash` or `chunked`.
    pub fn attention_name(&self) -> &'static str {
        match self.flash_attention {
            true => "flash",
            false => "chunked",
        }
    }

    /// The tensor-parallel group, if the model is split over one.
    pub fn tensor_parallel(&self) -> Option<&SharedCollective> {
        self.tp.as_ref()
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Trainable parameters by checkpoint name, in load order.
    pub fn trainable_params(&self) -> &[(String, Var)] {
        &self.trainable
    }

    pub fn embed_tokens(&self) -> &Tensor {
        &self.embed_tokens
    }

    /// The LM head weight [V, H] (the embedding when tied).
    pub fn lm_head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Every weight under its checkpoint name, in checkpoint order; projections as their
    /// [`Linear`] reports them (a LoRA layer gives its frozen base; an NF4 one, dequantized:
    /// every projection at once, which is why a QLoRA run writes no merged model).
    pub fn named_weights(&self) -> candle_core::Result<Vec<(String, Tensor)>> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed_tokens.clone(),
        )];
        for (l, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{l}");
            out.push((
                format!("{p}.input_layernorm.weight"),
                layer.input_layernorm.clone(),
            ));
            for (name, linear) in layer.projections() {
                out.push((format!("{p}.{name}.weight"), linear.weight().tensor()?));
            }
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                layer.post_attention_layernorm.clone(),
            ));
        }
        out.push(("model.norm.weight".to_string(), self.norm.clone()));
        if let Some(head) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), head.clone()));
        }
        Ok(out)
    }

    /// Bytes the decoder layers' projection weights hold on this rank (less than dense under
    /// `model.quantize_base = "nf4"`), and what they hold in the model's dtype.
    pub fn projection_bytes(&self) -> candle_core::Result<(usize, usize)> {
        let (mut held, mut dense) = (0, 0);
        for (_, p) in self.layers.iter().flat_map(DecoderLayer::projections) {
            let w = p.weight();
            let (out, inner) = w.dims2()?;
            held += w.bytes();
            dense += out * inner * self.dtype.size_in_bytes();
        }
        Ok((held, dense))
    }

    /// Token embeddings [B, S, H] of input_ids [B, S] (u32).
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        let flat = input_ids.flatten_all()?;
        let Some(g) = &self.tp else {
            return Ok(self.embed_tokens.index_select(&flat, 0)?.reshape((
                b,
                s,
                self.cfg.hidden_size,
            ))?);
        };
        // Vocabulary-parallel: this rank embeds the ids in its rows, zeros the others, and the
        // group sums (Megatron's VocabParallelEmbedding).
        let rows = self.embed_tokens.dim(0)?;
        let start = g.rank() * rows;
        let ids = flat.to_dtype(DType::I64)?.to_vec1::<i64>()?;
        let (local, here): (Vec<u32>, Vec<f32>) = ids
            .iter()
            .map(|&i| {
                let inside = (i as usize) >= start && (i as usize) < start + rows;
                match inside {
                    true => ((i as usize - start) as u32, 1.0),
                    false => (0, 0.0),
                }
            })
            .unzip();
        let local = Tensor::from_vec(local, b * s, &self.device)?;
        let here = Tensor::from_vec(here, (b * s, 1), &self.device)?.to_dtype(self.dtype)?;
        let part = self
            .embed_tokens
            .index_select(&local, 0)?
            .broadcast_mul(&here)?;
        Ok(reduce_from_parallel_region(&part, g)?.reshape((b, s, self.cfg.hidden_size))?)
    }

    /// Final hidden states [B, S, H] (after the last RMSNorm) for input embeddings [B, S, H] at
    /// `position_ids` [B, S]. Taking embeddings lets P-tuning prepend virtual tokens.
    pub fn forward_embeds(
        &self,
        embeds: &Tensor,
        position_ids: &Tensor,
        mask: &ForwardMask,
    ) -> Result<Tensor> {
        let ctx = self.layer_context(embeds, position_ids, mask)?;
        let mut x = self.enter_layers(embeds, &ctx)?;
        for i in 0..self.num_layers() {
            x = self.forward_layer(i, &x, &ctx)?;
        }
        self.final_norm(&x, &ctx)
    }

    /// The first decoder layer's input from the embeddings [B, S, H]: the embeddings, or under
    /// sequence parallelism this rank's chunk of their rows [chunk, H].
    pub fn enter_layers(&self, embeds: &Tensor, ctx: &LayerContext) -> Result<Tensor> {
        let Some(g) = self.sequence_group() else {
            return Ok(embeds.clone());
        };
        let (b, s) = ctx.tokens;
        let rows = embeds.reshape((b * s, self.cfg.hidden_size))?;
        Ok(scatter_to_sequence_parallel_region(&rows, g)?)
    }

    /// Decoder layers, for callers that run them one at a time (activation checkpointing).
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// What every decoder layer of one forward over `embeds` [B, S, H] shares: the rotary
    /// tables at `position_ids` and the attention bias of `mask`. Neither depends on a
    /// parameter, so a recomputed layer may reuse them.
    pub fn layer_context(
        &self,
        embeds: &Tensor,
        position_ids: &Tensor,
        mask: &ForwardMask,
    ) -> Result<LayerContext> {
        let (b, s, _) = embeds.dims3()?;
        let spec = MaskSpec {
            batch: b,
            q_len: s,
            kv_len: s,
            q_offset: 0,
            key_valid: mask.key_valid.clone(),
            segment_ids: mask.segment_ids.clone(),
        };
        let mask = AttentionMask::new(&spec, self.dtype, &self.device, self.flash_attention)?;
        let (cos, sin) = self.rope.cos_sin(position_ids, self.dtype)?;
        Ok(LayerContext {
            cos,
            sin,
            mask,
            tokens: (b, s),
        })
    }

    /// Decoder layer `i` on hidden states x [B, S, H] (under sequence parallelism, this rank's
    /// chunk of their rows, as [`Self::enter_layers`] gives it).
    pub fn forward_layer(&self, i: usize, x: &Tensor, ctx: &LayerContext) -> Result<Tensor> {
        let layer = self.layers.get(i).with_context(|| {
            format!("no decoder layer {i} (the model has {})", self.layers.len())
        })?;
        let fused = self
            .fused_layers
            .then(|| {
                layer.hand_differentiated(
                    self.cfg.rms_norm_eps,
                    self.tp.as_ref(),
                    self.sequence_parallel,
                )
            })
            .flatten();
        if fused.is_none() && self.sequence_group().is_some() {
            anyhow::bail!(
                "decoder layer {i}: sequence parallelism runs each layer as one op, and this one \
                 runs op by op (model.fused_layers = false)"
            );
        }
        Ok(match fused {
            Some(weights) => decoder_layer(x, &weights, (&ctx.cos, &ctx.sin), &ctx.mask)?,
            None => layer.forward(
                x,
                &ctx.cos,
                &ctx.sin,
                &ctx.mask,
                None,
                self.cfg.rms_norm_eps,
            )?,
        })
    }

    /// The RMSNorm after the last decoder layer, applied to its output x: the hidden states
    /// [B, S, H] the LM head reads. Under sequence parallelism each rank normalises its chunk
    /// (the norm's weight gradient summed over the group) and the chunks are gathered.
    pub fn final_norm(&self, x: &Tensor, ctx: &LayerContext) -> Result<Tensor> {
        let eps = self.cfg.rms_norm_eps;
        let Some(g) = self.sequence_group() else {
            return Ok(rms_norm(x, &self.norm, eps)?);
        };
        let normed = rms_norm(x, &copy_to_parallel_region(&self.norm, g)?, eps)?;
        let (b, s) = ctx.tokens;
        let rows = gather_from_sequence_parallel_region(&normed, b * s, g)?;
        Ok(rows.reshape((b, s, self.cfg.hidden_size))?)
    }

    /// Final hidden states for input_ids [B, S].
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        mask: &ForwardMask,
    ) -> Result<Tensor> {
        self.forward_embeds(&self.embed(input_ids)?, position_ids, mask)
    }

    /// Full-vocabulary logits [B, S, V] in f32. For evaluation and tests; training uses
    /// [`Llama::loss_sum`], which never holds them all.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let (b, s, h) = hidden.dims3()?;
        let w = self.lm_head_weight();
        let mut logits = hidden.reshape((b * s, h))?.matmul(&w.t()?)?;
        if let Some(g) = &self.tp {
            logits = g.all_gather(&logits, 1)?;
        }
        Ok(logits
            .reshape((b, s, self.cfg.vocab_size))?
            .to_dtype(DType::F32)?)
    }

    /// Summed next-token loss of hidden [B, S, H] against labels [B, S] (aligned with the
    /// inputs, -100 = ignore; the shift happens here, as in transformers) and the number of
    /// target tokens. The caller divides by the target count of the whole step. The LM head's
    /// gradients are taken here, while its logits are at hand (see
    /// [`helix_ops::linear_cross_entropy`]); [`Self::eval_loss_sum`] skips them.
    pub fn loss_sum(
        &self,
        hidden: &Tensor,
        labels: &Tensor,
        chunk_rows: usize,
    ) -> Result<(Tensor, usize)> {
        self.head_loss_sum(hidden, self.lm_head_weight(), labels, chunk_rows)
    }

    /// [`Self::loss_sum`] for evaluation: no gradient reaches the hidden states or the head.
    pub fn eval_loss_sum(
        &self,
        hidden: &Tensor,
        labels: &Tensor,
        chunk_rows: usize,
    ) -> Result<(Tensor, usize)> {
        let head = self.lm_head_weight().detach();
        self.head_loss_sum(&hidden.detach(), &head, labels, chunk_rows)
    }

    fn head_loss_sum(
        &self,
        hidden: &Tensor,
        head: &Tensor,
        labels: &Tensor,
        chunk_rows: usize,
    ) -> Result<(Tensor, usize)> {
        let (b, s, h) = hidden.dims3()?;
        if labels.dims() != [b, s] {
            anyhow::bail!("labels have shape {:?}, expected [{b}, {s}]", labels.dims());
        }
        if s < 2 {
            return Ok((Tensor::zeros((), DType::F32, &self.device)?, 0));
        }
        let hid = hidden.narrow(1, 0, s - 1)?.reshape((b * (s - 1), h))?;
        let lab = labels.narrow(1, 1, s - 1)?.reshape(b * (s - 1))?;
        let n = count_targets(&lab)?;
        let sum = match &self.tp {
            None => linear_cross_entropy(&hid, head, &lab, chunk_rows)?,
            Some(g) => {
                let shard = VocabShard {
                    start: g.rank() * head.dim(0)?,
                    group: g.clone(),
                };
                // Every rank's vocabulary shard adds to the hidden states' gradient: summed
                // over the group here, or under sequence parallelism by the reduce-scatter
                // behind `final_norm`'s gather.
                let hid = match self.sequence_parallel {
                    true => hid,
                    false => copy_to_parallel_region(&hid, g)?,
                };
                vocab_parallel_cross_entropy(&hid, head, &lab, chunk_rows, &shard)?
            }
        };
        Ok((sum, n))
    }

    /// One generation step: runs input_ids [B, S] after the cached positions and returns the
    /// logits of the last position [B, V] (f32).
    pub fn forward_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        self.forward_cached_embeds(&self.embed(input_ids)?, cache)
    }

    /// [`Llama::forward_cached`] on input embeddings [B, S, H] (P-tuning's virtual tokens come
    /// first in the first step).
    pub fn forward_cached_embeds(&self, embeds: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (b, s, _) = embeds.dims3()?;
        if cache.layers.is_empty() {
            cache.layers = vec![None; self.layers.len()];
        }
        let past = cache.len();
        if past + s > self.cfg.max_position_embeddings {
            anyhow::bail!(
                "sequence of {} tokens exceeds max_position_embeddings {}",
                past + s,
                self.cfg.max_position_embeddings
            );
        }
        let positions: Vec<i64> = (0..b)
            .flat_map(|_| (past..past + s).map(|p| p as i64))
            .collect();
        let position_ids = Tensor::from_vec(positions, (b, s), &self.device)?;
        let spec = MaskSpec {
            batch: b,
            q_len: s,
            kv_len: past + s,
            q_offset: past,
            ..Default::default()
        };
        let mask = AttentionMask::Bias(attention_bias(&spec, self.dtype, &self.device)?);
        let (cos, sin) = self.rope.cos_sin(&position_ids, self.dtype)?;
        let mut x = embeds.clone();
        for (layer, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(&x, &cos, &sin, &mask, Some(slot), self.cfg.rms_norm_eps)?;
        }
        let x = rms_norm(&x.narrow(1, s - 1, 1)?, &self.norm, self.cfg.rms_norm_eps)?;
        Ok(self.logits(&x)?.squeeze(1)?)
    }
}

impl DecoderLayer {
    /// The seven projections under their names within the layer, in checkpoint order.
    fn projections(&self) -> [(&'static str, &dyn Linear); 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            ("self_attn.q_proj", a.q_proj.as_ref()),
            ("self_attn.k_proj", a.k_proj.as_ref()),
            ("self_attn.v_proj", a.v_proj.as_ref()),
            ("self_attn.o_proj", a.o_proj.as_ref()),
            ("mlp.gate_proj", m.gate_proj.as_ref()),
            ("mlp.up_proj", m.up_proj.as_ref()),
            ("mlp.down_proj", m.down_proj.as_ref()),
        ]
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttentionMask,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        eps: f64,
    ) -> candle_core::Result<Tensor> {
        let h = self.self_attn.forward(
            &rms_norm(x, &self.input_layernorm, eps)?,
            cos,
            sin,
            mask,
            cache,
        )?;
        let x = (x + h)?;
        let h = self
            .mlp
            .forward(&rms_norm(&x, &self.post_attention_layernorm, eps)?)?;
        x + h
    }

    /// The layer's weights for [`decoder_layer`], which runs the whole layer as one op with a
    /// hand-written backward, when every projection can be differentiated by hand; under
    /// tensor parallelism, this rank's shards and the group. Draws each LoRA dropout's next
    /// mask: called once per forward of the layer. A layer that then runs op by op must not
    /// have drawn a mask here: every projection reports one (dense, placed, LoRA) except
    /// DoRA's, and a model's adapters are all DoRA or none, so a DoRA layer's `None` comes
    /// before any mask is drawn (dense projections draw none).
    fn hand_differentiated(
        &self,
        eps: f64,
        tp: Option<&SharedCollective>,
        sequence_parallel: bool,
    ) -> Option<DecoderWeights> {
        let (a, m) = (&self.self_attn, &self.mlp);
        Some(DecoderWeights {
            input_layernorm: self.input_layernorm.clone(),
            post_attention_layernorm: self.post_attention_layernorm.clone(),
            q_proj: a.q_proj.projection()?,
            k_proj: a.k_proj.projection()?,
            v_proj: a.v_proj.projection()?,
            o_proj: a.o_proj.projection()?,
            gate_proj: m.gate_proj.projection()?,
            up_proj: m.up_proj.projection()?,
            down_proj: m.down_proj.projection()?,
            heads: (a.n_heads, a.n_kv_heads),
            rms_norm_eps: eps,
            tensor_parallel: tp.cloned(),
            sequence_parallel,
        })
    }
}

impl Attention {
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttentionMask,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> candle_core::Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let Some(cache) = cache else {
            // Training and scoring: the whole block is one op (one graph node, not fourteen).
            let y = rope_attention(
                (
                    &self.q_proj.forward(x)?,
                    &self.k_proj.forward(x)?,
                    &self.v_proj.forward(x)?,
                ),
                (cos, sin),
                mask,
                (self.n_heads, self.n_kv_heads),
            )?;
            return self.o_proj.forward(&y);
        };
        let heads = |t: Tensor, n: usize| t.reshape((b, s, n, self.head_dim))?.transpose(1, 2);
        let q = heads(self.q_proj.forward(x)?, self.n_heads)?;
        let k = heads(self.k_proj.forward(x)?, self.n_kv_heads)?;
        let v = heads(self.v_proj.forward(x)?, self.n_kv_heads)?;
        let q = apply_rope(&q, cos, sin)?;
        let mut k = apply_rope(&k, cos, sin)?;
        let mut v = v.contiguous()?;
        if let Some((pk, pv)) = cache.as_ref() {
            k = Tensor::cat(&[pk, &k], 2)?;
            v = Tensor::cat(&[pv, &v], 2)?;
        }
        *cache = Some((k.clone(), v.clone()));
        let Some(bias) = mask.bias() else {
            candle_core::bail!("attention with a KV cache takes a bias mask, not segment ids");
        };
        let y = causal_attention(&q, &k, &v, bias)?;
        let y = y
            .transpose(1, 2)?
            .reshape((b, s, self.n_heads * self.head_dim))?;
        self.o_proj.forward(&y)
    }
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let act = swiglu(&self.gate_proj.forward(x)?, &self.up_proj.forward(x)?)?;
        self.down_proj.forward(&act)
    }
}

/// Column or row split of a projection over the tensor-parallel group.
const COLUMN: usize = 0;
const ROW: usize = 1;

/// Loads tensors by name (this rank's shard under tensor parallelism) and registers the
/// trainable ones as [`Var`]s.
struct ParamLoader<'a, 'b> {
    weights: &'a SafetensorsWeights,
    opts: &'a LoadOptions<'b>,
    trainable: Vec<(String, Var)>,
    tp: Option<SharedCollective>,
    tp_rank: usize,
    tp_size: usize,
}

impl ParamLoader<'_, '_> {
    fn get(&mut self, name: &str, shape: impl Into<candle_core::Shape>) -> Result<Tensor> {
        let t = self
            .weights
            .load(name, shape, self.opts.dtype, &self.opts.device)?;
        self.register(name, t)
    }

    /// This rank's part of `name` along `dim` (the whole tensor without tensor parallelism).
    fn get_shard(
        &mut self,
        name: &str,
        full: impl Into<candle_core::Shape>,
        dim: usize,
    ) -> Result<Tensor> {
        let part = crate::weights::ShardPart {
            dim,
            index: self.tp_rank,
            parts: self.tp_size,
        };
        let t = self
            .weights
            .load_shard(name, full, part, self.opts.dtype, &self.opts.device)?;
        self.register(name, t)
    }

    fn register(&mut self, name: &str, t: Tensor) -> Result<Tensor> {
        if (self.opts.trainable)(name) {
            let var = Var::from_tensor(&t)?;
            let t = var.as_tensor().clone();
            self.trainable.push((name.to_string(), var));
            Ok(t)
        } else {
            Ok(t)
        }
    }

    /// A projection split as `split` says (COLUMN: its output rows; ROW: its input columns).
    fn linear(
        &mut self,
        prefix: &str,
        out_dim: usize,
        in_dim: usize,
        split: usize,
    ) -> Result<Box<dyn Linear>> {
        let name = format!("{prefix}.weight");
        let w = self.get_shard(&name, (out_dim, in_dim), split)?;
        let placement = match (&self.tp, split) {
            (None, _) => Placement::Whole,
            (Some(g), COLUMN) => Placement::Column(g.clone()),
            (Some(g), _) => Placement::Row(g.clone()),
        };
        // A rank quantizes its own shard: NF4's blocks run over the shard's elements.
        let w = match self.opts.quantize_base {
            Quantization::Nf4 if !(self.opts.trainable)(&name) => BaseWeight::Nf4(Arc::new(
                Nf4Weight::quantize(&w).with_context(|| format!("quantizing {name} to NF4"))?,
            )),
            _ => BaseWeight::Tensor(w),
        };
        (self.opts.linear_hook)(prefix, Dense::new(w), &placement)
            .with_context(|| format!("layer {prefix}"))
    }
}

/// Map from trainable parameter name to its tensor, e.g. for gradient lookup.
pub fn param_map(model: &Llama) -> HashMap<String, Tensor> {
    model
        .trainable_params()
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect()
}
