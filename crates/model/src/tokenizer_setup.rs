//! What transformers does to a tokenizer.json after loading it: Llama-class tokenizers
//! (`tokenizer_class` LlamaTokenizer / CodeLlamaTokenizer) get their post-processor rebuilt
//! from `add_bos_token` / `add_eos_token` (defaults true / false), as
//! `LlamaTokenizerFast.update_post_processor` does. Llama 2's tokenizer.json has no
//! post-processor at all: without this, no BOS would be added.

use anyhow::{anyhow, Result};
use serde_json::Value;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::Tokenizer;

const LLAMA_CLASSES: [&str; 4] = [
    "LlamaTokenizer",
    "LlamaTokenizerFast",
    "CodeLlamaTokenizer",
    "CodeLlamaTokenizerFast",
];

/// Rebuilds the post-processor of a Llama-class tokenizer from tokenizer_config.json.
pub fn apply_llama_post_processor(
    tokenizer: &mut Tokenizer,
    config: &Value,
    bos: Option<&str>,
    eos: Option<&str>,
) -> Result<()> {
    let class = config.get("tokenizer_class").and_then(Value::as_str);
    if !class.is_some_and(|c| LLAMA_CLASSES.contains(&c)) {
        return Ok(());
    }
    let flag =
        |key: &str, default: bool| config.get(key).and_then(Value::as_bool).unwrap_or(default);
    let (add_bos, add_eos) = (flag("add_bos_token", true), flag("add_eos_token", false));
    let mut specials = Vec::new();
    for (on, token, side) in [(add_bos, bos, "bos"), (add_eos, eos, "eos")] {
        if !on {
            continue;
        }
        let token =
            token.ok_or_else(|| anyhow!("add_{side}_token is set but {side}_token is not"))?;
        let id = tokenizer
            .token_to_id(token)
            .ok_or_else(|| anyhow!("{side}_token {token:?} is not in the vocabulary"))?;
        specials.push((token.to_string(), id));
    }
    let (b, e) = (
        add_bos.then_some(bos).flatten(),
        add_eos.then_some(eos).flatten(),
    );
    // "<s>:0 $A:0 </s>:0" as transformers writes it; the pair repeats it with type id 1.
    let part = |seq: &str, type_id: u32| {
        let mut p: Vec<String> = b.map(|b| format!("{b}:{type_id}")).into_iter().collect();
        p.push(format!("{seq}:{type_id}"));
        p.extend(e.map(|e| format!("{e}:{type_id}")));
        p.join(" ")
    };
    let (single, pair) = (
        part("$A", 0),
        format!("{} {}", part("$A", 0), part("$B", 1)),
    );
    let processor = TemplateProcessing::builder()
        .try_single(single)
        .map_err(|e| anyhow!("post-processor: {e}"))?
        .try_pair(pair)
        .map_err(|e| anyhow!("post-processor: {e}"))?
        .special_tokens(specials)
        .build()
        .map_err(|e| anyhow!("post-processor: {e}"))?;
    tokenizer.with_post_processor(Some(processor));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SentencePiece-like BPE: `▁` normalizer, byte fallback, merges to "▁a", "▁ab", "▁▁".
    fn metaspace_bpe(extra_vocab: &[&str], extra_merges: &[(&str, &str)]) -> Tokenizer {
        let mut vocab = serde_json::Map::new();
        for t in [
            "<unk>", "<s>", "</s>", "▁", "a", "b", "c", "▁a", "▁ab", "▁▁", "bc",
        ]
        .iter()
        .chain(extra_vocab)
        {
            let n = vocab.len();
            vocab.insert(t.to_string(), n.into());
        }
        let mut merges: Vec<Value> = [("▁", "a"), ("▁a", "b"), ("▁", "▁"), ("b", "c")]
            .iter()
            .chain(extra_merges)
            .map(|(a, b)| Value::String(format!("{a} {b}")))
            .collect();
        merges.dedup();
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
            "pre_tokenizer": null, "post_processor": null, "decoder": null,
            "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": true, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges}
        });
        json.to_string().parse().unwrap()
    }

    fn encode(t: &Tokenizer, s: &str) -> (Vec<u32>, Vec<(usize, usize)>) {
        let e = t.encode(s, true).unwrap();
        (e.get_ids().to_vec(), e.get_offsets().to_vec())
    }

    #[test]
    fn llama_post_processor_follows_add_bos_and_add_eos() -> Result<()> {
        let cfg = |bos: bool, eos: bool| {
            serde_json::json!({"tokenizer_class": "LlamaTokenizer",
                "add_bos_token": bos, "add_eos_token": eos})
        };
        let mut t = metaspace_bpe(&[], &[]);
        apply_llama_post_processor(&mut t, &cfg(true, false), Some("<s>"), Some("</s>"))?;
        assert_eq!(encode(&t, "ab").0, [1, 8]);
        assert_eq!(t.encode("ab", false).unwrap().get_ids(), [8]);
        apply_llama_post_processor(&mut t, &cfg(true, true), Some("<s>"), Some("</s>"))?;
        assert_eq!(encode(&t, "ab").0, [1, 8, 2]);
        apply_llama_post_processor(&mut t, &cfg(false, false), Some("<s>"), Some("</s>"))?;
        assert_eq!(encode(&t, "ab").0, [8]);
        // Other classes keep their tokenizer.json.
        let mut t = metaspace_bpe(&[], &[]);
        let gpt2 = serde_json::json!({"tokenizer_class": "GPT2Tokenizer", "add_bos_token": true});
        apply_llama_post_processor(&mut t, &gpt2, Some("<s>"), Some("</s>"))?;
        assert_eq!(encode(&t, "ab").0, [8]);
        let err =
            apply_llama_post_processor(&mut t, &cfg(true, false), Some("<bos>"), None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "bos_token \"<bos>\" is not in the vocabulary"
        );
        Ok(())
    }
}
