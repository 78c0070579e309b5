//! Classic baselines the evaluation compares the method with (no_std): the (pseudo-)inverse of the
//! operator, LASSO in an orthonormal Haar wavelet basis solved by FISTA, and non-local means. Each works on
//! one item at a time in f64 and is deterministic.
use crate::error::{Error, Result};
use crate::operator::Operator;
use crate::rng::{purpose, Rng};
use crate::sampler::GramInverse;
use alloc::format;
use alloc::vec;
use alloc::vec::Vec;

/// A Gaussian measurement matrix `m x d` with entries `N(0, 1/m)` (compressed sensing), from its own RNG
/// stream of `seed`.
pub fn gaussian_matrix(m: usize, d: usize, seed: u64) -> Result<Operator> {
    if m == 0 || d == 0 {
        return Err(Error::invalid("a Gaussian matrix needs m, d >= 1"));
    }
    let mut rng = Rng::stream(seed, purpose::OPERATOR, 0);
    let s = 1.0 / libm::sqrt(m as f64);
    let a = (0..m * d).map(|_| (rng.normal() * s) as f32).collect();
    Ok(Operator::Matrix { m, d, a })
}

/// The least-norm inverse `A^+ y` of one measurement item (`d` signal values): `y / b` for a scale,
/// `y_j / m_j` where the mask is non-zero (0 elsewhere), `A^T (A A^T)^-1 y` for a full-row-rank matrix.
/// Factorises a matrix's `A A^T` on each call: build a [`PseudoInverse`] once for many items.
pub fn pseudo_inverse(op: &Operator, y: &[f32], d: usize) -> Result<Vec<f32>> {
    PseudoInverse::new(op, d)?.apply(y)
}

/// [`pseudo_inverse`] made once for an operator and `d` signal values (a dense matrix's `(A A^T)^-1` from
/// one Cholesky factorisation in f64), applied to any number of measurement items.
#[derive(Debug, Clone)]
pub struct PseudoInverse {
    op: Operator,
    d: usize,
    m: usize,
    /// `(A A^T)^-1`, row-major `m x m`, for a dense matrix.
    gram_inv: Option<Vec<f32>>,
}

impl PseudoInverse {
    pub fn new(op: &Operator, d: usize) -> Result<Self> {
        let m = op.out_len(d)?;
        let gram_inv = match op {
            Operator::Matrix { .. } => match GramInverse::new(op, d, 0.0)? {
                GramInverse::Inverse { a, .. } => Some(a),
                GramInverse::Diagonal(_) => return Err(Error::invalid("expected a dense inverse")),
            },
            _ => None,
        };
        Ok(PseudoInverse {
            op: op.clone(),
            d,
            m,
            gram_inv,
        })
    }

    /// `A^+ y` of one measurement item (`m` values).
    pub fn apply(&self, y: &[f32]) -> Result<Vec<f32>> {
        let (m, d) = (self.m, self.d);
        if y.len() != m {
            return Err(Error::shape(format!(
                "measurement item has {} values, the operator gives {m}",
                y.len()
            )));
        }
        Ok(match &self.op {
            Operator::Identity => y.to_vec(),
            Operator::Scale(b) => {
                if *b == 0.0 {
                    vec![0.0; d]
                } else {
                    y.iter().map(|v| v / b).collect()
                }
            }
            Operator::Mask(mk) => y
                .iter()
                .zip(mk)
                .map(|(v, k)| if *k == 0.0 { 0.0 } else { v / k })
                .collect(),
            Operator::Matrix { .. } => {
                let inv = self
                    .gram_inv
                    .as_ref()
                    .ok_or_else(|| Error::invalid("expected a dense inverse"))?;
                let v: Vec<f32> = inv
                    .chunks_exact(m)
                    .map(|row| {
                        row.iter()
                            .zip(y)
                            .map(|(p, q)| (*p as f64 * *q as f64) as f32)
                            .sum()
                    })
                    .collect();
                let mut x = vec![0f32; d];
                self.op.adjoint(&v, &mut x);
                x
            }
        })
    }
}

/// Levels of the 2-D Haar transform on an `h x w` image: halvings while both sides are even, at most 3.
pub fn haar_levels(h: usize, w: usize) -> usize {
    let (mut h, mut w, mut l) = (h, w, 0);
    while l < 3 && h % 2 == 0 && w % 2 == 0 && h >= 2 && w >= 2 {
        h /= 2;
        w /= 2;
        l += 1;
    }
    l
}

const R2: f64 = core::f64::consts::FRAC_1_SQRT_2;

/// One orthonormal Haar step along a strided line of `2 k` values: averages to the first half, details to
/// the second.
fn haar_step(v: &mut [f64], idx: &[usize], tmp: &mut Vec<f64>) {
    let k = idx.len() / 2;
    tmp.clear();
    tmp.resize(idx.len(), 0.0);
    for i in 0..k {
        let (a, b) = (v[idx[2 * i]], v[idx[2 * i + 1]]);
        tmp[i] = (a + b) * R2;
        tmp[k + i] = (a - b) * R2;
    }
    for (j, &i) in idx.iter().enumerate() {
        v[i] = tmp[j];
    }
}

fn haar_step_inv(v: &mut [f64], idx: &[usize], tmp: &mut Vec<f64>) {
    let k = idx.len() / 2;
    tmp.clear();
    tmp.resize(idx.len(), 0.0);
    for i in 0..k {
        let (s, t) = (v[idx[i]], v[idx[k + i]]);
        tmp[2 * i] = (s + t) * R2;
        tmp[2 * i + 1] = (s - t) * R2;
    }
    for (j, &i) in idx.iter().enumerate() {
        v[i] = tmp[j];
    }
}

/// Orthonormal 2-D Haar analysis of an `h x w` image (row-major) in place, `levels` levels (rows then
/// columns at each level, on the top-left approximation block).
pub fn haar2d(v: &mut [f64], h: usize, w: usize, levels: usize) {
    let (mut hh, mut ww) = (h, w);
    let (mut idx, mut tmp) = (Vec::new(), Vec::new());
    for _ in 0..levels {
        for r in 0..hh {
            idx.clear();
            idx.extend((0..ww).map(|c| r * w + c));
            haar_step(v, &idx, &mut tmp);
        }
        for c in 0..ww {
            idx.clear();
            idx.extend((0..hh).map(|r| r * w + c));
            haar_step(v, &idx, &mut tmp);
        }
        hh /= 2;
        ww /= 2;
    }
}

/// The inverse of [`haar2d`] (its transpose: the transform is orthonormal).
pub fn haar2d_inv(v: &mut [f64], h: usize, w: usize, levels: usize) {
    let (mut idx, mut tmp) = (Vec::new(), Vec::new());
    for l in (0..levels).rev() {
        let (hh, ww) = (h >> l, w >> l);
        for c in 0..ww {
            idx.clear();
            idx.extend((0..hh).map(|r| r * w + c));
            haar_step_inv(v, &idx, &mut tmp);
        }
        for r in 0..hh {
            idx.clear();
            idx.extend((0..ww).map(|c| r * w + c));
            haar_step_inv(v, &idx, &mut tmp);
        }
    }
}

/// Whether coefficient `(r, c)` of a `levels`-level transform is in the coarsest approximation band (not
/// penalised by the LASSO).
fn in_approximation(r: usize, c: usize, h: usize, w: usize, levels: usize) -> bool {
    r < (h >> levels) && c < (w >> levels)
}

/// LASSO in the Haar basis, `min_x 1/2 ||A x + offset - y||^2 + lambda ||(W x)_detail||_1` for one item
/// `[c, h, w]` (each channel its own 2-D transform; the coarsest approximation band is not penalised), by
/// FISTA (Beck and Teboulle) on the coefficients `W x` with step `1 / (1.01 L)`, `L = ||A||^2`
/// ([`Operator::norm2`]), from the zero start, `iters` iterations. `offset` is the known mean of the noise
/// term (`alpha E[n]`), one measurement item.
pub struct HaarLasso {
    op: Operator,
    item: [usize; 3],
    levels: usize,
    step: f64,
}

impl HaarLasso {
    pub fn new(op: Operator, item: [usize; 3]) -> Result<Self> {
        let [c, h, w] = item;
        let d = c * h * w;
        let l = op.norm2(d)?;
        if l.is_nan() || l <= 0.0 {
            return Err(Error::invalid("the operator is zero: nothing to invert"));
        }
        Ok(HaarLasso {
            op,
            item,
            levels: haar_levels(h, w),
            step: 1.0 / (1.01 * l),
        })
    }

    /// The objective at `x` (for tests).
    pub fn objective(&self, x: &[f64], y: &[f32], offset: &[f32], lambda: f64) -> f64 {
        let m = y.len();
        let xf: Vec<f32> = x.iter().map(|v| *v as f32).collect();
        let mut ax = vec![0f32; m];
        self.op.apply(&xf, &mut ax);
        let fit: f64 = (0..m)
            .map(|j| {
                let r = ax[j] as f64 + offset[j] as f64 - y[j] as f64;
                r * r
            })
            .sum();
        let c = self.coefficients(x);
        0.5 * fit + lambda * self.penalty(&c)
    }

    fn coefficients(&self, x: &[f64]) -> Vec<f64> {
        let [ch, h, w] = self.item;
        let mut c = x.to_vec();
        for k in 0..ch {
            haar2d(&mut c[k * h * w..(k + 1) * h * w], h, w, self.levels);
        }
        c
    }

    fn signal(&self, c: &[f64]) -> Vec<f64> {
        let [ch, h, w] = self.item;
        let mut x = c.to_vec();
        for k in 0..ch {
            haar2d_inv(&mut x[k * h * w..(k + 1) * h * w], h, w, self.levels);
        }
        x
    }

    fn penalty(&self, c: &[f64]) -> f64 {
        let [_, h, w] = self.item;
        c.iter()
            .enumerate()
            .filter(|(i, _)| !in_approximation((i % (h * w)) / w, i % w, h, w, self.levels))
            .map(|(_, v)| v.abs())
            .sum()
    }

    /// Solves for one measurement item; returns the signal item (not clipped).
    pub fn solve(&self, y: &[f32], offset: &[f32], lambda: f64, iters: usize) -> Result<Vec<f64>> {
        let [ch, h, w] = self.item;
        let d = ch * h * w;
        let m = self.op.out_len(d)?;
        if y.len() != m || offset.len() != m {
            return Err(Error::shape(format!(
                "measurement item has {} values (offset {}), the operator gives {m}",
                y.len(),
                offset.len()
            )));
        }
        if lambda.is_nan() || lambda < 0.0 || !lambda.is_finite() {
            return Err(Error::invalid(format!(
                "lambda must be finite and >= 0, got {lambda}"
            )));
        }
        let target: Vec<f32> = y.iter().zip(offset).map(|(a, b)| a - b).collect();
        let thr = lambda * self.step;
        let (mut c, mut z) = (vec![0f64; d], vec![0f64; d]);
        let mut t = 1.0f64;
        let (mut xf, mut ax, mut g) = (vec![0f32; d], vec![0f32; m], vec![0f32; d]);
        for _ in 0..iters {
            // gradient of the fit at z: W A^T (A W^T z - target)
            let xz = self.signal(&z);
            xf.iter_mut().zip(&xz).for_each(|(o, v)| *o = *v as f32);
            self.op.apply(&xf, &mut ax);
            ax.iter_mut().zip(&target).for_each(|(a, t)| *a -= t);
            self.op.adjoint(&ax, &mut g);
            let gc = self.coefficients(&g.iter().map(|v| *v as f64).collect::<Vec<_>>());
            let prev = c.clone();
            for i in 0..d {
                let v = z[i] - self.step * gc[i];
                c[i] = if in_approximation((i % (h * w)) / w, i % w, h, w, self.levels) {
                    v
                } else {
                    soft(v, thr)
                };
            }
            let tn = (1.0 + libm::sqrt(1.0 + 4.0 * t * t)) / 2.0;
            for i in 0..d {
                z[i] = c[i] + (t - 1.0) / tn * (c[i] - prev[i]);
            }
            t = tn;
        }
        Ok(self.signal(&c))
    }
}

fn soft(v: f64, t: f64) -> f64 {
    if v > t {
        v - t
    } else if v < -t {
        v + t
    } else {
        0.0
    }
}

/// Non-local means (Buades, Coll and Morel) on one `h x w` image: each pixel becomes the mean of the pixels
/// in its `(2 search + 1)^2` window (cut at the borders), weighted by `exp(-D / h^2)` with `D` the mean
/// squared difference of the `(2 patch + 1)^2` patches around the two pixels (coordinates clamped at the
/// borders). `filter = inf` gives the window mean; a tiny `filter` leaves an image without repeated
/// patches unchanged.
pub fn nlm(img: &[f32], h: usize, w: usize, patch: usize, search: usize, filter: f64) -> Vec<f32> {
    assert_eq!(img.len(), h * w, "nlm: image size");
    let at = |r: isize, c: isize| -> f64 {
        let r = r.clamp(0, h as isize - 1) as usize;
        let c = c.clamp(0, w as isize - 1) as usize;
        img[r * w + c] as f64
    };
    let (p, s) = (patch as isize, search as isize);
    let np = ((2 * p + 1) * (2 * p + 1)) as f64;
    let inv_h2 = if filter.is_infinite() {
        0.0
    } else {
        1.0 / (filter * filter)
    };
    let mut out = vec![0f32; h * w];
    for r in 0..h as isize {
        for c in 0..w as isize {
            let (mut acc, mut wsum) = (0f64, 0f64);
            for rr in (r - s).max(0)..=(r + s).min(h as isize - 1) {
                for cc in (c - s).max(0)..=(c + s).min(w as isize - 1) {
                    let mut dist = 0f64;
                    for dr in -p..=p {
                        for dc in -p..=p {
                            let q = at(r + dr, c + dc) - at(rr + dr, cc + dc);
                            dist += q * q;
                        }
                    }
                    let wt = libm::exp(-dist / np * inv_h2);
                    acc += wt * at(rr, cc);
                    wsum += wt;
                }
            }
            out[(r as usize) * w + c as usize] = (acc / wsum) as f32;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: u64, n: usize) -> Vec<f64> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) - 0.5
            })
            .collect()
    }

    #[test]
    fn haar_is_orthonormal_and_inverts() {
        for (h, w) in [(28, 28), (8, 4), (6, 10), (32, 32)] {
            let l = haar_levels(h, w);
            let x = lcg(1, h * w);
            let mut c = x.clone();
            haar2d(&mut c, h, w, l);
            let n0: f64 = x.iter().map(|v| v * v).sum();
            let n1: f64 = c.iter().map(|v| v * v).sum();
            assert!((n0 - n1).abs() < 1e-9 * n0, "{h}x{w}: norm kept");
            haar2d_inv(&mut c, h, w, l);
            for (a, b) in x.iter().zip(&c) {
                assert!((a - b).abs() < 1e-12);
            }
        }
        assert_eq!(haar_levels(28, 28), 2);
        assert_eq!(haar_levels(32, 32), 3);
        assert_eq!(haar_levels(7, 8), 0);
    }

    #[test]
    fn haar_of_a_2x2_block_by_hand() {
        // one level on [[a, b], [c, d]]: (a+b+c+d)/2, (a-b+c-d)/2, (a+b-c-d)/2, (a-b-c+d)/2
        let mut v = vec![1.0, 2.0, 3.0, 5.0];
        haar2d(&mut v, 2, 2, 1);
        let want = [5.5, -1.5, -2.5, 0.5];
        for (a, b) in v.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{v:?}");
        }
    }

    #[test]
    fn lasso_with_identity_is_soft_thresholding_in_the_basis() {
        // closed form for an orthonormal A W^T: c* = soft(W y, lambda) off the approximation band
        let (h, w) = (8, 8);
        let y: Vec<f32> = lcg(3, h * w).iter().map(|v| *v as f32).collect();
        let off = vec![0f32; h * w];
        let lasso = HaarLasso::new(Operator::Identity, [1, h, w]).unwrap();
        let lambda = 0.05;
        let x = lasso.solve(&y, &off, lambda, 400).unwrap();
        let mut c: Vec<f64> = y.iter().map(|v| *v as f64).collect();
        haar2d(&mut c, h, w, 3);
        for (i, v) in c.iter_mut().enumerate() {
            if !in_approximation(i / w, i % w, h, w, 3) {
                *v = soft(*v, lambda);
            }
        }
        haar2d_inv(&mut c, h, w, 3);
        for (a, b) in x.iter().zip(&c) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    /// The exact LASSO minimum of a tiny problem by enumerating supports and signs (KKT: on a support S
    /// with signs s, `c_S = (B_S^T B_S)^-1 (B_S^T t - lambda s)` for the penalised part).
    fn brute_force(b: &[Vec<f64>], t: &[f64], lambda: f64, free: &[bool]) -> f64 {
        let d = b[0].len();
        let obj = |c: &[f64]| -> f64 {
            let fit: f64 = b
                .iter()
                .zip(t)
                .map(|(row, ti)| {
                    let r = row.iter().zip(c).map(|(p, q)| p * q).sum::<f64>() - ti;
                    r * r
                })
                .sum();
            0.5 * fit
                + lambda
                    * c.iter()
                        .zip(free)
                        .filter(|(_, f)| !**f)
                        .map(|(v, _)| v.abs())
                        .sum::<f64>()
        };
        let mut best = f64::INFINITY;
        // each coordinate: 0 (off support), +, or - (free ones: always on, sign irrelevant)
        let total = 3usize.pow(d as u32);
        for code in 0..total {
            let mut state = vec![0u8; d];
            let mut k = code;
            for s in state.iter_mut() {
                *s = (k % 3) as u8;
                k /= 3;
            }
            if state.iter().zip(free).any(|(s, f)| *f && *s != 1) {
                continue;
            }
            let sup: Vec<usize> = (0..d).filter(|&i| state[i] != 0).collect();
            let n = sup.len();
            // normal equations on the support
            let mut g = vec![0f64; n * n];
            let mut rhs = vec![0f64; n];
            for (p, &i) in sup.iter().enumerate() {
                for (q, &j) in sup.iter().enumerate() {
                    g[p * n + q] = b.iter().map(|row| row[i] * row[j]).sum();
                }
                let sign = if free[i] {
                    0.0
                } else if state[i] == 1 {
                    1.0
                } else {
                    -1.0
                };
                rhs[p] = b.iter().zip(t).map(|(row, ti)| row[i] * ti).sum::<f64>() - lambda * sign;
            }
            // Gaussian elimination
            let mut ok = true;
            for col in 0..n {
                let piv = (col..n)
                    .max_by(|a, b| g[a * n + col].abs().total_cmp(&g[b * n + col].abs()))
                    .unwrap();
                if g[piv * n + col].abs() < 1e-12 {
                    ok = false;
                    break;
                }
                for k in 0..n {
                    g.swap(col * n + k, piv * n + k);
                }
                rhs.swap(col, piv);
                for r in 0..n {
                    if r != col {
                        let f = g[r * n + col] / g[col * n + col];
                        for k in 0..n {
                            g[r * n + k] -= f * g[col * n + k];
                        }
                        rhs[r] -= f * rhs[col];
                    }
                }
            }
            if !ok {
                continue;
            }
            let mut c = vec![0f64; d];
            for (p, &i) in sup.iter().enumerate() {
                c[i] = rhs[p] / g[p * n + p];
            }
            best = best.min(obj(&c));
        }
        best
    }

    #[test]
    fn fista_reaches_the_brute_force_minimum_of_a_tiny_problem() {
        // 2x2 images (one Haar level: 1 free approximation coefficient, 3 penalised), a 3x4 matrix
        let vals = lcg(7, 12);
        let a: Vec<f32> = vals.iter().map(|v| (*v * 2.0) as f32).collect();
        let op = Operator::Matrix {
            m: 3,
            d: 4,
            a: a.clone(),
        };
        let y = [0.3f32, -0.2, 0.5];
        let off = [0.05f32, 0.0, -0.1];
        let lasso = HaarLasso::new(op.clone(), [1, 2, 2]).unwrap();
        for lambda in [0.0, 0.02, 0.1, 0.5] {
            let x = lasso.solve(&y, &off, lambda, 20000).unwrap();
            let got = lasso.objective(&x, &y, &off, lambda);
            // B = A W^T: columns are A applied to the basis images
            let mut bcols = Vec::new();
            for k in 0..4 {
                let mut e = vec![0f64; 4];
                e[k] = 1.0;
                haar2d_inv(&mut e, 2, 2, 1);
                let ef: Vec<f32> = e.iter().map(|v| *v as f32).collect();
                let mut col = vec![0f32; 3];
                op.apply(&ef, &mut col);
                bcols.push(col);
            }
            let b: Vec<Vec<f64>> = (0..3)
                .map(|r| (0..4).map(|k| bcols[k][r] as f64).collect())
                .collect();
            let t: Vec<f64> = y.iter().zip(&off).map(|(p, q)| (*p - *q) as f64).collect();
            let want = brute_force(&b, &t, lambda, &[true, false, false, false]);
            assert!(
                (got - want).abs() < 1e-5 * (1.0 + want.abs()),
                "lambda {lambda}: FISTA {got}, exact {want}"
            );
        }
    }

    #[test]
    fn nlm_limits_have_closed_forms() {
        let (h, w) = (9, 7);
        let img: Vec<f32> = lcg(11, h * w).iter().map(|v| *v as f32).collect();
        // filter -> inf: the mean over the search window cut at the borders
        let out = nlm(&img, h, w, 1, 2, f64::INFINITY);
        for r in 0..h {
            for c in 0..w {
                let (mut s, mut n) = (0f64, 0f64);
                for rr in r.saturating_sub(2)..=(r + 2).min(h - 1) {
                    for cc in c.saturating_sub(2)..=(c + 2).min(w - 1) {
                        s += img[rr * w + cc] as f64;
                        n += 1.0;
                    }
                }
                assert!((out[r * w + c] as f64 - s / n).abs() < 1e-6);
            }
        }
        // tiny filter on random values (no repeated patch): the image itself
        let out = nlm(&img, h, w, 1, 3, 1e-4);
        for (a, b) in out.iter().zip(&img) {
            assert!((a - b).abs() < 1e-6);
        }
        // a constant image stays constant
        let flat = vec![0.25f32; h * w];
        assert!(nlm(&flat, h, w, 2, 3, 0.1)
            .iter()
            .all(|v| (v - 0.25).abs() < 1e-7));
    }

    #[test]
    fn nlm_averages_only_matching_patches() {
        // two flat halves with a sharp edge: at a moderate filter each pixel away from the edge keeps its
        // half's value (the other half's patches are far), while noise inside a half is smoothed
        let (h, w) = (10, 10);
        let noise = lcg(5, h * w);
        let img: Vec<f32> = (0..h * w)
            .map(|i| (if i % w < 5 { 0.2 } else { 0.8 }) + (noise[i] * 0.02) as f32)
            .collect();
        let out = nlm(&img, h, w, 1, 3, 0.1);
        let (mut before, mut after) = (0f64, 0f64);
        for r in 0..h {
            for c in [0usize, 1, 2, 7, 8, 9] {
                let want = if c < 5 { 0.2 } else { 0.8 };
                before += ((img[r * w + c] - want) as f64).powi(2);
                let e = (out[r * w + c] - want) as f64;
                assert!(e.abs() < 0.012, "({r},{c}): {e}");
                after += e * e;
            }
        }
        assert!(after < 0.25 * before, "smoothed: {after} vs {before}");
    }

    #[test]
    fn pseudo_inverse_recovers_a_signal_in_the_row_space() {
        let op = gaussian_matrix(5, 12, 3).unwrap();
        // x in the row space: A^T z
        let z = [0.3f32, -0.1, 0.2, 0.5, -0.4];
        let mut x = vec![0f32; 12];
        op.adjoint(&z, &mut x);
        let mut y = vec![0f32; 5];
        op.apply(&x, &mut y);
        let back = pseudo_inverse(&op, &y, 12).unwrap();
        for (a, b) in back.iter().zip(&x) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        // made once, applied to several items: each is recovered; a wrong-length item is an error
        let pinv = PseudoInverse::new(&op, 12).unwrap();
        for scale in [1.0f32, -2.5] {
            let ys: Vec<f32> = y.iter().map(|v| v * scale).collect();
            for (a, b) in pinv.apply(&ys).unwrap().iter().zip(&x) {
                assert!((a - b * scale).abs() < 1e-4, "{a} vs {}", b * scale);
            }
        }
        assert!(pinv.apply(&y[..4]).is_err());
        let mk = Operator::Mask(vec![1.0, 0.0, 2.0]);
        assert_eq!(
            pseudo_inverse(&mk, &[1.0, 5.0, 4.0], 3).unwrap(),
            vec![1.0, 0.0, 2.0]
        );
    }

    #[test]
    fn operator_norm_of_a_matrix_matches_its_gram_eigenvalue() {
        // a diagonal-like matrix: rows e_0 * 3, e_1 * 1: ||A||^2 = 9
        let op = Operator::Matrix {
            m: 2,
            d: 3,
            a: vec![3.0, 0.0, 0.0, 0.0, 1.0, 0.0],
        };
        assert!((op.norm2(3).unwrap() - 9.0).abs() < 1e-6);
        // Gaussian N(0, 1/m) m = d/2: about (1 + sqrt 2)^2 = 5.83
        let g = gaussian_matrix(392, 784, 0).unwrap();
        let l = g.norm2(784).unwrap();
        assert!(l > 5.0 && l < 6.5, "{l}");
    }
}
