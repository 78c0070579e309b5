//! Priors the sampler can use for the signal and for the noise: a score network or an analytic Gaussian.
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::ncsnv2::Ncsnv2;
use crate::sde::Sde;
use crate::tensor::Tensor;
use alloc::boxed::Box;
use alloc::format;
use alloc::vec::Vec;

/// `J^T g` of a score at the point where it was evaluated ([`Prior::score_with_pullback`]).
pub type Pullback<'a> = Box<dyn FnOnce(&Tensor) -> Result<Tensor> + Send + 'a>;

/// The score `grad log p_t(z)` of the diffused prior at time `t`, for a batch `z`.
pub trait Prior: Send + Sync {
    fn score(&self, z: &Tensor, t: f64, sde: &Sde) -> Result<Tensor>;
    /// Per-item shape `[C, H, W]` this prior needs, if it is fixed (a network trained at one size).
    fn item_shape(&self) -> Option<[usize; 3]> {
        None
    }
    /// `J^T g` of the score with respect to `z` (the dps and pigdm rules need it).
    fn score_vjp(&self, z: &Tensor, t: f64, sde: &Sde, g: &Tensor) -> Result<Tensor>;
    /// The score at `z` and a pullback that computes [`Prior::score_vjp`] at the same `z` later. The default
    /// calls `score_vjp` then; a network keeps its forward pass for it instead of running it again.
    fn score_with_pullback<'a>(
        &'a self,
        z: &Tensor,
        t: f64,
        sde: &Sde,
    ) -> Result<(Tensor, Pullback<'a>)> {
        let score = self.score(z, t, sde)?;
        let (z, sde) = (z.clone(), *sde);
        Ok((score, Box::new(move |g| self.score_vjp(&z, t, &sde, g))))
    }
}

/// A score network: `s(z, t) = net(z) / s(t)` (the network predicts `-w` of `z = a x + s w`).
pub struct NetworkPrior<'a, B: Backend> {
    pub net: &'a Ncsnv2<B>,
    pub backend: &'a B,
    /// `[H, W]` the network was trained at, if known.
    pub image_size: Option<[usize; 2]>,
}

impl<B: Backend> Prior for NetworkPrior<'_, B> {
    fn score(&self, z: &Tensor, t: f64, sde: &Sde) -> Result<Tensor> {
        let mut out = self.net.forward(self.backend, z)?;
        let inv = (1.0 / sde.s(t)) as f32;
        out.data.iter_mut().for_each(|v| *v *= inv);
        Ok(out)
    }
    fn item_shape(&self) -> Option<[usize; 3]> {
        self.image_size
            .map(|[h, w]| [self.net.config.channels, h, w])
    }
    fn score_vjp(&self, z: &Tensor, t: f64, sde: &Sde, g: &Tensor) -> Result<Tensor> {
        let mut out = self.net.vjp_input(self.backend, z, g)?;
        let inv = (1.0 / sde.s(t)) as f32;
        out.data.iter_mut().for_each(|v| *v *= inv);
        Ok(out)
    }
    fn score_with_pullback<'b>(
        &'b self,
        z: &Tensor,
        t: f64,
        sde: &Sde,
    ) -> Result<(Tensor, Pullback<'b>)> {
        let (mut out, tape) = self.net.forward_taped(self.backend, z)?;
        let inv = (1.0 / sde.s(t)) as f32;
        out.data.iter_mut().for_each(|v| *v *= inv);
        let pullback = move |g: &Tensor| {
            let mut jt = self.net.vjp_from_tape(self.backend, tape, g)?;
            jt.data.iter_mut().for_each(|v| *v *= inv);
            Ok(jt)
        };
        Ok((out, Box::new(pullback)))
    }
}

/// Independent Gaussian per value: `N(mean_i, var_i)`; a single mean/var entry broadcasts.
/// The diffused marginal is `N(a mean, a^2 var + s^2)`, so the score is in closed form.
#[derive(Debug, Clone)]
pub struct GaussianPrior {
    pub mean: Vec<f32>,
    pub var: Vec<f32>,
}

impl GaussianPrior {
    pub fn new(mean: Vec<f32>, var: Vec<f32>) -> Result<Self> {
        if mean.is_empty() || var.is_empty() {
            return Err(Error::invalid(
                "Gaussian prior needs at least one mean and variance",
            ));
        }
        if mean.iter().chain(&var).any(|v| !v.is_finite()) {
            return Err(Error::non_finite(
                "Gaussian prior has a non-finite mean or variance",
            ));
        }
        if var.iter().any(|&v| v < 0.0) {
            return Err(Error::invalid("Gaussian prior variance must be >= 0"));
        }
        Ok(GaussianPrior { mean, var })
    }

    /// The same mean and standard deviation for every value.
    pub fn isotropic(mean: f32, std: f32) -> Result<Self> {
        if std.is_nan() || std < 0.0 || !std.is_finite() {
            return Err(Error::invalid(format!(
                "Gaussian std must be finite and >= 0, got {std}"
            )));
        }
        Self::new(alloc::vec![mean], alloc::vec![std * std])
    }

    fn at(v: &[f32], i: usize) -> f32 {
        if v.len() == 1 {
            v[0]
        } else {
            v[i % v.len()]
        }
    }
}

impl Prior for GaussianPrior {
    fn score(&self, z: &Tensor, t: f64, sde: &Sde) -> Result<Tensor> {
        let l = z.item_len();
        for v in [&self.mean, &self.var] {
            if v.len() != 1 && v.len() != l {
                return Err(Error::shape(format!(
                    "Gaussian prior has {} values but an item has {}",
                    v.len(),
                    l
                )));
            }
        }
        let (a, s) = (sde.a(t), sde.s(t));
        let mut out = Tensor::zeros(z.shape);
        for (k, (o, &zv)) in out.data.iter_mut().zip(&z.data).enumerate() {
            let i = k % l;
            let m = Self::at(&self.mean, i) as f64;
            let v = Self::at(&self.var, i) as f64;
            *o = (-(zv as f64 - a * m) / (a * a * v + s * s)) as f32;
        }
        Ok(out)
    }
    fn score_vjp(&self, z: &Tensor, t: f64, sde: &Sde, g: &Tensor) -> Result<Tensor> {
        // the score is affine in z with diagonal Jacobian -1 / (a^2 v + s^2)
        let l = z.item_len();
        let (a, s) = (sde.a(t), sde.s(t));
        let mut out = Tensor::zeros(g.shape);
        for (k, (o, &gv)) in out.data.iter_mut().zip(&g.data).enumerate() {
            let v = Self::at(&self.var, k % l) as f64;
            *o = (-(gv as f64) / (a * a * v + s * s)) as f32;
        }
        Ok(out)
    }
}
