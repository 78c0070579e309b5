//! Explicit, reproducible randomness: ChaCha20 with one stream per batch item, Gaussians by Box–Muller.
//!
//! A run is fixed by one `u64` seed. Every consumer takes its own stream (`stream(purpose, index)`), so the
//! values an item sees never depend on how many items, threads or other consumers there are.
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// Stream purposes, so that different uses of one seed never share numbers.
pub mod purpose {
    pub const SAMPLER: u64 = 0;
    pub const CORRUPT: u64 = 1;
    pub const INIT: u64 = 2;
    pub const OPERATOR: u64 = 3;
}

/// A ChaCha20 stream with a Box–Muller Gaussian on top.
#[derive(Clone, Debug)]
pub struct Rng {
    inner: ChaCha20Rng,
    spare: Option<f64>,
}

impl Rng {
    /// Stream `index` of `purpose` under `seed`.
    pub fn stream(seed: u64, purpose: u64, index: u64) -> Self {
        let mut inner = ChaCha20Rng::seed_from_u64(seed);
        inner.set_stream(purpose.wrapping_mul(1 << 40) ^ index);
        Rng { inner, spare: None }
    }

    /// Uniform in (0, 1], 53 bits.
    pub fn uniform(&mut self) -> f64 {
        ((self.inner.next_u64() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in `0..n` (n > 0), by rejection (unbiased).
    pub fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let v = self.inner.next_u64();
            if v < zone {
                return v % n;
            }
        }
    }

    /// Standard normal by Box–Muller on libm; both values of a pair are used, in order.
    pub fn normal(&mut self) -> f64 {
        if let Some(v) = self.spare.take() {
            return v;
        }
        let u1 = self.uniform();
        let u2 = self.uniform();
        let r = libm::sqrt(-2.0 * libm::log(u1));
        let th = 2.0 * core::f64::consts::PI * u2;
        self.spare = Some(r * libm::sin(th));
        r * libm::cos(th)
    }

    pub fn fill_normal(&mut self, out: &mut [f32]) {
        for v in out {
            *v = self.normal() as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_moments_and_streams() {
        let mut r = Rng::stream(7, purpose::SAMPLER, 0);
        let n = 200_000;
        let (mut s1, mut s2, mut s4) = (0.0, 0.0, 0.0);
        for _ in 0..n {
            let v = r.normal();
            s1 += v;
            s2 += v * v;
            s4 += v * v * v * v;
        }
        let (m, v, k) = (s1 / n as f64, s2 / n as f64, s4 / n as f64);
        // standard errors: mean 1/sqrt(n) = 0.0022, var sqrt(2/n) = 0.0032, 4th moment sqrt(96/n) = 0.022
        assert!(m.abs() < 0.01, "mean {m}");
        assert!((v - 1.0).abs() < 0.015, "var {v}");
        assert!((k - 3.0).abs() < 0.1, "kurtosis {k}");
        let a: f64 = Rng::stream(7, purpose::SAMPLER, 1).normal();
        let b: f64 = Rng::stream(7, purpose::SAMPLER, 1).normal();
        let c: f64 = Rng::stream(7, purpose::CORRUPT, 1).normal();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mut u = Rng::stream(1, 0, 0);
        for _ in 0..1000 {
            let x = u.uniform();
            assert!(x > 0.0 && x <= 1.0);
            assert!(u.below(10) < 10);
        }
    }
}
