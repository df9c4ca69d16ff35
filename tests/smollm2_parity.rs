//! The real SmolLM2-135M-Instruct, imported from its GGUF by helix, against transformers loading
//! the same GGUF. Gated: runs when HELIX_SMOLLM2_DIR (the directory `helix-train import` wrote)
//! and HELIX_SMOLLM2_REF (what scripts/smollm2_reference.py wrote) are set; `.ci/run` sets them.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use helix::model::{generate, ForwardMask, Llama, ModelDir, SamplingOptions, TextCodec};
use serde_json::Value;

fn dirs() -> Option<(PathBuf, PathBuf)> {
    match (
        std::env::var_os("HELIX_SMOLLM2_DIR"),
        std::env::var_os("HELIX_SMOLLM2_REF"),
    ) {
        (Some(m), Some(r)) => Some((m.into(), r.into())),
        _ => {
            eprintln!("skipped: set HELIX_SMOLLM2_DIR and HELIX_SMOLLM2_REF (see .ci/run)");
            None
        }
    }
}

fn load(model_dir: &std::path::Path) -> Result<(Llama, TextCodec)> {
    let dir = ModelDir::open(model_dir)?;
    Ok((
        dir.load_inference(DType::F32, &Device::Cpu)?,
        TextCodec::open(model_dir)?,
    ))
}

fn read_json(path: PathBuf) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn logits_of_four_real_prompts_match_transformers() -> Result<()> {
    let Some((model_dir, ref_dir)) = dirs() else {
        return Ok(());
    };
    let (model, _) = load(&model_dir)?;
    let r = candle_core::safetensors::load(ref_dir.join("logits.safetensors"), &Device::Cpu)?;
    let mut worst = 0f32;
    for i in 0..4 {
        let input = r[&format!("prompt{i}.input_ids")].to_dtype(DType::U32)?;
        let s = input.dim(1)?;
        let pos = Tensor::arange(0i64, s as i64, &Device::Cpu)?.unsqueeze(0)?;
        let hidden = model.forward_hidden(
            &input,
            &pos,
            &ForwardMask {
                key_valid: None,
                segment_ids: None,
            },
        )?;
        let d = (model.logits(&hidden)? - &r[&format!("prompt{i}.logits")])?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        println!("prompt {i}: {s} tokens, max |dlogits| = {d:.3e}");
        worst = worst.max(d);
    }
    assert!(worst <= 1e-3, "logits differ by {worst}");
    Ok(())
}

#[test]
fn greedy_generation_is_token_for_token_identical() -> Result<()> {
    let Some((model_dir, ref_dir)) = dirs() else {
        return Ok(());
    };
    let (model, codec) = load(&model_dir)?;
    let g = read_json(ref_dir.join("generate.json"));
    for gen in g["generations"].as_array().unwrap() {
        let user = gen["user"].as_str().unwrap();
        // The prompt is built by helix's own chat template and tokenizer, then checked.
        let text = codec.apply_chat_template(&[("user", user)], true)?;
        assert_eq!(
            text,
            gen["prompt"].as_str().unwrap(),
            "chat template for {user:?}"
        );
        let prompt = codec.encode(&text, false)?;
        assert_eq!(prompt, ids(&gen["prompt_ids"]), "prompt ids for {user:?}");
        let no_stop = SamplingOptions {
            max_new_tokens: 32,
            ..Default::default()
        };
        let got = generate(&model, &prompt, &no_stop, |_| Ok(()))?;
        assert_eq!(
            got,
            ids(&gen["greedy_32_no_stop"]),
            "32 greedy tokens for {user:?}"
        );
        let stop = SamplingOptions {
            max_new_tokens: 32,
            stop_tokens: vec![2],
            ..Default::default()
        };
        let got = generate(&model, &prompt, &stop, |_| Ok(()))?;
        assert_eq!(
            got,
            ids(&gen["new_ids"]),
            "generation stopping at EOS for {user:?}"
        );
        println!("{user:?} -> {:?}", codec.decode(&got, true)?);
    }
    Ok(())
}

#[test]
fn rebuilt_tokenizer_encodes_like_transformers() -> Result<()> {
    let Some((model_dir, ref_dir)) = dirs() else {
        return Ok(());
    };
    let codec = TextCodec::open(&model_dir)?;
    let text = std::fs::read_to_string(ref_dir.join("encodings.jsonl"))?;
    let (mut n, mut bad) = (0, Vec::new());
    for line in text.lines() {
        let v: Value = serde_json::from_str(line)?;
        let s = v["text"].as_str().unwrap();
        if codec.encode(s, true)? != ids(&v["ids"]) {
            bad.push(s.to_string());
        }
        n += 1;
    }
    println!("{n} strings encoded, {} differ", bad.len());
    assert!(n >= 1000);
    assert!(
        bad.is_empty(),
        "{} of {n} strings differ, e.g. {:?}",
        bad.len(),
        &bad[..bad.len().min(3)]
    );
    Ok(())
}

#[test]
fn chat_template_renders_like_transformers() -> Result<()> {
    let Some((model_dir, ref_dir)) = dirs() else {
        return Ok(());
    };
    let codec = TextCodec::open(&model_dir)?;
    let c = read_json(ref_dir.join("chat_template.json"));
    for conv in c["conversations"].as_array().unwrap() {
        let msgs: Vec<(String, String)> = conv["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["role"].as_str().unwrap().to_string(),
                    m["content"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let refs: Vec<(&str, &str)> = msgs.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        assert_eq!(
            codec.apply_chat_template(&refs, true)?,
            conv["rendered"].as_str().unwrap()
        );
    }
    Ok(())
}
