//! A fast encoder for SentencePiece-style BPE tokenizers (Llama 1/2, Mistral, CodeLlama): the
//! same ids and byte offsets as the `tokenizers` crate, several times faster, for bulk data
//! preparation.
//!
//! The `tokenizers` crate runs such a tokenizer as one BPE "word" over the whole text and builds
//! a full `Encoding` (token strings, alignments) per call; that is most of its time. Here the
//! text is normalized in one pass (prepend `▁`, spaces → `▁`), cut before every run of `▁`, and
//! each piece's merges are looked up in a per-thread cache. The cut is exact only when no
//! vocabulary token has a `▁` after another character (then no merge can join across it), so
//! [`SpmBpe::from_tokenizer`] checks that, and every other property it relies on, and returns
//! `None` otherwise; callers then use the `tokenizers` crate. Texts that contain an added
//! token's content (`<s>`, …) also go to the `tokenizers` crate. Equality with transformers on
//! real data is checked by scripts/check-llama2-tokenizer.sh.

use rustc_hash::FxHashMap as HashMap;
use serde::Deserialize;
use tokenizers::Tokenizer;

const SPACE: char = '▁';

/// The parts of a serialized `tokenizers` BPE model this encoder reads.
#[derive(Deserialize)]
struct BpeJson {
    #[serde(rename = "type")]
    kind: String,
    dropout: Option<f32>,
    continuing_subword_prefix: Option<String>,
    end_of_word_suffix: Option<String>,
    byte_fallback: Option<bool>,
    ignore_merges: Option<bool>,
    vocab: std::collections::HashMap<String, u32>,
    merges: Vec<MergeJson>,
}

/// Merges are written as `"a b"` by older versions and `["a", "b"]` by newer ones.
#[derive(Deserialize)]
#[serde(untagged)]
enum MergeJson {
    Joined(String),
    Pair(String, String),
}

/// One merged piece of a word: its id and the range of the word's chars it covers.
#[derive(Clone, Copy, Debug)]
struct Piece {
    id: u32,
    first: u32,
    last: u32,
}

/// Per-thread cache of word → pieces.
#[derive(Default)]
pub struct WordCache(HashMap<Box<str>, Box<[Piece]>>);

pub struct SpmBpe {
    char_ids: HashMap<char, u32>,
    merges: HashMap<(u32, u32), (u32, u32)>,
    byte_ids: [u32; 256],
    /// Special tokens the post-processor puts before and after the text.
    lead: Vec<u32>,
    trail: Vec<u32>,
    added: Vec<String>,
}

impl SpmBpe {
    /// `Some` when `tokenizer` is a SentencePiece-style BPE this encoder reproduces exactly.
    pub fn from_tokenizer(tokenizer: &Tokenizer) -> Option<Self> {
        if tokenizer.get_pre_tokenizer().is_some()
            || tokenizer.get_truncation().is_some()
            || tokenizer.get_padding().is_some()
        {
            return None;
        }
        let normalizer = serde_json::to_value(tokenizer.get_normalizer()?).ok()?;
        let expected = serde_json::json!({"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]});
        if normalizer != expected {
            return None;
        }
        // Typed, from the serialized model: the merges are not public API otherwise.
        let json = serde_json::to_string(tokenizer.get_model()).ok()?;
        let model: BpeJson = serde_json::from_str(&json).ok()?;
        if model.kind != "BPE"
            || model.byte_fallback != Some(true)
            || model.ignore_merges == Some(true)
            || model.dropout.is_some()
            || model.continuing_subword_prefix.is_some()
            || model.end_of_word_suffix.is_some()
        {
            return None;
        }
        let vocab: HashMap<&str, u32> = model.vocab.iter().map(|(k, &v)| (k.as_str(), v)).collect();
        if vocab
            .keys()
            .any(|t| t.trim_start_matches(SPACE).contains(SPACE))
        {
            return None; // a merge could join across the cut
        }
        let mut merges = HashMap::default();
        let mut joined = String::new();
        for (rank, m) in model.merges.iter().enumerate() {
            let (a, b) = match m {
                MergeJson::Joined(s) => s.split_once(' ')?,
                MergeJson::Pair(a, b) => (a.as_str(), b.as_str()),
            };
            joined.clear();
            joined.push_str(a);
            joined.push_str(b);
            let ids = (*vocab.get(a)?, *vocab.get(b)?);
            merges
                .entry(ids)
                .or_insert((rank as u32, *vocab.get(joined.as_str())?));
        }
        let mut byte_ids = [0u32; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            *slot = *vocab.get(format!("<0x{b:02X}>").as_str())?;
        }
        let char_ids = vocab
            .iter()
            .filter_map(|(k, &id)| {
                let mut cs = k.chars();
                match (cs.next(), cs.next()) {
                    (Some(c), None) => Some((c, id)),
                    _ => None,
                }
            })
            .collect();
        let added: Vec<String> = tokenizer
            .get_added_tokens_decoder()
            .values()
            .map(|t| t.content.clone())
            .collect();

        // The post-processor's specials: what encoding "a" with them adds around "a" alone.
        let with = tokenizer.encode("a", true).ok()?;
        let bare = tokenizer.encode("a", false).ok()?;
        let (w, b) = (with.get_ids(), bare.get_ids());
        let at = (0..=w.len().checked_sub(b.len())?).find(|&i| w[i..i + b.len()] == *b)?;
        let mut this = Self {
            char_ids,
            merges,
            byte_ids,
            lead: w[..at].to_vec(),
            trail: w[at + b.len()..].to_vec(),
            added,
        };
        // The specials must carry no text, as TemplateProcessing's do.
        if with.get_offsets()[..at].iter().any(|o| *o != (0, 0)) {
            return None;
        }
        this.added.retain(|a| !a.is_empty());
        Some(this)
    }

    /// Whether [`SpmBpe::encode`] can take `text` (it holds no added token).
    pub fn accepts(&self, text: &str) -> bool {
        !self.added.iter().any(|a| text.contains(a.as_str()))
    }

    /// Ids and byte offsets of `text`, as `Tokenizer::encode(text, special)` gives them. The
    /// caller checks [`SpmBpe::accepts`].
    pub fn encode(
        &self,
        text: &str,
        special: bool,
        cache: &mut WordCache,
    ) -> (Vec<u32>, Vec<(usize, usize)>) {
        let (lead, trail): (&[u32], &[u32]) = if special {
            (&self.lead, &self.trail)
        } else {
            (&[], &[])
        };
        let mut ids = lead.to_vec();
        let mut offsets = vec![(0, 0); lead.len()];
        if !text.is_empty() {
            // Normalized chars with the original byte range of each; the prepended ▁ takes the
            // range of the first char, as the Prepend normalizer aligns it.
            let mut chars: Vec<(char, usize, usize)> = Vec::with_capacity(text.len() + 1);
            for (i, c) in text.char_indices() {
                let end = i + c.len_utf8();
                if i == 0 {
                    chars.push((SPACE, 0, end));
                }
                chars.push((if c == ' ' { SPACE } else { c }, i, end));
            }
            let mut word = String::new();
            let mut start = 0;
            while start < chars.len() {
                // A word: a run of ▁ then everything up to the next ▁.
                let mut end = start;
                while end < chars.len() && chars[end].0 == SPACE {
                    end += 1;
                }
                while end < chars.len() && chars[end].0 != SPACE {
                    end += 1;
                }
                word.clear();
                word.extend(chars[start..end].iter().map(|c| c.0));
                let pieces = match cache.0.get(word.as_str()) {
                    Some(p) => p,
                    None => {
                        let p = self.merge_word(&word);
                        cache.0.entry(word.as_str().into()).or_insert(p)
                    }
                };
                for p in pieces.iter() {
                    ids.push(p.id);
                    offsets.push((
                        chars[start + p.first as usize].1,
                        chars[start + p.last as usize].2,
                    ));
                }
                start = end;
            }
        }
        ids.extend_from_slice(trail);
        offsets.resize(ids.len(), (0, 0));
        (ids, offsets)
    }

    /// BPE over one word: each char (or its UTF-8 bytes when it is not in the vocabulary) is a
    /// symbol; repeatedly merge the adjacent pair of lowest rank, leftmost first.
    fn merge_word(&self, word: &str) -> Box<[Piece]> {
        let mut syms: Vec<Piece> = Vec::with_capacity(word.len());
        for (i, c) in word.chars().enumerate() {
            let i = i as u32;
            match self.char_ids.get(&c) {
                Some(&id) => syms.push(Piece {
                    id,
                    first: i,
                    last: i,
                }),
                None => {
                    let mut buf = [0u8; 4];
                    for &b in c.encode_utf8(&mut buf).as_bytes() {
                        syms.push(Piece {
                            id: self.byte_ids[b as usize],
                            first: i,
                            last: i,
                        });
                    }
                }
            }
        }
        loop {
            let best = syms
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| self.merges.get(&(w[0].id, w[1].id)).map(|m| (m.0, i, m.1)))
                .min();
            let Some((_, i, id)) = best else { break };
            syms[i] = Piece {
                id,
                first: syms[i].first,
                last: syms[i + 1].last,
            };
            syms.remove(i + 1);
        }
        syms.into_boxed_slice()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SentencePiece-like BPE with byte fallback and a BOS post-processor.
    fn tokenizer(extra_vocab: &[&str], extra_merges: &[&str]) -> Tokenizer {
        let mut vocab = serde_json::Map::new();
        let bytes: Vec<String> = (0..=255u8).map(|b| format!("<0x{b:02X}>")).collect();
        let base = [
            "<unk>", "<s>", "</s>", "▁", "a", "b", "c", "é", "▁a", "▁ab", "▁▁", "bc", "ab",
        ];
        for t in base
            .iter()
            .copied()
            .chain(bytes.iter().map(String::as_str))
            .chain(extra_vocab.iter().copied())
        {
            let n = vocab.len();
            vocab.insert(t.to_string(), n.into());
        }
        let merges: Vec<&str> = ["▁ a", "▁a b", "▁ ▁", "b c", "a b"]
            .into_iter()
            .chain(extra_merges.iter().copied())
            .collect();
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [
                {"id": 1, "content": "<s>", "single_word": false, "lstrip": false,
                 "rstrip": false, "normalized": false, "special": true}],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
            "pre_tokenizer": null,
            "post_processor": {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
            "decoder": null,
            "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                "vocab": vocab, "merges": merges}
        });
        json.to_string().parse().unwrap()
    }

    #[test]
    fn same_ids_and_offsets_as_the_tokenizers_crate() {
        let t = tokenizer(&[], &[]);
        let fast = SpmBpe::from_tokenizer(&t).expect("eligible");
        let mut cache = WordCache::default();
        for s in [
            "ab abc",
            "a  ab",
            "  ab  ",
            "abc",
            "c b a",
            "abéab",
            "a😀b",
            "x\tyz\n",
            "",
            " ",
            "ab ab ab ab",
        ] {
            assert!(fast.accepts(s));
            for special in [true, false] {
                let e = t.encode(s, special).unwrap();
                let want = (e.get_ids().to_vec(), e.get_offsets().to_vec());
                assert_eq!(fast.encode(s, special, &mut cache), want, "{s:?}");
            }
        }
        assert!(!fast.accepts("a <s> b"));
    }

    #[test]
    fn a_vocabulary_that_merges_across_words_is_not_taken() {
        let t = tokenizer(&["c▁a"], &["c ▁a"]);
        assert!(SpmBpe::from_tokenizer(&t).is_none());
    }
}
