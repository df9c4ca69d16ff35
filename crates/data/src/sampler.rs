//! Deterministic, resumable, data-parallel sampling.
//!
//! Every epoch is a permutation of the items (samples, or packed rows) drawn from the seed and
//! the epoch number alone, so any rank can compute any step without state. Each micro-step takes
//! the next `world_size × micro_batch` items of the permutation; rank r takes items r, r + W,
//! r + 2W, … of that chunk. The last chunk of an epoch may be short: ranks then get at most one
//! item apart, and [`RankBatch::filler_rows`] tops every rank up to the same row count with
//! rows that carry no target, so every rank runs the same number of equal-shaped micro-batches
//! and every item is seen exactly once per epoch (nothing dropped, nothing repeated).
//!
//! The whole position is a [`Cursor`] (epoch, step); it is saved in checkpoints and a sampler
//! restored from it yields exactly what the uninterrupted one would.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Where a sampler stands: the next micro-step to yield.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    /// Micro-step within the epoch.
    pub step: u64,
}

#[derive(Clone, Debug)]
pub struct Sampler {
    items: usize,
    seed: u64,
    shuffle: bool,
    world_size: usize,
    rank: usize,
    micro_batch: usize,
}

/// One rank's share of one micro-step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankBatch {
    pub cursor: Cursor,
    /// Item indices, in order.
    pub items: Vec<usize>,
    /// Rows of padding to add so this rank's micro-batch has as many rows as every other's.
    pub filler_rows: usize,
}

impl Sampler {
    pub fn new(
        items: usize,
        seed: u64,
        shuffle: bool,
        world_size: usize,
        rank: usize,
        micro_batch: usize,
    ) -> Result<Self> {
        if world_size == 0 || rank >= world_size {
            bail!("sampler: rank {rank} is outside a world of {world_size}");
        }
        if micro_batch == 0 {
            bail!("sampler: micro_batch_size must be at least 1");
        }
        if items < world_size {
            bail!("sampler: {items} items cannot be shared by {world_size} data-parallel ranks");
        }
        Ok(Self {
            items,
            seed,
            shuffle,
            world_size,
            rank,
            micro_batch,
        })
    }

    /// Items every micro-step takes over all ranks.
    pub fn items_per_step(&self) -> usize {
        self.world_size * self.micro_batch
    }

    /// Micro-steps per epoch (the same on every rank).
    pub fn steps_per_epoch(&self) -> u64 {
        self.items.div_ceil(self.world_size * self.micro_batch) as u64
    }

    /// The epoch's order of items: a seeded Fisher–Yates permutation, or 0..n unshuffled.
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.items).collect();
        if self.shuffle {
            let mut rng = SplitMix64::new(self.seed ^ epoch.wrapping_mul(0xA076_1D64_78BD_642F));
            for i in (1..order.len()).rev() {
                let j = rng.below(i as u64 + 1) as usize;
                order.swap(i, j);
            }
        }
        order
    }

    /// This rank's items at `cursor` (which must lie within its epoch).
    pub fn batch_at(&self, cursor: Cursor, order: &[usize]) -> RankBatch {
        let (w, b) = (self.world_size, self.micro_batch);
        let start = cursor.step as usize * w * b;
        let chunk = &order[start.min(order.len())..(start + w * b).min(order.len())];
        let items: Vec<usize> = chunk.iter().skip(self.rank).step_by(w).copied().collect();
        let rows = chunk.len().div_ceil(w);
        RankBatch {
            cursor,
            filler_rows: rows - items.len(),
            items,
        }
    }

    /// The micro-step after `cursor`: the next step, or the first of the next epoch.
    pub fn advance(&self, cursor: Cursor) -> Cursor {
        if cursor.step + 1 >= self.steps_per_epoch() {
            Cursor {
                epoch: cursor.epoch + 1,
                step: 0,
            }
        } else {
            Cursor {
                epoch: cursor.epoch,
                step: cursor.step + 1,
            }
        }
    }

    /// An endless iterator over this rank's micro-steps, starting at `cursor`.
    pub fn iter_from(&self, cursor: Cursor) -> Result<SamplerIter<'_>> {
        if cursor.step >= self.steps_per_epoch() {
            bail!(
                "sampler cursor step {} is past the {} micro-steps of an epoch (was the data \
                 or the batch size changed since the checkpoint?)",
                cursor.step,
                self.steps_per_epoch()
            );
        }
        Ok(SamplerIter {
            order: self.epoch_order(cursor.epoch),
            sampler: self,
            next: cursor,
        })
    }
}

pub struct SamplerIter<'a> {
    sampler: &'a Sampler,
    order: Vec<usize>,
    next: Cursor,
}

impl SamplerIter<'_> {
    /// The cursor of the micro-step the next call yields: what a checkpoint saves.
    pub fn cursor(&self) -> Cursor {
        self.next
    }
}

impl Iterator for SamplerIter<'_> {
    type Item = RankBatch;
    fn next(&mut self) -> Option<RankBatch> {
        let batch = self.sampler.batch_at(self.next, &self.order);
        let next = self.sampler.advance(self.next);
        if next.epoch != self.next.epoch {
            self.order = self.sampler.epoch_order(next.epoch);
        }
        self.next = next;
        Some(batch)
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): a tiny generator whose output is fixed by its
/// definition, so orders never change with a dependency's version.
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n without modulo bias (rejection of the short top range).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_the_published_sequence() {
        // First outputs for seed 1234567 from the reference C implementation.
        let mut r = SplitMix64::new(1234567);
        assert_eq!(r.next_u64(), 6457827717110365317);
        assert_eq!(r.next_u64(), 3203168211198807973);
    }

    #[test]
    fn ranks_cover_each_epoch_exactly_once_with_equal_rows() -> Result<()> {
        for (items, world, micro) in [(4000, 2, 4), (4000, 3, 4), (1001, 3, 2), (10, 3, 4)] {
            let ranks: Vec<Sampler> = (0..world)
                .map(|r| Sampler::new(items, 42, true, world, r, micro))
                .collect::<Result<_>>()?;
            let steps = ranks[0].steps_per_epoch();
            for epoch in 0..2 {
                let mut seen = vec![0u32; items];
                let mut iters: Vec<_> = ranks
                    .iter()
                    .map(|s| s.iter_from(Cursor { epoch, step: 0 }))
                    .collect::<Result<_>>()?;
                for _ in 0..steps {
                    let batches: Vec<RankBatch> =
                        iters.iter_mut().map(|it| it.next().unwrap()).collect();
                    let rows = batches[0].items.len() + batches[0].filler_rows;
                    for b in &batches {
                        assert_eq!(b.items.len() + b.filler_rows, rows);
                        assert!(b.items.len() <= micro);
                        for &i in &b.items {
                            seen[i] += 1;
                        }
                    }
                }
                assert!(
                    seen.iter().all(|&c| c == 1),
                    "{items} items, {world} ranks, epoch {epoch}"
                );
                assert_eq!(
                    iters[0].cursor(),
                    Cursor {
                        epoch: epoch + 1,
                        step: 0
                    }
                );
            }
        }
        Ok(())
    }

    #[test]
    fn epochs_are_different_permutations_fixed_by_the_seed() -> Result<()> {
        let s = Sampler::new(100, 7, true, 1, 0, 1)?;
        let (e0, e1) = (s.epoch_order(0), s.epoch_order(1));
        assert_ne!(e0, e1);
        assert_ne!(e0, (0..100).collect::<Vec<_>>());
        assert_eq!(e0, Sampler::new(100, 7, true, 2, 1, 3)?.epoch_order(0));
        assert_ne!(e0, Sampler::new(100, 8, true, 1, 0, 1)?.epoch_order(0));
        let plain = Sampler::new(5, 7, false, 1, 0, 1)?;
        assert_eq!(plain.epoch_order(3), [0, 1, 2, 3, 4]);
        Ok(())
    }

    #[test]
    fn a_restored_cursor_continues_exactly() -> Result<()> {
        let s = Sampler::new(103, 3, true, 3, 1, 4)?;
        let uninterrupted: Vec<RankBatch> = s.iter_from(Cursor::default())?.take(40).collect();
        for k in [0, 1, 8, 9, 17, 39] {
            let mut it = s.iter_from(Cursor::default())?;
            for _ in 0..k {
                it.next();
            }
            // What a checkpoint writes, and a new process reads back.
            let saved = serde_json::to_string(&it.cursor())?;
            let restored: Cursor = serde_json::from_str(&saved)?;
            let resumed: Vec<RankBatch> = s.iter_from(restored)?.take(40 - k).collect();
            assert_eq!(resumed, uninterrupted[k..], "resumed at micro-step {k}");
        }
        Ok(())
    }

    #[test]
    fn bad_settings_are_errors() {
        let msg = |r: Result<Sampler>| r.unwrap_err().to_string();
        assert_eq!(
            msg(Sampler::new(10, 0, true, 2, 2, 1)),
            "sampler: rank 2 is outside a world of 2"
        );
        assert_eq!(
            msg(Sampler::new(10, 0, true, 1, 0, 0)),
            "sampler: micro_batch_size must be at least 1"
        );
        assert_eq!(
            msg(Sampler::new(1, 0, true, 2, 0, 1)),
            "sampler: 1 items cannot be shared by 2 data-parallel ranks"
        );
        let s = Sampler::new(10, 0, true, 1, 0, 5).unwrap();
        assert!(s
            .iter_from(Cursor { epoch: 0, step: 2 })
            .err()
            .unwrap()
            .to_string()
            .starts_with("sampler cursor step 2 is past the 2 micro-steps"));
    }
}
