//! WGSL compute kernels for GPU backends, as source text. Each kernel is a module with
//! one entry point `main`, to be compiled after [`COMMON`] (and after [`WEIGHTS`] for
//! [`MATMUL`] and [`EMBED`]). Parameters come in a uniform `Params` slot (binding 0);
//! every file's header says what its fields mean. The arithmetic mirrors the scalar
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
pub const RMS_NORM: &str = include_str!("wgsl/rms_norm.wgsl");
pub const ROPE: &str = include_str!("wgsl/rope.wgsl");
pub const STORE_KV: &str = include_str!("wgsl/store_kv.wgsl");
pub const GATED: &str = include_str!("wgsl/gated.wgsl");
pub const ATTENTION: &str = include_str!("wgsl/attention.wgsl");
/// Activation rows to the 8-bit block (or rounded float) format of a weight type.
pub const QUANTIZE: &str = include_str!("wgsl/quantize.wgsl");
pub const MATMUL: &str = include_str!("wgsl/matmul.wgsl");
pub const EMBED: &str = include_str!("wgsl/embed.wgsl");
