//! A Llama decoder layer as one op with a hand-written backward.
//!
//! Built from the same functions as the layer written op by op (RMSNorm, the projections,
//! [`crate::rope_attention`], SwiGLU), but candle's graph holds one node for the whole layer.
//! candle's backward adds every edge's gradient into a fresh zero tensor: a zero fill and an
//! add over an activation per edge, about twenty per layer. Here the gradients of projections
//! that share an input are summed as they are made, the norms and SwiGLU are recomputed from
//! the layer's input, the residual and the gate/up outputs instead of kept (SwiGLU's output in
//! the same pass as its backward, which comes first: the down projection's input gradient does
//! not read it).
//!
//! Under tensor parallelism the same op runs on every rank of the group with that rank's
//! shards, split as Megatron splits the layer: q/k/v/gate/up by output features (whole
//! input, this rank's heads and intermediate features), o/down by input features (their
//! partial products summed over the group). The collectives sit where Megatron's `f` and `g`
//! would (collective.rs): after o and down in the forward, after the column-parallel groups'
//! input gradients in the backward. Under sequence parallelism (sequence_parallel.rs) the
//! residual stream between them holds this rank's chunk of the tokens: those all-reduces
//! become reduce-scatters, and the norms' outputs (and the output gradient, for o and down)
//! are all-gathered where a projection reads every token.

use candle_core::{Result, Tensor};
use helix_kernels::dropout::DropoutMask;
use helix_kernels::{rms_norm_backward, swiglu_backward, swiglu_backward_and_output};

use crate::attention::{AttentionMask, RopeAttention};
use crate::backward::with_backward_n;
use crate::collective::SharedCollective;
use crate::linear::{BaseWeight, LowRank};
use crate::sequence_parallel::RowShard;
use crate::{rms_norm, swiglu};

/// One projection of a [`decoder_layer`].
#[derive(Clone)]
pub enum Projection {
    /// `x Wᵀ`, W [out, in]; W trains when it is a tracked tensor (full SFT). An NF4 W
    /// (QLoRA's frozen base) is dequantized where a product reads it.
    Dense { weight: BaseWeight },
    /// `x Wᵀ + s · (x Aᵀ) Bᵀ` with W frozen and f32 adapters A [r, in], B [out, r], as
    /// [`crate::lora_linear`] computes it; with `dropout` = (p, key), x dropped before A (in
    /// f32, as PEFT's `lora_dropout` feeds `lora_A`) under the mask of `key`
    /// ([`crate::dropout`]'s), which the LoRA kernels apply as they read x, and again to A's
    /// gradient and the input's in the backward.
    Lora {
        weight: BaseWeight,
        a: Tensor,
        b: Tensor,
        scaling: f64,
        dropout: Option<(f64, u64)>,
    },
}

/// The weights of one decoder layer, by their Hugging Face names.
pub struct DecoderWeights {
    pub input_layernorm: Tensor,
    pub post_attention_layernorm: Tensor,
    pub q_proj: Projection,
    pub k_proj: Projection,
    pub v_proj: Projection,
    pub o_proj: Projection,
    pub gate_proj: Projection,
    pub up_proj: Projection,
    pub down_proj: Projection,
    /// (query heads, key/value heads) of this rank.
    pub heads: (usize, usize),
    pub rms_norm_eps: f64,
    /// The group whose ranks split this layer, each holding its shards above (a LoRA
    /// projection's adapters split with its weight: B's rows under q/k/v/gate/up, A's columns
    /// under o/down, the other adapter whole); `None` when one rank holds the whole layer.
    pub tensor_parallel: Option<SharedCollective>,
    /// Under tensor parallelism, whether the layer's input and output are this rank's chunk
    /// of the tokens ([`crate::RowShard`]: sequence parallelism) instead of all of them.
    pub sequence_parallel: bool,
}

/// `x + attn(norm(x))`, then `h + mlp(norm(h))`, for hidden states x [B, S, H], the rotary
/// tables cos / sin [B, 1, S, D] and the attention's mask ([`crate::AttentionMask`]). Under
/// sequence parallelism x is this rank's chunk [chunk, H] of the tokens' rows [B·S, H], and
/// so is the output.
///
/// The gradients equal those of the layer composed op by op, as candle's autograd takes them
/// (tests in layer_tests.rs), for the layer's input and for every tracked tensor among the weights:
/// the adapters under LoRA, every weight under full SFT.
pub fn decoder_layer(
    x: &Tensor,
    w: &DecoderWeights,
    (cos, sin): (&Tensor, &Tensor),
    mask: &AttentionMask,
) -> Result<Tensor> {
    let (b, s) = (cos.dim(0)?, cos.dim(2)?);
    let rows = b * s;
    let h = x.dim(candle_core::D::Minus1)?;
    let eps = w.rms_norm_eps;
    let stream = Stream::new(w, rows);
    let (local, out_shape) = match &stream {
        Stream::Sharded(_, shard) => (shard.chunk, vec![shard.chunk, h]),
        _ => (rows, vec![b, s, h]),
    };
    if x.dims() != out_shape.as_slice() {
        candle_core::bail!(
            "decoder layer: input {:?}, expected {out_shape:?} for {b} × {s} tokens",
            x.dims()
        );
    }
    // The op's inputs: x, the two norms, then each projection's trainable tensors.
    let mut inputs = vec![
        x.clone(),
        w.input_layernorm.clone(),
        w.post_attention_layernorm.clone(),
    ];
    let [q, k, v, o, gate, up, down] = [
        &w.q_proj,
        &w.k_proj,
        &w.v_proj,
        &w.o_proj,
        &w.gate_proj,
        &w.up_proj,
        &w.down_proj,
    ]
    .map(|p| Proj::new(p, &mut inputs));
    let (q, k, v, o, gate, up, down) = (q?, k?, v?, o?, gate?, up?, down?);
    // This rank's part of the residual stream, [local, H].
    let x = x.detach().reshape((local, h))?;
    let norm1 = w.input_layernorm.detach();
    let norm2 = w.post_attention_layernorm.detach();

    // Attention.
    let xn1 = stream.whole(&rms_norm(&x, &norm1, eps)?)?;
    let mut qkv = forward_group(&[&q, &k, &v], &xn1)?.into_iter();
    drop(xn1);
    let (qy, low_q) = qkv.next().expect("three outputs");
    let (ky, low_k) = qkv.next().expect("three outputs");
    let (vy, low_v) = qkv.next().expect("three outputs");
    let width = |t: &Tensor| t.dim(1);
    let (q_w, kv_w) = (width(&qy)?, width(&ky)?);
    let (attn_y, attention) = RopeAttention::forward(
        (
            &qy.reshape((b, s, q_w))?,
            &ky.reshape((b, s, kv_w))?,
            &vy.reshape((b, s, kv_w))?,
        ),
        (cos, sin),
        mask,
        w.heads,
    )?;
    drop((qy, ky, vy));
    let (x1, low_o) = forward_onto(&o, &attn_y.reshape((rows, q_w))?, &x, &stream)?;

    // MLP.
    let xn2 = stream.whole(&rms_norm(&x1, &norm2, eps)?)?;
    let mut gu = forward_group(&[&gate, &up], &xn2)?.into_iter();
    drop(xn2);
    let (gate_y, low_gate) = gu.next().expect("two outputs");
    let (up_y, low_up) = gu.next().expect("two outputs");
    let (y, low_down) = forward_onto(&down, &swiglu(&gate_y, &up_y)?, &x1, &stream)?;
    let y = y.reshape(out_shape.as_slice())?;

    with_backward_n(&inputs, y, move |dy, need| {
        let mut grads: Vec<Option<Tensor>> = vec![None; need.len()];
        let dy = dy.contiguous()?.reshape((local, h))?;

        // MLP: down's input gradient, SwiGLU's backward (its output recomputed in the same
        // pass when down's weight or adapters want it), down's own gradients, then gate and
        // up, the second norm. down and o are row-parallel: their input gradients are this
        // rank's columns as they come, with no collective (each reads the whole output
        // gradient: under sequence parallelism, gathered from the chunks).
        let dy_whole = stream.whole(&dy)?;
        let down_group = [(&down, &dy_whole, &low_down)];
        let (d_act, down_dlow) = input_grads(&down_group, true)?;
        let d_act = d_act.expect("asked for");
        let (d_gate, d_up) = match down.trains(need) {
            true => {
                let (d_gate, d_up, act) = swiglu_backward_and_output(&gate_y, &up_y, &d_act)?;
                param_grads(
                    &down_group,
                    &down_dlow,
                    &|| Ok(act.clone()),
                    need,
                    &mut grads,
                )?;
                (d_gate, d_up)
            }
            false => swiglu_backward(&gate_y, &up_y, &d_act)?,
        };
        drop((d_act, down_dlow, dy_whole));
        // The second norm's output, recomputed only where a weight or adapter reads it.
        let xn2 = || stream.whole(&rms_norm(&x1, &norm2, eps)?);
        let d_xn2 = backward_group(
            &[(&gate, &d_gate, &low_gate), (&up, &d_up, &low_up)],
            &xn2,
            true,
            (need, &mut grads),
            &stream,
        )?
        .expect("asked for");
        drop((d_gate, d_up));
        let (d_x1, d_norm2) = rms_norm_backward(&x1, &norm2, &d_xn2, eps, need[2])?;
        grads[2] = stream.norm_grad(d_norm2)?;
        let d_x1 = (dy + d_x1)?;

        // Attention: o, attention itself, q / k / v, the first norm. o is row-parallel: its
        // input gradient is this rank's columns, summed over nothing.
        let attn_out = || attention.output().reshape((rows, q_w));
        let d_attn = backward_group(
            &[(&o, &stream.whole(&d_x1)?, &low_o)],
            &attn_out,
            true,
            (need, &mut grads),
            &Stream::Whole,
        )?
        .expect("asked for");
        let (dq, dk, dv) = attention.backward(&d_attn.reshape((b, s, q_w))?)?;
        drop(d_attn);
        let need_xn1 = need[0] || need[1];
        let xn1 = || stream.whole(&rms_norm(&x, &norm1, eps)?);
        let d_xn1 = backward_group(
            &[
                (&q, &dq.reshape((rows, q_w))?, &low_q),
                (&k, &dk.reshape((rows, kv_w))?, &low_k),
                (&v, &dv.reshape((rows, kv_w))?, &low_v),
            ],
            &xn1,
            need_xn1,
            (need, &mut grads),
            &stream,
        )?;
        if let Some(d_xn1) = d_xn1 {
            let (d_x, d_norm1) = rms_norm_backward(&x, &norm1, &d_xn1, eps, need[1])?;
            grads[1] = stream.norm_grad(d_norm1)?;
            if need[0] {
                grads[0] = Some((d_x1 + d_x)?.reshape(out_shape.as_slice())?);
            }
        }
        Ok(grads)
    })
}

/// Where the layer's residual stream lives, and how the partial sums of a split layer meet:
/// the row-parallel outputs (o, down) and the column-parallel groups' input gradients.
enum Stream {
    /// One rank holds the whole layer.
    Whole,
    /// Tensor parallelism: every rank holds every token; partial sums are all-reduced.
    Replicated(SharedCollective),
    /// Sequence parallelism: every rank holds its chunk of the tokens; partial sums are
    /// reduce-scattered into the chunks, and the chunks all-gathered where a projection
    /// reads the whole input.
    Sharded(SharedCollective, RowShard),
}

impl Stream {
    fn new(w: &DecoderWeights, rows: usize) -> Self {
        match w.tensor_parallel.clone().filter(|g| g.size() > 1) {
            None => Stream::Whole,
            Some(g) if w.sequence_parallel => {
                let shard = RowShard::new(rows, &g);
                Stream::Sharded(g, shard)
            }
            Some(g) => Stream::Replicated(g),
        }
    }

    /// t summed over the group, whole on every rank: the sums every rank needs whole (LoRA's
    /// rank-r activations and their gradients, which have r columns).
    fn sum_whole(&self, t: Tensor) -> Result<Tensor> {
        match self {
            Stream::Whole => Ok(t),
            Stream::Replicated(g) | Stream::Sharded(g, _) => g.all_reduce_sum(&t),
        }
    }

    /// All the tokens' rows [rows, n] from this rank's part of the stream.
    fn whole(&self, local: &Tensor) -> Result<Tensor> {
        match self {
            Stream::Sharded(g, shard) => shard.gather(g, local),
            _ => Ok(local.clone()),
        }
    }

    /// This rank's rows of a tensor every rank holds whole.
    fn local_of(&self, whole: &Tensor) -> Result<Tensor> {
        match self {
            Stream::Sharded(_, shard) => shard.take(whole),
            _ => Ok(whole.clone()),
        }
    }

    /// This rank's part of the group's sum of partial sums [rows, n].
    fn sum_to_local(&self, partial: Tensor) -> Result<Tensor> {
        match self {
            Stream::Whole => Ok(partial),
            Stream::Replicated(g) => g.all_reduce_sum(&partial),
            Stream::Sharded(g, shard) => shard.reduce_scatter(g, &partial),
        }
    }

    /// A norm weight's gradient from this rank's part of the stream: under sequence
    /// parallelism each rank saw only its tokens, so the parts are summed.
    fn norm_grad(&self, g: Option<Tensor>) -> Result<Option<Tensor>> {
        match (self, g) {
            (Stream::Sharded(group, _), Some(g)) => Ok(Some(group.all_reduce_sum(&g)?)),
            (_, g) => Ok(g),
        }
    }
}

/// A projection of the layer, detached, with where its trainable tensors sit among the op's
/// inputs.
struct Proj {
    weight: BaseWeight,
    /// The index of W (Dense) among the op's inputs.
    weight_at: Option<usize>,
    lora: Option<(LowRank, usize, usize)>,
    /// The mask of the LoRA path's dropout, between x and A.
    dropout: Option<DropoutMask>,
}

impl Proj {
    fn new(p: &Projection, inputs: &mut Vec<Tensor>) -> Result<Self> {
        let mut push = |t: &Tensor| {
            inputs.push(t.clone());
            inputs.len() - 1
        };
        Ok(match p {
            Projection::Dense { weight } => Proj {
                weight: weight.detach(),
                weight_at: weight.as_tensor().map(&mut push),
                lora: None,
                dropout: None,
            },
            Projection::Lora {
                weight,
                a,
                b,
                scaling,
                dropout,
            } => {
                let (a_at, b_at) = (push(a), push(b));
                let dropout = match dropout {
                    Some((p, key)) => DropoutMask::new(*p, *key)?,
                    None => None,
                };
                Proj {
                    weight: weight.detach(),
                    weight_at: None,
                    lora: Some((LowRank::new(a, b, *scaling)?, a_at, b_at)),
                    dropout,
                }
            }
        })
    }

    /// Whether any of this projection's tensors wants a gradient.
    fn trains(&self, need: &[bool]) -> bool {
        self.weight_at.is_some_and(|at| need[at])
            || self
                .lora
                .as_ref()
                .is_some_and(|(_, a_at, b_at)| need[*a_at] || need[*b_at])
    }
}

/// The outputs [rows, out] of projections that read the same x [rows, in], with each LoRA
/// path's scaled rank-r activation.
fn forward_group(projs: &[&Proj], x: &Tensor) -> Result<Vec<(Tensor, Option<Tensor>)>> {
    projs
        .iter()
        .map(|p| {
            let y = x.matmul(&p.weight.tensor()?.t()?)?;
            match &p.lora {
                Some((adapter, ..)) => {
                    let low = adapter.low(x, p.dropout.as_ref())?;
                    Ok((adapter.add_to(&y, &low)?, Some(low)))
                }
                None => Ok((y, None)),
            }
        })
        .collect()
}

/// `residual + p(x)` for x [rows, in] and this rank's part of the residual stream [local,
/// out], the sum made with the LoRA update's (one pass, not two), and the LoRA path's scaled
/// rank-r activation [rows, r]. With a row-parallel split, x and W hold this rank's input
/// features: the partial x Wᵀ is summed over the group into this rank's part of the stream,
/// and the partial x Aᵀ over the group whole (B is whole on every rank).
fn forward_onto(
    p: &Proj,
    x: &Tensor,
    residual: &Tensor,
    stream: &Stream,
) -> Result<(Tensor, Option<Tensor>)> {
    let y = stream.sum_to_local(x.matmul(&p.weight.tensor()?.t()?)?)?;
    match &p.lora {
        Some((adapter, ..)) => {
            let low = stream.sum_whole(adapter.low(x, p.dropout.as_ref())?)?;
            let out = adapter.add_onto(residual, &y, &stream.local_of(&low)?)?;
            Ok((out, Some(low)))
        }
        None => Ok(((residual + y)?, None)),
    }
}

/// The backward of projections that read the same x [rows, in], given each one's output
/// gradient [rows, out] and forward rank-r activation: their trainable tensors' gradients go
/// into `grads` where `need` asks (x, made by `x` only where one of them reads it), and the
/// gradient of x, summed over the projections, is returned when `need_x`.
///
/// With a column-parallel split each rank holds some of the projections' output features, so
/// what it computes of x's gradient and of each d(x Aᵀ) is a partial sum over them: x's is
/// summed into this rank's part of the `stream` (Megatron's `f` backward, or under sequence
/// parallelism the reduce-scatter that follows its all-gather), each d(x Aᵀ) over the whole
/// group. x's partial gradient may take the partial d(x Aᵀ) A, since A is whole on every rank
/// and the sum is linear; A's gradient needs the summed d(x Aᵀ). A row-parallel group
/// passes [`Stream::Whole`]: its sums are whole already.
fn backward_group(
    group: &[Member<'_>],
    x: &dyn Fn() -> Result<Tensor>,
    need_x: bool,
    (need, grads): (&[bool], &mut [Option<Tensor>]),
    stream: &Stream,
) -> Result<Option<Tensor>> {
    let (dx, mut dlows) = input_grads(group, need_x)?;
    let dx = dx.map(|dx| stream.sum_to_local(dx)).transpose()?;
    for ((p, ..), dlow) in group.iter().zip(&mut dlows) {
        let a_trains = p.lora.as_ref().is_some_and(|(_, a_at, _)| need[*a_at]);
        if let (true, Some(d)) = (a_trains, dlow.as_mut()) {
            *d = stream.sum_whole(d.clone())?;
        }
    }
    param_grads(group, &dlows, x, need, grads)?;
    Ok(dx)
}

/// A projection in a backward group, its output gradient and its forward rank-r activation.
type Member<'a> = (&'a Proj, &'a Tensor, &'a Option<Tensor>);

/// The half of [`backward_group`] that does not read x: each LoRA member's d(x Aᵀ) (`None`
/// for a dense one), and x's gradient summed over the group when `need_x`.
fn input_grads(
    group: &[Member<'_>],
    need_x: bool,
) -> Result<(Option<Tensor>, Vec<Option<Tensor>>)> {
    let mut dx: Option<Tensor> = None;
    let mut dlows = Vec::with_capacity(group.len());
    for &(p, dy, _) in group {
        let dlow = match &p.lora {
            Some((adapter, ..)) => Some(adapter.dlow(dy)?),
            None => None,
        };
        if need_x {
            // This projection's part, added to the group's sum so far in the same pass (the
            // LoRA part through dropout's mask, which lies between x and A).
            let base = dy.matmul(&p.weight.tensor()?)?;
            let mask = p.dropout.as_ref();
            dx = Some(match (&p.lora, &dlow, dx.take()) {
                (Some((adapter, ..)), Some(dlow), Some(acc)) => {
                    adapter.add_input_grad_onto(&acc, &base, dlow, mask)?
                }
                (Some((adapter, ..)), Some(dlow), None) => {
                    adapter.add_input_grad(&base, dlow, mask)?
                }
                (_, _, Some(acc)) => (acc + base)?,
                (_, _, None) => base,
            });
        }
        dlows.push(dlow);
    }
    Ok((dx, dlows))
}

/// The half of [`backward_group`] that reads x: the trainable tensors' gradients, W's dyᵀ x
/// and the adapters', from [`input_grads`]' d(x Aᵀ). x is made by `x` the first time a W or
/// an A that trains reads it, and not at all where none does.
fn param_grads(
    group: &[Member<'_>],
    dlows: &[Option<Tensor>],
    x: &dyn Fn() -> Result<Tensor>,
    need: &[bool],
    grads: &mut [Option<Tensor>],
) -> Result<()> {
    let mut made: Option<Tensor> = None;
    let mut read_x = || -> Result<Tensor> {
        if made.is_none() {
            made = Some(x()?);
        }
        Ok(made.clone().expect("just made"))
    };
    for (&(p, dy, low), dlow) in group.iter().zip(dlows) {
        if let Some(at) = p.weight_at.filter(|&at| need[at]) {
            // W [out, in] gets dyᵀ x.
            grads[at] = Some(dy.t()?.matmul(&read_x()?)?);
        }
        if let (Some((adapter, a_at, b_at)), Some(low), Some(dlow)) = (&p.lora, low, dlow) {
            let x = match need[*a_at] {
                true => Some(read_x()?),
                false => None,
            };
            let x_a = x.as_ref().map(|x| (x, p.dropout.as_ref()));
            let (da, db) = adapter.adapter_grads(dy, low, dlow, x_a, need[*b_at])?;
            grads[*a_at] = da;
            grads[*b_at] = db;
        }
    }
    Ok(())
}
