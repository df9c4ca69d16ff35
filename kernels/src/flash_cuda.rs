//! Launching the FlashAttention-2 kernels of kernels/cuda/flash_attention.cu on candle's CUDA
//! storage: the forward (output and log-sum-exp in one pass, so two tensors come back, which a
//! candle custom op cannot return), then for the backward the row terms delta = Σ dO · O, dq,
//! and dk with dv.

use candle_core::cuda_backend::cudarc::driver::sys::{
    CUdevice_attribute, CUfunction_attribute_enum,
};
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchArgs, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Result, Shape, Storage, Tensor};

use crate::cuda::FLASH_ATTENTION;
use crate::flash_attention::AttentionShape;
use crate::launch::{flash_tiles, warp_per_row, FlashKernel, ForwardTile, Strides};

// SAFETY: three i64 in C layout, the kernels' `struct Strides { int64_t b, h, s; }`.
unsafe impl DeviceRepr for Strides {}

/// A tensor's elements from its first one, on the GPU.
fn view<'a, T: CudaDType + DeviceRepr>(
    storage: &'a Storage,
    t: &Tensor,
    what: &str,
) -> Result<CudaView<'a, T>> {
    match storage {
        Storage::Cuda(s) => Ok(s.as_cuda_slice::<T>()?.slice(t.layout().start_offset()..)),
        _ => candle_core::bail!("flash attention: {what} is not on the GPU"),
    }
}

fn device_of(storage: &Storage) -> Result<CudaDevice> {
    match storage {
        Storage::Cuda(s) => Ok(s.device.clone()),
        _ => candle_core::bail!("flash attention: q is not on the GPU"),
    }
}

fn tensor<T: CudaDType + DeviceRepr>(
    slice: CudaSlice<T>,
    dev: &CudaDevice,
    shape: impl Into<Shape>,
) -> Tensor {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone()));
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}

/// The dtype suffix of the kernels' names, once the kernels are known to take this dtype and
/// head dimension.
fn suffix(dtype: DType, head_dim: usize) -> Result<&'static str> {
    if !crate::flash::gpu_supports(dtype, head_dim) {
        candle_core::bail!(
            "flash attention: no CUDA kernel for {dtype:?} at head_dim {head_dim} (bf16 or f16, \
             head_dim in {:?})",
            crate::flash::GPU_HEAD_DIMS
        );
    }
    Ok(match dtype {
        DType::BF16 => "bf16",
        _ => "f16",
    })
}

/// Lets `func` take `bytes` of dynamic shared memory: above 48 KiB a kernel must ask for it.
fn allow_shared(func: &CudaFunction, bytes: u32) -> Result<()> {
    func.set_attribute(
        CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        bytes as i32,
    )
    .w()
}

/// (output [B, S, Hq, D], lse [B, Hq, S] f32), by the forward kernel for `tile`.
pub(crate) fn forward(
    sh: AttentionShape,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: (&Tensor, bool),
    tile: ForwardTile,
) -> Result<(Tensor, Tensor)> {
    let name = suffix(q.dtype(), sh.head_dim)?;
    match q.dtype() {
        DType::BF16 => forward_typed::<half::bf16>(name, sh, q, k, v, segments, tile),
        _ => forward_typed::<half::f16>(name, sh, q, k, v, segments, tile),
    }
}

fn forward_typed<T: CudaDType + DeviceRepr>(
    suffix: &str,
    sh: AttentionShape,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (segments, ordered): (&Tensor, bool),
    tile: ForwardTile,
) -> Result<(Tensor, Tensor)> {
    let AttentionShape {
        batch: b,
        q_heads: hq,
        kv_heads: hkv,
        seq: s,
        head_dim: d,
    } = sh;
    let (qs, ks, vs, ss) = (
        q.storage_and_layout().0,
        k.storage_and_layout().0,
        v.storage_and_layout().0,
        segments.storage_and_layout().0,
    );
    let dev = device_of(&qs)?;
    let sms = dev
        .cuda_stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .w()?;
    let kernel = tile.kernel(s, b * hq, sms.max(1) as usize);
    let name = match kernel {
        FlashKernel::ForwardWide => format!("flash_forward_wide_{suffix}_d{d}"),
        _ => format!("flash_forward_{suffix}_d{d}"),
    };
    let func = dev.get_or_load_custom_func(&name, FLASH_ATTENTION.name, FLASH_ATTENTION.ptx)?;
    let (qv, kv, vv) = (
        view::<T>(&qs, q, "q")?,
        view::<T>(&ks, k, "k")?,
        view::<T>(&vs, v, "v")?,
    );
    let sv = view::<u32>(&ss, segments, "segments")?;
    // SAFETY: the kernel writes every row of the output and of the log-sum-exp.
    let out = unsafe { dev.alloc::<T>(b * s * hq * d)? };
    let lse = unsafe { dev.alloc::<f32>(b * hq * s)? };
    let (s32, hq32, hkv32, ordered) = (s as i32, hq as i32, hkv as i32, i32::from(ordered));
    let scale = 1.0 / (d as f32).sqrt();
    let elem = std::mem::size_of::<T>();
    let strides = [
        Strides::of(q),
        Strides::of(k),
        Strides::of(v),
        Strides::merged(hq, s, d),
    ];
    let mut args = func.builder();
    args.arg(&qv).arg(&kv).arg(&vv).arg(&sv).arg(&ordered);
    args.arg(&out).arg(&lse);
    args.arg(&s32).arg(&hq32).arg(&hkv32).arg(&scale);
    for st in &strides {
        args.arg(st);
    }
    if b * hq * s > 0 {
        let geometry = flash_tiles(kernel, s, b * hq, d, elem)?;
        allow_shared(&func, geometry.shared_bytes)?;
        // SAFETY: the argument list matches flash_forward_*'s signature.
        unsafe { args.launch(geometry.into()) }.w()?;
    }
    Ok((
        tensor(out, &dev, (b, s, hq, d)),
        tensor(lse, &dev, (b, hq, s)),
    ))
}

/// What the dq and the dk / dv kernels both take first, in their order.
struct GradientInputs<'a, T> {
    q: &'a CudaView<'a, T>,
    k: &'a CudaView<'a, T>,
    v: &'a CudaView<'a, T>,
    segments: &'a CudaView<'a, u32>,
    ordered: &'a i32,
    dout: &'a CudaView<'a, T>,
    lse: &'a CudaView<'a, f32>,
    delta: &'a CudaSlice<f32>,
}

impl<'a, T: DeviceRepr> GradientInputs<'a, T> {
    fn push(&self, args: &mut LaunchArgs<'a>) {
        args.arg(self.q).arg(self.k).arg(self.v).arg(self.segments);
        args.arg(self.ordered)
            .arg(self.dout)
            .arg(self.lse)
            .arg(self.delta);
    }
}

/// (dq [B, Hq, S, D], dk, dv [B, Hkv, S, D]).
pub(crate) fn backward(
    sh: AttentionShape,
    qkv: (&Tensor, &Tensor, &Tensor),
    segments: (&Tensor, bool),
    out_lse: (&Tensor, &Tensor),
    dout: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let name = suffix(qkv.0.dtype(), sh.head_dim)?;
    match qkv.0.dtype() {
        DType::BF16 => backward_typed::<half::bf16>(name, sh, qkv, segments, out_lse, dout),
        _ => backward_typed::<half::f16>(name, sh, qkv, segments, out_lse, dout),
    }
}

fn backward_typed<T: CudaDType + DeviceRepr>(
    suffix: &str,
    sh: AttentionShape,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    (segments, ordered): (&Tensor, bool),
    (out, lse): (&Tensor, &Tensor),
    dout: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let AttentionShape {
        batch: b,
        q_heads: hq,
        kv_heads: hkv,
        seq: s,
        head_dim: d,
    } = sh;
    let storages = [q, k, v, out, dout].map(|t| t.storage_and_layout().0);
    let (ss, ls) = (segments.storage_and_layout().0, lse.storage_and_layout().0);
    let dev = device_of(&storages[0])?;
    let load = |name: String| {
        dev.get_or_load_custom_func(&name, FLASH_ATTENTION.name, FLASH_ATTENTION.ptx)
    };
    let [qv, kv, vv, ov, dov] = [
        view::<T>(&storages[0], q, "q")?,
        view::<T>(&storages[1], k, "k")?,
        view::<T>(&storages[2], v, "v")?,
        view::<T>(&storages[3], out, "out")?,
        view::<T>(&storages[4], dout, "dout")?,
    ];
    let sv = view::<u32>(&ss, segments, "segments")?;
    let lv = view::<f32>(&ls, lse, "lse")?;
    let (s32, hq32, hkv32, d32) = (s as i32, hq as i32, hkv as i32, d as i32);
    let ordered = i32::from(ordered);
    let scale = 1.0 / (d as f32).sqrt();
    let elem = std::mem::size_of::<T>();
    let (qst, kst, vst, ost, dost) = (
        Strides::of(q),
        Strides::of(k),
        Strides::of(v),
        Strides::of_merged(out),
        Strides::of_merged(dout),
    );
    let rows = b * hq * s;
    if rows == 0 {
        let z = |heads| Tensor::zeros((b, heads, s, d), q.dtype(), q.device());
        return Ok((z(hq)?, z(hkv)?, z(hkv)?));
    }

    // delta = Σ_d dO · O per query row: a warp per row, eight a block.
    let delta_fn = load(format!("flash_delta_{suffix}"))?;
    // SAFETY: the kernel writes every row's delta.
    let delta = unsafe { dev.alloc::<f32>(rows)? };
    let rows64 = rows as i64;
    let mut args = delta_fn.builder();
    args.arg(&ov).arg(&dov).arg(&delta).arg(&rows64);
    args.arg(&s32).arg(&hq32).arg(&d32).arg(&ost).arg(&dost);
    // SAFETY: the argument list matches flash_delta_*'s signature.
    unsafe { args.launch(warp_per_row(rows).into()) }.w()?;

    // dq: q, dO, v and two key tiles, and two tiles' key segments (FlashKernel::BackwardDq).
    let dq_fn = load(format!("flash_backward_dq_{suffix}_d{d}"))?;
    // SAFETY: the kernel writes every row of dq.
    let dq = unsafe { dev.alloc::<T>(rows * d)? };
    let geometry = flash_tiles(FlashKernel::BackwardDq, s, b * hq, d, elem)?;
    allow_shared(&dq_fn, geometry.shared_bytes)?;
    let inputs = GradientInputs {
        q: &qv,
        k: &kv,
        v: &vv,
        segments: &sv,
        ordered: &ordered,
        dout: &dov,
        lse: &lv,
        delta: &delta,
    };
    let mut args = dq_fn.builder();
    inputs.push(&mut args);
    args.arg(&dq);
    args.arg(&s32).arg(&hq32).arg(&hkv32).arg(&scale);
    // The gradients are written heads merged [B, S, H, D], as the projections' backward
    // reads them, and returned as [B, H, S, D] views.
    let dqst = Strides::merged(hq, s, d);
    for st in [&qst, &kst, &vst, &dost, &dqst] {
        args.arg(st);
    }
    // SAFETY: the argument list matches flash_backward_dq_*'s signature.
    unsafe { args.launch(geometry.into()) }.w()?;

    // dk, dv: k, v, dO and two query tiles, then two tiles' query segments, lse and delta
    // (FlashKernel::BackwardDkDv).
    let kv_fn = load(format!("flash_backward_dkdv_{suffix}_d{d}"))?;
    let kv_len = b * hkv * s * d;
    // SAFETY: the kernel writes every row of dk and dv.
    let dk = unsafe { dev.alloc::<T>(kv_len)? };
    let dv = unsafe { dev.alloc::<T>(kv_len)? };
    let geometry = flash_tiles(FlashKernel::BackwardDkDv, s, b * hkv, d, elem)?;
    allow_shared(&kv_fn, geometry.shared_bytes)?;
    let mut args = kv_fn.builder();
    inputs.push(&mut args);
    args.arg(&dk).arg(&dv);
    args.arg(&s32).arg(&hq32).arg(&hkv32).arg(&scale);
    let kvst = Strides::merged(hkv, s, d);
    for st in [&qst, &kst, &vst, &dost, &kvst, &kvst] {
        args.arg(st);
    }
    // SAFETY: the argument list matches flash_backward_dkdv_*'s signature.
    unsafe { args.launch(geometry.into()) }.w()?;

    Ok((
        tensor(dq, &dev, (b, s, hq, d)).transpose(1, 2)?,
        tensor(dk, &dev, (b, s, hkv, d)).transpose(1, 2)?,
        tensor(dv, &dev, (b, s, hkv, d)).transpose(1, 2)?,
    ))
}
