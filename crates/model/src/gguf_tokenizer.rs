//! Rebuilds a Hugging Face `tokenizer.json` (plus `tokenizer_config.json` and
//! `special_tokens_map.json`) from GGUF `tokenizer.ggml.*` metadata, and holds the typed
//! metadata accessor that the importer in `gguf.rs` shares.
//!
//! The goal is token-for-token parity with what transformers 4.57 builds for
//! `AutoTokenizer.from_pretrained(dir, gguf_file=...)` on a llama-architecture GGUF: it always
//! uses its llama converter, which for a non-SentencePiece vocabulary (`gpt2`, as in Llama 3 and
//! SmolLM) switches to byte-level pre-tokenization. Quirks of that converter that change
//! encodings (byte fallback on the BPE model, which tokens become special, the decoder chain)
//! are reproduced on purpose; see the comments at each step.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::str::FromStr;

use anyhow::{anyhow, Result};
use candle_core::quantized::gguf_file::Value as GValue;
use serde_json::{json, Map, Value};

/// Typed access to GGUF metadata; every error names the file and the key.
pub(crate) struct Meta<'a> {
    pub file: &'a Path,
    pub md: &'a HashMap<String, GValue>,
}

fn as_int(v: &GValue) -> Option<i128> {
    Some(match v {
        GValue::U8(x) => *x as i128,
        GValue::I8(x) => *x as i128,
        GValue::U16(x) => *x as i128,
        GValue::I16(x) => *x as i128,
        GValue::U32(x) => *x as i128,
        GValue::I32(x) => *x as i128,
        GValue::U64(x) => *x as i128,
        GValue::I64(x) => *x as i128,
        _ => return None,
    })
}

/// Exact widening, so sorting by GGUF scores orders them as Python's float(np.float32) does.
fn as_float(v: &GValue) -> Option<f64> {
    match v {
        GValue::F32(x) => Some(*x as f64),
        GValue::F64(x) => Some(*x),
        other => as_int(other).map(|i| i as f64),
    }
}

impl Meta<'_> {
    pub fn err(&self, msg: impl std::fmt::Display) -> anyhow::Error {
        anyhow!("gguf {}: {msg}", self.file.display())
    }

    pub fn wrong_type(&self, key: &str, v: &GValue, expected: &str) -> anyhow::Error {
        self.err(format!(
            "metadata key {key} has type {:?}, expected {expected}",
            v.value_type()
        ))
    }

    pub fn req(&self, key: &str) -> Result<&GValue> {
        self.md
            .get(key)
            .ok_or_else(|| self.err(format!("missing metadata key {key}")))
    }

    pub fn opt_uint(&self, key: &str) -> Result<Option<u64>> {
        let Some(v) = self.md.get(key) else {
            return Ok(None);
        };
        match as_int(v) {
            Some(i) if (0..=u64::MAX as i128).contains(&i) => Ok(Some(i as u64)),
            Some(i) => Err(self.err(format!("metadata key {key} = {i} is negative"))),
            None => Err(self.wrong_type(key, v, "an unsigned integer")),
        }
    }

    pub fn uint(&self, key: &str) -> Result<u64> {
        self.req(key)?;
        Ok(self.opt_uint(key)?.unwrap_or_default())
    }

    /// A positive count, small enough that products of two counts cannot overflow.
    pub fn count(&self, key: &str) -> Result<usize> {
        let v = self.uint(key)?;
        if v == 0 || v > (1 << 24) {
            return Err(self.err(format!("metadata key {key} = {v} is out of range")));
        }
        Ok(v as usize)
    }

    /// Float scalars: f32 values are widened via their shortest decimal form so that
    /// config.json says `1e-5` rather than `9.999999747378752e-6`.
    pub fn opt_float(&self, key: &str) -> Result<Option<f64>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(GValue::F32(x)) => Ok(Some(x.to_string().parse().unwrap_or(*x as f64))),
            Some(v) => as_float(v)
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, v, "a number")),
        }
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(GValue::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong_type(key, v, "a bool")),
        }
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(GValue::String(s)) => Ok(Some(s.as_str())),
            Some(v) => Err(self.wrong_type(key, v, "a string")),
        }
    }

    pub fn str(&self, key: &str) -> Result<&str> {
        self.req(key)?;
        Ok(self.opt_str(key)?.unwrap_or_default())
    }

    /// An array whose elements all convert with `f`.
    pub fn opt_array<'b, T>(
        &'b self,
        key: &str,
        expected: &str,
        f: impl Fn(&'b GValue) -> Option<T>,
    ) -> Result<Option<Vec<T>>> {
        let Some(v) = self.md.get(key) else {
            return Ok(None);
        };
        let GValue::Array(items) = v else {
            return Err(self.wrong_type(key, v, expected));
        };
        items
            .iter()
            .map(|x| f(x).ok_or_else(|| self.wrong_type(key, x, expected)))
            .collect::<Result<Vec<T>>>()
            .map(Some)
    }

    pub fn opt_str_array(&self, key: &str) -> Result<Option<Vec<&str>>> {
        self.opt_array(key, "an array of strings", |v| match v {
            GValue::String(s) => Some(s.as_str()),
            _ => None,
        })
    }

    pub fn opt_int_array(&self, key: &str) -> Result<Option<Vec<i128>>> {
        self.opt_array(key, "an array of integers", as_int)
    }

    pub fn opt_float_array(&self, key: &str) -> Result<Option<Vec<f64>>> {
        self.opt_array(key, "an array of numbers", as_float)
    }
}

/// The tokenizer files of an HF model directory, ready to write.
pub(crate) struct TokenizerFiles {
    /// Pretty-printed `tokenizer.json`, serialized by the `tokenizers` crate itself.
    pub tokenizer_json: String,
    pub tokenizer_config: Value,
    pub special_tokens_map: Value,
}

/// SentencePiece's word-boundary marker.
const SPIECE: &str = "\u{2581}";

/// GGUF token type for control tokens (llama.cpp's LLAMA_TOKEN_TYPE_CONTROL).
const TOKEN_TYPE_CONTROL: i128 = 3;

pub(crate) fn build(meta: &Meta, model_max_length: u64) -> Result<TokenizerFiles> {
    // transformers treats a missing model as a SentencePiece-style ("llama") vocabulary.
    let byte_level = match meta.opt_str("tokenizer.ggml.model")?.unwrap_or("llama") {
        "gpt2" => true,
        "llama" => false,
        other => {
            return Err(meta.err(format!(
                "unsupported tokenizer model '{other}' (tokenizer.ggml.model); expected 'gpt2' or 'llama'"
            )))
        }
    };
    let tokens = meta
        .opt_str_array("tokenizer.ggml.tokens")?
        .ok_or_else(|| meta.err("missing metadata key tokenizer.ggml.tokens"))?;
    let n = tokens.len();
    let token_type = meta.opt_int_array("tokenizer.ggml.token_type")?;
    if let Some(tt) = &token_type {
        if tt.len() != n {
            return Err(meta.err(format!(
                "tokenizer.ggml.token_type has {} entries for {n} tokens",
                tt.len()
            )));
        }
    }
    let id_of = |key: &str| -> Result<Option<usize>> {
        match meta.opt_uint(key)? {
            Some(id) if id as usize >= n || id > u32::MAX as u64 => Err(meta.err(format!(
                "metadata key {key} = {id} is out of range for {n} tokens"
            ))),
            other => Ok(other.map(|id| id as usize)),
        }
    };
    let bos = id_of("tokenizer.ggml.bos_token_id")?;
    let eos = id_of("tokenizer.ggml.eos_token_id")?;
    let unk = id_of("tokenizer.ggml.unknown_token_id")?;
    let pad = id_of("tokenizer.ggml.padding_token_id")?;
    // transformers' default when the key is absent is to prepend a space.
    let add_prefix_space = meta
        .opt_bool("tokenizer.ggml.add_space_prefix")?
        .unwrap_or(true);

    let merges = match meta.opt_str_array("tokenizer.ggml.merges")? {
        Some(merges) => merges
            .iter()
            .enumerate()
            .map(|(i, m)| match m.split(' ').collect::<Vec<_>>()[..] {
                [a, b] => Ok((a.to_string(), b.to_string())),
                _ => Err(meta.err(format!(
                    "tokenizer.ggml.merges[{i}] = {m:?} is not two space-separated tokens"
                ))),
            })
            .collect::<Result<Vec<_>>>()?,
        None => {
            let scores = meta
                .opt_float_array("tokenizer.ggml.scores")?
                .ok_or_else(|| {
                    meta.err(
                        "missing metadata key tokenizer.ggml.scores (needed to rebuild BPE merges)",
                    )
                })?;
            if scores.len() < n {
                return Err(meta.err(format!(
                    "tokenizer.ggml.scores has {} entries for {n} tokens",
                    scores.len()
                )));
            }
            // Merges are sorted by score, which needs an order: NaN has none.
            if let Some(i) = scores[..n].iter().position(|s| s.is_nan()) {
                return Err(meta.err(format!("tokenizer.ggml.scores[{i}] is NaN")));
            }
            merges_from_scores(&tokens, &scores)
        }
    };

    // Like a Python dict built in id order: a duplicated token maps to its last id.
    let mut vocab = Map::new();
    let mut id_by_token: HashMap<&str, usize> = HashMap::new();
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t.to_string(), json!(i));
        id_by_token.insert(t, i);
    }

    // Special tokens: every control token when token types are known; otherwise unk and bos
    // (transformers' converter looks up the eos *string* through bos_token_id).
    let special_ids: Vec<usize> = match &token_type {
        Some(tt) => (0..n).filter(|&i| tt[i] == TOKEN_TYPE_CONTROL).collect(),
        None => [unk, bos, eos.and(bos)].into_iter().flatten().collect(),
    };
    // LlamaTokenizerFast then adds bos/eos/unk/pad as special tokens when they are not
    // added tokens yet; doing it here keeps tokenizer.json equal to what transformers saves.
    let extra_ids = [bos, eos, unk, pad].into_iter().flatten();
    let mut seen = HashSet::new();
    let mut added = Vec::new();
    for i in special_ids.into_iter().chain(extra_ids) {
        let content = tokens[i];
        if seen.insert(content) {
            added.push(json!({
                "id": id_by_token[content], "content": content, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true,
            }));
        }
    }

    let add_bos = meta.opt_bool("tokenizer.ggml.add_bos_token")?;
    let add_eos = meta.opt_bool("tokenizer.ggml.add_eos_token")?;
    // LlamaTokenizerFast defaults: prepend bos, no eos.
    let add_bos = add_bos.unwrap_or(bos.is_some());
    let add_eos = add_eos.unwrap_or(false);
    let name = |id: Option<usize>| id.map(|i| tokens[i]);
    let post_processor = template_processing(
        add_bos
            .then(|| name(bos).zip(bos))
            .map(|b| b.ok_or_else(|| meta.err("add_bos_token is set but there is no bos_token_id")))
            .transpose()?,
        add_eos
            .then(|| name(eos).zip(eos))
            .map(|e| e.ok_or_else(|| meta.err("add_eos_token is set but there is no eos_token_id")))
            .transpose()?,
    );

    let replace_spiece = json!({"type": "Replace", "pattern": {"String": SPIECE}, "content": " "});
    let mut decoders = vec![
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
        replace_spiece,
    ];
    let (normalizer, pre_tokenizer) = if byte_level {
        // The "llama 3" path: GPT-2 byte-level regex split (tokenizer.ggml.pre is ignored, as
        // transformers ignores it) and no normalization. transformers passes options to the
        // Python ByteLevel decoder that it drops, so the defaults are what gets serialized.
        decoders.push(json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}));
        (
            json!({"type": "Sequence", "normalizers": []}),
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true}),
        )
    } else {
        // Legacy SentencePiece emulation: spaces become the marker, optionally one in front.
        let mut norms = Vec::new();
        if add_prefix_space {
            norms.push(json!({"type": "Prepend", "prepend": SPIECE}));
        }
        norms.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": SPIECE}));
        (
            json!({"type": "Sequence", "normalizers": norms}),
            Value::Null,
        )
    };
    if add_prefix_space {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }

    let merges: Vec<Value> = merges.into_iter().map(|(a, b)| json!([a, b])).collect();
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": name(unk),
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        },
    });
    // Round-trip through the tokenizers crate: validates the structure and gives exactly the
    // serialization (field order, vocab in id order) that transformers' save_pretrained writes.
    let parsed = tokenizers::Tokenizer::from_str(&tokenizer.to_string())
        .map_err(|e| meta.err(format!("rebuilt tokenizer is invalid: {e}")))?;
    let tokenizer_json = parsed
        .to_string(true)
        .map_err(|e| anyhow!("serializing tokenizer.json: {e}"))?;

    let tok_value = |id: Option<usize>| name(id).map_or(Value::Null, |s| json!(s));
    let mut config = Map::new();
    config.insert("add_bos_token".into(), json!(add_bos));
    config.insert("add_eos_token".into(), json!(add_eos));
    // Explicit nulls: LlamaTokenizerFast would otherwise invent "<s>", "</s>", "<unk>".
    config.insert("bos_token".into(), tok_value(bos));
    config.insert("eos_token".into(), tok_value(eos));
    config.insert("unk_token".into(), tok_value(unk));
    if pad.is_some() {
        config.insert("pad_token".into(), tok_value(pad));
    }
    if let Some(t) = meta.opt_str("tokenizer.chat_template")? {
        config.insert("chat_template".into(), json!(t));
    }
    // As transformers sets for the byte-level path, so decode() output matches too.
    config.insert("clean_up_tokenization_spaces".into(), json!(byte_level));
    config.insert("legacy".into(), json!(!byte_level));
    config.insert("model_max_length".into(), json!(model_max_length));
    config.insert("tokenizer_class".into(), json!("LlamaTokenizer"));

    let mut special_map = Map::new();
    for (key, id) in [
        ("bos_token", bos),
        ("eos_token", eos),
        ("unk_token", unk),
        ("pad_token", pad),
    ] {
        if let Some(s) = name(id) {
            special_map.insert(key.into(), json!(s));
        }
    }
    Ok(TokenizerFiles {
        tokenizer_json,
        tokenizer_config: Value::Object(config),
        special_tokens_map: Value::Object(special_map),
    })
}

/// The post-processor LlamaTokenizerFast installs for the given bos/eos (content, id) pairs.
fn template_processing(bos: Option<(&str, usize)>, eos: Option<(&str, usize)>) -> Value {
    let special = |t: &str, type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
    let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    let mut single = Vec::new();
    let mut pair = Vec::new();
    for (id, type_id) in [("A", 0), ("B", 1)] {
        let out = if id == "A" { &mut single } else { &mut pair };
        out.extend(bos.map(|(t, _)| special(t, type_id)));
        out.push(seq(id, type_id));
        out.extend(eos.map(|(t, _)| special(t, type_id)));
    }
    let pair: Vec<Value> = single.iter().cloned().chain(pair).collect();
    let mut specials = Map::new();
    for (t, id) in bos.into_iter().chain(eos) {
        specials.insert(t.into(), json!({"id": t, "ids": [id], "tokens": [t]}));
    }
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
}

/// Rebuilds BPE merges from SentencePiece scores when the GGUF has none (Llama 2 files), the
/// way transformers' GGUFTokenizerSkeleton does: every split of a token into two tokens is a
/// merge ranked by the whole token's score; ties keep vocabulary order (Python's stable sort).
/// The scores must not be NaN (the caller checks), or the sorts have no order to follow.
fn merges_from_scores(tokens: &[&str], scores: &[f64]) -> Vec<(String, String)> {
    // Python dict semantics: first-occurrence order, last-occurrence score.
    let mut score: HashMap<&str, f64> = HashMap::new();
    let mut order = Vec::new();
    for (t, s) in tokens.iter().zip(scores) {
        if score.insert(t, *s).is_none() {
            order.push(*t);
        }
    }
    let desc = |a: f64, b: f64| b.partial_cmp(&a).unwrap_or(std::cmp::Ordering::Equal);
    let mut merges: Vec<(&str, &str, f64)> = Vec::new();
    for piece in order {
        let piece_score = score[piece];
        let mut local: Vec<(&str, &str, f64)> = piece
            .char_indices()
            .skip(1)
            .map(|(i, _)| piece.split_at(i))
            .filter(|(l, r)| score.contains_key(l) && score.contains_key(r))
            .map(|(l, r)| (l, r, piece_score))
            .collect();
        local.sort_by(|a, b| desc(score[a.0], score[b.0]).then(desc(score[a.1], score[b.1])));
        merges.extend(local);
    }
    merges.sort_by(|a, b| desc(a.2, b.2));
    merges
        .into_iter()
        .map(|(l, r, _)| (l.to_string(), r.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arr(xs: impl IntoIterator<Item = GValue>) -> GValue {
        GValue::Array(xs.into_iter().collect())
    }

    /// A Llama 2 style vocabulary: no merges (rebuilt from scores), byte-fallback tokens.
    fn spm_metadata() -> HashMap<String, GValue> {
        let tokens = [
            "<unk>", "<s>", "</s>", "▁", "h", "i", "hi", "▁h", "▁hi", "<0x21>",
        ];
        let types = [2, 3, 3, 1, 1, 1, 1, 1, 1, 6];
        let scores = [0., 0., 0., -1., -2., -2., -3., -4., -5., 0.];
        [
            ("tokenizer.ggml.model", GValue::String("llama".into())),
            (
                "tokenizer.ggml.tokens",
                arr(tokens.map(|t| GValue::String(t.into()))),
            ),
            ("tokenizer.ggml.token_type", arr(types.map(GValue::I32))),
            ("tokenizer.ggml.scores", arr(scores.map(GValue::F32))),
            ("tokenizer.ggml.bos_token_id", GValue::U32(1)),
            ("tokenizer.ggml.eos_token_id", GValue::U32(2)),
            ("tokenizer.ggml.unknown_token_id", GValue::U32(0)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    #[test]
    fn gguf_tokenizer_merges_from_scores_follow_transformers_order() {
        let tokens = ["▁", "h", "i", "hi", "▁h", "▁hi"];
        let merges = merges_from_scores(&tokens, &[-1., -2., -2., -3., -4., -5.]);
        let merges: Vec<(&str, &str)> = merges
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        // Ranked by the merged token's score; splits of one token by their parts' scores.
        assert_eq!(merges, [("h", "i"), ("▁", "h"), ("▁", "hi"), ("▁h", "i")]);
        // Equal scores keep vocabulary order, as Python's stable sort does.
        let merges = merges_from_scores(&["a", "b", "c", "bc", "ab"], &[0., 0., 0., -1., -1.]);
        assert_eq!(merges[0], ("b".to_string(), "c".to_string()));
        assert_eq!(merges[1], ("a".to_string(), "b".to_string()));
    }

    #[test]
    fn gguf_tokenizer_sentencepiece_vocab() {
        let md = spm_metadata();
        let meta = Meta {
            file: Path::new("spm.gguf"),
            md: &md,
        };
        let files = build(&meta, 4096).unwrap();
        let tok = tokenizers::Tokenizer::from_str(&files.tokenizer_json).unwrap();
        let enc = tok.encode("hi hi!", true).unwrap();
        // bos is prepended by default; "!" falls back to its byte token.
        assert_eq!(enc.get_tokens(), &["<s>", "▁hi", "▁hi", "<0x21>"]);
        assert_eq!(tok.decode(enc.get_ids(), true).unwrap(), "hi hi!");
        let cfg = &files.tokenizer_config;
        assert_eq!(
            (&cfg["bos_token"], &cfg["eos_token"]),
            (&json!("<s>"), &json!("</s>"))
        );
        assert_eq!(
            (&cfg["unk_token"], &cfg["add_bos_token"]),
            (&json!("<unk>"), &json!(true))
        );
        assert_eq!(cfg["model_max_length"], 4096);
        // <unk> is not a control token but becomes special, as LlamaTokenizerFast makes it.
        let json: Value = serde_json::from_str(&files.tokenizer_json).unwrap();
        let added: Vec<&str> = json["added_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["content"].as_str().unwrap())
            .collect();
        assert_eq!(added, ["<unk>", "<s>", "</s>"]);
    }

    /// Found by review (sorting with NaN is not a total order, and Rust's sort may then panic):
    /// a NaN among `tokenizer.ggml.scores` panicked while rebuilding merges from scores.
    #[test]
    fn gguf_tokenizer_nan_score_is_an_error() {
        // 26 letters, then 30 two-letter tokens (one merge each) whose scores are scrambled
        // with every third one NaN: enough for the sort of the merges to see the NaNs.
        let letters: Vec<String> = ('a'..='z').map(String::from).collect();
        let pairs = letters
            .iter()
            .flat_map(|a| letters.iter().map(move |b| format!("{a}{b}")));
        let tokens: Vec<String> = letters.iter().cloned().chain(pairs.take(30)).collect();
        let scores = (0..tokens.len()).map(|i| match i.checked_sub(26) {
            None => 0.0,
            Some(j) if j % 3 == 0 => f32::NAN,
            Some(j) => -((j * 7919 % 1009) as f32),
        });
        let md: HashMap<String, GValue> = [
            (
                "tokenizer.ggml.tokens",
                arr(tokens.iter().map(|t| GValue::String(t.clone()))),
            ),
            ("tokenizer.ggml.scores", arr(scores.map(GValue::F32))),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let meta = Meta {
            file: Path::new("nan.gguf"),
            md: &md,
        };
        let err = build(&meta, 1).err().unwrap().to_string();
        assert!(
            err.contains("nan.gguf: tokenizer.ggml.scores[26] is NaN"),
            "{err}"
        );
    }

    #[test]
    fn gguf_tokenizer_errors_name_the_key() {
        let mut md = spm_metadata();
        md.remove("tokenizer.ggml.scores");
        let meta = Meta {
            file: Path::new("spm.gguf"),
            md: &md,
        };
        let err = build(&meta, 1).err().unwrap().to_string();
        assert!(
            err.contains("spm.gguf: missing metadata key tokenizer.ggml.scores"),
            "{err}"
        );
        let mut md = spm_metadata();
        md.insert(
            "tokenizer.ggml.merges".into(),
            arr([GValue::String("a b c".into())]),
        );
        let meta = Meta {
            file: Path::new("spm.gguf"),
            md: &md,
        };
        let err = build(&meta, 1).err().unwrap().to_string();
        assert!(
            err.contains("tokenizer.ggml.merges[0] = \"a b c\""),
            "{err}"
        );
    }
}
