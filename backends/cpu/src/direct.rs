//! Direct convolution for x86-64 (AVX2 + FMA or AVX-512F, selected at run time) and aarch64 (NEON): no
//! im2col, no GEMM packing.
//!
//! Why: with im2col + `matrixmultiply`, a 3x3 convolution copies its input twice (the 9x im2col matrix, then
//! the crate's own packing of it), and on the small images jointdiff ships (28x28, 32 channels) those copies
//! cost as much as the arithmetic (perf: kernel 31%, im2col 16%, packing 15%). The crate has no entry point
//! for operands that are already packed, so this module computes the convolution directly:
//!
//! * the input is copied once into a zero-padded buffer (`Hp x Wp` per channel), so that the input value
//!   output pixel `(y, x)` needs for channel `c` and tap `(ky, kx)` sits at
//!   `c * Hp * Wp + (y + ky * d) * Wp + (x + kx * d)`: a per-pixel base plus a per-tap offset;
//! * the weights are repacked as `[co / NR][ci * kh * kw][NR]` (zero columns pad `co` to a multiple of NR);
//! * the micro-kernel ([`micro`], one source for both widths, `crate::simd`) runs the reduction over
//!   `ci * kh * kw` for MR output pixels and NR output channels: per step 2 loads of weights, MR broadcasts
//!   of input values, 2 MR FMAs. The MR pixels are any MR consecutive output pixels (they may span rows), so
//!   no work is wasted on padding columns; the bias is the accumulators' starting value;
//! * a deep layer's reduction (NCSNv2 at ngf 128 reaches 256 channels x 9 taps = 2304) runs in chunks of
//!   [`KC_FLOATS`]` / NR` entries, so that one chunk's weights stay in L1/L2 while the job's pixels pass over
//!   them; the accumulators go to a per-job buffer between chunks and start the next chunk from there.
//!
//! Every output value is its bias plus the same FMAs in the same order whatever the thread count, the tiling,
//! the chunking or the vector width, so results are bit-identical across all of them.
use crate::simd::{self, Kernel, Simd};
use crate::{CpuTensor, OutPtr};
use jointdiff_core::backend::Conv2dParams;
use jointdiff_core::reference;
use jointdiff_core::Tensor;
use rayon::prelude::*;

/// One reduction chunk's weights, in floats (`KC_FLOATS / NR` reduction entries of NR channels): 36 KB, so
/// that they stay in L1/L2 while a job's pixel blocks pass over them.
pub(crate) const KC_FLOATS: usize = 9216;

/// Whether the vector kernels run here (AVX2 + FMA or NEON, and `JOINTDIFF_CPU_KERNEL` is not
/// `portable`).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // its callers are x86-64 code
pub(crate) fn available() -> bool {
    simd::kernel() != Kernel::Portable
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
    /// A job's accumulators between reduction chunks (taken and put back per job).
    static ACC: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
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
    /// `[co_nr / NR][kk][NR]` (empty on the pixel-vectorised path, which reads the raw weights)
    packed: &'a [f32],
    /// `co_nr` floats, zero beyond `co`
    bias: &'a [f32],
}

/// Stride-1 convolution (any kernel size, padding, dilation) by the direct kernel at width `k` (the backend
/// picks it: `crate::Path`).
///
/// # Panics
/// If the CPU cannot run `k`, or `k` is `Portable`.
pub(crate) fn conv2d(
    k: Kernel,
    x: &Tensor,
    w: &CpuTensor,
    bias: Option<&Tensor>,
    p: Conv2dParams,
) -> Tensor {
    assert!(
        k != Kernel::Portable && k.supported(),
        "direct convolution needs AVX2 + FMA or NEON"
    );
    let (mr, nr) = (k.mr(), k.nr());
    let [n, ci, h, wd] = x.shape;
    let [co, _, kh, kw] = w.shape;
    let ho = reference::conv_out(h, kh, p);
    let wo = reference::conv_out(wd, kw, p);
    let hw = ho * wo;
    if hw == 0 || co == 0 {
        return crate::pool::zeros([n, co, ho, wo]);
    }
    let (pad, d) = (p.padding, p.dilation);
    let (hp, wp) = (h + 2 * pad, wd + 2 * pad);
    let plane = hp * wp;
    let kk = ci * kh * kw;
    // this thread's buffers (offsets, pixel bases, bias, padded input), taken and put back
    let Scratch {
        mut offs,
        mut bases,
        bias: mut bias_nr,
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
    let co_nr = co.next_multiple_of(nr);
    bias_nr.clear();
    bias_nr.resize(co_nr, 0.0);
    if let Some(b) = bias {
        bias_nr[..co].copy_from_slice(&b.data[..co]);
    }
    // A few output channels (NCSNv2's last layer: 1 or 3) fill at most a quarter of the kernel's NR lanes:
    // vectorise over each row's pixels instead (from the raw weights), where a row holds a vector of them.
    let few = co * 4 <= nr && wo >= nr / 2;
    // else packed once per weight tensor and width (it is immutable), kept with it
    let packed: &[f32] = if few {
        &[]
    } else {
        w.packs().direct[crate::width_slot(k)]
            .get_or_init(|| pack_weights(&w.data[..co * kk], co, kk, nr))
    };
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
        bias: &bias_nr,
    };
    let len = n * co * hw;
    let mut data: Vec<f32> = crate::pool::with_capacity(len);
    let optr = OutPtr(data.as_mut_ptr());
    // Jobs: runs of pixel blocks (rows, for a few channels) of one image, all output channels each; an image
    // has at least 4 runs where it has that many blocks, so that two threads share even one small image. A
    // run holds at most 384 pixels, so that its accumulators (384 x NR floats) stay in L2.
    let blocks = if few { ho } else { hw.div_ceil(mr) };
    let run_blocks = if few {
        ho.div_ceil(4)
    } else {
        blocks.div_ceil(4).clamp(1, 384 / mr)
    };
    let runs = blocks.div_ceil(run_blocks);
    let raw = &w.data[..co * kk];
    let job = |j: usize| {
        let (b, r) = (j / runs, j % runs);
        let src = &padded[b * per_image..(b + 1) * per_image];
        // SAFETY: the CPU runs `k` (asserted above); every base + offset is inside the padded image (valid
        // output pixels read only the padded input); this job writes only image b's pixels of its run of
        // every output channel, which no other job writes.
        unsafe {
            let out = optr.at(b * co * hw);
            if few {
                let y0 = r * run_blocks;
                let ys = y0..(y0 + run_blocks).min(ho);
                rows(
                    k,
                    &plan,
                    &Rows {
                        w: raw,
                        src,
                        wo,
                        wp,
                        ys,
                    },
                    out,
                )
            } else {
                let q0 = r * run_blocks * mr;
                run(k, &plan, src, q0, (q0 + run_blocks * mr).min(hw), out)
            }
        }
    };
    // every output value is written (the runs cover each image's pixels, the blocks every channel)
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
            bias: bias_nr,
            padded,
        })
    });
    // SAFETY: the jobs wrote all `len` values (see above).
    unsafe { data.set_len(len) };
    Tensor {
        shape: [n, co, ho, wo],
        data,
    }
}

/// `[co][kk]` row-major weights → `[co_nr / nr][kk][nr]`, zero columns beyond `co`.
fn pack_weights(w: &[f32], co: usize, kk: usize, nr: usize) -> Vec<f32> {
    let co_nr = co.next_multiple_of(nr);
    let mut packed = vec![0f32; co_nr * kk];
    for o in 0..co {
        let (blk, j) = (o / nr, o % nr);
        let dst = &mut packed[blk * kk * nr..(blk + 1) * kk * nr];
        for (k, &v) in w[o * kk..(o + 1) * kk].iter().enumerate() {
            dst[k * nr + j] = v;
        }
    }
    packed
}

/// Output pixels `[q0, q1)` of one image, all channels, written to `out` (`[co][hw]`), at width `k`.
///
/// # Safety
/// The CPU runs `k` (not `Portable`); `src` is the image's padded input, `out` its output block.
unsafe fn run(k: Kernel, plan: &Plan, src: &[f32], q0: usize, q1: usize, out: *mut f32) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(plan: &Plan, src: &[f32], q0: usize, q1: usize, out: *mut f32) {
            run_pixels::<simd::Avx2, { simd::MR_AVX2 }>(plan, src, q0, q1, out)
        }
        #[target_feature(enable = "avx512f,avx2,fma")]
        unsafe fn avx512(plan: &Plan, src: &[f32], q0: usize, q1: usize, out: *mut f32) {
            run_pixels::<simd::Avx512, { simd::MR_AVX512 }>(plan, src, q0, q1, out)
        }
        match k {
            Kernel::Avx2 => avx2(plan, src, q0, q1, out),
            Kernel::Avx512 => avx512(plan, src, q0, q1, out),
            Kernel::Neon | Kernel::Portable => unreachable!("not an x86-64 kernel: {k:?}"),
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        match k {
            // NEON is part of every aarch64 target Rust builds for: no target_feature function needed
            Kernel::Neon => run_pixels::<simd::Neon, { simd::MR_NEON }>(plan, src, q0, q1, out),
            _ => unreachable!("not an aarch64 kernel: {k:?}"),
        }
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let _ = (k, plan, src, q0, q1, out);
        unreachable!("direct convolution is x86-64 and aarch64 only")
    }
}

/// One job of the pixel-vectorised path: output rows `ys` of one image, from its padded input `src` (rows
/// `wp` apart) and the raw `[co][kk]` weights `w`; output rows of `wo` pixels.
struct Rows<'a> {
    w: &'a [f32],
    src: &'a [f32],
    wo: usize,
    wp: usize,
    ys: std::ops::Range<usize>,
}

/// The rows of `job`, every output channel, written to `out` (`[co][hw]`), at width `k`, vectorised over
/// each row's pixels ([`rows_at`]).
///
/// # Safety
/// The CPU runs `k` (not `Portable`); `out` is the image's output block; every output row holds at least
/// `k.nr() / 2` pixels (a vector).
unsafe fn rows(k: Kernel, plan: &Plan, job: &Rows, out: *mut f32) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(plan: &Plan, job: &Rows, out: *mut f32) {
            rows_at::<simd::Avx2>(plan, job, out)
        }
        #[target_feature(enable = "avx512f,avx2,fma")]
        unsafe fn avx512(plan: &Plan, job: &Rows, out: *mut f32) {
            rows_at::<simd::Avx512>(plan, job, out)
        }
        match k {
            Kernel::Avx2 => avx2(plan, job, out),
            Kernel::Avx512 => avx512(plan, job, out),
            Kernel::Neon | Kernel::Portable => unreachable!("not an x86-64 kernel: {k:?}"),
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        match k {
            Kernel::Neon => rows_at::<simd::Neon>(plan, job, out),
            _ => unreachable!("not an aarch64 kernel: {k:?}"),
        }
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let _ = (k, plan, job, out);
        unreachable!("direct convolution is x86-64 and aarch64 only")
    }
}

/// [`rows`] at `S`'s width: each row in vectors of `LANES` consecutive pixels (the last one overlapping
/// the one before where the row is not a multiple of `LANES`: those pixels are computed twice, alike), up
/// to 4 vectors per weight broadcast. Each value is its bias plus `w[o][k] * input` over the reduction in
/// the order of `k`, one FMA each, as [`micro`] computes it: the same bits as the channel-vectorised path.
#[inline(always)]
unsafe fn rows_at<S: Simd>(plan: &Plan, job: &Rows, out: *mut f32) {
    let (l, wo) = (S::LANES, job.wo);
    let vectors = wo.div_ceil(l);
    for o in 0..plan.co {
        let wrow = job.w.as_ptr().add(o * plan.kk);
        let bias = plan.bias.as_ptr().add(o);
        for y in job.ys.clone() {
            let base = job.src.as_ptr().add(y * job.wp);
            let dst = out.add(o * plan.hw + y * wo);
            let mut v = 0;
            while v < vectors {
                let g = (vectors - v).min(4);
                // the vectors' first pixels (the last one pulled back to end at the row's end)
                let xs: [usize; 4] = std::array::from_fn(|i| ((v + i.min(g - 1)) * l).min(wo - l));
                match g {
                    4 => row_vectors::<S, 4>(plan, wrow, bias, base, &xs, dst),
                    3 => row_vectors::<S, 3>(plan, wrow, bias, base, &xs, dst),
                    2 => row_vectors::<S, 2>(plan, wrow, bias, base, &xs, dst),
                    _ => row_vectors::<S, 1>(plan, wrow, bias, base, &xs, dst),
                }
                v += g;
            }
        }
    }
}

/// `G` vectors of one row: pixels `xs[i]..xs[i] + LANES`, from the bias through the reduction, stored at
/// `dst + xs[i]`.
#[inline(always)]
unsafe fn row_vectors<S: Simd, const G: usize>(
    plan: &Plan,
    wrow: *const f32,
    bias: *const f32,
    base: *const f32,
    xs: &[usize; 4],
    dst: *mut f32,
) {
    let mut acc = [S::splat(bias); G];
    for k in 0..plan.kk {
        let wv = S::splat(wrow.add(k));
        let off = *plan.offs.get_unchecked(k) as usize;
        for (a, &x) in acc.iter_mut().zip(xs) {
            // (input, weight) as `micro` multiplies them
            *a = S::fmadd(S::load(base.add(x + off)), wv, *a);
        }
    }
    for (a, &x) in acc.iter().zip(xs) {
        S::store(dst.add(x), *a);
    }
}

/// [`run`] at `S`'s width with `MR` pixels per block (inlined into the width's `target_feature` function).
#[inline(always)]
unsafe fn run_pixels<S: Simd, const MR: usize>(
    plan: &Plan,
    src: &[f32],
    q0: usize,
    q1: usize,
    out: *mut f32,
) {
    let nr = 2 * S::LANES;
    debug_assert!(plan.bases[q0..q1]
        .iter()
        .all(|&b| b as usize + *plan.offs.last().unwrap_or(&0) as usize <= src.len()));
    let blocks = (q1 - q0).div_ceil(MR);
    // accumulators of the whole run, [blocks * MR][nr] (a short last block fills its rows past q1 with a
    // repeat of its last pixel; they are never read out)
    let mut acc = ACC.with(|a| a.take());
    acc.resize(acc.len().max(blocks * MR * nr), 0.0);
    let kc = (KC_FLOATS / nr).max(1);
    for cb in 0..plan.co.div_ceil(nr) {
        let w = plan.packed.as_ptr().add(cb * plan.kk * nr);
        let bias = plan.bias.as_ptr().add(cb * nr);
        let nch = (plan.co - cb * nr).min(nr);
        let mut k0 = 0;
        loop {
            let len = kc.min(plan.kk - k0);
            for blk in 0..blocks {
                let q = q0 + blk * MR;
                let npx = (q1 - q).min(MR);
                // the pixels' input pointers; a short last block repeats its last pixel
                let ptrs: [*const f32; MR] = std::array::from_fn(|r| {
                    src.as_ptr().add(plan.bases[q + r.min(npx - 1)] as usize)
                });
                let tile = acc.as_mut_ptr().add(blk * MR * nr);
                // the first chunk starts from the bias (the same row for every pixel), the others from
                // the accumulators the chunk before left
                let (init, ldi) = if k0 == 0 {
                    (bias, 0)
                } else {
                    (tile.cast_const(), nr)
                };
                micro::<S, MR>(
                    len,
                    w.add(k0 * nr),
                    plan.offs.as_ptr().add(k0),
                    &ptrs,
                    init,
                    ldi,
                    tile,
                    nr,
                    // the first block of a chunk brings in the next chunk (the rest find it in L1)
                    if blk == 0 { len * nr } else { 0 },
                );
            }
            k0 += len;
            if k0 >= plan.kk {
                break;
            }
        }
        // [pixel][channel] → out[channel][pixel]
        for j in 0..nch {
            let row = out.add((cb * nr + j) * plan.hw + q0);
            for r in 0..q1 - q0 {
                *row.add(r) = *acc.get_unchecked(r * nr + j);
            }
        }
    }
    ACC.with(|a| a.set(acc));
}

/// `c[r * ldc + j] = init[r * ldi + j] + sum_k w[k * NR + j] * ptrs[r][offs[k]]` for MR pixels `r` and
/// `NR = 2 * S::LANES` channels `j`, the sum in the order of `k`. `ldi = 0` starts every row from the same
/// values (a bias); `init` may be `c` (a chunk continuing where the last one stopped). A null `offs` means
/// the identity (`offs[k] = k`: rows of consecutive values, as Winograd's transformed input), with no offset
/// loads in the loop. `pf` (floats, 0 for none) is how far past each row of `w` the panel the caller runs
/// next starts: the kernel prefetches it into L1 as it goes, so that the next call does not wait for its
/// weights (a hint only; results do not depend on it).
///
/// # Safety
/// Needs `S`'s CPU features (inlined into a function compiled for them); `w` covers `kk * NR` floats, `offs`
/// `kk` entries (or is null), `ptrs[r] + offs[k]` must be readable, `init` MR rows of NR floats `ldi` apart, `c` MR rows
/// of NR floats `ldc` apart.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn micro<S: Simd, const MR: usize>(
    kk: usize,
    w: *const f32,
    offs: *const u32,
    ptrs: &[*const f32; MR],
    init: *const f32,
    ldi: usize,
    c: *mut f32,
    ldc: usize,
    pf: usize,
) {
    let l = S::LANES;
    let mut acc: [[S::V; 2]; MR] = std::array::from_fn(|r| {
        let row = init.add(r * ldi);
        [S::load(row), S::load(row.add(l))]
    });
    for k in 0..kk {
        let o = if offs.is_null() {
            k
        } else {
            *offs.add(k) as usize
        };
        let wk = w.add(k * 2 * l);
        if pf != 0 {
            // one cache line per 16 floats of the row (64 bytes)
            for line in (0..2 * l).step_by(16) {
                S::prefetch(wk.wrapping_add(pf + line));
            }
        }
        let (w0, w1) = (S::load(wk), S::load(wk.add(l)));
        for (a, p) in acc.iter_mut().zip(ptrs) {
            let s = S::splat(p.add(o));
            a[0] = S::fmadd(s, w0, a[0]);
            a[1] = S::fmadd(s, w1, a[1]);
        }
    }
    for (r, a) in acc.iter().enumerate() {
        let row = c.add(r * ldc);
        S::store(row, a[0]);
        S::store(row.add(l), a[1]);
    }
}
