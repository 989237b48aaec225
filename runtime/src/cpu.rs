//! The CPU backend: weights stay in the host bytes they were loaded from (a memory map),
//! buffers are plain vectors, and ops run at once on the calling thread and a persistent
//! thread pool (see `pool.rs`), entered only by ops big enough to repay it.

use std::ops::Range;
use std::sync::Mutex;

use kiln_kernels::attention::{self, AttnGeometry, CacheRows, KvPages, Partials};
use kiln_kernels::dequant::dequantize_row;
use kiln_kernels::gemm::{self, OutMatrix, RepackedActs, RowShape};
use kiln_kernels::{ops, qdot, GgmlType};

use crate::pool::ThreadPool;
use crate::{Activation, Attention, AttnSeq, Backend, BufId, Result, RopeStyle, WeightId, WeightSource};

/// How the CPU backend multiplies quantized weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Numerics {
    /// Activations quantized to 8-bit blocks, integer dot products per block: llama.cpp's
    /// arithmetic, and the fast path.
    Quantized,
    /// f32 activations times weights dequantized to f32: the reference the fast path is
    /// checked against, and what Hugging Face transformers computes.
    Reference,
}

pub struct CpuBackend {
    pool: ThreadPool,
    numerics: Numerics,
    /// Quantized input rows of the current matmul, reused across calls.
    acts: Vec<u8>,
    /// Those rows repacked for the kernels, once per weight type of the matmul (every
    /// band of rows shares them).
    repacked: [RepackedActs; MAX_PRODUCTS],
    /// (sin, cos) per position and rotated pair of recent rope calls.
    rope_tables: RopeTables,
    /// The shape of each row of the current batch ([`Backend::set_batch`]).
    shapes: Vec<RowShape>,
    /// Each sequence's part of the current attention call.
    attn_calls: Vec<AttnCall>,
    /// Where split attention items leave their partial softmaxes (grown, never shrunk).
    attn_partials: Vec<f32>,
    weights: Vec<WeightSource>,
    /// Vectors (norm weights, biases) dequantized once at upload, by weight index.
    vectors: Vec<Option<Vec<f32>>>,
    buffers: Vec<Vec<f32>>,
    /// Each pool thread's candidates of a row in `top_k_rows`, reused across calls.
    top_k_scratch: Vec<Mutex<Vec<(u32, f32)>>>,
}

/// The rope angle tables of the last two (positions, dimensions, base) a rope call
/// asked for: a forward pass asks for the same one in every layer, for its queries and
/// its keys, and Gemma 3 alternates two bases. (Computed afresh per call, the angles
/// took 1.7% of Gemma-3's pp512 profile, on one thread while the others waited.)
#[derive(Default)]
struct RopeTables {
    tables: [RopeTable; 2],
    /// Which of the two was asked for last.
    last: usize,
}

#[derive(Default)]
struct RopeTable {
    positions: Vec<u32>,
    head_dim: usize,
    theta: f32,
    angles: Vec<(f32, f32)>,
}

impl RopeTables {
    /// `ops::rope_angles(positions, head_dim, theta)`, from a table when one holds it.
    fn angles(&mut self, positions: &[u32], head_dim: usize, theta: f32) -> &[(f32, f32)] {
        let holds =
            |t: &RopeTable| t.head_dim == head_dim && t.theta.to_bits() == theta.to_bits() && t.positions == positions;
        let at = match self.tables.iter().position(holds) {
            Some(at) => at,
            None => {
                // Replace the one asked for less recently (the buffers keep their capacity).
                let at = 1 - self.last;
                let t = &mut self.tables[at];
                t.positions.clear();
                t.positions.extend_from_slice(positions);
                (t.head_dim, t.theta) = (head_dim, theta);
                t.angles.clear();
                ops::rope_angles(positions, head_dim, theta, &mut t.angles);
                at
            }
        };
        self.last = at;
        &self.tables[at].angles
    }
}

/// One sequence's part of an attention call: its geometry, its first work item among
/// the call's, and where its items leave partial softmaxes in `attn_partials`.
struct AttnCall {
    geometry: AttnGeometry,
    first_item: usize,
    partials: Range<usize>,
}

impl CpuBackend {
    /// A backend running its ops on `threads` threads (default: one per core).
    pub fn new(threads: Option<usize>) -> Self {
        Self::with_numerics(threads, Numerics::Quantized)
    }

    pub fn with_numerics(threads: Option<usize>, numerics: Numerics) -> Self {
        let threads = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        CpuBackend {
            top_k_scratch: (0..threads.max(1)).map(|_| Mutex::new(Vec::new())).collect(),
            pool: ThreadPool::new(threads.max(1)),
            numerics,
            acts: Vec::new(),
            repacked: Default::default(),
            rope_tables: RopeTables::default(),
            shapes: Vec::new(),
            attn_calls: Vec::new(),
            attn_partials: Vec::new(),
            weights: Vec::new(),
            vectors: Vec::new(),
            buffers: Vec::new(),
        }
    }

    fn buf(&self, id: BufId) -> &[f32] {
        &self.buffers[id.0 as usize]
    }

    fn buf_mut(&mut self, id: BufId) -> &mut [f32] {
        &mut self.buffers[id.0 as usize]
    }
}

/// A weight vector (one row: a norm weight, a bias) as f32.
fn vector(vectors: &[Option<Vec<f32>>], id: WeightId) -> &[f32] {
    vectors[id.0 as usize]
        .as_deref()
        .expect("a vector op was given a matrix")
}

fn pair(buffers: &mut [Vec<f32>], read: BufId, write: BufId) -> (&[f32], &mut [f32]) {
    let [r, w] = buffers
        .get_disjoint_mut([read.0 as usize, write.0 as usize])
        .expect("an op read and wrote the same buffer");
    (r, w)
}

/// A slice that threads of one pool job write in disjoint parts.
#[derive(Clone, Copy)]
struct Shared<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: `part` hands out disjoint ranges only (its contract), so sharing the pointer
// between threads is sound; the slice outlives the pool job that uses it.
unsafe impl<T: Send> Send for Shared<T> {}
unsafe impl<T: Send> Sync for Shared<T> {}

impl<T> Shared<T> {
    fn new(slice: &mut [T]) -> Self {
        Shared {
            ptr: slice.as_mut_ptr(),
            len: slice.len(),
        }
    }

    /// # Safety
    /// No two live parts overlap.
    #[allow(clippy::mut_from_ref)]
    unsafe fn part(&self, range: Range<usize>) -> &mut [T] {
        assert!(range.start <= range.end && range.end <= self.len);
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.len()) }
    }
}

/// Products one `matmul_many` call takes at most.
const MAX_PRODUCTS: usize = 4;

/// Elementwise work below this many floats runs on the calling thread: waking the pool
/// costs more than it saves. Batched decode's rows (8 sessions × 576 for SmolLM2) are
/// above it: split, they keep the other thread from idling through the norms, ropes
/// and activation quantization between products.
const PARALLEL_ELEMENTS: usize = 1 << 12;

/// Runs `f` over rows `0..n` of `row_len` floats, in parallel when they are many.
fn for_rows(pool: &ThreadPool, n: usize, row_len: usize, f: &(dyn Fn(Range<usize>) + Sync)) {
    if n * row_len < PARALLEL_ELEMENTS {
        f(0..n);
    } else {
        let chunk = (PARALLEL_ELEMENTS / 4 / row_len.max(1)).max(1);
        pool.for_chunks(n, chunk, f);
    }
}

/// Weight rows per parallel task of a matmul: small enough to balance the threads,
/// large enough that each task streams a useful run of rows.
fn rows_per_task(ty: GgmlType, rows: usize, n_tokens: usize, threads: usize) -> usize {
    // Streaming (decode): 8 tasks per thread, which `for_chunks` hands out in order
    // within each thread's share, so each thread still streams one run of rows (the
    // kernel prefetches across task boundaries); prefill: bands of 64 rows stay in L1/L2
    // while the kernel sweeps the tokens.
    let target = if gemm::streams_weights(ty, n_tokens) {
        rows.div_ceil(threads * 8)
    } else {
        64
    };
    target.max(16).next_multiple_of(16)
}

impl Backend for CpuBackend {
    fn name(&self) -> String {
        "cpu".into()
    }

    fn upload(&mut self, weight: WeightSource) -> Result<WeightId> {
        weight.validate()?;
        let vector = (weight.rows == 1).then(|| {
            let mut v = vec![0.0; weight.cols];
            dequantize_row(weight.ty, weight.bytes.as_slice(), &mut v);
            v
        });
        self.vectors.push(vector);
        self.weights.push(weight);
        Ok(WeightId(self.weights.len() as u32 - 1))
    }

    fn weight_shape(&self, weight: WeightId) -> (usize, usize) {
        let w = &self.weights[weight.0 as usize];
        (w.rows, w.cols)
    }

    fn alloc(&mut self, len: usize) -> BufId {
        self.buffers.push(vec![0.0; len]);
        BufId(self.buffers.len() as u32 - 1)
    }

    fn free(&mut self, buf: BufId) {
        // Ids stay stable, so a freed slot keeps its index and only drops its memory.
        self.buffers[buf.0 as usize] = Vec::new();
    }

    fn write(&mut self, buf: BufId, offset: usize, data: &[f32]) {
        self.buf_mut(buf)[offset..offset + data.len()].copy_from_slice(data);
    }

    fn read(&mut self, buf: BufId, offset: usize, out: &mut [f32]) {
        out.copy_from_slice(&self.buf(buf)[offset..offset + out.len()]);
    }

    fn top_k_rows(&mut self, buf: BufId, len: usize, k: usize, counts: &mut [u32], out: &mut [(u32, f32)]) {
        // Rows in parallel, each thread taking every n-th row with its own scratch (one
        // row, a single session's step, stays on the calling thread).
        let logits = &self.buffers[buf.0 as usize];
        let n_rows = counts.len().min(logits.len() / len).min(out.len() / k.max(1));
        let (counts, out) = (Shared::new(&mut counts[..n_rows]), Shared::new(&mut out[..n_rows * k]));
        let scratch = &self.top_k_scratch;
        let job = |i: usize, n: usize| {
            let mut scratch = scratch[i].lock().unwrap_or_else(|e| e.into_inner());
            for r in (i..n_rows).step_by(n) {
                // SAFETY: row r's count and candidates belong to this thread alone.
                let (count, top) = unsafe { (counts.part(r..r + 1), out.part(r * k..(r + 1) * k)) };
                count[0] = ops::top_k(&logits[r * len..(r + 1) * len], &mut scratch, top) as u32;
            }
        };
        if n_rows > 1 {
            self.pool.run(&job);
        } else {
            job(0, 1);
        }
    }

    fn argmax_rows(&mut self, buf: BufId, len: usize, out: &mut [u32]) {
        // One row per task: a batched step's rows (whole vocabularies) in parallel.
        let logits = &self.buffers[buf.0 as usize];
        let n = out.len().min(logits.len() / len.max(1));
        let out = Shared::new(&mut out[..n]);
        self.pool.for_chunks(n, 1, &|rows| {
            for r in rows {
                // SAFETY: each task owns its rows' slots.
                let slot = unsafe { out.part(r..r + 1) };
                slot[0] = ops::argmax(&logits[r * len..(r + 1) * len]);
            }
        });
    }

    fn copy(&mut self, src: BufId, src_offset: usize, dst: BufId, dst_offset: usize, len: usize) {
        let (s, d) = pair(&mut self.buffers, src, dst);
        d[dst_offset..dst_offset + len].copy_from_slice(&s[src_offset..src_offset + len]);
    }

    fn copy_within(&mut self, buf: BufId, src_offset: usize, dst_offset: usize, len: usize) {
        let b = self.buf_mut(buf);
        assert!(
            src_offset + len <= dst_offset || dst_offset + len <= src_offset,
            "copy_within: overlapping ranges"
        );
        b.copy_within(src_offset..src_offset + len, dst_offset);
    }

    fn embed(&mut self, table: WeightId, tokens: &[u32], out: BufId) {
        let w = &self.weights[table.0 as usize];
        let row_bytes = w.ty.row_bytes(w.cols).expect("validated at upload");
        let (cols, ty, bytes) = (w.cols, w.ty, w.bytes.as_slice());
        let out = &mut self.buffers[out.0 as usize];
        for (t, &token) in tokens.iter().enumerate() {
            let src = &bytes[token as usize * row_bytes..][..row_bytes];
            dequantize_row(ty, src, &mut out[t * cols..(t + 1) * cols]);
        }
    }

    fn set_batch(&mut self, rows_per_sequence: &[usize]) {
        self.shapes.clear();
        for &len in rows_per_sequence {
            self.shapes.extend(RowShape::of_sequence(len));
        }
    }

    fn matmul(&mut self, weight: WeightId, x: BufId, n: usize, out: BufId) {
        self.matmul_many(x, n, &[(weight, out)]);
    }

    fn matmul_many(&mut self, x: BufId, n: usize, products: &[(WeightId, BufId)]) {
        assert!(
            products.len() <= MAX_PRODUCTS,
            "matmul_many takes at most {MAX_PRODUCTS} products"
        );
        let weight = |id: WeightId| &self.weights[id.0 as usize];
        let first = weight(products[0].0);
        let shares_input = products.iter().all(|&(id, _)| {
            let w = weight(id);
            w.cols == first.cols && qdot::activation_format(w.ty) == qdot::activation_format(first.ty)
        });
        if products.len() > 1 && !shares_input {
            // Inputs quantized differently: one product at a time.
            for &(weight, out) in products {
                self.matmul_many(x, n, &[(weight, out)]);
            }
            return;
        }
        let mut outs = [None; MAX_PRODUCTS];
        let mut chunks = [0usize; MAX_PRODUCTS];
        // Task numbers are laid end to end over the products: task k of product i is
        // its rows band k.
        let mut first_task = [0usize; MAX_PRODUCTS + 1];
        for (i, &(weight, out)) in products.iter().enumerate() {
            assert!(
                out != x && products[..i].iter().all(|&(_, o)| o != out),
                "matmul outputs must be distinct from each other and the input"
            );
            let (rows, _) = self.weight_shape(weight);
            let buf = &mut self.buffers[out.0 as usize][..n * rows];
            // SAFETY: `buf` holds n × rows floats; tasks own disjoint bands of rows r of
            // one product and write only (t, r) for their r.
            outs[i] = Some(unsafe { OutMatrix::new(buf.as_mut_ptr(), rows) });
            chunks[i] = rows_per_task(self.weights[weight.0 as usize].ty, rows, n, self.pool.n_threads());
            first_task[i + 1] = first_task[i] + rows.div_ceil(chunks[i]);
        }
        let CpuBackend {
            pool,
            weights,
            buffers,
            numerics,
            acts,
            repacked,
            shapes,
            ..
        } = self;
        let shapes: &[RowShape] = if shapes.len() == n { shapes } else { &[] };
        let cols = weights[products[0].0 .0 as usize].cols;
        let x = &buffers[x.0 as usize][..n * cols];
        let task = |k: usize| {
            let i = (0..products.len())
                .rfind(|&i| first_task[i] <= k)
                .expect("task 0 exists");
            let w = &weights[products[i].0 .0 as usize];
            let band = (k - first_task[i]) * chunks[i]..(w.rows).min((k - first_task[i] + 1) * chunks[i]);
            (i, w, band, outs[i].expect("set above"))
        };
        let n_tasks = first_task[products.len()];
        match numerics {
            Numerics::Quantized => {
                // Each input row is quantized once to the weights' 8-bit block format
                // (shared by every product here); every output is then a sum of
                // per-block integer products.
                let format = qdot::activation_format(weights[products[0].0 .0 as usize].ty);
                let act_bytes = format
                    .row_bytes(cols)
                    .expect("activation blocks divide the row as weight blocks do");
                acts.resize(n * act_bytes, 0);
                let shared = Shared::new(&mut acts[..n * act_bytes]);
                for_rows(pool, n, cols, &|tokens| {
                    for t in tokens {
                        // SAFETY: each token's bytes belong to one task.
                        let dst = unsafe { shared.part(t * act_bytes..(t + 1) * act_bytes) };
                        qdot::quantize_activations_into(format, &x[t * cols..(t + 1) * cols], dst);
                    }
                });
                let acts = &acts[..n * act_bytes];
                // Repacked once per weight type (products of one type share a slot).
                let ty_of = |i: usize| weights[products[i].0 .0 as usize].ty;
                let mut slot = [0usize; MAX_PRODUCTS];
                for i in 0..products.len() {
                    slot[i] = (0..=i).find(|&j| ty_of(j) == ty_of(i)).expect("j = i matches");
                    if slot[i] == i {
                        repacked[i].prepare(ty_of(i), cols, acts, n);
                    }
                }
                let repacked = &*repacked;
                pool.for_chunks(n_tasks, 1, &|tasks| {
                    for k in tasks {
                        let (i, w, band, out) = task(k);
                        let row_bytes = w.ty.row_bytes(cols).expect("validated at upload");
                        let bytes = &w.bytes.as_slice()[band.start * row_bytes..band.end * row_bytes];
                        gemm::gemm_repacked(
                            w.ty,
                            bytes,
                            band.len(),
                            cols,
                            acts,
                            &repacked[slot[i]],
                            n,
                            shapes,
                            out.offset_cols(band.start),
                        );
                    }
                });
            }
            Numerics::Reference => pool.for_chunks(n_tasks, 1, &|tasks| {
                let mut row = vec![0.0; cols];
                for k in tasks {
                    let (_, w, band, out) = task(k);
                    let row_bytes = w.ty.row_bytes(cols).expect("validated at upload");
                    for r in band {
                        dequantize_row(w.ty, &w.bytes.as_slice()[r * row_bytes..][..row_bytes], &mut row);
                        for (t, input) in x.chunks_exact(cols).enumerate() {
                            // SAFETY: r is in this task's band.
                            unsafe { out.write(t, r, ops::dot(&row, input)) };
                        }
                    }
                }
            }),
        }
    }

    fn add_bias(&mut self, x: BufId, bias: WeightId, n: usize) {
        let bias = vector(&self.vectors, bias);
        for row in self.buffers[x.0 as usize].chunks_mut(bias.len()).take(n) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
    }

    fn add(&mut self, x: BufId, y: BufId, len: usize) {
        let (y, x) = pair(&mut self.buffers, y, x);
        for (a, b) in x[..len].iter_mut().zip(&y[..len]) {
            *a += b;
        }
    }

    fn scale(&mut self, x: BufId, len: usize, factor: f32) {
        for v in &mut self.buf_mut(x)[..len] {
            *v *= factor;
        }
    }

    fn rms_norm(&mut self, x: BufId, weight: WeightId, n: usize, eps: f32) {
        let weight = vector(&self.vectors, weight);
        let cols = weight.len();
        let x = Shared::new(&mut self.buffers[x.0 as usize][..n * cols]);
        for_rows(&self.pool, n, cols, &|rows| {
            // SAFETY: each task owns its rows.
            let part = unsafe { x.part(rows.start * cols..rows.end * cols) };
            for row in part.chunks_exact_mut(cols) {
                ops::rms_norm_in_place(row, weight, eps);
            }
        });
    }

    fn rope(&mut self, x: BufId, positions: &[u32], n_heads: usize, head_dim: usize, theta: f32, style: RopeStyle) {
        // Every head of a position turns by the same angles, and every layer of a forward
        // pass (queries and keys alike) by the same positions: compute them once.
        let half = head_dim / 2;
        let table = self.rope_tables.angles(positions, head_dim, theta);
        let row = n_heads * head_dim;
        let x = Shared::new(&mut self.buffers[x.0 as usize][..positions.len() * row]);
        for_rows(&self.pool, positions.len(), row, &|tokens| {
            for t in tokens {
                // SAFETY: each task owns its tokens' rows.
                let part = unsafe { x.part(t * row..(t + 1) * row) };
                for head in part.chunks_exact_mut(head_dim) {
                    ops::rope_with(head, &table[t * half..(t + 1) * half], style);
                }
            }
        });
    }

    fn kv_row_floats(&self, row_len: usize) -> usize {
        match self.numerics {
            // f16, as llama.cpp keeps its cache: two values a float.
            Numerics::Quantized => row_len.div_ceil(2),
            Numerics::Reference => row_len,
        }
    }

    fn store_kv(&mut self, src: BufId, cache: BufId, row_len: usize, rows: &[u32]) {
        let numerics = self.numerics;
        let row_floats = self.kv_row_floats(row_len);
        let (src, cache) = pair(&mut self.buffers, src, cache);
        for (row, &to) in src.chunks_exact(row_len).zip(rows) {
            let dst = &mut cache[to as usize * row_floats..][..row_floats];
            match numerics {
                Numerics::Quantized => ops::f32_to_f16_slice(row, &mut as_f16_mut(dst)[..row_len]),
                Numerics::Reference => dst.copy_from_slice(row),
            }
        }
    }

    fn attention(
        &mut self,
        q: BufId,
        keys: BufId,
        values: BufId,
        a: Attention,
        seqs: &[AttnSeq],
        page_table: &[u32],
        out: BufId,
    ) {
        let [q, k, v, out] = self
            .buffers
            .get_disjoint_mut([q.0, keys.0, values.0, out.0].map(|i| i as usize))
            .expect("attention buffers must be distinct");
        let row = a.n_head * a.head_dim;
        let kv_row = a.n_kv_head * a.head_dim;
        let (k, v, kv_stride) = match self.numerics {
            Numerics::Quantized => (
                CacheRows::F16(as_f16(k)),
                CacheRows::F16(as_f16(v)),
                2 * kv_row.div_ceil(2),
            ),
            Numerics::Reference => (CacheRows::F32(k), CacheRows::F32(v), kv_row),
        };
        // Every sequence's work items, numbered one after another: one pool job runs them all.
        let calls = &mut self.attn_calls;
        calls.clear();
        let (mut total, mut partial_floats) = (0, 0);
        for s in seqs {
            let geometry = AttnGeometry {
                n_tokens: s.n_tokens,
                start_pos: s.start_pos,
                n_head: a.n_head,
                n_kv_head: a.n_kv_head,
                head_dim: a.head_dim,
                kv_stride,
                scale: a.scale,
                window: a.window,
                f16_cache: self.numerics == Numerics::Quantized,
                run_start: s.run_start,
                run_end: s.run_end,
            };
            let partials = partial_floats..partial_floats + attention::partial_floats(&geometry);
            partial_floats = partials.end;
            calls.push(AttnCall {
                geometry,
                first_item: total,
                partials,
            });
            total += attention::work_items(&geometry);
        }
        if self.attn_partials.len() < partial_floats {
            self.attn_partials.resize(partial_floats, 0.0);
        }
        let (q, calls) = (&*q, &*calls);
        // SAFETY: the calls' items write their own calls' ranges of these floats only.
        let all_partials = unsafe { Partials::new(self.attn_partials.as_mut_ptr(), partial_floats) };
        let out_len = out.len();
        // SAFETY: work items write disjoint (token, head) parts of their sequence's rows,
        // which are inside `out` (checked per item) and distinct between sequences.
        let out = unsafe { OutMatrix::new(out.as_mut_ptr(), row) };
        // Sequence i's page table (empty where it lies outside the table, which run_item
        // then refuses).
        let pages_of = |i: usize| {
            let s = &seqs[i];
            KvPages {
                pages: page_table.get(s.page0..s.page0 + s.n_pages).unwrap_or(&[]),
                page_size: a.page_size,
            }
        };
        self.pool.for_chunks(total, 1, &|items| {
            for item in items {
                if item + 1 < total {
                    // The next item's first rows, while this one computes: each thread
                    // walks its share of the items in order, so it is most often this
                    // thread's next.
                    let next = calls.partition_point(|c| c.first_item <= item + 1) - 1;
                    let c = &calls[next];
                    attention::prefetch_item(&c.geometry, k, v, pages_of(next), item + 1 - c.first_item);
                }
                let i = calls.partition_point(|c| c.first_item <= item) - 1;
                let AttnCall {
                    geometry,
                    first_item: first,
                    partials,
                } = &calls[i];
                let s = &seqs[i];
                let rows = s.row0 * row..(s.row0 + s.n_tokens) * row;
                assert!(
                    rows.end <= q.len() && rows.end <= out_len,
                    "attention: rows outside the buffers"
                );
                // The sequence's rows start row0 rows (row0 × row elements) down.
                let o = out.offset_cols(s.row0 * row);
                let partials = all_partials.range(partials.start, partials.len());
                attention::run_item(geometry, &q[rows], k, v, pages_of(i), item - first, o, partials);
            }
        });
        // Calls whose items left partial softmaxes (decode steps over long contexts):
        // each query's parts merged into its output.
        for (c, s) in calls.iter().zip(seqs) {
            if !c.partials.is_empty() {
                let o = out.offset_cols(s.row0 * row);
                attention::combine(&c.geometry, &self.attn_partials[c.partials.clone()], o);
            }
        }
    }

    fn gated_activation(&mut self, gate: BufId, up: BufId, len: usize, act: Activation) {
        // The quantized path computes activations as llama.cpp does, down to the rounding.
        let numerics = self.numerics;
        let apply = move |g: &mut [f32], u: &[f32]| {
            let f = match (act, numerics) {
                (Activation::Silu, Numerics::Quantized) => return ops::swiglu_ggml(g, u),
                (Activation::Silu, Numerics::Reference) => ops::silu,
                (Activation::GeluTanh, Numerics::Quantized) => return ops::geglu_ggml(g, u),
                (Activation::GeluTanh, Numerics::Reference) => ops::gelu_tanh,
            };
            for (g, u) in g.iter_mut().zip(u) {
                *g = f(*g) * u;
            }
        };
        let (up, gate) = pair(&mut self.buffers, up, gate);
        let up = &up[..len];
        let gate = Shared::new(&mut gate[..len]);
        const SPAN: usize = 4096;
        for_rows(&self.pool, len.div_ceil(SPAN), SPAN, &|spans| {
            let range = spans.start * SPAN..(spans.end * SPAN).min(len);
            // SAFETY: each task owns its spans.
            apply(unsafe { gate.part(range.clone()) }, &up[range]);
        });
    }
}

/// A buffer of packed f16 cache rows as the f16 bit patterns it holds.
fn as_f16(x: &[f32]) -> &[u16] {
    // SAFETY: u16 has no invalid bit patterns and a smaller alignment than f32; the
    // view covers the same bytes.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast(), 2 * x.len()) }
}

fn as_f16_mut(x: &mut [f32]) -> &mut [u16] {
    // SAFETY: as `as_f16`, and the view borrows `x` mutably.
    unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast(), 2 * x.len()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every table the cache hands out is the one `rope_angles` computes for that call,
    /// through alternating bases (Gemma 3's layers), new positions, a longer prefix of
    /// the same positions and another head size.
    #[test]
    fn rope_tables_hand_out_each_calls_angles() {
        let mut tables = RopeTables::default();
        let calls: [(&[u32], usize, f32); 8] = [
            (&[0, 1, 2], 64, 10_000.0),
            (&[0, 1, 2], 64, 1_000_000.0),
            (&[0, 1, 2], 64, 10_000.0),
            (&[0, 1, 2], 64, 1_000_000.0),
            (&[3], 64, 10_000.0),
            (&[3, 4], 64, 10_000.0),
            (&[3, 4], 32, 10_000.0),
            (&[0, 1, 2], 64, 1_000_000.0),
        ];
        for (positions, head_dim, theta) in calls {
            let mut fresh = Vec::new();
            ops::rope_angles(positions, head_dim, theta, &mut fresh);
            let cached = tables.angles(positions, head_dim, theta);
            assert!(
                cached
                    .iter()
                    .map(|a| (a.0.to_bits(), a.1.to_bits()))
                    .eq(fresh.iter().map(|a| (a.0.to_bits(), a.1.to_bits()))),
                "{positions:?} {head_dim} {theta}"
            );
        }
    }
}
