//! Splitting a chat request into its exact context and its question (docs/design.md §5a).
//!
//! Only OpenAI-style chat bodies (`{"messages": [...], ...}` whose last message is the user's)
//! are understood. Any other shape is [`NotApplicable`]: L2 stays out of the way and the
//! request is cached by L1 alone. Supporting another API means adding a splitter here that
//! yields the same [`Split`]: a context with the question taken out, and the question.

use serde_json::Value;

/// A chat request, split.
#[derive(Debug)]
pub(crate) struct Split {
    /// The whole body with the final user message's text replaced by `null`: everything that
    /// must be equal for two requests to be compared at all.
    pub(crate) context: Vec<u8>,
    /// The final user message's text.
    pub(crate) question: String,
    /// Whether the request asks for greedy decoding (`temperature` present and zero). An
    /// absent temperature is not zero: OpenAI's default is 1.
    pub(crate) deterministic: bool,
    /// Whether tools take part: tool definitions, a `tool_choice` other than `"none"`, tool
    /// results or earlier tool calls in the conversation.
    pub(crate) tools: bool,
}

/// Why a body is not split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NotApplicable {
    /// Not a JSON object with a non-empty `messages` array.
    Shape,
    /// The last message is not the user's (an assistant prefill, a tool result).
    LastTurn,
    /// The user's message has parts other than text (images, audio, files), or no text.
    Content,
}

/// The questions longer than this are left to L1: an embedding of a long text says little
/// about a small difference in it, and models truncate what does not fit.
pub(crate) const MAX_QUESTION_BYTES: usize = 2048;

/// Splits an OpenAI-style chat completion body.
pub(crate) fn split_chat(body: &[u8]) -> Result<Split, NotApplicable> {
    let mut value: Value = serde_json::from_slice(body).map_err(|_| NotApplicable::Shape)?;
    let obj = value.as_object_mut().ok_or(NotApplicable::Shape)?;
    let deterministic = obj
        .get("temperature")
        .and_then(Value::as_f64)
        .is_some_and(|t| t == 0.0);
    let has_tool_defs = ["tools", "functions"]
        .iter()
        .any(|k| obj.get(*k).is_some_and(|v| !is_empty(v)));
    let tool_choice = ["tool_choice", "function_call"].iter().any(|k| {
        obj.get(*k)
            .is_some_and(|v| !(v.is_null() || v.as_str() == Some("none")))
    });
    let messages = obj
        .get_mut("messages")
        .and_then(Value::as_array_mut)
        .filter(|m| !m.is_empty())
        .ok_or(NotApplicable::Shape)?;
    let tool_turns = messages.iter().any(|m| {
        matches!(
            m.get("role").and_then(Value::as_str),
            Some("tool" | "function")
        ) || m.get("tool_calls").is_some_and(|v| !is_empty(v))
            || m.get("function_call").is_some_and(|v| !v.is_null())
    });
    let last = messages
        .last_mut()
        .and_then(Value::as_object_mut)
        .ok_or(NotApplicable::Shape)?;
    if last.get("role").and_then(Value::as_str) != Some("user") {
        return Err(NotApplicable::LastTurn);
    }
    let content = last
        .get_mut("content")
        .ok_or(NotApplicable::Content)?
        .take();
    let question = text_of(&content).ok_or(NotApplicable::Content)?;
    if question.trim().is_empty() || question.len() > MAX_QUESTION_BYTES {
        return Err(NotApplicable::Content);
    }
    let context = serde_json::to_vec(&value).map_err(|_| NotApplicable::Shape)?;
    Ok(Split {
        context,
        question,
        deterministic,
        tools: has_tool_defs || tool_choice || tool_turns,
    })
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// The text of a message's content: a string, or an array of text parts only.
fn text_of(content: &Value) -> Option<String> {
    match content {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => {
            let mut out = String::new();
            for part in parts {
                if part.get("type").and_then(Value::as_str) != Some("text") {
                    return None;
                }
                if !out.is_empty() {
                    out.push('\n');
                }
                out.push_str(part.get("text")?.as_str()?);
            }
            Some(out)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(body: &str) -> Result<Split, NotApplicable> {
        split_chat(body.as_bytes())
    }

    #[test]
    fn the_question_is_the_last_user_text_and_the_rest_is_context() {
        let a = split(r#"{"model":"m","temperature":0,"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"Where is my parcel?"}]}"#).unwrap();
        let b = split(r#"{"model":"m","temperature":0,"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"Where's my package?"}]}"#).unwrap();
        assert_eq!(a.question, "Where is my parcel?");
        assert_eq!(a.context, b.context);
        assert!(a.deterministic && !a.tools);
        let other_system = split(r#"{"model":"m","temperature":0,"messages":[{"role":"system","content":"be long"},{"role":"user","content":"Where is my parcel?"}]}"#).unwrap();
        assert_ne!(a.context, other_system.context);
    }

    #[test]
    fn absent_temperature_is_not_zero() {
        let s = split(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert!(!s.deterministic);
        let s =
            split(r#"{"model":"m","temperature":0.7,"messages":[{"role":"user","content":"hi"}]}"#)
                .unwrap();
        assert!(!s.deterministic);
    }

    #[test]
    fn tools_and_tool_turns_are_flagged() {
        let t =
            split(r#"{"tools":[{"type":"function"}],"messages":[{"role":"user","content":"x"}]}"#)
                .unwrap();
        assert!(t.tools);
        let t =
            split(r#"{"tool_choice":"none","messages":[{"role":"user","content":"x"}]}"#).unwrap();
        assert!(!t.tools);
        let t = split(r#"{"messages":[{"role":"assistant","tool_calls":[{"id":"1"}]},{"role":"tool","content":"42"},{"role":"user","content":"x"}]}"#).unwrap();
        assert!(t.tools);
    }

    #[test]
    fn other_shapes_are_not_split() {
        assert_eq!(split("hello").unwrap_err(), NotApplicable::Shape);
        assert_eq!(
            split(r#"{"prompt":"x"}"#).unwrap_err(),
            NotApplicable::Shape
        );
        assert_eq!(
            split(
                r#"{"messages":[{"role":"user","content":"x"},{"role":"assistant","content":"y"}]}"#
            )
            .unwrap_err(),
            NotApplicable::LastTurn
        );
        assert_eq!(
            split(
                r#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{}}]}]}"#
            )
            .unwrap_err(),
            NotApplicable::Content
        );
        let parts = split(r#"{"messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}"#).unwrap();
        assert_eq!(parts.question, "a\nb");
    }
}
