//! Winograd F(2x2, 3x3) convolution for x86-64 (AVX2 + FMA, its products at AVX-512 where that runs): 3x3
//! kernels, stride 1, padding equal to the dilation ("same"), input channels a multiple of 8. These are most
//! of NCSNv2's arithmetic, deep layers (256 channels at ngf 128) included.
//!
//! Each 2x2 block of output pixels ("tile") comes from a 4x4 block of input. With the transforms of Lavin &
//! Gray (2016), `Y = A^T [ sum_c (G g_c G^T) ⊙ (B^T d_c B) ] A`, the 36 multiplications per output pair
//! (tile, input channel) of a direct 3x3 convolution become 16: the reduction over input channels turns into
//! 16 independent products `M_xi[tile][co] = sum_c V_xi[tile][c] U_xi[c][co]`, one per position xi of the
//! 4x4 transform, which run on the direct path's micro-kernel (`direct::micro`, MR tiles x NR channels at
//! the process's vector width). The transforms are exact in binary (they only add, subtract and halve);
//! rounding differs from the direct sum by a few ulps. The transforms run 8 channels per vector at either
//! width (they are a small part of the time), so the two widths give the same bits.
//!
//! Deep layers: the reduction over input channels runs in chunks of at most [`CC`] channels. A chunk's
//! transformed input (`16 x TB x CC`) stays in L2, and its products start from the sums the chunk before
//! left in `M`, so the result is the same sequence of FMAs as one pass.
//!
//! Layout: the input is copied into a zero-padded, channel-last buffer so that the input transform works on
//! 8 channels per AVX vector; the transformed weights `U` are kept with the weight tensor ([`CpuTensor`]).
//! Tiles run in blocks (each block's `V` and `M` stay in L2), blocks in parallel; every output value is the
//! same sequence of operations whatever the thread count. The output transform writes a channel-last
//! buffer (one vector store per pixel and 8 channels), and one 8x8-transpose pass writes it to `[co][h][w]`:
//! stored straight into the planes, the 8 channels of a pixel fell into one L1 set, and that scatter was
//! 18% of a 128-channel 32x32 layer. The 16 positions' slices of `V` and `M` are a cache line longer than
//! their data, for the same reason (the input transform took 3x longer without it).
use crate::direct::micro;
use crate::simd::{self, Kernel, Simd};
use crate::{CpuTensor, OutPtr};
use jointdiff_core::Tensor;
use rayon::prelude::*;

/// Tiles per block (a multiple of both widths' MR, 6 and 8).
const TB: usize = 24;

/// Jobs a convolution aims at where its channels allow (see `conv2d`).
const MIN_JOBS: usize = 8;

/// Input channels per reduction chunk.
pub(crate) const CC: usize = 128;

thread_local! {
    /// The padded channel-last input of the convolution this thread runs (taken and put back per call).
    static PADDED: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    /// The channel-last output of the convolution this thread runs, before its transpose to `[co][h][w]`.
    static STAGED: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    /// The bias padded to a multiple of 16 channels and the tile origins of the call this thread runs.
    #[allow(clippy::type_complexity)]
    static SMALL: std::cell::Cell<(Vec<f32>, Vec<(u32, u32)>)> = const { std::cell::Cell::new((Vec::new(), Vec::new())) };
    /// A block's transformed input and products (taken and put back per block).
    static SCRATCH: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Whether `conv2d` takes this convolution (the caller checks that AVX2 + FMA are there).
pub(crate) fn eligible(
    ci: usize,
    co: usize,
    kh: usize,
    kw: usize,
    padding: usize,
    dil: usize,
) -> bool {
    kh == 3 && kw == 3 && dil >= 1 && padding == dil && ci.is_multiple_of(8) && ci > 0 && co >= 8
}

/// `U = G g G^T` for every (co, ci), packed as `[16][co_nr / nr][ci][nr]` (zero columns beyond `co`).
fn transform_weights(w: &[f32], co: usize, ci: usize, nr: usize) -> Vec<f32> {
    let co_nr = co.next_multiple_of(nr);
    let mut u = vec![0f32; 16 * co_nr * ci];
    for o in 0..co {
        for c in 0..ci {
            let g = &w[(o * ci + c) * 9..(o * ci + c + 1) * 9];
            // t = G g (4 x 3), G = [[1,0,0],[.5,.5,.5],[.5,-.5,.5],[0,0,1]]
            let mut t = [[0f32; 3]; 4];
            for j in 0..3 {
                let (g0, g1, g2) = (g[j], g[3 + j], g[6 + j]);
                t[0][j] = g0;
                t[1][j] = 0.5 * (g0 + g1 + g2);
                t[2][j] = 0.5 * (g0 - g1 + g2);
                t[3][j] = g2;
            }
            // U = t G^T (4 x 4)
            for (i, ti) in t.iter().enumerate() {
                let row = [
                    ti[0],
                    0.5 * (ti[0] + ti[1] + ti[2]),
                    0.5 * (ti[0] - ti[1] + ti[2]),
                    ti[2],
                ];
                for (j, &v) in row.iter().enumerate() {
                    let xi = i * 4 + j;
                    u[((xi * (co_nr / nr) + o / nr) * ci + c) * nr + o % nr] = v;
                }
            }
        }
    }
    u
}

/// Stride-1 "same" 3x3 convolution (padding = dilation = `d`) by Winograd F(2x2, 3x3).
///
/// With dilation `d` the image splits into `d x d` interleaved sub-images (rows `a, a + d, ...`, columns
/// `b, b + d, ...`), each an undilated convolution of its own; a tile is 2x2 output pixels `d` apart and
/// reads 4x4 input pixels `d` apart. Tiles are listed by the padded position of their first input pixel,
/// which (the padding being `d`) is also the position of their first output pixel in the image.
///
/// The products run at width `k` (the backend picks it: `crate::Path`).
///
/// # Panics
/// If the CPU cannot run `k`, `k` has no Winograd path (`Portable`, `Neon`) or the convolution is not
/// `eligible`.
pub(crate) fn conv2d(
    k: Kernel,
    x: &Tensor,
    w: &CpuTensor,
    bias: Option<&Tensor>,
    d: usize,
) -> Tensor {
    let [n, ci, h, wd] = x.shape;
    let [co, _, kh, kw] = w.shape;
    assert!(k.has_winograd() && k.supported() && eligible(ci, co, kh, kw, d, d));
    let nr = k.nr();
    if h * wd == 0 {
        return Tensor::zeros([n, co, h, wd]);
    }
    let co_nr = co.next_multiple_of(nr);
    // transformed once per weight tensor and width (it is immutable), kept with it
    let u = w.packs().winograd[crate::width_slot(k)]
        .get_or_init(|| transform_weights(&w.data[..co * ci * 9], co, ci, nr));
    // this thread's small buffers (bias padded to co_nr, tile origins), taken and put back
    let (mut bias_nr, mut origins) = SMALL.with(|s| s.take());
    bias_nr.clear();
    bias_nr.resize(co_nr, 0.0);
    if let Some(b) = bias {
        bias_nr[..co].copy_from_slice(&b.data[..co]);
    }
    // tile origins (y, x), sub-image by sub-image
    origins.clear();
    for a in 0..d.min(h) {
        for b in 0..d.min(wd) {
            let (th, tw) = (
                (h - a).div_ceil(d).div_ceil(2),
                (wd - b).div_ceil(d).div_ceil(2),
            );
            for ty in 0..th {
                for tx in 0..tw {
                    origins.push(((a + 2 * d * ty) as u32, (b + 2 * d * tx) as u32));
                }
            }
        }
    }
    let tiles = origins.len();
    // channel-last padded input, the image at (d, d); a border tile reads up to 3d past its origin, and
    // origins stay below h + d
    let (hp, wp) = (h + 4 * d, wd + 4 * d);
    let per_image = hp * wp * ci;
    // this thread's buffer if it is free (a nested call, from a stolen job, makes its own)
    let mut padded = PADDED.with(|p| p.take());
    padded.resize(n * per_image, 0.0);
    for (b, dst) in padded[..n * per_image]
        .chunks_exact_mut(per_image)
        .enumerate()
    {
        let src = &x.data[b * ci * h * wd..(b + 1) * ci * h * wd];
        to_channel_last(src, ci, h, wd, wp, d, dst);
    }
    // The output transform writes channel-last (`[h][w][co8]`, 8 channels per vector store): written to
    // `[co][h][w]` directly, the 8 channels of one pixel are a plane apart (4 KB at 32x32) and share an L1
    // set. One transpose pass at the end writes the planes row by row.
    let co8 = co.next_multiple_of(8);
    let (hw, per_out) = (h * wd, h * wd * co8);
    let mut staged = STAGED.with(|p| p.take());
    staged.resize(staged.len().max(n * per_out), 0.0);
    // Blocks of at most TB tiles, at least 4 per image where the image has 4 micro-kernel rows of tiles, so
    // that two threads share even one small image evenly (a 16x16 image, 64 tiles: 4 blocks of 16 or 18
    // rather than 24 + 24 + 16). A multiple of MR, so that a short block's last rows stay within TB.
    let tb = tiles.div_ceil(4).next_multiple_of(k.mr()).min(TB);
    let blocks = tiles.div_ceil(tb);
    // Small images (a 14x14 image is 49 tiles, 3 blocks) also split the output channels, into `parts` runs
    // of micro-kernel columns, so that there are MIN_JOBS jobs where the channels allow: each part repeats
    // the input transform of its tiles (cheap beside the products) and reads only its own columns of U.
    // The split depends on the shapes only, and each output value is the same FMAs either way.
    let cbs = co_nr / nr;
    // (an empty batch has no jobs either way)
    let per = cbs.div_ceil(MIN_JOBS.div_ceil((n * blocks).max(1)));
    let parts = cbs.div_ceil(per);
    let sptr = OutPtr(staged.as_mut_ptr());
    let job = |j: usize| {
        let (b, blk, part) = (j / (blocks * parts), j / parts % blocks, j % parts);
        let t0 = blk * tb;
        let t1 = (t0 + tb).min(tiles);
        let src = &padded[b * per_image..(b + 1) * per_image];
        let geo = Geo {
            ci,
            co_nr,
            co8,
            h,
            wd,
            wp,
            d,
            origins: &origins[t0..t1],
            cols: part * per..((part + 1) * per).min(cbs),
        };
        // SAFETY: the CPU runs `k` (asserted); this job writes only the staged pixels of its own tiles of
        // image b, and of those only its own channels, which no other job writes.
        unsafe { block(k, &geo, src, u, &bias_nr, sptr.at(b * per_out)) };
    };
    let jobs = n * blocks * parts;
    if jobs > 1 && co * ci * 9 * h * wd * n >= 1 << 18 {
        (0..jobs).into_par_iter().for_each(job);
    } else {
        (0..jobs).for_each(job);
    }
    PADDED.with(|p| p.set(padded));
    SMALL.with(|s| s.set((bias_nr, origins)));
    // every staged value of channels below co8 was written (the tiles cover the image); each transpose job
    // writes 8 channel planes of one image (fewer at the end of `co`), which no other job writes
    let len = n * co * hw;
    let mut data: Vec<f32> = crate::pool::with_capacity(len);
    let optr = OutPtr(data.as_mut_ptr());
    let groups = co8 / 8;
    let staged_ref = &staged;
    let tjob = |j: usize| {
        let (b, g) = (j / groups, j % groups);
        let src = &staged_ref[b * per_out..(b + 1) * per_out];
        // SAFETY: `conv2d` runs only where the CPU has AVX2; see above for the writes.
        unsafe { from_channel_last(src, hw, co8, co, 8 * g, optr.at(b * co * hw)) };
    };
    if n * groups > 1 && len >= 1 << 16 {
        (0..n * groups).into_par_iter().for_each(tjob);
    } else {
        (0..n * groups).for_each(tjob);
    }
    STAGED.with(|p| p.set(staged));
    // SAFETY: the transpose jobs wrote all `len` values (every channel below co of every pixel).
    unsafe { data.set_len(len) };
    Tensor {
        shape: [n, co, h, wd],
        data,
    }
}

/// The sizes and tiles a block needs.
struct Geo<'a> {
    ci: usize,
    /// `co` padded to the micro-kernel's NR
    co_nr: usize,
    /// `co` padded to 8: the staged output's pixel stride
    co8: usize,
    h: usize,
    wd: usize,
    /// padded width in pixels
    wp: usize,
    /// dilation (and padding)
    d: usize,
    /// the block's tile origins
    origins: &'a [(u32, u32)],
    /// the micro-kernel columns (runs of NR output channels) this job computes
    cols: std::ops::Range<usize>,
}

/// `[ci][h][w]` → channel-last `[y + pad][x + pad][ci]` rows `wp` pixels wide, with zero borders (`dst`
/// may hold anything before).
fn to_channel_last(
    src: &[f32],
    ci: usize,
    h: usize,
    w: usize,
    wp: usize,
    pad: usize,
    dst: &mut [f32],
) {
    let rows = dst.len() / (wp * ci);
    // borders: the rows above and below, and the columns left and right of each image row
    dst[..pad * wp * ci].fill(0.0);
    dst[(h + pad) * wp * ci..rows * wp * ci].fill(0.0);
    for y in pad..h + pad {
        let row = &mut dst[y * wp * ci..(y + 1) * wp * ci];
        row[..pad * ci].fill(0.0);
        row[(pad + w) * ci..].fill(0.0);
    }
    for c0 in (0..ci).step_by(8) {
        for y in 0..h {
            let rows: [&[f32]; 8] =
                std::array::from_fn(|i| &src[((c0 + i) * h + y) * w..((c0 + i) * h + y + 1) * w]);
            let drow = &mut dst[((y + pad) * wp + pad) * ci..((y + pad) * wp + pad + w) * ci];
            // SAFETY: `conv2d` checked that the CPU runs AVX2 kernels; 8 rows of w floats in,
            // w pixels of ci floats out, channels c0..c0 + 8 <= ci.
            let done = unsafe { transpose8_avx2(&rows, w, drow, ci, c0) };
            for x in done..w {
                for (i, r) in rows.iter().enumerate() {
                    drow[x * ci + c0 + i] = r[x];
                }
            }
        }
    }
}

/// The 8x8 transpose of `r` (rows in, columns out).
///
/// # Safety
/// Needs AVX (inlined into functions compiled for AVX2).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn t8x8(r: [std::arch::x86_64::__m256; 8]) -> [std::arch::x86_64::__m256; 8] {
    use std::arch::x86_64::*;
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ]
}

/// Pixels `[0, w / 8 * 8)` of 8 channel rows into channel-last pixels (`ci` apart, channels at `c0`), by
/// 8x8 transposes; returns how many pixels it did.
///
/// # Safety
/// Needs AVX2; every row holds `w` floats, `out` `w * ci` floats, `c0 + 8 <= ci`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn transpose8_avx2(
    rows: &[&[f32]; 8],
    w: usize,
    out: &mut [f32],
    ci: usize,
    c0: usize,
) -> usize {
    use std::arch::x86_64::*;
    let full = w / 8 * 8;
    let o = out.as_mut_ptr();
    for x in (0..full).step_by(8) {
        let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(rows[i].as_ptr().add(x)));
        for (j, col) in t8x8(r).into_iter().enumerate() {
            _mm256_storeu_ps(o.add((x + j) * ci + c0), col);
        }
    }
    full
}

/// Channels `[c0, min(c0 + 8, co))` of a channel-last image (`hw` pixels, `co8` floats apart) into their
/// planes of `out` (`[co][hw]`), by 8x8 transposes.
///
/// # Safety
/// Needs AVX2; `src` holds `hw * co8` floats, `c0 + 8 <= co8`, `out` has room for `co` planes of `hw`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn from_channel_last(
    src: &[f32],
    hw: usize,
    co8: usize,
    co: usize,
    c0: usize,
    out: *mut f32,
) {
    use std::arch::x86_64::*;
    let nch = (co - c0).min(8);
    let full = hw / 8 * 8;
    let rows: [*mut f32; 8] = std::array::from_fn(|j| out.add((c0 + j.min(nch - 1)) * hw));
    for p in (0..full).step_by(8) {
        let r: [__m256; 8] =
            std::array::from_fn(|i| _mm256_loadu_ps(src.as_ptr().add((p + i) * co8 + c0)));
        for (row, col) in rows.iter().zip(t8x8(r)).take(nch) {
            _mm256_storeu_ps(row.add(p), col);
        }
    }
    for p in full..hw {
        for j in 0..nch {
            *out.add((c0 + j) * hw + p) = src[p * co8 + c0 + j];
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn from_channel_last(_: &[f32], _: usize, _: usize, _: usize, _: usize, _: *mut f32) {
    unreachable!("Winograd convolution is x86-64 only")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn transpose8_avx2(_: &[&[f32]; 8], _: usize, _: &mut [f32], _: usize, _: usize) -> usize {
    0
}

/// The tiles `g.origins` of one image at width `k`: input transform, the 16 products, output transform into
/// `out` (`[co][h][w]`).
///
/// # Safety
/// The CPU runs `k` (not `Portable`); `src` is the image's padded channel-last input, `u` the transformed
/// weights at `k`'s NR.
unsafe fn block(k: Kernel, g: &Geo, src: &[f32], u: &[f32], bias: &[f32], out: *mut f32) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(g: &Geo, src: &[f32], u: &[f32], bias: &[f32], out: *mut f32) {
            block_tiles::<simd::Avx2, { simd::MR_AVX2 }>(g, src, u, bias, out)
        }
        #[target_feature(enable = "avx512f,avx2,fma")]
        unsafe fn avx512(g: &Geo, src: &[f32], u: &[f32], bias: &[f32], out: *mut f32) {
            block_tiles::<simd::Avx512, { simd::MR_AVX512 }>(g, src, u, bias, out)
        }
        match k {
            Kernel::Avx2 => avx2(g, src, u, bias, out),
            Kernel::Avx512 => avx512(g, src, u, bias, out),
            Kernel::Neon | Kernel::Portable => unreachable!("Winograd convolution needs AVX2"),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (k, g, src, u, bias, out);
        unreachable!("Winograd convolution is x86-64 only")
    }
}

/// [`block`] with products at `S`'s width, `MR` tiles per micro-kernel call (inlined into the width's
/// `target_feature` function; the transforms use AVX2, which both widths have).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn block_tiles<S: Simd, const MR: usize>(
    g: &Geo,
    src: &[f32],
    u: &[f32],
    bias: &[f32],
    out: *mut f32,
) {
    use std::arch::x86_64::*;
    let nr = 2 * S::LANES;
    let nt = g.origins.len();
    let d = g.d;
    let ci = g.ci;
    let cc_max = ci.min(CC);
    // V: [16][TB][cc] (one chunk of input channels) and M: [16][TB][co_nr] in this thread's scratch (every
    // element read below is written first, so it is not cleared)
    let mut guard = SCRATCH.with(|s| s.take());
    // one position's slice of V and of M is `TB * cc` and `TB * co_nr` floats, multiples of 4 KB for the
    // usual channel counts: the 16 positions of one tile would all fall into the same L1 set (the input
    // transform writes them together, the output transform reads them together). One cache line of padding
    // per slice spreads them over 16 sets.
    let (vs_max, ms) = (TB * cc_max + 16, TB * g.co_nr + 16);
    let (v_len, m_len) = (16 * vs_max, 16 * ms);
    if guard.len() < v_len + m_len {
        guard.resize(v_len + m_len, 0.0);
    }
    let (v, m) = guard.split_at_mut(v_len);
    let zeros = [0f32; 32];
    for c0 in (0..ci).step_by(CC) {
        let cc = (ci - c0).min(CC);
        let vs = TB * cc + 16;
        // input transform of channels [c0, c0 + cc), 8 channels per vector: V = B^T d B
        for (t, &(y0, x0)) in g.origins.iter().enumerate() {
            let (y0, x0) = (y0 as usize, x0 as usize);
            for c in (0..cc).step_by(8) {
                let at = |i: usize, j: usize| {
                    _mm256_loadu_ps(
                        src.as_ptr()
                            .add(((y0 + d * i) * g.wp + x0 + d * j) * ci + c0 + c),
                    )
                };
                let d: [[__m256; 4]; 4] =
                    std::array::from_fn(|i| std::array::from_fn(|j| at(i, j)));
                // rows: B^T d
                let r = [
                    std::array::from_fn::<__m256, 4, _>(|j| _mm256_sub_ps(d[0][j], d[2][j])),
                    std::array::from_fn(|j| _mm256_add_ps(d[1][j], d[2][j])),
                    std::array::from_fn(|j| _mm256_sub_ps(d[2][j], d[1][j])),
                    std::array::from_fn(|j| _mm256_sub_ps(d[1][j], d[3][j])),
                ];
                for (i, ri) in r.iter().enumerate() {
                    let cols = [
                        _mm256_sub_ps(ri[0], ri[2]),
                        _mm256_add_ps(ri[1], ri[2]),
                        _mm256_sub_ps(ri[2], ri[1]),
                        _mm256_sub_ps(ri[1], ri[3]),
                    ];
                    for (j, col) in cols.into_iter().enumerate() {
                        let xi = i * 4 + j;
                        _mm256_storeu_ps(v.as_mut_ptr().add(xi * vs + t * cc + c), col);
                    }
                }
            }
        }
        // the 16 products, MR tiles x NR output channels per micro-kernel call; the first chunk starts
        // from zero, the others from the sums in M
        for xi in 0..16 {
            let vx = v.as_ptr().add(xi * vs);
            for cb in g.cols.clone() {
                let w = u.as_ptr().add(((xi * (g.co_nr / nr) + cb) * ci + c0) * nr);
                let mut t = 0;
                while t < nt {
                    let rows = (nt - t).min(MR);
                    let ptrs: [*const f32; MR] =
                        std::array::from_fn(|r| vx.add((t + r.min(rows - 1)) * cc));
                    // straight into M: a short last block writes rows up to t + MR <= TB (t is a
                    // multiple of MR, which divides TB), which the output transform never reads
                    let dst = m.as_mut_ptr().add(xi * ms + t * g.co_nr + cb * nr);
                    let (init, ldi) = if c0 == 0 {
                        (zeros.as_ptr(), 0)
                    } else {
                        (dst.cast_const(), g.co_nr)
                    };
                    // V rows are consecutive channels: the identity offsets (null)
                    micro::<S, MR>(cc, w, std::ptr::null(), &ptrs, init, ldi, dst, g.co_nr);
                    t += rows;
                }
            }
        }
    }
    // output transform, 8 channels per vector: Y = A^T M A + bias, to the staged [h][w][co8]
    for (t, &(y0, x0)) in g.origins.iter().enumerate() {
        let (y0, x0) = (y0 as usize, x0 as usize);
        for c in (g.cols.start * nr..(g.cols.end * nr).min(g.co8)).step_by(8) {
            let at = |xi: usize| _mm256_loadu_ps(m.as_ptr().add(xi * ms + t * g.co_nr + c));
            // s = A^T M (2 x 4), A^T = [[1,1,1,0],[0,1,-1,-1]]
            let s0: [__m256; 4] =
                std::array::from_fn(|j| _mm256_add_ps(_mm256_add_ps(at(j), at(4 + j)), at(8 + j)));
            let s1: [__m256; 4] = std::array::from_fn(|j| {
                _mm256_sub_ps(_mm256_sub_ps(at(4 + j), at(8 + j)), at(12 + j))
            });
            let b = _mm256_loadu_ps(bias.as_ptr().add(c));
            for (dy, s) in [s0, s1].iter().enumerate() {
                let y0v = _mm256_add_ps(_mm256_add_ps(s[0], s[1]), s[2]);
                let y1v = _mm256_sub_ps(_mm256_sub_ps(s[1], s[2]), s[3]);
                let oy = y0 + d * dy;
                if oy >= g.h {
                    continue;
                }
                for (dx, v) in [y0v, y1v].into_iter().enumerate() {
                    let ox = x0 + d * dx;
                    if ox < g.wd {
                        _mm256_storeu_ps(
                            out.add((oy * g.wd + ox) * g.co8 + c),
                            _mm256_add_ps(v, b),
                        );
                    }
                }
            }
        }
    }
    SCRATCH.with(|s| s.set(guard));
}
