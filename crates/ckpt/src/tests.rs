use super::*;
use candle_core::{DType, Device};

/// Every tensor of the stem `stem` in a checkpoint directory.
fn load_tensors(dir: &Path, stem: &str, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for f in helix_model::weights::stem_files(dir, stem)? {
        out.extend(candle_core::safetensors::load(&f, device)?);
    }
    Ok(out)
}

fn ckpt(step: u64, value: f32) -> Checkpoint {
    let dev = Device::Cpu;
    let t = |n: usize| (Tensor::ones(n, DType::F32, &dev).unwrap() * value as f64).unwrap();
    let whole = |name: &str, n: usize| Piece {
        name: name.into(),
        tensor: t(n),
        split: None,
    };
    let file = |group: &str, pieces| TensorFile {
        group: group.into(),
        stem: group.into(),
        pieces,
    };
    Checkpoint {
        step,
        files: vec![
            file("trainable", vec![whole("a", 100), whole("b", 100)]),
            file("optimizer", vec![whole("exp_avg.a", 100)]),
        ],
        json: vec![(
            "trainer_state.json".into(),
            serde_json::json!({"step": step}),
        )],
    }
}

impl CheckpointStore {
    fn save_alone(&self, ckpt: &Checkpoint) -> Result<SaveReport> {
        self.save(ckpt, None)
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
    let report = s.save_alone(&ckpt(10, 3.0))?;
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
        s.save_alone(&ckpt(step, step as f32))?;
    }
    let steps: Vec<u64> = s.list_complete()?.iter().map(|(n, _)| *n).collect();
    assert_eq!(steps, vec![15, 10]);
    Ok(())
}

#[test]
fn a_flipped_byte_is_named_and_resume_falls_back_to_the_previous_checkpoint() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let s = store(tmp.path());
    s.save_alone(&ckpt(5, 1.0))?;
    let newest = s.save_alone(&ckpt(10, 2.0))?.dir;
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
fn an_unreadable_file_stops_the_search_and_a_damaged_checkpoint_can_be_set_aside() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let s = store(tmp.path());
    s.save_alone(&ckpt(5, 1.0))?;
    let newest = s.save_alone(&ckpt(10, 2.0))?.dir;
    // A read that fails (here: a directory where a file should be; on NFS, EIO or a stale
    // handle) may not mean damage: the search stops, naming it, instead of passing over it.
    let shard = newest.join("trainable-00002-of-00002.safetensors");
    std::fs::remove_file(&shard)?;
    std::fs::create_dir(&shard)?;
    let err = format!("{:#}", s.find_resumable().unwrap_err());
    assert!(
        err.contains("cannot read checkpoint") && err.contains("step-000010"),
        "{err}"
    );
    // A damaged one set aside leaves the list; a second at the same step gets its own name.
    let aside = s.set_aside(&newest)?;
    assert!(aside.to_string_lossy().ends_with("step-000010.damaged"));
    let steps: Vec<u64> = s.list_complete()?.iter().map(|(n, _)| *n).collect();
    assert_eq!(steps, vec![5]);
    std::fs::create_dir(&newest)?;
    let again = s.set_aside(&newest)?;
    assert!(again.to_string_lossy().ends_with("step-000010.damaged-2"));
    Ok(())
}

#[test]
fn a_crash_leftover_is_never_read_and_is_replaced() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let s = store(tmp.path());
    s.save_alone(&ckpt(5, 1.0))?;
    // What a kill during the save of step 10 leaves: a partial .tmp directory.
    let partial = tmp.path().join("step-000010.tmp");
    std::fs::create_dir(&partial)?;
    std::fs::write(partial.join("trainable.safetensors"), b"partial")?;
    let found = s.find_resumable()?;
    assert_eq!(found.chosen.map(|c| c.0), Some(5));
    assert!(found.damaged.is_empty());
    s.save_alone(&ckpt(10, 2.0))?;
    assert!(!partial.exists());
    verify(&s.dir_for(10))?;
    Ok(())
}

#[test]
fn the_background_writer_saves_in_order_and_reports_each_save() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut w = BackgroundWriter::spawn(CheckpointStore::new(tmp.path(), None, 1 << 20), None);
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
    let mut w = BackgroundWriter::spawn(CheckpointStore::new(&file, None, 1 << 20), None);
    w.submit(ckpt(1, 1.0))?;
    let err = w.wait().unwrap_err().to_string();
    assert!(err.contains("not-a-dir"), "{err}");
    Ok(())
}

/// Ranks of one job in threads of this process, meeting through shared memory instead of the
/// rendezvous store (the store's path is exercised by the launcher tests).
type Reports = std::sync::Arc<(
    std::sync::Mutex<HashMap<(u64, usize), String>>,
    std::sync::Condvar,
)>;

struct ThreadPeers {
    rank: usize,
    world: usize,
    reports: Reports,
}

impl SaveRendezvous for ThreadPeers {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn report(&self, step: u64, part: &str) -> Result<()> {
        let (m, cv) = &*self.reports;
        m.lock()
            .unwrap()
            .insert((step, self.rank), part.to_string());
        cv.notify_all();
        Ok(())
    }
    fn collect(&self, step: u64) -> Result<Vec<String>> {
        let (m, cv) = &*self.reports;
        let mut got = m.lock().unwrap();
        let mut out = Vec::new();
        for r in 1..self.world {
            loop {
                if let Some(p) = got.get(&(step, r)) {
                    out.push(p.clone());
                    break;
                }
                got = cv.wait(got).unwrap();
            }
        }
        Ok(out)
    }
}

/// What rank (`tp`, `dp`) of a 2 × 2 grid holds of the whole tensors `col` (split along 0),
/// `row` (split along 1) and `norm` (replicated): tensor-parallel pieces written by the first
/// data-parallel rank, replicated tensors by the first tensor-parallel rank.
fn grid_part(whole: &HashMap<&str, Tensor>, tp: usize, dp: usize) -> Vec<TensorFile> {
    if dp != 0 {
        return Vec::new();
    }
    let mut pieces = Vec::new();
    for (name, dim) in [("col", Some(0)), ("row", Some(1)), ("norm", None)] {
        let t = &whole[name];
        match dim {
            Some(d) => pieces.push(Piece {
                name: name.into(),
                tensor: t
                    .narrow(d, tp * t.dim(d).unwrap() / 2, t.dim(d).unwrap() / 2)
                    .unwrap()
                    .contiguous()
                    .unwrap(),
                split: Some(SplitPiece {
                    dim: d,
                    index: tp,
                    count: 2,
                }),
            }),
            None if tp == 0 => pieces.push(Piece {
                name: name.into(),
                tensor: t.clone(),
                split: None,
            }),
            None => {}
        }
    }
    vec![TensorFile {
        group: "trainable".into(),
        stem: format!("trainable-tp{tp:02}"),
        pieces,
    }]
}

#[test]
fn ranks_write_their_own_pieces_and_any_layout_reads_them_back() -> Result<()> {
    use helix_model::linear::Split;
    let tmp = tempfile::tempdir()?;
    let dev = Device::Cpu;
    let whole: HashMap<&str, Tensor> = [
        ("col", Tensor::arange(0f32, 48., &dev)?.reshape((8, 6))?),
        ("row", Tensor::arange(100f32, 148., &dev)?.reshape((6, 8))?),
        ("norm", Tensor::arange(0f32, 6., &dev)?),
    ]
    .into_iter()
    .collect();
    let reports: Reports = Default::default();
    let store = CheckpointStore::new(tmp.path(), None, 1 << 20);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|rank| {
                let (store, whole, reports) = (&store, &whole, reports.clone());
                s.spawn(move || {
                    let peers = ThreadPeers {
                        rank,
                        world: 4,
                        reports,
                    };
                    let ckpt = Checkpoint {
                        step: 7,
                        files: grid_part(whole, rank % 2, rank / 2),
                        json: match rank {
                            0 => {
                                vec![("trainer_state.json".into(), serde_json::json!({"step": 7}))]
                            }
                            _ => vec![],
                        },
                    };
                    store.save(&ckpt, Some(&peers))
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap().unwrap();
        }
    });
    let dir = store.dir_for(7);
    verify(&dir)?;
    // Each piece lives once, in its rank's file: nothing was gathered.
    let col0 = load_tensors(&dir, "trainable-tp00", &dev)?;
    assert_eq!(col0["col"].dims(), &[4, 6]);
    assert_eq!(col0["row"].dims(), &[6, 4]);
    assert!(col0.contains_key("norm"));
    let col1 = load_tensors(&dir, "trainable-tp01", &dev)?;
    assert!(!col1.contains_key("norm"));
    let reader = CheckpointReader::open(&dir)?;
    assert_eq!(reader.names("trainable"), vec!["col", "norm", "row"]);
    assert_eq!(reader.index.ranks, 4);
    for size in [1, 2, 3] {
        for rank in 0..size {
            for (name, split) in [
                ("col", Split::Dim(1)),
                ("col", Split::Dim(0)),
                ("row", Split::Dim(1)),
                ("norm", Split::Replicated),
            ] {
                if let Split::Dim(d) = split {
                    if whole[name].dim(d)? % size != 0 {
                        continue;
                    }
                }
                let want = helix_model::linear::shard_of(&whole[name], split, rank, size)?;
                let got = reader.load("trainable", name, split, rank, size, &dev)?;
                assert_eq!(got.dims(), want.dims(), "{name} {split:?} {rank}/{size}");
                let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert_eq!(diff, 0.0, "{name} {split:?} {rank}/{size}");
            }
        }
    }
    // A rank whose write failed fails the save on rank 0, which names it; nothing is sealed.
    let reports: Reports = Default::default();
    let failed = RankPart {
        error: Some("disk full".into()),
        ..Default::default()
    };
    ThreadPeers {
        rank: 1,
        world: 2,
        reports: reports.clone(),
    }
    .report(9, &serde_json::to_string(&failed)?)?;
    let ckpt = Checkpoint {
        step: 9,
        files: grid_part(&whole, 0, 0),
        json: vec![],
    };
    let err = store
        .save(
            &ckpt,
            Some(&ThreadPeers {
                rank: 0,
                world: 2,
                reports,
            }),
        )
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("rank 1 could not write its part of checkpoint 9: disk full"),
        "{err:#}"
    );
    assert!(!store.dir_for(9).exists());
    assert_eq!(
        store.remove_incomplete()?,
        vec![store.dir_for(9).with_extension("tmp")]
    );
    Ok(())
}

#[test]
fn a_piece_no_rank_wrote_is_refused() {
    let piece = |i: usize| {
        (
            "trainable".to_string(),
            "w".to_string(),
            format!("tp{i}"),
            vec![4, 2],
            "f32".to_string(),
            Some(SplitPiece {
                dim: 0,
                index: i,
                count: 2,
            }),
        )
    };
    let part = |p| RankPart {
        pieces: vec![p],
        ..Default::default()
    };
    assert!(CheckpointIndex::merge(&[part(piece(0)), part(piece(1))]).is_ok());
    let err = CheckpointIndex::merge(&[part(piece(0))])
        .unwrap_err()
        .to_string();
    assert!(err.contains("no rank wrote piece 1 of 2"), "{err}");
    let err = CheckpointIndex::merge(&[part(piece(0)), part(piece(0))])
        .unwrap_err()
        .to_string();
    assert!(err.contains("two ranks wrote the same piece"), "{err}");
}

#[test]
fn an_index_naming_a_file_outside_the_checkpoint_is_refused() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let s = store(tmp.path());
    let dir = s.save_alone(&ckpt(3, 1.0))?.dir;
    std::fs::write(tmp.path().join("outside.safetensors"), b"not read")?;
    let path = dir.join(INDEX);
    let mut index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    index["groups"]["trainable"]["a"]["stems"] = serde_json::json!(["../outside"]);
    std::fs::write(&path, index.to_string())?;
    let err = format!("{:#}", CheckpointReader::open(&dir).err().expect("refused"));
    assert!(
        err.contains("checkpoint_index.json") && err.contains("'../outside' is not a plain name"),
        "{err}"
    );
    // A tensor in no file is refused too (it indexed past the end).
    index["groups"]["trainable"]["a"]["stems"] = serde_json::json!([]);
    std::fs::write(&path, index.to_string())?;
    let err = format!("{:#}", CheckpointReader::open(&dir).err().expect("refused"));
    assert!(err.contains("tensor 'a' is in no file"), "{err}");
    Ok(())
}

#[test]
fn a_checkpoint_from_before_the_index_reads_as_whole_tensors() -> Result<()> {
    use helix_model::linear::Split;
    let tmp = tempfile::tempdir()?;
    let dir = store(tmp.path()).save_alone(&ckpt(4, 2.5))?.dir;
    // What helix wrote before per-rank files: the same groups, no index.
    std::fs::remove_file(dir.join(INDEX))?;
    let reader = CheckpointReader::open(&dir)?;
    assert_eq!(reader.names("trainable"), vec!["a", "b"]);
    assert_eq!(reader.names("optimizer"), vec!["exp_avg.a"]);
    let half = reader.load("trainable", "b", Split::Dim(0), 1, 2, &Device::Cpu)?;
    assert_eq!(half.to_vec1::<f32>()?, vec![2.5; 50]);
    Ok(())
}
