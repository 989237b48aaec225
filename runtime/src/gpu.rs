//! The GPU backend on wgpu (Vulkan, Metal, DX12): weights repacked once into u32 words
//! in storage buffers (split by rows where a weight exceeds the binding limit), f32
//! activation buffers, and the WGSL kernels of `kiln_kernels::wgsl`.
//!
//! Ops are recorded into one pending compute pass and submitted when results are read,
//! when an arena fills, or after `SUBMIT_FIRST`, then twice as many, ... up to
//! `SUBMIT_EVERY` dispatches: a decode step is a few submissions, so that the GPU runs
//! its first layers while the host records the rest (one submission per step left the
//! GPU idle for as long as recording took, which was as long as the GPU's own work: 192
//! against 305 tokens/s on a Qwen2-0.5B shape on an H200). Each dispatch takes its
//! parameters from a slot of one uniform buffer (a dynamic offset) and any small host
//! arrays (tokens, rope tables, cache rows, page tables, written data) from one storage
//! arena; both are uploaded once per submission, and their slots are never reused before
//! it. Pipelines are created once per kernel (and weight type); bind groups are cached by
//! the buffers they bind.
//!
//! Products of up to `MATVEC_ROWS` input rows (decode) take the matvec kernels: one
//! subgroup (or 32 lanes summed in workgroup memory, where the adapter has no subgroups)
//! per weight row, and for Q8_0, Q4_K, Q6_K and (rows of an even number of blocks) Q5_0
//! 16-byte loads of weights and activations, which is why those weights and the 8-bit
//! activation blocks are stored in 16-byte units.
//! That kernel also takes up to three weights of one type and width in one dispatch (a
//! layer's q, k and v, or gate and up, for one input row): on an H200 every dispatch
//! boundary costs more than a small product's own work. That cost is wgpu's pipeline
//! barrier between dependent dispatches (one per dispatch), not the host or the launch:
//! a probe build that dropped the barriers (wrong results) decoded a Qwen2-0.5B shape at
//! ~1000 tokens/s against ~370 with them, Llama-8B 352 against 165, whatever the
//! barrier's stage masks or queue family; so each dispatch fused away saves ~7-11 µs a
//! layer on a decode step.
//! Longer inputs take a matmul kernel: from `TILED_ROWS` rows on, quantized weights take
//! one that decodes 64 weight rows and copies 64 input rows into workgroup memory per
//! step. `KILN_GPU_MATVEC=0`, `KILN_GPU_VEC4=0`, `KILN_GPU_TILED=0` and
//! `KILN_GPU_SUBGROUPS=0` turn these paths off (for comparisons).
//!
//! Attention takes one of three kernels per sequence: short calls repeat the CPU's
//! f16-accumulator kernel (see Numerics below); prefill chunks of at least
//! `ATTN_BLOCK_MIN_ROWS` rows take blocks of 16 query rows (8 for heads over 128) per
//! workgroup, which read each key and value row once per block (a workgroup per row had
//! read it once per row: pp512 on an H200 went 9.0k -> 10.7k tokens/s on a Qwen2-0.5B
//! shape, 6.6k -> 8.3k on Llama-1B, 1.32k -> 1.56k on Llama-8B); other rows take a
//! workgroup per row, with each row's keys split across workgroups when rows are few.
//!
//! Ops that the models run back to back are fused where a kernel can take both: the
//! residual add with the next norm, rotary embedding of queries and keys with the
//! storing of keys and values into the cache, the three q/k/v biases, and the gated
//! activation with the quantization of the down projection's input. (A norm fused with
//! the quantization of its rows was slower on an H200: one workgroup per row then
//! quantizes a whole 4096-float row serially, 8B decode 154 -> 121 tokens/s.) A decode
//! step's attention also leaves its output in Q8_0 / Q8_1 blocks where the output
//! projection reads those (blocks of 32 lie within a head; Q8_K's 256 do not), one
//! dispatch fewer a layer: tg128 Llama-1B Q8_0 shape 438/421 -> 452/439 tokens/s on an
//! H200. (Every matvec workgroup quantizing its own input row instead was slower:
//! each repeats the serial work, Qwen2-0.5B shape 312/316 -> 267/284.) Sampling's
//! greedy pick and top-k selection run here too (`argmax_rows`, `top_k_rows`): a decode
//! step reads back token ids, or k candidates, rather than the vocabulary's logits.
//!
//! `KILN_GPU_PROFILE=1` prints GPU time per kernel (timestamp queries, which inflate
//! short dispatches), `KILN_GPU_PROFILE=host` the host's time per submission: recording,
//! submitting, waiting.
//!
//! Numerics follow the CPU backend's `Numerics::Quantized`: activations quantized per row
//! to the 8-bit block format of the weight type, integer dot products per block, f32
//! scales; the cache rounded to f16; ggml's SiLU and GELU. The two differ by f32
//! summation order (and `exp` in long attention calls). Short attention calls (decode
//! steps and prefill chunks of fewer than 64 rows over fewer than 512 keys, heads of 64,
//! 128 or 256) repeat the CPU's f16-accumulator kernel operation for operation
//! (`attention_f16.wgsl`): its f16 rounding noise, amplified over many layers, was what
//! made greedy tokens of a random-weights Llama-8B shape part from the CPU's at token 7.
//!
//! Limits: the cache holds its f16 values as f32 (one value a float, unlike the CPU's
//! packed pairs); attention takes heads of at most 256; weight types the kernels do not
//! read (Q5_1, Q2_K, Q3_K, Q5_K) are stored dequantized as F32, so their products see f32
//! activations; activation buffers must fit one binding; no shader-f16.

use std::collections::HashMap;

use kiln_kernels::dequant::dequantize_row;
use kiln_kernels::qdot::{self, ActFormat};
use kiln_kernels::{attention, ops, wgsl, GgmlType};

use crate::{Activation, Attention, AttnSeq, Backend, BufId, Result, RopeStyle, RuntimeError, WeightId, WeightSource};

/// Bytes between parameter slots (the uniform dynamic-offset alignment everywhere).
const PARAM_SLOT: u64 = 256;
/// Parameter slots per submission.
const PARAM_SLOTS: usize = 4096;
/// Initial arena size in 32-bit words.
const ARENA_WORDS: usize = 1 << 20;

/// Dispatches after which pending work is submitted even though no result is read yet:
/// the GPU starts on the first layers of a decode step while the host still records
/// the rest (`KILN_GPU_SUBMIT_EVERY` overrides it).
const SUBMIT_EVERY: usize = 256;
/// The first submission after a read is this short, and the next ones double up to
/// `SUBMIT_EVERY`: the GPU, idle since the read, waits only for a few dispatches to be
/// recorded (`KILN_GPU_SUBMIT_FIRST` overrides it). A submission costs the host 100-150
/// µs on an H200's driver, as much as recording ~30 dispatches: 16 then 32, 64, 128, 256
/// (a Qwen2-0.5B-shape step is ~245 dispatches: four submissions) against 4 up to 64
/// (seven), two rounds: tg128 Qwen2-0.5B shape 295/360 -> 368/368, Llama-8B 158/158 ->
/// 163/163, Llama-1B Q8_0 452/439 -> 444/455 (noise) tokens/s; one submission a step
/// was slowest.
const SUBMIT_FIRST: usize = 16;

/// Storage bindings of the widest kernel (a stack of three matvec weights and their
/// biases).
const MAX_BINDINGS: usize = 8;
/// Weight bytes uploaded between waits for the staging memory to be released.
const UPLOAD_BATCH_BYTES: usize = 256 << 20;

/// The buffer slots of a bind group's storage bindings, `usize::MAX` past the last.
type BindKey = [usize; MAX_BINDINGS];

/// A kernel and, for the typed ones, its pipeline constant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kernel {
    Copy,
    CopyWithin,
    Add,
    Scale,
    AddBias,
    RmsNorm,
    /// The norm, then its rows in an activation format (code as `Quantize`'s).
    NormQuantize(u32),
    Rope,
    StoreKv,
    Gated,
    Attention,
    /// Attention with each query row's keys split across workgroups, and its merge.
    AttentionSplit,
    AttentionCombine,
    /// Attention as the CPU backend's f16-accumulator kernel computes it; the code of the
    /// block format (as `Quantize`'s) it also leaves its output rows in, 0 for none.
    AttentionF16(u32),
    /// Attention of blocks of consecutive query rows (prefill chunks).
    AttentionBlock,
    Quantize(u32),
    Matmul(u32),
    /// Quantized weight types (codes 3..=8) times many rows, in 64 × 64 tiles.
    MatmulTiled(u32),
    /// Weight type, input rows (1..=MATVEC_ROWS), subgroup sums.
    Matvec(u32, u32, bool),
    /// Q5_0, Q8_0, Q4_K or Q6_K with 16-byte loads (subgroup sums): weight type, input
    /// rows.
    MatvecVec4(u32, u32),
    Embed(u32),
    Argmax,
    TopK,
}

/// Products of at most this many input rows take the matvec kernels.
const MATVEC_ROWS: usize = 4;
/// Products of quantized weights over at least this many input rows take the tiled
/// kernel (64 × 64 tiles); fewer take the simple one (4 weight rows × 8 input rows).
const TILED_ROWS: usize = 32;
/// Invocations of a matvec workgroup.
const MATVEC_WG: usize = 128;
/// Attention calls with fewer (query row, head) pairs than this split each row's keys
/// into ranges of whole 64-key tiles, for about this many workgroups.
const ATTN_SPLIT_GROUPS: usize = 512;
/// Sequences of at least this many query rows in one attention call (prefill chunks)
/// take the kernel that reads each key and value row once per block of rows.
const ATTN_BLOCK_MIN_ROWS: usize = 8;

impl Kernel {
    /// Source (after the common prelude) and, per storage binding from 1 on, whether
    /// the kernel writes it.
    fn spec(self) -> (&'static str, &'static [bool]) {
        match self {
            Kernel::Copy => (wgsl::COPY, &[false, true]),
            Kernel::CopyWithin => (wgsl::COPY_WITHIN, &[true]),
            Kernel::Add => (wgsl::ADD, &[true, false]),
            Kernel::Scale => (wgsl::SCALE, &[true]),
            Kernel::AddBias => (wgsl::ADD_BIAS, &[true, true, true, false, false, false]),
            Kernel::RmsNorm => (wgsl::RMS_NORM, &[true, true, false]),
            Kernel::NormQuantize(_) => (wgsl::RMS_NORM, &[true, true, false, true]),
            Kernel::Rope => (wgsl::ROPE, &[true, true, false, false, true, true]),
            Kernel::StoreKv => (wgsl::STORE_KV, &[false, false, true, true, false]),
            Kernel::Gated => (wgsl::GATED, &[true, false, false]),
            Kernel::Attention => (wgsl::ATTENTION, &[false, false, false, true, false]),
            Kernel::AttentionSplit => (wgsl::ATTENTION_SPLIT, &[false, false, false, true, false]),
            Kernel::AttentionCombine => (wgsl::ATTENTION_COMBINE, &[false, true, false]),
            Kernel::AttentionF16(_) => (wgsl::ATTENTION_F16, &[false, false, false, true, false, true]),
            Kernel::AttentionBlock => (wgsl::ATTENTION_BLOCK, &[false, false, false, true, false]),
            Kernel::Quantize(_) => (wgsl::QUANTIZE, &[false, true, false, false]),
            Kernel::Matmul(_) => (wgsl::MATMUL, &[false, false, true]),
            Kernel::MatmulTiled(_) => (wgsl::MATMUL_TILED, &[false, false, true]),
            Kernel::Matvec(_, _, false) => (wgsl::MATVEC_WG, &[false, false, true]),
            Kernel::Matvec(_, _, true) => (wgsl::MATVEC_SG, &[false, false, true]),
            Kernel::MatvecVec4(..) => (
                wgsl::MATVEC_VEC4,
                &[false, false, true, false, false, true, true, false],
            ),
            Kernel::Embed(_) => (wgsl::EMBED, &[false, false, true]),
            Kernel::Argmax => (wgsl::ARGMAX, &[false, true]),
            Kernel::TopK => (wgsl::TOP_K, &[false, true]),
        }
    }
}

/// The attention kernels' items of `seqs`' rows: (row, position, first page-table entry).
fn attention_items<'a>(seqs: impl Iterator<Item = &'a AttnSeq> + 'a) -> impl Iterator<Item = u32> + 'a {
    seqs.flat_map(|s| {
        (0..s.n_tokens).flat_map(move |i| [(s.row0 + i) as u32, (s.start_pos + i) as u32, s.page0 as u32])
    })
}

/// The code of a weight type in `weights.wgsl`, or `None` for types stored as F32.
fn wtype(ty: GgmlType) -> Option<u32> {
    Some(match ty {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::BF16 => 2,
        GgmlType::Q4_0 => 3,
        GgmlType::Q4_1 => 4,
        GgmlType::Q5_0 => 5,
        GgmlType::Q8_0 => 6,
        GgmlType::Q4_K => 7,
        GgmlType::Q6_K => 8,
        _ => return None,
    })
}

/// The code of an activation format in `quantize.wgsl` and its words per row of `cols`.
fn afmt(format: ActFormat, cols: usize) -> (u32, usize) {
    match format {
        ActFormat::F32 => (0, cols),
        ActFormat::F16 => (1, cols),
        ActFormat::BF16 => (2, cols),
        ActFormat::Q8_0 => (3, cols / 32 * 12),
        ActFormat::Q8_1 => (4, cols / 32 * 12),
        ActFormat::Q8_K => (5, cols / 256 * 68),
    }
}

/// Appends one row of `ty` in the layout `weights.wgsl` reads, padded to whole words.
fn repack_row(ty: GgmlType, row: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    if ty == GgmlType::Q8_0 {
        // Groups of 4 blocks: [qs ×4, d ×4, 0 ×4], a short last group padded with zeros.
        for group in row.chunks(4 * ty.type_size()) {
            let mut d = [0u8; 16];
            for (i, b) in group.chunks_exact(ty.type_size()).enumerate() {
                out.extend_from_slice(&b[2..]);
                d[2 * i..2 * i + 2].copy_from_slice(&b[..2]);
            }
            let missing = 4 - group.len() / ty.type_size();
            out.resize(out.len() + 32 * missing, 0);
            out.extend_from_slice(&d);
        }
        return;
    }
    for b in row.chunks_exact(ty.type_size()) {
        match ty {
            // [d, qs] → [qs, d]; [d, qh, qs] → [qs, qh, d].
            GgmlType::Q4_0 => {
                out.extend_from_slice(&b[2..]);
                out.extend_from_slice(&b[..2]);
                out.extend_from_slice(&[0, 0]);
            }
            GgmlType::Q5_0 => {
                out.extend_from_slice(&b[6..22]);
                out.extend_from_slice(&b[2..6]);
                out.extend_from_slice(&b[..2]);
                out.extend_from_slice(&[0, 0]);
            }
            // Padded to 16 bytes, for the matvec kernel's 16-byte loads.
            GgmlType::Q6_K => {
                out.extend_from_slice(b);
                out.extend_from_slice(&[0; 14]);
            }
            _ => out.extend_from_slice(b),
        }
    }
    out.resize(start + (out.len() - start).next_multiple_of(4), 0);
}

struct GpuWeight {
    rows: usize,
    cols: usize,
    /// The stored type (F32 for types the kernels do not read).
    ty: GgmlType,
    row_words: usize,
    /// (slot, first row, rows) of each part.
    parts: Vec<(usize, usize, usize)>,
    /// A vector (one row) as f32, for norms and biases.
    vector: Option<usize>,
}

pub struct GpuBackend {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    /// Rows a subgroup-summed matvec workgroup covers, where the device has subgroups.
    subgroup_rows: Option<usize>,
    /// Whether products of few rows take the matvec kernels.
    matvec: bool,
    /// Whether products of many rows take the tiled kernel (`KILN_GPU_TILED=0` declines).
    tiled: bool,
    /// Whether Q5_0, Q8_0, Q4_K and Q6_K ones take the 16-byte-load kernel
    /// (`KILN_GPU_VEC4=0` declines).
    vec4: bool,
    max_binding: u64,
    /// Weight bytes written since the last wait (see `upload`).
    staged_bytes: usize,
    /// Largest part a weight is split into (`max_binding` unless tests lower it).
    part_bytes: u64,
    layouts: HashMap<Kernel, wgpu::BindGroupLayout>,
    pipelines: HashMap<Kernel, wgpu::ComputePipeline>,
    bind_groups: HashMap<(Kernel, BindKey), wgpu::BindGroup>,
    /// Every buffer the backend owns, by slot; freed slots are `None`.
    slots: Vec<Option<wgpu::Buffer>>,
    /// Slot of each activation buffer, by `BufId`.
    buffers: Vec<usize>,
    weights: Vec<GpuWeight>,
    params: wgpu::Buffer,
    params_cpu: Vec<u8>,
    params_used: usize,
    arena: usize,
    arena_cpu: Vec<u32>,
    /// Words the arena buffer holds.
    arena_cap: usize,
    /// Quantized activations of the current matmul.
    acts: usize,
    acts_words: usize,
    /// What the activations buffer holds when the last dispatch was a norm or an
    /// attention that also quantized its rows.
    acts_ready: Option<ReadyActs>,
    /// (rows slot, norm weight, rows) when the last dispatch was a norm.
    last_norm: Option<(usize, u32, usize)>,
    /// The activation format of the products that read each norm's rows (by norm weight).
    norm_formats: HashMap<u32, ActFormat>,
    /// The output slot when the last op was an attention.
    last_attention: Option<usize>,
    /// The activation format of the products that first read each attention output
    /// slot.
    attention_formats: HashMap<usize, ActFormat>,
    /// The slot holding each stack's biases (by bias weights; see `stack_bias`).
    stack_biases: HashMap<[u32; 3], usize>,
    /// Dispatches recorded since the backend started.
    dispatches: u64,
    gelu: usize,
    /// A small buffer bound in place of a fused kernel's operand when that is unused.
    unused: usize,
    /// Token ids picked by `argmax_rows` and `top_k_rows`, and the words that slot holds.
    picks: usize,
    picks_words: usize,
    /// `top_k_rows`'s words read back, reused across calls.
    top_k_words: Vec<u32>,
    /// Partial sums of split attention, and the words it holds.
    attn_part: usize,
    attn_part_words: usize,
    /// Whether attention of few rows splits keys across workgroups (tests turn it off;
    /// so does `KILN_GPU_ATTN_SPLIT=0`).
    attn_split: bool,
    staging: wgpu::Buffer,
    encoder: Option<wgpu::CommandEncoder>,
    pass: Option<wgpu::ComputePass<'static>>,
    /// The last rope call's angle table, and where it sits in this submission's arena.
    rope_cache: Option<RopeTable>,
    /// GPU time per kernel (`KILN_GPU_PROFILE=1`, where the adapter has timestamps).
    profiler: Option<Profiler>,
    host_times: Option<HostTimes>,
    /// Dispatches after which an op submits what is pending: the first submission after
    /// a read `submit_first`, each next one twice the last, up to `submit_every`.
    submit_first: usize,
    submit_every: usize,
    /// The current limit.
    submit_limit: usize,
}

/// Timestamps after every dispatch of a submission, summed per kernel and printed when
/// the backend is dropped: time between consecutive timestamps is charged to the
/// dispatch that ends it, launch and barrier gaps included.
struct Profiler {
    queries: wgpu::QuerySet,
    resolved: wgpu::Buffer,
    readback: wgpu::Buffer,
    /// Kernels of this submission's timed dispatches, in order.
    kernels: Vec<Kernel>,
    /// Nanoseconds and dispatches per kernel.
    totals: HashMap<Kernel, (f64, usize)>,
    period_ns: f64,
}

impl Profiler {
    const QUERIES: u32 = 4096;

    fn new(device: &wgpu::Device, period_ns: f32) -> Profiler {
        let bytes = u64::from(Self::QUERIES) * 8;
        let buffer = |usage, label| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: bytes,
                usage,
                mapped_at_creation: false,
            })
        };
        Profiler {
            queries: device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("kiln profile"),
                ty: wgpu::QueryType::Timestamp,
                count: Self::QUERIES,
            }),
            resolved: buffer(
                wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                "kiln profile resolve",
            ),
            readback: buffer(
                wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                "kiln profile readback",
            ),
            kernels: Vec::new(),
            totals: HashMap::new(),
            period_ns: f64::from(period_ns),
        }
    }

    /// Records the timestamp that ends a dispatch of `kernel` (the first of a pass also
    /// gets one before it).
    fn after_dispatch(&mut self, pass: &mut wgpu::ComputePass<'static>, kernel: Kernel) {
        let n = self.kernels.len() as u32;
        if n + 1 >= Self::QUERIES {
            return;
        }
        if n == 0 {
            pass.write_timestamp(&self.queries, 0);
        }
        // (The first dispatch's start stamp comes after it is recorded; it only
        // loses that dispatch's time.)
        pass.write_timestamp(&self.queries, n + 1);
        self.kernels.push(kernel);
    }

    fn resolve(&self, encoder: &mut wgpu::CommandEncoder) {
        let n = self.kernels.len() as u32 + 1;
        if n > 1 {
            encoder.resolve_query_set(&self.queries, 0..n, &self.resolved, 0);
            encoder.copy_buffer_to_buffer(&self.resolved, 0, &self.readback, 0, u64::from(n) * 8);
        }
    }

    /// Waits for the submission and adds its times.
    fn collect(&mut self, device: &wgpu::Device) {
        let n = self.kernels.len();
        if n == 0 {
            return;
        }
        let slice = self.readback.slice(..(n as u64 + 1) * 8);
        slice.map_async(wgpu::MapMode::Read, |r| r.expect("mapping the profile buffer"));
        let _ = device.poll(wgpu::PollType::wait_indefinitely());
        {
            let view = slice.get_mapped_range().expect("mapped");
            let stamps: Vec<u64> = view
                .chunks_exact(8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect();
            for (i, kernel) in self.kernels.iter().enumerate() {
                let ns = stamps[i + 1].saturating_sub(stamps[i]) as f64 * self.period_ns;
                let entry = self.totals.entry(*kernel).or_default();
                entry.0 += ns;
                entry.1 += 1;
            }
        }
        self.readback.unmap();
        self.kernels.clear();
    }
}

impl Drop for Profiler {
    fn drop(&mut self) {
        let total: f64 = self.totals.values().map(|t| t.0).sum();
        let mut rows: Vec<_> = self.totals.iter().collect();
        rows.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
        eprintln!("kiln gpu profile: {:.1} ms in all", total / 1e6);
        for (kernel, (ns, count)) in rows {
            eprintln!(
                "  {:<28} {:>9.2} ms {:>5.1}% {:>8} × {:>8.2} µs",
                format!("{kernel:?}"),
                ns / 1e6,
                100.0 * ns / total,
                count,
                ns / 1e3 / *count as f64
            );
        }
    }
}

/// Host time of each phase of a submission, printed when the backend is dropped
/// (`KILN_GPU_PROFILE=host`): recording ops, finishing and submitting the command
/// buffer, waiting for results and copying them out. Medians, not means: loading a
/// model (weight uploads, pipeline compilation) makes a few submissions take
/// milliseconds, which would swamp a mean over decode steps.
struct HostTimes {
    mark: std::time::Instant,
    record: Vec<std::time::Duration>,
    submit: Vec<std::time::Duration>,
    wait: Vec<std::time::Duration>,
    copy_out: Vec<std::time::Duration>,
    /// Each submission's host time in `dispatch` per dispatch recorded.
    per_dispatch: Vec<std::time::Duration>,
    /// The current submission's time in `dispatch` so far.
    in_dispatch: std::time::Duration,
    dispatches: usize,
}

impl HostTimes {
    fn new() -> HostTimes {
        HostTimes {
            mark: std::time::Instant::now(),
            record: Vec::new(),
            submit: Vec::new(),
            wait: Vec::new(),
            copy_out: Vec::new(),
            per_dispatch: Vec::new(),
            in_dispatch: Default::default(),
            dispatches: 0,
        }
    }

    /// Adds the time since the last mark to `phase`'s samples and moves the mark.
    fn lap(&mut self, phase: fn(&mut HostTimes) -> &mut Vec<std::time::Duration>) {
        let now = std::time::Instant::now();
        let elapsed = now - self.mark;
        phase(self).push(elapsed);
        self.mark = now;
    }
}

impl Drop for HostTimes {
    fn drop(&mut self) {
        let median = |v: &mut Vec<std::time::Duration>| {
            v.sort_unstable();
            v.get(v.len() / 2).map_or(0.0, |d| d.as_secs_f64() * 1e6)
        };
        let submissions = self.submit.len().max(1);
        eprintln!(
            "kiln gpu host: {} submissions of {:.1} dispatches, {} reads; medians: {:.2} µs a dispatch in \
             `dispatch`, record {:.1} µs and submit {:.1} µs a submission, wait {:.1} µs and copy out {:.1} µs a read",
            self.submit.len(),
            self.dispatches as f64 / submissions as f64,
            self.wait.len(),
            median(&mut self.per_dispatch),
            median(&mut self.record),
            median(&mut self.submit),
            median(&mut self.wait),
            median(&mut self.copy_out),
        );
    }
}

/// Rows a norm left quantized in the activations buffer: its rows' slot, their format
/// and width, how many, and words a row.
#[derive(Clone, Copy)]
struct ReadyActs {
    input: usize,
    format: ActFormat,
    cols: usize,
    n: usize,
    row_words: usize,
}

/// What the quantize kernel reads: a buffer, or (gated) act(that buffer) · the slot
/// given, with the activation's code plus one.
#[derive(Clone, Copy)]
struct Input {
    x: usize,
    gated: Option<(usize, u32)>,
}

/// An activation's code in `activation.wgsl`.
fn activation_code(act: Activation) -> u32 {
    match act {
        Activation::Silu => 0,
        Activation::GeluTanh => 1,
    }
}

/// A rope call's (sin, cos) table as arena words, and where this submission's arena
/// holds it (`None` after a submission): every layer of a forward pass shares it, and it
/// is computed once even when the pass spans several submissions.
struct RopeTable {
    positions: Vec<u32>,
    head_dim: usize,
    theta: f32,
    words: Vec<u32>,
    at: Option<u32>,
}

/// Workgroups of `groups` folded into a grid of at most 65535 per dimension.
fn grid(groups: usize) -> (u32, u32) {
    let x = groups.min(65535);
    (x as u32, groups.div_ceil(x.max(1)) as u32)
}

/// A number from the environment variable `name`, if it holds one.
fn env_number(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn gpu_err(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Gpu(e.to_string())
}

/// Every adapter wgpu finds on this machine.
pub fn adapters() -> Vec<wgpu::Adapter> {
    // Mesa's implicit device-selection layer connects to a display server to order
    // devices, and prints an error where there is none (servers, CI); wgpu lists and
    // kiln ranks the adapters itself.
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| {
        if std::env::var_os("NODEVICE_SELECT").is_none() {
            std::env::set_var("NODEVICE_SELECT", "1");
        }
    });
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
}

impl GpuBackend {
    /// A backend on `adapter`, taking its full limits and, where the adapter has them,
    /// subgroup operations (for the matvec kernels; `KILN_GPU_SUBGROUPS=0` declines them,
    /// `KILN_GPU_MATVEC=0` sends every product to the matmul kernels).
    pub fn new(adapter: &wgpu::Adapter) -> Result<Self> {
        let limits = adapter.limits();
        let info = adapter.get_info();
        // Kernels bind up to MAX_BINDINGS storage buffers and run 256 invocations a
        // workgroup; an adapter below that fails here, not at its first such dispatch.
        if (limits.max_storage_buffers_per_shader_stage as usize) < MAX_BINDINGS
            || limits.max_compute_invocations_per_workgroup < 256
        {
            return Err(RuntimeError::Gpu(format!(
                "{} allows {} storage buffers per shader stage and {} invocations per \
                 workgroup; kiln's kernels need {MAX_BINDINGS} and 256",
                info.name, limits.max_storage_buffers_per_shader_stage, limits.max_compute_invocations_per_workgroup
            )));
        }
        let env_off = |name: &str| std::env::var(name).is_ok_and(|v| v == "0");
        let subgroup_rows = (adapter.features().contains(wgpu::Features::SUBGROUP)
            && (1..=MATVEC_WG as u32).contains(&info.subgroup_min_size)
            && !env_off("KILN_GPU_SUBGROUPS"))
        .then(|| MATVEC_WG / info.subgroup_min_size as usize);
        let mut features = if subgroup_rows.is_some() {
            wgpu::Features::SUBGROUP
        } else {
            wgpu::Features::empty()
        };
        let timestamps = wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES;
        let profile =
            std::env::var("KILN_GPU_PROFILE").is_ok_and(|v| v == "1") && adapter.features().contains(timestamps);
        if profile {
            features |= timestamps;
        }
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("kiln"),
            required_features: features,
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(gpu_err)?;
        let max_binding = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size) & !255;
        let params = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("kiln params"),
            size: PARAM_SLOT * PARAM_SLOTS as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let staging = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("kiln staging"),
            size: 4,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut be = GpuBackend {
            device,
            queue,
            info,
            subgroup_rows,
            matvec: !env_off("KILN_GPU_MATVEC"),
            vec4: !env_off("KILN_GPU_VEC4"),
            tiled: !env_off("KILN_GPU_TILED"),
            max_binding,
            staged_bytes: 0,
            part_bytes: max_binding,
            layouts: HashMap::new(),
            pipelines: HashMap::new(),
            bind_groups: HashMap::new(),
            slots: Vec::new(),
            buffers: Vec::new(),
            weights: Vec::new(),
            params,
            params_cpu: vec![0; PARAM_SLOT as usize * PARAM_SLOTS],
            params_used: 0,
            arena: 0,
            arena_cpu: Vec::with_capacity(ARENA_WORDS),
            arena_cap: ARENA_WORDS,
            acts: 0,
            acts_words: 1,
            acts_ready: None,
            last_norm: None,
            norm_formats: HashMap::new(),
            last_attention: None,
            attention_formats: HashMap::new(),
            stack_biases: HashMap::new(),
            dispatches: 0,
            gelu: 0,
            unused: 0,
            picks: 0,
            picks_words: 1,
            top_k_words: Vec::new(),
            attn_part: 0,
            attn_part_words: 1,
            attn_split: !env_off("KILN_GPU_ATTN_SPLIT"),
            submit_first: env_number("KILN_GPU_SUBMIT_FIRST").unwrap_or(SUBMIT_FIRST),
            submit_every: env_number("KILN_GPU_SUBMIT_EVERY").unwrap_or(SUBMIT_EVERY),
            submit_limit: 0,
            staging,
            encoder: None,
            pass: None,
            rope_cache: None,
            profiler: None,
            host_times: std::env::var("KILN_GPU_PROFILE")
                .is_ok_and(|v| v == "host")
                .then(HostTimes::new),
        };
        if profile {
            be.profiler = Some(Profiler::new(&be.device, be.queue.get_timestamp_period()));
        }
        be.submit_limit = be.submit_first.min(be.submit_every);
        be.arena = be.new_slot(ARENA_WORDS * 4, "kiln arena");
        be.acts = be.new_slot(4, "kiln activations");
        be.attn_part = be.new_slot(4, "kiln attention partials");
        be.unused = be.new_slot(4, "kiln unused operand");
        be.picks = be.new_slot(4, "kiln picked tokens");
        // ggml's GELU table, indexed by the input's f16 bits: an input just under 10
        // rounds to 10.0 in f16 and reads the table there.
        let table: Vec<u32> = (0..=u16::MAX)
            .map(|bits| {
                let x = half::f16::from_bits(bits).to_f32();
                let y = if x.is_finite() { ops::gelu_tanh_ggml(x) } else { 0.0 };
                y.to_bits()
            })
            .collect();
        be.gelu = be.new_slot(table.len() * 4, "kiln gelu table");
        be.queue.write_buffer(be.slot(be.gelu), 0, &words_bytes(&table));
        Ok(be)
    }

    /// Lowers the largest part a weight is split into (normally the adapter's binding
    /// limit), so that tests can make weights split into several parts.
    pub fn set_weight_part_bytes(&mut self, bytes: u64) {
        self.part_bytes = bytes.min(self.max_binding);
    }

    /// Whether attention of few query rows splits each row's keys across workgroups
    /// (on by default; tests turn it off to exercise the one-workgroup-per-row kernel).
    pub fn set_attention_split(&mut self, on: bool) {
        self.attn_split = on;
    }

    /// Dispatches recorded since the backend started (kernels run; tests and profiles
    /// count them).
    pub fn dispatches(&self) -> u64 {
        self.dispatches
    }

    /// The adapter's name and API, e.g. "NVIDIA H200 (Vulkan)".
    pub fn adapter_name(&self) -> String {
        format!("{} ({:?})", self.info.name, self.info.backend)
    }

    fn new_slot(&mut self, bytes: usize, label: &str) -> usize {
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: (bytes.max(4) as u64).next_multiple_of(16),
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.slots.push(Some(buffer));
        self.slots.len() - 1
    }

    fn slot(&self, slot: usize) -> &wgpu::Buffer {
        self.slots[slot].as_ref().expect("a freed buffer was used")
    }

    fn drop_slot(&mut self, slot: usize) {
        self.slots[slot] = None;
        self.bind_groups.retain(|(_, slots), _| !slots.contains(&slot));
    }

    fn buf(&self, id: BufId) -> usize {
        self.buffers[id.0 as usize]
    }

    fn pipeline(&mut self, kernel: Kernel) {
        if self.pipelines.contains_key(&kernel) {
            return;
        }
        let (source, writes) = kernel.spec();
        // (naga takes subgroup operations with the device feature, without `enable`.)
        let mut text = String::from(wgsl::COMMON);
        if matches!(
            kernel,
            Kernel::Matmul(_) | Kernel::MatmulTiled(_) | Kernel::Matvec(..) | Kernel::Embed(_)
        ) {
            text.push_str(wgsl::WEIGHTS);
        }
        if matches!(kernel, Kernel::Matmul(_) | Kernel::MatmulTiled(_) | Kernel::Matvec(..)) {
            text.push_str(wgsl::CHUNKS);
        }
        if matches!(kernel, Kernel::Matvec(..)) {
            text.push_str(wgsl::MATVEC);
        }
        if matches!(kernel, Kernel::Gated | Kernel::Quantize(_)) {
            text.push_str(wgsl::ACTIVATION);
        }
        if matches!(
            kernel,
            Kernel::Attention | Kernel::AttentionSplit | Kernel::AttentionF16(_) | Kernel::AttentionBlock
        ) {
            text.push_str(wgsl::ATTENTION_COMMON);
        }
        text.push_str(source);
        match kernel {
            Kernel::RmsNorm => text.push_str(wgsl::RMS_NORM_MAIN),
            Kernel::NormQuantize(_) => text.push_str(wgsl::NORM_QUANTIZE),
            _ => {}
        }
        let module = self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("kiln kernel"),
            source: wgpu::ShaderSource::Wgsl(text.into()),
        });
        let mut entries = vec![wgpu::BindGroupLayoutEntry {
            binding: 0,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Uniform,
                has_dynamic_offset: true,
                min_binding_size: None,
            },
            count: None,
        }];
        for (i, &write) in writes.iter().enumerate() {
            entries.push(wgpu::BindGroupLayoutEntry {
                binding: i as u32 + 1,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Storage { read_only: !write },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            });
        }
        let layout = self.device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: None,
            entries: &entries,
        });
        let pipeline_layout = self.device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: None,
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let constants: Vec<(&str, f64)> = match kernel {
            Kernel::Matmul(t) | Kernel::MatmulTiled(t) | Kernel::Embed(t) => vec![("WTYPE", t as f64)],
            Kernel::Matvec(t, nt, _) => vec![("WTYPE", t as f64), ("NT", nt as f64)],
            Kernel::MatvecVec4(t, nt) => vec![("WTYPE", t as f64), ("NT", nt as f64)],
            Kernel::Quantize(f) | Kernel::NormQuantize(f) | Kernel::AttentionF16(f) => vec![("AFMT", f as f64)],
            _ => Vec::new(),
        };
        let pipeline = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: None,
            layout: Some(&pipeline_layout),
            module: &module,
            entry_point: Some("main"),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &constants,
                ..Default::default()
            },
            cache: None,
        });
        self.layouts.insert(kernel, layout);
        self.pipelines.insert(kernel, pipeline);
    }

    /// Makes room for an op that puts `words` into the arena and runs `dispatches`
    /// dispatches: submits what is pending when either would overflow.
    fn begin_op(&mut self, words: usize, dispatches: usize) {
        if self.arena_cpu.len() + words > self.arena_cap
            || self.params_used + dispatches > PARAM_SLOTS
            || self.params_used >= self.submit_limit
        {
            self.flush();
        }
        if words > self.arena_cap {
            let cap = words.next_power_of_two();
            let old = self.arena;
            self.arena = self.new_slot(cap * 4, "kiln arena");
            self.arena_cap = cap;
            self.drop_slot(old);
        }
        assert!(dispatches <= PARAM_SLOTS, "one op needs too many dispatches");
    }

    /// Appends host words to the arena; returns their offset in words.
    fn push(&mut self, data: impl IntoIterator<Item = u32>) -> u32 {
        let at = self.arena_cpu.len();
        self.arena_cpu.extend(data);
        assert!(self.arena_cpu.len() <= self.arena_cap, "begin_op reserves arena space");
        at as u32
    }

    /// Records one dispatch of `groups` workgroups binding `slots` from binding 1 on.
    fn dispatch(&mut self, kernel: Kernel, slots: &[usize], u: &[u32], f: &[f32], groups: usize) {
        if groups == 0 {
            return;
        }
        // Any dispatch may write a norm's rows or the activations buffer.
        self.acts_ready = None;
        self.last_norm = None;
        self.last_attention = None;
        self.dispatches += 1;
        // (Timed only for `KILN_GPU_PROFILE=host`: a clock read per dispatch is not free.)
        let started = self.host_times.is_some().then(std::time::Instant::now);
        self.pipeline(kernel);
        let mut p = [0u32; 16];
        p[..u.len()].copy_from_slice(u);
        for (i, v) in f.iter().enumerate() {
            p[12 + i] = v.to_bits();
        }
        assert!(self.params_used < PARAM_SLOTS, "begin_op reserves parameter slots");
        let offset = self.params_used * PARAM_SLOT as usize;
        for (dst, w) in self.params_cpu[offset..offset + 64].chunks_exact_mut(4).zip(p) {
            dst.copy_from_slice(&w.to_le_bytes());
        }
        self.params_used += 1;
        let mut bound = [usize::MAX; MAX_BINDINGS];
        bound[..slots.len()].copy_from_slice(slots);
        let key = (kernel, bound);
        if !self.bind_groups.contains_key(&key) {
            let mut entries = vec![wgpu::BindGroupEntry {
                binding: 0,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: &self.params,
                    offset: 0,
                    size: Some(std::num::NonZeroU64::new(64).expect("nonzero")),
                }),
            }];
            for (i, &s) in slots.iter().enumerate() {
                let buffer = self.slot(s);
                let size = buffer.size().min(self.max_binding);
                entries.push(wgpu::BindGroupEntry {
                    binding: i as u32 + 1,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer,
                        offset: 0,
                        size: std::num::NonZeroU64::new(size),
                    }),
                });
            }
            let group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &self.layouts[&kernel],
                entries: &entries,
            });
            self.bind_groups.insert(key, group);
        }
        if self.pass.is_none() {
            let mut encoder = self
                .encoder
                .take()
                .unwrap_or_else(|| self.device.create_command_encoder(&Default::default()));
            let pass = encoder.begin_compute_pass(&Default::default()).forget_lifetime();
            self.encoder = Some(encoder);
            self.pass = Some(pass);
        }
        let pass = self.pass.as_mut().expect("set above");
        pass.set_pipeline(&self.pipelines[&kernel]);
        pass.set_bind_group(0, &self.bind_groups[&key], &[offset as u32]);
        let (x, y) = grid(groups);
        pass.dispatch_workgroups(x, y, 1);
        if let Some(profiler) = self.profiler.as_mut() {
            profiler.after_dispatch(pass, kernel);
        }
        if let (Some(times), Some(started)) = (self.host_times.as_mut(), started) {
            times.in_dispatch += started.elapsed();
        }
    }

    /// Uploads this submission's parameters and arena, and submits everything recorded.
    fn flush(&mut self) {
        self.pass = None;
        if let Some(times) = self.host_times.as_mut() {
            times.lap(|t| &mut t.record);
            times.dispatches += self.params_used;
            if self.params_used > 0 {
                times.per_dispatch.push(times.in_dispatch / self.params_used as u32);
            }
            times.in_dispatch = Default::default();
        }
        if let Some(mut encoder) = self.encoder.take() {
            if let Some(profiler) = &self.profiler {
                profiler.resolve(&mut encoder);
            }
            if self.params_used > 0 {
                let bytes = self.params_used * PARAM_SLOT as usize;
                self.queue.write_buffer(&self.params, 0, &self.params_cpu[..bytes]);
            }
            if !self.arena_cpu.is_empty() {
                self.queue
                    .write_buffer(self.slot(self.arena), 0, &words_bytes(&self.arena_cpu));
            }
            self.queue.submit([encoder.finish()]);
            if let Some(profiler) = self.profiler.as_mut() {
                profiler.collect(&self.device);
            }
        }
        self.params_used = 0;
        self.arena_cpu.clear();
        if let Some(table) = self.rope_cache.as_mut() {
            table.at = None;
        }
        self.submit_limit = (2 * self.submit_limit).min(self.submit_every);
        if let Some(times) = self.host_times.as_mut() {
            times.lap(|t| &mut t.submit);
        }
    }

    /// Makes the activations buffer hold at least `words` words.
    fn reserve_acts(&mut self, words: usize) {
        if words > self.acts_words {
            let old = self.acts;
            self.acts_words = words.next_power_of_two();
            self.acts = self.new_slot(self.acts_words * 4, "kiln activations");
            self.drop_slot(old);
        }
    }

    /// Activations of `n` rows of `input` in `format`, in the activations buffer.
    fn quantize(&mut self, input: Input, n: usize, cols: usize, format: ActFormat) -> usize {
        let (code, row_words) = afmt(format, cols);
        self.reserve_acts(n * row_words);
        // One invocation per element: floats 256 a workgroup, blocks 256 / block size.
        let blocks = n * cols / format.block_size();
        let groups = if code <= 2 {
            blocks.div_ceil(256)
        } else {
            blocks.div_ceil(256 / format.block_size())
        };
        let (up, act) = input.gated.unwrap_or((input.x, 0));
        let slots = [input.x, self.acts, up, self.gelu];
        self.dispatch(
            Kernel::Quantize(code),
            &slots,
            &[n as u32, cols as u32, row_words as u32, blocks as u32, act],
            &[],
            groups,
        );
        row_words
    }

    /// RMS norm of `n` rows in slot `y` (first adding them into slot `x` when `add`).
    /// Where the products that read this norm's rows last time took a block format, the
    /// same dispatch also leaves the rows in that format in the activations buffer, for
    /// the products that follow at once (see `products`).
    fn norm(&mut self, x: usize, y: usize, weight: WeightId, n: usize, eps: f32, add: bool) {
        let w = &self.weights[weight.0 as usize];
        let (cols, v) = (w.cols, w.vector.expect("a norm weight is a vector"));
        self.begin_op(0, 1);
        let u = [n as u32, cols as u32, u32::from(add)];
        let learned = self.norm_formats.get(&weight.0).copied();
        // The workgroup (256 invocations) quantizes Q8_K blocks a subgroup each and
        // smaller ones eight invocations each (shuffling within subgroups, so those need
        // subgroups of at least 8); rows that need a second round of Q8_K blocks (rows
        // over 2048 with subgroups of 32) quantize apart: on the H200 the second round
        // cost more than the dispatch it saves (llama-8b tg128 161 -> 158; again once
        // division no longer ran bit by bit, 188.8 -> 186.9: 24.2 µs fused against 15.8 +
        // 10.6 apart).
        let one_round = |format: ActFormat| {
            let lanes = match format {
                ActFormat::Q8_K => self.subgroup_rows.map_or(0, |rows| 256 * rows / MATVEC_WG),
                _ if self.subgroup_rows.is_some_and(|rows| MATVEC_WG / rows >= 8) => 256,
                _ => 0,
            };
            cols.is_multiple_of(format.block_size()) && cols / format.block_size() <= lanes
        };
        match learned.filter(|_| self.subgroup_rows.is_some()) {
            Some(format) if one_round(format) => {
                let (code, row_words) = afmt(format, cols);
                self.reserve_acts(n * row_words);
                let u = [u[0], u[1], u[2], row_words as u32];
                self.dispatch(Kernel::NormQuantize(code), &[x, y, v, self.acts], &u, &[eps], n);
                self.acts_ready = Some(ReadyActs {
                    input: y,
                    format,
                    cols,
                    n,
                    row_words,
                });
            }
            _ => self.dispatch(Kernel::RmsNorm, &[x, y, v], &u, &[eps], n),
        }
        self.last_norm = Some((y, weight.0, n));
    }

    /// Rotary embedding of `heads.0` heads a row in the first slot and `heads.1` in the
    /// second; with `store = Some(([values, key cache, value cache], rows))` the rotated
    /// keys and the values are also written to those cache rows.
    #[allow(clippy::too_many_arguments)]
    fn rotate(
        &mut self,
        slots: [usize; 2],
        positions: &[u32],
        heads: (usize, usize),
        head_dim: usize,
        theta: f32,
        style: RopeStyle,
        store: Option<([usize; 3], &[u32])>,
    ) {
        let half = head_dim / 2;
        let row_words = store.map_or(0, |(_, rows)| rows.len());
        self.begin_op(positions.len() * half * 2 + row_words, 1);
        let same = |t: &RopeTable| t.positions == positions && t.head_dim == head_dim && t.theta == theta;
        if !self.rope_cache.as_ref().is_some_and(same) {
            // The same angles as the CPU backend, computed on the host.
            let mut angles = Vec::with_capacity(positions.len() * half);
            ops::rope_angles(positions, head_dim, theta, &mut angles);
            self.rope_cache = Some(RopeTable {
                positions: positions.to_vec(),
                head_dim,
                theta,
                words: angles.iter().flat_map(|(s, c)| [s.to_bits(), c.to_bits()]).collect(),
                at: None,
            });
        }
        let mut table = self.rope_cache.take().expect("set above");
        let at = *table.at.get_or_insert_with(|| self.push(table.words.iter().copied()));
        self.rope_cache = Some(table);
        let neox = u32::from(style == RopeStyle::Neox);
        let pairs = positions.len() * (heads.0 + heads.1) * half;
        let (extra, values, rows_at, stores) = match store {
            Some(([v, k_cache, v_cache], rows)) => {
                let at = self.push(rows.iter().copied());
                ([v, k_cache, v_cache], rows.len() * heads.1 * head_dim, at, 1)
            }
            // Unused: any read-only buffer for the values, the rotated ones for the caches.
            None => ([self.gelu, slots[0], slots[1]], 0, 0, 0),
        };
        let u = [
            positions.len() as u32,
            heads.0 as u32,
            head_dim as u32,
            half as u32,
            at,
            neox,
            heads.1 as u32,
            rows_at,
            stores,
        ];
        let bound = [slots[0], slots[1], self.arena, extra[0], extra[1], extra[2]];
        self.dispatch(Kernel::Rope, &bound, &u, &[], (pairs + values).div_ceil(256));
    }

    /// Cache rows of `pairs` sources (keys, then values): slots are the two sources and
    /// the two caches.
    fn store(&mut self, slots: [usize; 4], pairs: usize, row_len: usize, rows: &[u32]) {
        self.begin_op(rows.len(), 1);
        let at = self.push(rows.iter().copied());
        let u = [rows.len() as u32, row_len as u32, at, pairs as u32];
        let [k, v, k_cache, v_cache] = slots;
        self.dispatch(
            Kernel::StoreKv,
            &[k, v, k_cache, v_cache, self.arena],
            &u,
            &[],
            (pairs * rows.len() * row_len).div_ceil(256),
        );
    }

    /// The products of `input` (`n` rows) and each weight, into each output, plus
    /// `biases[i]` on product i's rows where `biases` is not empty: the 16-byte matvec
    /// adds them as it writes, other kernels' outputs take an add after.
    fn products(&mut self, input: Input, n: usize, products: &[(WeightId, BufId)], biases: &[WeightId]) {
        let mut unbiased = [(BufId(0), WeightId(0)); 4];
        let mut n_unbiased = 0;
        let dispatches: usize = products
            .iter()
            .map(|(w, _)| 1 + self.weights[w.0 as usize].parts.len())
            .sum();
        self.begin_op(0, dispatches);
        let plain = input.gated.is_none();
        let ready = self
            .acts_ready
            .take()
            .filter(|r| plain && r.input == input.x && r.n == n);
        let mut prepared: Option<(ActFormat, usize, usize)> = ready.map(|r| (r.format, r.cols, r.row_words));
        // Where a norm or an attention wrote this input just now, its next run can leave
        // its rows in the first product's format.
        let Some(&(first, _)) = products.first() else {
            return;
        };
        let first_format = qdot::activation_format(self.weights[first.0 as usize].ty);
        if let Some(slot) = self.last_attention.take() {
            if plain && slot == input.x {
                self.attention_formats.entry(slot).or_insert(first_format);
            }
        }
        if let Some((slot, norm, norm_n)) = self.last_norm.take() {
            let block = matches!(first_format, ActFormat::Q8_0 | ActFormat::Q8_1 | ActFormat::Q8_K);
            if plain && slot == input.x && norm_n == n && block {
                self.norm_formats.entry(norm).or_insert(first_format);
            }
        }
        let mut next = 0;
        while next < products.len() {
            let (weight, out) = products[next];
            let w = &self.weights[weight.0 as usize];
            let (rows, cols, row_words, ty) = (w.rows, w.cols, w.row_words, w.ty);
            let n_parts = w.parts.len();
            let format = qdot::activation_format(ty);
            // Products of one input in one format share its quantization.
            let act_words = match prepared {
                Some((f, c, words)) if f == format && c == cols => words,
                _ => {
                    let words = self.quantize(input, n, cols, format);
                    prepared = Some((format, cols, words));
                    words
                }
            };
            let stack = self.matvec_stack(&products[next..], n);
            if stack > 1 {
                let bias = (!biases.is_empty()).then(|| self.stack_bias(&biases[next..next + stack]));
                self.stacked_matvec(&products[next..next + stack], act_words, bias);
                next += stack;
                continue;
            }
            let bias = biases.get(next).copied();
            next += 1;
            if let Some(b) = bias.filter(|_| !(self.matvec && n <= MATVEC_ROWS && self.takes_vec4(ty, cols))) {
                unbiased[n_unbiased] = (out, b);
                n_unbiased += 1;
            }
            let code = wtype(ty).expect("stored types have codes");
            let out = self.buf(out);
            for part in 0..n_parts {
                let (slot, first, part_rows) = self.weights[weight.0 as usize].parts[part];
                // Every product kernel's parameters (matmul.wgsl); the last is the
                // kernel's own grouping of rows.
                let params = |grouping: usize| {
                    [part_rows, cols, n, rows, first, row_words, act_words, grouping].map(|v| v as u32)
                };
                if self.matvec && n <= MATVEC_ROWS {
                    let sg = self.subgroup_rows;
                    let per_group = sg.unwrap_or(MATVEC_WG / 32);
                    let u = params(per_group);
                    let groups = part_rows.div_ceil(per_group);
                    if self.takes_vec4(ty, cols) {
                        // A stack of one: every row is the first weight's.
                        let mut u11 = [part_rows as u32; 11];
                        u11[..8].copy_from_slice(&u);
                        let vector = bias.map(|b| self.weights[b.0 as usize].vector.expect("a bias is a vector"));
                        u11[10] = u32::from(vector.is_some()) << 24;
                        let slots = [
                            slot,
                            self.acts,
                            out,
                            slot,
                            slot,
                            out,
                            out,
                            vector.unwrap_or(self.unused),
                        ];
                        self.dispatch(Kernel::MatvecVec4(code, n as u32), &slots, &u11, &[], groups);
                    } else {
                        let kernel = Kernel::Matvec(code, n as u32, sg.is_some());
                        self.dispatch(kernel, &[slot, self.acts, out], &u, &[], groups);
                    }
                    continue;
                }
                if self.tiled && code >= 3 && n >= TILED_ROWS {
                    let row_tiles = part_rows.div_ceil(64);
                    let u = params(row_tiles);
                    self.dispatch(
                        Kernel::MatmulTiled(code),
                        &[slot, self.acts, out],
                        &u,
                        &[],
                        row_tiles * n.div_ceil(64),
                    );
                    continue;
                }
                let row_groups = part_rows.div_ceil(4);
                let u = params(row_groups);
                self.dispatch(
                    Kernel::Matmul(code),
                    &[slot, self.acts, out],
                    &u,
                    &[],
                    row_groups * n.div_ceil(8),
                );
            }
        }
        if n_unbiased > 0 {
            self.add_biases(&unbiased[..n_unbiased], n);
        }
    }

    /// Whether few-row products of `ty`, `cols` wide, take the 16-byte-load kernel: Q8_0
    /// (in groups of 4), Q4_K, (padded) Q6_K rows and Q5_0 rows of an even number of
    /// blocks are whole 16-byte blocks, and so are Q8_0 and Q8_K activation rows.
    fn takes_vec4(&self, ty: GgmlType, cols: usize) -> bool {
        let whole = match ty {
            GgmlType::Q8_0 | GgmlType::Q4_K | GgmlType::Q6_K => true,
            GgmlType::Q5_0 => cols.is_multiple_of(64),
            _ => false,
        };
        self.vec4 && self.subgroup_rows.is_some() && whole
    }

    /// How many of the first `products` (up to 3) one stacked matvec dispatch takes: one
    /// input row, weights of one width that the 16-byte kernel reads with one activation
    /// format (of one type, or mixed: a layer's Q4_K q and k with its Q6_K v), each in one
    /// part. 0 or 1: no stack.
    fn matvec_stack(&self, products: &[(WeightId, BufId)], n: usize) -> usize {
        if !self.matvec || n != 1 {
            return 0;
        }
        let first = &self.weights[products[0].0 .0 as usize];
        if !self.takes_vec4(first.ty, first.cols) || first.parts.len() != 1 {
            return 0;
        }
        products
            .iter()
            .take(3)
            .take_while(|(w, _)| {
                let w = &self.weights[w.0 as usize];
                let format = qdot::activation_format(w.ty);
                self.takes_vec4(w.ty, w.cols)
                    && (format, w.cols, w.parts.len()) == (qdot::activation_format(first.ty), first.cols, 1)
                    && w.row_words < 1 << 16
            })
            .count()
    }

    /// One matvec dispatch of a stack of 2 or 3 products (see `matvec_stack`) of one
    /// input row, quantized in the activations buffer (`act_words` a row), with the
    /// stack's biases (one slot, in stack order) added where given.
    fn stacked_matvec(&mut self, stack: &[(WeightId, BufId)], act_words: usize, bias: Option<usize>) {
        let per_group = self.subgroup_rows.expect("stacks need subgroups");
        let w = &self.weights[stack[0].0 .0 as usize];
        let (cols, row_words, code) = (w.cols, w.row_words, wtype(w.ty).expect("stored types have codes"));
        let mut rows = [0usize; 3];
        // Each weight's type (a byte each) and, past the first, words a row (16 bits
        // each), for a mixed stack (pipeline type 0).
        let (mut types, mut words, mut mixed) = (0, 0, false);
        for (i, (w, _)) in stack.iter().enumerate() {
            let w = &self.weights[w.0 as usize];
            rows[i] = w.rows;
            let c = wtype(w.ty).expect("stored types have codes");
            mixed |= c != code;
            types |= c << (8 * i);
            if i > 0 {
                words |= w.row_words << (16 * (i - 1));
            }
        }
        let code = if mixed { 0 } else { code };
        let total: usize = rows.iter().sum();
        // Boundaries: the second weight's first row, then the third's (the total when
        // there is none).
        let b1 = rows[0];
        let b2 = rows[0] + rows[1];
        let types = types | u32::from(bias.is_some()) << 24;
        let u = [
            total,
            cols,
            1,
            rows[0],
            0,
            row_words,
            act_words,
            per_group,
            b1,
            b2,
            types as usize,
            words,
        ]
        .map(|v| v as u32);
        let slot = |i: usize| self.weights[stack[i.min(stack.len() - 1)].0 .0 as usize].parts[0].0;
        let out = |i: usize| self.buf(stack[i.min(stack.len() - 1)].1);
        let slots = [
            slot(0),
            self.acts,
            out(0),
            slot(1),
            slot(2),
            out(1),
            out(2),
            bias.unwrap_or(self.unused),
        ];
        self.dispatch(Kernel::MatvecVec4(code, 1), &slots, &u, &[], total.div_ceil(per_group));
    }

    /// One slot holding `biases` one after another (a stacked product's), made once.
    fn stack_bias(&mut self, biases: &[WeightId]) -> usize {
        let mut key = [u32::MAX; 3];
        for (k, b) in key.iter_mut().zip(biases) {
            *k = b.0;
        }
        if let Some(&slot) = self.stack_biases.get(&key) {
            return slot;
        }
        let total: usize = biases.iter().map(|b| self.weights[b.0 as usize].cols).sum();
        let slot = self.new_slot(total * 4, "kiln stacked biases");
        let mut at = 0;
        for b in biases {
            let w = &self.weights[b.0 as usize];
            let (cols, v) = (w.cols, w.vector.expect("a bias is a vector"));
            self.elementwise(Kernel::Copy, &[v, slot], &[cols as u32, 0, at as u32], &[], cols);
            at += cols;
        }
        self.stack_biases.insert(key, slot);
        slot
    }

    /// Submits what is pending and copies `out.len()` words of slot `slot` from word
    /// `offset` into `out`, each through `word`.
    fn read_back<T>(&mut self, slot: usize, offset: usize, out: &mut [T], word: fn([u8; 4]) -> T) {
        let bytes = out.len() as u64 * 4;
        if bytes > self.staging.size() {
            self.staging = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("kiln staging"),
                size: bytes.next_power_of_two(),
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
        }
        self.pass = None;
        let mut encoder = self
            .encoder
            .take()
            .unwrap_or_else(|| self.device.create_command_encoder(&Default::default()));
        if bytes > 0 {
            encoder.copy_buffer_to_buffer(self.slot(slot), offset as u64 * 4, &self.staging, 0, bytes);
        }
        self.encoder = Some(encoder);
        self.flush();
        self.submit_limit = self.submit_first.min(self.submit_every);
        if bytes == 0 {
            return;
        }
        let slice = self.staging.slice(..bytes);
        slice.map_async(wgpu::MapMode::Read, |r| r.expect("mapping the staging buffer"));
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .expect("waiting for the GPU");
        if let Some(times) = self.host_times.as_mut() {
            times.lap(|t| &mut t.wait);
        }
        {
            let view = slice.get_mapped_range().expect("the staging buffer is mapped");
            for (o, b) in out.iter_mut().zip(view.chunks_exact(4)) {
                *o = word([b[0], b[1], b[2], b[3]]);
            }
        }
        self.staging.unmap();
        if let Some(times) = self.host_times.as_mut() {
            times.lap(|t| &mut t.copy_out);
        }
    }

    /// Makes the picked-tokens buffer hold at least `words` words.
    fn reserve_picks(&mut self, words: usize) {
        if words > self.picks_words {
            let old = self.picks;
            self.picks_words = words.next_power_of_two();
            self.picks = self.new_slot(self.picks_words * 4, "kiln picked tokens");
            self.drop_slot(old);
        }
    }

    fn elementwise(&mut self, kernel: Kernel, slots: &[usize], u: &[u32], f: &[f32], len: usize) {
        self.begin_op(0, 1);
        self.dispatch(kernel, slots, u, f, len.div_ceil(256));
    }
}

fn words_bytes(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

impl Backend for GpuBackend {
    fn name(&self) -> String {
        format!("gpu ({})", self.adapter_name())
    }

    fn upload(&mut self, weight: WeightSource) -> Result<WeightId> {
        weight.validate()?;
        let (rows, cols) = (weight.rows, weight.cols);
        let src_row = weight.ty.row_bytes(cols).expect("validated");
        let bytes = weight.bytes.as_slice();
        let ty = if wtype(weight.ty).is_some() {
            weight.ty
        } else {
            GgmlType::F32
        };
        let mut f32_row = vec![0f32; if ty == weight.ty { 0 } else { cols }];
        let mut packed = Vec::new();
        let mut row_bytes = 0;
        for r in 0..rows {
            let row = &bytes[r * src_row..(r + 1) * src_row];
            if ty == weight.ty {
                repack_row(ty, row, &mut packed);
            } else {
                dequantize_row(weight.ty, row, &mut f32_row);
                packed.extend(f32_row.iter().flat_map(|v| v.to_le_bytes()));
            }
            if r == 0 {
                row_bytes = packed.len();
            }
        }
        let rows_per_part = (self.part_bytes as usize / row_bytes.max(1)).max(1);
        let mut parts = Vec::new();
        for first in (0..rows).step_by(rows_per_part) {
            let n = rows_per_part.min(rows - first);
            let slot = self.new_slot(n * row_bytes, &weight.name);
            self.queue
                .write_buffer(self.slot(slot), 0, &packed[first * row_bytes..(first + n) * row_bytes]);
            parts.push((slot, first, n));
        }
        // wgpu stages written bytes in host memory until a submission completes: without
        // this a whole model's weights would sit there twice during the load.
        self.staged_bytes += packed.len();
        if self.staged_bytes >= UPLOAD_BATCH_BYTES {
            self.queue.submit([]);
            let _ = self.device.poll(wgpu::PollType::wait_indefinitely());
            self.staged_bytes = 0;
        }
        let vector = (rows == 1).then(|| {
            let mut v = vec![0f32; cols];
            dequantize_row(weight.ty, bytes, &mut v);
            let slot = self.new_slot(cols * 4, &weight.name);
            let words: Vec<u32> = v.iter().map(|x| x.to_bits()).collect();
            self.queue.write_buffer(self.slot(slot), 0, &words_bytes(&words));
            slot
        });
        self.weights.push(GpuWeight {
            rows,
            cols,
            ty,
            row_words: row_bytes / 4,
            parts,
            vector,
        });
        Ok(WeightId(self.weights.len() as u32 - 1))
    }

    fn weight_shape(&self, weight: WeightId) -> (usize, usize) {
        let w = &self.weights[weight.0 as usize];
        (w.rows, w.cols)
    }

    fn alloc(&mut self, len: usize) -> BufId {
        assert!(
            (len as u64) * 4 <= self.max_binding,
            "a buffer of {len} floats exceeds the GPU's binding limit"
        );
        let slot = self.new_slot(len * 4, "kiln buffer");
        self.buffers.push(slot);
        BufId(self.buffers.len() as u32 - 1)
    }

    fn free(&mut self, buf: BufId) {
        let slot = self.buf(buf);
        self.drop_slot(slot);
    }

    fn write(&mut self, buf: BufId, offset: usize, data: &[f32]) {
        self.begin_op(data.len(), 1);
        let at = self.push(data.iter().map(|v| v.to_bits()));
        let slots = [self.arena, self.buf(buf)];
        let u = [data.len() as u32, at, offset as u32];
        self.dispatch(Kernel::Copy, &slots, &u, &[], data.len().div_ceil(256));
    }

    fn read(&mut self, buf: BufId, offset: usize, out: &mut [f32]) {
        self.read_back(self.buf(buf), offset, out, f32::from_le_bytes);
    }

    fn argmax_rows(&mut self, buf: BufId, len: usize, out: &mut [u32]) {
        self.reserve_picks(out.len());
        self.begin_op(0, 1);
        let slots = [self.buf(buf), self.picks];
        self.dispatch(Kernel::Argmax, &slots, &[out.len() as u32, len as u32], &[], out.len());
        self.read_back(self.picks, 0, out, u32::from_le_bytes);
    }

    fn top_k_rows(&mut self, buf: BufId, len: usize, k: usize, counts: &mut [u32], out: &mut [(u32, f32)]) {
        let (rows, row_words) = (counts.len(), 1 + 2 * k);
        self.reserve_picks(rows * row_words);
        self.begin_op(0, 1);
        let slots = [self.buf(buf), self.picks];
        self.dispatch(Kernel::TopK, &slots, &[rows as u32, len as u32, k as u32], &[], rows);
        let mut words = std::mem::take(&mut self.top_k_words);
        words.resize(rows * row_words, 0);
        self.read_back(self.picks, 0, &mut words, u32::from_le_bytes);
        for ((count, picked), top) in counts
            .iter_mut()
            .zip(words.chunks_exact(row_words))
            .zip(out.chunks_exact_mut(k))
        {
            *count = picked[0].min(k as u32);
            for (pair, slot) in picked[1..].chunks_exact(2).zip(top.iter_mut()).take(*count as usize) {
                *slot = (pair[0], f32::from_bits(pair[1]));
            }
        }
        self.top_k_words = words;
    }

    fn copy(&mut self, src: BufId, src_offset: usize, dst: BufId, dst_offset: usize, len: usize) {
        let slots = [self.buf(src), self.buf(dst)];
        let u = [len as u32, src_offset as u32, dst_offset as u32];
        self.elementwise(Kernel::Copy, &slots, &u, &[], len);
    }

    fn copy_within(&mut self, buf: BufId, src_offset: usize, dst_offset: usize, len: usize) {
        assert!(
            src_offset + len <= dst_offset || dst_offset + len <= src_offset,
            "copy_within: overlapping ranges"
        );
        let u = [len as u32, src_offset as u32, dst_offset as u32];
        self.elementwise(Kernel::CopyWithin, &[self.buf(buf)], &u, &[], len);
    }

    fn embed(&mut self, table: WeightId, tokens: &[u32], out: BufId) {
        let w = &self.weights[table.0 as usize];
        let (cols, row_words, code) = (w.cols, w.row_words, wtype(w.ty).expect("stored types have codes"));
        let n_parts = w.parts.len();
        self.begin_op(tokens.len(), n_parts);
        let at = self.push(tokens.iter().copied());
        let out = self.buf(out);
        for part in 0..n_parts {
            let (slot, first, n) = self.weights[table.0 as usize].parts[part];
            let u = [
                tokens.len() as u32,
                cols as u32,
                row_words as u32,
                at,
                first as u32,
                n as u32,
            ];
            self.dispatch(
                Kernel::Embed(code),
                &[slot, self.arena, out],
                &u,
                &[],
                (tokens.len() * cols).div_ceil(256),
            );
        }
    }

    fn matmul(&mut self, weight: WeightId, x: BufId, n: usize, out: BufId) {
        self.matmul_many(x, n, &[(weight, out)]);
    }

    fn matmul_many(&mut self, x: BufId, n: usize, products: &[(WeightId, BufId)]) {
        let input = Input {
            x: self.buf(x),
            gated: None,
        };
        self.products(input, n, products, &[]);
    }

    fn matmul_many_biased(&mut self, x: BufId, n: usize, products: &[(WeightId, BufId)], biases: &[WeightId]) {
        crate::assert_bias_per_product(products, biases);
        let input = Input {
            x: self.buf(x),
            gated: None,
        };
        self.products(input, n, products, biases);
    }

    fn matmul_gated(&mut self, weight: WeightId, gate: BufId, up: BufId, act: Activation, n: usize, out: BufId) {
        let input = Input {
            x: self.buf(gate),
            gated: Some((self.buf(up), activation_code(act) + 1)),
        };
        self.products(input, n, &[(weight, out)], &[]);
    }

    fn add_bias(&mut self, x: BufId, bias: WeightId, n: usize) {
        self.add_biases(&[(x, bias)], n);
    }

    fn add_biases(&mut self, pairs: &[(BufId, WeightId)], n: usize) {
        for three in pairs.chunks(3) {
            // Missing pairs add nothing to the unused buffer.
            let mut slots = [self.unused, self.unused, self.unused, 0, 0, 0];
            let mut u = [0u32; 6];
            for (p, &(x, bias)) in three.iter().enumerate() {
                let w = &self.weights[bias.0 as usize];
                let (cols, v) = (w.cols, w.vector.expect("a bias is a vector"));
                slots[p] = self.buf(x);
                slots[3 + p] = v;
                u[2 * p] = (n * cols) as u32;
                u[2 * p + 1] = cols as u32;
            }
            for p in three.len()..3 {
                slots[3 + p] = slots[3];
            }
            let len = (u[0] + u[2] + u[4]) as usize;
            self.elementwise(Kernel::AddBias, &slots, &u, &[], len);
        }
    }

    fn add(&mut self, x: BufId, y: BufId, len: usize) {
        let slots = [self.buf(x), self.buf(y)];
        self.elementwise(Kernel::Add, &slots, &[len as u32], &[], len);
    }

    fn scale(&mut self, x: BufId, len: usize, factor: f32) {
        self.elementwise(Kernel::Scale, &[self.buf(x)], &[len as u32], &[factor], len);
    }

    fn rms_norm(&mut self, x: BufId, weight: WeightId, n: usize, eps: f32) {
        self.norm(self.unused, self.buf(x), weight, n, eps, false);
    }

    fn add_rms_norm(&mut self, x: BufId, y: BufId, weight: WeightId, n: usize, eps: f32) {
        self.norm(self.buf(x), self.buf(y), weight, n, eps, true);
    }

    fn rope(&mut self, x: BufId, positions: &[u32], n_heads: usize, head_dim: usize, theta: f32, style: RopeStyle) {
        let slots = [self.buf(x), self.unused];
        self.rotate(slots, positions, (n_heads, 0), head_dim, theta, style, None);
    }

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
        let slots = [self.buf(q), self.buf(k)];
        self.rotate(slots, positions, heads, head_dim, theta, style, None);
    }

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
        assert_eq!(rows.len(), positions.len(), "one cache row per rotated row");
        let slots = [self.buf(q), self.buf(k)];
        let store = [self.buf(v), self.buf(caches.0), self.buf(caches.1)];
        self.rotate(slots, positions, heads, head_dim, theta, style, Some((store, rows)));
    }

    fn store_kv(&mut self, src: BufId, cache: BufId, row_len: usize, rows: &[u32]) {
        let src = self.buf(src);
        self.store([src, src, self.buf(cache), self.unused], 1, row_len, rows);
    }

    fn store_kv_pair(&mut self, k: BufId, v: BufId, caches: (BufId, BufId), row_len: usize, rows: &[u32]) {
        let slots = [self.buf(k), self.buf(v), self.buf(caches.0), self.buf(caches.1)];
        self.store(slots, 2, row_len, rows);
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
        assert!(a.head_dim <= 256, "the GPU attention kernel takes heads of at most 256");
        // Sequences the CPU backend attends with its f16 accumulator take the kernel that
        // repeats it operation for operation (for the head sizes of the architectures kiln
        // runs; the CPU sums a remainder past 64-value chunks in f64, which WGSL lacks);
        // the others take the f32 kernels: blocks of query rows for prefill chunks, a
        // workgroup per row (keys split across workgroups when rows are few) otherwise.
        // Each sequence takes the kernel its whole run of queries would take.
        let run_tokens = |s: &AttnSeq| s.run_end - s.run_start;
        let exact = |s: &AttnSeq| {
            s.n_tokens > 0
                && matches!(a.head_dim, 64 | 128 | 256)
                && attention::f16_accumulator_call(run_tokens(s), s.run_start)
        };
        let blocked = |s: &AttnSeq| !exact(s) && run_tokens(s) >= ATTN_BLOCK_MIN_ROWS && a.head_dim.is_multiple_of(4);
        // Rows per block: 16, or 8 where a head's vec4s leave one row group of P·V lanes.
        let block_rows = if a.head_dim / 4 <= 32 { 16 } else { 8 };
        let n_rows: usize = seqs.iter().map(|s| s.n_tokens).sum();
        self.begin_op(3 * n_rows + page_table.len(), 4);
        let at_pages = self.push(page_table.iter().copied());
        let mut u = [
            0,
            a.n_head as u32,
            a.n_kv_head as u32,
            a.head_dim as u32,
            a.page_size as u32,
            a.window.unwrap_or(0) as u32,
            0,
            at_pages,
        ];
        // The exact, block and per-row kernels bind the same buffers (the exact one also
        // the activations).
        let out_slot = self.buf(out);
        let slots = [self.buf(q), self.buf(keys), self.buf(values), out_slot, self.arena];
        let exact_seqs = || seqs.iter().filter(|s| exact(s));
        let exact_rows: usize = exact_seqs().map(|s| s.n_tokens).sum();
        if exact_rows > 0 {
            // Where the exact kernel takes every row, it also quantizes them to the
            // format of the products that first read this output, where that format's
            // blocks (32 values) lie within heads; products of another format quantize
            // anew.
            let cols = a.n_head * a.head_dim;
            let quantized = self
                .attention_formats
                .get(&out_slot)
                .copied()
                .filter(|f| matches!(f, ActFormat::Q8_0 | ActFormat::Q8_1))
                .filter(|_| exact_rows == n_rows && a.head_dim.is_multiple_of(32));
            let (code, row_words) = quantized.map_or((0, 0), |f| afmt(f, cols));
            let acts = if quantized.is_some() {
                self.reserve_acts(exact_rows * row_words);
                self.acts
            } else {
                self.unused
            };
            let mut u_exact = [0u32; 9];
            u_exact[..8].copy_from_slice(&u);
            u_exact[0] = exact_rows as u32;
            u_exact[6] = self.push(attention_items(exact_seqs()));
            u_exact[8] = row_words as u32;
            let slots_exact = [slots[0], slots[1], slots[2], slots[3], slots[4], acts];
            self.dispatch(
                Kernel::AttentionF16(code),
                &slots_exact,
                &u_exact,
                &[a.scale],
                exact_rows * a.n_head,
            );
            if let Some(format) = quantized {
                self.acts_ready = Some(ReadyActs {
                    input: out_slot,
                    format,
                    cols,
                    n: exact_rows,
                    row_words,
                });
            }
        }
        let blocked_seqs = || seqs.iter().filter(|s| blocked(s));
        let blocks: usize = blocked_seqs().map(|s| s.n_tokens.div_ceil(block_rows)).sum();
        if blocks > 0 {
            let at_blocks = self.push(blocked_seqs().flat_map(|s| {
                (0..s.n_tokens).step_by(block_rows).flat_map(move |i| {
                    let n = block_rows.min(s.n_tokens - i);
                    [(s.row0 + i) as u32, (s.start_pos + i) as u32, s.page0 as u32, n as u32]
                })
            }));
            let mut ub = [0u32; 9];
            ub[..8].copy_from_slice(&u);
            ub[0] = blocks as u32;
            ub[6] = at_blocks;
            ub[8] = block_rows as u32;
            self.dispatch(Kernel::AttentionBlock, &slots, &ub, &[a.scale], blocks * a.n_head);
        }
        'rows: {
            let row_seqs = || seqs.iter().filter(|s| !exact(s) && !blocked(s));
            let n_rows: usize = row_seqs().map(|s| s.n_tokens).sum();
            if n_rows == 0 {
                break 'rows;
            }
            u[0] = n_rows as u32;
            u[6] = self.push(attention_items(row_seqs()));
            // Keys the longest row sees, in tiles of 64.
            let max_keys = row_seqs()
                .filter(|s| s.n_tokens > 0)
                .map(|s| {
                    let keys = s.start_pos + s.n_tokens;
                    a.window.map_or(keys, |w| keys.min(w))
                })
                .max()
                .unwrap_or(0);
            let tiles = max_keys.div_ceil(64);
            let heads = n_rows * a.n_head;
            let mut splits = 1;
            let mut chunk = 0;
            if self.attn_split && a.head_dim.is_multiple_of(4) && heads < ATTN_SPLIT_GROUPS && tiles > 1 {
                let want = ATTN_SPLIT_GROUPS.div_ceil(heads).min(tiles);
                chunk = tiles.div_ceil(want) * 64;
                splits = max_keys.div_ceil(chunk);
            }
            if splits <= 1 {
                self.dispatch(Kernel::Attention, &slots, &u, &[a.scale], heads);
                break 'rows;
            }
            let words = heads * splits * (a.head_dim + 2);
            if words > self.attn_part_words {
                let old = self.attn_part;
                self.attn_part_words = words.next_power_of_two();
                self.attn_part = self.new_slot(self.attn_part_words * 4, "kiln attention partials");
                self.drop_slot(old);
            }
            let mut u_split = [0u32; 10];
            u_split[..8].copy_from_slice(&u);
            u_split[8] = splits as u32;
            u_split[9] = chunk as u32;
            let split_slots = [slots[0], slots[1], slots[2], self.attn_part, self.arena];
            self.dispatch(
                Kernel::AttentionSplit,
                &split_slots,
                &u_split,
                &[a.scale],
                heads * splits,
            );
            let slots = [self.attn_part, slots[3], self.arena];
            self.dispatch(Kernel::AttentionCombine, &slots, &u_split, &[], heads);
        }
        // The next product that reads `out` tells the exact kernel its format.
        self.last_attention = Some(out_slot);
    }

    fn gated_activation(&mut self, gate: BufId, up: BufId, len: usize, act: Activation) {
        let slots = [self.buf(gate), self.buf(up), self.gelu];
        self.elementwise(Kernel::Gated, &slots, &[len as u32, activation_code(act)], &[], len);
    }
}
