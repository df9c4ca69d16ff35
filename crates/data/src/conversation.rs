//! Conversation rows (`messages`, ShareGPT `conversations`): their turns, each turn's tool
//! calls and other keys, and the row's tool schemas, read in file order so that a chat
//! template sees them as transformers hands them over.

use helix_model::OrderedJson;
use serde::{Deserialize, Serialize};

use crate::records::{invalid, InvalidKind, InvalidRow, Record};

/// The chat roles a turn may have; only `assistant` turns are trained on.
pub const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// Where a conversation row keeps its turns and how a turn names its speaker and its text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TurnFields {
    /// The row's array of turns (`messages`; ShareGPT: `conversations`).
    pub list: String,
    /// A turn's speaker key (`role`; ShareGPT: `from`).
    pub speaker: String,
    /// A turn's text key (`content`; ShareGPT: `value`).
    pub text: String,
    /// Speakers are ShareGPT's names (`human`, `gpt`, `system`), mapped to chat roles as
    /// torchtune's ShareGPT loader maps them.
    pub sharegpt_names: bool,
    /// The row's list of tool schemas (`tools`, TRL's column), handed to the template.
    #[serde(default = "default_tools")]
    pub tools: String,
}

pub(crate) fn default_tools() -> String {
    "tools".into()
}

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Message {
    /// One of [`ROLES`].
    pub role: String,
    /// The turn's text (a list of text parts' texts joined); `None` for an assistant turn
    /// that only calls tools (its content null or absent).
    pub content: Option<String>,
    /// The turn as the template sees it: every key of the row's object in file order
    /// (`tool_calls`, `name`, `tool_call_id`, a null content, …), the speaker as `role` (a
    /// role's name) and the text as `content`.
    pub json: OrderedJson,
}

impl Message {
    /// A turn with text and nothing else.
    pub fn text(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: Some(content.into()),
            json: OrderedJson::message(role, content),
        }
    }

    /// Whether the turn calls tools (a non-empty `tool_calls`).
    pub fn calls_tools(&self) -> bool {
        matches!(self.json.get("tool_calls"), Some(OrderedJson::Array(c)) if !c.is_empty())
    }
}

/// A conversation row: its turns (each error names the turn's field, `messages[2].role`) and
/// its tools.
pub(crate) fn conversation_record(
    file: &str,
    line: usize,
    row: &OrderedJson,
    fields: &TurnFields,
) -> Result<Record, InvalidRow> {
    let bad = |field: String, kind: InvalidKind, detail: String| {
        invalid(file, line, Some(&field), kind, detail)
    };
    let OrderedJson::Object(_) = row else {
        let detail = format!("expected a JSON object, found {}", row.type_name());
        return Err(invalid(file, line, None, InvalidKind::NotAnObject, detail));
    };
    let list = fields.list.as_str();
    let items = match row.get(list) {
        None => {
            return Err(bad(
                list.into(),
                InvalidKind::MissingField,
                "missing".into(),
            ))
        }
        Some(OrderedJson::Array(items)) => items,
        Some(v) => {
            let detail = format!("expected an array of turns, found {}", v.type_name());
            return Err(bad(list.into(), InvalidKind::WrongType, detail));
        }
    };
    let mut turns = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        turns.push(turn(item, fields, &format!("{list}[{i}]"), &bad)?);
    }
    if !turns.iter().any(|t| t.role == "assistant") {
        let detail = format!(
            "no assistant turn among its {} turns: nothing to train on",
            turns.len()
        );
        return Err(bad(list.into(), InvalidKind::BadConversation, detail));
    }
    let tools = match row.get(&fields.tools) {
        None | Some(OrderedJson::Null) => None,
        Some(OrderedJson::Array(schemas)) => {
            objects_only(schemas, &fields.tools, "a tool's JSON schema", &bad)?;
            Some(OrderedJson::Array(schemas.clone()))
        }
        Some(v) => {
            let detail = format!("expected an array of tool schemas, found {}", v.type_name());
            return Err(bad(fields.tools.clone(), InvalidKind::WrongType, detail));
        }
    };
    Ok(Record {
        instruction: String::new(),
        context: String::new(),
        response: String::new(),
        category: None,
        turns,
        tools,
        line,
    })
}

/// An error naming the first of `items` (the array at `field`) that is not an object, the
/// `what` each should be.
fn objects_only(
    items: &[OrderedJson],
    field: &str,
    what: &str,
    bad: &dyn Fn(String, InvalidKind, String) -> InvalidRow,
) -> Result<(), InvalidRow> {
    match items
        .iter()
        .enumerate()
        .find(|(_, item)| !matches!(item, OrderedJson::Object(_)))
    {
        Some((i, item)) => {
            let detail = format!("expected {what} (an object), found {}", item.type_name());
            Err(bad(format!("{field}[{i}]"), InvalidKind::WrongType, detail))
        }
        None => Ok(()),
    }
}

/// One turn, `at` naming it (`messages[2]`).
fn turn(
    item: &OrderedJson,
    fields: &TurnFields,
    at: &str,
    bad: &dyn Fn(String, InvalidKind, String) -> InvalidRow,
) -> Result<Message, InvalidRow> {
    let OrderedJson::Object(entries) = item else {
        let detail = format!("expected a JSON object, found {}", item.type_name());
        return Err(bad(at.into(), InvalidKind::WrongType, detail));
    };
    let field = |key: &str| format!("{at}.{key}");
    let speaker = match item.get(&fields.speaker) {
        None => {
            let f = field(&fields.speaker);
            return Err(bad(f, InvalidKind::MissingField, "missing".into()));
        }
        Some(OrderedJson::String(s)) => s.as_str(),
        Some(v) => {
            let detail = format!("expected a string, found {}", v.type_name());
            return Err(bad(field(&fields.speaker), InvalidKind::WrongType, detail));
        }
    };
    let role = match (fields.sharegpt_names, speaker) {
        (true, "human") => "user",
        (true, "gpt") => "assistant",
        (_, r) if ROLES.contains(&r) => r,
        (sharegpt, r) => {
            let known = match sharegpt {
                true => "human, gpt, system, or a role: user, assistant, tool",
                false => "system, user, assistant or tool",
            };
            let detail = format!("unknown speaker \"{r}\" (expected {known})");
            return Err(bad(
                field(&fields.speaker),
                InvalidKind::BadConversation,
                detail,
            ));
        }
    };
    let calls = match item.get("tool_calls") {
        None | Some(OrderedJson::Null) => 0,
        Some(OrderedJson::Array(calls)) if role == "assistant" => {
            objects_only(calls, &field("tool_calls"), "a tool call", bad)?;
            calls.len()
        }
        Some(OrderedJson::Array(_)) => {
            let detail = format!("a {role} turn cannot call tools; only the assistant's can");
            return Err(bad(
                field("tool_calls"),
                InvalidKind::BadConversation,
                detail,
            ));
        }
        Some(v) => {
            let detail = format!("expected an array of tool calls, found {}", v.type_name());
            return Err(bad(field("tool_calls"), InvalidKind::WrongType, detail));
        }
    };
    let content = match item.get(&fields.text) {
        Some(OrderedJson::String(s)) => Some(s.clone()),
        Some(OrderedJson::Array(parts)) => Some(text_parts(parts, &field(&fields.text), bad)?),
        None | Some(OrderedJson::Null) if calls > 0 => None,
        None => {
            let f = field(&fields.text);
            return Err(bad(f, InvalidKind::MissingField, "missing".into()));
        }
        Some(v) => {
            let detail = match v {
                OrderedJson::Null => "expected a string, found null (only a turn that calls \
                                      tools may have no text)"
                    .to_string(),
                _ => format!(
                    "expected a string or a list of text parts, found {}",
                    v.type_name()
                ),
            };
            return Err(bad(field(&fields.text), InvalidKind::WrongType, detail));
        }
    };
    // Everything goes to the template as it is, in order; the speaker and text under the
    // names templates read.
    let json = OrderedJson::Object(
        entries
            .iter()
            .map(|(k, v)| match k {
                k if *k == fields.speaker => ("role".into(), OrderedJson::String(role.into())),
                k if *k == fields.text => ("content".into(), v.clone()),
                k => (k.clone(), v.clone()),
            })
            .collect(),
    );
    Ok(Message {
        role: role.into(),
        content,
        json,
    })
}

/// The text of a turn whose content is a list of parts (OpenAI's and transformers'
/// `[{"type": "text", "text": "…"}, …]`), which the template receives as they are; `at` names
/// the content. helix trains text-only models, so a part of another type (an image) is an
/// error rather than something the template might drop unseen.
fn text_parts(
    parts: &[OrderedJson],
    at: &str,
    bad: &dyn Fn(String, InvalidKind, String) -> InvalidRow,
) -> Result<String, InvalidRow> {
    objects_only(parts, at, "a content part", bad)?;
    let mut text = String::new();
    for (i, part) in parts.iter().enumerate() {
        let field = |key: &str| format!("{at}[{i}].{key}");
        match (part.get("type"), part.get("text")) {
            (Some(OrderedJson::String(t)), Some(OrderedJson::String(s))) if t == "text" => {
                text.push_str(s)
            }
            (Some(OrderedJson::String(t)), None) if t == "text" => {
                return Err(bad(
                    field("text"),
                    InvalidKind::MissingField,
                    "missing".into(),
                ))
            }
            (Some(OrderedJson::String(t)), Some(v)) if t == "text" => {
                let detail = format!("expected a string, found {}", v.type_name());
                return Err(bad(field("text"), InvalidKind::WrongType, detail));
            }
            (Some(OrderedJson::String(t)), _) => {
                let detail = format!(
                    "a content part of type \"{t}\": helix trains text-only models, so only \
                     \"text\" parts are read"
                );
                return Err(bad(field("type"), InvalidKind::BadConversation, detail));
            }
            (None, _) => {
                return Err(bad(
                    field("type"),
                    InvalidKind::MissingField,
                    "missing".into(),
                ))
            }
            (Some(v), _) => {
                let detail = format!("expected a string, found {}", v.type_name());
                return Err(bad(field("type"), InvalidKind::WrongType, detail));
            }
        }
    }
    Ok(text)
}
