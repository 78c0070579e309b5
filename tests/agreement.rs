//! The CPU backend against the reference backend: every operation and the whole NCSNv2 forward, random
//! weights and inputs, the three image sizes and odd channel counts. Tolerance: relative 1e-4.
use jointdiff_core::backend::{Backend, Conv2dParams};
use jointdiff_core::ncsnv2::{Ncsnv2, Ncsnv2Config};
use jointdiff_core::rng::Rng;
use jointdiff_core::tensor::rel_max_err;
use jointdiff_core::{RefBackend, Tensor};
use jointdiff_cpu::CpuBackend;
use jointdiff_tests::{bit_identical, init_by_name, on_threads};

fn rand(shape: [usize; 4], seed: u64, scale: f32, shift: f32) -> Tensor {
    let mut t = Tensor::zeros(shape);
    let mut r = Rng::stream(seed, 7, 0);
    for v in t.data.iter_mut() {
        *v = shift + scale * r.normal() as f32;
    }
    t
}

#[test]
fn every_op_agrees() {
    let (r, c) = (RefBackend, CpuBackend);
    let x = rand([3, 5, 14, 10], 1, 1.0, 0.2);
    let w = rand([7, 5, 3, 3], 2, 0.3, 0.0);
    let b = rand([1, 7, 1, 1], 3, 0.1, 0.0);
    let p = |t: &Tensor, u: &Tensor| rel_max_err(&u.data, &t.data);
    // the CPU backend's own tensors of the same values
    let on_c = |t: &Tensor| c.upload(t);
    let (xc, wc, bc) = (on_c(&x), on_c(&w), on_c(&b));
    for cp in [
        Conv2dParams::same3(1),
        Conv2dParams::same3(2),
        Conv2dParams::same3(4),
    ] {
        assert!(
            p(
                &r.conv2d(&x, &w, Some(&b), cp),
                &c.conv2d(&xc, &wc, Some(&bc), cp)
            ) < 1e-5
        );
        assert!(p(&r.conv2d(&x, &w, None, cp), &c.conv2d(&xc, &wc, None, cp)) < 1e-5);
    }
    let w1 = rand([4, 5, 1, 1], 4, 0.3, 0.0);
    let pw = Conv2dParams::pointwise();
    let w1c = on_c(&w1);
    assert!(
        p(
            &r.conv2d(&x, &w1, Some(&b), pw),
            &c.conv2d(&xc, &w1c, Some(&bc), pw)
        ) < 1e-5
    );
    assert!(p(&r.mean_pool2(&x), &c.mean_pool2(&xc)) < 1e-6);
    assert!(p(&r.max_pool(&x, 5, 2), &c.max_pool(&xc, 5, 2)) == 0.0);
    let (a, g, be) = (
        rand([1, 5, 1, 1], 5, 0.3, 1.0),
        rand([1, 5, 1, 1], 6, 0.3, 1.0),
        rand([1, 5, 1, 1], 7, 0.2, 0.0),
    );
    let (ac, gc, bec) = (on_c(&a), on_c(&g), on_c(&be));
    assert!(
        p(
            &r.instance_norm_plus(&x, &a, &g, &be),
            &c.instance_norm_plus(&xc, &ac, &gc, &bec)
        ) < 1e-6
    );
    assert!(p(&r.elu(&x), &c.elu(&xc)) < 1e-7);
    assert!(
        p(
            &r.resize_bilinear(&x, 28, 20),
            &c.resize_bilinear(&xc, 28, 20)
        ) < 1e-6
    );
    assert!(p(&r.add(&x, &x), &c.add(&xc, &xc)) == 0.0);
    assert!(p(&r.affine(&x, 2.0, -1.0), &c.affine(&xc, 2.0, -1.0)) == 0.0);
}

#[test]
fn whole_forward_agrees_at_three_sizes() {
    // ngf 32 at 32x32 makes the CPU backend cut rows into several tiles (im2col tile boundaries mid-row)
    for (size, ch, ngf) in [
        (28usize, 1usize, 5usize),
        (32, 3, 6),
        (64, 2, 3),
        (32, 3, 32),
        // channels a multiple of 8: Winograd on the CPU, F(4x4, 3x3) tiles
        (64, 1, 8),
    ] {
        let cfg = Ncsnv2Config {
            channels: ch,
            ngf,
            input_map: true,
        };
        let net_r = Ncsnv2::from_fn(&RefBackend, cfg, init_by_name).unwrap();
        let net_c = Ncsnv2::from_fn(&CpuBackend, cfg, init_by_name).unwrap();
        let x = rand([2, ch, size, size], 11, 0.3, 0.5);
        let a = net_r.forward(&RefBackend, &x).unwrap();
        let b = net_c.forward(&CpuBackend, &x).unwrap();
        let e = rel_max_err(&b.data, &a.data);
        println!("{size}x{size}x{ch} ngf {ngf}: cpu vs reference {e:.2e}");
        assert!(e < 1e-4, "{size}: {e}");
    }
}

#[test]
fn whole_forward_is_bit_identical_with_one_and_two_threads() {
    let cfg = Ncsnv2Config {
        channels: 1,
        ngf: 32,
        input_map: true,
    };
    let net = Ncsnv2::from_fn(&CpuBackend, cfg, init_by_name).unwrap();
    let x = rand([2, 1, 28, 28], 12, 0.3, 0.5);
    let run = |threads| on_threads(threads, || net.forward(&CpuBackend, &x).unwrap());
    let (one, two) = (run(1), run(2));
    assert!(one.data.iter().all(|v| v.is_finite()));
    assert!(
        bit_identical(&one.data, &two.data),
        "the forward differs between 1 and 2 threads"
    );
}

#[test]
fn whole_input_vjp_agrees_and_is_bit_identical_with_one_and_two_threads() {
    // the CPU backend's input VJP (flipped-kernel convolutions on the fast paths, no weight gradients)
    // against the reference backend's full backward (conv2d_backward, checked against finite differences)
    let cfg = Ncsnv2Config {
        channels: 1,
        ngf: 32,
        input_map: true,
    };
    let net_r = Ncsnv2::from_fn(&RefBackend, cfg, init_by_name).unwrap();
    let net_c = Ncsnv2::from_fn(&CpuBackend, cfg, init_by_name).unwrap();
    let x = rand([2, 1, 28, 28], 13, 0.3, 0.5);
    let g = rand([2, 1, 28, 28], 14, 1.0, 0.0);
    let (want, _) = net_r.vjp(&RefBackend, &x, &g).unwrap();
    let run = |threads| on_threads(threads, || net_c.vjp_input(&CpuBackend, &x, &g).unwrap());
    let (one, two) = (run(1), run(2));
    let e = rel_max_err(&two.data, &want.data);
    println!("28x28x1 ngf 32 input VJP: cpu vs reference {e:.2e}");
    assert!(e < 1e-4, "input VJP: {e}");
    assert!(
        bit_identical(&one.data, &two.data),
        "the input VJP differs between 1 and 2 threads"
    );
}
