//! `jointdiff`: remove structured noise from measurements with joint diffusion posterior sampling.
mod bench;
mod demo;
mod io;
mod train;

use anyhow::{anyhow, bail, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use jointdiff_core::model::ModelFile;
use jointdiff_core::noise;
use jointdiff_core::operator::Operator;
use jointdiff_core::prior::{GaussianPrior, NetworkPrior, Prior};
use jointdiff_core::sampler::{sample_prior, JointSampler, Rule, SamplerConfig};
use jointdiff_core::sde::Sde;
use jointdiff_core::{Backend, Ncsnv2, RefBackend, Tensor};
use jointdiff_cpu::CpuBackend;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "jointdiff",
    version,
    about = "Remove structured noise with joint diffusion posterior sampling"
)]
struct Cli {
    /// No progress bars.
    #[arg(long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Describe a model file: architecture, size, SDE, parameters, FLOPs.
    Info(InfoArgs),
    /// Write the score net(x)/SIGMA of a batch (NCHW float32).
    Score(ScoreArgs),
    /// Draw unconditional samples from a score model.
    Sample(SampleArgs),
    /// Make measurements y = A x + alpha n from clean signals and structured noise.
    Corrupt(CorruptArgs),
    /// Estimate the signal (and the noise) from measurements by joint posterior sampling.
    Denoise(DenoiseArgs),
    /// The method's MNIST experiment on held-out data: PSNR/SSIM table and demo.png.
    Demo(demo::DemoArgs),
    /// Train a score model by denoising score matching (checkpoints, --resume, validation loss).
    Train(train::TrainArgs),
    /// Measure speed: `bench forward` (NCSNv2 forward) or `bench gemm` (the GEMM kernel).
    #[command(subcommand)]
    Bench(BenchCmd),
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Time NCSNv2 forwards with random weights: ms per forward, images/s, GFLOP/s.
    Forward(BenchForwardArgs),
    /// GFLOP/s of the CPU backend's GEMM on the matrix shapes of 3x3 convolutions.
    Gemm(BenchGemmArgs),
}

#[derive(Args)]
struct BenchForwardArgs {
    #[arg(long, default_value_t = 28)]
    size: usize,
    #[arg(long, default_value_t = 1)]
    channels: usize,
    #[arg(long, default_value_t = 32)]
    ngf: usize,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long, default_value_t = 10)]
    iters: usize,
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendKind,
    /// Print one JSON object (keys ms_per_forward, images_per_s, gflops, ...).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchGemmArgs {
    /// Shapes m,k,n (repeatable); default: the shapes of NCSNv2's convolutions at 28x28.
    #[arg(long)]
    shape: Vec<String>,
    #[arg(long, default_value_t = 20)]
    iters: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum BackendKind {
    Reference,
    Cpu,
    Wgpu,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum SdeKind {
    Vp,
    Ve,
    Simple,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum RuleKind {
    Projection,
    Dps,
    Pigdm,
}

impl RuleKind {
    /// The sampler's rule and its weights: those given, else the rule's tuned defaults.
    pub(crate) fn with_weights(self, lambda: Option<f64>, mu: Option<f64>) -> (Rule, f64, f64) {
        let rule = match self {
            RuleKind::Projection => Rule::Projection,
            RuleKind::Dps => Rule::Dps,
            RuleKind::Pigdm => Rule::Pigdm,
        };
        let (l, m) = rule.default_weights();
        (rule, lambda.unwrap_or(l), mu.unwrap_or(m))
    }
}

#[derive(Args)]
struct InfoArgs {
    /// Model file (safetensors).
    model: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ScoreArgs {
    #[arg(long)]
    model: PathBuf,
    /// Input batch (.npy NCHW/CHW/HW or .png).
    #[arg(long)]
    input: PathBuf,
    /// Noise level S: the output is net(x)/S.
    #[arg(long)]
    sigma: f64,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendKind,
}

#[derive(Args)]
struct SampleArgs {
    #[arg(long)]
    model: PathBuf,
    /// Number of samples.
    #[arg(long, default_value_t = 16)]
    count: usize,
    #[arg(long, default_value_t = 600)]
    steps: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    out: PathBuf,
    /// Also write the samples as a PNG grid.
    #[arg(long)]
    png: Option<PathBuf>,
    /// SDE (default: the model's).
    #[arg(long, value_enum)]
    sde: Option<SdeKind>,
    /// Image size H[xW] for models that do not record it (reference checkpoints).
    #[arg(long)]
    size: Option<String>,
    #[arg(long, default_value_t = 1e-3)]
    eps: f64,
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendKind,
}

#[derive(Args)]
struct CorruptArgs {
    /// Clean signals (.npy NCHW/CHW/HW or .png).
    #[arg(long)]
    signal: PathBuf,
    /// Noise images to overlay (.npy); item k gets a seeded choice among them.
    #[arg(long, conflicts_with = "noise")]
    noise_data: Option<PathBuf>,
    /// Generated noise: sine:STD or gaussian:STD[:MEAN].
    #[arg(long)]
    noise: Option<String>,
    /// identity | scale:B | mask:M.npy | matrix:A.npy
    #[arg(long, default_value = "identity")]
    operator: String,
    #[arg(long, default_value_t = 1.0)]
    alpha: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    out: PathBuf,
    /// Also write the noise n that was added.
    #[arg(long)]
    noise_out: Option<PathBuf>,
    /// Also write a PNG (clean, noise, measurement rows; image operators only).
    #[arg(long)]
    png: Option<PathBuf>,
}

#[derive(Args)]
struct DenoiseArgs {
    /// Measurements y (.npy or .png).
    #[arg(long)]
    measurement: PathBuf,
    /// Score model of the signal (default, without --signal-stats: the embedded Fashion-MNIST model,
    /// builtin:fashion).
    #[arg(long, conflicts_with = "signal_stats")]
    signal_model: Option<PathBuf>,
    /// Analytic Gaussian signal prior: .npy of shape [2, C, H, W] holding per-pixel mean and variance.
    #[arg(long)]
    signal_stats: Option<PathBuf>,
    /// Score model of the structured noise (default, without --noise: the embedded MNIST-digit model,
    /// builtin:digits).
    #[arg(long, conflicts_with = "noise")]
    noise_model: Option<PathBuf>,
    /// Analytic noise prior instead of a noise model: gaussian:STD[:MEAN] (the non-joint baseline) or
    /// sine:STD (Gaussian with the sinusoidal per-row standard deviation).
    #[arg(long)]
    noise: Option<String>,
    /// identity | scale:B | mask:M.npy | matrix:A.npy
    #[arg(long, default_value = "identity")]
    operator: String,
    #[arg(long, default_value_t = 1.0)]
    alpha: f64,
    #[arg(long, value_enum, default_value = "projection")]
    rule: RuleKind,
    #[arg(long, default_value_t = 600)]
    steps: usize,
    /// Consistency weight of the signal (default: the rule's tuned value: projection 0.5, dps 12.7,
    /// pigdm 0.93).
    #[arg(long)]
    lambda: Option<f64>,
    /// Consistency weight of the noise (default: projection 0.5, dps 16.7, pigdm 0.88).
    #[arg(long)]
    mu: Option<f64>,
    /// SDE (default: the signal model's, else vp).
    #[arg(long, value_enum)]
    sde: Option<SdeKind>,
    #[arg(long, default_value_t = 1e-3)]
    eps: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Signal estimate (NCHW float32).
    #[arg(long)]
    out: PathBuf,
    /// Noise estimate.
    #[arg(long)]
    noise_out: Option<PathBuf>,
    /// Posterior samples per measurement (one RNG stream each); with K > 1, --out holds their mean
    /// (the MMSE estimate) and --std-out their per-pixel standard deviation.
    #[arg(long, default_value_t = 1)]
    samples: usize,
    /// Per-pixel posterior standard deviation (with --samples K > 1).
    #[arg(long)]
    std_out: Option<PathBuf>,
    /// Figure: measurement, estimate, noise estimate (and the clean signal if given).
    #[arg(long)]
    png: Option<PathBuf>,
    /// Clean signals, to report PSNR.
    #[arg(long)]
    clean: Option<PathBuf>,
    /// Signal shape C,H,W when neither a model nor stats fix it (matrix operator).
    #[arg(long)]
    signal_shape: Option<String>,
    /// Do not clip the estimate to the data range.
    #[arg(long)]
    no_clip: bool,
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendKind,
}

/// mimalloc: every backend operation returns a fresh tensor, and glibc's malloc hands freed memory of that
/// size back to the kernel and faults it in again (page clearing was about 4% of a forward).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (its position in `mi_option_e`, mimalloc 2.x as built by
/// libmimalloc-sys 0.1).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keep freed memory mapped: by default mimalloc hands it back after 10 ms, and the next step of a sampler
/// faults the same pages in again (page clearing was about 3% of a 600-step denoise, 6-10% of its time).
fn keep_freed_memory() {
    // SAFETY: setting an option is allowed at any time; -1 means "never purge".
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion)
                || matches!(
                    e.kind(),
                    ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                )
            {
                let _ = e.print();
                return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
            }
            // One line, like every other error; the usage is one `--help` away.
            let first = e.to_string();
            let line = first
                .lines()
                .next()
                .unwrap_or("invalid arguments")
                .trim_end();
            eprintln!("{line} (see jointdiff --help)");
            return ExitCode::from(2);
        }
    };
    let quiet = cli.quiet;
    // the whole job on a rayon worker: the backend's parallel loops then start without a hand-off
    let r = jointdiff_cpu::on_worker(|| match cli.cmd {
        Cmd::Info(a) => info(a),
        Cmd::Score(a) => score(a),
        Cmd::Sample(a) => sample(a, quiet),
        Cmd::Corrupt(a) => corrupt(a),
        Cmd::Denoise(a) => denoise(a, quiet),
        Cmd::Train(a) => train::run(a, quiet),
        Cmd::Demo(a) => demo::run(a, quiet),
        Cmd::Bench(BenchCmd::Forward(a)) => bench::forward(a),
        Cmd::Bench(BenchCmd::Gemm(a)) => bench::gemm(a),
    });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

pub(crate) fn progress_bar(quiet: bool, len: usize, what: &str) -> ProgressBar {
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

pub(crate) fn sde_of(kind: SdeKind) -> Sde {
    match kind {
        SdeKind::Vp => Sde::vp_default(),
        SdeKind::Ve => Sde::ve_default(),
        SdeKind::Simple => Sde::simple_default(),
    }
}

pub(crate) fn check_backend(kind: BackendKind) -> Result<()> {
    if kind == BackendKind::Wgpu {
        bail!(
            "--backend wgpu: the GPU backend is not part of this build yet; use cpu or reference"
        );
    }
    Ok(())
}

/// Runs `f` with the backend chosen on the command line.
macro_rules! with_backend {
    ($kind:expr, |$b:ident| $body:expr) => {{
        check_backend($kind)?;
        match $kind {
            BackendKind::Reference => {
                let $b = &RefBackend;
                $body
            }
            _ => {
                let $b = &CpuBackend;
                $body
            }
        }
    }};
}

fn info(a: InfoArgs) -> Result<()> {
    let mf = io::load_model(&a.model)?;
    let m = &mf.meta;
    let params: usize = mf
        .tensors
        .values()
        .map(|(s, _)| s.iter().product::<usize>())
        .sum();
    let [h, w] = m.image_size;
    let (fh, fw) = if h > 0 { (h, w) } else { (28, 28) };
    let gflop = m.net_config().flops(fh, fw) as f64 / 1e9;
    if a.json {
        let v = serde_json::json!({
            "file": a.model.display().to_string(),
            "reference_checkpoint": mf.reference_checkpoint,
            "config": serde_json::from_str::<serde_json::Value>(&m.to_json())?,
            "parameters": params,
            "tensors": mf.tensors.len(),
            "gflop_per_forward": gflop,
            "gflop_at": [fh, fw],
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("file:          {}", a.model.display());
    println!(
        "kind:          {}",
        if mf.reference_checkpoint {
            "reference NCSNv2 checkpoint (no jointdiff metadata)"
        } else {
            "jointdiff model"
        }
    );
    println!(
        "architecture:  {} ngf {} channels {}",
        m.architecture, m.ngf, m.channels
    );
    if h > 0 {
        println!("image size:    {h}x{w}");
    } else {
        println!("image size:    not recorded (any even size)");
    }
    println!("input map:     {:?}", m.input_map);
    println!("sde:           {:?}", m.sde);
    println!("data range:    {:?}", m.data_range);
    println!("parameters:    {params} in {} tensors", mf.tensors.len());
    println!("GFLOP/forward: {gflop:.3} at {fh}x{fw}");
    for (k, v) in &m.provenance {
        println!("provenance:    {k} = {v}");
    }
    Ok(())
}

fn build_net<B: Backend>(b: &B, mf: &ModelFile, path: &Path) -> Result<Ncsnv2<B>> {
    mf.build(b).map_err(|e| anyhow!("{}: {e}", path.display()))
}

fn score(a: ScoreArgs) -> Result<()> {
    if !(a.sigma > 0.0 && a.sigma.is_finite()) {
        bail!("--sigma must be a positive finite number, got {}", a.sigma);
    }
    let mf = io::load_model(&a.model)?;
    let x = io::read_images(&a.input)?;
    check_image_fits(&mf, &a.model, x.shape, &a.input)?;
    let out = with_backend!(a.backend, |b| {
        let net = build_net(b, &mf, &a.model)?;
        net.forward(b, &x)
            .map_err(|e| anyhow!("{}: {e}", a.input.display()))?
    });
    let inv = (1.0 / a.sigma) as f32;
    let data: Vec<f32> = out.data.iter().map(|v| v * inv).collect();
    io::write_npy(&a.out, &out.shape, &data)
}

fn check_image_fits(mf: &ModelFile, model: &Path, shape: [usize; 4], input: &Path) -> Result<()> {
    let [_, c, h, w] = shape;
    if c != mf.meta.channels {
        bail!(
            "{}: has {c} channel(s) but the model {} expects {}",
            input.display(),
            model.display(),
            mf.meta.channels
        );
    }
    let [mh, mw] = mf.meta.image_size;
    if mh > 0 && (mh, mw) != (h, w) {
        bail!(
            "{}: images are {h}x{w} but the model {} was trained at {mh}x{mw}",
            input.display(),
            model.display()
        );
    }
    mf.meta
        .net_config()
        .check_input(shape)
        .map_err(|e| anyhow!("{}: {e}", input.display()))
}

fn parse_size(s: &str) -> Result<[usize; 2]> {
    let parts: Vec<&str> = s.split(['x', ',']).collect();
    let p = |t: &str| {
        t.trim()
            .parse::<usize>()
            .map_err(|_| anyhow!("--size: '{s}' is not H or HxW"))
    };
    match parts[..] {
        [h] => Ok([p(h)?, p(h)?]),
        [h, w] => Ok([p(h)?, p(w)?]),
        _ => bail!("--size: '{s}' is not H or HxW"),
    }
}

fn sample(a: SampleArgs, quiet: bool) -> Result<()> {
    let mf = io::load_model(&a.model)?;
    let [mut h, mut w] = mf.meta.image_size;
    if let Some(s) = &a.size {
        [h, w] = parse_size(s)?;
    }
    if h == 0 {
        bail!(
            "{}: the model does not record its image size; pass --size H[xW]",
            a.model.display()
        );
    }
    mf.meta
        .net_config()
        .check_input([1, mf.meta.channels, h, w])
        .map_err(|e| anyhow!("--size: {e}"))?;
    let config = SamplerConfig {
        sde: a.sde.map(sde_of).unwrap_or(mf.meta.sde),
        steps: a.steps,
        eps: a.eps,
        clip: Some(mf.meta.data_range),
        ..SamplerConfig::default()
    };
    let pb = progress_bar(quiet, a.steps, "sample");
    let out = with_backend!(a.backend, |b| {
        let net = build_net(b, &mf, &a.model)?;
        let prior = NetworkPrior {
            net: &net,
            backend: b,
            image_size: Some([h, w]),
        };
        sample_prior(
            &prior,
            [mf.meta.channels, h, w],
            a.count,
            &config,
            a.seed,
            &mut |k, _| {
                pb.set_position(k as u64);
                true
            },
        )
        .map_err(|e| anyhow!("{e}"))?
    });
    pb.finish_and_clear();
    io::write_npy(&a.out, &out.shape, &out.data)?;
    if let Some(p) = &a.png {
        let cols = (a.count as f64).sqrt().ceil() as usize;
        io::write_png_grid(p, &[(&out, mf.meta.data_range)], Some(cols))?;
    }
    Ok(())
}

/// A parsed `--noise` option.
#[derive(Debug, Clone, Copy)]
enum NoiseSpec {
    Sine { std: f64 },
    Gaussian { std: f64, mean: f64 },
}

fn parse_noise(s: &str) -> Result<NoiseSpec> {
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
        ["sine", std] => NoiseSpec::Sine {
            std: num(std, "std")?,
        },
        ["gaussian", std] => NoiseSpec::Gaussian {
            std: num(std, "std")?,
            mean: 0.0,
        },
        ["gaussian", std, mean] => NoiseSpec::Gaussian {
            std: num(std, "std")?,
            mean: num(mean, "mean")?,
        },
        _ => bail!("--noise {s}: expected sine:STD or gaussian:STD[:MEAN]"),
    };
    let std = match spec {
        NoiseSpec::Sine { std } | NoiseSpec::Gaussian { std, .. } => std,
    };
    if std < 0.0 {
        bail!("--noise {s}: std must be >= 0, got {std}");
    }
    Ok(spec)
}

/// Parses `--operator` for signals of `d` values per item.
fn parse_operator(s: &str, d: usize, item: [usize; 3]) -> Result<Operator> {
    let op = if s == "identity" {
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
    };
    op.out_len(d).map_err(|e| anyhow!("--operator {s}: {e}"))?;
    Ok(op)
}

fn corrupt(a: CorruptArgs) -> Result<()> {
    if !a.alpha.is_finite() {
        bail!("--alpha must be finite");
    }
    let x = io::read_images(&a.signal)?;
    let [n_items, c, h, w] = x.shape;
    let d = c * h * w;
    let op = parse_operator(&a.operator, d, [c, h, w])?;
    let m = op.out_len(d)?;
    let noise_shape = if matches!(op, Operator::Matrix { .. }) {
        [n_items, 1, 1, m]
    } else {
        [n_items, c, h, w]
    };
    let n = match (&a.noise_data, &a.noise) {
        (Some(p), None) => {
            let imgs = io::read_images(p)?;
            if imgs.item_len() != m {
                bail!(
                    "{}: noise images have {} values each ({:?}) but a measurement has {m}",
                    p.display(),
                    imgs.item_len(),
                    &imgs.shape[1..]
                );
            }
            let t = noise::overlay(&imgs, n_items, a.seed)
                .map_err(|e| anyhow!("{}: {e}", p.display()))?;
            Tensor {
                shape: noise_shape,
                data: t.data,
            }
        }
        (None, Some(s)) => match parse_noise(s)? {
            NoiseSpec::Sine { std } => noise::sine(noise_shape, std, a.seed)?,
            NoiseSpec::Gaussian { std, mean } => noise::gaussian(noise_shape, std, mean, a.seed)?,
        },
        _ => {
            bail!("give exactly one of --noise-data N.npy or --noise sine:STD|gaussian:STD[:MEAN]")
        }
    };
    let mut y = Tensor::zeros(noise_shape);
    let alpha = a.alpha as f32;
    for i in 0..n_items {
        let yi = y.item_mut(i);
        op.apply(x.item(i), yi);
        for (v, nv) in yi.iter_mut().zip(n.item(i)) {
            *v += alpha * nv;
        }
    }
    io::write_npy(&a.out, &y.shape, &y.data)?;
    if let Some(p) = &a.noise_out {
        io::write_npy(p, &n.shape, &n.data)?;
    }
    if let Some(p) = &a.png {
        if noise_shape[1..] != x.shape[1..] {
            bail!(
                "--png: measurements are not images for --operator {}",
                a.operator
            );
        }
        io::write_png_grid(
            p,
            &[
                (&x, [0.0, 1.0]),
                (&n, io::symmetric_range(&n)),
                (&y, [0.0, 1.0]),
            ],
            None,
        )?;
    }
    Ok(())
}

fn parse_shape3(s: &str) -> Result<[usize; 3]> {
    let v: Vec<usize> = s
        .split(',')
        .map(|t| t.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| anyhow!("--signal-shape {s}: expected C,H,W"))?;
    match v[..] {
        [c, h, w] if c > 0 && h > 0 && w > 0 => Ok([c, h, w]),
        _ => bail!("--signal-shape {s}: expected C,H,W with positive entries"),
    }
}

fn psnr(a: &[f32], b: &[f32]) -> f64 {
    let mse = a
        .iter()
        .zip(b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    10.0 * (1.0 / mse.max(1e-20)).log10()
}

fn denoise(mut a: DenoiseArgs, quiet: bool) -> Result<()> {
    // Without a prior for one side, the embedded default model takes its place.
    if a.signal_stats.is_none() {
        a.signal_model = Some(io::or_builtin(a.signal_model.as_deref(), "fashion"));
    }
    if a.noise.is_none() {
        a.noise_model = Some(io::or_builtin(a.noise_model.as_deref(), "digits"));
    }
    let (rule, lambda, mu) = a.rule.with_weights(a.lambda, a.mu);
    let y_arr = io::read_array(&a.measurement)?;
    if y_arr.data.is_empty() {
        bail!("{}: measurement is empty", a.measurement.display());
    }
    if let Some(i) = y_arr.data.iter().position(|v| !v.is_finite()) {
        bail!(
            "{}: value {} at index {i} is not finite (NaN or Inf)",
            a.measurement.display(),
            y_arr.data[i]
        );
    }
    let signal_mf = a
        .signal_model
        .as_ref()
        .map(|p| io::load_model(p))
        .transpose()?;
    let noise_mf = a
        .noise_model
        .as_ref()
        .map(|p| io::load_model(p))
        .transpose()?;
    let stats = a
        .signal_stats
        .as_ref()
        .map(|p| io::read_array(p).map(|s| (p, s)))
        .transpose()?;
    let is_matrix = a.operator.starts_with("matrix:");
    // Signal item shape: from the measurement (image operators) or from the model/stats/--signal-shape.
    let signal_item: [usize; 3] = if !is_matrix {
        let t = y_arr
            .clone()
            .into_nchw()
            .map_err(|e| anyhow!("{}: {e}", a.measurement.display()))?;
        [t.shape[1], t.shape[2], t.shape[3]]
    } else if let Some(s) = &a.signal_shape {
        parse_shape3(s)?
    } else if let Some(mf) = &signal_mf {
        let [h, w] = mf.meta.image_size;
        if h == 0 {
            bail!("the signal model does not record its image size; pass --signal-shape C,H,W");
        }
        [mf.meta.channels, h, w]
    } else if let Some((_, s)) = &stats {
        if s.shape.len() != 4 {
            bail!("--signal-stats must have shape [2, C, H, W]");
        }
        [s.shape[1], s.shape[2], s.shape[3]]
    } else {
        bail!("pass --signal-shape C,H,W for a matrix operator");
    };
    let d: usize = signal_item.iter().product();
    let op = parse_operator(&a.operator, d, signal_item)?;
    let m = op.out_len(d)?;
    if y_arr.data.len() % m != 0 {
        bail!(
            "{}: measurement has {} values, not a multiple of the {m} per item the operator gives",
            a.measurement.display(),
            y_arr.data.len()
        );
    }
    let items = y_arr.data.len() / m;
    if let (Some(mf), Some(p)) = (&signal_mf, &a.signal_model) {
        let [_, h, w] = signal_item;
        check_image_fits(mf, p, [items, signal_item[0], h, w], &a.measurement)?;
    }
    // Noise item shape: the noise model's image, else the measurement's shape.
    let noise_item: [usize; 3] = if let (Some(mf), Some(p)) = (&noise_mf, &a.noise_model) {
        let [h, w] = mf.meta.image_size;
        let shape = if !is_matrix {
            signal_item
        } else if h > 0 {
            [mf.meta.channels, h, w]
        } else {
            bail!(
                "{}: the noise model does not record its image size",
                p.display()
            );
        };
        if shape.iter().product::<usize>() != m {
            bail!(
                "{}: noise model items {:?} do not have the {m} values of a measurement",
                p.display(),
                shape
            );
        }
        check_image_fits(mf, p, [items, shape[0], shape[1], shape[2]], &a.measurement)?;
        shape
    } else if is_matrix {
        [1, 1, m]
    } else {
        signal_item
    };
    let signal_gauss = match &stats {
        Some((p, s)) => {
            if s.shape.len() != 4 || s.shape[0] != 2 || s.shape[1..] != signal_item[..] {
                bail!(
                    "{}: stats must have shape [2, {}, {}, {}] (mean and variance), got {:?}",
                    p.display(),
                    signal_item[0],
                    signal_item[1],
                    signal_item[2],
                    s.shape
                );
            }
            let (mean, var) = s.data.split_at(d);
            Some(
                GaussianPrior::new(mean.to_vec(), var.to_vec())
                    .map_err(|e| anyhow!("{}: {e}", p.display()))?,
            )
        }
        None => None,
    };
    let noise_gauss = match &a.noise {
        Some(s) => Some(match parse_noise(s)? {
            NoiseSpec::Gaussian { std, mean } => GaussianPrior::isotropic(mean as f32, std as f32)?,
            NoiseSpec::Sine { std } => {
                let sd = noise::sine_std(noise_item, std)?;
                GaussianPrior::new(vec![0.0], sd.iter().map(|v| v * v).collect())?
            }
        }),
        None => None,
    };
    let sde = match (a.sde, &signal_mf, &noise_mf) {
        (Some(k), _, _) => sde_of(k),
        (None, Some(s), Some(n)) if s.meta.sde != n.meta.sde => bail!(
            "the signal and noise models use different SDEs ({:?} vs {:?}); choose one with --sde",
            s.meta.sde,
            n.meta.sde
        ),
        (None, Some(s), _) => s.meta.sde,
        (None, None, Some(n)) => n.meta.sde,
        (None, None, None) => Sde::vp_default(),
    };
    let range = signal_mf
        .as_ref()
        .map(|m| m.meta.data_range)
        .unwrap_or([0.0, 1.0]);
    if a.samples == 0 {
        bail!("--samples must be at least 1");
    }
    if a.std_out.is_some() && a.samples < 2 {
        bail!("--std-out needs --samples K with K >= 2");
    }
    let config = SamplerConfig {
        sde,
        steps: a.steps,
        eps: a.eps,
        rule,
        lambda,
        mu,
        alpha: a.alpha,
        clip: if a.no_clip { None } else { Some(range) },
    };
    config.validate().map_err(|e| anyhow!("{e}"))?;
    let pb = progress_bar(quiet, a.steps, "denoise");
    let post = with_backend!(a.backend, |b| {
        let snet = signal_mf
            .as_ref()
            .map(|mf| build_net(b, mf, a.signal_model.as_deref().unwrap_or(Path::new(""))))
            .transpose()?;
        let nnet = noise_mf
            .as_ref()
            .map(|mf| build_net(b, mf, a.noise_model.as_deref().unwrap_or(Path::new(""))))
            .transpose()?;
        let sprior_net = snet.as_ref().map(|n| NetworkPrior {
            net: n,
            backend: b,
            image_size: None,
        });
        let nprior_net = nnet.as_ref().map(|n| NetworkPrior {
            net: n,
            backend: b,
            image_size: None,
        });
        let sprior: &dyn Prior = match (&sprior_net, &signal_gauss) {
            (Some(p), _) => p,
            (None, Some(g)) => g,
            _ => bail!("give a signal prior: --signal-model MODEL or --signal-stats STATS.npy"),
        };
        let nprior: &dyn Prior = match (&nprior_net, &noise_gauss) {
            (Some(p), _) => p,
            (None, Some(g)) => g,
            _ => bail!("give a noise prior: --noise-model MODEL or --noise ..."),
        };
        let sampler = JointSampler {
            config,
            operator: &op,
            signal: sprior,
            noise: nprior,
            signal_shape: signal_item,
            noise_shape: noise_item,
            join: &jointdiff_cpu::RayonJoin,
        };
        sampler
            .sample_k(&y_arr.data, a.samples, a.seed, &mut |k, _| {
                pb.set_position(k as u64);
                true
            })
            .map_err(|e| anyhow!("{e}"))?
    });
    pb.finish_and_clear();
    let (post, std) = (post.estimate, post.signal_std);
    io::write_npy(&a.out, &post.signal.shape, &post.signal.data)?;
    if let (Some(p), Some(s)) = (&a.std_out, &std) {
        io::write_npy(p, &s.shape, &s.data)?;
    }
    if let Some(p) = &a.noise_out {
        io::write_npy(p, &post.noise.shape, &post.noise.data)?;
    }
    let clean = a
        .clean
        .as_ref()
        .map(|p| io::read_images(p).map(|t| (p, t)))
        .transpose()?;
    if let Some((p, c)) = &clean {
        if c.shape != post.signal.shape {
            bail!(
                "{}: clean images have shape {:?}, the estimate {:?}",
                p.display(),
                c.shape,
                post.signal.shape
            );
        }
        println!("item  psnr_estimate_db  psnr_measurement_db");
        let mut sums = (0.0, 0.0);
        for i in 0..items {
            let pe = psnr(post.signal.item(i), c.item(i));
            let pm = if !is_matrix {
                psnr(&y_arr.data[i * m..(i + 1) * m], c.item(i))
            } else {
                f64::NAN
            };
            sums.0 += pe;
            sums.1 += pm;
            println!("{i:>4}  {pe:>16.2}  {pm:>19.2}");
        }
        println!(
            "mean  {:>16.2}  {:>19.2}",
            sums.0 / items as f64,
            sums.1 / items as f64
        );
    }
    if let Some(p) = &a.png {
        if is_matrix {
            bail!("--png: measurements of a matrix operator are not images");
        }
        let y_t =
            Tensor::from_vec(post.signal.shape, y_arr.data.clone()).map_err(|e| anyhow!("{e}"))?;
        // rows: [clean,] measurement, signal estimate, noise estimate (signed), [uncertainty]
        let mut rows: Vec<(&Tensor, [f32; 2])> = vec![
            (&y_t, range),
            (&post.signal, range),
            (&post.noise, io::symmetric_range(&post.noise)),
        ];
        if let Some(s) = &std {
            rows.push((s, io::positive_range(s)));
        }
        if let Some((_, c)) = &clean {
            rows.insert(0, (c, range));
        }
        io::write_png_grid(p, &rows, None)?;
    }
    Ok(())
}
