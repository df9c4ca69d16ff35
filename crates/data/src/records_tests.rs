use super::*;
use crate::conversation::Message;

fn read(bytes: &[u8], format: Format, skip: bool) -> Result<ReadReport> {
    let mut opts = ReadOptions::new(format);
    opts.skip_invalid = skip;
    read_records_from_bytes("data.jsonl", bytes, &opts)
}

fn err(bytes: &[u8], format: Format) -> String {
    format!("{:#}", read(bytes, format, false).unwrap_err())
}

const DOLLY: &str = r#"{"instruction": "When did Virgin Australia start operating?", "context": "Virgin Australia commenced services on 31 August 2000.", "response": "31 August 2000.", "category": "closed_qa"}
{"instruction": "Which is a species of fish? Tope or Rope", "context": "", "response": "Tope", "category": "classification"}
"#;

#[test]
fn reads_dolly_jsonl() -> Result<()> {
    let r = read(DOLLY.as_bytes(), Format::Dolly, false)?;
    assert_eq!(r.records.len(), 2);
    assert_eq!(
        r.records[0].context,
        "Virgin Australia commenced services on 31 August 2000."
    );
    assert_eq!(r.records[1].category.as_deref(), Some("classification"));
    assert_eq!(r.records[1].line, 2);
    assert_eq!(r.skipped.total(), 0);
    Ok(())
}

#[test]
fn reads_alpaca_array_with_element_lines_and_missing_input() -> Result<()> {
    let text = "[\n  {\"instruction\": \"a\", \"input\": \"b\", \"output\": \"c\"},\n\n  {\n    \"instruction\": \"d\",\n    \"output\": \"e\"\n  }\n]\n";
    let r = read(text.as_bytes(), Format::Alpaca, false)?;
    assert_eq!(r.records.len(), 2);
    assert_eq!((r.records[0].line, r.records[1].line), (2, 4));
    assert_eq!(r.records[1].context, "", "Alpaca's input is optional");
    Ok(())
}

#[test]
fn reads_nemo_and_remapped_fields() -> Result<()> {
    let r = read(
        b"{\"input\": \"Q: 2+2?\", \"output\": \"4\"}\n",
        Format::Nemo,
        false,
    )?;
    assert_eq!(r.records[0].instruction, "Q: 2+2?");
    assert_eq!(r.records[0].response, "4");

    let mut opts = ReadOptions::new(Format::Alpaca);
    opts.fields.instruction = "question".into();
    opts.fields.response = "answer".into();
    let r = read_records_from_bytes("x", b"{\"question\": \"q\", \"answer\": \"a\"}", &opts)?;
    assert_eq!(
        (
            r.records[0].instruction.as_str(),
            r.records[0].response.as_str()
        ),
        ("q", "a")
    );
    Ok(())
}

#[test]
fn reads_the_real_alpaca_sample() -> Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/alpaca_sample.json");
    let r = read_records(&path, &ReadOptions::new(Format::Alpaca))?;
    assert!(r.records.len() >= 200, "{}", r.records.len());
    assert!(r.records.iter().any(|x| x.context.is_empty()));
    assert!(r.records.iter().any(|x| !x.context.is_empty()));
    Ok(())
}

#[test]
fn malformed_json_line_is_named() {
    let text = format!("{}{{\"instruction\": \"x\", \n", DOLLY);
    assert_eq!(
        err(text.as_bytes(), Format::Dolly),
        "data.jsonl:3: malformed JSON at column 21: EOF while parsing a value"
    );
}

#[test]
fn malformed_json_array_is_named() {
    let text = "[\n {\"instruction\": \"a\", \"output\": \"b\"},\n {\"instruction\" \"c\"}\n]";
    assert_eq!(
        err(text.as_bytes(), Format::Alpaca),
        "data.jsonl:3: malformed JSON at column 17: expected `:` (a JSON array cannot be read past it)"
    );
}

#[test]
fn missing_field_is_named() {
    let text = "{\"instruction\": \"a\", \"context\": \"\", \"category\": \"x\"}\n";
    assert_eq!(
        err(text.as_bytes(), Format::Dolly),
        "data.jsonl:1: field \"response\": missing"
    );
}

#[test]
fn mistyped_fields_are_named() {
    let text = "{\"instruction\": \"a\", \"output\": 42}\n";
    assert_eq!(
        err(text.as_bytes(), Format::Alpaca),
        "data.jsonl:1: field \"output\": expected a string, found a number"
    );
    let text = "{\"instruction\": \"a\", \"input\": [\"x\"], \"output\": \"b\"}\n";
    assert_eq!(
        err(text.as_bytes(), Format::Alpaca),
        "data.jsonl:1: field \"input\": expected a string, found an array"
    );
    assert_eq!(
        err(
            b"{\"input\": \"q\", \"output\": \"a\"}\n[1, 2]\n",
            Format::Nemo
        ),
        "data.jsonl:2: expected a JSON object, found an array"
    );
}

#[test]
fn empty_strings_are_valid_as_in_the_reference_code() -> Result<()> {
    let r = read(
        b"{\"input\": \"q\", \"output\": \"\"}\n",
        Format::Nemo,
        false,
    )?;
    assert_eq!(r.records[0].response, "");
    Ok(())
}

#[test]
fn invalid_utf8_is_named() {
    let mut bytes = b"{\"input\": \"q\", \"output\": \"a\"}\n{\"input\": \"q".to_vec();
    bytes.extend_from_slice(&[0xff, 0xfe]);
    bytes.extend_from_slice(b"\", \"output\": \"a\"}\n");
    assert_eq!(
        err(&bytes, Format::Nemo),
        "data.jsonl:2: invalid UTF-8 at byte 13 of the line"
    );
    let mut arr = b"[\n{\"input\": \"q".to_vec();
    arr.push(0xc3);
    arr.extend_from_slice(b"\", \"output\": \"a\"}]");
    assert_eq!(
        err(&arr, Format::Nemo),
        "data.jsonl:2: invalid UTF-8 at byte 13 of the line (a JSON array cannot be read past it)"
    );
}

#[test]
fn empty_file_is_an_error_even_when_skipping() {
    for bytes in [&b""[..], b"\n  \n", b"\xEF\xBB\xBF"] {
        let e = format!("{:#}", read(bytes, Format::Dolly, true).unwrap_err());
        assert_eq!(e, "data.jsonl: file is empty (no records)");
    }
}

#[test]
fn skip_invalid_counts_every_skipped_row() -> Result<()> {
    let mut bytes = DOLLY.as_bytes().to_vec();
    bytes.extend_from_slice(b"{not json}\n");
    bytes.extend_from_slice(b"{\"instruction\": \"a\", \"context\": \"\"}\n");
    bytes.extend_from_slice(b"{\"instruction\": \"a\", \"response\": false}\n");
    bytes.extend_from_slice(b"{\"instruction\": \"\xff\", \"response\": \"r\"}\n");
    bytes.extend_from_slice(b"\"just a string\"\n");
    bytes.extend_from_slice(b"{\"instruction\": \"\", \"response\": \"\"}\n");
    bytes.extend_from_slice(b"{\"instruction\": \"last\", \"response\": \"r\"}");
    let r = read(&bytes, Format::Dolly, true)?;
    assert_eq!(r.records.len(), 4);
    assert_eq!(r.records[3].line, 9);
    let expect = SkipCounts {
        malformed_json: 1,
        not_an_object: 1,
        missing_field: 1,
        wrong_type: 1,
        invalid_utf8: 1,
        unread_field: 0,
        bad_conversation: 0,
    };
    assert_eq!(r.skipped, expect);
    assert_eq!(r.skipped_rows.len(), 5);
    assert_eq!(
        r.skipped_rows[1],
        "data.jsonl:4: field \"response\": missing"
    );
    Ok(())
}

#[test]
fn all_rows_invalid_is_an_error_when_skipping() {
    let e = format!("{:#}", read(b"{}\n{}\n", Format::Alpaca, true).unwrap_err());
    assert_eq!(
        e,
        "data.jsonl: no valid records (2 rows skipped as invalid)"
    );
}

#[test]
fn another_format_s_prompt_field_is_refused_unless_fields_are_named() -> Result<()> {
    let alpaca = br#"{"instruction": "Name a colour.", "input": "", "output": "Red."}"#;
    // As nemo, the prompt would be "input" alone: the instruction would be lost.
    let e = err(alpaca, Format::Nemo);
    assert!(
        e.contains("data.jsonl:1: field \"instruction\": this format does not read it")
            && e.contains("[data.fields]"),
        "{e}"
    );
    assert_eq!(read(alpaca, Format::Alpaca, false)?.records.len(), 1);
    // Each format's own rows read as they are.
    let nemo = br#"{"input": "Name a colour.", "output": "Red."}"#;
    assert_eq!(read(nemo, Format::Nemo, false)?.records.len(), 1);
    assert_eq!(
        read(DOLLY.as_bytes(), Format::Dolly, false)?.records.len(),
        2
    );
    // Fields named by hand are taken as meant.
    let cfg: crate::DataConfig =
        toml::from_str("train = \"x\"\nformat = \"nemo\"\n[fields]\ninstruction = \"input\"\n")?;
    let r = read_records_from_bytes("data.jsonl", alpaca, &train_read_options(&cfg)?)?;
    assert_eq!(r.records[0].instruction, "");
    // Naming only the category leaves the check on.
    let cfg: crate::DataConfig =
        toml::from_str("train = \"x\"\nformat = \"nemo\"\n[fields]\ncategory = \"topic\"\n")?;
    assert!(read_records_from_bytes("data.jsonl", alpaca, &train_read_options(&cfg)?).is_err());
    Ok(())
}

/// How `cfg` reads its training file.
fn train_read_options(cfg: &crate::DataConfig) -> Result<ReadOptions> {
    Ok(cfg.train_sources()?[0].read_options(cfg.skip_invalid))
}

fn turn(role: &str, content: &str) -> Message {
    Message::text(role, content)
}

#[test]
fn reads_messages_and_sharegpt_conversations() -> Result<()> {
    let messages = br#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye."}]}"#;
    let r = read(messages, Format::Messages, false)?;
    let want = vec![
        turn("system", "Be brief."),
        turn("user", "Hi"),
        turn("assistant", "Hello."),
        turn("user", "Bye"),
        turn("assistant", "Bye."),
    ];
    assert_eq!(r.records[0].turns, want);
    assert_eq!(r.records[0].instruction, "");
    // ShareGPT's speakers map to roles as torchtune maps them.
    let sharegpt = br#"[{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}, {"from": "user", "value": "Bye"}, {"from": "assistant", "value": "Bye."}]}]"#;
    assert_eq!(
        read(sharegpt, Format::Sharegpt, false)?.records[0].turns,
        want
    );
    // The array's field may be renamed.
    let cfg: crate::DataConfig = toml::from_str(
        "train = \"x\"\nformat = \"messages\"\ntemplate = \"chat\"\n[fields]\nmessages = \"dialog\"\n",
    )?;
    cfg.validate()?;
    let dialog = br#"{"dialog": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}"#;
    let r = read_records_from_bytes("data.jsonl", dialog, &train_read_options(&cfg)?)?;
    assert_eq!(r.records[0].turns, want[1..3]);
    Ok(())
}

#[test]
fn a_bad_conversation_names_its_line_and_turn() -> Result<()> {
    let cases: [(&[u8], Format, &str); 12] = [
        (br#"{"instruction": "a"}"#, Format::Messages, "data.jsonl:1: field \"messages\": missing"),
        (br#"{"messages": "hi"}"#, Format::Messages, "data.jsonl:1: field \"messages\": expected an array of turns, found a string"),
        (br#"{"messages": [{"role": "user", "content": "a"}, ["x"]]}"#, Format::Messages, "data.jsonl:1: field \"messages[1]\": expected a JSON object, found an array"),
        (br#"{"messages": [{"role": "user"}]}"#, Format::Messages, "data.jsonl:1: field \"messages[0].content\": missing"),
        (br#"{"messages": [{"role": "user", "content": [{"type": "text"}]}]}"#, Format::Messages, "data.jsonl:1: field \"messages[0].content[0].text\": missing"),
        (br#"{"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}"#, Format::Messages, "data.jsonl:1: field \"messages[0].content[0].text\": expected a string, found a number"),
        (br#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image", "url": "x.png"}]}]}"#, Format::Messages, "data.jsonl:1: field \"messages[0].content[1].type\": a content part of type \"image\": helix trains text-only models, so only \"text\" parts are read"),
        (br#"{"messages": [{"role": "user", "content": [{"text": "a"}]}]}"#, Format::Messages, "data.jsonl:1: field \"messages[0].content[0].type\": missing"),
        (br#"{"messages": [{"role": "user", "content": ["a"]}]}"#, Format::Messages, "data.jsonl:1: field \"messages[0].content[0]\": expected a content part (an object), found a string"),
        (br#"{"messages": [{"role": "user", "content": 3}]}"#, Format::Messages, "data.jsonl:1: field \"messages[0].content\": expected a string or a list of text parts, found a number"),
        (br#"{"messages": [{"role": "assitant", "content": "a"}]}"#, Format::Messages, "data.jsonl:1: field \"messages[0].role\": unknown speaker \"assitant\" (expected system, user, assistant or tool)"),
        (br#"{"conversations": [{"from": "human", "value": "a"}]}"#, Format::Sharegpt, "data.jsonl:1: field \"conversations\": no assistant turn among its 1 turns: nothing to train on"),
    ];
    for (bytes, format, want) in cases {
        assert_eq!(err(bytes, format), want);
    }
    let e = err(
        br#"{"conversations": [{"from": "bot", "value": "a"}]}"#,
        Format::Sharegpt,
    );
    assert!(e.ends_with("unknown speaker \"bot\" (expected human, gpt, system, or a role: user, assistant, tool)"), "{e}");
    // Skippable, and counted.
    let mut bytes = br#"{"messages": [{"role": "user", "content": "a"}]}"#.to_vec();
    bytes.extend_from_slice(b"\n");
    bytes.extend_from_slice(br#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}"#);
    let r = read(&bytes, Format::Messages, true)?;
    assert_eq!((r.records.len(), r.skipped.bad_conversation), (1, 1));
    assert_eq!(r.records[0].line, 2);
    Ok(())
}

#[test]
fn conversation_settings_that_cannot_work_name_the_key() -> Result<()> {
    let parse = |text: &str| -> Result<String> {
        let cfg: crate::DataConfig = toml::from_str(text)?;
        Ok(cfg.validate().unwrap_err().to_string())
    };
    assert_eq!(
        parse("train = \"x\"\nformat = \"messages\"\n")?,
        "data.template = \"alpaca\" cannot render the conversations of data.format = \"messages\": set data.template = \"chat\" (the model's chat template)"
    );
    assert_eq!(
        parse("train = \"x\"\nformat = \"sharegpt\"\ntemplate = \"chat\"\n[fields]\nresponse = \"r\"\n")?,
        "[data.fields] response does not apply to data.format = \"sharegpt\", whose rows are conversations (name their array of turns with [data.fields] messages)"
    );
    assert_eq!(
        parse("train = \"x\"\nformat = \"alpaca\"\n[fields]\nmessages = \"m\"\n")?,
        "[data.fields] messages names a conversation's field; data.format = \"alpaca\" reads instructions (use data.format = \"messages\" or \"sharegpt\")"
    );
    assert_eq!(
        parse("train = \"x\"\nformat = \"dolly\"\n[fields]\ntools = \"functions\"\n")?,
        "[data.fields] tools names a conversation's field; data.format = \"dolly\" reads instructions (use data.format = \"messages\" or \"sharegpt\")"
    );
    assert_eq!(
        parse("train = \"x\"\nformat = \"alpaca\"\nassistant_spans = \"generation\"\n")?,
        "data.assistant_spans = \"generation\" reads the chat template's {% generation %} blocks, but data.template = \"alpaca\": set data.template = \"chat\""
    );
    assert_eq!(
        parse("train = \"x\"\nformat = \"messages\"\ntemplate = \"chat\"\nassistant_spans = \"generation\"\nloss = \"last_assistant_turn\"\n")?,
        "data.loss = \"last_assistant_turn\" needs data.assistant_spans = \"turns\": {% generation %} blocks do not say which turn each belongs to"
    );
    assert_eq!(
        parse("train = \"x\"\nformat = \"alpaca\"\nchat_template = \"t.jinja\"\n")?,
        "data.chat_template is set but data.template = \"alpaca\" does not use it: set data.template = \"chat\""
    );
    Ok(())
}

#[test]
fn content_parts_reach_the_template_as_they_are() -> Result<()> {
    use helix_model::OrderedJson;
    let row = br#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there", "cache": true}]}, {"role": "assistant", "content": []}]}"#;
    let r = read(row, Format::Messages, false)?;
    let turns = &r.records[0].turns;
    assert_eq!(turns[0].content.as_deref(), Some("Hi there"));
    assert_eq!(turns[1].content.as_deref(), Some(""));
    // The template gets the list itself, every key of every part in place.
    let OrderedJson::Array(parts) = turns[0].json.get("content").unwrap() else {
        panic!("{:?}", turns[0].json)
    };
    assert_eq!(parts[1].get("cache"), Some(&OrderedJson::Bool(true)));
    Ok(())
}

#[test]
fn tool_calls_and_tools_pass_through_in_file_order() -> Result<()> {
    use helix_model::OrderedJson;
    let row = br#"{"tools": [{"type": "function", "function": {"name": "f", "parameters": {"z": 1, "a": 2}}}], "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"z": 1.5, "a": "x"}}}]}, {"content": "42", "tool_call_id": "c1", "role": "tool"}, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}, {"role": "assistant", "content": "Done."}]}"#;
    let r = read(row, Format::Messages, false)?;
    let rec = &r.records[0];
    let keys = |v: &OrderedJson| -> Vec<String> {
        match v {
            OrderedJson::Object(e) => e.iter().map(|(k, _)| k.clone()).collect(),
            _ => panic!("not an object: {v:?}"),
        }
    };
    // A null text stays null for the template; an absent one stays absent.
    let t = &rec.turns[1];
    assert_eq!((t.role.as_str(), t.content.as_deref()), ("assistant", None));
    assert_eq!(keys(&t.json), ["role", "content", "tool_calls"]);
    assert_eq!(t.json.get("content"), Some(&OrderedJson::Null));
    assert_eq!(keys(&rec.turns[3].json), ["role", "tool_calls"]);
    // Keys keep the file's order, however deep.
    assert!(t.calls_tools() && rec.turns[3].calls_tools() && !rec.turns[4].calls_tools());
    let args = t.json.get("tool_calls").unwrap();
    let OrderedJson::Array(calls) = args else {
        panic!("{args:?}")
    };
    let arguments = calls[0].get("function").and_then(|f| f.get("arguments"));
    assert_eq!(keys(arguments.unwrap()), ["z", "a"]);
    // The turn's own order, whatever it is.
    assert_eq!(
        rec.turns[2].json,
        OrderedJson::Object(vec![
            ("content".into(), OrderedJson::String("42".into())),
            ("tool_call_id".into(), OrderedJson::String("c1".into())),
            ("role".into(), OrderedJson::String("tool".into())),
        ])
    );
    // ShareGPT's names become role and content in their places; a speaker's name a role's.
    let sharegpt = br#"{"conversations": [{"value": "Hi", "from": "human"}, {"from": "gpt", "weight": 1, "value": "Hello."}]}"#;
    let r = read(sharegpt, Format::Sharegpt, false)?;
    assert_eq!(keys(&r.records[0].turns[0].json), ["content", "role"]);
    assert_eq!(
        keys(&r.records[0].turns[1].json),
        ["role", "weight", "content"]
    );
    assert_eq!(
        r.records[0].turns[1].json.get("role"),
        Some(&OrderedJson::String("assistant".into()))
    );
    let tools = rec.tools.as_ref().unwrap();
    let OrderedJson::Array(schemas) = tools else {
        panic!("{tools:?}")
    };
    let params = schemas[0].get("function").and_then(|f| f.get("parameters"));
    assert_eq!(keys(params.unwrap()), ["z", "a"]);
    // A row without tools has none.
    let plain = br#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "tools": null}"#;
    assert_eq!(read(plain, Format::Messages, false)?.records[0].tools, None);
    Ok(())
}

#[test]
fn a_bad_tool_call_names_its_field() {
    let cases: [(&[u8], &str); 7] = [
        (br#"{"messages": [{"role": "user", "content": "a", "tool_calls": [{"function": {}}]}, {"role": "assistant", "content": "b"}]}"#, "data.jsonl:1: field \"messages[0].tool_calls\": a user turn cannot call tools; only the assistant's can"),
        (br#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": {"function": {}}}]}"#, "data.jsonl:1: field \"messages[1].tool_calls\": expected an array of tool calls, found an object"),
        (br#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [{"function": {}}, "f()"]}]}"#, "data.jsonl:1: field \"messages[1].tool_calls[1]\": expected a tool call (an object), found a string"),
        (br#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": null}]}"#, "data.jsonl:1: field \"messages[1].content\": expected a string, found null (only a turn that calls tools may have no text)"),
        (br#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": []}]}"#, "data.jsonl:1: field \"messages[1].content\": missing"),
        (br#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "tools": {"name": "f"}}"#, "data.jsonl:1: field \"tools\": expected an array of tool schemas, found an object"),
        (br#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "tools": [{"name": "f"}, "g"]}"#, "data.jsonl:1: field \"tools[1]\": expected a tool's JSON schema (an object), found a string"),
    ];
    for (bytes, want) in cases {
        assert_eq!(err(bytes, Format::Messages), want);
    }
}

#[test]
fn conversations_differing_only_in_their_tools_are_distinct() -> Result<()> {
    let mut bytes = Vec::new();
    for tools in ["[]", r#"[{"name": "f"}]"#, r#"[{"name": "f"}]"#] {
        bytes.extend_from_slice(format!(r#"{{"messages": [{{"role": "user", "content": "a"}}, {{"role": "assistant", "content": "b"}}], "tools": {tools}}}"#).as_bytes());
        bytes.push(b'\n');
    }
    let r = read(&bytes, Format::Messages, false)?;
    assert_eq!(crate::stats::ReadSummary::new(&r).unique_records, 2);
    Ok(())
}
