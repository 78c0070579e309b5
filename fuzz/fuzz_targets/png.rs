//! The CLI's PNG reader (images for `score`, `denoise`, `corrupt`, `train`).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = jointdiff_cli::io::decode_png(data);
});
