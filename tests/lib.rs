//! Helpers shared by the cross-crate tests.
use jointdiff_core::npy::NpyArray;
use jointdiff_core::Tensor;
use std::path::PathBuf;

/// Path of a file under the repository's `fixtures/`.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("fixtures")
        .join(rel)
}

pub fn read_npy(rel: &str) -> Tensor {
    let bytes = std::fs::read(fixture(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    NpyArray::parse(&bytes).unwrap().into_nchw().unwrap()
}

/// The golden configs made by tools/reference/make_golden.py: (name, channels, size, ngf).
pub const GOLDEN: [(&str, usize, usize, usize); 3] = [
    ("ncsnv2_28x28x1_ngf16", 1, 28, 16),
    ("ncsnv2_32x32x3_ngf8", 3, 32, 8),
    ("ncsnv2_64x64x3_ngf4", 3, 64, 4),
];
