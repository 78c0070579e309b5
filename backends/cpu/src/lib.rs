//! jointdiff-cpu: the CPU backend every command uses by default.
//!
//! Convolutions run on the direct and Winograd kernels (`direct`, `winograd`) where the CPU has AVX2 + FMA,
//! at 8 or 16 lanes (`simd`: one micro-kernel source for both widths, chosen at run time), whatever the
//! layer's depth. Elsewhere (other CPUs, `JOINTDIFF_CPU_KERNEL=portable`) they are tiled im2col + GEMM (the
//! `matrixmultiply` crate): the output columns of each image are cut into tiles whose size depends only on
//! the layer's shape; each tile packs its own im2col block into thread-local scratch and runs one GEMM, and
//! rayon spreads the tiles (and the batch items) over the threads. Every output value is computed by the
//! same sequential code whatever the thread count, so results are bit-identical with 1 or many threads.
//! InstanceNorm++ is fused with the ELU that always follows it; max pooling is separable.
use jointdiff_core::backend::{Backend, Conv2dParams};
use jointdiff_core::reference::{self, ops};
use jointdiff_core::Tensor;
use rayon::prelude::*;
use std::cell::{Cell, RefCell};
use std::mem::ManuallyDrop;
use std::sync::{Arc, OnceLock};
use winograd::Tile;

// The Winograd kernels are x86-64 code, the direct ones x86-64 and aarch64 code; elsewhere only their
// selection logic runs (it picks the portable path), so most of them is unused there.
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code, unused_imports)
)]
mod direct;
mod pool;
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code, unused_imports)
)]
mod simd;
mod spin;
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code, unused_imports))]
mod winograd;

pub use simd::{kernel, Kernel};

#[derive(Debug, Clone, Copy, Default)]
pub struct CpuBackend;

/// A tensor of `shape` in a pooled buffer, filled by `f` (the sampler's small elementwise ops: one
/// sequential pass, the same code as the reference backend's).
fn pooled(shape: [usize; 4], f: impl FnOnce(&mut [f32])) -> CpuTensor {
    let mut out = pool::zeros(shape);
    f(&mut out.data);
    out.into()
}

/// Runs `f` on one of rayon's worker threads (at once if this thread already is one).
///
/// Every parallel loop of the backend started from outside the pool hands its work to the pool and puts the
/// caller to sleep until it is done: a futex round trip per operation, tens of microseconds, a tenth of the
/// time of a small forward. Frontends run their whole job through this so that the loops start on a worker.
/// The pool's other workers stay awake for the length of `f` (`spin::hot`; `JOINTDIFF_CPU_SPIN=0` turns
/// that off).
pub fn on_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        spin::hot(f)
    } else {
        rayon::scope(|_| spin::hot(f))
    }
}

/// Which GEMM the backend uses (reported by `jointdiff bench gemm`).
pub const GEMM_KERNEL: &str =
    "matrixmultiply 0.3 (AVX2/FMA by runtime detection), one thread per tile";

/// `c[m x n] = a[m x k] * b[k x n]`, row-major, `c` overwritten: the backend's GEMM.
pub fn gemm(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    // SAFETY: the assert guarantees every index the row-major strides reach is in bounds.
    unsafe { sgemm_strided(m, k, n, a.as_ptr(), n, b.as_ptr(), c.as_mut_ptr(), n) }
}

/// `C = A B` with A `m x k` (row stride k), B `k x n` (row stride `rsb`), C rows `rsc` apart.
///
/// # Safety
/// The pointers must cover the strided extents.
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm_strided(
    m: usize,
    k: usize,
    n: usize,
    a: *const f32,
    rsb: usize,
    b: *const f32,
    c: *mut f32,
    rsc: usize,
) {
    matrixmultiply::sgemm(
        m,
        k,
        n,
        1.0,
        a,
        k as isize,
        1,
        b,
        rsb as isize,
        1,
        0.0,
        c,
        rsc as isize,
        1,
    );
}

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// A raw output pointer that tiles write to disjoint parts of.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tiles write disjoint column ranges of the output (see `conv2d`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer `off` floats further (a method, so closures capture the whole `Send` wrapper).
    ///
    /// # Safety
    /// `off` must stay inside the allocation.
    unsafe fn at(self, off: usize) -> *mut f32 {
        self.0.add(off)
    }
}

/// Columns per tile: about 64K floats of im2col scratch, a multiple of 16, from the layer's shape only.
fn tile_cols(kk: usize, hw: usize) -> usize {
    // about 512K floats of im2col scratch per tile (GEMM packs the weights once per tile, so wide tiles
    // pay off for deep layers), but at least four tiles per image when it is large enough to share out
    let t = ((1 << 19) / kk.max(1)).clamp(64, 1024) / 16 * 16;
    let quarter = hw.div_ceil(4).div_ceil(16) * 16;
    t.min(quarter.max(16)).min(hw.max(1))
}

/// Packs columns `[c0, c0 + tw)` of the im2col matrix of one image into `col` (`kk x tw`).
#[allow(clippy::too_many_arguments)]
fn im2col_tile(
    src: &[f32],
    ci: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    p: Conv2dParams,
    wo: usize,
    c0: usize,
    tw: usize,
    col: &mut [f32],
) {
    let (pad, dil) = (p.padding as isize, p.dilation as isize);
    for i in 0..ci {
        let plane = &src[i * h * w..(i + 1) * h * w];
        for ky in 0..kh {
            for kx in 0..kw {
                let row = &mut col[((i * kh + ky) * kw + kx) * tw..][..tw];
                let dy = ky as isize * dil - pad;
                let dx = kx as isize * dil - pad;
                // walk the tile's output pixels row by row
                let mut j = 0;
                while j < tw {
                    let q = c0 + j;
                    let (oy, ox0) = (q / wo, q % wo);
                    let run = (wo - ox0).min(tw - j);
                    let iy = oy as isize + dy;
                    let dst = &mut row[j..j + run];
                    if iy < 0 || iy >= h as isize {
                        dst.fill(0.0);
                    } else {
                        let srow = &plane[iy as usize * w..(iy as usize + 1) * w];
                        // valid ox: 0 <= ox + dx < w, clamped to this run
                        let lo = ((-dx).max(0) as usize).clamp(ox0, ox0 + run);
                        let hi = ((w as isize - dx).max(0) as usize).clamp(lo, ox0 + run);
                        if lo >= hi {
                            dst.fill(0.0);
                        } else {
                            dst[..lo - ox0].fill(0.0);
                            let (s0, s1) =
                                ((lo as isize + dx) as usize, (hi as isize + dx) as usize);
                            dst[lo - ox0..hi - ox0].copy_from_slice(&srow[s0..s1]);
                            dst[hi - ox0..].fill(0.0);
                        }
                    }
                    j += run;
                }
            }
        }
    }
}

/// Convolution, on the path [`Path::chosen`] picks.
fn conv2d(x: &Tensor, w: &CpuTensor, bias: Option<&Tensor>, p: Conv2dParams) -> Tensor {
    conv2d_fused(x, w, bias, p, Fused::default())
}

/// A convolution with what [`Fused`] adds around it, on the path [`Path::chosen`] picks.
fn conv2d_fused(
    x: &Tensor,
    w: &CpuTensor,
    bias: Option<&Tensor>,
    p: Conv2dParams,
    fused: Fused,
) -> Tensor {
    layers::record(x.shape, w.shape, p);
    Path::chosen(x.shape, w.shape, p).run_fused(x, w, bias, p, fused)
}

/// What a convolution computes around itself: `elu_grad(elu_grad_at, conv(elu(x))) + residual`, each part
/// where asked. [`Backend::conv2d_fused`] is the input ELU and the residual; an input VJP through it
/// ([`Backend::conv2d_backward_input_fused`]) the ELU's derivative and the residual.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Fused<'a> {
    /// the ELU applied to the input first
    pub(crate) elu_input: bool,
    /// the output multiplied by the ELU's derivative at these values (shaped as the output)
    pub(crate) elu_grad_at: Option<&'a Tensor>,
    /// added to the output last (shaped as the output)
    pub(crate) residual: Option<&'a Tensor>,
}

impl Fused<'_> {
    /// The output-side parts (the ELU's derivative, then the residual) as separate passes over `y`: the
    /// paths that do not fuse them.
    fn after(self, y: CpuTensor) -> CpuTensor {
        let y = match self.elu_grad_at {
            Some(at) => elu_backward(at, &y),
            None => y,
        };
        match self.residual {
            Some(r) => add(&y, r),
            None => y,
        }
    }
}

/// `g` times the ELU's derivative at `v`, as the backend's `elu_backward` computes it (`exp(v) = elu(v) + 1`
/// for `v <= 0`).
#[inline(always)]
fn elu_grad(v: f32, g: f32) -> f32 {
    if v > 0.0 {
        g
    } else {
        g * (elu1(v) + 1.0)
    }
}

/// A convolution path: the portable im2col + GEMM, or a kernel of `direct`/`winograd` at a width (and, for
/// Winograd, a tiling).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Path {
    Im2col,
    Direct(Kernel),
    Winograd(Kernel, Tile),
}

impl Path {
    /// The path the backend takes for input shape `x` and weight shape `w`. Where the CPU has AVX2 + FMA, at
    /// any depth: Winograd for "same" 3x3 convolutions with input channels a multiple of 8, tiled by
    /// [`Tile::for_image`] (F(4x4, 3x3) wherever it does fewer products, else F(2x2, 3x3)), else the
    /// direct kernel (both block deep reductions, see their modules), at this process's width, except that a
    /// direct layer of at most 16 output channels (NCSNv2's last, 1 or 3) runs at 8 lanes: it fills one
    /// 8-lane block and computes mostly padding in a 16-lane one (the bits are the same). Otherwise im2col +
    /// GEMM. `JOINTDIFF_CPU_KERNEL=direct` turns Winograd off and `JOINTDIFF_CPU_KERNEL=portable` both.
    pub(crate) fn chosen(x: [usize; 4], w: [usize; 4], p: Conv2dParams) -> Path {
        let [co, ci, kh, kw] = w;
        match simd::kernel() {
            Kernel::Portable => Path::Im2col,
            k if k.has_winograd()
                && winograd::eligible(ci, co, kh, kw, p.padding, p.dilation)
                && simd::winograd_enabled() =>
            {
                Path::Winograd(k, Tile::for_image(x[2], x[3], p.dilation))
            }
            Kernel::Avx512 if co <= 16 => Path::Direct(Kernel::Avx2),
            k => Path::Direct(k),
        }
    }

    /// Every path that can run a convolution of weight shape `w` on this CPU: im2col, then direct and (where
    /// eligible) Winograd with either tiling at each width the CPU runs.
    pub(crate) fn all(w: [usize; 4], p: Conv2dParams) -> Vec<Path> {
        let [co, ci, kh, kw] = w;
        let mut v = vec![Path::Im2col];
        for &k in simd::WIDTHS.iter().filter(|k| k.supported()) {
            v.push(Path::Direct(k));
            if k.has_winograd() && winograd::eligible(ci, co, kh, kw, p.padding, p.dilation) {
                v.extend(Tile::ALL.map(|t| Path::Winograd(k, t)));
            }
        }
        v
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Path::Im2col => "im2col",
            Path::Direct(Kernel::Avx512) => "direct avx512",
            Path::Direct(Kernel::Neon) => "direct neon",
            Path::Direct(_) => "direct avx2",
            Path::Winograd(Kernel::Avx512, Tile::F2) => "winograd2 avx512",
            Path::Winograd(Kernel::Avx512, Tile::F4) => "winograd4 avx512",
            Path::Winograd(_, Tile::F2) => "winograd2 avx2",
            Path::Winograd(_, Tile::F4) => "winograd4 avx2",
        }
    }

    /// The convolution on this path.
    ///
    /// # Panics
    /// If the CPU cannot run the path's width, or Winograd is not eligible.
    pub(crate) fn run(
        self,
        x: &Tensor,
        w: &CpuTensor,
        b: Option<&Tensor>,
        p: Conv2dParams,
    ) -> Tensor {
        self.run_fused(x, w, b, p, Fused::default())
    }

    /// The convolution with what `fused` adds around it, on the path: Winograd applies the input ELU in
    /// its channel-last copy of the input, and the ELU's derivative and the residual as it writes the
    /// output planes; the other paths run them as separate passes. The same bits either way.
    pub(crate) fn run_fused(
        self,
        x: &Tensor,
        w: &CpuTensor,
        b: Option<&Tensor>,
        p: Conv2dParams,
        fused: Fused,
    ) -> Tensor {
        if let Path::Winograd(k, t) = self {
            return winograd::conv2d(k, t, x, w, b, p.dilation, fused);
        }
        let e = fused.elu_input.then(|| elu(x));
        let x = e.as_deref().unwrap_or(x);
        let y = match self {
            Path::Direct(k) => direct::conv2d(k, x, w, b, p),
            _ => conv2d_im2col(x, w, b, p),
        };
        fused.after(y.into()).into_host()
    }
}

/// The convolutions a computation runs and each path timed on its own (`examples/conv_layers.rs`: the per-layer
/// figures of BENCHMARKS.md). Not a stable API.
#[doc(hidden)]
pub mod layers {
    use super::*;
    use std::sync::Mutex;

    /// One convolution: input shape, weight shape, parameters.
    pub type Call = ([usize; 4], [usize; 4], Conv2dParams);

    static RECORDING: Mutex<Option<Vec<Call>>> = Mutex::new(None);
    /// Whether [`recorded`] is running (checked first, so that convolutions touch no lock otherwise).
    static ON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

    pub(crate) fn record(x: [usize; 4], w: [usize; 4], p: Conv2dParams) {
        if ON.load(std::sync::atomic::Ordering::Relaxed) {
            if let Some(v) = RECORDING.lock().ok().as_mut().and_then(|r| r.as_mut()) {
                v.push((x, w, p));
            }
        }
    }

    /// Runs `f` and lists the convolutions the backend ran meanwhile (any thread), in order.
    pub fn recorded<R>(f: impl FnOnce() -> R) -> (R, Vec<Call>) {
        *RECORDING.lock().unwrap_or_else(|e| e.into_inner()) = Some(Vec::new());
        ON.store(true, std::sync::atomic::Ordering::SeqCst);
        let r = f();
        ON.store(false, std::sync::atomic::Ordering::SeqCst);
        let calls = RECORDING
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_default();
        (r, calls)
    }

    /// The convolution paths that can run a convolution of weight shape `w` on this CPU, by name: `im2col`,
    /// then `direct`, `winograd2` and `winograd4` (F(2x2, 3x3) and F(4x4, 3x3), where eligible) at each width
    /// the CPU runs (`avx2`, `avx512`).
    pub fn paths(w: [usize; 4], p: Conv2dParams) -> Vec<&'static str> {
        Path::all(w, p).into_iter().map(Path::name).collect()
    }

    /// The name of the path the backend takes for input shape `x` and weight shape `w`.
    pub fn chosen(x: [usize; 4], w: [usize; 4], p: Conv2dParams) -> &'static str {
        Path::chosen(x, w, p).name()
    }

    /// The convolution by one of [`paths`].
    ///
    /// # Panics
    /// On a name `paths` did not give for this convolution.
    pub fn run(
        path: &str,
        x: &Tensor,
        w: &CpuTensor,
        b: Option<&Tensor>,
        p: Conv2dParams,
    ) -> Tensor {
        let found = Path::all(w.shape, p).into_iter().find(|q| q.name() == path);
        found
            .unwrap_or_else(|| panic!("no convolution path {path} here"))
            .run(x, w, b, p)
    }
}

/// Which of a weight tensor's packed forms a width uses (their column counts differ).
/// AVX2 and NEON share a slot: no CPU runs both.
pub(crate) fn width_slot(k: Kernel) -> usize {
    usize::from(k == Kernel::Avx512)
}

/// The portable convolution: tiled im2col + `matrixmultiply`.
fn conv2d_im2col(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, p: Conv2dParams) -> Tensor {
    let [n, ci, h, wd] = x.shape;
    let [co, _, kh, kw] = w.shape;
    let ho = reference::conv_out(h, kh, p);
    let wo = reference::conv_out(wd, kw, p);
    let hw = ho * wo;
    let mut out = pool::zeros([n, co, ho, wo]);
    if hw == 0 {
        return out;
    }
    let kk = ci * kh * kw;
    let pointwise = kh == 1 && kw == 1 && p.padding == 0;
    let tw = if pointwise {
        256.min(hw)
    } else {
        tile_cols(kk, hw)
    };
    let tiles = hw.div_ceil(tw);
    let optr = OutPtr(out.data.as_mut_ptr());
    let run = |job: usize| {
        let (b, t) = (job / tiles, job % tiles);
        let c0 = t * tw;
        let cw = tw.min(hw - c0);
        let src = &x.data[b * ci * h * wd..(b + 1) * ci * h * wd];
        // SAFETY: job (b, t) writes only columns [c0, c0 + cw) of image b's [co, hw] output block.
        let cptr = unsafe { optr.at(b * co * hw + c0) };
        if pointwise {
            // B = the input itself: rows are channels, columns pixels.
            unsafe {
                sgemm_strided(
                    co,
                    ci,
                    cw,
                    w.data.as_ptr(),
                    hw,
                    src.as_ptr().add(c0),
                    cptr,
                    hw,
                )
            };
        } else {
            SCRATCH.with(|s| {
                let mut col = s.borrow_mut();
                if col.len() < kk * cw {
                    col.resize(kk * cw, 0.0);
                }
                im2col_tile(src, ci, h, wd, kh, kw, p, wo, c0, cw, &mut col[..kk * cw]);
                unsafe { sgemm_strided(co, kk, cw, w.data.as_ptr(), cw, col.as_ptr(), cptr, hw) };
            });
        }
        if let Some(bias) = bias {
            for o in 0..co {
                let bv = bias.data[o];
                // SAFETY: same disjoint column range as above.
                let row = unsafe { std::slice::from_raw_parts_mut(cptr.add(o * hw), cw) };
                row.iter_mut().for_each(|v| *v += bv);
            }
        }
    };
    let jobs = n * tiles;
    // Size gate: parallel only when there is enough work to pay for the threads.
    if jobs > 1 && (co * kk * hw * n) >= 1 << 18 {
        (0..jobs).into_par_iter().for_each(run);
    } else {
        (0..jobs).for_each(run);
    }
    out
}

/// Mean and (biased) variance of one plane in f64, with 8 partial sums (so that the loop vectorises; the
/// reference sums in one chain, which bounds it at one add per few cycles). Same order whatever the threads.
fn plane_stats(plane: &[f32]) -> (f64, f64) {
    wide(|| {
        let n = plane.len() as f64;
        let mut acc = [0f64; 8];
        let chunks = plane.chunks_exact(8);
        let tail: f64 = chunks.remainder().iter().map(|&v| v as f64).sum();
        for ch in chunks {
            for (a, &v) in acc.iter_mut().zip(ch) {
                *a += v as f64;
            }
        }
        let mean = (acc.iter().sum::<f64>() + tail) / n;
        let mut acc = [0f64; 8];
        let chunks = plane.chunks_exact(8);
        let tail: f64 = chunks
            .remainder()
            .iter()
            .map(|&v| (v as f64 - mean) * (v as f64 - mean))
            .sum();
        for ch in chunks {
            for (a, &v) in acc.iter_mut().zip(ch) {
                *a += (v as f64 - mean) * (v as f64 - mean);
            }
        }
        (mean, (acc.iter().sum::<f64>() + tail) / n)
    })
}

thread_local! {
    /// InstanceNorm++'s per-channel statistics and affine maps of the call this thread runs.
    #[allow(clippy::type_complexity)]
    static NORM_SCRATCH: Cell<(Vec<(f64, f64)>, Vec<(f32, f32)>)> = const { Cell::new((Vec::new(), Vec::new())) };
    /// Max pooling's padded plane, row-pass and column-pass outputs.
    #[allow(clippy::type_complexity)]
    static POOL_SCRATCH: Cell<(Vec<f32>, Vec<f32>, Vec<f32>)> =
        const { Cell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// Whether an elementwise operation over `len` floats is worth splitting over the pool.
fn split_elementwise(len: usize) -> bool {
    len >= 1 << 15
}

/// The mean `m` of an image's channel means and `sqrt(var + 1e-5)` of them (unbiased), as
/// `reference::norm_stats` computes them: InstanceNorm++'s mean-correction term is `(mean - m) / vs`.
fn means_stats(means: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let c = means.clone().count() as f64;
    let m = means.clone().sum::<f64>() / c;
    let v = means.map(|u| (u - m) * (u - m)).sum::<f64>() / (c - 1.0);
    (m, (v + 1e-5).sqrt())
}

/// InstanceNorm++ (optionally followed by ELU): channel statistics, then one pass that applies
/// `scale * v + shift` per channel. Channels run in parallel when the tensor is large enough.
fn instance_norm_plus_act(
    x: &Tensor,
    alpha: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    elu: bool,
) -> Tensor {
    let [n, c, h, w] = x.shape;
    let hw = h * w;
    let mut out = pool::zeros(x.shape);
    if hw == 0 || c == 0 {
        return out;
    }
    let split = split_elementwise(x.data.len());
    // per (image, channel): mean and variance
    // this thread's buffers for the statistics and the maps (taken and put back)
    let (mut stats, mut maps) = NORM_SCRATCH.with(|s| s.take());
    stats.clear();
    stats.resize(n * c, (0.0, 0.0));
    if split {
        stats
            .par_iter_mut()
            .zip(x.data.par_chunks(hw))
            .for_each(|(st, plane)| *st = plane_stats(plane));
    } else {
        stats
            .iter_mut()
            .zip(x.data.chunks(hw))
            .for_each(|(st, plane)| *st = plane_stats(plane));
    }
    // per (image, channel): the affine map, from the image's statistics of channel means
    maps.clear();
    for img in stats.chunks(c) {
        let (m, vs) = means_stats(img.iter().map(|s| s.0));
        for (ch, &(mean, var)) in img.iter().enumerate() {
            let inv = 1.0 / (var + 1e-5).sqrt();
            let (a, g, be) = (
                alpha.data[ch] as f64,
                gamma.data[ch] as f64,
                beta.data[ch] as f64,
            );
            // out = g * ((v - mean) * inv + a * (mean - m) / vs) + be = scale * v + shift
            let scale = (g * inv) as f32;
            let shift = (g * (a * (mean - m) / vs - mean * inv) + be) as f32;
            maps.push((scale, shift));
        }
    }
    type Plane<'a> = ((&'a mut [f32], &'a [f32]), &'a (f32, f32));
    let apply = |((d, s), &(scale, shift)): Plane| {
        wide(|| {
            if elu {
                for (o, &v) in d.iter_mut().zip(s) {
                    *o = elu1(scale * v + shift);
                }
            } else {
                for (o, &v) in d.iter_mut().zip(s) {
                    *o = scale * v + shift;
                }
            }
        })
    };
    if split {
        out.data
            .par_chunks_mut(hw)
            .zip(x.data.par_chunks(hw))
            .zip(&maps)
            .for_each(apply);
    } else {
        out.data
            .chunks_mut(hw)
            .zip(x.data.chunks(hw))
            .zip(&maps)
            .for_each(apply);
    }
    NORM_SCRATCH.with(|s| s.set((stats, maps)));
    out
}

/// InstanceNorm++'s backward, the reference's formulas (`reference::instance_norm_plus_backward`) in f64 with
/// the sums in 8 partial sums and the per-element divisions by the standard deviation as products with its
/// inverse, so that the loops vectorise (the reference divides three times per element and sums in one
/// chain). Per channel: one pass for `sum(g)` and `sum(g (x - mu))`, one for the input gradient; the
/// mean-correction path couples the channels through their `sum(g)`, so its term is added in the second
/// pass once every channel's first pass is done. Same operations whatever the thread count.
fn instance_norm_plus_backward(
    x: &Tensor,
    alpha: &Tensor,
    gamma: &Tensor,
    gout: &Tensor,
) -> (Tensor, Tensor, Tensor, Tensor) {
    let [n, c, h, w] = x.shape;
    let (hw, per_channel) = (h * w, || Tensor::zeros([1, c, 1, 1]));
    let hwf = hw as f64;
    let (mut ga, mut gg, mut gb) = (per_channel(), per_channel(), per_channel());
    if hw == 0 || c == 0 {
        return (Tensor::zeros(x.shape), ga, gg, gb);
    }
    // the input gradient, written image by image, channel by channel (no zeroing first)
    let mut gxd = pool::with_capacity(n * c * hw);
    let gx_out = &mut gxd.spare_capacity_mut()[..n * c * hw];
    // per channel: mean, 1 / sd, sum(g), sum(g (x - mu))
    let mut ch_stats = vec![(0f64, 0f64, 0f64, 0f64); c];
    let (mut g_mt, mut g_mu) = (vec![0f64; c], vec![0f64; c]);
    for b in 0..n {
        let img = &x.data[b * c * hw..(b + 1) * c * hw];
        let gimg = &gout.data[b * c * hw..(b + 1) * c * hw];
        for ((st, xs), go) in ch_stats
            .iter_mut()
            .zip(img.chunks_exact(hw))
            .zip(gimg.chunks_exact(hw))
        {
            let (mu, var) = plane_stats(xs);
            let (s_go, s_god) = grad_sums(xs, go, mu);
            *st = (mu, 1.0 / (var + 1e-5).sqrt(), s_go, s_god);
        }
        let (m, s_v) = means_stats(ch_stats.iter().map(|s| s.0));
        for (ch, &(mu, inv_sd, sum_go, s_god)) in ch_stats.iter().enumerate() {
            let (a, g) = (alpha.data[ch] as f64, gamma.data[ch] as f64);
            let mt = (mu - m) / s_v;
            gb.data[ch] += sum_go as f32;
            gg.data[ch] += (s_god * inv_sd + a * mt * sum_go) as f32;
            ga.data[ch] += (g * mt * sum_go) as f32;
            g_mt[ch] = g * a * sum_go;
        }
        let sum_gmt: f64 = g_mt.iter().sum();
        let dot: f64 = g_mt.iter().zip(&ch_stats).map(|(q, s)| q * (s.0 - m)).sum();
        for (j, gm) in g_mu.iter_mut().enumerate() {
            *gm = (g_mt[j] - sum_gmt / c as f64) / s_v
                - dot * (ch_stats[j].0 - m) / ((c as f64 - 1.0) * s_v * s_v * s_v);
        }
        let dimg = &mut gx_out[b * c * hw..(b + 1) * c * hw];
        for (ch, ((d, xs), go)) in dimg
            .chunks_exact_mut(hw)
            .zip(img.chunks_exact(hw))
            .zip(gimg.chunks_exact(hw))
            .enumerate()
        {
            let (mu, inv_sd, sum_go, s_god) = ch_stats[ch];
            let g = gamma.data[ch] as f64;
            // dh -> dx: (g q - mean(g q) - h mean(g q h)) / sd, h = (x - mu) / sd
            let mean_gh = g * sum_go / hwf;
            let k = g * s_god * inv_sd / hwf * inv_sd;
            let add = (g_mu[ch] / hwf) as f32;
            wide(|| {
                for ((o, &xv), &q) in d.iter_mut().zip(xs).zip(go) {
                    let hv = xv as f64 - mu;
                    o.write((((q as f64 * g - mean_gh - hv * k) * inv_sd) as f32) + add);
                }
            });
        }
    }
    // SAFETY: every image's every channel plane was written above
    unsafe { gxd.set_len(n * c * hw) };
    let gx = Tensor {
        shape: x.shape,
        data: gxd,
    };
    (gx, ga, gg, gb)
}

/// `sum(g)` and `sum(g (x - mu))` of one plane in f64, in 8 partial sums (so that the loop vectorises).
fn grad_sums(xs: &[f32], go: &[f32], mu: f64) -> (f64, f64) {
    wide(|| {
        let (mut a, mut b) = ([0f64; 8], [0f64; 8]);
        let (xc, gc) = (xs.chunks_exact(8), go.chunks_exact(8));
        let (mut ta, mut tb) = (0f64, 0f64);
        for (&xv, &q) in xc.remainder().iter().zip(gc.remainder()) {
            ta += q as f64;
            tb += q as f64 * (xv as f64 - mu);
        }
        for (x8, g8) in xc.zip(gc) {
            for i in 0..8 {
                a[i] += g8[i] as f64;
                b[i] += g8[i] as f64 * (x8[i] as f64 - mu);
            }
        }
        (a.iter().sum::<f64>() + ta, b.iter().sum::<f64>() + tb)
    })
}

/// Runs `f` compiled for AVX-512F where the backend runs its 16-lane kernels, else for AVX2 where the CPU
/// has it, so that the loops inlined into it vectorise 16 or 8 wide (the crate is built for baseline x86-64,
/// 4 wide; 16 wide: 28x28 ngf 32 4-5% faster than 8). Rust never contracts `a * b + c` into an FMA, and the
/// loops' sums keep their written order, so the results are the same bits at every width.
#[inline(always)]
fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx512f,avx2")]
        unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if simd::kernel() == Kernel::Avx512 {
            // SAFETY: the 16-lane kernel is chosen only where the CPU has AVX-512F (and AVX2).
            return unsafe { avx512(f) };
        }
        if direct::available() {
            // SAFETY: `available` checked that the CPU has AVX2.
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// `elu(x)` elementwise ([`elu1`]), in a pooled buffer.
fn elu(x: &Tensor) -> CpuTensor {
    pool::map(x.shape, |data| {
        wide(|| data.extend(x.data.iter().map(|&v| elu1(v))))
    })
}

/// `gout` times the ELU's derivative at `x` ([`elu_grad`]), in a pooled buffer.
fn elu_backward(x: &Tensor, gout: &Tensor) -> CpuTensor {
    assert_eq!(x.data.len(), gout.data.len(), "elu_backward: shapes differ");
    // SAFETY: the loop writes every value (the three slices have the tensor's length)
    unsafe {
        pool::filled(x.shape, |o| {
            wide(|| {
                for ((o, &v), &g) in o.iter_mut().zip(&x.data).zip(&gout.data) {
                    o.write(elu_grad(v, g));
                }
            })
        })
    }
}

/// `a + b` elementwise, in a pooled buffer.
fn add(a: &Tensor, b: &Tensor) -> CpuTensor {
    pool::map(a.shape, |data| {
        wide(|| data.extend(a.data.iter().zip(&b.data).map(|(&u, &v)| u + v)))
    })
}

/// ELU with alpha 1, branch-free so that loops over slices vectorise: `x` for `x > 0`, else `exp(x) - 1`
/// with `exp` by Cody–Waite range reduction and a degree-6 polynomial (relative error about 2e-7; absolute
/// error of `exp(x) - 1` below 2e-7).
#[inline]
fn elu1(v: f32) -> f32 {
    let x = v.clamp(-87.0, 0.0);
    // exp(x) = 2^k * exp(r), r = x - k ln2 in [-ln2/2, ln2/2]
    // round to nearest by the 1.5 * 2^23 trick (no roundf call, so the loop vectorises on baseline x86-64)
    let biased = x * std::f32::consts::LOG2_E + 12_582_912.0;
    let k = biased - 12_582_912.0;
    // k as an integer from the same bits (k + 1.5 * 2^23 is exact, one unit per ulp): no float-to-int
    // conversion, whose saturating semantics keep it scalar
    let ki = biased.to_bits() as i32 - 0x4B40_0000;
    let r = (x - k * 0.693_145_75) - k * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (0.166_666_67
                    + r * (0.041_666_668 + r * (0.008_333_334 + r * 0.001_388_889)))));
    let e = p * f32::from_bits(((ki + 127) as u32) << 23);
    if v > 0.0 {
        v
    } else {
        e - 1.0
    }
}

/// Separable stride-1 max pooling: a row pass then a column pass (padding is -inf, so it never wins), each
/// as `k` elementwise passes over shifted slices (8 wide). Planes run in parallel on large tensors.
///
/// NCSNv2's planes are narrow (28 or 14 pixels), so that passes row by row spend their time on loop ends
/// and scalar tails. The row pass runs once over the whole plane, laid out with its -inf padding columns
/// (rows `w + 2 pad` apart: an output `(y, x)` reads `k` neighbours within its own padded row, and the values
/// it computes between rows are never read), and the column pass runs once over the rows whose window lies
/// inside the image; only the `2 pad` rows at the top and bottom go row by row.
fn max_pool(x: &Tensor, k: usize, pad: usize) -> Tensor {
    let [n, c, h, w] = x.shape;
    let ho = (h + 2 * pad + 1).saturating_sub(k);
    let wo = (w + 2 * pad + 1).saturating_sub(k);
    let mut out = pool::zeros([n, c, ho, wo]);
    if ho * wo == 0 || h * w == 0 {
        return out;
    }
    let wp = w + 2 * pad;
    // the row pass's outputs: (y, x) at y * wp + x for x < wo; the last one is (h - 1) * wp + wo - 1
    let len = (h - 1) * wp + wo;
    // the output rows whose window is inside the image: [top, bottom)
    let top = pad.min(ho);
    let bottom = (h + pad + 1).saturating_sub(k).clamp(top, ho);
    // scratch per thread of the loop: the padded plane (its padding columns stay -inf: only the interior is
    // written), the row pass's output and the column pass's over the interior rows, all rows `wp` apart
    let scratch = || {
        (
            vec![f32::NEG_INFINITY; h * wp],
            vec![0f32; h * wp],
            vec![0f32; h * wp],
        )
    };
    type Scratch = (Vec<f32>, Vec<f32>, Vec<f32>);
    let plane = |(padded, rows, cols): &mut Scratch, (d, s): (&mut [f32], &[f32])| {
        wide(|| {
            for (sr, pr) in s.chunks_exact(w).zip(padded.chunks_exact_mut(wp)) {
                pr[pad..pad + w].copy_from_slice(sr);
            }
            let r = &mut rows[..len];
            r.copy_from_slice(&padded[..len]);
            for i in 1..k {
                for (o, &v) in r.iter_mut().zip(&padded[i..i + len]) {
                    *o = pmax(*o, v);
                }
            }
            // interior rows: output row oy is the max of rows oy - pad .. oy - pad + k, in one flat pass
            // per window row over rows [top, bottom)
            if bottom > top {
                let m = (bottom - top - 1) * wp + wo;
                let base = (top - pad) * wp;
                let cl = &mut cols[..m];
                cl.copy_from_slice(&rows[base..base + m]);
                for dy in 1..k {
                    let from = base + dy * wp;
                    for (o, &v) in cl.iter_mut().zip(&rows[from..from + m]) {
                        *o = pmax(*o, v);
                    }
                }
                for (oy, dr) in d.chunks_exact_mut(wo).enumerate().take(bottom).skip(top) {
                    let at = (oy - top) * wp;
                    dr.copy_from_slice(&cols[at..at + wo]);
                }
            }
            // the top and bottom rows: the window clipped to the image
            for (oy, dr) in d.chunks_exact_mut(wo).enumerate() {
                if (top..bottom).contains(&oy) {
                    continue;
                }
                let y0 = oy.saturating_sub(pad);
                let y1 = (oy + k - pad).min(h);
                dr.copy_from_slice(&rows[y0 * wp..y0 * wp + wo]);
                for y in y0 + 1..y1 {
                    for (o, &v) in dr.iter_mut().zip(&rows[y * wp..y * wp + wo]) {
                        *o = pmax(*o, v);
                    }
                }
            }
        })
    };
    if split_elementwise(x.data.len()) {
        out.data
            .par_chunks_mut(ho * wo)
            .zip(x.data.par_chunks(h * w))
            .for_each_init(scratch, plane);
    } else {
        let mut sc = POOL_SCRATCH.with(|s| s.take());
        sc.0.clear();
        sc.0.resize(h * wp, f32::NEG_INFINITY);
        sc.1.resize(sc.1.len().max(h * wp), 0.0);
        sc.2.resize(sc.2.len().max(h * wp), 0.0);
        out.data
            .chunks_mut(ho * wo)
            .zip(x.data.chunks(h * w))
            .for_each(|item| plane(&mut sc, item));
        POOL_SCRATCH.with(|s| s.set(sc));
    }
    out
}

/// 2x2 mean pooling into a pooled buffer (the reference's loop).
fn mean_pool2(x: &Tensor) -> Tensor {
    let [n, c, h, w] = x.shape;
    let mut out = pool::zeros([n, c, h / 2, w / 2]);
    reference::mean_pool2_into(x, &mut out.data);
    out
}

/// Bilinear resize with aligned corners into a pooled buffer (the reference's loop).
fn resize_bilinear(x: &Tensor, ho: usize, wo: usize) -> Tensor {
    let [n, c, h, w] = x.shape;
    let mut out = pool::zeros([n, c, ho, wo]);
    if h * w == 0 || ho * wo == 0 {
        // nothing to read or nothing to write: the reference's own loops
        reference::resize_bilinear_into(x, ho, wo, &mut out.data);
        return out;
    }
    // the reference's arithmetic, its coefficients computed once per row and column
    let (ty, tx) = (bilinear_table(ho, h), bilinear_table(wo, w));
    for (s, d) in x
        .data
        .chunks_exact(h * w)
        .zip(out.data.chunks_exact_mut(ho * wo))
    {
        for (drow, &(y0, y1, ly0, ly1)) in d.chunks_exact_mut(wo).zip(&ty) {
            let (r0, r1) = (&s[y0 * w..(y0 + 1) * w], &s[y1 * w..(y1 + 1) * w]);
            for (o, &(x0, x1, lx0, lx1)) in drow.iter_mut().zip(&tx) {
                *o = ly0 * (lx0 * r0[x0] + lx1 * r0[x1]) + ly1 * (lx0 * r1[x0] + lx1 * r1[x1]);
            }
        }
    }
    out
}

/// Gradient of [`resize_bilinear`]: the reference's accumulations in the reference's order, the
/// coefficients computed once per row and column.
fn resize_bilinear_backward(gout: &Tensor, in_shape: [usize; 4]) -> Tensor {
    let [_, _, h, w] = in_shape;
    let [_, _, ho, wo] = gout.shape;
    if h * w == 0 || ho * wo == 0 {
        return reference::resize_bilinear_backward(gout, in_shape);
    }
    let mut gx = pool::zeros(in_shape);
    let (ty, tx) = (bilinear_table(ho, h), bilinear_table(wo, w));
    for (g, d) in gout
        .data
        .chunks_exact(ho * wo)
        .zip(gx.data.chunks_exact_mut(h * w))
    {
        for (grow, &(y0, y1, ly0, ly1)) in g.chunks_exact(wo).zip(&ty) {
            for (&g, &(x0, x1, lx0, lx1)) in grow.iter().zip(&tx) {
                d[y0 * w + x0] += g * ly0 * lx0;
                d[y0 * w + x1] += g * ly0 * lx1;
                d[y1 * w + x0] += g * ly1 * lx0;
                d[y1 * w + x1] += g * ly1 * lx1;
            }
        }
    }
    gx
}

/// [`reference::bilinear_coeffs`] of every output index (`out_len` of them; `in_len` > 0).
fn bilinear_table(out_len: usize, in_len: usize) -> Vec<(usize, usize, f32, f32)> {
    (0..out_len)
        .map(|i| reference::bilinear_coeffs(out_len, in_len, i))
        .collect()
}

/// max that propagates NaN like the reference.
#[inline]
fn pmax(a: f32, b: f32) -> f32 {
    if b > a || b.is_nan() {
        b
    } else {
        a
    }
}

/// The reference max-pool backward of one plane where every window is non-empty (`pad < k`), in two passes:
/// the first maximum of each row's window (value and column), then the first row whose maximum is strictly
/// greater, for `h k + ho k` comparisons per output column instead of `ho k^2`. The loops run across output
/// columns so that they vectorise (a compare and two blends per element; window-at-a-time loops mispredicted
/// their branches). Each window starts from its first element and takes a later one only when strictly
/// greater, as the reference does: the same element takes the gradient.
#[allow(clippy::too_many_arguments)]
fn max_pool_backward_plane(
    s: &[f32],
    g: &[f32],
    gx: &mut [f32],
    [h, w, ho, wo]: [usize; 4],
    k: usize,
    pad: usize,
    (best, at): (&mut [f32], &mut [u32]),
) {
    let window = |o: usize, len: usize| (o.saturating_sub(pad), (o + k - pad).min(len));
    // output columns whose window lies inside the row: [lo, hi)
    let lo = pad.min(wo);
    let hi = (w + pad).saturating_sub(k - 1).clamp(lo, wo);
    // pass 1: each row's first maximum per output column
    for y in 0..h {
        let row = &s[y * w..(y + 1) * w];
        let (bv, bi) = (
            &mut best[y * wo..(y + 1) * wo],
            &mut at[y * wo..(y + 1) * wo],
        );
        for ox in 0..wo {
            let x0 = window(ox, w).0;
            (bv[ox], bi[ox]) = (row[x0], x0 as u32);
        }
        for j in 1..k {
            // inside the row: column ox - pad + j, for every ox in [lo, hi) (none where the row is shorter
            // than the window: there the slice would start past the row's end)
            if lo < hi {
                take_greater(
                    &mut bv[lo..hi],
                    &mut bi[lo..hi],
                    &row[lo + j - pad..hi + j - pad],
                    (lo + j - pad) as u32,
                    None,
                );
            }
            // the border columns: only the part of the window inside the row
            for ox in (0..lo).chain(hi..wo) {
                let (x0, x1) = window(ox, w);
                let xx = (ox + j).wrapping_sub(pad);
                if xx > x0 && xx < x1 && row[xx] > bv[ox] {
                    (bv[ox], bi[ox]) = (row[xx], xx as u32);
                }
            }
        }
    }
    // pass 2: per output row, the first row of its window whose maximum is strictly greater; the gradient
    // goes to that element, output columns in order (several may pick one element). The running maxima and
    // their flat indices live in the scratch's last row.
    let (best, vals) = best.split_at_mut(h * wo);
    let (at, idx) = at.split_at_mut(h * wo);
    for oy in 0..ho {
        let (y0, y1) = window(oy, h);
        for ox in 0..wo {
            (vals[ox], idx[ox]) = (best[y0 * wo + ox], (y0 * w) as u32 + at[y0 * wo + ox]);
        }
        for y in y0 + 1..y1 {
            let (bv, bi) = (&best[y * wo..(y + 1) * wo], &at[y * wo..(y + 1) * wo]);
            take_greater(vals, idx, bv, (y * w) as u32, Some(bi));
        }
        for ox in 0..wo {
            gx[idx[ox] as usize] += g[oy * wo + ox];
        }
    }
}

/// [`max_pool_backward_plane`] where the output has the input's size (`k = 2 pad + 1`, NCSNv2's 5x5 pooling
/// with padding 2), with each pass run once over the whole plane: an output pixel's window is then a
/// constant offset away in the flat plane, so the row pass runs across every row's inner columns at once
/// (the values it leaves in the border columns, read across a row end, are recomputed after it) and the
/// column pass across every output row whose window is inside the image. Maxima are kept with their flat
/// index. Same comparisons per window as the row-by-row version, so the same element takes the gradient, and
/// the gradient is added in output order, as there.
fn max_pool_backward_plane_flat(
    s: &[f32],
    g: &[f32],
    gx: &mut [f32],
    [h, w]: [usize; 2],
    pad: usize,
    (best, at, vals, idx): (&mut [f32], &mut [u32], &mut [f32], &mut [u32]),
) {
    let k = 2 * pad + 1;
    let hw = h * w;
    let (best, at, vals, idx) = (
        &mut best[..hw],
        &mut at[..hw],
        &mut vals[..hw],
        &mut idx[..hw],
    );
    // pass 1: each row's first maximum per output column, with its flat index
    let (lo, hi) = (pad.min(w), w.saturating_sub(pad).max(pad.min(w)));
    if hi > lo {
        // every row's inner columns [lo, hi): flat positions [lo, (h - 1) w + hi), window start p - pad
        let (f0, f1) = (lo, (h - 1) * w + hi);
        best[f0..f1].copy_from_slice(&s[f0 - pad..f1 - pad]);
        for (i, a) in at[f0..f1].iter_mut().enumerate() {
            *a = (f0 - pad + i) as u32;
        }
        for j in 1..k {
            let c0 = f0 - pad + j;
            take_greater(
                &mut best[f0..f1],
                &mut at[f0..f1],
                &s[c0..c0 + (f1 - f0)],
                c0 as u32,
                None,
            );
        }
    }
    // the border columns of every row (and the inner ones' values across row ends): the window clipped to
    // the row, from its first element
    for y in 0..h {
        let row = &s[y * w..(y + 1) * w];
        for ox in (0..lo).chain(hi..w) {
            let (x0, x1) = (ox.saturating_sub(pad), (ox + k - pad).min(w));
            let (mut v, mut a) = (row[x0], x0);
            for (xx, &c) in row.iter().enumerate().take(x1).skip(x0 + 1) {
                if c > v {
                    (v, a) = (c, xx);
                }
            }
            best[y * w + ox] = v;
            at[y * w + ox] = (y * w + a) as u32;
        }
    }
    // pass 2: per output pixel, the first row of its window whose maximum is strictly greater
    let (top, bottom) = (pad.min(h), h.saturating_sub(pad).max(pad.min(h)));
    if bottom > top {
        // output rows [top, bottom): flat positions [top w, bottom w), window rows start (oy - pad) w
        let (f0, f1) = (top * w, bottom * w);
        let b0 = f0 - pad * w;
        vals[f0..f1].copy_from_slice(&best[b0..b0 + (f1 - f0)]);
        idx[f0..f1].copy_from_slice(&at[b0..b0 + (f1 - f0)]);
        for dy in 1..k {
            let c0 = b0 + dy * w;
            take_greater(
                &mut vals[f0..f1],
                &mut idx[f0..f1],
                &best[c0..c0 + (f1 - f0)],
                0,
                Some(&at[c0..c0 + (f1 - f0)]),
            );
        }
    }
    for oy in (0..top).chain(bottom..h) {
        let (y0, y1) = (oy.saturating_sub(pad), (oy + k - pad).min(h));
        let (v, a) = (
            &mut vals[oy * w..(oy + 1) * w],
            &mut idx[oy * w..(oy + 1) * w],
        );
        v.copy_from_slice(&best[y0 * w..(y0 + 1) * w]);
        a.copy_from_slice(&at[y0 * w..(y0 + 1) * w]);
        for y in y0 + 1..y1 {
            take_greater(
                v,
                a,
                &best[y * w..(y + 1) * w],
                0,
                Some(&at[y * w..(y + 1) * w]),
            );
        }
    }
    // the gradient, in output order (several outputs may pick one element)
    for (&i, &q) in idx.iter().zip(g) {
        gx[i as usize] += q;
    }
}

/// Where `c[i] > v[i]` (false for NaN): `v[i] = c[i]` and `at[i] = base + (add[i] or i)`, for every `i`
/// (8 lanes at a time with AVX2, a compare and two blends).
fn take_greater(v: &mut [f32], at: &mut [u32], c: &[f32], base: u32, add: Option<&[u32]>) {
    let n = v.len().min(at.len()).min(c.len());
    #[cfg(target_arch = "x86_64")]
    let done = if direct::available() {
        // SAFETY: `available` means AVX2; every slice holds at least n elements (add too, when given).
        unsafe { take_greater_avx2(v, at, c, base, add, n) }
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    for i in done..n {
        if c[i] > v[i] {
            v[i] = c[i];
            at[i] = base + add.map_or(i as u32, |a| a[i]);
        }
    }
}

/// [`take_greater`] for `[0, n / 8 * 8)`; returns how many it did.
///
/// # Safety
/// Needs AVX2; `v`, `at`, `c` (and `add`, when given) hold at least `n` elements.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn take_greater_avx2(
    v: &mut [f32],
    at: &mut [u32],
    c: &[f32],
    base: u32,
    add: Option<&[u32]>,
    n: usize,
) -> usize {
    use std::arch::x86_64::*;
    let full = n / 8 * 8;
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for i in (0..full).step_by(8) {
        let (vp, ap) = (
            v.as_mut_ptr().add(i),
            at.as_mut_ptr().add(i).cast::<__m256i>(),
        );
        let (old, cv) = (_mm256_loadu_ps(vp), _mm256_loadu_ps(c.as_ptr().add(i)));
        let take = _mm256_cmp_ps::<_CMP_GT_OQ>(cv, old);
        let offset = match add {
            Some(a) => _mm256_loadu_si256(a.as_ptr().add(i).cast()),
            None => _mm256_add_epi32(lanes, _mm256_set1_epi32(i as i32)),
        };
        let new_at = _mm256_add_epi32(_mm256_set1_epi32(base as i32), offset);
        _mm256_storeu_ps(vp, _mm256_blendv_ps(old, cv, take));
        let kept = _mm256_castsi256_ps(_mm256_loadu_si256(ap));
        let picked = _mm256_blendv_ps(kept, _mm256_castsi256_ps(new_at), take);
        _mm256_storeu_si256(ap, _mm256_castps_si256(picked));
    }
    full
}

/// A tensor of the CPU backend: host data, immutable, and (for convolution weights) their repacked forms
/// for the direct and Winograd kernels, made on first use and kept with the tensor. The tensor cannot be
/// changed in place, so they never go stale: a sampler that runs the same network hundreds of times packs
/// each weight once. Nothing is allocated for them until a convolution asks. Clones share the data (a
/// reference count, no copy): a sampler's tape keeps the activations it needs without copying them.
#[derive(Debug, Clone)]
pub struct CpuTensor(ManuallyDrop<Arc<Shared>>);

/// The data and packed forms that a tensor's clones share.
#[derive(Debug)]
struct Shared {
    t: Tensor,
    packed: Packs,
}

/// The repacked forms of one weight tensor.
#[derive(Debug, Default)]
pub(crate) struct Packs {
    /// per width ([`width_slot`])
    pub(crate) direct: [OnceLock<Vec<f32>>; 2],
    /// per width ([`width_slot`]) and tiling ([`Tile::slot`])
    pub(crate) winograd: [[OnceLock<Vec<f32>>; 2]; 2],
    /// The flipped, transposed kernel whose forward convolution is this one's input gradient.
    pub(crate) backward: OnceLock<Box<CpuTensor>>,
}

/// Most shared headers ([`Shared`], emptied) one thread keeps for its next tensors.
const MAX_HEADERS: usize = 256;

thread_local! {
    /// Emptied headers of dropped tensors: a sampler step makes and drops the same few hundred tensors as
    /// the step before, so after the first step making a tensor allocates nothing, header included.
    static HEADERS: RefCell<Vec<Arc<Shared>>> = const { RefCell::new(Vec::new()) };
}

impl CpuTensor {
    /// The host tensor.
    pub fn host(&self) -> &Tensor {
        &self.0.t
    }
    /// The host tensor, by value (a copy where clones of this tensor are still alive).
    pub fn into_host(mut self) -> Tensor {
        match Arc::get_mut(&mut self.0) {
            Some(s) => Tensor {
                shape: s.t.shape,
                data: std::mem::take(&mut s.t.data),
            },
            None => self.0.t.clone(),
        }
    }
    pub(crate) fn packs(&self) -> &Packs {
        &self.0.packed
    }
}

impl From<Tensor> for CpuTensor {
    fn from(t: Tensor) -> Self {
        let kept = HEADERS
            .try_with(|h| h.try_borrow_mut().ok().and_then(|mut h| h.pop()))
            .ok()
            .flatten();
        // a kept header has no other clone (see Drop)
        if let Some(mut header) = kept {
            if let Some(s) = Arc::get_mut(&mut header) {
                s.t = t;
                return CpuTensor(ManuallyDrop::new(header));
            }
        }
        let shared = Arc::new(Shared {
            t,
            packed: Packs::default(),
        });
        CpuTensor(ManuallyDrop::new(shared))
    }
}

/// The last clone gives the storage back to its thread's pool, and the emptied header to its thread's
/// headers, for the next operation.
impl Drop for CpuTensor {
    fn drop(&mut self) {
        // SAFETY: `self.0` is not used again (this is the drop)
        let mut header = unsafe { ManuallyDrop::take(&mut self.0) };
        if let Some(s) = Arc::get_mut(&mut header) {
            pool::give(std::mem::take(&mut s.t.data));
            s.packed = Packs::default();
            let _ = HEADERS.try_with(|h| {
                if let Ok(mut h) = h.try_borrow_mut() {
                    if h.len() < MAX_HEADERS {
                        h.push(header);
                    }
                }
            });
        }
    }
}

/// Where a header is freed (not kept), its storage goes back to the pool.
impl Drop for Shared {
    fn drop(&mut self) {
        pool::give(std::mem::take(&mut self.t.data));
    }
}

impl std::ops::Deref for CpuTensor {
    type Target = Tensor;
    fn deref(&self) -> &Tensor {
        &self.0.t
    }
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;

    fn name(&self) -> &'static str {
        "cpu"
    }
    fn upload(&self, t: &Tensor) -> CpuTensor {
        pool::copy(t).into()
    }
    fn download(&self, t: &CpuTensor) -> jointdiff_core::Result<Tensor> {
        Ok(t.host().clone())
    }
    fn shape(&self, t: &CpuTensor) -> [usize; 4] {
        t.shape
    }
    fn conv2d(
        &self,
        x: &CpuTensor,
        w: &CpuTensor,
        bias: Option<&CpuTensor>,
        p: Conv2dParams,
    ) -> CpuTensor {
        conv2d(x, w, bias.map(CpuTensor::host), p).into()
    }
    fn conv2d_fused(
        &self,
        x: &CpuTensor,
        w: &CpuTensor,
        bias: Option<&CpuTensor>,
        p: Conv2dParams,
        elu_input: bool,
        residual: Option<&CpuTensor>,
    ) -> CpuTensor {
        let fused = Fused {
            elu_input,
            elu_grad_at: None,
            residual: residual.map(CpuTensor::host),
        };
        conv2d_fused(x, w, bias.map(CpuTensor::host), p, fused).into()
    }
    fn mean_pool2(&self, x: &CpuTensor) -> CpuTensor {
        mean_pool2(x).into()
    }
    fn max_pool(&self, x: &CpuTensor, k: usize, pad: usize) -> CpuTensor {
        max_pool(x, k, pad).into()
    }
    fn instance_norm_plus(
        &self,
        x: &CpuTensor,
        a: &CpuTensor,
        g: &CpuTensor,
        b: &CpuTensor,
    ) -> CpuTensor {
        instance_norm_plus_act(x, a, g, b, false).into()
    }
    fn instance_norm_plus_elu(
        &self,
        x: &CpuTensor,
        a: &CpuTensor,
        g: &CpuTensor,
        b: &CpuTensor,
    ) -> CpuTensor {
        instance_norm_plus_act(x, a, g, b, true).into()
    }
    fn elu(&self, x: &CpuTensor) -> CpuTensor {
        elu(x)
    }
    fn resize_bilinear(&self, x: &CpuTensor, h: usize, w: usize) -> CpuTensor {
        resize_bilinear(x, h, w).into()
    }
    fn add(&self, a: &CpuTensor, b: &CpuTensor) -> CpuTensor {
        add(a, b)
    }
    fn affine(&self, x: &CpuTensor, scale: f32, shift: f32) -> CpuTensor {
        pool::map(x.shape, |data| {
            wide(|| data.extend(x.data.iter().map(|&v| scale * v + shift)))
        })
    }
    fn conv2d_backward(
        &self,
        x: &CpuTensor,
        w: &CpuTensor,
        gout: &CpuTensor,
        p: Conv2dParams,
    ) -> (CpuTensor, CpuTensor, CpuTensor) {
        let (gx, gw, gb) = conv2d_backward(x, w, gout, p);
        (gx.into(), gw.into(), gb.into())
    }
    /// A forward convolution (Winograd or direct where they apply) of `gout` with the flipped, transposed
    /// kernel, kept with `w` after its first use.
    fn conv2d_backward_input(
        &self,
        w: &CpuTensor,
        gout: &CpuTensor,
        in_shape: [usize; 4],
        p: Conv2dParams,
    ) -> CpuTensor {
        self.conv2d_backward_input_fused(w, gout, in_shape, p, None, None)
    }
    /// As [`Backend::conv2d_backward_input`], the ELU's derivative and the residual applied as the
    /// convolution writes its output ([`Fused`]).
    fn conv2d_backward_input_fused(
        &self,
        w: &CpuTensor,
        gout: &CpuTensor,
        in_shape: [usize; 4],
        p: Conv2dParams,
        elu_at: Option<&CpuTensor>,
        residual: Option<&CpuTensor>,
    ) -> CpuTensor {
        let [_, _, ho, wo] = gout.shape;
        let fused = Fused {
            elu_input: false,
            elu_grad_at: elu_at.map(CpuTensor::host),
            residual: residual.map(CpuTensor::host),
        };
        match reference::backward_input_params(w.shape, [ho, wo], p) {
            Some(q) => {
                let wt = w
                    .packs()
                    .backward
                    .get_or_init(|| Box::new(reference::flip_transpose(w).into()));
                conv2d_fused(gout, wt, None, q, fused).into()
            }
            None => fused.after(conv2d_backward(&pool::zeros(in_shape), w, gout, p).0.into()),
        }
    }
    fn max_pool_backward(
        &self,
        x: &CpuTensor,
        gout: &CpuTensor,
        k: usize,
        pad: usize,
    ) -> CpuTensor {
        if pad >= k {
            // windows that may be empty (no NCSNv2 layer): the reference's own loops
            return reference::max_pool_backward(x, gout, k, pad).into();
        }
        let [_, _, h, w] = x.shape;
        let [_, _, ho, wo] = gout.shape;
        let mut gx = pool::zeros(x.shape);
        if h * w > 0 && ho * wo > 0 {
            // per plane: each row's window maxima and their columns (flat: their flat indices), and one
            // more row for the second pass (flat: the whole output's)
            let flat = k == 2 * pad + 1;
            let len = if flat { 2 * h * w } else { (h + 1) * wo };
            let scratch = || (vec![0f32; len], vec![0u32; len]);
            let plane = |rows: &mut (Vec<f32>, Vec<u32>),
                         (d, (s, g)): (&mut [f32], (&[f32], &[f32]))| {
                if flat {
                    let (b, v) = rows.0.split_at_mut(h * w);
                    let (a, i) = rows.1.split_at_mut(h * w);
                    max_pool_backward_plane_flat(s, g, d, [h, w], pad, (b, a, v, i))
                } else {
                    max_pool_backward_plane(
                        s,
                        g,
                        d,
                        [h, w, ho, wo],
                        k,
                        pad,
                        (&mut rows.0, &mut rows.1),
                    )
                }
            };
            let (d, s, g) = (&mut gx.data, &x.data, &gout.data);
            if split_elementwise(x.data.len() * k) {
                d.par_chunks_mut(h * w)
                    .zip(s.par_chunks(h * w).zip(g.par_chunks(ho * wo)))
                    .for_each_init(scratch, plane);
            } else {
                let mut rows = scratch();
                d.chunks_mut(h * w)
                    .zip(s.chunks(h * w).zip(g.chunks(ho * wo)))
                    .for_each(|job| plane(&mut rows, job));
            }
        }
        gx.into()
    }
    fn mean_pool2_backward(&self, gout: &CpuTensor, in_shape: [usize; 4]) -> CpuTensor {
        reference::mean_pool2_backward(gout, in_shape).into()
    }
    fn resize_bilinear_backward(&self, gout: &CpuTensor, in_shape: [usize; 4]) -> CpuTensor {
        resize_bilinear_backward(gout, in_shape).into()
    }
    fn instance_norm_plus_backward(
        &self,
        x: &CpuTensor,
        alpha: &CpuTensor,
        gamma: &CpuTensor,
        gout: &CpuTensor,
    ) -> (CpuTensor, CpuTensor, CpuTensor, CpuTensor) {
        let (a, b, c, d) = instance_norm_plus_backward(x, alpha, gamma, gout);
        (a.into(), b.into(), c.into(), d.into())
    }
    fn axpby(&self, a: f32, x: &CpuTensor, b: f32, y: &CpuTensor) -> CpuTensor {
        pooled(x.shape, |o| ops::axpby(a, &x.data, b, &y.data, o))
    }
    fn mul(&self, x: &CpuTensor, y: &CpuTensor) -> CpuTensor {
        pooled(x.shape, |o| {
            ops::broadcast(&x.data, &y.data, o, |p, q| p * q)
        })
    }
    fn div(&self, x: &CpuTensor, y: &CpuTensor) -> CpuTensor {
        pooled(x.shape, |o| {
            ops::broadcast(&x.data, &y.data, o, |p, q| p / q)
        })
    }
    fn mul_scalar(&self, x: &CpuTensor, c: f32) -> CpuTensor {
        pooled(x.shape, |o| ops::map(&x.data, o, |v| c * v))
    }
    fn div_scalar(&self, x: &CpuTensor, c: f32) -> CpuTensor {
        pooled(x.shape, |o| ops::map(&x.data, o, |v| v / c))
    }
    fn clamp(&self, x: &CpuTensor, lo: f32, hi: f32) -> CpuTensor {
        pooled(x.shape, |o| ops::map(&x.data, o, |v| v.clamp(lo, hi)))
    }
    fn scale_by_inverse_norm(&self, x: &CpuTensor, c: f32) -> CpuTensor {
        pooled(x.shape, |o| ops::scale_by_inverse_norm(x, c, o))
    }
    fn matmul(
        &self,
        x: &CpuTensor,
        a: &CpuTensor,
        transpose: bool,
        out_shape: [usize; 4],
    ) -> CpuTensor {
        pooled(out_shape, |o| ops::matmul(x, a, transpose, o))
    }
    fn gaussian_score(
        &self,
        z: &CpuTensor,
        mean: Option<&CpuTensor>,
        var: &CpuTensor,
        a: f64,
        s: f64,
    ) -> CpuTensor {
        pooled(z.shape, |o| {
            ops::gaussian_score(&z.data, mean.map(|m| &m.data[..]), &var.data, a, s, o)
        })
    }
    fn all_finite(&self, ts: &[&CpuTensor]) -> jointdiff_core::Result<bool> {
        Ok(ts.iter().all(|t| t.data.iter().all(|v| v.is_finite())))
    }
    /// The signal and the noise networks side by side (rayon::join). Each side's operations still split
    /// their work, so a thread whose side finishes first (a Gaussian noise prior, a smaller network) helps
    /// the other. Measured against running each side serially on its own thread (`denoise`, 300 steps,
    /// 2 threads, alternating runs): the same for two networks, 20% faster for one network and a Gaussian
    /// noise prior.
    /// One image at a time: its activations stay in cache through the network, and the images of a batch
    /// spread over the threads (each image's operations still split their own work when threads are free).
    fn forward_part(&self, _shape: [usize; 4]) -> usize {
        1
    }
    fn batch_slice(
        &self,
        x: &CpuTensor,
        start: usize,
        len: usize,
    ) -> jointdiff_core::Result<CpuTensor> {
        let [_, c, h, w] = x.shape;
        let per = c * h * w;
        let mut data = pool::with_capacity(len * per);
        data.extend_from_slice(&x.data[start * per..(start + len) * per]);
        Ok(Tensor {
            shape: [len, c, h, w],
            data,
        }
        .into())
    }
    fn batch_concat(&self, parts: &[CpuTensor]) -> jointdiff_core::Result<CpuTensor> {
        let n = parts.iter().map(|p| p.shape[0]).sum();
        let [_, c, h, w] = parts.first().map_or([0; 4], |p| p.shape);
        let mut data = pool::with_capacity(n * c * h * w);
        for p in parts {
            data.extend_from_slice(&p.data);
        }
        Ok(Tensor {
            shape: [n, c, h, w],
            data,
        }
        .into())
    }
    fn join(&self, a: &mut (dyn FnMut() + Send), b: &mut (dyn FnMut() + Send)) {
        rayon::join(a, b);
    }
    fn elu_backward(&self, x: &CpuTensor, gout: &CpuTensor) -> CpuTensor {
        elu_backward(x, gout)
    }
}

/// Fully general strided GEMM `C = A B` (element strides given explicitly).
///
/// # Safety
/// The pointers must cover the strided extents.
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm_general(
    m: usize,
    k: usize,
    n: usize,
    a: *const f32,
    (rsa, csa): (usize, usize),
    b: *const f32,
    (rsb, csb): (usize, usize),
    c: *mut f32,
    rsc: usize,
) {
    matrixmultiply::sgemm(
        m,
        k,
        n,
        1.0,
        a,
        rsa as isize,
        csa as isize,
        b,
        rsb as isize,
        csb as isize,
        0.0,
        c,
        rsc as isize,
        1,
    );
}

/// Convolution backward by GEMM: per image, `d col = W^T g` scattered back by col2im, `d W += g col^T`.
/// Images run in parallel; their weight gradients are summed in image order (deterministic).
fn conv2d_backward(
    x: &Tensor,
    w: &Tensor,
    gout: &Tensor,
    p: Conv2dParams,
) -> (Tensor, Tensor, Tensor) {
    let [n, ci, h, wd] = x.shape;
    let [co, _, kh, kw] = w.shape;
    let [_, _, ho, wo] = gout.shape;
    let hw = ho * wo;
    let kk = ci * kh * kw;
    let per_image: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..n)
        .into_par_iter()
        .map(|b| {
            let src = &x.data[b * ci * h * wd..(b + 1) * ci * h * wd];
            let g = &gout.data[b * co * hw..(b + 1) * co * hw];
            let mut col = vec![0f32; kk * hw];
            if hw > 0 {
                im2col_tile(src, ci, h, wd, kh, kw, p, wo, 0, hw, &mut col);
            }
            // d W (co x kk) = g (co x hw) * col^T (hw x kk)
            let mut gw = vec![0f32; co * kk];
            // d col (kk x hw) = W^T (kk x co) * g (co x hw)
            let mut gcol = vec![0f32; kk * hw];
            if hw > 0 && kk > 0 && co > 0 {
                // SAFETY: all buffers are sized for the extents passed.
                unsafe {
                    sgemm_general(
                        co,
                        hw,
                        kk,
                        g.as_ptr(),
                        (hw, 1),
                        col.as_ptr(),
                        (1, hw),
                        gw.as_mut_ptr(),
                        kk,
                    );
                    sgemm_general(
                        kk,
                        co,
                        hw,
                        w.data.as_ptr(),
                        (1, kk),
                        g.as_ptr(),
                        (hw, 1),
                        gcol.as_mut_ptr(),
                        hw,
                    );
                }
            }
            // col2im: scatter-add d col into d x
            let mut gx = vec![0f32; ci * h * wd];
            let (pad, dil) = (p.padding as isize, p.dilation as isize);
            for i in 0..ci {
                for ky in 0..kh {
                    for kx in 0..kw {
                        let row = &gcol[((i * kh + ky) * kw + kx) * hw..][..hw];
                        let dy = ky as isize * dil - pad;
                        let dx = kx as isize * dil - pad;
                        let lo = (-dx).clamp(0, wo as isize) as usize;
                        let hi = (wd as isize - dx).clamp(0, wo as isize) as usize;
                        for oy in 0..ho {
                            let iy = oy as isize + dy;
                            if iy < 0 || iy >= h as isize || lo >= hi {
                                continue;
                            }
                            let dst = &mut gx[(i * h + iy as usize) * wd..][..wd];
                            for ox in lo..hi {
                                dst[(ox as isize + dx) as usize] += row[oy * wo + ox];
                            }
                        }
                    }
                }
            }
            let gb: Vec<f32> = (0..co)
                .map(|o| g[o * hw..(o + 1) * hw].iter().sum())
                .collect();
            (gx, gw, gb)
        })
        .collect();
    let mut gx = Tensor::zeros(x.shape);
    let mut gw = Tensor::zeros(w.shape);
    let mut gb = Tensor::zeros([1, co, 1, 1]);
    for (b, (x_i, w_i, b_i)) in per_image.into_iter().enumerate() {
        gx.data[b * ci * h * wd..(b + 1) * ci * h * wd].copy_from_slice(&x_i);
        gw.data.iter_mut().zip(&w_i).for_each(|(a, v)| *a += v);
        gb.data.iter_mut().zip(&b_i).for_each(|(a, v)| *a += v);
    }
    (gx, gw, gb)
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
            (64, 64, 3, Conv2dParams::same3(1), 28), // several tiles, parallel path
            (9, 70, 1, Conv2dParams::pointwise(), 30),
            // many input channels: tiles of 32 columns start mid-row, and with dilation 4 on a small image
            // a whole run of a tile can fall into the padding
            (256, 8, 3, Conv2dParams::same3(4), 14),
            (256, 8, 3, Conv2dParams::same3(2), 9),
            // deep reductions in chunks (direct: 576 or 288 entries, Winograd: 128 channels), the last
            // chunk short: 264 channels x 9 taps, and 1x1 over 700 channels
            (264, 40, 3, Conv2dParams::same3(1), 10),
            (264, 24, 3, Conv2dParams::same3(2), 7),
            (700, 20, 1, Conv2dParams::pointwise(), 6),
            // a 5x5 kernel with padding 1; no padding
            (
                6,
                7,
                5,
                Conv2dParams {
                    padding: 1,
                    dilation: 1,
                },
                8,
            ),
            (
                2,
                1,
                3,
                Conv2dParams {
                    padding: 0,
                    dilation: 1,
                },
                4,
            ),
            // Winograd: odd heights and widths (tiles cut by the border), co not a multiple of 16
            (8, 16, 3, Conv2dParams::same3(1), 7),
            (16, 37, 3, Conv2dParams::same3(1), 9),
            (32, 8, 3, Conv2dParams::same3(1), 1),
            // Winograd on dilated convolutions: sub-images of unequal sizes, some smaller than a tile
            (16, 24, 3, Conv2dParams::same3(2), 7),
            (8, 16, 3, Conv2dParams::same3(4), 6),
            (8, 16, 3, Conv2dParams::same3(4), 2),
            // Winograd on a small image (9 tiles, 2 blocks per image): the output channels split too
            (16, 100, 3, Conv2dParams::same3(1), 5),
            // a few output channels, vectorised over each row's pixels: 4, 3, 2 and 1 vectors per row at
            // 8 lanes (rows of 29, 21, 14 and 9 pixels; dilation 2; a 5x5 kernel), the last overlapping
            (16, 1, 3, Conv2dParams::same3(1), 28),
            (12, 3, 3, Conv2dParams::same3(2), 20),
            (
                6,
                2,
                5,
                Conv2dParams {
                    padding: 1,
                    dilation: 1,
                },
                15,
            ),
            (9, 4, 3, Conv2dParams::same3(1), 8),
        ] {
            let x = rand([3, ci, hw, hw + 1], 1);
            let w = rand([co, ci, k, k], 2);
            let b = rand([1, co, 1, 1], 3);
            let want = reference::conv2d(&x, &w, Some(&b), p);
            for (path, got) in conv_paths(&x, &w, Some(&b), p) {
                assert_eq!(got.shape, want.shape);
                let e = rel_max_err(&got.data, &want.data);
                // F(4x4, 3x3) multiplies by 4, 5 and 8 in its transforms: about 8x F(2x2)'s error
                // (at most 1.6e-5 here, with 256 and 264 input channels)
                let tol = if path.starts_with("winograd4") {
                    4e-5
                } else {
                    1e-5
                };
                assert!(e < tol, "{path} conv {ci}->{co} k{k} {p:?}: {e}");
            }
        }
    }

    #[test]
    fn fused_conv_gives_the_bits_of_the_separate_operations() {
        // elu_grad(at, conv(elu(x))) + r, each part where asked, on every path against the backend's own
        // ELU, convolution, ELU gradient and sum run one after the other (bit for bit: the fusion must not
        // change a value), and against the reference backend's (within the paths' tolerance). Widths 28 and
        // 14 leave 4 and 6 pixels past the last 8-pixel block of the channel-last copy, 7 has no full block;
        // dilation 2 splits sub-images; 40 and 3 output channels leave a partial 8-channel group.
        for (ci, co, p, h, w) in [
            (32, 32, Conv2dParams::same3(1), 28, 28),
            (64, 40, Conv2dParams::same3(2), 14, 14),
            (16, 8, Conv2dParams::same3(1), 7, 9),
            (8, 3, Conv2dParams::pointwise(), 6, 5),
        ] {
            let k = if p.padding == 0 { 1 } else { 3 };
            let mut x = rand([2, ci, h, w], 4);
            // ELU's two branches and its clamp at -87, in the input and where the gradient is taken
            x.data[0] = -100.0;
            x.data[1] = 0.0;
            let wt = rand([co, ci, k, k], 5);
            let b = rand([1, co, 1, 1], 6);
            let r = rand([2, co, h, w], 7);
            let mut at = rand([2, co, h, w], 8);
            at.data[0] = -100.0;
            at.data[1] = 0.0;
            let wc = CpuTensor::from(wt.clone());
            let cases = [
                (true, None, None),
                (false, None, Some(&r)),
                (true, None, Some(&r)),
                (false, Some(&at), None),
                (false, Some(&at), Some(&r)),
                (true, Some(&at), Some(&r)),
            ];
            for path in Path::all(wc.shape, p) {
                for (elu_input, elu_grad_at, residual) in cases {
                    let fused = Fused {
                        elu_input,
                        elu_grad_at,
                        residual,
                    };
                    let got = path.run_fused(&x, &wc, Some(&b), p, fused);
                    let e = if elu_input {
                        elu(&x).into_host()
                    } else {
                        x.clone()
                    };
                    let mut want = path.run(&e, &wc, Some(&b), p);
                    if let Some(at) = elu_grad_at {
                        want = elu_backward(at, &want).into_host();
                    }
                    if let Some(r) = residual {
                        want = add(&want, r).into_host();
                    }
                    let case = format!("{} {ci}->{co} {p:?} {h}x{w} {fused:?}", path.name());
                    assert!(same_bits(&got, &want), "{case}");
                    let e_ref = if elu_input {
                        reference::elu(&x)
                    } else {
                        x.clone()
                    };
                    let mut oracle = reference::conv2d(&e_ref, &wt, Some(&b), p);
                    if let Some(at) = elu_grad_at {
                        oracle = reference::elu_backward(at, &oracle);
                    }
                    if let Some(r) = residual {
                        for (o, &v) in oracle.data.iter_mut().zip(&r.data) {
                            *o += v;
                        }
                    }
                    let err = rel_max_err(&got.data, &oracle.data);
                    assert!(err < 4e-5, "{case}: {err} from the reference");
                }
            }
        }
    }

    #[test]
    fn fused_input_gradient_gives_the_bits_of_the_separate_operations() {
        // the backend's conv2d_backward_input_fused against its own input gradient, ELU gradient and sum
        // one after the other (the trait's default), on the Winograd, direct and fallback paths
        let b = CpuBackend;
        let cases = [
            (32, 24, 3, 3, Conv2dParams::same3(1), 10),
            (16, 8, 3, 3, Conv2dParams::same3(2), 9),
            (8, 6, 1, 1, Conv2dParams::pointwise(), 7),
            (8, 4, 1, 3, Conv2dParams::same3(1), 6),
        ];
        for (ci, co, kh, kw, p, hw) in cases {
            let w = b.upload(&rand([co, ci, kh, kw], 1));
            let wo = hw + 2 * p.padding - p.dilation * (kw - 1);
            let ho = hw + 2 * p.padding - p.dilation * (kh - 1);
            let gout = b.upload(&rand([2, co, ho, wo], 2));
            let in_shape = [2, ci, hw, hw];
            let (at, r) = (b.upload(&rand(in_shape, 3)), b.upload(&rand(in_shape, 4)));
            for (e, res) in [(Some(&at), None), (None, Some(&r)), (Some(&at), Some(&r))] {
                let got = b.conv2d_backward_input_fused(&w, &gout, in_shape, p, e, res);
                let mut want = b.conv2d_backward_input(&w, &gout, in_shape, p);
                if let Some(at) = e {
                    want = b.elu_backward(at, &want);
                }
                if let Some(r) = res {
                    want = b.add(&want, r);
                }
                let case = format!(
                    "{ci}->{co} {kh}x{kw} {p:?} elu {} res {}",
                    e.is_some(),
                    res.is_some()
                );
                assert!(same_bits(&got, &want), "{case}");
            }
        }
    }

    /// Every convolution path this CPU has ([`Path::all`]): the portable one always; the direct and (where
    /// eligible) Winograd kernels at each width the CPU runs (8 lanes with AVX2 + FMA, 16 with AVX-512F).
    fn conv_paths(
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        p: Conv2dParams,
    ) -> Vec<(&'static str, Tensor)> {
        let w = &CpuTensor::from(w.clone());
        for &k in simd::WIDTHS {
            if !k.supported() {
                eprintln!("this CPU cannot run {k:?}: its kernels are not tested here");
            }
        }
        Path::all(w.shape, p)
            .into_iter()
            .map(|path| (path.name(), path.run(x, w, b, p)))
            .collect()
    }

    fn same_bits(a: &Tensor, b: &Tensor) -> bool {
        a.shape == b.shape
            && a.data
                .iter()
                .zip(&b.data)
                .all(|(u, v)| u.to_bits() == v.to_bits())
    }

    #[test]
    fn both_widths_give_the_same_bits() {
        // the same FMAs in the same order at 8 and 16 lanes: identical outputs, for shallow and deep
        // reductions (several chunks, a short last one), co not a multiple of either NR
        if !Kernel::Avx512.supported() {
            eprintln!("no AVX-512F here: the 16-lane kernels are not compared (the 8-lane ones are tested)");
            return;
        }
        for (ci, co, k, hw, p) in [
            (8, 16, 3, 9, Conv2dParams::same3(1)),
            (64, 40, 3, 28, Conv2dParams::same3(1)),
            (264, 48, 3, 8, Conv2dParams::same3(2)),
            (256, 3, 3, 16, Conv2dParams::same3(1)),
            (700, 33, 1, 7, Conv2dParams::pointwise()),
            // 6 output channels: vectorised over pixels at 16 lanes (rows of 20, the second vector
            // overlapping the first), over channels at 8: the two paths' bits compared
            (32, 6, 3, 20, Conv2dParams::same3(2)),
        ] {
            let x = rand([2, ci, hw, hw], 1);
            let w = CpuTensor::from(rand([co, ci, k, k], 2));
            let b = rand([1, co, 1, 1], 3);
            let (kh, kw) = (k, k);
            let d8 = direct::conv2d(Kernel::Avx2, &x, &w, Some(&b), p);
            let d16 = direct::conv2d(Kernel::Avx512, &x, &w, Some(&b), p);
            assert!(same_bits(&d8, &d16), "direct {ci}->{co} {p:?}");
            if winograd::eligible(ci, co, kh, kw, p.padding, p.dilation) {
                for t in Tile::ALL {
                    let none = Fused::default();
                    let w8 = winograd::conv2d(Kernel::Avx2, t, &x, &w, Some(&b), p.dilation, none);
                    let w16 =
                        winograd::conv2d(Kernel::Avx512, t, &x, &w, Some(&b), p.dilation, none);
                    assert!(same_bits(&w8, &w16), "winograd {t:?} {ci}->{co} {p:?}");
                }
            }
        }
    }

    #[test]
    fn rayon_join_runs_both_sides_with_the_same_results() {
        let x = rand([1, 16, 20, 20], 1);
        let w = CpuTensor::from(rand([16, 16, 3, 3], 2));
        let p = Conv2dParams::same3(1);
        let want = conv2d(&x, &w, None, p);
        let (mut a, mut b) = (None, None);
        CpuBackend.join(&mut || a = Some(conv2d(&x, &w, None, p)), &mut || {
            b = Some(conv2d(&x, &w, None, p))
        });
        for got in [a.unwrap(), b.unwrap()] {
            assert!(got
                .data
                .iter()
                .zip(&want.data)
                .all(|(u, v)| u.to_bits() == v.to_bits()));
        }
    }

    #[test]
    fn packed_forms_stay_with_their_tensor() {
        // two weight tensors of one shape, used alternately: each convolution must use its own packing
        let x = rand([1, 16, 9, 9], 1);
        let (w1, w2) = (rand([18, 16, 3, 3], 2), rand([18, 16, 3, 3], 3));
        let (c1, c2) = (CpuTensor::from(w1.clone()), CpuTensor::from(w2.clone()));
        for p in [Conv2dParams::same3(1), Conv2dParams::same3(2)] {
            for (w, c) in [(&w1, &c1), (&w2, &c2), (&w1, &c1)] {
                let want = reference::conv2d(&x, w, None, p);
                let e = rel_max_err(&conv2d(&x, c, None, p).data, &want.data);
                assert!(e < 1e-5, "{p:?}: {e}");
            }
        }
    }

    #[test]
    fn an_empty_batch_gives_an_empty_output_on_every_path() {
        // a Winograd case that splits its output channels when it has few jobs, and a direct one
        for (ci, co, k) in [(16, 100, 3), (3, 5, 1)] {
            let p = if k == 3 {
                Conv2dParams::same3(1)
            } else {
                Conv2dParams::pointwise()
            };
            let x = rand([0, ci, 5, 6], 1);
            let w = rand([co, ci, k, k], 2);
            let want = reference::conv2d(&x, &w, None, p);
            for (path, got) in conv_paths(&x, &w, None, p) {
                assert_eq!(got.shape, want.shape, "{path}");
                assert!(got.data.is_empty(), "{path}");
            }
        }
    }

    #[test]
    fn conv_is_bit_identical_with_one_two_and_three_threads() {
        // large enough for the parallel paths; odd sizes so that tiles and pixel blocks end mid-row;
        // dilation 1 and 32 input channels so that the Winograd path runs too; then a deep layer (264
        // channels: reductions in several chunks on both paths); small images whose Winograd jobs also split
        // the output channels, into as many parts as the thread count asks (1, 2 or 3 here); one image of
        // 14x14, whose tiles make one block at one thread and two at two where the lanes are 16
        for (n, ci, co, h, w) in [
            (2, 32, 37, 29, 31),
            (2, 264, 40, 9, 11),
            (2, 16, 100, 5, 6),
            (2, 24, 72, 14, 14),
            (1, 64, 64, 14, 14),
        ] {
            let x = rand([n, ci, h, w], 1);
            let wt = rand([co, ci, 3, 3], 2);
            let b = rand([1, co, 1, 1], 3);
            let p = Conv2dParams::same3(1);
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| conv_paths(&x, &wt, Some(&b), p))
            };
            for (((path, one), (_, two)), (_, three)) in run(1).into_iter().zip(run(2)).zip(run(3))
            {
                assert!(
                    same_bits(&one, &two),
                    "{path} {ci}->{co}: 1 and 2 threads differ"
                );
                assert!(
                    same_bits(&one, &three),
                    "{path} {ci}->{co}: 1 and 3 threads differ"
                );
            }
        }
    }

    /// A small NCSNv2 with random weights (the same on every backend).
    fn small_net<B: Backend>(
        b: &B,
        channels: usize,
        ngf: usize,
    ) -> jointdiff_core::ncsnv2::Ncsnv2<B> {
        use jointdiff_core::ncsnv2::{Ncsnv2, Ncsnv2Config};
        let cfg = Ncsnv2Config {
            channels,
            ngf,
            input_map: true,
        };
        Ncsnv2::from_fn(b, cfg, |s| {
            let n: usize = s.shape.iter().product();
            let mut r = Rng::stream(5, 6, n as u64);
            let base = if s.name.ends_with("alpha") || s.name.ends_with("gamma") {
                1.0
            } else {
                0.0
            };
            (0..n).map(|_| base + 0.1 * r.normal() as f32).collect()
        })
        .unwrap()
    }

    #[test]
    fn a_batch_in_parts_gives_each_image_its_own_forward() {
        // the CPU backend runs a batch's forward one image at a time (forward_part = 1), the images side by
        // side: the result must be each image's own forward, bit for bit, with 1 and 2 threads, and agree
        // with the reference backend's whole-batch forward
        let b = CpuBackend;
        let net = small_net(&b, 1, 8);
        let x = rand([5, 1, 12, 12], 4);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| net.forward(&b, &x).unwrap())
        };
        let (one, two) = (run(1), run(2));
        assert_eq!(one.shape, [5, 1, 12, 12]);
        assert!(same_bits(&one, &two), "1 and 2 threads differ");
        let per = 144;
        for i in 0..5 {
            let xi = Tensor {
                shape: [1, 1, 12, 12],
                data: x.data[i * per..(i + 1) * per].to_vec(),
            };
            let alone = net.forward(&b, &xi).unwrap();
            assert!(
                alone
                    .data
                    .iter()
                    .zip(&one.data[i * per..(i + 1) * per])
                    .all(|(u, v)| u.to_bits() == v.to_bits()),
                "image {i} differs from its own forward"
            );
        }
        let r = jointdiff_core::RefBackend;
        let want = small_net(&r, 1, 8).forward(&r, &x).unwrap();
        let e = rel_max_err(&one.data, &want.data);
        assert!(e < 1e-4, "cpu vs reference: {e}");
    }

    #[test]
    fn bilinear_resize_and_its_gradient_give_the_references_bits() {
        // oracle: the reference's loops (the CPU versions compute their coefficients once per row and
        // column, the same arithmetic); up, down, to and from one pixel, non-square
        for (h, w, ho, wo) in [
            (14, 14, 28, 28),
            (7, 5, 14, 9),
            (28, 28, 14, 14),
            (1, 1, 3, 4),
            (6, 4, 1, 1),
        ] {
            let x = rand([2, 3, h, w], 8);
            let got = resize_bilinear(&x, ho, wo);
            let want = reference::resize_bilinear(&x, ho, wo);
            assert!(same_bits(&got, &want), "forward {h}x{w} -> {ho}x{wo}");
            let g = rand([2, 3, ho, wo], 9);
            let got = resize_bilinear_backward(&g, x.shape);
            let want = reference::resize_bilinear_backward(&g, x.shape);
            assert!(same_bits(&got, &want), "backward {h}x{w} -> {ho}x{wo}");
        }
    }

    #[test]
    fn a_batch_in_parts_gives_each_image_its_own_input_gradient() {
        // the taped forward and its input VJP (dps, pigdm) run a batch in parts too, a tape per image: the
        // score and J^T g must be each image's own, bit for bit, with 1 and 2 threads, and agree with the
        // reference backend's whole-batch VJP
        let b = CpuBackend;
        let net = small_net(&b, 1, 8);
        let (x, g) = (rand([5, 1, 12, 12], 4), rand([5, 1, 12, 12], 5));
        let taped = |x: &Tensor, g: &Tensor| {
            let (out, tape) = net.forward_taped(&b, &b.upload(x)).unwrap();
            let jt = net.vjp_from_tape(&b, tape, &b.upload(g)).unwrap();
            (out.into_host(), jt.into_host())
        };
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| taped(&x, &g))
        };
        let ((out1, jt1), (out2, jt2)) = (run(1), run(2));
        assert_eq!(jt1.shape, [5, 1, 12, 12]);
        assert!(same_bits(&out1, &out2), "scores: 1 and 2 threads differ");
        assert!(same_bits(&jt1, &jt2), "J^T g: 1 and 2 threads differ");
        assert!(
            same_bits(&out1, &net.forward(&b, &x).unwrap()),
            "taped forward"
        );
        let per = 144;
        let image = |t: &Tensor, i: usize| Tensor {
            shape: [1, 1, 12, 12],
            data: t.data[i * per..(i + 1) * per].to_vec(),
        };
        for i in 0..5 {
            let (out, jt) = taped(&image(&x, i), &image(&g, i));
            assert!(same_bits(&out, &image(&out1, i)), "image {i}: score");
            assert!(same_bits(&jt, &image(&jt1, i)), "image {i}: J^T g");
        }
        let r = jointdiff_core::RefBackend;
        let want = small_net(&r, 1, 8).vjp_input(&r, &x, &g).unwrap();
        let e = rel_max_err(&jt1.data, &want.data);
        assert!(e < 1e-4, "cpu vs reference: {e}");
    }

    #[test]
    fn conv_input_gradient_matches_the_full_backward() {
        // oracle: the reference backward's dx (itself checked against finite differences in core);
        // cases on the Winograd path (3x3 same, channels a multiple of 8), the direct path and the
        // fallback (non-square kernel, padding beyond the kernel's reach)
        let cases = [
            (16, 8, 3, 3, Conv2dParams::same3(1), 9),
            // a 64x65 image: F(4x4, 3x3) tiles (Tile::for_image)
            (16, 8, 3, 3, Conv2dParams::same3(1), 64),
            (8, 16, 3, 3, Conv2dParams::same3(2), 11),
            (16, 16, 3, 3, Conv2dParams::same3(4), 7),
            (1, 8, 3, 3, Conv2dParams::same3(1), 6),
            (8, 1, 3, 3, Conv2dParams::same3(1), 6),
            (5, 3, 1, 1, Conv2dParams::pointwise(), 5),
            (
                4,
                6,
                3,
                3,
                Conv2dParams {
                    padding: 0,
                    dilation: 1,
                },
                8,
            ),
            (
                3,
                2,
                1,
                3,
                Conv2dParams {
                    padding: 1,
                    dilation: 1,
                },
                6,
            ),
            (
                3,
                2,
                1,
                1,
                Conv2dParams {
                    padding: 1,
                    dilation: 1,
                },
                5,
            ),
        ];
        for (ci, co, kh, kw, p, hw) in cases {
            let x = rand([2, ci, hw, hw + 1], 4);
            let w = rand([co, ci, kh, kw], 5);
            let out = reference::conv2d(&x, &w, None, p);
            let g = rand(out.shape, 6);
            let (rx, _, _) = reference::conv2d_backward(&x, &w, &g, p);
            let r2 = reference::conv2d_backward_input(&w, &g, x.shape, p);
            let c = |t: &Tensor| CpuBackend.upload(t);
            let cw = c(&w);
            // twice: the second call uses the kernel kept with the weight
            for _ in 0..2 {
                let cx = CpuBackend.conv2d_backward_input(&cw, &c(&g), x.shape, p);
                assert_eq!(cx.shape, rx.shape);
                let e = rel_max_err(&cx.data, &rx.data);
                assert!(e < 1e-5, "cpu {ci}->{co} {kh}x{kw} {p:?}: {e}");
            }
            assert_eq!(r2.shape, rx.shape);
            let e = rel_max_err(&r2.data, &rx.data);
            assert!(e < 1e-5, "reference {ci}->{co} {kh}x{kw} {p:?}: {e}");
        }
    }

    #[test]
    fn instance_norm_plus_backward_matches_reference() {
        // batches (the statistics per image), planes with a tail past the 8 partial sums (5 x 7, 3 x 3), a
        // 28 x 28 one, two channels (the mean-correction path's smallest) and 70
        for shape in [[2, 5, 5, 7], [1, 2, 3, 3], [1, 70, 28, 28], [3, 8, 4, 4]] {
            let c = shape[1];
            let x = rand(shape, 11);
            let g = rand(shape, 12);
            let (alpha, gamma) = (rand([1, c, 1, 1], 13), rand([1, c, 1, 1], 14));
            let want = reference::instance_norm_plus_backward(&x, &alpha, &gamma, &g);
            let u = |t: &Tensor| CpuBackend.upload(t);
            let got =
                CpuBackend.instance_norm_plus_backward(&u(&x), &u(&alpha), &u(&gamma), &u(&g));
            for (name, a, b) in [
                ("gx", &got.0, &want.0),
                ("galpha", &got.1, &want.1),
                ("ggamma", &got.2, &want.2),
                ("gbeta", &got.3, &want.3),
            ] {
                assert_eq!(a.shape, b.shape, "{name} {shape:?}");
                let e = rel_max_err(&a.data, &b.data);
                assert!(e < 1e-6, "{name} {shape:?}: {e}");
            }
        }
    }

    #[test]
    fn pooling_and_elu_gradients_match_reference() {
        // max pooling and its gradient, bit for bit: values on a coarse grid so that windows hold ties (the
        // first maximum takes the gradient); the whole-plane passes (the forward's always, the gradient's
        // where k = 2 pad + 1, row by row at k 3 pad 0) in every layout (interior rows and clipped ones,
        // images shorter than the window, no padding, the parallel path at 64 x 28 x 28), and the forward
        // with a NaN, which must win its windows as in the reference
        for (shape, k, pad) in [
            ([2, 3, 9, 7], 5, 2),
            ([1, 70, 16, 16], 5, 2),
            ([1, 2, 4, 5], 3, 0),
            ([1, 4, 14, 14], 5, 2),
            ([1, 64, 28, 28], 5, 2),
            ([1, 2, 3, 3], 5, 2),
            ([2, 1, 1, 6], 5, 2),
            ([1, 3, 5, 4], 1, 0),
            ([1, 2, 6, 9], 3, 1),
        ] {
            let x = rand(shape, 7);
            let mut xq = Tensor {
                shape,
                data: x.data.iter().map(|v| (v * 2.0).round()).collect(),
            };
            let c = |t: &Tensor| CpuBackend.upload(t);
            let out = reference::max_pool(&xq, k, pad);
            let g = rand(out.shape, 8);
            let want = reference::max_pool_backward(&xq, &g, k, pad);
            let got = CpuBackend.max_pool_backward(&c(&xq), &c(&g), k, pad);
            assert_eq!(got.data, want.data, "max pool {shape:?} k{k} pad{pad}");
            let mid = xq.data.len() / 2;
            xq.data[mid] = f32::NAN;
            let got = CpuBackend.max_pool(&c(&xq), k, pad);
            let want = reference::max_pool(&xq, k, pad);
            assert!(
                same_bits(&got, &want),
                "max pool forward {shape:?} k{k} pad{pad}"
            );
        }
        let x = Tensor {
            shape: [1, 2, 3, 50],
            data: (0..300).map(|i| (i as f32 - 150.0) / 15.0).collect(),
        };
        let g = rand(x.shape, 9);
        let want = reference::elu_backward(&x, &g);
        let got = CpuBackend.elu_backward(&CpuBackend.upload(&x), &CpuBackend.upload(&g));
        let e = rel_max_err(&got.data, &want.data);
        assert!(e < 1e-6, "elu backward: {e}");
    }

    #[test]
    fn conv_backward_matches_reference() {
        for (ci, co, k, p, hw) in [
            (3, 5, 3, Conv2dParams::same3(1), 7),
            (4, 6, 3, Conv2dParams::same3(4), 6),
            (7, 2, 1, Conv2dParams::pointwise(), 5),
        ] {
            let x = rand([3, ci, hw, hw + 1], 1);
            let w = rand([co, ci, k, k], 2);
            let out = reference::conv2d(&x, &w, None, p);
            let g = rand(out.shape, 3);
            let (rx, rw, rb) = reference::conv2d_backward(&x, &w, &g, p);
            let c = |t: &Tensor| CpuBackend.upload(t);
            let (cx, cw, cb) = CpuBackend.conv2d_backward(&c(&x), &c(&w), &c(&g), p);
            for (name, a, b) in [("dx", &cx, &rx), ("dw", &cw, &rw), ("db", &cb, &rb)] {
                assert_eq!(a.shape, b.shape);
                let e = rel_max_err(&a.data, &b.data);
                assert!(e < 1e-5, "{name} {ci}->{co} k{k} {p:?}: {e}");
            }
        }
    }

    #[test]
    fn fast_elu_is_accurate() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -30.0 + 31.0 * i as f64 / 200_000.0;
            let want = if x > 0.0 { x } else { x.exp_m1() };
            worst = worst.max((elu1(x as f32) as f64 - want).abs());
        }
        assert!(worst < 3e-7, "max abs error {worst}");
        assert_eq!(elu1(-200.0), -1.0);
        assert!(elu1(f32::NAN).is_nan());
    }

    #[test]
    fn fused_norm_and_separable_pool_match_reference() {
        // small (serial) and large enough to be split over channels and planes
        for (shape, seed) in [([2, 6, 9, 7], 4), ([2, 40, 28, 30], 8)] {
            let c = shape[1];
            let mut x = rand(shape, seed);
            let (a, g, b) = (
                rand([1, c, 1, 1], 5),
                rand([1, c, 1, 1], 6),
                rand([1, c, 1, 1], 7),
            );
            let want = reference::elu(&reference::instance_norm_plus(&x, &a, &g, &b));
            let c = |t: &Tensor| CpuBackend.upload(t);
            let got = CpuBackend.instance_norm_plus_elu(&c(&x), &c(&a), &c(&g), &c(&b));
            assert!(rel_max_err(&got.data, &want.data) < 1e-5);
            let want = reference::instance_norm_plus(&x, &a, &g, &b);
            let got = CpuBackend.instance_norm_plus(&c(&x), &c(&a), &c(&g), &c(&b));
            assert!(rel_max_err(&got.data, &want.data) < 1e-5);
            // a NaN must come through the pooling as in the reference
            x.data[17] = f32::NAN;
            for (k, pad) in [(5, 2), (3, 1), (2, 0)] {
                let (want, got) = (reference::max_pool(&x, k, pad), max_pool(&x, k, pad));
                assert_eq!(want.shape, got.shape);
                assert!(
                    want.data
                        .iter()
                        .zip(&got.data)
                        .all(|(u, v)| u.to_bits() == v.to_bits()),
                    "max pool k{k} pad{pad} {shape:?}"
                );
            }
        }
    }
}
