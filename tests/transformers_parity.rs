//! helix's Llama against PyTorch + transformers on tiny random models (fixtures written by
//! scripts/make_reference.py): logits, loss and every parameter's gradient, in f32.

use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use helix::model::linear::keep_dense;
use helix::model::{ForwardMask, Llama, LlamaConfig, LoadOptions, SafetensorsWeights};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

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
