//! GGUF import: turns a llama-architecture GGUF file into a Hugging Face-format model directory
//! (`config.json`, `model.safetensors`, tokenizer files) that transformers and helix both load.
//!
//! Weights are de-quantized with candle's GGUF reader. llama.cpp's converter permutes the rows of
//! `attn_q`/`attn_k` so that RoPE can rotate interleaved pairs; the HF layout rotates halves, so we
//! undo that permutation exactly as transformers does when it loads a GGUF.

use std::fs::File;
use std::io::{BufReader, Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use serde_json::json;

use crate::gguf_tokenizer::{Meta, TokenizerFiles};
use crate::safetensors_write::{write_atomic, write_json, write_safetensors, TensorSpec};

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
                bail!(meta.err(
                    "tensor rope_freqs.weight (Llama 3.1's RoPE scaling, as per-frequency \
                     factors) is not supported by GGUF import: they do not say the \
                     rope_scaling they came from; the Hugging Face checkpoint's config.json \
                     does, and helix loads it directly"
                ));
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

/// A GGUF file whose header, metadata and tensor table have been read and checked: everything
/// an import writes except the tensors, which [`GgufModel::tensor`] reads one at a time.
pub struct GgufModel {
    file: PathBuf,
    content: gguf_file::Content,
    planned: Vec<Planned>,
    tok: TokenizerFiles,
    /// The `config.json` of the HF directory.
    pub config: serde_json::Value,
}

impl GgufModel {
    /// Reads a llama-architecture GGUF from the start of `reader` (a file, or bytes in memory);
    /// `file` names it in messages; `dtype`, what the import will write, goes in `config.json`.
    pub fn read<R: Read + Seek>(reader: &mut R, file: &Path, dtype: DType) -> Result<Self> {
        let file_err = |msg: String| anyhow!("gguf {}: {msg}", file.display());
        // A header this walk cannot finish is left to candle's reader to describe.
        let mut scan = HeaderScan::default();
        let _ = scan_header(reader, &mut scan);
        if scan.zero_alignment {
            bail!(file_err(
                "metadata key general.alignment is 0 (it must be positive)".into()
            ));
        }
        reader
            .rewind()
            .map_err(|e| file_err(format!("cannot read: {e}")))?;
        let content = match gguf_file::Content::read(reader) {
            Ok(c) => c,
            Err(e) => {
                // candle rejects unknown quantization types without naming the tensor.
                if let Some((tensor, ty)) = scan.unknown_type {
                    bail!(file_err(format!(
                        "unsupported tensor type {} for tensor {tensor}",
                        ggml_type_name(ty)
                    )));
                }
                bail!(file_err(format!("cannot read GGUF header: {e}")));
            }
        };
        let meta = Meta {
            file,
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
            "torch_dtype": if dtype == DType::BF16 { "bfloat16" } else { "float32" },
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
        Ok(Self {
            file: file.to_path_buf(),
            content,
            planned,
            tok,
            config,
        })
    }

    /// The HF name and shape of every tensor the import writes, in write order.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &[usize])> {
        self.planned
            .iter()
            .map(|p| (p.hf.as_str(), p.shape.as_slice()))
    }

    /// Reads the tensor the import writes as `hf_name` from `reader`: de-quantized to f32, in
    /// the HF layout.
    pub fn tensor<R: Read + Seek>(&self, reader: &mut R, hf_name: &str) -> Result<Tensor> {
        let p = self
            .planned
            .iter()
            .find(|p| p.hf == hf_name)
            .with_context(|| format!("gguf {}: no tensor for {hf_name}", self.file.display()))?;
        let ctx = || format!("gguf {}: tensor {}", self.file.display(), p.gguf);
        let q = self
            .content
            .tensor(reader, &p.gguf, &Device::Cpu)
            .with_context(ctx)?;
        let mut t = q
            .dequantize(&Device::Cpu)
            .with_context(ctx)?
            .to_dtype(DType::F32)?;
        if let Some(heads) = p.unpermute_heads {
            t = unpermute(&t, heads).with_context(ctx)?;
        }
        Ok(t)
    }
}

/// Imports a llama-architecture GGUF into `out_dir` as an HF model directory.
pub fn import_gguf(gguf: &Path, out_dir: &Path, opts: &ImportOptions) -> Result<ImportReport> {
    if !matches!(opts.dtype, DType::F32 | DType::BF16) {
        bail!(
            "unsupported import dtype {:?} (use F32 or BF16)",
            opts.dtype
        );
    }
    let mut reader = BufReader::new(
        File::open(gguf).map_err(|e| anyhow!("gguf {}: cannot open: {e}", gguf.display()))?,
    );
    let model = GgufModel::read(&mut reader, gguf, opts.dtype)?;

    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut parameters = 0usize;
    let specs: Vec<TensorSpec> = model
        .tensors()
        .map(|(name, shape)| TensorSpec::new(name.to_string(), opts.dtype, shape))
        .collect();
    write_atomic(&out_dir.join("model.safetensors"), |w| {
        write_safetensors(w, &specs, |s| {
            let t = model.tensor(&mut reader, &s.name)?;
            parameters += t.elem_count();
            Ok(t)
        })
    })?;
    let tok = &model.tok;
    write_atomic(&out_dir.join("tokenizer.json"), |w| {
        Ok(w.write_all(tok.tokenizer_json.as_bytes())?)
    })?;
    write_json(
        &out_dir.join("tokenizer_config.json"),
        &tok.tokenizer_config,
    )?;
    write_json(
        &out_dir.join("special_tokens_map.json"),
        &tok.special_tokens_map,
    )?;
    write_json(&out_dir.join("config.json"), &model.config)?;
    Ok(ImportReport {
        tensors: model.planned.len(),
        parameters,
        config: model.config,
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

/// What a walk over a GGUF header finds that candle's reader does not report.
#[derive(Debug, Default, PartialEq)]
struct HeaderScan {
    /// The last `general.alignment` is an integer 0: candle's reader would divide by it.
    zero_alignment: bool,
    /// The first tensor whose type candle does not know, with that type.
    unknown_type: Option<(String, u32)>,
}

/// Walks a GGUF header from the start of `r` as candle reads it, skipping values without
/// allocating for them, and fills `scan` as it goes: a walk stopped by an error keeps what it
/// found before.
fn scan_header<R: Read + Seek>(r: &mut R, scan: &mut HeaderScan) -> Result<()> {
    const ALIGNMENT_KEY: &[u8] = b"general.alignment";
    fn fixed_size(ty: u64) -> Option<u64> {
        Some(match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            _ => return None,
        })
    }
    // candle nests arrays up to this depth.
    fn skip<R: Read + Seek>(r: &mut R, ty: u64, w: usize, depth: u32) -> Result<()> {
        let size = match (ty, fixed_size(ty)) {
            (_, Some(size)) => size,
            (8, _) => read_le(r, w)?,
            (9, _) if depth < 64 => {
                let (elem, n) = (read_le(r, 4)?, read_le(r, w)?);
                // Fixed-size arrays are skipped in one seek so a bogus length cannot spin.
                match fixed_size(elem) {
                    Some(size) => n.checked_mul(size).context("array too large")?,
                    None => {
                        for _ in 0..n {
                            skip(r, elem, w, depth + 1)?;
                        }
                        0
                    }
                }
            }
            _ => bail!("bad metadata value type {ty}"),
        };
        Ok(r.seek_relative(i64::try_from(size)?)?)
    }
    // Whether the `len`-byte string at `r` is `want`, as candle reads it (trailing NULs
    // dropped), read through a small buffer whatever `len` claims.
    fn string_is<R: Read>(r: &mut R, len: u64, want: &[u8]) -> Result<bool> {
        let mut buf = [0u8; 256];
        let mut same = len >= want.len() as u64;
        let mut at = 0u64;
        while at < len {
            let n = (len - at).min(buf.len() as u64) as usize;
            r.read_exact(&mut buf[..n])?;
            for (i, &b) in buf[..n].iter().enumerate() {
                let want = usize::try_from(at + i as u64)
                    .ok()
                    .and_then(|i| want.get(i));
                same &= b == want.copied().unwrap_or(0);
            }
            at += n as u64;
        }
        Ok(same)
    }
    r.rewind()?;
    let magic = read_le(r, 4)?;
    anyhow::ensure!(
        magic == 0x4655_4747 || magic == 0x4747_5546,
        "not a GGUF file"
    );
    // Version 1 used 32-bit lengths and counts.
    let w = if read_le(r, 4)? == 1 { 4 } else { 8 };
    let (n_tensors, n_kv) = (read_le(r, w)?, read_le(r, w)?);
    for _ in 0..n_kv {
        let key_len = read_le(r, w)?;
        let is_alignment = string_is(r, key_len, ALIGNMENT_KEY)?;
        let ty = read_le(r, 4)?;
        if is_alignment {
            // candle takes the alignment from 8-, 16- and 32-bit integers, else uses 32.
            scan.zero_alignment = false;
            if let (0..=5, Some(size)) = (ty, fixed_size(ty)) {
                scan.zero_alignment = read_le(r, size as usize)? == 0;
                continue;
            }
        }
        skip(r, ty, w, 0)?;
    }
    for _ in 0..n_tensors {
        let name_len = read_le(r, w)?;
        let mut name = vec![0u8; name_len.min(1 << 16) as usize];
        r.read_exact(&mut name)?;
        r.seek_relative(i64::try_from(name_len - name.len() as u64)?)?;
        let n_dims = read_le(r, 4)?;
        anyhow::ensure!(n_dims <= 8, "too many dimensions");
        for _ in 0..n_dims {
            read_le(r, w)?;
        }
        let ty = read_le(r, 4)? as u32;
        read_le(r, 8)?;
        if !matches!(ty, 0..=3 | 6..=15 | 30) {
            scan.unknown_type = Some((String::from_utf8_lossy(&name).into_owned(), ty));
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "gguf_tests.rs"]
mod tests;
