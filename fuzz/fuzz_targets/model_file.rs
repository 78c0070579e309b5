//! The safetensors model reader with its `jointdiff` metadata, and the network built from what it accepts.
#![no_main]
use jointdiff_core::model::ModelFile;
use jointdiff_core::RefBackend;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(mf) = ModelFile::from_bytes(data) {
        let _ = mf.build(&RefBackend);
    }
});
