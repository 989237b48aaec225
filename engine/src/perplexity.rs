//! Perplexity of a text, computed the way llama.cpp's `llama-perplexity` does so the two
//! can be compared: the tokens are cut into non-overlapping chunks of `n_ctx`, each chunk
//! runs from an empty context (its first token replaced by BOS where the model adds one),
//! and only the second half of each chunk is scored, so every scored token has at least
//! `n_ctx / 2` tokens of context.

use kiln_models::{KvCache, Scratch};

use crate::{Engine, EngineError, Result};

/// Tokens per forward pass while scoring: every position's logits are read back, so this
/// bounds the logits buffer (64 × vocabulary floats).
const SCORE_BATCH: usize = 64;

#[derive(Clone, Debug)]
pub struct PerplexityReport {
    pub ppl: f64,
    pub n_chunks: usize,
    pub n_ctx: usize,
    /// Tokens whose log-likelihood counted.
    pub scored: usize,
    /// Running perplexity after each chunk, as llama-perplexity prints it.
    pub running: Vec<f64>,
}

impl Engine {
    /// Perplexity of `text` over chunks of `n_ctx` tokens; `on_chunk(i, running_ppl)` is
    /// called after each chunk.
    pub fn perplexity(
        &self,
        text: &str,
        n_ctx: usize,
        mut on_chunk: impl FnMut(usize, f64),
    ) -> Result<PerplexityReport> {
        if n_ctx < 4 || !n_ctx.is_multiple_of(2) {
            return Err(EngineError::InvalidOption(format!(
                "context {n_ctx} must be even and at least 4"
            )));
        }
        let tok = self.tokenizer();
        let bos = tok.bos.filter(|_| tok.add_bos);
        let mut tokens: Vec<u32> = bos.into_iter().collect();
        tokens.extend(
            tok.encode_literal(text)
                .map_err(|e| EngineError::Tokenize(e.to_string()))?,
        );
        let n_chunks = tokens.len() / n_ctx;
        if n_chunks == 0 {
            return Err(EngineError::InvalidOption(format!(
                "the text has {} tokens; perplexity needs at least {} (2 × context)",
                tokens.len(),
                2 * n_ctx
            )));
        }
        let hyper = self.model().hyper().clone();
        let vocab = hyper.vocab;
        let first = n_ctx / 2;
        let batch = SCORE_BATCH.min(n_ctx);

        let mut device = self.core().lock_device();
        let device = &mut *device;
        let be = device.be.as_mut();
        let mut scratch = Scratch::new(be, &hyper, batch, batch);
        let mut cache = KvCache::new(be, &hyper, n_ctx);
        let mut logits = vec![0f32; batch * vocab];
        let (mut nll, mut scored, mut running) = (0f64, 0usize, Vec::new());
        for chunk in 0..n_chunks {
            let mut input = tokens[chunk * n_ctx..(chunk + 1) * n_ctx].to_vec();
            if let Some(bos) = bos {
                input[0] = bos;
            }
            cache.len = 0;
            for (b, part) in input.chunks(batch).enumerate() {
                let out = cache.forward(self.model(), be, &mut scratch, part, part.len());
                let rows = &mut logits[..part.len() * vocab];
                be.read(out, 0, rows);
                for (i, row) in rows.chunks(vocab).enumerate() {
                    // Position p predicts the token at p + 1; score p in first..n_ctx - 1.
                    let pos = b * batch + i;
                    if pos >= first && pos + 1 < n_ctx {
                        nll -= log_softmax_at(row, input_target(&tokens, chunk, n_ctx, pos)) as f64;
                        scored += 1;
                    }
                }
            }
            let ppl = (nll / scored as f64).exp();
            running.push(ppl);
            on_chunk(chunk, ppl);
        }
        scratch.free(be);
        cache.free(be);
        Ok(PerplexityReport {
            ppl: (nll / scored as f64).exp(),
            n_chunks,
            n_ctx,
            scored,
            running,
        })
    }
}

/// The token that position `pos` of chunk `chunk` predicts (from the unmodified text, so
/// a BOS substituted at position 0 never becomes a target).
fn input_target(tokens: &[u32], chunk: usize, n_ctx: usize, pos: usize) -> u32 {
    tokens[chunk * n_ctx + pos + 1]
}

/// `log(softmax(row)[target])`, computed in f64 for a stable sum over long texts.
fn log_softmax_at(row: &[f32], target: u32) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|v| ((v - max) as f64).exp()).sum();
    ((row[target as usize] - max) as f64 - sum.ln()) as f32
}

#[cfg(test)]
mod tests {
    use super::log_softmax_at;

    #[test]
    fn log_softmax_of_uniform_row_is_log_of_one_over_n() {
        let row = [3.0f32; 8];
        assert!((log_softmax_at(&row, 5) - (1.0f32 / 8.0).ln()).abs() < 1e-6);
    }
}
