//! The CPU backend: weights stay in the host bytes they were loaded from (a memory map),
//! buffers are plain vectors, and ops run at once on the calling thread and rayon's pool.

use kiln_kernels::dequant::dequantize_row;
use kiln_kernels::{ops, qdot};
use rayon::prelude::*;

use crate::{Activation, Attention, Backend, BufId, Result, RopeStyle, WeightId, WeightSource};

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
    pool: rayon::ThreadPool,
    numerics: Numerics,
    /// Quantized input rows of the current matmul, reused across calls.
    acts: Vec<u8>,
    act_row: Vec<u8>,
    weights: Vec<WeightSource>,
    /// Vectors (norm weights, biases) dequantized once at upload, by weight index.
    vectors: Vec<Option<Vec<f32>>>,
    buffers: Vec<Vec<f32>>,
}

impl CpuBackend {
    /// A backend running its ops on `threads` threads (default: one per core).
    pub fn new(threads: Option<usize>) -> Self {
        Self::with_numerics(threads, Numerics::Quantized)
    }

    pub fn with_numerics(threads: Option<usize>, numerics: Numerics) -> Self {
        let threads = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("kiln-cpu-{i}"))
            .build()
            .expect("the CPU thread pool starts");
        CpuBackend {
            pool,
            numerics,
            acts: Vec::new(),
            act_row: Vec::new(),
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

    /// One buffer to read and another to write.
    fn pair(&mut self, read: BufId, write: BufId) -> (&[f32], &mut [f32]) {
        pair(&mut self.buffers, read, write)
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

/// The output of a matmul, shared by tasks that write disjoint elements of it.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements (see `matmul`), and the buffer outlives them.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// # Safety
    /// `i` is in bounds and no other task writes element `i`.
    unsafe fn write(self, i: usize, v: f32) {
        unsafe { *self.0.add(i) = v }
    }
}

/// Rows per parallel task in matmul: enough work to amortize dequantizing each row.
const ROWS_PER_TASK: usize = 16;

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

    fn copy(&mut self, src: BufId, src_offset: usize, dst: BufId, dst_offset: usize, len: usize) {
        let (s, d) = self.pair(src, dst);
        d[dst_offset..dst_offset + len].copy_from_slice(&s[src_offset..src_offset + len]);
    }

    fn embed(&mut self, table: WeightId, tokens: &[u32], out: BufId) {
        let w = &self.weights[table.0 as usize];
        let row_bytes = w.ty.row_bytes(w.cols).expect("validated at upload");
        let (cols, ty, bytes) = (w.cols, w.ty, w.bytes.clone());
        let out = &mut self.buffers[out.0 as usize];
        for (t, &token) in tokens.iter().enumerate() {
            let src = &bytes.as_slice()[token as usize * row_bytes..][..row_bytes];
            dequantize_row(ty, src, &mut out[t * cols..(t + 1) * cols]);
        }
    }

    fn matmul(&mut self, weight: WeightId, x: BufId, n: usize, out: BufId) {
        let CpuBackend {
            pool,
            weights,
            buffers,
            numerics,
            acts,
            act_row,
            ..
        } = self;
        let w = &weights[weight.0 as usize];
        let (rows, cols, ty) = (w.rows, w.cols, w.ty);
        let row_bytes = ty.row_bytes(cols).expect("validated at upload");
        let weight_row = |r: usize| &w.bytes.as_slice()[r * row_bytes..][..row_bytes];
        let (x, out) = pair(buffers, x, out);
        let x = &x[..n * cols];
        // Tasks own bands of weight rows: each reads its rows once for all `n` inputs and
        // writes out[t * rows + r] for its r only, so no two tasks write one element.
        let out = OutPtr(out[..n * rows].as_mut_ptr());
        // SAFETY: in bounds (t < n, r < rows), and rows are split between tasks.
        let store = |t: usize, r: usize, v: f32| unsafe { out.write(t * rows + r, v) };
        let bands = rows.div_ceil(ROWS_PER_TASK);
        let band_rows = |band: usize| band * ROWS_PER_TASK..rows.min((band + 1) * ROWS_PER_TASK);
        match numerics {
            Numerics::Quantized => {
                // Each input row is quantized once to the weight type's 8-bit block format;
                // every output is then a sum of per-block integer dot products.
                let format = qdot::activation_format(ty);
                let act_bytes = format
                    .row_bytes(cols)
                    .expect("activation blocks divide the row as weight blocks do");
                acts.clear();
                for row in x.chunks_exact(cols) {
                    qdot::quantize_activations(format, row, act_row);
                    acts.extend_from_slice(act_row);
                }
                let acts = &acts[..];
                pool.install(|| {
                    (0..bands).into_par_iter().for_each(|band| {
                        for r in band_rows(band) {
                            for (t, a) in acts.chunks_exact(act_bytes).enumerate() {
                                store(t, r, qdot::dot(ty, weight_row(r), a, cols));
                            }
                        }
                    })
                });
            }
            Numerics::Reference => pool.install(|| {
                (0..bands).into_par_iter().for_each_init(
                    || vec![0.0; cols],
                    |row, band| {
                        for r in band_rows(band) {
                            dequantize_row(ty, weight_row(r), row);
                            for (t, input) in x.chunks_exact(cols).enumerate() {
                                store(t, r, ops::dot(row, input));
                            }
                        }
                    },
                )
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
        let (y, x) = self.pair(y, x);
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
        for row in self.buffers[x.0 as usize].chunks_mut(weight.len()).take(n) {
            ops::rms_norm_in_place(row, weight, eps);
        }
    }

    fn rope(&mut self, x: BufId, positions: &[u32], n_heads: usize, head_dim: usize, theta: f32, style: RopeStyle) {
        let x = self.buf_mut(x);
        for (t, &pos) in positions.iter().enumerate() {
            for h in 0..n_heads {
                let start = (t * n_heads + h) * head_dim;
                ops::rope(&mut x[start..start + head_dim], pos, head_dim, theta, style);
            }
        }
    }

    fn store_kv(&mut self, src: BufId, cache: BufId, n: usize, row_len: usize, start: usize) {
        let numerics = self.numerics;
        let (src, cache) = self.pair(src, cache);
        let (src, dst) = (&src[..n * row_len], &mut cache[start * row_len..(start + n) * row_len]);
        match numerics {
            // llama.cpp keeps its cache in f16.
            Numerics::Quantized => dst.iter_mut().zip(src).for_each(|(d, s)| *d = ops::round_to_f16(*s)),
            Numerics::Reference => dst.copy_from_slice(src),
        }
    }

    fn attention(&mut self, q: BufId, keys: BufId, values: BufId, a: Attention, out: BufId) {
        let [q, k, v, out] = self
            .buffers
            .get_disjoint_mut([q.0, keys.0, values.0, out.0].map(|i| i as usize))
            .expect("attention buffers must be distinct");
        let (q, k, v) = (&*q, &*k, &*v);
        let d = a.head_dim;
        let kv_stride = a.n_kv_head * d;
        let group = a.n_head / a.n_kv_head;
        let n_ctx_max = a.start_pos + a.n_tokens;
        // llama.cpp runs a few queries through a kernel that rounds the query to f16 and
        // accumulates values in f16, and tiles of 64 or more through an f32 kernel.
        let kernel = if self.numerics == Numerics::Quantized && a.n_tokens < 64 {
            ops::attend_f16_accumulator
        } else {
            ops::attend
        };
        self.pool.install(|| {
            out[..a.n_tokens * a.n_head * d]
                .par_chunks_mut(d)
                .enumerate()
                .for_each_init(
                    || vec![0.0; n_ctx_max.max(d)],
                    |scratch, (i, head_out)| {
                        let (t, h) = (i / a.n_head, i % a.n_head);
                        let pos = a.start_pos + t;
                        let first = a.window.map_or(0, |w| (pos + 1).saturating_sub(w));
                        let query = &q[i * d..(i + 1) * d];
                        let offset = (h / group) * d;
                        kernel(
                            query,
                            k,
                            v,
                            kv_stride,
                            offset,
                            first,
                            pos + 1,
                            a.scale,
                            scratch,
                            head_out,
                        );
                    },
                );
        });
    }

    fn gated_activation(&mut self, gate: BufId, up: BufId, len: usize, act: Activation) {
        // The quantized path computes activations as llama.cpp does, down to the rounding.
        let f = match (act, self.numerics) {
            (Activation::Silu, Numerics::Quantized) => ops::silu_ggml,
            (Activation::Silu, Numerics::Reference) => ops::silu,
            (Activation::GeluTanh, Numerics::Quantized) => ops::gelu_tanh_ggml,
            (Activation::GeluTanh, Numerics::Reference) => ops::gelu_tanh,
        };
        let (up, gate) = self.pair(up, gate);
        for (g, u) in gate[..len].iter_mut().zip(&up[..len]) {
            *g = f(*g) * u;
        }
    }
}
