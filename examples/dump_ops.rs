//! Runs kiln's CPU forward pass over a prompt (token ids) and some decode steps, and
//! writes every op's output to a file in the record format of
//! `scripts/fixtures/ops_driver.cpp`, for `scripts/llama-ops-diff`:
//!
//! `cargo run --release --example dump_ops -- MODEL OUT ID,ID,... [NEXT,NEXT,...]`
//!
//! MODEL is a pulled model's name or a GGUF path; NEXT are the tokens fed after the
//! prompt, one step each (llama.cpp's greedy choices, so both runs see the same tokens).

use std::io::Write;

use kiln::models::{self, Checkpoint, KvCache, Scratch};
use kiln::registry;
use kiln::runtime::{
    Activation, Attention, AttnSeq, Backend, BufId, CpuBackend, Result, RopeStyle, WeightId, WeightSource,
};

/// The CPU backend, recording the buffer each op writes.
struct Recorder {
    inner: CpuBackend,
    out: std::io::BufWriter<std::fs::File>,
}

impl Recorder {
    fn record(&mut self, name: &str, buf: BufId, len: usize) {
        let mut v = vec![0f32; len];
        self.inner.read(buf, 0, &mut v);
        let mut bytes = Vec::with_capacity(4 + name.len() + 40 + 4 * len);
        bytes.extend_from_slice(&(name.len() as u32).to_le_bytes());
        bytes.extend_from_slice(name.as_bytes());
        for n in [len as i64, 1, 1, 1] {
            bytes.extend_from_slice(&n.to_le_bytes());
        }
        bytes.extend_from_slice(&((4 * len) as u64).to_le_bytes());
        bytes.extend(v.iter().flat_map(|f| f.to_le_bytes()));
        self.out.write_all(&bytes).expect("write the dump");
    }
}

impl Backend for Recorder {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn upload(&mut self, w: WeightSource) -> Result<WeightId> {
        self.inner.upload(w)
    }
    fn weight_shape(&self, w: WeightId) -> (usize, usize) {
        self.inner.weight_shape(w)
    }
    fn alloc(&mut self, len: usize) -> BufId {
        self.inner.alloc(len)
    }
    fn free(&mut self, b: BufId) {
        self.inner.free(b)
    }
    fn write(&mut self, b: BufId, offset: usize, data: &[f32]) {
        self.inner.write(b, offset, data)
    }
    fn read(&mut self, b: BufId, offset: usize, out: &mut [f32]) {
        self.inner.read(b, offset, out)
    }
    fn copy(&mut self, src: BufId, so: usize, dst: BufId, dof: usize, len: usize) {
        self.inner.copy(src, so, dst, dof, len)
    }
    fn copy_within(&mut self, b: BufId, src: usize, dst: usize, len: usize) {
        self.inner.copy_within(b, src, dst, len)
    }
    fn set_batch(&mut self, rows_per_sequence: &[usize]) {
        self.inner.set_batch(rows_per_sequence)
    }
    fn embed(&mut self, table: WeightId, tokens: &[u32], out: BufId) {
        self.inner.embed(table, tokens, out);
        let len = tokens.len() * self.inner.weight_shape(table).1;
        self.record("embed", out, len)
    }
    fn matmul(&mut self, w: WeightId, x: BufId, n: usize, out: BufId) {
        self.inner.matmul(w, x, n, out);
        let len = n * self.inner.weight_shape(w).0;
        self.record("matmul", out, len)
    }
    fn add_bias(&mut self, x: BufId, bias: WeightId, n: usize) {
        self.inner.add_bias(x, bias, n);
        let len = n * self.inner.weight_shape(bias).1;
        self.record("add_bias", x, len)
    }
    fn add(&mut self, x: BufId, y: BufId, len: usize) {
        self.inner.add(x, y, len);
        self.record("add", x, len)
    }
    fn scale(&mut self, x: BufId, len: usize, factor: f32) {
        self.inner.scale(x, len, factor);
        self.record("scale", x, len)
    }
    fn rms_norm(&mut self, x: BufId, w: WeightId, n: usize, eps: f32) {
        self.inner.rms_norm(x, w, n, eps);
        let len = n * self.inner.weight_shape(w).1;
        self.record("rms_norm", x, len)
    }
    fn rope(&mut self, x: BufId, positions: &[u32], heads: usize, dim: usize, theta: f32, style: RopeStyle) {
        self.inner.rope(x, positions, heads, dim, theta, style);
        self.record("rope", x, positions.len() * heads * dim)
    }
    fn kv_row_floats(&self, row_len: usize) -> usize {
        self.inner.kv_row_floats(row_len)
    }
    fn store_kv(&mut self, src: BufId, cache: BufId, row_len: usize, rows: &[u32]) {
        self.inner.store_kv(src, cache, row_len, rows)
    }
    fn attention(&mut self, q: BufId, k: BufId, v: BufId, a: Attention, seqs: &[AttnSeq], pages: &[u32], out: BufId) {
        self.inner.attention(q, k, v, a, seqs, pages, out);
        let n: usize = seqs.iter().map(|s| s.n_tokens).sum();
        self.record("attention", out, n * a.n_head * a.head_dim)
    }
    fn gated_activation(&mut self, gate: BufId, up: BufId, len: usize, act: Activation) {
        self.inner.gated_activation(gate, up, len, act);
        self.record("gated", gate, len)
    }
}

fn ids(arg: Option<&String>) -> Vec<u32> {
    arg.map_or(Vec::new(), |s| {
        s.split(',')
            .filter(|x| !x.is_empty())
            .map(|x| x.parse().expect("token ids are numbers"))
            .collect()
    })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        eprintln!("usage: dump_ops MODEL OUT ID,ID,... [NEXT,NEXT,...]");
        std::process::exit(2);
    }
    let (prompt, next) = (ids(args.get(2)), ids(args.get(3)));
    let path = registry::resolve(&args[0]).unwrap_or_else(|e| panic!("{}: {e}", args[0]));
    let file = std::fs::File::create(&args[1]).unwrap_or_else(|e| panic!("{}: {e}", args[1]));
    let mut be = Recorder {
        inner: CpuBackend::new(None),
        out: std::io::BufWriter::new(file),
    };
    let checkpoint = Checkpoint::open(&path).expect("open the model");
    let llm = models::load_model(&checkpoint, &mut be).expect("load the model");
    let h = llm.hyper().clone();
    let n = prompt.len() + next.len();
    let mut cache = KvCache::new(&mut be, &h, n);
    let mut scratch = Scratch::new(&mut be, &h, prompt.len().max(1), 1);
    cache.forward(llm.as_ref(), &mut be, &mut scratch, &prompt, 1);
    for t in next {
        cache.forward(llm.as_ref(), &mut be, &mut scratch, &[t], 1);
    }
    be.out.flush().expect("write the dump");
}
