//! `jointdiff bench`: speed of the NCSNv2 forward and of the GEMM kernel on this machine.
use crate::args::{self, BackendArgs, RuleArgs};
use crate::io;
use anyhow::{anyhow, bail, Result};
use clap::{Args, Subcommand};
use jointdiff_core::ncsnv2::{Ncsnv2, Ncsnv2Config};
use jointdiff_core::operator::Operator;
use jointdiff_core::plan::{DenoiseSpec, NoisePrior, SignalPrior};
use jointdiff_core::rng::Rng;
use jointdiff_core::{Backend, Tensor};
use jointdiff_runtime::BackendVisitor;
use std::time::Instant;

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Time NCSNv2 forwards with random weights: ms per forward, images/s, GFLOP/s.
    Forward(BenchForwardArgs),
    /// Time joint sampler steps of a denoise job (the embedded default models, y = 0.5 x + 0.5 n): ms per
    /// step, images/s.
    Step(BenchStepArgs),
    /// GFLOP/s of the CPU backend's GEMM on the matrix shapes of 3x3 convolutions.
    Gemm(BenchGemmArgs),
}

#[derive(Args)]
pub struct BenchForwardArgs {
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
    #[command(flatten)]
    out: BenchOutput,
}

#[derive(Args)]
pub struct BenchStepArgs {
    /// Measurements denoised together (the batch of each network call).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Steps timed (after one warm-up run of 2 steps).
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[command(flatten)]
    rule: RuleArgs,
    /// Noise prior: the embedded digit model (default) or an analytic one (gaussian:STD, sine:STD).
    #[arg(long)]
    noise: Option<String>,
    #[command(flatten)]
    out: BenchOutput,
}

/// Where `bench forward` and `bench step` run and how they report.
#[derive(Args)]
pub struct BenchOutput {
    #[command(flatten)]
    backend: BackendArgs,
    /// Print one JSON object (keys ms_per_forward or ms_per_step, images_per_s, ...).
    #[arg(long)]
    json: bool,
    /// Also list the GPU time per kernel (wgpu, from timestamp queries) of two more runs.
    #[arg(long)]
    profile: bool,
}

#[derive(Args)]
pub struct BenchGemmArgs {
    /// Shapes m,k,n (repeatable); default: the shapes of NCSNv2's convolutions at 28x28.
    #[arg(long)]
    shape: Vec<String>,
    #[arg(long, default_value_t = 20)]
    iters: usize,
    #[arg(long)]
    json: bool,
}

pub fn run(c: BenchCmd) -> Result<()> {
    match c {
        BenchCmd::Forward(a) => forward(a),
        BenchCmd::Step(a) => step(a),
        BenchCmd::Gemm(a) => gemm(a),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median ms of `iters` forwards of a randomly initialised network, on the runtime's backend.
struct TimeForward<'a> {
    cfg: Ncsnv2Config,
    x: &'a Tensor,
    iters: usize,
}

impl BackendVisitor for TimeForward<'_> {
    type Output = Result<f64>;
    fn visit<B: Backend + 'static>(self, b: &B) -> Result<f64> {
        time_forward(b, self.cfg, self.x, self.iters)
    }
}

fn time_forward<B: Backend>(b: &B, cfg: Ncsnv2Config, x: &Tensor, iters: usize) -> Result<f64> {
    let net = Ncsnv2::from_fn(b, cfg, |s| {
        let n: usize = s.shape.iter().product();
        let mut r = Rng::stream(1, 2, n as u64);
        let fan_in: usize = if s.shape.len() == 4 {
            s.shape[1..].iter().product()
        } else {
            1
        };
        let (base, sc) = if s.shape.len() == 4 {
            (0.0, 1.0 / (fan_in as f64).sqrt())
        } else if s.name.ends_with("alpha") || s.name.ends_with("gamma") {
            (1.0, 0.02)
        } else {
            (0.0, 0.02)
        };
        (0..n).map(|_| (base + sc * r.normal()) as f32).collect()
    })
    .map_err(|e| anyhow!("{e}"))?;
    net.forward(b, x).map_err(|e| anyhow!("{e}"))?; // warm-up
    let mut ts = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t0 = Instant::now();
        net.forward(b, x).map_err(|e| anyhow!("{e}"))?;
        ts.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(ts))
}

fn forward(a: BenchForwardArgs) -> Result<()> {
    let rt = a.out.backend.runtime()?;
    if a.iters == 0 || a.batch == 0 {
        bail!("--iters and --batch must be at least 1");
    }
    let cfg = Ncsnv2Config {
        channels: a.channels,
        ngf: a.ngf,
        input_map: true,
    };
    cfg.validate().map_err(|e| anyhow!("{e}"))?;
    cfg.check_input([a.batch, a.channels, a.size, a.size])
        .map_err(|e| anyhow!("--size: {e}"))?;
    let n = a.batch * a.channels * a.size * a.size;
    let mut x = Tensor::zeros([a.batch, a.channels, a.size, a.size]);
    Rng::stream(3, 0, 0).fill_normal(&mut x.data[..n]);
    let ms = rt.run(|| {
        rt.visit(TimeForward {
            cfg,
            x: &x,
            iters: a.iters,
        })
    })?;
    let kernels = if a.out.profile {
        // warm-up + 1 forward, timed per kernel on the GPU
        profiled(&rt, 2, || {
            rt.run(|| {
                rt.visit(TimeForward {
                    cfg,
                    x: &x,
                    iters: 1,
                })
            })
            .map(drop)
        })?
    } else {
        Vec::new()
    };
    let gflop = cfg.flops(a.size, a.size) as f64 * a.batch as f64 / 1e9;
    let images_per_s = a.batch as f64 * 1e3 / ms;
    let gflops = gflop / (ms / 1e3);
    let backend = rt.kind().name();
    let threads = rayon_threads();
    if a.out.json {
        println!(
            "{}",
            serde_json::json!({
                "backend": backend, "size": a.size, "channels": a.channels, "ngf": a.ngf, "batch": a.batch,
                "iters": a.iters, "threads": threads, "gflop_per_forward": gflop,
                "ms_per_forward": ms, "images_per_s": images_per_s, "gflops": gflops,
                "kernels": kernels_json(&kernels, "forward"),
            })
        );
    } else {
        println!(
            "{backend} NCSNv2 {s}x{s}x{c} ngf {g} batch {b} ({threads} threads): {ms:.2} ms/forward, \
             {images_per_s:.1} images/s, {gflops:.1} GFLOP/s ({gflop:.3} GFLOP, median of {i})",
            s = a.size,
            c = a.channels,
            g = a.ngf,
            b = a.batch,
            i = a.iters
        );
        print_kernels(&kernels, "forward");
    }
    Ok(())
}

/// GPU time per kernel over `runs` runs of `f` (forwards or steps), slowest first.
fn profiled(
    rt: &jointdiff_runtime::Runtime,
    runs: usize,
    f: impl FnOnce() -> Result<()>,
) -> Result<Vec<(String, usize, f64)>> {
    rt.gpu_profiling(true)
        .map_err(|e| anyhow!("--profile: {e}"))?;
    let r = f();
    let k = rt.gpu_profile();
    rt.gpu_profiling(false)
        .map_err(|e| anyhow!("--profile: {e}"))?;
    r?;
    Ok(k.into_iter()
        .map(|(n, d, ms)| (n, d / runs, ms / runs as f64))
        .collect())
}

fn kernels_json(k: &[(String, usize, f64)], per: &str) -> serde_json::Value {
    serde_json::Value::Array(
        k.iter()
            .map(|(n, d, ms)| serde_json::json!({"kernel": n, "dispatches_per": per, "dispatches": d, "gpu_ms": ms}))
            .collect(),
    )
}

fn print_kernels(k: &[(String, usize, f64)], per: &str) {
    if k.is_empty() {
        return;
    }
    let total: f64 = k.iter().map(|(_, _, ms)| ms).sum();
    println!("GPU time per {per} (timestamp queries): {total:.2} ms");
    for (n, d, ms) in k {
        println!(
            "  {n:<22} {d:>5} dispatches {ms:>9.3} ms {:>5.1}%",
            100.0 * ms / total.max(1e-12)
        );
    }
}

fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
}

/// A denoise job planned by core, timed on the runtime's backend: wall time of `steps` steps divided by
/// `steps` (after a 2-step warm-up that builds the networks and fills the buffer pools).
fn step(a: BenchStepArgs) -> Result<()> {
    let rt = a.out.backend.runtime()?;
    if a.batch == 0 || a.steps == 0 {
        bail!("--batch and --steps must be at least 1");
    }
    let noise = match &a.noise {
        Some(s) => args::parse_noise(s)?,
        None => NoisePrior::Network(args::network(&io::or_builtin(None, "digits"))?),
    };
    let signal = SignalPrior::Network(args::network(&io::or_builtin(None, "fashion"))?);
    let mut spec = DenoiseSpec::new(signal, noise);
    spec.operator = Operator::Scale(0.5);
    spec.alpha = 0.5;
    spec.rule = a.rule.rule();
    spec.lambda = a.rule.lambda;
    spec.mu = a.rule.mu;
    let shape = [a.batch, 1, 28, 28];
    let mut y = vec![0f32; a.batch * 28 * 28];
    let mut r = Rng::stream(5, 0, 0);
    y.iter_mut().for_each(|v| *v = r.uniform() as f32);
    let mut time = |steps: usize| -> Result<f64> {
        spec.steps = steps;
        let plan = spec.plan(shape).map_err(|e| anyhow!("{e}"))?;
        let t0 = Instant::now();
        rt.run(|| rt.denoise(&plan, &y, 0, &mut |_, _| true))
            .map_err(|e| anyhow!("{e}"))?;
        Ok(t0.elapsed().as_secs_f64() * 1e3)
    };
    time(2)?;
    let ms = time(a.steps)? / a.steps as f64;
    let kernels = if a.out.profile {
        profiled(&rt, 2, || time(2).map(drop))?
    } else {
        Vec::new()
    };
    let images_per_s = a.batch as f64 * 1e3 / ms;
    let rule = a.rule.rule().name();
    let noise = a.noise.as_deref().unwrap_or("builtin:digits");
    if a.out.json {
        println!(
            "{}",
            serde_json::json!({
                "backend": rt.kind().name(), "batch": a.batch, "steps": a.steps, "rule": rule,
                "noise": noise, "threads": rayon_threads(), "ms_per_step": ms, "images_per_s": images_per_s,
                "kernels": kernels_json(&kernels, "step"),
            })
        );
    } else {
        println!(
            "{} joint step, 28x28 ngf 32 models, noise {noise}, rule {rule}, batch {} ({} threads): \
             {ms:.2} ms/step, {images_per_s:.1} images/s ({} steps)",
            rt.kind().name(),
            a.batch,
            rayon_threads(),
            a.steps
        );
        print_kernels(&kernels, "step");
    }
    Ok(())
}

fn gemm(a: BenchGemmArgs) -> Result<()> {
    let shapes: Vec<[usize; 3]> = if a.shape.is_empty() {
        vec![
            [32, 288, 784],
            [64, 576, 196],
            [64, 576, 784],
            [256, 2304, 1024],
            [1024, 1024, 1024],
        ]
    } else {
        a.shape
            .iter()
            .map(|s| {
                let v: Vec<usize> = s
                    .split([',', 'x'])
                    .filter_map(|t| t.trim().parse().ok())
                    .collect();
                match v[..] {
                    [m, k, n] if m > 0 && k > 0 && n > 0 => Ok([m, k, n]),
                    _ => Err(anyhow!("--shape {s}: expected m,k,n")),
                }
            })
            .collect::<Result<_>>()?
    };
    let mut rows = Vec::new();
    for [m, k, n] in shapes {
        let mut r = Rng::stream(4, 0, 0);
        let mut av = vec![0f32; m * k];
        let mut bv = vec![0f32; k * n];
        r.fill_normal(&mut av);
        r.fill_normal(&mut bv);
        let mut c = vec![0f32; m * n];
        jointdiff_runtime::cpu::gemm(m, k, n, &av, &bv, &mut c);
        let iters = a.iters.max(1);
        let mut ts = Vec::with_capacity(iters);
        for _ in 0..iters {
            let t0 = Instant::now();
            jointdiff_runtime::cpu::gemm(m, k, n, &av, &bv, &mut c);
            ts.push(t0.elapsed().as_secs_f64());
        }
        let s = median(ts);
        let gflops = 2.0 * (m * k * n) as f64 / s / 1e9;
        rows.push(serde_json::json!({"m": m, "k": k, "n": n, "gflops": gflops, "ms": s * 1e3}));
        if !a.json {
            println!(
                "gemm {m:>5} x {k:>5} x {n:>5}: {gflops:7.1} GFLOP/s ({:.3} ms)",
                s * 1e3
            );
        }
    }
    if a.json {
        println!(
            "{}",
            serde_json::json!({"kernel": jointdiff_runtime::cpu::GEMM_KERNEL, "threads": rayon_threads(), "results": rows})
        );
    } else {
        println!(
            "kernel: {}, threads: {}",
            jointdiff_runtime::cpu::GEMM_KERNEL,
            rayon_threads()
        );
    }
    Ok(())
}
