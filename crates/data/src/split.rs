//! Train / validation / test splits by fraction with a seed (when the config gives no separate
//! files). Splits are over records, before tokenization, so they do not move when
//! `max_seq_length` or the template changes.

use anyhow::{bail, Result};
use serde::Serialize;

use crate::sampler::SplitMix64;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Splits {
    pub train: Vec<usize>,
    pub validation: Vec<usize>,
    pub test: Vec<usize>,
}

/// Shuffles 0..n with `seed`, then takes `round(n × validation)` indices for validation, the
/// next `round(n × test)` for test, and the rest for train; each split is returned sorted, so
/// it keeps file order. A fraction that is positive but rounds to zero still takes one record.
pub fn split_by_fraction(n: usize, validation: f64, test: f64, seed: u64) -> Result<Splits> {
    for (key, f) in [("validation_fraction", validation), ("test_fraction", test)] {
        if !(0.0..1.0).contains(&f) {
            bail!("{key} must be in [0, 1), got {f}");
        }
    }
    let take = |f: f64| {
        if f > 0.0 {
            ((n as f64 * f).round() as usize).max(1)
        } else {
            0
        }
    };
    let (n_val, n_test) = (take(validation), take(test));
    if n_val + n_test >= n {
        bail!(
            "validation_fraction {validation} and test_fraction {test} leave no training \
             records out of {n}"
        );
    }
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix64::new(seed);
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    let mut validation = order[..n_val].to_vec();
    let mut test = order[n_val..n_val + n_test].to_vec();
    let mut train = order[n_val + n_test..].to_vec();
    for v in [&mut train, &mut validation, &mut test] {
        v.sort_unstable();
    }
    Ok(Splits {
        train,
        validation,
        test,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions_partition_the_records_and_depend_only_on_the_seed() -> Result<()> {
        let s = split_by_fraction(4000, 0.05, 0.02, 11)?;
        assert_eq!(
            (s.train.len(), s.validation.len(), s.test.len()),
            (3720, 200, 80)
        );
        let mut all: Vec<usize> = [&s.train, &s.validation, &s.test]
            .into_iter()
            .flatten()
            .copied()
            .collect();
        all.sort_unstable();
        assert_eq!(all, (0..4000).collect::<Vec<_>>());
        assert_eq!(s, split_by_fraction(4000, 0.05, 0.02, 11)?);
        assert_ne!(
            s.validation,
            split_by_fraction(4000, 0.05, 0.02, 12)?.validation
        );
        // Not a prefix or a stride of the file.
        assert_ne!(s.validation, (0..200).collect::<Vec<_>>());
        Ok(())
    }

    #[test]
    fn a_small_positive_fraction_takes_one_record() -> Result<()> {
        let s = split_by_fraction(10, 0.01, 0.0, 0)?;
        assert_eq!((s.train.len(), s.validation.len(), s.test.len()), (9, 1, 0));
        Ok(())
    }

    #[test]
    fn bad_fractions_are_errors() {
        let msg = |v, t, n| split_by_fraction(n, v, t, 0).unwrap_err().to_string();
        assert_eq!(
            msg(1.0, 0.0, 10),
            "validation_fraction must be in [0, 1), got 1"
        );
        assert_eq!(
            msg(0.1, -0.5, 10),
            "test_fraction must be in [0, 1), got -0.5"
        );
        assert_eq!(
            msg(0.5, 0.5, 10),
            "validation_fraction 0.5 and test_fraction 0.5 leave no training records out of 10"
        );
    }
}
