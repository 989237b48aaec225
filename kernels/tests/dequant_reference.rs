//! kiln's dequantization against an implementation nobody here wrote: the PyPI `gguf`
//! package's numpy dequantizer. The fixture (`tests/fixtures/dequant.json`) is written by
//! `scripts/fixtures/dequant.py`: random blocks of every type, plus the first blocks of
//! real tensors from the SmolLM2, Gemma 3 and Qwen GGUF files.

use std::collections::HashSet;

use kiln_kernels::dequant::dequantize_row;
use kiln_kernels::GgmlType;
use serde_json::Value;

const FIXTURE: &str = include_str!("fixtures/dequant.json");

fn type_by_name(name: &str) -> GgmlType {
    GgmlType::ALL
        .into_iter()
        .find(|t| t.name() == name)
        .unwrap_or_else(|| panic!("fixture names unknown type {name}"))
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    assert!(hex.len().is_multiple_of(2), "odd-length hex");
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("bad hex"))
        .collect()
}

#[test]
fn dequantize_matches_gguf_reference() {
    let doc: Value = serde_json::from_str(FIXTURE).expect("fixture is valid JSON");
    let entries = doc["entries"].as_array().expect("entries array");
    let mut covered = HashSet::new();

    for e in entries {
        let ty = type_by_name(e["type"].as_str().unwrap());
        let source = e["source"].as_str().unwrap();
        let n = e["n"].as_u64().unwrap() as usize;
        let src = hex_bytes(e["hex"].as_str().unwrap());
        // The values are f32s written exactly as f64, so `as f32` recovers them bit for bit.
        let want: Vec<f32> = e["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(want.len(), n, "{ty} {source}: value count");

        let mut got = vec![f32::NAN; n];
        dequantize_row(ty, &src, &mut got);

        // Both sides decode the same bytes and compute in f32 with the same operations
        // (`d * q`, or `(d * sc) * q - dmin * m`), so they should agree to the bit; the
        // tolerance only allows for a last-bit difference should one side ever fuse a
        // multiply-add or reorder a product. 1e-6 relative is ~8 f32 ulps, far below
        // anything a wrong bit, nibble or scale would produce.
        for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
            let tol = 1e-6 * w.abs().max(1.0);
            assert!(
                (g - w).abs() <= tol,
                "{ty} {source}: element {i} (block {}): kiln {g} vs gguf {w}",
                i / ty.block_size()
            );
        }
        covered.insert(ty);
    }

    let missing: Vec<_> = GgmlType::ALL.into_iter().filter(|t| !covered.contains(t)).collect();
    assert!(
        missing.is_empty(),
        "fixture lacks types {missing:?}; rerun scripts/fixtures/dequant.py"
    );
}
