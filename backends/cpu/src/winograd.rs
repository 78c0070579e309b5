//! Winograd convolution for x86-64 (AVX2 + FMA, its products at AVX-512 where that runs): 3x3 kernels,
//! stride 1, padding equal to the dilation ("same"), input channels a multiple of 8. These are most of
//! NCSNv2's arithmetic, deep layers (256 channels at ngf 128) included.
//!
//! Two tilings ([`Tile`]), with the transforms of Lavin & Gray (2016): `Y = A^T [ sum_c (G g_c G^T) ⊙
//! (B^T d_c B) ] A`. F(2x2, 3x3) makes each 2x2 block of output pixels ("tile") from a 4x4 block of input
//! (16 multiplications per tile and input channel where a direct 3x3 convolution has 36); F(4x4, 3x3) makes a
//! 4x4 tile from 6x6 input (36 where direct has 144: 1.78x fewer than F(2x2)). The reduction over input
//! channels turns into one independent product per position `xi` of the transform (16 or 36),
//! `M_xi[tile][co] = sum_c V_xi[tile][c] U_xi[c][co]`, which runs on the direct path's micro-kernel
//! (`direct::micro`, MR tiles x NR channels at the process's vector width). [`Tile::for_image`] picks, per
//! convolution: F(4x4) wherever it does fewer products (every NCSNv2 layer from 7x7 pixels on; its
//! transformed weights, 2.25x larger, are streamed in a panel ahead of the products by the micro-kernel's
//! prefetch).
//!
//! Rounding: F(2x2)'s input and output transforms only add and subtract; F(4x4)'s multiply by 2, 4, 5 and 8
//! and its weight transform by 1/6 and 1/24 (computed in f64, rounded once), so its results are further from
//! the exact sum: relative 1e-5 at 256 input channels where F(2x2) gives 1e-6 (the crate's tests allow 4e-5
//! for F(4x4), 1e-5 for the other paths).
//! The transforms run 8 channels per vector at either width (they are a small part of the time), so the two
//! widths give the same bits.
//!
//! Deep layers: the reduction over input channels runs in chunks of at most [`CC`] channels. A chunk's
//! transformed input (positions x tiles x CC) stays in L2, and its products start from the sums the chunk
//! before left in `M`, so the result is the same sequence of FMAs as one pass.
//!
//! Layout: the input is copied into a zero-padded, channel-last buffer so that the input transform works on
//! 8 channels per AVX vector; the transformed weights `U` are kept with the weight tensor ([`CpuTensor`]).
//! Tiles run in blocks (each block's `V` and `M` stay in L2), blocks in parallel; every output value is the
//! same sequence of operations whatever the thread count. The output transform writes a channel-last
//! buffer (one vector store per pixel and 8 channels), and one 8x8-transpose pass writes it to `[co][h][w]`:
//! stored straight into the planes, the 8 channels of a pixel fell into one L1 set, and that scatter was
//! 18% of a 128-channel 32x32 layer. The positions' slices of `V` and `M` are a cache line longer than
//! their data, for the same reason (the input transform took 3x longer without it).
use crate::direct::micro;
use crate::simd::{self, Kernel, Simd};
use crate::{CpuTensor, OutPtr};
use jointdiff_core::Tensor;
use rayon::prelude::*;

/// Tiles per block at most with F(2x2) (a multiple of both widths' MR, 6 and 8).
const TB: usize = 24;

/// Tiles per block at most with F(4x4), before rounding up to the width's MR (12 or 16): a tile has 2.25x
/// the positions of an F(2x2) one, so that a block's `V` and `M` stay about as large.
const TB4: usize = 12;

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
    /// Eight input planes after the ELU of a fused call, before their channel-last copy.
    static ELU_PLANES: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
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

/// A Winograd tiling of the 3x3 convolution: F(m x m, 3x3), `m x m` output pixels per tile from
/// `(m + 2) x (m + 2)` input pixels, one product per input pixel of a tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tile {
    F2,
    F4,
}

impl Tile {
    pub(crate) const ALL: [Tile; 2] = [Tile::F2, Tile::F4];

    /// Output pixels per tile side.
    pub(crate) fn m(self) -> usize {
        match self {
            Tile::F2 => 2,
            Tile::F4 => 4,
        }
    }

    /// Positions of the transform (products per tile and input channel).
    fn positions(self) -> usize {
        (self.m() + 2) * (self.m() + 2)
    }

    /// Where the transformed weights of this tiling are kept in [`crate::Packs`], beside the width's slot.
    pub(crate) fn slot(self) -> usize {
        usize::from(self == Tile::F4)
    }

    /// Tiles per block at most with `mr` tiles per micro-kernel call (a multiple of `mr`).
    fn block_cap(self, mr: usize) -> usize {
        match self {
            Tile::F2 => TB,
            Tile::F4 => TB4.next_multiple_of(mr),
        }
    }

    /// The tiling the backend takes for an `h x w` image at dilation `d`: F(4x4) where it does fewer
    /// products than F(2x2) (every NCSNv2 layer from 7x7 pixels on; not 5x5 or 6x6, where the two tie),
    /// else F(2x2).
    ///
    /// F(4x4)'s transformed weights are 36 values per (co, ci) pair where F(2x2)'s are 16, and a forward
    /// reads every layer's once per block of tiles, from L3 or memory (a 128 -> 128 layer: 2.4 MB against
    /// 1.0 MB). Until the micro-kernel prefetched the next weight panel and small images ran as few blocks
    /// as the cap allows, those reads ate the saving at 28x28 and 32x32 (NCSNv2's 14x14 and 16x16 layers:
    /// 16 F(4x4) tiles), and F(4x4) was kept to 64x64 and larger; BENCHMARKS.md ("Winograd F(4x4, 3x3)",
    /// "Weight prefetch, and F(4x4) at every size") has the figures. The choice depends on the shapes only, so results do not
    /// depend on the thread count or the vector width.
    pub(crate) fn for_image(h: usize, w: usize, d: usize) -> Tile {
        let products = |t: Tile| tiles(h, w, d, t.m()) * t.positions();
        if products(Tile::F4) < products(Tile::F2) {
            Tile::F4
        } else {
            Tile::F2
        }
    }
}

/// Tiles of `m x m` output pixels that cover an `h x w` image at dilation `d` (each of its `d x d`
/// interleaved sub-images tiled on its own).
fn tiles(h: usize, w: usize, d: usize, m: usize) -> usize {
    sub_images(h, w, d, m).map(|(_, _, th, tw)| th * tw).sum()
}

/// The `d x d` interleaved sub-images of an `h x w` image at dilation `d` (those that have pixels): their
/// first row and column `(a, b)` and how many `m x m` tiles cover them down and across.
fn sub_images(
    h: usize,
    w: usize,
    d: usize,
    m: usize,
) -> impl Iterator<Item = (usize, usize, usize, usize)> {
    (0..d.min(h)).flat_map(move |a| {
        (0..d.min(w)).map(move |b| {
            let th = (h - a).div_ceil(d).div_ceil(m);
            (a, b, th, (w - b).div_ceil(d).div_ceil(m))
        })
    })
}

/// F(2x2, 3x3)'s weight transform `G` (Lavin & Gray).
const G2: [[f64; 3]; 4] = [
    [1.0, 0.0, 0.0],
    [0.5, 0.5, 0.5],
    [0.5, -0.5, 0.5],
    [0.0, 0.0, 1.0],
];

/// F(4x4, 3x3)'s weight transform `G` (Lavin & Gray; interpolation points 0, ±1, ±2, ∞).
const G4: [[f64; 3]; 6] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// `U = G g G^T` for every (co, ci), packed as `[positions][co_nr / nr][ci][nr]` (zero columns beyond
/// `co`). F(2x2)'s in f32 (its entries are 0, ±1/2 and 1: exact but for the sums), F(4x4)'s in f64 and
/// rounded once (1/6 and 1/24 are not exact in binary).
fn transform_weights(w: &[f32], co: usize, ci: usize, nr: usize, tile: Tile) -> Vec<f32> {
    match tile {
        Tile::F2 => pack_u(w, co, ci, nr, &G2.map(|r| r.map(|v| v as f32))),
        Tile::F4 => pack_u(w, co, ci, nr, &G4),
    }
}

/// [`transform_weights`] with `g` in the float type `T`. The runs of NR output channels are transformed in
/// parallel on large layers (an ngf-128 model's 3x3 layers took 0.3 s on one thread at its first forward);
/// each value is the same arithmetic whatever the thread.
fn pack_u<T>(w: &[f32], co: usize, ci: usize, nr: usize, g: &[[T; 3]]) -> Vec<f32>
where
    T: Copy + Default + From<f32> + Into<f64> + std::ops::Mul<Output = T> + std::iter::Sum + Sync,
{
    let a = g.len();
    let co_nr = co.next_multiple_of(nr);
    let cbs = co_nr / nr;
    let mut u = vec![0f32; a * a * co_nr * ci];
    let out = OutPtr(u.as_mut_ptr());
    // output channels [cb nr, cb nr + nr): the values at ((xi cbs + cb) ci + c) nr + o % nr, which no other
    // run writes
    let run = |cb: usize| {
        let mut t = [[T::default(); 3]; 6];
        for o in cb * nr..((cb + 1) * nr).min(co) {
            for c in 0..ci {
                let k = &w[(o * ci + c) * 9..(o * ci + c + 1) * 9];
                // t = G k (a x 3)
                for (ti, gi) in t.iter_mut().zip(g) {
                    for (j, tij) in ti.iter_mut().enumerate() {
                        *tij = (0..3).map(|r| gi[r] * T::from(k[r * 3 + j])).sum();
                    }
                }
                // U = t G^T (a x a)
                for (i, ti) in t.iter().take(a).enumerate() {
                    for (j, gj) in g.iter().enumerate() {
                        let v: T = (0..3).map(|r| ti[r] * gj[r]).sum();
                        let at = (((i * a + j) * cbs + cb) * ci + c) * nr + o % nr;
                        // SAFETY: `at` < a * a * co_nr * ci, the length of `u`, which outlives the loop;
                        // this run is its only writer (see above)
                        unsafe { *out.at(at) = v.into() as f32 };
                    }
                }
            }
        }
    };
    if cbs > 1 && co * ci >= 1 << 12 {
        (0..cbs).into_par_iter().for_each(run);
    } else {
        (0..cbs).for_each(run);
    }
    u
}

/// Greatest common divisor (`gcd(a, 0) = a`).
fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Stride-1 "same" 3x3 convolution (padding = dilation = `d`) by Winograd, tiled by `tile` (the backend
/// takes [`Tile::for_image`]).
///
/// With dilation `d` the image splits into `d x d` interleaved sub-images (rows `a, a + d, ...`, columns
/// `b, b + d, ...`), each an undilated convolution of its own; a tile is `m x m` output pixels `d` apart and
/// reads `(m + 2) x (m + 2)` input pixels `d` apart. Tiles are listed by the padded position of their first
/// input pixel, which (the padding being `d`) is also the position of their first output pixel in the image.
///
/// The products run at width `k` (the backend picks it: `crate::Path`). With `fused.elu_input` the input
/// is `elu(x)` (applied in the channel-last copy); with `fused.residual` (the output's shape) the output is
/// the convolution plus it (added in the output's transpose); with `fused.elu_grad_at` (the output's shape)
/// the output is multiplied by the ELU's derivative there before the sum (as each job's output planes are
/// written): the bits of the backend's separate ELU, ELU gradient and sum.
///
/// # Panics
/// If the CPU cannot run `k`, `k` has no Winograd path (`Portable`, `Neon`), the convolution is not
/// `eligible`, or `fused.residual` or `fused.elu_grad_at` has another shape than the output.
pub(crate) fn conv2d(
    k: Kernel,
    tile: Tile,
    x: &Tensor,
    w: &CpuTensor,
    bias: Option<&Tensor>,
    d: usize,
    fused: crate::Fused,
) -> Tensor {
    let [n, ci, h, wd] = x.shape;
    let [co, _, kh, kw] = w.shape;
    assert!(k.has_winograd() && k.supported() && eligible(ci, co, kh, kw, d, d));
    let (nr, m) = (k.nr(), tile.m());
    let crate::Fused {
        elu_input: elu,
        elu_grad_at,
        residual,
    } = fused;
    for t in [residual, elu_grad_at].into_iter().flatten() {
        assert_eq!(
            t.shape,
            [n, co, h, wd],
            "the residual and the ELU gradient's input have the output's shape"
        );
    }
    if h * wd == 0 {
        return Tensor::zeros([n, co, h, wd]);
    }
    let co_nr = co.next_multiple_of(nr);
    // transformed once per weight tensor, width and tiling (it is immutable), kept with it
    let u = w.packs().winograd[crate::width_slot(k)][tile.slot()]
        .get_or_init(|| transform_weights(&w.data[..co * ci * 9], co, ci, nr, tile));
    // this thread's small buffers (bias padded to co_nr, tile origins), taken and put back
    let (mut bias_nr, mut origins) = SMALL.with(|s| s.take());
    bias_nr.clear();
    bias_nr.resize(co_nr, 0.0);
    if let Some(b) = bias {
        bias_nr[..co].copy_from_slice(&b.data[..co]);
    }
    // tile origins (y, x), sub-image by sub-image
    origins.clear();
    for (a, b, th, tw) in sub_images(h, wd, d, m) {
        for ty in 0..th {
            for tx in 0..tw {
                origins.push(((a + m * d * ty) as u32, (b + m * d * tx) as u32));
            }
        }
    }
    let tiles = origins.len();
    // channel-last padded input, the image at (d, d); a tile reads up to (m + 1) d past its origin, and
    // origins stay below h (they are output pixels)
    let (hp, wp) = (h + (m + 2) * d, wd + (m + 2) * d);
    let per_image = hp * wp * ci;
    // this thread's buffer if it is free (a nested call, from a stolen job, makes its own)
    let mut padded = PADDED.with(|p| p.take());
    // grown, never shrunk: layers of other sizes alternate, and a shrunk buffer would be zeroed again as
    // it grows back (every value used below is written first)
    padded.resize(padded.len().max(n * per_image), 0.0);
    // the borders, then the interior 8 channels at a time, on this thread (split over the pool, the copy
    // was no faster at NCSNv2's sizes, 28x28 ngf 32 to 32x32 ngf 128); with the ELU, through this thread's
    // buffer of 8 planes
    let mut planes = elu.then(|| ELU_PLANES.with(|p| p.take()));
    for (b, dst) in padded[..n * per_image]
        .chunks_exact_mut(per_image)
        .enumerate()
    {
        zero_borders(dst, ci, h, wd, wp, d);
        for c0 in (0..ci).step_by(8) {
            let group = &x.data[(b * ci + c0) * h * wd..(b * ci + c0 + 8) * h * wd];
            // SAFETY: the CPU runs AVX2 (asserted: `k` is supported and has Winograd); `dst` is the
            // image's buffer and this loop its only writer.
            let elu_into = planes.as_mut();
            unsafe {
                group_to_channel_last(group, elu_into, ci, c0, h, wd, wp, d, dst.as_mut_ptr())
            };
        }
    }
    if let Some(p) = planes {
        ELU_PLANES.with(|c| c.set(p));
    }
    // The output transform writes channel-last (`[h][w][co8]`, 8 channels per vector store): written to
    // `[co][h][w]` directly, the 8 channels of one pixel are a plane apart (4 KB at 32x32) and share an L1
    // set. One transpose pass at the end writes the planes row by row.
    let co8 = co.next_multiple_of(8);
    let (hw, per_out) = (h * wd, h * wd * co8);
    let mut staged = STAGED.with(|p| p.take());
    staged.resize(staged.len().max(n * per_out), 0.0);
    // As few blocks per image as the tiling's cap allows (each block reads all of U: fewer blocks, fewer
    // weight reads), the tiles spread evenly over them, a multiple of MR per block (so that a short block's
    // last rows stay within the block). Where U is small (at most 1 MB: it stays in each core's L2) and
    // the tiles allow (MR tiles per block at least), enough blocks for every thread: a thread with a block
    // of its own reads only that block's input, where threads that share a block by output channels each
    // repeat its input transform (a 14x14 image at F(4x4) and 16 lanes is 16 tiles: one block of 16 at one
    // thread, two of 8 at two). A large U is shared by output channels instead, each thread reading its own
    // columns of it (32x32x3 ngf 128's 16x16 256 -> 256 layers: 9.4 MB).
    let (mr, cap) = (k.mr(), tile.block_cap(k.mr()));
    let threads = rayon::current_num_threads();
    let per_thread = if u.len() * 4 <= 1 << 20 {
        threads.div_ceil(n.max(1)).min(tiles.div_ceil(mr))
    } else {
        1
    };
    let tb = tiles
        .div_ceil(tiles.div_ceil(cap).max(per_thread).max(1))
        .next_multiple_of(mr);
    let blocks = tiles.div_ceil(tb);
    // Where the images' blocks are fewer than the threads (a 14x14 image at F(4x4) is 16 tiles, 2 blocks,
    // for 16 threads), the jobs also split the output channels, into `parts` runs of micro-kernel columns,
    // so that the job count is a multiple of the thread count where the channels allow: each part repeats
    // the input transform of its tiles and reads only its own columns of U. Where there are blocks enough,
    // the channels stay whole even if the blocks do not divide among the threads: a part's repeated input
    // transform costs a fifth of a 14x14 64 -> 64 convolution, and every part reads the whole input that
    // this thread laid out (at 2 threads, AVX2: a 28x28 32 -> 32 layer 0.077 -> 0.062 ms as 5 blocks than
    // as 5 blocks x 2 parts; a 14x14 64 -> 64 layer took a quarter longer as 2 blocks x 2 parts than as 2
    // blocks of 12 and 4 tiles; BENCHMARKS.md). Each output value is the same FMAs however the work is
    // split, so the results do not depend on the thread count.
    let cbs = co_nr / nr;
    // (an empty batch has no jobs either way)
    let nb = (n * blocks).max(1);
    let want = if nb >= threads {
        1
    } else {
        threads / gcd(nb, threads)
    };
    let per = cbs.div_ceil(want.clamp(1, cbs));
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
            cap,
            origins: &origins[t0..t1],
            cols: part * per..((part + 1) * per).min(cbs),
        };
        // SAFETY: the CPU runs `k` (asserted); this job writes only the staged pixels of its own tiles of
        // image b, and of those only its own channels, which no other job writes.
        unsafe { block(k, tile, &geo, src, u, &bias_nr, sptr.at(b * per_out)) };
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
        let planes = (b * co + 8 * g) * hw..(b * co + co.min(8 * g + 8)) * hw;
        let Some(at) = elu_grad_at else {
            let add = residual.map(|r| &r.data[b * co * hw..(b + 1) * co * hw]);
            // SAFETY: `conv2d` runs only where the CPU has AVX2; see above for the writes.
            unsafe { from_channel_last(src, hw, co8, co, 8 * g, optr.at(b * co * hw), add) };
            return;
        };
        // SAFETY: as above; the job's planes are then written, and this job their only user
        let out = unsafe {
            from_channel_last(src, hw, co8, co, 8 * g, optr.at(b * co * hw), None);
            std::slice::from_raw_parts_mut(optr.at(planes.start), planes.len())
        };
        // the ELU's derivative, then the residual, on the planes just written (still in cache)
        // (one small loop per `wide` call, so that it inlines there and vectorises at the kernel's width)
        let at = &at.data[planes.clone()];
        match residual {
            Some(r) => {
                let r = &r.data[planes];
                crate::wide(|| {
                    for ((o, &v), &a) in out.iter_mut().zip(at).zip(r) {
                        *o = crate::elu_grad(v, *o) + a;
                    }
                })
            }
            None => crate::wide(|| {
                for (o, &v) in out.iter_mut().zip(at) {
                    *o = crate::elu_grad(v, *o);
                }
            }),
        }
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
    /// tiles per block at most (a multiple of MR): the row count of the scratch's `V` and `M` slices, the
    /// same for every block of the tiling and width (so that a thread's scratch keeps one layout)
    cap: usize,
    /// the block's tile origins
    origins: &'a [(u32, u32)],
    /// the micro-kernel columns (runs of NR output channels) this job computes
    cols: std::ops::Range<usize>,
}

/// The zero borders of one image's channel-last padded input (`[y + pad][x + pad][ci]`, rows `wp` pixels
/// wide): the rows above and below the image, the columns left and right of each image row.
fn zero_borders(dst: &mut [f32], ci: usize, h: usize, w: usize, wp: usize, pad: usize) {
    let rows = dst.len() / (wp * ci);
    dst[..pad * wp * ci].fill(0.0);
    dst[(h + pad) * wp * ci..rows * wp * ci].fill(0.0);
    for y in pad..h + pad {
        let row = &mut dst[y * wp * ci..(y + 1) * wp * ci];
        row[..pad * ci].fill(0.0);
        row[(pad + w) * ci..].fill(0.0);
    }
}

/// Channels `[c0, c0 + 8)` of one image, their planes `group` (`[8][h][w]`), into the image's channel-last
/// padded input at `dst` (`[y + pad][x + pad][ci]`, rows `wp` pixels wide; see [`zero_borders`]); with
/// `elu_into` (a buffer for 8 planes), of `elu(group)` (the backend's ELU, `crate::elu1`: the same bits as
/// its ELU operation).
///
/// # Safety
/// `conv2d`'s CPU checks (AVX2); `dst` has room for the image's `(h + pad) * wp * ci` floats.
#[allow(clippy::too_many_arguments)]
unsafe fn group_to_channel_last(
    group: &[f32],
    elu_into: Option<&mut Vec<f32>>,
    ci: usize,
    c0: usize,
    h: usize,
    w: usize,
    wp: usize,
    pad: usize,
    dst: *mut f32,
) {
    let group = match elu_into {
        Some(planes) => {
            // grown, never shrunk (as the padded input); the first group.len() values are written here
            planes.resize(planes.len().max(group.len()), 0.0);
            crate::wide(|| {
                for (o, &v) in planes.iter_mut().zip(group) {
                    *o = crate::elu1(v);
                }
            });
            &planes[..group.len()]
        }
        None => group,
    };
    for y in 0..h {
        let rows: [&[f32]; 8] =
            std::array::from_fn(|i| &group[(i * h + y) * w..(i * h + y + 1) * w]);
        let drow = dst.add(((y + pad) * wp + pad) * ci);
        // SAFETY: see the function's; 8 rows of w floats in, w pixels of ci floats out, c0 + 8 <= ci.
        let done = transpose8_avx2(&rows, w, drow, ci, c0);
        for x in done..w {
            for (i, r) in rows.iter().enumerate() {
                *drow.add(x * ci + c0 + i) = r[x];
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

/// Pixels `[0, w)` of 8 channel rows into channel-last pixels (`ci` apart, channels at `c0`), by 8x8
/// transposes, the last one overlapping the one before where `w` is not a multiple of 8; returns how many
/// pixels it did (`w`, or 0 where `w < 8`).
///
/// # Safety
/// Needs AVX2; every row holds `w` floats, `o` has room for `w * ci` floats, `c0 + 8 <= ci`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn transpose8_avx2(
    rows: &[&[f32]; 8],
    w: usize,
    o: *mut f32,
    ci: usize,
    c0: usize,
) -> usize {
    use std::arch::x86_64::*;
    if w < 8 {
        return 0;
    }
    // blocks at 0, 8, ..., and one at w - 8 for a remainder (it rewrites some pixels with the same values)
    let starts = (0..w / 8 * 8)
        .step_by(8)
        .chain((!w.is_multiple_of(8)).then_some(w - 8));
    for x in starts {
        let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(rows[i].as_ptr().add(x)));
        for (j, col) in t8x8(r).into_iter().enumerate() {
            _mm256_storeu_ps(o.add((x + j) * ci + c0), col);
        }
    }
    w
}

/// Channels `[c0, min(c0 + 8, co))` of a channel-last image (`hw` pixels, `co8` floats apart) into their
/// planes of `out` (`[co][hw]`), by 8x8 transposes, plus the same planes of `add` where given (`[co][hw]`
/// too: the value `v + a`, as the backend's `add` computes it).
///
/// # Safety
/// Needs AVX2; `src` holds `hw * co8` floats, `c0 + 8 <= co8`, `out` has room for `co` planes of `hw`, and
/// `add` holds `co * hw` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn from_channel_last(
    src: &[f32],
    hw: usize,
    co8: usize,
    co: usize,
    c0: usize,
    out: *mut f32,
    add: Option<&[f32]>,
) {
    use std::arch::x86_64::*;
    let nch = (co - c0).min(8);
    let full = hw / 8 * 8;
    let rows: [*mut f32; 8] = std::array::from_fn(|j| out.add((c0 + j.min(nch - 1)) * hw));
    // the residual's planes, where there is one
    let arows: Option<[*const f32; 8]> = add.map(|a| {
        assert!(a.len() >= co * hw);
        std::array::from_fn(|j| a.as_ptr().add((c0 + j.min(nch - 1)) * hw))
    });
    for p in (0..full).step_by(8) {
        let r: [__m256; 8] =
            std::array::from_fn(|i| _mm256_loadu_ps(src.as_ptr().add((p + i) * co8 + c0)));
        for (j, (row, col)) in rows.iter().zip(t8x8(r)).take(nch).enumerate() {
            let col = match arows {
                Some(a) => _mm256_add_ps(col, _mm256_loadu_ps(a[j].add(p))),
                None => col,
            };
            _mm256_storeu_ps(row.add(p), col);
        }
    }
    for p in full..hw {
        for j in 0..nch {
            let (at, v) = ((c0 + j) * hw + p, src[p * co8 + c0 + j]);
            *out.add(at) = add.map_or(v, |a| v + a[at]);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn from_channel_last(
    _: &[f32],
    _: usize,
    _: usize,
    _: usize,
    _: usize,
    _: *mut f32,
    _: Option<&[f32]>,
) {
    unreachable!("Winograd convolution is x86-64 only")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn transpose8_avx2(_: &[&[f32]; 8], _: usize, _: *mut f32, _: usize, _: usize) -> usize {
    0
}

/// The tiles `g.origins` of one image at width `k` and tiling `tile`: input transform, the products, output
/// transform into `out` (the staged `[h][w][co8]`).
///
/// # Safety
/// The CPU runs `k` (not `Portable`); `src` is the image's padded channel-last input, `u` the transformed
/// weights at `k`'s NR and `tile`.
unsafe fn block(
    k: Kernel,
    tile: Tile,
    g: &Geo,
    src: &[f32],
    u: &[f32],
    bias: &[f32],
    out: *mut f32,
) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<T: Tiling>(g: &Geo, src: &[f32], u: &[f32], bias: &[f32], out: *mut f32) {
            block_tiles::<simd::Avx2, { simd::MR_AVX2 }, T>(g, src, u, bias, out)
        }
        #[target_feature(enable = "avx512f,avx2,fma")]
        unsafe fn avx512<T: Tiling>(g: &Geo, src: &[f32], u: &[f32], bias: &[f32], out: *mut f32) {
            block_tiles::<simd::Avx512, { simd::MR_AVX512 }, T>(g, src, u, bias, out)
        }
        match (k, tile) {
            (Kernel::Avx2, Tile::F2) => avx2::<F2>(g, src, u, bias, out),
            (Kernel::Avx2, Tile::F4) => avx2::<F4>(g, src, u, bias, out),
            (Kernel::Avx512, Tile::F2) => avx512::<F2>(g, src, u, bias, out),
            (Kernel::Avx512, Tile::F4) => avx512::<F4>(g, src, u, bias, out),
            (Kernel::Neon | Kernel::Portable, _) => unreachable!("Winograd convolution needs AVX2"),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (k, tile, g, src, u, bias, out);
        unreachable!("Winograd convolution is x86-64 only")
    }
}

/// One tiling's input and output transforms, 8 channels per AVX vector (inlined into the width's
/// `target_feature` function, which has AVX2 and FMA).
#[cfg(target_arch = "x86_64")]
trait Tiling {
    /// Input pixels per tile side (`m + 2`).
    const A: usize;
    /// `V = B^T d B` for the tile whose first input pixel `d` points at, its rows `rs` floats apart and
    /// columns `cs`; stores position `xi = i * A + j` at `v + xi * vs`.
    unsafe fn input(d: *const f32, rs: usize, cs: usize, v: *mut f32, vs: usize);
    /// `Y = A^T M A + b` for the tile whose position `xi` is at `m + xi * ms`, stored at `y`.
    unsafe fn output(m: *const f32, ms: usize, b: std::arch::x86_64::__m256, y: &Dest);
}

/// Where the output transform stores one tile: pixel `(dy, dx)` at `p + dy * rs + dx * cs`, for
/// `dy < rows` and `dx < cols` (a border tile is cut).
#[cfg(target_arch = "x86_64")]
struct Dest {
    p: *mut f32,
    rs: usize,
    cs: usize,
    rows: usize,
    cols: usize,
}

/// F(2x2, 3x3).
#[cfg(target_arch = "x86_64")]
struct F2;

/// F(4x4, 3x3).
#[cfg(target_arch = "x86_64")]
struct F4;

#[cfg(target_arch = "x86_64")]
mod transforms {
    use std::arch::x86_64::*;

    /// `B^T x` of F(2x2, 3x3), `B^T = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]]`.
    #[inline(always)]
    pub(super) unsafe fn bt2(x: [__m256; 4]) -> [__m256; 4] {
        [
            _mm256_sub_ps(x[0], x[2]),
            _mm256_add_ps(x[1], x[2]),
            _mm256_sub_ps(x[2], x[1]),
            _mm256_sub_ps(x[1], x[3]),
        ]
    }

    /// `A^T x` of F(2x2, 3x3), `A^T = [[1,1,1,0],[0,1,-1,-1]]`.
    #[inline(always)]
    pub(super) unsafe fn at2(x: [__m256; 4]) -> [__m256; 2] {
        [
            _mm256_add_ps(_mm256_add_ps(x[0], x[1]), x[2]),
            _mm256_sub_ps(_mm256_sub_ps(x[1], x[2]), x[3]),
        ]
    }

    /// `B^T x` of F(4x4, 3x3): rows `[4,0,-5,0,1,0]`, `[0,-4,-4,1,1,0]`, `[0,4,-4,-1,1,0]`,
    /// `[0,-2,-1,2,1,0]`, `[0,2,-1,-2,1,0]`, `[0,4,0,-5,0,1]`.
    #[inline(always)]
    pub(super) unsafe fn bt4(x: [__m256; 6]) -> [__m256; 6] {
        let (two, four, five) = (
            _mm256_set1_ps(2.0),
            _mm256_set1_ps(4.0),
            _mm256_set1_ps(5.0),
        );
        let t0 = _mm256_fnmadd_ps(four, x[2], x[4]); // x4 - 4 x2
        let t1 = _mm256_fnmadd_ps(four, x[1], x[3]); // x3 - 4 x1
        let t2 = _mm256_sub_ps(x[4], x[2]);
        let t3 = _mm256_sub_ps(x[3], x[1]);
        [
            _mm256_fnmadd_ps(five, x[2], _mm256_fmadd_ps(four, x[0], x[4])),
            _mm256_add_ps(t0, t1),
            _mm256_sub_ps(t0, t1),
            _mm256_fmadd_ps(two, t3, t2),
            _mm256_fnmadd_ps(two, t3, t2),
            _mm256_fnmadd_ps(five, x[3], _mm256_fmadd_ps(four, x[1], x[5])),
        ]
    }

    /// `A^T x` of F(4x4, 3x3): rows `[1,1,1,1,1,0]`, `[0,1,-1,2,-2,0]`, `[0,1,1,4,4,0]`, `[0,1,-1,8,-8,1]`.
    #[inline(always)]
    pub(super) unsafe fn at4(x: [__m256; 6]) -> [__m256; 4] {
        let a = _mm256_add_ps(x[1], x[2]);
        let b = _mm256_sub_ps(x[1], x[2]);
        let c = _mm256_add_ps(x[3], x[4]);
        let e = _mm256_sub_ps(x[3], x[4]);
        [
            _mm256_add_ps(_mm256_add_ps(x[0], a), c),
            _mm256_fmadd_ps(_mm256_set1_ps(2.0), e, b),
            _mm256_fmadd_ps(_mm256_set1_ps(4.0), c, a),
            _mm256_add_ps(_mm256_fmadd_ps(_mm256_set1_ps(8.0), e, b), x[5]),
        ]
    }
}

/// The 2-D transforms of one tiling from its 1-D ones (`$a` inputs, `$m` outputs): columns first (`B^T d`,
/// `A^T M`), then rows. Plain loops over arrays, every level `inline(always)` into the width's
/// `target_feature` function, so that every intrinsic is inlined (closures and `array::from_fn` here left
/// them as calls: 3x slower).
macro_rules! tiling {
    ($t:ty, $a:literal, $m:literal, $bt:path, $at:path) => {
        #[cfg(target_arch = "x86_64")]
        impl Tiling for $t {
            const A: usize = $a;

            #[inline(always)]
            unsafe fn input(d: *const f32, rs: usize, cs: usize, v: *mut f32, vs: usize) {
                use std::arch::x86_64::*;
                let mut cols = [[_mm256_setzero_ps(); $a]; $a];
                for (j, col) in cols.iter_mut().enumerate() {
                    let mut x = [_mm256_setzero_ps(); $a];
                    for (i, xi) in x.iter_mut().enumerate() {
                        *xi = _mm256_loadu_ps(d.add(i * rs + j * cs));
                    }
                    *col = $bt(x);
                }
                for i in 0..$a {
                    let mut x = [_mm256_setzero_ps(); $a];
                    for (j, xj) in x.iter_mut().enumerate() {
                        *xj = cols[j][i];
                    }
                    for (j, r) in $bt(x).into_iter().enumerate() {
                        _mm256_storeu_ps(v.add((i * $a + j) * vs), r);
                    }
                }
            }

            #[inline(always)]
            unsafe fn output(m: *const f32, ms: usize, b: std::arch::x86_64::__m256, y: &Dest) {
                use std::arch::x86_64::*;
                let mut cols = [[_mm256_setzero_ps(); $m]; $a];
                for (j, col) in cols.iter_mut().enumerate() {
                    let mut x = [_mm256_setzero_ps(); $a];
                    for (i, xi) in x.iter_mut().enumerate() {
                        *xi = _mm256_loadu_ps(m.add((i * $a + j) * ms));
                    }
                    *col = $at(x);
                }
                for dy in 0..y.rows.min($m) {
                    let mut x = [_mm256_setzero_ps(); $a];
                    for (j, xj) in x.iter_mut().enumerate() {
                        *xj = cols[j][dy];
                    }
                    for (dx, r) in $at(x).into_iter().enumerate().take(y.cols) {
                        _mm256_storeu_ps(y.p.add(dy * y.rs + dx * y.cs), _mm256_add_ps(r, b));
                    }
                }
            }
        }
    };
}
tiling!(F2, 4, 2, transforms::bt2, transforms::at2);
tiling!(F4, 6, 4, transforms::bt4, transforms::at4);

/// [`block`] with products at `S`'s width, `MR` tiles per micro-kernel call, tiling `T` (inlined into the
/// width's `target_feature` function; the transforms use AVX2 and FMA, which both widths have).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn block_tiles<S: Simd, const MR: usize, T: Tiling>(
    g: &Geo,
    src: &[f32],
    u: &[f32],
    bias: &[f32],
    out: *mut f32,
) {
    use std::arch::x86_64::*;
    let p = T::A * T::A;
    let nr = 2 * S::LANES;
    let nt = g.origins.len();
    let d = g.d;
    let ci = g.ci;
    let cc_max = ci.min(CC);
    // V: [p][cap][cc] (one chunk of input channels) and M: [p][cap][co_nr] in this thread's scratch (every
    // element read below is written first, so it is not cleared)
    let mut guard = SCRATCH.with(|s| s.take());
    // one position's slice of V and of M is `cap * cc` and `cap * co_nr` floats, multiples of 4 KB for the
    // usual channel counts: the positions of one tile would all fall into the same L1 set (the input
    // transform writes them together, the output transform reads them together). One cache line of padding
    // per slice spreads them over as many sets.
    let (vs_max, ms) = (g.cap * cc_max + 16, g.cap * g.co_nr + 16);
    let (v_len, m_len) = (p * vs_max, p * ms);
    if guard.len() < v_len + m_len {
        guard.resize(v_len + m_len, 0.0);
    }
    let (v, m) = guard.split_at_mut(v_len);
    let zeros = [0f32; 32];
    for c0 in (0..ci).step_by(CC) {
        let cc = (ci - c0).min(CC);
        let vs = g.cap * cc + 16;
        // input transform of channels [c0, c0 + cc), 8 channels per vector: V = B^T d B
        for (t, &(y0, x0)) in g.origins.iter().enumerate() {
            let (y0, x0) = (y0 as usize, x0 as usize);
            for c in (0..cc).step_by(8) {
                T::input(
                    src.as_ptr().add((y0 * g.wp + x0) * ci + c0 + c),
                    d * g.wp * ci,
                    d * ci,
                    v.as_mut_ptr().add(t * cc + c),
                    vs,
                );
            }
        }
        // the products, MR tiles x NR output channels per micro-kernel call; the first chunk starts from
        // zero, the others from the sums in M
        for xi in 0..p {
            let vx = v.as_ptr().add(xi * vs);
            for cb in g.cols.clone() {
                let w = u.as_ptr().add(((xi * (g.co_nr / nr) + cb) * ci + c0) * nr);
                let mut t = 0;
                while t < nt {
                    let rows = (nt - t).min(MR);
                    let ptrs: [*const f32; MR] =
                        std::array::from_fn(|r| vx.add((t + r.min(rows - 1)) * cc));
                    // straight into M: a short last block writes rows up to t + MR <= cap (t is a
                    // multiple of MR, which divides cap), which the output transform never reads
                    let dst = m.as_mut_ptr().add(xi * ms + t * g.co_nr + cb * nr);
                    let (init, ldi) = if c0 == 0 {
                        (zeros.as_ptr(), 0)
                    } else {
                        (dst.cast_const(), g.co_nr)
                    };
                    // V rows are consecutive channels: the identity offsets (null)
                    // the next panel is the next column block's, `ci * nr` floats on (the last column's
                    // prefetch reaches the next position's or a little past U: a hint, never a read)
                    micro::<S, MR>(
                        cc,
                        w,
                        std::ptr::null(),
                        &ptrs,
                        init,
                        ldi,
                        dst,
                        g.co_nr,
                        ci * nr,
                    );
                    t += rows;
                }
            }
        }
    }
    // output transform, 8 channels per vector: Y = A^T M A + bias, to the staged [h][w][co8]
    for (t, &(y0, x0)) in g.origins.iter().enumerate() {
        let (y0, x0) = (y0 as usize, x0 as usize);
        // the tile's output pixels inside the image (a border tile is cut)
        let (rows, cols) = ((g.h - y0).div_ceil(d), (g.wd - x0).div_ceil(d));
        for c in (g.cols.start * nr..(g.cols.end * nr).min(g.co8)).step_by(8) {
            let dst = Dest {
                p: out.add((y0 * g.wd + x0) * g.co8 + c),
                rs: d * g.wd * g.co8,
                cs: d * g.co8,
                rows,
                cols,
            };
            T::output(
                m.as_ptr().add(t * g.co_nr + c),
                ms,
                _mm256_loadu_ps(bias.as_ptr().add(c)),
                &dst,
            );
        }
    }
    SCRATCH.with(|s| s.set(guard));
}
