//! A long CPU run watched from outside: 2,000 LoRA steps on the tiny model, a checkpoint every
//! 50 steps, `save_total_limit = 3`. Resident memory must stay flat after warm-up, the
//! checkpoints' disk use bounded by the limit, and file descriptors and threads must not
//! leak. About a minute; run by `scripts/fault-suite.sh` (ignored by the default `cargo test`).

mod common;
use common::tiny_run_dir;
use helix_train::progress::status_field;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const STEPS: u64 = 2000;
/// Samples before this step are warm-up (allocator pools, the first saves).
const WARM: u64 = 200;

#[derive(Debug, Clone, Copy)]
struct Sample {
    step: u64,
    rss_kib: u64,
    threads: u64,
    fds: u64,
    ckpt_bytes: u64,
}

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            _ => e.metadata().map_or(0, |m| m.len()),
        })
        .sum()
}

/// The last step metrics.jsonl records.
fn last_step(out: &Path) -> u64 {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .ok()
        .and_then(|m| {
            let line = m.lines().last()?.to_string();
            let v: serde_json::Value = serde_json::from_str(&line).ok()?;
            v["step"].as_u64()
        })
        .unwrap_or(0)
}

fn median(mut xs: Vec<u64>) -> u64 {
    xs.sort_unstable();
    xs[xs.len() / 2]
}

#[test]
#[ignore = "a minute of training; run by scripts/fault-suite.sh"]
fn two_thousand_steps_keep_memory_disk_fds_and_threads_flat() {
    let tmp = tiny_run_dir("lora");
    let dir = tmp.path();
    let out = dir.join("long");
    let steps = STEPS.to_string();
    let sets = [
        format!("trainer.max_steps={steps}"),
        "trainer.save_interval=50".into(),
        "trainer.save_total_limit=3".into(),
        "trainer.val_check_interval=500".into(),
        "trainer.output_dir=long".into(),
    ];
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_helix-train"));
    cmd.args(["--config", "run.toml"]);
    for s in &sets {
        cmd.args(["--set", s]);
    }
    // The log goes to a file: a pipe nobody reads until the end would fill and block the run.
    let log_path = dir.join("long.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = cmd
        .current_dir(dir)
        .env("HELIX_CACHE_DIR", dir.join("cache"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let pid = child.id();
    let t = Instant::now();
    let mut samples = Vec::new();
    while child.try_wait().unwrap().is_none() {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
        // Below 1 MiB the child has not exec'd yet: not helix-train.
        if let (Some(rss_kib @ 1024..), Some(threads)) = (
            status_field(&status, "VmRSS:"),
            status_field(&status, "Threads:"),
        ) {
            samples.push(Sample {
                step: last_step(&out),
                rss_kib,
                threads,
                fds,
                ckpt_bytes: dir_bytes(&out.join("checkpoints")),
            });
        }
        assert!(
            t.elapsed() < Duration::from_secs(1200),
            "the run took too long"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = child.wait().unwrap();
    let err = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(status.success(), "{err}");
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(last_step(&out), STEPS);

    let warm: Vec<Sample> = samples.iter().copied().filter(|s| s.step >= WARM).collect();
    assert!(warm.len() >= 20, "{} samples after warm-up", warm.len());
    let tenth = warm.len() / 10;
    let (early, late) = (&warm[..tenth], &warm[warm.len() - tenth..]);
    let rss_early = median(early.iter().map(|s| s.rss_kib).collect());
    let rss_late = median(late.iter().map(|s| s.rss_kib).collect());
    let rss_max = warm.iter().map(|s| s.rss_kib).max().unwrap();
    // Descriptors at rest (no save writing a file): the fewest open in each window.
    let fds_early = early.iter().map(|s| s.fds).min().unwrap();
    let fds_late = late.iter().map(|s| s.fds).min().unwrap();
    let fds_max = warm.iter().map(|s| s.fds).max().unwrap();
    let thr_early = median(early.iter().map(|s| s.threads).collect());
    let thr_late = median(late.iter().map(|s| s.threads).collect());
    let thr_max = warm.iter().map(|s| s.threads).max().unwrap();
    let disk_max = samples.iter().map(|s| s.ckpt_bytes).max().unwrap();
    let one = dir_bytes(&out.join("checkpoints").join(format!("step-{STEPS:06}")));
    let kept = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .count();

    println!(
        "{STEPS} steps in {secs:.1} s, {} samples ({} after step {WARM})",
        samples.len(),
        warm.len()
    );
    println!(
        "RSS: {:.1} MiB at the first sample, {:.1} MiB after warm-up (median of the first \
         tenth), {:.1} MiB at the end (median of the last tenth), peak {:.1} MiB",
        samples[0].rss_kib as f64 / 1024.0,
        rss_early as f64 / 1024.0,
        rss_late as f64 / 1024.0,
        rss_max as f64 / 1024.0
    );
    println!(
        "file descriptors at rest: {fds_early} after warm-up, {fds_late} at the end; at most {fds_max} during a save"
    );
    println!("threads: {thr_early} after warm-up, {thr_late} at the end, at most {thr_max}");
    println!(
        "checkpoints: at most {:.2} MiB on disk, {kept} kept, one is {:.2} MiB",
        disk_max as f64 / 1048576.0,
        one as f64 / 1048576.0
    );

    // Flat: the end within 5 % (+ 4 MiB of allocator noise) of after warm-up.
    assert!(
        rss_late <= rss_early + rss_early / 20 + 4096,
        "RSS grew from {rss_early} KiB to {rss_late} KiB"
    );
    assert_eq!(fds_late, fds_early, "file descriptors leak");
    assert!(
        fds_max <= fds_early + 4,
        "{fds_max} descriptors open at once"
    );
    assert_eq!(thr_late, thr_early, "threads leak");
    assert!(thr_max <= thr_early + 1, "{thr_max} threads at once");
    // Three kept plus the one being written.
    assert_eq!(kept, 3);
    assert!(
        disk_max <= 4 * one + one / 2,
        "checkpoints took {disk_max} bytes, one is {one}"
    );
}
