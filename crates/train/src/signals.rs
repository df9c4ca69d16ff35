//! Preemption: the first SIGTERM or SIGINT (Slurm sends SIGTERM before killing a job) asks the
//! run to finish its step, save a checkpoint and exit 0; a second one exits at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use signal_hook::consts::{SIGINT, SIGTERM};

/// Exit status after a second signal (128 + SIGINT, what shells report for Ctrl-C).
pub const ABORT_STATUS: i32 = 130;

#[derive(Clone)]
pub struct StopRequest(Arc<AtomicBool>);

impl StopRequest {
    /// Installs the handlers for this process.
    pub fn install() -> Result<Self> {
        let flag = Arc::new(AtomicBool::new(false));
        for sig in [SIGTERM, SIGINT] {
            // Registered first, so it sees the flag as the first signal left it: set → exit.
            signal_hook::flag::register_conditional_shutdown(sig, ABORT_STATUS, flag.clone())
                .context("cannot install the signal handlers")?;
            signal_hook::flag::register(sig, flag.clone())
                .context("cannot install the signal handlers")?;
        }
        Ok(Self(flag))
    }

    pub fn requested(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}
