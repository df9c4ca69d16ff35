//! Instruction data for helix, in the order a run uses it: the `[data]` config ([`config`]) and
//! each file's reading of it ([`source`]), records from Dolly / Alpaca / NeMo files
//! ([`records`]) and conversations ([`conversation`]), prompt templates ([`template`]), tokens
//! with answer-only or whole-sequence labels ([`tokenize`]), the on-disk token cache
//! ([`cache`]), splits ([`split`]), weighted mixtures of files ([`mix`]), all tied together by
//! [`dataset::prepare`]; then per step the seeded data-parallel [`sampler`], [`pack`]ing and
//! [`batch`] collation. See docs/architecture.md.

pub mod batch;
pub mod cache;
pub mod chat_template;
pub mod config;
pub mod conversation;
pub mod dataset;
pub mod mix;
pub mod pack;
pub mod records;
pub mod sampler;
pub mod source;
pub mod split;
pub mod spm_bpe;
pub mod stats;
pub mod stream;
pub mod template;
pub mod tokenize;

pub use batch::{collate_packed, collate_padded, Batch, PadOptions};
pub use config::{DataConfig, FieldOverrides, MixSource};
pub use conversation::{Message, TurnFields};
pub use dataset::{prepare, DataReport, DataTokenizer, PreparedData};
pub use mix::MixShare;
pub use pack::{pack_first_fit_decreasing, Packing, PackingStats};
pub use records::{read_records, FieldMap, Format, ReadOptions, ReadReport, Record, SkipCounts};
pub use sampler::{Cursor, RankBatch, Sampler};
pub use source::Source;
pub use split::{split_by_fraction, Splits};
pub use stats::{DataStats, ReadSummary};
pub use stream::{eval_batches, BatchStream, Position};
pub use template::{AssistantSpans, ChatTemplate, Rendered, Template, UserTemplate};
pub use tokenize::{
    tokenize_records, LengthPolicy, LossMode, Sample, TokenizeOptions, TokenizeStats, Tokenized,
};
