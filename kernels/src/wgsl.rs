//! WGSL compute kernels for GPU backends, as source text. Each kernel is a module with
//! one entry point `main`, to be compiled after [`COMMON`] (and after [`WEIGHTS`] for
//! [`MATMUL`] and [`EMBED`]; see [`CHUNKS`], [`MATVEC`] and [`MATVEC_VEC4`] for the
//! others). Parameters come in a uniform `Params` slot (binding 0); every file's header
//! says what its fields mean. The arithmetic mirrors the scalar
//! kernels of this crate: activations quantized as `qdot` does, integer block dot
//! products, f16 cache rounding, ggml's SiLU and GELU.

/// Parameters, grid folding, exact f16/bf16 conversions and byte access.
pub const COMMON: &str = include_str!("wgsl/common.wgsl");
/// Weight storage layouts per type (`override WTYPE`) and element dequantization.
pub const WEIGHTS: &str = include_str!("wgsl/weights.wgsl");
pub const COPY: &str = include_str!("wgsl/copy.wgsl");
pub const COPY_WITHIN: &str = include_str!("wgsl/copy_within.wgsl");
pub const ADD: &str = include_str!("wgsl/add.wgsl");
pub const SCALE: &str = include_str!("wgsl/scale.wgsl");
pub const ADD_BIAS: &str = include_str!("wgsl/add_bias.wgsl");
/// RMS norm of a row by one workgroup (`norm_row`), compiled before one of the two entry
/// points that follow.
pub const RMS_NORM: &str = include_str!("wgsl/rms_norm.wgsl");
pub const RMS_NORM_MAIN: &str = include_str!("wgsl/rms_norm_main.wgsl");
/// The norm, then its rows quantized for the next product (needs subgroups).
pub const NORM_QUANTIZE: &str = include_str!("wgsl/norm_quantize.wgsl");
/// Rotary embedding of queries and keys, and where asked the keys and values stored in
/// the cache in the same pass.
pub const ROPE: &str = include_str!("wgsl/rope.wgsl");
pub const STORE_KV: &str = include_str!("wgsl/store_kv.wgsl");
/// ggml's SiLU and GELU (compiled before [`GATED`] and [`QUANTIZE`]).
pub const ACTIVATION: &str = include_str!("wgsl/activation.wgsl");
pub const GATED: &str = include_str!("wgsl/gated.wgsl");
/// An attention item's row, position and page-table entry, and a query's first visible
/// key (compiled before the attention kernels).
pub const ATTENTION_COMMON: &str = include_str!("wgsl/attention_common.wgsl");
pub const ATTENTION: &str = include_str!("wgsl/attention.wgsl");
/// Attention for few query rows with each row's keys split across workgroups (partial
/// softmax sums), merged by [`ATTENTION_COMBINE`].
pub const ATTENTION_SPLIT: &str = include_str!("wgsl/attention_split.wgsl");
pub const ATTENTION_COMBINE: &str = include_str!("wgsl/attention_combine.wgsl");
/// Attention for calls the CPU backend runs with its f16 accumulator (short prefill
/// chunks and decode steps over fewer than 512 keys), with the same operations in the
/// same order, so the same bits.
pub const ATTENTION_F16: &str = include_str!("wgsl/attention_f16.wgsl");
/// Attention for blocks of consecutive query rows (prefill): each key and value row read
/// once per block rather than once per row.
pub const ATTENTION_BLOCK: &str = include_str!("wgsl/attention_block.wgsl");
/// Activation rows to the 8-bit block (or rounded float) format of a weight type.
pub const QUANTIZE: &str = include_str!("wgsl/quantize.wgsl");
/// Chunk decoding and block dot products shared by the matmul and matvec kernels
/// (compiled after [`WEIGHTS`], before [`MATMUL`] or [`MATVEC`]).
pub const CHUNKS: &str = include_str!("wgsl/chunks.wgsl");
pub const MATMUL: &str = include_str!("wgsl/matmul.wgsl");
/// The tiled product of a quantized weight and many rows (prefill).
pub const MATMUL_TILED: &str = include_str!("wgsl/matmul_tiled.wgsl");
/// The few-rows product's per-lane part; one of [`MATVEC_WG`] (workgroup-memory sums)
/// or [`MATVEC_SG`] (subgroup sums; needs the SUBGROUP device feature) follows it.
pub const MATVEC: &str = include_str!("wgsl/matvec.wgsl");
pub const MATVEC_WG: &str = include_str!("wgsl/matvec_wg.wgsl");
pub const MATVEC_SG: &str = include_str!("wgsl/matvec_sg.wgsl");
/// Q5_0, Q8_0, Q4_K and Q6_K few-rows products with 16-byte loads and subgroup sums (after
/// [`COMMON`] only).
pub const MATVEC_VEC4: &str = include_str!("wgsl/matvec_vec4.wgsl");
pub const EMBED: &str = include_str!("wgsl/embed.wgsl");
/// Each row's largest value's index (greedy sampling on the device).
pub const ARGMAX: &str = include_str!("wgsl/argmax.wgsl");
/// Each row's k highest-ranked values (top-k sampling on the device).
pub const TOP_K: &str = include_str!("wgsl/top_k.wgsl");
