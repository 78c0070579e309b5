//! Times one NCSNv2 forward on the reference and the CPU backend, side by side in one run.
//!
//!     cargo run --release -p jointdiff-cpu --example forward_time -- [SIZE] [CHANNELS] [NGF] [BATCH] [ITERS]
//!
//! Random weights (the timing does not depend on their values); prints the median ms per forward,
//! images/s and GFLOP/s (convolution FLOPs: 2 * out_elems * in_channels * kh * kw).
use jointdiff_core::ncsnv2::{Ncsnv2, Ncsnv2Config};
use jointdiff_core::rng::Rng;
use jointdiff_core::{Backend, RefBackend, Tensor};
use jointdiff_cpu::CpuBackend;
use std::time::Instant;

fn time<B: Backend>(b: &B, cfg: Ncsnv2Config, x: &Tensor, iters: usize) -> f64 {
    let net = Ncsnv2::from_fn(b, cfg, |s| {
        let mut r = Rng::stream(1, 2, s.shape.iter().product::<usize>() as u64);
        let n: usize = s.shape.iter().product();
        (0..n).map(|_| 1.0 + 0.05 * r.normal() as f32).collect()
    })
    .expect("valid config");
    net.forward(b, x).expect("forward"); // warm-up
    let mut ts: Vec<f64> = (0..iters)
        .map(|_| {
            let t0 = Instant::now();
            net.forward(b, x).expect("forward");
            t0.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ts.sort_by(|a, b| a.total_cmp(b));
    ts[ts.len() / 2]
}

fn main() {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().expect("numbers"))
        .collect();
    let get = |i: usize, d: usize| a.get(i).copied().unwrap_or(d);
    let (size, ch, ngf, batch, iters) = (get(0, 28), get(1, 1), get(2, 32), get(3, 1), get(4, 5));
    let cfg = Ncsnv2Config {
        channels: ch,
        ngf,
        input_map: true,
    };
    let gflop = cfg.flops(size, size) as f64 / 1e9 * batch as f64;
    let x = Tensor {
        shape: [batch, ch, size, size],
        data: vec![0.5; batch * ch * size * size],
    };
    println!("NCSNv2 {size}x{size}x{ch} ngf {ngf} batch {batch}: {gflop:.3} GFLOP per forward, median of {iters}");
    for (name, ms) in [
        ("reference", time(&RefBackend, cfg, &x, iters)),
        ("cpu", time(&CpuBackend, cfg, &x, iters)),
    ] {
        println!(
            "{name:>10}: {ms:9.2} ms/forward  {:8.2} images/s  {:7.2} GFLOP/s",
            batch as f64 * 1e3 / ms,
            gflop / (ms / 1e3)
        );
    }
}
