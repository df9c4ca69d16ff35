//! Sequence packing: first-fit-decreasing placement of samples into fixed-length rows.
//!
//! A packed row keeps each document's own position ids (restarting at 0) and a segment id per
//! token, so the model's attention never crosses documents (see `helix_ops::MaskSpec`). The
//! first label of every document is set to the ignore index: in HF convention labels[0] of a
//! sample is never a target, and in a packed row it would otherwise be predicted from the end
//! of the previous document. With that, a packed row's summed loss is exactly the sum of its
//! documents' losses.

use anyhow::{bail, Result};
use serde::Serialize;

/// Which samples go in each packed row, in placement order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packing {
    pub row_len: usize,
    pub rows: Vec<Vec<usize>>,
    /// Sum of the lengths of every packed sample.
    pub tokens: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PackingStats {
    pub row_len: usize,
    pub rows: usize,
    pub samples: usize,
    /// Real tokens / (rows × row_len).
    pub efficiency: f64,
    pub mean_samples_per_row: f64,
}

impl Packing {
    pub fn stats(&self) -> PackingStats {
        let rows = self.rows.len();
        let samples: usize = self.rows.iter().map(Vec::len).sum();
        let slots = rows * self.row_len;
        PackingStats {
            row_len: self.row_len,
            rows,
            samples,
            efficiency: if slots == 0 {
                0.0
            } else {
                self.tokens as f64 / slots as f64
            },
            mean_samples_per_row: if rows == 0 {
                0.0
            } else {
                samples as f64 / rows as f64
            },
        }
    }
}

/// First-fit-decreasing: samples longest first (ties by index, so the result depends only on
/// the lengths), each into the first row with room. A max segment tree over the rows' free space
/// finds that row in O(log rows), so 52k samples pack in milliseconds.
pub fn pack_first_fit_decreasing(lengths: &[usize], row_len: usize) -> Result<Packing> {
    if row_len == 0 {
        bail!("packing: row length must be positive");
    }
    if let Some((i, &len)) = lengths.iter().enumerate().find(|(_, &l)| l > row_len) {
        bail!("packing: sample {i} has {len} tokens, more than the row length {row_len}");
    }
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]).then(a.cmp(&b)));

    let mut free = FreeSpaceTree::new(lengths.len().max(1), row_len);
    let mut rows: Vec<Vec<usize>> = Vec::new();
    for &i in &order {
        let len = lengths[i];
        if len == 0 {
            continue;
        }
        let row = free.first_fit(len);
        if row == rows.len() {
            rows.push(Vec::new());
        }
        rows[row].push(i);
        free.take(row, len);
    }
    Ok(Packing {
        row_len,
        rows,
        tokens: lengths.iter().sum(),
    })
}

/// Max segment tree over rows' free space; every row starts with `row_len` free (rows not yet
/// opened are simply empty), so the first row with room is the first-fit row.
struct FreeSpaceTree {
    size: usize,
    max: Vec<usize>,
}

impl FreeSpaceTree {
    fn new(rows: usize, row_len: usize) -> Self {
        let size = rows.next_power_of_two();
        Self {
            size,
            max: vec![row_len; 2 * size],
        }
    }

    /// Index of the first row with at least `need` free; the caller ensures one exists (every
    /// sample fits in an empty row and there are as many rows as samples).
    fn first_fit(&self, need: usize) -> usize {
        let mut node = 1;
        while node < self.size {
            node = if self.max[2 * node] >= need {
                2 * node
            } else {
                2 * node + 1
            };
        }
        node - self.size
    }

    fn take(&mut self, row: usize, used: usize) {
        let mut node = row + self.size;
        self.max[node] -= used;
        while node > 1 {
            node /= 2;
            self.max[node] = self.max[2 * node].max(self.max[2 * node + 1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_fit_decreasing_places_longest_first_into_the_first_row_with_room() -> Result<()> {
        // Sorted: 6(i1) 5(i3) 4(i0) 3(i4) 2(i2) 2(i5) with row 8:
        // row0: 6 + 2(i2) ; row1: 5 + 3 ; row2: 4 + 2(i5).
        let p = pack_first_fit_decreasing(&[4, 6, 2, 5, 3, 2], 8)?;
        assert_eq!(p.rows, vec![vec![1, 2], vec![3, 4], vec![0, 5]]);
        let s = p.stats();
        assert_eq!((s.rows, s.samples), (3, 6));
        assert!((s.efficiency - 22.0 / 24.0).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn every_sample_is_packed_once_and_no_row_overflows() -> Result<()> {
        // A deterministic spread of lengths, checked against the invariants and against a
        // plain quadratic first-fit-decreasing.
        let lengths: Vec<usize> = (0..2000u64)
            .map(|i| (1 + (i * 2654435761 % 1000) % 512) as usize)
            .collect();
        let p = pack_first_fit_decreasing(&lengths, 512)?;
        let mut seen = vec![0; lengths.len()];
        for row in &p.rows {
            assert!(row.iter().map(|&i| lengths[i]).sum::<usize>() <= 512);
            for &i in row {
                seen[i] += 1;
            }
        }
        assert!(seen.iter().all(|&c| c == 1));

        let mut order: Vec<usize> = (0..lengths.len()).collect();
        order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]).then(a.cmp(&b)));
        let mut naive: Vec<(usize, Vec<usize>)> = Vec::new();
        for i in order {
            match naive.iter_mut().find(|(used, _)| used + lengths[i] <= 512) {
                Some((used, row)) => {
                    *used += lengths[i];
                    row.push(i);
                }
                None => naive.push((lengths[i], vec![i])),
            }
        }
        let naive: Vec<Vec<usize>> = naive.into_iter().map(|(_, r)| r).collect();
        assert_eq!(p.rows, naive);
        Ok(())
    }

    #[test]
    fn a_sample_longer_than_the_row_is_an_error() {
        let err = pack_first_fit_decreasing(&[3, 9], 8).unwrap_err();
        assert_eq!(
            err.to_string(),
            "packing: sample 1 has 9 tokens, more than the row length 8"
        );
    }
}
