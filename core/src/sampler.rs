//! The joint posterior sampler of DESIGN §1: one reverse-time Euler–Maruyama loop over the signal `x` and
//! the structured noise `n`, with a data-consistency step that keeps `y = A x + alpha n`.
//!
//! The loop runs on a [`Backend`]: `x`, `n`, their means, the measurement and the operator live in backend
//! tensors from the first step to the last. Per step the host draws the Gaussian noise from the ChaCha
//! streams (so a seed means the same on every backend) and uploads it; the one value read back is the
//! non-finite flag. `x` and `n` come down once, at the end.
use crate::backend::Backend;
use crate::error::{Error, ErrorKind, Result};
use crate::operator::{BackendOperator, Operator};
use crate::prior::{Prior, Pullback};
use crate::rng::{purpose, Rng};
use crate::sde::{Sde, TimeGrid};
use crate::tensor::Tensor;
use alloc::format;
use alloc::vec;
use alloc::vec::Vec;

/// Per-step coefficients of the Euler–Maruyama predictor: `f dt`, `g^2 dt`, `g sqrt(dt)`.
#[derive(Clone, Copy)]
struct EmCoef {
    fdt: f32,
    g2dt: f32,
    gsq: f32,
}

impl EmCoef {
    fn at(sde: &Sde, t: f64, dt: f64) -> Self {
        let (f, g) = (sde.drift(t), sde.g(t));
        EmCoef {
            fdt: (f * dt) as f32,
            g2dt: (g * g * dt) as f32,
            gsq: (g * libm::sqrt(dt)) as f32,
        }
    }
}

/// Reverse-time Euler–Maruyama predictor on the backend: `z̄ = z - (f dt z - g^2 dt s)` (returned first),
/// `z = z̄ + g sqrt(dt) w`.
fn em_predict<B: Backend>(
    b: &B,
    z: &B::Tensor,
    score: &B::Tensor,
    w: &B::Tensor,
    c: EmCoef,
) -> (B::Tensor, B::Tensor) {
    let drift = b.axpby(c.fdt, z, -c.g2dt, score);
    let mean = b.axpby(1.0, z, -1.0, &drift);
    let next = b.axpby(1.0, &mean, c.gsq, w);
    (mean, next)
}

/// `items` host draws of `item` values each, item `i` from `rngs[i]` (in the order the caller asks).
fn draw(rngs: &mut [Rng], item: [usize; 3]) -> Tensor {
    let [c, h, w] = item;
    let mut t = Tensor::zeros([rngs.len(), c, h, w]);
    for (i, rng) in rngs.iter_mut().enumerate() {
        rng.fill_normal(t.item_mut(i));
    }
    t
}

/// The non-finite check after a step: reads back one flag; on failure, the state to name the bad index.
fn check_finite<B: Backend>(b: &B, ts: &[&B::Tensor]) -> Result<Option<usize>> {
    if b.all_finite(ts)? {
        return Ok(None);
    }
    for t in ts {
        if let Some(i) = b.download(t)?.first_non_finite() {
            return Ok(Some(i));
        }
    }
    Ok(None)
}

/// After step `k` (0-based) of `total`: an error if the state went non-finite (at index `bad`), naming the
/// step and `what` ran (rule and weights), or if the progress callback asks to stop. A NaN never reaches an
/// output.
fn end_of_step(
    k: usize,
    total: usize,
    t: f64,
    bad: Option<usize>,
    what: &str,
    progress: &mut Progress<'_>,
) -> Result<()> {
    if let Some(pos) = bad {
        return Err(Error::non_finite(format!(
            "sampler diverged at step {} of {total} (t = {t:.4}, {what}): non-finite value at index {pos}; \
             smaller consistency weights (lambda/mu, e.g. half) keep it stable",
            k + 1
        )));
    }
    if !progress(k + 1, total) {
        return Err(Error::new(
            ErrorKind::Cancelled,
            format!("cancelled at step {} of {total}", k + 1),
        ));
    }
    Ok(())
}

/// Clips an estimate to the data range, if one is set.
fn clip<B: Backend>(b: &B, t: B::Tensor, range: Option<[f32; 2]>) -> B::Tensor {
    match range {
        Some([lo, hi]) => b.clamp(&t, lo, hi),
        None => t,
    }
}

/// Data-consistency rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// `r = y_t - (A x + alpha n)`, `x += lambda A^T r / max(1, ||A||^2)`, `n += mu alpha r / max(1, alpha^2)`
    /// (forward passes only). The normalisation keeps the step a contraction for `lambda, mu < 1` whatever
    /// the operator's norm; it is 1 for every operator with `||A|| <= 1` and `alpha <= 1`.
    Projection,
    /// DPS: `x -= lambda grad_x ||rho||`, `n -= mu grad_n ||rho||` through Tweedie's estimates (one VJP of
    /// each score network per step), `rho = y - (A x0_hat + alpha n0_hat)`, norm per sample; as pigdm, the
    /// step is taken in the VE variable `z = x / a`, which scales it by `a^2` (DESIGN's form where `a = 1`).
    Dps,
    /// PiGDM: `v = (r2 A A^T + r2 alpha^2 I)^-1 rho`, `x += lambda a^2 r2 J_x^T A^T v`,
    /// `n += mu a^2 r2 alpha J_n^T v`, `r2 = s^2 / (s^2 + a^2)`. This is DESIGN's form (written for `a = 1`:
    /// VE, simple) applied to the equivalent VE variable `z = x / a` (noise level `s / a`), whose Jacobian
    /// `dx0_hat / dz = a J_x` stays bounded; mapped back to `x`, the step is scaled by `a^2`.
    Pigdm,
}

impl Rule {
    /// The rule's name as the CLI spells it.
    pub fn name(self) -> &'static str {
        match self {
            Rule::Projection => "projection",
            Rule::Dps => "dps",
            Rule::Pigdm => "pigdm",
        }
    }

    /// The default weights (lambda, mu) of this rule: the method's tuned values for projection and dps;
    /// for pigdm 1.2 / 1.2, re-tuned on validation pairs (the method's 0.93 / 0.88 scored 0.27 dB lower on
    /// fashion-digits at 400 steps and 0.21 dB lower on compressed sensing; docs/results.md).
    pub fn default_weights(self) -> (f64, f64) {
        match self {
            Rule::Projection => (0.5, 0.5),
            Rule::Dps => (12.7, 16.7),
            Rule::Pigdm => (1.2, 1.2),
        }
    }
}

/// The most reverse-time steps a run takes (the method uses 600).
pub const MAX_STEPS: usize = 10_000_000;

/// Settings of one sampling run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerConfig {
    pub sde: Sde,
    pub steps: usize,
    /// Last time of the grid `linspace(1, eps, steps)`.
    pub eps: f64,
    pub rule: Rule,
    pub lambda: f64,
    pub mu: f64,
    pub alpha: f64,
    /// Clip the returned signal to this range (the data range), if set.
    pub clip: Option<[f32; 2]>,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            sde: Sde::vp_default(),
            steps: 600,
            eps: 1e-3,
            rule: Rule::Projection,
            lambda: 0.5,
            mu: 0.5,
            alpha: 1.0,
            clip: None,
        }
    }
}

impl SamplerConfig {
    pub fn validate(&self) -> Result<()> {
        self.sde.validate()?;
        if self.steps == 0 {
            return Err(Error::invalid("steps must be at least 1"));
        }
        if self.steps > MAX_STEPS {
            // the time grid is stored: a mistyped step count must not allocate gigabytes
            return Err(Error::invalid(format!(
                "steps must be at most {MAX_STEPS}, got {}",
                self.steps
            )));
        }
        for (name, v) in [
            ("lambda", self.lambda),
            ("mu", self.mu),
            ("alpha", self.alpha),
        ] {
            if !v.is_finite() {
                return Err(Error::invalid(format!("{name} must be finite, got {v}")));
            }
        }
        if self.lambda < 0.0 || self.mu < 0.0 {
            return Err(Error::invalid("lambda and mu must be >= 0"));
        }
        if let Some([lo, hi]) = self.clip {
            if lo.is_nan() || hi.is_nan() || lo >= hi {
                return Err(Error::invalid("clip range must have lo < hi"));
            }
        }
        Ok(())
    }
}

/// The estimate of a run: the signal and the noise, each the predictor mean of the last step.
#[derive(Debug, Clone)]
pub struct Posterior {
    pub signal: Tensor,
    pub noise: Tensor,
}

/// Solves `(A A^T + alpha^2 I) v = rho` per item: a division by the diagonal for identity, scale and mask
/// operators, a product with the inverse (from a Cholesky factorisation in f64, made once) for a dense
/// matrix. Host form, made once per plan; [`GramInverse::on`] puts it on a backend.
#[derive(Debug, Clone, PartialEq)]
pub enum GramInverse {
    /// The diagonal of `A A^T + alpha^2 I`, one noise item.
    Diagonal(Vec<f32>),
    /// `(A A^T + alpha^2 I)^-1`, row-major `m x m`.
    Inverse { m: usize, a: Vec<f32> },
}

impl GramInverse {
    pub fn new(op: &Operator, d: usize, alpha2: f64) -> Result<Self> {
        let m = op.out_len(d)?;
        let diag = |v: Vec<f64>| -> Result<Self> {
            if v.iter().any(|&q| q <= 0.0) {
                return Err(Error::invalid(
                    "A A^T + alpha^2 I is singular (alpha = 0 and a zero in A?)",
                ));
            }
            Ok(GramInverse::Diagonal(v.iter().map(|&q| q as f32).collect()))
        };
        match op {
            Operator::Identity => diag(vec![1.0 + alpha2; m]),
            Operator::Scale(b) => diag(vec![(*b as f64) * (*b as f64) + alpha2; m]),
            Operator::Mask(mk) => diag(
                mk.iter()
                    .map(|&v| (v as f64) * (v as f64) + alpha2)
                    .collect(),
            ),
            Operator::Matrix { m, d, a } => {
                let l = cholesky(*m, *d, a, alpha2)?;
                Ok(GramInverse::Inverse {
                    m: *m,
                    a: inverse_from_cholesky(*m, &l),
                })
            }
        }
    }

    /// Uploads the solve to `b` for noise items of shape `item`.
    pub fn on<B: Backend>(&self, b: &B, item: [usize; 3]) -> Result<BackendGram<B>> {
        let [c, h, w] = item;
        Ok(match self {
            GramInverse::Diagonal(q) => {
                BackendGram::Diagonal(b.upload(&Tensor::from_vec([1, c, h, w], q.clone())?))
            }
            GramInverse::Inverse { m, a } => {
                BackendGram::Inverse(b.upload(&Tensor::from_vec([1, 1, *m, *m], a.clone())?))
            }
        })
    }
}

/// The lower Cholesky factor of `A A^T + alpha2 I` (`m x m`, f64).
fn cholesky(m: usize, d: usize, a: &[f32], alpha2: f64) -> Result<Vec<f64>> {
    let mut g = vec![0f64; m * m];
    for i in 0..m {
        for j in 0..=i {
            let mut acc = 0f64;
            for k in 0..d {
                acc += a[i * d + k] as f64 * a[j * d + k] as f64;
            }
            g[i * m + j] = acc;
        }
        g[i * m + i] += alpha2;
    }
    for j in 0..m {
        let mut dsum = g[j * m + j];
        for k in 0..j {
            dsum -= g[j * m + k] * g[j * m + k];
        }
        if dsum <= 0.0 {
            return Err(Error::invalid(
                "A A^T + alpha^2 I is not positive definite (alpha = 0 with rank-deficient A?)",
            ));
        }
        let l = libm::sqrt(dsum);
        g[j * m + j] = l;
        for i in j + 1..m {
            let mut acc = g[i * m + j];
            for k in 0..j {
                acc -= g[i * m + k] * g[j * m + k];
            }
            g[i * m + j] = acc / l;
        }
    }
    Ok(g)
}

/// `(L L^T)^-1` from the lower factor `l`, column by column (forward then back substitution on `e_j`),
/// rounded to f32.
fn inverse_from_cholesky(m: usize, l: &[f64]) -> Vec<f32> {
    let mut inv = vec![0f32; m * m];
    let mut z = vec![0f64; m];
    for j in 0..m {
        for i in 0..m {
            let mut acc = if i == j { 1.0 } else { 0.0 };
            for k in 0..i {
                acc -= l[i * m + k] * z[k];
            }
            z[i] = acc / l[i * m + i];
        }
        for i in (0..m).rev() {
            let mut acc = z[i];
            for k in i + 1..m {
                acc -= l[k * m + i] * z[k];
            }
            z[i] = acc / l[i * m + i];
        }
        for i in 0..m {
            inv[i * m + j] = z[i] as f32;
        }
    }
    inv
}

/// [`GramInverse`] on a backend.
pub enum BackendGram<B: Backend> {
    Diagonal(B::Tensor),
    Inverse(B::Tensor),
}

impl<B: Backend> BackendGram<B> {
    /// `(A A^T + alpha^2 I)^-1 rho` for every item of `rho`.
    pub fn solve(&self, b: &B, rho: &B::Tensor) -> B::Tensor {
        match self {
            BackendGram::Diagonal(q) => b.div(rho, q),
            BackendGram::Inverse(a) => b.matmul(rho, a, false, b.shape(rho)),
        }
    }
}

/// Progress callback: `(steps done, total)`; return `false` to cancel.
pub type Progress<'p> = dyn FnMut(usize, usize) -> bool + 'p;

/// Joint posterior sampler over a signal prior and a noise prior on backend `B`, with the operator (and
/// pigdm's solve) already on the backend. Made by [`JointSampler::new`], which checks every shape.
pub struct JointSampler<'a, B: Backend> {
    backend: &'a B,
    config: SamplerConfig,
    operator: BackendOperator<B>,
    gram: Option<BackendGram<B>>,
    signal: &'a dyn Prior<B>,
    noise: &'a dyn Prior<B>,
    signal_shape: [usize; 3],
    noise_shape: [usize; 3],
    /// Values per measurement (`m`).
    m: usize,
    /// Projection's step normalisation `(1 / max(1, ||A||^2), 1 / max(1, alpha^2))`.
    projection_scale: (f32, f32),
}

impl<'a, B: Backend> JointSampler<'a, B> {
    /// Checks the configuration and the shapes (the noise item must have the operator's `m` values; a prior
    /// with a fixed item shape must match its side) and puts the operator, and for pigdm the solve with
    /// `A A^T + alpha^2 I` (factorised here, or given by a plan that made it once), on the backend.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        backend: &'a B,
        config: SamplerConfig,
        operator: &Operator,
        gram: Option<&GramInverse>,
        signal: &'a dyn Prior<B>,
        noise: &'a dyn Prior<B>,
        signal_shape: [usize; 3],
        noise_shape: [usize; 3],
    ) -> Result<Self> {
        config.validate()?;
        let d: usize = signal_shape.iter().product();
        let m = operator.out_len(d)?;
        let mn: usize = noise_shape.iter().product();
        if mn != m {
            return Err(Error::shape(format!(
                "noise shape {noise_shape:?} has {mn} values but the operator gives {m} measurements"
            )));
        }
        if d == 0 || m == 0 {
            return Err(Error::shape("empty signal or measurement"));
        }
        for (what, p, shape) in [
            ("signal", signal, signal_shape),
            ("noise", noise, noise_shape),
        ] {
            if let Some(s) = p.item_shape() {
                if s != shape {
                    return Err(Error::shape(format!(
                        "the {what} model expects items of shape {s:?} (C, H, W) but the data has {shape:?}"
                    )));
                }
            }
        }
        let gram = match (config.rule, gram) {
            (Rule::Pigdm, Some(g)) => Some(g.on(backend, noise_shape)?),
            (Rule::Pigdm, None) => Some(
                GramInverse::new(operator, d, config.alpha * config.alpha)?
                    .on(backend, noise_shape)?,
            ),
            _ => None,
        };
        let projection_scale = match config.rule {
            Rule::Projection => (
                (1.0 / operator.norm2(d)?.max(1.0)) as f32,
                (1.0 / (config.alpha * config.alpha).max(1.0)) as f32,
            ),
            _ => (1.0, 1.0),
        };
        Ok(JointSampler {
            projection_scale,
            backend,
            config,
            operator: operator.on(backend, signal_shape)?,
            gram,
            signal,
            noise,
            signal_shape,
            noise_shape,
            m,
        })
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.config
    }

    fn shape_of(&self, items: usize, item: [usize; 3]) -> [usize; 4] {
        [items, item[0], item[1], item[2]]
    }

    /// Samples `p(x, n | y)` once per measurement. `y` holds `N` items of `m` values each.
    /// Item `i` draws all its randomness from stream `i` of `seed`, so results do not depend on batching.
    pub fn sample(&self, y: &[f32], seed: u64, progress: &mut Progress<'_>) -> Result<Posterior> {
        self.sample_from(y, seed, 0, progress)
    }

    /// As [`JointSampler::sample`], with item `i` on stream `first + i`: a batch cut into pieces gives the
    /// same bits as the whole batch when each piece starts at its first item's stream.
    pub fn sample_from(
        &self,
        y: &[f32],
        seed: u64,
        first: u64,
        progress: &mut Progress<'_>,
    ) -> Result<Posterior> {
        let cfg = &self.config;
        let b = self.backend;
        let m = self.m;
        if y.is_empty() || !y.len().is_multiple_of(m) {
            return Err(Error::shape(format!(
                "measurement has {} values, not a multiple of the {m} values per item",
                y.len()
            )));
        }
        if let Some(i) = y.iter().position(|v| !v.is_finite()) {
            return Err(Error::non_finite(format!(
                "measurement has a non-finite value at index {i}"
            )));
        }
        let items = y.len() / m;
        let grid = TimeGrid::new(cfg.steps, cfg.eps)?;
        let sde = cfg.sde;
        let (xs, ns) = (
            self.shape_of(items, self.signal_shape),
            self.shape_of(items, self.noise_shape),
        );
        let mut rngs: Vec<Rng> = (0..items)
            .map(|i| Rng::stream(seed, purpose::SAMPLER, first.wrapping_add(i as u64)))
            .collect();
        // the initial state, drawn per item (x then n) and scaled by the prior's std, goes up once
        let ps = sde.prior_std() as f32;
        let mut x0 = Tensor::zeros(xs);
        let mut n0 = Tensor::zeros(ns);
        for (i, rng) in rngs.iter_mut().enumerate() {
            rng.fill_normal(x0.item_mut(i));
            rng.fill_normal(n0.item_mut(i));
        }
        x0.data
            .iter_mut()
            .chain(n0.data.iter_mut())
            .for_each(|v| *v *= ps);
        let (mut x, mut n) = (b.upload(&x0), b.upload(&n0));
        let yd = b.upload(&Tensor::from_vec(ns, y.to_vec())?);
        let (mut xbar, mut nbar) = (None, None);
        let dt = grid.dt;
        let total = grid.ts.len();
        let taped = cfg.rule != Rule::Projection;
        let (lam, mu, alpha) = (cfg.lambda as f32, cfg.mu as f32, cfg.alpha as f32);
        let what = format!(
            "rule {}, lambda {}, mu {}",
            cfg.rule.name(),
            cfg.lambda,
            cfg.mu
        );
        // host buffers of the per-step noise, refilled every step
        let (mut wx, mut wn, mut xi) = (Tensor::zeros(xs), Tensor::zeros(ns), Tensor::zeros(ns));
        for (k, &t) in grid.ts.iter().enumerate() {
            // dps / pigdm keep each network's forward pass for the VJP at the same point
            let (mut sx, mut sn) = (None, None);
            {
                let (xr, nr) = (&x, &n);
                let eval = |p: &'a dyn Prior<B>, z: &B::Tensor| {
                    if taped {
                        p.score_with_pullback(b, z, t, &sde)
                            .map(|(s, pb)| (s, Some(pb)))
                    } else {
                        p.score(b, z, t, &sde).map(|s| (s, None))
                    }
                };
                b.join(&mut || sx = Some(eval(self.signal, xr)), &mut || {
                    sn = Some(eval(self.noise, nr))
                });
            }
            let missing = || Error::invalid("score was not evaluated");
            let (sx, px) = sx.ok_or_else(missing)??;
            let (sn, pn) = sn.ok_or_else(missing)??;
            // dps / pigdm: the consistency step is a VJP through Tweedie's estimates at the current x, n
            let guidance = match (taped, px, pn) {
                (false, _, _) => None,
                (true, Some(px), Some(pn)) => {
                    Some(self.guidance(&yd, &x, &n, &sx, &sn, t, [px, pn])?)
                }
                _ => return Err(Error::invalid("score VJP was not prepared")),
            };
            // the step's noise, drawn per item in a fixed order (w_x, w_n, xi), goes up
            for (i, rng) in rngs.iter_mut().enumerate() {
                rng.fill_normal(wx.item_mut(i));
                rng.fill_normal(wn.item_mut(i));
                rng.fill_normal(xi.item_mut(i));
            }
            let coef = EmCoef::at(&sde, t, dt);
            let (xm, xn) = em_predict(b, &x, &sx, &b.upload(&wx), coef);
            let (nm, nn) = em_predict(b, &n, &sn, &b.upload(&wn), coef);
            // data consistency
            match guidance {
                None => {
                    let (a32, s32) = (sde.a(t) as f32, sde.s(t) as f32);
                    // r = (a y + s xi) - (A x + alpha n); x += lambda' A^T r; n += mu' alpha r, the
                    // weights normalised by the operator's and alpha's norms
                    let (sx, sn) = self.projection_scale;
                    let y_t = b.axpby(a32, &yd, s32, &b.upload(&xi));
                    let pred = b.axpby(1.0, &self.operator.apply(b, &xn, ns), alpha, &nn);
                    let r = b.axpby(1.0, &y_t, -1.0, &pred);
                    x = b.axpby(1.0, &xn, lam * sx, &self.operator.adjoint(b, &r, xs));
                    n = b.axpby(1.0, &nn, mu * sn * alpha, &r);
                }
                Some((gx, gn)) => {
                    x = b.axpby(1.0, &xn, lam, &gx);
                    n = b.axpby(1.0, &nn, mu, &gn);
                }
            }
            // the state after the consistency step feeds the next network call: check it too
            let bad = check_finite(b, &[&xm, &nm, &x, &n])?;
            xbar = Some(xm);
            nbar = Some(nm);
            end_of_step(k, total, t, bad, &what, progress)?;
        }
        let none = || Error::invalid("no sampler step ran");
        let xbar = clip(b, xbar.ok_or_else(none)?, cfg.clip);
        Ok(Posterior {
            signal: b.download(&xbar)?,
            noise: b.download(&nbar.ok_or_else(none)?)?,
        })
    }

    /// The dps / pigdm consistency terms for every item: `(dx, dn)` to be added as `x += lambda dx`,
    /// `n += mu dn` after the predictor. Computed at the current `x`, `n` (where the scores `sx`, `sn` are).
    #[allow(clippy::too_many_arguments)]
    fn guidance(
        &self,
        y: &B::Tensor,
        x: &B::Tensor,
        n: &B::Tensor,
        sx: &B::Tensor,
        sn: &B::Tensor,
        t: f64,
        [px, pn]: [Pullback<'_, B::Tensor>; 2],
    ) -> Result<(B::Tensor, B::Tensor)> {
        let b = self.backend;
        let sde = self.config.sde;
        let (a, s) = (sde.a(t), sde.s(t));
        let (a32, s2) = (a as f32, (s * s) as f32);
        let alpha = self.config.alpha as f32;
        let (xs, ns) = (b.shape(x), b.shape(n));
        // Tweedie: z0 = (z + s^2 score) / a
        let tweedie = |z: &B::Tensor, sc: &B::Tensor| b.div_scalar(&b.axpby(1.0, z, s2, sc), a32);
        let (x0, n0) = (tweedie(x, sx), tweedie(n, sn));
        // rho = y - (A x0 + alpha n0)
        let pred = b.axpby(1.0, &self.operator.apply(b, &x0, ns), alpha, &n0);
        let rho = b.axpby(1.0, y, -1.0, &pred);
        let (ux, un) = match self.config.rule {
            Rule::Dps => {
                // grad of ||rho||: -(J^T A^T rho) / ||rho||; the update subtracts lambda * grad, taken in the
                // VE variable z = x / a as pigdm's (a gradient step in z is a^2 times one in x; DESIGN's
                // form where a = 1)
                let v = b.scale_by_inverse_norm(&rho, a32 * a32);
                (self.operator.adjoint(b, &v, xs), b.mul_scalar(&v, alpha))
            }
            _ => {
                // pigdm in the VE variable z = x / a (noise level s / a): r2 = (s/a)^2 / ((s/a)^2 + 1), and
                // the step in z, mapped back to x, gains a^2 (both reduce to DESIGN's form where a = 1).
                // v = (r2 (A A^T + alpha^2 I))^-1 rho; x gets a^2 r2 A^T v, n gets a^2 r2 alpha v
                let r2 = (s * s / (s * s + a * a)) as f32;
                let pigdm_scale = a32 * a32 * r2;
                let gram = self
                    .gram
                    .as_ref()
                    .ok_or_else(|| Error::invalid("pigdm without a factorised operator"))?;
                let v = b.div_scalar(&gram.solve(b, &rho), r2);
                (
                    b.mul_scalar(&self.operator.adjoint(b, &v, xs), pigdm_scale),
                    b.mul_scalar(&v, pigdm_scale * alpha),
                )
            }
        };
        // J_z0^T u = (u + s^2 J_score^T u) / a: one VJP of each score network, run through the backend's join
        let (mut jx, mut jn) = (None, None);
        {
            let (uxr, unr) = (&ux, &un);
            let (mut px, mut pn) = (Some(px), Some(pn));
            b.join(&mut || jx = px.take().map(|p| p(uxr)), &mut || {
                jn = pn.take().map(|p| p(unr))
            });
        }
        let missing = || Error::invalid("score VJP was not evaluated");
        let (jx, jn) = (jx.ok_or_else(missing)??, jn.ok_or_else(missing)??);
        let combine = |u: &B::Tensor, j: &B::Tensor| b.div_scalar(&b.axpby(1.0, u, s2, j), a32);
        Ok((combine(&ux, &jx), combine(&un, &jn)))
    }
}

/// Unconditional samples of one prior on backend `b`: the reverse-time Euler–Maruyama loop without data
/// consistency. Returns the predictor mean of the last step, `items` samples of shape `item` (`[C, H, W]`).
pub fn sample_prior<B: Backend>(
    b: &B,
    prior: &dyn Prior<B>,
    item: [usize; 3],
    items: usize,
    config: &SamplerConfig,
    seed: u64,
    progress: &mut Progress<'_>,
) -> Result<Tensor> {
    config.validate()?;
    if items == 0 {
        return Err(Error::invalid("count must be at least 1"));
    }
    if let Some(s) = prior.item_shape() {
        if s != item {
            return Err(Error::shape(format!(
                "the model expects items of shape {s:?}, asked for {item:?}"
            )));
        }
    }
    let grid = TimeGrid::new(config.steps, config.eps)?;
    let sde = config.sde;
    let mut rngs: Vec<Rng> = (0..items)
        .map(|i| Rng::stream(seed, purpose::SAMPLER, i as u64))
        .collect();
    let ps = sde.prior_std() as f32;
    let mut x0 = draw(&mut rngs, item);
    x0.data.iter_mut().for_each(|v| *v *= ps);
    let mut x = b.upload(&x0);
    let mut xbar = None;
    let total = grid.ts.len();
    let mut w = x0;
    for (k, &t) in grid.ts.iter().enumerate() {
        let sx = prior.score(b, &x, t, &sde)?;
        for (i, rng) in rngs.iter_mut().enumerate() {
            rng.fill_normal(w.item_mut(i));
        }
        let w = b.upload(&w);
        let (mean, next) = em_predict(b, &x, &sx, &w, EmCoef::at(&sde, t, grid.dt));
        let bad = check_finite(b, &[&mean])?;
        x = next;
        xbar = Some(mean);
        end_of_step(k, total, t, bad, "unconditional sampling", progress)?;
    }
    let xbar = xbar.ok_or_else(|| Error::invalid("no sampler step ran"))?;
    b.download(&clip(b, xbar, config.clip))
}

/// The result of [`JointSampler::sample_k`]: the estimates and, for `k > 1`, the per-value standard deviation
/// of the signal over the `k` samples.
#[derive(Debug, Clone)]
pub struct PosteriorStats {
    /// With `k > 1`: the mean over the samples (MMSE estimate) of the signal and the noise.
    pub estimate: Posterior,
    pub signal_std: Option<Tensor>,
    /// The signal of each measurement's first sample (stream `i*k`): a single posterior sample, the
    /// method's own output, for comparison with the mean. Equals `estimate.signal` when `k == 1`.
    pub first_signal: Tensor,
}

impl<B: Backend> JointSampler<'_, B> {
    /// `k` posterior samples per measurement. Measurement `i`'s sample `j` is batch item `i*k + j` and so
    /// uses RNG stream `i*k + j`; for `k == 1` this is exactly [`JointSampler::sample`].
    pub fn sample_k(
        &self,
        y: &[f32],
        k: usize,
        seed: u64,
        progress: &mut Progress<'_>,
    ) -> Result<PosteriorStats> {
        self.sample_k_from(y, k, seed, 0, progress)
    }

    /// As [`JointSampler::sample_k`] for measurements numbered from `first`: measurement `first + i`'s
    /// sample `j` uses stream `(first + i) k + j`, so measurements cut into pieces give the same bits.
    pub fn sample_k_from(
        &self,
        y: &[f32],
        k: usize,
        seed: u64,
        first: u64,
        progress: &mut Progress<'_>,
    ) -> Result<PosteriorStats> {
        let stream0 = first.wrapping_mul(k as u64);
        if k == 0 {
            return Err(Error::invalid("samples must be at least 1"));
        }
        if k == 1 {
            let estimate = self.sample_from(y, seed, stream0, progress)?;
            return Ok(PosteriorStats {
                first_signal: estimate.signal.clone(),
                estimate,
                signal_std: None,
            });
        }
        let m = self.m;
        if !y.len().is_multiple_of(m) {
            return Err(Error::shape(format!(
                "measurement has {} values, not a multiple of the {m} values per item",
                y.len()
            )));
        }
        let mut ys = Vec::with_capacity(y.len() * k);
        for yi in y.chunks_exact(m) {
            for _ in 0..k {
                ys.extend_from_slice(yi);
            }
        }
        let post = self.sample_from(&ys, seed, stream0, progress)?;
        let (signal, signal_std) = group_stats(&post.signal, k);
        let (noise, _) = group_stats(&post.noise, k);
        let [_, c, h, w] = post.signal.shape;
        let l = c * h * w;
        let items = post.signal.shape[0] / k;
        let mut first_signal = Tensor::zeros([items, c, h, w]);
        for i in 0..items {
            first_signal
                .item_mut(i)
                .copy_from_slice(&post.signal.data[i * k * l..(i * k + 1) * l]);
        }
        Ok(PosteriorStats {
            estimate: Posterior { signal, noise },
            signal_std: Some(signal_std),
            first_signal,
        })
    }
}

/// Mean and population standard deviation over groups of `k` consecutive batch items (in f64).
pub fn group_stats(t: &Tensor, k: usize) -> (Tensor, Tensor) {
    let [n, c, h, w] = t.shape;
    let items = n / k;
    let l = c * h * w;
    let mut mean = Tensor::zeros([items, c, h, w]);
    let mut std = Tensor::zeros([items, c, h, w]);
    for i in 0..items {
        for j in 0..l {
            let mut s = 0f64;
            for q in 0..k {
                s += t.data[(i * k + q) * l + j] as f64;
            }
            let mu = s / k as f64;
            let mut v = 0f64;
            for q in 0..k {
                let e = t.data[(i * k + q) * l + j] as f64 - mu;
                v += e * e;
            }
            mean.data[i * l + j] = mu as f32;
            std.data[i * l + j] = libm::sqrt(v / k as f64) as f32;
        }
    }
    (mean, std)
}
