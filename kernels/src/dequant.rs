//! Reference dequantization of every GGML block format to f32.

use crate::quant::GgmlType;

/// Dequantizes one row: `src` holds exactly `dst.len()` elements of type `ty`.
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    let _ = (ty, src, dst);
    todo!("being written")
}
