//! Image quality metrics as the method's code reports them: PSNR and SSIM (TensorFlow's `tf.image.ssim`:
//! 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, statistics over the valid region, the SSIM
//! map averaged over positions and channels).
use alloc::vec;
use alloc::vec::Vec;

/// Peak signal-to-noise ratio in dB for images with values in a range of width `range`.
pub fn psnr(a: &[f32], b: &[f32], range: f64) -> f64 {
    let n = a.len().min(b.len()).max(1);
    let mse = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64) * (*x as f64 - *y as f64))
        .sum::<f64>()
        / n as f64;
    10.0 * libm::log10(range * range / mse.max(1e-20))
}

fn gaussian_window(size: usize, sigma: f64) -> Vec<f64> {
    let c = (size as f64 - 1.0) / 2.0;
    let g: Vec<f64> = (0..size)
        .map(|i| libm::exp(-((i as f64 - c) * (i as f64 - c)) / (2.0 * sigma * sigma)))
        .collect();
    let s: f64 = g.iter().sum();
    g.iter().map(|v| v / s).collect()
}

/// Separable "valid" filtering of an `h x w` plane with a 1-D kernel.
fn filter_valid(x: &[f64], h: usize, w: usize, k: &[f64]) -> (Vec<f64>, usize, usize) {
    let ks = k.len();
    let (ho, wo) = (h + 1 - ks, w + 1 - ks);
    let mut rows = vec![0f64; h * wo];
    for y in 0..h {
        for xo in 0..wo {
            rows[y * wo + xo] = (0..ks).map(|i| k[i] * x[y * w + xo + i]).sum();
        }
    }
    let mut out = vec![0f64; ho * wo];
    for yo in 0..ho {
        for xo in 0..wo {
            out[yo * wo + xo] = (0..ks).map(|i| k[i] * rows[(yo + i) * wo + xo]).sum();
        }
    }
    (out, ho, wo)
}

/// SSIM of two images `[C, H, W]` (flattened) with values in a range of width `range`. Images smaller than
/// the 11-pixel window use a window of their own size.
pub fn ssim(a: &[f32], b: &[f32], c: usize, h: usize, w: usize, range: f64) -> f64 {
    let size = 11.min(h).min(w).max(1);
    let k = gaussian_window(size, 1.5);
    let (c1, c2) = (
        (0.01 * range) * (0.01 * range),
        (0.03 * range) * (0.03 * range),
    );
    let mut total = 0f64;
    let mut count = 0usize;
    for ch in 0..c {
        let pa: Vec<f64> = a[ch * h * w..(ch + 1) * h * w]
            .iter()
            .map(|&v| v as f64)
            .collect();
        let pb: Vec<f64> = b[ch * h * w..(ch + 1) * h * w]
            .iter()
            .map(|&v| v as f64)
            .collect();
        let prod = |p: &[f64], q: &[f64]| p.iter().zip(q).map(|(x, y)| x * y).collect::<Vec<f64>>();
        let (ma, ho, wo) = filter_valid(&pa, h, w, &k);
        let (mb, _, _) = filter_valid(&pb, h, w, &k);
        let (saa, _, _) = filter_valid(&prod(&pa, &pa), h, w, &k);
        let (sbb, _, _) = filter_valid(&prod(&pb, &pb), h, w, &k);
        let (sab, _, _) = filter_valid(&prod(&pa, &pb), h, w, &k);
        for i in 0..ho * wo {
            let (mx, my) = (ma[i], mb[i]);
            let (vx, vy, cxy) = (saa[i] - mx * mx, sbb[i] - my * my, sab[i] - mx * my);
            total += ((2.0 * mx * my + c1) * (2.0 * cxy + c2))
                / ((mx * mx + my * my + c1) * (vx + vy + c2));
            count += 1;
        }
    }
    total / count.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psnr_and_ssim_closed_forms() {
        let a: Vec<f32> = (0..64 * 64)
            .map(|i| ((i * 37) % 101) as f32 / 100.0)
            .collect();
        // identical images: SSIM 1; a constant offset d gives PSNR -20 log10(d)
        assert!((ssim(&a, &a, 1, 64, 64, 1.0) - 1.0).abs() < 1e-12);
        let b: Vec<f32> = a.iter().map(|v| v + 0.1).collect();
        assert!((psnr(&a, &b, 1.0) - 20.0).abs() < 1e-4);
        // a constant offset changes only the luminance term: l = (2 mx my + c1) / (mx^2 + my^2 + c1) < 1
        let s = ssim(&a, &b, 1, 64, 64, 1.0);
        assert!(s < 1.0 && s > 0.9, "{s}");
        // anti-correlated images have negative SSIM
        let c: Vec<f32> = a.iter().map(|v| 1.0 - v).collect();
        assert!(ssim(&a, &c, 1, 64, 64, 1.0) < 0.0);
    }
}
