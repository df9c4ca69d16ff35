//! How each kernel of kernels/cuda is launched: blocks, threads and dynamic shared memory, and
//! the strides the FlashAttention kernels take. Plain data with no CUDA in it, so the CUDA
//! launchers (src/cuda.rs, src/flash_cuda.rs) and the CPU emulator's tests (kernels/emu) launch
//! the same grids.

use candle_core::{Result, Tensor};

/// A launch's shape as CUDA takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_bytes: u32,
}

impl Geometry {
    fn linear(blocks: usize, threads: u32) -> Self {
        Self {
            grid: (blocks as u32, 1, 1),
            block: (threads, 1, 1),
            shared_bytes: 0,
        }
    }
}

/// A grid-stride loop over `n` elements: 256 threads a block, at most 65,536 blocks.
pub fn elementwise(n: usize) -> Geometry {
    Geometry::linear(n.div_ceil(256).clamp(1, 1 << 16), 256)
}

/// A warp per row of `rows`, eight rows (256 threads) a block.
pub fn warp_per_row(rows: usize) -> Geometry {
    Geometry::linear(rows.div_ceil(8), 256)
}

/// A block per row of `cols` (RMSNorm): a warp per 32 columns up to 1,024 threads; the kernels
/// loop over the rest.
pub fn block_per_row(rows: usize, cols: usize) -> Geometry {
    Geometry::linear(rows, cols.div_ceil(32).clamp(1, 32) as u32 * 32)
}

/// A block of 256 threads per row (the cross-entropy kernels, over the vocabulary).
pub fn wide_block_per_row(rows: usize) -> Geometry {
    Geometry::linear(rows, 256)
}

/// Rows of x per block of `low_rank_project` (PROJECT_ROWS in low_rank.cu).
const PROJECT_ROWS: usize = 32;
/// Columns of x per block of `low_rank_project` (PROJECT_SPAN in low_rank.cu).
const PROJECT_SPAN: usize = 512;
/// Ranks a block of the low-rank kernels accumulates at once (RANK_GROUP in low_rank.cu).
const RANK_GROUP: usize = 16;
/// Rows per block of `low_rank_add_product` (ADD_ROWS in low_rank.cu).
const ADD_ROWS: usize = 32;
/// Rows of l `low_rank_outer_partial` stages at a time (OUTER_ROWS in low_rank.cu).
const OUTER_ROWS: usize = 64;
/// The most partial sums `low_rank_outer_partial` writes: enough blocks to fill a GPU at
/// 2,048 rows, and a partial buffer at most 32 times the result however many rows there are.
const OUTER_MAX_PARTS: usize = 32;

/// `low_rank_project` over x [n, k] and rank r: 32 rows (x) × 512 columns (y) × 16 ranks (z)
/// a block of 256 threads. `grid.1` is the number of partial sums of each output, which
/// `low_rank_sum_parts_f32` adds when there is more than one.
pub fn low_rank_project(n: usize, k: usize, r: usize) -> Geometry {
    Geometry {
        grid: (
            n.div_ceil(PROJECT_ROWS).max(1) as u32,
            k.div_ceil(PROJECT_SPAN).max(1) as u32,
            r.div_ceil(RANK_GROUP).max(1) as u32,
        ),
        block: (256, 1, 1),
        shared_bytes: 0,
    }
}

/// `low_rank_add_product` over y [n, c]: a thread per column (x, 256 a block) and 32 rows a
/// block row (y).
pub fn low_rank_add_product(n: usize, c: usize) -> Geometry {
    Geometry {
        grid: (
            c.div_ceil(256).max(1) as u32,
            n.div_ceil(ADD_ROWS).max(1) as u32,
            1,
        ),
        block: (256, 1, 1),
        shared_bytes: 0,
    }
}

/// Rows of x per partial sum of `low_rank_outer_partial` over `n` rows: a multiple of 64,
/// the fewest that keep the parts at [`OUTER_MAX_PARTS`] or fewer.
pub fn low_rank_outer_rows_per_part(n: usize) -> usize {
    OUTER_ROWS * n.div_ceil(OUTER_ROWS).div_ceil(OUTER_MAX_PARTS).max(1)
}

/// `low_rank_outer_partial` over `n` rows and `k` columns: a thread per column (x) and a block
/// row per [`low_rank_outer_rows_per_part`] rows (y): `grid.1` is the number of partial sums.
pub fn low_rank_outer_partial(n: usize, k: usize) -> Geometry {
    Geometry {
        grid: (
            k.div_ceil(256).max(1) as u32,
            n.div_ceil(low_rank_outer_rows_per_part(n)).max(1) as u32,
            1,
        ),
        block: (256, 1, 1),
        shared_bytes: 0,
    }
}

/// Query rows (or keys) per FlashAttention tile, and threads per block (kTile, kThreads in
/// flash_attention.cu).
pub const FLASH_TILE: usize = 64;
const FLASH_THREADS: u32 = 128;

/// How many query rows a block of the FlashAttention forward takes: 64 (a warp owns 16, its q
/// fragments in registers) or 128 (a warp owns 32, each k and v fragment it reads from shared
/// memory feeding both of its 16-row blocks), or by the grid ([`ForwardTile::kernel`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ForwardTile {
    /// 128 rows when that grid still has two blocks per SM, else 64.
    #[default]
    Auto,
    Rows64,
    Rows128,
}

impl ForwardTile {
    /// The forward kernel for `heads` (batch × query heads) over `s` rows on a GPU of `sms`
    /// multiprocessors. Both kernels fit two blocks an SM; below two wide blocks per SM the
    /// 64-row kernel's twice as many blocks finish sooner.
    pub fn kernel(self, s: usize, heads: usize, sms: usize) -> FlashKernel {
        match self {
            Self::Rows64 => FlashKernel::Forward,
            Self::Rows128 => FlashKernel::ForwardWide,
            Self::Auto => {
                match heads * s.div_ceil(FlashKernel::ForwardWide.rows_per_block()) >= 2 * sms {
                    true => FlashKernel::ForwardWide,
                    false => FlashKernel::Forward,
                }
            }
        }
    }
}

/// Which FlashAttention kernel a tile grid is for; each keeps its tiles in dynamic shared
/// memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlashKernel {
    /// k and v tiles (q passes through k's), two tiles' key segment ids, the 64 query ids.
    Forward,
    /// k, v and 128 rows of q, two tiles' key segment ids, the 128 query ids.
    ForwardWide,
    /// q, dO, v and two k tiles, and two tiles' key segment ids.
    BackwardDq,
    /// k, v, dO and two q tiles, then two tiles' query segment ids, lse and delta.
    BackwardDkDv,
}

impl FlashKernel {
    /// Dynamic shared memory for head_dim `d` and `elem_bytes`-byte elements.
    pub fn shared_bytes(self, d: usize, elem_bytes: usize) -> usize {
        // Rows padded by 8 elements (pitch<D> in flash_attention.cu).
        let tile = FLASH_TILE * (d + 8) * elem_bytes;
        match self {
            Self::Forward => 2 * tile + 2 * FLASH_TILE * 4 + FLASH_TILE * 4,
            Self::ForwardWide => 4 * tile + 2 * FLASH_TILE * 4 + 2 * FLASH_TILE * 4,
            Self::BackwardDq => 5 * tile + 2 * FLASH_TILE * 4,
            Self::BackwardDkDv => 5 * tile + 2 * 3 * FLASH_TILE * 4,
        }
    }

    /// Rows of `s` (queries, or keys for dk / dv) one block takes.
    pub fn rows_per_block(self) -> usize {
        match self {
            Self::ForwardWide => 2 * FLASH_TILE,
            _ => FLASH_TILE,
        }
    }
}

/// A block of four warps per tile of `s` rows (x; 64 rows, 128 for the wide forward) and per
/// head of each batch row (y), with `kernel`'s shared memory.
pub fn flash_tiles(
    kernel: FlashKernel,
    s: usize,
    heads: usize,
    d: usize,
    elem_bytes: usize,
) -> Result<Geometry> {
    // CUDA's grid is at most 65,535 blocks high.
    if heads > 65_535 {
        candle_core::bail!(
            "flash attention: batch × heads = {heads} is over the 65,535 the kernels' grid takes"
        );
    }
    Ok(Geometry {
        grid: (s.div_ceil(kernel.rows_per_block()) as u32, heads as u32, 1),
        block: (FLASH_THREADS, 1, 1),
        shared_bytes: kernel.shared_bytes(d, elem_bytes) as u32,
    })
}

/// Element strides of a [batch, heads, rows, head_dim] tensor, as the FlashAttention kernels'
/// `Strides` (three int64_t, passed by value).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Strides {
    pub b: i64,
    pub h: i64,
    pub s: i64,
}

impl Strides {
    /// A [B, heads, S, D] tensor.
    pub fn of(t: &Tensor) -> Self {
        let st = t.stride();
        Self {
            b: st[0] as i64,
            h: st[1] as i64,
            s: st[2] as i64,
        }
    }

    /// A [B, S, heads, D] tensor (the output and its gradient), read as [B, heads, S, D].
    pub fn of_merged(t: &Tensor) -> Self {
        let st = t.stride();
        Self {
            b: st[0] as i64,
            h: st[2] as i64,
            s: st[1] as i64,
        }
    }

    /// A packed [B, heads, S, D] tensor.
    pub fn packed(heads: usize, s: usize, d: usize) -> Self {
        Self {
            b: (heads * s * d) as i64,
            h: (s * d) as i64,
            s: d as i64,
        }
    }

    /// A packed [B, S, heads, D] tensor read as [B, heads, S, D].
    pub fn merged(heads: usize, s: usize, d: usize) -> Self {
        Self {
            b: (s * heads * d) as i64,
            h: d as i64,
            s: (heads * d) as i64,
        }
    }
}

/// Elements per block of the multi-tensor kernels (kTensorListBlockElems in common.cuh).
pub const TENSOR_LIST_BLOCK_ELEMS: usize = 4096;

/// One launch over a list of tensors of `lens` elements (none empty): each tensor's first
/// block, and the grid, 256 threads per block of [`TENSOR_LIST_BLOCK_ELEMS`].
pub fn tensor_list(lens: &[usize]) -> Result<(Vec<i64>, Geometry)> {
    let mut first = Vec::with_capacity(lens.len());
    let mut blocks = 0usize;
    for &n in lens {
        if n == 0 {
            candle_core::bail!("a multi-tensor launch takes no empty tensor");
        }
        first.push(blocks as i64);
        blocks += n.div_ceil(TENSOR_LIST_BLOCK_ELEMS);
    }
    // CUDA's grid is at most 2³¹ − 1 blocks wide.
    if blocks > i32::MAX as usize {
        candle_core::bail!("a multi-tensor launch of {blocks} blocks is over CUDA's grid");
    }
    Ok((first, Geometry::linear(blocks, 256)))
}

/// One parameter of `adamw_*` (kernels/cuda/adamw.cu's AdamWTensor): device addresses and
/// sizes. `master` is 0 for an f32 parameter updated directly.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AdamWTensor {
    pub param: u64,
    pub master: u64,
    pub m: u64,
    pub v: u64,
    pub g: u64,
    pub n: i64,
    pub first_block: i64,
    /// 1 − lr · weight_decay, or 1.
    pub decay: f32,
    pub unused: u32,
}

/// The step's constants of `adamw_*` (adamw.cu's AdamWConstants, passed by value).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AdamWConstants {
    /// 1 − β₁
    pub c1: f32,
    pub b2: f32,
    /// 1 − β₂
    pub c2: f32,
    /// 1 / √(1 − β₂ᵗ)
    pub inv_bias2: f32,
    pub eps: f32,
    /// lr / (1 − β₁ᵗ)
    pub step_size: f32,
    /// The clipping coefficient, or 1.
    pub grad_scale: f32,
}

/// One tensor of `sum_squares_f32` (kernels/cuda/sum_squares.cu's SquaresTensor).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SquaresTensor {
    pub x: u64,
    pub n: i64,
    pub first_block: i64,
}
