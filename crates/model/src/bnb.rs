//! Checkpoints bitsandbytes stored in 4 bits: what transformers' `save_pretrained` writes for a
//! model loaded with `BitsAndBytesConfig(load_in_4bit=True)`, as the `*-bnb-4bit` checkpoints
//! on the Hub are. Each quantized linear weight is stored as
//!
//! - `W.weight`: the codes, two to a byte (the even element in the high nibble), in any
//!   storage dtype (`bnb_4bit_quant_storage`);
//! - `W.weight.absmax`: one scale per block of `blocksize` elements, f32, or with double
//!   quantization (`bnb_4bit_use_double_quant`) a u8 index into `nested_quant_map`, times
//!   `nested_absmax` of its group of `nested_blocksize` blocks, plus `nested_offset`;
//! - `W.weight.quant_map`: the 16 levels (NF4 or FP4), `W.weight.quant_state.bitsandbytes__nf4`
//!   (or `__fp4`): JSON with the shape, the dtype and the block sizes.
//!
//! helix reads such a weight back to the dense tensor bitsandbytes' `dequantize_4bit` gives,
//! bit for bit (each level times its block's f32 scale, rounded once to the dtype): the model
//! then holds it as any other weight, or re-quantizes it with `quantize_base = "nf4"`
//! (tests/bnb_4bit.rs holds both to bitsandbytes and transformers).

use anyhow::{bail, ensure, Context, Result};
use candle_core::DType;
use serde::Deserialize;
use serde_json::Value;

/// What a quantized weight's JSON state is named after: `{weight}{QUANT_STATE}{nf4|fp4}`.
pub const QUANT_STATE: &str = ".quant_state.bitsandbytes__";

/// `W.weight.quant_state.bitsandbytes__*`, as bitsandbytes' `QuantState.as_dict` packs it.
#[derive(Debug, Deserialize)]
struct QuantState {
    quant_type: String,
    blocksize: usize,
    dtype: String,
    shape: Vec<usize>,
    nested_blocksize: Option<usize>,
    nested_offset: Option<f64>,
}

/// One stored tensor: its bytes, safetensors dtype name and shape.
pub struct Stored<'a> {
    pub bytes: &'a [u8],
    pub dtype: safetensors::Dtype,
    pub shape: &'a [usize],
}

/// The dense weight `name` holds, as bitsandbytes dequantizes it: its little-endian bytes, its
/// dtype and shape. `get` finds a stored tensor by name (None when missing).
pub fn dequantize<'a>(
    name: &str,
    get: impl Fn(&str) -> Option<Stored<'a>>,
) -> Result<(Vec<u8>, DType, Vec<usize>)> {
    let part = |suffix: &str| {
        let full = format!("{name}{suffix}");
        get(&full).with_context(|| format!("the 4-bit weight '{name}' has no '{full}'"))
    };
    let (state_name, state) = ["nf4", "fp4"]
        .iter()
        .find_map(|t| {
            let n = format!("{QUANT_STATE}{t}");
            get(&format!("{name}{n}")).map(|s| (n, s))
        })
        .with_context(|| format!("'{name}' is stored as integers without a quantization state"))?;
    let state: QuantState = serde_json::from_slice(state.bytes)
        .with_context(|| format!("'{name}{state_name}' is not bitsandbytes' JSON state"))?;
    let dtype = match state.dtype.as_str() {
        "float32" => DType::F32,
        "bfloat16" => DType::BF16,
        "float16" => DType::F16,
        other => bail!("'{name}{state_name}': dtype '{other}' is not f32, bf16 or f16"),
    };
    ensure!(
        matches!(state.quant_type.as_str(), "nf4" | "fp4") && state.blocksize > 0,
        "'{name}{state_name}': quant_type '{}' with blocksize {} is not bitsandbytes' 4-bit",
        state.quant_type,
        state.blocksize
    );
    let n = state
        .shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .with_context(|| format!("'{name}{state_name}': shape {:?} overflows", state.shape))?;
    let blocks = n.div_ceil(state.blocksize);

    let codes = get(name).with_context(|| format!("'{name}' is missing"))?;
    ensure!(
        codes.bytes.len() == n.div_ceil(2),
        "'{name}' holds {} bytes of codes; a {:?} weight in 4 bits needs {}",
        codes.bytes.len(),
        state.shape,
        n.div_ceil(2)
    );
    let levels = f32s(&part(".quant_map")?, 16, &format!("{name}.quant_map"))?;
    let absmax_part = part(".absmax")?;
    let absmax: Vec<f32> = match (state.nested_blocksize, state.nested_offset) {
        (Some(group), Some(offset)) => {
            ensure!(group > 0, "'{name}{state_name}': nested_blocksize 0");
            let what = format!("{name}.absmax");
            ensure!(
                absmax_part.dtype == safetensors::Dtype::U8 && absmax_part.bytes.len() == blocks,
                "'{what}' must be u8 [{blocks}] under double quantization, not {:?} {:?}",
                absmax_part.dtype,
                absmax_part.shape
            );
            let code = f32s(
                &part(".nested_quant_map")?,
                256,
                &format!("{name}.nested_quant_map"),
            )?;
            let groups = blocks.div_ceil(group);
            let scale = f32s(
                &part(".nested_absmax")?,
                groups,
                &format!("{name}.nested_absmax"),
            )?;
            // bitsandbytes: dequantize_blockwise (code times the group's scale, in f32), then
            // += offset, each an f32 rounding.
            let offset = offset as f32;
            absmax_part
                .bytes
                .iter()
                .enumerate()
                .map(|(b, &q)| code[q as usize] * scale[b / group] + offset)
                .collect()
        }
        (None, None) => f32s(&absmax_part, blocks, &format!("{name}.absmax"))?,
        _ => bail!("'{name}{state_name}': nested_blocksize and nested_offset come together"),
    };

    let mut out = Vec::with_capacity(n * dtype.size_in_bytes());
    for i in 0..n {
        let byte = codes.bytes[i / 2];
        let code = if i % 2 == 0 { byte >> 4 } else { byte & 15 };
        // The level times its block's scale in f32, rounded once to the dtype (round to
        // nearest even, as torch's `.to` does).
        let v = levels[code as usize] * absmax[i / state.blocksize];
        match dtype {
            DType::F32 => out.extend_from_slice(&v.to_le_bytes()),
            DType::BF16 => out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
            _ => out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
        }
    }
    Ok((out, dtype, state.shape))
}

/// `t` as `len` f32 values; `what` names it in errors.
fn f32s(t: &Stored, len: usize, what: &str) -> Result<Vec<f32>> {
    ensure!(
        t.dtype == safetensors::Dtype::F32 && t.bytes.len() == 4 * len,
        "'{what}' must be f32 [{len}], not {:?} {:?}",
        t.dtype,
        t.shape
    );
    Ok(t.bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// Checks `config.json`'s `quantization_config`: bitsandbytes' 4-bit is read (its weights
/// dequantized as they load); any other method is refused naming the key, before a weight
/// file is opened.
pub fn check_quantization_config(q: &Value) -> Result<()> {
    let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("");
    ensure!(
        method == "bitsandbytes",
        "quantization_config.quant_method = '{method}' is not supported: helix reads \
         bitsandbytes 4-bit checkpoints and dense ones"
    );
    let flag = |k: &str| q.get(k).and_then(Value::as_bool).unwrap_or(false);
    ensure!(
        !flag("load_in_8bit"),
        "quantization_config.load_in_8bit = true: helix reads bitsandbytes' 4-bit checkpoints, \
         not its 8-bit ones"
    );
    ensure!(
        flag("load_in_4bit"),
        "quantization_config: a bitsandbytes checkpoint without load_in_4bit = true"
    );
    Ok(())
}
