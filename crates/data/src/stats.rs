//! The `data-stats` summary: what a data file becomes after reading, templating and tokenizing.

use std::collections::{BTreeMap, HashSet};

use serde::Serialize;

use crate::records::{ReadReport, SkipCounts};
use crate::tokenize::{TokenizeStats, Tokenized};

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DataStats {
    /// Valid records read.
    pub records: usize,
    /// Records with a distinct (instruction, context, response).
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
}

impl DataStats {
    pub fn new(read: &ReadReport, tokenized: &Tokenized) -> Self {
        let unique: HashSet<(&str, &str, &str)> = read
            .records
            .iter()
            .map(|r| {
                (
                    r.instruction.as_str(),
                    r.context.as_str(),
                    r.response.as_str(),
                )
            })
            .collect();
        let mut categories = BTreeMap::new();
        for cat in read.records.iter().filter_map(|r| r.category.as_ref()) {
            *categories.entry(cat.clone()).or_insert(0) += 1;
        }
        let lens = tokenized.samples.iter().map(|s| s.input_ids.len());
        let total: usize = lens.clone().sum();
        let n = tokenized.samples.len();
        Self {
            records: read.records.len(),
            unique_records: unique.len(),
            skipped_invalid: read.skipped.clone(),
            samples: n,
            min_tokens: lens.clone().min().unwrap_or(0),
            max_tokens: lens.max().unwrap_or(0),
            mean_tokens: if n == 0 { 0.0 } else { total as f64 / n as f64 },
            total_tokens: total,
            tokenize: tokenized.stats.clone(),
            categories,
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
        let s = DataStats::new(&read, &tokenized);
        assert_eq!((s.records, s.unique_records, s.samples), (3, 2, 3));
        assert_eq!(s.skipped_invalid.missing_field, 1);
        // <s> Q one A two </s> = 6; <s> Q one two three four A five six </s> = 10.
        assert_eq!((s.min_tokens, s.max_tokens, s.total_tokens), (6, 10, 22));
        assert!((s.mean_tokens - 22.0 / 3.0).abs() < 1e-12);
        let cats: Vec<_> = s.categories.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert_eq!(cats, [("brainstorming", 1), ("qa", 2)]);
        Ok(())
    }
}
