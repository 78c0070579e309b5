//! The embedded default models learned their own data, and only their own data (the joint method needs
//! the two priors to tell signal from noise):
//! * Tweedie's estimate `x̂0 = (z + s(t) net(z)) / a(t)` with each model on held-out images of its own kind
//!   is far closer to the clean images than the rescaled noisy input `z / a(t)` (oracle: the clean images);
//! * each model's denoising score-matching loss is lower on its own held-out data than on the other
//!   model's data (same times and noise for both).
use jointdiff_core::defaults;
use jointdiff_core::rng::Rng;
use jointdiff_core::train::validation_loss;
use jointdiff_core::{Ncsnv2, Tensor};
use jointdiff_cpu::CpuBackend;
use jointdiff_tests::read_npy;

fn model(name: &str) -> (Ncsnv2<CpuBackend>, jointdiff_core::sde::Sde) {
    let mf = defaults::by_name(name).unwrap().unwrap();
    (mf.build(&CpuBackend).unwrap(), mf.meta.sde)
}

fn mse(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(p, q)| ((p - q) as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64
}

#[test]
fn tweedie_estimate_of_each_default_model_denoises_its_own_data() {
    for (name, data) in [
        ("fashion", "data/fashion_t10k_16.npy"),
        ("digits", "data/digits_heldout_16.npy"),
    ] {
        let (net, sde) = model(name);
        let x = read_npy(data);
        for t in [0.1, 0.3, 0.5] {
            let (a, s) = (sde.a(t), sde.s(t));
            let mut w = Tensor::zeros(x.shape);
            Rng::stream(3, 0, (t * 1000.0) as u64).fill_normal(&mut w.data);
            let z = Tensor {
                shape: x.shape,
                data: x
                    .data
                    .iter()
                    .zip(&w.data)
                    .map(|(xv, wv)| (a * *xv as f64 + s * *wv as f64) as f32)
                    .collect(),
            };
            let out = net.forward(&CpuBackend, &z).unwrap();
            let x0: Vec<f32> = z
                .data
                .iter()
                .zip(&out.data)
                .map(|(zv, ov)| ((*zv as f64 + s * *ov as f64) / a) as f32)
                .collect();
            let noisy: Vec<f32> = z.data.iter().map(|v| (*v as f64 / a) as f32).collect();
            let (e_noisy, e_hat) = (mse(&noisy, &x.data), mse(&x0, &x.data));
            println!("{name} t={t}: mse noisy {e_noisy:.4}, Tweedie {e_hat:.4}");
            assert!(
                e_hat < 0.2 * e_noisy,
                "{name} at t={t}: Tweedie MSE {e_hat} is not well below the noisy input's {e_noisy}"
            );
        }
    }
}

#[test]
fn each_default_model_fits_its_own_data_better_than_the_other() {
    let fashion = read_npy("data/fashion_t10k_16.npy");
    let digits = read_npy("data/digits_heldout_16.npy");
    let (fnet, sde) = model("fashion");
    let (dnet, _) = model("digits");
    let loss = |net: &Ncsnv2<CpuBackend>, data: &Tensor| {
        validation_loss(&CpuBackend, net, &sde, data, 11, 16).unwrap()
    };
    let (ff, fd) = (loss(&fnet, &fashion), loss(&fnet, &digits));
    let (dd, df) = (loss(&dnet, &digits), loss(&dnet, &fashion));
    println!("fashion model: {ff:.2} on fashion, {fd:.2} on digits; digits model: {dd:.2} on digits, {df:.2} on fashion");
    assert!(
        ff < fd,
        "fashion model fits digits better ({fd}) than fashion ({ff})"
    );
    assert!(
        dd < df,
        "digits model fits fashion better ({df}) than digits ({dd})"
    );
}

#[test]
fn validation_loss_agrees_with_the_pytorch_trainers_record() {
    // The PyTorch trainer recorded each model's validation loss (its EMA weights, 1000 held-out images, its
    // own random times and noise) in the metadata. jointdiff's loss of the same weights on 200 of those
    // images, with its own draws, must agree within 3.5 standard errors of the 200-image mean: the two
    // implementations compute the same objective.
    use jointdiff_core::train::dsm_loss;
    for (name, data) in [
        ("fashion", "data/fashion_t10k_200.npy"),
        ("digits", "data/digits_heldout_200.npy"),
    ] {
        let mf = defaults::by_name(name).unwrap().unwrap();
        let recorded: f64 = mf.meta.provenance["validation_loss"].parse().unwrap();
        let net = mf.build(&CpuBackend).unwrap();
        let x = read_npy(data);
        let mut per = Vec::new();
        for i in 0..x.shape[0] {
            let xi = Tensor::from_vec([1, 1, 28, 28], x.item(i).to_vec()).unwrap();
            let mut r = Rng::stream(21, 0, i as u64);
            let t = 1e-3 + (1.0 - 1e-3) * r.uniform();
            let mut w = Tensor::zeros(xi.shape);
            r.fill_normal(&mut w.data);
            per.push(
                dsm_loss(&CpuBackend, &net, &mf.meta.sde, &xi, &[t], &w)
                    .unwrap()
                    .0,
            );
        }
        let n = per.len() as f64;
        let mean = per.iter().sum::<f64>() / n;
        let se = (per.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0) / n).sqrt();
        println!(
            "{name}: jointdiff {mean:.2} ± {se:.2} (SE), PyTorch trainer recorded {recorded:.2}"
        );
        assert!(
            (mean - recorded).abs() < 3.5 * se,
            "{name}: {mean} vs recorded {recorded} (SE {se})"
        );
    }
}
