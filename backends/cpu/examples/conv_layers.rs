//! Per-layer convolution times of one NCSNv2 forward, every path this CPU has side by side (the figures of
//! BENCHMARKS.md, "Per layer"). Random weights; each distinct layer shape is timed on its own, its paths
//! alternating, the fastest of `--iters` runs each (the minimum: on a shared machine, a run that another
//! process interrupts is only ever slower).
//!
//!   cargo run --release -p jointdiff-cpu --example conv_layers -- [--size 32] [--channels 3] [--ngf 128]
//!       [--batch 1] [--iters 9] [--vjp]
//!
//! `--vjp` times the input-gradient convolutions (the flipped, transposed kernels dps and pigdm run) instead.
//! Threads: `RAYON_NUM_THREADS`; the timing runs on a pool worker with the other workers awake, as the CLI's
//! jobs do (`jointdiff_cpu::on_worker`).
use jointdiff_core::backend::Conv2dParams;
use jointdiff_core::ncsnv2::{Ncsnv2, Ncsnv2Config};
use jointdiff_core::reference;
use jointdiff_core::rng::Rng;
use jointdiff_core::Tensor;
use jointdiff_cpu::{layers, CpuBackend, CpuTensor};
use std::collections::BTreeMap;
use std::time::Instant;

/// ci, co, kernel size, height, width, padding, dilation
type Layer = (usize, usize, usize, usize, usize, usize, usize);

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect("a number"))
}

fn rand(shape: [usize; 4], seed: u64) -> Tensor {
    let mut t = Tensor::zeros(shape);
    Rng::stream(seed, 3, 0).fill_normal(&mut t.data);
    t
}

fn main() {
    // on a worker with the pool's other threads awake, as the CLI runs its jobs (`on_worker`): each
    // convolution's parallel loop then starts on every thread at once
    jointdiff_cpu::on_worker(run);
}

fn run() {
    let args: Vec<String> = std::env::args().collect();
    let (size, channels, ngf) = (
        arg(&args, "--size", 32),
        arg(&args, "--channels", 3),
        arg(&args, "--ngf", 128),
    );
    let (batch, iters) = (arg(&args, "--batch", 1), arg(&args, "--iters", 9).max(1));
    let vjp = args.iter().any(|a| a == "--vjp");
    let cfg = Ncsnv2Config {
        channels,
        ngf,
        input_map: true,
    };
    let b = CpuBackend;
    let net = Ncsnv2::from_fn(&b, cfg, |s| {
        let n: usize = s.shape.iter().product();
        let mut r = Rng::stream(1, 2, n as u64);
        (0..n).map(|_| 0.05 * r.normal() as f32).collect()
    })
    .expect("network");
    let x = rand([batch, channels, size, size], 7);
    let (_, calls) = layers::recorded(|| net.forward(&b, &x).expect("forward"));
    // distinct shapes, with how often one forward runs each
    let mut shapes: BTreeMap<Layer, usize> = BTreeMap::new();
    for (xs, ws, p) in &calls {
        let [_, ci, h, wd] = *xs;
        let [co, _, k, _] = *ws;
        *shapes
            .entry((ci, co, k, h, wd, p.padding, p.dilation))
            .or_default() += 1;
    }
    println!(
        "NCSNv2 {size}x{size}x{channels} ngf {ngf} batch {batch}, {}, {} threads, kernel {:?}: ms per call (fastest of {iters})",
        if vjp { "input-gradient convolutions" } else { "forward convolutions" },
        rayon::current_num_threads(),
        jointdiff_cpu::kernel()
    );
    println!("| ci -> co | k | image | pad/dil | calls | path ms ... | best vs im2col |");
    println!("|---|---|---|---|---|---|---|");
    let mut totals: BTreeMap<&str, f64> = BTreeMap::new();
    for ((ci, co, k, h, wd, pad, dil), count) in shapes {
        let p = Conv2dParams {
            padding: pad,
            dilation: dil,
        };
        // the input gradient of a ci -> co convolution is a co -> ci one with the flipped kernel
        let w0 = rand([co, ci, k, k], 2);
        let (xin, w, q) = if vjp {
            let ho = reference::conv_out(h, k, p);
            let wo = reference::conv_out(wd, k, p);
            match reference::backward_input_params(w0.shape, [ho, wo], p) {
                Some(q) => (
                    rand([batch, co, ho, wo], 1),
                    reference::flip_transpose(&w0),
                    q,
                ),
                None => continue,
            }
        } else {
            (rand([batch, ci, h, wd], 1), w0, p)
        };
        let w = CpuTensor::from(w);
        let paths = layers::paths(w.shape, q);
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
        for it in 0..=iters {
            for (path, t) in paths.iter().zip(&mut times) {
                let t0 = Instant::now();
                // into a CpuTensor, so that its storage goes back to the pool as in a network
                drop(std::hint::black_box(CpuTensor::from(layers::run(
                    path, &xin, &w, None, q,
                ))));
                if it > 0 {
                    t.push(t0.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
        let med: Vec<f64> = times
            .into_iter()
            .map(|t| t.iter().copied().fold(f64::INFINITY, f64::min))
            .collect();
        let cells: Vec<String> = paths
            .iter()
            .zip(&med)
            .map(|(p, m)| format!("{p} {m:.3}"))
            .collect();
        let best = med[1..].iter().copied().fold(f64::INFINITY, f64::min);
        let (wci, wco) = (w.shape[1], w.shape[0]);
        println!(
            "| {wci} -> {wco} | {k} | {}x{} | {}/{} | {count} | {} | {:.2}x |",
            xin.shape[2],
            xin.shape[3],
            q.padding,
            q.dilation,
            cells.join(", "),
            med[0] / best
        );
        for (p, m) in paths.iter().zip(&med) {
            *totals.entry(p).or_default() += m * count as f64;
        }
        // the path the backend picks by default, for the total
        let chosen = layers::chosen(xin.shape, w.shape, q);
        let i = paths.iter().position(|p| *p == chosen).unwrap_or(0);
        *totals.entry("chosen").or_default() += med[i] * count as f64;
    }
    let line: Vec<String> = totals.iter().map(|(p, t)| format!("{p} {t:.2}")).collect();
    println!("\nms per forward, summed over layers (a path that does not take every layer sums fewer): {}", line.join(", "));
}
