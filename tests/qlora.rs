//! QLoRA (`model.quantize_base = "nf4"`) at the model's level: with the decoder layers'
//! projections in NF4 (tests/nf4.rs holds the format to torchao's), LoRA, DoRA and P-tuning
//! give the logits, loss and adapter gradients of the same method on the dense checkpoint the
//! NF4 weights dequantize to, whose own parity with PEFT tests/peft_parity.rs checks; the
//! embeddings and norms are not quantized.

mod common;
use common::{fixture, max_abs, Batch};

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use helix::model::safetensors_write::save_tensors;
use helix::model::{linear::Quantization, LlamaConfig, SafetensorsWeights};
use helix::peft::{
    load_customized, Customized, LoraConfig, Method, ModelLoad, PtuningConfig, LLAMA_TARGETS,
};

fn how(quantize_base: Quantization) -> ModelLoad {
    ModelLoad {
        quantize_base,
        ..ModelLoad::new(DType::F32, Device::Cpu)
    }
}

/// Mean loss and its gradients, by trainable name, of `c` on `batch`.
fn loss_and_grads(c: &Customized, batch: &Batch) -> Result<(f32, Vec<(String, Tensor)>)> {
    let (hidden, labels) = c.forward(&batch.model_batch())?;
    let (sum, n) = c.model.loss_sum(&hidden, &labels.unwrap(), 4)?;
    let loss = (sum / n as f64)?;
    let grads = loss.backward()?;
    let named = c
        .trainable()
        .into_iter()
        .map(|(name, v)| {
            let g = grads.get(v.as_tensor()).cloned();
            (name, g.expect("every trainable tensor gets a gradient"))
        })
        .collect();
    Ok((loss.to_scalar::<f32>()?, named))
}

/// B of every LoRA layer set to the same seeded values in both models (PEFT starts B at zero,
/// which would leave A without a gradient).
fn set_b(models: [&Customized; 2]) -> Result<()> {
    let [x, y] = models.map(|c| c.lora.as_ref().expect("a LoRA model"));
    for (i, (lx, ly)) in x.layers.iter().zip(&y.layers).enumerate() {
        let b = (Tensor::randn(0f32, 1.0, lx.b().dims(), &Device::Cpu)? * 0.05)?;
        assert_eq!(lx.name, ly.name, "layer {i}");
        lx.b().set(&b)?;
        ly.b().set(&b)?;
    }
    Ok(())
}

#[test]
fn nf4_methods_equal_the_same_methods_on_the_dequantized_checkpoint() -> Result<()> {
    let dir = fixture("tiny-gqa-tied");
    let cfg = LlamaConfig::from_file(&dir.join("config.json"))?;
    let weights = SafetensorsWeights::open_dir(&dir)?;
    let batch = Batch::read(&dir.join("reference.safetensors"))?;
    let lora = LoraConfig::new(4, 8.0, &LLAMA_TARGETS);
    let dora = LoraConfig {
        use_dora: true,
        ..LoraConfig::new(4, 8.0, &["q_proj", "v_proj", "down_proj"])
    };
    let ptuning = PtuningConfig::mlp(3, 16);
    for (what, method) in [
        ("LoRA", Method::Lora(lora)),
        ("DoRA", Method::Lora(dora)),
        ("P-tuning", Method::Ptuning(ptuning)),
    ] {
        let q = load_customized(&cfg, &weights, &method, 5, &how(Quantization::Nf4))?;

        // The dense checkpoint the NF4 weights stand for, and the method on it.
        let tmp = tempfile::tempdir()?;
        std::fs::copy(dir.join("config.json"), tmp.path().join("config.json"))?;
        let dequantized = q.model.named_weights()?;
        save_tensors(&tmp.path().join("model.safetensors"), &dequantized)?;
        let dense_weights = SafetensorsWeights::open_dir(tmp.path())?;
        let d = load_customized(&cfg, &dense_weights, &method, 5, &how(Quantization::None))?;
        if q.lora.is_some() {
            set_b([&q, &d])?;
        }

        // The NF4 weights moved away from the checkpoint's, by NF4's step.
        let original = load_customized(&cfg, &weights, &method, 5, &how(Quantization::None))?;
        let mut worst = 0f32;
        for ((name, w), (_, o)) in dequantized.iter().zip(original.model.named_weights()?) {
            let moved = max_abs(&(w - &o)?) / max_abs(&o);
            match name.contains("_proj") {
                true => worst = worst.max(moved),
                false => assert_eq!(moved, 0.0, "{what}: {name} is not quantized"),
            }
        }
        assert!(
            worst > 1e-3 && worst < 0.2,
            "{what}: NF4 moved a weight by {worst}"
        );

        let (loss_q, grads_q) = loss_and_grads(&q, &batch)?;
        let (loss_d, grads_d) = loss_and_grads(&d, &batch)?;
        assert!(
            (loss_q - loss_d).abs() <= 1e-6 * loss_d.abs(),
            "{what}: loss {loss_q} vs {loss_d} on the dequantized checkpoint"
        );
        assert_eq!(grads_q.len(), grads_d.len());
        let mut worst_grad = 0f32;
        for ((name, gq), (name_d, gd)) in grads_q.iter().zip(&grads_d) {
            assert_eq!(name, name_d);
            let rel = max_abs(&(gq - gd)?) / max_abs(gd).max(1e-12);
            assert!(
                rel <= 1e-5,
                "{what}: {name} gradient differs by {rel} (relative)"
            );
            worst_grad = worst_grad.max(rel);
        }
        println!(
            "{what} on NF4: loss {loss_q:.6} vs {loss_d:.6} dense-dequantized, {} gradients, \
             worst relative Δ {worst_grad:.2e}; NF4 moved the projections by up to {worst:.3} \
             of their largest",
            grads_q.len()
        );
    }
    Ok(())
}

#[test]
fn full_sft_on_nf4_weights_is_refused_naming_the_key() {
    let dir = fixture("tiny-gqa-tied");
    let cfg = LlamaConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = SafetensorsWeights::open_dir(&dir).unwrap();
    let e = load_customized(&cfg, &weights, &Method::FullSft, 0, &how(Quantization::Nf4))
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains("model.quantize_base") && e.contains("SFT"),
        "{e}"
    );
}
