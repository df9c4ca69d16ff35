//! Micro-batches on the host: dynamic padding to the longest sample, or packed rows.
//!
//! A [`Batch`] holds row-major `[rows, seq_len]` vectors that map one to one onto the model's
//! inputs (`input_ids`, `position_ids`, labels and `ForwardMask { key_valid, segment_ids }`).
//! Padding gets the ignore label and `key_valid = 0`, so it never changes the loss.

use anyhow::{bail, Result};
use helix_ops::IGNORE_INDEX;

use crate::tokenize::Sample;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub rows: usize,
    pub seq_len: usize,
    pub input_ids: Vec<u32>,
    /// HF convention: aligned with `input_ids`; the model shifts.
    pub labels: Vec<i64>,
    pub position_ids: Vec<i64>,
    /// 1 for a real token, 0 for padding; `None` when there is no padding.
    pub key_valid: Option<Vec<u8>>,
    /// Document id of every token of a packed row (padding gets its own id); `None` unpacked.
    pub segment_ids: Option<Vec<u32>>,
    /// Tokens whose label is a target after the model's shift (labels[1..] per row).
    pub target_tokens: usize,
    /// Non-padding tokens.
    pub real_tokens: usize,
}

/// How the collator shapes a micro-batch.
#[derive(Clone, Copy, Debug)]
pub struct PadOptions {
    pub pad_id: u32,
    /// Round the padded length up to a multiple of this (8 suits tensor cores); 1 = exact.
    pub multiple_of: usize,
    /// Filler rows to add: all padding, no targets. The sampler asks for them so every
    /// data-parallel rank runs the same number of equal-shaped micro-batches.
    pub filler_rows: usize,
}

impl Default for PadOptions {
    fn default() -> Self {
        Self {
            pad_id: 0,
            multiple_of: 1,
            filler_rows: 0,
        }
    }
}

/// Dynamic padding: one row per sample, right-padded to the longest sample of the batch.
pub fn collate_padded(samples: &[&Sample], opts: &PadOptions) -> Result<Batch> {
    let longest = samples.iter().map(|s| s.input_ids.len()).max().unwrap_or(1);
    let seq_len = round_up(longest, opts.multiple_of)?;
    let mut b = Batch::empty(samples.len() + opts.filler_rows, seq_len, opts.pad_id);
    for (r, s) in samples.iter().enumerate() {
        let at = r * seq_len;
        let n = s.input_ids.len();
        b.input_ids[at..at + n].copy_from_slice(&s.input_ids);
        b.labels[at..at + n].copy_from_slice(&s.labels);
        for (i, p) in b.position_ids[at..at + n].iter_mut().enumerate() {
            *p = i as i64;
        }
        b.mark_valid(at, n);
    }
    b.finish();
    Ok(b)
}

/// Packed rows of `row_len`: each row's documents back to back, positions restarting at 0 and
/// a segment id per document; each document's first label is ignored (see [`crate::pack`]).
pub fn collate_packed(rows: &[Vec<&Sample>], row_len: usize, opts: &PadOptions) -> Result<Batch> {
    let mut b = Batch::empty(rows.len() + opts.filler_rows, row_len, opts.pad_id);
    let mut segments = vec![0u32; b.rows * row_len];
    for (r, docs) in rows.iter().enumerate() {
        let mut at = r * row_len;
        let end = at + row_len;
        for (d, s) in docs.iter().enumerate() {
            let n = s.input_ids.len();
            if at + n > end {
                bail!("packing: row {r} holds more than {row_len} tokens");
            }
            b.input_ids[at..at + n].copy_from_slice(&s.input_ids);
            b.labels[at..at + n].copy_from_slice(&s.labels);
            b.labels[at] = IGNORE_INDEX;
            for (i, p) in b.position_ids[at..at + n].iter_mut().enumerate() {
                *p = i as i64;
            }
            segments[at..at + n].fill(d as u32);
            b.mark_valid(at, n);
            at += n;
        }
        // Padding is a segment of its own, so it is never seen by a document.
        segments[at..end].fill(docs.len() as u32);
    }
    b.segment_ids = Some(segments);
    b.finish();
    Ok(b)
}

fn round_up(n: usize, multiple: usize) -> Result<usize> {
    if multiple == 0 {
        bail!("pad_to_multiple_of must be at least 1");
    }
    Ok(n.div_ceil(multiple) * multiple)
}

impl Batch {
    fn empty(rows: usize, seq_len: usize, pad_id: u32) -> Self {
        let n = rows * seq_len;
        Self {
            rows,
            seq_len,
            input_ids: vec![pad_id; n],
            labels: vec![IGNORE_INDEX; n],
            position_ids: vec![0; n],
            key_valid: Some(vec![0; n]),
            segment_ids: None,
            target_tokens: 0,
            real_tokens: 0,
        }
    }

    fn mark_valid(&mut self, at: usize, n: usize) {
        if let Some(v) = &mut self.key_valid {
            v[at..at + n].fill(1);
        }
        self.real_tokens += n;
    }

    fn finish(&mut self) {
        let s = self.seq_len;
        self.target_tokens = (0..self.rows)
            .map(|r| {
                self.labels[r * s + 1..(r + 1) * s]
                    .iter()
                    .filter(|&&l| l != IGNORE_INDEX)
                    .count()
            })
            .sum();
        if self.real_tokens == self.rows * s {
            self.key_valid = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenize::LossMode;

    fn sample(ids: &[u32], prompt_len: usize) -> Sample {
        Sample::new(ids.to_vec(), prompt_len, 0, LossMode::AnswerOnly)
    }

    const I: i64 = IGNORE_INDEX;

    #[test]
    fn dynamic_padding_pads_to_the_longest_sample() -> Result<()> {
        let (a, b) = (sample(&[1, 5, 6, 2], 2), sample(&[1, 7, 2], 1));
        let opts = PadOptions {
            pad_id: 0,
            ..Default::default()
        };
        let batch = collate_padded(&[&a, &b], &opts)?;
        assert_eq!((batch.rows, batch.seq_len), (2, 4));
        assert_eq!(batch.input_ids, [1, 5, 6, 2, 1, 7, 2, 0]);
        assert_eq!(batch.labels, [I, I, 6, 2, I, 7, 2, I]);
        assert_eq!(batch.position_ids, [0, 1, 2, 3, 0, 1, 2, 0]);
        assert_eq!(
            batch.key_valid.as_deref(),
            Some(&[1, 1, 1, 1, 1, 1, 1, 0][..])
        );
        assert_eq!((batch.target_tokens, batch.real_tokens), (4, 7));
        assert!(batch.segment_ids.is_none());
        Ok(())
    }

    #[test]
    fn padding_rounds_up_and_filler_rows_have_no_targets() -> Result<()> {
        let a = sample(&[1, 5, 6], 1);
        let opts = PadOptions {
            pad_id: 9,
            multiple_of: 4,
            filler_rows: 1,
        };
        let batch = collate_padded(&[&a], &opts)?;
        assert_eq!((batch.rows, batch.seq_len), (2, 4));
        assert_eq!(batch.input_ids, [1, 5, 6, 9, 9, 9, 9, 9]);
        assert_eq!(batch.labels, [I, 5, 6, I, I, I, I, I]);
        assert_eq!(batch.target_tokens, 2);
        Ok(())
    }

    #[test]
    fn packed_rows_restart_positions_and_ignore_each_first_label() -> Result<()> {
        // Whole-sequence labels, so only packing can set the ignore index.
        let (a, b, c) = (
            sample(&[1, 5, 2], 0),
            sample(&[1, 6, 7, 2], 0),
            sample(&[1, 8], 0),
        );
        let batch = collate_packed(&[vec![&a, &b], vec![&c]], 8, &PadOptions::default())?;
        assert_eq!(
            batch.input_ids,
            [1, 5, 2, 1, 6, 7, 2, 0, 1, 8, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            batch.labels,
            [I, 5, 2, I, 6, 7, 2, I, I, 8, I, I, I, I, I, I]
        );
        assert_eq!(
            batch.position_ids,
            [0, 1, 2, 0, 1, 2, 3, 0, 0, 1, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            batch.segment_ids.as_deref(),
            Some(&[0, 0, 0, 1, 1, 1, 1, 2, 0, 0, 1, 1, 1, 1, 1, 1][..])
        );
        assert_eq!((batch.target_tokens, batch.real_tokens), (6, 9));
        Ok(())
    }

    #[test]
    fn an_overfull_packed_row_is_an_error() {
        let a = sample(&[1, 5, 2], 0);
        let err = collate_packed(&[vec![&a, &a]], 5, &PadOptions::default()).unwrap_err();
        assert_eq!(err.to_string(), "packing: row 0 holds more than 5 tokens");
    }
}
