//! Llama-family model in candle: config, checkpoint loading, GGUF import, training forward and
//! generation. See docs/architecture.md for how the pieces fit.

// Checks like `!(eps > 0.0)` are written that way on purpose: they reject NaN too.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

pub mod bnb;
pub mod config;
pub mod gguf;
mod gguf_tokenizer;
pub mod hf_export;
pub mod linear;
pub mod llama;
mod rope_config;
pub mod safetensors_write;
pub mod weights;
pub mod written_dir;

pub use config::LlamaConfig;
pub use linear::{Dense, Linear};
pub use llama::{ForwardMask, KvCache, LayerContext, Llama, LoadOptions};
pub use weights::SafetensorsWeights;
pub mod chat;
mod chat_generation;
pub mod chat_json;
pub mod generate;
pub mod model_dir;
pub mod tokenizer_setup;

pub use chat_json::OrderedJson;
pub use generate::{generate, generate_after, SamplingOptions};
pub use model_dir::{
    read_chat_template_file, write_chat_template_file, ModelDir, TextCodec, CHAT_TEMPLATE_FILE,
};
