//! Saving a session's state (its tokens and computed keys and values) to a file, and
//! loading it back into a new session of the same model.
//!
//! Layout, little-endian: the magic `KILNSESS`, the format version (u32), the model's
//! fingerprint (u64), layers, KV row width in buffer floats, tokens and computed
//! positions (u32 each), per layer the first position whose rows are kept (u32 each: 0,
//! or for a sliding-window layer the first its next query sees), the tokens (u32 each),
//! then per layer the keys and the values of positions `kept..computed` (rows as the
//! backend stores them: f32, or packed f16), and an FNV-1a checksum (u64) of everything
//! before it. A
//! load checks the size the header implies, the fingerprint and the checksum before it
//! touches the cache, so a truncated or foreign file is an error, never a wrong context.

use std::io::Write;
use std::path::Path;

use crate::kv::PageCopy;
use crate::scheduler::{Core, Seq};
use crate::{Engine, EngineError, Result, Session, SessionOptions};

const MAGIC: &[u8; 8] = b"KILNSESS";
const VERSION: u32 = 3;
const HEADER_BYTES: usize = 8 + 4 + 8 + 4 * 4;

/// A hash of what a saved state depends on: the model's shapes and its vocabulary.
pub(crate) fn fingerprint(core: &Core) -> u64 {
    let mut h = Fnv::new();
    h.write(format!("{:?}", core.model.hyper()).as_bytes());
    let vocab = core.model.hyper().vocab as u32;
    for id in 0..vocab {
        h.write(core.tokenizer.token_bytes(id));
        h.write(&[0xff]);
    }
    h.finish()
}

struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

fn file_error(path: &Path, reason: impl Into<String>) -> EngineError {
    EngineError::SessionFile {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

impl Session {
    /// Writes this session's context to `path` (atomically: a crash leaves the old file
    /// or none), for [`Session::load`] to restore later without recomputing it.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let core = self.engine.core();
        let hyper = core.model.hyper();
        let page_size = self.engine.page_size();
        let (row_floats, layout) = {
            let device = core.lock_device();
            (device.store.row_floats, device.store.layout.clone())
        };
        // Copy what the file needs while the session cannot change (it is not busy).
        let (tokens, tables, computed) = {
            let state = core.lock_state();
            let seq = state.seqs.get(&self.id).expect("a live session has a sequence");
            if seq.busy() {
                return Err(EngineError::Busy);
            }
            (seq.tokens.clone(), seq.pages.tables.clone(), seq.pages.len)
        };
        let kept: Vec<usize> = (0..hyper.n_layer)
            .map(|l| first_row_read(layout.layer_window(l), computed))
            .collect();
        let rows_kept: usize = kept.iter().map(|&k| computed - k).sum();
        let mut out =
            Vec::with_capacity(HEADER_BYTES + 4 * hyper.n_layer + 4 * tokens.len() + 8 * rows_kept * row_floats + 8);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.engine.fingerprint().to_le_bytes());
        for n in [hyper.n_layer, row_floats, tokens.len(), computed]
            .into_iter()
            .chain(kept.iter().copied())
        {
            out.extend_from_slice(&(n as u32).to_le_bytes());
        }
        for t in &tokens {
            out.extend_from_slice(&t.to_le_bytes());
        }
        {
            let mut device = core.lock_device();
            let device = &mut *device;
            let mut rows = vec![0f32; page_size * row_floats];
            for (l, &first) in kept.iter().enumerate() {
                let kv = device.store.layer(l);
                for buf in [kv.keys, kv.values] {
                    for (at, n) in page_runs(&tables[kv.group], page_size, first..computed) {
                        let rows = &mut rows[..n * row_floats];
                        device.be.read(buf, at * row_floats, rows);
                        for x in rows.iter() {
                            out.extend_from_slice(&x.to_le_bytes());
                        }
                    }
                }
            }
        }
        let mut h = Fnv::new();
        h.write(&out);
        out.extend_from_slice(&h.finish().to_le_bytes());
        let tmp = path.with_extension("tmp-kiln");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&out)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            file_error(path, e.to_string())
        })
    }

    /// A new session of `engine` with the context saved in `path` by [`Session::save`].
    pub fn load(engine: &Engine, path: impl AsRef<Path>) -> Result<Session> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| file_error(path, e.to_string()))?;
        let bad = |reason: &str| file_error(path, reason);
        if bytes.len() < HEADER_BYTES + 8 || &bytes[..8] != MAGIC {
            return Err(bad("not a kiln session file"));
        }
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        let version = u32_at(8);
        if version != VERSION as usize {
            return Err(bad(&format!("format version {version}, this kiln reads {VERSION}")));
        }
        let core = engine.core();
        let hyper = core.model.hyper();
        let fingerprint = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
        let (n_layer, row_floats, n_tokens, computed) = (u32_at(20), u32_at(24), u32_at(28), u32_at(32));
        if fingerprint != engine.fingerprint() || n_layer != hyper.n_layer {
            return Err(bad("saved from another model"));
        }
        let (store_row_floats, layout) = {
            let device = core.lock_device();
            (device.store.row_floats, device.store.layout.clone())
        };
        if row_floats != store_row_floats {
            return Err(bad("saved with another key/value cache format (another backend)"));
        }
        if computed > n_tokens || n_tokens > core.n_ctx {
            return Err(bad(&format!(
                "{n_tokens} tokens ({computed} computed) do not fit a context of {}",
                core.n_ctx
            )));
        }
        if bytes.len() < HEADER_BYTES + 4 * n_layer + 8 {
            return Err(bad("truncated"));
        }
        let kept: Vec<usize> = (0..n_layer).map(|l| u32_at(HEADER_BYTES + 4 * l)).collect();
        for (l, &first) in kept.iter().enumerate() {
            if first > computed {
                return Err(bad("corrupt (rows kept past the computed ones)"));
            }
            // Rows a windowed layer's next query sees are enough; other layers need all.
            let needed = first_row_read(layout.layer_window(l), computed);
            if first > needed {
                return Err(bad(&format!(
                    "layer {l}'s keys and values are kept from position {first}, this engine needs \
                     them from {needed} (saved with a sliding-window cache, loaded into a full one)"
                )));
            }
        }
        let rows_kept: usize = kept.iter().map(|&k| computed - k).sum();
        let tokens_at = HEADER_BYTES + 4 * n_layer;
        let expected = tokens_at + 4 * n_tokens + 8 * rows_kept * row_floats + 8;
        if bytes.len() != expected {
            return Err(bad(&format!(
                "{} bytes where its header implies {expected} (truncated or corrupt)",
                bytes.len()
            )));
        }
        let (body, sum) = bytes.split_at(expected - 8);
        let mut h = Fnv::new();
        h.write(body);
        if h.finish().to_le_bytes() != sum {
            return Err(bad("checksum mismatch (corrupt)"));
        }
        let tokens: Vec<u32> = body[tokens_at..tokens_at + 4 * n_tokens]
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();
        if let Some(bad_id) = tokens.iter().find(|&&t| t as usize >= hyper.vocab) {
            return Err(bad(&format!("token {bad_id} is outside the vocabulary")));
        }
        let session = engine.session(SessionOptions::default());
        let page_size = engine.page_size();
        let mut copies: Vec<PageCopy> = Vec::new();
        let tables = {
            let mut state = core.lock_state();
            let state = &mut *state;
            let seq: &mut Seq = state.seqs.get_mut(&session.id).expect("just made");
            seq.tokens.extend_from_slice(&tokens);
            state
                .pool
                .reserve(&mut seq.pages, computed, &mut copies)
                .map_err(|_| EngineError::KvExhausted)?;
            // A fresh sequence shares no page, so nothing needs copying.
            debug_assert!(copies.is_empty());
            seq.in_flight = true;
            seq.pages.tables.clone()
        };
        {
            let mut device = core.lock_device();
            let device = &mut *device;
            let mut floats = body[tokens_at + 4 * n_tokens..]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")));
            let mut rows = vec![0f32; page_size * row_floats];
            for (l, &first) in kept.iter().enumerate() {
                let kv = device.store.layer(l);
                for buf in [kv.keys, kv.values] {
                    for (at, n) in page_runs(&tables[kv.group], page_size, first..computed) {
                        let rows = &mut rows[..n * row_floats];
                        for r in rows.iter_mut() {
                            *r = floats.next().expect("sized by the header check");
                        }
                        device.be.write(buf, at * row_floats, rows);
                    }
                }
            }
        }
        let mut state = core.lock_state();
        let state = &mut *state;
        let seq = state.seqs.get_mut(&session.id).expect("just made");
        seq.in_flight = false;
        // Rows before a layer's first kept one were not restored: their pages must not be
        // offered to other sequences as a cached prefix.
        let mut restored_from = vec![0; layout.groups()];
        for (l, &first) in kept.iter().enumerate() {
            let group = layout.layers[l].0;
            restored_from[group] = restored_from[group].max(first);
        }
        state
            .pool
            .commit_restored(&mut seq.pages, computed, &seq.tokens, &restored_from);
        Ok(session)
    }
}

/// The first position whose keys and values the next query of a layer with `window`
/// reads, in a context of `computed` positions.
fn first_row_read(window: Option<usize>, computed: usize) -> usize {
    window.map_or(0, |w| (computed + 1).saturating_sub(w))
}

/// The cache rows of `positions` under a page table, as runs of consecutive rows:
/// `(first row, rows)`, one per page touched.
fn page_runs(
    table: &[u32],
    page_size: usize,
    positions: std::ops::Range<usize>,
) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut pos = positions.start;
    std::iter::from_fn(move || {
        if pos >= positions.end {
            return None;
        }
        let n = (page_size - pos % page_size).min(positions.end - pos);
        let run = (table[pos / page_size] as usize * page_size + pos % page_size, n);
        pos += n;
        Some(run)
    })
}
