//! Dispatch overhead: N tiny elementwise ops and one read-back.
use jointdiff_core::{Backend, Tensor};
use std::time::Instant;
fn main() {
    let g = jointdiff_wgpu::WgpuBackend::new().unwrap();
    let x = g.upload(&Tensor::zeros([1, 32, 28, 28]));
    for n in [10usize, 300, 1000] {
        let t0 = Instant::now();
        let mut y = x.clone();
        for _ in 0..n {
            y = g.add(&y, &x);
        }
        let rec = t0.elapsed().as_secs_f64() * 1e3;
        g.download(&y).unwrap();
        let tot = t0.elapsed().as_secs_f64() * 1e3;
        println!(
            "{n} adds: record {rec:.1} ms, total {tot:.1} ms, {:.3} ms per op",
            tot / n as f64
        );
    }
}
