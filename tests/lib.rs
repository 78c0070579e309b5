//! Helpers shared by the cross-crate tests.
pub mod counting;
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

/// Random weights whose values depend only on the parameter's name, so that networks built on different
/// backends get the same weights.
pub fn init_by_name(s: &jointdiff_core::ncsnv2::ParamSpec) -> Vec<f32> {
    let h = s.name.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    });
    let mut r = jointdiff_core::rng::Rng::stream(99, 2, h);
    let n: usize = s.shape.iter().product();
    let fan_in: usize = if s.shape.len() == 4 {
        s.shape[1..].iter().product()
    } else {
        1
    };
    let base = if s.name.ends_with("alpha") || s.name.ends_with("gamma") {
        1.0
    } else {
        0.0
    };
    let sc = if s.shape.len() == 4 {
        1.0 / (fan_in as f64).sqrt()
    } else {
        0.2
    };
    (0..n).map(|_| (base + sc * r.normal()) as f32).collect()
}

/// Runs `f` on a fresh rayon pool of `threads` threads (the thread-count determinism tests).
pub fn on_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a rayon thread pool")
        .install(f)
}

/// Whether two buffers are equal bit for bit.
pub fn bit_identical(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}
