//! Chat templates: the Jinja strings shipped in tokenizer_config.json, rendered like transformers.

use std::cell::RefCell;
use std::ops::Range;

use anyhow::{bail, Context, Result};
use minijinja::value::ValueKind;
use minijinja::{context, Environment, Error, ErrorKind, State, Value};

use crate::chat_generation::{split_generation_marks, with_generation_tags, GenerationTags};
use crate::chat_json::{python_text, OrderedJson};

pub use crate::chat_generation::has_generation_blocks;

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
    let context = template_context(messages, tools, add_generation_prompt, bos_token, eos_token);
    render_variant(template, GenerationTags::Plain, context)
}

/// [`render`], and the byte ranges of the text that the template's `{% generation %}` …
/// `{% endgeneration %}` blocks wrote, in order: what transformers'
/// `apply_chat_template(return_assistant_tokens_mask=True)` marks as the assistant's (TRL's
/// `assistant_only_loss` trains on them). The blocks' marks must leave the text as it is: a
/// template that filters or trims what a block wrote is refused, since the marks would then
/// be in the wrong place.
pub fn render_with_generation_spans(
    template: &str,
    messages: &[OrderedJson],
    tools: Option<&OrderedJson>,
    add_generation_prompt: bool,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> Result<(String, Vec<Range<usize>>)> {
    let context = template_context(messages, tools, add_generation_prompt, bos_token, eos_token);
    let text = render_variant(template, GenerationTags::Plain, context.clone())?;
    let (marked_text, spans) =
        split_generation_marks(render_variant(template, GenerationTags::Marked, context)?)?;
    if marked_text != text {
        bail!(
            "the chat template changes the text of its {{% generation %}} blocks after writing \
             it (a filter or a trim around them), so where they are in the text cannot be told"
        );
    }
    Ok((text, spans))
}

/// An error unless `template` parses (its generation tags paired), as a check before it is
/// used: rendering is what the data's rows are for.
pub fn check_parses(template: &str) -> Result<()> {
    environment(template, GenerationTags::Plain).map(drop)
}

/// What transformers hands a chat template.
fn template_context(
    messages: &[OrderedJson],
    tools: Option<&OrderedJson>,
    add_generation_prompt: bool,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> Value {
    context! {
        messages => messages.iter().map(OrderedJson::to_jinja).collect::<Vec<Value>>(),
        tools => tools.map_or(Value::from(()), OrderedJson::to_jinja),
        documents => Value::from(()),
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token.unwrap_or(""),
        eos_token => eos_token.unwrap_or(""),
    }
}

/// `template` rendered with its generation tags as `tags` says. Each thread keeps the last
/// template it compiled in each form: tokenizing a dataset renders the same template several
/// times per row (a conversation once per assistant turn and more), and parsing it again
/// each time took most of that time.
fn render_variant(template: &str, tags: GenerationTags, context: Value) -> Result<String> {
    thread_local! {
        static COMPILED: RefCell<[Option<(String, Environment<'static>)>; 2]> =
            const { RefCell::new([None, None]) };
    }
    COMPILED.with_borrow_mut(|compiled| {
        let slot = &mut compiled[tags as usize];
        if slot.as_ref().is_none_or(|(source, _)| source != template) {
            *slot = Some((template.to_string(), environment(template, tags)?));
        }
        let (_, env) = slot.as_ref().expect("compiled above");
        env.get_template("chat")?
            .render(context)
            .context("rendering the chat template")
    })
}

/// An environment holding `template`, parsed, as "chat", its generation tags as `tags` says.
fn environment(template: &str, tags: GenerationTags) -> Result<Environment<'static>> {
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
    // floats print as Python's repr, lists and maps with their floats so too, an absent key
    // has length 0, and strings and maps are sequences while none is not iterable.
    env.set_formatter(|out, state, value| match python_text(value) {
        Some(text) => out
            .write_str(&text)
            .map_err(|e| Error::new(ErrorKind::WriteFailure, e.to_string())),
        None => minijinja::escape_formatter(out, state, value),
    });
    env.add_filter("string", |state: &State, value: &Value| {
        match python_text(value) {
            Some(text) => Ok(Value::from(text)),
            None => minijinja::filters::string(state, value),
        }
    });
    env.add_filter("length", |value: &Value| match value.is_undefined() {
        true => Ok(0),
        false => minijinja::filters::length(value),
    });
    fn is_sequence(value: &Value) -> bool {
        matches!(
            value.kind(),
            ValueKind::Undefined | ValueKind::String | ValueKind::Seq | ValueKind::Map
        )
    }
    env.add_test("sequence", is_sequence);
    env.add_test("iterable", |value: &Value| {
        is_sequence(value) || value.kind() == ValueKind::Iterable
    });
    env.add_filter("tojson", crate::chat_json::tojson);
    env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_template_owned("chat", with_generation_tags(template, tags)?)
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
    fn containers_print_as_python_jinja2_prints_them() {
        // The expected string is jinja2 (transformers' compiled template) rendering the same:
        // Python's repr of lists and dicts, their strings quoted as repr quotes them and
        // their floats as repr writes them.
        let t = "{% set m = messages[0] %}{{ m.content }}|{{ m.content[1] }}|{{ [1, 'a', none, true, 2.5, 1e20] }}|{{ {'k': \"it's\"} }}|{{ m.content | string }}";
        let m: OrderedJson = serde_json::from_str(
            r#"{"role": "user", "content": [{"type": "text", "text": "hi \"q\" it's\n"}, {"type": "x", "n": null, "f": 1e-07}]}"#,
        )
        .unwrap();
        let parts =
            r#"[{'type': 'text', 'text': 'hi "q" it\'s\n'}, {'type': 'x', 'n': None, 'f': 1e-07}]"#;
        assert_eq!(
            render(t, &[m], None, false, None, None).unwrap(),
            format!(
                r#"{parts}|{{'type': 'x', 'n': None, 'f': 1e-07}}|[1, 'a', None, True, 2.5, 1e+20]|{{'k': "it's"}}|{parts}"#
            )
        );
    }

    #[test]
    fn tuples_and_infinities_print_as_python_jinja2_prints_them() {
        // jinja2's rendering of the same template and turn.
        let t = "{% set m = messages[0] %}{{ (1, 2.5) }}|{{ (1e-7,) }}|{{ () }}|{{ m.content[1].items() | list }}|{{ {'b': 1e-7, 'a': 2} | dictsort }}|{{ 1e308 * 10 }}|{{ [1e308 * 10, -1e308 * 10] }}|{{ {'a': [1, (2.5, none)]} }}|{{ m.content[1] | string }}";
        let m: OrderedJson = serde_json::from_str(
            r#"{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "x", "f": 1e-07}]}"#,
        )
        .unwrap();
        assert_eq!(
            render(t, &[m], None, false, None, None).unwrap(),
            "(1, 2.5)|(1e-07,)|()|[('type', 'x'), ('f', 1e-07)]|[('a', 2), ('b', 1e-07)]|inf|[inf, -inf]|{'a': [1, (2.5, None)]}|{'type': 'x', 'f': 1e-07}"
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
        // Tags that do not pair up do not parse, as in jinja2.
        for bad in [
            "{% generation %}{% generation %}x{% endgeneration %}{% endgeneration %}",
            "x{% endgeneration %}",
            "{% generation %}x",
        ] {
            let e = render(bad, &[], None, false, None, None).unwrap_err();
            assert!(format!("{e:#}").contains("do not pair up"), "{bad}: {e:#}");
        }
        // A block whose text a filter changes cannot be located: refused, while the text
        // itself renders as jinja2 renders it.
        let upper = "{% filter upper %}{% generation %}{{ messages[0].content }}{% endgeneration %}{% endfilter %}";
        let hi = msgs(&[("assistant", "hi")]);
        assert_eq!(render(upper, &hi, None, false, None, None).unwrap(), "HI");
        let e = render_with_generation_spans(upper, &hi, None, false, None, None).unwrap_err();
        assert!(
            format!("{e:#}").contains("changes the text of its"),
            "{e:#}"
        );
    }
}
