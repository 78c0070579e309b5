//! The committed header `include/jointdiff.h` must be what cbindgen makes of the code today.
//! Regenerate with `JOINTDIFF_BLESS_HEADER=1 cargo test -p jointdiff-capi --test header`.
use std::path::PathBuf;

#[test]
fn header_has_not_drifted() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).unwrap();
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(&dir)
        .with_config(config)
        .generate()
        .expect("cbindgen")
        .write(&mut generated);
    let generated = String::from_utf8(generated).unwrap();
    let path = dir.join("include/jointdiff.h");
    if std::env::var_os("JOINTDIFF_BLESS_HEADER").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "include/jointdiff.h is out of date; run JOINTDIFF_BLESS_HEADER=1 cargo test -p jointdiff-capi --test header"
    );
}
