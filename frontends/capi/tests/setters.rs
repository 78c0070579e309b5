//! The C ABI's setters against random values (proptest): every call returns a status (never a crash or a
//! panic), an accepted value keeps the session usable, and a refused one says why.
use jointdiff::*;
use proptest::prelude::*;
use std::ffi::CStr;

fn status_ok(s: jd_status) -> bool {
    (s as i32) >= 0 && (s as i32) <= 10
}

fn last_error() -> String {
    unsafe { CStr::from_ptr(jd_last_error()) }
        .to_string_lossy()
        .into_owned()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn setters_take_any_value(rule in any::<i32>(), sde in any::<i32>(), backend in -3i32..5,
                              steps in any::<u32>(), samples in any::<u32>(), lambda in any::<f64>(),
                              mu in any::<f64>(), alpha in any::<f64>(), eps in any::<f64>(),
                              std in any::<f32>(), mean in any::<f32>(), sine in any::<f64>(),
                              scale in any::<f32>(), clip in any::<i32>(),
                              shape in (0usize..5, 0usize..5, 0usize..5)) {
        let mut s: *mut jd_session = std::ptr::null_mut();
        unsafe {
            prop_assert_eq!(jd_session_create(&mut s), jd_status::JD_OK);
            let calls = [
                jd_session_set_rule(s, rule),
                jd_session_set_sde(s, sde),
                jd_session_set_backend(s, backend),
                jd_session_set_steps(s, steps),
                jd_session_set_samples(s, samples),
                jd_session_set_lambda(s, lambda),
                jd_session_set_mu(s, mu),
                jd_session_set_alpha(s, alpha),
                jd_session_set_eps(s, eps),
                jd_session_set_noise_gaussian(s, std, mean),
                jd_session_set_noise_sine(s, sine),
                jd_session_set_operator_scale(s, scale),
                jd_session_set_clip(s, clip),
                jd_session_set_signal_shape(s, shape.0, shape.1, shape.2),
            ];
            for (k, st) in calls.iter().enumerate() {
                prop_assert!(status_ok(*st), "call {}: status {:?}", k, st);
                prop_assert!(*st != jd_status::JD_ERR_INTERNAL, "call {} panicked: {}", k, last_error());
            }
            // refused values are the out-of-range ones, each with a message
            let lambda_ok = lambda.is_finite() && lambda >= 0.0;
            prop_assert_eq!(calls[5] == jd_status::JD_OK, lambda_ok);
            prop_assert_eq!(calls[3] == jd_status::JD_OK, steps > 0);
            prop_assert_eq!(calls[8] == jd_status::JD_OK, eps.is_finite() && eps > 0.0 && eps < 1.0);
            // the session still plans (or refuses to) with a status
            let mut len = 0usize;
            let st = jd_denoise_signal_len(s, 1, 1, 4, 4, &mut len);
            prop_assert!(status_ok(st) && st != jd_status::JD_ERR_INTERNAL, "{:?}: {}", st, last_error());
            jd_session_destroy(&mut s);
            prop_assert!(s.is_null());
        }
    }
}
