//! Instruction data for helix: read Dolly / Alpaca / NeMo files ([`records`]), render prompt
//! templates ([`template`]), tokenize into `input_ids` and `labels` with answer-only or
//! whole-sequence loss ([`tokenize`]). See docs/architecture.md.

pub mod records;
pub mod stats;
pub mod template;
pub mod tokenize;

pub use records::{read_records, FieldMap, Format, ReadOptions, ReadReport, Record, SkipCounts};
pub use stats::DataStats;
pub use template::{ChatTemplate, Rendered, Template, UserTemplate};
pub use tokenize::{
    tokenize_records, LengthPolicy, LossMode, Sample, TokenizeOptions, TokenizeStats, Tokenized,
};
