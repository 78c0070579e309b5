//! `jointdiff bench`: speed of the NCSNv2 forward and of the GEMM kernel on this machine.
use crate::{check_backend, BackendKind, BenchForwardArgs, BenchGemmArgs};
use anyhow::{anyhow, bail, Result};
use jointdiff_core::ncsnv2::{Ncsnv2, Ncsnv2Config};
use jointdiff_core::rng::Rng;
use jointdiff_core::{Backend, RefBackend, Tensor};
use jointdiff_cpu::CpuBackend;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
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

pub fn forward(a: BenchForwardArgs) -> Result<()> {
    check_backend(a.backend)?;
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
    let ms = match a.backend {
        BackendKind::Reference => time_forward(&RefBackend, cfg, &x, a.iters)?,
        _ => time_forward(&CpuBackend, cfg, &x, a.iters)?,
    };
    let gflop = cfg.flops(a.size, a.size) as f64 * a.batch as f64 / 1e9;
    let images_per_s = a.batch as f64 * 1e3 / ms;
    let gflops = gflop / (ms / 1e3);
    let backend = if a.backend == BackendKind::Reference {
        "reference"
    } else {
        "cpu"
    };
    let threads = rayon_threads();
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "backend": backend, "size": a.size, "channels": a.channels, "ngf": a.ngf, "batch": a.batch,
                "iters": a.iters, "threads": threads, "gflop_per_forward": gflop,
                "ms_per_forward": ms, "images_per_s": images_per_s, "gflops": gflops,
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
    }
    Ok(())
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

pub fn gemm(a: BenchGemmArgs) -> Result<()> {
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
        jointdiff_cpu::gemm(m, k, n, &av, &bv, &mut c);
        let iters = a.iters.max(1);
        let mut ts = Vec::with_capacity(iters);
        for _ in 0..iters {
            let t0 = Instant::now();
            jointdiff_cpu::gemm(m, k, n, &av, &bv, &mut c);
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
            serde_json::json!({"kernel": jointdiff_cpu::GEMM_KERNEL, "threads": rayon_threads(), "results": rows})
        );
    } else {
        println!(
            "kernel: {}, threads: {}",
            jointdiff_cpu::GEMM_KERNEL,
            rayon_threads()
        );
    }
    Ok(())
}
