//! The CLI's option-value parsers: `--noise` (sine:STD, gaussian:STD[:MEAN]) and `--operator` (identity,
//! scale:B; the file-backed mask:/matrix: forms are left out so the fuzzer does not open arbitrary paths).
#![no_main]
use jointdiff_cli::args::{parse_noise, OperatorArgs};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = parse_noise(s);
    if !s.starts_with("mask:") && !s.starts_with("matrix:") {
        let op = OperatorArgs {
            operator: s.to_string(),
            alpha: 0.5,
        };
        let _ = op.parse([1, 28, 28]);
    }
});
