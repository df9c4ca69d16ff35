use super::*;

fn load(text: &str, sets: &[&str]) -> Result<ConfigFile> {
    let tmp = tempfile::tempdir()?;
    let p = tmp.path().join("run.toml");
    std::fs::write(&p, text)?;
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    ConfigFile::load_with(&p, &sets)
}

const BASE: &str = r#"
[model]
path = "m"

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

[trainer]
max_steps = 20
"#;

#[test]
fn unknown_keys_name_the_line_and_the_closest_valid_key() {
    let err = load(&BASE.replace("max_steps", "max_step"), &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("line 21"), "{err}");
    assert!(err.contains("unknown field `max_step`"), "{err}");
    assert!(err.contains("did you mean `max_steps`?"), "{err}");
    let err = load(&BASE.replace("[batch]", "[bach]"), &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("did you mean `batch`?"), "{err}");
    let err = load(&BASE.replace("lora_alpha", "alpha"), &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown field `alpha`"), "{err}");
}

#[test]
fn fused_layers_are_on_unless_set_off() {
    assert!(load(BASE, &[]).unwrap().fused_layers());
    let off = load(BASE, &["model.fused_layers=false"]).unwrap();
    assert!(!off.fused_layers());
    let err = load(BASE, &["model.fused_layers=3"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("fused_layers"), "{err}");
}

#[test]
fn attention_is_auto_unless_named() {
    assert_eq!(
        load(BASE, &[]).unwrap().attention().unwrap(),
        AttentionKernel::Auto
    );
    let flash = load(BASE, &["model.attention=flash"]).unwrap();
    assert_eq!(flash.attention().unwrap(), AttentionKernel::Flash);
    let err = load(BASE, &["model.attention=sdpa"])
        .unwrap()
        .attention()
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.attention = \"sdpa\""), "{err}");
}

#[test]
fn quantize_base_is_none_unless_nf4_and_refuses_full_sft() {
    let q = |sets: &[&str]| load(BASE, sets).unwrap().quantize_base();
    assert_eq!(q(&[]).unwrap(), Quantization::None);
    assert_eq!(q(&["model.quantize_base=nf4"]).unwrap(), Quantization::Nf4);
    let err = q(&["model.quantize_base=nf5"]).unwrap_err().to_string();
    assert!(
        err.contains("model.quantize_base = \"nf5\"") && err.contains("nf4"),
        "{err}"
    );
    let sft_text = BASE
        .replace("name = \"lora\"", "name = \"sft\"")
        .replace("[lora]\nr = 8\nlora_alpha = 16\n", "");
    let sft = load(&sft_text, &["model.quantize_base=nf4"]).unwrap();
    let err = sft.validate_training(1).unwrap_err().to_string();
    assert!(
        err.contains("model.quantize_base") && err.contains("sft"),
        "{err}"
    );
    let merged = load(BASE, &["model.quantize_base=nf4", "output.merged=true"]).unwrap();
    let err = merged.validate_training(1).unwrap_err().to_string();
    assert!(
        err.contains("output.merged") && err.contains("export"),
        "{err}"
    );
    // It changes the numbers: a run is not resumed across it.
    assert_ne!(
        load(BASE, &[]).unwrap().numerics(),
        load(BASE, &["model.quantize_base=nf4"]).unwrap().numerics()
    );
}

#[test]
fn wrong_types_and_bad_values_name_the_key() {
    let err = load(
        &BASE.replace("max_steps = 20", "max_steps = \"twenty\""),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("line 21") && err.contains("max_steps"),
        "{err}"
    );
    let c = load(BASE, &["batch.global_batch_size=9"]).unwrap();
    let err = c.accumulation(1).unwrap_err().to_string();
    assert!(
        err.contains("batch.global_batch_size (9)") && err.contains("batch.micro_batch_size (2)"),
        "{err}"
    );
    assert_eq!(load(BASE, &[]).unwrap().accumulation(2).unwrap(), 2);
    let err = load(BASE, &["optimizer.lr=-1"])
        .unwrap()
        .validate_training(1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("optimizer.lr"), "{err}");
    let err = load(BASE, &["method.name=lorra"])
        .unwrap()
        .method()
        .unwrap_err()
        .to_string();
    assert!(err.contains("did you mean `lora`?"), "{err}");
    let err = load(BASE, &["schedule.name=cosin"])
        .unwrap()
        .validate_training(1)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("schedule.name") && err.contains("`cosine`"),
        "{err}"
    );
}

/// Found by review and replayed through fuzz/fuzz_targets/config.rs: micro × ranks wrapped
/// (2^61 × 8 = 0) and `global % 0` panicked.
#[test]
fn a_micro_batch_too_large_for_the_ranks_is_an_error() {
    let text = "[batch]\nmicro_batch_size = 2305843009213693952\nglobal_batch_size = 5\n";
    let c = ConfigFile::from_str_with(Path::new("big.toml"), text, &[]).unwrap();
    let err = c.accumulation(8).unwrap_err().to_string();
    assert!(
        err.contains("batch.micro_batch_size (2305843009213693952) × data-parallel size (8)"),
        "{err}"
    );
    assert!(c.accumulation(1).is_err(), "5 is not a multiple of 2^61");
}

#[test]
fn set_overrides_any_key_with_a_toml_value() -> Result<()> {
    let c = load(
        BASE,
        &[
            "optimizer.lr=3e-4",
            "optimizer.betas=[0.9, 0.95]",
            "trainer.output_dir=runs/x",
            "data.fields.instruction=question",
            "lora.target_modules=[\"q_proj\", \"k_proj\"]",
        ],
    )?;
    assert_eq!(c.optimizer.lr, 3e-4);
    assert_eq!(c.optimizer.betas, [0.9, 0.95]);
    assert_eq!(c.trainer.output_dir, PathBuf::from("runs/x"));
    assert_eq!(
        c.data.as_ref().unwrap().fields.instruction.as_deref(),
        Some("question")
    );
    assert_eq!(
        c.lora.as_ref().unwrap().target_modules,
        ["q_proj", "k_proj"]
    );
    // An entry of a list, by its index, as errors name it: a [[data.mix]] file's weight.
    let mixed = BASE.replace("train = \"rows.jsonl\"\n", "")
        + "[[data.mix]]\nfile = \"a.json\"\nweight = 1\n[[data.mix]]\nfile = \"b.json\"\nweight = 1\n";
    let c = load(
        &mixed,
        &[
            "data.mix[1].weight=3",
            "optimizer.betas=[0.9, 0.999]",
            "optimizer.betas[1]=0.95",
        ],
    )?;
    let mix = &c.data.as_ref().unwrap().mix;
    assert_eq!((mix[0].weight, mix[1].weight), (Some(1.0), Some(3.0)));
    assert_eq!(c.optimizer.betas, [0.9, 0.95]);
    let err = format!("{:#}", load(&mixed, &["data.mix[2].weight=3"]).unwrap_err());
    assert!(
        err.contains(
            "--set data.mix[2].weight=3: data.mix[2] is past the end of data.mix, which has 2 \
             entries"
        ),
        "{err}"
    );
    let err = format!("{:#}", load(&mixed, &["data.mix[x].weight=3"]).unwrap_err());
    assert!(
        err.contains("mix[x]: the index in [] must be a number"),
        "{err}"
    );
    let err = format!(
        "{:#}",
        load(&mixed, &["data.format[0]=alpaca"]).unwrap_err()
    );
    assert!(err.contains("data.format is not a list"), "{err}");
    // A list the file leaves at its default has no entries to change.
    let err = format!(
        "{:#}",
        load(&mixed, &["optimizer.betas[1]=0.95"]).unwrap_err()
    );
    assert!(
        err.contains("optimizer.betas is not set, so optimizer.betas[1] cannot be"),
        "{err}"
    );
    // A bare value that parses as a number is the text typed, in a list entry too.
    let c = load(&mixed, &["data.mix[0].file=123", "data.mix[1].template=7"])?;
    let mix = &c.data.as_ref().unwrap().mix;
    assert_eq!(mix[0].file, PathBuf::from("123"));
    assert_eq!(mix[1].template.as_deref(), Some("7"));
    // An entry of a list the file does not have.
    let err = format!("{:#}", load(BASE, &["data.mix[0].weight=1"]).unwrap_err());
    assert!(
        err.contains("data.mix is not set, so data.mix[0] cannot be"),
        "{err}"
    );
    let err = load(BASE, &["trainer.max_steps=abc"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("--set trainer.max_steps=abc"), "{err}");
    let err = load(BASE, &["lr=1"]).unwrap_err().to_string();
    assert!(err.contains("section.key"), "{err}");
    // Bare values that parse as numbers, floats or booleans stay text where text is wanted.
    let c = load(BASE, &["trainer.output_dir=nan", "trainer.resume=true"])?;
    assert_eq!(c.trainer.output_dir, PathBuf::from("nan"));
    assert_eq!(c.trainer.resume, "true");
    let err = format!("{:#}", load(BASE, &["trainer.max_steps.x=1"]).unwrap_err());
    assert!(err.contains("max_steps is not a section"), "{err}");
    for (set, want) in [
        (
            "trainer.limit_val_batches=0",
            "trainer.limit_val_batches must be at least 1",
        ),
        ("trainer.output_dir=", "trainer.output_dir is empty"),
    ] {
        let err = load(BASE, &[set])?
            .validate_training(1)
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{set}: {err}");
    }
    // A value of the wrong type is reported as typed, not as the string it was retried as.
    let err = load(BASE, &["trainer.max_steps=-5"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("-5") && !err.contains("string"), "{err}");
    // The last --set of a key stands, also when both were retried as text.
    let c = load(BASE, &["trainer.output_dir=111", "trainer.output_dir=222"])?;
    assert_eq!(c.trainer.output_dir, PathBuf::from("222"));
    // --set supplies a key the file lacks, and replaces one of the wrong type.
    let no_format = BASE.replace("format = \"alpaca\"\n", "");
    let err = load(&no_format, &[])?.data.unwrap().validate().unwrap_err();
    assert!(
        err.to_string().starts_with("data.format is missing"),
        "{err}"
    );
    let c = load(&no_format, &["data.format=alpaca"])?;
    assert_eq!(
        format!("{:?}", c.data.as_ref().unwrap().format),
        "Some(Alpaca)"
    );
    let text_steps = BASE.replace("max_steps = 20", "max_steps = \"20\"");
    let err = load(&text_steps, &[]).unwrap_err().to_string();
    assert!(
        err.contains("run.toml") && err.contains("max_steps"),
        "{err}"
    );
    assert_eq!(
        load(&text_steps, &["trainer.max_steps=30"])?
            .trainer
            .max_steps,
        Some(30)
    );
    Ok(())
}

#[test]
fn the_numerics_ignore_operational_keys() -> Result<()> {
    let a = load(BASE, &[])?;
    let b = load(
        BASE,
        &[
            "trainer.output_dir=elsewhere",
            "trainer.save_interval=5",
            "parallel.timeout_s=9",
        ],
    )?;
    let c = load(BASE, &["optimizer.lr=1e-3"])?;
    assert_eq!(a.numerics(), b.numerics());
    assert_ne!(a.numerics(), c.numerics());
    Ok(())
}

#[test]
fn a_key_written_at_its_default_equals_the_key_left_out() -> Result<()> {
    let a = load(BASE, &[])?;
    let b = load(
        BASE,
        &[
            "optimizer.lr=1e-4",
            "data.max_seq_length=2048",
            "lora.target_modules=[\"q_proj\", \"v_proj\"]",
            "trainer.seed=1234",
        ],
    )?;
    assert_eq!(a.numerics(), b.numerics());
    assert_ne!(a.numerics(), load(BASE, &["trainer.seed=1"])?.numerics());
    // A checkpoint written before helix filled in defaults recorded the keys as written.
    let raw: toml::Table = toml::from_str(BASE)?;
    let recorded = serde_json::to_value(&raw)?;
    assert_ne!(recorded, b.numerics());
    assert_eq!(ConfigFile::recorded_numerics(&recorded)?, b.numerics());
    Ok(())
}

#[test]
fn method_sections_must_agree() {
    let err = load(&BASE.replace("name = \"lora\"", "name = \"sft\""), &[])
        .unwrap()
        .method()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("[lora] is set but method.name = \"sft\""),
        "{err}"
    );
    let text = BASE
        .replace("name = \"lora\"", "name = \"ptuning\"")
        .replace(
            "[lora]\nr = 8\nlora_alpha = 16",
            "[ptuning]\nnum_virtual_tokens = 10",
        );
    let err = load(&text, &["data.packing=true"])
        .unwrap()
        .method()
        .unwrap_err()
        .to_string();
    assert!(err.contains("data.packing"), "{err}");
}
