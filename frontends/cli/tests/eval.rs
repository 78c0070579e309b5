//! `jointdiff eval` end to end: the files it promises, scores checked against an independent computation
//! from the fixture files, resumption by chunks, and a clear error for a folder holding another evaluation.
use jointdiff_core::npy::NpyArray;
use std::path::PathBuf;
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_jointdiff"))
        .args(args)
        .output()
        .unwrap()
}

fn npy(rel: &str) -> Vec<f32> {
    let bytes = std::fs::read(root().join("fixtures").join(rel)).unwrap();
    NpyArray::parse(&bytes).unwrap().data
}

/// Rows `(pair, method) -> (psnr, ssim)` of pairs.csv.
fn pairs(dir: &std::path::Path) -> Vec<(usize, String, f64, f64)> {
    let text = std::fs::read_to_string(dir.join("pairs.csv")).unwrap();
    text.lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (
                f[0].parse().unwrap(),
                f[1].to_string(),
                f[2].parse().unwrap(),
                f[3].parse().unwrap(),
            )
        })
        .collect()
}

#[test]
fn eval_writes_its_outputs_resumes_and_scores_the_inverse_independently() {
    let dir = std::env::temp_dir().join(format!("jointdiff-eval-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = dir.to_str().unwrap();
    let model = root().join("fixtures/golden/ncsnv2_28x28x1_ngf16.safetensors");
    let model = model.to_str().unwrap();
    let args = [
        "--quiet",
        "eval",
        "--experiment",
        "fashion-digits",
        "--methods",
        "inverse,joint-pigdm,gauss-projection,nlm",
        "--start",
        "5",
        "--count",
        "3",
        "--chunk",
        "2",
        "--steps",
        "2",
        "--samples",
        "2",
        "--signal-model",
        model,
        "--noise-model",
        model,
        "--out",
        out,
    ];
    let o = run(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in [
        "results.md",
        "summary.json",
        "pairs.csv",
        "grid.png",
        "coverage.png",
        "config.json",
        "tuning.json",
        "chunks/0005-0007.csv",
        "chunks/0007-0008.csv",
        "chunks/0005-0007_joint-pigdm_std.npy",
    ] {
        assert!(dir.join(f).exists(), "{f} missing");
    }
    let md = std::fs::read_to_string(dir.join("results.md")).unwrap();
    for m in [
        "| inverse | 3 |",
        "| joint-pigdm | 3 |",
        "| gauss-projection | 3 |",
        "| nlm | 3 |",
    ] {
        assert!(md.contains(m), "{m} not in results.md:\n{md}");
    }
    // the trivial inverse clip(y / 0.5) = clip(x + n), scored here from the fixture files
    let (x, n) = (
        npy("data/fashion_t10k_200.npy"),
        npy("data/digits_heldout_200.npy"),
    );
    let rows = pairs(&dir);
    assert_eq!(rows.len(), 12);
    for (pair, method, p, _) in &rows {
        if method != "inverse" {
            continue;
        }
        let r = pair * 784..(pair + 1) * 784;
        let mse: f64 = x[r.clone()]
            .iter()
            .zip(&n[r])
            .map(|(a, b)| {
                let e = (0.5 * a + 0.5 * b) / 0.5;
                (e.clamp(0.0, 1.0) as f64 - *a as f64).powi(2)
            })
            .sum::<f64>()
            / 784.0;
        let want = 10.0 * (1.0 / mse).log10();
        assert!((p - want).abs() < 1e-3, "pair {pair}: {p} vs {want}");
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    let c1 = summary["methods"]["joint-pigdm"]["coverage_1std"]
        .as_f64()
        .unwrap();
    let c2 = summary["methods"]["joint-pigdm"]["coverage_2std"]
        .as_f64()
        .unwrap();
    assert!(
        (0.0..=1.0).contains(&c1) && c1 <= c2 && c2 <= 1.0,
        "{c1} {c2}"
    );
    // a rerun finds every chunk done: same scores, chunk files untouched
    let before = std::fs::metadata(dir.join("chunks/0005-0007_joint-pigdm.npy"))
        .unwrap()
        .modified()
        .unwrap();
    let o = run(&args);
    assert!(o.status.success());
    let after = std::fs::metadata(dir.join("chunks/0005-0007_joint-pigdm.npy"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after, "a finished chunk was recomputed");
    assert_eq!(pairs(&dir), rows);
    // chunks do not change any pair's result: one chunk of 3 gives the same estimates as chunks of 2 + 1
    let dir3 = std::env::temp_dir().join(format!("jointdiff-eval3-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir3);
    let mut one_chunk = args.to_vec();
    one_chunk[11] = "3"; // --chunk
    let last = one_chunk.len() - 1;
    one_chunk[last] = dir3.to_str().unwrap();
    let o = run(&one_chunk);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let sorted = |mut v: Vec<(usize, String, f64, f64)>| {
        v.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        v
    };
    assert_eq!(
        sorted(pairs(&dir3)),
        sorted(rows.clone()),
        "chunking changed a result"
    );
    let _ = std::fs::remove_dir_all(&dir3);
    // other options into the same folder: a clear error, nothing overwritten
    let mut other = args.to_vec();
    other[13] = "3"; // --steps
    let o = run(&other);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("holds another evaluation"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn eval_rejects_what_does_not_apply() {
    let dir = std::env::temp_dir().join(format!("jointdiff-eval-bad-{}", std::process::id()));
    let out = dir.to_str().unwrap();
    for (args, want) in [
        (
            vec![
                "eval",
                "--experiment",
                "cs-sine",
                "--methods",
                "nlm",
                "--out",
                out,
            ],
            "does not apply",
        ),
        (
            vec!["eval", "--experiment", "mnist", "--out", out],
            "expected fashion-digits",
        ),
        (
            vec!["eval", "--experiment", "gaussian:-1", "--out", out],
            "must be > 0",
        ),
        (
            vec![
                "eval",
                "--experiment",
                "ood",
                "--count",
                "101",
                "--out",
                out,
            ],
            "has 100 pairs",
        ),
        (
            vec![
                "eval",
                "--experiment",
                "gaussian",
                "--methods",
                "joint-foo",
                "--out",
                out,
            ],
            "unknown rule",
        ),
    ] {
        let o = run(&args);
        assert!(!o.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
