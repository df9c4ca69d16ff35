//! The projection `x Wᵀ` (W [out, in] as Hugging Face stores it).

use candle_core::{DType, Result, Tensor};

use helix_kernels::low_rank;

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

/// A LoRA projection, `x Wᵀ + s · (x Aᵀ) Bᵀ`, for x [..., in], a frozen W [out, in] and the
/// trainable A [r, in], B [out, r] (f32, as PEFT keeps adapters; the low-rank path runs in f32
/// and is added in x's dtype).
///
/// One op with its own backward, so the graph keeps only x and the [rows, r] low-rank
/// activation, where the composed ops would keep x in f32, the update, its scaled copy and the
/// sum: four projection-sized tensors per adapted projection. W gets no gradient.
pub fn lora_linear(x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor, scaling: f64) -> Result<Tensor> {
    let in_dims = x.dims().to_vec();
    let inner = *in_dims.last().expect("linear input has a last dimension");
    let rows = x.elem_count() / inner.max(1);
    let x2 = x.detach().reshape((rows, inner))?;
    let (a_, b_, w_) = (a.detach(), b.detach(), w.detach());
    // The scale goes on the rank-r activation, not on the projection-sized update: one pass
    // over [rows, r] instead of [rows, out].
    let low = (low_rank::project(&x2.to_dtype(DType::F32)?, &a_)? * scaling)?;
    let b_t = b_.t()?.contiguous()?;
    let y = add_update(&x2.matmul(&w_.t()?)?, &low, &b_t)?;
    let mut out = in_dims.clone();
    *out.last_mut().expect("checked above") = w.dim(0)?;
    let y = y.reshape(out)?;
    with_backward3((x, a, b), y, move |dy, [need_x, need_a, need_b]| {
        let dy = dy.reshape((rows, w_.dim(0)?))?;
        let dy32 = dy.to_dtype(DType::F32)?;
        // With low = s · x Aᵀ: dB = dyᵀ low; d(x Aᵀ) = s · dy B; dA = d(x Aᵀ)ᵀ x;
        // dx = dy W + d(x Aᵀ) A.
        let dlow = (low_rank::project(&dy32, &b_t)? * scaling)?;
        let db = match need_b {
            true => Some(low_rank::outer_sum(&low, &dy32)?.t()?.contiguous()?),
            false => None,
        };
        // x in f32 again rather than kept from the forward: a projection-sized copy per
        // adapted projection for the whole step is what this op exists to avoid.
        let da = match need_a {
            true => Some(low_rank::outer_sum(&dlow, &x2.to_dtype(DType::F32)?)?),
            false => None,
        };
        let dx = match need_x {
            true => Some(add_update(&dy.matmul(&w_)?, &dlow, &a_)?.reshape(in_dims.as_slice())?),
            false => None,
        };
        Ok((dx, da, db))
    })
}

/// base + l M for the f32 rank-r factors l [rows, r] and M [r, out]: in f32 as one pass over
/// the rows ([`low_rank::add_product`]) when base is f32, else the update cast to base's dtype
/// and added, as PEFT adds its f32 update to a bf16 base.
fn add_update(base: &Tensor, l: &Tensor, m: &Tensor) -> Result<Tensor> {
    match base.dtype() {
        DType::F32 => low_rank::add_product(base, l, m),
        dtype => base + l.matmul(m)?.to_dtype(dtype)?,
    }
}
