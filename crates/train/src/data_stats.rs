//! `helix-train data-stats`: what the data of a config, or of flags, becomes: samples, tokens,
//! truncation, categories, packing, splits and cache use, printed as JSON, with the epoch plan
//! of a data-parallel job.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use helix_data::{
    pack_first_fit_decreasing, prepare, AssistantSpans, Cursor, DataConfig, DataTokenizer,
    FieldOverrides, Format, LengthPolicy, LossMode, Sample, Sampler,
};
use helix_model::TextCodec;
use helix_ops::IGNORE_INDEX;
use helix_train::config::ConfigFile;

/// The flags of `data-stats` (without `--config`).
#[derive(clap::Args, Debug)]
pub struct DataStatsArgs {
    #[arg(long)]
    data: Option<PathBuf>,
    /// dolly, alpaca (JSON array or JSONL), nemo, messages or sharegpt (conversations)
    #[arg(long)]
    format: Option<Format>,
    /// A directory with tokenizer.json (and tokenizer_config.json for EOS / chat template).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// alpaca (the default), dolly, chat (the model's template), or a string with
    /// {instruction} and {input}/{context}
    #[arg(long)]
    template: Option<String>,
    /// A Jinja file to render with in place of the tokenizer's chat template (--template chat).
    #[arg(long)]
    chat_template: Option<PathBuf>,
    /// How the chat template's assistant text is found: turns (the default: what rendering
    /// each assistant turn adds) or generation (its {% generation %} blocks, TRL's way).
    #[arg(long)]
    assistant_spans: Option<AssistantSpans>,
    /// Tokens a sample may hold (default 2048).
    #[arg(long)]
    max_seq_length: Option<usize>,
    /// truncate_prompt, truncate_response (the default) or drop
    #[arg(long)]
    length_policy: Option<LengthPolicy>,
    /// Train on the whole sequence instead of the response only (--loss whole_sequence).
    #[arg(long, conflicts_with = "loss")]
    whole_sequence_loss: bool,
    /// answer_only (the default), whole_sequence, or last_assistant_turn (a conversation's
    /// last assistant turn only).
    #[arg(long)]
    loss: Option<LossMode>,
    /// Skip (and count) invalid rows instead of stopping at the first.
    #[arg(long)]
    skip_invalid: bool,
    /// Field-name overrides, e.g. --instruction-field question.
    #[arg(long)]
    instruction_field: Option<String>,
    #[arg(long)]
    context_field: Option<String>,
    #[arg(long)]
    response_field: Option<String>,
    #[arg(long)]
    category_field: Option<String>,
    /// A conversation's array of turns (messages / sharegpt), e.g. --messages-field dialog.
    #[arg(long)]
    messages_field: Option<String>,
    /// A conversation's list of tool schemas (default tools).
    #[arg(long)]
    tools_field: Option<String>,
    /// Tokenizer threads (0, the default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Tokenize even when a cached result exists (and do not write one).
    #[arg(long)]
    no_cache: bool,
    /// Data-parallel ranks, for the epoch plan (micro-steps per epoch).
    #[arg(long, default_value_t = 1)]
    world_size: usize,
    /// Rows per micro-batch on each rank, for the epoch plan (default: the config's
    /// batch.micro_batch_size, else 1).
    #[arg(long)]
    micro_batch_size: Option<usize>,
    /// Print the first N training samples to stderr as the model sees them, each run of
    /// trained tokens between [[ and ]], to check a template's loss mask by eye.
    #[arg(long, default_value_t = 0)]
    show: usize,
}

/// Runs `data-stats` on the `[data]` of `config` (with `sets` applied) or on the flags of
/// `args`.
pub fn run(args: DataStatsArgs, config: Option<&Path>, sets: &[String]) -> Result<()> {
    let DataStatsArgs {
        data,
        format,
        tokenizer,
        template,
        chat_template,
        assistant_spans,
        max_seq_length,
        length_policy,
        whole_sequence_loss,
        loss,
        skip_invalid,
        instruction_field,
        context_field,
        response_field,
        category_field,
        messages_field,
        tools_field,
        threads,
        no_cache,
        world_size,
        micro_batch_size,
        show,
    } = args;
    let (mut cfg, tokenizer_dir, micro_batch_size) = match config {
        Some(path) => {
            // The config's [data] decides these; a flag beside it would be ignored.
            let data_flags = [
                ("--data", data.is_some()),
                ("--format", format.is_some()),
                ("--tokenizer", tokenizer.is_some()),
                ("--template", template.is_some()),
                ("--chat-template", chat_template.is_some()),
                ("--assistant-spans", assistant_spans.is_some()),
                ("--max-seq-length", max_seq_length.is_some()),
                ("--length-policy", length_policy.is_some()),
                ("--whole-sequence-loss", whole_sequence_loss),
                ("--loss", loss.is_some()),
                ("--skip-invalid", skip_invalid),
                ("--instruction-field", instruction_field.is_some()),
                ("--context-field", context_field.is_some()),
                ("--response-field", response_field.is_some()),
                ("--category-field", category_field.is_some()),
                ("--messages-field", messages_field.is_some()),
                ("--tools-field", tools_field.is_some()),
                ("--threads", threads.is_some()),
            ];
            if let Some((flag, _)) = data_flags.iter().find(|(_, given)| *given) {
                bail!(
                    "data-stats --config takes the data settings from the config's [data]: \
                     change them with --set data.KEY=VALUE, not {flag}"
                );
            }
            let file = ConfigFile::load_with(path, sets)?;
            (
                file.data(path)?.clone(),
                file.tokenizer_dir(path)?,
                micro_batch_size.unwrap_or(file.batch.micro_batch_size),
            )
        }
        None => {
            let (Some(data), Some(format), Some(tokenizer)) = (data, format, tokenizer) else {
                bail!("data-stats needs --config FILE, or --data, --format and --tokenizer");
            };
            let mut cfg = DataConfig::new(data, format);
            // DataConfig::new holds the defaults.
            if let Some(t) = template {
                cfg.template = t;
            }
            cfg.chat_template = chat_template;
            if let Some(spans) = assistant_spans {
                cfg.assistant_spans = spans;
            }
            if let Some(n) = max_seq_length {
                cfg.max_seq_length = n;
            }
            if let Some(p) = length_policy {
                cfg.length_policy = p;
            }
            if whole_sequence_loss {
                cfg.loss = LossMode::WholeSequence;
            }
            if let Some(loss) = loss {
                cfg.loss = loss;
            }
            cfg.skip_invalid = skip_invalid;
            cfg.fields = FieldOverrides {
                instruction: instruction_field,
                context: context_field,
                response: response_field,
                category: category_field,
                messages: messages_field,
                tools: tools_field,
            };
            if let Some(n) = threads {
                cfg.threads = n;
            }
            (cfg, tokenizer, micro_batch_size.unwrap_or(1))
        }
    };
    if no_cache {
        cfg.cache = false;
    }
    // Errors about [data] keys, named as the flags that set them when flags did.
    let named = |e: anyhow::Error| match config {
        Some(_) => e,
        None => anyhow!("{}", in_flag_names(&format!("{e:#}"))),
    };
    let tok = DataTokenizer::for_config(&cfg, &tokenizer_dir).map_err(named)?;
    let prepared = prepare(&cfg, &tok).map_err(named)?;
    for s in prepared.train.iter().take(show) {
        eprintln!("{}", shown(s, &tok.codec)?);
    }
    for (role, src) in &prepared.report.sources {
        for row in &src.skipped_rows {
            eprintln!("skipped ({role}) {row}");
        }
    }
    // How an epoch of the train split runs: items are samples, or packed rows.
    let items = if cfg.packing {
        let lens: Vec<usize> = prepared.train.iter().map(|s| s.input_ids.len()).collect();
        pack_first_fit_decreasing(&lens, cfg.max_seq_length)?
            .rows
            .len()
    } else {
        prepared.train.len()
    };
    // Data that cannot train still has statistics worth seeing: printed, then the reason.
    if let Err(e) = prepared.check_trainable(&cfg, world_size) {
        println!("{}", serde_json::to_string_pretty(&prepared.report)?);
        return Err(named(e));
    }
    let rank_sampler = |rank| {
        Sampler::new(
            items,
            cfg.seed,
            cfg.shuffle,
            world_size,
            rank,
            micro_batch_size,
        )
    };
    let steps = rank_sampler(0)?.steps_per_epoch();
    let last = Cursor {
        epoch: 0,
        step: steps - 1,
    };
    let order = rank_sampler(0)?.epoch_order(0);
    let mut filler_rows = 0;
    for rank in 0..world_size {
        filler_rows += rank_sampler(rank)?.batch_at(last, &order).filler_rows;
    }
    let mut report = serde_json::to_value(&prepared.report)?;
    report["epoch"] = serde_json::json!({
        "items": items,
        "packed": cfg.packing,
        "world_size": world_size,
        "micro_batch_size": micro_batch_size,
        "micro_steps": steps,
        // Rows without targets that even out the last micro-step across ranks.
        "filler_rows": filler_rows,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    for (role, src) in &prepared.report.sources {
        let how = if src.cache_hit {
            "loaded from the token cache"
        } else {
            "templated and tokenized"
        };
        eprintln!(
            "{role}: {} records {how} in {:.2} s ({:.0} records/s)",
            src.stats.records,
            src.seconds,
            src.stats.records as f64 / src.seconds
        );
    }
    for share in &prepared.report.mix {
        eprintln!("{share}");
    }
    Ok(())
}

/// An error about the `[data]` keys, reworded for the flags that set them.
fn in_flag_names(message: &str) -> String {
    const FLAG_OF_KEY: [(&str, &str); 15] = [
        ("data.train = ", "--data "),
        ("data.format", "--format"),
        ("data.chat_template", "--chat-template"),
        ("data.assistant_spans", "--assistant-spans"),
        ("[data.fields] messages", "--messages-field"),
        ("[data.fields] tools", "--tools-field"),
        ("[data.fields] instruction", "--instruction-field"),
        ("[data.fields] context", "--context-field"),
        ("[data.fields] response", "--response-field"),
        ("[data.fields] category", "--category-field"),
        (
            "[data.fields]",
            "--instruction-field, --context-field, --response-field",
        ),
        ("data.template", "--template"),
        ("data.max_seq_length", "--max-seq-length"),
        ("data.length_policy", "--length-policy"),
        ("data.threads", "--threads"),
    ];
    FLAG_OF_KEY
        .iter()
        .fold(message.to_string(), |m, (key, flag)| m.replace(key, flag))
}

/// A sample as text, each run of trained tokens between `[[` and `]]`, after a line saying
/// where it came from. Each run's text is what decoding the ids through it adds to decoding
/// the ids before it, so a run keeps the space a tokenizer folds into its first token.
fn shown(s: &Sample, codec: &TextCodec) -> Result<String> {
    let trained: Vec<bool> = s.labels.iter().map(|&l| l != IGNORE_INDEX).collect();
    let mut out = format!(
        "sample of record {} ({} tokens, {} trained):\n",
        s.record,
        s.input_ids.len(),
        trained.iter().filter(|&&t| t).count()
    );
    let (mut start, mut before) = (0, String::new());
    while start < trained.len() {
        let end = (start..trained.len())
            .find(|&i| trained[i] != trained[start])
            .unwrap_or(trained.len());
        let through = codec.decode(&s.input_ids[..end], false)?;
        let run = match through.strip_prefix(&before) {
            Some(added) => added.to_string(),
            None => codec.decode(&s.input_ids[start..end], false)?,
        };
        match trained[start] {
            true => out.push_str(&format!("[[{run}]]")),
            false => out.push_str(&run),
        }
        (start, before) = (end, through);
    }
    Ok(out)
}
