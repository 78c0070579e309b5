//! The reference backend: every operation as plain, obviously-correct loops on host memory.
//!
//! It is the oracle the fast backends are tested against, and it is itself tested against fixtures made
//! by an independent PyTorch implementation (tests/golden.rs). Each operation is also a public function
//! so that other host backends can fall back to it.
use crate::backend::{Backend, Conv2dParams};
use crate::tensor::Tensor;
use alloc::vec;
use alloc::vec::Vec;

/// Plain-loop backend on host tensors.
#[derive(Debug, Clone, Copy, Default)]
pub struct RefBackend;

impl Backend for RefBackend {
    type Tensor = Tensor;

    fn name(&self) -> &'static str {
        "reference"
    }
    fn upload(&self, t: &Tensor) -> Tensor {
        t.clone()
    }
    fn download(&self, t: &Tensor) -> crate::error::Result<Tensor> {
        Ok(t.clone())
    }
    fn shape(&self, t: &Tensor) -> [usize; 4] {
        t.shape
    }
    fn conv2d(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>, p: Conv2dParams) -> Tensor {
        conv2d(x, w, bias, p)
    }
    fn mean_pool2(&self, x: &Tensor) -> Tensor {
        mean_pool2(x)
    }
    fn max_pool(&self, x: &Tensor, k: usize, pad: usize) -> Tensor {
        max_pool(x, k, pad)
    }
    fn instance_norm_plus(&self, x: &Tensor, a: &Tensor, g: &Tensor, b: &Tensor) -> Tensor {
        instance_norm_plus(x, a, g, b)
    }
    fn elu(&self, x: &Tensor) -> Tensor {
        elu(x)
    }
    fn resize_bilinear(&self, x: &Tensor, h: usize, w: usize) -> Tensor {
        resize_bilinear(x, h, w)
    }
    fn add(&self, a: &Tensor, b: &Tensor) -> Tensor {
        add(a, b)
    }
    fn affine(&self, x: &Tensor, scale: f32, shift: f32) -> Tensor {
        affine(x, scale, shift)
    }
    fn conv2d_backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        gout: &Tensor,
        p: Conv2dParams,
    ) -> (Tensor, Tensor, Tensor) {
        conv2d_backward(x, w, gout, p)
    }
    fn conv2d_backward_input(
        &self,
        w: &Tensor,
        gout: &Tensor,
        in_shape: [usize; 4],
        p: Conv2dParams,
    ) -> Tensor {
        conv2d_backward_input(w, gout, in_shape, p)
    }
    fn mean_pool2_backward(&self, gout: &Tensor, in_shape: [usize; 4]) -> Tensor {
        mean_pool2_backward(gout, in_shape)
    }
    fn max_pool_backward(&self, x: &Tensor, gout: &Tensor, k: usize, pad: usize) -> Tensor {
        max_pool_backward(x, gout, k, pad)
    }
    fn elu_backward(&self, x: &Tensor, gout: &Tensor) -> Tensor {
        elu_backward(x, gout)
    }
    fn resize_bilinear_backward(&self, gout: &Tensor, in_shape: [usize; 4]) -> Tensor {
        resize_bilinear_backward(gout, in_shape)
    }
    fn instance_norm_plus_backward(
        &self,
        x: &Tensor,
        alpha: &Tensor,
        gamma: &Tensor,
        gout: &Tensor,
    ) -> (Tensor, Tensor, Tensor, Tensor) {
        instance_norm_plus_backward(x, alpha, gamma, gout)
    }
    fn axpby(&self, a: f32, x: &Tensor, b: f32, y: &Tensor) -> Tensor {
        with_out(x.shape, |o| ops::axpby(a, &x.data, b, &y.data, o))
    }
    fn mul(&self, x: &Tensor, y: &Tensor) -> Tensor {
        with_out(x.shape, |o| {
            ops::broadcast(&x.data, &y.data, o, |p, q| p * q)
        })
    }
    fn div(&self, x: &Tensor, y: &Tensor) -> Tensor {
        with_out(x.shape, |o| {
            ops::broadcast(&x.data, &y.data, o, |p, q| p / q)
        })
    }
    fn mul_scalar(&self, x: &Tensor, c: f32) -> Tensor {
        with_out(x.shape, |o| ops::map(&x.data, o, |v| c * v))
    }
    fn div_scalar(&self, x: &Tensor, c: f32) -> Tensor {
        with_out(x.shape, |o| ops::map(&x.data, o, |v| v / c))
    }
    fn clamp(&self, x: &Tensor, lo: f32, hi: f32) -> Tensor {
        with_out(x.shape, |o| ops::map(&x.data, o, |v| v.clamp(lo, hi)))
    }
    fn scale_by_inverse_norm(&self, x: &Tensor, c: f32) -> Tensor {
        with_out(x.shape, |o| ops::scale_by_inverse_norm(x, c, o))
    }
    fn matmul(&self, x: &Tensor, a: &Tensor, transpose: bool, out_shape: [usize; 4]) -> Tensor {
        with_out(out_shape, |o| ops::matmul(x, a, transpose, o))
    }
    fn gaussian_score(
        &self,
        z: &Tensor,
        mean: Option<&Tensor>,
        var: &Tensor,
        a: f64,
        s: f64,
    ) -> Tensor {
        with_out(z.shape, |o| {
            ops::gaussian_score(&z.data, mean.map(|m| &m.data[..]), &var.data, a, s, o)
        })
    }
    fn all_finite(&self, ts: &[&Tensor]) -> crate::error::Result<bool> {
        Ok(ts.iter().all(|t| t.data.iter().all(|v| v.is_finite())))
    }
}

fn with_out(shape: [usize; 4], f: impl FnOnce(&mut [f32])) -> Tensor {
    let mut t = Tensor::zeros(shape);
    f(&mut t.data);
    t
}

/// The sampler's elementwise arithmetic on host slices, written once: the reference backend and the CPU
/// backend both call these, so they write the same bits (see the formulas on [`Backend`]'s methods).
pub mod ops {
    use crate::tensor::Tensor;

    /// `out = a x + b y`.
    pub fn axpby(a: f32, x: &[f32], b: f32, y: &[f32], out: &mut [f32]) {
        for ((o, &p), &q) in out.iter_mut().zip(x).zip(y) {
            *o = a * p + b * q;
        }
    }

    /// `out = f(x, y)` with `y` the length of `x` or of one item of it (repeated).
    pub fn broadcast(x: &[f32], y: &[f32], out: &mut [f32], f: impl Fn(f32, f32) -> f32) {
        if y.is_empty() {
            return;
        }
        for (oc, xc) in out.chunks_mut(y.len()).zip(x.chunks(y.len())) {
            for ((o, &p), &q) in oc.iter_mut().zip(xc).zip(y) {
                *o = f(p, q);
            }
        }
    }

    /// `out = f(x)`.
    pub fn map(x: &[f32], out: &mut [f32], f: impl Fn(f32) -> f32) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = f(v);
        }
    }

    /// Per item: `x_i * (c / ||x_i||)`, zero where the norm is zero (sum of squares in f64).
    pub fn scale_by_inverse_norm(x: &Tensor, c: f32, out: &mut [f32]) {
        let l = x.item_len();
        if l == 0 {
            return;
        }
        for (oc, xc) in out.chunks_mut(l).zip(x.data.chunks(l)) {
            let norm = libm::sqrt(xc.iter().map(|&q| q as f64 * q as f64).sum::<f64>()) as f32;
            let inv = if norm > 0.0 { c / norm } else { 0.0 };
            for (o, &q) in oc.iter_mut().zip(xc) {
                *o = q * inv;
            }
        }
    }

    /// Per item: `A x_i` or `A^T x_i` with `a` the row-major `m x d` matrix in `a.data`
    /// (`a.shape = [1, 1, m, d]`).
    pub fn matmul(x: &Tensor, a: &Tensor, transpose: bool, out: &mut [f32]) {
        let (m, d) = (a.shape[2], a.shape[3]);
        let (li, lo) = if transpose { (m, d) } else { (d, m) };
        if li == 0 || lo == 0 {
            return;
        }
        for (oc, xc) in out.chunks_mut(lo).zip(x.data.chunks(li)) {
            if transpose {
                oc.iter_mut().for_each(|v| *v = 0.0);
                for (rv, row) in xc.iter().zip(a.data.chunks_exact(d)) {
                    for (o, p) in oc.iter_mut().zip(row) {
                        *o += rv * p;
                    }
                }
            } else {
                for (o, row) in oc.iter_mut().zip(a.data.chunks_exact(d)) {
                    *o = row.iter().zip(xc).map(|(p, q)| p * q).sum();
                }
            }
        }
    }

    /// `-(z - a mean) / (a^2 var + s^2)` in f64, `mean` (0 if `None`) and `var` repeated per item.
    pub fn gaussian_score(
        z: &[f32],
        mean: Option<&[f32]>,
        var: &[f32],
        a: f64,
        s: f64,
        out: &mut [f32],
    ) {
        let l = var.len();
        if l == 0 {
            return;
        }
        for (k, (o, &zv)) in out.iter_mut().zip(z).enumerate() {
            let i = k % l;
            let v = var[i] as f64;
            let num = match mean {
                Some(mn) => zv as f64 - a * mn[i] as f64,
                None => zv as f64,
            };
            *o = (-num / (a * a * v + s * s)) as f32;
        }
    }
}

/// Output size of a stride-1 convolution.
pub fn conv_out(len: usize, k: usize, p: Conv2dParams) -> usize {
    (len + 2 * p.padding).saturating_sub(p.dilation * (k - 1))
}

/// Direct stride-1 convolution with zero padding and dilation.
pub fn conv2d(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, p: Conv2dParams) -> Tensor {
    let [n, ci, h, wd] = x.shape;
    let [co, wci, kh, kw] = w.shape;
    debug_assert_eq!(ci, wci);
    let ho = conv_out(h, kh, p);
    let wo = conv_out(wd, kw, p);
    let mut out = Tensor::zeros([n, co, ho, wo]);
    let (pad, dil) = (p.padding as isize, p.dilation as isize);
    for b in 0..n {
        for o in 0..co {
            let plane = &mut out.data[(b * co + o) * ho * wo..(b * co + o + 1) * ho * wo];
            if let Some(bias) = bias {
                plane.iter_mut().for_each(|v| *v = bias.data[o]);
            }
            for i in 0..ci {
                let src = &x.data[(b * ci + i) * h * wd..(b * ci + i + 1) * h * wd];
                for ky in 0..kh {
                    for kx in 0..kw {
                        let wv = w.data[((o * ci + i) * kh + ky) * kw + kx];
                        let dx = kx as isize * dil - pad;
                        let dy = ky as isize * dil - pad;
                        // ow range where 0 <= ow + dx < wd
                        let lo = (-dx).clamp(0, wo as isize) as usize;
                        let hi = (wd as isize - dx).clamp(0, wo as isize) as usize;
                        if lo >= hi {
                            continue;
                        }
                        for oy in 0..ho {
                            let iy = oy as isize + dy;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            let row = &src[iy as usize * wd..(iy as usize + 1) * wd];
                            let orow = &mut plane[oy * wo..(oy + 1) * wo];
                            for ox in lo..hi {
                                orow[ox] += wv * row[(ox as isize + dx) as usize];
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

/// 2x2 mean pooling, stride 2, summed in the order of ncsnv2's `ConvMeanPool`.
pub fn mean_pool2(x: &Tensor) -> Tensor {
    let [n, c, h, w] = x.shape;
    let mut out = Tensor::zeros([n, c, h / 2, w / 2]);
    mean_pool2_into(x, &mut out.data);
    out
}

/// [`mean_pool2`] into `out` (`n * c * (h / 2) * (w / 2)` values), for backends that own their buffers.
pub fn mean_pool2_into(x: &Tensor, out: &mut [f32]) {
    let [n, c, h, w] = x.shape;
    let (ho, wo) = (h / 2, w / 2);
    for p in 0..n * c {
        let s = &x.data[p * h * w..(p + 1) * h * w];
        let d = &mut out[p * ho * wo..(p + 1) * ho * wo];
        for y in 0..ho {
            for xx in 0..wo {
                let a = s[2 * y * w + 2 * xx];
                let b = s[(2 * y + 1) * w + 2 * xx];
                let cc = s[2 * y * w + 2 * xx + 1];
                let dd = s[(2 * y + 1) * w + 2 * xx + 1];
                d[y * wo + xx] = (((a + b) + cc) + dd) / 4.0;
            }
        }
    }
}

/// Stride-1 max pooling over a `k` x `k` window with `pad` cells of padding that never win.
pub fn max_pool(x: &Tensor, k: usize, pad: usize) -> Tensor {
    let [n, c, h, w] = x.shape;
    let ho = (h + 2 * pad + 1).saturating_sub(k);
    let wo = (w + 2 * pad + 1).saturating_sub(k);
    let mut out = Tensor::zeros([n, c, ho, wo]);
    for p in 0..n * c {
        let s = &x.data[p * h * w..(p + 1) * h * w];
        let d = &mut out.data[p * ho * wo..(p + 1) * ho * wo];
        for oy in 0..ho {
            let y0 = (oy as isize - pad as isize).max(0) as usize;
            let y1 = (oy + k - pad).min(h);
            for ox in 0..wo {
                let x0 = (ox as isize - pad as isize).max(0) as usize;
                let x1 = (ox + k - pad).min(w);
                let mut m = f32::NEG_INFINITY;
                for yy in y0..y1 {
                    for xx in x0..x1 {
                        let v = s[yy * w + xx];
                        if v > m || v.is_nan() {
                            m = v;
                        }
                    }
                }
                d[oy * wo + ox] = m;
            }
        }
    }
    out
}

/// Statistics of one image `[C, HW]` that InstanceNorm++ uses, in f64.
pub struct NormStats {
    /// per-channel mean over the pixels
    pub means: Vec<f64>,
    /// per-channel (biased) variance over the pixels, as `nn.InstanceNorm2d`
    pub vars: Vec<f64>,
    /// mean of the channel means
    pub m: f64,
    /// `sqrt(v + 1e-5)` with `v` the unbiased variance of the channel means, as `torch.var`
    pub vs: f64,
}

pub fn norm_stats(img: &[f32], c: usize, hw: usize) -> NormStats {
    let mut means = vec![0f64; c];
    let mut vars = vec![0f64; c];
    for (ch, plane) in img.chunks_exact(hw).take(c).enumerate() {
        let mean = plane.iter().map(|&v| v as f64).sum::<f64>() / hw as f64;
        vars[ch] = plane
            .iter()
            .map(|&v| (v as f64 - mean) * (v as f64 - mean))
            .sum::<f64>()
            / hw as f64;
        means[ch] = mean;
    }
    let m = means.iter().sum::<f64>() / c as f64;
    let v = means.iter().map(|&u| (u - m) * (u - m)).sum::<f64>() / (c as f64 - 1.0);
    NormStats {
        means,
        vars,
        m,
        vs: libm::sqrt(v + 1e-5),
    }
}

/// InstanceNorm++ of ermongroup/ncsnv2 (`InstanceNorm2dPlus`, bias = True), statistics in f64.
pub fn instance_norm_plus(x: &Tensor, alpha: &Tensor, gamma: &Tensor, beta: &Tensor) -> Tensor {
    let [n, c, h, w] = x.shape;
    let hw = h * w;
    let mut out = Tensor::zeros(x.shape);
    for b in 0..n {
        let NormStats { means, vars, m, vs } =
            norm_stats(&x.data[b * c * hw..(b + 1) * c * hw], c, hw);
        for ch in 0..c {
            let mt = (means[ch] - m) / vs;
            let inv = 1.0 / libm::sqrt(vars[ch] + 1e-5);
            let (a, g, be) = (
                alpha.data[ch] as f64,
                gamma.data[ch] as f64,
                beta.data[ch] as f64,
            );
            let s = &x.data[(b * c + ch) * hw..(b * c + ch + 1) * hw];
            let d = &mut out.data[(b * c + ch) * hw..(b * c + ch + 1) * hw];
            for (o, &v) in d.iter_mut().zip(s) {
                *o = (g * ((v as f64 - means[ch]) * inv + a * mt) + be) as f32;
            }
        }
    }
    out
}

/// ELU with alpha 1: `x` for `x > 0`, `exp(x) - 1` otherwise.
pub fn elu_scalar(v: f32) -> f32 {
    if v > 0.0 {
        v
    } else {
        libm::expm1f(v)
    }
}

pub fn elu(x: &Tensor) -> Tensor {
    Tensor {
        shape: x.shape,
        data: x.data.iter().map(|&v| elu_scalar(v)).collect(),
    }
}

/// Source index and weights of bilinear interpolation with `align_corners = True`, as PyTorch computes them.
pub fn bilinear_coeffs(out_len: usize, in_len: usize, i: usize) -> (usize, usize, f32, f32) {
    let scale = if out_len > 1 {
        (in_len as f32 - 1.0) / (out_len as f32 - 1.0)
    } else {
        0.0
    };
    let src = scale * i as f32;
    let i0 = (src as usize).min(in_len - 1);
    let i1 = if i0 + 1 < in_len { i0 + 1 } else { i0 };
    let l1 = src - i0 as f32;
    (i0, i1, 1.0 - l1, l1)
}

/// Bilinear resize with `align_corners = True` (`F.interpolate(mode='bilinear', align_corners=True)`).
pub fn resize_bilinear(x: &Tensor, ho: usize, wo: usize) -> Tensor {
    let [n, c, _, _] = x.shape;
    let mut out = Tensor::zeros([n, c, ho, wo]);
    resize_bilinear_into(x, ho, wo, &mut out.data);
    out
}

/// [`resize_bilinear`] into `out` (`n * c * ho * wo` values), for backends that own their buffers.
pub fn resize_bilinear_into(x: &Tensor, ho: usize, wo: usize, out: &mut [f32]) {
    let [n, c, h, w] = x.shape;
    for p in 0..n * c {
        let s = &x.data[p * h * w..(p + 1) * h * w];
        let d = &mut out[p * ho * wo..(p + 1) * ho * wo];
        for oy in 0..ho {
            let (y0, y1, ly0, ly1) = bilinear_coeffs(ho, h, oy);
            for ox in 0..wo {
                let (x0, x1, lx0, lx1) = bilinear_coeffs(wo, w, ox);
                d[oy * wo + ox] = ly0 * (lx0 * s[y0 * w + x0] + lx1 * s[y0 * w + x1])
                    + ly1 * (lx0 * s[y1 * w + x0] + lx1 * s[y1 * w + x1]);
            }
        }
    }
}

pub fn add(a: &Tensor, b: &Tensor) -> Tensor {
    Tensor {
        shape: a.shape,
        data: a.data.iter().zip(&b.data).map(|(x, y)| x + y).collect(),
    }
}

pub fn affine(x: &Tensor, scale: f32, shift: f32) -> Tensor {
    Tensor {
        shape: x.shape,
        data: x.data.iter().map(|&v| scale * v + shift).collect(),
    }
}

// ---------------------------------------------------------------------------------------------------
// Backward (vector–Jacobian products) of every operation: given the forward inputs and the gradient of a
// scalar loss with respect to the output, the gradients with respect to the inputs and parameters.
// ---------------------------------------------------------------------------------------------------

/// Gradients of a convolution: `(d x, d w, d bias)` with `d bias` shaped `[1, O, 1, 1]`.
pub fn conv2d_backward(
    x: &Tensor,
    w: &Tensor,
    gout: &Tensor,
    p: Conv2dParams,
) -> (Tensor, Tensor, Tensor) {
    let [n, ci, h, wd] = x.shape;
    let [co, _, kh, kw] = w.shape;
    let [_, _, ho, wo] = gout.shape;
    let mut gx = Tensor::zeros(x.shape);
    let mut gw = Tensor::zeros(w.shape);
    let mut gb = Tensor::zeros([1, co, 1, 1]);
    let (pad, dil) = (p.padding as isize, p.dilation as isize);
    for b in 0..n {
        for o in 0..co {
            let g = &gout.data[(b * co + o) * ho * wo..(b * co + o + 1) * ho * wo];
            gb.data[o] += g.iter().sum::<f32>();
            for i in 0..ci {
                let src = &x.data[(b * ci + i) * h * wd..(b * ci + i + 1) * h * wd];
                for ky in 0..kh {
                    for kx in 0..kw {
                        let widx = ((o * ci + i) * kh + ky) * kw + kx;
                        let wv = w.data[widx];
                        let dx = kx as isize * dil - pad;
                        let dy = ky as isize * dil - pad;
                        let lo = (-dx).clamp(0, wo as isize) as usize;
                        let hi = (wd as isize - dx).clamp(0, wo as isize) as usize;
                        let mut acc = 0f32;
                        for oy in 0..ho {
                            let iy = oy as isize + dy;
                            if iy < 0 || iy >= h as isize || lo >= hi {
                                continue;
                            }
                            let base = (b * ci + i) * h * wd + iy as usize * wd;
                            for ox in lo..hi {
                                let ix = (ox as isize + dx) as usize;
                                let gv = g[oy * wo + ox];
                                acc += gv * src[iy as usize * wd + ix];
                                gx.data[base + ix] += gv * wv;
                            }
                        }
                        gw.data[widx] += acc;
                    }
                }
            }
        }
    }
    (gx, gw, gb)
}

/// Gradient of 2x2 mean pooling.
pub fn mean_pool2_backward(gout: &Tensor, in_shape: [usize; 4]) -> Tensor {
    let [n, c, h, w] = in_shape;
    let (ho, wo) = (h / 2, w / 2);
    let mut gx = Tensor::zeros(in_shape);
    for p in 0..n * c {
        for y in 0..ho {
            for xx in 0..wo {
                let g = gout.data[p * ho * wo + y * wo + xx] / 4.0;
                for (dy, dx) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                    gx.data[p * h * w + (2 * y + dy) * w + 2 * xx + dx] += g;
                }
            }
        }
    }
    gx
}

/// The kernel that turns a stride-1 convolution's input gradient into a forward convolution:
/// `wt[i][o][y][x] = w[o][i][kh-1-y][kw-1-x]` (channels swapped, taps flipped).
pub fn flip_transpose(w: &Tensor) -> Tensor {
    let [co, ci, kh, kw] = w.shape;
    let mut wt = Tensor::zeros([ci, co, kh, kw]);
    for o in 0..co {
        for i in 0..ci {
            for y in 0..kh {
                for x in 0..kw {
                    wt.data[((i * co + o) * kh + y) * kw + x] =
                        w.data[((o * ci + i) * kh + (kh - 1 - y)) * kw + (kw - 1 - x)];
                }
            }
        }
    }
    wt
}

/// The padding under which [`conv2d`] with [`flip_transpose`]`(w)` gives the input gradient of a stride-1
/// convolution: `dilation (k - 1) - padding`. `None` where that is negative, the kernel is not square or
/// the forward output was empty.
pub fn backward_input_params(
    w_shape: [usize; 4],
    out_hw: [usize; 2],
    p: Conv2dParams,
) -> Option<Conv2dParams> {
    let [_, _, kh, kw] = w_shape;
    let reach = p.dilation * kh.checked_sub(1)?;
    if kh != kw || p.padding > reach || out_hw[0] == 0 || out_hw[1] == 0 {
        return None;
    }
    Some(Conv2dParams {
        padding: reach - p.padding,
        dilation: p.dilation,
    })
}

/// Input gradient of [`conv2d`] alone: a forward convolution of `gout` with the flipped, transposed kernel
/// (stride 1), or [`conv2d_backward`] where that does not apply.
pub fn conv2d_backward_input(
    w: &Tensor,
    gout: &Tensor,
    in_shape: [usize; 4],
    p: Conv2dParams,
) -> Tensor {
    let [_, _, ho, wo] = gout.shape;
    match backward_input_params(w.shape, [ho, wo], p) {
        Some(q) => conv2d(gout, &flip_transpose(w), None, q),
        None => conv2d_backward(&Tensor::zeros(in_shape), w, gout, p).0,
    }
}

/// Gradient of stride-1 max pooling: each output's gradient goes to the first maximum of its window (in
/// the scan order of [`max_pool`]).
pub fn max_pool_backward(x: &Tensor, gout: &Tensor, k: usize, pad: usize) -> Tensor {
    let [n, c, h, w] = x.shape;
    let [_, _, ho, wo] = gout.shape;
    let mut gx = Tensor::zeros(x.shape);
    for p in 0..n * c {
        max_pool_backward_plane(
            &x.data[p * h * w..(p + 1) * h * w],
            &gout.data[p * ho * wo..(p + 1) * ho * wo],
            &mut gx.data[p * h * w..(p + 1) * h * w],
            [h, w, ho, wo],
            k,
            pad,
        );
    }
    gx
}

/// [`max_pool_backward`] of one `h x w` plane (`gx` zeroed by the caller): each output's gradient goes to
/// the first maximum of its window.
fn max_pool_backward_plane(
    s: &[f32],
    g: &[f32],
    gx: &mut [f32],
    [h, w, ho, wo]: [usize; 4],
    k: usize,
    pad: usize,
) {
    for oy in 0..ho {
        let y0 = (oy as isize - pad as isize).max(0) as usize;
        let y1 = (oy + k - pad).min(h);
        for ox in 0..wo {
            let x0 = (ox as isize - pad as isize).max(0) as usize;
            let x1 = (ox + k - pad).min(w);
            let mut best = (f32::NEG_INFINITY, usize::MAX);
            for yy in y0..y1 {
                for xx in x0..x1 {
                    let v = s[yy * w + xx];
                    if v > best.0 || best.1 == usize::MAX {
                        best = (v, yy * w + xx);
                    }
                }
            }
            if best.1 != usize::MAX {
                gx[best.1] += g[oy * wo + ox];
            }
        }
    }
}

/// Gradient of ELU: `g` where `x > 0`, `g * exp(x)` elsewhere.
pub fn elu_backward(x: &Tensor, gout: &Tensor) -> Tensor {
    let data = x
        .data
        .iter()
        .zip(&gout.data)
        .map(|(&v, &g)| if v > 0.0 { g } else { g * libm::expf(v) })
        .collect();
    Tensor {
        shape: x.shape,
        data,
    }
}

/// Gradient of bilinear resize (`align_corners = True`) back to `in_shape`.
pub fn resize_bilinear_backward(gout: &Tensor, in_shape: [usize; 4]) -> Tensor {
    let [n, c, h, w] = in_shape;
    let [_, _, ho, wo] = gout.shape;
    let mut gx = Tensor::zeros(in_shape);
    for p in 0..n * c {
        for oy in 0..ho {
            let (y0, y1, ly0, ly1) = bilinear_coeffs(ho, h, oy);
            for ox in 0..wo {
                let (x0, x1, lx0, lx1) = bilinear_coeffs(wo, w, ox);
                let g = gout.data[p * ho * wo + oy * wo + ox];
                let d = &mut gx.data[p * h * w..(p + 1) * h * w];
                d[y0 * w + x0] += g * ly0 * lx0;
                d[y0 * w + x1] += g * ly0 * lx1;
                d[y1 * w + x0] += g * ly1 * lx0;
                d[y1 * w + x1] += g * ly1 * lx1;
            }
        }
    }
    gx
}

/// Gradients of InstanceNorm++: `(d x, d alpha, d gamma, d beta)`, parameters shaped `[1, C, 1, 1]`.
/// Derived by hand from the forward (all in f64):
/// `out = gamma (h + alpha mt) + beta`, `h = (x - mu_c) / sd_c`, `mt = (mu_c - m) / sqrt(v + eps)`.
pub fn instance_norm_plus_backward(
    x: &Tensor,
    alpha: &Tensor,
    gamma: &Tensor,
    gout: &Tensor,
) -> (Tensor, Tensor, Tensor, Tensor) {
    let [n, c, h, w] = x.shape;
    let hw = h * w;
    let hwf = hw as f64;
    let mut gx = Tensor::zeros(x.shape);
    let (mut ga, mut gg, mut gb) = (
        Tensor::zeros([1, c, 1, 1]),
        Tensor::zeros([1, c, 1, 1]),
        Tensor::zeros([1, c, 1, 1]),
    );
    let mut g_mu = vec![0f64; c]; // dL/d mu_c through the mean-correction path (mt)
    for b in 0..n {
        let st = norm_stats(&x.data[b * c * hw..(b + 1) * c * hw], c, hw);
        let (mu, mbar, s_v) = (&st.means, st.m, st.vs);
        let sd: Vec<f64> = st.vars.iter().map(|v| libm::sqrt(v + 1e-5)).collect();
        // gradient w.r.t. mt_c
        let mut g_mt = vec![0f64; c];
        for ch in 0..c {
            let (a, g) = (alpha.data[ch] as f64, gamma.data[ch] as f64);
            let xs = &x.data[(b * c + ch) * hw..(b * c + ch + 1) * hw];
            let go = &gout.data[(b * c + ch) * hw..(b * c + ch + 1) * hw];
            let sum_go: f64 = go.iter().map(|&q| q as f64).sum();
            let mt = (mu[ch] - mbar) / s_v;
            let sum_go_h: f64 = go
                .iter()
                .zip(xs)
                .map(|(&q, &xv)| q as f64 * (xv as f64 - mu[ch]) / sd[ch])
                .sum();
            gb.data[ch] += sum_go as f32;
            gg.data[ch] += (sum_go_h + a * mt * sum_go) as f32;
            ga.data[ch] += (g * mt * sum_go) as f32;
            g_mt[ch] = g * a * sum_go;
            // instance-norm part: dh -> dx (standard formula)
            let gh: Vec<f64> = go.iter().map(|&q| q as f64 * g).collect();
            let mean_gh = gh.iter().sum::<f64>() / hwf;
            let mean_gh_h = gh
                .iter()
                .zip(xs)
                .map(|(q, &xv)| q * (xv as f64 - mu[ch]) / sd[ch])
                .sum::<f64>()
                / hwf;
            let dst = &mut gx.data[(b * c + ch) * hw..(b * c + ch + 1) * hw];
            for ((d, q), &xv) in dst.iter_mut().zip(&gh).zip(xs) {
                let hv = (xv as f64 - mu[ch]) / sd[ch];
                *d = ((q - mean_gh - hv * mean_gh_h) / sd[ch]) as f32;
            }
        }
        // mt_c = (mu_c - mbar) / s_v: gradient to each mu_j
        let sum_gmt: f64 = g_mt.iter().sum();
        let dot: f64 = g_mt.iter().zip(mu).map(|(q, &u)| q * (u - mbar)).sum();
        for j in 0..c {
            // d mt_c / d mu_j = (delta_cj - 1/C) / s_v - (mu_c - mbar) (mu_j - mbar) / ((C-1) s_v^3)
            g_mu[j] = (g_mt[j] - sum_gmt / c as f64) / s_v
                - dot * (mu[j] - mbar) / ((c as f64 - 1.0) * s_v * s_v * s_v);
        }
        let image = &mut gx.data[b * c * hw..(b + 1) * c * hw];
        for (plane, gm) in image.chunks_exact_mut(hw).zip(&g_mu) {
            let add = (gm / hwf) as f32;
            plane.iter_mut().for_each(|d| *d += add);
        }
    }
    (gx, ga, gg, gb)
}

#[cfg(test)]
mod backward_tests {
    use super::*;
    use crate::rng::Rng;

    fn rand(shape: [usize; 4], seed: u64, scale: f32, shift: f32) -> Tensor {
        let mut t = Tensor::zeros(shape);
        let mut r = Rng::stream(seed, 5, 0);
        t.data
            .iter_mut()
            .for_each(|v| *v = shift + scale * r.normal() as f32);
        t
    }

    fn dot(a: &Tensor, b: &Tensor) -> f64 {
        a.data
            .iter()
            .zip(&b.data)
            .map(|(x, y)| *x as f64 * *y as f64)
            .sum()
    }

    fn axpy(x: &Tensor, v: &Tensor, e: f32) -> Tensor {
        Tensor {
            shape: x.shape,
            data: x.data.iter().zip(&v.data).map(|(a, b)| a + e * b).collect(),
        }
    }

    /// Directional finite difference of `L(x) = <g, f(x)>` along `v` (central, step `e`) against `<dx, v>`.
    fn check(
        name: &str,
        f: &dyn Fn(&Tensor) -> Tensor,
        x: &Tensor,
        g: &Tensor,
        dx: &Tensor,
        seed: u64,
    ) {
        let v = rand(x.shape, seed, 1.0, 0.0);
        let e = 1e-2f32;
        let fd = (dot(g, &f(&axpy(x, &v, e))) - dot(g, &f(&axpy(x, &v, -e)))) / (2.0 * e as f64);
        let an = dot(dx, &v);
        let rel = (fd - an).abs() / (an.abs().max(fd.abs()).max(1e-3));
        assert!(
            rel < 5e-3,
            "{name}: finite difference {fd} vs analytic {an} (rel {rel:e})"
        );
    }

    #[test]
    fn conv_backward_matches_finite_differences() {
        for p in [
            Conv2dParams::same3(1),
            Conv2dParams::same3(2),
            Conv2dParams::pointwise(),
        ] {
            let k = if p.padding == 0 { 1 } else { 3 };
            let x = rand([2, 3, 7, 6], 1, 1.0, 0.0);
            let w = rand([4, 3, k, k], 2, 0.5, 0.0);
            let b = rand([1, 4, 1, 1], 3, 0.5, 0.0);
            let out = conv2d(&x, &w, Some(&b), p);
            let g = rand(out.shape, 4, 1.0, 0.0);
            let (gx, gw, gb) = conv2d_backward(&x, &w, &g, p);
            check("conv dx", &|t| conv2d(t, &w, Some(&b), p), &x, &g, &gx, 10);
            check("conv dw", &|t| conv2d(&x, t, Some(&b), p), &w, &g, &gw, 11);
            check("conv db", &|t| conv2d(&x, &w, Some(t), p), &b, &g, &gb, 12);
        }
    }

    #[test]
    fn pooling_resize_elu_backward_match_finite_differences() {
        let x = rand([2, 3, 6, 8], 5, 1.0, 0.0);
        let g = rand([2, 3, 3, 4], 6, 1.0, 0.0);
        check(
            "mean pool",
            &mean_pool2,
            &x,
            &g,
            &mean_pool2_backward(&g, x.shape),
            13,
        );
        let gm = rand(x.shape, 7, 1.0, 0.0);
        // max pooling is piecewise linear: use distinct values 0.5 apart (a seeded permutation) so that the
        // finite-difference step (0.01 along a unit-normal direction) never changes a window's argmax
        let mut xs = x.clone();
        let nv = xs.data.len();
        let mut order: alloc::vec::Vec<usize> = (0..nv).collect();
        let mut r = Rng::stream(17, 5, 0);
        for i in (1..nv).rev() {
            order.swap(i, r.below(i as u64 + 1) as usize);
        }
        for (i, &o) in order.iter().enumerate() {
            xs.data[i] = 0.5 * o as f32 - 10.0;
        }
        check(
            "max pool",
            &|t| max_pool(t, 5, 2),
            &xs,
            &gm,
            &max_pool_backward(&xs, &gm, 5, 2),
            14,
        );
        check("elu", &elu, &x, &gm, &elu_backward(&x, &gm), 15);
        let gr = rand([2, 3, 11, 15], 8, 1.0, 0.0);
        check(
            "resize",
            &|t| resize_bilinear(t, 11, 15),
            &x,
            &gr,
            &resize_bilinear_backward(&gr, x.shape),
            16,
        );
    }

    #[test]
    fn instance_norm_plus_backward_matches_finite_differences() {
        let x = rand([2, 5, 4, 3], 9, 1.0, 0.3);
        let a = rand([1, 5, 1, 1], 10, 0.3, 1.0);
        let gm = rand([1, 5, 1, 1], 11, 0.3, 1.0);
        let be = rand([1, 5, 1, 1], 12, 0.3, 0.0);
        let g = rand(x.shape, 13, 1.0, 0.0);
        let (gx, ga, gg, gb) = instance_norm_plus_backward(&x, &a, &gm, &g);
        check(
            "norm dx",
            &|t| instance_norm_plus(t, &a, &gm, &be),
            &x,
            &g,
            &gx,
            20,
        );
        check(
            "norm dalpha",
            &|t| instance_norm_plus(&x, t, &gm, &be),
            &a,
            &g,
            &ga,
            21,
        );
        check(
            "norm dgamma",
            &|t| instance_norm_plus(&x, &a, t, &be),
            &gm,
            &g,
            &gg,
            22,
        );
        check(
            "norm dbeta",
            &|t| instance_norm_plus(&x, &a, &gm, t),
            &be,
            &g,
            &gb,
            23,
        );
    }
}
