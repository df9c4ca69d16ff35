//! Causal attention with grouped-query heads and segment masks on candle tensors, in the
//! FlashAttention-2 manner: on a GPU the tensor-core kernels of kernels/cuda/flash_attention.cu
//! (bf16 or f16, head_dim 64 or 128), on the CPU the register-blocked tiles of
//! [`crate::flash_cpu`] (every dtype and head_dim, computed in f32), both checked against the
//! reference of [`crate::flash_attention`]. Nothing here records a graph:
//! `helix_ops::rope_attention` wraps the pair in its own backward.
//!
//! Query i sees key j when j ≤ i and both carry the same segment id; padding is a segment of
//! its own, so every query sees at least itself.

use candle_core::{DType, Device, Result, Tensor};

use crate::flash_attention::AttentionShape;
use crate::flash_cpu;
pub use crate::launch::ForwardTile;

/// Each token's segment (document) id, [B, S] u32, and whether every row's ids are
/// non-decreasing (packed documents in order, padding last): then the CUDA kernels skip the
/// tiles of keys that lie wholly in earlier documents than a tile of queries.
#[derive(Clone, Debug)]
pub struct Segments {
    pub ids: Tensor,
    pub ordered: bool,
}

impl Segments {
    /// The ids of `batch` rows (u32, row-major), on `device`.
    pub fn new(ids: Vec<u32>, batch: usize, device: &Device) -> Result<Self> {
        let seq = ids.len() / batch.max(1);
        if seq * batch != ids.len() {
            candle_core::bail!("segments: {} ids is not {batch} rows", ids.len());
        }
        let ordered = ids
            .chunks(seq.max(1))
            .all(|row| row.windows(2).all(|w| w[0] <= w[1]));
        Ok(Self {
            ids: Tensor::from_vec(ids, (batch, seq), device)?,
            ordered,
        })
    }
}

/// Head dimensions the CUDA kernels are compiled for.
pub const GPU_HEAD_DIMS: [usize; 2] = [64, 128];

/// Whether the CUDA kernels take this dtype and head dimension.
pub fn gpu_supports(dtype: DType, head_dim: usize) -> bool {
    matches!(dtype, DType::BF16 | DType::F16) && GPU_HEAD_DIMS.contains(&head_dim)
}

/// Whether [`attention`] runs here on the CUDA kernels: a GPU, this crate built with `cuda`,
/// and a dtype and head dimension they take.
pub fn runs_on_gpu(device: &Device, dtype: DType, head_dim: usize) -> bool {
    cfg!(feature = "cuda") && device.is_cuda() && gpu_supports(dtype, head_dim)
}

/// The output [B, S, Hq, D] (heads merged, as the output projection reads them) and each
/// query row's log-sum-exp of its scaled scores [B, Hq, S] (f32), for q [B, Hq, S, D], k and v
/// [B, Hkv, S, D] (views with a unit last stride are read in place on the GPU) and the rows'
/// segments. On a GPU the forward kernel is chosen by the grid ([`ForwardTile::Auto`]).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &Segments,
) -> Result<(Tensor, Tensor)> {
    attention_with(q, k, v, segments, ForwardTile::default())
}

/// [`attention`] with the GPU's forward kernel chosen by its query rows per block (the CPU's
/// tiles ignore it): `helix-train attention-bench` times both.
pub fn attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &Segments,
    tile: ForwardTile,
) -> Result<(Tensor, Tensor)> {
    let shape = shape_of(q, k, v, &segments.ids)?;
    if q.device().is_cpu() {
        return cpu_forward(shape, q, k, v, &segments.ids);
    }
    #[cfg(feature = "cuda")]
    {
        let (q, k, v) = (aligned(q)?, aligned(k)?, aligned(v)?);
        let ids = segments.ids.contiguous()?;
        crate::flash_cuda::forward(shape, &q, &k, &v, (&ids, segments.ordered), tile)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = tile;
        candle_core::bail!(
            "flash attention: no kernels for {:?} in this build",
            q.device()
        )
    }
}

/// dq [B, Hq, S, D], dk and dv [B, Hkv, S, D] (q's dtype) from [`attention`]'s inputs, its
/// output and log-sum-exp, and the output's gradient dout [B, S, Hq, D]. On a GPU they are
/// views of storage laid out heads merged, [B, S, H, D], as the projections' backward reads
/// them; on the CPU they are packed.
pub fn attention_backward(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    segments: &Segments,
    (out, lse): (&Tensor, &Tensor),
    dout: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let shape = shape_of(q, k, v, &segments.ids)?;
    let merged = [shape.batch, shape.seq, shape.q_heads, shape.head_dim];
    for (what, t) in [("out", out), ("dout", dout)] {
        if t.dims() != merged {
            candle_core::bail!(
                "flash attention: {what} {:?}, expected {merged:?}",
                t.dims()
            );
        }
    }
    if lse.dims() != [shape.batch, shape.q_heads, shape.seq] || lse.dtype() != DType::F32 {
        candle_core::bail!("flash attention: lse {:?} {:?}", lse.dims(), lse.dtype());
    }
    if q.device().is_cpu() {
        return cpu_backward(shape, (q, k, v), &segments.ids, (out, lse), dout);
    }
    #[cfg(feature = "cuda")]
    {
        let (q, k, v) = (aligned(q)?, aligned(k)?, aligned(v)?);
        let (out, dout) = (aligned(out)?, aligned(dout)?);
        let ids = segments.ids.contiguous()?;
        crate::flash_cuda::backward(
            shape,
            (&q, &k, &v),
            (&ids, segments.ordered),
            (&out, &lse.contiguous()?),
            &dout,
        )
    }
    #[cfg(not(feature = "cuda"))]
    candle_core::bail!(
        "flash attention: no kernels for {:?} in this build",
        q.device()
    )
}

/// The shapes of one call, checked.
fn shape_of(q: &Tensor, k: &Tensor, v: &Tensor, segments: &Tensor) -> Result<AttentionShape> {
    let (batch, q_heads, seq, head_dim) = q.dims4()?;
    let (kb, kv_heads, ks, kd) = k.dims4()?;
    if (kb, ks, kd) != (batch, seq, head_dim) || v.dims() != k.dims() {
        candle_core::bail!(
            "flash attention: q {:?}, k {:?} and v {:?} disagree",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if kv_heads == 0 || q_heads % kv_heads != 0 {
        candle_core::bail!(
            "flash attention: {q_heads} query heads is not a multiple of {kv_heads} kv heads"
        );
    }
    if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        candle_core::bail!("flash attention: q, k and v must share one dtype");
    }
    if segments.dims() != [batch, seq] || segments.dtype() != DType::U32 {
        candle_core::bail!(
            "flash attention: segments {:?} {:?}, expected [{batch}, {seq}] U32",
            segments.dims(),
            segments.dtype()
        );
    }
    Ok(AttentionShape {
        batch,
        q_heads,
        kv_heads,
        seq,
        head_dim,
    })
}

/// `t` itself when the kernels can read it in place (unit last stride, every row starting on a
/// 16-byte boundary), else a packed copy.
#[cfg(feature = "cuda")]
fn aligned(t: &Tensor) -> Result<Tensor> {
    let l = t.layout();
    let st = l.stride();
    let in_place = st.last() == Some(&1)
        && l.start_offset().is_multiple_of(8)
        && st[..st.len() - 1].iter().all(|s| s.is_multiple_of(8))
        && t.dim(candle_core::D::Minus1)?.is_multiple_of(8);
    match in_place {
        true => Ok(t.clone()),
        false => t.contiguous(),
    }
}

fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

fn cpu_forward(
    sh: AttentionShape,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let seg = segments.flatten_all()?.to_vec1::<u32>()?;
    let (out, lse) = flash_cpu::forward(sh, &host_f32(q)?, &host_f32(k)?, &host_f32(v)?, &seg);
    let (b, hq, s, d) = (sh.batch, sh.q_heads, sh.seq, sh.head_dim);
    let out = Tensor::from_vec(out, (b, hq, s, d), q.device())?
        .transpose(1, 2)?
        .contiguous()?
        .to_dtype(q.dtype())?;
    Ok((out, Tensor::from_vec(lse, (b, hq, s), q.device())?))
}

fn cpu_backward(
    sh: AttentionShape,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    segments: &Tensor,
    (out, lse): (&Tensor, &Tensor),
    dout: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let seg = segments.flatten_all()?.to_vec1::<u32>()?;
    let heads_first = |t: &Tensor| host_f32(&t.transpose(1, 2)?);
    let (dq, dk, dv) = flash_cpu::backward(
        sh,
        &host_f32(q)?,
        &host_f32(k)?,
        &host_f32(v)?,
        &seg,
        &heads_first(out)?,
        &lse.flatten_all()?.to_vec1::<f32>()?,
        &heads_first(dout)?,
    );
    let (b, s, d) = (sh.batch, sh.seq, sh.head_dim);
    let back = |x: Vec<f32>, heads: usize| {
        Tensor::from_vec(x, (b, heads, s, d), q.device())?.to_dtype(q.dtype())
    };
    Ok((
        back(dq, sh.q_heads)?,
        back(dk, sh.kv_heads)?,
        back(dv, sh.kv_heads)?,
    ))
}
