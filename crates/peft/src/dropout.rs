//! Inverted dropout with masks fixed by a seed and a call counter, so a run (and a resumed run
//! that restores the counter) draws exactly the same masks. Each mask is a function of its key
//! (seed, stream, call) and the element's index, drawn on the tensor's device
//! ([`helix_ops::dropout`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use candle_core::{Result, Tensor};

pub struct SeededDropout {
    p: f64,
    seed: u64,
    /// Which stream of the seed to draw from (a data-parallel rank's own masks).
    stream: AtomicU64,
    calls: AtomicU64,
    training: AtomicBool,
}

impl SeededDropout {
    pub fn new(p: f64, seed: u64) -> Self {
        Self {
            p,
            seed,
            stream: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            training: AtomicBool::new(true),
        }
    }

    /// Train mode drops; eval mode is the identity.
    pub fn set_training(&self, on: bool) {
        self.training.store(on, Ordering::Relaxed);
    }

    pub fn is_training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }

    /// Draws from stream `k` of the seed: data-parallel rank k's masks differ from the other
    /// ranks' (stream 0 is what a single process draws).
    pub fn set_stream(&self, k: u64) {
        self.stream.store(k, Ordering::Relaxed);
    }

    /// Masks drawn so far (saved in checkpoints so a resumed run draws the next ones).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    pub fn set_calls(&self, n: u64) {
        self.calls.store(n, Ordering::Relaxed);
    }

    /// Whether [`Self::apply`] returns its input unchanged (p = 0, or eval mode).
    pub fn is_identity(&self) -> bool {
        self.p == 0.0 || !self.training.load(Ordering::Relaxed)
    }

    /// `x · mask / (1 − p)` with a fresh Bernoulli(1 − p) mask, in train mode with p > 0.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        match self.next_mask() {
            Some((p, key)) => helix_ops::dropout(x, p, key),
            None => Ok(x.clone()),
        }
    }

    /// The next mask, as (p, its key for [`helix_ops::dropout`]), counted as drawn; `None`
    /// where [`Self::apply`] is the identity. A layer differentiated by hand takes the key and
    /// draws the mask itself, in its forward and again in its backward.
    pub fn next_mask(&self) -> Option<(f64, u64)> {
        if self.is_identity() {
            return None;
        }
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        let stream = self.stream.load(Ordering::Relaxed);
        Some((self.p, helix_ops::dropout_key(self.seed, stream, call)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn drops_about_p_and_keeps_the_mean_and_repeats_from_the_counter() -> Result<()> {
        let d = SeededDropout::new(0.25, 7);
        let x = Tensor::ones(10_000, candle_core::DType::F32, &Device::Cpu)?;
        let y = d.apply(&x)?.to_vec1::<f32>()?;
        let zeros = y.iter().filter(|v| **v == 0.0).count() as f64 / y.len() as f64;
        assert!((zeros - 0.25).abs() < 0.02, "dropped {zeros}");
        let mean = y.iter().sum::<f32>() / y.len() as f32;
        assert!((mean - 1.0).abs() < 0.03, "mean {mean}");
        let second = d.apply(&x)?.to_vec1::<f32>()?;
        assert_ne!(y, second, "each call draws a new mask");
        d.set_calls(1);
        assert_eq!(d.apply(&x)?.to_vec1::<f32>()?, second, "restored counter");
        d.set_training(false);
        assert_eq!(d.apply(&x)?.to_vec1::<f32>()?, vec![1.0; 10_000]);
        Ok(())
    }
}
