//! The joint posterior sampler of DESIGN §1: one reverse-time Euler–Maruyama loop over the signal `x` and
//! the structured noise `n`, with a data-consistency step that keeps `y = A x + alpha n`.
use crate::error::{Error, ErrorKind, Result};
use crate::operator::Operator;
use crate::prior::{Prior, Pullback};
use crate::rng::{purpose, Rng};
use crate::sde::{Sde, TimeGrid};
use crate::tensor::Tensor;
use alloc::format;
use alloc::vec;
use alloc::vec::Vec;

/// Runs two closures, possibly at the same time: the sampler evaluates the signal and the noise score
/// through it. Core has no threads; backends provide parallel implementations (e.g. rayon::join).
pub trait Join: Sync {
    fn join(&self, a: &mut (dyn FnMut() + Send), b: &mut (dyn FnMut() + Send));
}

/// Runs `a` then `b`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sequential;

impl Join for Sequential {
    fn join(&self, a: &mut (dyn FnMut() + Send), b: &mut (dyn FnMut() + Send)) {
        a();
        b();
    }
}

/// Per-step coefficients of the Euler–Maruyama predictor: `f dt`, `g^2 dt`, `g sqrt(dt)`.
#[derive(Clone, Copy)]
struct EmCoef {
    fdt: f32,
    g2dt: f32,
    gsq: f32,
}

/// Reverse-time Euler–Maruyama predictor on one item: `z̄ = z - [f z - g^2 s] dt` (kept in `zbar`),
/// `z = z̄ + g sqrt(dt) w`.
fn em_predict(z: &mut [f32], zbar: &mut [f32], score: &[f32], w: &[f32], c: EmCoef) {
    for (((zv, zb), &sv), &wv) in z.iter_mut().zip(zbar.iter_mut()).zip(score).zip(w) {
        let mean = *zv - (c.fdt * *zv - c.g2dt * sv);
        *zb = mean;
        *zv = mean + c.gsq * wv;
    }
}

/// After step `k` (0-based) of `total`: an error if the predictor mean went non-finite (at index `bad`),
/// or if the progress callback asks to stop.
fn end_of_step(
    k: usize,
    total: usize,
    t: f64,
    bad: Option<usize>,
    progress: &mut Progress<'_>,
) -> Result<()> {
    if let Some(pos) = bad {
        return Err(Error::non_finite(format!(
            "sampler diverged at step {} of {total} (t = {t:.4}): non-finite value at index {pos}; \
             try smaller lambda/mu or more steps",
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
fn clip(t: &mut Tensor, range: Option<[f32; 2]>) {
    if let Some([lo, hi]) = range {
        t.data.iter_mut().for_each(|v| *v = v.clamp(lo, hi));
    }
}

/// Data-consistency rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// `r = y_t - (A x + alpha n)`, `x += lambda A^T r`, `n += mu alpha r` (the default; forward passes only).
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
    /// The tuned weights (lambda, mu) of the method's code for this rule.
    pub fn default_weights(self) -> (f64, f64) {
        match self {
            Rule::Projection => (0.5, 0.5),
            Rule::Dps => (12.7, 16.7),
            Rule::Pigdm => (0.93, 0.88),
        }
    }
}

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

/// Joint posterior sampler over a signal prior and a noise prior (generic over [`Prior`]).
pub struct JointSampler<'a> {
    pub config: SamplerConfig,
    pub operator: &'a Operator,
    pub signal: &'a dyn Prior,
    pub noise: &'a dyn Prior,
    /// Per-item shape of the signal `[C, H, W]`.
    pub signal_shape: [usize; 3],
    /// Per-item shape of the noise; its size is the operator's `m`.
    pub noise_shape: [usize; 3],
    /// How the two score evaluations of a step run (sequentially, or in parallel; results are the same).
    pub join: &'a dyn Join,
}

/// Progress callback: `(steps done, total)`; return `false` to cancel.
pub type Progress<'p> = dyn FnMut(usize, usize) -> bool + 'p;

impl<'a> JointSampler<'a> {
    /// Samples `p(x, n | y)` once per measurement. `y` holds `N` items of `m` values each.
    /// Item `i` draws all its randomness from stream `i` of `seed`, so results do not depend on batching.
    pub fn sample(&self, y: &[f32], seed: u64, progress: &mut Progress<'_>) -> Result<Posterior> {
        let cfg = &self.config;
        cfg.validate()?;
        let d: usize = self.signal_shape.iter().product();
        let m = self.operator.out_len(d)?;
        let mn: usize = self.noise_shape.iter().product();
        if mn != m {
            return Err(Error::shape(format!(
                "noise shape {:?} has {mn} values but the operator gives {m} measurements",
                self.noise_shape
            )));
        }
        if d == 0 || m == 0 {
            return Err(Error::shape("empty signal or measurement"));
        }
        if y.is_empty() || y.len() % m != 0 {
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
        for (what, p, shape) in [
            ("signal", self.signal, self.signal_shape),
            ("noise", self.noise, self.noise_shape),
        ] {
            if let Some(s) = p.item_shape() {
                if s != shape {
                    return Err(Error::shape(format!(
                        "the {what} model expects items of shape {s:?} (C, H, W) but the data has {shape:?}"
                    )));
                }
            }
        }
        let items = y.len() / m;
        let grid = TimeGrid::new(cfg.steps, cfg.eps)?;
        let sde = cfg.sde;
        let [c, h, w] = self.signal_shape;
        let [nc, nh, nw] = self.noise_shape;
        let mut x = Tensor::zeros([items, c, h, w]);
        let mut n = Tensor::zeros([items, nc, nh, nw]);
        let mut xbar = x.clone();
        let mut nbar = n.clone();
        let mut rngs: Vec<Rng> = (0..items)
            .map(|i| Rng::stream(seed, purpose::SAMPLER, i as u64))
            .collect();
        let ps = sde.prior_std() as f32;
        for (i, rng) in rngs.iter_mut().enumerate() {
            rng.fill_normal(x.item_mut(i));
            rng.fill_normal(n.item_mut(i));
        }
        x.data
            .iter_mut()
            .chain(n.data.iter_mut())
            .for_each(|v| *v *= ps);

        let (mut wx, mut wn, mut xi) = (vec![0f32; d], vec![0f32; m], vec![0f32; m]);
        let (mut ax, mut atr, mut r) = (vec![0f32; m], vec![0f32; d], vec![0f32; m]);
        // pigdm solves with A A^T + alpha^2 I every step: factor it once
        let gram = match cfg.rule {
            Rule::Pigdm => Some(GramSolver::new(self.operator, d, cfg.alpha * cfg.alpha)?),
            _ => None,
        };
        let dt = grid.dt;
        let total = grid.ts.len();
        for (k, &t) in grid.ts.iter().enumerate() {
            // dps / pigdm keep each network's forward pass for the VJP at the same point
            let taped = cfg.rule != Rule::Projection;
            let (mut sx, mut sn) = (None, None);
            {
                let (xr, nr) = (&x, &n);
                let eval = |p: &'a dyn Prior, z: &Tensor| {
                    if taped {
                        p.score_with_pullback(z, t, &sde).map(|(s, b)| (s, Some(b)))
                    } else {
                        p.score(z, t, &sde).map(|s| (s, None))
                    }
                };
                self.join
                    .join(&mut || sx = Some(eval(self.signal, xr)), &mut || {
                        sn = Some(eval(self.noise, nr))
                    });
            }
            let missing = || Error::invalid("score was not evaluated");
            let (sx, px) = sx.ok_or_else(missing)??;
            let (sn, pn) = sn.ok_or_else(missing)??;
            let (f, g, a, s) = (sde.drift(t), sde.g(t), sde.a(t), sde.s(t));
            // dps / pigdm: the consistency step is a VJP through Tweedie's estimates at the current x, n
            let guidance = match (cfg.rule, px, pn) {
                (Rule::Projection, _, _) => None,
                (rule, Some(px), Some(pn)) => {
                    Some(self.guidance(rule, y, &x, &n, &sx, &sn, t, &gram, [px, pn])?)
                }
                _ => return Err(Error::invalid("score VJP was not prepared")),
            };
            let g2dt = (g * g * dt) as f32;
            let fdt = (f * dt) as f32;
            let gsq = (g * libm::sqrt(dt)) as f32;
            let (a32, s32) = (a as f32, s as f32);
            let (lam, mu, alpha) = (cfg.lambda as f32, cfg.mu as f32, cfg.alpha as f32);
            for (i, rng) in rngs.iter_mut().enumerate() {
                rng.fill_normal(&mut wx);
                rng.fill_normal(&mut wn);
                rng.fill_normal(&mut xi);
                let coef = EmCoef { fdt, g2dt, gsq };
                em_predict(x.item_mut(i), xbar.item_mut(i), sx.item(i), &wx, coef);
                em_predict(n.item_mut(i), nbar.item_mut(i), sn.item(i), &wn, coef);
                // data consistency
                match cfg.rule {
                    Rule::Projection => {
                        let yi = &y[i * m..(i + 1) * m];
                        self.operator.apply(x.item(i), &mut ax);
                        let ns = n.item(i);
                        for j in 0..m {
                            r[j] = (a32 * yi[j] + s32 * xi[j]) - (ax[j] + alpha * ns[j]);
                        }
                        self.operator.adjoint(&r, &mut atr);
                        x.item_mut(i)
                            .iter_mut()
                            .zip(&atr)
                            .for_each(|(v, q)| *v += lam * q);
                        n.item_mut(i)
                            .iter_mut()
                            .zip(&r)
                            .for_each(|(v, q)| *v += mu * alpha * q);
                    }
                    Rule::Dps | Rule::Pigdm => {
                        if let Some((gx, gn)) = &guidance {
                            x.item_mut(i)
                                .iter_mut()
                                .zip(gx.item(i))
                                .for_each(|(v, q)| *v += lam * q);
                            n.item_mut(i)
                                .iter_mut()
                                .zip(gn.item(i))
                                .for_each(|(v, q)| *v += mu * q);
                        }
                    }
                }
            }
            // the state after the consistency step feeds the next network call: check it too
            let bad = [&xbar, &nbar, &x, &n]
                .iter()
                .find_map(|v| v.first_non_finite());
            end_of_step(k, total, t, bad, progress)?;
        }
        clip(&mut xbar, cfg.clip);
        Ok(Posterior {
            signal: xbar,
            noise: nbar,
        })
    }
}

/// Solves `(A A^T + alpha^2 I) v = rho`: elementwise for identity, scale and mask operators, by a Cholesky
/// factorisation (computed once) for a dense matrix.
pub struct GramSolver {
    /// Diagonal of `A A^T + alpha^2 I` (diagonal operators) or its lower Cholesky factor (`m x m`).
    diag: Option<Vec<f64>>,
    chol: Option<(usize, Vec<f64>)>,
}

impl GramSolver {
    pub fn new(op: &Operator, d: usize, alpha2: f64) -> Result<Self> {
        let m = op.out_len(d)?;
        match op {
            Operator::Identity => Ok(GramSolver { diag: Some(vec![1.0 + alpha2; m]), chol: None }),
            Operator::Scale(b) => Ok(GramSolver { diag: Some(vec![(*b as f64) * (*b as f64) + alpha2; m]), chol: None }),
            Operator::Mask(mk) => Ok(GramSolver {
                diag: Some(mk.iter().map(|&v| (v as f64) * (v as f64) + alpha2).collect()),
                chol: None,
            }),
            Operator::Matrix { m, d, a } => {
                let (m, d) = (*m, *d);
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
                // in-place Cholesky, lower triangle
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
                Ok(GramSolver { diag: None, chol: Some((m, g)) })
            }
        }
        .and_then(|gs: GramSolver| {
            if let Some(dg) = &gs.diag {
                if dg.iter().any(|&v| v <= 0.0) {
                    return Err(Error::invalid("A A^T + alpha^2 I is singular (alpha = 0 and a zero in A?)"));
                }
            }
            Ok(gs)
        })
    }

    pub fn solve(&self, rho: &[f32], out: &mut [f32]) {
        if let Some(dg) = &self.diag {
            for ((o, r), q) in out.iter_mut().zip(rho).zip(dg) {
                *o = (*r as f64 / q) as f32;
            }
        } else if let Some((m, l)) = &self.chol {
            let m = *m;
            let mut z = vec![0f64; m];
            for i in 0..m {
                let mut acc = rho[i] as f64;
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
            for (o, v) in out.iter_mut().zip(&z) {
                *o = *v as f32;
            }
        }
    }
}

impl JointSampler<'_> {
    /// The dps / pigdm consistency terms for every item: `(dx, dn)` to be added as `x += lambda dx`,
    /// `n += mu dn` after the predictor. Computed at the current `x`, `n` (where the scores `sx`, `sn` are).
    #[allow(clippy::too_many_arguments)]
    fn guidance(
        &self,
        rule: Rule,
        y: &[f32],
        x: &Tensor,
        n: &Tensor,
        sx: &Tensor,
        sn: &Tensor,
        t: f64,
        gram: &Option<GramSolver>,
        [px, pn]: [Pullback<'_>; 2],
    ) -> Result<(Tensor, Tensor)> {
        let sde = self.config.sde;
        let (a, s) = (sde.a(t), sde.s(t));
        let (a32, s2) = (a as f32, (s * s) as f32);
        let alpha = self.config.alpha as f32;
        let items = x.shape[0];
        let m = n.item_len();
        // Tweedie: z0 = (z + s^2 score) / a
        let tweedie = |z: &Tensor, sc: &Tensor| Tensor {
            shape: z.shape,
            data: z
                .data
                .iter()
                .zip(&sc.data)
                .map(|(v, q)| (v + s2 * q) / a32)
                .collect(),
        };
        let (x0, n0) = (tweedie(x, sx), tweedie(n, sn));
        let mut ux = Tensor::zeros(x.shape);
        let mut un = Tensor::zeros(n.shape);
        let (mut ax, mut rho, mut v) = (vec![0f32; m], vec![0f32; m], vec![0f32; m]);
        // pigdm in the VE variable z = x / a (noise level s / a): r2 = (s/a)^2 / ((s/a)^2 + 1), and the step in
        // z, mapped back to x, gains a^2 (both reduce to DESIGN's form where a = 1)
        let r2 = (s * s / (s * s + a * a)) as f32;
        let pigdm_scale = a32 * a32 * r2;
        for i in 0..items {
            self.operator.apply(x0.item(i), &mut ax);
            let yi = &y[i * m..(i + 1) * m];
            for j in 0..m {
                rho[j] = yi[j] - (ax[j] + alpha * n0.item(i)[j]);
            }
            match rule {
                Rule::Dps => {
                    // grad of ||rho||: -(J^T A^T rho) / ||rho||; the update subtracts lambda * grad, taken
                    // in the VE variable z = x / a as pigdm's (a gradient step in z is a^2 times one in x;
                    // DESIGN's form where a = 1)
                    let norm =
                        libm::sqrt(rho.iter().map(|&q| q as f64 * q as f64).sum::<f64>()) as f32;
                    let inv = if norm > 0.0 { a32 * a32 / norm } else { 0.0 };
                    v.iter_mut().zip(&rho).for_each(|(o, q)| *o = q * inv);
                    self.operator.adjoint(&v, ux.item_mut(i));
                    un.item_mut(i)
                        .iter_mut()
                        .zip(&v)
                        .for_each(|(o, q)| *o = alpha * q);
                }
                _ => {
                    // v = (r2 (A A^T + alpha^2 I))^-1 rho; x gets a^2 r2 A^T v, n gets a^2 r2 alpha v
                    let gs = gram
                        .as_ref()
                        .ok_or_else(|| Error::invalid("pigdm without a factorised operator"))?;
                    gs.solve(&rho, &mut v);
                    v.iter_mut().for_each(|q| *q /= r2);
                    self.operator.adjoint(&v, ux.item_mut(i));
                    ux.item_mut(i).iter_mut().for_each(|q| *q *= pigdm_scale);
                    un.item_mut(i)
                        .iter_mut()
                        .zip(&v)
                        .for_each(|(o, q)| *o = pigdm_scale * alpha * q);
                }
            }
        }
        // J_z0^T u = (u + s^2 J_score^T u) / a: one VJP of each score network, run through `join`
        let (mut jx, mut jn) = (None, None);
        {
            let (uxr, unr) = (&ux, &un);
            let (mut px, mut pn) = (Some(px), Some(pn));
            self.join
                .join(&mut || jx = px.take().map(|p| p(uxr)), &mut || {
                    jn = pn.take().map(|p| p(unr))
                });
        }
        let missing = || Error::invalid("score VJP was not evaluated");
        let (jx, jn) = (jx.ok_or_else(missing)??, jn.ok_or_else(missing)??);
        let combine = |u: &Tensor, j: &Tensor| Tensor {
            shape: u.shape,
            data: u
                .data
                .iter()
                .zip(&j.data)
                .map(|(p, q)| (p + s2 * q) / a32)
                .collect(),
        };
        Ok((combine(&ux, &jx), combine(&un, &jn)))
    }
}

/// Unconditional samples of one prior: the reverse-time Euler–Maruyama loop without data consistency.
/// Returns the predictor mean of the last step, `items` samples of shape `item` (`[C, H, W]`).
pub fn sample_prior(
    prior: &dyn Prior,
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
    let [c, h, w] = item;
    let mut x = Tensor::zeros([items, c, h, w]);
    let mut xbar = x.clone();
    let mut rngs: Vec<Rng> = (0..items)
        .map(|i| Rng::stream(seed, purpose::SAMPLER, i as u64))
        .collect();
    let ps = sde.prior_std() as f32;
    for (i, rng) in rngs.iter_mut().enumerate() {
        rng.fill_normal(x.item_mut(i));
    }
    x.data.iter_mut().for_each(|v| *v *= ps);
    let d = c * h * w;
    let mut wx = vec![0f32; d];
    let total = grid.ts.len();
    for (k, &t) in grid.ts.iter().enumerate() {
        let sx = prior.score(&x, t, &sde)?;
        let (f, g) = (sde.drift(t), sde.g(t));
        let g2dt = (g * g * grid.dt) as f32;
        let fdt = (f * grid.dt) as f32;
        let gsq = (g * libm::sqrt(grid.dt)) as f32;
        for (i, rng) in rngs.iter_mut().enumerate() {
            rng.fill_normal(&mut wx);
            let coef = EmCoef { fdt, g2dt, gsq };
            em_predict(x.item_mut(i), xbar.item_mut(i), sx.item(i), &wx, coef);
        }
        end_of_step(k, total, t, xbar.first_non_finite(), progress)?;
    }
    clip(&mut xbar, config.clip);
    Ok(xbar)
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

impl JointSampler<'_> {
    /// `k` posterior samples per measurement. Measurement `i`'s sample `j` is batch item `i*k + j` and so
    /// uses RNG stream `i*k + j`; for `k == 1` this is exactly [`JointSampler::sample`].
    pub fn sample_k(
        &self,
        y: &[f32],
        k: usize,
        seed: u64,
        progress: &mut Progress<'_>,
    ) -> Result<PosteriorStats> {
        if k == 0 {
            return Err(Error::invalid("samples must be at least 1"));
        }
        if k == 1 {
            let estimate = self.sample(y, seed, progress)?;
            return Ok(PosteriorStats {
                first_signal: estimate.signal.clone(),
                estimate,
                signal_std: None,
            });
        }
        let d: usize = self.signal_shape.iter().product();
        let m = self.operator.out_len(d)?;
        if m == 0 || y.len() % m != 0 {
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
        let post = self.sample(&ys, seed, progress)?;
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
