//! Direct convolution for x86-64 with AVX2 + FMA (selected at run time): no im2col, no GEMM packing.
//!
//! Why: with im2col + `matrixmultiply`, a 3x3 convolution copies its input twice (the 9x im2col matrix, then
//! the crate's own packing of it), and on the small images jointdiff ships (28x28, 32 channels) those copies
//! cost as much as the arithmetic (perf: kernel 31%, im2col 16%, packing 15%). The crate has no entry point
//! for operands that are already packed, so this module computes the convolution directly:
//!
//! * the input is copied once into a zero-padded buffer (`Hp x Wp` per channel), so that the input value
//!   output pixel `(y, x)` needs for channel `c` and tap `(ky, kx)` sits at
//!   `c * Hp * Wp + (y + ky * d) * Wp + (x + kx * d)`: a per-pixel base plus a per-tap offset;
//! * the weights are repacked as `[co / 16][ci * kh * kw][16]` (zero columns pad `co` to a multiple of 16);
//! * a 6 x 16 micro-kernel (12 AVX accumulators) runs the whole reduction over `ci * kh * kw` for 6 output
//!   pixels and 16 output channels: per step 2 loads of weights, 6 broadcasts of input values, 12 FMAs.
//!   The 6 pixels are any 6 consecutive output pixels (they may span rows), so no work is wasted on padding
//!   columns; the bias is the accumulators' starting value.
//!
//! Every output value is the same sequence of FMAs whatever the thread count or tiling, so results are
//! bit-identical with 1 or many threads.
use crate::{CpuTensor, OutPtr};
use jointdiff_core::backend::Conv2dParams;
use jointdiff_core::reference;
use jointdiff_core::Tensor;
use rayon::prelude::*;
use std::sync::OnceLock;

/// Output pixels per micro-kernel block.
pub(crate) const MR: usize = 6;
/// Output channels per micro-kernel block (2 AVX vectors).
pub(crate) const NR: usize = 16;

/// Whether the CPU has AVX2 and FMA (checked once; `JOINTDIFF_CPU_KERNEL=portable` turns the path off).
pub(crate) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let wanted = std::env::var("JOINTDIFF_CPU_KERNEL").map_or(true, |v| v != "portable");
        wanted && detect()
    })
}

#[cfg(target_arch = "x86_64")]
fn detect() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> bool {
    false
}

/// A thread's reusable buffers for one call.
#[derive(Default)]
struct Scratch {
    offs: Vec<u32>,
    bases: Vec<u32>,
    bias: Vec<f32>,
    padded: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::Cell<Scratch> = std::cell::Cell::new(Scratch::default());
}

/// What every job of one convolution shares.
struct Plan<'a> {
    co: usize,
    /// output pixels per image
    hw: usize,
    /// reduction length `ci * kh * kw`
    kk: usize,
    /// input offset of each reduction index (channel, tap) from a pixel's base
    offs: &'a [u32],
    /// base of each output pixel in the padded plane
    bases: &'a [u32],
    /// `[co16 / 16][kk][16]`
    packed: &'a [f32],
    /// `co16` floats, zero beyond `co`
    bias: &'a [f32],
}

/// Stride-1 convolution (any kernel size, padding, dilation) by the direct AVX2 kernel.
///
/// # Panics
/// If `available()` is false (callers check it first).
pub(crate) fn conv2d(x: &Tensor, w: &CpuTensor, bias: Option<&Tensor>, p: Conv2dParams) -> Tensor {
    assert!(available(), "direct convolution needs AVX2 + FMA");
    let [n, ci, h, wd] = x.shape;
    let [co, _, kh, kw] = w.shape;
    let ho = reference::conv_out(h, kh, p);
    let wo = reference::conv_out(wd, kw, p);
    let mut out = crate::pool::zeros([n, co, ho, wo]);
    let hw = ho * wo;
    if hw == 0 || co == 0 {
        return out;
    }
    let (pad, d) = (p.padding, p.dilation);
    let (hp, wp) = (h + 2 * pad, wd + 2 * pad);
    let plane = hp * wp;
    let kk = ci * kh * kw;
    // this thread's buffers (offsets, pixel bases, bias, padded input), taken and put back
    let Scratch {
        mut offs,
        mut bases,
        bias: mut bias16,
        mut padded,
    } = SCRATCH.with(|s| s.take());
    offs.clear();
    for c in 0..ci {
        for ky in 0..kh {
            for kx in 0..kw {
                offs.push((c * plane + ky * d * wp + kx * d) as u32);
            }
        }
    }
    bases.clear();
    for y in 0..ho {
        bases.extend((y * wp..y * wp + wo).map(|b| b as u32));
    }
    let co16 = co.next_multiple_of(NR);
    bias16.clear();
    bias16.resize(co16, 0.0);
    if let Some(b) = bias {
        bias16[..co].copy_from_slice(&b.data[..co]);
    }
    // packed once per weight tensor (it is immutable), kept with it
    let packed = w
        .packs()
        .direct
        .get_or_init(|| pack_weights(&w.data[..co * kk], co, kk));
    // zero-padded input, one `ci x hp x wp` block per image
    let per_image = ci * plane;
    padded.clear();
    padded.resize(n * per_image, 0.0);
    for b in 0..n {
        let src = &x.data[b * ci * h * wd..(b + 1) * ci * h * wd];
        let dst = &mut padded[b * per_image..(b + 1) * per_image];
        for c in 0..ci {
            for y in 0..h {
                let o = c * plane + (y + pad) * wp + pad;
                dst[o..o + wd].copy_from_slice(&src[(c * h + y) * wd..(c * h + y + 1) * wd]);
            }
        }
    }
    let plan = Plan {
        co,
        hw,
        kk,
        offs: &offs,
        bases: &bases,
        packed,
        bias: &bias16,
    };
    // Jobs: runs of pixel blocks of one image, all output channels each; an image has at least 4 runs when
    // it has that many blocks, so that two threads share even one small image.
    let blocks = hw.div_ceil(MR);
    let run_blocks = blocks.div_ceil(4).clamp(1, 64);
    let runs = blocks.div_ceil(run_blocks);
    let optr = OutPtr(out.data.as_mut_ptr());
    let job = |j: usize| {
        let (b, r) = (j / runs, j % runs);
        let q0 = r * run_blocks * MR;
        let q1 = (q0 + run_blocks * MR).min(hw);
        let src = &padded[b * per_image..(b + 1) * per_image];
        // SAFETY: AVX2 + FMA are present (asserted above); every base + offset is inside the padded image
        // (valid output pixels read only the padded input); this job writes only image b's pixels
        // [q0, q1) of every output channel, which no other job writes.
        unsafe { run_avx2(&plan, src, q0, q1, optr.at(b * co * hw)) };
    };
    let jobs = n * runs;
    if jobs > 1 && co * kk * hw * n >= 1 << 18 {
        (0..jobs).into_par_iter().for_each(job);
    } else {
        (0..jobs).for_each(job);
    }
    SCRATCH.with(|s| {
        s.set(Scratch {
            offs,
            bases,
            bias: bias16,
            padded,
        })
    });
    out
}

/// `[co][kk]` row-major weights → `[co16 / 16][kk][16]`, zero columns beyond `co`.
fn pack_weights(w: &[f32], co: usize, kk: usize) -> Vec<f32> {
    let co16 = co.next_multiple_of(NR);
    let mut packed = vec![0f32; co16 * kk];
    for o in 0..co {
        let (blk, j) = (o / NR, o % NR);
        let dst = &mut packed[blk * kk * NR..(blk + 1) * kk * NR];
        for (k, &v) in w[o * kk..(o + 1) * kk].iter().enumerate() {
            dst[k * NR + j] = v;
        }
    }
    packed
}

/// Output pixels `[q0, q1)` of one image, all channels, written to `out` (`[co][hw]`).
///
/// # Safety
/// Needs AVX2 + FMA; `src` is the image's padded input, `out` its output block.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2(plan: &Plan, src: &[f32], q0: usize, q1: usize, out: *mut f32) {
    debug_assert!(plan.bases[q0..q1]
        .iter()
        .all(|&b| b as usize + *plan.offs.last().unwrap_or(&0) as usize <= src.len()));
    let mut tile = [[0f32; NR]; MR];
    for cb in 0..plan.co.div_ceil(NR) {
        let w = plan.packed.as_ptr().add(cb * plan.kk * NR);
        let bias = plan.bias.as_ptr().add(cb * NR);
        let nch = (plan.co - cb * NR).min(NR);
        let mut q = q0;
        while q < q1 {
            let npx = (q1 - q).min(MR);
            // the pixels' input pointers; a short last block repeats its last pixel
            let mut ptrs = [src.as_ptr(); MR];
            for (r, p) in ptrs.iter_mut().enumerate() {
                *p = src.as_ptr().add(plan.bases[q + r.min(npx - 1)] as usize);
            }
            micro_6x16(
                plan.kk,
                w,
                plan.offs.as_ptr(),
                &ptrs,
                bias,
                tile.as_mut_ptr().cast(),
                NR,
            );
            for (j, ch) in (cb * NR..cb * NR + nch).enumerate() {
                let row = out.add(ch * plan.hw + q);
                for (r, t) in tile.iter().enumerate().take(npx) {
                    *row.add(r) = t[j];
                }
            }
            q += npx;
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn run_avx2(_: &Plan, _: &[f32], _: usize, _: usize, _: *mut f32) {
    unreachable!("direct convolution is x86-64 only")
}

/// `c[r * ldc + j] = bias[j] + sum_k w[k][j] * ptrs[r][offs[k]]` for 6 pixels r and 16 channels j.
///
/// # Safety
/// Needs AVX2 + FMA; `w` covers `kk * 16` floats, `offs` `kk` entries, `ptrs[r] + offs[k]` must be
/// readable, `bias` 16 floats, `c` 6 rows of 16 floats `ldc` apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) unsafe fn micro_6x16(
    kk: usize,
    w: *const f32,
    offs: *const u32,
    ptrs: &[*const f32; MR],
    bias: *const f32,
    c: *mut f32,
    ldc: usize,
) {
    use std::arch::x86_64::*;
    let (b0, b1) = (_mm256_loadu_ps(bias), _mm256_loadu_ps(bias.add(8)));
    let mut acc = [b0, b1, b0, b1, b0, b1, b0, b1, b0, b1, b0, b1];
    let [p0, p1, p2, p3, p4, p5] = *ptrs;
    for k in 0..kk {
        let o = *offs.add(k) as usize;
        let wk = w.add(k * NR);
        let (w0, w1) = (_mm256_loadu_ps(wk), _mm256_loadu_ps(wk.add(8)));
        for (r, p) in [p0, p1, p2, p3, p4, p5].into_iter().enumerate() {
            let s = _mm256_broadcast_ss(&*p.add(o));
            acc[2 * r] = _mm256_fmadd_ps(s, w0, acc[2 * r]);
            acc[2 * r + 1] = _mm256_fmadd_ps(s, w1, acc[2 * r + 1]);
        }
    }
    for r in 0..MR {
        let row = c.add(r * ldc);
        _mm256_storeu_ps(row, acc[2 * r]);
        _mm256_storeu_ps(row.add(8), acc[2 * r + 1]);
    }
}
