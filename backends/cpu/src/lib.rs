//! jointdiff-cpu: the CPU backend every command uses by default.
//!
//! Convolutions are im2col + GEMM (the `matrixmultiply` crate), 1x1 convolutions a plain GEMM; batch items
//! run in parallel with rayon. Every item is computed by the same sequential code whatever the thread
//! count, so results are bit-identical with 1 or many threads. The remaining operations use the reference
//! loops of `jointdiff-core`, per item in parallel. (A later issue makes this backend fast: tiling, SIMD,
//! fused norm + activation, buffer reuse.)
use jointdiff_core::backend::{Backend, Conv2dParams};
use jointdiff_core::reference;
use jointdiff_core::Tensor;
use rayon::prelude::*;

#[derive(Debug, Clone, Copy, Default)]
pub struct CpuBackend;

/// Runs `f` on each batch item of `x` in parallel and stacks the results.
fn per_item(x: &Tensor, f: impl Fn(&Tensor) -> Tensor + Sync + Send) -> Tensor {
    let [n, c, h, w] = x.shape;
    if n == 1 {
        return f(x);
    }
    let outs: Vec<Tensor> = (0..n)
        .into_par_iter()
        .map(|i| {
            f(&Tensor {
                shape: [1, c, h, w],
                data: x.item(i).to_vec(),
            })
        })
        .collect();
    let s = outs[0].shape;
    let mut data = Vec::with_capacity(n * outs[0].data.len());
    for o in outs {
        data.extend_from_slice(&o.data);
    }
    Tensor {
        shape: [n, s[1], s[2], s[3]],
        data,
    }
}

/// Which GEMM the backend uses (reported by `jointdiff bench gemm`).
pub const GEMM_KERNEL: &str = "matrixmultiply 0.3 (single thread per call)";

/// `c[m x n] = a[m x k] * b[k x n]`, row-major, `c` overwritten: the backend's GEMM.
pub fn gemm(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    sgemm(m, k, n, a, b, c)
}

fn sgemm(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    // SAFETY: the asserts above guarantee every index the row-major strides reach is in bounds.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            n as isize,
            1,
            0.0,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// Convolution of one item by im2col + GEMM.
fn conv_item(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, p: Conv2dParams) -> Tensor {
    let [_, ci, h, wd] = x.shape;
    let [co, _, kh, kw] = w.shape;
    let ho = reference::conv_out(h, kh, p);
    let wo = reference::conv_out(wd, kw, p);
    let hw = ho * wo;
    let mut out = Tensor::zeros([1, co, ho, wo]);
    if kh == 1 && kw == 1 && p.padding == 0 {
        sgemm(co, ci, hw, &w.data, &x.data, &mut out.data);
    } else {
        let kk = ci * kh * kw;
        let mut col = vec![0f32; kk * hw];
        let (pad, dil) = (p.padding as isize, p.dilation as isize);
        for i in 0..ci {
            let src = &x.data[i * h * wd..(i + 1) * h * wd];
            for ky in 0..kh {
                for kx in 0..kw {
                    let row = &mut col[((i * kh + ky) * kw + kx) * hw..][..hw];
                    let dy = ky as isize * dil - pad;
                    let dx = kx as isize * dil - pad;
                    let lo = (-dx).clamp(0, wo as isize) as usize;
                    let hi = (wd as isize - dx).clamp(0, wo as isize) as usize;
                    for oy in 0..ho {
                        let iy = oy as isize + dy;
                        if iy < 0 || iy >= h as isize || lo >= hi {
                            continue;
                        }
                        let srow = &src[iy as usize * wd..];
                        let drow = &mut row[oy * wo..(oy + 1) * wo];
                        for ox in lo..hi {
                            drow[ox] = srow[(ox as isize + dx) as usize];
                        }
                    }
                }
            }
        }
        sgemm(co, kk, hw, &w.data, &col, &mut out.data);
    }
    if let Some(b) = bias {
        for (o, plane) in out.data.chunks_exact_mut(hw).enumerate() {
            let bv = b.data[o];
            plane.iter_mut().for_each(|v| *v += bv);
        }
    }
    out
}

impl Backend for CpuBackend {
    type Tensor = Tensor;

    fn name(&self) -> &'static str {
        "cpu"
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
        per_item(x, |xi| conv_item(xi, w, bias, p))
    }
    fn mean_pool2(&self, x: &Tensor) -> Tensor {
        reference::mean_pool2(x)
    }
    fn max_pool(&self, x: &Tensor, k: usize, pad: usize) -> Tensor {
        per_item(x, |xi| reference::max_pool(xi, k, pad))
    }
    fn instance_norm_plus(&self, x: &Tensor, a: &Tensor, g: &Tensor, b: &Tensor) -> Tensor {
        per_item(x, |xi| reference::instance_norm_plus(xi, a, g, b))
    }
    fn elu(&self, x: &Tensor) -> Tensor {
        reference::elu(x)
    }
    fn resize_bilinear(&self, x: &Tensor, h: usize, w: usize) -> Tensor {
        reference::resize_bilinear(x, h, w)
    }
    fn add(&self, a: &Tensor, b: &Tensor) -> Tensor {
        reference::add(a, b)
    }
    fn affine(&self, x: &Tensor, scale: f32, shift: f32) -> Tensor {
        reference::affine(x, scale, shift)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jointdiff_core::rng::Rng;
    use jointdiff_core::tensor::rel_max_err;

    fn rand(shape: [usize; 4], seed: u64) -> Tensor {
        let mut t = Tensor::zeros(shape);
        Rng::stream(seed, 9, 0).fill_normal(&mut t.data);
        t
    }

    #[test]
    fn conv_matches_reference() {
        for (ci, co, k, p, hw) in [
            (3, 5, 3, Conv2dParams::same3(1), 7),
            (4, 6, 3, Conv2dParams::same3(2), 9),
            (5, 3, 3, Conv2dParams::same3(4), 6),
            (7, 2, 1, Conv2dParams::pointwise(), 5),
        ] {
            let x = rand([3, ci, hw, hw + 1], 1);
            let w = rand([co, ci, k, k], 2);
            let b = rand([1, co, 1, 1], 3);
            let want = reference::conv2d(&x, &w, Some(&b), p);
            let got = CpuBackend.conv2d(&x, &w, Some(&b), p);
            assert_eq!(got.shape, want.shape);
            let e = rel_max_err(&got.data, &want.data);
            assert!(e < 1e-5, "conv {ci}->{co} k{k} {p:?}: {e}");
        }
    }
}
