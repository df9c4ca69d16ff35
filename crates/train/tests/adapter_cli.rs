//! `helix-train generate --adapter` and `helix-train export` end to end, on a tiny model with the
//! PEFT-made adapters of tests/fixtures: generation through the KV cache equals greedy decoding
//! by full forward passes; a merged, sharded export gives the adapter model's logits; a chat
//! template of the run's own travels with its adapter and model.

mod common;
use common::{fixture, helix_train, write_tokenizer};

use std::path::Path;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use helix_model::{ForwardMask, ModelDir};
use helix_peft::{load_with_adapter, Customized, ModelBatch};

/// The tiny tied-embedding model with a word-level tokenizer, in `dir/model`.
fn model_dir(dir: &Path) -> std::path::PathBuf {
    let m = dir.join("model");
    write_tokenizer(&m);
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("tiny-gqa-tied").join(f), m.join(f)).unwrap();
    }
    m
}

fn load(model: &Path, adapter: &Path) -> Result<Customized> {
    let dir = ModelDir::open(model)?;
    load_with_adapter(&dir.config, &dir.weights, adapter, DType::F32, &Device::Cpu)
}

/// Logits [1, S', V] of `ids` through `c`, without a KV cache.
fn full_logits(c: &Customized, ids: &[u32]) -> Result<Tensor> {
    let dev = Device::Cpu;
    let input = Tensor::new(ids, &dev)?.unsqueeze(0)?;
    let pos = Tensor::arange(0i64, ids.len() as i64, &dev)?.unsqueeze(0)?;
    let mask = ForwardMask {
        key_valid: None,
        segment_ids: None,
    };
    let (hidden, _) = c.forward(&ModelBatch {
        input_ids: &input,
        position_ids: &pos,
        labels: None,
        mask: &mask,
    })?;
    c.model.logits(&hidden)
}

/// Greedy decoding by a full forward pass per token: the reference for the cached path.
fn greedy_full(c: &Customized, prompt: &[u32], max_new: usize, eos: u32) -> Result<Vec<u32>> {
    let mut ids = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..max_new {
        let logits = full_logits(c, &ids)?;
        let last = logits.dim(1)? - 1;
        let next = logits
            .narrow(1, last, 1)?
            .flatten_all()?
            .argmax(0)?
            .to_scalar::<u32>()?;
        out.push(next);
        ids.push(next);
        if next == eos {
            break;
        }
    }
    Ok(out)
}

/// `helix-train export` of `model` with `adapter` merged into `out`, run in `dir`.
fn export(
    dir: &Path,
    model: &Path,
    adapter: &Path,
    out: &Path,
    extra: &[&str],
) -> (bool, String, String) {
    let mut args = vec![
        "export",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    helix_train(&args, dir)
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn generate_with_lora_and_ptuning_adapters_matches_full_forward_greedy() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let model = model_dir(tmp.path());
    for method in ["lora", "dora", "ptuning", "ptuning-lstm"] {
        let adapter = fixture("tiny-gqa-tied").join(method);
        let (ok, out, err) = helix_train(
            &[
                "generate",
                "--model",
                model.to_str().unwrap(),
                "--adapter",
                adapter.to_str().unwrap(),
                "--prompt",
                "one two three",
                "--max-new-tokens",
                "8",
                "--print-ids",
            ],
            tmp.path(),
        );
        assert!(ok, "{method}: {err}");
        assert!(
            err.contains("adapter") && err.contains("trainable params"),
            "{err}"
        );
        let json: serde_json::Value = serde_json::from_str(out.lines().last().unwrap())?;
        let (prompt, new) = (ids(&json["prompt_ids"]), ids(&json["new_ids"]));
        assert_eq!(prompt, vec![1, 5, 6, 7]);
        let c = load(&model, &adapter)?;
        let want = greedy_full(&c, &prompt, 8, 2)?;
        println!("{method}: generated {new:?}");
        assert_eq!(new, want, "{method}: cached generation vs full forward");
    }
    Ok(())
}

#[test]
fn generate_renders_the_chat_template_file_with_the_tools_given() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let model = model_dir(tmp.path());
    let template = tmp.path().join("tools.jinja");
    std::fs::write(
        &template,
        "{% for t in tools %}{{ t.name }} {% endfor %}{% for m in messages %}{{ m.content }}{% endfor %}",
    )?;
    let tools = tmp.path().join("tools.json");
    std::fs::write(&tools, r#"[{"name": "two"}, {"name": "three"}]"#)?;
    let generate = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--chat",
            "--tools",
            tools.to_str().unwrap(),
            "--prompt",
            "one",
            "--max-new-tokens",
            "2",
            "--print-ids",
        ];
        args.extend_from_slice(extra);
        helix_train(&args, tmp.path())
    };
    let with_template = ["--chat-template", template.to_str().unwrap()];
    let (ok, out, err) = generate(&with_template);
    assert!(ok, "{err}");
    let json: serde_json::Value = serde_json::from_str(out.lines().last().unwrap())?;
    // "two three one": the tools' names, then the prompt (the test vocabulary: one = 5, …).
    assert_eq!(ids(&json["prompt_ids"]), vec![6, 7, 5]);

    // An adapter saved with its own template: generate --chat reads it, export writes it.
    let adapter = tmp.path().join("adapter");
    std::fs::create_dir(&adapter)?;
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(
            fixture("tiny-gqa-tied").join("lora").join(f),
            adapter.join(f),
        )?;
    }
    std::fs::copy(&template, adapter.join("chat_template.jinja"))?;
    let (ok, out, err) = generate(&["--adapter", adapter.to_str().unwrap()]);
    assert!(ok && err.contains("(the adapter's)"), "{err}");
    let json: serde_json::Value = serde_json::from_str(out.lines().last().unwrap())?;
    assert_eq!(ids(&json["prompt_ids"]), vec![6, 7, 5]);
    let merged = tmp.path().join("merged");
    let (ok, _, err) = export(tmp.path(), &model, &adapter, &merged, &[]);
    assert!(ok, "{err}");
    assert_eq!(
        std::fs::read_to_string(merged.join("chat_template.jinja"))?,
        std::fs::read_to_string(&template)?
    );
    // transformers reads chat_template.jinja first; so does helix.
    let codec = helix_model::TextCodec::open(&merged)?;
    assert_eq!(
        codec.chat_template,
        Some(std::fs::read_to_string(&template)?)
    );

    std::fs::write(&tools, r#"{"name": "two"}"#)?;
    let (ok, _, err) = generate(&with_template);
    assert!(
        !ok && err.contains("--tools: ") && err.contains("must hold a JSON list of tool schemas"),
        "{err}"
    );
    Ok(())
}

#[test]
fn export_merges_lora_into_sharded_safetensors_with_the_adapter_logits() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let model = model_dir(tmp.path());
    let adapter = fixture("tiny-gqa-tied").join("lora");
    // A chat template as transformers ≥ 4.57 saves it: beside tokenizer_config.json.
    std::fs::write(model.join("chat_template.jinja"), "{{ messages }}")?;
    std::fs::create_dir(model.join("additional_chat_templates"))?;
    std::fs::write(
        model.join("additional_chat_templates/tool_use.jinja"),
        "{{ tools }}",
    )?;
    let out = tmp.path().join("merged");
    let (ok, _, err) = export(
        tmp.path(),
        &model,
        &adapter,
        &out,
        &["--max-shard-size", "40KB"],
    );
    assert!(ok, "{err}");
    assert!(err.contains("LoRA merged"), "{err}");
    let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        out.join("model.safetensors.index.json"),
    )?)?;
    let shards: std::collections::BTreeSet<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(shards.len() > 1, "{shards:?}");
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "additional_chat_templates/tool_use.jinja",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    // No staging directory is left beside it.
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let prompt = [1u32, 5, 6, 7, 8, 9, 3, 4];
    let with_adapter = full_logits(&load(&model, &adapter)?, &prompt)?;
    let merged =
        Customized::frozen(ModelDir::open(&out)?.load_inference(DType::F32, &Device::Cpu)?);
    let d = (full_logits(&merged, &prompt)? - with_adapter)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    println!(
        "merged export vs adapter: max |Δ logits| {d:.3e} over {} shards",
        shards.len()
    );
    assert!(d <= 1e-5, "{d}");

    // Exporting again replaces the directory as a whole (one shard now: no stale files).
    let (ok, _, err) = helix_train(
        &[
            "export",
            "--model",
            model.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--dtype",
            "bf16",
        ],
        tmp.path(),
    );
    assert!(ok, "{err}");
    let names: Vec<String> = std::fs::read_dir(&out)?
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.contains(&"model.safetensors".to_string()),
        "{names:?}"
    );
    assert!(
        !names
            .iter()
            .any(|n| n.contains("index") || n.contains("-of-")),
        "{names:?}"
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json"))?)?;
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    // transformers ≥ 4.56 reads `dtype` first: it must not still say float32.
    assert_eq!(cfg["dtype"], "bfloat16");

    // A directory holding anything an export does not write is refused, and left as it was.
    let keep = tmp.path().join("keep");
    std::fs::create_dir(&keep)?;
    std::fs::write(keep.join("notes.txt"), "mine")?;
    std::fs::copy(out.join("config.json"), keep.join("config.json"))?;
    let (ok, _, err) = helix_train(
        &[
            "export",
            "--model",
            model.to_str().unwrap(),
            "--out",
            keep.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert!(
        !ok && err.contains("notes.txt") && err.contains("new or empty"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(keep.join("notes.txt"))?, "mine");
    assert!(keep.join("config.json").exists());
    Ok(())
}

/// PEFT's DoRA adapter merged by `export` (each row of W + s·BA rescaled to its magnitude, as
/// PEFT's `merge_and_unload`) gives the adapter model's logits.
#[test]
fn export_merges_dora_with_the_adapter_logits() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let model = model_dir(tmp.path());
    let adapter = fixture("tiny-gqa-tied").join("dora");
    let out = tmp.path().join("merged");
    let (ok, _, err) = export(tmp.path(), &model, &adapter, &out, &[]);
    assert!(ok, "{err}");
    let prompt = [1u32, 5, 6, 7, 8, 9, 3, 4];
    let with_adapter = full_logits(&load(&model, &adapter)?, &prompt)?;
    let merged =
        Customized::frozen(ModelDir::open(&out)?.load_inference(DType::F32, &Device::Cpu)?);
    let plain = full_logits(
        &Customized::frozen(ModelDir::open(&model)?.load_inference(DType::F32, &Device::Cpu)?),
        &prompt,
    )?;
    let max_diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
        Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
    };
    let d = max_diff(&full_logits(&merged, &prompt)?, &with_adapter)?;
    println!("DoRA merged export vs adapter: max |Δ logits| {d:.3e}");
    assert!(d <= 1e-5, "{d}");
    // And the adapter does change the model (the comparison is not of two base models).
    assert!(max_diff(&plain, &with_adapter)? > 1e-2);
    Ok(())
}

#[test]
fn adapter_errors_name_the_file_and_the_problem() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let model = model_dir(tmp.path());
    let m = model.to_str().unwrap();
    let run = |args: &[&str]| {
        let (ok, _, err) = helix_train(args, tmp.path());
        assert!(!ok, "{args:?} should fail");
        err
    };
    // Subcommands that read no config refuse one instead of ignoring it.
    let err = run(&["--config", "run.toml", "export", "--model", m, "--out", "x"]);
    assert!(
        err.contains("`helix-train export` reads no config"),
        "{err}"
    );
    let ptuning = fixture("tiny-gqa-tied").join("ptuning");
    let err = run(&[
        "export",
        "--model",
        m,
        "--adapter",
        ptuning.to_str().unwrap(),
        "--out",
        "x",
    ]);
    assert!(err.contains("cannot be merged"), "{err}");
    let lora = fixture("tiny-gqa-tied").join("lora");
    let err = run(&[
        "export",
        "--model",
        m,
        "--adapter",
        lora.to_str().unwrap(),
        "--out",
        "x",
        "--max-shard-size",
        "5XB",
    ]);
    assert!(
        err.contains("--max-shard-size") && err.contains("'XB'"),
        "{err}"
    );

    // A broken adapter directory: each problem named with its file.
    let bad = tmp.path().join("bad");
    std::fs::create_dir(&bad)?;
    let gen = |dir: &Path| {
        run(&[
            "generate",
            "--model",
            m,
            "--adapter",
            dir.to_str().unwrap(),
            "--prompt",
            "one",
        ])
    };
    let err = gen(&bad);
    assert!(err.contains("adapter_config.json"), "{err}");
    let cfg = std::fs::read_to_string(lora.join("adapter_config.json"))?;
    std::fs::write(bad.join("adapter_config.json"), &cfg)?;
    let err = gen(&bad);
    assert!(
        err.contains("adapter_model.safetensors: not found"),
        "{err}"
    );
    // generate's error with `from` replaced by `to` in the adapter's config.
    let gen_edited = |from: &str, to: &str| -> Result<String> {
        std::fs::write(bad.join("adapter_config.json"), cfg.replace(from, to))?;
        Ok(gen(&bad))
    };
    let err = gen_edited("\"fan_in_fan_out\": false", "\"fan_in_fan_out\": true")?;
    assert!(
        err.contains("fan_in_fan_out = true is not supported"),
        "{err}"
    );
    // A flag written as a string is an error, not false.
    let err = gen_edited("\"use_rslora\": false", "\"use_rslora\": \"true\"")?;
    assert!(
        err.contains("use_rslora = \"true\" is not true or false"),
        "{err}"
    );
    let err = gen_edited("\"LORA\"", "\"IA3\"")?;
    assert!(err.contains("peft_type") && err.contains("IA3"), "{err}");
    // Adapter weights for another model: the shapes do not fit.
    std::fs::write(bad.join("adapter_config.json"), &cfg)?;
    std::fs::copy(
        fixture("tiny-gqa-untied-b3").join("lora/adapter_model.safetensors"),
        bad.join("adapter_model.safetensors"),
    )?;
    let err = gen(&bad);
    assert!(
        err.contains("has shape") && err.contains("the model needs"),
        "{err}"
    );
    Ok(())
}

#[test]
fn a_run_s_own_chat_template_is_saved_beside_its_adapter_and_model() {
    let tmp = common::tiny_run_dir("lora");
    let dir = tmp.path();
    let template = "{% for m in messages %}Q {{ m['content'] }} A {% endfor %}";
    std::fs::write(dir.join("t.jinja"), template).unwrap();
    let run = |out: &str, own: bool| {
        let mut args = vec![
            "--config",
            "run.toml",
            "--set",
            "trainer.max_steps=1",
            "--set",
            "output.merged=true",
            "--set",
            "data.template=chat",
        ];
        let out = format!("trainer.output_dir={out}");
        args.extend(["--set", &out]);
        if own {
            args.extend(["--set", "data.chat_template=t.jinja"]);
        }
        let (ok, _, err) = helix_train(&args, dir);
        assert!(ok, "{err}");
    };
    run("own", true);
    for saved in [
        "own/adapter/chat_template.jinja",
        "own/model/chat_template.jinja",
    ] {
        assert_eq!(std::fs::read_to_string(dir.join(saved)).unwrap(), template);
    }
    // With the tokenizer's own template nothing is written beside the adapter: the base model
    // already carries it.
    std::fs::write(
        dir.join("model/tokenizer_config.json"),
        serde_json::json!({"bos_token": "<s>", "eos_token": "</s>", "chat_template": template})
            .to_string(),
    )
    .unwrap();
    run("tokenizers", false);
    assert!(!dir.join("tokenizers/adapter/chat_template.jinja").exists());
}
