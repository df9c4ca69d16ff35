//! `{% generation %}` … `{% endgeneration %}` blocks in chat templates: transformers' Jinja
//! extension marks the assistant's text with them (TRL trains on it). minijinja has no such
//! tag, so before a template is parsed each tag becomes an ordinary block: one that writes
//! nothing ([`GenerationTags::Plain`], for the text), or one that writes a mark
//! ([`GenerationTags::Marked`]), found and removed after rendering ([`split_generation_marks`]).

use std::ops::Range;

use anyhow::{bail, Result};

// What a tag writes in the marked form, to be found in the output: private-use characters no
// tokenizer's text should hold.
const GENERATION_START: &str = "\u{E000}\u{E001}generation\u{E001}";
const GENERATION_END: &str = "\u{E000}\u{E001}endgeneration\u{E001}";

/// What the generation tags of a template become before it is parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GenerationTags {
    /// Blocks that write nothing: the text as transformers renders it.
    Plain = 0,
    /// Blocks that write a mark where each tag is.
    Marked = 1,
}

/// Whether `template` marks the assistant's text with `{% generation %}` blocks (outside
/// comments, raw blocks and string literals).
pub fn has_generation_blocks(template: &str) -> bool {
    !generation_tags(template).is_empty()
}

/// One generation tag: where it is, whether it ends a block, and the whitespace control
/// after `{%` and before `%}` (`-`, `+` or none).
struct Tag<'a> {
    range: Range<usize>,
    ends: bool,
    left: &'a str,
    right: &'a str,
}

/// The generation tags of `template`, found as Jinja's lexer would: comments, expressions and
/// other tags are skipped whole (string literals in them included), and so are raw blocks.
fn generation_tags(template: &str) -> Vec<Tag<'_>> {
    let bytes = template.as_bytes();
    let mut tags = Vec::new();
    let mut i = 0;
    while let Some(found) = template[i..].find('{') {
        let start = i + found;
        match bytes.get(start + 1) {
            Some(b'#') => {
                i = template[start + 2..]
                    .find("#}")
                    .map_or(template.len(), |e| start + 2 + e + 2);
            }
            Some(b'{') => i = end_of(template, start + 2, "}}"),
            Some(b'%') => {
                let tag = statement(template, start);
                i = tag.end;
                match tag.word {
                    "generation" | "endgeneration" if tag.bare => tags.push(Tag {
                        range: start..tag.end,
                        ends: tag.word == "endgeneration",
                        left: tag.left,
                        right: tag.right,
                    }),
                    // Everything up to {% endraw %} is text.
                    "raw" => {
                        let mut j = tag.end;
                        while let Some(f) = template[j..].find("{%") {
                            let inner = statement(template, j + f);
                            j = inner.end;
                            if inner.word == "endraw" {
                                break;
                            }
                        }
                        i = j;
                    }
                    _ => {}
                }
            }
            _ => i = start + 1,
        }
    }
    tags
}

/// A `{% … %}` statement starting at `start`: its first word, whether nothing but whitespace
/// control follows the word, the controls, and where it ends.
struct Statement<'a> {
    word: &'a str,
    bare: bool,
    left: &'a str,
    right: &'a str,
    end: usize,
}

fn statement(template: &str, start: usize) -> Statement<'_> {
    let bytes = template.as_bytes();
    let control = |i: usize| match bytes.get(i) {
        Some(b'-' | b'+') => &template[i..i + 1],
        _ => "",
    };
    let mut i = start + 2;
    let left = control(i);
    i += left.len();
    while bytes.get(i).is_some_and(u8::is_ascii_whitespace) {
        i += 1;
    }
    let word_end = template[i..]
        .find(|c: char| !c.is_ascii_alphanumeric() && c != '_')
        .map_or(template.len(), |e| i + e);
    let word = &template[i..word_end];
    let end = end_of(template, word_end, "%}");
    // What follows the word, up to `%}` (a right control sits just before it).
    let inside = template[word_end..end]
        .strip_suffix("%}")
        .unwrap_or("")
        .trim_end();
    let right = match inside.as_bytes().last() {
        Some(b'-' | b'+') => &inside[inside.len() - 1..],
        _ => "",
    };
    let bare = inside.trim_end_matches(['-', '+']).trim().is_empty();
    Statement {
        word,
        bare,
        left,
        right,
        end,
    }
}

/// Just past the first `close` at or after `from` that is not inside a string literal (the
/// end of the template if there is none).
fn end_of(template: &str, from: usize, close: &str) -> usize {
    let bytes = template.as_bytes();
    let mut i = from;
    while i < bytes.len() {
        match bytes[i] {
            q @ (b'"' | b'\'') => {
                i += 1;
                while i < bytes.len() && bytes[i] != q {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            // Bytes, not str: `i` walks through multi-byte characters.
            _ if bytes[i..].starts_with(close.as_bytes()) => return i + close.len(),
            _ => i += 1,
        }
    }
    template.len()
}

/// `template` with each generation tag replaced as `tags` says, keeping the tag's whitespace
/// control on its outer sides, so `trim_blocks` and `lstrip_blocks` act as on the tag.
/// Tags that do not pair up, each `generation` closed by the next `endgeneration`, are refused
/// as jinja2 refuses them when it parses the template.
pub fn with_generation_tags(template: &str, tags: GenerationTags) -> Result<String> {
    let found = generation_tags(template);
    for (i, tag) in found.iter().enumerate() {
        if tag.ends != (i % 2 == 1) || (i + 1 == found.len() && !tag.ends) {
            let line = 1 + template[..tag.range.start].matches('\n').count();
            bail!(
                "line {line}: the chat template's {{% generation %}} and {{% endgeneration %}} \
                 tags do not pair up"
            );
        }
    }
    let mut out = String::with_capacity(template.len());
    let mut copied = 0;
    for tag in found {
        out.push_str(&template[copied..tag.range.start]);
        let (left, right) = (tag.left, tag.right);
        let write = match (tags, tag.ends) {
            (GenerationTags::Plain, _) => String::new(),
            (GenerationTags::Marked, false) => format!("{{{{ \"{GENERATION_START}\" }}}}"),
            (GenerationTags::Marked, true) => format!("{{{{ \"{GENERATION_END}\" }}}}"),
        };
        out.push_str(&format!("{{%{left} if true %}}{write}{{% endif {right}%}}"));
        copied = tag.range.end;
    }
    out.push_str(&template[copied..]);
    Ok(out)
}

/// The text without its generation marks, and the ranges between them.
pub fn split_generation_marks(marked: String) -> Result<(String, Vec<Range<usize>>)> {
    if !marked.contains('\u{E000}') {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_found_where_jinja_would_parse_them() {
        let found = |t: &str| -> Vec<(bool, String, String)> {
            generation_tags(t)
                .into_iter()
                .map(|g| (g.ends, g.left.to_string(), g.right.to_string()))
                .collect()
        };
        let yes = |ends: bool, l: &str, r: &str| (ends, l.to_string(), r.to_string());
        assert_eq!(
            found("{%- generation %}x{%generation+%}{% endgeneration -%}{%+endgeneration%}"),
            [
                yes(false, "-", ""),
                yes(false, "", "+"),
                yes(true, "", "-"),
                yes(true, "+", "")
            ]
        );
        // Not tags: in comments, raw blocks, string literals and expressions, or other words.
        for text in [
            "{# {% generation %} #}",
            "{% raw %}{% generation %}{% endraw %}",
            "{% set doc = \"{% generation %}\" %}",
            "{% set doc = '%}{% generation %}' %}",
            "{{ '{% generation %}' }}",
            "{% if add_generation_prompt %}{% endif %}{{ generation }}",
            "{% generation_x %}{% generation x %}",
        ] {
            assert!(found(text).is_empty(), "{text}");
        }
        // Non-ASCII text inside tags and unclosed tags are scanned, not sliced mid-character.
        for text in [
            "{% set café = 'é' %}{{ café }}",
            "{{ é",
            "{% é",
            "{# é",
            "{% raw %}é",
        ] {
            assert!(found(text).is_empty(), "{text}");
        }
        assert_eq!(
            found("{% set é = 1 %}{% generation %}é{% endgeneration %}").len(),
            2
        );
        // After a raw block, tags count again.
        assert_eq!(
            found("{% raw %}{% generation %}{% endraw %}{% generation %}").len(),
            1
        );
    }
}
