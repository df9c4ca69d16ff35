//! The projection `x Wᵀ` (W [out, in] as Hugging Face stores it).

use candle_core::{Result, Tensor};

use crate::backward::with_backward;

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
