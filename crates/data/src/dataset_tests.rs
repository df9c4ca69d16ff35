use std::path::Path;

use super::*;
use crate::config::MixSource;
use crate::tokenize::tests::word_tokenizer;

/// A tokenizer directory the way a model ships it: tokenizer.json + tokenizer_config.json.
fn tokenizer_dir(dir: &Path) -> Result<DataTokenizer> {
    std::fs::create_dir_all(dir)?;
    word_tokenizer(&[])
        .save(dir.join("tokenizer.json"), false)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"bos_token": "<s>", "eos_token": "</s>"}"#,
    )?;
    DataTokenizer::open(dir)
}

const ROWS: &str = r#"[
 {"instruction": "one two", "input": "", "output": "three"},
 {"instruction": "four", "input": "five six", "output": "seven eight"},
 {"instruction": "one", "input": "", "output": "two three four five six seven eight"},
 {"instruction": "two", "input": "", "output": "three"},
 {"instruction": "five", "input": "six", "output": "seven"},
 {"instruction": "eight", "input": "", "output": "one"}
]"#;

fn setup(tmp: &Path) -> Result<(DataConfig, DataTokenizer)> {
    let data = tmp.join("rows.json");
    std::fs::write(&data, ROWS)?;
    let mut cfg = DataConfig::new(data, crate::Format::Alpaca);
    cfg.template = "Q {instruction} {input} A ".into();
    cfg.max_seq_length = 64;
    cfg.cache_dir = Some(tmp.join("cache"));
    Ok((cfg, tokenizer_dir(&tmp.join("tok"))?))
}

fn fingerprint(p: &PreparedData) -> Vec<Vec<Sample>> {
    vec![p.train.clone(), p.validation.clone(), p.test.clone()]
}

#[test]
fn second_run_loads_the_same_samples_from_the_cache() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (cfg, tok) = setup(tmp.path())?;
    let first = prepare(&cfg, &tok)?;
    assert!(!first.report.sources["train"].cache_hit);
    let second = prepare(&cfg, &tok)?;
    assert!(second.report.sources["train"].cache_hit);
    assert_eq!(fingerprint(&first), fingerprint(&second));
    assert_eq!(
        serde_json::to_value(&first.report.sources["train"].stats)?,
        serde_json::to_value(&second.report.sources["train"].stats)?
    );
    // And both equal a run without any cache.
    let mut plain = cfg.clone();
    plain.cache = false;
    let uncached = prepare(&plain, &tok)?;
    assert!(uncached.report.sources["train"].cache.is_none());
    assert_eq!(fingerprint(&first), fingerprint(&uncached));
    Ok(())
}

#[test]
fn any_input_change_misses_the_cache() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (cfg, tok) = setup(tmp.path())?;
    prepare(&cfg, &tok)?;
    let mut changes: Vec<DataConfig> = Vec::new();
    let mut c = cfg.clone();
    c.max_seq_length = 8;
    changes.push(c);
    let mut c = cfg.clone();
    c.template = "Q: {instruction} {input} A: ".into();
    changes.push(c);
    let mut c = cfg.clone();
    c.loss = LossMode::WholeSequence;
    changes.push(c);
    for c in changes {
        let p = prepare(&c, &tok)?;
        assert!(!p.report.sources["train"].cache_hit, "{c:?}");
    }
    // The data file's bytes, not its name or time, are the key.
    std::fs::write(
        cfg.train.as_ref().unwrap(),
        ROWS.replace("seven eight\"}", "seven\"}"),
    )?;
    assert!(!prepare(&cfg, &tok)?.report.sources["train"].cache_hit);
    // So is the tokenizer's.
    std::fs::write(
        tok.dir.join("tokenizer_config.json"),
        r#"{"bos_token": "<s>", "eos_token": "</s>", "model_max_length": 64}"#,
    )?;
    assert!(!prepare(&cfg, &tok)?.report.sources["train"].cache_hit);
    Ok(())
}

#[test]
fn a_corrupt_cache_file_is_rebuilt_not_trusted() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (cfg, tok) = setup(tmp.path())?;
    let first = prepare(&cfg, &tok)?;
    let path = first.report.sources["train"].cache.clone().unwrap();
    let bytes = std::fs::read(&path)?;
    std::fs::write(&path, &bytes[..bytes.len() - 3])?;
    let err = crate::cache::read_cache(&path, &"x".repeat(64)).unwrap_err();
    assert!(err.to_string().ends_with("cache key differs"), "{err}");
    let again = prepare(&cfg, &tok)?;
    assert!(!again.report.sources["train"].cache_hit);
    assert_eq!(fingerprint(&first), fingerprint(&again));
    assert_eq!(std::fs::read(&path)?, bytes);
    // No temporary files left behind.
    let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())?
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    Ok(())
}

#[test]
fn fraction_splits_partition_the_samples_by_record() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (mut cfg, tok) = setup(tmp.path())?;
    cfg.validation_fraction = 0.2;
    cfg.test_fraction = 0.2;
    let p = prepare(&cfg, &tok)?;
    assert_eq!((p.train.len(), p.validation.len(), p.test.len()), (4, 1, 1));
    let mut records: Vec<usize> = fingerprint(&p).iter().flatten().map(|s| s.record).collect();
    records.sort_unstable();
    assert_eq!(records, [0, 1, 2, 3, 4, 5]);
    Ok(())
}

#[test]
fn separate_files_and_conflicting_settings() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (mut cfg, tok) = setup(tmp.path())?;
    let val = tmp.path().join("val.jsonl");
    std::fs::write(&val, "{\"instruction\": \"one\", \"output\": \"two\"}\n")?;
    cfg.validation = Some(val.clone());
    let p = prepare(&cfg, &tok)?;
    assert_eq!((p.train.len(), p.validation.len()), (6, 1));
    assert!(p.report.sources.contains_key("validation"));

    cfg.validation_fraction = 0.1;
    let err = prepare(&cfg, &tok).err().unwrap().to_string();
    assert_eq!(
        err,
        "data.validation and data.validation_fraction are both set; use one"
    );

    // Errors inside a file name the config key and the file.
    cfg.validation_fraction = 0.0;
    std::fs::write(&val, "{\"instruction\": \"one\"}\n")?;
    let err = format!("{:#}", prepare(&cfg, &tok).err().unwrap());
    assert!(
        err.starts_with(&format!("data.validation = {}: ", val.display())),
        "{err}"
    );
    assert!(err.contains(":1: field \"output\""), "{err}");
    Ok(())
}

#[test]
fn data_config_unknown_keys_and_bad_values_name_the_key() {
    let parse = |s: &str| toml::from_str::<DataConfig>(s).unwrap_err().to_string();
    let err = parse("train = \"a.json\"\nformat = \"alpaca\"\nmax_seq_len = 512\n");
    assert!(err.contains("line 3"), "{err}");
    assert!(err.contains("unknown field `max_seq_len`"), "{err}");
    let err = parse("train = \"a.json\"\nformat = \"alpaca\"\nloss = \"answer\"\n");
    assert!(err.contains("line 3") && err.contains("answer"), "{err}");
    let err = parse("train = \"a.json\"\nformat = \"csv\"\n");
    assert!(err.contains("line 2") && err.contains("csv"), "{err}");
    let no_train: DataConfig = toml::from_str("format = \"alpaca\"\n").unwrap();
    assert_eq!(
        no_train.validate().unwrap_err().to_string(),
        "data.train is missing (or give [[data.mix]] files)"
    );
    let no_format: DataConfig = toml::from_str("train = \"a.json\"\n").unwrap();
    assert_eq!(
        no_format.validate().unwrap_err().to_string(),
        "data.format is missing: say how data.train is read (\"alpaca\", \"dolly\", \
         \"messages\", …)"
    );

    let mut cfg = DataConfig::new("a.json".into(), crate::Format::Alpaca);
    cfg.max_seq_length = 1;
    assert_eq!(
        cfg.validate().unwrap_err().to_string(),
        "data.max_seq_length must be at least 2, got 1"
    );
    cfg.max_seq_length = 16;
    cfg.test_fraction = 1.5;
    assert_eq!(
        cfg.validate().unwrap_err().to_string(),
        "data.test_fraction must be in [0, 1), got 1.5"
    );
}

#[test]
fn conversations_train_on_assistant_turns_and_round_trip_through_the_cache() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("tok");
    std::fs::create_dir_all(&dir)?;
    word_tokenizer(&["<|im_start|>", "<|im_end|>"])
        .save(dir.join("tokenizer.json"), false)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::json!({"eos_token": "<|im_end|>", "chat_template": template}).to_string(),
    )?;
    let tok = DataTokenizer::open(&dir)?;
    let data = tmp.path().join("chats.jsonl");
    std::fs::write(
        &data,
        r#"{"messages": [{"role": "user", "content": "one two"}, {"role": "assistant", "content": "three"}, {"role": "user", "content": "four"}, {"role": "assistant", "content": "five six"}]}
{"messages": [{"role": "system", "content": "six"}, {"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}]}
"#,
    )?;
    let mut cfg = DataConfig::new(data, crate::Format::Messages);
    cfg.template = "chat".into();
    cfg.cache_dir = Some(tmp.path().join("cache"));
    cfg.shuffle = false;
    let first = prepare(&cfg, &tok)?;
    assert_eq!(first.train.len(), 2);
    let id = |w: &str| tok.codec.token_id(w).unwrap() as i64;
    let trained =
        |s: &Sample| -> Vec<i64> { s.labels.iter().copied().filter(|&l| l != I).collect() };
    let by_record = |p: &PreparedData, r: usize| p.train.iter().find(|s| s.record == r).cloned();
    let end = id("<|im_end|>");
    let s0 = by_record(&first, 0).unwrap();
    assert_eq!(trained(&s0), [id("three"), end, id("five"), id("six"), end]);
    assert_eq!(trained(&by_record(&first, 1).unwrap()), [id("two"), end]);
    let second = prepare(&cfg, &tok)?;
    assert!(second.report.sources["train"].cache_hit);
    assert_eq!(fingerprint(&first), fingerprint(&second));

    // A cache file whose untrained range runs past its sample is rebuilt, not trusted.
    let path = first.report.sources["train"].cache.clone().unwrap();
    let bytes = std::fs::read(&path)?;
    let header_len = u64::from_le_bytes(bytes[12..20].try_into()?) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[20..20 + header_len])?;
    let key = header["key"].as_str().unwrap().to_string();
    // The first sample's only untrained range: its end is the u32 after its start.
    let ranges_at = 20 + header_len + 16 * 2;
    // Its end past the sample, its start inside the prompt, a record that does not exist.
    let record_at = 20 + header_len + 8;
    for (at, value) in [(ranges_at + 4, 999u32), (ranges_at, 0), (record_at, 7)] {
        let mut bad = bytes.clone();
        bad[at..at + 4].copy_from_slice(&value.to_le_bytes());
        std::fs::write(&path, &bad)?;
        let err = crate::cache::read_cache(&path, &key).unwrap_err();
        assert!(
            err.to_string().ends_with("cache is truncated or corrupt"),
            "{err}"
        );
    }
    let again = prepare(&cfg, &tok)?;
    assert!(!again.report.sources["train"].cache_hit);
    assert_eq!(fingerprint(&first), fingerprint(&again));

    // data.chat_template renders in place of the tokenizer's template, and its text keys the
    // cache: a changed file is a miss, never the old tokens.
    let file = tmp.path().join("plus.jinja");
    let shouting = template.replace("{{ m['content'] }}", "plus {{ m['content'] }}");
    std::fs::write(&file, &shouting)?;
    let mut cfg = cfg.clone();
    cfg.chat_template = Some(file.clone());
    let shouted = prepare(&cfg, &DataTokenizer::for_config(&cfg, &dir)?)?;
    assert!(!shouted.report.sources["train"].cache_hit);
    let s0 = by_record(&shouted, 0).unwrap();
    let plus = id("plus");
    assert_eq!(
        trained(&s0),
        [plus, id("three"), end, plus, id("five"), id("six"), end]
    );
    std::fs::write(&file, template)?;
    let plain = prepare(&cfg, &DataTokenizer::for_config(&cfg, &dir)?)?;
    assert_eq!(fingerprint(&plain), fingerprint(&first));
    std::fs::write(&file, &shouting)?;
    let cached = prepare(&cfg, &DataTokenizer::for_config(&cfg, &dir)?)?;
    assert!(cached.report.sources["train"].cache_hit);
    assert_eq!(fingerprint(&cached), fingerprint(&shouted));
    // A file that is not there, or does not parse, is named.
    cfg.chat_template = Some(tmp.path().join("missing.jinja"));
    let err = DataTokenizer::for_config(&cfg, &dir).err().unwrap();
    let err = format!("{err:#}");
    assert!(
        err.starts_with("data.chat_template: cannot read the chat template ")
            && err.contains("missing.jinja"),
        "{err}"
    );
    std::fs::write(&file, "{% for m in messages %}")?;
    cfg.chat_template = Some(file);
    let err = format!("{:#}", DataTokenizer::for_config(&cfg, &dir).err().unwrap());
    assert!(
        err.starts_with("data.chat_template: chat template ") && err.contains("does not parse"),
        "{err}"
    );
    Ok(())
}

const I: i64 = helix_ops::IGNORE_INDEX;

/// Dolly rows, read through their own format and template beside setup's Alpaca rows.
const DOLLY_ROWS: &str = r#"{"instruction": "six", "context": "", "response": "one two", "category": "qa"}
{"instruction": "seven", "context": "eight", "response": "three", "category": "qa"}
{"instruction": "eight", "context": "", "response": "four five", "category": "qa"}
{"instruction": "two", "context": "one", "response": "six", "category": "qa"}
"#;

/// setup's Alpaca file and a Dolly file as `[[data.mix]]`, with `weights` (or none).
fn mix_config(tmp: &Path, weights: [Option<f64>; 2]) -> Result<(DataConfig, DataTokenizer)> {
    let (mut cfg, tok) = setup(tmp)?;
    let dolly = tmp.join("dolly.jsonl");
    std::fs::write(&dolly, DOLLY_ROWS)?;
    cfg.mix = vec![
        MixSource {
            file: cfg.train.take().unwrap(),
            weight: weights[0],
            format: None,
            template: None,
            fields: None,
        },
        MixSource {
            file: dolly,
            weight: weights[1],
            format: Some(crate::Format::Dolly),
            template: Some("D {instruction} {context} R ".into()),
            fields: None,
        },
    ];
    Ok((cfg, tok))
}

/// Each mixed file prepared alone, as a plain `data.train` with its own settings.
fn alone(cfg: &DataConfig, tok: &DataTokenizer) -> Result<Vec<Vec<Sample>>> {
    let mut out = Vec::new();
    for m in &cfg.mix {
        let mut one = cfg.clone();
        one.mix.clear();
        one.samples_per_epoch = None;
        one.train = Some(m.file.clone());
        one.format = m.format.or(cfg.format);
        one.template = m.template.clone().unwrap_or(cfg.template.clone());
        one.cache = false;
        out.push(prepare(&one, tok)?.train);
    }
    Ok(out)
}

#[test]
fn an_unweighted_mix_is_every_file_whole_in_its_own_format() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (cfg, tok) = mix_config(tmp.path(), [None, None])?;
    let p = prepare(&cfg, &tok)?;
    let each = alone(&cfg, &tok)?;
    assert_eq!((each[0].len(), each[1].len()), (6, 4));
    assert_eq!(p.train, [each[0].clone(), each[1].clone()].concat());
    // The Dolly rows went through their own template: "D six R one two".
    let words = |s: &Sample| s.input_ids.len();
    assert_eq!(words(&p.train[6]), 1 + 5 + 1);
    let keys: Vec<&String> = p.report.sources.keys().collect();
    assert_eq!(keys, ["mix[0]", "mix[1]"]);
    let shares: Vec<(usize, usize, Option<f64>)> = p
        .report
        .mix
        .iter()
        .map(|m| (m.samples, m.drawn, m.share))
        .collect();
    assert_eq!(shares, [(6, 6, None), (4, 4, None)]);
    Ok(())
}

#[test]
fn weights_give_each_file_its_share_repeating_the_small_one() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (mut cfg, tok) = mix_config(tmp.path(), [Some(1.0), Some(3.0)])?;
    cfg.samples_per_epoch = Some(12);
    let p = prepare(&cfg, &tok)?;
    let each = alone(&cfg, &tok)?;
    assert_eq!(p.train.len(), 12);
    // 3 distinct Alpaca samples, then 9 Dolly samples: every one twice, one of them thrice.
    let (alpaca, dolly) = p.train.split_at(3);
    assert!(alpaca.iter().all(|s| each[0].contains(s)));
    assert!(alpaca.windows(2).all(|w| w[0] != w[1]));
    let times: Vec<usize> = each[1]
        .iter()
        .map(|s| dolly.iter().filter(|d| *d == s).count())
        .collect();
    assert_eq!(times.iter().sum::<usize>(), 9);
    assert!(times.iter().all(|&t| t == 2 || t == 3), "{times:?}");
    let m = &p.report.mix[1];
    assert_eq!((m.samples, m.drawn, m.share), (4, 9, Some(0.75)));
    assert_eq!(m.passes, 2.25);
    assert_eq!(
        m.to_string(),
        format!(
            "data.mix[1] = {}: 4 training samples, 9 drawn (share 0.750, 2.25 passes per epoch)",
            cfg.mix[1].file.display()
        )
    );
    // The same mixture again (from the cache), another one under another seed.
    let again = prepare(&cfg, &tok)?;
    assert!(again.report.sources["mix[1]"].cache_hit);
    assert_eq!(again.train, p.train);
    cfg.seed += 1;
    assert_ne!(prepare(&cfg, &tok)?.train[..3], p.train[..3]);
    // A mixture beyond memory is refused before a sample is copied.
    cfg.samples_per_epoch = Some(1 << 40);
    let err = prepare(&cfg, &tok).err().unwrap().to_string();
    assert!(
        err.starts_with("data.samples_per_epoch: the mixture's 1099511627776 samples"),
        "{err}"
    );
    // By default the mixture is as large as the files together: 10, split 2.5 / 7.5 → 3 / 7.
    cfg.samples_per_epoch = None;
    let p = prepare(&cfg, &tok)?;
    let drawn: Vec<usize> = p.report.mix.iter().map(|m| m.drawn).collect();
    assert_eq!(drawn, [3, 7]);
    Ok(())
}

#[test]
fn mixed_files_split_off_validation_each_and_name_their_keys() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (mut cfg, tok) = mix_config(tmp.path(), [Some(1.0), Some(1.0)])?;
    cfg.validation_fraction = 0.25;
    let p = prepare(&cfg, &tok)?;
    // 6 × 0.25 rounds to 2 (1.5 → 2), 4 × 0.25 to 1; the rest trains.
    assert_eq!(p.validation.len(), 3);
    let available: Vec<usize> = p.report.mix.iter().map(|m| m.samples).collect();
    assert_eq!(available, [4, 3]);
    assert_eq!(p.train.len(), 7);

    // Every sample too long: nothing to draw from, and each file's reason (after the
    // statistics, which data-stats prints first).
    cfg.max_seq_length = 3;
    let empty = prepare(&cfg, &tok)?;
    assert!(empty.train.is_empty());
    let err = empty.check_trainable(&cfg, 1).unwrap_err().to_string();
    assert!(
        err.starts_with(
            "weighted [[data.mix]] file(s) with no training sample to draw their share from: \
             data.mix[0].file = "
        ),
        "{err}"
    );
    assert!(
        err.contains("of its 4 records, 4 were dropped as longer than data.max_seq_length = 3"),
        "{err}"
    );
    // Unweighted, the same files give the plain count of samples.
    let mut unweighted = cfg.clone();
    for m in &mut unweighted.mix {
        m.weight = None;
    }
    let err = prepare(&unweighted, &tok)?
        .check_trainable(&unweighted, 1)
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("0 training sample(s) for 1 data-parallel rank(s): data.mix[0].file"),
        "{err}"
    );
    // One file gives nothing, the other its share: still refused, naming the one.
    cfg.mix[1].template = Some("D {instruction} {context} R one two three four five six".into());
    cfg.max_seq_length = 9;
    let p = prepare(&cfg, &tok)?;
    assert_eq!(p.report.mix[1].samples, 0, "{:?}", p.report.mix);
    let err = p.check_trainable(&cfg, 1).unwrap_err().to_string();
    assert!(
        err.contains("data.mix[1].file = ") && !err.contains("data.mix[0]"),
        "{err}"
    );
    cfg.mix[1].template = Some("D {instruction} {context} R ".into());
    // Errors inside a file name its key, and the format key that read it.
    cfg.max_seq_length = 64;
    std::fs::write(
        &cfg.mix[1].file,
        "{\"instruction\": \"one\", \"output\": \"two\", \"response\": \"x\"}\n",
    )?;
    let err = format!("{:#}", prepare(&cfg, &tok).err().unwrap());
    assert!(
        err.contains("is data.mix[1].format right?") && err.contains("(data.mix[1].fields)"),
        "{err}"
    );
    std::fs::write(&cfg.mix[1].file, "{\"instruction\": \"one\"}\n")?;
    let err = format!("{:#}", prepare(&cfg, &tok).err().unwrap());
    assert!(
        err.starts_with(&format!(
            "data.mix[1].file = {}: ",
            cfg.mix[1].file.display()
        )),
        "{err}"
    );
    Ok(())
}

#[test]
fn mix_settings_that_cannot_work_name_the_key() -> Result<()> {
    let validate = |text: &str| -> String {
        let cfg: DataConfig = toml::from_str(text).unwrap();
        cfg.validate().unwrap_err().to_string()
    };
    let two = "format = \"alpaca\"\n[[mix]]\nfile = \"a.json\"\n[[mix]]\nfile = \"b.json\"\n";
    assert_eq!(
        validate(&format!("train = \"t.json\"\n{two}")),
        "data.train and [[data.mix]] are both set: give one training file, or a mix"
    );
    assert_eq!(
        validate(&format!("{two}weight = 2\n")),
        "data.mix[0].weight is missing: give every [[data.mix]] file a weight (its share of \
         the mixture), or none (to take every file whole)"
    );
    assert_eq!(
        validate("format = \"alpaca\"\n[[mix]]\nfile = \"a.json\"\nweight = -1\n"),
        "data.mix[0].weight must be a positive number, got -1"
    );
    assert_eq!(
        validate(&format!("samples_per_epoch = 100\n{two}")),
        "data.samples_per_epoch sizes a weighted mixture: give the [[data.mix]] files weights \
         (without them every file is taken whole)"
    );
    assert_eq!(
        validate("[[mix]]\nfile = \"a.json\"\nformat = \"alpaca\"\n[[mix]]\nfile = \"b.json\"\n"),
        "data.mix[1].format is missing: set it, or data.format for the files that do not set \
         their own"
    );
    // What a file sets itself is named as its own key; what it takes from [data], as [data]'s.
    assert_eq!(
        validate(&format!("{two}format = \"messages\"\n")),
        "data.template = \"alpaca\" cannot render the conversations of data.mix[1].format = \
         \"messages\": set data.template = \"chat\" (the model's chat template)"
    );
    assert_eq!(
        validate(&format!(
            "{two}format = \"messages\"\ntemplate = \"chat\"\n[mix.fields]\nresponse = \"r\"\n"
        )),
        "data.mix[1].fields.response does not apply to data.mix[1].format = \"messages\", \
         whose rows are conversations (name their array of turns with \
         data.mix[1].fields.messages)"
    );
    assert_eq!(
        validate(&format!("chat_template = \"t.jinja\"\n{two}")),
        "data.chat_template is set but no file is read with template = \"chat\" \
         (data.template, data.mix[i].template)"
    );
    // A held-out file with [[data.mix]] is read with [data]'s format.
    assert_eq!(
        validate("validation = \"v.json\"\n[[mix]]\nfile = \"a.json\"\nformat = \"alpaca\"\n"),
        "data.format is missing: say how data.validation is read (\"alpaca\", \"dolly\", \
         \"messages\", …)"
    );
    let err =
        toml::from_str::<DataConfig>("format = \"alpaca\"\n[[mix]]\nfile = \"a\"\nwieght = 1\n")
            .unwrap_err()
            .to_string();
    assert!(
        err.contains("line 4") && err.contains("unknown field `wieght`"),
        "{err}"
    );
    Ok(())
}
