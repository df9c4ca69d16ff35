//! Checkpoints bitsandbytes stored in 4 bits (transformers' `load_in_4bit` models saved with
//! `save_pretrained`; fixtures written by scripts/bnb_reference.py with bitsandbytes 0.50.2):
//! every 4-bit weight reads back to what bitsandbytes' `dequantize_4bit` gives, bit for bit
//! (NF4 with double quantization in bf16, FP4 without in f32, and in bnb-parts several groups
//! of double quantization, an odd element count, f16, bf16 storage, FP4 with double
//! quantization), the model's logits are transformers' 4-bit model's, `quantize_base = "nf4"`
//! re-quantizes them to bitsandbytes' own codes, `export` writes them dense without the
//! quantization config, and a damaged or foreign quantized checkpoint is refused naming the
//! key or tensor.

mod common;
use common::{fixture, load_st, max_abs};

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use helix::kernels::nf4::Nf4Weight;
use helix::model::hf_export::{export_hf_dir, ExportOptions, DEFAULT_MAX_SHARD_BYTES};
use helix::model::linear::{keep_dense, Quantization};
use helix::model::{ForwardMask, Llama, LlamaConfig, LoadOptions, SafetensorsWeights};

fn load(name: &str, dtype: DType, quantize_base: Quantization) -> Result<Llama> {
    let dir = fixture(name);
    let cfg = LlamaConfig::from_file(&dir.join("config.json"))?;
    let weights = SafetensorsWeights::open_dir(&dir)?;
    let opts = LoadOptions {
        dtype,
        device: Device::Cpu,
        trainable: &|_| false,
        linear_hook: &keep_dense,
        tensor_parallel: None,
        quantize_base,
    };
    Llama::load(&cfg, &weights, &opts)
}

/// Every 4-bit weight of fixture `name` equals bitsandbytes' dequantization, bit for bit.
fn weights_equal_bitsandbytes(name: &str) -> Result<usize> {
    let dir = fixture(name);
    let weights = SafetensorsWeights::open_dir(&dir)?;
    let reference = load_st(&dir.join("reference.safetensors"));
    let mut checked = 0;
    for (key, want) in &reference {
        let Some(weight) = key.strip_prefix("dense.") else {
            continue;
        };
        assert!(
            weights.is_4bit(weight),
            "{name}: {weight} is stored in 4 bits"
        );
        let got = weights.load(weight, want.dims(), want.dtype(), &Device::Cpu)?;
        let (got, want) = (got.to_dtype(DType::F32)?, want.to_dtype(DType::F32)?);
        let diff = max_abs(&(&got - &want)?);
        assert_eq!(
            diff, 0.0,
            "{name}: {weight} differs from bitsandbytes by {diff}"
        );
        // Not vacuous: the weight takes most of the 16 levels times its scales.
        let mut values = want.flatten_all()?.to_vec1::<f32>()?;
        values.sort_by(f32::total_cmp);
        values.dedup();
        assert!(
            values.len() > 16,
            "{name}: {weight} has {} values",
            values.len()
        );
        checked += 1;
    }
    Ok(checked)
}

#[test]
fn four_bit_weights_read_back_to_bitsandbytes_dequantization_bit_for_bit() -> Result<()> {
    for (name, weights) in [("bnb-nf4-bf16", 14), ("bnb-fp4-f32", 14), ("bnb-parts", 3)] {
        let n = weights_equal_bitsandbytes(name)?;
        assert_eq!(n, weights, "{name}");
        println!("{name}: {n} 4-bit weights equal bitsandbytes' dequantize_4bit bit for bit");
    }
    Ok(())
}

/// Fixture `name` loaded in `dtype` with `quantize_base`: max |its logits − transformers'| on
/// the reference's ids, and max |transformers' logit|.
fn logits_diff(name: &str, dtype: DType, quantize_base: Quantization) -> Result<(f32, f32)> {
    let model = load(name, dtype, quantize_base)?;
    let reference = load_st(&fixture(name).join("reference.safetensors"));
    let ids = reference["input_ids"].to_dtype(DType::U32)?;
    let (b, s) = ids.dims2()?;
    let positions = Tensor::arange(0i64, s as i64, &Device::Cpu)?
        .unsqueeze(0)?
        .repeat((b, 1))?;
    let hidden = model.forward_hidden(&ids, &positions, &ForwardMask::default())?;
    let got = model
        .logits(&hidden)?
        .reshape((b, s, ()))?
        .to_dtype(DType::F32)?;
    let want = &reference["logits"];
    Ok((max_abs(&(&got - want)?), max_abs(want)))
}

#[test]
fn a_four_bit_checkpoint_gives_transformers_logits() -> Result<()> {
    // f32: the same products as bitsandbytes' dequantize-then-matmul, to rounding.
    let (d, scale) = logits_diff("bnb-fp4-f32", DType::F32, Quantization::None)?;
    println!("bnb-fp4-f32: max |dlogits| {d:.3e} of max |logit| {scale:.3}");
    assert!(d <= 1e-4, "f32 logits differ by {d}");

    // bf16: both compute in bf16 with their own op order: a few of bf16's steps at the
    // logits' size (a step is 2^-7 between 1 and 2).
    let (d, scale) = logits_diff("bnb-nf4-bf16", DType::BF16, Quantization::None)?;
    println!("bnb-nf4-bf16: max |dlogits| {d:.3e} of max |logit| {scale:.3}");
    assert!(
        d <= 0.02 * scale,
        "bf16 logits differ by {d} (max |logit| {scale})"
    );
    Ok(())
}

#[test]
fn quantize_base_nf4_requantizes_a_bitsandbytes_checkpoint_to_its_own_codes() -> Result<()> {
    // bitsandbytes' NF4 levels and 64-element blocks are torchao's (tests/nf4.rs): each block's
    // largest element reads back as ±its scale, so helix's NF4 of the weight read back finds
    // bitsandbytes' codes, and only the scales move, by the double quantizations' rounding.
    let dir = fixture("bnb-nf4-bf16");
    let weights = SafetensorsWeights::open_dir(&dir)?;
    let stored = load_st(&dir.join("model.safetensors"));
    let reference = load_st(&dir.join("reference.safetensors"));
    let mut worst = 0f32;
    for (key, dense) in &reference {
        let Some(name) = key.strip_prefix("dense.") else {
            continue;
        };
        let w = weights.load(name, dense.dims(), DType::BF16, &Device::Cpu)?;
        let nf4 = Nf4Weight::quantize(&w)?;
        let codes = nf4.parts().0.to_vec1::<u8>()?;
        assert_eq!(
            codes,
            stored[name].flatten_all()?.to_vec1::<u8>()?,
            "{name}: codes"
        );
        let moved = max_abs(&(nf4.dequantize()?.to_dtype(DType::F32)? - w.to_dtype(DType::F32)?)?);
        worst = worst.max(moved / max_abs(&w));
    }
    println!("bnb-nf4-bf16 in helix's NF4: bitsandbytes' codes; weights moved by {worst:.2e} of their largest");
    assert!(worst < 0.02, "{worst}");

    // The model loads that way and still gives transformers' logits to bf16's tolerance.
    let (d, scale) = logits_diff("bnb-nf4-bf16", DType::BF16, Quantization::Nf4)?;
    println!("bnb-nf4-bf16 with quantize_base = nf4: max |dlogits| {d:.3e}");
    assert!(d <= 0.03 * scale, "{d}");
    Ok(())
}

#[test]
fn foreign_or_damaged_quantized_checkpoints_are_refused_naming_the_key() -> Result<()> {
    let dir = fixture("bnb-nf4-bf16");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    let refused = |edit: &dyn Fn(&mut serde_json::Value), want: &str| {
        let mut c = config.clone();
        edit(&mut c["quantization_config"]);
        let err = format!(
            "{:#}",
            LlamaConfig::from_json_str(&c.to_string()).unwrap_err()
        );
        assert!(err.contains(want), "{want}: {err}");
    };
    refused(
        &|q| q["quant_method"] = "gptq".into(),
        "quantization_config.quant_method = 'gptq'",
    );
    refused(
        &|q| q["load_in_8bit"] = true.into(),
        "quantization_config.load_in_8bit",
    );
    refused(
        &|q| q["load_in_4bit"] = false.into(),
        "without load_in_4bit",
    );

    // Damaged copies of the checkpoint: loading a weight names what is wrong with it.
    let mut tensors = load_st(&dir.join("model.safetensors"));
    let tmp = tempfile::tempdir()?;
    let load_error = |tensors: &std::collections::HashMap<String, Tensor>,
                      name: &str,
                      shape: (usize, usize)|
     -> Result<String> {
        candle_core::safetensors::save(tensors, tmp.path().join("model.safetensors"))?;
        let damaged = SafetensorsWeights::open_dir(tmp.path())?;
        let err = damaged
            .load(name, shape, DType::BF16, &Device::Cpu)
            .unwrap_err();
        Ok(format!("{err:#}"))
    };
    let (down, up) = (
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
    );
    // A missing absmax.
    let gone = format!("{down}.absmax");
    tensors.remove(&gone);
    let err = load_error(&tensors, down, (64, 128))?;
    assert!(err.contains(&gone), "{err}");
    // A 4-bit weight asked for at another shape is named with both shapes.
    let err = load_error(&tensors, up, (64, 128))?;
    let want = "4-bit [128, 64] weight, expected [64, 128]";
    assert!(err.contains(want), "{err}");
    // A level table that is not bitsandbytes' (the codes would mean other values).
    let table = format!("{up}.quant_map");
    let halved = (&tensors[&table] * 0.5)?;
    tensors.insert(table.clone(), halved);
    let err = load_error(&tensors, up, (128, 64))?;
    let want = format!("'{table}' is not bitsandbytes' nf4 table");
    assert!(err.contains(&want), "{err}");
    Ok(())
}

#[test]
fn export_writes_a_four_bit_checkpoint_dense_without_its_quantization_config() -> Result<()> {
    let dir = fixture("bnb-nf4-bf16");
    let model = load("bnb-nf4-bf16", DType::BF16, Quantization::None)?;
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("dense");
    let opts = ExportOptions {
        dtype: DType::BF16,
        max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
        chat_template: None,
    };
    export_hf_dir(&model, &dir, &out, &opts, |_, t| Ok(t))?;
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json"))?)?;
    assert!(config.get("quantization_config").is_none(), "{config}");
    // It reads back as an ordinary checkpoint holding bitsandbytes' weights.
    let weights = SafetensorsWeights::open_dir(&out)?;
    let mut checked = 0;
    for (key, want) in load_st(&dir.join("reference.safetensors")) {
        let Some(name) = key.strip_prefix("dense.") else {
            continue;
        };
        assert!(!weights.is_4bit(name));
        let got = weights.load(name, want.dims(), DType::BF16, &Device::Cpu)?;
        let d = max_abs(&(got.to_dtype(DType::F32)? - want.to_dtype(DType::F32)?)?);
        assert_eq!(d, 0.0, "{name}");
        checked += 1;
    }
    assert_eq!(checked, 14);
    LlamaConfig::from_file(&out.join("config.json"))?;
    Ok(())
}
