//! GGUF import: turns a llama-architecture GGUF file into a Hugging Face-format model directory
//! (`config.json`, `model.safetensors`, tokenizer files) that transformers and helix both load.
//!
//! Weights are de-quantized with candle's GGUF reader. llama.cpp's converter permutes the rows of
//! `attn_q`/`attn_k` so that RoPE can rotate interleaved pairs; the HF layout rotates halves, so we
//! undo that permutation exactly as transformers does when it loads a GGUF.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use serde_json::json;

use crate::gguf_tokenizer::Meta;

/// How to import a GGUF file.
#[derive(Debug, Clone, Copy)]
pub struct ImportOptions {
    /// dtype of the written safetensors: `DType::F32` or `DType::BF16`.
    pub dtype: DType,
}

impl Default for ImportOptions {
    fn default() -> Self {
        Self { dtype: DType::F32 }
    }
}

/// What an import wrote.
#[derive(Debug, Clone)]
pub struct ImportReport {
    /// Number of tensors in `model.safetensors`.
    pub tensors: usize,
    /// Total number of parameters in those tensors.
    pub parameters: usize,
    /// The `config.json` that was written.
    pub config: serde_json::Value,
}

/// Llama hyper-parameters read from `llama.*` metadata.
struct Hparams {
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    vocab: usize,
    context: u64,
    eps: f64,
    theta: f64,
}

fn read_hparams(meta: &Meta) -> Result<Hparams> {
    let hidden = meta.count("llama.embedding_length")?;
    let heads = meta.count("llama.attention.head_count")?;
    let kv_heads = match meta.opt_uint("llama.attention.head_count_kv")? {
        // llama.cpp's default when the key is absent: no grouped-query attention.
        None => heads,
        Some(_) => meta.count("llama.attention.head_count_kv")?,
    };
    if heads % kv_heads != 0 {
        return Err(meta.err(format!(
            "attention.head_count {heads} is not a multiple of attention.head_count_kv {kv_heads}"
        )));
    }
    // transformers takes head_dim from rope.dimension_count; llama rotates the whole head.
    let head_dim = if meta.md.contains_key("llama.rope.dimension_count") {
        meta.count("llama.rope.dimension_count")?
    } else if meta.md.contains_key("llama.attention.key_length") {
        meta.count("llama.attention.key_length")?
    } else {
        hidden / heads
    };
    let tokens = meta
        .opt_str_array("tokenizer.ggml.tokens")?
        .map(|t| t.len());
    let vocab = match meta.opt_uint("llama.vocab_size")? {
        Some(_) => meta.count("llama.vocab_size")?,
        None => tokens.ok_or_else(|| meta.err("missing metadata key llama.vocab_size"))?,
    };
    Ok(Hparams {
        hidden,
        intermediate: meta.count("llama.feed_forward_length")?,
        layers: meta.count("llama.block_count")?,
        heads,
        kv_heads,
        head_dim,
        vocab,
        context: meta.uint("llama.context_length")?,
        eps: meta
            .opt_float("llama.attention.layer_norm_rms_epsilon")?
            .ok_or_else(|| {
                meta.err("missing metadata key llama.attention.layer_norm_rms_epsilon")
            })?,
        // llama.cpp's default base when the key is absent.
        theta: meta.opt_float("llama.rope.freq_base")?.unwrap_or(10000.0),
    })
}

fn rope_scaling(meta: &Meta) -> Result<serde_json::Value> {
    let factor = meta.opt_float("llama.rope.scaling.factor")?;
    let kind = meta.opt_str("llama.rope.scaling.type")?;
    let linear = |f: f64| json!({"rope_type": "linear", "factor": f});
    Ok(match (kind, factor) {
        (None | Some("none"), _) => match meta.opt_float("llama.rope.scale_linear")? {
            Some(f) if f != 1.0 => linear(f),
            _ => serde_json::Value::Null,
        },
        (Some("linear"), Some(f)) => linear(f),
        (Some("yarn"), Some(f)) => {
            let orig = meta.uint("llama.rope.scaling.original_context_length")?;
            json!({"rope_type": "yarn", "factor": f, "original_max_position_embeddings": orig})
        }
        (Some(k @ ("linear" | "yarn")), None) => {
            return Err(meta.err(format!(
                "rope scaling '{k}' without metadata key llama.rope.scaling.factor"
            )))
        }
        (Some(other), _) => {
            return Err(meta.err(format!(
                "unsupported rope scaling type '{other}' (llama.rope.scaling.type)"
            )))
        }
    })
}

/// One GGUF tensor and where it goes.
struct Planned {
    gguf: String,
    hf: String,
    shape: Vec<usize>,
    /// Undo llama.cpp's RoPE row permutation with this many heads.
    unpermute_heads: Option<usize>,
}

/// Per-layer tensors: GGUF suffix, HF suffix.
const LAYER_TENSORS: [(&str, &str); 9] = [
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// Maps a GGUF tensor name to its HF name, expected [out, in] shape and permutation heads.
fn map_tensor(name: &str, hp: &Hparams) -> Option<(String, Vec<usize>, Option<usize>)> {
    let (h, q, kv, ff) = (
        hp.hidden,
        hp.heads * hp.head_dim,
        hp.kv_heads * hp.head_dim,
        hp.intermediate,
    );
    let (hf, shape, perm) = match name {
        "token_embd.weight" => ("model.embed_tokens".into(), vec![hp.vocab, h], None),
        "output_norm.weight" => ("model.norm".into(), vec![h], None),
        "output.weight" => ("lm_head".into(), vec![hp.vocab, h], None),
        _ => {
            let (idx, suffix) = name.strip_prefix("blk.")?.split_once('.')?;
            let layer: usize = idx
                .parse()
                .ok()
                .filter(|l: &usize| *l < hp.layers && idx == l.to_string())?;
            let gguf = suffix.strip_suffix(".weight")?;
            let (_, hf) = LAYER_TENSORS.iter().find(|(g, _)| *g == gguf)?;
            let (shape, perm) = match gguf {
                "attn_norm" | "ffn_norm" => (vec![h], None),
                "attn_q" => (vec![q, h], Some(hp.heads)),
                "attn_k" => (vec![kv, h], Some(hp.kv_heads)),
                "attn_v" => (vec![kv, h], None),
                "attn_output" => (vec![h, q], None),
                "ffn_down" => (vec![h, ff], None),
                _ => (vec![ff, h], None),
            };
            (format!("model.layers.{layer}.{hf}"), shape, perm)
        }
    };
    Some((format!("{hf}.weight"), shape, perm))
}

fn plan_tensors(meta: &Meta, content: &gguf_file::Content, hp: &Hparams) -> Result<Vec<Planned>> {
    let mut planned = Vec::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let dims = content.tensor_infos[name].shape.dims();
        let Some((hf, shape, unpermute_heads)) = map_tensor(name, hp) else {
            if name == "rope_freqs.weight" {
                bail!(meta.err("tensor rope_freqs.weight (llama3-style RoPE frequency scaling) is not supported"));
            }
            bail!(meta.err(format!(
                "unexpected tensor {name} for a llama model with {} layers",
                hp.layers
            )));
        };
        if dims != shape.as_slice() {
            bail!(meta.err(format!(
                "tensor {name} has shape {dims:?} (HF order), expected {shape:?} from the metadata"
            )));
        }
        if unpermute_heads.is_some_and(|n| shape[0] % (2 * n) != 0) {
            bail!(meta.err(format!(
                "tensor {name}: rows do not split into heads of even size"
            )));
        }
        planned.push(Planned {
            gguf: name.clone(),
            hf,
            shape,
            unpermute_heads,
        });
    }
    let layer_names =
        (0..hp.layers).flat_map(|l| LAYER_TENSORS.map(|(g, _)| format!("blk.{l}.{g}.weight")));
    let mut required = [
        "token_embd.weight".to_string(),
        "output_norm.weight".to_string(),
    ]
    .into_iter()
    .chain(layer_names);
    if let Some(missing) = required.find(|r| !content.tensor_infos.contains_key(r)) {
        bail!(meta.err(format!("missing tensor {missing}")));
    }
    Ok(planned)
}

/// Inverse of llama.cpp's `permute`: within each head, rows were reordered from
/// [half0 | half1] to interleaved pairs; this brings them back to halves.
fn unpermute(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let half = rows / heads / 2;
    w.reshape((heads, half, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

fn tensor_bytes(t: &Tensor) -> candle_core::Result<Vec<u8>> {
    let t = t.flatten_all()?;
    if t.dtype() == DType::BF16 {
        let v = t.to_vec1::<half::bf16>()?;
        return Ok(v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect());
    }
    let v = t.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect())
}

/// Writes `dir/name` through a temp file in the same directory, so readers never see a partial file.
fn write_atomic(
    dir: &Path,
    name: &str,
    f: impl FnOnce(&mut BufWriter<File>) -> Result<()>,
) -> Result<()> {
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let target = dir.join(name);
    let result = (|| {
        let mut w = BufWriter::new(
            File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?,
        );
        f(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, &target).with_context(|| format!("renaming to {}", target.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", target.display()))
}

fn write_json(dir: &Path, name: &str, v: &serde_json::Value) -> Result<()> {
    write_atomic(dir, name, |w| {
        serde_json::to_writer_pretty(&mut *w, v)?;
        w.write_all(b"\n")?;
        Ok(())
    })
}

/// Streams tensors into a safetensors file one at a time, so peak memory is one tensor.
fn write_safetensors(
    w: &mut impl Write,
    planned: &[Planned],
    dtype: DType,
    mut produce: impl FnMut(&Planned) -> Result<Vec<u8>>,
) -> Result<()> {
    let (st_dtype, size) = if dtype == DType::BF16 {
        ("BF16", 2)
    } else {
        ("F32", 4)
    };
    let mut order: Vec<&Planned> = planned.iter().collect();
    order.sort_by(|a, b| a.hf.cmp(&b.hf));
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0usize;
    for p in &order {
        let len = p.shape.iter().product::<usize>() * size;
        header.insert(
            p.hf.clone(),
            json!({"dtype": st_dtype, "shape": p.shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let mut header = serde_json::to_vec(&header)?;
    // The format asks for the data to start 8-byte aligned; pad the header with spaces.
    header.resize(header.len().div_ceil(8) * 8, b' ');
    w.write_all(&(header.len() as u64).to_le_bytes())?;
    w.write_all(&header)?;
    for p in order {
        let bytes = produce(p)?;
        let want = p.shape.iter().product::<usize>() * size;
        if bytes.len() != want {
            bail!(
                "internal error: tensor {} has {} bytes, expected {want}",
                p.hf,
                bytes.len()
            );
        }
        w.write_all(&bytes)?;
    }
    Ok(())
}

/// Imports a llama-architecture GGUF into `out_dir` as an HF model directory.
pub fn import_gguf(gguf: &Path, out_dir: &Path, opts: &ImportOptions) -> Result<ImportReport> {
    let file_err = |msg: String| anyhow!("gguf {}: {msg}", gguf.display());
    if !matches!(opts.dtype, DType::F32 | DType::BF16) {
        bail!(
            "unsupported import dtype {:?} (use F32 or BF16)",
            opts.dtype
        );
    }
    let mut reader =
        BufReader::new(File::open(gguf).map_err(|e| file_err(format!("cannot open: {e}")))?);
    let content = match gguf_file::Content::read(&mut reader) {
        Ok(c) => c,
        Err(e) => {
            // candle rejects unknown quantization types without naming the tensor; find it.
            if let Ok(Some((tensor, ty))) = find_unknown_tensor_type(gguf) {
                bail!(file_err(format!(
                    "unsupported tensor type {} for tensor {tensor}",
                    ggml_type_name(ty)
                )));
            }
            bail!(file_err(format!("cannot read GGUF header: {e}")));
        }
    };
    let meta = Meta {
        file: gguf,
        md: &content.metadata,
    };
    let arch = meta.str("general.architecture")?;
    if arch != "llama" {
        bail!(meta.err(format!(
            "unsupported architecture '{arch}' (only 'llama' is supported)"
        )));
    }
    let hp = read_hparams(&meta)?;
    let planned = plan_tensors(&meta, &content, &hp)?;
    let tied = !content.tensor_infos.contains_key("output.weight");
    let tok = crate::gguf_tokenizer::build(&meta, hp.context)?;

    let mut config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hp.hidden,
        "intermediate_size": hp.intermediate,
        "num_hidden_layers": hp.layers,
        "num_attention_heads": hp.heads,
        "num_key_value_heads": hp.kv_heads,
        "head_dim": hp.head_dim,
        "rms_norm_eps": hp.eps,
        "rope_theta": hp.theta,
        "rope_scaling": rope_scaling(&meta)?,
        "max_position_embeddings": hp.context,
        "vocab_size": hp.vocab,
        "tie_word_embeddings": tied,
        "torch_dtype": if opts.dtype == DType::BF16 { "bfloat16" } else { "float32" },
        "hidden_act": "silu",
        "attention_bias": false,
        "attention_dropout": 0.0,
        "mlp_bias": false,
    });
    for (key, gguf_key) in [
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ("pad_token_id", "tokenizer.ggml.padding_token_id"),
    ] {
        if let Some(id) = meta.opt_uint(gguf_key)? {
            config[key] = json!(id);
        }
    }

    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut parameters = 0usize;
    write_atomic(out_dir, "model.safetensors", |w| {
        write_safetensors(w, &planned, opts.dtype, |p| {
            let ctx = || format!("gguf {}: tensor {}", gguf.display(), p.gguf);
            let q = content
                .tensor(&mut reader, &p.gguf, &Device::Cpu)
                .with_context(ctx)?;
            let mut t = q
                .dequantize(&Device::Cpu)
                .with_context(ctx)?
                .to_dtype(DType::F32)?;
            if let Some(heads) = p.unpermute_heads {
                t = unpermute(&t, heads).with_context(ctx)?;
            }
            parameters += t.elem_count();
            Ok(tensor_bytes(&t.to_dtype(opts.dtype)?)?)
        })
    })?;
    write_atomic(out_dir, "tokenizer.json", |w| {
        Ok(w.write_all(tok.tokenizer_json.as_bytes())?)
    })?;
    write_json(out_dir, "tokenizer_config.json", &tok.tokenizer_config)?;
    write_json(out_dir, "special_tokens_map.json", &tok.special_tokens_map)?;
    write_json(out_dir, "config.json", &config)?;
    Ok(ImportReport {
        tensors: planned.len(),
        parameters,
        config,
    })
}

fn ggml_type_name(id: u32) -> String {
    const NAMES: [&str; 14] = [
        "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16",
        "I32", "I64", "F64", "IQ1_M",
    ];
    match id {
        16..=29 => NAMES[(id - 16) as usize].to_string(),
        34 => "TQ1_0".into(),
        35 => "TQ2_0".into(),
        39 => "MXFP4".into(),
        _ => format!("#{id}"),
    }
}

fn read_le(r: &mut impl Read, n: usize) -> Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b[..n])?;
    Ok(u64::from_le_bytes(b))
}

/// Re-walks the GGUF header to find the first tensor whose type candle does not know.
fn find_unknown_tensor_type(path: &Path) -> Result<Option<(String, u32)>> {
    fn skip(r: &mut BufReader<File>, ty: u64, w: usize, depth: u32) -> Result<()> {
        let size = match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => read_le(r, w)?,
            9 if depth < 4 => {
                let elem = read_le(r, 4)?;
                for _ in 0..read_le(r, w)? {
                    skip(r, elem, w, depth + 1)?;
                }
                return Ok(());
            }
            _ => bail!("bad metadata value type {ty}"),
        };
        Ok(r.seek_relative(i64::try_from(size)?)?)
    }
    let mut r = BufReader::new(File::open(path)?);
    anyhow::ensure!(read_le(&mut r, 4)? == 0x4655_4747, "not a GGUF file");
    // Version 1 used 32-bit lengths and counts.
    let w = if read_le(&mut r, 4)? == 1 { 4 } else { 8 };
    let (n_tensors, n_kv) = (read_le(&mut r, w)?, read_le(&mut r, w)?);
    for _ in 0..n_kv {
        let key_len = read_le(&mut r, w)?;
        r.seek_relative(i64::try_from(key_len)?)?;
        let ty = read_le(&mut r, 4)?;
        skip(&mut r, ty, w, 0)?;
    }
    for _ in 0..n_tensors {
        let mut name = vec![0u8; read_le(&mut r, w)?.min(1 << 16) as usize];
        r.read_exact(&mut name)?;
        let n_dims = read_le(&mut r, 4)?;
        anyhow::ensure!(n_dims <= 8, "too many dimensions");
        for _ in 0..n_dims {
            read_le(&mut r, w)?;
        }
        let ty = read_le(&mut r, 4)? as u32;
        read_le(&mut r, 8)?;
        if !matches!(ty, 0..=3 | 6..=15 | 30) {
            return Ok(Some((String::from_utf8_lossy(&name).into_owned(), ty)));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
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
        let dev = &Device::Cpu;
        let f32q = |t: &Tensor| QTensor::quantize(t, GgmlDType::F32).unwrap();
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
        let path = dir.join("tiny.gguf");
        let md: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut File::create(&path).unwrap(), &md, &ts).unwrap();
        path
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
        let st =
            candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
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
        let st =
            candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
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
}
