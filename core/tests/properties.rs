//! Property tests (proptest): operator adjoints, npy and safetensors round trips, SDE marginals against a
//! numerical integration of their own coefficients.
use jointdiff_core::model::{init_params, serialize, InputMap, ModelFile, ModelMeta};
use jointdiff_core::ncsnv2::Ncsnv2Config;
use jointdiff_core::npy::NpyArray;
use jointdiff_core::operator::Operator;
use jointdiff_core::sde::Sde;
use jointdiff_core::{Backend, RefBackend, Tensor};
use proptest::prelude::*;

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(p, q)| *p as f64 * *q as f64).sum()
}

/// An operator of each kind for items of `d` values, with `m` rows for a matrix.
fn operator(kind: u8, d: usize, m: usize, vals: &[f32]) -> Operator {
    match kind % 4 {
        0 => Operator::Identity,
        1 => Operator::Scale(vals[0]),
        2 => Operator::Mask(
            vals[..d]
                .iter()
                .map(|v| (*v > 0.0) as u8 as f32 * v)
                .collect(),
        ),
        _ => Operator::Matrix {
            m,
            d,
            a: vals[..m * d].to_vec(),
        },
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// `<A x, y> = <x, A^T y>` for every operator kind and random sizes, on the host and on the backend.
    #[test]
    fn operator_adjoints(kind in 0u8..4, d in 1usize..40, m in 1usize..12, items in 1usize..4,
                         vals in prop::collection::vec(-2f32..2.0, 480),
                         xs in prop::collection::vec(-1f32..1.0, 160),
                         ys in prop::collection::vec(-1f32..1.0, 160)) {
        let op = operator(kind, d, m, &vals);
        let mo = op.out_len(d).unwrap();
        let x = &xs[..d];
        let y = &ys[..mo];
        let (mut ax, mut aty) = (vec![0f32; mo], vec![0f32; d]);
        op.apply(x, &mut ax);
        op.adjoint(y, &mut aty);
        let (l, r) = (dot(&ax, y), dot(x, &aty));
        prop_assert!((l - r).abs() <= 1e-4 * (1.0 + l.abs()), "host: {} vs {}", l, r);
        // the same on the backend, for a batch
        let b = RefBackend;
        let bop = op.on(&b, [1, 1, d]).unwrap();
        let xt = Tensor::from_vec([items, 1, 1, d], xs[..items * d].to_vec()).unwrap();
        let yt = Tensor::from_vec([items, 1, 1, mo], ys[..items * mo].to_vec()).unwrap();
        let axt = b.download(&bop.apply(&b, &b.upload(&xt), [items, 1, 1, mo])).unwrap();
        let atyt = b.download(&bop.adjoint(&b, &b.upload(&yt), [items, 1, 1, d])).unwrap();
        for i in 0..items {
            let (l, r) = (dot(axt.item(i), yt.item(i)), dot(xt.item(i), atyt.item(i)));
            prop_assert!((l - r).abs() <= 1e-4 * (1.0 + l.abs()), "backend item {}: {} vs {}", i, l, r);
        }
    }

    /// npy: what is written is read back, shape and values bit for bit.
    #[test]
    fn npy_round_trip(shape in prop::collection::vec(0usize..6, 1..5),
                      vals in prop::collection::vec(any::<f32>(), 0..1300)) {
        let n: usize = shape.iter().product();
        prop_assume!(n <= vals.len());
        let data = &vals[..n];
        let back = NpyArray::parse(&NpyArray::to_bytes(&shape, data)).unwrap();
        prop_assert_eq!(back.shape, shape);
        prop_assert!(back.data.iter().zip(data).all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    /// safetensors: a model written with its metadata is read back with the same config and tensors.
    #[test]
    fn model_round_trip(ngf in 2usize..5, channels in 1usize..4, size in 1usize..5, seed in any::<u32>(),
                        ve in any::<bool>()) {
        let cfg = Ncsnv2Config { channels, ngf, input_map: true };
        let mut k = seed as u64;
        let params = init_params(&cfg, |s| {
            (0..s.shape.iter().product::<usize>())
                .map(|_| {
                    k = k.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    (k >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                })
                .collect()
        });
        let meta = ModelMeta {
            architecture: "ncsnv2".into(),
            ngf,
            channels,
            image_size: [2 * size, 2 * size],
            input_map: InputMap::TwoXMinusOne,
            sde: if ve { Sde::ve_default() } else { Sde::vp_default() },
            data_range: [0.0, 1.0],
            provenance: Default::default(),
            train: None,
        };
        let mf = ModelFile::from_bytes(&serialize(Some(&meta), &params).unwrap()).unwrap();
        prop_assert!(!mf.reference_checkpoint);
        prop_assert_eq!(mf.meta.net_config(), cfg);
        prop_assert_eq!(mf.meta.image_size, meta.image_size);
        prop_assert_eq!(mf.meta.sde, meta.sde);
        for (name, shape, data) in &params {
            let (s, d) = mf.tensors.get(name).expect("every tensor is read back");
            prop_assert_eq!(s, shape);
            prop_assert_eq!(d, data);
        }
        prop_assert!(mf.build(&RefBackend).is_ok());
    }

    /// Each SDE's closed-form marginal, `a(t) = exp(int f)` and `s(t)^2` with `d s^2 / dt = 2 f s^2 + g^2`,
    /// against an RK4 integration of its own drift and diffusion coefficients from t = 0.
    #[test]
    fn sde_marginals_follow_their_coefficients(kind in 0u8..3, t in 0.01f64..1.0,
                                               p1 in 0.05f64..1.0, p2 in 2.0f64..30.0) {
        let sde = match kind {
            0 => Sde::Vp { beta_min: p1, beta_max: p2 },
            1 => Sde::Ve { sigma_min: p1 * 0.1, sigma_max: p2 },
            _ => Sde::Simple { sigma: p2 },
        };
        sde.validate().unwrap();
        let steps = 4000;
        let h = t / steps as f64;
        // y = (log a, s^2)
        let deriv = |u: f64, y: [f64; 2]| [sde.drift(u), 2.0 * sde.drift(u) * y[1] + sde.g(u) * sde.g(u)];
        let mut y = [0.0, sde.s(0.0) * sde.s(0.0)];
        for k in 0..steps {
            let u = k as f64 * h;
            let k1 = deriv(u, y);
            let k2 = deriv(u + h / 2.0, [y[0] + h / 2.0 * k1[0], y[1] + h / 2.0 * k1[1]]);
            let k3 = deriv(u + h / 2.0, [y[0] + h / 2.0 * k2[0], y[1] + h / 2.0 * k2[1]]);
            let k4 = deriv(u + h, [y[0] + h * k3[0], y[1] + h * k3[1]]);
            for i in 0..2 {
                y[i] += h / 6.0 * (k1[i] + 2.0 * k2[i] + 2.0 * k3[i] + k4[i]);
            }
        }
        let (a, s2) = (sde.a(t), sde.s(t) * sde.s(t));
        prop_assert!((y[0].exp() - a).abs() <= 1e-6 * a, "{:?} a({}): {} vs {}", sde, t, y[0].exp(), a);
        prop_assert!((y[1] - s2).abs() <= 1e-6 * s2.max(1e-12), "{:?} s^2({}): {} vs {}", sde, t, y[1], s2);
    }
}
