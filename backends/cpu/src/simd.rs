//! The vector widths the convolution kernels run at, and which one this CPU uses.
//!
//! The micro-kernel (`micro`) is written once, generic over [`Simd`]: 8 lanes on AVX2 + FMA ([`Avx2`]), 16
//! on AVX-512F ([`Avx512`]), 4 on aarch64's NEON ([`Neon`]). Its block is `MR` output pixels by two vectors
//! of output channels (`NR = 2 * LANES`): 6 x 16 on AVX2 (12 accumulators of 16 registers), 8 x 32 on
//! AVX-512 (16 of 32; at 12 x 32, 24 accumulators, LLVM spilled some of them to the stack and the kernel ran
//! slower), 8 x 8 on NEON (16 of 32). NEON runs the direct kernel only (Winograd's transforms are AVX2
//! code): its tests run under qemu-aarch64 (tools/check_aarch64.sh); its speed on real aarch64 hardware
//! has not been measured.
//! Every output value is its starting value plus the same FMAs in the same order at either width, so the two
//! instances give the same bits (tested where the CPU has both).
//!
//! Which width runs ([`kernel`]) is chosen once per process from the CPU's features and
//! `JOINTDIFF_CPU_KERNEL`. The 16-lane kernels are the default where the CPU has them since they were
//! checked on such a CPU (an Intel Xeon with AVX-512F, Sapphire Rapids flags): the convolution tests against
//! the reference, the same bits as the 8-lane kernels (`both_widths_give_the_same_bits`), the pinned CLI
//! outputs unchanged; NCSNv2 forwards there ran 1.13-1.22x faster than at 8 lanes (BENCHMARKS.md).
//!
//! | value | kernels |
//! |---|---|
//! | unset | AVX-512 where the CPU has AVX-512F, else AVX2 where it has AVX2 + FMA, NEON on aarch64, else the portable im2col + GEMM |
//! | `avx512` | as unset |
//! | `avx2` | AVX2 even where AVX-512 is (for comparisons); as unset on aarch64 |
//! | `direct` | as unset, without Winograd |
//! | `portable` | im2col + GEMM only |

/// A vector of `LANES` f32 and the operations the micro-kernel needs.
///
/// # Safety
/// The methods need the CPU features of their width; callers run them inside a function compiled for them.
pub(crate) trait Simd {
    const LANES: usize;
    type V: Copy;
    /// `LANES` floats from `p` (unaligned).
    unsafe fn load(p: *const f32) -> Self::V;
    /// `*p` in every lane.
    unsafe fn splat(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    /// `a * b + c`, rounded once.
    unsafe fn fmadd(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// A hint to bring the cache line of `p` into L1; `p` need not point into an allocation (a prefetch
    /// never faults), and a width without the instruction does nothing.
    unsafe fn prefetch(p: *const f32);
}

/// One width's [`Simd`]: a unit struct whose operations are one intrinsic each (its attributes, the
/// doc and the `cfg` of its architecture, go on both the struct and the impl).
macro_rules! simd_width {
    (
        $(#[$attr:meta])*
        $name:ident: $lanes:literal lanes of $v:ty,
        load $load:path,
        splat |$sp:ident| $splat:expr,
        store $store:path,
        fmadd |$a:ident, $b:ident, $c:ident| $fmadd:expr,
        prefetch |$pp:ident| $prefetch:expr,
    ) => {
        $(#[$attr])*
        pub(crate) struct $name;

        $(#[$attr])*
        impl Simd for $name {
            const LANES: usize = $lanes;
            type V = $v;
            #[inline(always)]
            unsafe fn load(p: *const f32) -> Self::V {
                $load(p)
            }
            #[inline(always)]
            unsafe fn splat($sp: *const f32) -> Self::V {
                $splat
            }
            #[inline(always)]
            unsafe fn store(p: *mut f32, v: Self::V) {
                $store(p, v)
            }
            #[inline(always)]
            unsafe fn fmadd($a: Self::V, $b: Self::V, $c: Self::V) -> Self::V {
                $fmadd
            }
            #[inline(always)]
            unsafe fn prefetch($pp: *const f32) {
                $prefetch
            }
        }
    };
}

simd_width! {
    /// AVX2 + FMA: 8 lanes.
    #[cfg(target_arch = "x86_64")]
    Avx2: 8 lanes of std::arch::x86_64::__m256,
    load std::arch::x86_64::_mm256_loadu_ps,
    splat |p| std::arch::x86_64::_mm256_broadcast_ss(&*p),
    store std::arch::x86_64::_mm256_storeu_ps,
    fmadd |a, b, c| std::arch::x86_64::_mm256_fmadd_ps(a, b, c),
    prefetch |p| std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast()),
}

simd_width! {
    /// AVX-512F: 16 lanes.
    #[cfg(target_arch = "x86_64")]
    Avx512: 16 lanes of std::arch::x86_64::__m512,
    load std::arch::x86_64::_mm512_loadu_ps,
    splat |p| std::arch::x86_64::_mm512_set1_ps(*p),
    store std::arch::x86_64::_mm512_storeu_ps,
    fmadd |a, b, c| std::arch::x86_64::_mm512_fmadd_ps(a, b, c),
    prefetch |p| std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast()),
}

simd_width! {
    /// NEON (aarch64): 4 lanes. `vfmaq_f32` rounds once, as the x86 FMAs do, so the direct kernel gives the
    /// same bits as at 8 and 16 lanes.
    #[cfg(target_arch = "aarch64")]
    Neon: 4 lanes of std::arch::aarch64::float32x4_t,
    load std::arch::aarch64::vld1q_f32,
    splat |p| std::arch::aarch64::vld1q_dup_f32(p),
    store std::arch::aarch64::vst1q_f32,
    fmadd |a, b, c| std::arch::aarch64::vfmaq_f32(c, a, b),
    // (the prefetch intrinsics of aarch64 are not stable Rust)
    prefetch |p| { let _ = p; },
}

/// Output pixels per micro-kernel block at 4 lanes (NEON).
pub(crate) const MR_NEON: usize = 8;

/// Output pixels per micro-kernel block at 8 lanes.
pub(crate) const MR_AVX2: usize = 6;
/// Output pixels per micro-kernel block at 16 lanes.
pub(crate) const MR_AVX512: usize = 8;

/// The convolution kernels of this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// im2col + GEMM for every convolution.
    Portable,
    /// Direct and Winograd kernels at 8 lanes.
    Avx2,
    /// Direct and Winograd kernels at 16 lanes.
    Avx512,
    /// The direct kernel at 4 lanes (aarch64 NEON; Winograd stays x86-64 only).
    Neon,
}

/// The vector kernels this architecture has code for (each may still be missing on the CPU: `supported`).
#[cfg(target_arch = "x86_64")]
pub(crate) const WIDTHS: &[Kernel] = &[Kernel::Avx2, Kernel::Avx512];
#[cfg(target_arch = "aarch64")]
pub(crate) const WIDTHS: &[Kernel] = &[Kernel::Neon];
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub(crate) const WIDTHS: &[Kernel] = &[];

impl Kernel {
    /// Output pixels per micro-kernel block.
    pub(crate) fn mr(self) -> usize {
        match self {
            Kernel::Avx512 => MR_AVX512,
            Kernel::Neon => MR_NEON,
            _ => MR_AVX2,
        }
    }
    /// Output channels per micro-kernel block (two vectors; the packed weights' column count).
    pub(crate) fn nr(self) -> usize {
        match self {
            Kernel::Avx512 => 32,
            Kernel::Neon => 8,
            _ => 16,
        }
    }
    /// Whether this CPU can run it.
    pub fn supported(self) -> bool {
        match self {
            Kernel::Portable => true,
            Kernel::Avx2 => has_avx2(),
            Kernel::Avx512 => has_avx2() && has_avx512(),
            Kernel::Neon => has_neon(),
        }
    }
    /// Whether the Winograd path runs at this width (its transforms are AVX2 code).
    pub(crate) fn has_winograd(self) -> bool {
        matches!(self, Kernel::Avx2 | Kernel::Avx512)
    }
}

#[cfg(target_arch = "aarch64")]
fn has_neon() -> bool {
    std::arch::is_aarch64_feature_detected!("neon")
}

#[cfg(not(target_arch = "aarch64"))]
fn has_neon() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    is_x86_feature_detected!("avx512f")
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx2() -> bool {
    false
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx512() -> bool {
    false
}

/// The kernels `JOINTDIFF_CPU_KERNEL` (`var`) asks for on a CPU with these features.
fn choose(var: Option<&str>, avx2: bool, avx512: bool, neon: bool) -> Kernel {
    match var {
        Some("portable") => Kernel::Portable,
        _ if neon => Kernel::Neon,
        _ if !avx2 => Kernel::Portable,
        Some("avx2") => Kernel::Avx2,
        _ if avx512 => Kernel::Avx512,
        _ => Kernel::Avx2,
    }
}

/// `JOINTDIFF_CPU_KERNEL`, read once per process.
fn setting() -> Option<&'static str> {
    static VAR: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    VAR.get_or_init(|| std::env::var("JOINTDIFF_CPU_KERNEL").ok())
        .as_deref()
}

/// This process's convolution kernels (chosen once; see the module's table).
pub fn kernel() -> Kernel {
    static KERNEL: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
    *KERNEL.get_or_init(|| {
        choose(
            setting(),
            has_avx2(),
            has_avx2() && has_avx512(),
            has_neon(),
        )
    })
}

/// Whether the Winograd path is on (`JOINTDIFF_CPU_KERNEL=direct` turns it off, for comparisons).
pub(crate) fn winograd_enabled() -> bool {
    setting() != Some("direct")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variable_and_the_features_choose_the_kernel() {
        assert_eq!(choose(None, true, true, false), Kernel::Avx512);
        assert_eq!(choose(None, true, false, false), Kernel::Avx2);
        assert_eq!(choose(Some("avx512"), true, true, false), Kernel::Avx512);
        assert_eq!(choose(Some("avx512"), true, false, false), Kernel::Avx2);
        assert_eq!(choose(Some("avx2"), true, true, false), Kernel::Avx2);
        assert_eq!(choose(Some("direct"), true, true, false), Kernel::Avx512);
        assert_eq!(
            choose(Some("portable"), true, true, false),
            Kernel::Portable
        );
        assert_eq!(choose(None, false, false, false), Kernel::Portable);
        assert_eq!(choose(Some("avx512"), false, true, false), Kernel::Portable);
        assert_eq!(choose(None, false, false, true), Kernel::Neon);
        assert_eq!(choose(Some("avx2"), false, false, true), Kernel::Neon);
        assert_eq!(
            choose(Some("portable"), false, false, true),
            Kernel::Portable
        );
    }
}
