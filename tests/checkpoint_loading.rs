//! Loading Hugging Face checkpoints: sharded equals single-file, and every broken checkpoint
//! gets a clear error naming the tensor or file (never a panic).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use helix::model::{ForwardMask, Llama, LlamaConfig, LoadOptions, SafetensorsWeights};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-gqa-untied-b3")
}

fn tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture().join("model.safetensors"), &Device::Cpu).unwrap()
}

fn copy_config(dir: &Path) {
    std::fs::copy(fixture().join("config.json"), dir.join("config.json")).unwrap();
}

fn load(dir: &Path) -> Result<Llama> {
    let cfg = LlamaConfig::from_file(&dir.join("config.json"))?;
    let w = SafetensorsWeights::open_dir(dir)?;
    Llama::load(&cfg, &w, &LoadOptions::inference(DType::F32, Device::Cpu))
}

fn load_err(dir: &Path) -> String {
    match load(dir) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

fn logits(model: &Llama) -> Tensor {
    let ids = Tensor::new(&[[1u32, 5, 9, 2]], &Device::Cpu).unwrap();
    let pos = Tensor::new(&[[0i64, 1, 2, 3]], &Device::Cpu).unwrap();
    let h = model
        .forward_hidden(
            &ids,
            &pos,
            &ForwardMask {
                key_valid: None,
                segment_ids: None,
            },
        )
        .unwrap();
    model.logits(&h).unwrap()
}

/// Writes the fixture's tensors into two shards and an index.
fn write_sharded(dir: &Path, index_override: Option<serde_json::Value>) {
    copy_config(dir);
    let all = tensors();
    let mut names: Vec<_> = all.keys().cloned().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        let sub: HashMap<String, Tensor> =
            part.iter().map(|n| (n.clone(), all[n].clone())).collect();
        candle_core::safetensors::save(&sub, dir.join(file)).unwrap();
        for n in part {
            map.insert(n.clone(), file.into());
        }
    }
    let index = index_override.unwrap_or(serde_json::json!({"metadata": {}, "weight_map": map}));
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

#[test]
fn sharded_checkpoint_gives_the_same_logits_as_the_single_file() -> Result<()> {
    let single = load(&fixture())?;
    let tmp = tempfile::tempdir()?;
    write_sharded(tmp.path(), None);
    let sharded = load(tmp.path())?;
    let d = (logits(&single) - logits(&sharded))?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    assert_eq!(d, 0.0);
    Ok(())
}

#[test]
fn bf16_and_f16_checkpoints_load() -> Result<()> {
    for dtype in [DType::BF16, DType::F16] {
        let tmp = tempfile::tempdir()?;
        copy_config(tmp.path());
        let conv: HashMap<_, _> = tensors()
            .into_iter()
            .map(|(k, v)| (k, v.to_dtype(dtype).unwrap()))
            .collect();
        candle_core::safetensors::save(&conv, tmp.path().join("model.safetensors"))?;
        let m = load(tmp.path())?;
        let d = (logits(&m) - logits(&load(&fixture())?))?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(d < 0.05, "{dtype:?}: {d}");
    }
    Ok(())
}

#[test]
fn missing_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    copy_config(tmp.path());
    let mut t = tensors();
    t.remove("model.layers.1.mlp.up_proj.weight");
    candle_core::safetensors::save(&t, tmp.path().join("model.safetensors")).unwrap();
    let e = load_err(tmp.path());
    assert!(
        e.contains("tensor 'model.layers.1.mlp.up_proj.weight' is missing"),
        "{e}"
    );
}

#[test]
fn wrong_shape_is_named_with_both_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    copy_config(tmp.path());
    let mut t = tensors();
    t.insert(
        "model.norm.weight".into(),
        Tensor::ones(47, DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, tmp.path().join("model.safetensors")).unwrap();
    let e = load_err(tmp.path());
    assert!(
        e.contains("tensor 'model.norm.weight'") && e.contains("has shape [47], expected [48]"),
        "{e}"
    );
}

#[test]
fn wrong_dtype_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    copy_config(tmp.path());
    let mut t = tensors();
    t.insert(
        "model.norm.weight".into(),
        Tensor::ones(48, DType::I64, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, tmp.path().join("model.safetensors")).unwrap();
    let e = load_err(tmp.path());
    assert!(
        e.contains("tensor 'model.norm.weight'") && e.contains("has dtype I64"),
        "{e}"
    );
}

#[test]
fn truncated_file_is_reported_with_its_path() {
    let tmp = tempfile::tempdir().unwrap();
    copy_config(tmp.path());
    let bytes = std::fs::read(fixture().join("model.safetensors")).unwrap();
    for cut in [bytes.len() - 100, 50, 4] {
        std::fs::write(tmp.path().join("model.safetensors"), &bytes[..cut]).unwrap();
        let e = load_err(tmp.path());
        assert!(
            e.contains("model.safetensors") && e.contains("truncated"),
            "cut at {cut}: {e}"
        );
    }
}

#[test]
fn index_pointing_outside_the_model_directory_is_refused() {
    for bad in [
        "../outside.safetensors",
        "/etc/passwd",
        "sub/../../x.safetensors",
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let index = serde_json::json!({"weight_map": {"model.norm.weight": bad}});
        write_sharded(tmp.path(), Some(index));
        let e = load_err(tmp.path());
        assert!(
            e.contains("must stay inside the model directory") || e.contains("must be relative"),
            "{bad}: {e}"
        );
        assert!(e.contains("model.safetensors.index.json"), "{e}");
    }
}

#[test]
fn index_naming_a_missing_shard_names_it() {
    let tmp = tempfile::tempdir().unwrap();
    let index = serde_json::json!({"weight_map": {"model.norm.weight": "model-00009.safetensors"}});
    write_sharded(tmp.path(), Some(index));
    let e = load_err(tmp.path());
    assert!(e.contains("model-00009.safetensors"), "{e}");
}

#[test]
fn unknown_rope_scaling_is_refused_when_loading_a_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("config.json")).unwrap())
            .unwrap();
    cfg["rope_scaling"] = serde_json::json!({"rope_type": "longrope", "factor": 8.0});
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let e = format!(
        "{:#}",
        LlamaConfig::from_file(&tmp.path().join("config.json")).unwrap_err()
    );
    assert!(
        e.contains("config.json")
            && e.contains("rope_scaling: rope_type 'longrope' is not supported"),
        "{e}"
    );
}

/// A safetensors file whose header is `header` (JSON) followed by `data`.
fn safetensors_bytes(header_len: u64, header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = header_len.to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

#[test]
fn a_header_claiming_absurd_sizes_is_refused_without_allocating_them() {
    let norm = r#"{"model.norm.weight":{"dtype":"F32","shape":[SHAPE],"data_offsets":[0,END]}}"#;
    let tensor_file = |h: &str, data: &[u8]| safetensors_bytes(h.len() as u64, h, data);
    let cases = [
        // A header length far past the end of the file.
        safetensors_bytes(u64::MAX / 2, "{}", &[]),
        safetensors_bytes(1 << 40, "{}", &[]),
        // A tensor of 2^40 × 2^40 elements whose bytes are said to be there.
        tensor_file(
            &norm
                .replace("SHAPE", "1099511627776,1099511627776")
                .replace("END", "4"),
            &[0; 4],
        ),
        // Offsets past the end of the file.
        tensor_file(
            &norm
                .replace("SHAPE", "16")
                .replace("END", "18446744073709551615"),
            &[0; 64],
        ),
    ];
    for (i, bytes) in cases.iter().enumerate() {
        let tmp = tempfile::tempdir().unwrap();
        copy_config(tmp.path());
        std::fs::write(tmp.path().join("model.safetensors"), bytes).unwrap();
        let e = load_err(tmp.path());
        assert!(e.contains("model.safetensors"), "case {i}: {e}");
    }
}

#[test]
fn a_tokenizer_file_that_fails_to_parse_is_refused_naming_it() {
    for bad in ["", "{", "{\"model\": 7}", "\u{0}\u{1}garbage"] {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("tokenizer.json"), bad).unwrap();
        let e = match helix::model::model_dir::TextCodec::open(tmp.path()) {
            Ok(_) => panic!("{bad:?} parsed"),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            e.contains("cannot load tokenizer") && e.contains("tokenizer.json"),
            "{bad:?}: {e}"
        );
    }
}
