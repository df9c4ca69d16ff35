//! LoRA and P-tuning against Hugging Face PEFT (references from scripts/peft_reference.py): a
//! PEFT adapter loads into helix and gives PEFT's logits, loss and every adapter gradient
//! (f32, within 1e-4); the frozen base gets no gradient and stays bit-identical through training
//! steps; merged and unmerged LoRA agree; adapters round-trip through PEFT's file format.
//!
//! The tiny models' references are committed in tests/fixtures/<name>/{lora,ptuning,…}. The
//! same checks run on the real SmolLM2-135M-Instruct when HELIX_SMOLLM2_DIR (its HF directory)
//! and HELIX_PEFT_SMOLLM2_REF (what `peft_reference.py model` wrote) are set, as
//! scripts/check-peft.sh does.

mod common;
use common::{fixture, load_st, max_abs, Batch};

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use helix::model::{LlamaConfig, SafetensorsWeights};
use helix::peft::ptuning::ENCODER_PREFIX;
use helix::peft::{
    load_for_method, load_with_adapter, read_adapter, save_lora, save_ptuning, Adapter, Customized,
    Method, PromptEncoder, Ptuning, VirtualTokens,
};

/// (logits [B, S', V], mean loss) of `c` on `batch`.
fn logits_and_loss(c: &Customized, batch: &Batch) -> Result<(Tensor, Tensor)> {
    let (hidden, labels) = c.forward(&batch.model_batch())?;
    let (sum, n) = c.model.loss_sum(&hidden, &labels.unwrap(), 4)?;
    Ok((c.model.logits(&hidden)?, (sum / n as f64)?))
}

/// max |Δ| over positions whose row flag in `keep` [B, S'] is 1.
fn max_diff_where(a: &Tensor, b: &Tensor, keep: &[u8]) -> Result<f32> {
    let (bsz, s, v) = a.dims3()?;
    let mask: Vec<f32> = keep.iter().map(|&k| k as f32).collect();
    let mask = Tensor::from_vec(mask, (bsz, s, 1), a.device())?.broadcast_as((bsz, s, v))?;
    Ok(max_abs(&((a - b)? * mask)?))
}

/// 1e-4 × max(1, max |reference logit|): the same relative precision for the tiny models (logits
/// up to ~3) and for a real model whose logits reach 30.
fn logits_limit(reference: &Tensor) -> f32 {
    1e-4 * max_abs(reference).max(1.0)
}

fn open_model(dir: &Path) -> Result<(LlamaConfig, SafetensorsWeights)> {
    Ok((
        LlamaConfig::from_file(&dir.join("config.json"))?,
        SafetensorsWeights::open_dir(dir)?,
    ))
}

/// One plain gradient step on every trainable tensor: enough to make adapters non-trivial.
fn sgd_step(c: &Customized, batch: &Batch, lr: f64) -> Result<()> {
    let (_, loss) = logits_and_loss(c, batch)?;
    let grads = loss.backward()?;
    for (name, var) in c.trainable() {
        let g = grads
            .get(&var)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        var.set(&(var.as_tensor() - (g * lr)?)?)?;
    }
    Ok(())
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

/// helix's parameter summary against PEFT's `get_nb_trainable_parameters`.
fn check_counts(what: &str, c: &Customized, reference: &HashMap<String, Tensor>) -> Result<()> {
    let want = reference["param_counts"].to_vec1::<i64>()?;
    let s = c.summary();
    assert_eq!(
        [s.trainable as i64, s.total as i64],
        [want[0], want[1]],
        "{what}: trainable / all parameters vs PEFT"
    );
    println!("{what}: {s} (PEFT: {} / {})", want[0], want[1]);
    Ok(())
}

/// Gradients of `loss` for every trainable tensor of `c` against `reference`'s `grad.<name>`;
/// returns the worst relative difference (max |Δ| / max |reference|).
fn check_grads(
    what: &str,
    c: &Customized,
    loss: &Tensor,
    reference: &HashMap<String, Tensor>,
) -> Result<f32> {
    let grads = loss.backward()?;
    let vars = c.trainable();
    let mut worst = 0f32;
    for (key, var) in &vars {
        let want = reference
            .get(&format!("grad.{key}"))
            .unwrap_or_else(|| panic!("{what}: no PEFT gradient for {key}"));
        let got = grads
            .get(var)
            .unwrap_or_else(|| panic!("{what}: no gradient for {key}"));
        let rel = max_abs(&(got - want)?) / max_abs(want).max(1e-12);
        worst = worst.max(rel);
        assert!(
            rel <= 1e-4,
            "{what}: gradient of {key} differs by {rel:.3e} relative"
        );
    }
    let n_ref = reference.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(vars.len(), n_ref, "{what}: every PEFT gradient is checked");
    // The frozen model: no gradient anywhere in it.
    for (name, w) in c.model.named_weights()? {
        assert!(
            grads.get(&w).is_none(),
            "{what}: frozen {name} has a gradient"
        );
    }
    Ok(worst)
}

/// `merge_limit`: how far merged logits may stray from unmerged ones: 1e-5 on the tiny models;
/// on SmolLM2, rounding W + s·BA in f32 through 30 layers moves logits of ±30 by ~3e-4, the same
/// floor as helix vs PEFT, so it gets [`logits_limit`].
fn check_lora(
    model_dir: &Path,
    batch_path: &Path,
    method_dir: &Path,
    what: &str,
    merge_limit: f32,
) -> Result<()> {
    let dev = Device::Cpu;
    let (cfg, weights) = open_model(model_dir)?;
    let batch = Batch::read(batch_path)?;
    let peft = load_st(&method_dir.join("reference.safetensors"));
    let c = load_with_adapter(&cfg, &weights, method_dir, DType::F32, &dev)?;
    let lora = c.lora.as_ref().expect("a LoRA adapter");
    check_counts(what, &c, &peft)?;

    let (logits, loss) = logits_and_loss(&c, &batch)?;
    let d_logits = max_diff_where(&logits, &peft["logits"], &batch.valid)?;
    let (got, want) = (loss.to_scalar::<f32>()?, peft["loss"].to_scalar::<f32>()?);
    let rel_loss = (got - want).abs() / want.abs();
    let limit = logits_limit(&peft["logits"]);
    assert!(
        d_logits <= limit,
        "{what}: logits differ by {d_logits} (limit {limit})"
    );
    assert!(rel_loss <= 1e-4, "{what}: loss {got} vs PEFT {want}");
    let worst = check_grads(what, &c, &loss, &peft)?;
    println!(
        "{what}: LoRA vs PEFT: max |Δ logits| {d_logits:.3e} (limit {limit:.1e}), relative Δ loss \
         {rel_loss:.3e}, {} adapter gradients, worst relative Δ {worst:.3e}",
        c.trainable().len()
    );

    // Merged and unmerged agree.
    lora.merge()?;
    let (merged, _) = logits_and_loss(&c, &batch)?;
    lora.unmerge()?;
    let (back, _) = logits_and_loss(&c, &batch)?;
    let d_merged = max_abs(&(&merged - &logits)?);
    println!("{what}: merged vs unmerged logits {d_merged:.3e} (limit {merge_limit:.1e})");
    assert!(
        d_merged <= merge_limit,
        "{what}: merged logits differ by {d_merged}"
    );
    assert!(
        bits(&back) == bits(&logits),
        "{what}: unmerge restores exactly"
    );

    // Training steps move the adapters and leave the base bit for bit as loaded.
    let fresh = load_with_adapter(&cfg, &weights, method_dir, DType::F32, &dev)?;
    let before: Vec<Vec<u32>> = fresh
        .model
        .named_weights()?
        .iter()
        .map(|(_, t)| bits(t))
        .collect();
    let b0 = bits(fresh.lora.as_ref().unwrap().layers[0].b().as_tensor());
    for _ in 0..3 {
        sgd_step(&fresh, &batch, 0.1)?;
    }
    assert_ne!(
        bits(fresh.lora.as_ref().unwrap().layers[0].b().as_tensor()),
        b0
    );
    for ((name, t), b) in fresh.model.named_weights()?.iter().zip(&before) {
        assert!(bits(t) == *b, "{what}: base weight {name} changed");
    }
    Ok(())
}

fn check_ptuning(model_dir: &Path, batch_path: &Path, method_dir: &Path, what: &str) -> Result<()> {
    let dev = Device::Cpu;
    let (cfg, weights) = open_model(model_dir)?;
    let batch = Batch::read(batch_path)?;
    let peft = load_st(&method_dir.join("reference.safetensors"));
    let Adapter::Ptuning {
        cfg: p_cfg,
        prompt_embeddings,
        encoder,
    } = read_adapter(method_dir, &dev)?
    else {
        panic!("{what}: not a P-tuning adapter");
    };
    assert!(encoder.is_none(), "PEFT writes no encoder file");
    let n = p_cfg.num_virtual_tokens;

    // helix's encoder, from PEFT's initial weights.
    let c = load_for_method(
        &cfg,
        &weights,
        &Method::Ptuning(p_cfg.clone()),
        0,
        DType::F32,
        &dev,
    )?;
    let VirtualTokens::Encoder(e) = &c.ptuning.as_ref().unwrap().tokens else {
        panic!("a fresh P-tuning model has an encoder");
    };
    let state_path = method_dir.join("encoder.safetensors");
    e.load_state(&load_st(&state_path), ENCODER_PREFIX, &state_path)?;
    let d_table = max_abs(&(e.forward()? - &prompt_embeddings)?);
    assert!(
        d_table <= 1e-5,
        "{what}: encoder output vs PEFT's prompt_embeddings {d_table}"
    );
    check_counts(what, &c, &peft)?;
    // Virtual positions and real tokens; PEFT ignores the batch's position ids for pads.
    let s = batch.input_ids.dim(1)?;
    let keep: Vec<u8> = batch
        .valid
        .chunks(s)
        .flat_map(|row| std::iter::repeat_n(1u8, n).chain(row.iter().copied()))
        .collect();
    let (logits, loss) = logits_and_loss(&c, &batch)?;
    assert_eq!(logits.dims(), peft["logits"].dims());
    let d_logits = max_diff_where(&logits, &peft["logits"], &keep)?;
    let (got, want) = (loss.to_scalar::<f32>()?, peft["loss"].to_scalar::<f32>()?);
    let rel_loss = (got - want).abs() / want.abs();
    let limit = logits_limit(&peft["logits"]);
    assert!(
        d_logits <= limit,
        "{what}: logits differ by {d_logits} (limit {limit})"
    );
    assert!(rel_loss <= 1e-4, "{what}: loss {got} vs PEFT {want}");
    let worst = check_grads(what, &c, &loss, &peft)?;
    println!(
        "{what}: P-tuning ({:?}) vs PEFT: encoder output Δ {d_table:.3e}, max |Δ logits| \
         {d_logits:.3e} (limit {limit:.1e}), relative Δ loss {rel_loss:.3e}, {} encoder gradients, \
         worst relative Δ {worst:.3e}",
        p_cfg.encoder_reparameterization_type,
        c.trainable().len()
    );

    // PEFT's saved adapter (the table alone) gives the same logits.
    let table = load_with_adapter(&cfg, &weights, method_dir, DType::F32, &dev)?;
    let (table_logits, _) = logits_and_loss(&table, &batch)?;
    let d_import = max_diff_where(&table_logits, &peft["logits"], &keep)?;
    println!("{what}: PEFT prompt_embeddings imported: max |Δ logits| {d_import:.3e}");
    assert!(d_import <= limit);

    // Training steps move the encoder and leave the base bit for bit as loaded.
    let before: Vec<Vec<u32>> = c
        .model
        .named_weights()?
        .iter()
        .map(|(_, t)| bits(t))
        .collect();
    let e0 = bits(&c.ptuning.as_ref().unwrap().prompts()?);
    for _ in 0..3 {
        sgd_step(&c, &batch, 0.1)?;
    }
    assert_ne!(bits(&c.ptuning.as_ref().unwrap().prompts()?), e0);
    for ((name, t), b) in c.model.named_weights()?.iter().zip(&before) {
        assert!(bits(t) == *b, "{what}: base weight {name} changed");
    }
    Ok(())
}

fn tiny(name: &str, method: &str) -> Result<()> {
    let dir = fixture(name);
    let batch = dir.join("reference.safetensors");
    let what = format!("{name}/{method}");
    match method {
        "lora" | "dora" => check_lora(&dir, &batch, &dir.join(method), &what, 1e-5),
        _ => check_ptuning(&dir, &batch, &dir.join(method), &what),
    }
}

#[test]
fn tiny_mha_untied_lora_matches_peft() -> Result<()> {
    tiny("tiny-mha-untied", "lora")
}

#[test]
fn tiny_gqa_tied_lora_matches_peft() -> Result<()> {
    tiny("tiny-gqa-tied", "lora")
}

/// DoRA: PEFT's magnitude vectors load, and logits, loss and the gradients of A, B and the
/// magnitudes (the weight norm held constant, as PEFT holds it) are PEFT's.
#[test]
fn tiny_gqa_tied_dora_matches_peft() -> Result<()> {
    tiny("tiny-gqa-tied", "dora")
}

#[test]
fn tiny_gqa_untied_rslora_matches_peft() -> Result<()> {
    tiny("tiny-gqa-untied-b3", "lora")
}

#[test]
fn tiny_mha_untied_ptuning_matches_peft() -> Result<()> {
    tiny("tiny-mha-untied", "ptuning")
}

#[test]
fn tiny_gqa_tied_ptuning_matches_peft() -> Result<()> {
    tiny("tiny-gqa-tied", "ptuning")
}

#[test]
fn tiny_gqa_tied_ptuning_lstm_matches_peft() -> Result<()> {
    tiny("tiny-gqa-tied", "ptuning-lstm")
}

#[test]
fn tiny_gqa_untied_ptuning_matches_peft() -> Result<()> {
    tiny("tiny-gqa-untied-b3", "ptuning")
}

fn smollm2() -> Option<(PathBuf, PathBuf)> {
    match (
        std::env::var_os("HELIX_SMOLLM2_DIR"),
        std::env::var_os("HELIX_PEFT_SMOLLM2_REF"),
    ) {
        (Some(m), Some(r)) => Some((m.into(), r.into())),
        _ => {
            eprintln!(
                "skipped: set HELIX_SMOLLM2_DIR and HELIX_PEFT_SMOLLM2_REF (scripts/check-peft.sh)"
            );
            None
        }
    }
}

/// SmolLM2's PEFT reference is computed in f64 (scripts/peft_reference.py): helix's f32
/// gradients are held to the exact values, not to a second f32 rounding of them. Two f32
/// implementations that sum in different orders sit about 1e-4 apart after 30 layers; each
/// is within 1e-4 of f64 (PEFT f32: 6.4e-5).
#[test]
fn smollm2_lora_matches_peft() -> Result<()> {
    let Some((model, r)) = smollm2() else {
        return Ok(());
    };
    let lora = r.join("lora");
    let limit = logits_limit(&load_st(&lora.join("reference.safetensors"))["logits"]);
    check_lora(
        &model,
        &r.join("batch.safetensors"),
        &lora,
        "smollm2/lora",
        limit,
    )
}

#[test]
fn smollm2_ptuning_matches_peft() -> Result<()> {
    let Some((model, r)) = smollm2() else {
        return Ok(());
    };
    check_ptuning(
        &model,
        &r.join("batch.safetensors"),
        &r.join("ptuning"),
        "smollm2/ptuning",
    )
}

#[test]
fn adapters_round_trip_in_peft_format() -> Result<()> {
    let dev = Device::Cpu;
    let dir = fixture("tiny-gqa-tied");
    let (cfg, weights) = open_model(&dir)?;
    let tmp = tempfile::tempdir()?;

    // LoRA: what helix writes reads back equal, with PEFT's header metadata.
    let c = load_with_adapter(&cfg, &weights, &dir.join("lora"), DType::F32, &dev)?;
    let out = tmp.path().join("lora");
    save_lora(&out, c.lora.as_ref().unwrap(), "tiny-gqa-tied")?;
    let Adapter::Lora { cfg: lc, tensors } = read_adapter(&out, &dev)? else {
        panic!("not LoRA");
    };
    assert_eq!(lc, c.lora.as_ref().unwrap().cfg);
    let Adapter::Lora {
        tensors: original, ..
    } = read_adapter(&dir.join("lora"), &dev)?
    else {
        panic!("not LoRA");
    };
    assert_eq!(tensors.len(), original.len());
    for (k, t) in &original {
        assert_eq!(max_abs(&(t - &tensors[k])?), 0.0, "{k}");
    }
    let bytes = std::fs::read(out.join("adapter_model.safetensors"))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)?;
    assert_eq!(
        meta.metadata()
            .as_ref()
            .and_then(|m| m.get("format"))
            .map(String::as_str),
        Some("pt")
    );

    // P-tuning: the table and the whole encoder come back; the encoder resumes training.
    let p_dir = dir.join("ptuning");
    let Adapter::Ptuning { cfg: p_cfg, .. } = read_adapter(&p_dir, &dev)? else {
        panic!("not P-tuning");
    };
    let e = PromptEncoder::init(&p_cfg, cfg.hidden_size, 9, &dev)?;
    let p = Ptuning {
        cfg: p_cfg.clone(),
        tokens: VirtualTokens::Encoder(e),
    };
    let out = tmp.path().join("ptuning");
    save_ptuning(&out, &p, &cfg, "tiny-gqa-tied", None)?;
    let Adapter::Ptuning {
        cfg: back_cfg,
        prompt_embeddings,
        encoder,
    } = read_adapter(&out, &dev)?
    else {
        panic!("not P-tuning");
    };
    assert_eq!(back_cfg, p_cfg);
    assert_eq!(bits(&prompt_embeddings), bits(&p.prompts()?));
    let encoder = encoder.expect("helix writes the encoder");
    for (name, var) in p.named_vars() {
        let key = name.strip_prefix(ENCODER_PREFIX).unwrap();
        assert_eq!(bits(&encoder[key]), bits(var.as_tensor()), "{name}");
    }
    let resumed = load_with_adapter(&cfg, &weights, &out, DType::F32, &dev)?;
    assert!(matches!(
        resumed.ptuning.as_ref().unwrap().tokens,
        VirtualTokens::Encoder(_)
    ));
    assert_eq!(resumed.trainable().len(), 7);
    Ok(())
}

/// For scripts/peft_interop.py (run by scripts/check-peft.sh): adapters trained by helix (its
/// own initialisation, three gradient steps on the batch), saved in PEFT's format, with helix's
/// logits on the batch beside them. Gated by HELIX_PEFT_INTEROP_OUT.
#[test]
fn write_helix_adapters_for_peft_interop() -> Result<()> {
    let Some(out) = std::env::var_os("HELIX_PEFT_INTEROP_OUT").map(PathBuf::from) else {
        eprintln!("skipped: set HELIX_PEFT_INTEROP_OUT (scripts/check-peft.sh)");
        return Ok(());
    };
    let mut models = vec![
        (
            "tiny-gqa-tied".to_string(),
            fixture("tiny-gqa-tied"),
            fixture("tiny-gqa-tied/reference.safetensors"),
        ),
        (
            "tiny-gqa-untied-b3".to_string(),
            fixture("tiny-gqa-untied-b3"),
            fixture("tiny-gqa-untied-b3/reference.safetensors"),
        ),
    ];
    if let Some((model, r)) = smollm2() {
        models.push(("smollm2".into(), model, r.join("batch.safetensors")));
    }
    let dev = Device::Cpu;
    for (name, model_dir, batch_path) in models {
        let (cfg, weights) = open_model(&model_dir)?;
        let batch = Batch::read(&batch_path)?;
        let methods = [
            (
                "lora",
                Method::Lora(helix::peft::LoraConfig {
                    lora_dropout: 0.0,
                    use_rslora: name.ends_with("b3"),
                    ..helix::peft::LoraConfig::new(8, 16.0, &helix::peft::LLAMA_TARGETS)
                }),
            ),
            (
                "dora",
                Method::Lora(helix::peft::LoraConfig {
                    lora_dropout: 0.0,
                    use_dora: true,
                    ..helix::peft::LoraConfig::new(8, 16.0, &helix::peft::LLAMA_TARGETS)
                }),
            ),
            (
                "ptuning",
                Method::Ptuning(helix::peft::PtuningConfig::mlp(10, 32)),
            ),
        ];
        for (method_name, method) in methods {
            let c = load_for_method(&cfg, &weights, &method, 7, DType::F32, &dev)?;
            for _ in 0..3 {
                sgd_step(&c, &batch, 0.05)?;
            }
            let dir = out.join(&name).join(method_name);
            // The files written beside the adapter below would keep a rerun's save from
            // replacing it.
            if dir.exists() {
                std::fs::remove_dir_all(&dir)?;
            }
            match &method {
                Method::Lora(_) => save_lora(&dir, c.lora.as_ref().unwrap(), &name)?,
                _ => save_ptuning(&dir, c.ptuning.as_ref().unwrap(), &cfg, &name, None)?,
            }
            c.set_training(false);
            let (logits, loss) = logits_and_loss(&c, &batch)?;
            helix::model::safetensors_write::save_tensors(
                &dir.join("helix_logits.safetensors"),
                &[("logits".into(), logits), ("loss".into(), loss)],
            )?;
            std::fs::copy(&batch_path, dir.join("batch.safetensors"))?;
            println!(
                "{name}/{method_name}: helix adapter written to {}",
                dir.display()
            );
        }
    }
    Ok(())
}

/// The base may stay bf16 while adapters train in f32: gradients reach the f32 adapter weights
/// and the loss is the f32 model's within bf16 rounding. Full SFT trains every parameter.
#[test]
fn bf16_base_trains_f32_adapters_and_sft_trains_everything() -> Result<()> {
    let dev = Device::Cpu;
    let dir = fixture("tiny-gqa-tied");
    let (cfg, weights) = open_model(&dir)?;
    let batch = Batch::read(&dir.join("reference.safetensors"))?;
    for method in ["lora", "dora", "ptuning"] {
        let f32_loss = {
            let c = load_with_adapter(&cfg, &weights, &dir.join(method), DType::F32, &dev)?;
            logits_and_loss(&c, &batch)?.1.to_scalar::<f32>()?
        };
        let c = load_with_adapter(&cfg, &weights, &dir.join(method), DType::BF16, &dev)?;
        assert_eq!(c.model.dtype(), DType::BF16);
        let (_, loss) = logits_and_loss(&c, &batch)?;
        let bf16_loss = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let grads = loss.backward()?;
        for (name, var) in c.trainable() {
            assert_eq!(var.dtype(), DType::F32, "{name}");
            let g = grads
                .get(&var)
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            assert_eq!(g.dtype(), DType::F32, "{name}");
            assert!(max_abs(g) > 0.0 && max_abs(g).is_finite(), "{name}");
        }
        for (name, w) in c.model.named_weights()? {
            assert_eq!(w.dtype(), DType::BF16, "{name}");
            assert!(grads.get(&w).is_none(), "frozen {name} has a gradient");
        }
        println!("{method}: bf16 base loss {bf16_loss:.5}, f32 {f32_loss:.5}");
        assert!(
            (bf16_loss - f32_loss).abs() < 0.02 * f32_loss,
            "{bf16_loss} vs {f32_loss}"
        );
    }

    let sft = load_for_method(&cfg, &weights, &Method::FullSft, 0, DType::F32, &dev)?;
    let s = sft.summary();
    assert_eq!(s.trainable, cfg.num_parameters());
    assert_eq!(s.total, cfg.num_parameters());
    let (_, loss) = logits_and_loss(&sft, &batch)?;
    let grads = loss.backward()?;
    for (name, var) in sft.trainable() {
        assert!(grads.get(&var).is_some(), "SFT: no gradient for {name}");
    }
    // Every weight of the model is one of the trainable ones.
    assert_eq!(sft.trainable().len(), sft.model.named_weights()?.len());
    println!("sft: {s}");
    Ok(())
}
