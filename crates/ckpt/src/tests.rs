use super::*;
use candle_core::DType;

fn ckpt(step: u64, value: f32) -> Checkpoint {
    let dev = Device::Cpu;
    let t = |n: usize| (Tensor::ones(n, DType::F32, &dev).unwrap() * value as f64).unwrap();
    Checkpoint {
        step,
        tensors: vec![
            (
                "trainable".into(),
                vec![("a".into(), t(100)), ("b".into(), t(100))],
            ),
            ("optimizer".into(), vec![("exp_avg.a".into(), t(100))]),
        ],
        json: vec![(
            "trainer_state.json".into(),
            serde_json::json!({"step": step}),
        )],
    }
}

fn store(root: &Path) -> CheckpointStore {
    // 500-byte shards: the 800-byte `trainable` group takes two.
    CheckpointStore::new(root, Some(2), 500)
}

#[test]
fn a_saved_checkpoint_verifies_and_loads_back() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let s = store(tmp.path());
    let report = s.save(&ckpt(10, 3.0))?;
    assert_eq!(report.dir, tmp.path().join("step-000010"));
    verify(&report.dir)?;
    let names: Vec<String> = std::fs::read_dir(&report.dir)?
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for f in [
        "trainable-00001-of-00002.safetensors",
        "trainable.safetensors.index.json",
        "optimizer.safetensors",
        "trainer_state.json",
        CHECKSUMS,
    ] {
        assert!(names.contains(&f.to_string()), "{f} in {names:?}");
    }
    let t = load_tensors(&report.dir, "trainable", &Device::Cpu)?;
    assert_eq!(t["b"].to_vec1::<f32>()?, vec![3.0; 100]);
    assert_eq!(read_json(&report.dir, "trainer_state.json")?["step"], 10);
    assert_eq!(
        std::fs::read_to_string(tmp.path().join(LATEST))?,
        "step-000010\n"
    );
    // The checksum file is what `sha256sum -c` reads.
    let sums = std::fs::read_to_string(report.dir.join(CHECKSUMS))?;
    assert!(sums
        .lines()
        .all(|l| l.len() > 66 && l.as_bytes()[64] == b' '));
    Ok(())
}

#[test]
fn only_the_newest_save_total_limit_are_kept() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let s = store(tmp.path());
    for step in [5, 10, 15] {
        s.save(&ckpt(step, step as f32))?;
    }
    let steps: Vec<u64> = s.list_complete()?.iter().map(|(n, _)| *n).collect();
    assert_eq!(steps, vec![15, 10]);
    Ok(())
}

#[test]
fn a_flipped_byte_is_named_and_resume_falls_back_to_the_previous_checkpoint() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let s = store(tmp.path());
    s.save(&ckpt(5, 1.0))?;
    let newest = s.save(&ckpt(10, 2.0))?.dir;
    let shard = newest.join("trainable-00002-of-00002.safetensors");
    let mut bytes = std::fs::read(&shard)?;
    let at = bytes.len() - 7;
    bytes[at] ^= 0x01;
    std::fs::write(&shard, bytes)?;

    let err = verify(&newest).unwrap_err().to_string();
    assert!(
        err.contains("trainable-00002-of-00002.safetensors") && err.contains("sha256 mismatch"),
        "{err}"
    );
    let found = s.find_resumable()?;
    assert_eq!(found.chosen.as_ref().map(|c| c.0), Some(5));
    assert_eq!(found.damaged.len(), 1);
    assert!(found.damaged[0].1.contains("trainable-00002-of-00002"));

    // A missing file is damage too.
    std::fs::remove_file(s.dir_for(5).join("optimizer.safetensors"))?;
    let err = verify(&s.dir_for(5)).unwrap_err().to_string();
    assert!(err.contains("optimizer.safetensors"), "{err}");
    assert!(s.find_resumable()?.chosen.is_none());
    Ok(())
}

#[test]
fn a_crash_leftover_is_never_read_and_is_replaced() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let s = store(tmp.path());
    s.save(&ckpt(5, 1.0))?;
    // What a kill during the save of step 10 leaves: a partial .tmp directory.
    let partial = tmp.path().join("step-000010.tmp");
    std::fs::create_dir(&partial)?;
    std::fs::write(partial.join("trainable.safetensors"), b"partial")?;
    let found = s.find_resumable()?;
    assert_eq!(found.chosen.map(|c| c.0), Some(5));
    assert!(found.damaged.is_empty());
    s.save(&ckpt(10, 2.0))?;
    assert!(!partial.exists());
    verify(&s.dir_for(10))?;
    Ok(())
}

#[test]
fn the_background_writer_saves_in_order_and_reports_each_save() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut w = BackgroundWriter::spawn(CheckpointStore::new(tmp.path(), None, 1 << 20));
    let (prev, _) = w.submit(ckpt(1, 1.0))?;
    assert!(prev.is_none());
    let (prev, _) = w.submit(ckpt(2, 2.0))?;
    assert_eq!(prev.unwrap().step, 1);
    let last = w.wait()?.unwrap();
    assert_eq!(last.step, 2);
    assert!(last.bytes > 0);
    assert!(w.wait()?.is_none());
    verify(&tmp.path().join("step-000001"))?;
    verify(&tmp.path().join("step-000002"))?;
    // An error on the thread reaches the trainer: a root that is a file.
    let file = tmp.path().join("not-a-dir");
    std::fs::write(&file, b"")?;
    let mut w = BackgroundWriter::spawn(CheckpointStore::new(&file, None, 1 << 20));
    w.submit(ckpt(1, 1.0))?;
    let err = w.wait().unwrap_err().to_string();
    assert!(err.contains("not-a-dir"), "{err}");
    Ok(())
}
