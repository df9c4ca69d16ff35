//! Chat templates: the Jinja strings shipped in tokenizer_config.json, rendered like transformers.

use anyhow::{Context, Result};
use minijinja::{context, Environment, Error, ErrorKind};

/// Renders a chat template with transformers' conventions: `trim_blocks` and `lstrip_blocks`,
/// `raise_exception`, Python string methods, and `bos_token`/`eos_token` in scope.
pub fn render(
    template: &str,
    messages: &[(&str, &str)],
    add_generation_prompt: bool,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> Result<String> {
    let mut env = Environment::new();
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .context("chat template syntax")?,
    );
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_template("chat", template)
        .context("chat template does not parse")?;
    let msgs: Vec<_> = messages
        .iter()
        .map(|(role, content)| context! { role => *role, content => *content })
        .collect();
    let out = env
        .get_template("chat")?
        .render(context! {
            messages => msgs,
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token.unwrap_or(""),
            eos_token => eos_token.unwrap_or(""),
        })
        .context("rendering the chat template")?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_with_default_system_prompt() {
        let s = render(CHATML, &[("user", "Hi")], true, None, None).unwrap();
        assert_eq!(s, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn raise_exception_surfaces_the_message() {
        let t = "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('must start with user') }}{% endif %}";
        let e = render(t, &[("assistant", "x")], false, None, None).unwrap_err();
        assert!(format!("{e:#}").contains("must start with user"), "{e:#}");
    }

    #[test]
    fn python_string_methods_work() {
        let t = "{{ messages[0]['content'].strip() }}";
        assert_eq!(
            render(t, &[("user", "  x  ")], false, None, None).unwrap(),
            "x"
        );
    }
}
