//! Helpers shared by the `helix-train` command-line tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs `helix-train ARGS` in `cwd` with its token cache there; (success, stdout, stderr).
pub fn helix_train(args: &[&str], cwd: &Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_helix-train"))
        .args(args)
        .current_dir(cwd)
        .env("HELIX_CACHE_DIR", cwd.join("cache"))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A word-level tokenizer directory: <s> added in front, </s> as EOS.
pub fn write_tokenizer(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut vocab = serde_json::Map::new();
    for w in [
        "[UNK]", "<s>", "</s>", "Q", "A", "one", "two", "three", "four", "five",
    ] {
        let n = vocab.len();
        vocab.insert(w.into(), n.into());
    }
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 1, "content": "<s>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true},
            {"id": 2, "content": "</s>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "decoder": null,
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"bos_token": "<s>", "eos_token": "</s>"}"#,
    )
    .unwrap();
}

/// A committed fixture of the workspace: tests/fixtures/<name>.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

const CONFIG: &str = r#"
[model]
path = "model"
dtype = "f32"

[method]
name = "METHOD"

[data]
train = "rows.jsonl"
format = "alpaca"
template = "Q {instruction} {input} A "
max_seq_length = 16
packing = PACKING
validation_fraction = 0.2
seed = 3

[batch]
micro_batch_size = 2
global_batch_size = 4

[optimizer]
lr = 0.01
weight_decay = 0.01

[schedule]
name = "cosine"
warmup_steps = 2
min_lr = 0.001

[trainer]
max_steps = 20
val_check_interval = 5
save_interval = 5
seed = 7
output_dir = "out"
"#;

const LORA: &str = r#"
[lora]
r = 4
lora_alpha = 8
lora_dropout = 0.1
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"#;

const PTUNING: &str = r#"
[ptuning]
num_virtual_tokens = 4
encoder_reparameterization_type = "LSTM"
encoder_hidden_size = 16
encoder_num_layers = 2
encoder_dropout = 0.1
"#;

/// A run directory for `method`: the tiny tied model with a word-level tokenizer, 40 Alpaca
/// rows of its words, and run.toml (20 steps, checkpoints every 5, dropout on).
pub fn tiny_run_dir(method: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("model");
    write_tokenizer(&m);
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("tiny-gqa-tied").join(f), m.join(f)).unwrap();
    }
    let words = ["one", "two", "three", "four", "five"];
    let rows: Vec<String> = (0..40)
        .map(|i| {
            format!(
                r#"{{"instruction": "{} {}", "input": "", "output": "{} {}"}}"#,
                words[i % 5],
                words[(i / 5) % 5],
                words[(i + 2) % 5],
                words[(i * 3) % 5]
            )
        })
        .collect();
    std::fs::write(tmp.path().join("rows.jsonl"), rows.join("\n")).unwrap();
    let mut cfg = CONFIG.replace("METHOD", method).replace(
        "PACKING",
        if method == "ptuning" { "false" } else { "true" },
    );
    cfg.push_str(match method {
        "lora" => LORA,
        "ptuning" => PTUNING,
        _ => "",
    });
    std::fs::write(tmp.path().join("run.toml"), cfg).unwrap();
    tmp
}

/// Every line of a run's `metrics.jsonl`, parsed.
pub fn metrics_rows(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap_or_else(|e| panic!("{}/metrics.jsonl: {e}", out.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `kill -SIG pid`.
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// `kill -SIG -- -pgid`: every process of the group, as a terminal's Ctrl-C.
pub fn signal_group(pgid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, "--", &format!("-{pgid}")])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} -- -{pgid}");
}

/// A small xorshift generator: repeatable pseudo-random draws for fault tests.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in [0, 1).
    pub fn next_unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}
