//! Training that continues from an existing adapter (`method.init_from`): a LoRA adapter saved
//! by Hugging Face PEFT (tests/fixtures) goes through a step whose learning rate is 0 and comes
//! out, in PEFT format, bit for bit as it went in; settings that differ from the adapter's, and
//! P-tuning from PEFT's table alone, are refused with a message.

mod common;
use common::{fixture, helix_train, tiny_run_dir};

/// `helix-train --config run.toml ARGS` in `dir`: (success, stderr).
fn helix(dir: &std::path::Path, args: &[&str]) -> (bool, String) {
    let (ok, _, err) = helix_train(&[&["--config", "run.toml"], args].concat(), dir);
    (ok, err)
}

#[test]
fn a_peft_lora_adapter_continues_training_in_helix() {
    let tmp = tiny_run_dir("lora");
    let dir = tmp.path();
    let peft = fixture("tiny-gqa-tied/lora");
    let init = format!("method.init_from={}", peft.display());
    // PEFT's settings (all seven projections, listed in another order than the adapter's).
    let same = [
        "--set",
        &init,
        "--set",
        "lora.r=8",
        "--set",
        "lora.lora_alpha=16",
        "--set",
        "lora.lora_dropout=0.0",
    ];
    // One step, at the warmup's first learning rate: 0.
    let (ok, err) = helix(
        dir,
        &[
            &same[..],
            &[
                "--set",
                "trainer.max_steps=1",
                "--set",
                "schedule.warmup_steps=1",
                "--set",
                "trainer.output_dir=zero",
            ],
        ]
        .concat(),
    );
    assert!(ok, "{err}");
    let read = |p: std::path::PathBuf| {
        candle_core::safetensors::load(p, &candle_core::Device::Cpu).unwrap()
    };
    let before = read(peft.join("adapter_model.safetensors"));
    let after = read(dir.join("zero/adapter/adapter_model.safetensors"));
    assert_eq!(before.len(), after.len());
    for (k, t) in &before {
        let (a, b) = (t.flatten_all().unwrap(), after[k].flatten_all().unwrap());
        assert_eq!(
            a.to_vec1::<f32>().unwrap(),
            b.to_vec1::<f32>().unwrap(),
            "{k}"
        );
    }

    // Real steps move it; validation starts from PEFT's adapter, not a fresh one.
    let (ok, err) = helix(
        dir,
        &[&same[..], &["--set", "trainer.output_dir=cont"]].concat(),
    );
    assert!(ok, "{err}");
    let (ok, fresh) = helix(dir, &["--set", "trainer.output_dir=fresh"]);
    assert!(ok, "{fresh}");
    let before_line = |s: &str| {
        s.lines()
            .find(|l| l.starts_with("validation loss before training"))
            .unwrap()
            .to_string()
    };
    assert_ne!(before_line(&err), before_line(&fresh));

    // Settings that differ from the adapter's are named.
    let (ok, err) = helix(dir, &["--set", &init, "--set", "trainer.output_dir=bad"]);
    assert!(!ok);
    assert!(
        err.contains("differ from [lora] (config vs adapter): lora.") && err.contains("init_from"),
        "{err}"
    );
}

#[test]
fn ptuning_cannot_continue_from_peft_s_table_alone() {
    let tmp = tiny_run_dir("ptuning");
    let init = format!(
        "method.init_from={}",
        fixture("tiny-gqa-tied/ptuning").display()
    );
    let (ok, err) = helix(tmp.path(), &["--set", &init]);
    assert!(!ok);
    assert!(
        err.contains("PEFT saves only P-tuning's virtual tokens"),
        "{err}"
    );
}
