use std::path::Path;

use super::*;
use crate::records::{read_records, Format, ReadOptions};

fn rec(instruction: &str, context: &str, response: &str) -> Record {
    Record {
        instruction: instruction.into(),
        context: context.into(),
        response: response.into(),
        category: None,
        turns: Vec::new(),
        tools: None,
        line: 1,
    }
}

fn sample() -> Vec<Record> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/alpaca_sample.json");
    read_records(&path, &ReadOptions::new(Format::Alpaca))
        .unwrap()
        .records
}

#[test]
fn alpaca_with_input_matches_stanford_byte_for_byte() -> Result<()> {
    // Row 0 of the real sample, expected text spelled out as Stanford's format_map writes it.
    let r = Template::Alpaca.render(&sample()[0])?;
    let expected =
        "Below is an instruction that describes a task, paired with an input that provides \
further context. Write a response that appropriately completes the request.\n\n\
### Instruction:\nAre the two sentences below grammatically correct? Output yes or no.\n\n\
### Input:\nSentence 1: I am going to the store.\nSentence 2: I goes to the store.\n\n\
### Response:";
    assert_eq!(r.prompt, expected);
    assert_eq!(r.target, "No");
    assert!(r.add_eos);
    Ok(())
}

#[test]
fn alpaca_without_input_matches_stanford_byte_for_byte() -> Result<()> {
    let row = &sample()[4];
    assert!(row.context.is_empty());
    let r = Template::Alpaca.render(row)?;
    let expected =
        "Below is an instruction that describes a task. Write a response that appropriately \
completes the request.\n\n### Instruction:\nGenerate a new solution to address the global climate \
crisis.\n\n### Response:";
    assert_eq!(r.prompt, expected);
    assert!(r
        .target
        .starts_with("One solution to address the global climate crisis is"));
    Ok(())
}

#[test]
fn alpaca_every_sample_row_has_the_stanford_shape() -> Result<()> {
    let rows = sample();
    for row in &rows {
        let r = Template::Alpaca.render(row)?;
        let (head, body) = if row.context.is_empty() {
            let head = "Below is an instruction that describes a task. Write a response that appropriately completes the request.";
            (
                head,
                format!("### Instruction:\n{}\n\n### Response:", row.instruction),
            )
        } else {
            let head = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.";
            let body = format!(
                "### Instruction:\n{}\n\n### Input:\n{}\n\n### Response:",
                row.instruction, row.context
            );
            (head, body)
        };
        assert_eq!(r.prompt, format!("{head}\n\n{body}"), "line {}", row.line);
        assert_eq!(r.target, row.response);
    }
    Ok(())
}

#[test]
fn alpaca_keeps_braces_in_the_data_literal() -> Result<()> {
    let r = Template::Alpaca.render(&rec("say {input}", "x {instruction}", "ok"))?;
    assert!(r
        .prompt
        .contains("### Instruction:\nsay {input}\n\n### Input:\nx {instruction}\n\n"));
    Ok(())
}

#[test]
fn dolly_matches_databricks_training_format() -> Result<()> {
    let intro = "Below is an instruction that describes a task. Write a response that appropriately completes the request.";
    let r = Template::Dolly.render(&rec("Who?", "Some passage.", "Someone."))?;
    assert_eq!(
        r.text(),
        format!("{intro}\n\n### Instruction:\nWho?\n\nInput:\nSome passage.\n\n### Response:\nSomeone.\n\n### End")
    );
    assert!(r.prompt.ends_with("### Response:\n"));
    assert_eq!(r.target, "Someone.\n\n### End");
    let r = Template::Dolly.render(&rec("Name a fish.", "", "Tope"))?;
    assert_eq!(
        r.text(),
        format!("{intro}\n\n### Instruction:\nName a fish.\n\n### Response:\nTope\n\n### End")
    );
    Ok(())
}

#[test]
fn user_template_substitutes_and_escapes() -> Result<()> {
    let t = Template::from_spec("Q: {instruction}\nC: {context} / {input} {{x}}\nA:", None)?;
    let r = t.render(&rec("why", "because", "so"))?;
    assert_eq!(r.prompt, "Q: why\nC: because / because {x}\nA:");
    assert_eq!(r.target, "so");
    Ok(())
}

#[test]
fn user_template_errors_are_explicit() {
    let e = |s: &str| format!("{:#}", Template::from_spec(s, None).unwrap_err());
    assert_eq!(
        e("{instruction} {output}"),
        "template: unknown placeholder {output} (known: {instruction}, {input}, {context}; write {{ for a literal brace)"
    );
    assert_eq!(
        e("{input} only"),
        "template: no {instruction} placeholder in \"{input} only\""
    );
    assert_eq!(e("{instruction"), "template: unclosed '{' at byte 0");
    assert_eq!(
        e("{instruction} }"),
        "template: single '}' at byte 14 (write }} for a literal brace)"
    );
    assert_eq!(
        e("chat"),
        "the chat template needs a model's tokenizer_config.json"
    );
}

/// A ChatML codec like SmolLM2's, with a one-token-per-word tokenizer.
pub(crate) fn chatml_codec() -> Arc<TextCodec> {
    let template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    Arc::new(TextCodec {
        tokenizer: crate::tokenize::tests::word_tokenizer(&["<|im_start|>", "<|im_end|>"]),
        chat_template: Some(template.into()),
        bos_token: None,
        eos_token: Some("<|im_end|>".into()),
    })
}

#[test]
fn chat_template_splits_prompt_and_assistant_turn() -> Result<()> {
    let t = Template::Chat(ChatTemplate::new(chatml_codec(), Some("Be brief.".into()))?);
    let r = t.render(&rec("Capital of France?", "Europe", "Paris"))?;
    assert_eq!(
        r.prompt,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of France?\n\nEurope<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(r.target, "Paris<|im_end|>\n");
    assert!(!r.add_eos, "the template ends the turn itself");
    Ok(())
}

/// A conversation record of (role, content) turns.
pub(crate) fn conversation(turns: &[(&str, &str)]) -> Record {
    Record {
        turns: turns
            .iter()
            .map(|(role, content)| crate::conversation::Message::text(role, content))
            .collect(),
        ..rec("", "", "")
    }
}

#[test]
fn a_conversation_trains_on_each_assistant_turn_and_nothing_between() -> Result<()> {
    let t = Template::Chat(ChatTemplate::new(chatml_codec(), None)?);
    let r = t.render(&conversation(&[
        ("user", "Hi"),
        ("assistant", "Hello."),
        ("user", "Bye"),
        ("assistant", "Bye."),
        ("user", "Wait"),
    ]))?;
    assert_eq!(
        r.prompt,
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    let untrained: Vec<&str> = r.untrained.iter().map(|u| &r.target[u.clone()]).collect();
    assert_eq!(
        untrained,
        [
            "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n",
            "<|im_start|>user\nWait<|im_end|>\n"
        ]
    );
    // What is left is exactly the two assistant turns, each with its end of turn.
    let mut trained = String::new();
    let mut at = 0;
    for u in &r.untrained {
        trained.push_str(&r.target[at..u.start]);
        at = u.end;
    }
    trained.push_str(&r.target[at..]);
    assert_eq!(trained, "Hello.<|im_end|>\nBye.<|im_end|>\n");
    assert!(!r.add_eos && !r.add_special_tokens);

    // The template's own system turn goes first unless the conversation has one.
    let t = Template::Chat(ChatTemplate::new(chatml_codec(), Some("Be brief.".into()))?);
    let r = t.render(&conversation(&[("user", "Hi"), ("assistant", "Hello.")]))?;
    assert!(
        r.prompt
            .starts_with("<|im_start|>system\nBe brief.<|im_end|>\n"),
        "{}",
        r.prompt
    );
    let r = t.render(&conversation(&[
        ("system", "Terse."),
        ("user", "Hi"),
        ("assistant", "Hello."),
    ]))?;
    assert!(
        r.prompt
            .starts_with("<|im_start|>system\nTerse.<|im_end|>\n<|im_start|>user"),
        "{}",
        r.prompt
    );
    assert_eq!(
        (r.target.as_str(), r.untrained.len()),
        ("Hello.<|im_end|>\n", 0)
    );
    Ok(())
}

#[test]
fn a_conversation_that_cannot_be_split_is_refused_with_its_line() -> Result<()> {
    let turns = [
        ("user", "Hi"),
        ("assistant", "Hello."),
        ("user", "Bye"),
        ("assistant", "Bye."),
    ];
    // Not a chat template.
    let e = format!(
        "{:#}",
        Template::Alpaca.render(&conversation(&turns)).unwrap_err()
    );
    assert_eq!(
        e,
        "line 1: a conversation needs the model's chat template (template = \"chat\"), not Alpaca"
    );
    // A template that marks the last turn renders earlier turns differently once more follow.
    let codec = TextCodec {
        tokenizer: crate::tokenize::tests::word_tokenizer(&[]),
        chat_template: Some(
            "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}\n{% endfor %}"
                .into(),
        ),
        bos_token: None,
        eos_token: None,
    };
    let t = Template::Chat(ChatTemplate::new(Arc::new(codec), None)?);
    let e = format!("{:#}", t.render(&conversation(&turns)).unwrap_err());
    assert_eq!(
        e,
        "line 1: the chat template renders turn 1 (counting from 0; the assistant's) differently from the turns before it, so the assistant turns cannot be separated from the rest"
    );
    Ok(())
}

#[test]
fn tool_calls_are_trained_and_tool_results_are_not() -> Result<()> {
    // The shipped tool template, on the same word-level codec.
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../configs/chat_templates/chatml_tools.jinja");
    let mut codec = Arc::try_unwrap(chatml_codec()).ok().unwrap();
    codec.set_chat_template_file(&path)?;
    let t = Template::Chat(ChatTemplate::new(Arc::new(codec), None)?);
    let row = br#"{"messages": [{"role": "user", "content": "Weather in Oslo?"}, {"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"location": "Oslo", "days": 2, "scale": 0.5}}}]}, {"role": "tool", "content": "-3 C"}, {"role": "assistant", "content": "It is -3 C."}], "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}}]}"#;
    let rec = crate::records::read_records_from_bytes(
        "data.jsonl",
        row,
        &ReadOptions::new(Format::Messages),
    )?
    .records
    .remove(0);
    let r = t.render(&rec)?;
    // The tools' schemas are in the system turn, in json.dumps' layout and the file's order.
    assert!(
        r.prompt.contains("\n<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"parameters\": {\"type\": \"object\", \"properties\": {\"location\": {\"type\": \"string\"}}}}}\n</tools>\n"),
        "{}",
        r.prompt
    );
    assert!(r
        .prompt
        .ends_with("<|im_start|>user\nWeather in Oslo?<|im_end|>\n<|im_start|>assistant\n"));
    let untrained: Vec<&str> = r.untrained.iter().map(|u| &r.target[u.clone()]).collect();
    assert_eq!(
        untrained,
        ["<|im_start|>user\n<tool_response>\n-3 C\n</tool_response><|im_end|>\n<|im_start|>assistant\n"]
    );
    let first = r.untrained[0].start;
    assert_eq!(
        &r.target[..first],
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"location\": \"Oslo\", \"days\": 2, \"scale\": 0.5}}\n</tool_call><|im_end|>\n"
    );
    assert_eq!(&r.target[r.untrained[0].end..], "It is -3 C.<|im_end|>\n");
    Ok(())
}

#[test]
fn generation_blocks_train_what_they_write() -> Result<()> {
    // ChatML whose assistant text and end of turn sit in a generation block, the newline after
    // it outside (as TRL's templates have them).
    let template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}{{ '\n' }}{% else %}{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    let mut codec = Arc::try_unwrap(chatml_codec()).ok().unwrap();
    codec.chat_template = Some(template.into());
    let chat = ChatTemplate::new(Arc::new(codec), Some("Be brief.".into()))?;
    let t = Template::Chat(chat.clone().with_spans(AssistantSpans::Generation)?);
    let r = t.render(&conversation(&[
        ("user", "Hi"),
        ("assistant", "Hello."),
        ("user", "Bye"),
        ("assistant", "Bye."),
    ]))?;
    assert_eq!(
        r.prompt,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    let untrained: Vec<&str> = r.untrained.iter().map(|u| &r.target[u.clone()]).collect();
    // Unlike the turn-by-turn spans, the newline after each end of turn is not trained.
    assert_eq!(
        untrained,
        [
            "\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n",
            "\n"
        ]
    );
    let by_turns = Template::Chat(chat.clone()).render(&conversation(&[
        ("user", "Hi"),
        ("assistant", "Hello."),
        ("user", "Bye"),
        ("assistant", "Bye."),
    ]))?;
    assert_eq!(by_turns.text(), r.text());
    assert_eq!(
        by_turns
            .untrained
            .iter()
            .map(|u| &by_turns.target[u.clone()])
            .collect::<Vec<_>>(),
        ["<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"]
    );
    // An instruction renders as a user and an assistant turn.
    let r = t.render(&rec("Capital of France?", "", "Paris"))?;
    assert!(r
        .prompt
        .ends_with("<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n"));
    assert_eq!(r.target, "Paris<|im_end|>\n");
    let newline = 15..16;
    assert_eq!(r.untrained, vec![newline]);
    // A template without blocks cannot find the assistant's text that way.
    let e = ChatTemplate::new(chatml_codec(), None)?
        .with_spans(AssistantSpans::Generation)
        .err()
        .unwrap();
    assert!(e.to_string().contains("no {% generation %} blocks"), "{e}");
    Ok(())
}
