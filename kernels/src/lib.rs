//! kiln-kernels: the numeric kernels, and nothing about models. Block formats of
//! quantized tensors and their dequantization, dot products, matrix products,
//! normalization, rotary embeddings, attention and activations, each on plain slices;
//! and the same ops as WGSL source for GPU backends ([`wgsl`]).

pub mod attention;
pub mod dequant;
pub mod gemm;
pub mod ops;
pub mod qdot;
pub mod quant;
pub mod wgsl;

pub use quant::GgmlType;
