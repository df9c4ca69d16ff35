//! Chat templates: the Jinja strings shipped in tokenizer_config.json, rendered like transformers.

use std::cell::RefCell;

use anyhow::{Context, Result};
use minijinja::value::ValueKind;
use minijinja::{context, Environment, Error, ErrorKind, State, Value};

use crate::chat_json::{python_float_repr, OrderedJson};

/// Renders a chat template with transformers' conventions: `trim_blocks` and `lstrip_blocks`,
/// `raise_exception`, Python string methods, Python's `json.dumps` as `tojson`, and
/// `messages`, `tools` (none when absent), `documents` (none), `add_generation_prompt`,
/// `bos_token` and `eos_token` in scope. Messages are JSON objects passed as they are, so a
/// template sees every key a turn has (`tool_calls`, `name`, …) in the file's order.
///
/// Each thread keeps the last template it compiled: tokenizing a dataset renders the same
/// template several times per row (a conversation once per assistant turn and more), and
/// parsing it again each time took most of that time.
pub fn render(
    template: &str,
    messages: &[OrderedJson],
    tools: Option<&OrderedJson>,
    add_generation_prompt: bool,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> Result<String> {
    thread_local! {
        static COMPILED: RefCell<Option<(String, Environment<'static>)>> =
            const { RefCell::new(None) };
    }
    COMPILED.with_borrow_mut(|compiled| {
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
    env.add_template_owned("chat", template.to_string())
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
}
