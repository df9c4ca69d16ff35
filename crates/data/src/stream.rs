//! What the training loop pulls: one rank's micro-batches, endless across epochs, resumable from
//! a [`Cursor`] — the sampler's order, packed rows or single samples, collated on the host. And
//! the validation batches: every sample once, in order.

use anyhow::{bail, Result};

use crate::batch::{collate_packed, collate_padded, Batch, PadOptions};
use crate::config::DataConfig;
use crate::pack::pack_first_fit_decreasing;
use crate::sampler::{Cursor, Sampler};
use crate::tokenize::Sample;

/// A position in the data: the epoch and how many of its items the whole job has consumed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Position {
    pub epoch: u64,
    pub items: u64,
}

pub struct BatchStream {
    samples: Vec<Sample>,
    /// Packed rows (sample indices), when packing; otherwise every sample is an item.
    rows: Option<Vec<Vec<usize>>>,
    row_len: usize,
    sampler: Sampler,
    pad: PadOptions,
    order: Vec<usize>,
    cursor: Cursor,
}

impl BatchStream {
    /// The stream of rank `rank` of `world` data-parallel ranks, `micro` rows per micro-batch,
    /// shuffled and packed as `cfg` says, from the start of epoch 0.
    pub fn new(
        samples: Vec<Sample>,
        cfg: &DataConfig,
        pad_id: u32,
        world: usize,
        rank: usize,
        micro: usize,
    ) -> Result<Self> {
        let rows = if cfg.packing {
            let lens: Vec<usize> = samples.iter().map(|s| s.input_ids.len()).collect();
            Some(pack_first_fit_decreasing(&lens, cfg.max_seq_length)?.rows)
        } else {
            None
        };
        let items = rows.as_ref().map_or(samples.len(), Vec::len);
        if rows.is_some() && items < world {
            bail!(
                "data.packing = true packs the {} training samples into {items} row(s) of \
                 data.max_seq_length = {} tokens, fewer than the {world} data-parallel ranks \
                 that share them: add data, or set data.packing = false",
                samples.len(),
                cfg.max_seq_length
            );
        }
        let sampler = Sampler::new(items, cfg.seed, cfg.shuffle, world, rank, micro)?;
        Ok(Self {
            order: sampler.epoch_order(0),
            samples,
            rows,
            row_len: cfg.max_seq_length,
            sampler,
            pad: PadOptions {
                pad_id,
                multiple_of: cfg.pad_to_multiple_of,
                filler_rows: 0,
            },
            cursor: Cursor::default(),
        })
    }

    /// Continues from `cursor` (a checkpoint's), checked against this data.
    pub fn seek(&mut self, cursor: Cursor) -> Result<()> {
        self.sampler.iter_from(cursor)?; // checks the cursor fits this epoch length
        self.order = self.sampler.epoch_order(cursor.epoch);
        self.cursor = cursor;
        Ok(())
    }

    /// The micro-step the next [`Self::next_batch`] yields.
    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// Where the job stands in the data whatever its data-parallel layout: what a checkpoint
    /// saves, so a run can resume on another number of ranks.
    pub fn position(&self) -> Position {
        Position {
            epoch: self.cursor.epoch,
            items: self.cursor.step * self.sampler.items_per_step() as u64,
        }
    }

    /// Continues from `p`, which must fall on one of this layout's micro-steps.
    pub fn seek_position(&mut self, p: Position) -> Result<()> {
        let per = self.sampler.items_per_step() as u64;
        if !p.items.is_multiple_of(per) {
            anyhow::bail!(
                "the data position ({} items into epoch {}) does not fall on a micro-step of \
                 {per} items here; resume with the batch sizes of the run that saved it",
                p.items,
                p.epoch
            );
        }
        self.seek(Cursor {
            epoch: p.epoch,
            step: p.items / per,
        })
    }

    pub fn steps_per_epoch(&self) -> u64 {
        self.sampler.steps_per_epoch()
    }

    pub fn next_batch(&mut self) -> Result<Batch> {
        let rb = self.sampler.batch_at(self.cursor, &self.order);
        let next = self.sampler.advance(self.cursor);
        if next.epoch != self.cursor.epoch {
            self.order = self.sampler.epoch_order(next.epoch);
        }
        self.cursor = next;
        let pad = PadOptions {
            filler_rows: rb.filler_rows,
            ..self.pad
        };
        match &self.rows {
            Some(rows) => {
                let docs: Vec<Vec<&Sample>> = rb
                    .items
                    .iter()
                    .map(|&r| rows[r].iter().map(|&i| &self.samples[i]).collect())
                    .collect();
                collate_packed(&docs, self.row_len, &pad)
            }
            None => {
                let picked: Vec<&Sample> = rb.items.iter().map(|&i| &self.samples[i]).collect();
                collate_padded(&picked, &pad)
            }
        }
    }
}

/// Every sample once, in order, `micro` per batch (dynamically padded; packed when `cfg`
/// packs), at most `limit` batches: the validation pass.
pub fn eval_batches(
    samples: &[Sample],
    cfg: &DataConfig,
    pad_id: u32,
    micro: usize,
    limit: Option<usize>,
) -> Result<Vec<Batch>> {
    let pad = PadOptions {
        pad_id,
        multiple_of: cfg.pad_to_multiple_of,
        filler_rows: 0,
    };
    let mut out = Vec::new();
    if cfg.packing {
        let lens: Vec<usize> = samples.iter().map(|s| s.input_ids.len()).collect();
        let rows = pack_first_fit_decreasing(&lens, cfg.max_seq_length)?.rows;
        for chunk in rows.chunks(micro.max(1)) {
            let docs: Vec<Vec<&Sample>> = chunk
                .iter()
                .map(|r| r.iter().map(|&i| &samples[i]).collect())
                .collect();
            out.push(collate_packed(&docs, cfg.max_seq_length, &pad)?);
        }
    } else {
        for chunk in samples.chunks(micro.max(1)) {
            let picked: Vec<&Sample> = chunk.iter().collect();
            out.push(collate_padded(&picked, &pad)?);
        }
    }
    if let Some(n) = limit {
        out.truncate(n);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::Format;

    fn samples(n: usize) -> Vec<Sample> {
        (0..n)
            .map(|i| Sample {
                record: i,
                input_ids: vec![1; 3 + i % 5],
                labels: vec![5; 3 + i % 5],
                prompt_len: 1,
                untrained: Vec::new(),
            })
            .collect()
    }

    #[test]
    fn a_stream_restored_from_its_cursor_continues_exactly_across_epochs() -> Result<()> {
        for packing in [false, true] {
            let mut cfg = DataConfig::new("x".into(), Format::Alpaca);
            cfg.packing = packing;
            cfg.max_seq_length = 16;
            let mut a = BatchStream::new(samples(23), &cfg, 0, 1, 0, 3)?;
            let straight: Vec<Batch> = (0..30).map(|_| a.next_batch()).collect::<Result<_>>()?;
            let mut b = BatchStream::new(samples(23), &cfg, 0, 1, 0, 3)?;
            for _ in 0..11 {
                b.next_batch()?;
            }
            let saved = b.cursor();
            let mut c = BatchStream::new(samples(23), &cfg, 0, 1, 0, 3)?;
            c.seek(saved)?;
            let resumed: Vec<Batch> = (11..30).map(|_| c.next_batch()).collect::<Result<_>>()?;
            assert_eq!(resumed, straight[11..], "packing = {packing}");
            assert!(c.cursor().epoch >= 1, "the test crosses an epoch");
        }
        Ok(())
    }

    #[test]
    fn eval_batches_take_every_sample_once_in_order() -> Result<()> {
        let cfg = DataConfig::new("x".into(), Format::Alpaca);
        let s = samples(7);
        let b = eval_batches(&s, &cfg, 0, 3, None)?;
        assert_eq!(b.iter().map(|b| b.rows).collect::<Vec<_>>(), vec![3, 3, 1]);
        assert_eq!(eval_batches(&s, &cfg, 0, 3, Some(2))?.len(), 2);
        let total: usize = b.iter().map(|b| b.real_tokens).sum();
        assert_eq!(total, s.iter().map(|s| s.input_ids.len()).sum::<usize>());
        Ok(())
    }

    #[test]
    fn packed_rows_fewer_than_ranks_are_named() {
        let mut cfg = DataConfig::new("x".into(), Format::Alpaca);
        cfg.packing = true;
        cfg.max_seq_length = 64;
        // 4 samples of 3 to 6 tokens fill one row of 64.
        let err = BatchStream::new(samples(4), &cfg, 0, 2, 0, 1)
            .err()
            .expect("one row cannot feed two ranks")
            .to_string();
        assert!(
            err.contains("packs the 4 training samples into 1 row(s)")
                && err.contains("data.packing = false"),
            "{err}"
        );
        cfg.packing = false;
        assert!(BatchStream::new(samples(4), &cfg, 0, 2, 0, 1).is_ok());
    }
}
