//! Proof of residency (DESIGN §5): the sampler's state stays in backend tensors. On a backend that counts
//! transfers (`Counting`), after the first step a sampler step uploads only its Gaussian noise (w_x and w_n,
//! and xi for the projection rule) and reads back nothing but the non-finite flag, for projection, dps and
//! pigdm, with network and Gaussian priors and with a diagonal and a dense operator. `x` and `n` come down
//! once, at the end. Run on the CPU backend and on the GPU backend.
use jointdiff_core::ncsnv2::{Ncsnv2, Ncsnv2Config};
use jointdiff_core::operator::Operator;
use jointdiff_core::prior::{GaussianPrior, NetworkPrior, Prior};
use jointdiff_core::rng::Rng;
use jointdiff_core::sampler::{JointSampler, Rule, SamplerConfig};
use jointdiff_core::Backend;
use jointdiff_cpu::CpuBackend;
use jointdiff_tests::counting::{Counting, Snapshot};
use jointdiff_tests::init_by_name;

const STEPS: usize = 4;

/// (name, operator, signal prior, noise prior, noise item)
type Case<'a, B> = (
    &'a str,
    &'a Operator,
    &'a dyn Prior<B>,
    &'a dyn Prior<B>,
    [usize; 3],
);

#[test]
fn a_step_uploads_its_noise_and_reads_back_one_flag() {
    check(Counting::new(CpuBackend));
}

/// The same on the GPU backend (lavapipe in CI; without an adapter it says so and passes unless
/// `JOINTDIFF_REQUIRE_GPU=1`).
#[test]
fn on_the_gpu_backend_too() {
    match jointdiff_wgpu::WgpuBackend::new() {
        Ok(g) => check(Counting::new(g)),
        Err(e) => {
            assert!(
                std::env::var("JOINTDIFF_REQUIRE_GPU").as_deref() != Ok("1"),
                "JOINTDIFF_REQUIRE_GPU=1 but no wgpu adapter: {e}"
            );
            eprintln!("\n*** NO WGPU ADAPTER: the GPU residency check did not run ({e}) ***\n");
        }
    }
}

fn check<B: Backend + 'static>(b: Counting<B>) {
    let item = [1, 8, 8];
    let d = 64;
    let items = 2;
    let cfg = Ncsnv2Config {
        channels: 1,
        ngf: 4,
        input_map: true,
    };
    let net = Ncsnv2::from_fn(&b, cfg, init_by_name).unwrap();
    let net_prior = NetworkPrior {
        net: &net,
        image_size: Some([8, 8]),
    };
    let gauss = GaussianPrior::new(vec![0.3], vec![0.5])
        .unwrap()
        .on(&b, item)
        .unwrap();
    let mut r = Rng::stream(1, 0, 0);
    let mut a = vec![0f32; 32 * d];
    r.fill_normal(&mut a);
    let matrix = Operator::Matrix { m: 32, d, a };
    let dense_noise = GaussianPrior::new(vec![0.0], vec![0.1])
        .unwrap()
        .on(&b, [1, 1, 32])
        .unwrap();
    let cases: [Case<'_, _>; 3] = [
        (
            "networks, scale",
            &Operator::Scale(0.5),
            &net_prior,
            &net_prior,
            item,
        ),
        (
            "network + Gaussian, identity",
            &Operator::Identity,
            &net_prior,
            &gauss,
            item,
        ),
        (
            "Gaussian, matrix",
            &matrix,
            &gauss,
            &dense_noise,
            [1, 1, 32],
        ),
    ];
    for (name, op, sp, np, noise_item) in cases {
        for rule in [Rule::Projection, Rule::Dps, Rule::Pigdm] {
            let (lambda, mu) = rule.default_weights();
            let config = SamplerConfig {
                steps: STEPS,
                rule,
                lambda,
                mu,
                alpha: 0.5,
                ..SamplerConfig::default()
            };
            let sampler =
                JointSampler::new(&b, config, op, None, sp, np, item, noise_item).unwrap();
            let m: usize = noise_item.iter().product();
            let y = vec![0.25f32; items * m];
            let before = b.snapshot();
            let mut at_step: Vec<Snapshot> = Vec::new();
            let post = sampler
                .sample(&y, 3, &mut |_, _| {
                    at_step.push(b.snapshot());
                    true
                })
                .unwrap();
            let after = b.snapshot();
            assert!(post.signal.data.iter().all(|v| v.is_finite()));
            let noise_tensors = if rule == Rule::Projection { 3 } else { 2 };
            let noise_values = items * (d + m + if rule == Rule::Projection { m } else { 0 });
            for k in 1..STEPS {
                let [u, uv, dl, fl] = std::array::from_fn(|i| at_step[k][i] - at_step[k - 1][i]);
                assert_eq!(
                    (u, uv, dl, fl),
                    (noise_tensors, noise_values, 0, 1),
                    "{name}, {rule:?}, step {}: (uploads, values uploaded, downloads, flag reads)",
                    k + 1
                );
            }
            // the end: the two estimates come down, nothing else
            assert_eq!(
                after[2] - at_step[STEPS - 1][2],
                2,
                "{name}, {rule:?}: final downloads"
            );
            assert_eq!(
                at_step[0][2] - before[2],
                0,
                "{name}, {rule:?}: first step downloads"
            );
            println!(
                "{name}, {rule:?}: whole run {} uploads ({} values), {} downloads, {} flag reads",
                after[0] - before[0],
                after[1] - before[1],
                after[2] - before[2],
                after[3] - before[3]
            );
        }
    }
}
