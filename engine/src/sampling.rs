//! Choosing the next token from logits: greedy, or a random draw from a seeded generator
//! (one seed, one output), after the adjustments llama.cpp and transformers users expect.
//!
//! Each call to [`Sampler::sample`] runs these steps, in this order:
//!
//! 1. **logit bias**: `logit_bias` values are added to their tokens' logits (`-inf` bans one);
//! 2. **penalties** over the last `penalty_last_n` tokens given to [`Sampler::accept`]: a
//!    repeated token's logit is divided by `repetition_penalty` when positive and multiplied
//!    by it otherwise (CTRL, as llama.cpp), then lowered by
//!    `presence_penalty + frequency_penalty × count` (OpenAI);
//! 3. greedy (`temperature <= 0`) stops here and takes the largest adjusted logit;
//! 4. **top-k** keeps the k largest logits;
//! 5. **temperature** and softmax turn them into probabilities;
//! 6. **top-p** keeps the most likely tokens until their probability reaches p;
//! 7. **min-p** keeps the tokens at least `min_p` times as likely as the most likely one;
//! 8. one draw from what is left.
//!
//! Top-p and min-p see the distribution after temperature, as transformers (and kiln
//! before min-p existed) do. llama.cpp's default chain applies temperature last, so its
//! top-p and min-p see the temperature-1 distribution; the two agree at temperature 1.
//!
//! Nothing is allocated per token once the buffers have grown to the vocabulary and the
//! penalty window, so a decode loop stays allocation-free.

/// How to pick each token. The defaults are llama.cpp's, with min-p, the penalties and
/// the bias off.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    /// 0 picks the most likely token (greedy); higher values flatten the distribution.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p (1: all).
    pub top_p: f32,
    /// Keep only tokens at least this fraction as likely as the most likely one (0: all).
    pub min_p: f32,
    /// Divides a repeated token's positive logit, multiplies its negative one (1: off).
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token that appears in the window (0: off).
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per appearance in the window (0: off).
    pub frequency_penalty: f32,
    /// How many of the most recent context tokens the penalties look at (0: penalties off,
    /// as llama.cpp's `repeat_last_n`; a number at least the context length: all of it).
    pub penalty_last_n: usize,
    /// Added to a token's logit before anything else; `f32::NEG_INFINITY` bans the token.
    /// A token listed twice gets both. Ids outside the vocabulary are for the engine to
    /// reject; the sampler ignores them.
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            penalty_last_n: 64,
            logit_bias: Vec::new(),
            seed: 0,
        }
    }
}

impl Sampling {
    pub fn greedy() -> Self {
        Sampling {
            temperature: 0.0,
            ..Default::default()
        }
    }

    /// Checks that every option is in its range; the error names the option and its value.
    pub fn validate(&self) -> Result<(), String> {
        // Each test is written so that NaN fails it.
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "temperature must be finite and at least 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.min_p >= 0.0 && self.min_p <= 1.0) {
            return Err(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(format!(
                "repetition_penalty must be finite and greater than 0 (1 is off), got {}",
                self.repetition_penalty
            ));
        }
        if !self.presence_penalty.is_finite() {
            return Err(format!(
                "presence_penalty must be finite, got {}",
                self.presence_penalty
            ));
        }
        if !self.frequency_penalty.is_finite() {
            return Err(format!(
                "frequency_penalty must be finite, got {}",
                self.frequency_penalty
            ));
        }
        if let Some((id, bias)) = self.logit_bias.iter().find(|(_, b)| b.is_nan() || *b == f32::INFINITY) {
            return Err(format!(
                "logit_bias of token {id} must be finite or -inf (to ban it), got {bias}"
            ));
        }
        Ok(())
    }

    fn penalizes(&self) -> bool {
        self.penalty_last_n > 0
            && (self.repetition_penalty != 1.0 || self.presence_penalty != 0.0 || self.frequency_penalty != 0.0)
    }
}

/// A sampler with its own random stream, the recent tokens the penalties look at, and
/// reusable buffers. Make one per generation; feed it every token of the context with
/// [`Sampler::accept`] (the prompt's too, so that penalties cover it, as llama.cpp does)
/// and call [`Sampler::sample`] once per generated token.
pub struct Sampler {
    params: Sampling,
    rng: SplitMix64,
    /// `logit_bias` sorted by token, a token listed twice summed into one entry.
    bias: Vec<(u32, f32)>,
    /// The last `penalty_last_n` accepted tokens, as a ring: penalties need only counts,
    /// so the order inside does not matter, only which slot is the oldest (`oldest`).
    history: Vec<u32>,
    oldest: usize,
    /// `history`, sorted, to count each token's repeats without a map.
    window: Vec<u32>,
    /// (token, logit after bias and penalties) of every token these touch, sorted by token.
    adjusted: Vec<(u32, f32)>,
    candidates: Vec<(u32, f32)>,
}

/// Penalty windows up to this size are reserved up front; a larger one grows once, while
/// the context fills it.
const RESERVED_WINDOW: usize = 4096;

impl Sampler {
    pub fn new(params: Sampling) -> Self {
        let rng = SplitMix64(params.seed);
        let mut bias = params.logit_bias.clone();
        bias.sort_by_key(|(id, _)| *id);
        bias.dedup_by(|later, kept| {
            // `dedup_by` hands the later entry first; fold it into the one kept.
            let same = later.0 == kept.0;
            if same {
                kept.1 += later.1;
            }
            same
        });
        let window = if params.penalizes() {
            params.penalty_last_n.min(RESERVED_WINDOW)
        } else {
            0
        };
        Sampler {
            rng,
            adjusted: Vec::with_capacity(bias.len() + window),
            bias,
            history: Vec::with_capacity(window),
            oldest: 0,
            window: Vec::with_capacity(window),
            candidates: Vec::new(),
            params,
        }
    }

    /// Records a token of the context, for the penalties: each prompt token, then each
    /// generated one.
    pub fn accept(&mut self, token: u32) {
        if !self.params.penalizes() {
            return;
        }
        let n = self.params.penalty_last_n;
        if self.history.len() < n {
            self.history.push(token);
        } else {
            self.history[self.oldest] = token;
            self.oldest = (self.oldest + 1) % n;
        }
    }

    /// How many of the most likely tokens this sampler needs to see, when it needs no
    /// more: 1 for greedy, `top_k` for top-k sampling, and only without bias or penalties
    /// (which change logits outside any such set). Then the backend can select them where
    /// the logits are ([`kiln_runtime::Backend::top_k_rows`]) and only they travel, for
    /// [`Sampler::sample_top`].
    pub fn candidates_needed(&self) -> Option<usize> {
        if !self.bias.is_empty() || self.params.penalizes() {
            return None;
        }
        if self.params.temperature <= 0.0 {
            return Some(1);
        }
        (self.params.top_k > 0).then_some(self.params.top_k)
    }

    /// The next token for these logits (one per vocabulary entry).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        self.adjust(logits);
        if self.params.temperature <= 0.0 {
            return argmax_adjusted(logits, &self.adjusted);
        }

        let c = &mut self.candidates;
        c.clear();
        c.extend(logits.iter().enumerate().map(|(i, l)| (i as u32, *l)));
        for &(id, l) in &self.adjusted {
            c[id as usize].1 = l;
        }
        // Banned tokens (and NaN, which no comparison keeps) leave the draw entirely.
        c.retain(|(_, l)| *l > f32::NEG_INFINITY);
        if c.is_empty() {
            // Everything is banned: no choice is right, so take the greedy one.
            return argmax_adjusted(logits, &self.adjusted);
        }
        self.draw()
    }

    /// [`Sampler::sample`] from a set of candidates that holds at least the
    /// [`Sampler::candidates_needed`] most likely tokens (in any order, NaN and -inf left
    /// out), as the backend's `top_k_rows` selects them: the same token, and the same
    /// draw from the random stream.
    pub fn sample_top(&mut self, top: &[(u32, f32)]) -> u32 {
        if top.is_empty() {
            // No token has a number: as `argmax` of such logits.
            return 0;
        }
        self.candidates.clear();
        self.candidates.extend_from_slice(top);
        if self.params.temperature <= 0.0 {
            let best = self.candidates.iter().min_by(|a, b| by_rank(a, b));
            return best.expect("not empty").0;
        }
        self.draw()
    }

    /// Top-k, temperature, top-p, min-p and the draw over `self.candidates` (each with a
    /// number).
    fn draw(&mut self) -> u32 {
        let c = &mut self.candidates;
        // Top-k, then sort the survivors, most likely first (lower id first on ties, also
        // at the cut, so that the kept set is the backends' `top_k_rows`).
        let k = if self.params.top_k == 0 {
            c.len()
        } else {
            self.params.top_k.min(c.len())
        };
        if k < c.len() {
            c.select_nth_unstable_by(k - 1, by_rank);
            c.truncate(k);
        }
        c.sort_unstable_by(by_rank);
        let max = c[0].1;
        if max == f32::INFINITY {
            return c[0].0;
        }

        // Temperature and softmax, left unnormalized: the top token's weight is exactly 1.
        let mut total = 0.0;
        for (_, l) in c.iter_mut() {
            *l = ((*l - max) / self.params.temperature).exp();
            total += *l;
        }

        // Top-p over the normalized probabilities.
        let mut kept = 0.0;
        let mut keep = c.len();
        for (i, (_, p)) in c.iter().enumerate() {
            kept += *p / total;
            if kept >= self.params.top_p {
                keep = i + 1;
                break;
            }
        }
        c.truncate(keep);

        // Min-p: the top weight is 1, so min_p × top probability is min_p itself in these
        // units. Weights fall along the sorted list, so the kept tokens are a prefix; those
        // whose weight underflowed to 0 go too, so that the fallback below can only land on
        // a token that could have been drawn.
        let min_p = self.params.min_p;
        let keep = c.partition_point(|(_, p)| *p >= min_p && *p > 0.0);
        c.truncate(keep);

        let mass: f32 = c.iter().map(|(_, p)| p).sum();
        let mut r = self.rng.next_f32() * mass;
        for (id, p) in c.iter() {
            if r < *p {
                return *id;
            }
            r -= p;
        }
        // Rounding left r at or past the last weight.
        c[c.len() - 1].0
    }

    /// Fills `adjusted` with the logits that bias and penalties change: a merge of the
    /// sorted bias list with the sorted penalty window, so only the few touched tokens
    /// are visited, whatever the vocabulary size.
    fn adjust(&mut self, logits: &[f32]) {
        self.adjusted.clear();
        self.window.clear();
        let p = &self.params;
        if p.penalizes() {
            self.window.extend_from_slice(&self.history);
            self.window.sort_unstable();
        }
        let (bias, window) = (&self.bias, &self.window);
        let (mut b, mut w) = (0, 0);
        loop {
            let id = match (bias.get(b), window.get(w)) {
                (None, None) => break,
                (Some(&(x, _)), None) => x,
                (None, Some(&y)) => y,
                (Some(&(x, _)), Some(&y)) => x.min(y),
            };
            let mut logit = logits.get(id as usize).copied().unwrap_or(f32::NAN);
            if bias.get(b).is_some_and(|e| e.0 == id) {
                logit += bias[b].1;
                b += 1;
            }
            let mut count = 0u32;
            while window.get(w) == Some(&id) {
                count += 1;
                w += 1;
            }
            if count > 0 {
                if logit > 0.0 {
                    logit /= p.repetition_penalty;
                } else {
                    logit *= p.repetition_penalty;
                }
                logit -= p.presence_penalty + p.frequency_penalty * count as f32;
            }
            if (id as usize) < logits.len() {
                self.adjusted.push((id, logit));
            }
        }
    }
}

/// The index of the largest value (the first one on ties).
pub fn argmax(values: &[f32]) -> u32 {
    // As the backends' `argmax_rows`: NaN never wins, not even in the first place.
    let (mut best, mut best_value) = (0, f32::NEG_INFINITY);
    for (i, &v) in values.iter().enumerate() {
        if v > best_value {
            (best, best_value) = (i, v);
        }
    }
    best as u32
}

/// Most likely first, the lower id first on ties.
fn by_rank(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// `argmax` of `logits` with the entries in `adjusted` (sorted by token) replaced: the
/// untouched runs between them are scanned as plain slices, without a copy of the logits.
fn argmax_adjusted(logits: &[f32], adjusted: &[(u32, f32)]) -> u32 {
    if adjusted.is_empty() {
        return argmax(logits);
    }
    // Candidates are visited in token order and replace the best only when strictly
    // larger, so ties go to the lowest token, as in `argmax`.
    let mut best: Option<(u32, f32)> = None;
    let mut consider = |id: u32, v: f32| {
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((id, v));
        }
    };
    let mut start = 0;
    for &(id, v) in adjusted {
        let end = id as usize;
        if start < end {
            let i = start + argmax(&logits[start..end]) as usize;
            consider(i as u32, logits[i]);
        }
        consider(id, v);
        start = end + 1;
    }
    if start < logits.len() {
        let i = start + argmax(&logits[start..]) as usize;
        consider(i as u32, logits[i]);
    }
    best.map_or(0, |(id, _)| id)
}

/// SplitMix64: tiny, fast, and the same sequence on every platform for a seed.
pub(crate) struct SplitMix64(pub(crate) u64);

impl SplitMix64 {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random sampling over the whole vocabulary, so only the option under test cuts it.
    fn plain(seed: u64) -> Sampling {
        Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed,
            ..Default::default()
        }
    }

    fn sampler(params: Sampling, context: &[u32]) -> Sampler {
        let mut s = Sampler::new(params);
        for &t in context {
            s.accept(t);
        }
        s
    }

    /// How often each token is drawn in `n` draws.
    fn histogram(s: &mut Sampler, logits: &[f32], n: usize) -> Vec<usize> {
        let mut seen = vec![0; logits.len()];
        for _ in 0..n {
            seen[s.sample(logits) as usize] += 1;
        }
        seen
    }

    /// What a backend's `top_k_rows` hands over: the k highest-ranked numbers of a row,
    /// here by a full sort, shuffled (they come in no particular order).
    fn backend_top_k(logits: &[f32], k: usize, shuffle: u64) -> Vec<(u32, f32)> {
        let mut all: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| **l > f32::NEG_INFINITY)
            .map(|(i, l)| (i as u32, *l))
            .collect();
        all.sort_by(by_rank);
        all.truncate(k);
        let mut rng = SplitMix64(shuffle);
        for i in (1..all.len()).rev() {
            all.swap(i, (rng.next_f32() * (i + 1) as f32) as usize % (i + 1));
        }
        all
    }

    /// Sampling from the backend's top-k selection is sampling from the logits: the same
    /// tokens and the same random stream, over ties at the cut, banned tokens and every
    /// cut of top-p, min-p and temperature.
    #[test]
    fn sampling_from_the_top_k_matches_whole_rows() {
        let mut rng = SplitMix64(99);
        for case in 0..60u64 {
            let params = Sampling {
                temperature: [0.0, 0.3, 0.8, 1.5][case as usize % 4],
                top_k: [1, 5, 40, 64][(case / 4) as usize % 4],
                top_p: [1.0, 0.95, 0.5][case as usize % 3],
                min_p: [0.0, 0.05][case as usize % 2],
                seed: case,
                ..Default::default()
            };
            let (mut whole, mut top) = (Sampler::new(params.clone()), Sampler::new(params.clone()));
            let needed = top.candidates_needed().expect("no bias or penalties");
            assert_eq!(needed, if params.temperature <= 0.0 { 1 } else { params.top_k });
            for step in 0..20 {
                // Logits on a coarse grid, so that ties (at the cut too) are common.
                let mut logits: Vec<f32> = (0..300).map(|_| (rng.next_f32() * 12.0).round() / 2.0).collect();
                logits[(step * 7) % 300] = f32::NEG_INFINITY;
                logits[(step * 13 + 5) % 300] = f32::NAN;
                let want = whole.sample(&logits);
                // A selection wider than needed (another session's k) must do too.
                let got = top.sample_top(&backend_top_k(&logits, needed + step % 3, step as u64));
                assert_eq!(got, want, "{params:?}, step {step}");
            }
        }
        // No number at all: as argmax of such a row.
        let mut s = Sampler::new(plain(1));
        assert_eq!(s.sample_top(&[]), s.sample(&[f32::NAN, f32::NEG_INFINITY]));
    }

    #[test]
    fn greedy_takes_the_largest_logit() {
        let mut s = Sampler::new(Sampling::greedy());
        assert_eq!(s.sample(&[0.1, 2.0, -1.0, 1.9]), 1);
        assert_eq!(s.sample(&[3.0, 2.0, 3.0]), 0, "ties go to the first");
    }

    #[test]
    fn one_seed_gives_one_sequence() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let params = Sampling {
            repetition_penalty: 1.3,
            frequency_penalty: 0.2,
            min_p: 0.05,
            ..plain(42)
        };
        // Accepting each drawn token makes the penalties part of what must repeat.
        let run = |p: Sampling| {
            let mut s = sampler(p, &[3, 4, 5]);
            (0..50)
                .map(|_| {
                    let t = s.sample(&logits);
                    s.accept(t);
                    t
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(params.clone()), run(params.clone()));
        assert_ne!(run(params.clone()), run(Sampling { seed: 43, ..params }));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let logits = [0.5, 3.0, 2.9, -4.0];
        let mut s = Sampler::new(Sampling {
            temperature: 5.0,
            top_k: 1,
            ..plain(7)
        });
        for _ in 0..50 {
            assert_eq!(s.sample(&logits), 1);
        }
    }

    #[test]
    fn top_p_excludes_unlikely_tokens() {
        // Token 0 holds ~88% of the mass at temperature 1; top_p 0.5 keeps only it.
        let logits = [4.0, 2.0, 0.0, 0.0];
        let mut s = Sampler::new(Sampling { top_p: 0.5, ..plain(1) });
        for _ in 0..50 {
            assert_eq!(s.sample(&logits), 0);
        }
    }

    #[test]
    fn top_p_sees_the_tempered_distribution() {
        // At temperature 1 token 0 has 73%, so top_p 0.95 keeps both tokens; at 0.25 it
        // has 98% and keeps it alone.
        let logits = [1.0, 0.0];
        let mut warm = Sampler::new(Sampling {
            top_p: 0.95,
            ..plain(3)
        });
        assert!(histogram(&mut warm, &logits, 500)[1] > 0);
        let mut cold = Sampler::new(Sampling {
            top_p: 0.95,
            temperature: 0.25,
            ..plain(3)
        });
        assert_eq!(histogram(&mut cold, &logits, 500)[1], 0);
    }

    #[test]
    fn min_p_excludes_tokens_relative_to_the_top_one() {
        // Relative to token 0 at temperature 1: 1, 0.61, 0.14, 0.05.
        let logits = [2.0, 1.5, 0.0, -1.0];
        let mut s = Sampler::new(Sampling { min_p: 0.3, ..plain(5) });
        let seen = histogram(&mut s, &logits, 2000);
        assert!(seen[0] > 0 && seen[1] > 0, "{seen:?}");
        assert_eq!(seen[2] + seen[3], 0, "{seen:?}");

        // After temperature 2 token 2 is at 0.37 of the top one and passes; 3 (0.22) not.
        let mut s = Sampler::new(Sampling {
            min_p: 0.3,
            temperature: 2.0,
            ..plain(5)
        });
        let seen = histogram(&mut s, &logits, 2000);
        assert!(seen[2] > 0, "{seen:?}");
        assert_eq!(seen[3], 0, "{seen:?}");
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
        let params = Sampling {
            repetition_penalty: 1.1,
            ..Sampling::greedy()
        };
        // 2.0 / 1.1 = 1.82 falls under 1.9.
        assert_eq!(sampler(Sampling::greedy(), &[0]).sample(&[2.0, 1.9]), 0);
        assert_eq!(sampler(params.clone(), &[0]).sample(&[2.0, 1.9]), 1);
        // -1.0 × 1.1 = -1.1 falls under -1.05; dividing would have raised it.
        assert_eq!(sampler(params.clone(), &[0]).sample(&[-1.0, -1.05]), 1);
        // Only repeated tokens are touched.
        assert_eq!(sampler(params, &[1]).sample(&[2.0, 1.9]), 0);
    }

    #[test]
    fn presence_penalty_counts_a_token_once() {
        let logits = [2.0, 1.9];
        let params = |presence| Sampling {
            presence_penalty: presence,
            ..Sampling::greedy()
        };
        assert_eq!(sampler(params(0.2), &[0]).sample(&logits), 1);
        // Three repeats cost no more than one: 2.0 - 0.05 stays above 1.9.
        assert_eq!(sampler(params(0.05), &[0, 0, 0]).sample(&logits), 0);
    }

    #[test]
    fn frequency_penalty_grows_with_the_count() {
        let logits = [2.0, 1.5];
        let params = Sampling {
            frequency_penalty: 0.2,
            ..Sampling::greedy()
        };
        assert_eq!(sampler(params.clone(), &[0]).sample(&logits), 0, "2.0 - 0.2");
        assert_eq!(sampler(params, &[0, 0, 0]).sample(&logits), 1, "2.0 - 0.6");
    }

    #[test]
    fn penalties_look_only_at_the_last_n_tokens() {
        let logits = [2.0, 1.9, 0.0, 0.0];
        let params = |n| Sampling {
            repetition_penalty: 2.0,
            penalty_last_n: n,
            ..Sampling::greedy()
        };
        assert_eq!(sampler(params(2), &[0, 2, 3]).sample(&logits), 0, "0 left the window");
        assert_eq!(sampler(params(3), &[0, 2, 3]).sample(&logits), 1);
        assert_eq!(sampler(params(2), &[2, 0, 3]).sample(&logits), 1);
        // The ring keeps sliding long after it first filled.
        let mut s = sampler(params(2), &[0, 0, 0, 2, 0, 3, 2]);
        assert_eq!(s.sample(&logits), 0);
        s.accept(0);
        assert_eq!(s.sample(&logits), 1);
        assert_eq!(
            sampler(params(0), &[0, 0, 0]).sample(&logits),
            0,
            "0 turns penalties off"
        );
    }

    #[test]
    fn logit_bias_bans_and_promotes() {
        let logits = [0.0, 3.0, 2.9, 1.0];
        let ban = Sampling {
            logit_bias: vec![(1, f32::NEG_INFINITY)],
            ..Sampling::greedy()
        };
        assert_eq!(Sampler::new(ban.clone()).sample(&logits), 2);
        // A ban holds in random sampling too, at any temperature.
        let mut s = Sampler::new(Sampling {
            temperature: 5.0,
            ..plain(9)
        });
        assert!(histogram(&mut s, &logits, 500)[1] > 0);
        let mut s = Sampler::new(Sampling {
            temperature: 5.0,
            logit_bias: ban.logit_bias.clone(),
            ..plain(9)
        });
        assert_eq!(histogram(&mut s, &logits, 2000)[1], 0);
        // Entries for one token add up; an id past the vocabulary is ignored.
        let promote = Sampling {
            logit_bias: vec![(0, 1.6), (99, 50.0), (0, 1.6)],
            ..Sampling::greedy()
        };
        assert_eq!(Sampler::new(promote).sample(&logits), 0);
    }

    #[test]
    fn with_every_token_banned_a_token_still_comes_back() {
        let bias = vec![(0, f32::NEG_INFINITY), (1, f32::NEG_INFINITY), (2, f32::NEG_INFINITY)];
        for temperature in [0.0, 1.0] {
            let mut s = Sampler::new(Sampling {
                temperature,
                min_p: 0.1,
                logit_bias: bias.clone(),
                ..plain(4)
            });
            assert!(s.sample(&[1.0, 2.0, 3.0]) < 3);
            // NaN logits are never drawn, whatever the model produced.
            assert_eq!(s.sample(&[1.0, 2.0, f32::NAN, 0.5]), 3);
        }
    }

    #[test]
    fn bias_comes_before_penalties() {
        // Bias first: (-0.5 + 1.3) / 2 = 0.4 beats 0.35. Penalty first would give
        // -0.5 × 2 + 1.3 = 0.3 and lose.
        let params = Sampling {
            logit_bias: vec![(0, 1.3)],
            repetition_penalty: 2.0,
            ..Sampling::greedy()
        };
        assert_eq!(sampler(params, &[0]).sample(&[-0.5, 0.35]), 0);
    }

    #[test]
    fn draws_stay_inside_the_kept_set() {
        let mut rng = SplitMix64(11);
        for case in 0..20 {
            let vocab = 200;
            let logits: Vec<f32> = (0..vocab).map(|_| rng.next_f32() * 8.0 - 4.0).collect();
            let params = Sampling {
                temperature: 0.5 + rng.next_f32() * 1.5,
                top_k: 1 + (rng.next_u64() % 60) as usize,
                top_p: 0.5 + rng.next_f32() * 0.5,
                min_p: rng.next_f32() * 0.2,
                frequency_penalty: 0.5,
                logit_bias: vec![(argmax(&logits), f32::NEG_INFINITY)],
                seed: case,
                ..Default::default()
            };
            let context = [5, 5, 17];

            // The kept set, computed independently in f64 from the definitions.
            let mut adjusted: Vec<(u32, f64)> = logits.iter().enumerate().map(|(i, l)| (i as u32, *l as f64)).collect();
            adjusted[argmax(&logits) as usize].1 = f64::NEG_INFINITY;
            adjusted[5].1 -= 1.0;
            adjusted[17].1 -= 0.5;
            adjusted.retain(|(_, l)| l.is_finite());
            adjusted.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            adjusted.truncate(params.top_k);
            let t = params.temperature as f64;
            let weights: Vec<f64> = adjusted.iter().map(|(_, l)| ((l - adjusted[0].1) / t).exp()).collect();
            let total: f64 = weights.iter().sum();
            let mut cumulative = 0.0;
            let mut kept = Vec::new();
            for ((id, _), w) in adjusted.iter().zip(&weights) {
                if *w >= params.min_p as f64 {
                    kept.push(*id);
                }
                cumulative += w / total;
                if cumulative >= params.top_p as f64 {
                    break;
                }
            }

            let mut s = sampler(params, &context);
            let seen = histogram(&mut s, &logits, 3000);
            for (id, n) in seen.iter().enumerate() {
                assert!(
                    *n == 0 || kept.contains(&(id as u32)),
                    "case {case}: drew {id}, kept {kept:?}"
                );
            }
            assert!(seen[kept[0] as usize] > 0, "case {case}");
        }
    }

    #[test]
    fn buffers_stop_growing_after_warm_up() {
        let logits: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 101) as f32 * 0.05).collect();
        let mut s = sampler(
            Sampling {
                repetition_penalty: 1.2,
                presence_penalty: 0.1,
                logit_bias: vec![(3, 1.0), (4, f32::NEG_INFINITY)],
                top_k: 0,
                ..Default::default()
            },
            &(0..100).collect::<Vec<u32>>(),
        );
        s.sample(&logits);
        let buffers = |s: &Sampler| {
            [
                (s.candidates.as_ptr() as usize, s.candidates.capacity()),
                (s.adjusted.as_ptr() as usize, s.adjusted.capacity()),
                (s.window.as_ptr() as usize, s.window.capacity()),
                (s.history.as_ptr() as usize, s.history.capacity()),
            ]
        };
        let before = buffers(&s);
        for _ in 0..200 {
            let t = s.sample(&logits);
            s.accept(t);
        }
        assert_eq!(buffers(&s), before);
    }

    #[test]
    fn validate_names_the_bad_option() {
        assert_eq!(Sampling::default().validate(), Ok(()));
        assert_eq!(Sampling::greedy().validate(), Ok(()));
        let ok_ban = Sampling {
            logit_bias: vec![(1, f32::NEG_INFINITY), (2, -3.0)],
            presence_penalty: -0.5,
            ..Default::default()
        };
        assert_eq!(ok_ban.validate(), Ok(()));
        let bad = [
            (
                "temperature",
                Sampling {
                    temperature: -0.1,
                    ..Default::default()
                },
            ),
            (
                "temperature",
                Sampling {
                    temperature: f32::NAN,
                    ..Default::default()
                },
            ),
            (
                "top_p",
                Sampling {
                    top_p: 0.0,
                    ..Default::default()
                },
            ),
            (
                "top_p",
                Sampling {
                    top_p: 1.01,
                    ..Default::default()
                },
            ),
            (
                "top_p",
                Sampling {
                    top_p: f32::NAN,
                    ..Default::default()
                },
            ),
            (
                "min_p",
                Sampling {
                    min_p: -0.01,
                    ..Default::default()
                },
            ),
            (
                "min_p",
                Sampling {
                    min_p: 1.5,
                    ..Default::default()
                },
            ),
            (
                "min_p",
                Sampling {
                    min_p: f32::NAN,
                    ..Default::default()
                },
            ),
            (
                "repetition_penalty",
                Sampling {
                    repetition_penalty: 0.0,
                    ..Default::default()
                },
            ),
            (
                "repetition_penalty",
                Sampling {
                    repetition_penalty: f32::NAN,
                    ..Default::default()
                },
            ),
            (
                "presence_penalty",
                Sampling {
                    presence_penalty: f32::INFINITY,
                    ..Default::default()
                },
            ),
            (
                "frequency_penalty",
                Sampling {
                    frequency_penalty: f32::NAN,
                    ..Default::default()
                },
            ),
            (
                "logit_bias",
                Sampling {
                    logit_bias: vec![(7, f32::INFINITY)],
                    ..Default::default()
                },
            ),
            (
                "logit_bias",
                Sampling {
                    logit_bias: vec![(7, f32::NAN)],
                    ..Default::default()
                },
            ),
        ];
        for (option, params) in bad {
            let err = params.validate().expect_err(option);
            assert!(err.starts_with(option), "{err}");
        }
    }
}
