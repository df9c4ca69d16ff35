//! Launching the kernels of kernels/cuda (compiled to PTX by build.rs) on candle's CUDA storage.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result};

use crate::dropout::DropoutMask;
use crate::launch::{self, Geometry};

impl From<Geometry> for LaunchConfig {
    fn from(g: Geometry) -> Self {
        LaunchConfig {
            grid_dim: g.grid,
            block_dim: g.block,
            shared_mem_bytes: g.shared_bytes,
        }
    }
}

/// One .cu file's PTX and the module name candle caches it under.
#[derive(Clone, Copy)]
pub(crate) struct Module {
    pub(crate) name: &'static str,
    pub(crate) ptx: &'static str,
}

pub(crate) const RMS_NORM: Module = Module {
    name: "helix_rms_norm",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/rms_norm.ptx")),
};
pub(crate) const SWIGLU: Module = Module {
    name: "helix_swiglu",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/swiglu.ptx")),
};
pub(crate) const ROPE: Module = Module {
    name: "helix_rope",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/rope.ptx")),
};

pub(crate) const ATTENTION_SOFTMAX: Module = Module {
    name: "helix_attention_softmax",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/attention_softmax.ptx")),
};

pub(crate) const CROSS_ENTROPY: Module = Module {
    name: "helix_cross_entropy",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/cross_entropy.ptx")),
};

pub(crate) const LOW_RANK: Module = Module {
    name: "helix_low_rank",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/low_rank.ptx")),
};

pub(crate) const DROPOUT: Module = Module {
    name: "helix_dropout",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/dropout.ptx")),
};

pub(crate) const NF4: Module = Module {
    name: "helix_nf4",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/nf4.ptx")),
};

pub(crate) const FLASH_ATTENTION: Module = Module {
    name: "helix_flash_attention",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/flash_attention.ptx")),
};

/// The kernels of kernels/cuda/low_rank.cu (src/low_rank.rs says what each computes).
#[derive(Clone, Copy)]
pub(crate) enum LowRankKernel {
    /// (x [n, k] T, M [r, k] f32) → [n, r] f32; sizes [n, k, r].
    Project,
    /// (y [n, c] T, l [n, r] f32, M [r, c] f32[, acc [n, c] T]) → [n, c] T; sizes [n, c, r].
    AddProduct,
    /// (l [n, r] f32, x [n, k] T) → [r, k] f32; sizes [n, r, k].
    OuterSum,
}

/// Runs a low-rank kernel on `inputs`, whose large operand (x or y) sets the dtype; with a
/// `mask`, its `_dropped` form (x read under the mask, or the product l M multiplied by it).
pub(crate) fn low_rank(
    kernel: LowRankKernel,
    inputs: &[(&CudaStorage, &Layout)],
    sizes: [usize; 3],
    mask: Option<&DropoutMask>,
) -> Result<CudaStorage> {
    let large = match kernel {
        LowRankKernel::OuterSum => inputs[1].0,
        _ => inputs[0].0,
    };
    match large.dtype() {
        DType::F32 => low_rank_typed::<f32>(kernel, "f32", inputs, sizes, mask),
        DType::BF16 => low_rank_typed::<half::bf16>(kernel, "bf16", inputs, sizes, mask),
        DType::F16 => low_rank_typed::<half::f16>(kernel, "f16", inputs, sizes, mask),
        other => candle_core::bail!("low_rank: no kernel for {other:?}"),
    }
}

fn low_rank_typed<T: CudaDType + DeviceRepr>(
    kernel: LowRankKernel,
    suffix: &str,
    inputs: &[(&CudaStorage, &Layout)],
    [n, a, b]: [usize; 3],
    mask: Option<&DropoutMask>,
) -> Result<CudaStorage> {
    let dev: CudaDevice = inputs[0].0.device.clone();
    // The kernel of stem `plain`, or of stem `dropped` with a mask.
    let load = |plain: &str, dropped: &str| {
        let stem = if mask.is_some() { dropped } else { plain };
        let name = format!("{stem}_{suffix}");
        dev.get_or_load_custom_func(&name, LOW_RANK.name, LOW_RANK.ptx)
            .map(|f| (f, name))
    };
    let i32_of = |v: usize, what: &str| {
        i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("low_rank: {what} {v}")))
    };
    match kernel {
        LowRankKernel::Project => {
            let (k, r) = (a, b);
            let (func, name) = load("low_rank_project", "low_rank_project_dropped")?;
            let x = views::<T>(&name, &inputs[..1])?;
            let m = views::<f32>(&name, &inputs[1..2])?;
            let geometry = launch::low_rank_project(n, k, r);
            let splits = geometry.grid.1 as usize;
            // SAFETY: the kernel writes all splits · n · r partial sums.
            let partial = unsafe { dev.alloc::<f32>(splits * n * r)? };
            let (n32, k32, r32) = (
                i32_of(n, "rows")?,
                i32_of(k, "columns")?,
                i32_of(r, "rank")?,
            );
            let mut args = func.builder();
            args.arg(&x[0])
                .arg(&m[0])
                .arg(&partial)
                .arg(&n32)
                .arg(&k32)
                .arg(&r32);
            push_mask(&mut args, mask);
            if n * r > 0 {
                // SAFETY: the argument list matches low_rank_project's signature (with a mask,
                // low_rank_project_dropped's: the same, then key, threshold and scale).
                unsafe { args.launch(geometry.into()) }.w()?;
            }
            let out = sum_parts(&dev, partial, splits, n * r)?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev))
        }
        LowRankKernel::AddProduct => {
            let (c, r) = (a, b);
            // A fourth input is what the sum is added to.
            let (func, name) = match inputs.len() {
                4 => load("low_rank_add_product_to", "low_rank_add_dropped_product_to")?,
                _ => load("low_rank_add_product", "low_rank_add_dropped_product")?,
            };
            let y = views::<T>(&name, &inputs[..1])?;
            let lm = views::<f32>(&name, &inputs[1..3])?;
            let acc = views::<T>(&name, &inputs[3..])?;
            // SAFETY: the kernel writes all n · c outputs.
            let out = unsafe { dev.alloc::<T>(n * c)? };
            let (n32, c32, r32) = (
                i32_of(n, "rows")?,
                i32_of(c, "columns")?,
                i32_of(r, "rank")?,
            );
            let mut args = func.builder();
            args.arg(&y[0]).arg(&lm[0]).arg(&lm[1]);
            for a in &acc {
                args.arg(a);
            }
            args.arg(&out);
            args.arg(&n32).arg(&c32).arg(&r32);
            push_mask(&mut args, mask);
            if n * c > 0 {
                // SAFETY: the argument list matches the signature of the kernel loaded above
                // (low_rank_add_[dropped_]product[_to]: acc after m, the mask's three last).
                unsafe { args.launch(launch::low_rank_add_product(n, c).into()) }.w()?;
            }
            Ok(CudaStorage::wrap_cuda_slice(out, dev))
        }
        LowRankKernel::OuterSum => {
            let (r, k) = (a, b);
            let (func, name) = load("low_rank_outer_partial", "low_rank_outer_partial_dropped")?;
            let l = views::<f32>(&name, &inputs[..1])?;
            let x = views::<T>(&name, &inputs[1..2])?;
            let geometry = launch::low_rank_outer_partial(n, k);
            let parts = geometry.grid.1 as usize;
            // SAFETY: each part writes its r · k partial sums (zero rows write zeros).
            let partial = unsafe { dev.alloc::<f32>(parts * r * k)? };
            let (n32, r32, k32, rows32) = (
                i32_of(n, "rows")?,
                i32_of(r, "rank")?,
                i32_of(k, "columns")?,
                i32_of(launch::low_rank_outer_rows_per_part(n), "rows per part")?,
            );
            let mut args = func.builder();
            args.arg(&l[0])
                .arg(&x[0])
                .arg(&partial)
                .arg(&n32)
                .arg(&r32)
                .arg(&k32)
                .arg(&rows32);
            push_mask(&mut args, mask);
            if r * k > 0 {
                // SAFETY: the argument list matches low_rank_outer_partial's signature (with a
                // mask, low_rank_outer_partial_dropped's: the same, then key, threshold and scale).
                unsafe { args.launch(geometry.into()) }.w()?;
            }
            let out = sum_parts(&dev, partial, parts, r * k)?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev))
        }
    }
}

/// A `_dropped` low-rank kernel's last three arguments: the mask's key, threshold and scale.
fn push_mask<'a>(
    args: &mut candle_core::cuda_backend::cudarc::driver::LaunchArgs<'a>,
    mask: Option<&'a DropoutMask>,
) {
    if let Some(mask) = mask {
        args.arg(&mask.key).arg(&mask.threshold).arg(&mask.scale);
    }
}

/// The sum, in order, of `parts` partial sums of `len` values each (`low_rank_sum_parts_f32`);
/// the one part itself when there is one.
fn sum_parts(
    dev: &CudaDevice,
    partial: CudaSlice<f32>,
    parts: usize,
    len: usize,
) -> Result<CudaSlice<f32>> {
    if parts == 1 {
        return Ok(partial);
    }
    let func =
        dev.get_or_load_custom_func("low_rank_sum_parts_f32", LOW_RANK.name, LOW_RANK.ptx)?;
    // SAFETY: the kernel writes all `len` sums.
    let out = unsafe { dev.alloc::<f32>(len)? };
    let (parts32, len64) = (parts as i32, len as i64);
    let mut args = func.builder();
    args.arg(&partial).arg(&out).arg(&parts32).arg(&len64);
    if len > 0 {
        // SAFETY: the argument list matches low_rank_sum_parts_f32's signature.
        unsafe { args.launch(launch::elementwise(len).into()) }.w()?;
    }
    Ok(out)
}

/// The two kernels of kernels/cuda/cross_entropy.cu.
#[derive(Clone, Copy)]
pub(crate) enum CrossEntropyKernel {
    /// [rows, 3] f32: (max, Σ exp, target logit).
    Stats,
    /// The logits' gradient, [rows, vocab] in their dtype; takes the rows' (lse, weight).
    Grad,
}

/// What both cross-entropy kernels take: logits [rows, vocab] and targets [rows] i64, and for
/// the gradient the row terms [rows, 2] f32.
pub(crate) struct CrossEntropyArgs<'a> {
    pub logits: (&'a CudaStorage, &'a Layout),
    pub targets: (&'a CudaStorage, &'a Layout),
    pub terms: Option<(&'a CudaStorage, &'a Layout)>,
    pub rows: usize,
    pub vocab: usize,
}

/// Runs `kernel` (its dtype suffix added), a block of 256 threads per row.
pub(crate) fn cross_entropy(
    kernel: CrossEntropyKernel,
    args: CrossEntropyArgs,
) -> Result<CudaStorage> {
    let stem = match kernel {
        CrossEntropyKernel::Stats => "logit_stats",
        CrossEntropyKernel::Grad => "logit_grad",
    };
    match args.logits.0.dtype() {
        DType::F32 => cross_entropy_typed::<f32>(kernel, &format!("{stem}_f32"), args),
        DType::BF16 => cross_entropy_typed::<half::bf16>(kernel, &format!("{stem}_bf16"), args),
        DType::F16 => cross_entropy_typed::<half::f16>(kernel, &format!("{stem}_f16"), args),
        other => candle_core::bail!("{stem}: no kernel for {other:?}"),
    }
}

fn cross_entropy_typed<T: CudaDType + DeviceRepr>(
    kernel: CrossEntropyKernel,
    function: &str,
    a: CrossEntropyArgs,
) -> Result<CudaStorage> {
    let CrossEntropyArgs {
        logits,
        targets,
        terms,
        rows,
        vocab,
    } = a;
    let dev: CudaDevice = logits.0.device.clone();
    let func = dev.get_or_load_custom_func(function, CROSS_ENTROPY.name, CROSS_ENTROPY.ptx)?;
    let x = views::<T>(function, &[logits])?;
    let t = views::<i64>(function, &[targets])?;
    let vocab32 = vocab as i32;
    let cfg: LaunchConfig = launch::wide_block_per_row(rows).into();
    let mut b = func.builder();
    b.arg(&x[0]).arg(&t[0]);
    let out = match (kernel, terms) {
        (CrossEntropyKernel::Stats, None) => {
            // SAFETY: the kernel writes all three statistics of every row.
            let out = unsafe { dev.alloc::<f32>(3 * rows)? };
            b.arg(&out).arg(&vocab32);
            if rows > 0 {
                // SAFETY: the argument list matches logit_stats' signature.
                unsafe { b.launch(cfg) }.w()?;
            }
            CudaStorage::wrap_cuda_slice(out, dev)
        }
        (CrossEntropyKernel::Grad, Some(terms)) => {
            let terms = views::<f32>(function, &[terms])?;
            // SAFETY: the kernel writes every element of every row.
            let out = unsafe { dev.alloc::<T>(rows * vocab)? };
            b.arg(&terms[0]).arg(&out).arg(&vocab32);
            if rows * vocab > 0 {
                // SAFETY: the argument list matches logit_grad's signature.
                unsafe { b.launch(cfg) }.w()?;
            }
            CudaStorage::wrap_cuda_slice(out, dev)
        }
        _ => candle_core::bail!("{function}: the row terms go with the gradient only"),
    };
    Ok(out)
}

/// One of the attention-softmax kernels (kernels/cuda/attention_softmax.cu), with the sizes
/// that only it takes.
#[derive(Clone, Copy)]
pub(crate) enum AttentionKernel {
    /// Two f32 per row (max, Σ exp) rather than rows × keys in the storage type.
    RowStats {
        heads: usize,
        q_rows: usize,
    },
    Probs {
        heads: usize,
        q_rows: usize,
    },
    SoftmaxGrad,
}

impl AttentionKernel {
    fn name(self) -> &'static str {
        match self {
            Self::RowStats { .. } => "attn_row_stats",
            Self::Probs { .. } => "attn_probs",
            Self::SoftmaxGrad => "attn_softmax_grad",
        }
    }
}

/// The arguments every attention-softmax kernel takes: inputs in the storage type, then f32
/// inputs (then the output), then rows × keys and the scale.
pub(crate) struct AttentionArgs<'a> {
    pub typed: Vec<(&'a CudaStorage, &'a Layout)>,
    pub f32s: Vec<(&'a CudaStorage, &'a Layout)>,
    pub rows: usize,
    pub keys: usize,
    pub scale: f32,
}

/// Runs `kernel` (its dtype suffix added) on `args`.
pub(crate) fn attention(kernel: AttentionKernel, args: AttentionArgs) -> Result<CudaStorage> {
    let function = kernel.name();
    match args.typed[0].0.dtype() {
        DType::F32 => attention_typed::<f32>(kernel, &format!("{function}_f32"), args),
        DType::BF16 => attention_typed::<half::bf16>(kernel, &format!("{function}_bf16"), args),
        DType::F16 => attention_typed::<half::f16>(kernel, &format!("{function}_f16"), args),
        other => candle_core::bail!("{function}: no kernel for {other:?}"),
    }
}

fn views<'a, T: CudaDType + DeviceRepr>(
    function: &str,
    inputs: &[(&'a CudaStorage, &'a Layout)],
) -> Result<Vec<CudaView<'a, T>>> {
    inputs
        .iter()
        .map(|(s, l)| match l.contiguous_offsets() {
            Some((a, b)) => Ok(s.as_cuda_slice::<T>()?.slice(a..b)),
            None => candle_core::bail!("{function}: inputs must be contiguous"),
        })
        .collect()
}

fn attention_typed<T: CudaDType + DeviceRepr>(
    kernel: AttentionKernel,
    function: &str,
    a: AttentionArgs,
) -> Result<CudaStorage> {
    let dev: CudaDevice = a.typed[0].0.device.clone();
    let func =
        dev.get_or_load_custom_func(function, ATTENTION_SOFTMAX.name, ATTENTION_SOFTMAX.ptx)?;
    let typed = views::<T>(function, &a.typed)?;
    let f32s = views::<f32>(function, &a.f32s)?;
    let n = a.rows * a.keys;
    let (rows, keys) = (a.rows as i64, a.keys as i32);
    // SAFETY: each kernel writes every element of its output.
    let (out_f32, out_t) = match kernel {
        AttentionKernel::RowStats { .. } => (Some(unsafe { dev.alloc::<f32>(2 * a.rows)? }), None),
        _ => (None, Some(unsafe { dev.alloc::<T>(n)? })),
    };
    let mut b = func.builder();
    for v in &typed {
        b.arg(v);
    }
    for v in &f32s {
        b.arg(v);
    }
    if let Some(o) = &out_f32 {
        b.arg(o);
    }
    if let Some(o) = &out_t {
        b.arg(o);
    }
    b.arg(&rows).arg(&keys);
    let grid = match kernel {
        AttentionKernel::RowStats { heads, q_rows } | AttentionKernel::Probs { heads, q_rows } => {
            Some((heads as i32, q_rows as i32))
        }
        AttentionKernel::SoftmaxGrad => None,
    };
    if let Some((heads, q_rows)) = &grid {
        b.arg(heads).arg(q_rows);
    }
    b.arg(&a.scale);
    if n > 0 {
        // SAFETY: the argument list matches the kernel's signature (attention_softmax.cu).
        unsafe { b.launch(launch::warp_per_row(a.rows).into()) }.w()?;
    }
    Ok(match (out_f32, out_t) {
        (Some(o), _) => CudaStorage::wrap_cuda_slice(o, dev),
        (_, Some(o)) => CudaStorage::wrap_cuda_slice(o, dev),
        _ => unreachable!("one output is allocated"),
    })
}

/// Inverted dropout (kernels/cuda/dropout.cu) of the packed x under `mask`.
pub(crate) fn dropout(x: &CudaStorage, xl: &Layout, mask: &DropoutMask) -> Result<CudaStorage> {
    match x.dtype() {
        DType::F32 => dropout_typed::<f32>("dropout_f32", (x, xl), mask),
        DType::BF16 => dropout_typed::<half::bf16>("dropout_bf16", (x, xl), mask),
        DType::F16 => dropout_typed::<half::f16>("dropout_f16", (x, xl), mask),
        other => candle_core::bail!("dropout: no kernel for {other:?}"),
    }
}

fn dropout_typed<T: CudaDType + DeviceRepr>(
    function: &str,
    input: (&CudaStorage, &Layout),
    mask: &DropoutMask,
) -> Result<CudaStorage> {
    let dev: CudaDevice = input.0.device.clone();
    let func = dev.get_or_load_custom_func(function, DROPOUT.name, DROPOUT.ptx)?;
    let x = views::<T>(function, &[input])?;
    let n = input.1.shape().elem_count();
    // SAFETY: the kernel writes every one of the n elements.
    let out = unsafe { dev.alloc::<T>(n)? };
    let n64 = n as i64;
    let mut args = func.builder();
    args.arg(&x[0])
        .arg(&out)
        .arg(&n64)
        .arg(&mask.key)
        .arg(&mask.threshold)
        .arg(&mask.scale);
    if n > 0 {
        // SAFETY: the argument list matches dropout_*'s signature.
        unsafe { args.launch(launch::elementwise(n).into()) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// NF4 codes [numel / 2] of the packed weight w given its blocks' absmax (kernels/cuda/nf4.cu).
pub(crate) fn nf4_quantize(
    w: (&CudaStorage, &Layout),
    absmax: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    match w.0.dtype() {
        DType::F32 => nf4_quantize_typed::<f32>("nf4_quantize_f32", w, absmax),
        DType::BF16 => nf4_quantize_typed::<half::bf16>("nf4_quantize_bf16", w, absmax),
        DType::F16 => nf4_quantize_typed::<half::f16>("nf4_quantize_f16", w, absmax),
        other => candle_core::bail!("nf4_quantize: no kernel for {other:?}"),
    }
}

fn nf4_quantize_typed<T: CudaDType + DeviceRepr>(
    function: &str,
    w: (&CudaStorage, &Layout),
    absmax: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let dev: CudaDevice = w.0.device.clone();
    let func = dev.get_or_load_custom_func(function, NF4.name, NF4.ptx)?;
    let typed = views::<T>(function, &[w, absmax])?;
    let pairs = w.1.shape().elem_count() / 2;
    // SAFETY: the kernel writes every one of the pairs bytes.
    let codes = unsafe { dev.alloc::<u8>(pairs)? };
    let pairs64 = pairs as i64;
    let mut args = func.builder();
    args.arg(&typed[0]).arg(&typed[1]).arg(&codes).arg(&pairs64);
    if pairs > 0 {
        // SAFETY: the argument list matches nf4_quantize_*'s signature.
        unsafe { args.launch(launch::elementwise(pairs).into()) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(codes, dev))
}

/// The weight (flat, the factors' dtype) from its NF4 codes, int8 scalers (as u8), factors and
/// mean (kernels/cuda/nf4.cu).
pub(crate) fn nf4_dequantize(
    codes: (&CudaStorage, &Layout),
    scalers: (&CudaStorage, &Layout),
    factors: (&CudaStorage, &Layout),
    mean: f32,
) -> Result<CudaStorage> {
    let args = (codes, scalers, factors, mean);
    match factors.0.dtype() {
        DType::F32 => nf4_dequantize_typed::<f32>("nf4_dequantize_f32", args),
        DType::BF16 => nf4_dequantize_typed::<half::bf16>("nf4_dequantize_bf16", args),
        DType::F16 => nf4_dequantize_typed::<half::f16>("nf4_dequantize_f16", args),
        other => candle_core::bail!("nf4_dequantize: no kernel for {other:?}"),
    }
}

type Nf4Parts<'a> = (
    (&'a CudaStorage, &'a Layout),
    (&'a CudaStorage, &'a Layout),
    (&'a CudaStorage, &'a Layout),
    f32,
);

fn nf4_dequantize_typed<T: CudaDType + DeviceRepr>(
    function: &str,
    (codes, scalers, factors, mean): Nf4Parts<'_>,
) -> Result<CudaStorage> {
    let dev: CudaDevice = codes.0.device.clone();
    let func = dev.get_or_load_custom_func(function, NF4.name, NF4.ptx)?;
    let bytes = views::<u8>(function, &[codes, scalers])?;
    let factors = views::<T>(function, &[factors])?;
    let pairs = codes.1.shape().elem_count();
    // SAFETY: the kernel writes both elements of every pair.
    let w = unsafe { dev.alloc::<T>(2 * pairs)? };
    let pairs64 = pairs as i64;
    let mut args = func.builder();
    args.arg(&bytes[0])
        .arg(&bytes[1])
        .arg(&factors[0])
        .arg(&mean)
        .arg(&w)
        .arg(&pairs64);
    if pairs > 0 {
        // SAFETY: the argument list matches nf4_dequantize_*'s signature.
        unsafe { args.launch(launch::elementwise(pairs).into()) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(w, dev))
}

/// Rotary embeddings (kernels/cuda/rope.cu) of x [B, H, S, D], read through its strides (the
/// last one 1), with the packed cos / sin [B, 1, S, D]; written packed, heads first or merged.
pub(crate) fn rope(
    (x, xl): (&CudaStorage, &Layout),
    tables: [(&CudaStorage, &Layout); 2],
    backward: bool,
    merged: bool,
) -> Result<CudaStorage> {
    match x.dtype() {
        DType::F32 => rope_typed::<f32>("rope_f32", (x, xl), tables, backward, merged),
        DType::BF16 => rope_typed::<half::bf16>("rope_bf16", (x, xl), tables, backward, merged),
        DType::F16 => rope_typed::<half::f16>("rope_f16", (x, xl), tables, backward, merged),
        other => candle_core::bail!("rope: no kernel for {other:?}"),
    }
}

fn rope_typed<T: CudaDType + DeviceRepr>(
    function: &str,
    (x, xl): (&CudaStorage, &Layout),
    tables: [(&CudaStorage, &Layout); 2],
    backward: bool,
    merged: bool,
) -> Result<CudaStorage> {
    let dev: CudaDevice = x.device.clone();
    let dims = xl.shape().dims();
    let stride = xl.stride();
    if dims.len() != 4 || stride[3] != 1 {
        candle_core::bail!("rope: x {dims:?} with strides {stride:?}, expected a unit last stride");
    }
    if tables.iter().any(|(s, _)| s.dtype() != x.dtype()) {
        candle_core::bail!("rope: cos and sin must have x's dtype");
    }
    let func = dev.get_or_load_custom_func(function, ROPE.name, ROPE.ptx)?;
    let cos_sin = views::<T>(function, &tables)?;
    // The view from x's first element; the kernel reaches the rest through the strides.
    let xv = x.as_cuda_slice::<T>()?.slice(xl.start_offset()..);
    let n = xl.shape().elem_count();
    // SAFETY: the kernel writes every one of the n elements.
    let out = unsafe { dev.alloc::<T>(n)? };
    let strides = launch::Strides {
        b: stride[0] as i64,
        h: stride[1] as i64,
        s: stride[2] as i64,
    };
    let (n64, heads, seq, dim) = (n as i64, dims[1] as i32, dims[2] as i32, dims[3] as i32);
    let (backward, merged) = (i32::from(backward), i32::from(merged));
    let mut args = func.builder();
    args.arg(&xv).arg(&cos_sin[0]).arg(&cos_sin[1]).arg(&out);
    args.arg(&n64).arg(&heads).arg(&seq).arg(&dim);
    args.arg(&backward).arg(&strides).arg(&merged);
    if n > 0 {
        // SAFETY: the argument list matches rope_*'s signature.
        unsafe { args.launch(launch::elementwise(n).into()) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// How a kernel covers its output.
pub(crate) enum Grid {
    /// One block per row of `cols` (RMSNorm); the kernel takes `(inputs…, out, cols: i32, eps: f32)`.
    Rows { rows: usize, cols: usize, eps: f32 },
    /// A grid-stride loop over `n` elements; the kernel takes `(inputs…, out, n: i64, extra: i32…)`.
    Elements { n: usize, extra: Vec<i32> },
}

/// Runs `function` (its dtype suffix added) of `module` on `inputs`, which must be packed and
/// share one dtype, into a new buffer of `out_len` elements.
pub(crate) fn launch(
    module: Module,
    function: &str,
    inputs: &[(&CudaStorage, &Layout)],
    out_len: usize,
    grid: Grid,
) -> Result<CudaStorage> {
    let dtype = inputs[0].0.dtype();
    if inputs.iter().any(|(s, _)| s.dtype() != dtype) {
        candle_core::bail!("{function}: inputs must share one dtype");
    }
    match dtype {
        DType::F32 => typed::<f32>(module, &format!("{function}_f32"), inputs, out_len, grid),
        DType::BF16 => {
            typed::<half::bf16>(module, &format!("{function}_bf16"), inputs, out_len, grid)
        }
        DType::F16 => typed::<half::f16>(module, &format!("{function}_f16"), inputs, out_len, grid),
        other => candle_core::bail!("{function}: no kernel for {other:?}"),
    }
}

fn typed<T: CudaDType + DeviceRepr>(
    module: Module,
    function: &str,
    inputs: &[(&CudaStorage, &Layout)],
    out_len: usize,
    grid: Grid,
) -> Result<CudaStorage> {
    let dev: CudaDevice = inputs[0].0.device.clone();
    let func = dev.get_or_load_custom_func(function, module.name, module.ptx)?;
    let views = views::<T>(function, inputs)?;
    // SAFETY: the kernel writes every one of the out_len elements.
    let out = unsafe { dev.alloc::<T>(out_len)? };
    let mut args = func.builder();
    for v in &views {
        args.arg(v);
    }
    args.arg(&out);
    let (cfg, cols, eps, n, extra) = match grid {
        Grid::Rows { rows, cols, eps } => (
            launch::block_per_row(rows, cols),
            Some(cols as i32),
            Some(eps),
            None,
            Vec::new(),
        ),
        Grid::Elements { n, extra } => (launch::elementwise(n), None, None, Some(n as i64), extra),
    };
    if let (Some(cols), Some(eps)) = (&cols, &eps) {
        args.arg(cols);
        args.arg(eps);
    }
    if let Some(n) = &n {
        args.arg(n);
    }
    for e in &extra {
        args.arg(e);
    }
    if out_len > 0 {
        // SAFETY: the argument list matches the kernel's signature (see Grid).
        unsafe { args.launch(cfg.into()) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}
