//! Launching the multi-tensor kernels (kernels/cuda/adamw.cu, sum_squares.cu): the list of
//! tensors goes to the device as a table of addresses and sizes ([`crate::launch::AdamWTensor`],
//! [`crate::launch::SquaresTensor`]), copied with the launch on candle's stream, and one launch
//! covers them all.

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, DType, Device, Result, Storage, Tensor};

use crate::adamw::{AdamWParam, AdamWStep};
use crate::cuda::Module;
use crate::launch::{self, AdamWConstants, AdamWTensor, SquaresTensor};

// SAFETY: #[repr(C)] plain f32 fields, as adamw.cu's AdamWConstants.
unsafe impl DeviceRepr for AdamWConstants {}

const ADAMW: Module = Module {
    name: "helix_adamw",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/adamw.ptx")),
};

const SUM_SQUARES: Module = Module {
    name: "helix_sum_squares",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/sum_squares.ptx")),
};

/// The GPU `t` lives on.
fn gpu_of(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Ok(d.clone()),
        other => candle_core::bail!("a multi-tensor launch on {other:?}"),
    }
}

/// The device address of `t`'s first element; `t` must be contiguous. The address stays valid
/// while `t` lives; work queued on candle's one stream before `t` is freed sees it.
fn address(t: &Tensor, what: &str) -> Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        candle_core::bail!("{what} is not on the GPU");
    };
    if !layout.is_contiguous() {
        candle_core::bail!("{what} is not contiguous");
    }
    let stream = s.device.cuda_stream();
    let base = match t.dtype() {
        DType::F32 => s.as_cuda_slice::<f32>()?.device_ptr(&stream).0,
        DType::BF16 => s.as_cuda_slice::<half::bf16>()?.device_ptr(&stream).0,
        DType::F16 => s.as_cuda_slice::<half::f16>()?.device_ptr(&stream).0,
        other => candle_core::bail!("{what}: no multi-tensor kernel for {other:?}"),
    };
    Ok(base + (layout.start_offset() * t.dtype().size_in_bytes()) as u64)
}

/// A table of #[repr(C)] entries on the device.
fn upload<E: Copy>(dev: &CudaDevice, entries: &[E]) -> Result<CudaSlice<u8>> {
    // SAFETY: E is a #[repr(C)] struct of plain integers and floats with no padding bytes
    // (AdamWTensor and SquaresTensor: 8-byte fields, and two 4-byte fields at the end).
    let bytes = unsafe {
        std::slice::from_raw_parts(
            entries.as_ptr().cast::<u8>(),
            std::mem::size_of_val(entries),
        )
    };
    dev.cuda_stream().clone_htod(bytes).w()
}

/// `adamw_{f32,bf16,f16}` over `params`, one launch per parameter dtype; see
/// [`crate::adamw_step`].
pub(crate) fn adamw(params: &[AdamWParam<'_>], st: &AdamWStep) -> Result<()> {
    for (dtype, suffix) in [
        (DType::F32, "f32"),
        (DType::BF16, "bf16"),
        (DType::F16, "f16"),
    ] {
        let group: Vec<&AdamWParam> = params
            .iter()
            .filter(|p| p.param.dtype() == dtype && p.param.elem_count() > 0)
            .collect();
        if group.is_empty() {
            continue;
        }
        let lens: Vec<usize> = group.iter().map(|p| p.param.elem_count()).collect();
        let (first_blocks, geometry) = launch::tensor_list(&lens)?;
        // Gradients as the kernel reads them (a no-op for the contiguous ones backward makes),
        // alive until the launch is queued.
        let grads = group
            .iter()
            .map(|p| p.grad.contiguous())
            .collect::<Result<Vec<_>>>()?;
        let dev = gpu_of(group[0].param.as_tensor())?;
        let mut entries = Vec::with_capacity(group.len());
        for ((p, grad), first_block) in group.iter().zip(&grads).zip(first_blocks) {
            entries.push(AdamWTensor {
                param: address(p.param.as_tensor(), "an AdamW parameter")?,
                master: match &p.master {
                    Some(m) => address(m, "an AdamW master")?,
                    None => 0,
                },
                m: address(p.exp_avg, "an AdamW exp_avg")?,
                v: address(p.exp_avg_sq, "an AdamW exp_avg_sq")?,
                g: address(grad, "an AdamW gradient")?,
                n: p.param.elem_count() as i64,
                first_block,
                decay: match p.decays {
                    true => st.decay as f32,
                    false => 1.0,
                },
                unused: 0,
            });
        }
        let table = upload(&dev, &entries)?;
        let func =
            dev.get_or_load_custom_func(&format!("adamw_{suffix}"), ADAMW.name, ADAMW.ptx)?;
        let count = entries.len() as i32;
        let constants = st.kernel_constants();
        let mut b = func.builder();
        b.arg(&table).arg(&count).arg(&constants);
        // SAFETY: the arguments match adamw_*'s signature; the table's addresses are of
        // tensors `params` holds, whose shapes adamw_step checked.
        unsafe { b.launch(geometry.into()) }.w()?;
    }
    Ok(())
}

/// `sum_squares_f32` over `tensors`; see [`crate::sums_of_squares`].
pub(crate) fn sums_of_squares(tensors: &[&Tensor]) -> Result<Vec<f64>> {
    let nonempty: Vec<(usize, Tensor)> = tensors
        .iter()
        .enumerate()
        .filter(|(_, t)| t.elem_count() > 0)
        .map(|(i, t)| Ok((i, t.contiguous()?)))
        .collect::<Result<_>>()?;
    let mut sums = vec![0f64; tensors.len()];
    if nonempty.is_empty() {
        return Ok(sums);
    }
    let lens: Vec<usize> = nonempty.iter().map(|(_, t)| t.elem_count()).collect();
    let (first_blocks, geometry) = launch::tensor_list(&lens)?;
    let dev = gpu_of(&nonempty[0].1)?;
    let entries = nonempty
        .iter()
        .zip(&first_blocks)
        .map(|((_, t), &first_block)| {
            Ok(SquaresTensor {
                x: address(t, "a tensor to sum the squares of")?,
                n: t.elem_count() as i64,
                first_block,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let table = upload(&dev, &entries)?;
    let blocks = geometry.grid.0 as usize;
    // SAFETY: the kernel writes one partial per block.
    let partials = unsafe { dev.alloc::<f32>(blocks)? };
    let func = dev.get_or_load_custom_func("sum_squares_f32", SUM_SQUARES.name, SUM_SQUARES.ptx)?;
    let count = entries.len() as i32;
    let mut b = func.builder();
    b.arg(&table).arg(&count).arg(&partials);
    // SAFETY: the arguments match sum_squares_f32's signature.
    unsafe { b.launch(geometry.into()) }.w()?;
    let partials = dev.cuda_stream().clone_dtoh(&partials).w()?;
    // Each tensor's blocks run from its first block to the next tensor's.
    let ends = first_blocks
        .iter()
        .skip(1)
        .map(|&b| b as usize)
        .chain([blocks]);
    for (((i, _), &start), end) in nonempty.iter().zip(&first_blocks).zip(ends) {
        sums[*i] = partials[start as usize..end]
            .iter()
            .map(|&p| p as f64)
            .sum();
    }
    Ok(sums)
}
