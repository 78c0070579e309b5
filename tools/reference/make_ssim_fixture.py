"""Golden PSNR/SSIM values from a direct numpy implementation of tf.image.ssim's algorithm (an 11x11
Gaussian window, sigma 1.5, 2-D 'valid' correlation, K1 0.01, K2 0.03, max_val 1), independent of the Rust
code (which filters separably).

    python tools/reference/make_ssim_fixture.py      # writes fixtures/golden/metrics_cases.npy
Layout: [4, 2, 28, 28] image pairs (a, b) followed in a second file by [4, 2] (psnr, ssim).
"""
import os
import numpy as np


def window(size=11, sigma=1.5):
    c = (size - 1) / 2
    g = np.exp(-((np.arange(size) - c) ** 2) / (2 * sigma ** 2))
    w2 = np.outer(g, g)
    return w2 / w2.sum()


def filt(x, w):
    k = w.shape[0]
    h, wd = x.shape
    out = np.zeros((h - k + 1, wd - k + 1))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = (x[i:i + k, j:j + k] * w).sum()
    return out


def ssim(a, b):
    w = window()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ma, mb = filt(a, w), filt(b, w)
    va = filt(a * a, w) - ma ** 2
    vb = filt(b * b, w) - mb ** 2
    cov = filt(a * b, w) - ma * mb
    s = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))
    return s.mean()


def psnr(a, b):
    return 10 * np.log10(1.0 / np.mean((a - b) ** 2))


def main():
    rng = np.random.default_rng(7)
    out = os.path.join(os.path.dirname(__file__), "..", "..", "fixtures", "golden")
    yy, xx = np.mgrid[0:28, 0:28] / 27.0
    base = 0.5 + 0.4 * np.sin(3 * xx) * np.cos(2 * yy)
    pairs = []
    for k, noise in enumerate([0.02, 0.1, 0.3]):
        pairs.append((base, np.clip(base + noise * rng.standard_normal(base.shape), 0, 1)))
    pairs.append((base, 0.5 * base + 0.25))
    imgs = np.array([[a, b] for a, b in pairs], dtype=np.float32)
    vals = np.array([[psnr(a.astype(np.float64), b.astype(np.float64)), ssim(a.astype(np.float64), b.astype(np.float64))]
                     for a, b in imgs], dtype=np.float64)
    np.save(os.path.join(out, "metrics_pairs.npy"), imgs)
    np.save(os.path.join(out, "metrics_values.npy"), vals)
    print(vals)


if __name__ == "__main__":
    main()
