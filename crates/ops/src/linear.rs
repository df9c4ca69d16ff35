//! The projection `x Wᵀ` (W [out, in] as Hugging Face stores it).

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};

use helix_kernels::dropout::DropoutMask;
use helix_kernels::low_rank;
use helix_kernels::nf4::Nf4Weight;

use crate::backward::{with_backward, with_backward3};

/// `x Wᵀ` for x [..., in] and W [out, in].
///
/// When W is frozen (LoRA's and P-tuning's base) the backward computes only the input's
/// gradient, `dx = dy W`. candle's matmul would also compute W's full-size gradient, which
/// nobody reads: a third of the backward's work and a weight-sized buffer per projection.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let inner = *dims.last().expect("linear input has a last dimension");
    let rows = x.elem_count() / inner.max(1);
    let x2 = x.reshape((rows, inner))?;
    let y = if w.track_op() || !x2.track_op() {
        x2.matmul(&w.t()?)?
    } else {
        let y = x2.detach().matmul(&w.t()?)?;
        let w = w.clone();
        with_backward(&x2, y, move |dy| dy.matmul(&w))?
    };
    let mut out = dims;
    *out.last_mut().expect("checked above") = w.dim(0)?;
    y.reshape(out)
}

/// A projection's weight W [out, in]: a tensor (trained under full SFT, frozen otherwise), or
/// QLoRA's frozen weight in NF4, dequantized to the model's dtype where a product reads it and
/// dropped after, as torchao's `linear_nf4` does (forward and backward each dequantize it
/// again: a weight-sized temporary at a time instead of every weight in bf16).
#[derive(Clone, Debug)]
pub enum BaseWeight {
    Tensor(Tensor),
    Nf4(Arc<Nf4Weight>),
}

impl From<Tensor> for BaseWeight {
    fn from(t: Tensor) -> Self {
        BaseWeight::Tensor(t)
    }
}

impl BaseWeight {
    /// W as a tensor of the model's dtype: the tensor itself, or NF4 dequantized.
    pub fn tensor(&self) -> Result<Tensor> {
        match self {
            BaseWeight::Tensor(t) => Ok(t.clone()),
            BaseWeight::Nf4(q) => q.dequantize(),
        }
    }

    /// The tensor, when W is held as one (None for NF4).
    pub fn as_tensor(&self) -> Option<&Tensor> {
        match self {
            BaseWeight::Tensor(t) => Some(t),
            BaseWeight::Nf4(_) => None,
        }
    }

    /// (out, in).
    pub fn dims2(&self) -> Result<(usize, usize)> {
        match self {
            BaseWeight::Tensor(t) => t.dims2(),
            BaseWeight::Nf4(q) => match q.dims() {
                &[out, inner] => Ok((out, inner)),
                other => candle_core::bail!("a projection weight is 2-D, not {other:?}"),
            },
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            BaseWeight::Tensor(t) => t.dtype(),
            BaseWeight::Nf4(q) => q.dtype(),
        }
    }

    pub fn device(&self) -> &Device {
        match self {
            BaseWeight::Tensor(t) => t.device(),
            BaseWeight::Nf4(q) => q.device(),
        }
    }

    /// Bytes held on the device.
    pub fn bytes(&self) -> usize {
        match self {
            BaseWeight::Tensor(t) => t.elem_count() * t.dtype().size_in_bytes(),
            BaseWeight::Nf4(q) => q.bytes(),
        }
    }

    /// Out of the graph: a tensor detached (NF4 never is in one).
    pub fn detach(&self) -> Self {
        match self {
            BaseWeight::Tensor(t) => BaseWeight::Tensor(t.detach()),
            BaseWeight::Nf4(q) => BaseWeight::Nf4(q.clone()),
        }
    }
}

/// `x Wᵀ` for a [`BaseWeight`]: [`linear`] for a tensor; for NF4 the weight dequantized for the
/// product and again for the input's gradient, never kept between them.
pub fn linear_base(x: &Tensor, w: &BaseWeight) -> Result<Tensor> {
    let BaseWeight::Nf4(q) = w else {
        return linear(x, &w.tensor()?);
    };
    let dims = x.dims().to_vec();
    let inner = *dims.last().expect("linear input has a last dimension");
    let rows = x.elem_count() / inner.max(1);
    let x2 = x.reshape((rows, inner))?;
    let y = x2.detach().matmul(&q.dequantize()?.t()?)?;
    let y = match x2.track_op() {
        true => {
            let q = q.clone();
            with_backward(&x2, y, move |dy| dy.matmul(&q.dequantize()?))?
        }
        false => y,
    };
    let mut out = dims;
    *out.last_mut().expect("checked above") = w.dims2()?.0;
    y.reshape(out)
}

/// A LoRA projection, `x Wᵀ + s · (x Aᵀ) Bᵀ`, for x [..., in], a frozen W [out, in] and the
/// trainable A [r, in], B [out, r] (f32, as PEFT keeps adapters; the low-rank path runs in f32,
/// its update added to x Wᵀ in f32 and the sum rounded to x's dtype once, as PEFT does).
///
/// One op with its own backward, so the graph keeps only x and the [rows, r] low-rank
/// activation, where the composed ops would keep x in f32, the update, its scaled copy and the
/// sum: four projection-sized tensors per adapted projection. W gets no gradient.
///
/// W may be NF4 (QLoRA): dequantized for the product, and again in the backward.
pub fn lora_linear(
    x: &Tensor,
    w: &BaseWeight,
    a: &Tensor,
    b: &Tensor,
    scaling: f64,
) -> Result<Tensor> {
    let in_dims = x.dims().to_vec();
    let inner = *in_dims.last().expect("linear input has a last dimension");
    let rows = x.elem_count() / inner.max(1);
    let x2 = x.detach().reshape((rows, inner))?;
    let w_ = w.detach();
    let out_dim = w.dims2()?.0;
    let adapter = LowRank::new(a, b, scaling)?;
    let low = adapter.low(&x2, None)?;
    let y = adapter.add_to(&x2.matmul(&w_.tensor()?.t()?)?, &low)?;
    let mut out = in_dims.clone();
    *out.last_mut().expect("checked above") = out_dim;
    let y = y.reshape(out)?;
    with_backward3((x, a, b), y, move |dy, [need_x, need_a, need_b]| {
        let dy = dy.reshape((rows, out_dim))?;
        let g = adapter.backward(&dy, &low, need_a.then_some(&x2), need_b)?;
        let dx = match need_x {
            true => Some(
                adapter
                    .add_input_grad(&dy.matmul(&w_.tensor()?)?, &g.dlow, None)?
                    .reshape(in_dims.as_slice())?,
            ),
            false => None,
        };
        Ok((dx, g.da, g.db))
    })
}

/// LoRA's low-rank path `s · (x Aᵀ) Bᵀ` and its backward, in f32 (A [r, in] and B [out, r]
/// as PEFT keeps them) on x and dy as they are (bf16 read as f32 by the kernels of
/// `helix_kernels::low_rank`, not copied to f32), for [`lora_linear`] and the
/// hand-differentiated decoder layer. Where the layer drops the path's input, the methods that
/// read it or make its gradient take the dropout's mask, which the kernels apply as they read
/// (no dropped copy of the input or of its gradient is written, up to rank 64 on a GPU).
#[derive(Clone)]
pub(crate) struct LowRank {
    a: Tensor,
    /// Bᵀ [r, out], contiguous.
    b_t: Tensor,
    scaling: f64,
}

/// The gradients of one [`LowRank`] path.
pub(crate) struct LowRankGrads {
    /// The gradient of x Aᵀ [rows, r], the scale applied.
    pub dlow: Tensor,
    pub da: Option<Tensor>,
    pub db: Option<Tensor>,
}

impl LowRank {
    /// Detached copies of the adapters (the caller's op carries their gradients).
    pub(crate) fn new(a: &Tensor, b: &Tensor, scaling: f64) -> Result<Self> {
        Ok(Self {
            a: a.detach(),
            b_t: b.detach().t()?.contiguous()?,
            scaling,
        })
    }

    /// The scaled rank-r activation `s · x Aᵀ` [rows, r], f32, x dropped under `mask` when
    /// given. The scale goes on it, not on the projection-sized update: one pass over
    /// [rows, r] instead of [rows, out].
    pub(crate) fn low(&self, x: &Tensor, mask: Option<&DropoutMask>) -> Result<Tensor> {
        low_rank::project_under(x, &self.a, mask)? * self.scaling
    }

    /// base + low Bᵀ: the projection's output, summed in f32 and rounded once to base's dtype
    /// (PEFT adds its f32 update to a bf16 output in f32, then casts).
    pub(crate) fn add_to(&self, base: &Tensor, low: &Tensor) -> Result<Tensor> {
        low_rank::add_product(base, low, &self.b_t)
    }

    /// acc + (base + low Bᵀ): [`Self::add_to`] added to acc (a residual) in the same pass.
    pub(crate) fn add_onto(&self, acc: &Tensor, base: &Tensor, low: &Tensor) -> Result<Tensor> {
        low_rank::add_product_to(acc, base, low, &self.b_t)
    }

    /// base + dlow A: the low-rank path's part of the input's gradient added to the base's,
    /// through the input's dropout (`mask`) when given.
    pub(crate) fn add_input_grad(
        &self,
        base: &Tensor,
        dlow: &Tensor,
        mask: Option<&DropoutMask>,
    ) -> Result<Tensor> {
        low_rank::add_product_under(base, dlow, &self.a, mask)
    }

    /// acc + (base + dlow A): [`Self::add_input_grad`] added to acc (the input gradient of
    /// the projections before it that read the same input) in the same pass.
    pub(crate) fn add_input_grad_onto(
        &self,
        acc: &Tensor,
        base: &Tensor,
        dlow: &Tensor,
        mask: Option<&DropoutMask>,
    ) -> Result<Tensor> {
        low_rank::add_product_to_under(acc, base, dlow, &self.a, mask)
    }

    /// From the output's gradient dy [rows, out] (x's dtype) and the forward's `low`:
    /// with low = s · x Aᵀ, dB = dyᵀ low; d(x Aᵀ) = s · dy B; dA = d(x Aᵀ)ᵀ x (x given when
    /// A needs its gradient).
    pub(crate) fn backward(
        &self,
        dy: &Tensor,
        low: &Tensor,
        x: Option<&Tensor>,
        need_b: bool,
    ) -> Result<LowRankGrads> {
        let dlow = self.dlow(dy)?;
        let (da, db) = self.adapter_grads(dy, low, &dlow, x.map(|x| (x, None)), need_b)?;
        Ok(LowRankGrads { dlow, da, db })
    }

    /// d(x Aᵀ) = s · dy B [rows, r], the scale applied: what x's gradient and A's need.
    pub(crate) fn dlow(&self, dy: &Tensor) -> Result<Tensor> {
        low_rank::project(dy, &self.b_t)? * self.scaling
    }

    /// (dA, dB) from dy, the forward's `low` and [`Self::dlow`]: dB = dyᵀ low when `need_b`,
    /// dA = dlowᵀ x when x is given (x dropped under its mask when it has one, as the forward
    /// read it).
    pub(crate) fn adapter_grads(
        &self,
        dy: &Tensor,
        low: &Tensor,
        dlow: &Tensor,
        x: Option<(&Tensor, Option<&DropoutMask>)>,
        need_b: bool,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let db = match need_b {
            true => Some(low_rank::outer_sum(low, dy)?.t()?.contiguous()?),
            false => None,
        };
        let da = x
            .map(|(x, mask)| low_rank::outer_sum_under(dlow, x, mask))
            .transpose()?;
        Ok((da, db))
    }
}
