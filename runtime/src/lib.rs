//! kiln-runtime: the small backend interface every accelerator implements (upload
//! weights, allocate activation buffers, run ops, read back), the CPU backend, and the
//! GPU backend on wgpu (Vulkan, Metal, DX12); [`open_backend`] picks one.
//!
//! Models are written once against [`Backend`]; they hold plain [`WeightId`] and
//! [`BufId`] handles and never learn which device runs them.

mod cpu;
mod gpu;
mod pool;

use std::ops::Range;
use std::sync::Arc;

pub use cpu::{CpuBackend, Numerics};
pub use gpu::{adapters, GpuBackend};
pub use kiln_kernels::attention::KvPages;
pub use kiln_kernels::ops::RopeStyle;
pub use kiln_kernels::GgmlType;

/// Errors a backend reports.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("weight `{name}`: {reason}")]
    BadWeight { name: String, reason: String },
    #[error("gpu backend: {0}")]
    Gpu(String),
}

pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

/// Which backend [`open_backend`] opens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackendChoice {
    /// A real GPU when one is usable, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// Any GPU adapter, a CPU-emulated one (lavapipe) included; an error if none works.
    Gpu,
}

impl std::str::FromStr for BackendChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(BackendChoice::Auto),
            "cpu" => Ok(BackendChoice::Cpu),
            "gpu" => Ok(BackendChoice::Gpu),
            _ => Err(format!("unknown backend `{s}`: expected auto, cpu or gpu")),
        }
    }
}

/// An accelerator outside wgpu's reach (an NPU SDK, say) that can run kiln's ops: a
/// plugin registers one with [`register_delegate`], and `auto` asks every registered
/// delegate before it looks for a GPU. kiln ships none.
pub trait Delegate: Send + Sync {
    fn name(&self) -> String;
    /// A backend on this accelerator, or why it cannot run here.
    fn open(&self) -> std::result::Result<Box<dyn Backend>, String>;
}

static DELEGATES: std::sync::Mutex<Vec<Arc<dyn Delegate>>> = std::sync::Mutex::new(Vec::new());

/// Makes `delegate` the first thing `auto` tries (delegates registered earlier come
/// after it).
pub fn register_delegate(delegate: Arc<dyn Delegate>) {
    DELEGATES.lock().unwrap_or_else(|e| e.into_inner()).insert(0, delegate);
}

/// Opens the backend `choice` asks for (`threads` sizes the CPU backend) and says in one
/// line which one it is and why: "gpu: NVIDIA H200 (Vulkan)", "cpu: no GPU adapter".
/// Under `Auto`, registered delegates go first, and any failure to start a GPU falls back
/// to the CPU.
pub fn open_backend(choice: BackendChoice, threads: Option<usize>) -> Result<(Box<dyn Backend>, String)> {
    let cpu = |reason: String| -> Result<(Box<dyn Backend>, String)> {
        Ok((Box::new(CpuBackend::new(threads)), format!("cpu: {reason}")))
    };
    if choice == BackendChoice::Auto {
        let delegates = DELEGATES.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for delegate in delegates {
            if let Ok(backend) = delegate.open() {
                return Ok((backend, format!("delegate: {}", delegate.name())));
            }
        }
    }
    let adapter = match pick_adapter(choice)? {
        Ok(adapter) => adapter,
        Err(reason) => return cpu(reason),
    };
    let name = adapter.get_info().name;
    let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| GpuBackend::new(&adapter)));
    match started {
        Ok(Ok(gpu)) => {
            let reason = format!("gpu: {}", gpu.adapter_name());
            Ok((Box::new(gpu), reason))
        }
        Ok(Err(e)) if choice == BackendChoice::Auto => cpu(format!("{name} failed to start: {e}")),
        Err(_) if choice == BackendChoice::Auto => cpu(format!("{name} failed to start")),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(RuntimeError::Gpu(format!("{name} failed to start"))),
    }
}

/// What [`open_backend`] would run on, for reports: "CPU", or the GPU's API ("Vulkan",
/// "Metal", "Dx12"). (A GPU that then fails to start under `Auto` runs on the CPU.)
pub fn backend_api(choice: BackendChoice) -> String {
    match pick_adapter(choice) {
        Ok(Ok(adapter)) => format!("{:?}", adapter.get_info().backend),
        _ => "CPU".into(),
    }
}

/// The adapter `choice` runs on, or why it runs on the CPU; an error when `Gpu` finds none.
fn pick_adapter(choice: BackendChoice) -> Result<std::result::Result<wgpu::Adapter, String>> {
    if choice == BackendChoice::Cpu {
        return Ok(Err("chosen".into()));
    }
    // Real GPUs first (discrete before integrated), CPU-emulated adapters last.
    let rank = |t: wgpu::DeviceType| match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu | wgpu::DeviceType::Other => 2,
        wgpu::DeviceType::Cpu => 3,
    };
    let found = std::panic::catch_unwind(|| {
        let mut all = adapters();
        all.sort_by_key(|a| rank(a.get_info().device_type));
        all.into_iter().next()
    });
    let adapter = match (found, choice) {
        (Ok(Some(adapter)), _) => adapter,
        (Ok(None), BackendChoice::Gpu) => {
            return Err(RuntimeError::Gpu(
                "no GPU adapter (is a Vulkan, Metal or DX12 driver installed?)".into(),
            ))
        }
        (Ok(None), _) => return Ok(Err("no GPU adapter".into())),
        (Err(_), BackendChoice::Gpu) => return Err(RuntimeError::Gpu("the GPU runtime failed to start".into())),
        (Err(_), _) => return Ok(Err("the GPU runtime failed to start".into())),
    };
    let info = adapter.get_info();
    if choice == BackendChoice::Auto && info.device_type == wgpu::DeviceType::Cpu {
        return Ok(Err(format!(
            "only a CPU-emulated adapter ({}); use --backend gpu to force it",
            info.name
        )));
    }
    Ok(Ok(adapter))
}

/// Bytes in host memory kept alive by their owner: a memory map, or a vector when a
/// loader had to convert data. Cloning shares the owner, never the bytes.
#[derive(Clone)]
pub struct HostBytes {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    range: Range<usize>,
}

impl HostBytes {
    /// A view of `range` within `owner`'s bytes; `None` if the range lies outside them.
    pub fn new(owner: Arc<dyn AsRef<[u8]> + Send + Sync>, range: Range<usize>) -> Option<Self> {
        let len = (*owner).as_ref().len();
        (range.start <= range.end && range.end <= len).then_some(Self { owner, range })
    }

    /// Owned bytes.
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        let len = bytes.len();
        Self {
            owner: Arc::new(bytes),
            range: 0..len,
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.range.clone()]
    }
}

/// A weight matrix (or vector, with one row) in host memory, in GGUF's encoding.
#[derive(Clone)]
pub struct WeightSource {
    pub name: String,
    pub ty: GgmlType,
    /// Rows (output features), 1 for a vector.
    pub rows: usize,
    /// Elements per row (input features); rows are contiguous.
    pub cols: usize,
    pub bytes: HostBytes,
}

impl WeightSource {
    /// Checks that the bytes hold exactly `rows` rows of `cols` elements of `ty`.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| RuntimeError::BadWeight {
            name: self.name.clone(),
            reason,
        };
        let row = self.ty.row_bytes(self.cols).ok_or_else(|| {
            bad(format!(
                "{} columns is not a whole number of {} blocks",
                self.cols, self.ty
            ))
        })?;
        let want = row.checked_mul(self.rows).ok_or_else(|| bad("size overflows".into()))?;
        if want != self.bytes.as_slice().len() {
            return Err(bad(format!(
                "expected {want} bytes, found {}",
                self.bytes.as_slice().len()
            )));
        }
        Ok(())
    }
}

/// A weight uploaded to a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WeightId(pub u32);

/// An f32 activation buffer owned by a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufId(pub u32);

/// The activation function of a gated feed-forward layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Silu,
    GeluTanh,
}

/// The shape shared by every sequence of an attention call: queries of `n_head` heads
/// attend causally over a paged cache whose rows hold `n_kv_head * head_dim` floats,
/// `page_size` rows per page.
#[derive(Clone, Copy, Debug)]
pub struct Attention {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// Sliding window: a query at position p sees keys in `p + 1 - window ..= p`.
    pub window: Option<usize>,
    pub page_size: usize,
}

/// One sequence of an attention call: query rows `row0..row0 + n_tokens` at positions
/// `start_pos..start_pos + n_tokens`, whose page table is `page_table[page0..page0 +
/// n_pages]` of the call (position `p` is row `p % page_size` of its page `p / page_size`).
/// The rows are part of a run of queries at positions `run_start..run_end` (see the
/// kernels' `AttnGeometry::run_start`), which chooses the arithmetic.
#[derive(Clone, Copy, Debug)]
pub struct AttnSeq {
    pub row0: usize,
    pub n_tokens: usize,
    pub start_pos: usize,
    pub run_start: usize,
    pub run_end: usize,
    pub page0: usize,
    pub n_pages: usize,
}

/// `Backend::matmul_many_biased`'s contract: a bias for each of at most four products.
pub(crate) fn assert_bias_per_product(products: &[(WeightId, BufId)], biases: &[WeightId]) {
    assert!(
        products.len() == biases.len() && products.len() <= 4,
        "a bias for each of at most four products"
    );
}

/// What a device does for kiln: hold weights and buffers, run the ops of a forward pass,
/// and hand results back. Ops are enqueued in call order; `read` waits for them.
///
/// Buffers are flat f32 arrays; "rows" below are contiguous runs of a given length.
pub trait Backend: Send {
    /// A short name for logs: "cpu", "gpu (NVIDIA H200)".
    fn name(&self) -> String;

    /// Takes a weight onto the device (the CPU backend keeps the host bytes as they are).
    fn upload(&mut self, weight: WeightSource) -> Result<WeightId>;
    /// (rows, cols) of an uploaded weight.
    fn weight_shape(&self, weight: WeightId) -> (usize, usize);

    /// A zeroed buffer of `len` floats.
    fn alloc(&mut self, len: usize) -> BufId;
    fn free(&mut self, buf: BufId);
    /// Copies host floats into `buf` at `offset`.
    fn write(&mut self, buf: BufId, offset: usize, data: &[f32]);
    /// Copies floats from `buf` at `offset` to the host, after all enqueued ops finish.
    fn read(&mut self, buf: BufId, offset: usize, out: &mut [f32]);
    /// The `k` highest-ranked values of each of `counts.len()` rows of `len` floats at
    /// the start of `buf` (by value, then the lowest index), NaN and -inf left out: row
    /// r's count (fewer than `k` where the row has fewer numbers) at `counts[r]`, its
    /// (index, value) pairs, in no particular order, from `out[r * k]`. Top-k sampling
    /// reads these instead of whole rows.
    fn top_k_rows(&mut self, buf: BufId, len: usize, k: usize, counts: &mut [u32], out: &mut [(u32, f32)]) {
        let (mut row, mut scratch) = (vec![0f32; len], Vec::new());
        for (r, count) in counts.iter_mut().enumerate() {
            self.read(buf, r * len, &mut row);
            *count = kiln_kernels::ops::top_k(&row, &mut scratch, &mut out[r * k..(r + 1) * k]) as u32;
        }
    }
    /// The index of the largest of each of `out.len()` rows of `len` floats at the start
    /// of `buf` (the first on ties; NaN is never the largest, and a row without a number
    /// gives 0): greedy sampling that reads back token ids instead of logits.
    /// (This default reads the logits back; the CPU and GPU backends pick in place.)
    fn argmax_rows(&mut self, buf: BufId, len: usize, out: &mut [u32]) {
        let mut row = vec![0f32; len];
        for (r, best) in out.iter_mut().enumerate() {
            self.read(buf, r * len, &mut row);
            *best = kiln_kernels::ops::argmax(&row);
        }
    }
    /// Copies `len` floats between buffers (`src` and `dst` distinct).
    fn copy(&mut self, src: BufId, src_offset: usize, dst: BufId, dst_offset: usize, len: usize);
    /// Copies `len` floats inside one buffer; the two ranges do not overlap.
    fn copy_within(&mut self, buf: BufId, src_offset: usize, dst_offset: usize, len: usize);

    /// Declares how the rows of the matrix products that follow split into sequences:
    /// `rows_per_sequence` in order, summing to their row count. The CPU backend uses it
    /// to compute as llama.cpp does, which takes the first `len - len % 4` rows of each
    /// sequence in groups of four (see `kiln_kernels::gemm::gemm`). A product over
    /// another number of rows treats every row alone.
    fn set_batch(&mut self, rows_per_sequence: &[usize]) {
        let _ = rows_per_sequence;
    }
    /// Rows of an embedding table, one per token, dequantized into `out`.
    fn embed(&mut self, table: WeightId, tokens: &[u32], out: BufId);
    /// `out[t] = weight · x[t]` for `n` rows of `x` (each `cols` long); out rows are `rows` long.
    fn matmul(&mut self, weight: WeightId, x: BufId, n: usize, out: BufId);
    /// Several products of one input: `out_i[t] = weight_i · x[t]` for each
    /// `(weight_i, out_i)` (at most four, all of the same input width). A backend may
    /// prepare the input once and run them as one dispatch.
    fn matmul_many(&mut self, x: BufId, n: usize, products: &[(WeightId, BufId)]) {
        for &(weight, out) in products {
            self.matmul(weight, x, n, out);
        }
    }
    /// [`Backend::matmul_many`], then `biases[i]` added to every row of product `i`'s
    /// output (a projection's q, k and v biases; as many as products): one pass fewer
    /// where a backend adds them as it writes the products.
    fn matmul_many_biased(&mut self, x: BufId, n: usize, products: &[(WeightId, BufId)], biases: &[WeightId]) {
        assert_bias_per_product(products, biases);
        self.matmul_many(x, n, products);
        let mut pairs = [(BufId(0), WeightId(0)); 4];
        for (pair, (&(_, out), &bias)) in pairs.iter_mut().zip(products.iter().zip(biases)) {
            *pair = (out, bias);
        }
        self.add_biases(&pairs[..products.len()], n);
    }
    /// `x[t] += bias` for `n` rows.
    fn add_bias(&mut self, x: BufId, bias: WeightId, n: usize);
    /// [`Backend::add_bias`] of each `(x, bias)` pair, one pass where a backend fuses
    /// them.
    fn add_biases(&mut self, pairs: &[(BufId, WeightId)], n: usize) {
        for &(x, bias) in pairs {
            self.add_bias(x, bias, n);
        }
    }
    /// `x[i] += y[i]` for the first `len` floats.
    fn add(&mut self, x: BufId, y: BufId, len: usize);
    /// `x[i] *= factor` for the first `len` floats.
    fn scale(&mut self, x: BufId, len: usize, factor: f32);
    /// RMS-normalizes `n` rows of `weight.cols` floats each, in place, times `weight`.
    fn rms_norm(&mut self, x: BufId, weight: WeightId, n: usize, eps: f32);
    /// `x += y` over `n` rows of `weight.cols` floats, then `y` = those rows of `x`
    /// RMS-normalized times `weight`: the residual step between two blocks, one pass
    /// where a backend fuses it.
    fn add_rms_norm(&mut self, x: BufId, y: BufId, weight: WeightId, n: usize, eps: f32) {
        let len = n * self.weight_shape(weight).1;
        self.add(x, y, len);
        self.copy(x, 0, y, 0, len);
        self.rms_norm(y, weight, n, eps);
    }
    /// Rotates `n_heads` heads of `head_dim` in each of `positions.len()` rows.
    fn rope(&mut self, x: BufId, positions: &[u32], n_heads: usize, head_dim: usize, theta: f32, style: RopeStyle);
    /// [`Backend::rope`] of the queries (`heads.0` a row) and the keys (`heads.1`) of the
    /// same rows, one pass where a backend fuses it.
    #[allow(clippy::too_many_arguments)]
    fn rope_qk(
        &mut self,
        q: BufId,
        k: BufId,
        positions: &[u32],
        heads: (usize, usize),
        head_dim: usize,
        theta: f32,
        style: RopeStyle,
    ) {
        self.rope(q, positions, heads.0, head_dim, theta, style);
        self.rope(k, positions, heads.1, head_dim, theta, style);
    }
    /// Floats that a key/value cache row of `row_len` values takes in a buffer: `row_len`,
    /// or fewer where the backend keeps the cache at reduced precision (the CPU packs two
    /// f16 values into each float). Cache buffers, and offsets into them, count these
    /// floats; `read`, `write` and `copy_within` move them as they are, bit for bit.
    fn kv_row_floats(&self, row_len: usize) -> usize {
        row_len
    }
    /// Writes row `i` of `row_len` keys or values from `src` into row `rows[i]` of `cache`
    /// (rows [`Backend::kv_row_floats`] apart).
    fn store_kv(&mut self, src: BufId, cache: BufId, row_len: usize, rows: &[u32]);
    /// [`Backend::store_kv`] of the keys into `caches.0` and the values into `caches.1`.
    fn store_kv_pair(&mut self, k: BufId, v: BufId, caches: (BufId, BufId), row_len: usize, rows: &[u32]) {
        self.store_kv(k, caches.0, row_len, rows);
        self.store_kv(v, caches.1, row_len, rows);
    }
    /// [`Backend::rope_qk`], then [`Backend::store_kv_pair`] of the rotated keys and the
    /// values `v` (`heads.1` heads a row too): the step between a layer's q/k/v products
    /// and its attention, one pass where a backend fuses it.
    #[allow(clippy::too_many_arguments)]
    fn rope_qk_store_kv(
        &mut self,
        (q, k, v): (BufId, BufId, BufId),
        positions: &[u32],
        heads: (usize, usize),
        head_dim: usize,
        theta: f32,
        style: RopeStyle,
        caches: (BufId, BufId),
        rows: &[u32],
    ) {
        self.rope_qk(q, k, positions, heads, head_dim, theta, style);
        self.store_kv_pair(k, v, caches, heads.1 * head_dim, rows);
    }
    /// Causal attention of each sequence's rows of `q` over its cached keys and values,
    /// into the same rows of `out`; `page_table` holds every sequence's page table.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &mut self,
        q: BufId,
        keys: BufId,
        values: BufId,
        shape: Attention,
        seqs: &[AttnSeq],
        page_table: &[u32],
        out: BufId,
    );
    /// `gate[i] = act(gate[i]) * up[i]` for the first `len` floats.
    fn gated_activation(&mut self, gate: BufId, up: BufId, len: usize, act: Activation);
    /// `out = weight · (act(gate) * up)` over `n` rows: the gated feed-forward's down
    /// projection, one pass fewer where a backend fuses it. `gate` holds anything after.
    fn matmul_gated(&mut self, weight: WeightId, gate: BufId, up: BufId, act: Activation, n: usize, out: BufId) {
        let cols = self.weight_shape(weight).1;
        self.gated_activation(gate, up, n * cols, act);
        self.matmul(weight, gate, n, out);
    }
}
