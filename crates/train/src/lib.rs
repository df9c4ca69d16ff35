//! The training side of `helix-train`: the config file ([`config`]), the fine-tuning recipe
//! ([`recipe`]) and its output directory ([`outputs`]), the analytic cluster model ([`plan`]), with its optimizer ([`optim`]), schedule ([`schedule`]), checkpoint state
//! ([`state`]), signal handling ([`signals`]), and what it shows and writes ([`progress`],
//! [`plot`] over a small raster canvas). `main.rs` is only the command line over these.

// Checks like `!(eps > 0.0)` are written that way on purpose: they reject NaN too.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

pub mod attention_bench;
pub mod comm_check;
pub mod config;
pub mod freed_memory;
pub mod gradients;
pub mod kernel_check;
pub mod optim;
pub mod outputs;
pub mod plan;
pub mod plot;
pub mod progress;
mod raster;
pub mod recipe;
pub mod schedule;
pub mod signals;
pub mod state;
pub mod step_bench;
pub mod tensorboard;

use candle_core::Device;

/// The device a rank computes on: with `cuda`, GPU `local_rank` — or the only GPU it sees,
/// when the launcher gives each rank one (srun --gpus-per-task=1, CUDA_VISIBLE_DEVICES);
/// otherwise the CPU. Either way the allocator then keeps freed memory ([`freed_memory`]).
pub fn device(local_rank: usize) -> anyhow::Result<Device> {
    #[cfg(feature = "cuda")]
    {
        use anyhow::Context;
        let visible = candle_core::cuda::cudarc::driver::CudaContext::device_count()
            .map_err(|e| anyhow::anyhow!("counting CUDA devices: {e:?}"))?
            as usize;
        let ordinal = match visible {
            0 => anyhow::bail!("this build computes on a GPU, and none is visible"),
            1 => 0,
            n if local_rank < n => local_rank,
            n => anyhow::bail!(
                "local rank {local_rank} has no GPU of its own: {n} are visible \
                 (start at most {n} ranks per node)"
            ),
        };
        let device = Device::new_cuda(ordinal).with_context(|| format!("opening GPU {ordinal}"))?;
        if let Device::Cuda(cuda) = &device {
            // Every kernel, copy and NCCL call of a run goes on the device's one stream, so
            // cudarc's cross-stream events (two created per allocation, recorded and waited on
            // for every argument of every launch) order nothing and only cost host time.
            // SAFETY: no other stream exists in this process.
            unsafe { cuda.disable_event_tracking() };
            freed_memory::keep_freed_gpu_memory(cuda)
                .with_context(|| format!("configuring GPU {ordinal}'s allocator"))?;
        }
        return Ok(device);
    }
    #[allow(unreachable_code)]
    {
        let _ = local_rank;
        freed_memory::keep_freed_host_memory();
        Ok(Device::Cpu)
    }
}

/// "cpu" or "cuda:N", for what a run prints.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        _ => "cpu".into(),
    }
}
