//! GGUF tokenizer rebuild (being written).
