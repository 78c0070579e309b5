//! The IDX reader of `jointdiff train` (raw and gzip-compressed).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = jointdiff_cli::cmd::train::parse_idx(data);
});
