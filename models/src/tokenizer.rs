//! Tokenizers for a GGUF file's `tokenizer.ggml.*` metadata (so a GGUF model needs no
//! side files), or loaded from a Hugging Face `tokenizer.json`.
//!
//! A GGUF vocabulary is encoded by kiln's own BPE (`GgufEncoder`), which needs only a
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
    AddedToken, DecoderWrapper, NormalizerWrapper, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer,
    PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer,
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
        let v = GgufVocab::from_gguf_but_texts(f)?;
        let (tokens, merges) = gguf_texts(f)?;
        Ok(GgufVocab {
            tokens: tokens.to_vec(),
            merges: merges.map(<[String]>::to_vec),
            ..v
        })
    }

    /// [`GgufVocab::from_gguf`] less `tokens` and `merges` (left empty), which
    /// [`gguf_texts`] borrows instead of copying.
    fn from_gguf_but_texts(f: &GgufFile) -> Result<GgufVocab, TokenizerError> {
        const P: &str = "tokenizer.ggml.";
        let key = |k: &str| format!("{P}{k}");
        let model = f
            .get_str(&key("model"))
            .ok_or_else(|| TokenizerError::Invalid("GGUF has no string `tokenizer.ggml.model`".into()))?
            .to_string();
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
        let id = |k: &str| f.get_u32(&key(k));
        Ok(GgufVocab {
            model,
            pre: f.get_str(&key("pre")).map(str::to_string),
            tokens: Vec::new(),
            scores,
            token_types,
            merges: None,
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

/// A GGUF file's `tokenizer.ggml.tokens` and `tokenizer.ggml.merges`, borrowed.
fn gguf_texts(f: &GgufFile) -> Result<(&[String], Option<&[String]>), TokenizerError> {
    let tokens = f
        .get_str_array("tokenizer.ggml.tokens")
        .ok_or_else(|| TokenizerError::Invalid("GGUF has no string array `tokenizer.ggml.tokens`".into()))?;
    let merges = match f.get_str_array("tokenizer.ggml.merges") {
        Some(m) => Some(m),
        None if f.get("tokenizer.ggml.merges").is_some() => {
            return Err(TokenizerError::Invalid(
                "`tokenizer.ggml.merges` is not a string array".into(),
            ))
        }
        None => None,
    };
    Ok((tokens, merges))
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
        // Builds the tokenizer if it is not there yet.
        let _ = Deref::deref(self);
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
        let v = GgufVocab::from_gguf_but_texts(f)?;
        let (tokens, merges) = gguf_texts(f)?;
        build(&v, tokens, merges)
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

    /// The texts a chat template receives as `bos_token` and `eos_token` (empty where
    /// the vocabulary has no such token).
    pub fn bos_eos_texts(&self) -> (String, String) {
        let text =
            |id: Option<u32>| id.map_or(String::new(), |id| String::from_utf8_lossy(self.token_bytes(id)).into());
        (text(self.bos), text(self.eos.first().copied()))
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
    build(v, &v.tokens, v.merges.as_deref())
}

/// [`from_gguf_vocab`] with the vocabulary's `tokens` and `merges` given apart (those of
/// `v` are not read), so that they can be borrowed from a [`GgufFile`].
fn build(v: &GgufVocab, tokens: &[String], merges: Option<&[String]>) -> Result<TokenizerInfo, TokenizerError> {
    let n = tokens.len();
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

    let texts = Texts::new(tokens);
    let mut attrs: Vec<u8> = match &v.token_types {
        Some(t) => t[..n].iter().map(|&t| attr_of_type(t)).collect(),
        None => vec![ATTR_NORMAL; n],
    };

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
            by_text: &|t| texts.id(t),
        },
        &mut attrs,
    );
    // gpt-oss: these are always rendered, never control tokens.
    for t in ["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"] {
        if let Some(id) = texts.id(t) {
            attrs[id as usize] = ATTR_USER_DEFINED;
        }
    }

    let add_space_prefix = matches!(kind, Kind::Spm) && v.add_space_prefix.unwrap_or(true);
    let scores = match kind {
        Kind::Spm => {
            let s = v
                .scores
                .as_ref()
                .ok_or_else(|| TokenizerError::Invalid("a `llama` vocabulary needs tokenizer.ggml.scores".into()))?;
            s[..n].to_vec()
        }
        _ => Vec::new(),
    };
    let merges = match kind {
        Kind::Spm => PairMap::default(),
        _ => {
            let m = merges.ok_or_else(|| {
                TokenizerError::Invalid(format!("a `{}` vocabulary needs tokenizer.ggml.merges", v.model))
            })?;
            bpe_merges(m, &texts)?
        }
    };
    let pre_tokenizer = match kind {
        Kind::ByteBpe(pre) => Some(byte_level_pre_tokenizer(pre)?),
        _ => None,
    };

    let mut pieces = Pieces::with_capacity(n);
    let byte_decoder = ByteDecoder::new();
    for (i, &a) in attrs.iter().enumerate() {
        let t = texts.get(i as u32);
        let out = &mut pieces.bytes;
        if a & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED) != 0 {
            out.extend_from_slice(t.as_bytes());
        } else if spm_text && a & ATTR_NORMAL != 0 {
            for (j, part) in t.split(SPM_SPACE).enumerate() {
                if j > 0 {
                    out.push(b' ');
                }
                out.extend_from_slice(part.as_bytes());
            }
        } else if spm_text && a & ATTR_BYTE != 0 {
            match byte_piece(t) {
                Some(b) => out.push(b),
                None => out.extend_from_slice(t.as_bytes()),
            }
        } else if !spm_text && a & (ATTR_NORMAL | ATTR_BYTE) != 0 {
            byte_level_decode(t, &byte_decoder, out);
        }
        pieces.ends.push(out.len());
    }

    let encoder = Arc::new(GgufEncoder::new(
        kind,
        texts,
        attrs,
        scores,
        merges,
        unk,
        add_space_prefix,
        pre_tokenizer,
    ));
    Ok(TokenizerInfo {
        tokenizer: HfTokenizer {
            tokenizer: OnceLock::new(),
            source: Some(encoder.clone()),
        },
        bos,
        eos: eos_ids,
        add_bos: add_bos && bos.is_some(),
        add_eos: v.add_eos.unwrap_or(false) && eos.is_some(),
        add_space_prefix,
        pieces,
        encoder: Some(encoder),
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

/// A byte-level BPE vocabulary's pre-tokenizer: its split regexes, the byte-to-unicode
/// mapping, and the regexes that apply after it.
fn byte_level_pre_tokenizer(pre: BpePre) -> Result<PreTokenizerWrapper, TokenizerError> {
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
    Ok(PreTokenizerSequence::new(steps).into())
}

/// Parses GGUF merges (`"left right"`, split at the first space after the first byte as
/// llama.cpp does) into (left id, right id) → (rank, merged id); the rank is the merge's
/// index, so the order is the file's. The first of repeated pairs keeps its rank; a merge
/// of or into a text that is not a token (which no real vocabulary has) is left out,
/// since BPE over token ids cannot express it.
fn bpe_merges(merges: &[String], texts: &Texts) -> Result<PairMap, TokenizerError> {
    // The three lookups per merge are cache misses in a large index (151k merges for
    // Qwen2): chunks are looked up on all cores, then inserted in order.
    const MIN_CHUNK: usize = 16 * 1024;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    let chunk = merges.len().div_ceil(threads).max(MIN_CHUNK);
    let resolved: Vec<Result<Vec<ResolvedMerge>, TokenizerError>> = std::thread::scope(|scope| {
        let jobs: Vec<_> = merges
            .chunks(chunk)
            .enumerate()
            .map(|(i, part)| scope.spawn(move || resolve_merges(part, i * chunk, texts)))
            .collect();
        jobs.into_iter()
            .map(|j| j.join().expect("merge lookup does not panic"))
            .collect()
    });
    let mut out = PairMap::with_capacity_and_hasher(merges.len(), Default::default());
    for part in resolved {
        for (pair, rank, merged) in part? {
            out.entry(pair).or_insert((rank, merged));
        }
    }
    Ok(out)
}

/// A merge as ids: ([`pair_key`], rank, merged id).
type ResolvedMerge = (u64, u32, u32);

/// The merges of `merges` (whose first has rank `first`) whose texts are all tokens.
fn resolve_merges(merges: &[String], first: usize, texts: &Texts) -> Result<Vec<ResolvedMerge>, TokenizerError> {
    let mut out = Vec::with_capacity(merges.len());
    let mut joined = String::new();
    for (i, m) in merges.iter().enumerate() {
        let rank = first + i;
        let pos = m
            .char_indices()
            .skip(1)
            .find(|&(_, c)| c == ' ')
            .map(|(i, _)| i)
            .ok_or_else(|| TokenizerError::Invalid(format!("merge {rank} `{m}` has no space")))?;
        let (l, r) = (&m[..pos], &m[pos + 1..]);
        let (Some(a), Some(b)) = (texts.id(l), texts.id(r)) else {
            continue;
        };
        joined.clear();
        joined.push_str(l);
        joined.push_str(r);
        let Some(merged) = texts.id(&joined) else {
            continue;
        };
        out.push((pair_key(a, b), rank as u32, merged));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Token texts and their index.

/// A hash of a token text. The multiply leaves its entropy in the high bits, which is
/// where [`Texts`] takes its slot index from.
fn text_hash(t: &[u8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h = t.len() as u64;
    let mut chunks = t.chunks_exact(8);
    for c in &mut chunks {
        h = (h.rotate_left(26) ^ u64::from_le_bytes(c.try_into().expect("8 bytes"))).wrapping_mul(K);
    }
    let rest = chunks.remainder();
    let mut last = [0u8; 8];
    last[..rest.len()].copy_from_slice(rest);
    (h.rotate_left(26) ^ u64::from_le_bytes(last)).wrapping_mul(K)
}

/// The bits of a [`text_hash`] that a [`Texts`] slot keeps: both halves, since the slot
/// index is the top bits.
fn tag(h: u64) -> u32 {
    (h ^ (h >> 32)) as u32
}

/// Every token's text in one buffer, with an open-addressing index from text to id (the
/// last of equal texts, as in llama.cpp). Two allocations for a whole vocabulary: a
/// `HashMap<String, u32>` costs one per token and a slower hash.
struct Texts {
    buf: String,
    /// Where each token's text ends in `buf`.
    ends: Vec<usize>,
    /// By hash slot: a token id in the low half, 32 more bits of its text's hash in the
    /// high half (so that a probe rarely reads a text that is not the one looked for);
    /// `u64::MAX` is empty.
    slots: Vec<u64>,
    /// Right shift that turns a [`text_hash`] into a slot.
    shift: u32,
}

impl Texts {
    /// The texts of `tokens`; llama.cpp names empty ones so that every id has a
    /// distinct text.
    fn new(tokens: &[String]) -> Texts {
        let mut buf = String::with_capacity(tokens.iter().map(String::len).sum());
        let mut ends = Vec::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            if t.is_empty() {
                buf.push_str(&format!("[EMPTY_{i}]"));
            } else {
                buf.push_str(t);
            }
            ends.push(buf.len());
        }
        // At most half full, so that probe runs stay short.
        let bits = (tokens.len() * 2).next_power_of_two().max(16).trailing_zeros();
        let mut texts = Texts {
            buf,
            ends,
            slots: vec![u64::MAX; 1 << bits],
            shift: 64 - bits,
        };
        for id in 0..tokens.len() as u32 {
            let h = text_hash(texts.get(id).as_bytes());
            let slot = texts.slot(texts.get(id), h);
            texts.slots[slot] = (u64::from(tag(h)) << 32) | u64::from(id);
        }
        texts
    }

    fn len(&self) -> usize {
        self.ends.len()
    }

    fn get(&self, id: u32) -> &str {
        let id = id as usize;
        let start = if id == 0 { 0 } else { self.ends[id - 1] };
        &self.buf[start..self.ends[id]]
    }

    /// The slot that holds `t` (whose [`text_hash`] is `h`), or the empty slot where it
    /// would go.
    fn slot(&self, t: &str, h: u64) -> usize {
        let mask = self.slots.len() - 1;
        let mut i = (h >> self.shift) as usize;
        loop {
            let e = self.slots[i];
            if e == u64::MAX || ((e >> 32) as u32 == tag(h) && self.get(e as u32) == t) {
                return i;
            }
            i = (i + 1) & mask;
        }
    }

    /// The id of a token text.
    fn id(&self, t: &str) -> Option<u32> {
        let e = self.slots[self.slot(t, text_hash(t.as_bytes()))];
        (e != u64::MAX).then_some(e as u32)
    }
}

/// (left id, right id) as one key of a [`PairMap`].
fn pair_key(a: u32, b: u32) -> u64 {
    (u64::from(a) << 32) | u64::from(b)
}

/// Hashes a [`pair_key`]: a multiply, then the high bits folded down, since the table
/// indexes by the low bits and the left id is in the high half of the key.
#[derive(Default)]
struct PairHasher(u64);

impl Hasher for PairHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, x: u64) {
        self.0 = x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 32)
    }
}

/// BPE merges: (left id, right id) → (rank, merged id).
type PairMap = HashMap<u64, (u32, u32), BuildHasherDefault<PairHasher>>;

// ---------------------------------------------------------------------------------------
// Added tokens: control, unknown and user-defined tokens, matched on the raw text before
// anything else.

/// A byte trie of the added tokens' texts.
struct AddedTokens {
    nodes: Vec<TrieNode>,
    /// Bytes that start some token: other positions are skipped without a trie walk.
    first: [bool; 256],
}

#[derive(Default)]
struct TrieNode {
    children: Vec<(u8, u32)>,
    /// The token that ends here: its id, and whether it is special (not matched when
    /// special tokens are plain text).
    token: Option<(u32, bool)>,
}

impl AddedTokens {
    fn new() -> AddedTokens {
        AddedTokens {
            nodes: vec![TrieNode::default()],
            first: [false; 256],
        }
    }

    /// Adds a token text; a text added twice is special when either was.
    fn insert(&mut self, text: &str, id: u32, special: bool) {
        let Some(&first) = text.as_bytes().first() else {
            return;
        };
        self.first[first as usize] = true;
        let mut node = 0;
        for &b in text.as_bytes() {
            node = match self.nodes[node].children.iter().find(|c| c.0 == b) {
                Some(&(_, next)) => next as usize,
                None => {
                    let next = self.nodes.len();
                    self.nodes.push(TrieNode::default());
                    self.nodes[node].children.push((b, next as u32));
                    next
                }
            };
        }
        let was_special = self.nodes[node].token.is_some_and(|t| t.1);
        self.nodes[node].token = Some((id, special || was_special));
    }

    /// The leftmost token in `text` at or after `from`, the longest of those starting
    /// there (Hugging Face's leftmost-longest matching): (start, end, id, special).
    fn find(&self, text: &[u8], from: usize) -> Option<(usize, usize, u32, bool)> {
        for start in from..text.len() {
            if !self.first[text[start] as usize] {
                continue;
            }
            let mut node = 0;
            let mut best = None;
            for (i, &b) in text[start..].iter().enumerate() {
                match self.nodes[node].children.iter().find(|c| c.0 == b) {
                    Some(&(_, next)) => node = next as usize,
                    None => break,
                }
                if let Some((id, special)) = self.nodes[node].token {
                    best = Some((start, start + i + 1, id, special));
                }
            }
            if best.is_some() {
                return best;
            }
        }
        None
    }
}

// ---------------------------------------------------------------------------------------
// Encoding a GGUF vocabulary.

/// When a pair of adjacent symbols merges: the lowest first. A merge-list vocabulary
/// ranks by the merge's index (`(rank, 0, 0)`); SentencePiece by the merged piece's score,
/// highest first, then its id, then the left piece's id, the order of the merge list that
/// Hugging Face's converters (and [`GgufEncoder::hf_tokenizer`]) make.
type Rank = (u32, u32, u32);

/// A score as a [`Rank`] key: higher scores give lower keys, in `f32::total_cmp` order.
fn score_key(s: f32) -> u32 {
    let bits = s.to_bits();
    let ascending = if bits >> 31 == 1 { !bits } else { bits | 1 << 31 };
    !ascending
}

/// A symbol of a word being merged (Hugging Face's BPE `Word` symbols).
#[derive(Clone, Copy)]
struct Symbol {
    id: u32,
    /// Byte length; 0 once merged into the symbol on its left.
    len: usize,
    prev: usize,
    next: usize,
}

/// No neighbour.
const NONE: usize = usize::MAX;

/// kiln's encoder of a GGUF vocabulary: Hugging Face tokenizers' algorithm over token
/// ids (added-token split, normalization, pre-tokenization, BPE with byte fallback),
/// without building its BPE model.
struct GgufEncoder {
    kind: Kind,
    texts: Texts,
    attrs: Vec<u8>,
    /// Piece scores (`llama`).
    scores: Vec<f32>,
    /// Merges (`gpt2`, `gemma4`).
    merges: PairMap,
    /// The unknown token (not for `gpt2`, whose BPE drops what is not in the vocabulary).
    unk: Option<u32>,
    add_space_prefix: bool,
    /// `<0xNN>` piece ids, for byte fallback (not for `gpt2`).
    bytes: [Option<u32>; 256],
    added: AddedTokens,
    pre_tokenizer: Option<PreTokenizerWrapper>,
}

impl GgufEncoder {
    #[allow(clippy::too_many_arguments)]
    fn new(
        kind: Kind,
        texts: Texts,
        attrs: Vec<u8>,
        scores: Vec<f32>,
        merges: PairMap,
        unk: Option<u32>,
        add_space_prefix: bool,
        pre_tokenizer: Option<PreTokenizerWrapper>,
    ) -> GgufEncoder {
        let spm_text = !matches!(kind, Kind::ByteBpe(_));
        let mut bytes = [None; 256];
        if spm_text {
            for (b, id) in bytes.iter_mut().enumerate() {
                *id = texts.id(&format!("<0x{b:02X}>"));
            }
        }
        // The BPE model knows a token by its text: a duplicate text is the last id.
        let unk = unk.filter(|_| spm_text).and_then(|u| texts.id(texts.get(u)));
        let mut added = AddedTokens::new();
        for (i, &a) in attrs.iter().enumerate() {
            if a & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN) != 0 {
                let t = texts.get(i as u32);
                let id = texts.id(t).expect("a token's text is in the index");
                added.insert(t, id, a & (ATTR_CONTROL | ATTR_UNKNOWN) != 0);
            }
        }
        if matches!(kind, Kind::SpmBpe) {
            // llama.cpp takes a run of newlines that is a token whole, without merging.
            for i in 0..texts.len() as u32 {
                let t = texts.get(i);
                if t.bytes().all(|b| b == b'\n') {
                    added.insert(t, texts.id(t).expect("a token's text is in the index"), false);
                }
            }
        }
        GgufEncoder {
            kind,
            texts,
            attrs,
            scores,
            merges,
            unk,
            add_space_prefix,
            bytes,
            added,
            pre_tokenizer,
        }
    }

    /// Encodes text without BOS; `parse_special`: special tokens written in the text are
    /// single tokens (user-defined ones always are).
    fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let mut out = Vec::new();
        let mut scratch = String::new();
        let mut start = 0;
        let mut from = 0;
        while let Some((s, e, id, special)) = self.added.find(text.as_bytes(), from) {
            // A special token that is plain text is still matched, so that no shorter
            // token inside it matches instead.
            from = e;
            if special && !parse_special {
                continue;
            }
            if start < s {
                self.encode_fragment(&text[start..s], &mut scratch, &mut out)?;
            }
            out.push(id);
            start = e;
        }
        if start < text.len() {
            self.encode_fragment(&text[start..], &mut scratch, &mut out)?;
        }
        Ok(out)
    }

    /// Encodes text between added tokens.
    fn encode_fragment(&self, text: &str, scratch: &mut String, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
        match self.kind {
            Kind::Spm => {
                let mut s = String::with_capacity(text.len() + 3 * (text.len() / 4 + 1));
                if self.add_space_prefix {
                    s.push_str(SPM_SPACE);
                }
                s.push_str(&text.replace(' ', SPM_SPACE));
                self.bpe(&s, scratch, out);
            }
            Kind::SpmBpe => {
                // Merges run over whole lines; newlines only split.
                let s = text.replace(' ', SPM_SPACE);
                let mut rest = s.as_str();
                while let Some(c) = rest.chars().next() {
                    let newline = c == '\n';
                    let end = rest.find(|c: char| (c == '\n') != newline).unwrap_or(rest.len());
                    self.bpe(&rest[..end], scratch, out);
                    rest = &rest[end..];
                }
            }
            Kind::ByteBpe(_) => {
                let pre = self
                    .pre_tokenizer
                    .as_ref()
                    .expect("a gpt2 vocabulary has a pre-tokenizer");
                let mut words = PreTokenizedString::from(text);
                pre.pre_tokenize(&mut words)?;
                for (word, _, _) in words.get_splits(OffsetReferential::Original, OffsetType::None) {
                    self.bpe(word, scratch, out);
                }
            }
        }
        Ok(())
    }

    /// The merge of two adjacent symbols, if any: its rank and the merged id.
    fn merge(&self, a: u32, b: u32, scratch: &mut String) -> Option<(Rank, u32)> {
        match self.kind {
            Kind::Spm => {
                scratch.clear();
                scratch.push_str(self.texts.get(a));
                scratch.push_str(self.texts.get(b));
                let merged = self.texts.id(scratch)?;
                Some(((score_key(self.scores[merged as usize]), merged, a), merged))
            }
            _ => self
                .merges
                .get(&pair_key(a, b))
                .map(|&(rank, merged)| ((rank, 0, 0), merged)),
        }
    }

    /// BPE of one word, as Hugging Face's `BPE::merge_word` does it: characters (or their
    /// `<0xNN>` bytes, or a fused unknown token), then the lowest-ranked adjacent pair
    /// merges first, the leftmost of equal ranks.
    fn bpe(&self, word: &str, scratch: &mut String, out: &mut Vec<u32>) {
        if word.is_empty() {
            return;
        }
        if let Kind::ByteBpe(pre) = self.kind {
            if pre.ignore_merges {
                if let Some(id) = self.texts.id(word) {
                    out.push(id);
                    return;
                }
            }
        }
        let mut symbols: Vec<Symbol> = Vec::with_capacity(word.len());
        let push = |symbols: &mut Vec<Symbol>, id: u32, len: usize| {
            let n = symbols.len();
            if let Some(last) = symbols.last_mut() {
                last.next = n;
            }
            symbols.push(Symbol {
                id,
                len,
                prev: if n == 0 { NONE } else { n - 1 },
                next: NONE,
            });
        };
        let mut unk: Option<(u32, usize)> = None;
        for (i, c) in word.char_indices() {
            let s = &word[i..i + c.len_utf8()];
            if let Some(id) = self.texts.id(s) {
                if let Some((u, len)) = unk.take() {
                    push(&mut symbols, u, len);
                }
                push(&mut symbols, id, s.len());
                continue;
            }
            // Byte fallback comes before a pending unknown token is written out, as in
            // Hugging Face's BPE.
            if s.bytes().all(|b| self.bytes[b as usize].is_some()) {
                for b in s.bytes() {
                    push(&mut symbols, self.bytes[b as usize].expect("checked"), 1);
                }
                continue;
            }
            if let Some(u) = self.unk {
                unk = Some(match unk {
                    Some((u, len)) => (u, len + s.len()),
                    None => (u, s.len()),
                });
            }
        }
        if let Some((u, len)) = unk {
            push(&mut symbols, u, len);
        }

        let mut queue = BinaryHeap::with_capacity(symbols.len());
        for (pos, pair) in symbols.windows(2).enumerate() {
            if let Some((rank, merged)) = self.merge(pair[0].id, pair[1].id, scratch) {
                queue.push(Reverse((rank, pos, merged)));
            }
        }
        while let Some(Reverse((_, pos, merged))) = queue.pop() {
            let left = symbols[pos];
            if left.len == 0 || left.next == NONE {
                continue;
            }
            let right = symbols[left.next];
            // A stale entry: the pair at `pos` has changed since.
            if self.merge(left.id, right.id, scratch).is_none_or(|m| m.1 != merged) {
                continue;
            }
            symbols[pos] = Symbol {
                id: merged,
                len: left.len + right.len,
                prev: left.prev,
                next: right.next,
            };
            symbols[left.next].len = 0;
            if right.next != NONE {
                symbols[right.next].prev = pos;
            }
            if left.prev != NONE {
                if let Some((rank, m)) = self.merge(symbols[left.prev].id, merged, scratch) {
                    queue.push(Reverse((rank, left.prev, m)));
                }
            }
            if right.next != NONE {
                if let Some((rank, m)) = self.merge(merged, symbols[right.next].id, scratch) {
                    queue.push(Reverse((rank, pos, m)));
                }
            }
        }
        out.extend(symbols.iter().filter(|s| s.len != 0).map(|s| s.id));
    }

    /// The Hugging Face tokenizer that encodes as this one does.
    fn hf_tokenizer(&self) -> Tokenizer {
        let n = self.texts.len() as u32;
        let canonical = |id: u32| self.texts.id(self.texts.get(id)) == Some(id);
        let vocab: Vocab = (0..n)
            .filter(|&i| canonical(i))
            .map(|i| (self.texts.get(i).to_string(), i))
            .collect();
        let merges: Vec<(String, String)> = match self.kind {
            Kind::Spm => self.spm_merges(),
            _ => {
                let mut ranked: Vec<(u32, u64)> = self.merges.iter().map(|(&pair, &(rank, _))| (rank, pair)).collect();
                ranked.sort_unstable();
                ranked
                    .into_iter()
                    .map(|(_, pair)| {
                        let (a, b) = ((pair >> 32) as u32, pair as u32);
                        (self.texts.get(a).to_string(), self.texts.get(b).to_string())
                    })
                    .collect()
            }
        };
        const BUILT: &str = "the vocabulary was checked when loaded";
        let mut tokenizer = match self.kind {
            Kind::Spm | Kind::SpmBpe => {
                let mut model = BPE::builder()
                    .vocab_and_merges(vocab, merges)
                    .byte_fallback(true)
                    .fuse_unk(true);
                if let Some(u) = self.unk {
                    model = model.unk_token(self.texts.get(u).to_string());
                }
                let mut tok = Tokenizer::new(model.build().expect(BUILT));
                let replace = Replace::new(" ", SPM_SPACE).expect(BUILT);
                let normalizer: NormalizerWrapper = if self.add_space_prefix {
                    NormalizerSequence::new(vec![Prepend::new(SPM_SPACE.to_string()).into(), replace.into()]).into()
                } else {
                    replace.into()
                };
                tok.with_normalizer(Some(normalizer));
                if matches!(self.kind, Kind::SpmBpe) {
                    let split = Split::new(
                        SplitPattern::Regex("[^\n]+|[\n]+".into()),
                        SplitDelimiterBehavior::Isolated,
                        false,
                    )
                    .expect(BUILT);
                    tok.with_pre_tokenizer(Some(split));
                }
                let mut decoders: Vec<DecoderWrapper> = vec![
                    Replace::new(SPM_SPACE, " ").expect(BUILT).into(),
                    ByteFallback::new().into(),
                    Fuse::new().into(),
                ];
                if self.add_space_prefix {
                    decoders.push(Strip::new(' ', 1, 0).into());
                }
                tok.with_decoder(Some(DecoderSequence::new(decoders)));
                tok
            }
            Kind::ByteBpe(pre) => {
                let model = BPE::builder()
                    .vocab_and_merges(vocab, merges)
                    .ignore_merges(pre.ignore_merges)
                    .build()
                    .expect(BUILT);
                let mut tok = Tokenizer::new(model);
                tok.with_pre_tokenizer(self.pre_tokenizer.clone());
                tok.with_decoder(Some(ByteLevel::new(false, false, false)));
                tok
            }
        };

        let mut added: Vec<AddedToken> = (0..n)
            .filter(|&i| self.attrs[i as usize] & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN) != 0)
            .map(|i| {
                let special = self.attrs[i as usize] & (ATTR_CONTROL | ATTR_UNKNOWN) != 0;
                AddedToken::from(self.texts.get(i).to_string(), special).normalized(false)
            })
            .collect();
        if matches!(self.kind, Kind::SpmBpe) {
            added.extend(
                (0..n)
                    .map(|i| self.texts.get(i))
                    .filter(|t| t.bytes().all(|b| b == b'\n'))
                    .map(|t| AddedToken::from(t.to_string(), false).normalized(false)),
            );
        }
        tokenizer.add_tokens(&added);
        tokenizer
    }

    /// SentencePiece BPE as a merge list: every split of a piece into two pieces of the
    /// vocabulary merges into it, in [`Rank`] order.
    fn spm_merges(&self) -> Vec<(String, String)> {
        let mut merges: Vec<(Rank, u32, u32)> = Vec::new();
        for id in 0..self.texts.len() as u32 {
            let piece = self.texts.get(id);
            if self.texts.id(piece) != Some(id) {
                continue;
            }
            for (i, _) in piece.char_indices().skip(1) {
                let (l, r) = piece.split_at(i);
                if let (Some(li), Some(ri)) = (self.texts.id(l), self.texts.id(r)) {
                    merges.push(((score_key(self.scores[id as usize]), id, li), li, ri));
                }
            }
        }
        merges.sort_unstable();
        merges
            .into_iter()
            .map(|(_, l, r)| (self.texts.get(l).to_string(), self.texts.get(r).to_string()))
            .collect()
    }
}

/// `<0xNN>` → the byte.
fn byte_piece(t: &str) -> Option<u8> {
    let hex = t.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// GPT-2's byte-to-unicode table, inverted: the byte each printable stand-in means, by
/// character (the stand-ins are U+0021..=U+0143).
struct ByteDecoder([Option<u8>; 324]);

impl ByteDecoder {
    fn new() -> ByteDecoder {
        let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        let mut table = [None; 324];
        let mut next = 256;
        for b in 0..=255u8 {
            if printable(b) {
                table[b as usize] = Some(b);
            } else {
                table[next] = Some(b);
                next += 1;
            }
        }
        ByteDecoder(table)
    }

    fn get(&self, c: char) -> Option<u8> {
        *self.0.get(c as usize)?
    }
}

/// Appends a byte-level BPE token's bytes; a token with a character outside the table
/// stands for its own text (as in Hugging Face's ByteLevel decoder).
fn byte_level_decode(t: &str, table: &ByteDecoder, out: &mut Vec<u8>) {
    let start = out.len();
    for c in t.chars() {
        match table.get(c) {
            Some(b) => out.push(b),
            None => {
                out.truncate(start);
                out.extend_from_slice(t.as_bytes());
                return;
            }
        }
    }
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
    let table = ByteDecoder::new();
    let mut by_id = vec![Vec::new(); n];
    for (text, &id) in &vocab {
        by_id[id as usize] = match style {
            PieceStyle::ByteLevel => {
                let mut bytes = Vec::new();
                byte_level_decode(text, &table, &mut bytes);
                bytes
            }
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
        let t = ByteDecoder::new();
        assert_eq!(t.0.iter().flatten().count(), 256);
        assert_eq!(t.get('Ġ'), Some(b' '));
        assert_eq!(t.get('Ċ'), Some(b'\n'));
        assert_eq!(t.get('a'), Some(b'a'));
        assert_eq!(t.get(' '), None);
        let mut out = Vec::new();
        byte_level_decode("aĠ", &t, &mut out);
        byte_level_decode("a b", &t, &mut out);
        assert_eq!(out, b"a a b");
        assert_eq!(byte_piece("<0x0A>"), Some(10));
        assert_eq!(byte_piece("<0x0A"), None);
    }

    /// kiln's encoding and the Hugging Face tokenizer's, with special tokens parsed and
    /// as plain text.
    fn assert_same_as_hf(info: &TokenizerInfo, text: &str) {
        let hf = |literal: bool| {
            let mut t = (*info.tokenizer).clone();
            t.set_encode_special_tokens(literal);
            t.encode_fast(text, false).unwrap().get_ids().to_vec()
        };
        assert_eq!(info.encode(text).unwrap(), hf(false), "{text:?}");
        assert_eq!(info.encode_literal(text).unwrap(), hf(true), "{text:?} literal");
    }

    const ODD_TEXTS: &[&str] = &[
        "",
        " ",
        "  hello  world ",
        "hello<|turn|>world<|turn|>",
        "<|im_end|><|im_end|>ab",
        "<<|turn|>>",
        "z€z",
        "€zz€",
        "\n\n ab \n",
        "aabbab ab\u{e9}",
    ];

    #[test]
    fn native_encoding_is_hugging_faces() {
        let mut gemma4 = spm_vocab(None);
        gemma4.model = "gemma4".into();
        gemma4.merges = Some(
            ["h e", "l l", "▁ he", "ll o", "▁he llo", "w o"]
                .map(String::from)
                .to_vec(),
        );
        gemma4.tokens.push("\n\n".into());
        gemma4.token_types.as_mut().unwrap().push(1);
        gemma4.scores.as_mut().unwrap().push(0.0);
        let vocabs = [
            spm_vocab(None),
            spm_vocab(Some(false)),
            gemma4,
            bpe_vocab(Some("qwen2")),
            bpe_vocab(Some("llama3")),
        ];
        for v in &vocabs {
            let info = from_gguf_vocab(v).unwrap();
            for text in ODD_TEXTS {
                assert_same_as_hf(&info, text);
            }
        }
    }

    /// llama.cpp's test vectors, through kiln's encoder (the integration tests check the
    /// Hugging Face tokenizer on them).
    #[test]
    fn native_encoding_of_llama_cpp_vectors() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../third_party/llama-cpp-python-0.3.36/vendor/llama.cpp/models");
        let mut checked = 0;
        for name in [
            "llama-spm",
            "gemma-4",
            "qwen2",
            "llama-bpe",
            "gpt-2",
            "falcon",
            "deepseek-llm",
        ] {
            let gguf = dir.join(format!("ggml-vocab-{name}.gguf"));
            let Ok(f) = GgufFile::open(&gguf) else {
                panic!("{} is missing: run scripts/fetch-llama-cpp-src.sh", gguf.display());
            };
            let info = TokenizerInfo::from_gguf(&f).unwrap();
            let inp = std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.inp"))).unwrap();
            let out = std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.out"))).unwrap();
            for (text, want) in inp.split("\n__ggml_vocab_test__\n").zip(out.lines()) {
                let want: Vec<u32> = want.split_whitespace().map(|t| t.parse().unwrap()).collect();
                assert_eq!(info.encode_literal(text).unwrap(), want, "{name}: {text:?}");
                checked += 1;
            }
        }
        assert!(checked > 200, "{checked} cases");
    }
}
