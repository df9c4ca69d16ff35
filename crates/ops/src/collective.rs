//! Communication between the ranks of a tensor-parallel group, as differentiable ops (Megatron's
//! `mappings.py`): each has a named forward and backward, so a parallel layer is an ordinary
//! layer whose graph contains them. The transport (TCP between CPU processes, NCCL between
//! GPUs) is behind [`Collective`], implemented by helix-parallel.

use std::sync::Arc;

use candle_core::{Result, Tensor};

use crate::backward::with_backward;

/// What tensor parallelism needs from a group of ranks. Every rank of the group must make the
/// same calls in the same order.
pub trait Collective: Send + Sync {
    /// This rank's position in the group, and the group's size.
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Elementwise sum over the group; every rank gets the result.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// Elementwise maximum over the group.
    fn all_reduce_max(&self, t: &Tensor) -> Result<Tensor>;
    /// Every rank's `t` concatenated along `dim`, in rank order.
    fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor>;
    /// The sum over the group of `t`, whose dimension 0 divides by the group's size: rank r
    /// gets part r of `size` equal parts along dimension 0 (half an all-reduce's traffic).
    fn reduce_scatter_sum(&self, t: &Tensor) -> Result<Tensor>;
}

pub type SharedCollective = Arc<dyn Collective>;

/// Megatron's `f`, at the input of a column-parallel layer: identity forward; the backward sums
/// the gradient over the group, since every rank's shard of the output depends on the whole
/// input.
pub fn copy_to_parallel_region(x: &Tensor, group: &SharedCollective) -> Result<Tensor> {
    if group.size() == 1 {
        return Ok(x.clone());
    }
    let group = group.clone();
    with_backward(x, x.detach(), move |dy| group.all_reduce_sum(dy))
}

/// Megatron's `g`, at the output of a row-parallel layer: the forward sums the ranks' partial
/// outputs; the backward hands the (replicated) gradient to every rank unchanged.
pub fn reduce_from_parallel_region(x: &Tensor, group: &SharedCollective) -> Result<Tensor> {
    if group.size() == 1 {
        return Ok(x.clone());
    }
    let summed = group.all_reduce_sum(&x.detach())?;
    with_backward(x, summed, |dy| Ok(dy.clone()))
}
