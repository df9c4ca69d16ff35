//! Preemption: the first SIGTERM or SIGINT (Slurm sends SIGTERM before killing a job) asks the
//! run to finish its step, save a checkpoint and exit 0; another one at least
//! [`REPEAT_AFTER`] later exits at once.
//!
//! Signals closer together than that are one request delivered twice: Ctrl-C in a terminal
//! reaches every process of the foreground group, the ranks included, and the launcher then
//! forwards a SIGTERM of its own; Slurm signals every process of a step, launcher and ranks
//! alike. Counting those as a second signal would abort the ranks without a checkpoint.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use signal_hook::consts::{SIGINT, SIGTERM};

/// Exit status after a second signal (128 + SIGINT, what shells report for Ctrl-C).
pub const ABORT_STATUS: i32 = 130;

/// How long after the first signal another one counts as a second, not a repeat of the first.
pub const REPEAT_AFTER: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct StopRequest(Arc<AtomicBool>);

impl StopRequest {
    /// Installs the handlers for this process.
    pub fn install() -> Result<Self> {
        let flag = Arc::new(AtomicBool::new(false));
        // Nanoseconds after `base` of the first signal, plus one (0: none yet).
        let first = Arc::new(AtomicU64::new(0));
        let base = Instant::now();
        for sig in [SIGTERM, SIGINT] {
            let (flag, first) = (flag.clone(), first.clone());
            // SAFETY: the handler reads the monotonic clock, touches atomics and may call
            // _exit, all async-signal-safe.
            unsafe {
                signal_hook::low_level::register(sig, move || {
                    let now = base.elapsed().as_nanos() as u64 + 1;
                    match first.compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst) {
                        Ok(_) => flag.store(true, Ordering::SeqCst),
                        Err(t) if now.saturating_sub(t) >= REPEAT_AFTER.as_nanos() as u64 => {
                            signal_hook::low_level::exit(ABORT_STATUS)
                        }
                        Err(_) => {}
                    }
                })
            }
            .context("cannot install the signal handlers")?;
        }
        Ok(Self(flag))
    }

    pub fn requested(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}
