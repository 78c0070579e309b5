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
    EXE.get_or_init(build_c_test_once).clone()
}

fn build_c_test_once() -> PathBuf {
    cargo_build();
    let lib = target_dir().join("libjointdiff.a");
    assert!(
        lib.exists(),
        "{} missing: build jointdiff-capi first",
        lib.display()
    );
    let exe = tmp("test_capi");
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
        .arg(root().join("tests/capi/test_capi.c"))
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
            let mut c = Command::new(w[0]);
            c.args(&w[1..]).arg(exe);
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
