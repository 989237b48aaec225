//! A chat over a session: messages in, replies out. Each turn renders the whole history
//! with the model's chat template (as `transformers.apply_chat_template` does) and feeds
//! the session only what it has not seen, so turn N costs the new tokens, not the
//! history again. Tool calls in a reply come back parsed.

use std::path::Path;

pub use kiln_prompts::ToolCall;
use kiln_prompts::{ChatInput, ChatTemplate};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{Engine, EngineError, GenerateOptions, Generation, Result, Session, SessionOptions};

/// Who says a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    /// A tool's result, answering an assistant's tool call.
    Tool,
}

/// One message of a chat.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
    /// The tools an assistant message calls.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// For a tool message: the tool's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Message {
        Message {
            role,
            content: content.into(),
            tool_calls: Vec::new(),
            name: None,
        }
    }

    pub fn user(content: impl Into<String>) -> Message {
        Message::new(Role::User, content)
    }

    /// The result of the tool `name`, for the model to read.
    pub fn tool(name: impl Into<String>, content: impl Into<String>) -> Message {
        Message {
            name: Some(name.into()),
            ..Message::new(Role::Tool, content)
        }
    }

    /// The message as chat templates read it (OpenAI's shape).
    fn to_json(&self) -> Value {
        let mut m = json!({ "role": self.role, "content": self.content });
        if !self.tool_calls.is_empty() {
            m["tool_calls"] = self
                .tool_calls
                .iter()
                .map(|c| json!({ "type": "function", "function": { "name": c.name, "arguments": c.arguments } }))
                .collect();
        }
        if let Some(name) = &self.name {
            m["name"] = json!(name);
        }
        m
    }
}

impl From<&str> for Message {
    fn from(text: &str) -> Message {
        Message::user(text)
    }
}

impl From<String> for Message {
    fn from(text: String) -> Message {
        Message::user(text)
    }
}

/// How a conversation runs.
#[derive(Clone, Debug, Default)]
pub struct ConversationOptions {
    /// The system prompt, first in the history.
    pub system: Option<String>,
    /// Tools the model may call (OpenAI-style JSON schemas), passed to the template.
    pub tools: Vec<Value>,
    /// Sampling, length, stop strings and cancellation of every reply.
    pub generate: GenerateOptions,
    /// A chat template to use instead of the model's own (Jinja source).
    pub template: Option<String>,
    /// More variables for the template (e.g. `enable_thinking`).
    pub template_vars: serde_json::Map<String, Value>,
}

/// What one turn produced.
#[derive(Clone, Debug)]
pub struct Reply {
    /// The reply as the history keeps it: without tool-call markup when it called tools.
    pub text: String,
    pub tool_calls: Vec<ToolCall>,
    pub generation: Generation,
}

/// Token counts of a conversation so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConversationStats {
    pub turns: usize,
    /// Tokens run through prefill over all turns.
    pub prefill_tokens: usize,
    /// Of those, tokens the session had seen before and ran again, because a re-rendered
    /// history differed from what the session held (a template that rewrites earlier
    /// turns, or a reply that tokenizes differently as text).
    pub reprefilled_tokens: usize,
    pub generated_tokens: usize,
}

pub struct Conversation {
    session: Session,
    template: ChatTemplate,
    bos: String,
    eos: String,
    options: ConversationOptions,
    messages: Vec<Message>,
    stats: ConversationStats,
}

impl Conversation {
    /// A conversation on a new session of `engine`, with the model's chat template (or
    /// `options.template`); an error if the model has none.
    pub fn new(engine: &Engine, options: ConversationOptions) -> Result<Conversation> {
        let source = options
            .template
            .as_deref()
            .or(engine.chat_template())
            .ok_or(EngineError::NoChatTemplate)?;
        let template = ChatTemplate::new(source).map_err(|e| EngineError::Template(e.to_string()))?;
        let (bos, eos) = engine.tokenizer().bos_eos_texts();
        let mut conversation = Conversation {
            session: engine.session(SessionOptions::default()),
            template,
            bos,
            eos,
            options,
            messages: Vec::new(),
            stats: ConversationStats::default(),
        };
        conversation.reset();
        Ok(conversation)
    }

    /// Sends `message` and waits for the reply.
    pub fn send(&mut self, message: impl Into<Message>) -> Result<Reply> {
        self.send_with(message, |_| {})
    }

    /// [`Conversation::send`], handing each piece of the reply's text to `on_text` as it
    /// is generated (whole UTF-8 characters).
    pub fn send_with(&mut self, message: impl Into<Message>, on_text: impl FnMut(&str)) -> Result<Reply> {
        self.messages.push(message.into());
        let result = self.reply(on_text);
        if result.is_err() {
            self.messages.pop();
        }
        result
    }

    fn reply(&mut self, on_text: impl FnMut(&str)) -> Result<Reply> {
        let prompt = self.render(true)?;
        let engine = &self.session.engine;
        let held = self.session.tokens();
        let held_text = engine.decode_bytes(&held);
        // Usually the new prompt is the session's text plus the new turn: then only that
        // tail is tokenized, and the reply keeps the tokens it was generated as (which
        // need not be how its text tokenizes afresh). Otherwise (a template that rewrites
        // earlier turns, a stop string cut from a reply) the prompt is tokenized whole
        // and the session keeps the tokens it has in common with it.
        let (keep, new_tokens) = match prompt.as_bytes().strip_prefix(&held_text[..]) {
            Some(tail) if !held.is_empty() && !tail.is_empty() && prompt.is_char_boundary(held_text.len()) => {
                (held.len(), engine.encode(&prompt[held_text.len()..])?)
            }
            _ => {
                let tokens = engine.encode(&prompt)?;
                let common = held.iter().zip(&tokens).take_while(|(a, b)| a == b).count();
                // At least one token must be new for the model to answer from.
                let keep = common.min(tokens.len().saturating_sub(1));
                (keep, tokens[keep..].to_vec())
            }
        };
        self.session.truncate(keep)?;
        let generation = self
            .session
            .generate_from_tokens_with(&new_tokens, &self.options.generate, on_text)?;
        self.stats.turns += 1;
        self.stats.prefill_tokens += new_tokens.len();
        self.stats.reprefilled_tokens += held.len() - keep;
        self.stats.generated_tokens += generation.tokens.len();
        let tool_calls = kiln_prompts::parse_tool_calls(&generation.text);
        let text = if tool_calls.is_empty() {
            generation.text.clone()
        } else {
            // The calls live in `tool_calls`; the template writes their markup again.
            text_before_tool_calls(&generation.text).to_string()
        };
        self.messages.push(Message {
            tool_calls: tool_calls.clone(),
            ..Message::new(Role::Assistant, text.clone())
        });
        Ok(Reply {
            text,
            tool_calls,
            generation,
        })
    }

    /// Adds a message to the history without generating: an assistant turn written by
    /// hand (few-shot examples, restored history, a tool call made elsewhere).
    pub fn push(&mut self, message: impl Into<Message>) {
        self.messages.push(message.into());
    }

    /// The history as the template renders it, with the assistant's cue when
    /// `add_generation_prompt`.
    pub fn render(&self, add_generation_prompt: bool) -> Result<String> {
        let messages: Vec<Value> = self.messages.iter().map(Message::to_json).collect();
        let input = ChatInput {
            messages: &messages,
            tools: (!self.options.tools.is_empty()).then_some(&self.options.tools[..]),
            add_generation_prompt,
            bos_token: &self.bos,
            eos_token: &self.eos,
            extra: Some(&self.options.template_vars),
        };
        self.template
            .render(&input)
            .map_err(|e| EngineError::Template(e.to_string()))
    }

    /// The messages so far, the system prompt first.
    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    /// Starts over: only the system prompt stays. The session keeps its tokens, so the
    /// next turn reuses whatever prefix still matches.
    pub fn reset(&mut self) {
        self.messages.clear();
        if let Some(system) = &self.options.system {
            self.messages.push(Message::new(Role::System, system.clone()));
        }
        self.stats = ConversationStats::default();
    }

    /// Replaces the system prompt (and keeps the rest of the history).
    pub fn set_system(&mut self, system: Option<String>) {
        if self.messages.first().is_some_and(|m| m.role == Role::System) {
            self.messages.remove(0);
        }
        if let Some(text) = &system {
            self.messages.insert(0, Message::new(Role::System, text.clone()));
        }
        self.options.system = system;
    }

    pub fn options(&self) -> &ConversationOptions {
        &self.options
    }

    /// The options of later turns (sampling, cancellation, tools).
    pub fn options_mut(&mut self) -> &mut ConversationOptions {
        &mut self.options
    }

    pub fn stats(&self) -> ConversationStats {
        self.stats
    }

    /// The session underneath, for its statistics.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Writes the messages to `path` as JSON (`{"messages": [...]}`), atomically.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let text = serde_json::to_string_pretty(&json!({ "messages": self.messages })).expect("messages serialize");
        let tmp = path.with_extension("tmp-kiln");
        std::fs::write(&tmp, text + "\n")
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                EngineError::ConversationFile {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                }
            })
    }

    /// Replaces the history with the messages saved in `path` by [`Conversation::save`];
    /// the next turn prefills whatever of them the session has not seen.
    pub fn load(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bad = |reason: String| EngineError::ConversationFile {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        #[derive(Deserialize)]
        struct Saved {
            messages: Vec<Message>,
        }
        let saved: Saved = serde_json::from_str(&text).map_err(|e| bad(format!("not a saved conversation: {e}")))?;
        self.options.system = saved
            .messages
            .first()
            .filter(|m| m.role == Role::System)
            .map(|m| m.content.clone());
        self.messages = saved.messages;
        Ok(())
    }
}

/// The text of a reply before its first tool call's markup.
fn text_before_tool_calls(text: &str) -> &str {
    if text.trim_start().starts_with('{') {
        // A reply that is one JSON call (Llama 3.x) has no text besides it.
        return "";
    }
    let end = ["<tool_call>", "<|python_tag|>"]
        .iter()
        .filter_map(|m| text.find(m))
        .min()
        .unwrap_or(text.len());
    text[..end].trim_end()
}
