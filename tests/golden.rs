//! The reference backend (and the CPU backend) against fixtures produced by an independent PyTorch
//! implementation of NCSNv2 (tools/reference/, float64 forward). Tolerance: relative 1e-4
//! (max |ours - torch| / max |torch|).
use jointdiff_core::model::ModelFile;
use jointdiff_core::tensor::rel_max_err;
use jointdiff_core::{Backend, RefBackend};
use jointdiff_cpu::CpuBackend;
use jointdiff_tests::{fixture, read_npy, GOLDEN};

fn check<B: Backend>(b: &B) {
    for (name, c, size, ngf) in GOLDEN {
        let bytes = std::fs::read(fixture(&format!("golden/{name}.safetensors"))).unwrap();
        let mf = ModelFile::from_bytes(&bytes).unwrap();
        assert!(
            mf.reference_checkpoint,
            "golden files carry no jointdiff metadata"
        );
        assert_eq!((mf.meta.channels, mf.meta.ngf), (c, ngf));
        assert_eq!(mf.meta.sde.name(), "ve");
        let net = mf.build(b).unwrap();
        let x = read_npy(&format!("golden/{name}_input.npy"));
        let want = read_npy(&format!("golden/{name}_output.npy"));
        assert_eq!(x.shape, [2, c, size, size]);
        let got = net.forward(b, &x).unwrap();
        assert_eq!(got.shape, want.shape);
        let err = rel_max_err(&got.data, &want.data);
        println!("{} {name}: relative error {err:.3e}", b.name());
        assert!(err < 1e-4, "{} {name}: relative error {err:e}", b.name());
        // batch independence: item 1 alone gives the same values as in the batch
        let one = jointdiff_core::Tensor::from_vec([1, c, size, size], x.item(1).to_vec()).unwrap();
        let got1 = net.forward(b, &one).unwrap();
        assert!(rel_max_err(&got1.data, want.item(1)) < 1e-4);
    }
}

#[test]
fn reference_backend_matches_pytorch() {
    check(&RefBackend);
}

#[test]
fn cpu_backend_matches_pytorch() {
    check(&CpuBackend);
}

/// PSNR and SSIM against values from an independent numpy implementation of tf.image.ssim's algorithm
/// (tools/reference/make_ssim_fixture.py: direct 2-D window sums instead of our separable filtering).
#[test]
fn metrics_match_the_numpy_reference() {
    use jointdiff_core::metrics::{psnr, ssim};
    let pairs = read_npy("golden/metrics_pairs.npy"); // [4, 2, 28, 28]
    let bytes = std::fs::read(fixture("golden/metrics_values.npy")).unwrap();
    let vals = jointdiff_core::npy::NpyArray::parse(&bytes).unwrap(); // [4, 2] float64 -> f32
    for k in 0..4 {
        let item = pairs.item(k);
        let (a, b) = item.split_at(28 * 28);
        let (p, s) = (psnr(a, b, 1.0), ssim(a, b, 1, 28, 28, 1.0));
        let (wp, ws) = (vals.data[2 * k] as f64, vals.data[2 * k + 1] as f64);
        println!("pair {k}: psnr {p:.5} vs {wp:.5}, ssim {s:.6} vs {ws:.6}");
        assert!((p - wp).abs() < 1e-3, "psnr {k}");
        assert!((s - ws).abs() < 1e-5, "ssim {k}");
    }
}
