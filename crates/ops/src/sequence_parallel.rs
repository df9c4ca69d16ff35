//! Sequence parallelism (Korthikanti et al. 2022, Megatron's `sequence_parallel`): between the
//! tensor-parallel regions of a decoder layer — the norms and the residual stream — each rank
//! of the group holds only its share of the tokens, where plain tensor parallelism keeps every
//! token on every rank. The all-reduce after a row-parallel layer becomes a reduce-scatter
//! (each rank keeps the sum of its own rows) and the input of a column-parallel layer is
//! all-gathered; the traffic is the same, and the activations kept outside the parallel
//! regions shrink by the group's size.
//!
//! The tokens are the rows of the flattened batch [B·S, H], split into equal contiguous
//! chunks, the last one padded with zero rows where B·S does not divide (zero rows stay zero
//! through RMSNorm and the residual adds, and are cut off when the rows are gathered).

use candle_core::{Result, Tensor};

use crate::backward::with_backward;
use crate::collective::SharedCollective;

/// How the rows of a [rows, …] tensor are split over a group of `size` ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowShard {
    /// The rows of the whole tensor (B·S tokens).
    pub rows: usize,
    /// The rows each rank holds: ⌈rows / size⌉.
    pub chunk: usize,
    pub rank: usize,
    pub size: usize,
}

impl RowShard {
    pub fn new(rows: usize, group: &SharedCollective) -> Self {
        let size = group.size().max(1);
        Self {
            rows,
            chunk: rows.div_ceil(size),
            rank: group.rank(),
            size,
        }
    }

    /// This rank's chunk of x [rows, …]: its rows, then zero rows up to `chunk`, in storage of
    /// its own (a view would keep all of x alive for as long as the chunk is kept).
    pub fn take(&self, x: &Tensor) -> Result<Tensor> {
        let start = (self.rank * self.chunk).min(self.rows);
        let len = self.chunk.min(self.rows - start);
        let mine = x.narrow(0, start, len)?;
        match len == self.chunk && self.size > 1 {
            true => mine.force_contiguous(),
            false => pad_rows(&mine, self.chunk),
        }
    }

    /// The whole [rows, …] from every rank's chunk [chunk, …].
    pub fn gather(&self, group: &SharedCollective, chunk: &Tensor) -> Result<Tensor> {
        self.check(chunk)?;
        let all = group.all_gather(&chunk.contiguous()?, 0)?;
        all.narrow(0, 0, self.rows)
    }

    /// This rank's chunk [chunk, …] of the sum over the group of partial sums [rows, …].
    pub fn reduce_scatter(&self, group: &SharedCollective, partial: &Tensor) -> Result<Tensor> {
        if partial.dim(0)? != self.rows {
            candle_core::bail!(
                "sequence parallelism: {} rows to reduce-scatter, expected {}",
                partial.dim(0)?,
                self.rows
            );
        }
        let padded = pad_rows(partial, self.chunk * self.size)?;
        group.reduce_scatter_sum(&padded.contiguous()?)
    }

    fn check(&self, chunk: &Tensor) -> Result<()> {
        if chunk.dim(0)? != self.chunk {
            candle_core::bail!(
                "sequence parallelism: a chunk of {} rows, expected {} ({} rows over {} ranks)",
                chunk.dim(0)?,
                self.chunk,
                self.rows,
                self.size
            );
        }
        Ok(())
    }
}

/// x [n, …] followed by zero rows up to `rows`.
fn pad_rows(x: &Tensor, rows: usize) -> Result<Tensor> {
    let n = x.dim(0)?;
    if n == rows {
        return Ok(x.clone());
    }
    let mut dims = x.dims().to_vec();
    dims[0] = rows - n;
    let zeros = Tensor::zeros(dims, x.dtype(), x.device())?;
    Tensor::cat(&[x, &zeros], 0)
}

/// Megatron's `scatter_to_sequence_parallel_region`: x [rows, …], whole on every rank, to this
/// rank's chunk; the backward gathers the chunks' gradients.
pub fn scatter_to_sequence_parallel_region(x: &Tensor, group: &SharedCollective) -> Result<Tensor> {
    let shard = RowShard::new(x.dim(0)?, group);
    let group = group.clone();
    with_backward(x, shard.take(&x.detach())?, move |dy| {
        shard.gather(&group, dy)
    })
}

/// Megatron's `gather_from_sequence_parallel_region` before a layer split by output features
/// (the vocabulary-parallel LM head): the chunks [chunk, …] gathered into [rows, …]; each
/// rank's gradient of the whole is a partial sum over the group, so the backward
/// reduce-scatters it.
pub fn gather_from_sequence_parallel_region(
    chunk: &Tensor,
    rows: usize,
    group: &SharedCollective,
) -> Result<Tensor> {
    let shard = RowShard::new(rows, group);
    let whole = shard.gather(group, &chunk.detach())?;
    let group = group.clone();
    with_backward(chunk, whole, move |dy| shard.reduce_scatter(&group, dy))
}
