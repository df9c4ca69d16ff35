//! `helix-train data-stats` end to end: from a config file, and its errors for bad configs.

mod common;
use std::path::Path;

use common::{helix_train, write_tokenizer};

fn setup() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    write_tokenizer(&tmp.path().join("model"));
    let rows: Vec<String> = (0..20)
        .map(|i| {
            let words = ["one", "two", "three", "four", "five"];
            format!(
                r#"{{"instruction": "{} {}", "input": "", "output": "{}"}}"#,
                words[i % 5],
                words[(i / 5) % 5],
                words[(i + 2) % 5]
            )
        })
        .collect();
    std::fs::write(tmp.path().join("rows.jsonl"), rows.join("\n")).unwrap();
    tmp
}

const CONFIG: &str = r#"
[model]
path = "model"

[data]
train = "rows.jsonl"
format = "alpaca"
template = "Q {instruction} {input} A "
max_seq_length = 16
packing = true
validation_fraction = 0.25
"#;

#[test]
fn data_stats_reads_a_config_and_reports_splits_packing_and_cache() {
    let tmp = setup();
    std::fs::write(tmp.path().join("run.toml"), CONFIG).unwrap();
    let (ok, out, err) = helix_train(
        &[
            "data-stats",
            "--config",
            "run.toml",
            "--world-size",
            "3",
            "--micro-batch-size",
            "2",
        ],
        tmp.path(),
    );
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["splits"]["train"], 15);
    assert_eq!(v["splits"]["validation"], 5);
    let train = &v["sources"]["train"];
    assert_eq!(train["cache_hit"], false);
    // <s> Q w w A w </s> = 7 tokens each; two per row of 16.
    assert_eq!(train["stats"]["total_tokens"], 140);
    assert_eq!(train["stats"]["packing"]["rows"], 10);
    assert!(
        err.contains("train: 20 records templated and tokenized"),
        "{err}"
    );
    // 15 training samples, two per packed row: 8 rows. 3 ranks × 2 rows → 2 micro-steps; the
    // last has 2 rows left, one on each of two ranks, so 3 × 1 - 2 = 1 filler row.
    assert_eq!(v["epoch"]["items"], 8);
    assert_eq!(v["epoch"]["micro_steps"], 2);
    assert_eq!(v["epoch"]["filler_rows"], 1);

    let (ok, out2, err) = helix_train(&["data-stats", "--config", "run.toml"], tmp.path());
    assert!(ok, "{err}");
    let v2: serde_json::Value = serde_json::from_str(&out2).unwrap();
    assert_eq!(v2["sources"]["train"]["cache_hit"], true);
    assert_eq!(
        v2["sources"]["train"]["stats"],
        v["sources"]["train"]["stats"]
    );
    assert!(err.contains("loaded from the token cache"), "{err}");

    // Beside --config, a data flag would be ignored: it is refused, pointing at --set.
    let (ok, _, err) = helix_train(
        &[
            "data-stats",
            "--config",
            "run.toml",
            "--max-seq-length",
            "8",
        ],
        tmp.path(),
    );
    assert!(
        !ok && err.contains("not --max-seq-length") && err.contains("--set data."),
        "{err}"
    );
    let (ok, out3, err) = helix_train(
        &[
            "data-stats",
            "--config",
            "run.toml",
            "--set",
            "data.max_seq_length=8",
        ],
        tmp.path(),
    );
    assert!(ok, "{err}");
    let v3: serde_json::Value = serde_json::from_str(&out3).unwrap();
    assert_ne!(
        v3["sources"]["train"]["stats"],
        v["sources"]["train"]["stats"]
    );
}

#[test]
fn data_stats_reports_each_mixed_file_and_its_share() {
    let tmp = setup();
    let mixed = CONFIG.replace("train = \"rows.jsonl\"\n", "samples_per_epoch = 30\n")
        + "\n[[data.mix]]\nfile = \"rows.jsonl\"\nweight = 2\n\n[[data.mix]]\nfile = \"more.jsonl\"\n\
           weight = 1\nformat = \"nemo\"\n";
    std::fs::write(tmp.path().join("mix.toml"), mixed).unwrap();
    std::fs::write(
        tmp.path().join("more.jsonl"),
        "{\"input\": \"one\", \"output\": \"two\"}\n".repeat(4),
    )
    .unwrap();
    let (ok, out, err) = helix_train(&["data-stats", "--config", "mix.toml"], tmp.path());
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    // 15 + 3 training samples (a quarter of each file is validation), mixed 20 + 10.
    assert_eq!(v["splits"]["train"], 30);
    assert_eq!(v["splits"]["validation"], 6);
    assert_eq!(v["mix"][1]["samples"], 3);
    assert_eq!(v["mix"][1]["drawn"], 10);
    assert_eq!(v["sources"]["mix[1]"]["stats"]["records"], 4);
    assert!(
        err.contains("data.mix[0] = rows.jsonl: 15 training samples, 20 drawn (share 0.667"),
        "{err}"
    );
}

#[test]
fn bad_configs_name_the_file_line_and_key() {
    let tmp = setup();
    let cases = [
        (
            CONFIG.replace("max_seq_length = 16", "max_seq_len = 16"),
            vec!["bad.toml", "line 9", "unknown field `max_seq_len`"],
        ),
        (
            CONFIG.replace("format = \"alpaca\"", "format = \"csv\""),
            vec!["bad.toml", "line 7", "unknown variant `csv`"],
        ),
        (
            CONFIG.replace("[data]", "[dta]"),
            vec![
                "bad.toml",
                "line 5",
                "unknown field `dta`",
                "did you mean `data`?",
            ],
        ),
        (
            CONFIG.replace("train = \"rows.jsonl\"", "train = \"missing.jsonl\""),
            vec!["data.train = missing.jsonl", "missing.jsonl"],
        ),
        (
            CONFIG.replace("validation_fraction = 0.25", "validation_fraction = 1.25"),
            vec!["data.validation_fraction must be in [0, 1), got 1.25"],
        ),
    ];
    for (text, wants) in cases {
        std::fs::write(tmp.path().join("bad.toml"), &text).unwrap();
        let (ok, _, err) = helix_train(&["data-stats", "--config", "bad.toml"], tmp.path());
        assert!(!ok);
        for want in wants {
            assert!(err.contains(want), "wanted {want:?} in: {err}");
        }
    }
    let (ok, _, err) = helix_train(&["data-stats", "--config", "nope.toml"], tmp.path());
    assert!(
        !ok && err.contains("cannot read the config nope.toml"),
        "{err}"
    );
}

#[test]
fn bad_flags_are_named_as_flags() {
    let tmp = setup();
    let flags = |extra: &[&str]| {
        let mut args = vec!["data-stats", "--format", "alpaca", "--tokenizer", "model"];
        args.extend_from_slice(extra);
        helix_train(&args, tmp.path())
    };
    for (extra, want) in [
        (
            &["--data", "rows.jsonl", "--max-seq-length", "1"][..],
            "--max-seq-length must be at least 2, got 1",
        ),
        (&["--data", "missing.jsonl"][..], "--data missing.jsonl"),
        (
            &["--data", "rows.jsonl", "--template", "nonesuch"][..],
            "--template",
        ),
    ] {
        let (ok, _, err) = flags(extra);
        assert!(!ok && err.contains(want), "{extra:?}: {err}");
        assert!(
            !err.contains("data."),
            "{extra:?} names a config key: {err}"
        );
    }
    // Every sample longer than 16 tokens: the statistics, then why nothing can train.
    let (ok, out, err) = flags(&["--data", "rows.jsonl", "--max-seq-length", "16"]);
    assert!(!ok && out.contains("\"dropped\": 20"), "{out}");
    assert!(
        err.contains("--data rows.jsonl: 0 training sample(s)")
            && err.contains("20 were dropped as longer than --max-seq-length = 16")
            && err.contains("--length-policy = \"truncate_prompt\""),
        "{err}"
    );
    let (ok, out, err) = flags(&["--data", "rows.jsonl", "--max-seq-length", "256"]);
    assert!(ok && out.contains("\"records\": 20"), "{err}");
}

#[test]
fn data_stats_reads_conversations_with_the_chat_template() {
    let tmp = setup();
    // The word-level tokenizer with ChatML's two special tokens and its template.
    let dir = tmp.path().join("model");
    let path = dir.join("tokenizer.json");
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for (i, t) in ["<|im_start|>", "<|im_end|>"].iter().enumerate() {
        let id = 100 + i;
        tok["model"]["vocab"][t] = id.into();
        tok["added_tokens"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"id": id,
            "content": t, "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": true}));
    }
    std::fs::write(&path, tok.to_string()).unwrap();
    let template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::json!({"eos_token": "<|im_end|>", "chat_template": template}).to_string(),
    )
    .unwrap();
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../datasets/conversations_sample.jsonl");
    let data = data.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["data-stats", "--data", data, "--tokenizer", "model"];
        args.extend_from_slice(extra);
        helix_train(&args, tmp.path())
    };
    let (ok, out, err) = run(&["--format", "messages", "--template", "chat"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let stats = &v["sources"]["train"]["stats"];
    assert_eq!(
        (&stats["records"], &stats["samples"]),
        (&24.into(), &24.into())
    );
    // Trained: each assistant turn's words, tokenized alone, and its <|im_end|> (the word
    // tokenizer makes no token of the newline after it); nothing else.
    let codec = helix_model::TextCodec::open(&dir).unwrap();
    let (mut want, mut want_last) = (0, 0);
    for line in std::fs::read_to_string(data).unwrap().lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        let mut last = 0;
        for m in row["messages"].as_array().unwrap() {
            if m["role"] == "assistant" {
                let content = m["content"].as_str().unwrap();
                last = codec.tokenizer.encode(content, false).unwrap().len() + 1;
                want += last;
            }
        }
        want_last += last;
    }
    let trained = |stats: &serde_json::Value| stats["tokenize"]["target_tokens"].as_u64();
    let untrained = stats["tokenize"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(trained(stats), Some(want as u64), "{stats}");
    assert_eq!(
        Some(trained(stats).unwrap() + untrained),
        stats["total_tokens"].as_u64()
    );
    // The last assistant turn alone.
    let (ok, out, err) = run(&[
        "--format",
        "messages",
        "--template",
        "chat",
        "--loss",
        "last_assistant_turn",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let last = &v["sources"]["train"]["stats"];
    assert_eq!(trained(last), Some(want_last as u64), "{last}");

    // --show prints a sample with its trained runs marked (on stderr; stdout stays JSON).
    std::fs::write(
        tmp.path().join("chat.jsonl"),
        r#"{"messages": [{"role": "user", "content": "one two"}, {"role": "assistant", "content": "three"}, {"role": "user", "content": "four"}, {"role": "assistant", "content": "five"}]}"#,
    )
    .unwrap();
    let args = ["data-stats", "--data", "chat.jsonl", "--format", "messages"];
    let (ok, out, err) = helix_train(
        &[
            &args[..],
            &["--template", "chat", "--tokenizer", "model", "--show", "1"],
        ]
        .concat(),
        tmp.path(),
    );
    assert!(ok && out.starts_with('{'), "{err}");
    assert!(
        err.contains(
            // The test tokenizer knows neither role: [UNK].
            "sample of record 0 (17 tokens, 4 trained):\n<|im_start|> [UNK] one two <|im_end|> \
             <|im_start|> [UNK][[ three <|im_end|>]] <|im_start|> [UNK] four <|im_end|> \
             <|im_start|> [UNK][[ five <|im_end|>]]\n"
        ),
        "{err}"
    );

    for (extra, want) in [
        (
            &["--format", "messages"][..],
            "--template = \"alpaca\" cannot render the conversations of --format = \"messages\"",
        ),
        (
            &["--format", "sharegpt", "--template", "chat"][..],
            "conversations_sample.jsonl:1: field \"conversations\": missing",
        ),
        (
            &[
                "--format",
                "messages",
                "--template",
                "chat",
                "--response-field",
                "x",
            ][..],
            "--response-field does not apply to --format = \"messages\"",
        ),
        (
            &["--format", "alpaca", "--assistant-spans", "generation"][..],
            "--assistant-spans = \"generation\" reads the chat template's {% generation %} blocks, but --template = \"alpaca\"",
        ),
        (
            &[
                "--format",
                "messages",
                "--template",
                "chat",
                "--assistant-spans",
                "generation",
            ][..],
            "--assistant-spans: the chat template has no {% generation %} blocks",
        ),
        (
            &["--format", "alpaca", "--chat-template", "t.jinja"][..],
            "--chat-template is set but --template = \"alpaca\" does not use it",
        ),
        (
            &[
                "--format",
                "messages",
                "--template",
                "chat",
                "--chat-template",
                "missing.jinja",
            ][..],
            "--chat-template: cannot read the chat template missing.jinja",
        ),
    ] {
        let (ok, _, err) = run(extra);
        assert!(!ok && err.contains(want), "{extra:?}: {err}");
        assert!(
            !err.contains("data."),
            "{extra:?} names a config key: {err}"
        );
    }

    // Tool calls, rendered by the shipped tool template in place of the tokenizer's.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let tools = root.join("datasets/tool_calls_sample.jsonl");
    let template = root.join("configs/chat_templates/chatml_tools.jinja");
    let tool_stats = |template: &Path, extra: &[&str]| {
        let mut args = vec![
            "data-stats",
            "--data",
            tools.to_str().unwrap(),
            "--format",
            "messages",
            "--template",
            "chat",
            "--chat-template",
            template.to_str().unwrap(),
            "--tokenizer",
            "model",
        ];
        args.extend_from_slice(extra);
        helix_train(&args, tmp.path())
    };
    let (ok, out, err) = tool_stats(&template, &["--show", "1"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let stats = &v["sources"]["train"]["stats"];
    assert_eq!(
        (&stats["records"], &stats["samples"]),
        (&10.into(), &10.into())
    );
    // Two trained runs, the tool call's turn and the answer, with the tool's result between
    // them untrained (the test tokenizer knows few of the words: [UNK]). transformers checks
    // the exact labels (tests/chat_data.rs).
    let shown = err
        .split("sample of record 0 ")
        .nth(1)
        .and_then(|s| s.split('\n').nth(1))
        .unwrap_or_default();
    assert_eq!(shown.matches("[[").count(), 2, "{err}");
    let between = shown
        .split("]]")
        .nth(1)
        .unwrap()
        .split("[[")
        .next()
        .unwrap();
    assert_eq!(between.matches("<|im_start|>").count(), 2, "{shown}");
    // By {% generation %} blocks: the same template with its end of turn moved out of the
    // block trains one token fewer per assistant turn (20 in the sample).
    let without_end = tmp.path().join("without_end.jinja");
    let text = std::fs::read_to_string(&template).unwrap();
    let moved = text.replace(
        "{{- '<|im_end|>' }}\n{%- endgeneration %}",
        "{%- endgeneration %}\n{{- '<|im_end|>' }}",
    );
    assert_ne!(
        moved, text,
        "the template's block ends after its end of turn"
    );
    std::fs::write(&without_end, moved).unwrap();
    let by_blocks = |template: &Path| {
        let (ok, out, err) = tool_stats(template, &["--assistant-spans", "generation"]);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["sources"]["train"]["stats"]["tokenize"]["target_tokens"]
            .as_u64()
            .unwrap()
    };
    let turns = stats["tokenize"]["target_tokens"].as_u64().unwrap();
    // The word tokenizer makes no token of the newline after an end of turn.
    assert_eq!(by_blocks(&template), turns);
    assert_eq!(by_blocks(&without_end), turns - 20);
}
