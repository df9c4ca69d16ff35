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

/// A run into `out` with `--set set` must fail saying `want`, before the model loaded (no
/// "trainable params" line).
fn refused_before_the_model(dir: &Path, out: &str, set: &str, want: &str) {
    let o = command(dir, out, &[])
        .args(["--set", set])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains(want), "{set}: {err}");
    assert!(
        !err.contains("trainable params"),
        "{set}: the model loaded first: {err}"
    );
}

/// Resuming `out` after one word of the data file `file` changed must fail saying `want`,
/// before the model loads; the file is put back after.
fn refused_after_editing(dir: &Path, out: &str, file: &str, want: &str) {
    let path = dir.join(file);
    let before = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, before.replacen("one", "two", 1)).unwrap();
    refused_before_the_model(dir, out, "trainer.save_interval=5", want);
    std::fs::write(&path, before).unwrap();
}

/// A run into `out`, killed with -9 once its step-10 checkpoint is complete, then run again to
/// the end; its output directory.
fn killed_at_10_and_resumed(dir: &Path, out: &str) -> std::path::PathBuf {
    let mut child = start_slow(dir, out, 100, &[]);
    let killed = dir.join(out);
    wait_for("step 10's checkpoint", || checkpoint_done(&killed, 10));
    signal(&child, "-KILL");
    child.wait().unwrap();
    run(dir, out);
    killed
}

fn signal(child: &Child, sig: &str) {
    common::signal(child.id(), sig);
}

/// (step, loss bits, val_loss bits) of every line of metrics.jsonl.
fn metrics(dir: &Path) -> Vec<(u64, Option<u64>, Option<u64>)> {
    common::metrics_rows(dir)
        .iter()
        .map(|v| {
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

/// Ctrl-C in a terminal under the launcher: every process of the foreground group gets SIGINT
/// and the launcher forwards a SIGTERM, so each rank is signalled twice at once; they still
/// save and exit 0. A second signal a second or more after the first exits at once.
#[test]
fn a_signal_delivered_twice_at_once_still_saves_and_a_later_one_aborts() {
    use std::os::unix::process::CommandExt;
    let tmp = setup("lora");
    let dir = tmp.path();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_helix-train"));
    cmd.args(["--nproc-per-node", "1", "--master-port", &port.to_string()])
        .args(["--config", "run.toml", "--set", "trainer.output_dir=group"])
        .current_dir(dir)
        .env("HELIX_CACHE_DIR", dir.join("cache"))
        .env("HELIX_TEST_STEP_DELAY_MS", "100")
        .env_remove("RANK")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let child = cmd.spawn().unwrap();
    let group = dir.join("group");
    wait_for("step 3", || {
        std::fs::read_to_string(group.join("metrics.jsonl"))
            .is_ok_and(|m| m.contains("\"step\":3,"))
    });
    common::signal_group(child.id(), "-INT");
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("stopped by a signal after saving"), "{err}");
    let stopped_at = metrics(&group).last().unwrap().0;
    assert!(checkpoint_done(&group, stopped_at), "{err}");

    // SIGTERM, then another 1.5 s later while the run is still saving and sleeping: status 130.
    let child = start_slow(dir, "aborted", 3000, &[]);
    let aborted = dir.join("aborted");
    wait_for("step 1", || {
        std::fs::read_to_string(aborted.join("metrics.jsonl"))
            .is_ok_and(|m| m.contains("\"step\":1,"))
    });
    signal(&child, "-TERM");
    std::thread::sleep(Duration::from_millis(1500));
    signal(&child, "-TERM");
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(!err.contains("stopped by a signal after saving"), "{err}");
    println!("SIGINT to the launcher's group: saved step {stopped_at}, exit 0; a second signal 1.5 s on: 130");
}

/// A path that cannot be read is named with the key that gave it.
#[test]
fn unreadable_paths_and_unusable_data_name_their_key() {
    let tmp = setup("lora");
    let dir = tmp.path();
    for (set, want) in [
        ("model.path=nope", "model.path"),
        ("data.tokenizer=nope", "data.tokenizer = nope"),
        ("method.init_from=nope", "method.init_from = nope"),
        // Every sample dropped as too long: said so, before the model loads.
        (
            "data.max_seq_length=3",
            "were dropped as longer than data.max_seq_length = 3",
        ),
    ] {
        refused_before_the_model(dir, "fresh", set, want);
    }
    // An adapter directory the end of the run could not replace whole: named at the start.
    std::fs::create_dir_all(dir.join("fresh/adapter")).unwrap();
    std::fs::write(dir.join("fresh/adapter/notes.md"), "mine").unwrap();
    refused_before_the_model(
        dir,
        "fresh",
        "trainer.seed=1234",
        "output.adapter: fresh/adapter already holds 'notes.md'",
    );
}

/// A second job in the output directory of a running one is refused at once, naming the first;
/// once that one is killed (-9: no cleanup), its lock is gone and a rerun resumes.
#[test]
fn one_job_at_a_time_writes_an_output_directory() {
    let tmp = setup("lora");
    let dir = tmp.path();
    let mut first = start_slow(dir, "busy", 200, &[]);
    let busy = dir.join("busy");
    wait_for("step 2's checkpoint", || {
        checkpoint_done(&busy, 2) || checkpoint_done(&busy, 5)
    });
    let t = Instant::now();
    let o = command(dir, "busy", &[]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    let pid = format!("pid {} on", first.id());
    assert!(
        err.contains("another helix-train job is writing to busy") && err.contains(&pid),
        "{err}"
    );
    assert!(
        !err.contains("trainable params"),
        "refused before the model loads: {err}"
    );
    println!("a second job refused in {:.2?}", t.elapsed());
    signal(&first, "-KILL");
    first.wait().unwrap();
    let err = run(dir, "busy");
    assert!(err.contains("resumed from"), "{err}");
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
    assert!(
        crash.join("checkpoints/step-000020.damaged").is_dir(),
        "{err}"
    );
    assert_same_run("lora", "damaged newest checkpoint", &straight, &crash);

    // eval under another LoRA scaling than the checkpoint's is refused, naming the key; with
    // the checkpoint's own settings (other data settings allowed) it evaluates.
    let eval = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_helix-train"))
            .args(["eval", "--config", "run.toml"])
            .args(["--checkpoint", "crash/checkpoints/step-000015"])
            .args(extra)
            .current_dir(dir)
            .env("HELIX_CACHE_DIR", dir.join("cache"))
            .output()
            .unwrap()
    };
    let o = eval(&["--set", "lora.lora_alpha=64"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("in lora.lora_alpha"),
        "{err}"
    );
    let o = eval(&["--set", "trainer.limit_val_batches=1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // Resuming with a setting that changes the numbers is refused, naming it, before the
    // model loads (no "trainable params" line); a missing data file too.
    for (set, want) in [
        ("optimizer.lr=0.5", "in optimizer.lr"),
        ("data.train=missing.jsonl", "missing.jsonl"),
    ] {
        refused_before_the_model(dir, "crash", set, want);
    }
    // So is a training file whose contents changed under the same name.
    refused_after_editing(dir, "crash", "rows.jsonl", "data.train's contents changed");
}

/// DoRA (`lora.use_dora`) trains, saves PEFT's `use_dora` adapter with every magnitude vector,
/// and resumes bit-exactly after kill -9 (the magnitudes and their optimizer state included).
#[test]
fn dora_trains_saves_its_magnitudes_and_resumes_exactly() {
    let tmp = setup("lora");
    let dir = tmp.path();
    let cfg = std::fs::read_to_string(dir.join("run.toml")).unwrap();
    let cfg = cfg.replace("[lora]\n", "[lora]\nuse_dora = true\n");
    std::fs::write(dir.join("run.toml"), cfg).unwrap();
    run(dir, "straight");
    let straight = dir.join("straight");
    let adapter = straight.join("adapter");
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["use_dora"], true);
    let tensors = candle_core::safetensors::load(
        adapter.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let magnitudes: Vec<&String> = tensors
        .keys()
        .filter(|n| n.ends_with(".lora_magnitude_vector"))
        .collect();
    // Two layers × seven projections, each [out].
    assert_eq!(magnitudes.len(), 14, "{magnitudes:?}");
    let q = &tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"];
    assert_eq!(q.rank(), 1);

    let killed = killed_at_10_and_resumed(dir, "killed");
    assert_same_run("lora", "DoRA, kill -9", &straight, &killed);
}

/// Two files in a weighted `[[data.mix]]`, each in its own format: the run reports each
/// file's share, a kill -9 resumes bit-exactly, and a mixed file that changed is refused.
#[test]
fn a_weighted_mix_of_files_resumes_exactly_and_refuses_a_changed_file() {
    let tmp = setup("lora");
    let dir = tmp.path();
    let words = ["one", "two", "three", "four", "five"];
    let dolly: Vec<String> = (0..12)
        .map(|i| {
            format!(
                r#"{{"instruction": "{}", "context": "{}", "response": "{}", "category": "x"}}"#,
                words[i % 5],
                words[(i / 2) % 5],
                words[(i + 4) % 5]
            )
        })
        .collect();
    std::fs::write(dir.join("dolly.jsonl"), dolly.join("\n")).unwrap();
    let cfg = std::fs::read_to_string(dir.join("run.toml"))
        .unwrap()
        .replace("train = \"rows.jsonl\"\n", "samples_per_epoch = 60\n");
    let mix = "[[data.mix]]\nfile = \"rows.jsonl\"\nweight = 1\n\n[[data.mix]]\n\
               file = \"dolly.jsonl\"\nweight = 2\nformat = \"dolly\"\n\
               template = \"Q {instruction} {context} A \"\n";
    std::fs::write(dir.join("run.toml"), format!("{cfg}\n{mix}")).unwrap();

    let err = run(dir, "straight");
    // 10 of the 12 Dolly rows train (validation_fraction = 0.2); 40 of 60 samples are theirs.
    assert!(
        err.contains(
            "data.mix[1] = dolly.jsonl: 10 training samples, 40 drawn (share 0.667, 4.00 \
             passes per epoch)"
        ),
        "{err}"
    );
    let straight = dir.join("straight");
    let killed = killed_at_10_and_resumed(dir, "killed");
    assert_same_run("lora", "a weighted mix, kill -9", &straight, &killed);
    refused_after_editing(
        dir,
        "killed",
        "dolly.jsonl",
        "data.mix[1]'s contents changed",
    );
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

/// Any `.tmp` directory under a run's checkpoints: what a kill during a save leaves.
fn save_in_progress(out: &Path) -> bool {
    std::fs::read_dir(out.join("checkpoints")).is_ok_and(|d| {
        d.flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
    })
}

/// kill -9 at 20 random moments of a LoRA run slowed to 40 ms a step and 1 ms per tensor saved
/// (so a good share of the kills land inside a checkpoint write): every rerun ends with the losses
/// and final weights of the run that went straight through. `HELIX_FAULT_SEED` repeats a draw.
#[test]
fn kill_9_at_random_moments_always_resumes_exactly() {
    let tmp = setup("lora");
    let dir = tmp.path();
    run(dir, "straight");
    let straight = dir.join("straight");
    let slow = [("HELIX_CKPT_TEST_WRITE_DELAY_MS", "1")];
    // How long a slowed run takes end to end: the window the kills are drawn from.
    let t = Instant::now();
    let o = start_slow(dir, "timed", 40, &slow)
        .wait_with_output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let span = t.elapsed();
    assert_same_run("lora", "slowed", &straight, &dir.join("timed"));

    let seed = std::env::var("HELIX_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("kill moments drawn with HELIX_FAULT_SEED={seed} over {span:.2?}");
    let mut draws = common::XorShift(seed);
    let (mut mid_save, mut before_first, mut finished) = (0, 0, 0);
    for trial in 0..20 {
        let out = format!("trial{trial}");
        let at = span.mul_f64(0.05 + 0.95 * draws.next_unit());
        let mut child = start_slow(dir, &out, 40, &slow);
        std::thread::sleep(at);
        signal(&child, "-KILL");
        let status = child.wait().unwrap();
        let out_dir = dir.join(&out);
        let during_save = save_in_progress(&out_dir);
        let saved = (1..=4).filter(|k| checkpoint_done(&out_dir, 5 * k)).count();
        let err = run(dir, &out);
        assert_same_run("lora", &format!("trial {trial}"), &straight, &out_dir);
        let how = match (status.success(), during_save, saved) {
            (true, ..) => {
                finished += 1;
                "after the run ended"
            }
            (_, true, _) => {
                mid_save += 1;
                "during a checkpoint write"
            }
            (_, _, 0) => {
                before_first += 1;
                "before the first checkpoint"
            }
            _ => "between checkpoints",
        };
        let from = err
            .lines()
            .find(|l| l.contains("resumed from"))
            .map_or("started afresh", |_| "resumed");
        println!(
            "trial {trial:2}: killed at {at:>9.2?} {how} ({saved} checkpoints complete); \
             rerun {from}: identical"
        );
    }
    println!(
        "20 of 20 trials identical to the straight run: {mid_save} killed during a checkpoint \
         write, {before_first} before the first checkpoint, {finished} after the end"
    );
}

/// Checkpoints on a file system too small for the third: the save fails with the system's
/// error naming the file, training stops, and the checkpoints before it still verify; once
/// there is room, the rerun resumes from the last of them and ends as the straight run.
/// Needs root to mount a tmpfs (CI runs as root; `HELIX_REQUIRE_FAULTS=1` makes a skip fail).
#[test]
fn a_full_disk_during_a_save_is_named_and_keeps_the_previous_checkpoint() {
    let tmp = setup("lora");
    let dir = tmp.path();
    run(dir, "straight");
    let straight = dir.join("straight");
    let one: u64 = std::fs::read_dir(straight.join("checkpoints/step-000005"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len().div_ceil(4096) * 4096)
        .sum();
    let mount = dir.join("small-disk");
    std::fs::create_dir(&mount).unwrap();
    let size = format!("size={}", 2 * one + one / 2);
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &size, "tmpfs"])
        .arg(&mount)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        assert!(
            std::env::var("HELIX_REQUIRE_FAULTS").is_err(),
            "cannot mount a tmpfs"
        );
        println!("skipped: mounting a tmpfs needs root");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mount.clone());
    let full = dir.join("full");
    std::fs::create_dir(&full).unwrap();
    std::os::unix::fs::symlink(&mount, full.join("checkpoints")).unwrap();
    let o = command(dir, "full", &[]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    let line = err
        .lines()
        .find(|l| l.contains("No space left on device"))
        .unwrap_or_else(|| panic!("names the cause: {err}"));
    assert!(line.contains("step-000015.tmp/"), "names the file: {line}");
    println!(
        "disk full ({} KiB tmpfs, {} KiB per checkpoint): {line}",
        (2 * one + one / 2) / 1024,
        one / 1024
    );
    for step in [5, 10] {
        helix_ckpt::verify(&full.join(format!("checkpoints/step-{step:06}"))).unwrap();
    }
    assert!(!checkpoint_done(&full, 15));
    // Room again: the rerun clears the partial save, resumes at step 10, ends as straight.
    let ok = Command::new("mount")
        .args(["-o", "remount,size=64m"])
        .arg(&mount)
        .status()
        .unwrap()
        .success();
    assert!(ok, "remount");
    let err = run(dir, "full");
    assert!(err.contains("step-000010 (step 10)"), "{err}");
    assert_same_run("lora", "after a full disk", &straight, &full);
}

/// `output.tensorboard = true`: after a run killed past its step-10 checkpoint is resumed from
/// it, the one event file left holds every step of metrics.jsonl once, in order, with its
/// values (as f32) under each tag, and the killed run's steps up to 10 with their original
/// wall times, behind a `SessionLog START` that tells a TensorBoard already watching to drop
/// what the killed run logged. With HELIX_TENSORBOARD_OUT set, the run is copied there for
/// scripts/check-tensorboard.sh to read with TensorBoard itself.
#[test]
fn tensorboard_events_follow_metrics_jsonl_across_a_resume() {
    use helix_train::tensorboard::{
        helix_event_files, read_events, Event, SESSION_END_TAG, SESSION_START_TAG,
    };
    let tmp = setup("lora");
    let dir = tmp.path();
    let mut cfg = std::fs::read_to_string(dir.join("run.toml")).unwrap();
    cfg.push_str("\n[output]\ntensorboard = true\n");
    std::fs::write(dir.join("run.toml"), cfg).unwrap();
    let mut child = start_slow(dir, "killed", 100, &[]);
    let out = dir.join("killed");
    let events_dir = out.join("tensorboard");
    let logged = |step: u64| {
        let files = helix_event_files(&events_dir).unwrap_or_default();
        files.first().is_some_and(|f| {
            read_events(f).is_ok_and(|e| e.iter().any(|e| e.step == step && !e.scalars.is_empty()))
        })
    };
    wait_for("step 10's checkpoint and step 12's events", || {
        checkpoint_done(&out, 10) && logged(12)
    });
    signal(&child, "-KILL");
    child.wait().unwrap();
    let killed_files = helix_event_files(&events_dir).unwrap();
    assert_eq!(killed_files.len(), 1);
    let killed_bytes = std::fs::read(&killed_files[0]).unwrap();
    let killed_events = read_events(&killed_files[0]).unwrap();
    let err = run(dir, "killed");
    assert!(err.contains("step-000010 (step 10)"), "{err}");

    let files = helix_event_files(&events_dir).unwrap();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0] != killed_files[0]);
    let events = read_events(&files[0]).unwrap();
    assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
    assert_eq!((events[1].step, events[1].session_status), (0, Some(1)));
    let start_time = events[1].wall_time;
    let rows = common::metrics_rows(&out);
    assert_eq!(rows.len(), 21, "steps 0..=20");
    // And the config in the Text tab and as the HParams dashboard's session start, once per
    // run (at the step it starts from), and the session's end at the last step.
    let others: Vec<(&str, &str, u64)> = events
        .iter()
        .filter(|e| e.scalars.is_empty())
        .skip(2)
        .flat_map(|e: &Event| {
            let step = e.step;
            e.plugin_values
                .iter()
                .map(move |(t, p)| (t.as_str(), p.as_str(), step))
        })
        .collect();
    assert_eq!(
        others,
        [
            ("config", "text", 10),
            (SESSION_START_TAG, "hparams", 10),
            (SESSION_END_TAG, "hparams", 20)
        ]
    );
    assert_eq!(events.len(), 2 + rows.len() + 3);
    let mut events = events;
    events.retain(|e| e.plugin_values.is_empty());
    let fields = [
        ("train/loss", "loss"),
        ("train/lr", "lr"),
        ("train/grad_norm", "grad_norm"),
        ("train/tokens", "tokens"),
        ("train/tokens_per_s", "tokens_per_s"),
        ("train/step_time_s", "step_time_s"),
        ("train/ckpt_stall_s", "ckpt_stall_s"),
        ("val/loss", "val_loss"),
    ];
    for (e, row) in events[2..].iter().zip(&rows) {
        let step = e.step;
        assert_eq!(Some(step), row["step"].as_u64());
        assert_eq!(Some(e.wall_time), row["wall_time"].as_f64(), "{row}");
        // Steps up to the checkpoint are the killed run's, replayed with their times.
        assert_eq!(e.wall_time < start_time, step <= 10, "step {step}");
        if step <= 10 {
            let before = killed_events
                .iter()
                .find(|k| k.step == step && !k.scalars.is_empty());
            assert_eq!(Some(e), before, "step {step} as the killed run logged it");
        }
        assert_eq!(e.scalars.len(), row.as_object().unwrap().len() - 2, "{row}");
        for (tag, field) in fields {
            let value = e.scalars.iter().find(|(t, _)| t == tag).map(|(_, v)| *v);
            assert_eq!(value, row[field].as_f64().map(|v| v as f32), "{tag}: {row}");
        }
    }
    if let Ok(keep) = std::env::var("HELIX_TENSORBOARD_OUT") {
        // tensorboard/: the directory as the resume left it; watched/: with the killed run's
        // file beside it, as a TensorBoard watching throughout had read both.
        let keep = Path::new(&keep);
        for sub in ["tensorboard", "watched"] {
            std::fs::create_dir_all(keep.join(sub)).unwrap();
            std::fs::copy(
                &files[0],
                keep.join(sub).join(files[0].file_name().unwrap()),
            )
            .unwrap();
        }
        let killed_name = killed_files[0].file_name().unwrap();
        std::fs::write(keep.join("watched").join(killed_name), killed_bytes).unwrap();
        std::fs::copy(out.join("metrics.jsonl"), keep.join("metrics.jsonl")).unwrap();
    }
}
