//! Attention work items at every SIMD level this CPU has, against the per-(query, head)
//! reference [`ops::attend`], on fresh random inputs (the seed comes from the clock and is
//! printed on failure) at odd sizes.

use std::time::{SystemTime, UNIX_EPOCH};

use kiln_kernels::attention::{
    combine, partial_floats, run_item_at, work_items, AttnGeometry, CacheRows, KvPages, Partials,
};
use kiln_kernels::gemm::{simd_level, OutMatrix, SimdLevel};
use kiln_kernels::ops;

/// xorshift64*: enough randomness for inputs, reproducible from the seed.
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        ((self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// The SIMD levels this CPU has.
fn levels() -> Vec<SimdLevel> {
    [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512Vnni]
        .into_iter()
        .filter(|&l| l <= simd_level())
        .collect()
}

/// `n` random cache values in -2..2, f16-representable as the cache contract requires.
fn cache_values(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| ops::round_to_f16(2.0 * rng.uniform())).collect()
}

/// A call's random inputs: its queries, large enough for peaked softmaxes (new maxima,
/// tiny weights), and the keys and values of every position it sees, one cache row of
/// `g.kv_stride` each ([`cache_values`]).
fn call_inputs(rng: &mut Rng, g: &AttnGeometry) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let rows = g.start_pos + g.n_tokens;
    let q = (0..g.n_tokens * g.n_head * g.head_dim)
        .map(|_| 4.0 * rng.uniform())
        .collect();
    let keys = cache_values(rng, rows * g.kv_stride);
    let values = cache_values(rng, rows * g.kv_stride);
    (q, keys, values)
}

/// Page numbers `0..n` in a random order (Fisher-Yates).
fn shuffled_pages(rng: &mut Rng, n: usize) -> Vec<u32> {
    let mut pages: Vec<u32> = (0..n as u32).collect();
    for i in (1..pages.len()).rev() {
        let j = ((rng.uniform() + 1.0) * 0.5 * (i + 1) as f32) as usize % (i + 1);
        pages.swap(i, j);
    }
    pages
}

/// Every item of the call, in order, at `level`; unwritten outputs stay NaN.
fn run_items(level: SimdLevel, g: &AttnGeometry, q: &[f32], keys: &[f32], values: &[f32]) -> Vec<f32> {
    run_paged(
        level,
        g,
        q,
        CacheRows::F32(keys),
        CacheRows::F32(values),
        KvPages::contiguous(),
    )
}

/// [`run_items`] over a paged cache.
fn run_paged(
    level: SimdLevel,
    g: &AttnGeometry,
    q: &[f32],
    keys: CacheRows,
    values: CacheRows,
    pages: KvPages,
) -> Vec<f32> {
    let mut out = vec![f32::NAN; g.n_tokens * g.n_head * g.head_dim];
    // Poisoned, as the output: combine must read only what items wrote.
    let mut partials = vec![f32::NAN; partial_floats(g)];
    // SAFETY: out holds n_tokens rows of n_head × head_dim, partials what the call's
    // items need; items run one at a time.
    let (o, p) = unsafe {
        (
            OutMatrix::new(out.as_mut_ptr(), g.n_head * g.head_dim),
            Partials::new(partials.as_mut_ptr(), partials.len()),
        )
    };
    for item in 0..work_items(g) {
        run_item_at(level, g, q, keys, values, pages, item, o, p);
    }
    combine(g, &partials, o);
    out
}

/// f16 bit patterns of f16-representable values.
fn f16_bits(x: &[f32]) -> Vec<u16> {
    let mut bits = vec![0; x.len()];
    ops::f32_to_f16_slice(x, &mut bits);
    bits
}

/// The reference per (query, head), as the runtime called it before work items.
fn reference(g: &AttnGeometry, q: &[f32], keys: &[f32], values: &[f32]) -> Vec<f32> {
    let d = g.head_dim;
    let mut out = vec![0.0; g.n_tokens * g.n_head * d];
    let mut scratch = vec![0.0; (g.start_pos + g.n_tokens).max(d)];
    for (i, head_out) in out.chunks_mut(d).enumerate() {
        let (t, h) = (i / g.n_head, i % g.n_head);
        let pos = g.start_pos + t;
        let first = g.window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let offset = h / (g.n_head / g.n_kv_head) * d;
        let query = &q[i * d..(i + 1) * d];
        ops::attend(
            query,
            keys,
            values,
            g.kv_stride,
            offset,
            first,
            pos + 1,
            g.scale,
            &mut scratch,
            head_out,
        );
    }
    out
}

#[test]
fn work_items_match_the_reference_at_every_level() {
    let seed = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    let mut rng = Rng(seed);
    let levels = levels();
    let n_kv_head = 2;
    for head_dim in [64, 128, 192, 256, 48, 40] {
        for ratio in [1, 3, 4, 7] {
            for n_tokens in [1, 3, 63, 64, 100] {
                for start_pos in [0, 29] {
                    for window in [None, Some(7)] {
                        let n_head = n_kv_head * ratio;
                        // Rows a little wider than the heads, as a fused KV buffer might be.
                        let kv_stride = n_kv_head * head_dim + 8;
                        let g = AttnGeometry {
                            n_tokens,
                            start_pos,
                            run_start: start_pos,
                            run_end: start_pos + n_tokens,
                            n_head,
                            n_kv_head,
                            head_dim,
                            kv_stride,
                            scale: 1.0 / (head_dim as f32).sqrt(),
                            window,
                            f16_cache: false,
                        };
                        let (q, keys, values) = call_inputs(&mut rng, &g);
                        let want = reference(&g, &q, &keys, &values);
                        let (k16, v16) = (f16_bits(&keys), f16_bits(&values));
                        let g16 = AttnGeometry { f16_cache: true, ..g };
                        let short = n_tokens < 64 && start_pos + n_tokens < 512;
                        let mut f16_acc_first: Option<Vec<f32>> = None;
                        for &level in &levels {
                            let got = run_items(level, &g, &q, &keys, &values);
                            let contiguous = KvPages::contiguous();
                            let from_f16 =
                                run_paged(level, &g16, &q, CacheRows::F16(&k16), CacheRows::F16(&v16), contiguous);
                            if short {
                                // The f16-accumulator kernel: the same operations at every
                                // level, so the same bits.
                                let first = f16_acc_first.get_or_insert_with(|| from_f16.clone());
                                assert!(
                                    first.iter().zip(&from_f16).all(|(a, b)| a.to_bits() == b.to_bits()),
                                    "seed {seed}: {level:?} {g16:?}: the f16-accumulator kernel differs between levels"
                                );
                            } else if !(level == SimdLevel::Avx512Vnni && n_tokens >= 64 && head_dim % 16 == 0) {
                                // Other long calls take the f32 kernel over either cache: f16
                                // blocks are widened exactly before it reads them. (At AVX-512,
                                // 64 queries or more over an f16 cache take llama.cpp's tiled
                                // order instead, checked against the reference below.)
                                assert!(
                                    got.iter().zip(&from_f16).all(|(a, b)| a.to_bits() == b.to_bits()),
                                    "seed {seed}: {level:?} {g:?}: the f16 cache differs"
                                );
                            }
                            for (i, (w, (o, o16))) in want
                                .chunks(head_dim)
                                .zip(got.chunks(head_dim).zip(from_f16.chunks(head_dim)))
                                .enumerate()
                            {
                                let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
                                for (j, ((a, b), c)) in w.iter().zip(o).zip(o16).enumerate() {
                                    // The f32 kernel sums in another order and uses a ~2 ulp
                                    // polynomial exp: ~1e-6 of the head's largest output
                                    // (relative to the row, as single outputs may cancel to
                                    // ~0). The f16 accumulator rounds the query and every
                                    // update of the weighted sum to 11 bits (up to 2^-11
                                    // relative each, over up to 128 keys here; measured to
                                    // ~3e-3): a sanity bound, as its exactness is checked
                                    // against llama.cpp end to end (tests/real_models.rs).
                                    let tol16 = if short { 1e-2 } else { 1e-5 };
                                    assert!(
                                        (a - b).abs() <= 1e-5 * scale && (a - c).abs() <= tol16 * scale,
                                        "seed {seed}: {level:?} {g:?}: (query {}, head {}) [{j}]: {b} (f16 cache {c}) vs {a}",
                                        i / n_head,
                                        i % n_head
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A cache scattered over pages in shuffled order gives what the contiguous cache gives,
/// to f32 reordering (pages of 16 make the key blocks smaller), or exactly for the
/// f16-accumulator kernel.
#[test]
fn paged_cache_matches_contiguous() {
    let seed = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    let mut rng = Rng(seed);
    let levels = levels();
    let (n_kv_head, n_head, head_dim, page_size) = (2, 6, 64, 16usize);
    let kv_stride = n_kv_head * head_dim;
    for (n_tokens, start_pos, window) in [
        (1usize, 0usize, None),
        (1, 100, None),
        (5, 37, Some(20)),
        (70, 50, None),
        (64, 3, Some(33)),
    ] {
        let rows = start_pos + n_tokens;
        let n_pages = rows.div_ceil(page_size);
        // Pages in a shuffled order inside a pool with spare pages.
        let pool_pages = n_pages + 5;
        let mut pages = shuffled_pages(&mut rng, pool_pages);
        pages.truncate(n_pages);
        let paged = KvPages {
            pages: &pages,
            page_size,
        };
        let g = AttnGeometry {
            n_tokens,
            start_pos,
            run_start: start_pos,
            run_end: start_pos + n_tokens,
            n_head,
            n_kv_head,
            head_dim,
            kv_stride,
            scale: 0.125,
            window,
            f16_cache: false,
        };
        let (q, keys, values) = call_inputs(&mut rng, &g);
        let scatter = |flat: &[f32]| {
            let mut pool = vec![f32::NAN; pool_pages * page_size * kv_stride];
            for p in 0..rows {
                let row = paged.row(p);
                pool[row * kv_stride..][..kv_stride].copy_from_slice(&flat[p * kv_stride..][..kv_stride]);
            }
            pool
        };
        let (pk, pv) = (scatter(&keys), scatter(&values));
        let (pk16, pv16) = (f16_bits(&pk), f16_bits(&pv));
        for &level in &levels {
            let want = run_items(level, &g, &q, &keys, &values);
            let got = run_paged(level, &g, &q, CacheRows::F32(&pk), CacheRows::F32(&pv), paged);
            // The f16 cache, paged and contiguous: the same bits.
            let g16 = AttnGeometry { f16_cache: true, ..g };
            let from_f16 = run_paged(level, &g16, &q, CacheRows::F16(&pk16), CacheRows::F16(&pv16), paged);
            let (k16, v16) = (f16_bits(&keys), f16_bits(&values));
            let contiguous16 = run_paged(
                level,
                &g16,
                &q,
                CacheRows::F16(&k16),
                CacheRows::F16(&v16),
                KvPages::contiguous(),
            );
            // The f16-accumulator kernel takes keys one by one: paging changes nothing.
            // The f32 kernel's key blocks end at pages: sums in another order.
            for (i, (a, b)) in contiguous16.iter().zip(&from_f16).enumerate() {
                let ok = if g16.n_tokens < 64 {
                    a.to_bits() == b.to_bits()
                } else {
                    (a - b).abs() <= 1e-5 * (1.0 + a.abs())
                };
                assert!(
                    ok,
                    "seed {seed}: {level:?} {g16:?} [{i}]: paged f16 {b} vs contiguous f16 {a}"
                );
            }
            for (i, (a, b)) in want.iter().zip(&got).enumerate() {
                let ok = (a - b).abs() <= 1e-5 * (1.0 + a.abs());
                assert!(ok, "seed {seed}: {level:?} {g:?} [{i}]: paged {b} vs contiguous {a}");
            }
        }
    }
}

/// Decode steps and short prompts over 512 keys or more of an f16 cache (f32 flash
/// attention with keys in lanes at AVX-512, the f32 kernel elsewhere), over shuffled
/// pages, against the reference: ~1e-6 of the head's largest output (another summation
/// order and a ~2 ulp `exp`), bounded at 1e-5 as the f32 kernel's test is.
#[test]
fn few_queries_over_many_keys_match_the_reference() {
    let seed = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    let mut rng = Rng(seed);
    let levels = levels();
    let (n_kv_head, page_size) = (2, 16usize);
    for (head_dim, ratio, n_tokens, start_pos, window) in [
        (64, 3, 1, 700, None),
        (64, 4, 5, 519, Some(512)),
        (64, 1, 1, 1030, Some(100)),
        (128, 2, 2, 600, None),
        (256, 4, 1, 511, None),
        (256, 1, 63, 520, None),
        (48, 2, 1, 530, None),
    ] {
        let n_head = n_kv_head * ratio;
        let kv_stride = n_kv_head * head_dim;
        let rows: usize = start_pos + n_tokens;
        let n_pages = rows.div_ceil(page_size);
        let pages = shuffled_pages(&mut rng, n_pages);
        let paged = KvPages {
            pages: &pages,
            page_size,
        };
        let g = AttnGeometry {
            n_tokens,
            start_pos,
            run_start: start_pos,
            run_end: start_pos + n_tokens,
            n_head,
            n_kv_head,
            head_dim,
            kv_stride,
            scale: 1.0 / (head_dim as f32).sqrt(),
            window,
            f16_cache: true,
        };
        let (q, keys, values) = call_inputs(&mut rng, &g);
        let want = reference(&AttnGeometry { f16_cache: false, ..g }, &q, &keys, &values);
        let scatter = |flat: &[f32]| {
            let mut pool = vec![0f32; n_pages * page_size * kv_stride];
            for p in 0..rows {
                let row = paged.row(p);
                pool[row * kv_stride..][..kv_stride].copy_from_slice(&flat[p * kv_stride..][..kv_stride]);
            }
            f16_bits(&pool)
        };
        let (k16, v16) = (scatter(&keys), scatter(&values));
        for &level in &levels {
            let got = run_paged(level, &g, &q, CacheRows::F16(&k16), CacheRows::F16(&v16), paged);
            for (i, (w, o)) in want.chunks(head_dim).zip(got.chunks(head_dim)).enumerate() {
                let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
                for (j, (a, b)) in w.iter().zip(o).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-5 * scale,
                        "seed {seed}: {level:?} {g:?}: (query {}, head {}) [{j}]: {b} vs {a}",
                        i / n_head,
                        i % n_head
                    );
                }
            }
        }
    }
}

/// A page table that leaves positions outside the cache is refused, not read past.
#[test]
#[should_panic(expected = "not all in the cache")]
fn pages_outside_the_cache_are_refused() {
    let g = AttnGeometry {
        n_tokens: 1,
        start_pos: 20,
        run_start: 20,
        run_end: 21,
        n_head: 1,
        n_kv_head: 1,
        head_dim: 16,
        kv_stride: 16,
        scale: 0.25,
        window: None,
        f16_cache: false,
    };
    let (q, cache) = (vec![0.0; 16], vec![0.0; 4 * 8 * 16]);
    // Page 4 of a pool of 4 pages of 8 rows does not exist.
    let pages = KvPages {
        pages: &[0, 4, 1],
        page_size: 8,
    };
    run_paged(
        SimdLevel::Scalar,
        &g,
        &q,
        CacheRows::F32(&cache),
        CacheRows::F32(&cache),
        pages,
    );
}

/// A run of queries computed in several calls (a prompt in chunks, or after a cached
/// beginning, then decode-like single rows) gives the bits it gives in one call, for
/// every kernel: f16 accumulator (short runs), tiled (64 queries or more), f32 (past 512
/// keys, or an f32 cache), with and without a sliding window, over a paged f16 cache.
#[test]
fn a_run_split_into_calls_gives_the_same_bits() {
    let seed = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    let mut rng = Rng(seed);
    let (n_head, n_kv_head, head_dim, page_size) = (6, 2, 64, 32);
    let kv_stride = n_kv_head * head_dim;
    // (run start, run length, where the calls split it, window)
    let runs: [(usize, usize, &[usize], Option<usize>); 8] = [
        (0, 40, &[32, 39], None),
        (0, 150, &[64, 130, 149], None),
        (0, 150, &[96, 100], Some(70)),
        (16, 60, &[32, 64], None),
        (480, 100, &[512, 520, 579], None),
        (0, 600, &[448, 512, 599], Some(300)),
        (500, 40, &[505, 520], None),
        (600, 10, &[603], Some(512)),
    ];
    for (run_start, run_len, cuts, window) in runs {
        let rows = run_start + run_len;
        let n_pages = rows.div_ceil(page_size);
        let pages: Vec<u32> = (0..n_pages as u32).rev().collect();
        let paged = KvPages {
            pages: &pages,
            page_size,
        };
        let cache = cache_values(&mut rng, 2 * n_pages * page_size * kv_stride);
        let (k16, v16) = cache.split_at(n_pages * page_size * kv_stride);
        let (k16, v16) = (f16_bits(k16), f16_bits(v16));
        let row = n_head * head_dim;
        let q: Vec<f32> = (0..run_len * row).map(|_| 4.0 * rng.uniform()).collect();
        for f16_cache in [true, false] {
            let (k32, v32) = cache.split_at(n_pages * page_size * kv_stride);
            let (keys, values) = if f16_cache {
                (CacheRows::F16(&k16), CacheRows::F16(&v16))
            } else {
                (CacheRows::F32(k32), CacheRows::F32(v32))
            };
            let call = |from: usize, to: usize| {
                let g = AttnGeometry {
                    n_tokens: to - from,
                    start_pos: run_start + from,
                    run_start,
                    run_end: rows,
                    n_head,
                    n_kv_head,
                    head_dim,
                    kv_stride,
                    scale: 0.125,
                    window,
                    f16_cache,
                };
                run_paged(simd_level(), &g, &q[from * row..to * row], keys, values, paged)
            };
            let whole = call(0, run_len);
            let mut split = Vec::new();
            let mut from = 0;
            for cut in cuts.iter().map(|c| c - run_start).chain([run_len]) {
                split.extend(call(from, cut));
                from = cut;
            }
            for (i, (a, b)) in whole.iter().zip(&split).enumerate() {
                assert!(
                    a.to_bits() == b.to_bits(),
                    "seed {seed}: run {run_start}+{run_len} split at {cuts:?}, window {window:?}, f16 cache \
                     {f16_cache}: [{i}] {b} in calls vs {a} in one"
                );
            }
        }
    }
}
