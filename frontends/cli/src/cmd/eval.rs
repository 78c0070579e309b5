//! `jointdiff eval`: the method's experiments against classic and learned baselines, on the project's held-out
//! splits (fixtures/data), resumable by chunks. Each chunk's estimates and scores are files under
//! `--out`; the summary (results.md, summary.json, grid.png, coverage.png) is rebuilt from them every run.
use crate::args::{self, progress_bar, BackendArgs};
use crate::cmd::demo::{embedded, stats, DIGITS, DIGIT_TRAIN_MEAN, DIGIT_TRAIN_STD, FASHION};
use crate::io;
use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use jointdiff_core::baselines::{self, HaarLasso, PseudoInverse};
use jointdiff_core::metrics::{psnr, ssim};
use jointdiff_core::noise;
use jointdiff_core::operator::Operator;
use jointdiff_core::plan::{DenoiseSpec, NetworkModel, NoisePrior, SignalPrior};
use jointdiff_core::sampler::Rule;
use jointdiff_core::Tensor;
use jointdiff_runtime::Runtime;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

const FASHION_VAL: &[u8] = include_bytes!("../../../../fixtures/data/fashion_val_100.npy");
const DIGITS_VAL: &[u8] = include_bytes!("../../../../fixtures/data/digits_val_100.npy");
const FACES: &[u8] = include_bytes!("../../../../fixtures/data/faces_lfw_100.npy");
/// The compressed-sensing matrix: `m = d / 2` rows, entries N(0, 1/m), from this seed.
const CS_ROWS: usize = 392;
const CS_MATRIX_SEED: u64 = 7;
/// Seeds of the synthetic noise of each split (test, validation).
const NOISE_SEED: [u64; 2] = [1, 2];
/// Validation items used to tune the classic baselines.
const TUNE_ITEMS: usize = 16;
const LASSO_ITERS: usize = 300;
const LASSO_GRID: [f64; 9] = [0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2];
const NLM_GRID: [f64; 10] = [0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0];
/// NLM patch radius 1 (3x3) and search radius 5 (11x11), the classic small-image setting.
const NLM_PATCH: usize = 1;
const NLM_SEARCH: usize = 5;

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub enum Split {
    Test,
    Validation,
}

#[derive(Args)]
pub struct EvalArgs {
    /// fashion-digits | cs-sine[:STD] (default 0.1) | ood | gaussian[:STD] (default 0.1).
    #[arg(long)]
    experiment: String,
    /// Comma-separated methods: joint, joint-{projection,dps,pigdm} (noise prior: the structured one),
    /// gauss, gauss-{projection,dps,pigdm} (white Gaussian noise assumed), inverse, lasso-haar, nlm.
    /// `joint` and `gauss` use denoise's default rule. Default: joint,gauss,inverse,lasso-haar,nlm (those
    /// that apply to the experiment).
    #[arg(long, value_delimiter = ',')]
    methods: Option<Vec<String>>,
    /// Pairs to evaluate (default: all of the split).
    #[arg(long)]
    count: Option<usize>,
    #[arg(long, default_value_t = 0)]
    start: usize,
    /// Held-out test pairs (reported) or the validation pairs (for tuning; never the test pairs).
    #[arg(long, value_enum, default_value = "test")]
    split: Split,
    /// Reverse-time steps of the sampling methods (default: denoise's).
    #[arg(long)]
    steps: Option<usize>,
    /// Posterior samples per measurement (their mean is the estimate; K >= 2 gives the std and coverage).
    #[arg(long)]
    samples: Option<usize>,
    /// Consistency weights of the sampling methods (default: the rule's).
    #[arg(long)]
    lambda: Option<f64>,
    #[arg(long)]
    mu: Option<f64>,
    /// Pairs per chunk: each finished chunk is kept, and a rerun with the same --out continues.
    #[arg(long, default_value_t = 16)]
    chunk: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output folder (results.md, summary.json, grid.png, coverage.png, pairs.csv, chunks/).
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    signal_model: Option<PathBuf>,
    #[arg(long)]
    noise_model: Option<PathBuf>,
    #[command(flatten)]
    backend: BackendArgs,
}

/// One experiment on one split: clean items, measurements and the measurement model.
struct Experiment {
    name: String,
    clean: Tensor,
    y: Tensor,
    operator: Operator,
    alpha: f64,
    /// The structured noise prior of the joint method (a network, or the exact analytic prior).
    joint_noise: JointNoise,
    /// The white-noise assumption of the non-joint methods (mean, std of the noise).
    gauss: (f64, f64),
    /// Whether the measurement is an image of the signal's shape (identity or scale operator).
    image: bool,
    /// What the validation split of this experiment is (for the classic baselines' tuning).
    tuned_on: String,
}

enum JointNoise {
    Digits,
    Prior(NoisePrior),
}

fn blend(x: &Tensor, n: &Tensor) -> Result<Tensor> {
    let data = x
        .data
        .iter()
        .zip(&n.data)
        .map(|(p, q)| 0.5 * p + 0.5 * q)
        .collect();
    Tensor::from_vec(x.shape, data).map_err(|e| anyhow!("{e}"))
}

fn first(t: &Tensor, k: usize) -> Result<Tensor> {
    let [_, c, h, w] = t.shape;
    Tensor::from_vec([k, c, h, w], t.data[..k * c * h * w].to_vec()).map_err(|e| anyhow!("{e}"))
}

fn std_suffix(name: &str, base: &str) -> Result<Option<f64>> {
    if name == base {
        return Ok(Some(0.1));
    }
    match name.strip_prefix(base).and_then(|r| r.strip_prefix(':')) {
        Some(v) => {
            let s: f64 = v
                .parse()
                .map_err(|_| anyhow!("--experiment {name}: '{v}' is not a number"))?;
            if !(s.is_finite() && s > 0.0) {
                bail!("--experiment {name}: the noise std must be > 0");
            }
            Ok(Some(s))
        }
        None => Ok(None),
    }
}

impl Experiment {
    fn load(name: &str, split: Split) -> Result<Experiment> {
        let val = split == Split::Validation;
        let fashion = if val {
            embedded(FASHION_VAL, "validation Fashion-MNIST images")?
        } else {
            embedded(FASHION, "Fashion-MNIST images")?
        };
        let digits = if val {
            embedded(DIGITS_VAL, "validation digits")?
        } else {
            embedded(DIGITS, "digits")?
        };
        let noise_seed = NOISE_SEED[val as usize];
        let digits_gauss = (DIGIT_TRAIN_MEAN as f64, DIGIT_TRAIN_STD as f64);
        if name == "fashion-digits" || name == "ood" {
            let (clean, tuned_on) = if name == "ood" && !val {
                // the signal model never saw faces; the digits are the test digits
                let faces = embedded(FACES, "LFW faces")?;
                (faces, "fashion-digits validation pairs (in distribution)")
            } else {
                (fashion, "fashion-digits validation pairs")
            };
            let n = first(&digits, clean.shape[0])?;
            return Ok(Experiment {
                name: name.into(),
                y: blend(&clean, &n)?,
                clean,
                operator: Operator::Scale(0.5),
                alpha: 0.5,
                joint_noise: JointNoise::Digits,
                gauss: digits_gauss,
                image: true,
                tuned_on: tuned_on.into(),
            });
        }
        if let Some(std) = std_suffix(name, "cs-sine")? {
            let k = fashion.shape[0];
            let op = baselines::gaussian_matrix(CS_ROWS, 784, CS_MATRIX_SEED)?;
            let n = noise::sine([k, 1, 1, CS_ROWS], std, noise_seed)?;
            let mut y = Tensor::zeros([k, 1, 1, CS_ROWS]);
            for i in 0..k {
                op.apply(fashion.item(i), y.item_mut(i));
                y.item_mut(i)
                    .iter_mut()
                    .zip(n.item(i))
                    .for_each(|(a, b)| *a += b);
            }
            return Ok(Experiment {
                name: name.into(),
                clean: fashion,
                y,
                operator: op,
                alpha: 1.0,
                joint_noise: JointNoise::Prior(NoisePrior::Sine { std }),
                gauss: (0.0, std),
                image: false,
                tuned_on: format!("cs-sine:{std} validation items"),
            });
        }
        if let Some(std) = std_suffix(name, "gaussian")? {
            let n = noise::gaussian(fashion.shape, std, 0.0, noise_seed)?;
            let y = Tensor::from_vec(
                fashion.shape,
                fashion
                    .data
                    .iter()
                    .zip(&n.data)
                    .map(|(a, b)| a + b)
                    .collect(),
            )
            .map_err(|e| anyhow!("{e}"))?;
            return Ok(Experiment {
                name: name.into(),
                clean: fashion,
                y,
                operator: Operator::Identity,
                alpha: 1.0,
                joint_noise: JointNoise::Prior(NoisePrior::Gaussian { std, mean: 0.0 }),
                gauss: (0.0, std),
                image: true,
                tuned_on: format!("gaussian:{std} validation items"),
            });
        }
        bail!("--experiment {name}: expected fashion-digits, cs-sine[:STD], ood or gaussian[:STD]")
    }

    fn len(&self) -> usize {
        self.clean.shape[0]
    }

    /// The validation experiment whose pairs tune this one's classic baselines.
    fn validation_name(&self) -> &str {
        if self.name == "ood" {
            "fashion-digits"
        } else {
            &self.name
        }
    }

    /// Whether the non-joint methods differ from the joint ones (not when the noise is white Gaussian).
    fn has_gauss(&self) -> bool {
        !matches!(
            self.joint_noise,
            JointNoise::Prior(NoisePrior::Gaussian { .. })
        )
    }

    fn y_items(&self, range: std::ops::Range<usize>) -> &[f32] {
        let m = self.y.data.len() / self.len();
        &self.y.data[range.start * m..range.end * m]
    }

    /// Measurement items (`m` values each) with the known noise mean taken out, inverted by `pinv` (this
    /// experiment's operator, made once by the caller) and clipped: the input of NLM and of the BM3D reference.
    fn mean_corrected_inverse(&self, pinv: &PseudoInverse, y: &[f32]) -> Result<Vec<f32>> {
        let off = (self.alpha * self.gauss.0) as f32;
        let m = self.y.data.len() / self.len();
        let mut out = Vec::with_capacity(y.len() / m * 784);
        for yi in y.chunks_exact(m) {
            let yc: Vec<f32> = yi.iter().map(|v| v - off).collect();
            out.extend(pinv.apply(&yc)?.into_iter().map(|v| v.clamp(0.0, 1.0)));
        }
        Ok(out)
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Method {
    /// A sampling method: the noise prior (joint or Gaussian) and the rule (`None`: denoise's default).
    Sampler {
        joint: bool,
        rule: Option<Rule>,
    },
    Inverse,
    LassoHaar,
    Nlm,
}

fn parse_method(s: &str) -> Result<Method> {
    let rule = |r: &str| -> Result<Option<Rule>> {
        Ok(Some(match r {
            "projection" => Rule::Projection,
            "dps" => Rule::Dps,
            "pigdm" => Rule::Pigdm,
            _ => bail!("--methods: unknown rule '{r}' in '{s}'"),
        }))
    };
    Ok(match s {
        "joint" => Method::Sampler {
            joint: true,
            rule: None,
        },
        "gauss" => Method::Sampler {
            joint: false,
            rule: None,
        },
        "inverse" => Method::Inverse,
        "lasso-haar" => Method::LassoHaar,
        "nlm" => Method::Nlm,
        _ => {
            if let Some(r) = s.strip_prefix("joint-") {
                Method::Sampler {
                    joint: true,
                    rule: rule(r)?,
                }
            } else if let Some(r) = s.strip_prefix("gauss-") {
                Method::Sampler {
                    joint: false,
                    rule: rule(r)?,
                }
            } else {
                bail!(
                    "--methods: unknown method '{s}' (joint, joint-RULE, gauss, gauss-RULE, inverse, \
                     lasso-haar, nlm)"
                )
            }
        }
    })
}

/// Everything a chunk needs that is fixed for the whole evaluation.
struct Ctx<'a> {
    a: &'a EvalArgs,
    exp: Experiment,
    methods: Vec<(String, Method)>,
    signal: NetworkModel,
    digits: NetworkModel,
    tuning: BTreeMap<String, f64>,
    quiet: bool,
}

impl Ctx<'_> {
    fn spec(&self, joint: bool, rule: Option<Rule>) -> DenoiseSpec {
        let noise = match (joint, &self.exp.joint_noise) {
            (true, JointNoise::Digits) => NoisePrior::Network(self.digits.clone()),
            (true, JointNoise::Prior(p)) => p.clone(),
            (false, _) => NoisePrior::Gaussian {
                mean: self.exp.gauss.0,
                std: self.exp.gauss.1,
            },
        };
        let mut s = DenoiseSpec::new(SignalPrior::Network(self.signal.clone()), noise);
        s.operator = self.exp.operator.clone();
        s.alpha = self.exp.alpha;
        if let Some(r) = rule {
            s.rule = r;
        }
        if let Some(v) = self.a.steps {
            s.steps = v;
        }
        if let Some(v) = self.a.samples {
            s.samples = v;
        }
        s.lambda = self.a.lambda;
        s.mu = self.a.mu;
        s.signal_shape = Some([1, 28, 28]);
        s
    }
}

/// A method's estimate of a chunk: signal items, and the posterior std where the method samples (K >= 2).
struct Estimate {
    signal: Tensor,
    std: Option<Tensor>,
    seconds: f64,
}

/// Runs a classic baseline on every item of `y` (items of `m` values) with parameter `p`.
fn classic(exp: &Experiment, method: &Method, y: &[f32], p: f64) -> Result<Vec<f32>> {
    let m = exp.y.data.len() / exp.len();
    let mut out = Vec::with_capacity(y.len() / m * 784);
    let lasso = match method {
        Method::LassoHaar => Some(HaarLasso::new(exp.operator.clone(), [1, 28, 28])?),
        _ => None,
    };
    let pinv = match method {
        Method::Inverse | Method::Nlm => Some(PseudoInverse::new(&exp.operator, 784)?),
        _ => None,
    };
    let offset = vec![(exp.alpha * exp.gauss.0) as f32; m];
    for yi in y.chunks_exact(m) {
        let pinv = || pinv.as_ref().ok_or_else(|| anyhow!("no inverse"));
        let x: Vec<f32> = match method {
            Method::Inverse => pinv()?.apply(yi)?,
            Method::LassoHaar => lasso
                .as_ref()
                .ok_or_else(|| anyhow!("no solver"))?
                .solve(yi, &offset, p, LASSO_ITERS)?
                .into_iter()
                .map(|v| v as f32)
                .collect(),
            Method::Nlm => baselines::nlm(
                &exp.mean_corrected_inverse(pinv()?, yi)?,
                28,
                28,
                NLM_PATCH,
                NLM_SEARCH,
                p,
            ),
            Method::Sampler { .. } => bail!("not a classic method"),
        };
        out.extend(x.into_iter().map(|v| v.clamp(0.0, 1.0)));
    }
    Ok(out)
}

fn mean_psnr(est: &[f32], clean: &[f32]) -> f64 {
    let k = est.len() / 784;
    (0..k)
        .map(|i| {
            psnr(
                &est[i * 784..(i + 1) * 784],
                &clean[i * 784..(i + 1) * 784],
                1.0,
            )
        })
        .sum::<f64>()
        / k as f64
}

/// Tunes the parameter of LASSO (lambda) and NLM (filter) on the validation split: the grid value of the
/// best mean PSNR over the first validation items.
fn tune(exp: &Experiment, method: &Method, quiet: bool) -> Result<(f64, Vec<(f64, f64)>)> {
    let val = Experiment::load(exp.validation_name(), Split::Validation)?;
    let k = TUNE_ITEMS.min(val.len());
    let y = val.y_items(0..k);
    let clean = &val.clean.data[..k * 784];
    let grid: &[f64] = match method {
        Method::LassoHaar => &LASSO_GRID,
        Method::Nlm => &NLM_GRID,
        _ => bail!("nothing to tune"),
    };
    let pb = progress_bar(quiet, grid.len(), "tuning on validation");
    let mut curve = Vec::new();
    for (i, &p) in grid.iter().enumerate() {
        let est = classic(&val, method, y, p)?;
        curve.push((p, mean_psnr(&est, clean)));
        pb.set_position(i as u64 + 1);
    }
    pb.finish_and_clear();
    let best = curve
        .iter()
        .copied()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .ok_or_else(|| anyhow!("empty grid"))?;
    Ok((best.0, curve))
}

fn run_method(
    ctx: &Ctx,
    rt: &Runtime,
    method: &Method,
    range: std::ops::Range<usize>,
    label: &str,
) -> Result<Estimate> {
    let exp = &ctx.exp;
    let k = range.len();
    let y = exp.y_items(range.clone());
    let t0 = Instant::now();
    let (signal, std) = match method {
        Method::Sampler { joint, rule } => {
            let spec = ctx.spec(*joint, *rule);
            let [_, c, h, w] = exp.y.shape;
            let plan = spec
                .plan([k, c, h, w])
                .map_err(|e| anyhow!("{label}: {e}"))?;
            let pb = progress_bar(ctx.quiet, plan.config.steps, label);
            // measurement i uses the streams it would have in one run over all pairs: chunking and
            // --start do not change any pair's result
            let r = rt
                .denoise_from(&plan, y, ctx.a.seed, range.start as u64, &mut args::step_progress(&pb))
                .map_err(|e| {
                    let dir = chunk_dir(&ctx.a.out);
                    if args::interrupted() {
                        anyhow!(
                            "interrupted (Ctrl-C) in {label}; the finished chunks are kept in {} and the \
                             same command continues from there",
                            dir.display()
                        )
                    } else {
                        anyhow!("{label}: {e}")
                    }
                });
            pb.finish_and_clear();
            let r = r?;
            (r.estimate.signal.data, r.signal_std.map(|s| s.data))
        }
        m => {
            let p = ctx.tuning.get(&method_param_key(m)).copied().unwrap_or(0.0);
            (classic(exp, m, y, p)?, None)
        }
    };
    let seconds = t0.elapsed().as_secs_f64();
    let t = |d: Vec<f32>| Tensor::from_vec([k, 1, 28, 28], d).map_err(|e| anyhow!("{e}"));
    Ok(Estimate {
        signal: t(signal)?,
        std: std.map(t).transpose()?,
        seconds,
    })
}

fn method_param_key(m: &Method) -> String {
    match m {
        Method::LassoHaar => "lasso-haar lambda".into(),
        Method::Nlm => "nlm filter".into(),
        _ => String::new(),
    }
}

fn chunk_dir(out: &Path) -> PathBuf {
    out.join("chunks")
}

fn chunk_stem(start: usize, end: usize) -> String {
    format!("{start:04}-{end:04}")
}

pub fn run(a: EvalArgs, quiet: bool) -> Result<()> {
    let exp = Experiment::load(&a.experiment, a.split)?;
    let total = exp.len();
    let count = a.count.unwrap_or(total.saturating_sub(a.start));
    if count == 0 || a.start + count > total {
        bail!(
            "--start {} --count {count}: the {} split of {} has {total} pairs",
            a.start,
            match a.split {
                Split::Test => "test",
                Split::Validation => "validation",
            },
            a.experiment
        );
    }
    if a.chunk == 0 {
        bail!("--chunk must be at least 1");
    }
    if a.samples == Some(0) || a.steps == Some(0) {
        bail!("--samples and --steps must be at least 1");
    }
    let default_methods = ["joint", "gauss", "inverse", "lasso-haar", "nlm"];
    let names: Vec<String> = a
        .methods
        .clone()
        .unwrap_or_else(|| default_methods.iter().map(|s| s.to_string()).collect());
    let mut methods = Vec::new();
    for n in &names {
        let m = parse_method(n)?;
        let skip = match &m {
            Method::Nlm => !exp.image,
            Method::Sampler { joint: false, .. } => !exp.has_gauss(),
            _ => false,
        };
        if skip {
            if a.methods.is_some() {
                bail!("--methods {n}: does not apply to {} (NLM needs an image measurement; gauss-* equals joint-* under white Gaussian noise)", a.experiment);
            }
            continue;
        }
        if methods.iter().any(|(q, _)| q == n) {
            bail!("--methods: {n} is listed twice");
        }
        methods.push((n.clone(), m));
    }
    std::fs::create_dir_all(chunk_dir(&a.out))
        .with_context(|| format!("{}: cannot create the output folder", a.out.display()))?;
    io::check_writable([Some(a.out.join("results.md").as_path())])?;
    // the configuration: a rerun with the same --out must ask for the same evaluation
    let config = json!({
        "experiment": a.experiment,
        "split": format!("{:?}", a.split).to_lowercase(),
        "methods": names,
        "steps": a.steps,
        "samples": a.samples,
        "lambda": a.lambda,
        "mu": a.mu,
        "chunk": a.chunk,
        "seed": a.seed,
        "signal_model": a.signal_model.as_ref().map(|p| p.display().to_string()),
        "noise_model": a.noise_model.as_ref().map(|p| p.display().to_string()),
        "backend": format!("{:?}", a.backend.backend).to_lowercase(),
    });
    let config_path = a.out.join("config.json");
    if let Ok(old) = std::fs::read_to_string(&config_path) {
        let old: Value = serde_json::from_str(&old)
            .with_context(|| format!("{}: not a JSON configuration", config_path.display()))?;
        if old != config {
            bail!(
                "{} holds another evaluation ({old}); use a new --out or the same options",
                a.out.display()
            );
        }
    } else {
        io::write_atomic(
            &config_path,
            serde_json::to_string_pretty(&config)?.as_bytes(),
        )?;
    }
    // tuning of the classic baselines on the validation split, once per output folder
    let tuning_path = a.out.join("tuning.json");
    let mut tuning_json: BTreeMap<String, Value> = std::fs::read_to_string(&tuning_path)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    let mut tuning = BTreeMap::new();
    for (_, m) in &methods {
        let key = method_param_key(m);
        if key.is_empty() {
            continue;
        }
        let v = match tuning_json.get(&key).and_then(|v| v["value"].as_f64()) {
            Some(v) => v,
            None => {
                let (v, curve) = tune(&exp, m, quiet)?;
                tuning_json.insert(
                    key.clone(),
                    json!({"value": v, "tuned_on": exp.tuned_on, "items": TUNE_ITEMS,
                           "curve": curve.iter().map(|(p, s)| json!([p, s])).collect::<Vec<_>>()}),
                );
                io::write_atomic(
                    &tuning_path,
                    serde_json::to_string_pretty(&tuning_json)?.as_bytes(),
                )?;
                v
            }
        };
        tuning.insert(key, v);
    }
    let rt = a.backend.runtime()?;
    let ctx = Ctx {
        signal: args::network(&io::or_builtin(a.signal_model.as_deref(), "fashion"))?,
        digits: args::network(&io::or_builtin(a.noise_model.as_deref(), "digits"))?,
        a: &a,
        exp,
        methods,
        tuning,
        quiet,
    };
    if ctx.exp.image {
        write_reference_inputs(&ctx, count)?;
    }
    rt.run(|| run_chunks(&ctx, &rt, count))?;
    summarize(&ctx, count)
}

/// The inputs of the optional BM3D reference (`tools/eval/bm3d_reference.py`, which this crate never runs): the
/// mean-corrected inverse of the evaluated measurements, and of the first validation items with their
/// clean signals (for its tuning).
fn write_reference_inputs(ctx: &Ctx, count: usize) -> Result<()> {
    let a = ctx.a;
    let test = ctx.exp.mean_corrected_inverse(
        &PseudoInverse::new(&ctx.exp.operator, 784)?,
        ctx.exp.y_items(a.start..a.start + count),
    )?;
    io::write_npy(
        &a.out.join("reference_input.npy"),
        &[count, 1, 28, 28],
        &test,
    )?;
    let val = Experiment::load(ctx.exp.validation_name(), Split::Validation)?;
    let k = TUNE_ITEMS.min(val.len());
    io::write_npy(
        &a.out.join("validation_input.npy"),
        &[k, 1, 28, 28],
        &val.mean_corrected_inverse(&PseudoInverse::new(&val.operator, 784)?, val.y_items(0..k))?,
    )?;
    io::write_npy(
        &a.out.join("validation_clean.npy"),
        &[k, 1, 28, 28],
        &val.clean.data[..k * 784],
    )
}

fn run_chunks(ctx: &Ctx, rt: &Runtime, count: usize) -> Result<()> {
    let a = ctx.a;
    let dir = chunk_dir(&a.out);
    let mut s = a.start;
    let end = a.start + count;
    while s < end {
        let e = (s + a.chunk).min(end);
        let stem = chunk_stem(s, e);
        let csv_path = dir.join(format!("{stem}.csv"));
        if csv_path.exists() {
            s = e;
            continue;
        }
        let mut csv = String::from("pair,method,psnr,ssim,seconds_per_image\n");
        for (name, m) in &ctx.methods {
            let label = format!("pairs {s}-{e} of {end}: {name}");
            let est = run_method(ctx, rt, m, s..e, &label)?;
            io::write_npy(
                &dir.join(format!("{stem}_{name}.npy")),
                &est.signal.shape,
                &est.signal.data,
            )?;
            if let Some(sd) = &est.std {
                io::write_npy(
                    &dir.join(format!("{stem}_{name}_std.npy")),
                    &sd.shape,
                    &sd.data,
                )?;
            }
            for i in 0..e - s {
                let (ei, ci) = (est.signal.item(i), ctx.exp.clean.item(s + i));
                writeln!(
                    csv,
                    "{},{name},{},{},{}",
                    s + i,
                    psnr(ei, ci, 1.0),
                    ssim(ei, ci, 1, 28, 28, 1.0),
                    est.seconds / (e - s) as f64
                )?;
            }
        }
        // the CSV is written last: it marks the chunk as done
        io::write_atomic(&csv_path, csv.as_bytes())?;
        if !ctx.quiet {
            eprintln!("{}: pairs {s}-{e} done", a.out.display());
        }
        s = e;
    }
    Ok(())
}

/// Bins of the posterior std for the calibration table (upper edges).
const STD_BINS: [f32; 6] = [0.02, 0.05, 0.1, 0.15, 0.25, f32::INFINITY];

/// Rebuilds results.md, summary.json, pairs.csv, grid.png and coverage.png from the chunk files.
fn summarize(ctx: &Ctx, count: usize) -> Result<()> {
    let a = ctx.a;
    let dir = chunk_dir(&a.out);
    let (start, end) = (a.start, a.start + count);
    let mut rows: Vec<(usize, String, f64, f64, f64)> = Vec::new();
    let mut chunks = Vec::new();
    let mut s = start;
    while s < end {
        let e = (s + a.chunk).min(end);
        let stem = chunk_stem(s, e);
        let text = std::fs::read_to_string(dir.join(format!("{stem}.csv")))
            .with_context(|| format!("chunk {stem} is missing"))?;
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split(',').collect();
            if f.len() != 5 {
                bail!("chunk {stem}: bad line '{line}'");
            }
            let num = |t: &str| {
                t.parse::<f64>()
                    .map_err(|_| anyhow!("chunk {stem}: bad number '{t}'"))
            };
            rows.push((
                f[0].parse()?,
                f[1].to_string(),
                num(f[2])?,
                num(f[3])?,
                num(f[4])?,
            ));
        }
        chunks.push((s, e, stem));
        s = e;
    }
    let mut pairs_csv = String::from("pair,method,psnr,ssim,seconds_per_image\n");
    for r in &rows {
        writeln!(pairs_csv, "{},{},{},{},{}", r.0, r.1, r.2, r.3, r.4)?;
    }
    io::write_atomic(&a.out.join("pairs.csv"), pairs_csv.as_bytes())?;
    // coverage of the posterior std: |mean - clean| within 1 and 2 std, and a calibration table
    let mut summary = serde_json::Map::new();
    let mut table = String::new();
    let mut calib = String::new();
    let mut hist_rows: Vec<(String, Vec<(f32, f32)>)> = Vec::new();
    for (name, _) in &ctx.methods {
        let r: Vec<&(usize, String, f64, f64, f64)> =
            rows.iter().filter(|r| &r.1 == name).collect();
        let ps: Vec<f64> = r.iter().map(|r| r.2).collect();
        let ss: Vec<f64> = r.iter().map(|r| r.3).collect();
        let secs = stats(&r.iter().map(|r| r.4).collect::<Vec<_>>()).0;
        let ((pm, psd), (sm, ssd)) = (stats(&ps), stats(&ss));
        let mut pts: Vec<(f32, f32)> = Vec::new();
        for (cs, _, stem) in &chunks {
            let p = dir.join(format!("{stem}_{name}_std.npy"));
            if !p.exists() {
                continue;
            }
            let sd = io::read_array(&p)?;
            let est = io::read_array(&dir.join(format!("{stem}_{name}.npy")))?;
            let clean = &ctx.exp.clean.data[cs * 784..cs * 784 + est.data.len()];
            for ((e, c), s) in est.data.iter().zip(clean).zip(&sd.data) {
                pts.push((*s, (e - c).abs()));
            }
        }
        let cover = (!pts.is_empty()).then(|| {
            let n = pts.len() as f64;
            let c1 = pts.iter().filter(|(s, e)| e <= s).count() as f64 / n;
            let c2 = pts.iter().filter(|(s, e)| *e <= 2.0 * s).count() as f64 / n;
            (c1, c2)
        });
        let cov_txt = cover.map_or("-".to_string(), |(c1, c2)| {
            format!("{:.1} % / {:.1} %", 100.0 * c1, 100.0 * c2)
        });
        writeln!(
            table,
            "| {name} | {} | {pm:.2} ± {psd:.2} | {sm:.3} ± {ssd:.3} | {secs:.3} | {cov_txt} |",
            ps.len()
        )?;
        if cover.is_some() {
            writeln!(calib, "\n**{name}** (pixels binned by posterior std):\n")?;
            writeln!(
                calib,
                "| posterior std | pixels | RMS error | within 1 std | within 2 std |"
            )?;
            writeln!(calib, "|---|---|---|---|---|")?;
            let mut lo = 0f32;
            for hi in STD_BINS {
                let b: Vec<&(f32, f32)> = pts.iter().filter(|(s, _)| *s >= lo && *s < hi).collect();
                if !b.is_empty() {
                    let n = b.len() as f64;
                    let rms = (b.iter().map(|(_, e)| (*e as f64).powi(2)).sum::<f64>() / n).sqrt();
                    let c1 = b.iter().filter(|(s, e)| e <= s).count() as f64 / n;
                    let c2 = b.iter().filter(|(s, e)| *e <= 2.0 * s).count() as f64 / n;
                    let label = if hi.is_finite() {
                        format!("{lo:.2} - {hi:.2}")
                    } else {
                        format!(">= {lo:.2}")
                    };
                    writeln!(
                        calib,
                        "| {label} | {} | {rms:.3} | {:.1} % | {:.1} % |",
                        b.len(),
                        100.0 * c1,
                        100.0 * c2
                    )?;
                }
                lo = hi;
            }
            hist_rows.push((name.clone(), pts));
        }
        summary.insert(
            name.clone(),
            json!({
                "pairs": ps.len(), "psnr_mean": pm, "psnr_std": psd, "ssim_mean": sm, "ssim_std": ssd,
                "seconds_per_image": secs,
                "coverage_1std": cover.map(|c| c.0), "coverage_2std": cover.map(|c| c.1),
                "parameter": ctx.tuning.get(&method_param_key(&ctx.methods.iter().find(|(n, _)| n == name).map(|(_, m)| m.clone()).unwrap_or(Method::Inverse))),
            }),
        );
    }
    // the optional BM3D reference, when tools/eval/bm3d_reference.py has written its estimates here
    let bm3d = a.out.join("bm3d.npy");
    if bm3d.exists() {
        let est = io::read_images(&bm3d)?;
        if est.shape[0] != count {
            bail!(
                "{}: {} items, the evaluation has {count}",
                bm3d.display(),
                est.shape[0]
            );
        }
        let info: Value = std::fs::read_to_string(a.out.join("bm3d.json"))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(Value::Null);
        let secs = info["seconds_per_image"].as_f64().unwrap_or(f64::NAN);
        let ps: Vec<f64> = (0..count)
            .map(|i| psnr(est.item(i), ctx.exp.clean.item(start + i), 1.0))
            .collect();
        let ss: Vec<f64> = (0..count)
            .map(|i| ssim(est.item(i), ctx.exp.clean.item(start + i), 1, 28, 28, 1.0))
            .collect();
        let ((pm, psd), (sm, ssd)) = (stats(&ps), stats(&ss));
        writeln!(
            table,
            "| bm3d (reference, tools/eval/bm3d_reference.py, sigma {}) | {count} | {pm:.2} ± {psd:.2} | {sm:.3} ± {ssd:.3} | {secs:.3} | - |",
            info["sigma"]
        )?;
        summary.insert(
            "bm3d".into(),
            json!({"pairs": count, "psnr_mean": pm, "psnr_std": psd, "ssim_mean": sm, "ssim_std": ssd,
                   "seconds_per_image": secs, "parameter": info["sigma"]}),
        );
    }
    let command = format!(
        "jointdiff {}",
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    );
    let spec = ctx.spec(true, None);
    let (rule, steps, samples) = (spec.rule, spec.steps, spec.samples);
    let mut md = format!(
        "# jointdiff eval: {} ({} split, pairs {start}-{end})\n\n    {command}\n\n",
        a.experiment,
        format!("{:?}", a.split).to_lowercase(),
    );
    writeln!(
        md,
        "Sampling methods: {steps} steps, {samples} sample(s) per measurement (the estimate is their mean), \
         default rule {} where the method does not name one{}. Classic baselines tuned on the first {TUNE_ITEMS} {}: {}. \
         Seconds per image on the machine of this run (its wall time of a chunk over the chunk's pairs).\n",
        rule.name(),
        match (a.lambda, a.mu) {
            (None, None) => String::new(),
            (l, m) => format!(", weights lambda {l:?} mu {m:?}"),
        },
        ctx.exp.tuned_on,
        if ctx.tuning.is_empty() {
            "none".to_string()
        } else {
            ctx.tuning
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    )?;
    md += "| method | pairs | PSNR dB (mean ± std) | SSIM (mean ± std) | s / image | coverage 1 std / 2 std |\n";
    md += "|---|---|---|---|---|---|\n";
    md += &table;
    if !calib.is_empty() {
        md += "\n## Uncertainty: is the posterior std a trustworthy error bar?\n\nA Gaussian error with the \
               stated std would put 68.3 % of the pixels within 1 std and 95.4 % within 2 std. \
               coverage.png: for each sampling method, a 2-D histogram of |error| (up, 0 to 0.5) against the \
               posterior std (right, 0 to 0.25), log counts; the red lines are error = std and error = 2 std.\n";
        md += &calib;
    }
    md += "\ngrid.png: rows are the clean signal, ";
    md += if ctx.exp.image {
        "the measurement, "
    } else {
        ""
    };
    md += &format!(
        "then each method in the order of the table ({}), for the first pairs.\n",
        ctx.methods
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    io::write_atomic(&a.out.join("results.md"), md.as_bytes())?;
    let summary = json!({
        "experiment": a.experiment, "split": format!("{:?}", a.split).to_lowercase(),
        "start": start, "count": count, "command": command, "steps": steps, "samples": samples,
        "rule": rule.name(), "methods": summary,
    });
    io::write_atomic(
        &a.out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    // grid.png from the first chunk
    let (cs, ce, stem) = &chunks[0];
    let k = (ce - cs).min(8);
    let clean = first(
        &Tensor::from_vec(
            [ce - cs, 1, 28, 28],
            ctx.exp.clean.data[cs * 784..ce * 784].to_vec(),
        )
        .map_err(|e| anyhow!("{e}"))?,
        k,
    )?;
    let mut grid: Vec<Tensor> = vec![clean];
    if ctx.exp.image {
        let y = ctx.exp.y_items(*cs..cs + k).to_vec();
        grid.push(Tensor::from_vec([k, 1, 28, 28], y).map_err(|e| anyhow!("{e}"))?);
    }
    for (name, _) in &ctx.methods {
        let est = io::read_images(&dir.join(format!("{stem}_{name}.npy")))?;
        grid.push(first(&est, k)?);
    }
    let rows: Vec<(&Tensor, [f32; 2])> = grid.iter().map(|t| (t, [0.0, 1.0])).collect();
    io::write_png_grid(&a.out.join("grid.png"), &rows, Some(k))?;
    if !hist_rows.is_empty() {
        write_coverage_png(&a.out.join("coverage.png"), &hist_rows)?;
    }
    print!("{md}");
    println!(
        "wrote {}/{{results.md,summary.json,pairs.csv,grid.png}}",
        a.out.display()
    );
    Ok(())
}

/// One 2-D histogram panel per method: x the posterior std (0..0.25), y the absolute error (0..0.5, up),
/// log counts in gray, the lines error = std and error = 2 std in red.
fn write_coverage_png(path: &Path, panels: &[(String, Vec<(f32, f32)>)]) -> Result<()> {
    const S: usize = 160;
    const PAD: usize = 8;
    let (xmax, ymax) = (0.25f32, 0.5f32);
    let gw = panels.len() * (S + PAD) + PAD;
    let gh = S + 2 * PAD;
    let mut img = vec![255u8; gw * gh * 3];
    for (pi, (_, pts)) in panels.iter().enumerate() {
        let mut h = vec![0u32; S * S];
        for (s, e) in pts {
            let x = ((s / xmax) * S as f32) as usize;
            let y = ((e / ymax) * S as f32) as usize;
            if x < S && y < S {
                h[y * S + x] += 1;
            }
        }
        let lmax = (h.iter().copied().max().unwrap_or(1).max(1) as f32).ln_1p();
        let ox = PAD + pi * (S + PAD);
        for y in 0..S {
            for x in 0..S {
                let v = h[y * S + x];
                let g = if v == 0 {
                    255
                } else {
                    (220.0 * (1.0 - (v as f32).ln_1p() / lmax)) as u8
                };
                let row = PAD + (S - 1 - y);
                let o = (row * gw + ox + x) * 3;
                img[o..o + 3].copy_from_slice(&[g, g, g]);
            }
            // error = std and error = 2 std
            for slope in [1.0f32, 2.0] {
                let x = y as f32 * ymax / S as f32 / slope / xmax * S as f32;
                let x = x as usize;
                if x < S {
                    let row = PAD + (S - 1 - y);
                    let o = (row * gw + ox + x) * 3;
                    img[o..o + 3].copy_from_slice(&[220, 30, 30]);
                }
            }
        }
        // frame
        for t in 0..S {
            for (r, c) in [
                (PAD + t, ox),
                (PAD + t, ox + S - 1),
                (PAD, ox + t),
                (PAD + S - 1, ox + t),
            ] {
                let o = (r * gw + c) * 3;
                img[o..o + 3].copy_from_slice(&[0, 0, 0]);
            }
        }
    }
    io::write_png_rgb(path, &img, gw, gh)
}
