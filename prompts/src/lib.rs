//! kiln-prompts: chat templates rendered as transformers renders them, and tool calls parsed out of replies.
//!
//! [`ChatTemplate`] renders a Hugging Face `chat_template` byte for byte as
//! `tokenizer.apply_chat_template(messages, tools=..., add_generation_prompt=..., tokenize=False, **extra)`
//! does (transformers compiles it in a jinja2 `ImmutableSandboxedEnvironment` with `trim_blocks`,
//! `lstrip_blocks`, `loopcontrols`, its own `tojson`, `raise_exception`, `strftime_now`, and the
//! `{% generation %}` tag). It runs on minijinja, configured and extended where minijinja and jinja2
//! differ (Python `str()` of values, `json.dumps`, Python string methods, jinja2's filters and tests).
//! [`parse_tool_calls`] reads the tool calls out of a reply.

mod date;
mod jinja;
mod ops;
mod py;
mod rewrite;
mod tool_calls;

use std::sync::Arc;

use minijinja::{Environment, Value};

pub use date::Date;
pub use tool_calls::{parse_tool_calls, ToolCall};

const NAME: &str = "chat_template";

/// The variables the renderer sets itself; `extra` may not set them.
const RESERVED: &[&str] = &["messages", "tools", "documents", "add_generation_prompt"];

/// A compiled chat template. Cheap to clone and share between threads.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Arc<Environment<'static>>,
    date: Option<Date>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("date", &self.date)
            .finish_non_exhaustive()
    }
}

/// What a chat template is rendered with.
#[derive(Clone, Copy, Debug)]
pub struct ChatInput<'a> {
    /// The conversation: `{"role": ..., "content": ..., maybe "tool_calls", "name", "tool_call_id", ...}`.
    /// As in transformers, keys whose value is `null` are dropped, and a reasoning field
    /// (`reasoning_content`, `thinking` or `reasoning`) is copied to both `thinking` and `reasoning_content`.
    pub messages: &'a [serde_json::Value],
    /// OpenAI-style tool JSON schemas. `None` renders with `tools` = none, as transformers passes
    /// `tools=None` (so `tools is defined` is true and `tools is none` is true).
    pub tools: Option<&'a [serde_json::Value]>,
    pub add_generation_prompt: bool,
    pub bos_token: &'a str,
    pub eos_token: &'a str,
    /// More template variables (e.g. `enable_thinking`); they override `bos_token` / `eos_token`.
    pub extra: Option<&'a serde_json::Map<String, serde_json::Value>>,
}

/// Why a template did not compile or render.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The template called `raise_exception(message)`; displays the message alone.
    #[error("{0}")]
    Raised(String),
    /// The template does not compile (minijinja's message, with the line).
    #[error(transparent)]
    Syntax(minijinja::Error),
    /// Rendering failed (minijinja's message, with the line).
    #[error(transparent)]
    Render(minijinja::Error),
    /// The input cannot be rendered: a message that is not an object, or an `extra` variable the
    /// renderer sets itself.
    #[error("{0}")]
    Input(String),
}

impl ChatTemplate {
    /// Compiles a template; syntax errors are reported here.
    pub fn new(source: &str) -> Result<ChatTemplate, TemplateError> {
        let mut env = jinja::environment();
        let source = rewrite::rewrite(NAME, source).map_err(TemplateError::Syntax)?;
        env.add_template_owned(NAME, source).map_err(TemplateError::Syntax)?;
        Ok(ChatTemplate {
            env: Arc::new(env),
            date: None,
        })
    }

    /// Fixes the date `strftime_now` reports (at 00:00:00) instead of today's date, for reproducible
    /// renders. Without it `strftime_now` formats the current time in UTC.
    pub fn with_date(mut self, date: Date) -> ChatTemplate {
        self.date = Some(date);
        self
    }

    /// Renders the template.
    pub fn render(&self, input: &ChatInput) -> Result<String, TemplateError> {
        let mut messages = Vec::with_capacity(input.messages.len());
        for (i, message) in input.messages.iter().enumerate() {
            let serde_json::Value::Object(message) = message else {
                return Err(TemplateError::Input(format!("message {i} is not a JSON object")));
            };
            messages.push(Value::from_serialize(normalize_message(message)));
        }
        let mut ctx: Vec<(String, Value)> = vec![
            ("bos_token".into(), Value::from(input.bos_token)),
            ("eos_token".into(), Value::from(input.eos_token)),
        ];
        if let Some(extra) = input.extra {
            for (key, value) in extra {
                if RESERVED.contains(&key.as_str()) {
                    return Err(TemplateError::Input(format!(
                        "extra variable `{key}` is set by the renderer"
                    )));
                }
                ctx.retain(|(k, _)| k != key);
                ctx.push((key.clone(), Value::from_serialize(value)));
            }
        }
        ctx.push(("messages".into(), Value::from(messages)));
        ctx.push((
            "tools".into(),
            input.tools.map_or(Value::from(()), Value::from_serialize),
        ));
        ctx.push(("documents".into(), Value::from(())));
        ctx.push(("add_generation_prompt".into(), Value::from(input.add_generation_prompt)));

        let template = self.env.get_template(NAME).map_err(TemplateError::Render)?;
        let previous = jinja::FIXED_DATE.with(|d| d.replace(self.date));
        let rendered = template.render(Value::from_iter(ctx));
        jinja::FIXED_DATE.with(|d| d.set(previous));
        rendered.map_err(render_error)
    }
}

fn render_error(err: minijinja::Error) -> TemplateError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    while let Some(e) = source {
        if let Some(raised) = e.downcast_ref::<jinja::Raised>() {
            return TemplateError::Raised(raised.0.clone());
        }
        source = e.source();
    }
    TemplateError::Render(err)
}

/// Reasoning is passed under these names; transformers fills the first two from whichever is set.
const REASONING_FIELDS: [&str; 3] = ["reasoning_content", "thinking", "reasoning"];

/// transformers' `_normalize_chat_messages` (drop null-valued keys) then `_alias_reasoning_fields`.
fn normalize_message(
    message: &serde_json::Map<String, serde_json::Value>,
) -> serde_json::Map<String, serde_json::Value> {
    let message: serde_json::Map<_, _> = message
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let Some(reasoning) = REASONING_FIELDS.iter().find_map(|k| message.get(*k)).cloned() else {
        return message;
    };
    // {"thinking": reasoning, **message, "reasoning_content": reasoning}
    let mut out = serde_json::Map::new();
    out.insert("thinking".into(), reasoning.clone());
    for (k, v) in message {
        out.insert(k, v);
    }
    out.insert("reasoning_content".into(), reasoning);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(src: &str, messages: &[serde_json::Value]) -> Result<String, TemplateError> {
        let input = ChatInput {
            messages,
            tools: None,
            add_generation_prompt: true,
            bos_token: "<s>",
            eos_token: "</s>",
            extra: None,
        };
        ChatTemplate::new(src)?.render(&input)
    }

    #[test]
    fn generation_block_renders_its_body() {
        let src = "{% for m in messages %}{%- generation -%}[{{ m.content }}]{%- endgeneration %}{% endfor %}";
        assert_eq!(
            render(src, &[json!({"role": "user", "content": "hi"})]).unwrap(),
            "[hi]"
        );
    }

    #[test]
    fn python_operators() {
        let src =
            "{{ 'a'|safe + '<b>' }} {{ none ~ true ~ 1.5 }} {{ '%s=%05.1f' % ('x', 2.25) }} {{ -7 % 3 }} {{ '-' * 3 }}";
        assert_eq!(render(src, &[]).unwrap(), "a&lt;b&gt; NoneTrue1.5 x=002.2 2 ---");
        assert!(render("{% for t in tools %}{% endfor %}", &[]).is_err());
    }

    #[test]
    fn raise_exception_message() {
        let err = render("{{ raise_exception('Conversation roles must alternate') }}", &[]).unwrap_err();
        assert!(matches!(err, TemplateError::Raised(_)));
        assert_eq!(err.to_string(), "Conversation roles must alternate");
    }

    #[test]
    fn syntax_error_at_new() {
        assert!(matches!(ChatTemplate::new("{% if %}"), Err(TemplateError::Syntax(_))));
    }

    #[test]
    fn python_values() {
        let src = "{{ none }} {{ true }} {{ 1.0 }} {{ messages[0] }} {{ messages[0]|tojson }} {{ 'a b'.split() }}";
        let out = render(src, &[json!({"role": "user", "content": "é\"", "n": null})]).unwrap();
        assert_eq!(
            out,
            "None True 1.0 {'role': 'user', 'content': 'é\"'} {\"role\": \"user\", \"content\": \"é\\\"\"} ['a', 'b']"
        );
    }

    #[test]
    fn reasoning_is_aliased() {
        let m = json!({"role": "assistant", "content": "x", "reasoning": "r", "thinking": null});
        let out = render("{{ messages[0]|tojson }}", &[m]).unwrap();
        assert_eq!(
            out,
            r#"{"thinking": "r", "role": "assistant", "content": "x", "reasoning": "r", "reasoning_content": "r"}"#
        );
    }

    #[test]
    fn fixed_date() {
        let t = ChatTemplate::new("{{ strftime_now('%d %b %Y') }}").unwrap();
        let t = t.with_date(Date {
            year: 2024,
            month: 7,
            day: 26,
        });
        let input = ChatInput {
            messages: &[],
            tools: None,
            add_generation_prompt: false,
            bos_token: "",
            eos_token: "",
            extra: None,
        };
        assert_eq!(t.render(&input).unwrap(), "26 Jul 2024");
    }

    #[test]
    fn send_sync() {
        fn check<T: Send + Sync>() {}
        check::<ChatTemplate>();
    }
}
