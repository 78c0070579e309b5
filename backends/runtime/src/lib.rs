//! jointdiff-runtime: the one backend dispatch (see README.md). Frontends pick a backend by
//! [`BackendKind`]; this crate is the only place that matches on it.
use jointdiff_core::error::{Error, Result};
use jointdiff_core::model::ModelFile;
use jointdiff_core::plan::{DenoisePlan, NetworkModel, PlanNets};
use jointdiff_core::prior::NetworkPrior;
use jointdiff_core::sampler::{sample_prior, PosteriorStats, Progress, SamplerConfig};
use jointdiff_core::{Backend, Ncsnv2, RefBackend, Tensor};
use jointdiff_cpu::CpuBackend;
use std::any::Any;
use std::sync::{Arc, Mutex, Weak};

/// A backend by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// Plain loops on host memory: the oracle (slow).
    Reference,
    /// The fast CPU backend (the default).
    Cpu,
    /// The GPU backend on wgpu (Vulkan, Metal, DX12; cargo feature `wgpu`, on by default).
    Wgpu,
}

impl BackendKind {
    pub const ALL: [BackendKind; 3] = [BackendKind::Reference, BackendKind::Cpu, BackendKind::Wgpu];

    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Reference => "reference",
            BackendKind::Cpu => "cpu",
            BackendKind::Wgpu => "wgpu",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "unknown backend '{s}' (expected reference, cpu or wgpu)"
                ))
            })
    }

    /// Whether this build has the backend.
    pub fn compiled(self) -> bool {
        match self {
            BackendKind::Wgpu => cfg!(feature = "wgpu"),
            _ => true,
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Generic code to run on whichever backend the runtime holds ([`Runtime::visit`]).
pub trait BackendVisitor {
    type Output;
    fn visit<B: Backend + 'static>(self, b: &B) -> Self::Output;
}

/// A chosen, available backend.
#[derive(Clone)]
pub struct Runtime {
    kind: BackendKind,
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    Reference,
    Cpu,
    #[cfg(feature = "wgpu")]
    Wgpu(Arc<jointdiff_wgpu::WgpuBackend>),
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Runtime({})", self.kind)
    }
}

/// The one dispatch: `$body` with `$b` bound to the runtime's backend.
macro_rules! dispatch {
    ($rt:expr, |$b:ident| $body:expr) => {
        match &$rt.inner {
            Inner::Reference => {
                let $b = &RefBackend;
                $body
            }
            Inner::Cpu => {
                let $b = &CpuBackend;
                $body
            }
            #[cfg(feature = "wgpu")]
            Inner::Wgpu(g) => {
                let $b = &**g;
                $body
            }
        }
    };
}

/// The process's GPU device, opened on first use (one device: networks are uploaded to it once).
#[cfg(feature = "wgpu")]
fn gpu() -> Result<Arc<jointdiff_wgpu::WgpuBackend>> {
    static GPU: std::sync::OnceLock<Result<Arc<jointdiff_wgpu::WgpuBackend>>> =
        std::sync::OnceLock::new();
    GPU.get_or_init(|| jointdiff_wgpu::WgpuBackend::new().map(Arc::new))
        .clone()
}

/// One line per GPU adapter wgpu finds (`jointdiff backends`); empty without the wgpu feature.
pub fn gpu_adapters() -> Vec<String> {
    #[cfg(feature = "wgpu")]
    {
        jointdiff_wgpu::adapters()
            .into_iter()
            .map(|a| {
                format!(
                    "{} ({}, {}, {})",
                    a.name, a.backend, a.device_type, a.driver
                )
            })
            .collect()
    }
    #[cfg(not(feature = "wgpu"))]
    {
        Vec::new()
    }
}

impl Runtime {
    /// The backend `kind`, or an [`jointdiff_core::error::ErrorKind::Unavailable`] error when this build or
    /// machine does not have it (never a silent fallback).
    pub fn new(kind: BackendKind) -> Result<Self> {
        if !kind.compiled() {
            return Err(Error::unavailable(format!(
                "the {kind} backend is not part of this build (available: {})",
                Self::available()
                    .iter()
                    .map(|k| k.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let inner = match kind {
            BackendKind::Reference => Inner::Reference,
            BackendKind::Cpu => Inner::Cpu,
            #[cfg(feature = "wgpu")]
            BackendKind::Wgpu => Inner::Wgpu(gpu()?),
            #[cfg(not(feature = "wgpu"))]
            BackendKind::Wgpu => unreachable!("checked above"),
        };
        Ok(Runtime { kind, inner })
    }

    /// Per-kernel GPU timing (timestamp queries) on or off: the wgpu backend on an adapter that has them;
    /// an `Unavailable` error otherwise.
    pub fn gpu_profiling(&self, on: bool) -> Result<()> {
        match &self.inner {
            #[cfg(feature = "wgpu")]
            Inner::Wgpu(g) => g.set_profiling(on),
            _ => Err(Error::unavailable(format!(
                "GPU timestamps: the {} backend has none (use --backend wgpu)",
                self.kind
            ))),
        }
    }

    /// `(kernel, dispatches, GPU ms)` since profiling was turned on, slowest first.
    pub fn gpu_profile(&self) -> Vec<(String, usize, f64)> {
        match &self.inner {
            #[cfg(feature = "wgpu")]
            Inner::Wgpu(g) => g
                .profile()
                .into_iter()
                .map(|k| (k.kernel, k.dispatches, k.ms))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The device this runtime computes on (the GPU adapter's name for wgpu).
    pub fn device(&self) -> String {
        match &self.inner {
            #[cfg(feature = "wgpu")]
            Inner::Wgpu(g) => g.adapter().name,
            _ => format!("{} (host)", self.kind),
        }
    }

    /// The backends this build has.
    pub fn available() -> Vec<BackendKind> {
        BackendKind::ALL
            .into_iter()
            .filter(|k| k.compiled())
            .collect()
    }

    pub fn kind(&self) -> BackendKind {
        self.kind
    }

    /// Runs `f` where the backend starts work fastest: on a rayon worker for the CPU backend (every
    /// parallel loop started from outside the pool otherwise costs a hand-off), at once otherwise.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match self.kind {
            BackendKind::Cpu => jointdiff_cpu::on_worker(f),
            _ => f(),
        }
    }

    /// [`Runtime::run`] for a job that reports progress, with `on_progress` called on the calling thread:
    /// the job (on a worker) hands each `(done, total)` over and waits for the answer (`false` cancels), so
    /// a C caller's callback runs on the caller's own thread and cancels at the step it is called for.
    pub fn run_reporting<R: Send>(
        &self,
        job: impl FnOnce(&mut Progress<'_>) -> R + Send,
        mut on_progress: impl FnMut(usize, usize) -> bool,
    ) -> R {
        if self.kind != BackendKind::Cpu || rayon::current_thread_index().is_some() {
            return job(&mut on_progress);
        }
        let (tx, rx) = std::sync::mpsc::channel::<(usize, usize)>();
        let (answer_tx, answer_rx) = std::sync::mpsc::channel::<bool>();
        let mut out = None;
        rayon::in_place_scope(|scope| {
            let out = &mut out;
            scope.spawn(move |_| {
                let mut report = move |done, total| {
                    tx.send((done, total)).is_ok() && answer_rx.recv().unwrap_or(false)
                };
                // on_worker: the pool's other workers stay awake for the job (jointdiff-cpu's `spin`)
                *out = Some(jointdiff_cpu::on_worker(move || job(&mut report)));
                // `tx` drops with `report` when the job ends: the loop below ends
            });
            for (done, total) in rx {
                let go = on_progress(done, total);
                if answer_tx.send(go).is_err() {
                    break;
                }
            }
        });
        out.expect("the scope waits for the job")
    }

    /// `v.visit(&backend)`.
    pub fn visit<V: BackendVisitor>(&self, v: V) -> V::Output {
        dispatch!(self, |b| v.visit(b))
    }

    /// Builds `model`'s network on this backend now (and keeps it): checks every tensor at load time.
    pub fn prepare(&self, model: &NetworkModel) -> Result<()> {
        dispatch!(self, |b| net(b, self.kind, model).map(drop))
    }

    /// Runs a denoise plan on this backend: the networks come from the cache (built on first use).
    pub fn denoise(
        &self,
        plan: &DenoisePlan,
        y: &[f32],
        seed: u64,
        progress: &mut Progress<'_>,
    ) -> Result<PosteriorStats> {
        self.denoise_from(plan, y, seed, 0, progress)
    }

    /// As [`Runtime::denoise`] for measurements numbered from `first` ([`DenoisePlan::run_from`]).
    pub fn denoise_from(
        &self,
        plan: &DenoisePlan,
        y: &[f32],
        seed: u64,
        first: u64,
        progress: &mut Progress<'_>,
    ) -> Result<PosteriorStats> {
        dispatch!(self, |b| {
            let [s, n] = plan.networks();
            let s = s.map(|m| net(b, self.kind, m)).transpose()?;
            let n = n.map(|m| net(b, self.kind, m)).transpose()?;
            let nets = PlanNets {
                signal: s.as_deref(),
                noise: n.as_deref(),
            };
            plan.run_from(b, nets, y, seed, first, progress)
        })
    }

    /// `net(x)` of `model` for a host batch `x`.
    pub fn forward(&self, model: &NetworkModel, x: &Tensor) -> Result<Tensor> {
        dispatch!(self, |b| net(b, self.kind, model)?.forward(b, x))
    }

    /// Unconditional samples of `model` (items of shape `item`).
    pub fn sample(
        &self,
        model: &NetworkModel,
        item: [usize; 3],
        count: usize,
        config: &SamplerConfig,
        seed: u64,
        progress: &mut Progress<'_>,
    ) -> Result<Tensor> {
        dispatch!(self, |b| {
            let n = net(b, self.kind, model)?;
            let prior = NetworkPrior {
                net: &*n,
                image_size: None,
            };
            sample_prior(b, &prior, item, count, config, seed, progress)
        })
    }
}

/// A network built on a backend, kept while its model file lives.
struct Entry {
    file: Weak<ModelFile>,
    kind: BackendKind,
    net: Arc<dyn Any + Send + Sync>,
}

/// Networks built per (model file, backend), shared by every caller in the process (a prepared network is
/// immutable and `Sync`). Entries whose model file was dropped go at the next lookup.
static NETS: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

/// Frees the networks of model files nobody holds any more (they also go at the next lookup); the C API
/// calls it when a model or a session is destroyed, so that their memory is returned at once.
pub fn release_dropped_models() {
    let mut nets = NETS.lock().unwrap_or_else(|p| p.into_inner());
    nets.retain(|e| e.file.strong_count() > 0);
}

/// How many prepared networks the cache holds (all backends).
pub fn cached_networks() -> usize {
    NETS.lock().unwrap_or_else(|p| p.into_inner()).len()
}

fn net<B: Backend + 'static>(
    b: &B,
    kind: BackendKind,
    model: &NetworkModel,
) -> Result<Arc<Ncsnv2<B>>> {
    let mut nets = NETS.lock().unwrap_or_else(|p| p.into_inner());
    nets.retain(|e| e.file.strong_count() > 0);
    let found = nets
        .iter()
        .find(|e| e.kind == kind && std::ptr::eq(e.file.as_ptr(), Arc::as_ptr(&model.file)));
    if let Some(e) = found {
        if let Ok(n) = e.net.clone().downcast::<Ncsnv2<B>>() {
            return Ok(n);
        }
    }
    let built = Arc::new(
        model
            .file
            .build(b)
            .map_err(|e| Error::new(e.kind, format!("{}: {}", model.name, e.message)))?,
    );
    nets.push(Entry {
        file: Arc::downgrade(&model.file),
        kind,
        net: built.clone(),
    });
    Ok(built)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jointdiff_core::model::{init_params, serialize};
    use jointdiff_core::ncsnv2::Ncsnv2Config;

    fn tiny(name: &str) -> NetworkModel {
        let cfg = Ncsnv2Config {
            channels: 1,
            ngf: 2,
            input_map: true,
        };
        let params = init_params(&cfg, |s| vec![0.1; s.shape.iter().product()]);
        let bytes = serialize(None, &params).unwrap();
        NetworkModel {
            file: Arc::new(ModelFile::from_bytes(&bytes).unwrap()),
            name: name.into(),
        }
    }

    #[test]
    fn a_network_is_built_once_per_model_and_backend_and_freed_with_the_model() {
        let cpu = Runtime::new(BackendKind::Cpu).unwrap();
        let reference = Runtime::new(BackendKind::Reference).unwrap();
        let model = tiny("tiny");
        let before = cached_networks();
        cpu.prepare(&model).unwrap();
        cpu.prepare(&model).unwrap();
        let x = Tensor::zeros([1, 1, 4, 4]);
        cpu.forward(&model.clone(), &x).unwrap();
        assert_eq!(
            cached_networks(),
            before + 1,
            "one network per model and backend"
        );
        reference.forward(&model, &x).unwrap();
        assert_eq!(
            cached_networks(),
            before + 2,
            "another backend, another network"
        );
        drop(model);
        release_dropped_models();
        assert_eq!(cached_networks(), before, "freed with the model");
    }

    #[test]
    fn a_backend_not_compiled_is_an_error_not_a_fallback() {
        // wgpu: compiled in by default; then it opens an adapter or says why not, never the CPU
        match Runtime::new(BackendKind::Wgpu) {
            Ok(rt) => {
                assert!(BackendKind::Wgpu.compiled());
                assert_eq!(rt.kind(), BackendKind::Wgpu);
            }
            Err(e) => {
                assert_eq!(e.kind, jointdiff_core::error::ErrorKind::Unavailable);
                let why = if BackendKind::Wgpu.compiled() {
                    "adapter"
                } else {
                    "wgpu"
                };
                assert!(e.message.contains(why), "{}", e.message);
            }
        }
        assert!(BackendKind::parse("cuda").is_err());
        for k in Runtime::available() {
            assert_eq!(Runtime::new(k).unwrap().kind(), k);
            assert_eq!(BackendKind::parse(k.name()).unwrap(), k);
        }
    }
}

/// The CPU backend's GEMM, for `jointdiff bench gemm` (a kernel benchmark, not a backend choice).
pub mod cpu {
    pub use jointdiff_cpu::{gemm, GEMM_KERNEL};
}
