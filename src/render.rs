//! `kiln render`: the prompt a chat template makes of some messages, for debugging
//! what a model is really shown.

use std::path::{Path, PathBuf};

use kiln::models::{self, Checkpoint};
use kiln::registry;
use kiln_prompts::{ChatInput, ChatTemplate};
use serde_json::Value;

pub struct RenderArgs {
    pub template: Option<PathBuf>,
    pub model: Option<String>,
    pub messages: PathBuf,
    pub tools: Option<PathBuf>,
    pub add_generation_prompt: bool,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

pub fn render(args: RenderArgs) -> Result<String, Box<dyn std::error::Error>> {
    // The model's template and its BOS/EOS texts; flags override the tokens.
    let (source, bos, eos) = match (&args.template, &args.model) {
        (Some(file), _) => (read(file)?, String::new(), String::new()),
        (None, Some(model)) => {
            let checkpoint = Checkpoint::open(&registry::resolve(model)?)?;
            let source = models::chat_template(&checkpoint).ok_or_else(|| format!("{model} has no chat template"))?;
            let (bos, eos) = models::load_tokenizer(&checkpoint)?.bos_eos_texts();
            (source, bos, eos)
        }
        (None, None) => return Err("give --template FILE or --model M".into()),
    };
    let messages = match json(&args.messages)? {
        Value::Array(list) => list,
        Value::Object(mut object) => match object.remove("messages") {
            Some(Value::Array(list)) => list,
            _ => return Err(format!("{}: no `messages` array", args.messages.display()).into()),
        },
        _ => return Err(format!("{}: not an array of messages", args.messages.display()).into()),
    };
    let tools = match &args.tools {
        Some(file) => match json(file)? {
            Value::Array(list) => Some(list),
            _ => return Err(format!("{}: not an array of tools", file.display()).into()),
        },
        None => None,
    };
    let template = ChatTemplate::new(&source)?;
    let text = template.render(&ChatInput {
        messages: &messages,
        tools: tools.as_deref(),
        add_generation_prompt: args.add_generation_prompt,
        bos_token: args.bos_token.as_deref().unwrap_or(&bos),
        eos_token: args.eos_token.as_deref().unwrap_or(&eos),
        extra: None,
    })?;
    Ok(text)
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn json(path: &Path) -> Result<Value, String> {
    serde_json::from_str(&read(path)?).map_err(|e| format!("{}: invalid JSON: {e}", path.display()))
}
