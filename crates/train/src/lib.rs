//! The training side of `helix-train`: the config file ([`config`]), the fine-tuning recipe
//! ([`recipe`]), the analytic cluster model ([`plan`]), with its optimizer ([`optim`]), schedule ([`schedule`]), checkpoint state
//! ([`state`]), signal handling ([`signals`]), and what it shows and writes ([`progress`],
//! [`plot`] over a small raster canvas). `main.rs` is only the command line over these.

pub mod config;
pub mod gradients;
pub mod kernel_check;
pub mod optim;
pub mod plan;
pub mod plot;
pub mod progress;
mod raster;
pub mod recipe;
pub mod schedule;
pub mod signals;
pub mod state;

use candle_core::Device;

/// The device a run computes on: the first GPU when built with `cuda`, else the CPU.
pub fn device() -> anyhow::Result<Device> {
    #[cfg(feature = "cuda")]
    {
        return Ok(Device::new_cuda(0)?);
    }
    #[allow(unreachable_code)]
    Ok(Device::Cpu)
}
