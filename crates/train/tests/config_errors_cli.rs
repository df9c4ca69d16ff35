//! `helix-train --config` refuses a bad config before loading anything, naming the file, the
//! line where there is one, and the key: an unknown key (with the closest valid one), a wrong
//! type, a global batch that does not divide, a bad --set.

mod common;
use common::helix_train;

const GOOD: &str = r#"[model]
path = "model"

[method]
name = "lora"

[lora]
r = 8
lora_alpha = 16

[data]
train = "rows.jsonl"
format = "alpaca"

[batch]
micro_batch_size = 2
global_batch_size = 8

[optimizer]
lr = 1e-4

[trainer]
max_steps = 10
"#;

#[test]
fn config_errors_name_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: [(String, &[&str], &[&str]); 7] = [
        (
            GOOD.replace("lr = 1e-4", "learning_rate = 1e-4"),
            &[],
            &[
                "bad.toml",
                "line 20",
                "unknown field `learning_rate`",
                "`lr`",
            ],
        ),
        (
            GOOD.replace("r = 8", "rank = 8"),
            &[],
            &["line 8", "unknown field `rank`", "did you mean `r`?"],
        ),
        (
            GOOD.replace("max_steps = 10", "max_steps = \"ten\""),
            &[],
            &["line 23", "invalid type: string \"ten\", expected u64"],
        ),
        (
            GOOD.replace("global_batch_size = 8", "global_batch_size = 7"),
            &[],
            &["batch.global_batch_size (7)", "batch.micro_batch_size (2)"],
        ),
        (
            GOOD.to_string(),
            &["--set", "optimizer.betas=[0.9, 1.5]"],
            &["optimizer.betas[1] must be in [0, 1), got 1.5"],
        ),
        (
            GOOD.to_string(),
            &[
                "--set",
                "schedule.warmup_ratio=0.1",
                "--set",
                "schedule.warmup_steps=5",
            ],
            &["schedule.warmup_steps or schedule.warmup_ratio, not both"],
        ),
        (
            GOOD.to_string(),
            &["--set", "trainer.max_steps=0"],
            &["trainer.max_steps must be at least 1"],
        ),
    ];
    for (text, extra, wants) in cases {
        std::fs::write(tmp.path().join("bad.toml"), &text).unwrap();
        let mut args = vec!["--config", "bad.toml"];
        args.extend_from_slice(extra);
        let (ok, _, err) = helix_train(&args, tmp.path());
        assert!(!ok, "{args:?} should fail");
        for want in wants {
            assert!(err.contains(want), "wanted {want:?} in: {err}");
        }
    }
}
