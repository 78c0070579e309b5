//! The wgpu backend against the reference backend (every kernel, odd shapes), the PyTorch golden fixtures,
//! the network's input VJP, and a 20-step pigdm joint denoise against the CPU backend.
//!
//! Runs on whatever adapter wgpu finds; CI runs it on lavapipe (Mesa's software Vulkan, `LP_NUM_THREADS=2`).
//! Without an adapter every test says so on stderr and passes, unless `JOINTDIFF_REQUIRE_GPU=1` (CI sets
//! it), which makes a missing adapter a failure.
use jointdiff_core::backend::{Backend, Conv2dParams};
use jointdiff_core::model::{init_params, serialize, ModelFile};
use jointdiff_core::ncsnv2::{Ncsnv2, Ncsnv2Config};
use jointdiff_core::operator::Operator;
use jointdiff_core::plan::{DenoiseSpec, NetworkModel, NoisePrior, PlanNets, SignalPrior};
use jointdiff_core::rng::Rng;
use jointdiff_core::sampler::Rule;
use jointdiff_core::tensor::rel_max_err;
use jointdiff_core::{RefBackend, Tensor};
use jointdiff_cpu::CpuBackend;
use jointdiff_tests::{fixture, init_by_name, read_npy, GOLDEN};
use jointdiff_wgpu::WgpuBackend;
use std::sync::{Arc, OnceLock};

fn gpu() -> Option<&'static WgpuBackend> {
    static B: OnceLock<Option<WgpuBackend>> = OnceLock::new();
    B.get_or_init(|| match WgpuBackend::new() {
        Ok(b) => {
            eprintln!("wgpu adapter: {:?}", b.adapter());
            Some(b)
        }
        Err(e) => {
            assert!(
                std::env::var("JOINTDIFF_REQUIRE_GPU").as_deref() != Ok("1"),
                "JOINTDIFF_REQUIRE_GPU=1 but no wgpu adapter: {e}"
            );
            eprintln!(
                "\n*** NO WGPU ADAPTER: the wgpu tests did not run ({e}). Install a Vulkan driver \
                 (Debian: mesa-vulkan-drivers libvulkan1) ***\n"
            );
            None
        }
    })
    .as_ref()
}

fn rand(shape: [usize; 4], seed: u64, scale: f32, shift: f32) -> Tensor {
    let mut t = Tensor::zeros(shape);
    let mut r = Rng::stream(seed, 9, 0);
    for v in t.data.iter_mut() {
        *v = shift + scale * r.normal() as f32;
    }
    t
}

/// `got` (downloaded from the GPU) against the reference within `tol` relative error.
fn close(
    what: &str,
    g: &WgpuBackend,
    got: &<WgpuBackend as Backend>::Tensor,
    want: &Tensor,
    tol: f64,
) {
    let got = g.download(got).unwrap();
    assert_eq!(got.shape, want.shape, "{what}: shape");
    let err = rel_max_err(&got.data, &want.data);
    assert!(
        err < tol,
        "{what}: relative error {err:e} (tolerance {tol:e})"
    );
}

#[test]
fn every_kernel_agrees_with_the_reference_on_odd_shapes() {
    let Some(g) = gpu() else { return };
    let r = RefBackend;
    let up = |t: &Tensor| g.upload(t);
    // convolutions: odd channel counts, 1x1 spatial, dilation larger than the image, 1x1 kernels
    for (x_shape, w_shape, p, bias) in [
        ([2, 3, 5, 7], [5, 3, 3, 3], Conv2dParams::same3(1), true),
        ([1, 5, 6, 4], [3, 5, 3, 3], Conv2dParams::same3(2), false),
        ([2, 3, 5, 7], [4, 3, 3, 3], Conv2dParams::same3(8), true),
        ([1, 3, 1, 1], [2, 3, 3, 3], Conv2dParams::same3(1), true),
        ([2, 6, 4, 5], [7, 6, 1, 1], Conv2dParams::pointwise(), true),
        (
            [1, 2, 6, 6],
            [3, 2, 3, 3],
            Conv2dParams {
                padding: 0,
                dilation: 1,
            },
            false,
        ),
        // padding beyond the kernel's reach: the input gradient takes the direct kernel
        (
            [1, 2, 4, 3],
            [3, 2, 1, 1],
            Conv2dParams {
                padding: 1,
                dilation: 1,
            },
            true,
        ),
        // a 64-channel layer over more than one 32 x 64 tile in both directions
        ([2, 9, 9, 8], [70, 9, 3, 3], Conv2dParams::same3(1), true),
    ] {
        let x = rand(x_shape, 1, 1.0, 0.1);
        let w = rand(w_shape, 2, 0.4, 0.0);
        let b = rand([1, w_shape[0], 1, 1], 3, 0.2, 0.0);
        let what = format!("conv2d {x_shape:?} {w_shape:?} {p:?}");
        let bias_r = bias.then_some(&b);
        let bg = up(&b);
        let bias_g = bias.then_some(&bg);
        let (xg, wg) = (up(&x), up(&w));
        let want = r.conv2d(&x, &w, bias_r, p);
        close(&what, g, &g.conv2d(&xg, &wg, bias_g, p), &want, 1e-5);
        let gout = rand(want.shape, 4, 1.0, 0.0);
        let (gx, gw, gb) = r.conv2d_backward(&x, &w, &gout, p);
        let (hx, hw, hb) = g.conv2d_backward(&xg, &wg, &up(&gout), p);
        close(&format!("{what} dx"), g, &hx, &gx, 1e-5);
        close(&format!("{what} dw"), g, &hw, &gw, 1e-5);
        close(&format!("{what} db"), g, &hb, &gb, 1e-5);
        let ix = g.conv2d_backward_input(&wg, &up(&gout), x_shape, p);
        close(&format!("{what} input VJP"), g, &ix, &gx, 1e-5);
    }
    // pooling, resizing, InstanceNorm++, elementwise
    let x = rand([2, 5, 6, 8], 5, 1.0, 0.3);
    let xg = up(&x);
    close("mean_pool2", g, &g.mean_pool2(&xg), &r.mean_pool2(&x), 1e-6);
    let gp = rand([2, 5, 3, 4], 6, 1.0, 0.0);
    close(
        "mean_pool2 backward",
        g,
        &g.mean_pool2_backward(&up(&gp), x.shape),
        &r.mean_pool2_backward(&gp, x.shape),
        1e-6,
    );
    // ties: values on a coarse grid
    let mut q = rand([2, 3, 5, 7], 7, 2.0, 0.0);
    q.data.iter_mut().for_each(|v| *v = (*v * 2.0).round());
    let qg = up(&q);
    for (k, pad) in [(5, 2), (3, 0), (5, 0)] {
        let want = r.max_pool(&q, k, pad);
        close(
            &format!("max_pool {k} {pad}"),
            g,
            &g.max_pool(&qg, k, pad),
            &want,
            0.0 + 1e-12,
        );
        let gm = rand(want.shape, 8, 1.0, 0.0);
        close(
            &format!("max_pool {k} {pad} backward"),
            g,
            &g.max_pool_backward(&qg, &up(&gm), k, pad),
            &r.max_pool_backward(&q, &gm, k, pad),
            1e-6,
        );
    }
    for (from, to) in [
        ([2, 3, 4, 5], (7, 9)),
        ([1, 2, 1, 1], (3, 3)),
        ([1, 2, 6, 6], (3, 4)),
        // NCSNv2's upsampling sizes
        ([1, 2, 7, 7], (14, 14)),
        ([1, 1, 14, 14], (28, 28)),
    ] {
        let s = rand(from, 9, 1.0, 0.0);
        close(
            &format!("resize {from:?} -> {to:?}"),
            g,
            &g.resize_bilinear(&up(&s), to.0, to.1),
            &r.resize_bilinear(&s, to.0, to.1),
            1e-6,
        );
        let gr = rand([from[0], from[1], to.0, to.1], 10, 1.0, 0.0);
        close(
            &format!("resize {from:?} -> {to:?} backward"),
            g,
            &g.resize_bilinear_backward(&up(&gr), from),
            &r.resize_bilinear_backward(&gr, from),
            1e-5,
        );
    }
    let (a, gm, be) = (
        rand([1, 5, 1, 1], 11, 0.2, 1.0),
        rand([1, 5, 1, 1], 12, 0.2, 1.0),
        rand([1, 5, 1, 1], 13, 0.2, 0.0),
    );
    let (ag, gmg, beg) = (up(&a), up(&gm), up(&be));
    close(
        "instance_norm_plus",
        g,
        &g.instance_norm_plus(&xg, &ag, &gmg, &beg),
        &r.instance_norm_plus(&x, &a, &gm, &be),
        1e-5,
    );
    close(
        "instance_norm_plus_elu",
        g,
        &g.instance_norm_plus_elu(&xg, &ag, &gmg, &beg),
        &r.elu(&r.instance_norm_plus(&x, &a, &gm, &be)),
        1e-5,
    );
    let gi = rand(x.shape, 14, 1.0, 0.0);
    let want = r.instance_norm_plus_backward(&x, &a, &gm, &gi);
    let got = g.instance_norm_plus_backward(&xg, &ag, &gmg, &up(&gi));
    close("instance_norm_plus backward dx", g, &got.0, &want.0, 1e-4);
    close(
        "instance_norm_plus backward dalpha",
        g,
        &got.1,
        &want.1,
        1e-4,
    );
    close(
        "instance_norm_plus backward dgamma",
        g,
        &got.2,
        &want.2,
        1e-4,
    );
    close(
        "instance_norm_plus backward dbeta",
        g,
        &got.3,
        &want.3,
        1e-5,
    );
    let y = rand(x.shape, 15, 1.0, 0.0);
    let yg = up(&y);
    close("elu", g, &g.elu(&xg), &r.elu(&x), 1e-6);
    close(
        "elu backward",
        g,
        &g.elu_backward(&xg, &yg),
        &r.elu_backward(&x, &y),
        1e-6,
    );
    close("add", g, &g.add(&xg, &yg), &r.add(&x, &y), 1e-7);
    close(
        "affine",
        g,
        &g.affine(&xg, 2.0, -1.0),
        &r.affine(&x, 2.0, -1.0),
        1e-7,
    );
    // the sampler's ops
    close(
        "axpby",
        g,
        &g.axpby(0.3, &xg, -1.7, &yg),
        &r.axpby(0.3, &x, -1.7, &y),
        1e-7,
    );
    let item = rand([1, 5, 6, 8], 16, 1.0, 2.0);
    let ig = up(&item);
    close(
        "mul (broadcast)",
        g,
        &g.mul(&xg, &ig),
        &r.mul(&x, &item),
        1e-7,
    );
    close(
        "div (broadcast)",
        g,
        &g.div(&xg, &ig),
        &r.div(&x, &item),
        1e-6,
    );
    close(
        "mul_scalar",
        g,
        &g.mul_scalar(&xg, 0.7),
        &r.mul_scalar(&x, 0.7),
        1e-7,
    );
    close(
        "div_scalar",
        g,
        &g.div_scalar(&xg, 0.7),
        &r.div_scalar(&x, 0.7),
        1e-6,
    );
    close(
        "clamp",
        g,
        &g.clamp(&xg, -0.2, 0.5),
        &r.clamp(&x, -0.2, 0.5),
        0.0 + 1e-12,
    );
    let mut z = rand([3, 2, 2, 3], 17, 1.0, 0.0);
    z.item_mut(1).iter_mut().for_each(|v| *v = 0.0);
    close(
        "scale_by_inverse_norm (an item of zeros)",
        g,
        &g.scale_by_inverse_norm(&up(&z), 0.8),
        &r.scale_by_inverse_norm(&z, 0.8),
        1e-6,
    );
    let a_m = rand([1, 1, 5, 12], 18, 0.5, 0.0);
    let v = rand([3, 1, 1, 12], 19, 1.0, 0.0);
    let u = rand([3, 1, 1, 5], 20, 1.0, 0.0);
    close(
        "matmul A x",
        g,
        &g.matmul(&up(&v), &up(&a_m), false, [3, 1, 1, 5]),
        &r.matmul(&v, &a_m, false, [3, 1, 1, 5]),
        1e-6,
    );
    close(
        "matmul A^T x",
        g,
        &g.matmul(&up(&u), &up(&a_m), true, [3, 1, 3, 4]),
        &r.matmul(&u, &a_m, true, [3, 1, 3, 4]),
        1e-6,
    );
    let mean = rand([1, 5, 6, 8], 21, 0.3, 0.5);
    let var = rand([1, 5, 6, 8], 22, 0.1, 0.5);
    let (mg, vg) = (up(&mean), up(&var));
    for m in [true, false] {
        close(
            &format!("gaussian_score (mean {m})"),
            g,
            &g.gaussian_score(&xg, m.then_some(&mg), &vg, 0.6, 0.8),
            &r.gaussian_score(&x, m.then_some(&mean), &var, 0.6, 0.8),
            1e-6,
        );
    }
    assert!(g.all_finite(&[&xg, &yg]).unwrap());
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut t = y.clone();
        t.data[37] = bad;
        assert!(!g.all_finite(&[&xg, &up(&t)]).unwrap(), "{bad} not flagged");
    }
}

#[test]
fn golden_fixtures_within_1e_4() {
    let Some(g) = gpu() else { return };
    for (name, c, size, _) in GOLDEN {
        let bytes = std::fs::read(fixture(&format!("golden/{name}.safetensors"))).unwrap();
        let net = ModelFile::from_bytes(&bytes).unwrap().build(g).unwrap();
        let x = read_npy(&format!("golden/{name}_input.npy"));
        let want = read_npy(&format!("golden/{name}_output.npy"));
        assert_eq!(x.shape, [2, c, size, size]);
        let got = net.forward(g, &x).unwrap();
        let err = rel_max_err(&got.data, &want.data);
        println!("wgpu {name}: relative error {err:.3e}");
        assert!(err < 1e-4, "wgpu {name}: relative error {err:e}");
    }
}

#[test]
fn network_input_vjp_agrees_with_the_reference() {
    let Some(g) = gpu() else { return };
    let cfg = Ncsnv2Config {
        channels: 3,
        ngf: 6,
        input_map: true,
    };
    let r = RefBackend;
    let nr = Ncsnv2::from_fn(&r, cfg, init_by_name).unwrap();
    let ng = Ncsnv2::from_fn(g, cfg, init_by_name).unwrap();
    let x = rand([2, 3, 12, 10], 30, 0.5, 0.5);
    let gout = rand([2, 3, 12, 10], 31, 1.0, 0.0);
    let want = nr.vjp_input(&r, &x, &gout).unwrap();
    let got = ng.vjp_input(g, &x, &gout).unwrap();
    let err = rel_max_err(&got.data, &want.data);
    println!("wgpu input VJP: relative error {err:.3e}");
    assert!(err < 1e-4, "input VJP: relative error {err:e}");
    let (_, pr) = nr.vjp(&r, &x, &gout).unwrap();
    let (_, pg) = ng.vjp(g, &x, &gout).unwrap();
    for ((name, a), (_, b)) in pr.iter().zip(&pg) {
        let err = rel_max_err(&b.data, &a.data);
        assert!(
            err < 1e-3,
            "parameter gradient {name}: relative error {err:e}"
        );
    }
}

/// A 20-step pigdm joint denoise on wgpu and on the CPU backend from the same seed: within 40 dB PSNR of
/// each other. The priors: the golden ngf-16 checkpoint (trained weights) for the signal and a random ngf-6
/// network for the noise, on 12x12 images (small for lavapipe).
#[test]
fn pigdm_joint_denoise_agrees_with_the_cpu_backend() {
    let Some(g) = gpu() else { return };
    let golden = std::fs::read(fixture("golden/ncsnv2_28x28x1_ngf16.safetensors")).unwrap();
    let cfg = Ncsnv2Config {
        channels: 1,
        ngf: 6,
        input_map: true,
    };
    let random = serialize(None, &init_params(&cfg, init_by_name)).unwrap();
    let model = |bytes: &[u8], name: &str| NetworkModel {
        file: Arc::new(ModelFile::from_bytes(bytes).unwrap()),
        name: name.into(),
    };
    let mut spec = DenoiseSpec::new(
        SignalPrior::Network(model(&golden, "golden ngf16")),
        NoisePrior::Network(model(&random, "random ngf6")),
    );
    spec.rule = Rule::Pigdm;
    spec.steps = 20;
    spec.operator = Operator::Scale(0.5);
    spec.alpha = 0.5;
    spec.clip = false; // compare the raw estimates, not values clipped to [0, 1]
    let y = rand([2, 1, 12, 12], 40, 0.2, 0.5).data;
    let plan = spec.plan([2, 1, 12, 12]).unwrap();
    fn run<B: Backend>(b: &B, plan: &jointdiff_core::plan::DenoisePlan, y: &[f32]) -> Tensor {
        let [s, n] = plan.build_networks(b).unwrap();
        let nets = PlanNets {
            signal: s.as_ref(),
            noise: n.as_ref(),
        };
        plan.run(b, nets, y, 3, &mut |_, _| true)
            .unwrap()
            .estimate
            .signal
    }
    let cpu = run(&CpuBackend, &plan, &y);
    let gpu_out = run(g, &plan, &y);
    let range = cpu.data.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
    assert!(
        range > 0.1 && cpu.data.iter().all(|v| v.is_finite()),
        "a degenerate run"
    );
    let psnr = jointdiff_core::metrics::psnr(&gpu_out.data, &cpu.data, range);
    println!("pigdm 20 steps, wgpu vs cpu: PSNR {psnr:.1} dB (peak {range:.3})");
    assert!(psnr > 40.0, "wgpu vs cpu: PSNR {psnr:.1} dB");
}

/// Per-kernel GPU time from timestamp queries: every dispatch is counted under its kernel, and the results
/// are the same with profiling on.
#[test]
fn profiling_counts_every_dispatch() {
    let Some(g) = gpu() else { return };
    let x = rand([1, 3, 9, 9], 50, 1.0, 0.0);
    let w = rand([4, 3, 3, 3], 51, 0.5, 0.0);
    let (xg, wg) = (g.upload(&x), g.upload(&w));
    let plain = g
        .download(&g.elu(&g.conv2d(&xg, &wg, None, Conv2dParams::same3(1))))
        .unwrap();
    if let Err(e) = g.set_profiling(true) {
        eprintln!("no timestamp queries on this adapter: {e}");
        return;
    }
    let mut y = g.conv2d(&xg, &wg, None, Conv2dParams::same3(1));
    y = g.elu(&y);
    let timed = g.download(&y).unwrap();
    let prof = g.profile();
    g.set_profiling(false).unwrap();
    assert_eq!(timed.data, plain.data, "profiling changes no result");
    let count = |k: &str| prof.iter().find(|t| t.kernel == k).map(|t| t.dispatches);
    assert_eq!(count("conv2d_tiled"), Some(1), "{prof:?}");
    assert_eq!(count("elu"), Some(1), "{prof:?}");
    assert!(
        prof.iter().all(|t| t.ms >= 0.0 && t.ms.is_finite()),
        "{prof:?}"
    );
}
