//! Weighted mixtures of training files (`[[data.mix]]` with weights), as NeMo's
//! `concat_sampling_probabilities` blends datasets: a mixture of N samples gives each file
//! its weight's share of N (largest remainder, so the counts add up to N exactly), and a file
//! gives its share as whole copies of itself plus a seeded sample, without replacement, of
//! the rest. The mixture is drawn once per run from `data.seed`; each epoch then shuffles it
//! like any training set, so a resumed run draws the same mixture.

use std::path::PathBuf;

use anyhow::{bail, Result};
use serde::Serialize;

use crate::sampler::SplitMix64;

/// How many of `total` samples each weight's share is: proportional, rounded by largest
/// remainder (ties to the earlier file), summing to `total`.
pub fn apportion(weights: &[f64], total: usize) -> Vec<usize> {
    let sum: f64 = weights.iter().sum();
    let exact: Vec<f64> = weights.iter().map(|w| w / sum * total as f64).collect();
    let mut counts: Vec<usize> = exact.iter().map(|e| e.floor() as usize).collect();
    let short = total.saturating_sub(counts.iter().sum());
    let mut by_remainder: Vec<usize> = (0..weights.len()).collect();
    // Stable: equal remainders keep file order.
    by_remainder.sort_by(|&a, &b| {
        let (ra, rb) = (exact[a] - exact[a].floor(), exact[b] - exact[b].floor());
        rb.total_cmp(&ra)
    });
    for &i in by_remainder.iter().take(short) {
        counts[i] += 1;
    }
    counts
}

/// `count` indices into `available` samples: each index `count / available` times, then
/// `count % available` distinct ones drawn with `seed`; sorted, so the mixture keeps file
/// order until the epoch's shuffle.
pub fn draw(available: usize, count: usize, seed: u64) -> Result<Vec<usize>> {
    if available == 0 {
        if count == 0 {
            return Ok(Vec::new());
        }
        bail!("{count} samples cannot be drawn from none");
    }
    let (copies, rest) = (count / available, count % available);
    let mut drawn: Vec<usize> = (0..available)
        .flat_map(|i| std::iter::repeat_n(i, copies))
        .collect();
    // A partial Fisher–Yates shuffle: its first `rest` slots are a uniform sample.
    let mut order: Vec<usize> = (0..available).collect();
    let mut rng = SplitMix64::new(seed);
    for i in 0..rest {
        let j = i + rng.below((available - i) as u64) as usize;
        order.swap(i, j);
    }
    drawn.extend_from_slice(&order[..rest]);
    drawn.sort_unstable();
    Ok(drawn)
}

/// The seed of file `index`'s draw: the run's, moved so files of equal size draw differently.
pub fn draw_seed(seed: u64, index: usize) -> u64 {
    seed ^ (index as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03)
}

/// What one file gave the training set.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct MixShare {
    /// `mix[i]`, as in the report's sources.
    pub source: String,
    pub file: PathBuf,
    /// Its weight over the sum of the weights (None: taken whole, unweighted).
    pub share: Option<f64>,
    /// Its training samples (after the split and the length policy).
    pub samples: usize,
    /// How many the mixture holds: `samples` without weights.
    pub drawn: usize,
    /// `drawn / samples`: times each sample is seen per epoch, on average.
    pub passes: f64,
}

impl std::fmt::Display for MixShare {
    /// `data.mix[0] = a.jsonl: 19 training samples, 97 drawn (share 0.300, 5.11 passes)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "data.{} = {}: {} training samples",
            self.source,
            self.file.display(),
            self.samples
        )?;
        match self.share {
            Some(share) => write!(
                f,
                ", {} drawn (share {share:.3}, {:.2} passes per epoch)",
                self.drawn, self.passes
            ),
            None => write!(f, ", each taken once"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up_to_the_total_and_follow_the_weights() {
        assert_eq!(apportion(&[0.3, 0.7], 10), [3, 7]);
        assert_eq!(apportion(&[3.0, 7.0], 10), [3, 7]);
        // Thirds of 10: one sample left over goes to the earliest of equal remainders.
        assert_eq!(apportion(&[1.0, 1.0, 1.0], 10), [4, 3, 3]);
        // 2/3 of 10 = 6.67 takes the leftover before 1/3 = 3.33.
        assert_eq!(apportion(&[1.0, 2.0], 10), [3, 7]);
        assert_eq!(apportion(&[1.0, 1.0], 0), [0, 0]);
        for total in [1, 7, 100, 1001] {
            let c = apportion(&[0.05, 0.15, 0.8], total);
            assert_eq!(c.iter().sum::<usize>(), total);
            for (c, w) in c.iter().zip([0.05, 0.15, 0.8]) {
                assert!((*c as f64 - w * total as f64).abs() < 1.0, "{c} of {total}");
            }
        }
    }

    #[test]
    fn a_file_gives_whole_copies_and_a_sample_without_replacement() -> Result<()> {
        let d = draw(4, 10, 7)?;
        assert_eq!(d.len(), 10);
        let times = |i| d.iter().filter(|&&x| x == i).count();
        // Two copies of everything, and two distinct samples a third time.
        assert!((0..4).all(|i| times(i) == 2 || times(i) == 3));
        assert_eq!((0..4).filter(|&i| times(i) == 3).count(), 2);
        assert!(d.windows(2).all(|w| w[0] <= w[1]));
        // Fewer than the file holds: distinct samples only.
        let d = draw(100, 30, 7)?;
        let mut u = d.clone();
        u.dedup();
        assert_eq!(u.len(), 30);
        assert_eq!(draw(100, 100, 7)?, (0..100).collect::<Vec<_>>());
        // The seed decides which, and only the seed.
        assert_eq!(draw(100, 30, 7)?, d);
        assert_ne!(draw(100, 30, 8)?, d);
        assert_ne!(draw_seed(1, 0), draw_seed(1, 1));
        assert!(draw(0, 1, 7).is_err());
        assert!(draw(0, 0, 7)?.is_empty());
        Ok(())
    }

    #[test]
    fn every_sample_is_equally_likely_to_be_drawn() -> Result<()> {
        // 5 of 10, over 2,000 seeds: each index about 1,000 times (binomial sd ≈ 22).
        let mut times = [0usize; 10];
        for seed in 0..2000 {
            for i in draw(10, 5, seed)? {
                times[i] += 1;
            }
        }
        assert!(times.iter().all(|&t| (900..1100).contains(&t)), "{times:?}");
        Ok(())
    }
}
