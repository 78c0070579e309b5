//! The denoise job, planned once for every frontend (DESIGN §5): what the user asked for is a
//! [`DenoiseSpec`]; [`DenoiseSpec::plan`] makes every check and choice for a measurement shape (item shapes,
//! operator size, model fit, noise shape, SDE, rule weights, priors, pigdm's factorisation) and returns a
//! [`DenoisePlan`], which runs on any [`Backend`]. The CLI, the C API and the evaluation build the same spec;
//! none of them repeats a check, so the same options give the same answer and the same error text.
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::ModelFile;
use crate::ncsnv2::Ncsnv2;
use crate::noise;
use crate::operator::Operator;
use crate::prior::{GaussianPrior, NetworkPrior, Prior};
use crate::sampler::{GramInverse, JointSampler, PosteriorStats, Progress, Rule, SamplerConfig};
use crate::sde::Sde;
use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;

/// A score model and the name errors call it by (a path, `builtin:fashion`, "signal model").
#[derive(Debug, Clone)]
pub struct NetworkModel {
    pub file: Arc<ModelFile>,
    pub name: String,
}

/// Per-value Gaussian statistics of the signal (e.g. of its training data).
#[derive(Debug, Clone, PartialEq)]
pub struct GaussianStats {
    /// `[C, H, W]` of one item.
    pub item: [usize; 3],
    /// One item of means, one of variances.
    pub mean: Vec<f32>,
    pub var: Vec<f32>,
}

/// The prior of the signal.
#[derive(Debug, Clone)]
pub enum SignalPrior {
    Network(NetworkModel),
    Gaussian(GaussianStats),
}

/// The prior of the structured noise.
#[derive(Debug, Clone)]
pub enum NoisePrior {
    /// A noise score model: the joint method.
    Network(NetworkModel),
    /// White Gaussian `N(mean, std^2)`: the non-joint baseline.
    Gaussian { std: f64, mean: f64 },
    /// Gaussian with the method's sinusoidal per-row standard deviation, RMS `std`.
    Sine { std: f64 },
}

/// The default rule of a denoise job, chosen by measurement on the validation pairs (docs/results.md,
/// "How the defaults were chosen"): pigdm beat dps and projection at every step count.
pub const DEFAULT_RULE: Rule = Rule::Pigdm;
/// The default number of reverse-time steps (docs/results.md, "How the defaults were chosen"): at equal
/// cost, one sample of 400 steps scored 1.0 dB above the mean of two samples of 200 steps.
pub const DEFAULT_STEPS: usize = 400;
/// The default number of posterior samples per measurement (with two or more the estimate is their mean and
/// the per-value posterior std is there too).
pub const DEFAULT_SAMPLES: usize = 1;

/// Everything a denoise job is asked to do. `Default` is `jointdiff denoise`'s defaults with no prior set
/// yet; [`DenoiseSpec::new`] sets both priors.
#[derive(Debug, Clone)]
pub struct DenoiseSpec {
    pub signal: Option<SignalPrior>,
    pub noise: Option<NoisePrior>,
    pub operator: Operator,
    pub alpha: f64,
    pub rule: Rule,
    /// Consistency weights; `None`: the rule's tuned value ([`Rule::default_weights`]).
    pub lambda: Option<f64>,
    pub mu: Option<f64>,
    /// `None`: the models' SDE (they must agree), VP without a model.
    pub sde: Option<Sde>,
    pub steps: usize,
    pub eps: f64,
    /// Posterior samples per measurement (their mean is the estimate).
    pub samples: usize,
    /// Clip the signal estimate to the signal model's data range (`[0, 1]` without one).
    pub clip: bool,
    /// `[C, H, W]` of a signal item where the measurement does not tell it (a matrix operator).
    pub signal_shape: Option<[usize; 3]>,
}

impl Default for DenoiseSpec {
    /// The defaults: identity operator, alpha 1, [`DEFAULT_RULE`] with its tuned weights, the models' SDE,
    /// [`DEFAULT_STEPS`] steps, eps 1e-3, [`DEFAULT_SAMPLES`] samples, clipped output.
    fn default() -> Self {
        DenoiseSpec {
            signal: None,
            noise: None,
            operator: Operator::Identity,
            alpha: 1.0,
            rule: DEFAULT_RULE,
            lambda: None,
            mu: None,
            sde: None,
            steps: DEFAULT_STEPS,
            eps: 1e-3,
            samples: DEFAULT_SAMPLES,
            clip: true,
            signal_shape: None,
        }
    }
}

impl DenoiseSpec {
    /// The defaults with these priors.
    pub fn new(signal: SignalPrior, noise: NoisePrior) -> Self {
        DenoiseSpec {
            signal: Some(signal),
            noise: Some(noise),
            ..Self::default()
        }
    }

    fn signal_model(&self) -> Option<&NetworkModel> {
        match &self.signal {
            Some(SignalPrior::Network(m)) => Some(m),
            _ => None,
        }
    }
    fn noise_model(&self) -> Option<&NetworkModel> {
        match &self.noise {
            Some(NoisePrior::Network(m)) => Some(m),
            _ => None,
        }
    }

    /// Plans the job for measurements of shape `[N, C, H, W]`. For identity, scale and mask operators the
    /// signal items have the measurement's `C, H, W`; for a matrix operator the measurement is read as
    /// consecutive items of `m` values (any layout whose size is a multiple of `m`) and the signal item
    /// shape comes from [`DenoiseSpec::signal_shape`], the signal model or the signal statistics.
    pub fn plan(&self, measurement: [usize; 4]) -> Result<DenoisePlan> {
        let (spec_signal, spec_noise) =
            match (&self.signal, &self.noise) {
                (Some(s), Some(n)) => (s, n),
                (None, _) => {
                    return Err(Error::invalid(
                        "no signal prior: set a signal model or Gaussian signal statistics",
                    ))
                }
                (_, None) => return Err(Error::invalid(
                    "no noise prior: set a noise model or an analytic noise prior (Gaussian, sine)",
                )),
            };
        if self.samples == 0 {
            return Err(Error::invalid("samples must be at least 1"));
        }
        let total = crate::tensor::checked_numel(&measurement)?;
        if total == 0 {
            return Err(Error::shape(format!(
                "the measurement is empty (shape {measurement:?})"
            )));
        }
        let [n, c, h, w] = measurement;
        let is_matrix = matches!(self.operator, Operator::Matrix { .. });
        let signal_item = if !is_matrix {
            if let Some(s) = self.signal_shape {
                if s != [c, h, w] {
                    return Err(Error::shape(format!(
                        "signal shape {s:?} differs from the measurement items {:?}; with a {} operator \
                         the signal has the measurement's shape",
                        [c, h, w],
                        self.operator.name()
                    )));
                }
            }
            [c, h, w]
        } else if let Some(s) = self.signal_shape {
            s
        } else if let Some(nm) = self.signal_model() {
            recorded_item(nm, "signal")?
        } else if let SignalPrior::Gaussian(st) = spec_signal {
            st.item
        } else {
            return Err(Error::shape(
                "a matrix operator needs the signal shape C,H,W",
            ));
        };
        if signal_item.contains(&0) {
            return Err(Error::shape(format!(
                "signal shape {signal_item:?} is empty"
            )));
        }
        let d: usize = signal_item.iter().product();
        let m = self
            .operator
            .out_len(d)
            .map_err(|e| Error::new(e.kind, format!("operator: {}", e.message)))?;
        let items = if !is_matrix {
            n
        } else if total % m != 0 {
            return Err(Error::shape(format!(
                "measurement has {total} values, not a multiple of the {m} per item the operator gives"
            )));
        } else {
            total / m
        };
        if let Some(nm) = self.signal_model() {
            check_fit(nm, items, signal_item, "signal")?;
        }
        let noise_item = match self.noise_model() {
            Some(nm) => {
                let shape = if !is_matrix {
                    signal_item
                } else {
                    recorded_item(nm, "noise")?
                };
                if shape.iter().product::<usize>() != m {
                    return Err(Error::shape(format!(
                        "the noise model {} has items {shape:?}, not the {m} values of a measurement",
                        nm.name
                    )));
                }
                check_fit(nm, items, shape, "noise")?;
                shape
            }
            None if is_matrix => [1, 1, m],
            None => signal_item,
        };
        let sde = match (self.sde, self.signal_model(), self.noise_model()) {
            (Some(s), _, _) => s,
            (None, Some(s), Some(n)) if s.file.meta.sde != n.file.meta.sde => {
                return Err(Error::invalid(format!(
                    "the signal and noise models use different SDEs ({:?} vs {:?}); choose one",
                    s.file.meta.sde, n.file.meta.sde
                )))
            }
            (None, Some(s), _) => s.file.meta.sde,
            (None, None, Some(n)) => n.file.meta.sde,
            (None, None, None) => Sde::vp_default(),
        };
        let (l0, m0) = self.rule.default_weights();
        let data_range = self
            .signal_model()
            .map(|m| m.file.meta.data_range)
            .unwrap_or([0.0, 1.0]);
        let config = SamplerConfig {
            sde,
            steps: self.steps,
            eps: self.eps,
            rule: self.rule,
            lambda: self.lambda.unwrap_or(l0),
            mu: self.mu.unwrap_or(m0),
            alpha: self.alpha,
            clip: self.clip.then_some(data_range),
        };
        config.validate()?;
        let signal = match spec_signal {
            SignalPrior::Network(nm) => Planned::Network(nm.clone()),
            SignalPrior::Gaussian(st) => {
                if st.item != signal_item || st.mean.len() != d || st.var.len() != d {
                    return Err(Error::shape(format!(
                        "signal statistics are for items {:?} ({} means, {} variances) but a signal item \
                         is {signal_item:?}",
                        st.item,
                        st.mean.len(),
                        st.var.len()
                    )));
                }
                Planned::Gaussian(GaussianPrior::new(st.mean.clone(), st.var.clone())?)
            }
        };
        let noise = match spec_noise {
            NoisePrior::Network(nm) => Planned::Network(nm.clone()),
            NoisePrior::Gaussian { std, mean } => {
                if !mean.is_finite() {
                    return Err(Error::invalid(format!(
                        "Gaussian noise mean must be finite, got {mean}"
                    )));
                }
                Planned::Gaussian(GaussianPrior::isotropic(*mean as f32, *std as f32)?)
            }
            NoisePrior::Sine { std } => {
                let sd = noise::sine_std(noise_item, *std)?;
                Planned::Gaussian(GaussianPrior::new(
                    alloc::vec![0.0],
                    sd.iter().map(|v| v * v).collect(),
                )?)
            }
        };
        let gram = match self.rule {
            Rule::Pigdm => Some(GramInverse::new(
                &self.operator,
                d,
                self.alpha * self.alpha,
            )?),
            _ => None,
        };
        Ok(DenoisePlan {
            items,
            signal_item,
            noise_item,
            config,
            samples: self.samples,
            data_range,
            operator: self.operator.clone(),
            signal,
            noise,
            gram,
        })
    }
}

/// The item shape a model records (`[C, H, W]` it was trained at), needed where the measurement does not
/// tell the shape (a matrix operator).
fn recorded_item(nm: &NetworkModel, what: &str) -> Result<[usize; 3]> {
    let [h, w] = nm.file.meta.image_size;
    if h == 0 {
        let hint = if what == "signal" {
            "; give the signal shape C,H,W"
        } else {
            ""
        };
        return Err(Error::shape(format!(
            "the {what} model {} does not record its image size{hint}",
            nm.name
        )));
    }
    Ok([nm.file.meta.channels, h, w])
}

/// Whether a network model can take items of `shape`: channels, the size it was trained at, even sizes.
fn check_fit(nm: &NetworkModel, items: usize, shape: [usize; 3], what: &str) -> Result<()> {
    let meta = &nm.file.meta;
    let [c, h, w] = shape;
    if c != meta.channels {
        return Err(Error::shape(format!(
            "{what} items have {c} channel(s) but the model {} expects {}",
            nm.name, meta.channels
        )));
    }
    let [mh, mw] = meta.image_size;
    if mh > 0 && (mh, mw) != (h, w) {
        return Err(Error::shape(format!(
            "{what} items are {h}x{w} but the model {} was trained at {mh}x{mw}",
            nm.name
        )));
    }
    meta.net_config()
        .check_input([items, c, h, w])
        .map_err(|e| Error::new(e.kind, format!("{what} items: {}", e.message)))
}

/// One side's prior, planned.
#[derive(Debug, Clone)]
enum Planned {
    Network(NetworkModel),
    Gaussian(GaussianPrior),
}

/// A planned denoise job: every check made. Runs on any backend ([`DenoisePlan::run`]).
#[derive(Debug, Clone)]
pub struct DenoisePlan {
    /// Measurements in the job.
    pub items: usize,
    pub signal_item: [usize; 3],
    pub noise_item: [usize; 3],
    pub config: SamplerConfig,
    pub samples: usize,
    /// The signal's data range (the signal model's, `[0, 1]` without one): what the estimate is clipped to.
    pub data_range: [f32; 2],
    operator: Operator,
    signal: Planned,
    noise: Planned,
    gram: Option<GramInverse>,
}

/// The networks a plan runs with, prepared on backend `B` (a caller may keep them between runs).
pub struct PlanNets<'n, B: Backend> {
    pub signal: Option<&'n Ncsnv2<B>>,
    pub noise: Option<&'n Ncsnv2<B>>,
}

impl DenoisePlan {
    /// Values of the signal estimate (`items * C * H * W`).
    pub fn signal_len(&self) -> usize {
        self.items * self.signal_item.iter().product::<usize>()
    }
    /// Values of the measurement and of the noise estimate (`items * m`).
    pub fn noise_len(&self) -> usize {
        self.items * self.noise_item.iter().product::<usize>()
    }
    pub fn signal_shape(&self) -> [usize; 4] {
        let [c, h, w] = self.signal_item;
        [self.items, c, h, w]
    }
    pub fn noise_shape(&self) -> [usize; 4] {
        let [c, h, w] = self.noise_item;
        [self.items, c, h, w]
    }
    pub fn is_matrix(&self) -> bool {
        matches!(self.operator, Operator::Matrix { .. })
    }
    /// The signal and the noise score models the plan needs on a backend (`None` for an analytic prior).
    pub fn networks(&self) -> [Option<&NetworkModel>; 2] {
        fn net(p: &Planned) -> Option<&NetworkModel> {
            match p {
                Planned::Network(m) => Some(m),
                Planned::Gaussian(_) => None,
            }
        }
        [net(&self.signal), net(&self.noise)]
    }

    /// Builds the plan's networks on `b` (callers that run once; the runtime keeps them between runs).
    pub fn build_networks<B: Backend>(&self, b: &B) -> Result<[Option<Ncsnv2<B>>; 2]> {
        let [s, n] = self.networks();
        let build = |m: Option<&NetworkModel>| {
            m.map(|m| {
                m.file
                    .build(b)
                    .map_err(|e| Error::new(e.kind, format!("{}: {}", m.name, e.message)))
            })
            .transpose()
        };
        Ok([build(s)?, build(n)?])
    }

    /// Runs the job on backend `b` with the networks `nets` (built on `b`) for the measurements `y`
    /// (`items * m` values), drawing from `seed`: the posterior mean of `samples` samples per measurement,
    /// its per-value standard deviation (K > 1) and the first sample.
    pub fn run<B: Backend>(
        &self,
        b: &B,
        nets: PlanNets<'_, B>,
        y: &[f32],
        seed: u64,
        progress: &mut Progress<'_>,
    ) -> Result<PosteriorStats> {
        self.run_from(b, nets, y, seed, 0, progress)
    }

    /// As [`DenoisePlan::run`] for measurements numbered from `first` (their RNG streams follow
    /// [`JointSampler::sample_k_from`]): a long list of measurements run in pieces gives the same bits as
    /// one run over all of them.
    pub fn run_from<B: Backend>(
        &self,
        b: &B,
        nets: PlanNets<'_, B>,
        y: &[f32],
        seed: u64,
        first: u64,
        progress: &mut Progress<'_>,
    ) -> Result<PosteriorStats> {
        if y.len() != self.noise_len() {
            return Err(Error::shape(format!(
                "measurement has {} values, the plan is for {}",
                y.len(),
                self.noise_len()
            )));
        }
        if let Some(i) = y.iter().position(|v| !v.is_finite()) {
            return Err(Error::non_finite(format!(
                "measurement value {} at index {i} is not finite (NaN or Inf)",
                y[i]
            )));
        }
        let sp = side(b, &self.signal, nets.signal, self.signal_item, "signal")?;
        let np = side(b, &self.noise, nets.noise, self.noise_item, "noise")?;
        let sampler = JointSampler::new(
            b,
            self.config,
            &self.operator,
            self.gram.as_ref(),
            sp.as_ref(),
            np.as_ref(),
            self.signal_item,
            self.noise_item,
        )?;
        sampler.sample_k_from(y, self.samples, seed, first, progress)
    }
}

/// One side's prior on backend `b`.
fn side<'a, B: Backend>(
    b: &B,
    p: &Planned,
    net: Option<&'a Ncsnv2<B>>,
    item: [usize; 3],
    what: &str,
) -> Result<Box<dyn Prior<B> + 'a>> {
    match p {
        Planned::Network(_) => {
            let net =
                net.ok_or_else(|| Error::invalid(format!("the {what} network was not prepared")))?;
            Ok(Box::new(NetworkPrior {
                net,
                image_size: None,
            }))
        }
        Planned::Gaussian(g) => Ok(Box::new(g.on(b, item)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::RefBackend;
    use alloc::vec;

    fn stats(item: [usize; 3]) -> SignalPrior {
        let d = item.iter().product();
        SignalPrior::Gaussian(GaussianStats {
            item,
            mean: vec![0.5; d],
            var: vec![0.1; d],
        })
    }

    fn err(spec: &DenoiseSpec, shape: [usize; 4]) -> Error {
        spec.plan(shape).expect_err("the plan must refuse this")
    }

    /// Each check of the plan, with its error kind and text (the one place they are written).
    #[test]
    fn the_plan_makes_every_check_once() {
        let gauss = NoisePrior::Gaussian {
            std: 0.1,
            mean: 0.0,
        };
        let ok = DenoiseSpec::new(stats([1, 4, 4]), gauss.clone());
        let p = ok.plan([3, 1, 4, 4]).unwrap();
        assert_eq!(
            (p.items, p.signal_item, p.noise_item),
            (3, [1, 4, 4], [1, 4, 4])
        );
        // the defaults: pigdm with its tuned weights, 400 steps, one sample
        assert_eq!(p.config.rule, Rule::Pigdm);
        assert_eq!((p.config.lambda, p.config.mu), (1.2, 1.2));
        assert_eq!((p.config.steps, p.samples), (400, 1));
        assert_eq!(p.config.clip, Some([0.0, 1.0]));
        // no priors
        let e = err(&DenoiseSpec::default(), [1, 1, 4, 4]);
        assert!(e.message.contains("signal model"), "{}", e.message);
        // statistics of another shape
        let e = err(&ok, [1, 1, 6, 6]);
        assert_eq!(e.kind, ErrorKind::Shape);
        assert!(e.message.contains("signal statistics"), "{}", e.message);
        // a matrix operator: the shape from the statistics, items from the measurement's length
        let mut m = ok.clone();
        m.operator = Operator::Matrix {
            m: 5,
            d: 16,
            a: vec![0.1; 80],
        };
        let p = m.plan([1, 1, 2, 5]).unwrap();
        assert_eq!((p.items, p.noise_item), (2, [1, 1, 5]));
        let e = err(&m, [1, 1, 1, 7]);
        assert!(
            e.message.contains("not a multiple of the 5"),
            "{}",
            e.message
        );
        // ... whose size does not fit the signal
        m.operator = Operator::Matrix {
            m: 5,
            d: 9,
            a: vec![0.1; 45],
        };
        assert!(err(&m, [1, 1, 1, 5])
            .message
            .starts_with("operator: matrix operator is 5x9"));
        // options out of range
        let mut o = ok.clone();
        o.steps = 0;
        assert!(err(&o, [1, 1, 4, 4]).message.contains("steps"));
        let mut o = ok.clone();
        o.samples = 0;
        assert!(err(&o, [1, 1, 4, 4]).message.contains("samples"));
        let mut o = ok.clone();
        o.lambda = Some(-1.0);
        assert_eq!(err(&o, [1, 1, 4, 4]).kind, ErrorKind::InvalidArgument);
        assert_eq!(err(&ok, [0, 1, 4, 4]).kind, ErrorKind::Shape);
        // pigdm with a singular A A^T + alpha^2 I
        let mut o = ok.clone();
        o.rule = Rule::Pigdm;
        o.alpha = 0.0;
        o.operator = Operator::Mask(vec![0.0; 16]);
        assert!(err(&o, [1, 1, 4, 4]).message.contains("singular"));
        // the sine prior takes the noise item's shape
        let s = DenoiseSpec::new(stats([1, 4, 4]), NoisePrior::Sine { std: 0.2 });
        assert!(s.plan([1, 1, 4, 4]).is_ok());
    }

    /// A plan runs on a backend and checks the measurement it is given.
    #[test]
    fn a_plan_runs_and_checks_its_measurement() {
        let mut spec = DenoiseSpec::new(
            stats([1, 2, 2]),
            NoisePrior::Gaussian {
                std: 0.1,
                mean: 0.0,
            },
        );
        spec.steps = 5;
        spec.samples = 2;
        let plan = spec.plan([2, 1, 2, 2]).unwrap();
        let b = RefBackend;
        let nets = |_: ()| PlanNets::<RefBackend> {
            signal: None,
            noise: None,
        };
        let y = [0.5f32; 8];
        let post = plan.run(&b, nets(()), &y, 1, &mut |_, _| true).unwrap();
        assert_eq!(post.estimate.signal.shape, [2, 1, 2, 2]);
        assert!(post.signal_std.is_some());
        let short = plan
            .run(&b, nets(()), &y[..4], 1, &mut |_, _| true)
            .unwrap_err();
        assert!(short.message.contains("plan is for 8"), "{}", short.message);
        let mut bad = y;
        bad[3] = f32::NAN;
        let e = plan
            .run(&b, nets(()), &bad, 1, &mut |_, _| true)
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::NonFinite);
        assert!(e.message.contains("index 3"), "{}", e.message);
    }
}
