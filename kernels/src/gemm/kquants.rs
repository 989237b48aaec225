//! SIMD kernels for the K-quant super-block types: Q4_K, Q6_K.

use super::{OutMatrix, SimdLevel};
use crate::quant::GgmlType;

/// Runs the kernel for `ty` at `level`; returns false when there is none (the caller
/// then takes the scalar path).
///
/// # Safety
/// `level` is supported by this CPU, and the slices have the sizes `super::gemm_at`
/// checked.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm(
    _level: SimdLevel,
    _ty: GgmlType,
    _weights: &[u8],
    _n_rows: usize,
    _cols: usize,
    _acts: &[u8],
    _n_tokens: usize,
    _out: OutMatrix,
) -> bool {
    false
}
