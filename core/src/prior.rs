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
pub type Pullback<'a, T> = Box<dyn FnOnce(&T) -> Result<T> + Send + 'a>;

/// The score `grad log p_t(z)` of the diffused prior at time `t`, for a batch `z` on backend `B`. Input and
/// output stay on the backend: a sampler step moves no data between host and device.
pub trait Prior<B: Backend>: Send + Sync {
    fn score(&self, b: &B, z: &B::Tensor, t: f64, sde: &Sde) -> Result<B::Tensor>;
    /// Per-item shape `[C, H, W]` this prior needs, if it is fixed (a network trained at one size).
    fn item_shape(&self) -> Option<[usize; 3]> {
        None
    }
    /// `J^T g` of the score with respect to `z` (the dps and pigdm rules need it).
    fn score_vjp(
        &self,
        b: &B,
        z: &B::Tensor,
        t: f64,
        sde: &Sde,
        g: &B::Tensor,
    ) -> Result<B::Tensor>;
    /// The score at `z` and a pullback that computes [`Prior::score_vjp`] at the same `z` later. The default
    /// calls `score_vjp` then; a network keeps its forward pass for it instead of running it again.
    fn score_with_pullback<'a>(
        &'a self,
        b: &'a B,
        z: &B::Tensor,
        t: f64,
        sde: &Sde,
    ) -> Result<(B::Tensor, Pullback<'a, B::Tensor>)> {
        let score = self.score(b, z, t, sde)?;
        let (z, sde) = (z.clone(), *sde);
        Ok((score, Box::new(move |g| self.score_vjp(b, &z, t, &sde, g))))
    }
}

/// A score network: `s(z, t) = net(z) / s(t)` (the network predicts `-w` of `z = a x + s w`), computed as
/// `net(z) * (1 / s(t))` with the reciprocal rounded to f32.
pub struct NetworkPrior<'a, B: Backend> {
    pub net: &'a Ncsnv2<B>,
    /// `[H, W]` the network was trained at, if known.
    pub image_size: Option<[usize; 2]>,
}

impl<B: Backend> Prior<B> for NetworkPrior<'_, B> {
    fn score(&self, b: &B, z: &B::Tensor, t: f64, sde: &Sde) -> Result<B::Tensor> {
        let out = self.net.forward_device(b, z)?;
        Ok(b.mul_scalar(&out, (1.0 / sde.s(t)) as f32))
    }
    fn item_shape(&self) -> Option<[usize; 3]> {
        self.image_size
            .map(|[h, w]| [self.net.config.channels, h, w])
    }
    fn score_vjp(
        &self,
        b: &B,
        z: &B::Tensor,
        t: f64,
        sde: &Sde,
        g: &B::Tensor,
    ) -> Result<B::Tensor> {
        let (_, tape) = self.net.forward_taped(b, z)?;
        let out = self.net.vjp_from_tape(b, tape, g)?;
        Ok(b.mul_scalar(&out, (1.0 / sde.s(t)) as f32))
    }
    fn score_with_pullback<'b>(
        &'b self,
        b: &'b B,
        z: &B::Tensor,
        t: f64,
        sde: &Sde,
    ) -> Result<(B::Tensor, Pullback<'b, B::Tensor>)> {
        let (out, tape) = self.net.forward_taped(b, z)?;
        let inv = (1.0 / sde.s(t)) as f32;
        let pullback = move |g: &B::Tensor| {
            let jt = self.net.vjp_from_tape(b, tape, g)?;
            Ok(b.mul_scalar(&jt, inv))
        };
        Ok((b.mul_scalar(&out, inv), Box::new(pullback)))
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

impl GaussianPrior {
    /// Checks the prior against items of shape `item` and uploads its mean and variance, one item each, to
    /// backend `b`: the prior the sampler runs with.
    pub fn on<B: Backend>(&self, b: &B, item: [usize; 3]) -> Result<BackendGaussian<B>> {
        let l: usize = item.iter().product();
        let [c, h, w] = item;
        let full = |v: &[f32]| -> Result<Tensor> {
            if v.len() != 1 && v.len() != l {
                return Err(Error::shape(format!(
                    "Gaussian prior has {} values but an item has {}",
                    v.len(),
                    l
                )));
            }
            Tensor::from_vec([1, c, h, w], (0..l).map(|i| Self::at(v, i)).collect())
        };
        Ok(BackendGaussian {
            mean: b.upload(&full(&self.mean)?),
            var: b.upload(&full(&self.var)?),
        })
    }
}

/// A [`GaussianPrior`] on a backend: its score is the backend's closed form
/// ([`Backend::gaussian_score`]), computed where the state is.
pub struct BackendGaussian<B: Backend> {
    mean: B::Tensor,
    var: B::Tensor,
}

impl<B: Backend> Prior<B> for BackendGaussian<B> {
    fn score(&self, b: &B, z: &B::Tensor, t: f64, sde: &Sde) -> Result<B::Tensor> {
        Ok(b.gaussian_score(z, Some(&self.mean), &self.var, sde.a(t), sde.s(t)))
    }
    fn score_vjp(
        &self,
        b: &B,
        _z: &B::Tensor,
        t: f64,
        sde: &Sde,
        g: &B::Tensor,
    ) -> Result<B::Tensor> {
        // the score is affine in z with diagonal Jacobian -1 / (a^2 v + s^2)
        Ok(b.gaussian_score(g, None, &self.var, sde.a(t), sde.s(t)))
    }
}
