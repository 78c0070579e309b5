//! jointdiff C API: load score models, configure a session, denoise buffers by joint posterior sampling.
//!
//! Every entry point catches panics, checks every pointer and size, and reports failures as a
//! [`jd_status`] plus a thread-local message ([`jd_last_error`]). A `jd_model` is immutable and may be
//! shared by threads; a `jd_session` is used by one thread at a time. Destroy functions take `T**` and null
//! the caller's pointer. The results equal `jointdiff denoise` with the same options and seed, bit for bit.
#![allow(non_camel_case_types)]
// The C ABI takes raw pointers by design; each is checked before use.
#![allow(clippy::missing_safety_doc)]

use jointdiff_core::error::{Error, ErrorKind};
use jointdiff_core::model::ModelFile;
use jointdiff_core::operator::Operator;
use jointdiff_core::plan::{
    DenoisePlan, DenoiseSpec, GaussianStats, NetworkModel, NoisePrior, SignalPrior,
};
use jointdiff_core::sampler::Rule;
use jointdiff_core::sde::Sde;
use jointdiff_runtime::{BackendKind, Runtime};
use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

/// Version of the C ABI; changes whenever a signature or a struct layout changes.
pub const JD_ABI_VERSION: u32 = 1;

/// Status of every call. `JD_OK` is 0; anything else is a failure described by `jd_last_error()`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum jd_status {
    JD_OK = 0,
    /// A required pointer argument was NULL.
    JD_ERR_NULL_POINTER = 1,
    /// An argument is out of range (steps 0, negative lambda, wrong buffer length, ...).
    JD_ERR_INVALID_ARGUMENT = 2,
    /// A file could not be read.
    JD_ERR_IO = 3,
    /// A model file or buffer is malformed (truncated, bad header, unsupported dtype, bad metadata).
    JD_ERR_FORMAT = 4,
    /// Shapes do not fit: input vs model, operator vs signal, a tensor of the wrong shape.
    JD_ERR_SHAPE = 5,
    /// A model file lacks a tensor the network needs.
    JD_ERR_MISSING_TENSOR = 6,
    /// NaN or Inf in an input, or the sampler diverged.
    JD_ERR_NON_FINITE = 7,
    /// The progress callback asked to stop.
    JD_ERR_CANCELLED = 8,
    /// The feature is not in this build (e.g. the dps/pigdm rules, the wgpu backend, default models).
    JD_ERR_UNAVAILABLE = 9,
    /// An internal error (a bug); the library caught it and stays usable.
    JD_ERR_INTERNAL = 10,
}

/// SDE of the sampler (pass as the `int32_t` argument of `jd_session_set_sde`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum jd_sde {
    /// The signal model's own SDE (the default), or VP without a signal model.
    JD_SDE_MODEL = 0,
    JD_SDE_VP = 1,
    JD_SDE_VE = 2,
    JD_SDE_SIMPLE = 3,
}

/// Data-consistency rule (argument of `jd_session_set_rule`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum jd_rule {
    JD_RULE_PROJECTION = 0,
    JD_RULE_DPS = 1,
    JD_RULE_PIGDM = 2,
}

/// Compute backend (argument of `jd_session_set_backend`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum jd_backend {
    JD_BACKEND_CPU = 0,
    JD_BACKEND_REFERENCE = 1,
    JD_BACKEND_WGPU = 2,
}

/// Which embedded default model (argument of `jd_model_default`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum jd_default_model {
    JD_DEFAULT_SIGNAL = 0,
    JD_DEFAULT_NOISE = 1,
}

/// What a model is (filled by `jd_model_get_info`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct jd_model_info {
    pub channels: u32,
    pub ngf: u32,
    /// Image size the model was trained at; 0 when not recorded (reference checkpoints).
    pub height: u32,
    pub width: u32,
    /// 1 for a reference NCSNv2 checkpoint (no jointdiff metadata), else 0.
    pub reference_checkpoint: i32,
}

/// Progress callback: called after every sampler step with the steps done and the total, on the thread
/// that called `jd_denoise` (the sampling itself runs on the library's worker threads and waits for the
/// answer). Return 0 to continue, any other value to cancel (`jd_denoise` then returns `JD_ERR_CANCELLED`).
pub type jd_progress_fn =
    Option<unsafe extern "C" fn(user: *mut c_void, done: u32, total: u32) -> i32>;

/// A loaded score model (opaque). Immutable; may be shared by threads. Its network is built once per
/// backend and shared by every session that uses it.
pub struct jd_model {
    inner: NetworkModel,
}

/// A denoising session (opaque): the options of a denoise job (core's `DenoiseSpec`, with `jointdiff
/// denoise`'s defaults) plus the models it uses. One thread at a time.
pub struct jd_session {
    spec: DenoiseSpec,
    backend: Runtime,
    progress: jd_progress_fn,
    progress_user: *mut c_void,
}

struct Fail(jd_status, String);

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        let s = match e.kind {
            ErrorKind::Format => jd_status::JD_ERR_FORMAT,
            ErrorKind::Shape => jd_status::JD_ERR_SHAPE,
            ErrorKind::MissingTensor => jd_status::JD_ERR_MISSING_TENSOR,
            ErrorKind::InvalidArgument => jd_status::JD_ERR_INVALID_ARGUMENT,
            ErrorKind::NonFinite => jd_status::JD_ERR_NON_FINITE,
            ErrorKind::Cancelled => jd_status::JD_ERR_CANCELLED,
            ErrorKind::Unavailable => jd_status::JD_ERR_UNAVAILABLE,
        };
        Fail(s, e.message)
    }
}

fn fail<T>(s: jd_status, msg: impl Into<String>) -> Result<T, Fail> {
    Err(Fail(s, msg.into()))
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Runs an entry point: catches panics, records the message of a failure.
fn guard(f: impl FnOnce() -> Result<(), Fail>) -> jd_status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => jd_status::JD_OK,
        Ok(Err(Fail(s, msg))) => {
            set_error(&msg);
            s
        }
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown".into());
            set_error(&format!("internal error (please report): {what}"));
            jd_status::JD_ERR_INTERNAL
        }
    }
}

fn non_null<T>(p: *const T, what: &str) -> Result<(), Fail> {
    if p.is_null() {
        return fail(jd_status::JD_ERR_NULL_POINTER, format!("{what} is NULL"));
    }
    Ok(())
}

/// The library version, e.g. "0.1.0" (static string, never NULL).
#[no_mangle]
pub extern "C" fn jd_version() -> *const c_char {
    static V: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
    V.as_ptr() as *const c_char
}

/// The ABI version this library implements (`JD_ABI_VERSION` of its header).
#[no_mangle]
pub extern "C" fn jd_abi_version() -> u32 {
    JD_ABI_VERSION
}

/// The message of the last failed call on this thread ("" if none). Valid until the next failing call on
/// this thread; never NULL.
#[no_mangle]
pub extern "C" fn jd_last_error() -> *const c_char {
    static EMPTY: &[u8] = b"\0";
    catch_unwind(|| LAST_ERROR.with(|e| e.borrow().as_ptr()))
        .unwrap_or(EMPTY.as_ptr() as *const c_char)
}

fn cpu() -> Runtime {
    Runtime::new(BackendKind::Cpu).expect("the CPU backend is always compiled")
}

/// Parses a model and builds its network on the CPU backend (kept for the sessions): every tensor is
/// checked here, at load time.
fn load(bytes: &[u8], what: &str) -> Result<Box<jd_model>, Fail> {
    let file = ModelFile::from_bytes(bytes).map_err(|e| {
        let f = Fail::from(e);
        Fail(f.0, format!("{what}: {}", f.1))
    })?;
    let inner = NetworkModel {
        file: Arc::new(file),
        name: what.to_string(),
    };
    cpu().prepare(&inner)?;
    Ok(Box::new(jd_model { inner }))
}

/// Loads a model file (safetensors; a file without jointdiff metadata is a reference NCSNv2 checkpoint).
/// On success `*out` owns the model (free it with `jd_model_destroy`); on failure `*out` is NULL.
#[no_mangle]
pub unsafe extern "C" fn jd_model_load(path: *const c_char, out: *mut *mut jd_model) -> jd_status {
    guard(|| {
        non_null(out, "out")?;
        *out = std::ptr::null_mut();
        non_null(path, "path")?;
        let p = CStr::from_ptr(path).to_str().map_err(|_| {
            Fail(
                jd_status::JD_ERR_INVALID_ARGUMENT,
                "path is not UTF-8".into(),
            )
        })?;
        let bytes = std::fs::read(p)
            .map_err(|e| Fail(jd_status::JD_ERR_IO, format!("{p}: cannot read: {e}")))?;
        *out = Box::into_raw(load(&bytes, p)?);
        Ok(())
    })
}

/// Loads a model from `len` bytes at `data` (the bytes are copied; the buffer may be freed afterwards).
#[no_mangle]
pub unsafe extern "C" fn jd_model_load_buffer(
    data: *const u8,
    len: usize,
    out: *mut *mut jd_model,
) -> jd_status {
    guard(|| {
        non_null(out, "out")?;
        *out = std::ptr::null_mut();
        non_null(data, "data")?;
        if len > isize::MAX as usize {
            return fail(jd_status::JD_ERR_INVALID_ARGUMENT, "len is too large");
        }
        let bytes = std::slice::from_raw_parts(data, len);
        *out = Box::into_raw(load(bytes, "buffer")?);
        Ok(())
    })
}

/// An embedded default model: `JD_DEFAULT_SIGNAL` (NCSNv2 ngf 32 trained on Fashion-MNIST) or
/// `JD_DEFAULT_NOISE` (trained on handwritten MNIST digits), both 28x28x1 under the VP SDE. Free it with
/// `jd_model_destroy`.
#[no_mangle]
pub unsafe extern "C" fn jd_model_default(which: i32, out: *mut *mut jd_model) -> jd_status {
    guard(|| {
        non_null(out, "out")?;
        *out = std::ptr::null_mut();
        let (bytes, what) = if which == jd_default_model::JD_DEFAULT_SIGNAL as i32 {
            (jointdiff_core::defaults::SIGNAL, "embedded signal model")
        } else if which == jd_default_model::JD_DEFAULT_NOISE as i32 {
            (jointdiff_core::defaults::NOISE, "embedded noise model")
        } else {
            return fail(
                jd_status::JD_ERR_INVALID_ARGUMENT,
                format!("unknown default model {which}"),
            );
        };
        *out = Box::into_raw(load(bytes, what)?);
        Ok(())
    })
}

/// Describes a model.
#[no_mangle]
pub unsafe extern "C" fn jd_model_get_info(
    model: *const jd_model,
    out: *mut jd_model_info,
) -> jd_status {
    guard(|| {
        non_null(model, "model")?;
        non_null(out, "out")?;
        let model = &*model;
        let m = &model.inner.file.meta;
        *out = jd_model_info {
            channels: m.channels as u32,
            ngf: m.ngf as u32,
            height: m.image_size[0] as u32,
            width: m.image_size[1] as u32,
            reference_checkpoint: model.inner.file.reference_checkpoint as i32,
        };
        Ok(())
    })
}

/// Frees a model and sets `*model` to NULL. Sessions that use the model keep their own reference, so it
/// may be destroyed while they live; its network's memory is freed when the last holder is destroyed.
/// NULL and `*model == NULL` are no-ops.
#[no_mangle]
pub unsafe extern "C" fn jd_model_destroy(model: *mut *mut jd_model) {
    let _ = guard(|| {
        if !model.is_null() && !(*model).is_null() {
            drop(Box::from_raw(*model));
            *model = std::ptr::null_mut();
            jointdiff_runtime::release_dropped_models();
        }
        Ok(())
    });
}

/// Creates a session with the defaults of `jointdiff denoise`: pigdm rule, 400 steps, eps 1e-3, the
/// rule's tuned lambda and mu (pigdm 1.2 / 1.2), alpha 1, identity operator, the models' SDE, CPU
/// backend, one sample, output clipped to the data range. A signal prior (`jd_session_set_signal_model` or
/// `jd_session_set_signal_gaussian`) and a noise prior must be set before `jd_denoise`.
#[no_mangle]
pub unsafe extern "C" fn jd_session_create(out: *mut *mut jd_session) -> jd_status {
    guard(|| {
        non_null(out, "out")?;
        *out = Box::into_raw(Box::new(jd_session {
            spec: DenoiseSpec::default(),
            backend: cpu(),
            progress: None,
            progress_user: std::ptr::null_mut(),
        }));
        Ok(())
    })
}

/// Frees a session and sets `*session` to NULL. NULL and `*session == NULL` are no-ops.
#[no_mangle]
pub unsafe extern "C" fn jd_session_destroy(session: *mut *mut jd_session) {
    let _ = guard(|| {
        if !session.is_null() && !(*session).is_null() {
            drop(Box::from_raw(*session));
            *session = std::ptr::null_mut();
            jointdiff_runtime::release_dropped_models();
        }
        Ok(())
    });
}

unsafe fn with_session(
    s: *mut jd_session,
    f: impl FnOnce(&mut jd_session) -> Result<(), Fail>,
) -> jd_status {
    guard(|| {
        non_null(s, "session")?;
        f(&mut *s)
    })
}

/// Uses `model` as the signal prior (the session keeps its own reference).
#[no_mangle]
pub unsafe extern "C" fn jd_session_set_signal_model(
    s: *mut jd_session,
    model: *const jd_model,
) -> jd_status {
    with_session(s, |s| {
        non_null(model, "model")?;
        s.spec.signal = Some(SignalPrior::Network((&*model).inner.clone()));
        Ok(())
    })
}

/// Uses per-value Gaussian statistics as the signal prior (an analytic prior instead of a model; replaces
/// a signal model): `mean` and `var` each hold one item of `c x h x w` values, variances >= 0. The data
/// are copied. As `jointdiff denoise --signal-stats`.
#[no_mangle]
pub unsafe extern "C" fn jd_session_set_signal_gaussian(
    s: *mut jd_session,
    mean: *const f32,
    var: *const f32,
    c: usize,
    h: usize,
    w: usize,
) -> jd_status {
    with_session(s, |s| {
        let len = [c, h, w]
            .iter()
            .try_fold(1usize, |a, &v| a.checked_mul(v))
            .ok_or_else(|| {
                Fail(
                    jd_status::JD_ERR_INVALID_ARGUMENT,
                    "signal shape overflows".into(),
                )
            })?;
        let mean = copy_finite(mean, len, "mean")?;
        let var = copy_finite(var, len, "var")?;
        if let Some(i) = var.iter().position(|&v| v < 0.0) {
            return fail(
                jd_status::JD_ERR_INVALID_ARGUMENT,
                format!("var: value at index {i} is negative"),
            );
        }
        s.spec.signal = Some(SignalPrior::Gaussian(GaussianStats {
            item: [c, h, w],
            mean,
            var,
        }));
        Ok(())
    })
}

/// The shape `c x h x w` of a signal item where neither the measurement nor a prior tells it (a matrix
/// operator with priors that do not record it); 0, 0, 0 clears it. As `jointdiff denoise --signal-shape`.
#[no_mangle]
pub unsafe extern "C" fn jd_session_set_signal_shape(
    s: *mut jd_session,
    c: usize,
    h: usize,
    w: usize,
) -> jd_status {
    with_session(s, |s| {
        s.spec.signal_shape = match [c, h, w] {
            [0, 0, 0] => None,
            shape if shape.contains(&0) => {
                return fail(
                    jd_status::JD_ERR_INVALID_ARGUMENT,
                    format!("signal shape {c}x{h}x{w} has a zero"),
                )
            }
            shape => Some(shape),
        };
        Ok(())
    })
}

/// Uses `model` as the noise prior (joint method); replaces an analytic noise prior.
#[no_mangle]
pub unsafe extern "C" fn jd_session_set_noise_model(
    s: *mut jd_session,
    model: *const jd_model,
) -> jd_status {
    with_session(s, |s| {
        non_null(model, "model")?;
        s.spec.noise = Some(NoisePrior::Network((&*model).inner.clone()));
        Ok(())
    })
}

/// Treats the noise as Gaussian with the method's sinusoidal per-row standard deviation, RMS `std`
/// (`jointdiff denoise --noise sine:STD`); replaces a noise model.
#[no_mangle]
pub unsafe extern "C" fn jd_session_set_noise_sine(s: *mut jd_session, std: f64) -> jd_status {
    with_session(s, |s| {
        if !(std.is_finite() && std >= 0.0) {
            return fail(
                jd_status::JD_ERR_INVALID_ARGUMENT,
                format!("noise std must be >= 0 and finite, got {std}"),
            );
        }
        s.spec.noise = Some(NoisePrior::Sine { std });
        Ok(())
    })
}

/// Treats the noise as white Gaussian N(mean, std^2) (the non-joint baseline); replaces a noise model.
#[no_mangle]
pub unsafe extern "C" fn jd_session_set_noise_gaussian(
    s: *mut jd_session,
    std: f32,
    mean: f32,
) -> jd_status {
    with_session(s, |s| {
        if !(std.is_finite() && mean.is_finite() && std >= 0.0) {
            return fail(
                jd_status::JD_ERR_INVALID_ARGUMENT,
                format!("noise std must be >= 0 and finite (std {std}, mean {mean})"),
            );
        }
        s.spec.noise = Some(NoisePrior::Gaussian {
            std: std as f64,
            mean: mean as f64,
        });
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn jd_session_set_sde(s: *mut jd_session, sde: i32) -> jd_status {
    with_session(s, |s| {
        s.spec.sde = match sde {
            0 => None,
            1 => Some(Sde::vp_default()),
            2 => Some(Sde::ve_default()),
            3 => Some(Sde::simple_default()),
            _ => {
                return fail(
                    jd_status::JD_ERR_INVALID_ARGUMENT,
                    format!("unknown sde {sde}"),
                )
            }
        };
        Ok(())
    })
}

/// Data-consistency rule; lambda and mu default to the rule's tuned weights unless set.
#[no_mangle]
pub unsafe extern "C" fn jd_session_set_rule(s: *mut jd_session, rule: i32) -> jd_status {
    with_session(s, |s| {
        s.spec.rule = match rule {
            0 => Rule::Projection,
            1 => Rule::Dps,
            2 => Rule::Pigdm,
            _ => {
                return fail(
                    jd_status::JD_ERR_INVALID_ARGUMENT,
                    format!("unknown rule {rule}"),
                )
            }
        };
        Ok(())
    })
}

/// Number of reverse-time steps (>= 1).
#[no_mangle]
pub unsafe extern "C" fn jd_session_set_steps(s: *mut jd_session, steps: u32) -> jd_status {
    with_session(s, |s| {
        if steps == 0 {
            return fail(
                jd_status::JD_ERR_INVALID_ARGUMENT,
                "steps must be at least 1",
            );
        }
        s.spec.steps = steps as usize;
        Ok(())
    })
}

fn weight(v: f64, what: &str) -> Result<f64, Fail> {
    if !(v.is_finite() && v >= 0.0) {
        return fail(
            jd_status::JD_ERR_INVALID_ARGUMENT,
            format!("{what} must be finite and >= 0, got {v}"),
        );
    }
    Ok(v)
}

/// Data-consistency weight of the signal (>= 0).
#[no_mangle]
pub unsafe extern "C" fn jd_session_set_lambda(s: *mut jd_session, lambda: f64) -> jd_status {
    with_session(s, |s| {
        s.spec.lambda = Some(weight(lambda, "lambda")?);
        Ok(())
    })
}

/// Data-consistency weight of the noise (>= 0).
#[no_mangle]
pub unsafe extern "C" fn jd_session_set_mu(s: *mut jd_session, mu: f64) -> jd_status {
    with_session(s, |s| {
        s.spec.mu = Some(weight(mu, "mu")?);
        Ok(())
    })
}

/// Last time `eps` of the time grid `linspace(1, eps, steps)` (default 1e-3; in (0, 1)).
#[no_mangle]
pub unsafe extern "C" fn jd_session_set_eps(s: *mut jd_session, eps: f64) -> jd_status {
    with_session(s, |s| {
        if !(eps.is_finite() && eps > 0.0 && eps < 1.0) {
            return fail(
                jd_status::JD_ERR_INVALID_ARGUMENT,
                format!("eps must be in (0, 1), got {eps}"),
            );
        }
        s.spec.eps = eps;
        Ok(())
    })
}

/// Noise scale alpha of `y = A x + alpha n` (finite).
#[no_mangle]
pub unsafe extern "C" fn jd_session_set_alpha(s: *mut jd_session, alpha: f64) -> jd_status {
    with_session(s, |s| {
        if !alpha.is_finite() {
            return fail(jd_status::JD_ERR_INVALID_ARGUMENT, "alpha must be finite");
        }
        s.spec.alpha = alpha;
        Ok(())
    })
}

/// Posterior samples per measurement (>= 1). With K > 1 the outputs are means over K samples and
/// `jd_denoise` can also write the per-value standard deviation.
#[no_mangle]
pub unsafe extern "C" fn jd_session_set_samples(s: *mut jd_session, samples: u32) -> jd_status {
    with_session(s, |s| {
        if samples == 0 {
            return fail(
                jd_status::JD_ERR_INVALID_ARGUMENT,
                "samples must be at least 1",
            );
        }
        s.spec.samples = samples as usize;
        Ok(())
    })
}

/// Clip the signal estimate to the data range (1, the default) or not (0).
#[no_mangle]
pub unsafe extern "C" fn jd_session_set_clip(s: *mut jd_session, clip: i32) -> jd_status {
    with_session(s, |s| {
        s.spec.clip = clip != 0;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn jd_session_set_backend(s: *mut jd_session, backend: i32) -> jd_status {
    with_session(s, |s| {
        let kind = match backend {
            0 => BackendKind::Cpu,
            1 => BackendKind::Reference,
            2 => BackendKind::Wgpu,
            _ => {
                return fail(
                    jd_status::JD_ERR_INVALID_ARGUMENT,
                    format!("unknown backend {backend}"),
                )
            }
        };
        s.backend = Runtime::new(kind)?;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn jd_session_set_operator_identity(s: *mut jd_session) -> jd_status {
    with_session(s, |s| {
        s.spec.operator = Operator::Identity;
        Ok(())
    })
}

/// `A = factor * I`.
#[no_mangle]
pub unsafe extern "C" fn jd_session_set_operator_scale(
    s: *mut jd_session,
    factor: f32,
) -> jd_status {
    with_session(s, |s| {
        if !factor.is_finite() {
            return fail(
                jd_status::JD_ERR_INVALID_ARGUMENT,
                "scale factor must be finite",
            );
        }
        s.spec.operator = Operator::Scale(factor);
        Ok(())
    })
}

fn copy_finite(p: *const f32, len: usize, what: &str) -> Result<Vec<f32>, Fail> {
    non_null(p, what)?;
    if len == 0 || len > (isize::MAX as usize) / 4 {
        return fail(
            jd_status::JD_ERR_INVALID_ARGUMENT,
            format!("{what}: length {len} is out of range"),
        );
    }
    // SAFETY: non-null and the caller promises `len` readable floats.
    let v = unsafe { std::slice::from_raw_parts(p, len) }.to_vec();
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return fail(
            jd_status::JD_ERR_NON_FINITE,
            format!("{what}: value at index {i} is not finite"),
        );
    }
    Ok(v)
}

/// `A = diag(mask)`, `len` = C*H*W of a signal item (checked at `jd_denoise`).
#[no_mangle]
pub unsafe extern "C" fn jd_session_set_operator_mask(
    s: *mut jd_session,
    mask: *const f32,
    len: usize,
) -> jd_status {
    with_session(s, |s| {
        s.spec.operator = Operator::Mask(copy_finite(mask, len, "mask")?);
        Ok(())
    })
}

/// Dense row-major `m x d` matrix (`d` = C*H*W of a signal item). The data are copied.
#[no_mangle]
pub unsafe extern "C" fn jd_session_set_operator_matrix(
    s: *mut jd_session,
    a: *const f32,
    m: usize,
    d: usize,
) -> jd_status {
    with_session(s, |s| {
        let len = m.checked_mul(d).ok_or_else(|| {
            Fail(
                jd_status::JD_ERR_INVALID_ARGUMENT,
                "matrix size overflows".into(),
            )
        })?;
        s.spec.operator = Operator::Matrix {
            m,
            d,
            a: copy_finite(a, len, "matrix")?,
        };
        Ok(())
    })
}

/// Progress callback (NULL to remove) and the user pointer passed back to it.
#[no_mangle]
pub unsafe extern "C" fn jd_session_set_progress(
    s: *mut jd_session,
    cb: jd_progress_fn,
    user: *mut c_void,
) -> jd_status {
    with_session(s, |s| {
        s.progress = cb;
        s.progress_user = user;
        Ok(())
    })
}

/// The session's options as core's denoise spec, planned for `n x c x h x w` measurements (every check
/// is the plan's, with the CLI's error texts).
fn plan(s: &jd_session, n: usize, c: usize, h: usize, w: usize) -> Result<DenoisePlan, Fail> {
    if n == 0 || c == 0 || h == 0 || w == 0 {
        return fail(
            jd_status::JD_ERR_INVALID_ARGUMENT,
            format!("empty measurement shape {n}x{c}x{h}x{w}"),
        );
    }
    Ok(s.spec.plan([n, c, h, w])?)
}

/// Denoises `n` measurements of shape `c x h x w` (NCHW float32; for a matrix operator use c = h = 1 and
/// w = m). Writes the signal estimate to `signal_out` (`signal_len` floats, exactly N*C*H*W of the signal),
/// the noise estimate to `noise_out` if not NULL (`noise_len` floats, N times the measurement size) and,
/// with `samples > 1`, the per-value standard deviation of the signal to `std_out` if not NULL.
/// `jd_denoise_signal_len` tells the signal size. Same options and seed give the same bytes as
/// `jointdiff denoise`.
#[no_mangle]
pub unsafe extern "C" fn jd_denoise(
    s: *mut jd_session,
    y: *const f32,
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    seed: u64,
    signal_out: *mut f32,
    signal_len: usize,
    noise_out: *mut f32,
    noise_len: usize,
    std_out: *mut f32,
    std_len: usize,
) -> jd_status {
    with_session(s, |s| {
        non_null(y, "y")?;
        non_null(signal_out, "signal_out")?;
        let total = [n, c, h, w]
            .iter()
            .try_fold(1usize, |a, &v| a.checked_mul(v))
            .filter(|&t| t <= (isize::MAX as usize) / 4)
            .ok_or_else(|| {
                Fail(
                    jd_status::JD_ERR_INVALID_ARGUMENT,
                    "measurement shape overflows".into(),
                )
            })?;
        let p = plan(s, n, c, h, w)?;
        if total != p.noise_len() {
            return fail(
                jd_status::JD_ERR_SHAPE,
                format!(
                    "measurement has {total} values but the operator gives {} per item",
                    p.noise_len() / p.items
                ),
            );
        }
        let sl = p.signal_len();
        if signal_len != sl {
            return fail(
                jd_status::JD_ERR_INVALID_ARGUMENT,
                format!("signal_len is {signal_len}, the signal needs {sl}"),
            );
        }
        if !noise_out.is_null() && noise_len != total {
            return fail(
                jd_status::JD_ERR_INVALID_ARGUMENT,
                format!("noise_len is {noise_len}, the noise needs {total}"),
            );
        }
        if !std_out.is_null() {
            if s.spec.samples < 2 {
                return fail(
                    jd_status::JD_ERR_INVALID_ARGUMENT,
                    "std_out needs samples >= 2 (jd_session_set_samples)",
                );
            }
            if std_len != sl {
                return fail(
                    jd_status::JD_ERR_INVALID_ARGUMENT,
                    format!("std_len is {std_len}, expected {sl}"),
                );
            }
        }
        let ys = std::slice::from_raw_parts(y, total);
        // the job runs on the backend's workers; the callback is called here, on the caller's thread
        let (cb, user) = (s.progress, s.progress_user);
        let rt = s.backend.clone();
        let stats = rt.run_reporting(
            |progress| rt.denoise(&p, ys, seed, progress),
            |done, all| match cb {
                // SAFETY: the caller registered this callback for this session.
                Some(f) => unsafe { f(user, done as u32, all as u32) == 0 },
                None => true,
            },
        )?;
        std::slice::from_raw_parts_mut(signal_out, sl).copy_from_slice(&stats.estimate.signal.data);
        if !noise_out.is_null() {
            std::slice::from_raw_parts_mut(noise_out, total)
                .copy_from_slice(&stats.estimate.noise.data);
        }
        if let (false, Some(sd)) = (std_out.is_null(), &stats.signal_std) {
            std::slice::from_raw_parts_mut(std_out, sl).copy_from_slice(&sd.data);
        }
        Ok(())
    })
}

/// The number of signal values `jd_denoise` writes for `n` measurements of `c x h x w` with this
/// session's models and operator.
#[no_mangle]
pub unsafe extern "C" fn jd_denoise_signal_len(
    s: *const jd_session,
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    out_len: *mut usize,
) -> jd_status {
    guard(|| {
        non_null(s, "session")?;
        non_null(out_len, "out_len")?;
        *out_len = plan(&*s, n, c, h, w)?.signal_len();
        Ok(())
    })
}
