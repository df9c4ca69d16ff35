//! Saving on a background thread, so a training step does not wait for the disk: the trainer
//! hands over host copies and goes on; it waits only if the previous save is still running when
//! the next one is due (the stall, which it reports).

use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};

use crate::{Checkpoint, CheckpointStore, SaveRendezvous};

/// What one save wrote.
#[derive(Debug, Clone)]
pub struct SaveReport {
    pub step: u64,
    pub dir: PathBuf,
    pub bytes: u64,
    pub seconds: f64,
    /// Old checkpoints removed to keep `save_total_limit`.
    pub removed: Vec<PathBuf>,
    /// Why an old checkpoint could not be removed (on NFS a file still open elsewhere keeps
    /// its directory): the save itself stands, and training goes on.
    pub prune_error: Option<String>,
}

pub struct BackgroundWriter {
    jobs: Option<Sender<Checkpoint>>,
    done: Receiver<Result<SaveReport>>,
    in_flight: bool,
    thread: Option<JoinHandle<()>>,
}

impl BackgroundWriter {
    /// Starts the thread; `peers` when this process is one rank of several (see
    /// [`SaveRendezvous`]).
    pub fn spawn(store: CheckpointStore, peers: Option<Box<dyn SaveRendezvous>>) -> Self {
        let (jobs, job_rx) = channel::<Checkpoint>();
        let (done_tx, done) = channel();
        let thread = std::thread::Builder::new()
            .name("helix-checkpoint".into())
            .spawn(move || {
                for ckpt in job_rx {
                    if done_tx.send(store.save(&ckpt, peers.as_deref())).is_err() {
                        break;
                    }
                }
            })
            .expect("spawn the checkpoint thread");
        Self {
            jobs: Some(jobs),
            done,
            in_flight: false,
            thread: Some(thread),
        }
    }

    /// Waits for the save in flight, if any; its report, or its error.
    pub fn wait(&mut self) -> Result<Option<SaveReport>> {
        if !self.in_flight {
            return Ok(None);
        }
        self.in_flight = false;
        let report = self
            .done
            .recv()
            .map_err(|_| anyhow!("the checkpoint thread stopped"))??;
        Ok(Some(report))
    }

    /// Hands `ckpt` to the thread after the previous save finished. Returns that previous
    /// save's report and how long this call waited for it (the stall).
    pub fn submit(&mut self, ckpt: Checkpoint) -> Result<(Option<SaveReport>, Duration)> {
        let t = Instant::now();
        let previous = self.wait()?;
        let stall = t.elapsed();
        self.jobs
            .as_ref()
            .expect("open until drop")
            .send(ckpt)
            .map_err(|_| anyhow!("the checkpoint thread stopped"))?;
        self.in_flight = true;
        Ok((previous, stall))
    }
}

impl Drop for BackgroundWriter {
    fn drop(&mut self) {
        // Closing the channel ends the thread once the save in flight is done.
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
