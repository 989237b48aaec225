//! Tokenizers for a GGUF file's `tokenizer.ggml.*` metadata (so a GGUF model needs no
//! side files), or loaded from a Hugging Face `tokenizer.json`.
//!
//! A GGUF vocabulary is encoded by kiln's own BPE ([`GgufEncoder`]), which needs only a
//! text-to-id index and, for merge-list vocabularies, a pair-to-rank map: building a
//! Hugging Face BPE model instead (and, for SentencePiece, a merge list of every split
//! of every piece) took seconds for a 262k-token vocabulary and dominated model load.
//! Its results are by construction those of the [`tokenizers::Tokenizer`] that
//! [`TokenizerInfo::tokenizer`] gives, which is built from the same vocabulary on first
//! use (tests compare the two; Hugging Face tokenizers also writes it as
//! `tokenizer.json`).
//!
//! GGUF vocabulary kinds, mirroring llama.cpp:
//!
//! * `gpt2`: byte-level BPE with merges. The pre-tokenizer is the Split regex (or
//!   regexes, applied in turn) that `tokenizer.ggml.pre` names, followed by the GPT-2
//!   byte-to-unicode mapping. The regexes are the ones of the original `tokenizer.json`
//!   files (run by Oniguruma, as in Hugging Face tokenizers), not llama.cpp's hand-written
//!   rewrites of them.
//! * `llama`: SentencePiece BPE (pieces with scores, no merges). Spaces become `▁`, a
//!   `▁` is prepended to every piece of text when `add_space_prefix` (the default; Gemma
//!   turns it off), the adjacent pair whose union has the highest score merges first, and
//!   characters outside the vocabulary fall back to `<0xNN>` byte pieces. Merging by
//!   score is BPE whose merges are every split of a piece into two pieces of the
//!   vocabulary, ranked by the piece's score (as Hugging Face's SentencePiece converters
//!   make the merge list; kiln ranks a pair when it meets it, by looking up the joined
//!   text).
//! * `gemma4`: BPE with merges over SentencePiece-style text (spaces as `▁`, merges within
//!   a line, `<0xNN>` byte fallback).
//!
//! Control, unknown and user-defined tokens (`tokenizer.ggml.token_type`) become added
//! tokens matched on the raw text before anything else, so special tokens written in a
//! prompt (`<|im_start|>`, `<start_of_turn>`) encode as one token (llama.cpp's
//! `parse_special = true`). Control and unknown tokens are marked special, user-defined
//! ones are not: `Tokenizer::set_encode_special_tokens(true)` then gives llama.cpp's
//! `parse_special = false`, where user-defined tokens (Gemma's runs of spaces, tabs and
//! newlines, HTML tags) are still matched as whole tokens.
//!
//! The end-of-generation ids are llama.cpp's: eos, eot, eom, tokens whose text is on its
//! list (`<|im_end|>`, `<end_of_turn>`, `<|endoftext|>`, `</s>`, ...) and the FIM
//! pad/repo/file-separator tokens.
//!
//! A prompt is encoded with [`TokenizerInfo::encode`] (no BOS; the caller prepends
//! [`TokenizerInfo::bos`] when [`TokenizerInfo::add_bos`]) or
//! [`TokenizerInfo::encode_prompt`]. Decoding by [`TokenizerInfo::token_bytes`] and
//! [`TokenizerInfo::decode_bytes`] gives back exact bytes, also for tokens that hold part
//! of a UTF-8 sequence (byte-level BPE bytes, `<0xNN>` pieces), which streaming output
//! needs.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer,
};

use crate::gguf::GgufFile;

/// SentencePiece's whitespace marker, U+2581.
const SPM_SPACE: &str = "\u{2581}";

/// Errors building or loading a tokenizer. Messages are one line.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read `{}`: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("`{}` is not valid JSON: {source}", path.display())]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("unsupported tokenizer.ggml.model `{0}` (kiln supports `gpt2`, `llama` and `gemma4`)")]
    UnknownModel(String),
    #[error("unsupported tokenizer.ggml.pre `{0}`: kiln does not know this pre-tokenizer's regexes")]
    UnknownPre(String),
    #[error("invalid tokenizer metadata: {0}")]
    Invalid(String),
    #[error("tokenizer: {0}")]
    Tokenizers(String),
}

impl From<tokenizers::Error> for TokenizerError {
    fn from(e: tokenizers::Error) -> Self {
        TokenizerError::Tokenizers(e.to_string())
    }
}

/// The tokenizer part of a GGUF file's metadata (`tokenizer.ggml.*`), owned, so that a
/// tokenizer can be built without a [`GgufFile`] (tests, synthetic vocabularies).
#[derive(Clone, Debug, Default)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: `"gpt2"` (byte-level BPE) or `"llama"` (SentencePiece).
    pub model: String,
    /// `tokenizer.ggml.pre`: which pre-tokenizer regexes a `gpt2` vocabulary uses.
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`: token text by id.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.scores` (SentencePiece piece scores).
    pub scores: Option<Vec<f32>>,
    /// `tokenizer.ggml.token_type`: 1 normal, 2 unknown, 3 control, 4 user-defined,
    /// 5 unused, 6 byte.
    pub token_types: Option<Vec<i32>>,
    /// `tokenizer.ggml.merges`: `"left right"` by rank (BPE).
    pub merges: Option<Vec<String>>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// `tokenizer.ggml.eot_token_id` (end of turn).
    pub eot: Option<u32>,
    /// `tokenizer.ggml.eom_token_id` (end of message).
    pub eom: Option<u32>,
    pub unk: Option<u32>,
    /// Fill-in-the-middle pad, repository and file-separator tokens: llama.cpp ends
    /// generation on them.
    pub fim_pad: Option<u32>,
    pub fim_rep: Option<u32>,
    pub fim_sep: Option<u32>,
    pub add_bos: Option<bool>,
    pub add_eos: Option<bool>,
    /// `tokenizer.ggml.add_space_prefix` (SentencePiece; default true).
    pub add_space_prefix: Option<bool>,
}

impl GgufVocab {
    /// Reads the `tokenizer.ggml.*` metadata of a GGUF file.
    pub fn from_gguf(f: &GgufFile) -> Result<GgufVocab, TokenizerError> {
        const P: &str = "tokenizer.ggml.";
        let key = |k: &str| format!("{P}{k}");
        let model = f
            .get_str(&key("model"))
            .ok_or_else(|| TokenizerError::Invalid("GGUF has no string `tokenizer.ggml.model`".into()))?
            .to_string();
        let tokens = f
            .get_str_array(&key("tokens"))
            .ok_or_else(|| TokenizerError::Invalid("GGUF has no string array `tokenizer.ggml.tokens`".into()))?
            .to_vec();
        let array_of = |k: &str, what: &str| -> Result<(), TokenizerError> {
            match f.get(&key(k)) {
                None => Ok(()),
                Some(_) => Err(TokenizerError::Invalid(format!("`tokenizer.ggml.{k}` is not {what}"))),
            }
        };
        let scores = match f.get_f32_array(&key("scores")) {
            Some(s) => Some(s),
            None => {
                array_of("scores", "a numeric array")?;
                None
            }
        };
        let token_types = match f.get_i32_array(&key("token_type")) {
            Some(t) => Some(t),
            None => {
                array_of("token_type", "an integer array")?;
                None
            }
        };
        let merges = match f.get_str_array(&key("merges")) {
            Some(m) => Some(m.to_vec()),
            None => {
                array_of("merges", "a string array")?;
                None
            }
        };
        let id = |k: &str| f.get_u32(&key(k));
        Ok(GgufVocab {
            model,
            pre: f.get_str(&key("pre")).map(str::to_string),
            tokens,
            scores,
            token_types,
            merges,
            bos: id("bos_token_id"),
            eos: id("eos_token_id"),
            eot: id("eot_token_id"),
            eom: id("eom_token_id"),
            unk: id("unknown_token_id"),
            fim_pad: id("fim_pad_token_id"),
            fim_rep: id("fim_rep_token_id"),
            fim_sep: id("fim_sep_token_id"),
            add_bos: f.get_bool(&key("add_bos_token")),
            add_eos: f.get_bool(&key("add_eos_token")),
            add_space_prefix: f.get_bool(&key("add_space_prefix")),
        })
    }
}

/// A tokenizer with what generation needs to know about it.
#[derive(Clone)]
pub struct TokenizerInfo {
    /// The Hugging Face tokenizer: encodes with special tokens in the text parsed as
    /// single tokens; adds no BOS. For a GGUF vocabulary it is built on first use and
    /// encodes as [`TokenizerInfo::encode`] does.
    pub tokenizer: HfTokenizer,
    pub bos: Option<u32>,
    /// Every end-of-generation id (eos, eot, eom, and the tokens llama.cpp marks as EOG,
    /// such as `<|im_end|>` or `<end_of_turn>`); the model's own eos first, the rest
    /// ascending.
    pub eos: Vec<u32>,
    /// Whether a prompt starts with [`TokenizerInfo::bos`].
    pub add_bos: bool,
    /// Whether the model wants an eos appended to an encoded sequence (rare; not for
    /// prompts of a generation).
    pub add_eos: bool,
    /// SentencePiece prefix space: encoding put a space before the text, so decoding
    /// drops the first token's leading space.
    pub add_space_prefix: bool,
    /// Exact bytes of each token id (special tokens as their text).
    pieces: Pieces,
    /// kiln's encoder of a GGUF vocabulary; `None` for a `tokenizer.json`, which
    /// [`TokenizerInfo::tokenizer`] encodes.
    encoder: Option<Arc<GgufEncoder>>,
}

/// A [`TokenizerInfo`]'s Hugging Face [`Tokenizer`], used through `Deref`/`DerefMut`.
/// One for a GGUF vocabulary is built from it when first dereferenced: kiln encodes
/// GGUF vocabularies itself and would otherwise pay for building a BPE model at load.
#[derive(Clone)]
pub struct HfTokenizer {
    tokenizer: OnceLock<Tokenizer>,
    /// What to build the tokenizer from when it is not there yet.
    source: Option<Arc<GgufEncoder>>,
}

impl HfTokenizer {
    fn ready(tokenizer: Tokenizer) -> HfTokenizer {
        HfTokenizer {
            tokenizer: OnceLock::from(tokenizer),
            source: None,
        }
    }
}

impl Deref for HfTokenizer {
    type Target = Tokenizer;
    fn deref(&self) -> &Tokenizer {
        self.tokenizer.get_or_init(|| {
            self.source
                .as_ref()
                .expect("an HfTokenizer without a tokenizer has a source")
                .hf_tokenizer()
        })
    }
}

impl DerefMut for HfTokenizer {
    fn deref_mut(&mut self) -> &mut Tokenizer {
        self.deref();
        self.tokenizer.get_mut().expect("deref built the tokenizer")
    }
}

/// The bytes of every token, in one buffer (a vocabulary has up to hundreds of
/// thousands of tokens; one allocation each was a measurable part of load).
#[derive(Clone, Default)]
struct Pieces {
    bytes: Vec<u8>,
    /// Where each token's bytes end in `bytes`.
    ends: Vec<usize>,
}

impl Pieces {
    fn with_capacity(n: usize) -> Pieces {
        Pieces {
            bytes: Vec::with_capacity(n * 8),
            ends: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, piece: &[u8]) {
        self.bytes.extend_from_slice(piece);
        self.ends.push(self.bytes.len());
    }

    fn len(&self) -> usize {
        self.ends.len()
    }

    fn get(&self, id: usize) -> Option<&[u8]> {
        let end = *self.ends.get(id)?;
        let start = if id == 0 { 0 } else { self.ends[id - 1] };
        Some(&self.bytes[start..end])
    }
}

impl std::fmt::Debug for TokenizerInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenizerInfo")
            .field("vocab_size", &self.pieces.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .field("add_space_prefix", &self.add_space_prefix)
            .finish()
    }
}

impl TokenizerInfo {
    /// Builds the tokenizer of a GGUF file.
    pub fn from_gguf(f: &GgufFile) -> Result<TokenizerInfo, TokenizerError> {
        from_gguf_vocab(&GgufVocab::from_gguf(f)?)
    }

    /// Encodes text, special tokens in it included, without BOS.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        match &self.encoder {
            Some(e) => e.encode(text, true),
            None => Ok(self.tokenizer.encode_fast(text, false)?.get_ids().to_vec()),
        }
    }

    /// Encodes text whose special-token spellings are plain text (llama.cpp's
    /// `parse_special = false`, as llama-perplexity tokenizes), without BOS.
    pub fn encode_literal(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        match &self.encoder {
            Some(e) => e.encode(text, false),
            None => {
                let mut literal = (*self.tokenizer).clone();
                literal.set_encode_special_tokens(true);
                Ok(literal.encode_fast(text, false)?.get_ids().to_vec())
            }
        }
    }

    /// Encodes a prompt: BOS first when the model wants it, then [`TokenizerInfo::encode`].
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let mut ids = Vec::new();
        if self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend(self.encode(text)?);
        Ok(ids)
    }

    /// The number of token ids (the largest id plus one).
    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// The exact bytes a token stands for (a special token's text); empty for an
    /// unknown id or an unused token.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.pieces.get(id as usize).unwrap_or_default()
    }

    /// The bytes of a token sequence: the tokens' bytes joined, less the prefix space
    /// that encoding added when [`TokenizerInfo::add_space_prefix`].
    pub fn decode_bytes(&self, ids: &[u32]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            let piece = self.token_bytes(id);
            if i == 0 && self.add_space_prefix && piece.first() == Some(&b' ') {
                out.extend_from_slice(&piece[1..]);
            } else {
                out.extend_from_slice(piece);
            }
        }
        out
    }

    /// [`TokenizerInfo::decode_bytes`] as text (invalid UTF-8 replaced with U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> String {
        String::from_utf8_lossy(&self.decode_bytes(ids)).into_owned()
    }

    /// Whether a token ends generation.
    pub fn is_eog(&self, id: u32) -> bool {
        self.eos.contains(&id)
    }
}

// ---------------------------------------------------------------------------------------
// Token attributes, as llama.cpp derives them from `tokenizer.ggml.token_type`.

const ATTR_UNKNOWN: u8 = 1;
const ATTR_UNUSED: u8 = 2;
const ATTR_NORMAL: u8 = 4;
const ATTR_CONTROL: u8 = 8;
const ATTR_USER_DEFINED: u8 = 16;
const ATTR_BYTE: u8 = 32;

fn attr_of_type(t: i32) -> u8 {
    match t {
        1 => ATTR_NORMAL,
        2 => ATTR_UNKNOWN,
        3 => ATTR_CONTROL,
        4 => ATTR_USER_DEFINED,
        5 => ATTR_UNUSED,
        6 => ATTR_BYTE,
        _ => 0,
    }
}

/// Texts of tokens that end generation (llama.cpp's list, matched on the token text).
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<\u{ff5c}end\u{2581}of\u{2581}sentence\u{ff5c}>",
    "[e~[",
];
/// Fill-in-the-middle tokens that end generation when the metadata names none.
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_TEXTS: &[&str] = &["<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];

/// The end-of-generation set, as llama.cpp computes it; may adjust `attrs` the way
/// llama.cpp does (EOG-looking tokens become control tokens).
struct EogSpec<'a> {
    eos: Option<u32>,
    eot: Option<u32>,
    eom: Option<u32>,
    fim_pad: Option<u32>,
    fim_rep: Option<u32>,
    fim_sep: Option<u32>,
    /// The id of a token text.
    by_text: &'a dyn Fn(&str) -> Option<u32>,
}

fn eog_ids(spec: &EogSpec<'_>, attrs: &mut [u8]) -> Vec<u32> {
    let n = attrs.len() as u32;
    let in_range = |id: Option<u32>| id.filter(|&i| i < n);
    let find = |texts: &[&str]| texts.iter().find_map(|t| (spec.by_text)(t));
    let mut set = BTreeSet::new();
    for id in [
        in_range(spec.fim_pad).or_else(|| find(FIM_PAD_TEXTS)),
        in_range(spec.fim_rep).or_else(|| find(FIM_REP_TEXTS)),
        in_range(spec.fim_sep).or_else(|| find(FIM_SEP_TEXTS)),
    ]
    .into_iter()
    .flatten()
    {
        set.insert(id);
    }
    for t in EOG_TEXTS {
        if let Some(id) = (spec.by_text)(t) {
            set.insert(id);
            attrs[id as usize] |= ATTR_CONTROL;
        }
    }
    for id in [in_range(spec.eos), in_range(spec.eot), in_range(spec.eom)]
        .into_iter()
        .flatten()
    {
        set.insert(id);
    }
    // `<|end|>` is not an end of generation next to `<|return|>` and `<|call|>`
    // (o200k_harmony) or `<|calls|>` and `<|flush|>` (solar-open).
    let has = |set: &BTreeSet<u32>, t: &str| (spec.by_text)(t).is_some_and(|id| set.contains(&id));
    if let Some(end) = (spec.by_text)("<|end|>") {
        if set.contains(&end)
            && ((has(&set, "<|return|>") && has(&set, "<|call|>"))
                || (has(&set, "<|calls|>") && has(&set, "<|flush|>")))
        {
            set.remove(&end);
            attrs[end as usize] = ATTR_USER_DEFINED;
        }
    }
    // `</s>` is an ordinary token next to `<|tool_response>` (gemma4) or `<|plamo:eos|>`.
    if let Some(s) = (spec.by_text)("</s>") {
        if set.contains(&s) && (has(&set, "<|tool_response>") || has(&set, "<|plamo:eos|>")) {
            set.remove(&s);
            attrs[s as usize] = ATTR_NORMAL;
        }
    }
    let mut out = Vec::with_capacity(set.len());
    if let Some(e) = in_range(spec.eos).filter(|e| set.contains(e)) {
        out.push(e);
        set.remove(&e);
    }
    out.extend(set);
    out
}

// ---------------------------------------------------------------------------------------
// Pre-tokenizer regexes of byte-level BPE vocabularies, by `tokenizer.ggml.pre`.

const GPT2_RE: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3_RE: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_RE: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN35_RE: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O_RE: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN_RE: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const SEED_CODER_RE: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+";
const UFAKZEKA_RE: &str = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const MINICPM5_RE: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const BLOOM_RE: &str = " ?[^(\\s|.,!?\u{2026}\u{3002}\u{ff0c}\u{3001}\u{964}\u{6d4}\u{60c})]+";
const CJK_RE: &str = "[\u{4e00}-\u{9fa5}\u{800}-\u{4e00}\u{ac00}-\u{d7ff}]+";
const DEEPSEEK_LLM_LETTERS_RE: &str = "\\s?[A-Za-z\u{b5}\u{c0}-\u{d6}\u{d8}-\u{f6}\u{f8}-\u{1ba}\u{1bc}-\u{1bf}\u{1c4}-\u{293}\u{295}-\u{2af}\u{370}-\u{373}\u{376}\u{377}\u{37b}-\u{37d}\u{37f}\u{386}\u{388}-\u{38a}\u{38c}\u{38e}-\u{3a1}\u{3a3}-\u{3f5}\u{3f7}-\u{481}\u{48a}-\u{52f}\u{531}-\u{556}\u{10a0}-\u{10c5}\u{13a0}-\u{13f5}\u{13f8}-\u{13fd}\u{1c90}-\u{1cba}\u{1cbd}-\u{1cbf}\u{1d00}-\u{1d2b}\u{1d6b}-\u{1d77}\u{1d79}-\u{1d9a}\u{1e00}-\u{1f15}\u{1f18}-\u{1f1d}\u{1f20}-\u{1f45}\u{1f48}-\u{1f4d}\u{1f50}-\u{1f57}\u{1f59}\u{1f5b}\u{1f5d}\u{1f5f}-\u{1f7d}\u{1f80}-\u{1fb4}\u{1fb6}-\u{1fbc}\u{1fbe}\u{1fc2}-\u{1fc4}\u{1fc6}-\u{1fcc}\u{1fd0}-\u{1fd3}\u{1fd6}-\u{1fdb}\u{1fe0}-\u{1fec}\u{1ff2}-\u{1ff4}\u{1ff6}-\u{1ffc}\u{2102}\u{2107}\u{210a}-\u{2113}\u{2115}\u{2119}-\u{211d}\u{2124}\u{2126}\u{2128}\u{212a}-\u{212d}\u{212f}-\u{2134}\u{2139}\u{213c}-\u{213f}\u{2145}-\u{2149}\u{214e}\u{2183}\u{2184}\u{2c00}-\u{2c7b}\u{2c7e}-\u{2ce4}\u{2ceb}-\u{2cee}\u{2cf2}\u{2cf3}\u{a640}-\u{a66d}\u{a680}-\u{a69b}\u{a722}-\u{a76f}\u{a771}-\u{a787}\u{a78b}-\u{a78e}\u{ab70}-\u{abbf}\u{fb00}-\u{fb06}\u{fb13}-\u{fb17}\u{ff21}-\u{ff3a}\u{ff41}-\u{ff5a}\u{10400}-\u{1044f}\u{104b0}-\u{104d3}\u{104d8}-\u{104fb}\u{10c80}-\u{10cb2}\u{10cc0}-\u{10cf2}\u{118a0}-\u{118df}\u{1e900}-\u{1e943}]+";
const DEEPSEEK_LLM_PUNCT_RE: &str = "\\s?[!-/:-~\u{ff01}-\u{ff0f}\u{ff1a}-\u{ff5e}\u{2018}-\u{201f}\u{3000}-\u{3002}]+";

/// How a byte-level BPE vocabulary pre-tokenizes, and llama.cpp's defaults that go with it.
#[derive(Clone, Copy, Debug)]
struct BpePre {
    /// Split regexes, each applied to the pieces the previous ones left (matches and the
    /// text between them both kept).
    regexes: &'static [&'static str],
    /// Split regexes applied after the byte-to-unicode mapping (to its stand-in characters).
    after_bytes: &'static [&'static str],
    /// A pre-tokenized word that is itself a token is taken whole, without merging.
    ignore_merges: bool,
    /// Default of `add_bos` when the metadata has no `tokenizer.ggml.add_bos_token`.
    add_bos: bool,
    /// The BOS id is meaningless (llama.cpp drops it).
    no_bos: bool,
}

fn bpe_pre(pre: Option<&str>) -> Result<BpePre, TokenizerError> {
    const fn p(regexes: &'static [&'static str]) -> BpePre {
        BpePre {
            regexes,
            after_bytes: &[],
            ignore_merges: false,
            add_bos: false,
            no_bos: false,
        }
    }
    const DEFAULT: &[&str] = &[r"[\p{P}\$\+<=>\^~\|]+", GPT2_RE, r"\p{N}+", "[0-9][0-9][0-9]"];
    let Some(pre) = pre else {
        // llama.cpp warns about a missing pre-tokenizer type and uses its default.
        return Ok(p(DEFAULT));
    };
    Ok(match pre {
        "default" => p(DEFAULT),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2"
        | "jina-v5-nano" => BpePre {
            ignore_merges: true,
            add_bos: true,
            ..p(&[LLAMA3_RE])
        },
        "dbrx" | "smaug-bpe" => p(&[LLAMA3_RE]),
        "chatglm-bpe" => BpePre {
            no_bos: true,
            ..p(&[LLAMA3_RE])
        },
        "glm4" | "glm5" => BpePre {
            no_bos: true,
            ignore_merges: true,
            ..p(&[LLAMA3_RE])
        },
        "deepseek-llm" => p(&[
            "[\r\n]",
            DEEPSEEK_LLM_LETTERS_RE,
            DEEPSEEK_LLM_PUNCT_RE,
            r"\s+$",
            CJK_RE,
            r"\p{N}+",
        ]),
        "deepseek-coder" => p(&["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", CJK_RE, r"\p{N}"]),
        // Falcon's tokenizer.json splits digit runs after the byte-level step.
        "falcon" => BpePre {
            after_bytes: &[r"\p{N}+", "[0-9][0-9][0-9]"],
            ..p(&[r"[\p{P}\$\+<=>\^~\|`]+", GPT2_RE])
        },
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b" | "mellum2" => {
            p(&[r"\p{N}", GPT2_RE])
        }
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de" | "a.x-4.0" | "mellum"
        | "modern-bert" | "mpt" | "olmo" | "jais" | "trillion" | "granite-docling" | "exaone4" | "jina-v1-en"
        | "jina-v2-code" | "roberta-bpe" => p(&[GPT2_RE]),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" | "stablelm2" | "hunyuan" | "solar-open"
        | "grok-2" => p(&[QWEN2_RE]),
        "qwen35" => p(&[QWEN35_RE]),
        "poro-chat" | "bloom" | "gpt3-finnish" => p(&[BLOOM_RE]),
        "viking" => p(&[BLOOM_RE, r"\p{N}"]),
        "tekken" => BpePre {
            ignore_merges: true,
            add_bos: true,
            ..p(&[TEKKEN_RE])
        },
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => p(&[GPT4O_RE]),
        "seed-coder" => p(&[SEED_CODER_RE]),
        "ufakzeka" => p(&[UFAKZEKA_RE]),
        "minicpm5" => BpePre {
            ignore_merges: true,
            ..p(&[r"\p{N}{1,3}", MINICPM5_RE])
        },
        other => return Err(TokenizerError::UnknownPre(other.to_string())),
    })
}

// ---------------------------------------------------------------------------------------
// Building from GGUF metadata.

/// Builds the tokenizer that a GGUF vocabulary describes.
pub fn from_gguf_vocab(v: &GgufVocab) -> Result<TokenizerInfo, TokenizerError> {
    let n = v.tokens.len();
    if n == 0 {
        return Err(TokenizerError::Invalid("tokenizer.ggml.tokens is empty".into()));
    }
    if n > u32::MAX as usize {
        return Err(TokenizerError::Invalid(format!("{n} tokens is too many")));
    }
    if let Some(s) = &v.scores {
        if s.len() < n {
            return Err(TokenizerError::Invalid(format!("{} scores for {n} tokens", s.len())));
        }
    }
    if let Some(t) = &v.token_types {
        if t.len() < n {
            return Err(TokenizerError::Invalid(format!(
                "{} token types for {n} tokens",
                t.len()
            )));
        }
    }
    let kind = match v.model.as_str() {
        "llama" => Kind::Spm,
        "gpt2" => Kind::ByteBpe(bpe_pre(v.pre.as_deref())?),
        "gemma4" => Kind::SpmBpe,
        other => return Err(TokenizerError::UnknownModel(other.to_string())),
    };
    // Token text is SentencePiece-style (`▁` for a space, `<0xNN>` byte pieces).
    let spm_text = !matches!(kind, Kind::ByteBpe(_));

    // Token texts; llama.cpp names empty ones so that every id has a distinct text.
    let texts: Vec<String> = v
        .tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            if t.is_empty() {
                format!("[EMPTY_{i}]")
            } else {
                t.clone()
            }
        })
        .collect();
    let mut attrs: Vec<u8> = match &v.token_types {
        Some(t) => t[..n].iter().map(|&t| attr_of_type(t)).collect(),
        None => vec![ATTR_NORMAL; n],
    };
    // Text to id; the last of equal texts wins, as in llama.cpp.
    let by_text: HashMap<&str, u32> = texts.iter().enumerate().map(|(i, t)| (t.as_str(), i as u32)).collect();

    let in_vocab = |id: Option<u32>| id.filter(|&i| (i as usize) < n);
    // llama.cpp's defaults when the metadata names no token.
    let (bos, eos, unk) = match kind {
        Kind::Spm => (v.bos.or(Some(1)), v.eos.or(Some(2)), v.unk.or(Some(0))),
        Kind::ByteBpe(pre) if pre.no_bos => (None, v.eos, v.unk),
        _ => (v.bos, v.eos, v.unk),
    };
    let (bos, eos, unk) = (in_vocab(bos), in_vocab(eos), in_vocab(unk));
    let add_bos_default = match kind {
        Kind::Spm => true,
        Kind::ByteBpe(pre) => pre.add_bos,
        Kind::SpmBpe => true,
    };
    let mut add_bos = v.add_bos.unwrap_or(add_bos_default);
    if matches!(kind, Kind::SpmBpe) {
        // llama.cpp overrides `add_bos_token = false` for Gemma 4.
        add_bos = true;
    }

    let eos_ids = eog_ids(
        &EogSpec {
            eos,
            eot: v.eot,
            eom: v.eom,
            fim_pad: v.fim_pad,
            fim_rep: v.fim_rep,
            fim_sep: v.fim_sep,
            by_text: &by_text,
        },
        &mut attrs,
    );
    // gpt-oss: these are always rendered, never control tokens.
    for t in ["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"] {
        if let Some(&id) = by_text.get(t) {
            attrs[id as usize] = ATTR_USER_DEFINED;
        }
    }

    let vocab: Vocab = by_text.iter().map(|(t, &i)| (t.to_string(), i)).collect();
    let add_space_prefix = matches!(kind, Kind::Spm) && v.add_space_prefix.unwrap_or(true);
    let gguf_merges = || -> Result<Vec<(String, String)>, TokenizerError> {
        let m = v.merges.as_ref().ok_or_else(|| {
            TokenizerError::Invalid(format!("a `{}` vocabulary needs tokenizer.ggml.merges", v.model))
        })?;
        bpe_merges(m, &by_text)
    };
    let mut tokenizer = match kind {
        Kind::Spm | Kind::SpmBpe => {
            let merges = if matches!(kind, Kind::Spm) {
                let scores = v.scores.as_ref().ok_or_else(|| {
                    TokenizerError::Invalid("a `llama` vocabulary needs tokenizer.ggml.scores".into())
                })?;
                spm_merges(&texts, &scores[..n], &by_text)
            } else {
                gguf_merges()?
            };
            let mut model = BPE::builder()
                .vocab_and_merges(vocab, merges)
                .byte_fallback(true)
                .fuse_unk(true);
            if let Some(u) = unk {
                model = model.unk_token(texts[u as usize].clone());
            }
            let mut tok = Tokenizer::new(model.build()?);
            let replace = Replace::new(" ", SPM_SPACE)?;
            let normalizer: NormalizerWrapper = if add_space_prefix {
                NormalizerSequence::new(vec![Prepend::new(SPM_SPACE.to_string()).into(), replace.into()]).into()
            } else {
                replace.into()
            };
            tok.with_normalizer(Some(normalizer));
            if matches!(kind, Kind::SpmBpe) {
                // Merges run over whole lines; newlines only split.
                let split = Split::new(
                    SplitPattern::Regex("[^\n]+|[\n]+".into()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )?;
                tok.with_pre_tokenizer(Some(split));
            }
            let mut decoders: Vec<DecoderWrapper> = vec![
                Replace::new(SPM_SPACE, " ")?.into(),
                ByteFallback::new().into(),
                Fuse::new().into(),
            ];
            if add_space_prefix {
                decoders.push(Strip::new(' ', 1, 0).into());
            }
            tok.with_decoder(Some(DecoderSequence::new(decoders)));
            tok
        }
        Kind::ByteBpe(pre) => {
            let model = BPE::builder()
                .vocab_and_merges(vocab, gguf_merges()?)
                .ignore_merges(pre.ignore_merges)
                .build()?;
            let mut tok = Tokenizer::new(model);
            let split = |re: &str| -> Result<PreTokenizerWrapper, TokenizerError> {
                Ok(Split::new(
                    SplitPattern::Regex(re.to_string()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )?
                .into())
            };
            let mut steps: Vec<PreTokenizerWrapper> = Vec::new();
            for re in pre.regexes {
                steps.push(split(re)?);
            }
            steps.push(ByteLevel::new(false, false, false).into());
            for re in pre.after_bytes {
                steps.push(split(re)?);
            }
            tok.with_pre_tokenizer(Some(PreTokenizerSequence::new(steps)));
            tok.with_decoder(Some(ByteLevel::new(false, false, false)));
            tok
        }
    };

    // Control, unknown and user-defined tokens are matched on the raw text first.
    let mut added: Vec<AddedToken> = (0..n)
        .filter(|&i| attrs[i] & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN) != 0)
        .map(|i| {
            let special = attrs[i] & (ATTR_CONTROL | ATTR_UNKNOWN) != 0;
            AddedToken::from(texts[i].clone(), special).normalized(false)
        })
        .collect();
    if matches!(kind, Kind::SpmBpe) {
        // llama.cpp takes a run of newlines that is a token whole, without merging.
        added.extend(
            texts
                .iter()
                .filter(|t| t.bytes().all(|b| b == b'\n'))
                .map(|t| AddedToken::from(t.clone(), false).normalized(false)),
        );
    }
    tokenizer.add_tokens(&added);

    let byte_decoder = byte_decoder();
    let pieces = (0..n)
        .map(|i| {
            let (a, t) = (attrs[i], texts[i].as_str());
            if a & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED) != 0 {
                t.as_bytes().to_vec()
            } else if spm_text && a & ATTR_NORMAL != 0 {
                t.replace(SPM_SPACE, " ").into_bytes()
            } else if spm_text && a & ATTR_BYTE != 0 {
                byte_piece(t).map_or_else(|| t.as_bytes().to_vec(), |b| vec![b])
            } else if !spm_text && a & (ATTR_NORMAL | ATTR_BYTE) != 0 {
                byte_level_decode(t, &byte_decoder)
            } else {
                Vec::new()
            }
        })
        .collect();

    Ok(TokenizerInfo {
        tokenizer,
        bos,
        eos: eos_ids,
        add_bos: add_bos && bos.is_some(),
        add_eos: v.add_eos.unwrap_or(false) && eos.is_some(),
        add_space_prefix,
        pieces,
    })
}

/// The three vocabulary kinds.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// `llama`: SentencePiece, merged by piece score.
    Spm,
    /// `gpt2`: byte-level BPE.
    ByteBpe(BpePre),
    /// `gemma4`: BPE with merges over SentencePiece-style text (`▁`, `<0xNN>`).
    SpmBpe,
}

/// Parses GGUF merges (`"left right"`, split at the first space after the first byte as
/// llama.cpp does). The first of repeated pairs keeps its rank; a merge of or into a text
/// that is not a token (which no real vocabulary has) is left out, since the BPE model
/// cannot express it.
fn bpe_merges(merges: &[String], by_text: &HashMap<&str, u32>) -> Result<Vec<(String, String)>, TokenizerError> {
    let mut seen = std::collections::HashSet::with_capacity(merges.len());
    let mut out = Vec::with_capacity(merges.len());
    for (rank, m) in merges.iter().enumerate() {
        let pos = m
            .char_indices()
            .skip(1)
            .find(|&(_, c)| c == ' ')
            .map(|(i, _)| i)
            .ok_or_else(|| TokenizerError::Invalid(format!("merge {rank} `{m}` has no space")))?;
        let (l, r) = (&m[..pos], &m[pos + 1..]);
        if !by_text.contains_key(l) || !by_text.contains_key(r) || !by_text.contains_key(format!("{l}{r}").as_str()) {
            continue;
        }
        if seen.insert((l, r)) {
            out.push((l.to_string(), r.to_string()));
        }
    }
    Ok(out)
}

/// SentencePiece BPE as a merge list: every split of a piece into two pieces of the
/// vocabulary merges into it, the highest-scoring piece first (ties: lower id, then
/// lower left id).
fn spm_merges(texts: &[String], scores: &[f32], by_text: &HashMap<&str, u32>) -> Vec<(String, String)> {
    let mut merges: Vec<(f32, u32, u32, u32)> = Vec::new();
    for (id, piece) in texts.iter().enumerate() {
        if by_text.get(piece.as_str()) != Some(&(id as u32)) {
            continue;
        }
        for (i, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(i);
            if let (Some(&li), Some(&ri)) = (by_text.get(l), by_text.get(r)) {
                merges.push((scores[id], id as u32, li, ri));
            }
        }
    }
    merges.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    merges
        .into_iter()
        .map(|(_, _, l, r)| (texts[l as usize].clone(), texts[r as usize].clone()))
        .collect()
}

/// `<0xNN>` → the byte.
fn byte_piece(t: &str) -> Option<u8> {
    let hex = t.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// GPT-2's byte-to-unicode table, inverted: the byte each printable stand-in means.
fn byte_decoder() -> HashMap<char, u8> {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    let mut map = HashMap::with_capacity(256);
    let mut next = 256u32;
    for b in 0..=255u8 {
        let c = if printable(b) {
            char::from(b)
        } else {
            let c = char::from_u32(next).expect("256..=323 are chars");
            next += 1;
            c
        };
        map.insert(c, b);
    }
    map
}

/// A byte-level BPE token's bytes; a token with a character outside the table stands for
/// its own text (as in Hugging Face's ByteLevel decoder).
fn byte_level_decode(t: &str, table: &HashMap<char, u8>) -> Vec<u8> {
    t.chars()
        .map(|c| table.get(&c).copied())
        .collect::<Option<Vec<u8>>>()
        .unwrap_or_else(|| t.as_bytes().to_vec())
}

// ---------------------------------------------------------------------------------------
// Hugging Face tokenizer.json.

/// Loads a Hugging Face `tokenizer.json` (a file, or a directory holding one).
///
/// `tokenizer_config` is the checkpoint's `tokenizer_config.json`; when `None`, the one
/// beside `tokenizer.json` is read if present. It gives `bos_token`, `eos_token` and
/// `add_bos_token`; `generation_config.json` beside it, when present, adds its
/// `eos_token_id`s. Without `add_bos_token`, BOS is added when the post-processor
/// template starts with the BOS token.
pub fn from_tokenizer_json(
    dir_or_file: impl AsRef<Path>,
    tokenizer_config: Option<&serde_json::Value>,
) -> Result<TokenizerInfo, TokenizerError> {
    let path = dir_or_file.as_ref();
    let (file, dir) = if path.is_dir() {
        (path.join("tokenizer.json"), path.to_path_buf())
    } else {
        (
            path.to_path_buf(),
            path.parent().map_or_else(PathBuf::new, Path::to_path_buf),
        )
    };
    let bytes = std::fs::read(&file).map_err(|source| TokenizerError::Io {
        path: file.clone(),
        source,
    })?;
    let tokenizer =
        Tokenizer::from_bytes(&bytes).map_err(|e| TokenizerError::Tokenizers(format!("`{}`: {e}", file.display())))?;

    let read_json = |name: &str| -> Result<Option<serde_json::Value>, TokenizerError> {
        let p = dir.join(name);
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|source| TokenizerError::Json { path: p, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(TokenizerError::Io { path: p, source }),
        }
    };
    let own_config;
    let config = match tokenizer_config {
        Some(c) => Some(c),
        None => {
            own_config = read_json("tokenizer_config.json")?;
            own_config.as_ref()
        }
    };
    let generation_config = read_json("generation_config.json")?;

    let token_id = |v: Option<&serde_json::Value>| -> Option<u32> {
        let v = v?;
        let text = v.as_str().or_else(|| v.get("content")?.as_str())?;
        tokenizer.token_to_id(text)
    };
    let bos = token_id(config.and_then(|c| c.get("bos_token")));
    let eos = token_id(config.and_then(|c| c.get("eos_token")));

    let vocab = tokenizer.get_vocab(true);
    let n = vocab.values().max().map_or(0, |&m| m as usize + 1);
    let added = tokenizer.get_added_tokens_decoder();
    let by_text: HashMap<&str, u32> = added
        .values()
        .map(|t| t.content.as_str())
        .zip(added.keys().copied())
        .collect();
    let mut attrs = vec![ATTR_NORMAL; n];
    let mut eos_ids = eog_ids(
        &EogSpec {
            eos,
            eot: None,
            eom: None,
            fim_pad: None,
            fim_rep: None,
            fim_sep: None,
            by_text: &|t| by_text.get(t).copied(),
        },
        &mut attrs,
    );
    let mut extra: Vec<u32> = match generation_config.as_ref().and_then(|g| g.get("eos_token_id")) {
        Some(serde_json::Value::Number(x)) => x.as_u64().map(|x| x as u32).into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)).collect(),
        _ => Vec::new(),
    };
    extra.retain(|id| (*id as usize) < n && !eos_ids.contains(id));
    eos_ids.extend(extra);
    if eos_ids.len() > 1 {
        eos_ids[1..].sort_unstable();
    }

    let post = serde_json::to_value(tokenizer.get_post_processor()).unwrap_or_default();
    let template_bos = post
        .get("single")
        .and_then(|s| s.get(0))
        .and_then(|first| first.get("SpecialToken"))
        .and_then(|t| t.get("id"))
        .and_then(|id| id.as_str())
        .and_then(|t| tokenizer.token_to_id(t));
    let add_bos = config.and_then(|c| c.get("add_bos_token")).and_then(|v| v.as_bool());
    let add_bos = match add_bos {
        Some(b) => b && bos.is_some(),
        None => template_bos.is_some() && template_bos == bos,
    };
    let add_eos = config
        .and_then(|c| c.get("add_eos_token"))
        .and_then(|v| v.as_bool())
        .unwrap_or(false);

    let decoder = serde_json::to_string(&tokenizer.get_decoder()).unwrap_or_default();
    let style = if decoder.contains("\"ByteLevel\"") {
        PieceStyle::ByteLevel
    } else if decoder.contains("Metaspace") || decoder.contains(SPM_SPACE) {
        PieceStyle::SentencePiece
    } else {
        PieceStyle::Decoder
    };
    let add_space_prefix = match style {
        PieceStyle::SentencePiece => {
            let d: serde_json::Value = serde_json::from_str(&decoder).unwrap_or_default();
            decoder_strips_prefix(&d)
        }
        _ => false,
    };
    // Each token's bytes as the decoder makes them (added tokens included: Gemma's
    // tokenizer.json spells its whitespace-run tokens with `▁`).
    let table = byte_decoder();
    let mut by_id = vec![Vec::new(); n];
    for (text, &id) in &vocab {
        by_id[id as usize] = match style {
            PieceStyle::ByteLevel => byte_level_decode(text, &table),
            PieceStyle::SentencePiece => match byte_piece(text) {
                Some(b) => vec![b],
                None => text.replace(SPM_SPACE, " ").into_bytes(),
            },
            PieceStyle::Decoder => tokenizer.decode(&[id], false)?.into_bytes(),
        };
    }
    let mut pieces = Pieces::with_capacity(n);
    for p in &by_id {
        pieces.push(p);
    }

    Ok(TokenizerInfo {
        tokenizer: HfTokenizer::ready(tokenizer),
        bos,
        eos: eos_ids,
        add_bos,
        add_eos: add_eos && eos.is_some(),
        add_space_prefix,
        pieces,
        encoder: None,
    })
}

enum PieceStyle {
    ByteLevel,
    SentencePiece,
    Decoder,
}

/// Whether a SentencePiece-style decoder drops a leading space (a `Strip` of one leading
/// space, or a `Metaspace` that prepends one).
fn decoder_strips_prefix(d: &serde_json::Value) -> bool {
    match d.get("type").and_then(|t| t.as_str()) {
        Some("Sequence") => d
            .get("decoders")
            .and_then(|x| x.as_array())
            .is_some_and(|ds| ds.iter().any(decoder_strips_prefix)),
        Some("Strip") => {
            d.get("content").and_then(|c| c.as_str()) == Some(" ")
                && d.get("start").and_then(|s| s.as_u64()).unwrap_or(0) > 0
        }
        Some("Metaspace") => {
            let scheme = d.get("prepend_scheme").and_then(|s| s.as_str());
            let legacy = d.get("add_prefix_space").and_then(|s| s.as_bool());
            match scheme {
                Some(s) => s != "never",
                None => legacy.unwrap_or(true),
            }
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spm_vocab(add_space_prefix: Option<bool>) -> GgufVocab {
        // A tiny SentencePiece vocabulary: unk, bos, eos, bytes for "\n" and 0xE2/0x82/0xAC,
        // pieces and a control token.
        let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>", "<0x0A>", "<0xE2>", "<0x82>", "<0xAC>"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut types = vec![2, 3, 3, 6, 6, 6, 6];
        let mut scores = vec![0.0; 7];
        for (i, p) in [
            "▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "▁he", "llo", "▁hello", "▁w", "or", "▁wor", "ld",
            "▁world",
        ]
        .iter()
        .enumerate()
        {
            tokens.push(p.to_string());
            types.push(1);
            scores.push(-(i as f32));
        }
        tokens.push("<|turn|>".into());
        types.push(3);
        scores.push(0.0);
        GgufVocab {
            model: "llama".into(),
            tokens,
            scores: Some(scores),
            token_types: Some(types),
            bos: Some(1),
            eos: Some(2),
            add_space_prefix,
            ..Default::default()
        }
    }

    fn words(info: &TokenizerInfo, ids: &[u32]) -> Vec<String> {
        ids.iter().map(|&i| info.tokenizer.id_to_token(i).unwrap()).collect()
    }

    #[test]
    fn spm_merges_by_score_with_prefix_and_byte_fallback() {
        let info = from_gguf_vocab(&spm_vocab(None)).unwrap();
        assert!(info.add_bos && info.add_space_prefix);
        assert_eq!(info.bos, Some(1));
        assert_eq!(info.eos, vec![2]);
        let ids = info.encode("hello world\n€").unwrap();
        assert_eq!(
            words(&info, &ids),
            ["▁hello", "▁world", "<0x0A>", "<0xE2>", "<0x82>", "<0xAC>"]
        );
        assert_eq!(info.decode(&ids), "hello world\n€");
        assert_eq!(info.tokenizer.decode(&ids, false).unwrap(), "hello world\n€");
        // Each fragment after a special token gets the prefix space too (llama.cpp).
        let ids = info.encode("hello<|turn|>world").unwrap();
        assert_eq!(words(&info, &ids), ["▁hello", "<|turn|>", "▁world"]);
        assert_eq!(
            info.encode_prompt("he").unwrap(),
            vec![1, info.tokenizer.token_to_id("▁he").unwrap()]
        );
    }

    #[test]
    fn spm_without_prefix_space() {
        let info = from_gguf_vocab(&spm_vocab(Some(false))).unwrap();
        let ids = info.encode("hello world").unwrap();
        assert_eq!(words(&info, &ids), ["he", "llo", "▁world"]);
        assert_eq!(info.decode(&ids), "hello world");
    }

    fn bpe_vocab(pre: Option<&str>) -> GgufVocab {
        // Byte-level BPE over "a", "b", "Ġ" (space) with merges, plus a control token.
        let tokens: Vec<String> = ["a", "b", "Ġ", "Ċ", "ab", "Ġab", "<|im_end|>", "Ã", "©"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        GgufVocab {
            model: "gpt2".into(),
            pre: pre.map(str::to_string),
            token_types: Some(vec![1, 1, 1, 1, 1, 1, 3, 1, 1]),
            merges: Some(vec!["a b".into(), "Ġ ab".into()]),
            tokens,
            eos: Some(6),
            ..Default::default()
        }
    }

    #[test]
    fn byte_level_bpe_and_special_tokens() {
        let info = from_gguf_vocab(&bpe_vocab(Some("qwen2"))).unwrap();
        assert!(!info.add_bos);
        assert_eq!(info.eos, vec![6]);
        let ids = info.encode("ab ab<|im_end|>\né").unwrap();
        assert_eq!(words(&info, &ids), ["ab", "Ġab", "<|im_end|>", "Ċ", "Ã", "©"]);
        assert_eq!(info.decode(&ids), "ab ab<|im_end|>\né");
        assert_eq!(info.token_bytes(7), [0xC3]);
        // parse_special = false: the control token is plain text.
        let ids = info.encode_literal("<|im_end|>").unwrap();
        assert!(!ids.contains(&6), "{ids:?}");
    }

    #[test]
    fn unknown_pre_and_model_are_named() {
        let e = from_gguf_vocab(&bpe_vocab(Some("no-such-pre"))).unwrap_err();
        assert!(e.to_string().contains("`no-such-pre`"), "{e}");
        let mut v = bpe_vocab(None);
        v.model = "t5".into();
        let e = from_gguf_vocab(&v).unwrap_err();
        assert!(e.to_string().contains("`t5`"), "{e}");
        // A missing pre is llama.cpp's default pre-tokenizer, not an error.
        assert!(from_gguf_vocab(&bpe_vocab(None)).is_ok());
    }

    #[test]
    fn eog_follows_llama_cpp() {
        let mut v = bpe_vocab(Some("smollm"));
        v.tokens.extend([
            "<|endoftext|>".to_string(),
            "<reponame>".to_string(),
            "<|end|>".to_string(),
        ]);
        v.token_types.as_mut().unwrap().extend([3, 3, 1]);
        v.eos = Some(6);
        let info = from_gguf_vocab(&v).unwrap();
        assert_eq!(info.eos, vec![6, 9, 10, 11]);
        // `<|end|>` became a control token: parsed as one token.
        assert_eq!(info.encode("<|end|>").unwrap(), vec![11]);
    }

    #[test]
    fn byte_tables() {
        let t = byte_decoder();
        assert_eq!(t.len(), 256);
        assert_eq!(t[&'Ġ'], b' ');
        assert_eq!(t[&'Ċ'], b'\n');
        assert_eq!(t[&'a'], b'a');
        assert_eq!(byte_piece("<0x0A>"), Some(10));
        assert_eq!(byte_piece("<0x0A"), None);
    }
}
