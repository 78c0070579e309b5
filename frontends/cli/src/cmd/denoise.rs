//! `jointdiff denoise`: joint posterior sampling of measurements. Builds core's `DenoiseSpec` from the
//! options, plans it for the measurement's shape (every check is the plan's) and runs it on the chosen
//! backend; reading, writing and reporting stay here.
use crate::args::{
    self, progress_bar, step_progress, BackendArgs, OperatorArgs, RuleArgs, SamplingArgs,
};
use crate::io;
use anyhow::{anyhow, bail, Result};
use clap::Args;
use jointdiff_core::metrics::psnr;
use jointdiff_core::plan::{DenoiseSpec, GaussianStats, NoisePrior, SignalPrior};
use jointdiff_core::Tensor;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct DenoiseArgs {
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
    #[command(flatten)]
    op: OperatorArgs,
    #[command(flatten)]
    rule: RuleArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Reverse-time steps (the default was chosen by measurement: docs/results.md).
    #[arg(long, default_value_t = jointdiff_core::plan::DEFAULT_STEPS)]
    steps: usize,
    /// Signal estimate (NCHW float32).
    #[arg(long)]
    out: PathBuf,
    /// Noise estimate.
    #[arg(long)]
    noise_out: Option<PathBuf>,
    /// Posterior samples per measurement (one RNG stream each); with K > 1, --out holds their mean
    /// (the MMSE estimate) and --std-out their per-pixel standard deviation.
    #[arg(long, default_value_t = jointdiff_core::plan::DEFAULT_SAMPLES)]
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
    /// Denoise N measurements at a time and write the outputs after each piece: a run stopped by Ctrl-C
    /// (or killed) keeps every finished measurement in --out, --noise-out and --std-out. The result is the
    /// same bits as one run over all measurements.
    #[arg(long)]
    chunk: Option<usize>,
    #[command(flatten)]
    backend: BackendArgs,
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

/// `--signal-stats`: `[2, C, H, W]`, per-value mean then variance.
fn read_stats(p: &Path) -> Result<GaussianStats> {
    let s = io::read_array(p)?;
    match s.shape[..] {
        [2, c, h, w] => {
            let d = c * h * w;
            Ok(GaussianStats {
                item: [c, h, w],
                mean: s.data[..d].to_vec(),
                var: s.data[d..].to_vec(),
            })
        }
        _ => bail!(
            "{}: stats must have shape [2, C, H, W] (mean and variance), got {:?}",
            p.display(),
            s.shape
        ),
    }
}

/// The options as core's denoise spec; `item` is the measurement's `[C, H, W]` (a mask's shape).
fn spec(a: &DenoiseArgs, item: [usize; 3]) -> Result<DenoiseSpec> {
    // Without a prior for one side, the embedded default model takes its place.
    let signal = match &a.signal_stats {
        Some(p) => SignalPrior::Gaussian(read_stats(p)?),
        None => SignalPrior::Network(args::network(&io::or_builtin(
            a.signal_model.as_deref(),
            "fashion",
        ))?),
    };
    let noise = match &a.noise {
        Some(s) => args::parse_noise(s)?,
        None => NoisePrior::Network(args::network(&io::or_builtin(
            a.noise_model.as_deref(),
            "digits",
        ))?),
    };
    let mut spec = DenoiseSpec::new(signal, noise);
    spec.operator = a.op.parse(item)?;
    spec.alpha = a.op.alpha;
    spec.rule = a.rule.rule();
    spec.lambda = a.rule.lambda;
    spec.mu = a.rule.mu;
    spec.sde = a.sampling.sde();
    spec.steps = a.steps;
    spec.eps = a.sampling.eps;
    spec.samples = a.samples;
    spec.clip = !a.no_clip;
    spec.signal_shape = a.signal_shape.as_deref().map(parse_shape3).transpose()?;
    Ok(spec)
}

pub fn run(a: DenoiseArgs, quiet: bool) -> Result<()> {
    let rt = a.backend.runtime()?;
    if a.std_out.is_some() && a.samples < 2 {
        bail!("--std-out needs --samples K with K >= 2");
    }
    let ypath = a.measurement.display().to_string();
    let y_arr = io::read_array(&a.measurement)?;
    // images: NCHW (CHW, HW); a matrix operator reads any layout as consecutive items of m values
    let shape = match y_arr.nchw_shape() {
        Ok(s) => s,
        Err(_) if a.op.is_matrix() => [1, 1, 1, y_arr.data.len()],
        Err(e) => bail!("{ypath}: {e}"),
    };
    let spec = spec(&a, [shape[1], shape[2], shape[3]])?;
    let plan = spec.plan(shape).map_err(|e| anyhow!("{ypath}: {e}"))?;
    io::check_writable([
        Some(a.out.as_path()),
        a.noise_out.as_deref(),
        a.std_out.as_deref(),
        a.png.as_deref(),
    ])?;
    let (items, m) = (plan.items, plan.noise_len() / plan.items);
    let chunk = a.chunk.unwrap_or(items);
    if chunk == 0 {
        bail!("--chunk must be at least 1");
    }
    // the outputs grow piece by piece; each write is whole (temporary file and rename)
    let (mut sig, mut noi, mut sd) = (Vec::new(), Vec::new(), Vec::new());
    let (mut sig_shape, mut noi_shape) = ([0; 4], [0; 4]);
    let mut start = 0;
    while start < items {
        let end = (start + chunk).min(items);
        let piece = if end - start == items {
            plan.clone()
        } else {
            spec.plan([end - start, shape[1], shape[2], shape[3]])
                .map_err(|e| anyhow!("{ypath}: {e}"))?
        };
        let what = if chunk < items {
            format!("denoise {start}-{end} of {items}")
        } else {
            "denoise".to_string()
        };
        let pb = progress_bar(quiet, plan.config.steps, &what);
        let r = rt
            .run(|| {
                rt.denoise_from(
                    &piece,
                    &y_arr.data[start * m..end * m],
                    a.sampling.seed,
                    start as u64,
                    &mut step_progress(&pb),
                )
            })
            .map_err(|e| {
                if start > 0 && args::interrupted() {
                    anyhow!(
                        "interrupted (Ctrl-C) in measurements {start}-{end}: the outputs hold the first \
                         {start} of {items} measurements"
                    )
                } else {
                    args::run_error(format!("{ypath}: {e}"))
                }
            })?;
        pb.finish_and_clear();
        sig.extend_from_slice(&r.estimate.signal.data);
        noi.extend_from_slice(&r.estimate.noise.data);
        if let Some(s) = &r.signal_std {
            sd.extend_from_slice(&s.data);
        }
        let [_, c, h, w] = r.estimate.signal.shape;
        sig_shape = [end, c, h, w];
        let [_, c, h, w] = r.estimate.noise.shape;
        noi_shape = [end, c, h, w];
        io::write_npy(&a.out, &sig_shape, &sig)?;
        if let (Some(p), true) = (&a.std_out, !sd.is_empty()) {
            io::write_npy(p, &sig_shape, &sd)?;
        }
        if let Some(p) = &a.noise_out {
            io::write_npy(p, &noi_shape, &noi)?;
        }
        start = end;
    }
    let t = |shape, data| Tensor::from_vec(shape, data).map_err(|e| anyhow!("{e}"));
    let post = jointdiff_core::sampler::Posterior {
        signal: t(sig_shape, sig)?,
        noise: t(noi_shape, noi)?,
    };
    let std = if sd.is_empty() {
        None
    } else {
        Some(t(sig_shape, sd)?)
    };
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
            let pe = psnr(post.signal.item(i), c.item(i), 1.0);
            let pm = if !plan.is_matrix() {
                psnr(&y_arr.data[i * m..(i + 1) * m], c.item(i), 1.0)
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
        if plan.is_matrix() {
            bail!("--png: measurements of a matrix operator are not images");
        }
        let range = plan.data_range;
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
