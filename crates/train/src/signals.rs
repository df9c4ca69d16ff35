//! Preemption: the first SIGTERM or SIGINT (Slurm sends SIGTERM before killing a job) asks the
//! run to finish its step, save a checkpoint and exit 0; another one at least
//! [`REPEAT_AFTER`] later exits at once.
//!
//! Signals closer together than that are one request delivered twice: Ctrl-C in a terminal
//! reaches every process of the foreground group, the ranks included, and the launcher then
//! forwards a SIGTERM of its own; Slurm signals every process of a step, launcher and ranks
//! alike. Counting those as a second signal would abort the ranks without a checkpoint.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use signal_hook::consts::{SIGINT, SIGTERM};

/// Exit status after a second signal (128 + SIGINT, what shells report for Ctrl-C).
pub const ABORT_STATUS: i32 = 130;

/// How long after the first signal another one counts as a second, not a repeat of the first.
pub const REPEAT_AFTER: Duration = Duration::from_secs(1);

/// Set by the first signal: the nanoseconds after `install` it came, plus one (0: none yet).
#[derive(Clone)]
pub struct StopRequest(Arc<AtomicU64>);

impl StopRequest {
    /// Installs the handlers for this process.
    pub fn install() -> Result<Self> {
        let first = Arc::new(AtomicU64::new(0));
        let base = Instant::now();
        for sig in [SIGTERM, SIGINT] {
            let first = first.clone();
            // SAFETY: the handler reads the monotonic clock, touches an atomic and may call
            // _exit, all async-signal-safe.
            unsafe {
                signal_hook::low_level::register(sig, move || {
                    let now = base.elapsed().as_nanos() as u64 + 1;
                    if let Err(t) =
                        first.compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst)
                    {
                        if now.saturating_sub(t) >= REPEAT_AFTER.as_nanos() as u64 {
                            signal_hook::low_level::exit(ABORT_STATUS)
                        }
                    }
                })
            }
            .context("cannot install the signal handlers")?;
        }
        Ok(Self(first))
    }

    pub fn requested(&self) -> bool {
        self.0.load(Ordering::SeqCst) != 0
    }
}
