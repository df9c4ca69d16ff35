//! Tests of the GGUF importer (kept apart so gguf.rs reads as one idea).

use super::*;
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use std::path::PathBuf;

#[rustfmt::skip]
const TOKENS: [&str; 19] = [
    "<|endoftext|>", "<|im_start|>", "h", "e", "l", "o", "Ġ", "w", "r", "d", "he", "ll", "hell",
    "hello", "Ġw", "or", "Ġwor", "ld", "Ġworld",
];
const MERGES: [&str; 9] = [
    "h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld",
];
// hidden 32 keeps every row one Q8_0 block; 4 heads and 2 kv heads of dim 8.
const H: usize = 32;

fn strs(xs: &[&str]) -> Value {
    Value::Array(xs.iter().map(|s| Value::String(s.to_string())).collect())
}

#[rustfmt::skip]
fn metadata() -> Vec<(String, Value)> {
    let types = (0..TOKENS.len()).map(|i| Value::I32(if i < 2 { 3 } else { 1 })).collect();
    let s = |x: &str| Value::String(x.into());
    [
        ("general.architecture", s("llama")),
        ("llama.block_count", Value::U32(1)),
        ("llama.context_length", Value::U32(128)),
        ("llama.embedding_length", Value::U32(H as u32)),
        ("llama.feed_forward_length", Value::U32(64)),
        ("llama.attention.head_count", Value::U32(4)),
        ("llama.attention.head_count_kv", Value::U32(2)),
        ("llama.rope.dimension_count", Value::U32(8)),
        ("llama.rope.freq_base", Value::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.tokens", strs(&TOKENS)),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.merges", strs(&MERGES)),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(0)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
        ("tokenizer.ggml.add_space_prefix", Value::Bool(false)),
        ("tokenizer.chat_template", s("{{ messages }}")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Writes a one-layer GGUF: Q8_0 embeddings, f32 elsewhere, and an `attn_q` holding
/// 100 * row + col so the un-permutation can be checked by hand.
fn write_tiny(dir: &Path, md: &[(String, Value)]) -> PathBuf {
    let path = dir.join("tiny.gguf");
    write_tiny_as(&path, md, GgmlDType::F32);
    path
}

/// [`write_tiny`] to `path` with every tensor but the embeddings stored as `dtype`.
fn write_tiny_as(path: &Path, md: &[(String, Value)], dtype: GgmlDType) {
    let dev = &Device::Cpu;
    let f32q = |t: &Tensor| QTensor::quantize(t, dtype).unwrap();
    let rows = Tensor::arange(0f32, 32., dev)
        .unwrap()
        .unsqueeze(1)
        .unwrap();
    let q = (rows * 100.)
        .unwrap()
        .broadcast_add(&Tensor::arange(0f32, H as f32, dev).unwrap());
    let embd = Tensor::randn(0f32, 1.0, (TOKENS.len(), H), dev).unwrap();
    let mut tensors = vec![
        (
            "token_embd.weight".to_string(),
            QTensor::quantize(&embd, GgmlDType::Q8_0).unwrap(),
        ),
        ("blk.0.attn_q.weight".to_string(), f32q(&q.unwrap())),
    ];
    #[rustfmt::skip]
    let shapes = [
        ("output_norm", vec![H]), ("blk.0.attn_norm", vec![H]), ("blk.0.ffn_norm", vec![H]),
        ("blk.0.attn_k", vec![16, H]), ("blk.0.attn_v", vec![16, H]), ("blk.0.attn_output", vec![H, 32]),
        ("blk.0.ffn_gate", vec![64, H]), ("blk.0.ffn_up", vec![64, H]), ("blk.0.ffn_down", vec![H, 64]),
    ];
    for (name, shape) in shapes {
        let t = Tensor::randn(0f32, 0.1, shape, dev).unwrap();
        tensors.push((format!("{name}.weight"), f32q(&t)));
    }
    let md: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut File::create(path).unwrap(), &md, &ts).unwrap();
}

fn read_json(path: PathBuf) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Imports and returns the error chain; also checks that nothing was half-written.
fn import_err(path: &Path) -> String {
    let out = path.with_file_name("out");
    let err = import_gguf(path, &out, &ImportOptions::default()).unwrap_err();
    assert!(
        !out.join("model.safetensors").exists(),
        "no output on failure"
    );
    format!("{err:#}")
}

fn err_with(edit: impl FnOnce(&mut Vec<(String, Value)>)) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut md = metadata();
    edit(&mut md);
    import_err(&write_tiny(dir.path(), &md))
}

#[test]
fn gguf_import_tiny_model() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_tiny(dir.path(), &metadata());
    let out = dir.path().join("out/nested");
    let report = import_gguf(&path, &out, &ImportOptions::default()).unwrap();
    assert_eq!(report.tensors, 11);
    assert_eq!(
        report.parameters,
        19 * 32 + 3 * 32 + 2 * 32 * 32 + 2 * 16 * 32 + 3 * 64 * 32
    );
    let cfg = read_json(out.join("config.json"));
    assert_eq!(cfg, report.config);
    #[rustfmt::skip]
    let want = json!({
        "hidden_size": 32, "num_hidden_layers": 1, "head_dim": 8, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 19, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 128, "tie_word_embeddings": true,
        "bos_token_id": 1, "eos_token_id": 0, "torch_dtype": "float32", "rope_scaling": null,
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
    });
    for (k, v) in want.as_object().unwrap() {
        assert_eq!(&cfg[k], v, "{k}");
    }
    assert!(cfg.get("pad_token_id").is_none());

    let raw = std::fs::read(out.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(raw[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&raw[8..8 + n]).unwrap();
    assert_eq!(header["__metadata__"], json!({"format": "pt"}));
    let st = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(st.len(), 11);
    assert!(!st.contains_key("lm_head.weight"));
    assert_eq!(st["model.embed_tokens.weight"].dims(), &[19, 32]);
    assert_eq!(
        st["model.layers.0.self_attn.k_proj.weight"].dims(),
        &[16, 32]
    );
    assert_eq!(st["model.layers.0.mlp.down_proj.weight"].dims(), &[32, 64]);
    // Within each 8-row head, HF row 4 * i + d (i: which half, d < 4) is GGUF row 2 * d + i.
    let q = st["model.layers.0.self_attn.q_proj.weight"]
        .to_vec2::<f32>()
        .unwrap();
    for (r, row) in q.iter().enumerate() {
        let src = r / 8 * 8 + 2 * (r % 4) + (r % 8) / 4;
        let want: Vec<f32> = (0..H).map(|c| (src * 100 + c) as f32).collect();
        assert_eq!(row, &want, "q_proj row {r}");
    }

    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let enc = tok.encode("hello world<|im_start|>", true).unwrap();
    assert_eq!(enc.get_ids(), &[13, 18, 1]);
    let tc = read_json(out.join("tokenizer_config.json"));
    assert_eq!(tc["bos_token"], "<|im_start|>");
    assert_eq!(tc["eos_token"], "<|endoftext|>");
    assert_eq!(tc["chat_template"], "{{ messages }}");
    assert_eq!(tc["add_bos_token"], false);
    assert_eq!(
        read_json(out.join("special_tokens_map.json"))["bos_token"],
        "<|im_start|>"
    );
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
}

#[test]
fn gguf_import_bf16() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_tiny(dir.path(), &metadata());
    let out = dir.path().join("out");
    let report = import_gguf(&path, &out, &ImportOptions { dtype: DType::BF16 }).unwrap();
    assert_eq!(report.config["torch_dtype"], "bfloat16");
    let st = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(st.values().all(|t| t.dtype() == DType::BF16));
    let q = st["model.layers.0.self_attn.q_proj.weight"]
        .to_dtype(DType::F32)
        .unwrap();
    assert_eq!(
        q.get(1)
            .unwrap()
            .get(3)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        203.0
    );
}

#[test]
fn gguf_import_errors_name_file_and_key() {
    let err = err_with(|md| md.retain(|(k, _)| k != "llama.block_count"));
    assert!(
        err.contains("tiny.gguf: missing metadata key llama.block_count"),
        "{err}"
    );
    let err = err_with(|md| md[0].1 = Value::String("gpt2".into()));
    assert!(
        err.contains("tiny.gguf: unsupported architecture 'gpt2'"),
        "{err}"
    );
    let err = err_with(|md| md[1].1 = Value::String("one".into()));
    assert!(
        err.contains("metadata key llama.block_count has type String"),
        "{err}"
    );
    let err = err_with(|md| md[4].1 = Value::U32(48));
    assert!(
        err.contains("tensor blk.0.ffn_down.weight has shape [32, 64]"),
        "{err}"
    );
    let err = err_with(|md| md[10].1 = Value::String("bert".into()));
    assert!(err.contains("unsupported tokenizer model 'bert'"), "{err}");
    let err = err_with(|md| md[14].1 = Value::U32(19));
    assert!(
        err.contains("tokenizer.ggml.bos_token_id = 19 is out of range"),
        "{err}"
    );
}

#[test]
fn gguf_import_rejects_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let err = import_err(&dir.path().join("nope.gguf"));
    assert!(err.contains("nope.gguf: cannot open"), "{err}");
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"not a gguf file at all").unwrap();
    let err = import_err(&junk);
    assert!(err.contains("junk.gguf: cannot read GGUF header"), "{err}");

    // Cut inside the tensor data: the header parses, a tensor cannot be read.
    let path = write_tiny(dir.path(), &metadata());
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 64]).unwrap();
    let err = import_err(&path);
    assert!(err.contains("tiny.gguf: tensor "), "{err}");

    // Give one tensor a type id candle does not know (20 = IQ4_NL); its info is
    // name, n_dims (u32), dims (u64 each), type (u32).
    let mut bytes = bytes;
    let name = b"blk.0.ffn_up.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len() + 4 + 16;
    bytes[at..at + 4].copy_from_slice(&20u32.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let err = import_err(&path);
    assert!(
        err.contains("unsupported tensor type IQ4_NL for tensor blk.0.ffn_up.weight"),
        "{err}"
    );
}

/// Found by fuzzing (fuzz/fuzz_targets/gguf.rs): `general.alignment = 0` made candle's reader
/// divide by zero. Version 3, no tensors, one key; candle drops a key's trailing NULs.
#[test]
fn gguf_zero_alignment_is_an_error() {
    let read = |bytes: &[u8]| {
        let err = GgufModel::read(
            &mut std::io::Cursor::new(bytes),
            Path::new("a.gguf"),
            DType::F32,
        );
        format!("{:#}", err.err().expect("not a model"))
    };
    let u8_zero = b"GGUF\x03\0\0\0\0\0\0\0\0\0\0\0\x01\0\0\0\0\0\0\0\
                    \x11\0\0\0\0\0\0\0general.alignment\0\0\0\0\0";
    let u32_zero_nul_key = b"GGUF\x03\0\0\0\0\0\0\0\0\0\0\0\x01\0\0\0\0\0\0\0\
                             \x12\0\0\0\0\0\0\0general.alignment\0\x04\0\0\0\0\0\0\0";
    for bytes in [&u8_zero[..], &u32_zero_nul_key[..]] {
        let err = read(bytes);
        assert!(
            err.contains("a.gguf: metadata key general.alignment is 0"),
            "{err}"
        );
    }
    // 32 is read past; the file then lacks everything else.
    let mut ok = u32_zero_nul_key.to_vec();
    let at = ok.len() - 4;
    ok[at] = 32;
    let err = read(&ok);
    assert!(
        err.contains("missing metadata key general.architecture"),
        "{err}"
    );
}

/// Writes the GGUF fuzz seeds into HELIX_WRITE_FUZZ_SEEDS (`fuzz/seeds/gguf`) when it is set:
/// the tiny model in Q8_0 (small enough to mutate), with a byte-level vocabulary and merges,
/// and with a SentencePiece one whose merges are rebuilt from scores.
#[test]
fn gguf_write_fuzz_seeds() {
    let Some(dir) = std::env::var_os("HELIX_WRITE_FUZZ_SEEDS") else {
        eprintln!("skipping gguf_write_fuzz_seeds: HELIX_WRITE_FUZZ_SEEDS is not set");
        return;
    };
    let dir = Path::new(&dir);
    std::fs::create_dir_all(dir).unwrap();
    write_tiny_as(&dir.join("tiny-gpt2.gguf"), &metadata(), GgmlDType::Q8_0);
    let mut md = metadata();
    md.retain(|(k, _)| k != "tokenizer.ggml.merges" && k != "tokenizer.ggml.token_type");
    md[10].1 = Value::String("llama".into());
    let scores = (0..TOKENS.len()).map(|i| Value::F32(-(i as f32))).collect();
    md.push(("tokenizer.ggml.scores".into(), Value::Array(scores)));
    md.push(("general.alignment".into(), Value::U32(32)));
    write_tiny_as(&dir.join("tiny-spm.gguf"), &md, GgmlDType::Q8_0);
    for name in ["tiny-gpt2.gguf", "tiny-spm.gguf"] {
        let path = dir.join(name);
        let model = GgufModel::read(&mut File::open(&path).unwrap(), &path, DType::F32).unwrap();
        assert_eq!(model.tensors().count(), 11, "{name}");
    }
}

/// Imports the real SmolLM2 GGUF when HELIX_SMOLLM2_GGUF points at it.
#[test]
fn gguf_import_smollm2() {
    let Some(path) = std::env::var_os("HELIX_SMOLLM2_GGUF") else {
        eprintln!("skipping gguf_import_smollm2: HELIX_SMOLLM2_GGUF is not set");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let report = import_gguf(Path::new(&path), dir.path(), &ImportOptions::default()).unwrap();
    #[rustfmt::skip]
    let want = json!({
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
        "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
        "rope_scaling": null, "torch_dtype": "float32",
    });
    for (k, v) in want.as_object().unwrap() {
        assert_eq!(&report.config[k], v, "{k}");
    }
    assert_eq!((report.tensors, report.parameters), (272, 134_515_008));
    let tok = tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
    let enc = tok.encode("<|im_start|>user\nHi<|im_end|>", true).unwrap();
    assert_eq!(enc.get_ids(), &[1, 4093, 198, 26843, 2]);
    let tc = read_json(dir.path().join("tokenizer_config.json"));
    assert_eq!(
        (&tc["eos_token"], &tc["pad_token"]),
        (&json!("<|im_end|>"), &json!("<|im_end|>"))
    );
}
