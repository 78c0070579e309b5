//! The three SDEs of DESIGN §2: VP (default), VE and the method's "simple" SDE.
//!
//! Each is linear: `dz = f(t) z dt + g(t) dW`, with marginal `z_t | z_0 ~ N(a(t) z_0, s(t)^2 I)`.
use crate::error::{Error, Result};
use alloc::format;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

/// An SDE with its parameters (serialised in model files as `{"kind": "vp", ...}`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Sde {
    /// Variance preserving: `beta(t) = beta_min + t (beta_max - beta_min)`.
    Vp { beta_min: f64, beta_max: f64 },
    /// Variance exploding: `s(t) = sigma_min (sigma_max / sigma_min)^t`.
    Ve { sigma_min: f64, sigma_max: f64 },
    /// The method's own: `g(t) = sigma^t`, `s(t) = sqrt((sigma^(2t) - 1) / (2 ln sigma))`.
    Simple { sigma: f64 },
}

impl Default for Sde {
    fn default() -> Self {
        Sde::vp_default()
    }
}

impl Sde {
    pub fn vp_default() -> Self {
        Sde::Vp {
            beta_min: 0.1,
            beta_max: 20.0,
        }
    }
    pub fn ve_default() -> Self {
        Sde::Ve {
            sigma_min: 0.01,
            sigma_max: 50.0,
        }
    }
    pub fn simple_default() -> Self {
        Sde::Simple { sigma: 25.0 }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Sde::Vp { .. } => "vp",
            Sde::Ve { .. } => "ve",
            Sde::Simple { .. } => "simple",
        }
    }

    pub fn validate(&self) -> Result<()> {
        let ok = match *self {
            Sde::Vp { beta_min, beta_max } => {
                beta_min > 0.0 && beta_max > beta_min && beta_max.is_finite()
            }
            Sde::Ve {
                sigma_min,
                sigma_max,
            } => sigma_min > 0.0 && sigma_max > sigma_min && sigma_max.is_finite(),
            Sde::Simple { sigma } => sigma > 1.0 && sigma.is_finite(),
        };
        if ok {
            Ok(())
        } else {
            Err(Error::invalid(format!("invalid SDE parameters: {self:?}")))
        }
    }

    /// Marginal mean factor a(t).
    pub fn a(&self, t: f64) -> f64 {
        match *self {
            Sde::Vp { beta_min, beta_max } => libm::exp(vp_log_mean(beta_min, beta_max, t)),
            _ => 1.0,
        }
    }

    /// Marginal standard deviation s(t).
    pub fn s(&self, t: f64) -> f64 {
        match *self {
            Sde::Vp { beta_min, beta_max } => {
                // sqrt(1 - a^2) computed without cancellation
                libm::sqrt(-libm::expm1(2.0 * vp_log_mean(beta_min, beta_max, t)))
            }
            Sde::Ve {
                sigma_min,
                sigma_max,
            } => sigma_min * libm::pow(sigma_max / sigma_min, t),
            Sde::Simple { sigma } => {
                let l = libm::log(sigma);
                libm::sqrt(libm::expm1(2.0 * t * l) / (2.0 * l))
            }
        }
    }

    /// Linear drift coefficient: `f(z, t) = drift(t) * z`.
    pub fn drift(&self, t: f64) -> f64 {
        match *self {
            Sde::Vp { beta_min, beta_max } => -0.5 * (beta_min + t * (beta_max - beta_min)),
            _ => 0.0,
        }
    }

    /// Diffusion coefficient g(t).
    pub fn g(&self, t: f64) -> f64 {
        match *self {
            Sde::Vp { beta_min, beta_max } => libm::sqrt(beta_min + t * (beta_max - beta_min)),
            Sde::Ve {
                sigma_min,
                sigma_max,
            } => self.s(t) * libm::sqrt(2.0 * libm::log(sigma_max / sigma_min)),
            Sde::Simple { sigma } => libm::pow(sigma, t),
        }
    }

    /// Standard deviation of the prior the reverse process starts from: N(0, prior_std^2 I).
    pub fn prior_std(&self) -> f64 {
        match *self {
            Sde::Vp { .. } => 1.0,
            Sde::Ve { sigma_max, .. } => sigma_max,
            // The method's code starts the simple SDE from N(0, I) too (method-notes §1.2).
            Sde::Simple { .. } => 1.0,
        }
    }

    /// Reverse-time drift `f(z,t) - g(t)^2 score` for one value.
    pub fn reverse_drift(&self, z: f64, score: f64, t: f64) -> f64 {
        let g = self.g(t);
        self.drift(t) * z - g * g * score
    }
}

fn vp_log_mean(beta_min: f64, beta_max: f64, t: f64) -> f64 {
    -t * t * (beta_max - beta_min) / 4.0 - t * beta_min / 2.0
}

/// The sampling grid `t_i = linspace(1, eps, n)`; the step `dt` is the true grid spacing.
#[derive(Debug, Clone)]
pub struct TimeGrid {
    pub ts: Vec<f64>,
    pub dt: f64,
}

impl TimeGrid {
    pub fn new(steps: usize, eps: f64) -> Result<Self> {
        if steps == 0 {
            return Err(Error::invalid("steps must be at least 1"));
        }
        if !(eps > 0.0 && eps < 1.0) {
            return Err(Error::invalid(format!("eps must be in (0, 1), got {eps}")));
        }
        let ts: Vec<f64> = if steps == 1 {
            alloc::vec![1.0]
        } else {
            (0..steps)
                .map(|i| 1.0 + (eps - 1.0) * i as f64 / (steps - 1) as f64)
                .collect()
        };
        let dt = if steps == 1 {
            1.0 - eps
        } else {
            (1.0 - eps) / (steps - 1) as f64
        };
        Ok(TimeGrid { ts, dt })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Closed-form consistency: d a/dt = drift * a and d s^2/dt = 2 drift s^2 + g^2 (for VE, whose s(0) is
    /// sigma_min rather than 0, the same ODE holds for s^2 itself since drift = 0).
    #[test]
    fn moments_solve_their_odes() {
        for sde in [Sde::vp_default(), Sde::ve_default(), Sde::simple_default()] {
            for &t in &[0.01, 0.2, 0.5, 0.9] {
                let h = 1e-6;
                let da = (sde.a(t + h) - sde.a(t - h)) / (2.0 * h);
                assert!(
                    (da - sde.drift(t) * sde.a(t)).abs() < 1e-6 * (1.0 + da.abs()),
                    "{sde:?} a'"
                );
                let s2 = |t: f64| sde.s(t) * sde.s(t);
                let ds2 = (s2(t + h) - s2(t - h)) / (2.0 * h);
                let rhs = 2.0 * sde.drift(t) * s2(t) + sde.g(t) * sde.g(t);
                assert!(
                    (ds2 - rhs).abs() < 1e-5 * (1.0 + rhs.abs()),
                    "{sde:?} s2' {ds2} vs {rhs}"
                );
            }
        }
    }

    /// Values against the formulas written out by hand (DESIGN §2 and method-notes §1.2).
    #[test]
    fn closed_forms() {
        let vp = Sde::vp_default();
        let a = (-(0.5f64 * 0.5) * 19.9 / 4.0 - 0.5 * 0.1 / 2.0).exp();
        assert!((vp.a(0.5) - a).abs() < 1e-12);
        assert!((vp.s(0.5) - (1.0 - a * a).sqrt()).abs() < 1e-12);
        assert!((vp.g(0.5) - (0.1f64 + 0.5 * 19.9).sqrt()).abs() < 1e-12);
        let simple = Sde::simple_default();
        assert!((simple.s(1.0) - 9.845).abs() < 1e-3);
        assert!((simple.s(0.5) - 1.931).abs() < 1e-3);
        assert!((simple.s(1e-3) - 0.03167).abs() < 1e-5);
        let ve = Sde::ve_default();
        assert!((ve.s(0.0) - 0.01).abs() < 1e-15 && (ve.s(1.0) - 50.0).abs() < 1e-9);
        assert!((ve.g(0.3) - ve.s(0.3) * (2.0 * (5000f64).ln()).sqrt()).abs() < 1e-12);
        let grid = TimeGrid::new(600, 1e-3).unwrap();
        assert_eq!(grid.ts.len(), 600);
        assert!((grid.ts[599] - 1e-3).abs() < 1e-15 && grid.ts[0] == 1.0);
        assert!((grid.ts[0] - grid.ts[1] - grid.dt).abs() < 1e-15);
        assert!(TimeGrid::new(0, 1e-3).is_err());
    }
}

#[cfg(test)]
mod reverse_tests {
    use super::*;

    /// For Gaussian data N(m, v) the marginal is N(a m, a^2 v + s^2) with a closed-form score. The reverse-time
    /// SDE `dz = [f z - g^2 score] dt + g dW` (run backwards) must carry that marginal: its mean moves as the
    /// forward mean does, and its variance rate `2 E[(z - mu) drift] - g^2` equals dV/dt of the closed form.
    /// Expectations by quadrature over the marginal, using `reverse_drift` pointwise.
    #[test]
    fn reverse_drift_carries_gaussian_marginals() {
        let (m, v) = (0.4, 0.3);
        for sde in [Sde::vp_default(), Sde::ve_default(), Sde::simple_default()] {
            for &t in &[0.05, 0.4, 0.8] {
                let (a, s) = (sde.a(t), sde.s(t));
                let mu = a * m;
                let var = a * a * v + s * s;
                let sd = var.sqrt();
                let (mut e_drift, mut e_cov, mut wsum) = (0.0, 0.0, 0.0);
                let n = 4001;
                for i in 0..n {
                    let u = -8.0 + 16.0 * i as f64 / (n - 1) as f64;
                    let z = mu + sd * u;
                    let w = (-0.5 * u * u).exp();
                    let score = -(z - mu) / var;
                    let dr = sde.reverse_drift(z, score, t);
                    e_drift += w * dr;
                    e_cov += w * (z - mu) * dr;
                    wsum += w;
                }
                e_drift /= wsum;
                e_cov /= wsum;
                let h = 1e-6;
                let vt = |t: f64| sde.a(t).powi(2) * v + sde.s(t).powi(2);
                let dv = (vt(t + h) - vt(t - h)) / (2.0 * h);
                let dmu = (sde.a(t + h) - sde.a(t - h)) / (2.0 * h) * m;
                let g2 = sde.g(t).powi(2);
                assert!(
                    (e_drift - dmu).abs() < 1e-6 * (1.0 + dmu.abs()),
                    "{sde:?} t={t} mean rate"
                );
                assert!(
                    (2.0 * e_cov - g2 - dv).abs() < 1e-5 * (1.0 + dv.abs()),
                    "{sde:?} t={t} var rate"
                );
            }
        }
    }
}
