//! The ops written with plain candle ops, which candle differentiates node by node: the
//! definition the fused kernels are checked against ([`crate::check`]).

use candle_core::{Result, Tensor, D};

/// `x * cos + rotate_half(x) * sin` for x [B, H, S, D]; cos / sin broadcastable to it.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}
