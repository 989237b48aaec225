//! kiln-models: reading model files (GGUF, Hugging Face safetensors checkpoints), building
//! their tokenizers, and one forward pass per architecture written against the runtime's
//! backend interface. Models know nothing about sessions or scheduling.

pub mod gguf;
pub mod safetensors;
pub mod tokenizer;
