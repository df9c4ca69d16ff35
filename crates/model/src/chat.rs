//! Chat templates: the Jinja strings shipped in tokenizer_config.json, rendered like transformers.

use std::cell::RefCell;
use std::ops::Range;

use anyhow::{bail, Context, Result};
use minijinja::value::ValueKind;
use minijinja::{context, Environment, Error, ErrorKind, State, Value};

use crate::chat_json::{python_float_repr, OrderedJson};

/// Renders a chat template with transformers' conventions: `trim_blocks` and `lstrip_blocks`,
/// `raise_exception`, Python string methods, Python's `json.dumps` as `tojson`, and
/// `messages`, `tools` (none when absent), `documents` (none), `add_generation_prompt`,
/// `bos_token` and `eos_token` in scope. Messages are JSON objects passed as they are, so a
/// template sees every key a turn has (`tool_calls`, `name`, …) in the file's order.
/// `{% generation %}` blocks render their content ([`render_with_generation_spans`] says
/// where).
pub fn render(
    template: &str,
    messages: &[OrderedJson],
    tools: Option<&OrderedJson>,
    add_generation_prompt: bool,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> Result<String> {
    let (text, _) = render_with_generation_spans(
        template,
        messages,
        tools,
        add_generation_prompt,
        bos_token,
        eos_token,
    )?;
    Ok(text)
}

/// [`render`], and the byte ranges of the text that the template's `{% generation %}` …
/// `{% endgeneration %}` blocks wrote, in order: what transformers'
/// `apply_chat_template(return_assistant_tokens_mask=True)` marks as the assistant's (TRL's
/// `assistant_only_loss` trains on them).
pub fn render_with_generation_spans(
    template: &str,
    messages: &[OrderedJson],
    tools: Option<&OrderedJson>,
    add_generation_prompt: bool,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> Result<(String, Vec<Range<usize>>)> {
    // Each thread keeps the last template it compiled: tokenizing a dataset renders the same
    // template several times per row (a conversation once per assistant turn and more), and
    // parsing it again each time took most of that time.
    thread_local! {
        static COMPILED: RefCell<Option<(String, Environment<'static>)>> =
            const { RefCell::new(None) };
    }
    COMPILED
        .with_borrow_mut(|compiled| {
            if compiled
                .as_ref()
                .is_none_or(|(source, _)| source != template)
            {
                *compiled = Some((template.to_string(), environment(template)?));
            }
            let (_, env) = compiled.as_ref().expect("compiled above");
            let msgs: Vec<Value> = messages.iter().map(OrderedJson::to_jinja).collect();
            env.get_template("chat")?
                .render(context! {
                    messages => msgs,
                    tools => tools.map_or(Value::from(()), OrderedJson::to_jinja),
                    documents => Value::from(()),
                    add_generation_prompt => add_generation_prompt,
                    bos_token => bos_token.unwrap_or(""),
                    eos_token => eos_token.unwrap_or(""),
                })
                .context("rendering the chat template")
        })
        .and_then(split_generation_marks)
}

/// Whether `template` marks the assistant's text with `{% generation %}` blocks.
pub fn has_generation_blocks(template: &str) -> bool {
    generation_tags(template).next().is_some()
}

// What a `{% generation %}` / `{% endgeneration %}` tag writes, to be found in the output:
// private-use characters no tokenizer's text should hold.
const GENERATION_START: &str = "\u{E000}\u{E001}generation\u{E001}";
const GENERATION_END: &str = "\u{E000}\u{E001}endgeneration\u{E001}";

/// The `{%…generation…%}` and `{%…endgeneration…%}` tags of `template`: (byte range, the
/// whitespace control after `{%`, whether it ends a block, the control before `%}`).
fn generation_tags(template: &str) -> impl Iterator<Item = (Range<usize>, &str, bool, &str)> {
    let bytes = template.as_bytes();
    let mut at = 0;
    std::iter::from_fn(move || {
        while let Some(found) = template[at..].find("{%") {
            let start = at + found;
            at = start + 2;
            let mut i = at;
            let control = |i: usize| match bytes.get(i) {
                Some(b'-' | b'+') => 1,
                _ => 0,
            };
            let left = &template[i..i + control(i)];
            i += left.len();
            while bytes.get(i).is_some_and(u8::is_ascii_whitespace) {
                i += 1;
            }
            let word_end = i + template[i..]
                .find(|c: char| !c.is_ascii_alphanumeric() && c != '_')
                .unwrap_or(template.len() - i);
            let ends = match &template[i..word_end] {
                "generation" => false,
                "endgeneration" => true,
                _ => continue,
            };
            i = word_end;
            while bytes.get(i).is_some_and(u8::is_ascii_whitespace) {
                i += 1;
            }
            let right = &template[i..i + control(i)];
            i += right.len();
            if template[i..].starts_with("%}") {
                at = i + 2;
                return Some((start..at, left, ends, right));
            }
        }
        None
    })
}

/// `template` with each generation tag replaced by a block that writes its mark, keeping the
/// tag's whitespace control on its outer sides (so `trim_blocks` and `lstrip_blocks` act as
/// on the tag); minijinja knows no `generation` tag, jinja2 takes it from transformers'
/// extension.
fn with_generation_marks(template: &str) -> String {
    let mut out = String::with_capacity(template.len());
    let mut copied = 0;
    for (range, left, ends, right) in generation_tags(template) {
        out.push_str(&template[copied..range.start]);
        let mark = if ends {
            GENERATION_END
        } else {
            GENERATION_START
        };
        out.push_str(&format!(
            "{{%{left} if true %}}{{{{ \"{mark}\" }}}}{{% endif {right}%}}"
        ));
        copied = range.end;
    }
    out.push_str(&template[copied..]);
    out
}

/// The text without its generation marks, and the ranges between them.
fn split_generation_marks(marked: String) -> Result<(String, Vec<Range<usize>>)> {
    if !marked.contains(GENERATION_START) && !marked.contains(GENERATION_END) {
        return Ok((marked, Vec::new()));
    }
    let mut text = String::with_capacity(marked.len());
    let mut spans = Vec::new();
    let mut open: Option<usize> = None;
    let mut rest = marked.as_str();
    while let Some(i) = rest.find('\u{E000}') {
        text.push_str(&rest[..i]);
        rest = &rest[i..];
        if let Some(after) = rest.strip_prefix(GENERATION_START) {
            if open.replace(text.len()).is_some() {
                bail!("the chat template opens a {{% generation %}} block inside another");
            }
            rest = after;
        } else if let Some(after) = rest.strip_prefix(GENERATION_END) {
            let Some(start) = open.take() else {
                bail!("the chat template ends a {{% generation %}} block it did not open");
            };
            if text.len() > start {
                spans.push(start..text.len());
            }
            rest = after;
        } else {
            let c = rest.chars().next().expect("found above");
            text.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    text.push_str(rest);
    if open.is_some() {
        bail!("the chat template leaves a {{% generation %}} block open");
    }
    Ok((text, spans))
}

/// An environment holding `template`, parsed, as "chat".
fn environment(template: &str) -> Result<Environment<'static>> {
    let mut env = Environment::new();
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .context("chat template syntax")?,
    );
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    // Where minijinja and Python's jinja2 differ on values a conversation's JSON carries:
    // floats print as Python's repr, an absent key has length 0, and strings and maps are
    // sequences while none is not iterable.
    env.set_formatter(|out, state, value| match value.kind() {
        ValueKind::Number if !value.is_integer() => {
            let f = f64::try_from(value.clone()).unwrap_or(f64::NAN);
            out.write_str(&python_float_repr(f))
                .map_err(|e| Error::new(ErrorKind::WriteFailure, e.to_string()))
        }
        _ => minijinja::escape_formatter(out, state, value),
    });
    env.add_filter("string", |state: &State, value: &Value| {
        match value.kind() {
            ValueKind::Number if !value.is_integer() => {
                let f = f64::try_from(value.clone()).unwrap_or(f64::NAN);
                Ok(Value::from(python_float_repr(f)))
            }
            _ => minijinja::filters::string(state, value),
        }
    });
    env.add_filter("length", |value: &Value| match value.is_undefined() {
        true => Ok(0),
        false => minijinja::filters::length(value),
    });
    env.add_test("sequence", |value: &Value| {
        matches!(
            value.kind(),
            ValueKind::Undefined | ValueKind::String | ValueKind::Seq | ValueKind::Map
        )
    });
    env.add_test("iterable", |value: &Value| {
        matches!(
            value.kind(),
            ValueKind::Undefined
                | ValueKind::String
                | ValueKind::Seq
                | ValueKind::Map
                | ValueKind::Iterable
        )
    });
    env.add_filter("tojson", crate::chat_json::tojson);
    env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_template_owned("chat", with_generation_marks(template))
        .context("chat template does not parse")?;
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(turns: &[(&str, &str)]) -> Vec<OrderedJson> {
        turns
            .iter()
            .map(|(r, c)| OrderedJson::message(r, c))
            .collect()
    }

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_with_default_system_prompt() {
        let s = render(CHATML, &msgs(&[("user", "Hi")]), None, true, None, None).unwrap();
        assert_eq!(s, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn a_thread_switching_templates_renders_each_with_its_own() {
        let plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}";
        for (template, want) in [
            (
                CHATML,
                "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n",
            ),
            (plain, "user: Hi\n"),
            (
                CHATML,
                "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n",
            ),
        ] {
            assert_eq!(
                render(template, &msgs(&[("user", "Hi")]), None, false, None, None).unwrap(),
                want
            );
        }
        // A template that does not parse is an error, and the one before it still renders.
        assert!(render("{% for %}", &[], None, false, None, None).is_err());
        assert_eq!(
            render(plain, &msgs(&[("user", "Hi")]), None, false, None, None).unwrap(),
            "user: Hi\n"
        );
    }

    #[test]
    fn raise_exception_surfaces_the_message() {
        let t = "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('must start with user') }}{% endif %}";
        let e = render(t, &msgs(&[("assistant", "x")]), None, false, None, None).unwrap_err();
        assert!(format!("{e:#}").contains("must start with user"), "{e:#}");
    }

    #[test]
    fn python_string_methods_work() {
        let t = "{{ messages[0]['content'].strip() }}";
        assert_eq!(
            render(t, &msgs(&[("user", "  x  ")]), None, false, None, None).unwrap(),
            "x"
        );
    }

    #[test]
    fn json_values_render_as_python_jinja2_renders_them() {
        // The expected string is transformers' compiled template (jinja2) rendering the same.
        let t = "{% set m = messages[0] %}{{ m.x }}|{{ m.y }}|{{ m.x | string }}|{{ m.missing | length }}|{{ 'ab' is sequence }}|{{ m is sequence }}|{{ m.content is iterable }}|{{ {'b': 1, 'a': m.x} | tojson }}|{% for k in m %}{{ k }},{% endfor %}|{{ m.flag }}|{{ m.content }}|{{ m.n }}";
        let m: OrderedJson = serde_json::from_str(
            r#"{"content": null, "x": 1e-07, "y": 1e16, "role": "assistant", "flag": true, "n": 3}"#,
        )
        .unwrap();
        assert_eq!(
            render(t, &[m], None, false, None, None).unwrap(),
            r#"1e-07|1e+16|1e-07|0|True|True|False|{"b": 1, "a": 1e-07}|content,x,y,role,flag,n,|True|None|3"#
        );
    }

    #[test]
    fn generation_blocks_mark_what_transformers_marks() {
        // transformers' _render_with_assistant_indices on this template and conversation
        // gave the text below and the spans (52, 68), (121, 135); whitespace control on and
        // around the tags behaves as on any block tag.
        let t = r#"{%- for m in messages %}
  {%- if m.role == 'assistant' %}
<|im_start|>assistant
    {% generation %}
{{ m.content }}<|im_end|>
    {%- endgeneration %}

  {%- else %}
<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
  {% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}
"#;
        assert!(has_generation_blocks(t) && !has_generation_blocks(CHATML));
        let turns = msgs(&[
            ("user", "Hi"),
            ("assistant", "Hello."),
            ("user", "Bye"),
            ("assistant", "Bye."),
        ]);
        let (text, spans) =
            render_with_generation_spans(t, &turns, None, false, None, None).unwrap();
        assert_eq!(text, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|><|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nBye.<|im_end|>");
        assert_eq!(spans, [52..68, 121..135]);
        assert_eq!(render(t, &turns, None, false, None, None).unwrap(), text);
        // Unbalanced blocks are errors, not spans.
        for bad in [
            "{% generation %}{% generation %}x{% endgeneration %}{% endgeneration %}",
            "x{% endgeneration %}",
            "{% generation %}x",
        ] {
            let e = render(bad, &[], None, false, None, None).unwrap_err();
            assert!(
                format!("{e:#}").contains("generation %} block"),
                "{bad}: {e:#}"
            );
        }
    }
}
