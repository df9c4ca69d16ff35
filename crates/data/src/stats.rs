//! The `data-stats` summary: what a data file becomes after reading, templating and tokenizing.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::conversation::Message;
use crate::pack::{pack_first_fit_decreasing, PackingStats};
use crate::records::{ReadReport, SkipCounts};
use crate::tokenize::{TokenizeStats, Tokenized};
use helix_model::OrderedJson;

/// What reading a file found, kept (and cached) apart from the records themselves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadSummary {
    pub records: usize,
    pub unique_records: usize,
    pub skipped: SkipCounts,
    /// The message of every skipped row, for the end-of-run report.
    pub skipped_rows: Vec<String>,
    pub categories: BTreeMap<String, usize>,
}

impl ReadSummary {
    pub fn new(read: &ReadReport) -> Self {
        type Key<'a> = (
            &'a str,
            &'a str,
            &'a str,
            &'a [Message],
            Option<&'a OrderedJson>,
        );
        let unique: HashSet<Key> = read
            .records
            .iter()
            .map(|r| {
                (
                    r.instruction.as_str(),
                    r.context.as_str(),
                    r.response.as_str(),
                    r.turns.as_slice(),
                    r.tools.as_ref(),
                )
            })
            .collect();
        let mut categories = BTreeMap::new();
        for cat in read.records.iter().filter_map(|r| r.category.as_ref()) {
            *categories.entry(cat.clone()).or_insert(0) += 1;
        }
        Self {
            records: read.records.len(),
            unique_records: unique.len(),
            skipped: read.skipped.clone(),
            skipped_rows: read.skipped_rows.clone(),
            categories,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DataStats {
    /// Valid records read.
    pub records: usize,
    /// Records with a distinct (instruction, context, response), or distinct turns and tools.
    pub unique_records: usize,
    pub skipped_invalid: SkipCounts,
    /// Samples after the length policy, and their token counts (prompt + target).
    pub samples: usize,
    pub min_tokens: usize,
    pub max_tokens: usize,
    pub mean_tokens: f64,
    pub total_tokens: usize,
    pub tokenize: TokenizeStats,
    /// Records per category (Dolly); empty when the format has none.
    pub categories: BTreeMap<String, usize>,
    /// First-fit-decreasing packing into rows of the max sequence length.
    pub packing: Option<PackingStats>,
}

impl DataStats {
    /// Statistics of one file; packing is measured at `row_len` (the max sequence length)
    /// whether or not the run packs, so the choice can be made from these numbers.
    pub fn new(read: &ReadSummary, tokenized: &Tokenized, row_len: usize) -> Self {
        let lens: Vec<usize> = tokenized
            .samples
            .iter()
            .map(|s| s.input_ids.len())
            .collect();
        let total: usize = lens.iter().sum();
        let n = lens.len();
        let packing = pack_first_fit_decreasing(&lens, row_len)
            .ok()
            .map(|p| p.stats());
        Self {
            records: read.records,
            unique_records: read.unique_records,
            skipped_invalid: read.skipped.clone(),
            samples: n,
            min_tokens: lens.iter().copied().min().unwrap_or(0),
            max_tokens: lens.iter().copied().max().unwrap_or(0),
            mean_tokens: if n == 0 { 0.0 } else { total as f64 / n as f64 },
            total_tokens: total,
            tokenize: tokenized.stats.clone(),
            categories: read.categories.clone(),
            packing,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{read_records_from_bytes, Format, ReadOptions};
    use crate::template::Template;
    use crate::tokenize::tests::word_tokenizer;
    use crate::tokenize::{tokenize_records, LengthPolicy, LossMode, TokenizeOptions};

    #[test]
    fn counts_unique_categories_lengths_and_skips() -> anyhow::Result<()> {
        let text = br#"{"instruction": "one", "context": "", "response": "two", "category": "qa"}
{"instruction": "one", "context": "", "response": "two", "category": "qa"}
{"instruction": "one two three", "context": "four", "response": "five six", "category": "brainstorming"}
{"instruction": "one"}
"#;
        let mut opts = ReadOptions::new(Format::Dolly);
        opts.skip_invalid = true;
        let read = read_records_from_bytes("d.jsonl", text, &opts)?;
        let tok = TokenizeOptions {
            max_seq_length: 64,
            policy: LengthPolicy::Drop,
            loss: LossMode::AnswerOnly,
            eos_id: 2,
            threads: 1,
        };
        let t = Template::from_spec("Q {instruction} {input} A ", None)?;
        let tokenized = tokenize_records(&read.records, &t, &word_tokenizer(&[]), &tok)?;
        let s = DataStats::new(&ReadSummary::new(&read), &tokenized, 16);
        assert_eq!((s.records, s.unique_records, s.samples), (3, 2, 3));
        assert_eq!(s.skipped_invalid.missing_field, 1);
        // <s> Q one A two </s> = 6; <s> Q one two three four A five six </s> = 10.
        assert_eq!((s.min_tokens, s.max_tokens, s.total_tokens), (6, 10, 22));
        assert!((s.mean_tokens - 22.0 / 3.0).abs() < 1e-12);
        let cats: Vec<_> = s.categories.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert_eq!(cats, [("brainstorming", 1), ("qa", 2)]);
        // 10 + 6 in one row of 16, 6 in a second: 22 / 32.
        let p = s.packing.unwrap();
        assert_eq!(p.rows, 2);
        assert!((p.efficiency - 22.0 / 32.0).abs() < 1e-12);
        Ok(())
    }
}
