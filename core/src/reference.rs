//! The reference backend: every operation as plain, obviously-correct loops on host memory.
//!
//! It is the oracle the fast backends are tested against, and it is itself tested against fixtures made
//! by an independent PyTorch implementation (tests/golden.rs). Each operation is also a public function
//! so that other host backends can fall back to it.
use crate::backend::{Backend, Conv2dParams};
use crate::tensor::Tensor;
use alloc::vec;

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
    fn download(&self, t: &Tensor) -> Tensor {
        t.clone()
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
    let (ho, wo) = (h / 2, w / 2);
    let mut out = Tensor::zeros([n, c, ho, wo]);
    for p in 0..n * c {
        let s = &x.data[p * h * w..(p + 1) * h * w];
        let d = &mut out.data[p * ho * wo..(p + 1) * ho * wo];
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
    out
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

/// InstanceNorm++ of ermongroup/ncsnv2 (`InstanceNorm2dPlus`, bias = True), statistics in f64.
pub fn instance_norm_plus(x: &Tensor, alpha: &Tensor, gamma: &Tensor, beta: &Tensor) -> Tensor {
    let [n, c, h, w] = x.shape;
    let hw = h * w;
    let mut out = Tensor::zeros(x.shape);
    let mut means = vec![0f64; c];
    let mut vars = vec![0f64; c];
    for b in 0..n {
        for ch in 0..c {
            let s = &x.data[(b * c + ch) * hw..(b * c + ch + 1) * hw];
            let mean = s.iter().map(|&v| v as f64).sum::<f64>() / hw as f64;
            let var = s
                .iter()
                .map(|&v| (v as f64 - mean) * (v as f64 - mean))
                .sum::<f64>()
                / hw as f64;
            means[ch] = mean;
            vars[ch] = var;
        }
        let m = means.iter().sum::<f64>() / c as f64;
        // unbiased variance over channels, as torch.var
        let v = means.iter().map(|&u| (u - m) * (u - m)).sum::<f64>() / (c as f64 - 1.0);
        let vs = libm::sqrt(v + 1e-5);
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
    let [n, c, h, w] = x.shape;
    let mut out = Tensor::zeros([n, c, ho, wo]);
    for p in 0..n * c {
        let s = &x.data[p * h * w..(p + 1) * h * w];
        let d = &mut out.data[p * ho * wo..(p + 1) * ho * wo];
        for oy in 0..ho {
            let (y0, y1, ly0, ly1) = bilinear_coeffs(ho, h, oy);
            for ox in 0..wo {
                let (x0, x1, lx0, lx1) = bilinear_coeffs(wo, w, ox);
                d[oy * wo + ox] = ly0 * (lx0 * s[y0 * w + x0] + lx1 * s[y0 * w + x1])
                    + ly1 * (lx0 * s[y1 * w + x0] + lx1 * s[y1 * w + x1]);
            }
        }
    }
    out
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
