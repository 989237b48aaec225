//! Choosing the next token from logits: greedy, or temperature with top-k / top-p from
//! a seeded generator, so one seed always gives one output.

/// How to pick each token.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    /// 0 picks the most likely token (greedy); higher values flatten the distribution.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p (1: all).
    pub top_p: f32,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
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
}

/// A sampler with its own random stream and reusable buffers.
pub struct Sampler {
    params: Sampling,
    rng: SplitMix64,
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: Sampling) -> Self {
        let rng = SplitMix64(params.seed);
        Sampler {
            params,
            rng,
            candidates: Vec::new(),
        }
    }

    /// The next token for these logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 0.0 {
            return argmax(logits);
        }
        let c = &mut self.candidates;
        c.clear();
        c.extend(logits.iter().enumerate().map(|(i, l)| (i as u32, *l)));
        let k = if self.params.top_k == 0 {
            c.len()
        } else {
            self.params.top_k.min(c.len())
        };
        if k < c.len() {
            c.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
            c.truncate(k);
        }
        c.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let max = c[0].1;
        let mut total = 0.0;
        for (_, l) in c.iter_mut() {
            *l = ((*l - max) / self.params.temperature).exp();
            total += *l;
        }
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
        let mass: f32 = c.iter().map(|(_, p)| p).sum();
        let mut r = self.rng.next_f32() * mass;
        for (id, p) in c.iter() {
            if r < *p {
                return *id;
            }
            r -= p;
        }
        c[c.len() - 1].0
    }
}

/// The index of the largest value (the first one on ties).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// SplitMix64: tiny, fast, and the same sequence on every platform for a seed.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
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

    #[test]
    fn greedy_takes_the_largest_logit() {
        let mut s = Sampler::new(Sampling::greedy());
        assert_eq!(s.sample(&[0.1, 2.0, -1.0, 1.9]), 1);
    }

    #[test]
    fn one_seed_gives_one_sequence() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let params = Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 42,
        };
        let run = |p: Sampling| {
            let mut s = Sampler::new(p);
            (0..20).map(|_| s.sample(&logits)).collect::<Vec<_>>()
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
            top_p: 1.0,
            seed: 7,
        });
        for _ in 0..50 {
            assert_eq!(s.sample(&logits), 1);
        }
    }

    #[test]
    fn top_p_excludes_unlikely_tokens() {
        // Token 0 holds ~88% of the mass at temperature 1; top_p 0.5 keeps only it.
        let logits = [4.0, 2.0, 0.0, 0.0];
        let mut s = Sampler::new(Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
            seed: 1,
        });
        for _ in 0..50 {
            assert_eq!(s.sample(&logits), 0);
        }
    }
}
