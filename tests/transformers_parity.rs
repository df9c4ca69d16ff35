//! helix's Llama against PyTorch + transformers on tiny random models (fixtures written by
//! scripts/make_reference.py): logits, loss and every parameter's gradient, in f32.

mod common;
use common::{fixture, max_abs};

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use helix::model::linear::keep_dense;
use helix::model::{ForwardMask, Llama, LlamaConfig, LoadOptions, SafetensorsWeights};
use helix::ops::RopeTable;

fn check_fixture(name: &str) -> Result<()> {
    let dir = fixture(name);
    let dev = Device::Cpu;
    let cfg = LlamaConfig::from_file(&dir.join("config.json"))?;
    let weights = SafetensorsWeights::open_dir(&dir)?;
    let opts = LoadOptions {
        dtype: DType::F32,
        device: dev.clone(),
        trainable: &|_| true,
        linear_hook: &keep_dense,
        tensor_parallel: None,
        quantize_base: Default::default(),
    };
    let model = Llama::load(&cfg, &weights, &opts)?;
    let r = candle_core::safetensors::load(dir.join("reference.safetensors"), &dev)?;

    let input_ids = r["input_ids"].to_dtype(DType::U32)?;
    let mask = r["attention_mask"].flatten_all()?.to_vec1::<i64>()?;
    let fmask = ForwardMask {
        key_valid: Some(mask.iter().map(|&m| m as u8).collect()),
        segment_ids: None,
    };
    let hidden = model.forward_hidden(&input_ids, &r["position_ids"], &fmask)?;

    let logits = model.logits(&hidden)?;
    let d_logits = max_abs(&(&logits - &r["logits"])?);
    let (sum, n) = model.loss_sum(&hidden, &r["labels"], 4)?;
    let loss = (sum / n as f64)?;
    let d_loss = (loss.to_scalar::<f32>()? - r["loss"].to_scalar::<f32>()?).abs();
    println!("{name}: max |dlogits| = {d_logits:.3e}, |dloss| = {d_loss:.3e}");
    assert!(d_logits <= 1e-4, "{name}: logits differ by {d_logits}");
    assert!(d_loss <= 1e-5, "{name}: loss differs by {d_loss}");

    let grads = loss.backward()?;
    let mut worst = (0f32, String::new());
    let mut checked = 0;
    for (pname, var) in model.trainable_params() {
        let want = r
            .get(&format!("grad.{pname}"))
            .unwrap_or_else(|| panic!("no reference grad for {pname}"));
        let got = grads
            .get(var)
            .unwrap_or_else(|| panic!("no gradient for {pname}"));
        let rel = max_abs(&(got - want)?) / max_abs(want).max(1e-12);
        if rel > worst.0 {
            worst = (rel, pname.clone());
        }
        assert!(
            rel <= 1e-4,
            "{name}: gradient of {pname} differs by {rel:.3e} relative"
        );
        checked += 1;
    }
    let expected = r.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(
        checked, expected,
        "{name}: every reference gradient is checked"
    );
    println!(
        "{name}: {checked} gradients, worst relative difference {:.3e} ({})",
        worst.0, worst.1
    );
    Ok(())
}

#[test]
fn tiny_mha_untied_matches_transformers() -> Result<()> {
    check_fixture("tiny-mha-untied")
}

#[test]
fn tiny_gqa_tied_matches_transformers() -> Result<()> {
    check_fixture("tiny-gqa-tied")
}

#[test]
fn tiny_gqa_untied_three_layers_matches_transformers() -> Result<()> {
    check_fixture("tiny-gqa-untied-b3")
}

#[test]
fn llama3_scaled_rope_matches_transformers() -> Result<()> {
    check_fixture("tiny-llama3-rope")
}

#[test]
fn yarn_scaled_rope_matches_transformers() -> Result<()> {
    check_fixture("tiny-yarn-rope")
}

/// RoPE's tables for the scalings real checkpoints ship with (Llama 3.1 / 3.2, YaRN with its
/// options, linear, none), read from the config.json transformers writes for each, against
/// transformers' LlamaRotaryEmbedding at positions up to 131,071.
#[test]
fn rope_tables_match_transformers_for_every_scaling() -> Result<()> {
    let dir = fixture("rope");
    let dev = Device::Cpu;
    let cases: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json"))?)?;
    let r = candle_core::safetensors::load(dir.join("tables.safetensors"), &dev)?;
    let positions = r["positions"].unsqueeze(0)?;
    assert!(cases.len() >= 7, "{} cases", cases.len());
    for (name, config) in &cases {
        let cfg = LlamaConfig::from_json_str(&config.to_string())?;
        let (inv_freq, _) = cfg
            .rope_scaling
            .inverse_frequencies(cfg.head_dim, cfg.rope_theta);
        let want = r[&format!("inv_freq.{name}")].to_vec1::<f32>()?;
        // Each step is transformers' f32 operation in its order: the same bits.
        assert_eq!(inv_freq, want, "{name}: inverse frequencies");
        let table = RopeTable::new(cfg.head_dim, cfg.rope_theta, &cfg.rope_scaling, &dev)?;
        let (cos, sin) = table.cos_sin(&positions, DType::F32)?;
        let d_cos = max_abs(&(cos.squeeze(0)?.squeeze(0)? - &r[&format!("cos.{name}")])?);
        let d_sin = max_abs(&(sin.squeeze(0)?.squeeze(0)? - &r[&format!("sin.{name}")])?);
        println!("{name}: max |dcos| = {d_cos:.1e}, max |dsin| = {d_sin:.1e}");
        // The angles are the same f32 products; only cos / sin's last bit may differ.
        assert!(
            d_cos <= 1e-6 && d_sin <= 1e-6,
            "{name}: cos {d_cos}, sin {d_sin}"
        );
    }
    Ok(())
}

#[test]
fn frozen_parameters_get_no_gradient_and_the_rest_still_match() -> Result<()> {
    let dir = fixture("tiny-gqa-untied-b3");
    let dev = Device::Cpu;
    let cfg = LlamaConfig::from_file(&dir.join("config.json"))?;
    let weights = SafetensorsWeights::open_dir(&dir)?;
    let only_layer1 = |n: &str| n.starts_with("model.layers.1.");
    let opts = LoadOptions {
        dtype: DType::F32,
        device: dev.clone(),
        trainable: &only_layer1,
        linear_hook: &keep_dense,
        tensor_parallel: None,
        quantize_base: Default::default(),
    };
    let model = Llama::load(&cfg, &weights, &opts)?;
    assert_eq!(model.trainable_params().len(), 9);
    let r = candle_core::safetensors::load(dir.join("reference.safetensors"), &dev)?;
    let mask = r["attention_mask"].flatten_all()?.to_vec1::<i64>()?;
    let fmask = ForwardMask {
        key_valid: Some(mask.iter().map(|&m| m as u8).collect()),
        segment_ids: None,
    };
    let hidden = model.forward_hidden(
        &r["input_ids"].to_dtype(DType::U32)?,
        &r["position_ids"],
        &fmask,
    )?;
    let (sum, n) = model.loss_sum(&hidden, &r["labels"], 7)?;
    let grads = (sum / n as f64)?.backward()?;
    // Frozen weights are constants: the embedding (a leaf every path reaches) has no gradient.
    assert!(grads.get(model.embed_tokens()).is_none());
    for (pname, var) in model.trainable_params() {
        let want = &r[&format!("grad.{pname}")];
        let rel = max_abs(&(grads.get(var).unwrap() - want)?) / max_abs(want);
        assert!(rel <= 1e-4, "{pname}: {rel}");
    }
    Ok(())
}

#[test]
fn packed_documents_do_not_see_each_other() -> Result<()> {
    // Two documents packed in one row with segment ids and restarted positions give exactly the
    // hidden states each gets alone.
    let dir = fixture("tiny-gqa-tied");
    let dev = Device::Cpu;
    let cfg = LlamaConfig::from_file(&dir.join("config.json"))?;
    let model = Llama::load(
        &cfg,
        &SafetensorsWeights::open_dir(&dir)?,
        &LoadOptions::inference(DType::F32, dev.clone()),
    )?;
    let (a, b) = (vec![5u32, 17, 33, 2], vec![9u32, 40, 41, 42, 7, 3]);
    let alone = |ids: &[u32]| -> Result<Tensor> {
        let pos: Vec<i64> = (0..ids.len() as i64).collect();
        let none = ForwardMask {
            key_valid: None,
            segment_ids: None,
        };
        model.forward_hidden(
            &Tensor::new(ids, &dev)?.unsqueeze(0)?,
            &Tensor::new(pos.as_slice(), &dev)?.unsqueeze(0)?,
            &none,
        )
    };
    let packed_ids: Vec<u32> = a.iter().chain(&b).copied().collect();
    let pos: Vec<i64> = (0..a.len() as i64).chain(0..b.len() as i64).collect();
    let seg: Vec<u32> = std::iter::repeat_n(0, a.len())
        .chain(std::iter::repeat_n(1, b.len()))
        .collect();
    let packed = model.forward_hidden(
        &Tensor::new(packed_ids.as_slice(), &dev)?.unsqueeze(0)?,
        &Tensor::new(pos.as_slice(), &dev)?.unsqueeze(0)?,
        &ForwardMask {
            key_valid: None,
            segment_ids: Some(seg),
        },
    )?;
    let separate = Tensor::cat(&[alone(&a)?, alone(&b)?], 1)?;
    let d = max_abs(&(packed - separate)?);
    assert!(d < 1e-5, "packed and separate differ by {d}");
    Ok(())
}
