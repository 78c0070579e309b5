//! The C ABI's `jd_model_load_buffer`: any bytes give a status, never a crash; a loaded model is destroyed.
#![no_main]
use jointdiff::{jd_model, jd_model_destroy, jd_model_load_buffer, jd_status};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut m: *mut jd_model = std::ptr::null_mut();
    // SAFETY: `data` is a valid buffer of `data.len()` bytes and `m` a valid out-pointer.
    let st = unsafe { jd_model_load_buffer(data.as_ptr(), data.len(), &mut m) };
    assert!(
        st != jd_status::JD_ERR_INTERNAL,
        "the library caught a panic"
    );
    assert_eq!(st == jd_status::JD_OK, !m.is_null());
    // SAFETY: `m` is NULL or a model this call made.
    unsafe { jd_model_destroy(&mut m) };
});
