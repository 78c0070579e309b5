//! Builds tests/capi/test_capi.c with gcc against include/jointdiff.h and the static library, runs it (every
//! error path, cancellation, two threads sharing a model), checks that its denoise output is bit-identical
//! to `jointdiff denoise` with the same options and seed, and runs it under valgrind (errors and leaks fail).
//!
//! Needs gcc; the CLI comparison needs the `jointdiff` binary built in the same target directory (as
//! `cargo test --workspace` does); valgrind is required when JOINTDIFF_REQUIRE_VALGRIND is set (CI sets it).
use jointdiff_core::model::{init_params, serialize};
use jointdiff_core::ncsnv2::Ncsnv2Config;
use jointdiff_core::npy::NpyArray;
use jointdiff_core::rng::Rng;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// target/<profile>/ of this test binary.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("jointdiff-capi-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

/// `cargo test` builds only the rlib of this crate and not the CLI binary, so build the static library and
/// the CLI here (cargo has released its build lock while tests run; this is a no-op when up to date).
fn cargo_build() {
    let profile = target_dir()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .to_string();
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(root())
        .args(["build", "-q", "-p", "jointdiff-capi", "-p", "jointdiff-cli"]);
    if profile == "release" {
        cmd.arg("--release");
    }
    let out = cmd.output().expect("cargo");
    assert!(
        out.status.success(),
        "cargo build failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Builds the C test once per process (both tests run it; building it twice at once would replace the
/// executable while the other test runs it).
fn build_c_test() -> PathBuf {
    static EXE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    EXE.get_or_init(|| build_c("test_capi")).clone()
}

/// Compiles tests/capi/NAME.c against the header and the static library.
fn build_c(name: &str) -> PathBuf {
    cargo_build();
    let lib = target_dir().join("libjointdiff.a");
    assert!(
        lib.exists(),
        "{} missing: build jointdiff-capi first",
        lib.display()
    );
    let exe = tmp(name);
    let out = Command::new("gcc")
        .args([
            "-std=c11",
            "-D_POSIX_C_SOURCE=200809L",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-O1",
            "-g",
        ])
        .arg(root().join(format!("tests/capi/{name}.c")))
        .arg("-I")
        .arg(root().join("frontends/capi/include"))
        .arg(&lib)
        .args(["-lpthread", "-ldl", "-lm", "-o"])
        .arg(&exe)
        .output()
        .expect("gcc is needed for the C API test");
    assert!(
        out.status.success(),
        "gcc failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// Measurements `0.5 x + 0.5 n` of `items` golden inputs and held-out digits, cropped to `size` x `size`.
fn write_measurement(items: usize, size: usize) -> (PathBuf, PathBuf) {
    let x = NpyArray::parse(
        &std::fs::read(root().join("fixtures/golden/ncsnv2_28x28x1_ngf16_input.npy")).unwrap(),
    )
    .unwrap();
    let digits = NpyArray::parse(
        &std::fs::read(root().join("fixtures/data/digits_heldout_16.npy")).unwrap(),
    )
    .unwrap();
    let mut y = Vec::new();
    for i in 0..items {
        for r in 0..size {
            for c in 0..size {
                let k = i * 784 + (r + 14 - size / 2) * 28 + c + 14 - size / 2;
                y.push(0.5 * x.data[k] + 0.5 * digits.data[k]);
            }
        }
    }
    let npy = tmp(&format!("y{items}_{size}.npy"));
    std::fs::write(&npy, NpyArray::to_bytes(&[items, 1, size, size], &y)).unwrap();
    let raw = tmp(&format!("y{items}_{size}.raw"));
    std::fs::write(
        &raw,
        y.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>(),
    )
    .unwrap();
    (npy, raw)
}

/// Runs the C test on `model` (1 channel, `ngf`) with `items` measurements of `size` x `size`.
fn run_c(
    exe: &Path,
    wrapper: Option<&[&str]>,
    model: &Path,
    ngf: usize,
    items: usize,
    size: usize,
    steps: usize,
) -> (Vec<u8>, Vec<u8>, String) {
    let (_, raw) = write_measurement(items, size);
    let (sig, noi) = (
        tmp(&format!("c_sig{items}_{steps}.raw")),
        tmp(&format!("c_noi{items}_{steps}.raw")),
    );
    let mut cmd = match wrapper {
        Some(w) => {
            // under valgrind the GPU driver's own allocations would be reported: skip the wgpu check
            let mut c = Command::new(w[0]);
            c.args(&w[1..]).arg(exe).env("JD_TEST_SKIP_GPU", "1");
            c
        }
        None => Command::new(exe),
    };
    cmd.arg(model).arg(ngf.to_string()).arg(&raw);
    cmd.args([
        items.to_string(),
        "1".into(),
        size.to_string(),
        size.to_string(),
        steps.to_string(),
    ]);
    cmd.arg(&sig).arg(&noi);
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "C test failed:\n{text}");
    (
        std::fs::read(&sig).unwrap(),
        std::fs::read(&noi).unwrap(),
        text,
    )
}

#[test]
fn c_program_passes_and_matches_the_cli() {
    let exe = build_c_test();
    let (items, steps) = (2, 5);
    let model = root().join("fixtures/golden/ncsnv2_28x28x1_ngf16.safetensors");
    let (sig, noi, text) = run_c(&exe, None, &model, 16, items, 28, steps);
    println!("{text}");
    assert!(text.contains(" passed, 0 failed"), "{text}");

    let cli = target_dir().join("jointdiff");
    assert!(
        cli.exists(),
        "{} missing: run `cargo test --workspace` (it builds the CLI)",
        cli.display()
    );
    let (npy, _) = write_measurement(items, 28);
    let (x, n) = (tmp("cli_x.npy"), tmp("cli_n.npy"));
    let out = Command::new(&cli)
        .arg("denoise")
        .arg("--measurement")
        .arg(&npy)
        .arg("--signal-model")
        .arg(&model)
        .arg("--noise-model")
        .arg(&model)
        .args([
            "--operator",
            "scale:0.5",
            "--alpha",
            "0.5",
            "--steps",
            &steps.to_string(),
            "--seed",
            "9",
            "--rule",
            "projection",
            "--samples",
            "1",
        ])
        .arg("--out")
        .arg(&x)
        .arg("--noise-out")
        .arg(&n)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let data = |p: &Path| {
        let a = NpyArray::parse(&std::fs::read(p).unwrap()).unwrap();
        a.data
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>()
    };
    assert_eq!(data(&x), sig, "signal differs from jointdiff denoise");
    assert_eq!(data(&n), noi, "noise differs from jointdiff denoise");
}

/// (name, measurement (npy, raw, N C H W), K, CLI options, C options)
type Twin<'a> = (
    &'a str,
    (&'a str, &'a str, [&'a str; 4]),
    usize,
    Vec<&'a str>,
    Vec<&'a str>,
);

fn raw(name: &str, data: &[f32]) -> String {
    let p = tmp(name);
    std::fs::write(
        &p,
        data.iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    p.display().to_string()
}

fn npy_data(p: &Path) -> Vec<u8> {
    let a = NpyArray::parse(&std::fs::read(p).unwrap()).unwrap();
    a.data.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The C API and the CLI build the same plan: for every rule (projection, dps, pigdm), every operator kind
/// (identity, scale, mask, matrix), network, Gaussian and sine noise priors, a network and a Gaussian
/// signal prior and K = 1, 2, 3, `denoise_twin.c` (the session set up from the same options) writes the same
/// bytes as `jointdiff denoise`: the signal, the noise and the standard deviation.
#[test]
fn c_api_matches_the_cli_for_every_rule_operator_and_prior() {
    let twin = build_c("denoise_twin");
    let cli = target_dir().join("jointdiff");
    let model = root().join("fixtures/golden/ncsnv2_28x28x1_ngf16.safetensors");
    let model = model.to_str().unwrap();
    let (y_npy, y_raw) = write_measurement(2, 28);
    let (y_npy, y_raw) = (y_npy.display().to_string(), y_raw.display().to_string());
    let stats_path = root().join("fixtures/data/fashion_train_stats.npy");
    let stats = NpyArray::parse(&std::fs::read(&stats_path).unwrap()).unwrap();
    let stats_raw = raw("stats.raw", &stats.data);
    let stats_npy = stats_path.display().to_string();
    let d = 784;
    let mut r = Rng::stream(8, 0, 0);
    let mask: Vec<f32> = (0..d).map(|_| (r.uniform() < 0.6) as u8 as f32).collect();
    let mask_npy = tmp("mask.npy");
    std::fs::write(&mask_npy, NpyArray::to_bytes(&[1, 28, 28], &mask)).unwrap();
    let mask_raw = raw("mask.raw", &mask);
    let m = 196;
    let mut a = vec![0f32; m * d];
    r.fill_normal(&mut a);
    a.iter_mut().for_each(|v| *v /= (m as f32).sqrt());
    let a_npy = tmp("a.npy");
    std::fs::write(&a_npy, NpyArray::to_bytes(&[m, d], &a)).unwrap();
    let a_raw = raw("a.raw", &a);
    let mut ym = vec![0f32; 2 * m];
    r.fill_normal(&mut ym);
    let ym_npy = tmp("ym.npy");
    std::fs::write(&ym_npy, NpyArray::to_bytes(&[2, m], &ym)).unwrap();
    let ym_raw = raw("ym.raw", &ym);
    let (ym_npy, mask_npy, a_npy) = (
        ym_npy.display().to_string(),
        mask_npy.display().to_string(),
        a_npy.display().to_string(),
    );
    let (mask_op, matrix_op) = (format!("mask:{mask_npy}"), format!("matrix:{a_npy}"));
    let image = (y_npy.as_str(), y_raw.as_str(), ["2", "1", "28", "28"]);
    let vector = (ym_npy.as_str(), ym_raw.as_str(), ["2", "1", "1", "196"]);
    // (name, measurement, K, CLI options, C options)
    #[rustfmt::skip]
    let cases: Vec<Twin<'_>> = vec![
        ("projection, models, scale", image, 1,
         vec!["--signal-model", model, "--noise-model", model, "--operator", "scale:0.5", "--alpha", "0.5", "--rule", "projection", "--steps", "3"],
         vec!["--signal-model", model, "--noise-model", model, "--operator-scale", "0.5", "--alpha", "0.5", "--rule", "projection", "--steps", "3"]),
        ("dps, models, identity, K 2", image, 2,
         vec!["--signal-model", model, "--noise-model", model, "--rule", "dps", "--steps", "2"],
         vec!["--signal-model", model, "--noise-model", model, "--rule", "dps", "--steps", "2"]),
        ("pigdm, Gaussian noise, mask, K 3", image, 3,
         vec!["--signal-model", model, "--noise", "gaussian:0.2:0.1", "--operator", &mask_op, "--rule", "pigdm", "--steps", "3"],
         vec!["--signal-model", model, "--noise-gaussian", "0.2", "0.1", "--operator-mask", &mask_raw, "--rule", "pigdm", "--steps", "3"]),
        ("projection, stats and sine, K 2", image, 2,
         vec!["--signal-stats", &stats_npy, "--noise", "sine:0.2", "--rule", "projection", "--steps", "5", "--seed", "4"],
         vec!["--signal-stats", &stats_raw, "1", "28", "28", "--noise-sine", "0.2", "--rule", "projection", "--steps", "5", "--seed", "4"]),
        ("pigdm, model, matrix, signal shape", vector, 1,
         vec!["--signal-model", model, "--noise", "gaussian:0.1", "--operator", &matrix_op, "--signal-shape", "1,28,28", "--rule", "pigdm", "--steps", "3"],
         vec!["--signal-model", model, "--noise-gaussian", "0.1", "0", "--operator-matrix", &a_raw, "196", "784", "--signal-shape", "1", "28", "28", "--rule", "pigdm", "--steps", "3"]),
        ("dps, stats and sine, matrix, eps, K 2", vector, 2,
         vec!["--signal-stats", &stats_npy, "--noise", "sine:0.1", "--operator", &matrix_op, "--rule", "dps", "--steps", "4", "--eps", "0.01"],
         vec!["--signal-stats", &stats_raw, "1", "28", "28", "--noise-sine", "0.1", "--operator-matrix", &a_raw, "196", "784", "--rule", "dps", "--steps", "4", "--eps", "0.01"]),
    ];
    for (i, (name, (ynpy, yraw, shape), k, cli_args, c_args)) in cases.into_iter().enumerate() {
        let ks = k.to_string();
        let (x, n, sd) = (
            tmp(&format!("twin{i}_x.npy")),
            tmp(&format!("twin{i}_n.npy")),
            tmp(&format!("twin{i}_s.npy")),
        );
        let mut cmd = Command::new(&cli);
        cmd.args([
            "denoise",
            "--measurement",
            ynpy,
            "--samples",
            &ks,
            "--quiet",
        ])
        .args(&cli_args);
        cmd.arg("--out").arg(&x).arg("--noise-out").arg(&n);
        if k > 1 {
            cmd.arg("--std-out").arg(&sd);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{name}: CLI: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let prefix = tmp(&format!("twin{i}"));
        let out = Command::new(&twin)
            .arg(yraw)
            .args(shape)
            .arg(&prefix)
            .args(["--samples", &ks])
            .args(&c_args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: C: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let c_out = |ext: &str| std::fs::read(format!("{}.{ext}", prefix.display())).unwrap();
        assert_eq!(npy_data(&x), c_out("signal"), "{name}: signal differs");
        assert_eq!(npy_data(&n), c_out("noise"), "{name}: noise differs");
        if k > 1 {
            assert_eq!(npy_data(&sd), c_out("std"), "{name}: std differs");
        }
    }
}

#[test]
fn c_program_is_clean_under_valgrind() {
    let have = Command::new("valgrind")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        assert!(
            std::env::var_os("JOINTDIFF_REQUIRE_VALGRIND").is_none(),
            "valgrind is required (JOINTDIFF_REQUIRE_VALGRIND is set) but not installed"
        );
        eprintln!(
            "valgrind not installed: skipping (CI installs it and sets JOINTDIFF_REQUIRE_VALGRIND)"
        );
        return;
    }
    let exe = build_c_test();
    // rayon's global pool keeps its worker threads until exit; their thread-local blocks are suppressed
    // (tests/capi/valgrind.supp), which needs enough stack frames to see the rayon caller.
    let supp = format!(
        "--suppressions={}",
        root().join("tests/capi/valgrind.supp").display()
    );
    let vg = [
        "valgrind",
        "--error-exitcode=1",
        "--leak-check=full",
        "--errors-for-leak-kinds=definite,possible",
        "--num-callers=40",
        supp.as_str(),
        "-q",
    ];
    // A tiny random model (ngf 2) on 8x8 images keeps the run short under valgrind's emulation.
    let config = Ncsnv2Config {
        channels: 1,
        ngf: 2,
        input_map: true,
    };
    let mut rng = Rng::stream(5, 0, 0);
    let params = init_params(&config, |s| {
        let n: usize = s.shape.iter().product();
        let base = if s.name.ends_with("alpha") || s.name.ends_with("gamma") {
            1.0
        } else {
            0.0
        };
        (0..n).map(|_| base + 0.2 * rng.normal() as f32).collect()
    });
    let model = tmp("tiny.safetensors");
    std::fs::write(&model, serialize(None, &params).unwrap()).unwrap();
    let (_, _, text) = run_c(&exe, Some(&vg), &model, 2, 1, 8, 2);
    assert!(text.contains(" passed, 0 failed"), "{text}");
}
