//! The argument groups several commands share (flattened into each), and the parsers of option values.
use crate::io;
use anyhow::{anyhow, bail, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use jointdiff_core::noise;
use jointdiff_core::operator::Operator;
use jointdiff_core::plan::{NetworkModel, NoisePrior};
use jointdiff_core::sampler::Rule;
use jointdiff_core::sde::Sde;
use jointdiff_runtime::{BackendKind, Runtime};
use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub enum BackendChoice {
    Reference,
    Cpu,
    Wgpu,
}

/// `--backend`: which backend runs the networks.
#[derive(Args, Debug, Clone)]
pub struct BackendArgs {
    /// Compute backend (a backend this build lacks is an error, never a silent fallback).
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: BackendChoice,
}

impl BackendArgs {
    pub fn runtime(&self) -> Result<Runtime> {
        let kind = match self.backend {
            BackendChoice::Reference => BackendKind::Reference,
            BackendChoice::Cpu => BackendKind::Cpu,
            BackendChoice::Wgpu => BackendKind::Wgpu,
        };
        Runtime::new(kind).map_err(|e| anyhow!("--backend {kind}: {e}"))
    }
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub enum SdeKind {
    Vp,
    Ve,
    Simple,
}

pub fn sde_of(kind: SdeKind) -> Sde {
    match kind {
        SdeKind::Vp => Sde::vp_default(),
        SdeKind::Ve => Sde::ve_default(),
        SdeKind::Simple => Sde::simple_default(),
    }
}

/// The reverse-time loop: seed, SDE, last time (each command has its own `--steps` default; a const
/// generic default here would be shared by every command, as clap keeps the default's text in a static).
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// SDE (default: the models').
    #[arg(long, value_enum)]
    pub sde: Option<SdeKind>,
    /// Last time of the grid linspace(1, eps, steps).
    #[arg(long, default_value_t = 1e-3)]
    pub eps: f64,
}

impl SamplingArgs {
    pub fn sde(&self) -> Option<Sde> {
        self.sde.map(sde_of)
    }
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub enum RuleKind {
    Projection,
    Dps,
    Pigdm,
}

/// The data-consistency rule and its weights.
#[derive(Args, Debug, Clone)]
pub struct RuleArgs {
    /// Data-consistency rule (default: pigdm, chosen by measurement; dps and pigdm take a VJP through each
    /// network per step, about 3x the time of projection per step).
    #[arg(long, value_enum)]
    pub rule: Option<RuleKind>,
    /// Consistency weight of the signal (default: the rule's tuned value: projection 0.5, dps 12.7,
    /// pigdm 1.2).
    #[arg(long)]
    pub lambda: Option<f64>,
    /// Consistency weight of the noise (default: projection 0.5, dps 16.7, pigdm 1.2).
    #[arg(long)]
    pub mu: Option<f64>,
}

impl RuleArgs {
    /// The rule asked for, else the denoise default ([`jointdiff_core::plan::DEFAULT_RULE`]).
    pub fn rule(&self) -> Rule {
        match self.rule {
            Some(RuleKind::Projection) => Rule::Projection,
            Some(RuleKind::Dps) => Rule::Dps,
            Some(RuleKind::Pigdm) => Rule::Pigdm,
            None => jointdiff_core::plan::DEFAULT_RULE,
        }
    }
}

/// The measurement model `y = A x + alpha n`.
#[derive(Args, Debug, Clone)]
pub struct OperatorArgs {
    /// identity | scale:B | mask:M.npy | matrix:A.npy
    #[arg(long, default_value = "identity")]
    pub operator: String,
    #[arg(long, default_value_t = 1.0)]
    pub alpha: f64,
}

impl OperatorArgs {
    pub fn is_matrix(&self) -> bool {
        self.operator.starts_with("matrix:")
    }

    /// The operator; `item` is the `[C, H, W]` a mask of `H*W` values is repeated over. Sizes against the
    /// signal are checked by the plan.
    pub fn parse(&self, item: [usize; 3]) -> Result<Operator> {
        let s = self.operator.as_str();
        if !self.alpha.is_finite() {
            bail!("--alpha must be finite");
        }
        Ok(if s == "identity" {
            Operator::Identity
        } else if let Some(b) = s.strip_prefix("scale:") {
            let v: f32 = b
                .parse()
                .map_err(|_| anyhow!("--operator {s}: '{b}' is not a number"))?;
            if !v.is_finite() {
                bail!("--operator {s}: factor must be finite");
            }
            Operator::Scale(v)
        } else if let Some(p) = s.strip_prefix("mask:") {
            let path = Path::new(p);
            let a = io::read_array(path)?;
            let [c, h, w] = item;
            let d = c * h * w;
            let mask = if a.data.len() == d {
                a.data
            } else if a.data.len() == h * w {
                (0..c).flat_map(|_| a.data.iter().copied()).collect()
            } else {
                bail!(
                    "{}: mask has {} values; expected {} (C*H*W) or {} (H*W)",
                    path.display(),
                    a.data.len(),
                    d,
                    h * w
                );
            };
            Operator::Mask(mask)
        } else if let Some(p) = s.strip_prefix("matrix:") {
            let path = Path::new(p);
            let a = io::read_array(path)?;
            if a.shape.len() != 2 {
                bail!(
                    "{}: matrix must be 2-D (m x d), got shape {:?}",
                    path.display(),
                    a.shape
                );
            }
            Operator::Matrix {
                m: a.shape[0],
                d: a.shape[1],
                a: a.data,
            }
        } else {
            bail!("--operator {s}: expected identity, scale:B, mask:M.npy or matrix:A.npy");
        })
    }
}

/// A `--noise` option: `sine:STD` or `gaussian:STD[:MEAN]`, as the noise prior it names.
pub fn parse_noise(s: &str) -> Result<NoisePrior> {
    let parts: Vec<&str> = s.split(':').collect();
    let num = |t: &str, what: &str| -> Result<f64> {
        let v: f64 = t
            .parse()
            .map_err(|_| anyhow!("--noise {s}: {what} '{t}' is not a number"))?;
        if !v.is_finite() {
            bail!("--noise {s}: {what} must be finite");
        }
        Ok(v)
    };
    let spec = match parts[..] {
        ["sine", std] => NoisePrior::Sine {
            std: num(std, "std")?,
        },
        ["gaussian", std] => NoisePrior::Gaussian {
            std: num(std, "std")?,
            mean: 0.0,
        },
        ["gaussian", std, mean] => NoisePrior::Gaussian {
            std: num(std, "std")?,
            mean: num(mean, "mean")?,
        },
        _ => bail!("--noise {s}: expected sine:STD or gaussian:STD[:MEAN]"),
    };
    if let NoisePrior::Sine { std } | NoisePrior::Gaussian { std, .. } = spec {
        if std < 0.0 {
            bail!("--noise {s}: std must be >= 0, got {std}");
        }
    }
    Ok(spec)
}

/// Generated noise of `shape` for `corrupt`.
pub fn make_noise(
    spec: &NoisePrior,
    shape: [usize; 4],
    seed: u64,
) -> Result<jointdiff_core::Tensor> {
    Ok(match spec {
        NoisePrior::Sine { std } => noise::sine(shape, *std, seed)?,
        NoisePrior::Gaussian { std, mean } => noise::gaussian(shape, *std, *mean, seed)?,
        NoisePrior::Network(_) => bail!("a noise model cannot generate noise here"),
    })
}

/// A model file (or `builtin:NAME`) as a network prior named by its path.
pub fn network(path: &Path) -> Result<NetworkModel> {
    Ok(NetworkModel {
        file: Arc::new(io::load_model(path)?),
        name: path.display().to_string(),
    })
}

pub fn progress_bar(quiet: bool, len: usize, what: &str) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} steps {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Ctrl-C stops a long run at the end of its current step (a second Ctrl-C ends the process at once).
pub fn catch_ctrl_c() {
    let _ = ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
    });
}

/// The progress callback of a long run: moves the bar; returns false (stop) after Ctrl-C.
pub fn step_progress(pb: &ProgressBar) -> impl FnMut(usize, usize) -> bool + '_ {
    move |k, _| {
        pb.set_position(k as u64);
        !INTERRUPTED.load(Ordering::SeqCst)
    }
}

/// Whether Ctrl-C has been pressed.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// A long run's error, said as an interruption when Ctrl-C stopped it.
pub fn run_error(e: impl std::fmt::Display) -> anyhow::Error {
    if INTERRUPTED.load(Ordering::SeqCst) {
        anyhow!("interrupted (Ctrl-C): {e}; nothing was written")
    } else {
        anyhow!("{e}")
    }
}
