//! Direct convolution for x86-64 with AVX2 + FMA (selected at run time): no im2col, no GEMM packing.
//!
//! Why: with im2col + `matrixmultiply`, a 3x3 convolution copies its input twice (the 9x im2col matrix, then
//! the crate's own packing of it), and on the small images jointdiff ships (28x28, 32 channels) those copies
//! cost as much as the arithmetic (perf: kernel 31%, im2col 16%, packing 15%). The crate has no entry point
//! for operands that are already packed, so this module computes the convolution directly:
//!
//! * the input is copied once into a zero-padded buffer (`Hp x Wp` per channel);
//! * output pixels are numbered over the *padded* width (`y * Wp + x`, the columns `x >= Wo` are computed and
//!   thrown away), so that for every tap `(ky, kx)` and channel `c` the 24 input values a block of 24 output
//!   pixels needs are one contiguous run at `c * Hp * Wp + ky * d * Wp + kx * d + p0`;
//! * the weights are packed as `[co / 4][ci * kh * kw][4]` (zero rows pad `co` to a multiple of 4);
//! * a 4 x 24 micro-kernel (12 AVX accumulators) runs the whole reduction over `ci * kh * kw` for one block
//!   of 4 output channels and 24 pixels: per step 3 loads of input, 4 broadcasts of weights, 12 FMAs.
//!
//! Every output value is the same sequence of FMAs whatever the thread count or tiling, so results are
//! bit-identical with 1 or many threads.
use crate::OutPtr;
use jointdiff_core::backend::Conv2dParams;
use jointdiff_core::reference;
use jointdiff_core::Tensor;
use rayon::prelude::*;
use std::cell::RefCell;

/// Output channels per micro-kernel block.
const MR: usize = 3;
/// Output pixels per micro-kernel block (3 AVX vectors).
const NR: usize = 24;

/// Whether the CPU has AVX2 and FMA (checked once; `JOINTDIFF_CPU_KERNEL=portable` turns the path off).
pub(crate) fn available() -> bool {
    use std::sync::OnceLock;
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

thread_local! {
    static OUT_SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The convolution's geometry over the padded input.
struct Geometry {
    co: usize,
    /// padded plane: `hp * wp` floats per channel
    wp: usize,
    plane: usize,
    ho: usize,
    wo: usize,
    /// output positions over the padded width: `ho * wp`
    len: usize,
    /// reduction length `ci * kh * kw`
    kk: usize,
}

/// Stride-1 convolution (any kernel size, padding, dilation) by the direct AVX2 kernel.
///
/// # Panics
/// If `available()` is false (callers check it first).
pub(crate) fn conv2d(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, p: Conv2dParams) -> Tensor {
    assert!(available(), "direct convolution needs AVX2 + FMA");
    let [n, ci, h, wd] = x.shape;
    let [co, _, kh, kw] = w.shape;
    let ho = reference::conv_out(h, kh, p);
    let wo = reference::conv_out(wd, kw, p);
    let mut out = Tensor::zeros([n, co, ho, wo]);
    if ho * wo == 0 || co == 0 {
        return out;
    }
    let (pad, d) = (p.padding, p.dilation);
    let (hp, wp) = (h + 2 * pad, wd + 2 * pad);
    let g = Geometry {
        co,
        wp,
        plane: hp * wp,
        ho,
        wo,
        len: ho * wp,
        kk: ci * kh * kw,
    };
    // input offset of each reduction index k = (c, ky, kx)
    let mut offs = Vec::with_capacity(g.kk);
    for c in 0..ci {
        for ky in 0..kh {
            for kx in 0..kw {
                offs.push(c * g.plane + ky * d * wp + kx * d);
            }
        }
    }
    let packed = pack_weights(&w.data, co, g.kk);
    let blocks = g.len.div_ceil(NR);
    // the last block reads up to `max offset + blocks * NR`; zeros beyond the padded planes
    let max_off = offs.last().copied().unwrap_or(0);
    let per_image = (max_off + blocks * NR).max(ci * g.plane);
    let mut padded = vec![0f32; n * per_image];
    for b in 0..n {
        let src = &x.data[b * ci * h * wd..(b + 1) * ci * h * wd];
        let dst = &mut padded[b * per_image..];
        for c in 0..ci {
            for y in 0..h {
                let o = c * g.plane + (y + pad) * wp + pad;
                dst[o..o + wd].copy_from_slice(&src[(c * h + y) * wd..(c * h + y + 1) * wd]);
            }
        }
    }
    // Jobs: runs of pixel blocks of one image, all output channels each. A run covers about 8 rows of the
    // padded image (its input stays in cache across the channel blocks), and an image has at least 4 runs
    // when it has that many blocks, so that two threads share even one small image.
    let rows_blocks = (8 * wp).div_ceil(NR);
    let run_blocks = rows_blocks.min(blocks.div_ceil(4)).max(1);
    let runs = blocks.div_ceil(run_blocks);
    let optr = OutPtr(out.data.as_mut_ptr());
    let job = |j: usize| {
        let (b, r) = (j / runs, j % runs);
        let b0 = r * run_blocks;
        let b1 = (b0 + run_blocks).min(blocks);
        let src = &padded[b * per_image..(b + 1) * per_image];
        OUT_SCRATCH.with(|s| {
            let mut scratch = s.borrow_mut();
            let width = (b1 - b0) * NR;
            let need = co.next_multiple_of(MR) * width;
            if scratch.len() < need {
                scratch.resize(need, 0.0);
            }
            // SAFETY: AVX2 + FMA are present (asserted above); `src` covers every offset + 24 the blocks
            // read (per_image), `packed` covers `co4 * kk` floats, `scratch` covers `co4 * width`.
            unsafe { run_blocks_avx2(&g, &offs, &packed, src, b0, b1, &mut scratch[..need]) };
            // SAFETY: this job writes only image b's output pixels of its own blocks.
            let obase = unsafe { optr.at(b * co * ho * wo) };
            scatter(&g, bias, &scratch[..need], b0 * NR, width, obase);
        });
    };
    let jobs = n * runs;
    if crate::may_split() && jobs > 1 && co * g.kk * ho * wo * n >= 1 << 18 {
        (0..jobs).into_par_iter().for_each(job);
    } else {
        (0..jobs).for_each(job);
    }
    out
}

/// `[co][kk]` row-major weights → `[co4 / 4][kk][4]`, zero rows beyond `co`.
fn pack_weights(w: &[f32], co: usize, kk: usize) -> Vec<f32> {
    let co4 = co.next_multiple_of(MR);
    let mut packed = vec![0f32; co4 * kk];
    for o in 0..co {
        let (blk, r) = (o / MR, o % MR);
        let dst = &mut packed[blk * kk * MR..(blk + 1) * kk * MR];
        for (k, &v) in w[o * kk..(o + 1) * kk].iter().enumerate() {
            dst[k * MR + r] = v;
        }
    }
    packed
}

/// Copies the valid pixels (`x < wo`) of positions `[q0, q0 + width)` from `scratch` (`[co4][width]`)
/// into one image's output, adding the bias.
fn scatter(
    g: &Geometry,
    bias: Option<&Tensor>,
    scratch: &[f32],
    q0: usize,
    width: usize,
    obase: *mut f32,
) {
    let q1 = (q0 + width).min(g.len);
    for o in 0..g.co {
        let bv = bias.map_or(0.0, |t| t.data[o]);
        let srow = &scratch[o * width..(o + 1) * width];
        let mut q = q0;
        while q < q1 {
            let (y, x) = (q / g.wp, q % g.wp);
            let end = (q - x + g.wp).min(q1);
            if x < g.wo {
                let stop = (q - x + g.wo).min(end);
                let n = stop - q;
                // SAFETY: pixel (y, x..x + n) of channel o lies inside the image's [co, ho, wo] block, and
                // no other job writes the positions of this job's blocks.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(obase.add((o * g.ho + y) * g.wo + x), n)
                };
                for (d, &s) in dst.iter_mut().zip(&srow[q - q0..q - q0 + n]) {
                    *d = s + bv;
                }
            }
            q = end;
        }
    }
}

/// All channel blocks for pixel blocks `[b0, b1)`: `scratch[o][j]` = output channel `o` at position
/// `b0 * NR + j`.
///
/// # Safety
/// Needs AVX2 + FMA; the slices must have the sizes `conv2d` gives them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_blocks_avx2(
    g: &Geometry,
    offs: &[usize],
    packed: &[f32],
    src: &[f32],
    b0: usize,
    b1: usize,
    scratch: &mut [f32],
) {
    let width = (b1 - b0) * NR;
    let co4 = g.co.next_multiple_of(MR);
    debug_assert!(scratch.len() >= co4 * width && packed.len() >= co4 * g.kk);
    debug_assert!(offs.iter().all(|&o| o + b1 * NR <= src.len()));
    for blk in 0..co4 / MR {
        let a = packed.as_ptr().add(blk * g.kk * MR);
        for pb in b0..b1 {
            let c = scratch.as_mut_ptr().add(blk * MR * width + (pb - b0) * NR);
            micro_4x24(g.kk, a, offs.as_ptr(), src.as_ptr().add(pb * NR), c, width);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn run_blocks_avx2(
    _: &Geometry,
    _: &[usize],
    _: &[f32],
    _: &[f32],
    _: usize,
    _: usize,
    _: &mut [f32],
) {
    unreachable!("direct convolution is x86-64 only")
}

/// `c[r][0..24] = sum_k a[k][r] * src[offs[k] .. offs[k] + 24]` for r in 0..4 (rows `ldc` apart).
///
/// # Safety
/// Needs AVX2 + FMA; `a` covers `kk * 4` floats, `offs` `kk` entries, `src + offs[k]` 24 floats each,
/// `c` four rows of 24.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn micro_4x24(
    kk: usize,
    a: *const f32,
    offs: *const usize,
    src: *const f32,
    c: *mut f32,
    ldc: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_ps(); 3 * MR];
    for k in 0..kk {
        let b = src.add(*offs.add(k));
        let v0 = _mm256_loadu_ps(b);
        let v1 = _mm256_loadu_ps(b.add(8));
        let v2 = _mm256_loadu_ps(b.add(16));
        let ap = a.add(k * MR);
        for r in 0..MR {
            let s = _mm256_broadcast_ss(&*ap.add(r));
            acc[3 * r] = _mm256_fmadd_ps(s, v0, acc[3 * r]);
            acc[3 * r + 1] = _mm256_fmadd_ps(s, v1, acc[3 * r + 1]);
            acc[3 * r + 2] = _mm256_fmadd_ps(s, v2, acc[3 * r + 2]);
        }
    }
    for r in 0..MR {
        let row = c.add(r * ldc);
        _mm256_storeu_ps(row, acc[3 * r]);
        _mm256_storeu_ps(row.add(8), acc[3 * r + 1]);
        _mm256_storeu_ps(row.add(16), acc[3 * r + 2]);
    }
}
