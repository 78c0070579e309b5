//! Structured noise generators for `corrupt` and the matching analytic noise priors for `denoise`.
use crate::error::{Error, Result};
use crate::rng::{purpose, Rng};
use crate::tensor::Tensor;
use alloc::format;
use alloc::vec::Vec;

/// The method's sinusoidal standard-deviation profile `exp(sin(2 pi i / 16))`.
pub fn sine_profile(i: usize) -> f64 {
    libm::exp(libm::sin(2.0 * core::f64::consts::PI * i as f64 / 16.0))
}

/// The profile index of each value of one item `[C, H, W]`: the row for images (stripes), the position
/// for vectors (`H == 1`).
fn profile_index(shape: [usize; 3], k: usize) -> usize {
    let [_, h, w] = shape;
    if h > 1 {
        (k / w) % h
    } else {
        k % w
    }
}

fn check_std(std: f64) -> Result<()> {
    if std.is_nan() || std < 0.0 || !std.is_finite() {
        return Err(Error::invalid(format!(
            "noise std must be finite and >= 0, got {std}"
        )));
    }
    Ok(())
}

/// Sinusoidal noise as the method's code makes it: `z * exp(sin(2 pi i / 16))`, then the whole batch
/// rescaled so that its empirical standard deviation is `std`. Item `k` uses stream `k` of `seed`.
pub fn sine(shape: [usize; 4], std: f64, seed: u64) -> Result<Tensor> {
    check_std(std)?;
    let mut t = Tensor::zeros(shape);
    let item = [shape[1], shape[2], shape[3]];
    for k in 0..shape[0] {
        let mut rng = Rng::stream(seed, purpose::CORRUPT, k as u64);
        let v = t.item_mut(k);
        rng.fill_normal(v);
        for (j, x) in v.iter_mut().enumerate() {
            *x *= sine_profile(profile_index(item, j)) as f32;
        }
    }
    let n = t.data.len() as f64;
    let mean = t.data.iter().map(|&v| v as f64).sum::<f64>() / n;
    let sd = libm::sqrt(
        t.data
            .iter()
            .map(|&v| (v as f64 - mean) * (v as f64 - mean))
            .sum::<f64>()
            / n,
    );
    let scale = if sd > 0.0 { std / sd } else { 0.0 };
    t.data
        .iter_mut()
        .for_each(|v| *v = (*v as f64 * scale) as f32);
    Ok(t)
}

/// Per-value standard deviation of the sine noise in expectation: the profile rescaled to RMS `std`.
/// This is the analytic (Gaussian) prior `denoise --noise sine:STD` uses.
pub fn sine_std(item: [usize; 3], std: f64) -> Result<Vec<f32>> {
    check_std(std)?;
    let len: usize = item.iter().product();
    let prof: Vec<f64> = (0..len)
        .map(|j| sine_profile(profile_index(item, j)))
        .collect();
    let rms = libm::sqrt(prof.iter().map(|p| p * p).sum::<f64>() / len.max(1) as f64);
    Ok(prof.iter().map(|p| (p / rms * std) as f32).collect())
}

/// White Gaussian noise `mean + std z`.
pub fn gaussian(shape: [usize; 4], std: f64, mean: f64, seed: u64) -> Result<Tensor> {
    check_std(std)?;
    let mut t = Tensor::zeros(shape);
    for k in 0..shape[0] {
        let mut rng = Rng::stream(seed, purpose::CORRUPT, k as u64);
        for v in t.item_mut(k) {
            *v = (mean + std * rng.normal()) as f32;
        }
    }
    Ok(t)
}

/// Noise images for `items` signals: item `k` gets noise image `perm[k]`, a seeded choice among the
/// `images` given (without repeats while there are enough).
pub fn overlay(images: &Tensor, items: usize, seed: u64) -> Result<Tensor> {
    let count = images.shape[0];
    if count == 0 {
        return Err(Error::shape("noise data holds no images"));
    }
    let mut order: Vec<usize> = (0..count).collect();
    let mut rng = Rng::stream(seed, purpose::CORRUPT, u32::MAX as u64);
    // Fisher–Yates
    for i in (1..count).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    let mut t = Tensor::zeros([items, images.shape[1], images.shape[2], images.shape[3]]);
    for k in 0..items {
        let src = order[k % count];
        t.item_mut(k).copy_from_slice(images.item(src));
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sine_has_stripes_and_target_std() {
        let t = sine([64, 1, 16, 4], 0.1, 5).unwrap();
        let n = t.data.len() as f64;
        let mean = t.data.iter().map(|&v| v as f64).sum::<f64>() / n;
        let sd = (t
            .data
            .iter()
            .map(|&v| (v as f64 - mean).powi(2))
            .sum::<f64>()
            / n)
            .sqrt();
        assert!((sd - 0.1).abs() < 1e-5);
        // per-row empirical std follows exp(sin(2 pi r / 16)) up to a common factor
        let expected = sine_std([1, 16, 4], 0.1).unwrap();
        for r in [0usize, 4, 12] {
            let mut s2 = 0.0;
            for k in 0..64 {
                for c in 0..4 {
                    s2 += (t.item(k)[r * 4 + c] as f64).powi(2);
                }
            }
            let emp = (s2 / 256.0).sqrt();
            let want = expected[r * 4] as f64;
            assert!((emp / want - 1.0).abs() < 0.2, "row {r}: {emp} vs {want}");
        }
        // row 4 (sin = 1) is e^2 times row 12 (sin = -1) in std
        assert!((expected[4 * 4] / expected[12 * 4] - (2f32).exp()).abs() < 1e-3);
    }
}
