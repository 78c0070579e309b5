//! Statistical oracles for the SDEs and the joint posterior sampler.
//!
//! * forward diffusion simulated by fine Euler–Maruyama matches the closed-form marginal moments;
//! * the reverse-time loop with an exact Gaussian score (no data consistency) returns the prior;
//! * with standard-normal priors on x and n (invariant under the VP SDE) and lambda = mu, the projection
//!   sampler's empirical posterior mean and variance match the closed-form Gaussian posterior of
//!   `y = A x + alpha n` for identity, scale, mask and dense operators.
//!
//! Tolerances are stated per check: `k` standard errors of the estimate plus an allowance for the
//! time discretisation (600 steps), which the tests print next to the measured error.
#![allow(clippy::too_many_arguments, clippy::type_complexity)]

use jointdiff_core::operator::Operator;
use jointdiff_core::prior::{BackendGaussian, GaussianPrior, Prior};
use jointdiff_core::rng::Rng;
use jointdiff_core::sampler::{JointSampler, Rule, SamplerConfig};
use jointdiff_core::sde::Sde;
use jointdiff_core::{Backend, RefBackend};

/// The samplers here run on the reference backend (plain loops, the oracle).
const B: RefBackend = RefBackend;

fn moments(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    (m, v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / n)
}

#[test]
fn forward_diffusion_matches_closed_form_moments() {
    let particles = 20_000;
    let steps = 2_000;
    let x0 = 0.7;
    for sde in [Sde::vp_default(), Sde::ve_default(), Sde::simple_default()] {
        for &t_end in &[0.3, 1.0] {
            let mut rng = Rng::stream(11, 0, 0);
            let dt = t_end / steps as f64;
            let mut xs = vec![x0; particles];
            for k in 0..steps {
                let t = k as f64 * dt;
                let (f, g) = (sde.drift(t), sde.g(t));
                for x in xs.iter_mut() {
                    *x += f * *x * dt + g * dt.sqrt() * rng.normal();
                }
            }
            let (m, v) = moments(&xs);
            let want_m = sde.a(t_end) * x0;
            let s0 = sde.s(0.0);
            // VE's s(0) = sigma_min is not 0: the variance gained from t = 0 is s(t)^2 - s(0)^2.
            let want_v = sde.s(t_end).powi(2) - s0 * s0;
            let se_m = (want_v / particles as f64).sqrt();
            let se_v = want_v * (2.0 / particles as f64).sqrt();
            println!(
                "{} t={t_end}: mean {m:.4} vs {want_m:.4}, var {v:.4} vs {want_v:.4}",
                sde.name()
            );
            assert!(
                (m - want_m).abs() < 4.0 * se_m + 1e-3 * want_m.abs(),
                "{sde:?} mean"
            );
            // 4 SE plus 1% for the Euler–Maruyama discretisation
            assert!(
                (v - want_v).abs() < 4.0 * se_v + 0.01 * want_v,
                "{sde:?} var {v} vs {want_v}"
            );
        }
    }
}

fn run(
    sde: Sde,
    op: &Operator,
    d: usize,
    m: usize,
    x_prior: &GaussianPrior,
    n_prior: &GaussianPrior,
    y: &[f32],
    alpha: f64,
    lm: f64,
    items: usize,
) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let config = SamplerConfig {
        sde,
        steps: 600,
        eps: 1e-3,
        rule: Rule::Projection,
        lambda: lm,
        mu: lm,
        alpha,
        clip: None,
    };
    let (xg, ng) = (
        x_prior.on(&B, [1, 1, d]).unwrap(),
        n_prior.on(&B, [1, 1, m]).unwrap(),
    );
    let sampler = JointSampler::new(&B, config, op, None, &xg, &ng, [1, 1, d], [1, 1, m]).unwrap();
    let ys: Vec<f32> = (0..items).flat_map(|_| y.iter().copied()).collect();
    let post = sampler.sample(&ys, 42, &mut |_, _| true).unwrap();
    let xs = (0..d)
        .map(|j| (0..items).map(|i| post.signal.item(i)[j] as f64).collect())
        .collect();
    let ns = (0..m)
        .map(|j| (0..items).map(|i| post.noise.item(i)[j] as f64).collect())
        .collect();
    (xs, ns)
}

#[test]
fn reverse_loop_without_consistency_returns_the_prior() {
    // lambda = mu = 0: the sampler is the reverse-time SDE with the exact score of N(0.3, 0.25).
    let items = 20_000;
    let prior = GaussianPrior::new(vec![0.3], vec![0.25]).unwrap();
    for sde in [Sde::vp_default(), Sde::ve_default(), Sde::simple_default()] {
        let (xs, _) = run(
            sde,
            &Operator::Identity,
            1,
            1,
            &prior,
            &prior,
            &[0.0],
            1.0,
            0.0,
            items,
        );
        let (m, v) = moments(&xs[0]);
        let se_m = (0.25 / items as f64).sqrt();
        let se_v = 0.25 * (2.0 / items as f64).sqrt();
        println!("{}: mean {m:.4} vs 0.3, var {v:.4} vs 0.25", sde.name());
        assert!((m - 0.3).abs() < 4.0 * se_m + 0.005, "{sde:?} mean {m}");
        assert!(
            (v - 0.25).abs() < 4.0 * se_v + 0.02 * 0.25,
            "{sde:?} var {v}"
        );
    }
}

/// Closed-form posterior of `y = A x + alpha n`, x ~ N(mx, I_d), n ~ N(mn, I_m): (mean, var) of x and n.
fn gaussian_posterior(
    a: &[f64],
    d: usize,
    m: usize,
    alpha: f64,
    mx: f64,
    mn: f64,
    y: &[f64],
) -> ((Vec<f64>, Vec<f64>), (Vec<f64>, Vec<f64>)) {
    // S = A A^T + alpha^2 I (m x m), solved by Gauss–Jordan (small)
    let mut s = vec![0.0; m * m];
    for i in 0..m {
        for j in 0..m {
            s[i * m + j] = (0..d).map(|k| a[i * d + k] * a[j * d + k]).sum::<f64>();
        }
        s[i * m + i] += alpha * alpha;
    }
    let inv = invert(&s, m);
    let resid: Vec<f64> = (0..m)
        .map(|i| y[i] - (0..d).map(|k| a[i * d + k] * mx).sum::<f64>() - alpha * mn)
        .collect();
    let sr: Vec<f64> = (0..m)
        .map(|i| (0..m).map(|j| inv[i * m + j] * resid[j]).sum())
        .collect();
    let x_mean: Vec<f64> = (0..d)
        .map(|k| mx + (0..m).map(|i| a[i * d + k] * sr[i]).sum::<f64>())
        .collect();
    let x_var: Vec<f64> = (0..d)
        .map(|k| {
            1.0 - (0..m)
                .map(|i| {
                    (0..m)
                        .map(|j| a[i * d + k] * inv[i * m + j] * a[j * d + k])
                        .sum::<f64>()
                })
                .sum::<f64>()
        })
        .collect();
    let n_mean: Vec<f64> = (0..m).map(|i| mn + alpha * sr[i]).collect();
    let n_var: Vec<f64> = (0..m)
        .map(|i| 1.0 - alpha * alpha * inv[i * m + i])
        .collect();
    ((x_mean, x_var), (n_mean, n_var))
}

fn invert(s: &[f64], m: usize) -> Vec<f64> {
    let mut a = s.to_vec();
    let mut inv = vec![0.0; m * m];
    for i in 0..m {
        inv[i * m + i] = 1.0;
    }
    for c in 0..m {
        let p = a[c * m + c];
        for j in 0..m {
            a[c * m + j] /= p;
            inv[c * m + j] /= p;
        }
        for r in 0..m {
            if r != c {
                let f = a[r * m + c];
                for j in 0..m {
                    a[r * m + j] -= f * a[c * m + j];
                    inv[r * m + j] -= f * inv[c * m + j];
                }
            }
        }
    }
    inv
}

#[test]
fn projection_sampler_matches_gaussian_posterior() {
    let items = 20_000;
    let (mx, mn) = (0.2, -0.1);
    let x_prior = GaussianPrior::new(vec![mx as f32], vec![1.0]).unwrap();
    let n_prior = GaussianPrior::new(vec![mn as f32], vec![1.0]).unwrap();
    let mut rng = Rng::stream(5, 0, 0);
    let dense: Vec<f32> = (0..2 * 3)
        .map(|_| (rng.normal() / 2f64.sqrt()) as f32)
        .collect();
    let cases: Vec<(&str, Operator, usize, usize, f64, f64, Vec<f32>)> = vec![
        (
            "identity",
            Operator::Identity,
            2,
            2,
            1.0,
            0.5,
            vec![1.0, -0.5],
        ),
        (
            "scale",
            Operator::Scale(0.5),
            2,
            2,
            1.0,
            0.5,
            vec![0.8, 0.1],
        ),
        (
            "mask",
            Operator::Mask(vec![1.0, 0.0]),
            2,
            2,
            0.5,
            0.5,
            vec![0.6, 0.3],
        ),
        (
            "matrix",
            Operator::Matrix {
                m: 2,
                d: 3,
                a: dense.clone(),
            },
            3,
            2,
            0.8,
            0.5,
            vec![0.7, -0.4],
        ),
    ];
    for (name, op, d, m, alpha, lm, y) in cases {
        let a: Vec<f64> = match &op {
            Operator::Identity => (0..d * d).map(|k| (k / d == k % d) as u8 as f64).collect(),
            Operator::Scale(b) => (0..d * d)
                .map(|k| if k / d == k % d { *b as f64 } else { 0.0 })
                .collect(),
            Operator::Mask(mk) => (0..d * d)
                .map(|k| {
                    if k / d == k % d {
                        mk[k / d] as f64
                    } else {
                        0.0
                    }
                })
                .collect(),
            Operator::Matrix { a, .. } => a.iter().map(|&v| v as f64).collect(),
        };
        let y64: Vec<f64> = y.iter().map(|&v| v as f64).collect();
        let ((xm, xv), (nm, nv)) = gaussian_posterior(&a, d, m, alpha, mx, mn, &y64);
        let (xs, ns) = run(
            Sde::vp_default(),
            &op,
            d,
            m,
            &x_prior,
            &n_prior,
            &y,
            alpha,
            lm,
            items,
        );
        for (what, samples, means, vars) in [("x", &xs, &xm, &xv), ("n", &ns, &nm, &nv)] {
            for j in 0..samples.len() {
                let (em, ev) = moments(&samples[j]);
                let se_m = (vars[j] / items as f64).sqrt();
                let se_v = vars[j] * (2.0 / items as f64).sqrt();
                println!(
                    "{name} {what}[{j}]: mean {em:+.4} vs {:+.4} (SE {se_m:.4}), var {ev:.4} vs {:.4} (SE {se_v:.4})",
                    means[j], vars[j]
                );
                // Stated tolerance: 4 standard errors + 0.01 on the mean; 4 standard errors + 3% + 0.005 on
                // the variance (the time discretisation biases the variance by about 1% at 600 steps, and
                // a value the measurement fixes exactly keeps a residual variance of about 0.002 because
                // the projection with mu alpha^2 < 1 is soft).
                assert!(
                    (em - means[j]).abs() < 4.0 * se_m + 0.01,
                    "{name} {what}[{j}] mean"
                );
                assert!(
                    (ev - vars[j]).abs() < 4.0 * se_v + 0.03 * vars[j] + 0.005,
                    "{name} {what}[{j}] var"
                );
            }
        }
    }
}

/// The gradient rules with analytic Gaussian priors (whose score VJP is exact): their estimates must pull the
/// prior towards the closed-form posterior. These rules are approximations of p(y | x_t) (DESIGN §1), so
/// they are held to the posterior mean within a stated bias allowance rather than to exact moments; the
/// measured values are printed.
#[test]
fn gradient_rules_move_towards_the_gaussian_posterior() {
    let items = 4_000;
    let x_prior = GaussianPrior::new(vec![0.0], vec![1.0]).unwrap();
    let n_prior = GaussianPrior::new(vec![0.0], vec![1.0]).unwrap();
    let mut rng = Rng::stream(6, 0, 0);
    let dense: Vec<f32> = (0..2 * 3)
        .map(|_| (rng.normal() / 2f64.sqrt()) as f32)
        .collect();
    let cases: Vec<(&str, Operator, usize, usize, Vec<f32>)> = vec![
        ("identity", Operator::Identity, 2, 2, vec![1.2, -0.8]),
        (
            "matrix",
            Operator::Matrix {
                m: 2,
                d: 3,
                a: dense.clone(),
            },
            3,
            2,
            vec![1.0, -0.6],
        ),
    ];
    for rule in [Rule::Dps, Rule::Pigdm] {
        let (lam, mu) = rule.default_weights();
        for (name, op, d, m, y) in &cases {
            let a: Vec<f64> = match op {
                Operator::Matrix { a, .. } => a.iter().map(|&v| v as f64).collect(),
                _ => (0..d * d).map(|k| (k / d == k % d) as u8 as f64).collect(),
            };
            let alpha = 1.0;
            let y64: Vec<f64> = y.iter().map(|&v| v as f64).collect();
            let ((xm, xv), _) = gaussian_posterior(&a, *d, *m, alpha, 0.0, 0.0, &y64);
            let config = SamplerConfig {
                sde: Sde::vp_default(),
                steps: 300,
                eps: 1e-3,
                rule,
                lambda: lam,
                mu,
                alpha,
                clip: None,
            };
            let (xg, ng) = (
                x_prior.on(&B, [1, 1, *d]).unwrap(),
                n_prior.on(&B, [1, 1, *m]).unwrap(),
            );
            let sampler =
                JointSampler::new(&B, config, op, None, &xg, &ng, [1, 1, *d], [1, 1, *m]).unwrap();
            let ys: Vec<f32> = (0..items).flat_map(|_| y.iter().copied()).collect();
            let post = sampler.sample(&ys, 3, &mut |_, _| true).unwrap();
            for j in 0..*d {
                let v: Vec<f64> = (0..items).map(|i| post.signal.item(i)[j] as f64).collect();
                let (em, ev) = moments(&v);
                println!(
                    "{rule:?} {name} x[{j}]: mean {em:+.4} vs posterior {:+.4} (prior 0), var {ev:.4} vs {:.4}",
                    xm[j], xv[j]
                );
                let se = (ev / items as f64).sqrt();
                match rule {
                    // PiGDM with an exact score VJP is close to the posterior here: mean within 4 SE + 0.03,
                    // variance within 15% (measured: <= 0.02 off on the means, variances within 6%).
                    Rule::Pigdm => {
                        assert!(
                            (em - xm[j]).abs() < 4.0 * se + 0.03,
                            "{name} pigdm mean x[{j}]"
                        );
                        assert!((ev - xv[j]).abs() < 0.15 * xv[j], "{name} pigdm var x[{j}]");
                    }
                    // DPS with the image-tuned step (lambda 12.7) overshoots on a 2-3 value problem (variance
                    // about 20x the posterior's) but its mean must still move from the prior (0) to the
                    // posterior mean: closer to it than half the distance, with 4 SE of slack.
                    _ => {
                        if xm[j].abs() > 0.2 {
                            assert!(
                                (em - xm[j]).abs() < 0.5 * xm[j].abs() + 4.0 * se,
                                "{name} dps mean x[{j}]"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// A small NCSNv2 trained by denoising score matching on a toy distribution whose diffused score is known
/// in closed form (i.i.d. Gaussian pixels x ~ N(0.5, 0.2^2) under the VP SDE: score(z) = -(z - a mu) /
/// (a^2 sigma^2 + s^2)) learns a score close to it: relative L2 error at t = 0.3, 0.6, 0.9 far below the
/// error of the zero score (1.0) and of the untrained network.
#[test]
fn training_learns_a_closed_form_score() {
    use jointdiff_core::ncsnv2::Ncsnv2Config;
    use jointdiff_core::tensor::Tensor;
    use jointdiff_core::train::{train_step, TrainConfig, TrainState};
    use jointdiff_cpu::CpuBackend;
    let b = CpuBackend;
    let (mu, sigma, size) = (0.5f64, 0.2f64, 8usize);
    let mut data = Tensor::zeros([512, 1, size, size]);
    let mut r = Rng::stream(21, 0, 0);
    data.data
        .iter_mut()
        .for_each(|v| *v = (mu + sigma * r.normal()) as f32);
    let cfg = TrainConfig {
        batch: 32,
        lr: 2e-3,
        warmup: 20,
        grad_clip: 10.0,
        ema: 0.95,
        seed: 4,
        ..TrainConfig::default()
    };
    let mut st = TrainState::init(
        Ncsnv2Config {
            channels: 1,
            ngf: 8,
            input_map: true,
        },
        2,
    )
    .unwrap();
    let sde = cfg.sde;
    let score_error = |st: &TrainState| -> Vec<f64> {
        let net = st.ema_network(&b).unwrap();
        [0.3f64, 0.6, 0.9]
            .iter()
            .map(|&t| {
                let (a, s) = (sde.a(t), sde.s(t));
                let mut z = Tensor::zeros([64, 1, size, size]);
                let mut r = Rng::stream(22, 0, (t * 1000.0) as u64);
                let sd = (a * a * sigma * sigma + s * s).sqrt();
                z.data
                    .iter_mut()
                    .for_each(|v| *v = (a * mu + sd * r.normal()) as f32);
                let out = net.forward(&b, &z).unwrap();
                let (mut num, mut den) = (0.0, 0.0);
                for (&zv, &o) in z.data.iter().zip(&out.data) {
                    let truth = -(zv as f64 - a * mu) / (sd * sd);
                    let learned = o as f64 / s;
                    num += (learned - truth).powi(2);
                    den += truth * truth;
                }
                (num / den).sqrt()
            })
            .collect()
    };
    let before = score_error(&st);
    for _ in 0..300 {
        train_step(&b, &cfg, &mut st, &data).unwrap();
    }
    let after = score_error(&st);
    println!("relative score error at t = 0.3, 0.6, 0.9: before {before:.3?}, after {after:.3?}");
    for (bf, af) in before.iter().zip(&after) {
        assert!(*af < 0.35 && *af < 0.5 * bf, "score error {bf} -> {af}");
    }
}

/// A sequential sampler of `d`-dimensional signal and noise under the identity operator.
fn identity_sampler<'a>(
    config: SamplerConfig,
    x_prior: &'a BackendGaussian<RefBackend>,
    n_prior: &'a BackendGaussian<RefBackend>,
    d: usize,
) -> JointSampler<'a, RefBackend> {
    JointSampler::new(
        &B,
        config,
        &Operator::Identity,
        None,
        x_prior,
        n_prior,
        [1, 1, d],
        [1, 1, d],
    )
    .unwrap()
}

#[test]
fn sample_k_first_signal_is_the_single_sample_of_its_stream() {
    // Measurement i's sample j runs as batch item i*k + j with stream i*k + j, so `first_signal[i]` must be
    // item i*k of one plain run over the measurements each repeated k times, and the mean/std the k items'.
    let x_prior = GaussianPrior::new(vec![0.2, -0.1], vec![1.0, 0.5]).unwrap();
    let n_prior = GaussianPrior::new(vec![0.0, 0.3], vec![0.8, 1.0]).unwrap();
    let config = SamplerConfig {
        steps: 40,
        ..SamplerConfig::default()
    };
    let (xg, ng) = (
        x_prior.on(&B, [1, 1, 2]).unwrap(),
        n_prior.on(&B, [1, 1, 2]).unwrap(),
    );
    let sampler = identity_sampler(config, &xg, &ng, 2);
    let (k, y) = (3, [0.5f32, -0.4, 1.2, 0.1]);
    let stats = sampler.sample_k(&y, k, 7, &mut |_, _| true).unwrap();
    let rep: Vec<f32> = y
        .chunks(2)
        .flat_map(|c| (0..k).flat_map(|_| c.to_vec()))
        .collect();
    let each = sampler.sample(&rep, 7, &mut |_, _| true).unwrap().signal;
    let std = stats.signal_std.as_ref().unwrap();
    for i in 0..2 {
        assert_eq!(stats.first_signal.item(i), each.item(i * k), "first of {i}");
        for j in 0..2 {
            let v: Vec<f64> = (0..k).map(|q| each.item(i * k + q)[j] as f64).collect();
            let m = v.iter().sum::<f64>() / k as f64;
            let s = (v.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / k as f64).sqrt();
            assert!((stats.estimate.signal.item(i)[j] as f64 - m).abs() < 1e-6);
            assert!((std.item(i)[j] as f64 - s).abs() < 1e-6);
        }
        assert_ne!(each.item(i * k), each.item(i * k + 1), "samples differ");
    }
}

#[test]
fn divergence_is_an_error_naming_the_step_not_a_nan() {
    // A consistency weight far past stability: every step multiplies the residual by about -1e19, so
    // the state overflows within a few steps. The sampler must stop with its divergence error.
    let prior = GaussianPrior::new(vec![0.0], vec![1.0]).unwrap();
    let config = SamplerConfig {
        steps: 50,
        lambda: 1e19,
        mu: 1e19,
        ..SamplerConfig::default()
    };
    let g = prior.on(&B, [1, 1, 1]).unwrap();
    let sampler = identity_sampler(config, &g, &g, 1);
    let err = sampler.sample(&[0.5], 1, &mut |_, _| true).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("diverged at step")
            && msg
                .contains("rule projection, lambda 10000000000000000000, mu 10000000000000000000")
            && msg.contains("smaller consistency weights"),
        "{msg}"
    );
}

/// A unit Gaussian prior whose score is 10% too strong, as a trained network's score is off: the Jacobian
/// of Tweedie's estimate, `(I + s^2 J_score) / a`, is then about `-0.1 / a` near t = 1 instead of `a`.
struct MisScaled(BackendGaussian<RefBackend>);

type T = <RefBackend as Backend>::Tensor;

impl Prior<RefBackend> for MisScaled {
    fn score(&self, b: &RefBackend, z: &T, t: f64, sde: &Sde) -> jointdiff_core::Result<T> {
        Ok(b.mul_scalar(&self.0.score(b, z, t, sde)?, 1.1))
    }
    fn score_vjp(
        &self,
        b: &RefBackend,
        z: &T,
        t: f64,
        sde: &Sde,
        g: &T,
    ) -> jointdiff_core::Result<T> {
        Ok(b.mul_scalar(&self.0.score_vjp(b, z, t, sde, g)?, 1.1))
    }
}

/// pigdm under VP takes DESIGN's step in the VE variable `x / a` (docs/design-choices.md): its gain stays
/// bounded when the score is off. DESIGN's `a = 1` form applied to `x` itself has a gain of about
/// `lambda (0.1 / a)^2 / 2`, over 100 at t = 1: with that form put back, this test stops with "sampler
/// diverged at step 20 of 200 (t = 0.9046)". The samples must stay finite and near the posterior of the exact
/// priors (the 10% error moves it a little).
#[test]
fn pigdm_stays_stable_under_vp_with_a_mis_scaled_score() {
    let items = 2_000;
    let unit = || {
        GaussianPrior::new(vec![0.0], vec![1.0])
            .unwrap()
            .on(&B, [1, 1, 2])
            .unwrap()
    };
    let (xp, np) = (MisScaled(unit()), MisScaled(unit()));
    let y = [1.2f32, -0.8];
    let eye = [1.0, 0.0, 0.0, 1.0];
    let y64: Vec<f64> = y.iter().map(|&v| v as f64).collect();
    let ((xm, _), _) = gaussian_posterior(&eye, 2, 2, 1.0, 0.0, 0.0, &y64);
    let (lambda, mu) = Rule::Pigdm.default_weights();
    let config = SamplerConfig {
        sde: Sde::vp_default(),
        steps: 200,
        eps: 1e-3,
        rule: Rule::Pigdm,
        lambda,
        mu,
        alpha: 1.0,
        clip: None,
    };
    let sampler = JointSampler::new(
        &B,
        config,
        &Operator::Identity,
        None,
        &xp,
        &np,
        [1, 1, 2],
        [1, 1, 2],
    )
    .unwrap();
    let ys: Vec<f32> = (0..items).flat_map(|_| y.iter().copied()).collect();
    let post = sampler
        .sample(&ys, 4, &mut |_, _| true)
        .expect("pigdm must not diverge under VP");
    for (j, &want) in xm.iter().enumerate() {
        let v: Vec<f64> = (0..items).map(|i| post.signal.item(i)[j] as f64).collect();
        let (em, ev) = moments(&v);
        println!("mis-scaled pigdm x[{j}]: mean {em:+.4} vs posterior {want:+.4}, var {ev:.4}");
        assert!((em - want).abs() < 0.1, "pigdm mean x[{j}]: {em} vs {want}");
    }
}

#[test]
fn projection_with_a_large_operator_norm_stays_consistent() {
    // compressed sensing: A 40 x 80 with entries N(0, 1/40), ||A||^2 about (1 + sqrt 2)^2 = 5.8. With the
    // default weights lambda = mu = 0.5, the unnormalised step lambda ||A||^2 + mu alpha^2 is about 3.4 > 2
    // and the loop diverges; normalised by max(1, ||A||^2) it is a contraction.
    let (m, d) = (40, 80);
    let op = jointdiff_core::baselines::gaussian_matrix(m, d, 3).unwrap();
    let norm2 = op.norm2(d).unwrap();
    assert!(norm2 > 4.0, "{norm2}");
    let prior = GaussianPrior::new(vec![0.0], vec![1.0]).unwrap();
    let mut rng = Rng::stream(9, 0, 0);
    let x: Vec<f32> = (0..d).map(|_| rng.normal() as f32).collect();
    let mut y = vec![0f32; m];
    op.apply(&x, &mut y);
    y.iter_mut().for_each(|v| *v += 0.1 * rng.normal() as f32);
    let (lambda, mu) = Rule::Projection.default_weights();
    let config = SamplerConfig {
        sde: Sde::vp_default(),
        steps: 200,
        eps: 1e-3,
        rule: Rule::Projection,
        lambda,
        mu,
        alpha: 1.0,
        clip: None,
    };
    let (xg, ng) = (
        prior.on(&B, [1, 1, d]).unwrap(),
        prior.on(&B, [1, 1, m]).unwrap(),
    );
    let sampler = JointSampler::new(&B, config, &op, None, &xg, &ng, [1, 1, d], [1, 1, m]).unwrap();
    let post = sampler
        .sample(&y, 1, &mut |_, _| true)
        .expect("projection must not diverge on a large-norm operator");
    // the estimate explains the measurement: ||A x + n - y|| well below ||y||
    let mut ax = vec![0f32; m];
    op.apply(&post.signal.data, &mut ax);
    let res: f64 = (0..m)
        .map(|j| ((ax[j] + post.noise.data[j] - y[j]) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let ny: f64 = y.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
    println!("residual {res:.4}, ||y|| {ny:.4}, ||A||^2 {norm2:.3}");
    assert!(res < 0.3 * ny, "residual {res} vs ||y|| {ny}");
}
