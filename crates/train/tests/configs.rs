//! Every config in configs/ parses and passes the checks a run makes before it loads anything;
//! the training configs' batch sizes divide for the data-parallel sizes they are meant for.

use std::path::Path;

use helix_train::config::ConfigFile;

/// `helix-train ARGS` in `dir`; its stdout, after asserting that it succeeded.
fn helix_train_ok(dir: &Path, args: &[&str]) -> String {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_helix-train"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn every_shipped_config_is_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut training = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_none_or(|x| x != "toml") {
            continue;
        }
        let cfg = ConfigFile::load(&path).unwrap_or_else(|e| panic!("{e:#}"));
        cfg.data(&path).unwrap();
        if cfg.method.is_none() {
            continue; // a [data]-only example for data-stats
        }
        cfg.validate_training(1)
            .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        // One GPU, one node of 8, and the 70B job's two nodes at TP 8 (DP 2).
        for dp in [1, 2, 8] {
            if cfg.batch.global_batch_size.unwrap_or(1) >= dp {
                cfg.accumulation(dp)
                    .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            }
        }
        training += 1;
    }
    assert_eq!(
        training, 10,
        "quickstart, chat_quickstart, tool_calls_quickstart, mix_quickstart, sft7b, lora7b, \
         lora13b, lora70b, ptuning7b, lora_llama31_8b"
    );
}

/// `helix-train plan` runs on every 7B–70B config and compares the LoRA ones with the seed's
/// measured NeMo times.
#[test]
fn plan_reports_every_cluster_config() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for (name, measured) in [
        ("sft7b", false),
        ("lora7b", true),
        ("lora13b", false),
        ("lora70b", true),
        ("ptuning7b", false),
        ("lora_llama31_8b", false),
    ] {
        let config = format!("configs/{name}.toml");
        let out = helix_train_ok(
            &dir,
            &[
                "plan",
                "--config",
                &config,
                "--nodes",
                "1",
                "--gpus-per-node",
                "8",
            ],
        );
        for want in ["memory per GPU", "PFLOP per GPU per step", "predicted step"] {
            assert!(out.contains(want), "{name}: {out}");
        }
        assert_eq!(
            out.contains("seed's NeMo measurement"),
            measured,
            "{name}: {out}"
        );
    }
}

/// Without `global_batch_size`, `plan` takes one micro-batch per data-parallel rank a step, as
/// training does (it took one micro-batch in all, and then refused the config).
#[test]
fn plan_defaults_the_global_batch_as_training_does() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(repo.join("configs/lora7b.toml")).unwrap();
    let cut: String = text
        .lines()
        .filter(|l| !l.starts_with("global_batch_size"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(tmp.path().join("lora7b.toml"), cut).unwrap();
    let out = helix_train_ok(
        tmp.path(),
        &[
            "plan",
            "--config",
            "lora7b.toml",
            "--nodes",
            "1",
            "--gpus-per-node",
            "8",
            "--json",
        ],
    );
    let plan: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        out.contains("predicted") || plan["plan"].is_object(),
        "{out}"
    );
}

/// The GPU benchmark's configs (configs/bench/) run `helix-train bench` on a sliver of their
/// shape: one layer, four tokens, random weights (SFT's only parses: AdamW over even one
/// layer and the 7B embeddings takes half a minute on a CPU).
#[test]
fn bench_configs_run_one_step_of_one_layer() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let sft = ConfigFile::load(&dir.join("configs/bench/sft7b.toml")).unwrap();
    assert_eq!(sft.method().unwrap().name(), "sft");
    {
        let (name, method) = ("lora7b", "lora");
        let config = format!("configs/bench/{name}.toml");
        let out = helix_train_ok(
            &dir,
            &[
                "bench",
                "--config",
                &config,
                "--random-weights",
                "--layers",
                "1",
                "--seq",
                "4",
                "--json",
                "--warmup",
                "0",
                "--steps",
                "1",
            ],
        );
        let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(report["method"], method, "{out}");
        assert_eq!(
            (report["layers"].as_u64(), report["dtype"].as_str()),
            (Some(1), Some("bf16"))
        );
        // The step's three phases follow one another and cover it (the timer's own moments
        // apart).
        let phase = |k: &str| report["median_phase_s"][k].as_f64().unwrap();
        let parts = ["forward_backward", "clip", "optimizer"].map(phase);
        assert!(parts[0] > 0.0 && parts[1] >= 0.0 && parts[2] > 0.0, "{out}");
        let (sum, step) = (
            parts.iter().sum::<f64>(),
            report["median_step_s"].as_f64().unwrap(),
        );
        assert!(sum <= step && sum > 0.9 * step, "{out}");
        let loss = report["losses"][0].as_f64().unwrap();
        // Random weights of spread 0.02 predict about uniformly over the 32,000 tokens.
        assert!((loss - 32000f64.ln()).abs() < 2.0, "{name}: loss {loss}");
    }
}
