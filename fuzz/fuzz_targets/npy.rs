//! The npy reader and its NCHW view.
#![no_main]
use jointdiff_core::npy::NpyArray;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(a) = NpyArray::parse(data) {
        let _ = a.into_nchw();
    }
});
