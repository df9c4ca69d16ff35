//! The ops written with plain candle ops, which candle differentiates node by node: the
//! definition the fused kernels are checked against ([`crate::check`]).

use candle_core::{Device, Result, Tensor, D};

/// `x * cos + rotate_half(x) * sin` for x [B, H, S, D]; cos / sin broadcastable to it.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// AdamW's update of one f32 tensor in candle ops, in torch's order:
/// `exp_avg.lerp_(g, 1 − β₁)`, `exp_avg_sq.mul_(β₂).addcmul_(g, g, 1 − β₂)`, then
/// `w −= step_size · m / (√v / √(1 − β₂ᵗ) + eps)` after the decoupled decay, the gradient
/// first scaled by `st.grad_scale` (clipping). Returns (w, m, v); [`crate::adamw_step`] fuses it.
pub fn adamw_update(
    w: &Tensor,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    st: &crate::AdamWStep,
) -> Result<(Tensor, Tensor, Tensor)> {
    let g = match st.grad_scale == 1.0 {
        true => g.clone(),
        false => (g * st.grad_scale)?,
    };
    let g = &g;
    let w = match st.decay == 1.0 {
        true => w.clone(),
        false => (w * st.decay)?,
    };
    let m = (m + ((g - m)? * st.c1)?)?;
    let v = ((v * st.b2)? + (g.sqr()? * st.c2)?)?;
    let denom = ((v.sqrt()? * st.inv_bias2)? + st.eps)?;
    let w = (w - ((&m * st.step_size)? / denom)?)?;
    Ok((w, m, v))
}

/// Inverted dropout's mask of `key` over a tensor of shape `dims`, f32 on `device`: 1 / (1 − p)
/// where the element is kept, 0 where dropped; x · mask is [`crate::dropout`].
pub fn dropout_mask(dims: &[usize], p: f64, key: u64, device: &Device) -> Result<Tensor> {
    let threshold = crate::dropout::keep_threshold(p);
    let scale = (1.0 / (1.0 - p)) as f32;
    let n = dims.iter().product::<usize>() as u64;
    let mask: Vec<f32> = (0..n)
        .map(|i| match crate::dropout::element_bits(key, i) < threshold {
            true => scale,
            false => 0.0,
        })
        .collect();
    Tensor::from_vec(mask, dims, &Device::Cpu)?.to_device(device)
}
