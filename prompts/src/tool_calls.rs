//! Tool calls parsed out of a model's reply.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One call of a tool the model asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub name: String,
    /// The arguments object (a JSON object when the model wrote one; a string the model wrote that
    /// is not JSON is kept as a JSON string).
    pub arguments: Value,
}

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";
const PYTHON_TAG: &str = "<|python_tag|>";

/// Parses the tool calls in a reply:
///
/// * Qwen2.5 / Qwen3 / Hermes: one or more `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`
///   blocks (a last block the reply ends inside, without `</tool_call>`, counts too);
/// * Llama 3.x: the whole reply is `{"name": ..., "parameters": {...}}` (or `"arguments"`), optionally
///   after `<|python_tag|>`; several calls may be separated by `;` or given as a JSON array.
///
/// Ordinary text gives an empty vec; so does a reply that looks like a call but is not valid.
pub fn parse_tool_calls(reply: &str) -> Vec<ToolCall> {
    if reply.contains(OPEN) {
        return tagged_calls(reply);
    }
    let body = reply.trim_start();
    let body = body.strip_prefix(PYTHON_TAG).unwrap_or(body).trim();
    if body.starts_with('{') || body.starts_with('[') {
        return json_calls(body).unwrap_or_default();
    }
    Vec::new()
}

fn tagged_calls(reply: &str) -> Vec<ToolCall> {
    let mut calls = Vec::new();
    let mut rest = reply;
    while let Some(start) = rest.find(OPEN) {
        let after = &rest[start + OPEN.len()..];
        let (body, next) = match after.find(CLOSE) {
            Some(end) => (&after[..end], &after[end + CLOSE.len()..]),
            None => (after, ""),
        };
        if let Ok(Value::Object(obj)) = serde_json::from_str::<Value>(body.trim()) {
            if let Some(call) = call_from_object(obj) {
                calls.push(call);
            }
        }
        rest = next;
    }
    calls
}

/// A JSON call object, an array of them, or several separated by `;`. All or nothing.
fn json_calls(body: &str) -> Option<Vec<ToolCall>> {
    let mut stream = serde_json::Deserializer::from_str(body).into_iter::<Value>();
    let mut calls = Vec::new();
    match stream.next()?.ok()? {
        Value::Object(obj) => calls.push(call_from_object(obj)?),
        Value::Array(items) if !items.is_empty() => {
            for item in items {
                let Value::Object(obj) = item else { return None };
                calls.push(call_from_object(obj)?);
            }
        }
        _ => return None,
    }
    let rest = body[stream.byte_offset()..].trim_start();
    if !rest.is_empty() {
        let after = rest.strip_prefix(';')?.trim_start();
        if !after.is_empty() {
            calls.extend(json_calls(after)?);
        }
    }
    Some(calls)
}

fn call_from_object(mut obj: Map<String, Value>) -> Option<ToolCall> {
    // Some models wrap the call as {"type": "function", "function": {...}}.
    if let Some(Value::Object(inner)) = obj.get("function") {
        if inner.contains_key("name") {
            let inner = inner.clone();
            return call_from_object(inner);
        }
    }
    let Value::String(name) = obj.remove("name")? else {
        return None;
    };
    let arguments = obj.remove("arguments").or_else(|| obj.remove("parameters"))?;
    let arguments = match arguments {
        Value::String(s) => match serde_json::from_str::<Value>(&s) {
            Ok(v @ Value::Object(_)) => v,
            _ => Value::String(s),
        },
        Value::Null => Value::Object(Map::new()),
        other => other,
    };
    Some(ToolCall { name, arguments })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn call(name: &str, arguments: Value) -> ToolCall {
        ToolCall {
            name: name.into(),
            arguments,
        }
    }

    #[test]
    fn qwen_hermes_blocks() {
        let reply = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"tz\": \"CET\"}}\n</tool_call>";
        assert_eq!(
            parse_tool_calls(reply),
            vec![
                call("get_weather", json!({"city": "Paris"})),
                call("get_time", json!({"tz": "CET"}))
            ]
        );
    }

    #[test]
    fn unterminated_block_and_string_arguments() {
        let reply = "<tool_call>\n{\"name\": \"f\", \"arguments\": \"{\\\"x\\\": 1}\"}";
        assert_eq!(parse_tool_calls(reply), vec![call("f", json!({"x": 1}))]);
    }

    #[test]
    fn invalid_block_is_skipped() {
        let reply = "<tool_call>\nnot json\n</tool_call><tool_call>{\"name\": \"g\", \"arguments\": {}}</tool_call>";
        assert_eq!(parse_tool_calls(reply), vec![call("g", json!({}))]);
    }

    #[test]
    fn llama_json() {
        let reply = "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\", \"unit\": \"celsius\"}}";
        assert_eq!(
            parse_tool_calls(reply),
            vec![call("get_weather", json!({"city": "Paris", "unit": "celsius"}))]
        );
        let tagged = "<|python_tag|>{\"name\": \"search\", \"arguments\": {\"q\": \"rust\"}}";
        assert_eq!(parse_tool_calls(tagged), vec![call("search", json!({"q": "rust"}))]);
        let several = " {\"name\": \"a\", \"parameters\": {}}; {\"name\": \"b\", \"parameters\": {\"k\": 1}}";
        assert_eq!(
            parse_tool_calls(several),
            vec![call("a", json!({})), call("b", json!({"k": 1}))]
        );
        let array = "[{\"name\": \"a\", \"arguments\": {}}]";
        assert_eq!(parse_tool_calls(array), vec![call("a", json!({}))]);
    }

    #[test]
    fn ordinary_text() {
        assert!(parse_tool_calls("The capital of France is Paris.").is_empty());
        assert!(parse_tool_calls("").is_empty());
        assert!(parse_tool_calls("{\"answer\": 42}").is_empty());
        assert!(parse_tool_calls("{\"name\": \"f\", \"parameters\": {}} and then some text").is_empty());
        assert!(parse_tool_calls("{not json").is_empty());
    }
}
