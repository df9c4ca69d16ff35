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
use rayon::prelude::*;
use serde::Deserialize;
use serde_json::Value;

/// What a quantized weight's JSON state is named after: `{weight}{QUANT_STATE}{nf4|fp4}`.
const QUANT_STATE: &str = ".quant_state.bitsandbytes__";

/// bitsandbytes' 4-bit level tables (its `get_4bit_type`, as f32): what its `dequantize_4bit`
/// looks the codes up in, whatever `quant_map` a checkpoint stores beside them.
const NF4_LEVELS: [f32; 16] = [
    -1.0,
    -0.6961928,
    -0.52507305,
    -0.3949175,
    -0.28444138,
    -0.18477343,
    -0.091050036,
    0.0,
    0.0795803,
    0.1609302,
    0.2461123,
    0.33791524,
    0.44070983,
    0.562617,
    0.72295684,
    1.0,
];
const FP4_LEVELS: [f32; 16] = [
    0.0,
    0.0052083335,
    0.6666667,
    1.0,
    0.33333334,
    0.5,
    0.16666667,
    0.25,
    0.0,
    -0.0052083335,
    -0.6666667,
    -1.0,
    -0.33333334,
    -0.5,
    -0.16666667,
    -0.25,
];

/// `W.weight.quant_state.bitsandbytes__*`, as bitsandbytes' `QuantState.as_dict` packs it.
#[derive(Debug, Deserialize)]
struct QuantState {
    quant_type: String,
    blocksize: usize,
    dtype: String,
    shape: Vec<usize>,
    nested_blocksize: Option<usize>,
    nested_dtype: Option<String>,
    nested_offset: Option<f64>,
}

/// One stored tensor: its bytes, safetensors dtype name and shape.
pub struct Stored<'a> {
    pub bytes: &'a [u8],
    pub dtype: safetensors::Dtype,
    pub shape: &'a [usize],
}

/// The suffix of `name`'s quantization state where `exists` finds one (`.quant_state.
/// bitsandbytes__nf4` or `__fp4`): None for a weight not stored in 4 bits; an error where
/// both are.
pub fn state_suffix(name: &str, exists: impl Fn(&str) -> bool) -> Result<Option<String>> {
    let found: Vec<String> = ["nf4", "fp4"]
        .iter()
        .map(|t| format!("{QUANT_STATE}{t}"))
        .filter(|suffix| exists(&format!("{name}{suffix}")))
        .collect();
    ensure!(
        found.len() < 2,
        "'{name}' has both an NF4 and an FP4 quantization state"
    );
    Ok(found.into_iter().next())
}

/// The dense weight `name` holds, as bitsandbytes dequantizes it: its little-endian bytes, its
/// dtype and shape. `suffix` is its state's, as [`state_suffix`] found it; `get` finds a
/// stored tensor by name (None when missing).
pub fn dequantize<'a>(
    name: &str,
    suffix: &str,
    get: impl Fn(&str) -> Option<Stored<'a>>,
) -> Result<(Vec<u8>, DType, Vec<usize>)> {
    let part = |suffix: &str| {
        let full = format!("{name}{suffix}");
        get(&full).with_context(|| format!("the 4-bit weight '{name}' has no '{full}'"))
    };
    let key = format!("{name}{suffix}");
    let state: QuantState = serde_json::from_slice(part(suffix)?.bytes)
        .with_context(|| format!("'{key}' is not bitsandbytes' JSON state"))?;
    let dtype = match state.dtype.as_str() {
        "float32" => DType::F32,
        "bfloat16" => DType::BF16,
        "float16" => DType::F16,
        other => bail!("'{key}': dtype '{other}' is not f32, bf16 or f16"),
    };
    let levels = match state.quant_type.as_str() {
        "nf4" if suffix.ends_with("nf4") => NF4_LEVELS,
        "fp4" if suffix.ends_with("fp4") => FP4_LEVELS,
        other => bail!("'{key}': quant_type '{other}' does not match the key"),
    };
    let blocksize = state.blocksize;
    ensure!(
        blocksize.is_power_of_two() && (32..=4096).contains(&blocksize),
        "'{key}': blocksize {blocksize} is not one bitsandbytes uses (32 to 4096, a power of two)"
    );
    let n = state
        .shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .with_context(|| format!("'{key}': shape {:?} overflows", state.shape))?;
    let blocks = n.div_ceil(blocksize);

    let codes = part("")?;
    ensure!(
        codes.bytes.len() == n.div_ceil(2),
        "'{name}' holds {} bytes of codes; a {:?} weight in 4 bits needs {}",
        codes.bytes.len(),
        state.shape,
        n.div_ceil(2)
    );
    // bitsandbytes reads its own table, not this one; a checkpoint whose table differs would
    // mean something else by its codes.
    let stored_levels = f32s(&part(".quant_map")?, 16, &format!("{name}.quant_map"))?;
    ensure!(
        stored_levels
            .iter()
            .map(|v| v.to_bits())
            .eq(levels.iter().map(|v| v.to_bits())),
        "'{name}.quant_map' is not bitsandbytes' {} table",
        state.quant_type
    );
    let absmax_part = part(".absmax")?;
    let absmax: Vec<f32> = match (state.nested_blocksize, state.nested_offset) {
        (Some(group), Some(offset)) => {
            ensure!(group > 0, "'{key}': nested_blocksize 0");
            ensure!(
                state.nested_dtype.as_deref().unwrap_or("float32") == "float32",
                "'{key}': nested_dtype {:?} is not float32",
                state.nested_dtype
            );
            let what = format!("{name}.absmax");
            ensure!(
                absmax_part.dtype == safetensors::Dtype::U8 && absmax_part.bytes.len() == blocks,
                "'{what}' must be u8 [{blocks}] under double quantization, not {:?} {:?}",
                absmax_part.dtype,
                absmax_part.shape
            );
            let nested_levels = f32s(
                &part(".nested_quant_map")?,
                256,
                &format!("{name}.nested_quant_map"),
            )?;
            let groups = blocks.div_ceil(group);
            let group_scale = f32s(
                &part(".nested_absmax")?,
                groups,
                &format!("{name}.nested_absmax"),
            )?;
            // bitsandbytes: dequantize_blockwise (the level times its group's scale, in f32),
            // then += offset, each an f32 rounding.
            let offset = offset as f32;
            absmax_part
                .bytes
                .iter()
                .enumerate()
                .map(|(b, &q)| nested_levels[q as usize] * group_scale[b / group] + offset)
                .collect()
        }
        (None, None) => f32s(&absmax_part, blocks, &format!("{name}.absmax"))?,
        _ => bail!("'{key}': nested_blocksize and nested_offset come together"),
    };

    // Block by block in parallel: each level times its block's scale in f32, rounded once to
    // the dtype (round to nearest even, as torch's `.to` does).
    let size = dtype.size_in_bytes();
    let mut out = vec![0u8; n * size];
    out.par_chunks_mut(blocksize * size)
        .enumerate()
        .for_each(|(block, dense)| {
            let scale = absmax[block];
            for (j, bytes) in dense.chunks_exact_mut(size).enumerate() {
                let i = block * blocksize + j;
                let byte = codes.bytes[i / 2];
                let nibble = if i.is_multiple_of(2) {
                    byte >> 4
                } else {
                    byte & 15
                };
                let v = levels[nibble as usize] * scale;
                match dtype {
                    DType::F32 => bytes.copy_from_slice(&v.to_le_bytes()),
                    DType::BF16 => bytes.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
                    _ => bytes.copy_from_slice(&half::f16::from_f32(v).to_le_bytes()),
                }
            }
        });
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
    // Old transformers configs have load_in_4bit and no quant_method.
    let method = q
        .get("quant_method")
        .and_then(Value::as_str)
        .unwrap_or("bitsandbytes");
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
