//! Causal self-attention with grouped-query heads, padding and packed-sequence masks.

use candle_core::{DType, Device, Result, Tensor, D};

use helix_kernels::attention_softmax as softmax;
use helix_kernels::flash::Segments;

use crate::backward::with_backward3;
use crate::softmax_last_dim;

/// What a query may see, described on the host: causal order, key padding and document
/// (segment) boundaries of packed rows. Turned into an additive bias by [`attention_bias`].
#[derive(Debug, Clone, Default)]
pub struct MaskSpec {
    pub batch: usize,
    pub q_len: usize,
    pub kv_len: usize,
    /// Index among the keys of the first query (the KV-cache length during generation).
    pub q_offset: usize,
    /// `batch * kv_len` flags, 1 for a real key, 0 for padding; `None` means all real.
    pub key_valid: Option<Vec<u8>>,
    /// `batch * kv_len` document ids of packed rows; attention never crosses documents.
    pub segment_ids: Option<Vec<u32>>,
}

impl MaskSpec {
    /// An error naming `key_valid` or `segment_ids` when either does not hold one entry per
    /// key of every row.
    fn check_lengths(&self) -> Result<()> {
        let want = self.batch * self.kv_len;
        for (what, n) in [
            ("key_valid", self.key_valid.as_ref().map(|v| v.len())),
            ("segment_ids", self.segment_ids.as_ref().map(|v| v.len())),
        ] {
            if let Some(n) = n.filter(|&n| n != want) {
                candle_core::bail!("attention mask: {what} has {n} entries, expected {want}");
            }
        }
        Ok(())
    }
}

/// Additive attention bias [B, 1, q_len, kv_len] in `dtype`: 0 where attention is allowed, the
/// dtype's most negative finite value where not (finite, as transformers does, so that a fully
/// masked padding row gives a uniform softmax rather than NaN).
pub fn attention_bias(spec: &MaskSpec, dtype: DType, device: &Device) -> Result<Tensor> {
    let (b, q, k) = (spec.batch, spec.q_len, spec.kv_len);
    spec.check_lengths()?;
    let blocked = match dtype {
        DType::BF16 => half::bf16::MIN.to_f32(),
        DType::F16 => half::f16::MIN.to_f32(),
        _ => f32::MIN,
    };
    let mut bias = vec![0f32; b * q * k];
    for bi in 0..b {
        for qi in 0..q {
            let q_abs = spec.q_offset + qi;
            for ki in 0..k {
                let mut ok = ki <= q_abs;
                if let Some(valid) = &spec.key_valid {
                    ok &= valid[bi * k + ki] != 0;
                }
                if let (Some(seg), true) = (&spec.segment_ids, q_abs < k) {
                    ok &= seg[bi * k + ki] == seg[bi * k + q_abs];
                }
                if !ok {
                    bias[(bi * q + qi) * k + ki] = blocked;
                }
            }
        }
    }
    Tensor::from_vec(bias, (b, 1, q, k), device)?.to_dtype(dtype)
}

/// Repeats each of the `n_kv` heads of x [B, n_kv, S, D] `n_rep` times (grouped-query attention).
pub fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, n_kv, s, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, n_kv, n_rep, s, d))?
        .reshape((b, n_kv * n_rep, s, d))
}

/// softmax(q kᵀ / sqrt(d) + bias) v for q [B, Hq, S, D], k and v [B, Hkv, Skv, D], Hq a
/// multiple of Hkv, bias from [`attention_bias`] (causal: query i sees keys up to
/// Skv − S + i). Returns [B, Hq, S, D].
///
/// Computed the FlashAttention-2 way at the level of whole matmuls: query rows go in chunks, so
/// the S × S scores are never held for more than one chunk, and only the output and each row's
/// softmax statistics (max, Σ exp) are kept for the backward, which recomputes the chunk's
/// probabilities from them.
/// A chunk reads only the keys its last query can see, and grouped-query heads share their KV
/// head without copies. So the graph keeps q, k, v and the output per layer instead of several
/// S × S tensors. [`plain_causal_attention`] is the same function written with candle's
/// autograd: its reference in the tests.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let dims = Chunking::of(q, k, bias, None)?;
    chunked_attention(dims, q, k, v, bias)
}

/// [`causal_attention`] in chunks of `rows` query rows (the tests cut small inputs into many).
#[cfg(test)]
pub(crate) fn causal_attention_in_chunks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    rows: usize,
) -> Result<Tensor> {
    let dims = Chunking::of(q, k, bias, Some(rows))?;
    chunked_attention(dims, q, k, v, bias)
}

fn chunked_attention(
    dims: Chunking,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
) -> Result<Tensor> {
    let q_ = q.detach().contiguous()?;
    let k_ = k.detach().contiguous()?;
    let v_ = v.detach().contiguous()?;
    let bias = bias.detach();
    let (out, stats) = dims.forward((&q_, &k_, &v_), &bias)?;
    let saved = out.clone();
    with_backward3((q, k, v), out, move |dout, _| {
        let (dq, dk, dv) = dims.backward((&q_, &k_, &v_), &bias, &saved, &stats, dout)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    })
}

/// Which attention a self-attention over whole sequences runs (`model.attention`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttentionKernel {
    /// FlashAttention where its CUDA kernels run (a GPU, bf16 or f16, head_dim 64 or 128),
    /// else the chunked matmuls. Not the CPU's tiles by default: their f32 adapter gradients on
    /// SmolLM2 are 1.0e-4 to 1.6e-4 from f64 where the chunked matmuls' are 6.8e-5 to 8.8e-5
    /// (PEFT's f32, 6.4e-5), over the peft_parity test's 1e-4 bound (kernels/README.md).
    #[default]
    Auto,
    /// The FlashAttention kernels always (on the CPU its tiled kernel, faster than the chunked
    /// matmuls): an error on a GPU where they cannot run.
    Flash,
    /// The chunked matmuls always ([`causal_attention`]).
    Chunked,
}

impl AttentionKernel {
    /// The kernel named `auto`, `flash` or `chunked`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "auto" => Some(Self::Auto),
            "flash" => Some(Self::Flash),
            "chunked" => Some(Self::Chunked),
            _ => None,
        }
    }

    /// Whether a model on `device` in `dtype` with `head_dim` attends with FlashAttention (its
    /// masks are then segment ids); an error when `Flash` is asked where its kernels cannot run.
    pub fn uses_flash(self, device: &Device, dtype: DType, head_dim: usize) -> Result<bool> {
        let on_gpu = helix_kernels::flash::runs_on_gpu(device, dtype, head_dim);
        match self {
            Self::Auto => Ok(on_gpu),
            Self::Chunked => Ok(false),
            Self::Flash if on_gpu || device.is_cpu() => Ok(true),
            Self::Flash => candle_core::bail!(
                "FlashAttention on {device:?} takes bf16 or f16 with head_dim in {:?} (this \
                 model: {dtype:?}, head_dim {head_dim}{})",
                helix_kernels::flash::GPU_HEAD_DIMS,
                match cfg!(feature = "cuda") {
                    true => "",
                    false => "; this build has no CUDA kernels",
                }
            ),
        }
    }
}

/// The mask of a self-attention over whole sequences (training, scoring), in the form the
/// attention that reads it takes.
#[derive(Clone, Debug)]
pub enum AttentionMask {
    /// The additive bias [B, 1, S, S] of [`attention_bias`]: what the chunked attention
    /// ([`causal_attention`]) adds to its scores.
    Bias(Tensor),
    /// Each token's document id [B, S] (u32), padding a document of its own (`u32::MAX`): what
    /// the FlashAttention kernels read (`helix_kernels::flash`), which build the mask tile by
    /// tile. A padding query then sees the padding before it rather than the real keys; no real
    /// query sees padding either way, so the loss and every gradient are the same.
    Segments(Segments),
}

impl AttentionMask {
    /// The additive bias, when the mask is one.
    pub fn bias(&self) -> Option<&Tensor> {
        match self {
            Self::Bias(b) => Some(b),
            Self::Segments(_) => None,
        }
    }

    /// The mask of `spec`, which must describe self-attention (no KV cache), as segment ids
    /// when `flash`, else as a bias in `dtype`.
    pub fn new(spec: &MaskSpec, dtype: DType, device: &Device, flash: bool) -> Result<Self> {
        if !flash {
            return Ok(Self::Bias(attention_bias(spec, dtype, device)?));
        }
        let (b, s) = (spec.batch, spec.q_len);
        if spec.q_offset != 0 || spec.kv_len != s {
            candle_core::bail!(
                "attention mask: segments describe self-attention only (q_len {s}, kv_len {}, \
                 q_offset {})",
                spec.kv_len,
                spec.q_offset
            );
        }
        spec.check_lengths()?;
        let ids: Vec<u32> = (0..b * s)
            .map(
                |i| match spec.key_valid.as_ref().is_some_and(|v| v[i] == 0) {
                    true => u32::MAX,
                    false => spec.segment_ids.as_ref().map_or(0, |seg| seg[i]),
                },
            )
            .collect();
        Ok(Self::Segments(Segments::new(ids, b, device)?))
    }
}

/// The attention of a decoder layer as one op, from the projections to the input of the
/// output projection: q [B, S, Hq·D], k and v [B, S, Hkv·D] as the projections return them are
/// split into heads, q and k rotated ([`crate::apply_rope`] with cos / sin [B, 1, S, D]),
/// attended (chunked, [`causal_attention`], under a bias mask; FlashAttention,
/// `helix_kernels::flash`, under a segment mask) and the heads merged: [B, S, Hq·D].
///
/// The same values as those steps one by one, but candle's graph holds one node instead of
/// about fourteen (reshapes, transposes, copies, two rotations), and its backward adds every
/// node's gradient into a fresh zero tensor: a full pass over an activation per node. The
/// backward rotates dq and dk back with −sin (RoPE's transpose: cos and sin repeat over the two
/// halves), which gives the step-by-step gradients to the bit on SmolLM2.
pub fn rope_attention(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    (cos, sin): (&Tensor, &Tensor),
    mask: &AttentionMask,
    heads: (usize, usize),
) -> Result<Tensor> {
    let (y, saved) = RopeAttention::forward((q, k, v), (cos, sin), mask, heads)?;
    with_backward3((q, k, v), y, move |dy, _| {
        let (dq, dk, dv) = saved.backward(dy)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    })
}

/// What [`rope_attention`]'s backward keeps from its forward: the rotated q and k and v split
/// into heads, the merged output and what the attention's own backward needs. A layer
/// differentiated by hand (`crate::decoder_layer`) holds one of these per layer.
pub(crate) struct RopeAttention {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// [B, S, Hq·D], as the output projection reads it; the backward views it as heads.
    y: Tensor,
    cos: Tensor,
    sin: Tensor,
    kernel: Saved,
}

/// The attention's own saved state, by the form it ran in.
enum Saved {
    /// Each row's softmax statistics (max, Σ exp) [B, Hq, S, 2] and the bias.
    Chunked {
        stats: Tensor,
        bias: Tensor,
        dims: Chunking,
    },
    /// Each row's log-sum-exp [B, Hq, S] and the segment ids.
    Flash { lse: Tensor, segments: Segments },
}

impl RopeAttention {
    /// The merged output [B, S, Hq·D] of q [B, S, Hq·D], k and v [B, S, Hkv·D] (tracked or
    /// not: nothing is recorded), and what the backward needs.
    pub(crate) fn forward(
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        (cos, sin): (&Tensor, &Tensor),
        mask: &AttentionMask,
        (q_heads, kv_heads): (usize, usize),
    ) -> Result<(Tensor, Self)> {
        let (b, s, width) = q.dims3()?;
        if q_heads == 0 || width % q_heads != 0 {
            candle_core::bail!("attention: width {width} is not a multiple of {q_heads} heads");
        }
        let d = width / q_heads;
        let heads = |t: &Tensor, n: usize| t.detach().reshape((b, s, n, d))?.transpose(1, 2);
        let (cos, sin) = (cos.detach(), sin.detach());
        // RoPE reads the projections' heads in place and writes them heads first.
        let q = crate::apply_rope(&heads(q, q_heads)?, &cos, &sin)?;
        let k = crate::apply_rope(&heads(k, kv_heads)?, &cos, &sin)?;
        let (y, v, kernel) = match mask {
            AttentionMask::Segments(segments) => {
                // The kernels read v as a view of the projection; the output comes merged.
                let v = heads(v, kv_heads)?;
                let (out, lse) = helix_kernels::flash::attention(&q, &k, &v, segments)?;
                let y = out.reshape((b, s, q_heads * d))?;
                let segments = segments.clone();
                (y, v, Saved::Flash { lse, segments })
            }
            AttentionMask::Bias(bias) => {
                let v = heads(v, kv_heads)?.contiguous()?;
                let bias = bias.detach();
                let dims = Chunking::of(&q, &k, &bias, None)?;
                let (out, stats) = dims.forward((&q, &k, &v), &bias)?;
                let y = out.transpose(1, 2)?.reshape((b, s, q_heads * d))?;
                (y, v, Saved::Chunked { stats, bias, dims })
            }
        };
        let saved = Self {
            q,
            k,
            v,
            y: y.clone(),
            cos,
            sin,
            kernel,
        };
        Ok((y, saved))
    }

    /// The merged output [B, S, Hq·D] the forward returned.
    pub(crate) fn output(&self) -> &Tensor {
        &self.y
    }

    /// dq, dk, dv ([B, S, H·D] each, as the forward's inputs) from the merged output's
    /// gradient. dq and dk are rotated back with −sin (RoPE's transpose: cos and sin repeat
    /// over the two halves).
    pub(crate) fn backward(&self, dy: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, q_heads, s, d) = self.q.dims4()?;
        let merge = |t: &Tensor| {
            let n = t.dim(1)?;
            t.transpose(1, 2)?.reshape((b, s, n * d))
        };
        let (dq, dk, dv) = match &self.kernel {
            Saved::Flash { lse, segments } => {
                let merged = |t: &Tensor| t.reshape((b, s, q_heads, d));
                helix_kernels::flash::attention_backward(
                    (&self.q, &self.k, &self.v),
                    segments,
                    (&merged(&self.y)?, lse),
                    &merged(dy)?,
                )?
            }
            Saved::Chunked { stats, bias, dims } => {
                let heads = |t: &Tensor| t.reshape((b, s, q_heads, d))?.transpose(1, 2);
                dims.backward(
                    (&self.q, &self.k, &self.v),
                    bias,
                    &heads(&self.y)?,
                    stats,
                    &heads(dy)?.contiguous()?,
                )?
            }
        };
        // Rotated back and written heads merged, as the projections' backward reads them.
        let neg_sin = self.sin.neg()?;
        let unrotate = |g: Tensor| {
            let n = g.dim(1)?;
            helix_kernels::rope_merging_heads(&g, &self.cos, &neg_sin)?.reshape((b, s, n * d))
        };
        Ok((unrotate(dq)?, unrotate(dk)?, merge(&dv)?))
    }
}

/// How [`causal_attention`] cuts one call into query chunks.
#[derive(Debug, Clone, Copy)]
struct Chunking {
    batch: usize,
    q_heads: usize,
    kv_heads: usize,
    q_len: usize,
    kv_len: usize,
    head_dim: usize,
    /// Query rows per chunk.
    rows: usize,
}

/// Score elements per chunk (all heads): 64 Mi, 256 MiB per f32 score-sized tensor (Llama 2 7B
/// at 2048 tokens: 1024 query rows, two chunks). Fewer, larger chunks launch fewer kernels.
const CHUNK_SCORES: usize = 1 << 26;

impl Chunking {
    fn of(q: &Tensor, k: &Tensor, bias: &Tensor, rows: Option<usize>) -> Result<Self> {
        let (batch, q_heads, q_len, head_dim) = q.dims4()?;
        let (kb, kv_heads, kv_len, kd) = k.dims4()?;
        if kb != batch || kd != head_dim {
            candle_core::bail!("attention: q {:?} and k {:?} disagree", q.dims(), k.dims());
        }
        if kv_heads == 0 || q_heads % kv_heads != 0 {
            candle_core::bail!(
                "attention: {q_heads} query heads is not a multiple of {kv_heads} kv heads"
            );
        }
        if kv_len < q_len {
            candle_core::bail!("attention: {q_len} queries but only {kv_len} keys");
        }
        if bias.dims() != [batch, 1, q_len, kv_len] {
            candle_core::bail!(
                "attention: bias {:?}, expected {:?}",
                bias.dims(),
                [batch, 1, q_len, kv_len]
            );
        }
        let rows = rows
            .unwrap_or(CHUNK_SCORES / (batch * q_heads * kv_len).max(1))
            .clamp(1, q_len.max(1));
        Ok(Self {
            batch,
            q_heads,
            kv_heads,
            q_len,
            kv_len,
            head_dim,
            rows,
        })
    }

    /// (first row, rows) of each chunk.
    fn chunks(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.q_len)
            .step_by(self.rows)
            .map(|r0| (r0, self.rows.min(self.q_len - r0)))
    }

    /// The tensors of one chunk: its queries grouped under their KV head, the keys and values
    /// the chunk can see, its bias.
    fn chunk(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        bias: &Tensor,
        r0: usize,
        rows: usize,
    ) -> Result<Chunk> {
        // Causal: the chunk's last query, at key index kv_len − q_len + r0 + rows − 1, is the
        // last to see anything.
        let keys = self.kv_len - self.q_len + r0 + rows;
        Ok(Chunk {
            q: self.grouped(&q.narrow(2, r0, rows)?)?,
            k: k.narrow(2, 0, keys)?.contiguous()?,
            v: v.narrow(2, 0, keys)?.contiguous()?,
            bias: bias
                .narrow(2, r0, rows)?
                .narrow(3, 0, keys)?
                .to_dtype(q.dtype())?
                .contiguous()?,
            dims: *self,
            rows,
            keys,
        })
    }

    /// [B, Hq, n, X] → [B, Hkv, Hq/Hkv · n, X]: the query heads that share a KV head become
    /// rows of one matmul against it.
    fn grouped(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, n, last) = x.dims4()?;
        let rows = self.q_heads / self.kv_heads * n;
        x.contiguous()?
            .reshape((self.batch, self.kv_heads, rows, last))
    }

    /// The inverse of [`Self::grouped`].
    fn ungrouped(&self, x: &Tensor, n: usize) -> Result<Tensor> {
        x.reshape((self.batch, self.q_heads, n, x.dim(D::Minus1)?))
    }

    fn scale(&self) -> f64 {
        1.0 / (self.head_dim as f64).sqrt()
    }

    /// The output [B, Hq, S, D] and each row's softmax statistics (max, Σ exp) [B, Hq, S, 2]
    /// (f32), chunk by chunk.
    fn forward(&self, qkv: (&Tensor, &Tensor, &Tensor), bias: &Tensor) -> Result<(Tensor, Tensor)> {
        let (mut outs, mut all_stats) = (Vec::new(), Vec::new());
        for (r0, rows) in self.chunks() {
            let c = self.chunk(qkv, bias, r0, rows)?;
            let scores = c.scores()?;
            let stats = softmax::row_stats(&scores, &c.bias, self.scale())?;
            let probs = softmax::probs(&scores, &c.bias, &stats, self.scale())?;
            outs.push(c.times_values(&probs)?);
            all_stats.push(stats);
        }
        Ok((Tensor::cat(&outs, 2)?, Tensor::cat(&all_stats, 2)?))
    }

    /// dq, dk, dv from the output's gradient, chunk by chunk: the probabilities are rebuilt
    /// from the saved row statistics, and dk, dv are summed over chunks in f32.
    fn backward(
        &self,
        qkv: (&Tensor, &Tensor, &Tensor),
        bias: &Tensor,
        out: &Tensor,
        stats: &Tensor,
        dout: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let dtype = qkv.0.dtype();
        let dout = dout.contiguous()?;
        let kv_shape = (self.batch, self.kv_heads, self.kv_len, self.head_dim);
        let mut dk = Tensor::zeros(kv_shape, DType::F32, qkv.1.device())?;
        let mut dv = dk.clone();
        let mut dq = Vec::new();
        for (r0, rows) in self.chunks() {
            let c = self.chunk(qkv, bias, r0, rows)?;
            let p = softmax::probs(
                &c.scores()?,
                &c.bias,
                &stats.narrow(2, r0, rows)?,
                self.scale(),
            )?;
            let do_ = dout.narrow(2, r0, rows)?;
            // D_i = rowsum(dO ∘ O): softmax's backward term, from the output instead of P.
            let di = (do_.to_dtype(DType::F32)?
                * out.narrow(2, r0, rows)?.to_dtype(DType::F32)?)?
            .sum_keepdim(D::Minus1)?;
            let do_g = self.grouped(&do_)?;
            let p_g = self.grouped(&p)?;
            let dv_c = p_g.t()?.matmul(&do_g)?;
            let dp = self.ungrouped(&do_g.matmul(&c.v.t()?)?, rows)?;
            let ds_g = self.grouped(&softmax::softmax_grad(&p, &dp, &di, self.scale())?)?;
            dq.push(self.ungrouped(&ds_g.matmul(&c.k)?, rows)?);
            let dk_c = ds_g.t()?.matmul(&c.q)?;
            let pad = self.kv_len - c.keys;
            dk = (dk + dk_c.to_dtype(DType::F32)?.pad_with_zeros(2, 0, pad)?)?;
            dv = (dv + dv_c.to_dtype(DType::F32)?.pad_with_zeros(2, 0, pad)?)?;
        }
        Ok((
            Tensor::cat(&dq, 2)?,
            dk.to_dtype(dtype)?,
            dv.to_dtype(dtype)?,
        ))
    }
}

/// One query chunk of [`causal_attention`].
struct Chunk {
    /// [B, Hkv, Hq/Hkv · rows, D]
    q: Tensor,
    /// [B, Hkv, keys, D]
    k: Tensor,
    v: Tensor,
    /// [B, 1, rows, keys]
    bias: Tensor,
    dims: Chunking,
    rows: usize,
    keys: usize,
}

impl Chunk {
    /// q kᵀ in the inputs' dtype, [B, Hq, rows, keys]; the kernels of
    /// `helix_kernels::attention_softmax` scale it and add the bias.
    fn scores(&self) -> Result<Tensor> {
        self.dims
            .ungrouped(&self.q.matmul(&self.k.t()?)?, self.rows)
    }

    /// probs [B, Hq, rows, keys] times the values: [B, Hq, rows, D].
    fn times_values(&self, probs: &Tensor) -> Result<Tensor> {
        let p = self.dims.grouped(probs)?;
        self.dims.ungrouped(&p.matmul(&self.v)?, self.rows)
    }
}

/// [`causal_attention`] written plainly with candle's autograd (KV heads repeated, the whole
/// S × S scores kept): its reference.
pub fn plain_causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (_, hq, _, d) = q.dims4()?;
    let hkv = k.dim(1)?;
    if hq % hkv != 0 {
        candle_core::bail!("attention: {hq} query heads is not a multiple of {hkv} kv heads");
    }
    let k = repeat_kv(k, hq / hkv)?;
    let v = repeat_kv(v, hq / hkv)?;
    let scale = 1.0 / (d as f64).sqrt();
    let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
    let scores = scores.broadcast_add(bias)?;
    let probs = softmax_last_dim(&scores)?;
    probs.matmul(&v.contiguous()?)
}
