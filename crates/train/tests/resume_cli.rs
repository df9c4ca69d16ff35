//! `helix-train --config` end to end on a tiny model, for LoRA, P-tuning and full SFT: a run
//! interrupted at step 10 — by kill -9, or by SIGTERM (Slurm preemption) — and resumed gives
//! bit for bit the losses and final weights of a run that went straight through; a kill while
//! a checkpoint is being written leaves the previous one usable; a flipped byte is named.
//!
//! Dropout is on (LoRA, the P-tuning LSTM), so the random state must resume too.

mod common;
use common::tiny_run_dir as setup;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn command(dir: &Path, out: &str, env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_helix-train"));
    c.args([
        "--config",
        "run.toml",
        "--set",
        &format!("trainer.output_dir={out}"),
    ])
    .current_dir(dir)
    .env("HELIX_CACHE_DIR", dir.join("cache"))
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

/// Runs to the end; panics with its stderr if it fails.
fn run(dir: &Path, out: &str) -> String {
    let o = command(dir, out, &[]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{err}");
    err
}

/// Starts a run slowed to `delay_ms` per step, so it can be interrupted.
fn start_slow(dir: &Path, out: &str, delay_ms: u64, extra: &[(&str, &str)]) -> Child {
    let delay = delay_ms.to_string();
    let mut env = vec![("HELIX_TEST_STEP_DELAY_MS", delay.as_str())];
    env.extend_from_slice(extra);
    command(dir, out, &env).spawn().unwrap()
}

fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ready() {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

/// (step, loss bits, val_loss bits) of every line of metrics.jsonl.
fn metrics(dir: &Path) -> Vec<(u64, Option<u64>, Option<u64>)> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let bits = |k: &str| v[k].as_f64().map(f64::to_bits);
            (v["step"].as_u64().unwrap(), bits("loss"), bits("val_loss"))
        })
        .collect()
}

/// The bytes of every trainable-tensor file of the final checkpoint.
fn final_weights(out: &Path) -> Vec<(String, Vec<u8>)> {
    let dir = out.join("checkpoints/step-000020");
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("trainable")
        })
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} has trainable tensors", dir.display());
    files
}

fn checkpoint_done(out: &Path, step: u64) -> bool {
    out.join(format!("checkpoints/step-{step:06}")).is_dir()
}

fn assert_same_run(method: &str, how: &str, straight: &Path, resumed: &Path) {
    let (a, b) = (metrics(straight), metrics(resumed));
    assert_eq!(a.len(), 21, "{method}: steps 0..=20 in metrics.jsonl");
    assert_eq!(
        a, b,
        "{method} ({how}): losses of the resumed run vs straight"
    );
    assert!(
        final_weights(straight) == final_weights(resumed),
        "{method} ({how}): final weights differ"
    );
}

fn exact_resume(method: &str) {
    let tmp = setup(method);
    let dir = tmp.path();
    run(dir, "straight");
    let straight = dir.join("straight");
    let last = metrics(&straight).last().cloned().unwrap();
    println!("{method}: step 20 loss {:?}", last.1.map(f64::from_bits));

    // kill -9 once the step-10 checkpoint is complete; the rerun resumes from it.
    let mut child = start_slow(dir, "killed", 100, &[]);
    let killed = dir.join("killed");
    wait_for("step 10's checkpoint", || checkpoint_done(&killed, 10));
    signal(&child, "-KILL");
    child.wait().unwrap();
    assert!(!checkpoint_done(&killed, 20));
    let err = run(dir, "killed");
    assert!(err.contains("step-000010 (step 10)"), "{err}");
    assert_same_run(method, "kill -9", &straight, &killed);

    // SIGTERM after step 10: the run finishes its step, saves, exits 0; the rerun continues.
    let child = start_slow(dir, "preempted", 100, &[]);
    let pre = dir.join("preempted");
    wait_for("step 10", || {
        std::fs::read_to_string(pre.join("metrics.jsonl")).is_ok_and(|m| m.contains("\"step\":10,"))
    });
    signal(&child, "-TERM");
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("stopped by a signal after saving"), "{err}");
    let stopped_at = metrics(&pre).last().unwrap().0;
    assert!((10..20).contains(&stopped_at), "stopped at {stopped_at}");
    assert!(checkpoint_done(&pre, stopped_at));
    let err = run(dir, "preempted");
    assert!(err.contains(&format!("(step {stopped_at})")), "{err}");
    assert_same_run(method, "SIGTERM", &straight, &pre);
    println!("{method}: resumed after kill -9 at 10 and SIGTERM at {stopped_at}: bit-identical");
}

#[test]
fn lora_resumes_bit_exactly_after_kill_and_sigterm() {
    exact_resume("lora");
}

#[test]
fn ptuning_resumes_bit_exactly_after_kill_and_sigterm() {
    exact_resume("ptuning");
}

#[test]
fn sft_resumes_bit_exactly_after_kill_and_sigterm() {
    exact_resume("sft");
}

#[test]
fn a_kill_during_a_save_and_a_damaged_shard_fall_back_to_the_previous_checkpoint() {
    let tmp = setup("lora");
    let dir = tmp.path();
    run(dir, "straight");
    let straight = dir.join("straight");

    // Each tensor of a save waits 30 ms: kill while step 10's is being written.
    let mut child = start_slow(dir, "crash", 0, &[("HELIX_CKPT_TEST_WRITE_DELAY_MS", "30")]);
    let crash = dir.join("crash");
    wait_for("step 10's save to begin", || {
        crash.join("checkpoints/step-000010.tmp").is_dir()
    });
    signal(&child, "-KILL");
    child.wait().unwrap();
    assert!(checkpoint_done(&crash, 5) && !checkpoint_done(&crash, 10));
    let err = run(dir, "crash");
    assert!(err.contains("step-000005 (step 5)"), "{err}");
    assert!(!crash.join("checkpoints/step-000010.tmp").exists());
    assert_same_run("lora", "kill during a save", &straight, &crash);

    // One flipped byte in a shard of the newest checkpoint: named, and passed over.
    let shard = crash.join("checkpoints/step-000020/trainable.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x10;
    std::fs::write(&shard, bytes).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_helix-train"))
        .args([
            "eval",
            "--config",
            "run.toml",
            "--checkpoint",
            "crash/checkpoints/step-000020",
        ])
        .current_dir(dir)
        .env("HELIX_CACHE_DIR", dir.join("cache"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("step-000020/trainable.safetensors") && err.contains("sha256 mismatch"),
        "{err}"
    );
    let err = run(dir, "crash");
    assert!(
        err.contains("skipping the damaged checkpoint") && err.contains("trainable.safetensors"),
        "{err}"
    );
    assert!(err.contains("step-000015 (step 15)"), "{err}");
    assert_same_run("lora", "damaged newest checkpoint", &straight, &crash);
}

#[test]
fn a_non_finite_loss_stops_the_run_naming_the_step_and_keeping_the_last_checkpoint() {
    let tmp = setup("lora");
    let dir = tmp.path();
    let o = command(dir, "nan", &[])
        .args([
            "--set",
            "optimizer.lr=1e30",
            "--set",
            "trainer.save_interval=1",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    let at = err
        .find("error: step ")
        .unwrap_or_else(|| panic!("names the step: {err}"))
        + "error: ".len();
    assert!(
        err.contains("stopping without applying or saving this step"),
        "{err}"
    );
    let step: u64 = err[at + 5..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // Every checkpoint written is a good one, the last just before the bad step.
    let kept = dir.join(format!("nan/checkpoints/step-{:06}", step - 1));
    assert!(kept.is_dir(), "{err}");
    assert!(
        err.contains(&*kept.file_name().unwrap().to_string_lossy()),
        "{err}"
    );
}
