//! jointdiff-wgpu: the GPU backend. Tensors are device buffers (`WgpuTensor`, immutable, shared by `Arc`);
//! every operation records one compute dispatch of a WGSL kernel (`kernels.wgsl`) into one open compute
//! pass of one command encoder, submitted when the host needs a value back (a download or the sampler's
//! non-finite flag): a sampler step is one compute pass and one submit, with no readback but the flag.
//!
//! The kernels compute each output value as a fixed sequential sum in f32: results do not depend on the
//! dispatch, and agree with the reference backend within f32 rounding (tests: `tests/wgpu.rs`).
use jointdiff_core::backend::{Backend, Conv2dParams};
use jointdiff_core::error::{Error, Result};
use jointdiff_core::reference::conv_out;
use jointdiff_core::Tensor;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use wgpu::util::DeviceExt;

const KERNELS: &str = include_str!("kernels.wgsl");
/// Threads per workgroup of every kernel (`WG` in kernels.wgsl).
const WG: usize = 64;
/// Dispatches recorded before the encoder is submitted anyway (bounds the memory of a long recording).
const MAX_PENDING: usize = 4096;
/// Bytes of one dispatch's parameters (`Params` in kernels.wgsl).
const PARAMS_BYTES: usize = 96;
/// Free output buffers kept per size.
const POOL_PER_SIZE: usize = 64;

/// A description of one adapter (`jointdiff backends`).
#[derive(Debug, Clone)]
pub struct AdapterDescription {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
}

fn describe(info: &wgpu::AdapterInfo) -> AdapterDescription {
    AdapterDescription {
        name: info.name.clone(),
        backend: format!("{:?}", info.backend).to_lowercase(),
        device_type: format!("{:?}", info.device_type),
        driver: format!("{} {}", info.driver, info.driver_info)
            .trim()
            .to_string(),
    }
}

fn instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    if std::env::var_os("WGPU_BACKEND").is_none() {
        // Vulkan, Metal, DX12 (not the GL fallback) unless WGPU_BACKEND says otherwise
        desc.backends = wgpu::Backends::PRIMARY;
    }
    wgpu::Instance::new(desc)
}

/// Every adapter wgpu finds (honouring `WGPU_BACKEND`).
pub fn adapters() -> Vec<AdapterDescription> {
    let inst = instance();
    pollster::block_on(inst.enumerate_adapters(wgpu::Backends::all()))
        .iter()
        .map(|a| describe(&a.get_info()))
        .collect()
}

/// A device tensor: an immutable storage buffer and its NCHW shape.
#[derive(Clone, Debug)]
pub struct WgpuTensor {
    buf: Arc<Pooled>,
    shape: [usize; 4],
}

/// Free storage buffers by size. A buffer a kernel writes can be reused as soon as its tensor is dropped,
/// even while commands that read it are still recorded: the dispatches of a pass (and the submits of the
/// queue) run in order, with wgpu's barriers between them. Uploads never come from here (they are written by
/// the queue, ahead of the recorded commands).
type Pool = Mutex<HashMap<u64, Vec<wgpu::Buffer>>>;

/// A storage buffer that goes back to its pool when the last tensor holding it is dropped.
#[derive(Debug)]
struct Pooled {
    buf: Option<wgpu::Buffer>,
    pool: Option<std::sync::Weak<Pool>>,
}

impl std::ops::Deref for Pooled {
    type Target = wgpu::Buffer;
    fn deref(&self) -> &wgpu::Buffer {
        self.buf.as_ref().expect("a live buffer")
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let (Some(buf), Some(pool)) = (
            self.buf.take(),
            self.pool.as_ref().and_then(|p| p.upgrade()),
        ) {
            let mut pool = pool.lock().unwrap_or_else(|p| p.into_inner());
            let free = pool.entry(buf.size()).or_default();
            if free.len() < POOL_PER_SIZE {
                free.push(buf);
            }
        }
    }
}

impl WgpuTensor {
    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }
    fn len(&self) -> usize {
        self.shape.iter().product()
    }
}

/// What is recorded and not yet submitted: one encoder, and in it one open compute pass that takes every
/// dispatch until something else (a copy, a submit) needs the encoder.
struct Pending {
    encoder: Option<wgpu::CommandEncoder>,
    pass: Option<wgpu::ComputePass<'static>>,
    dispatches: usize,
    /// The recorded dispatches' parameters, one aligned slot each: written to `WgpuBackend::uniforms` just
    /// before the submit, bound with dynamic offsets.
    params: Vec<u8>,
    /// With profiling on, every dispatch gets its own pass with timestamps.
    profiler: Option<Profiler>,
}

/// Dispatches timed per submit while profiling (two timestamps each).
const PROFILE_SLOTS: usize = 1024;

/// GPU time per kernel from timestamp queries (`WgpuBackend::set_profiling`).
struct Profiler {
    queries: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    staging: wgpu::Buffer,
    /// The kernel of each timed dispatch since the last submit.
    names: Vec<&'static str>,
    /// Per kernel: dispatches and GPU milliseconds.
    totals: HashMap<&'static str, (usize, f64)>,
}

/// One kernel's GPU time (`WgpuBackend::profile`).
#[derive(Debug, Clone)]
pub struct KernelTime {
    pub kernel: String,
    pub dispatches: usize,
    pub ms: f64,
}

impl Pending {
    /// The encoder, with the open pass ended (for copies and for submitting).
    fn encoder(&mut self, device: &wgpu::Device) -> &mut wgpu::CommandEncoder {
        self.pass = None;
        self.encoder.get_or_insert_with(|| {
            device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None })
        })
    }

    /// The open compute pass (begun if there is none).
    fn pass(&mut self, device: &wgpu::Device) -> &mut wgpu::ComputePass<'static> {
        if self.pass.is_none() {
            let pass = self
                .encoder(device)
                .begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: None,
                    timestamp_writes: None,
                })
                .forget_lifetime();
            self.pass = Some(pass);
        }
        self.pass.as_mut().expect("just begun")
    }
}

/// The GPU backend: one device and queue, the kernels' pipelines (made on first use), a recording encoder.
pub struct WgpuBackend {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    module: wgpu::ShaderModule,
    layout: wgpu::PipelineLayout,
    group_layout: wgpu::BindGroupLayout,
    pipelines: Mutex<HashMap<&'static str, Arc<wgpu::ComputePipeline>>>,
    /// Bound where a kernel does not use an input / the output / the flag.
    dummy_in: wgpu::Buffer,
    dummy_out: wgpu::Buffer,
    dummy_flag: wgpu::Buffer,
    pending: Mutex<Pending>,
    /// The parameters of up to `MAX_PENDING` dispatches, one `align`-byte slot each.
    uniforms: wgpu::Buffer,
    align: usize,
    pool: Arc<Pool>,
    /// The first device error (validation, out of memory), reported at the next read-back.
    error: Arc<Mutex<Option<String>>>,
}

/// Kernel parameters: 16 unsigned integers and 8 floats (`Params` in kernels.wgsl).
#[derive(Default, Clone, Copy)]
struct Params {
    u: [u32; 16],
    f: [f32; 8],
}

impl Params {
    fn u(v: &[usize]) -> Self {
        let mut p = Params::default();
        for (d, s) in p.u.iter_mut().zip(v) {
            *d = *s as u32;
        }
        p
    }
    fn f(mut self, v: &[f32]) -> Self {
        self.f[..v.len()].copy_from_slice(v);
        self
    }
    fn bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(96);
        for v in self.u {
            b.extend_from_slice(&v.to_le_bytes());
        }
        for v in self.f {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b
    }
}

impl WgpuBackend {
    /// The adapter named by `WGPU_ADAPTER_NAME` (a case-insensitive substring), else the default one, on
    /// the backends `WGPU_BACKEND` allows (Vulkan, Metal, DX12 by default), with the adapter's own limits.
    /// No adapter: an `Unavailable` error.
    pub fn new() -> Result<Self> {
        let inst = instance();
        let adapter = match std::env::var("WGPU_ADAPTER_NAME") {
            Ok(want) => {
                let want = want.to_lowercase();
                let all = pollster::block_on(inst.enumerate_adapters(wgpu::Backends::all()));
                let names: Vec<String> = all.iter().map(|a| a.get_info().name).collect();
                all.into_iter()
                    .find(|a| a.get_info().name.to_lowercase().contains(&want))
                    .ok_or_else(|| {
                        Error::unavailable(format!(
                            "no GPU adapter matches WGPU_ADAPTER_NAME={want} (found: {})",
                            if names.is_empty() { "none".into() } else { names.join(", ") }
                        ))
                    })?
            }
            Err(_) => pollster::block_on(inst.request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                ..Default::default()
            }))
            .map_err(|e| {
                Error::unavailable(format!(
                    "no GPU adapter found ({e}); the wgpu backend needs a Vulkan, Metal or DX12 driver \
                     (on Linux without a GPU: Mesa's lavapipe, Debian package mesa-vulkan-drivers)"
                ))
            })?,
        };
        let info = adapter.get_info();
        // GPU timestamps where the adapter has them (`bench --profile`)
        let required_features = adapter.features() & wgpu::Features::TIMESTAMP_QUERY;
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("jointdiff"),
            required_features,
            required_limits: adapter.limits(),
            experimental_features: Default::default(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: Default::default(),
        }))
        .map_err(|e| Error::unavailable(format!("{}: cannot open the device: {e}", info.name)))?;
        let error = Arc::new(Mutex::new(None::<String>));
        {
            let error = error.clone();
            device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
                let mut slot = error.lock().unwrap_or_else(|p| p.into_inner());
                if slot.is_none() {
                    *slot = Some(e.to_string());
                }
            }));
        }
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("jointdiff kernels"),
            source: wgpu::ShaderSource::Wgsl(KERNELS.into()),
        });
        let storage = |binding: u32, read_only: bool| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage { read_only },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        };
        let mut entries = vec![wgpu::BindGroupLayoutEntry {
            binding: 0,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Uniform,
                has_dynamic_offset: true,
                min_binding_size: std::num::NonZeroU64::new(PARAMS_BYTES as u64),
            },
            count: None,
        }];
        entries.extend((1..=6).map(|b| storage(b, true)));
        entries.push(storage(7, false));
        entries.push(storage(8, false));
        let group_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("jointdiff"),
            entries: &entries,
        });
        let layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("jointdiff"),
            bind_group_layouts: &[Some(&group_layout)],
            immediate_size: 0,
        });
        let buffer = |label: &str| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: 16,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            })
        };
        let (dummy_in, dummy_out, dummy_flag) = (buffer("in"), buffer("out"), buffer("flag"));
        let align =
            (device.limits().min_uniform_buffer_offset_alignment as usize).max(PARAMS_BYTES);
        let uniforms = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("parameters"),
            size: (MAX_PENDING * align) as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let b = WgpuBackend {
            device,
            queue,
            info,
            module,
            layout,
            group_layout,
            pipelines: Mutex::new(HashMap::new()),
            dummy_in,
            dummy_out,
            dummy_flag,
            pending: Mutex::new(Pending {
                encoder: None,
                pass: None,
                dispatches: 0,
                params: Vec::new(),
                profiler: None,
            }),
            uniforms,
            align,
            pool: Arc::new(Mutex::new(HashMap::new())),
            error,
        };
        b.check()?;
        Ok(b)
    }

    /// The adapter in use.
    pub fn adapter(&self) -> AdapterDescription {
        describe(&self.info)
    }

    fn check(&self) -> Result<()> {
        match self
            .error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            Some(e) => Err(Error::invalid(format!(
                "GPU error on {}: {e}",
                self.info.name
            ))),
            None => Ok(()),
        }
    }

    fn pipeline(&self, name: &'static str) -> Arc<wgpu::ComputePipeline> {
        let mut map = self.pipelines.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(name)
            .or_insert_with(|| {
                Arc::new(
                    self.device
                        .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                            label: Some(name),
                            layout: Some(&self.layout),
                            module: &self.module,
                            entry_point: Some(name),
                            compilation_options: Default::default(),
                            cache: None,
                        }),
                )
            })
            .clone()
    }

    /// A storage buffer for `len` floats that a kernel will write: a free one of that size, else a new one.
    fn alloc(&self, len: usize) -> Arc<Pooled> {
        let size = (len.max(1) * 4) as u64;
        let reused = self
            .pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&size)
            .and_then(|v| v.pop());
        let buf = reused.unwrap_or_else(|| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        });
        Arc::new(Pooled {
            buf: Some(buf),
            pool: Some(Arc::downgrade(&self.pool)),
        })
    }

    fn tensor(&self, shape: [usize; 4]) -> WgpuTensor {
        WgpuTensor {
            buf: self.alloc(shape.iter().product()),
            shape,
        }
    }

    /// Records `kernel` over `threads` invocations with `inputs` bound to in0.., writing `out` (and `flag`).
    fn dispatch(
        &self,
        kernel: &'static str,
        p: Params,
        inputs: &[&wgpu::Buffer],
        out: Option<&wgpu::Buffer>,
        flag: Option<&wgpu::Buffer>,
        threads: usize,
    ) {
        if threads == 0 {
            return;
        }
        let groups = threads.div_ceil(WG);
        let (gx, gy) = if groups <= 65535 {
            (groups, 1)
        } else {
            (65535, groups.div_ceil(65535))
        };
        self.record(kernel, p, inputs, out, flag, [gx, gy]);
    }

    /// Records `kernel` over a grid of `groups` workgroups.
    fn record(
        &self,
        kernel: &'static str,
        p: Params,
        inputs: &[&wgpu::Buffer],
        out: Option<&wgpu::Buffer>,
        flag: Option<&wgpu::Buffer>,
        [gx, gy]: [usize; 2],
    ) {
        if gx == 0 || gy == 0 {
            return;
        }
        let pipeline = self.pipeline(kernel);
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if pending.params.len() + self.align > self.uniforms.size() as usize {
            self.submit_locked(&mut pending, None);
        }
        let offset = pending.params.len();
        pending.params.extend_from_slice(&p.bytes());
        pending.params.resize(offset + self.align, 0);
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &self.uniforms,
                offset: 0,
                size: std::num::NonZeroU64::new(PARAMS_BYTES as u64),
            }),
        }];
        for k in 0..6 {
            let b = inputs.get(k).copied().unwrap_or(&self.dummy_in);
            entries.push(wgpu::BindGroupEntry {
                binding: 1 + k as u32,
                resource: b.as_entire_binding(),
            });
        }
        entries.push(wgpu::BindGroupEntry {
            binding: 7,
            resource: out.unwrap_or(&self.dummy_out).as_entire_binding(),
        });
        entries.push(wgpu::BindGroupEntry {
            binding: 8,
            resource: flag.unwrap_or(&self.dummy_flag).as_entire_binding(),
        });
        let group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &self.group_layout,
            entries: &entries,
        });
        let offsets = [offset as u32];
        if pending.profiler.is_some() {
            let p = &mut *pending;
            let enc = p.encoder.get_or_insert_with(|| {
                self.device
                    .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None })
            });
            let prof = p.profiler.as_mut().expect("checked");
            let k = 2 * prof.names.len() as u32;
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(kernel),
                timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                    query_set: &prof.queries,
                    beginning_of_pass_write_index: Some(k),
                    end_of_pass_write_index: Some(k + 1),
                }),
            });
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &group, &offsets);
            pass.dispatch_workgroups(gx as u32, gy as u32, 1);
            drop(pass);
            prof.names.push(kernel);
            if prof.names.len() >= PROFILE_SLOTS {
                self.submit_locked(&mut pending, None);
            }
            return;
        }
        let pass = pending.pass(&self.device);
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &group, &offsets);
        pass.dispatch_workgroups(gx as u32, gy as u32, 1);
        pending.dispatches += 1;
        if pending.dispatches >= MAX_PENDING {
            self.submit_locked(&mut pending, None);
        }
    }

    /// Submits what was recorded, plus `then` (a copy for a read-back).
    fn submit_locked(&self, pending: &mut Pending, then: Option<wgpu::CommandBuffer>) {
        let mut cmds = Vec::new();
        pending.pass = None;
        let timed = match pending.profiler.as_ref() {
            Some(prof) if !prof.names.is_empty() => {
                let n = 2 * prof.names.len();
                let enc = pending
                    .encoder
                    .as_mut()
                    .expect("timed dispatches were recorded");
                enc.resolve_query_set(&prof.queries, 0..n as u32, &prof.resolve, 0);
                enc.copy_buffer_to_buffer(&prof.resolve, 0, &prof.staging, 0, (n * 8) as u64);
                n
            }
            _ => 0,
        };
        if let Some(enc) = pending.encoder.take() {
            cmds.push(enc.finish());
        }
        cmds.extend(then);
        pending.dispatches = 0;
        if !pending.params.is_empty() {
            // ordered before this submit's commands, after every earlier submit's
            self.queue.write_buffer(&self.uniforms, 0, &pending.params);
            pending.params.clear();
        }
        if !cmds.is_empty() {
            self.queue.submit(cmds);
        }
        if let (Some(prof), true) = (pending.profiler.as_mut(), timed > 0) {
            let period = self.queue.get_timestamp_period() as f64;
            let slice = prof.staging.slice(..(timed * 8) as u64);
            slice.map_async(wgpu::MapMode::Read, |_| {});
            if self
                .device
                .poll(wgpu::PollType::wait_indefinitely())
                .is_ok()
            {
                if let Ok(view) = slice.get_mapped_range() {
                    let ticks: Vec<u64> = view
                        .chunks_exact(8)
                        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                        .collect();
                    for (name, t) in prof.names.iter().zip(ticks.chunks_exact(2)) {
                        let e = prof.totals.entry(name).or_insert((0, 0.0));
                        e.0 += 1;
                        e.1 += t[1].saturating_sub(t[0]) as f64 * period / 1e6;
                    }
                }
            }
            prof.staging.unmap();
            prof.names.clear();
        }
    }

    /// Turns per-kernel GPU timing on (every dispatch then runs in its own pass with timestamps; slower)
    /// or off. An error where the adapter has no timestamp queries.
    pub fn set_profiling(&self, on: bool) -> Result<()> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        self.submit_locked(&mut pending, None);
        if !on {
            pending.profiler = None;
            return Ok(());
        }
        if !self
            .device
            .features()
            .contains(wgpu::Features::TIMESTAMP_QUERY)
        {
            return Err(Error::unavailable(format!(
                "{} has no GPU timestamp queries",
                self.info.name
            )));
        }
        let size = (2 * PROFILE_SLOTS * 8) as u64;
        let buffer = |usage| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("timestamps"),
                size,
                usage,
                mapped_at_creation: false,
            })
        };
        pending.profiler = Some(Profiler {
            queries: self.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: (2 * PROFILE_SLOTS) as u32,
            }),
            resolve: buffer(wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC),
            staging: buffer(wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST),
            names: Vec::new(),
            totals: HashMap::new(),
        });
        Ok(())
    }

    /// GPU time per kernel since profiling was turned on, slowest first (after a read-back).
    pub fn profile(&self) -> Vec<KernelTime> {
        let pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<KernelTime> = pending
            .profiler
            .as_ref()
            .map(|p| {
                p.totals
                    .iter()
                    .map(|(k, (n, ms))| KernelTime {
                        kernel: k.to_string(),
                        dispatches: *n,
                        ms: *ms,
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        v
    }

    /// Submits the recording and reads `len` floats of `buf` back.
    fn read(&self, buf: &wgpu::Buffer, len: usize) -> Result<Vec<f32>> {
        let size = (len.max(1) * 4) as u64;
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("read-back"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        enc.copy_buffer_to_buffer(buf, 0, &staging, 0, size);
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            self.submit_locked(&mut pending, Some(enc.finish()));
        }
        let slice = staging.slice(..);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::invalid(format!("GPU error on {}: {e}", self.info.name)))?;
        self.check()?;
        rx.recv()
            .map_err(|_| Error::invalid("GPU read-back was dropped"))?
            .map_err(|e| Error::invalid(format!("GPU read-back failed: {e}")))?;
        let data = {
            let view = slice
                .get_mapped_range()
                .map_err(|e| Error::invalid(format!("GPU read-back failed: {e}")))?;
            view.chunks_exact(4)
                .take(len)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        staging.unmap();
        Ok(data)
    }

    /// A new tensor of `shape` written by `kernel` over one invocation per output value.
    fn map_kernel(
        &self,
        kernel: &'static str,
        p: Params,
        inputs: &[&wgpu::Buffer],
        shape: [usize; 4],
    ) -> WgpuTensor {
        let out = self.tensor(shape);
        self.dispatch(kernel, p, inputs, Some(&out.buf), None, out.len());
        out
    }

    /// The tiled implicit-GEMM convolution (`conv2d_tiled`): 32 output channels x 64 pixels a workgroup.
    fn conv_tiled(
        &self,
        params: Params,
        inputs: &[&wgpu::Buffer],
        shape: [usize; 4],
    ) -> WgpuTensor {
        let out = self.tensor(shape);
        let [n, co, ho, wo] = shape;
        let grid = [(n * ho * wo).div_ceil(64), co.div_ceil(32)];
        self.record("conv2d_tiled", params, inputs, Some(&out.buf), None, grid);
        out
    }

    fn plane_stats(&self, x: &WgpuTensor) -> (WgpuTensor, WgpuTensor) {
        let [n, c, h, w] = x.shape;
        let p = Params::u(&[n, c, h * w]);
        let planes = self.tensor([n * c, 2, 1, 1]);
        self.dispatch(
            "inorm_plane_stats",
            p,
            &[&x.buf],
            Some(&planes.buf),
            None,
            n * c,
        );
        let images = self.tensor([n, 2, 1, 1]);
        self.dispatch(
            "inorm_image_stats",
            p,
            &[&planes.buf],
            Some(&images.buf),
            None,
            n,
        );
        (planes, images)
    }

    fn inorm(
        &self,
        x: &WgpuTensor,
        a: &WgpuTensor,
        g: &WgpuTensor,
        b: &WgpuTensor,
        elu: bool,
    ) -> WgpuTensor {
        let [n, c, h, w] = x.shape;
        let (planes, images) = self.plane_stats(x);
        self.map_kernel(
            "inorm_apply",
            Params::u(&[n, c, h * w, elu as usize]),
            &[&x.buf, &planes.buf, &images.buf, &a.buf, &g.buf, &b.buf],
            x.shape,
        )
    }

    /// Copies `len` values from `src` at `offset` into a new tensor of `shape`.
    fn slice(&self, src: &WgpuTensor, offset: usize, shape: [usize; 4]) -> WgpuTensor {
        let out = self.tensor(shape);
        let len: usize = shape.iter().product();
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let enc = pending.encoder(&self.device);
        enc.copy_buffer_to_buffer(&src.buf, (offset * 4) as u64, &out.buf, 0, (len * 4) as u64);
        out
    }
}

fn conv_params(x: [usize; 4], w: [usize; 4], p: Conv2dParams, bias: bool) -> (Params, [usize; 4]) {
    let [n, ci, h, wd] = x;
    let [co, _, kh, kw] = w;
    let (ho, wo) = (conv_out(h, kh, p), conv_out(wd, kw, p));
    (
        Params::u(&[
            n,
            ci,
            h,
            wd,
            co,
            ho,
            wo,
            kh,
            kw,
            p.padding,
            p.dilation,
            bias as usize,
        ]),
        [n, co, ho, wo],
    )
}

impl Backend for WgpuBackend {
    type Tensor = WgpuTensor;

    fn name(&self) -> &'static str {
        "wgpu"
    }
    fn upload(&self, t: &Tensor) -> WgpuTensor {
        let mut bytes = Vec::with_capacity(t.data.len().max(1) * 4);
        for v in &t.data {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        if bytes.is_empty() {
            bytes.extend_from_slice(&[0; 4]);
        }
        let buf = self
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: None,
                contents: &bytes,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
            });
        WgpuTensor {
            buf: Arc::new(Pooled {
                buf: Some(buf),
                pool: None,
            }),
            shape: t.shape,
        }
    }
    fn download(&self, t: &WgpuTensor) -> Result<Tensor> {
        let data = self.read(&t.buf, t.len())?;
        Tensor::from_vec(t.shape, data)
    }
    fn shape(&self, t: &WgpuTensor) -> [usize; 4] {
        t.shape
    }
    fn conv2d(
        &self,
        x: &WgpuTensor,
        w: &WgpuTensor,
        bias: Option<&WgpuTensor>,
        p: Conv2dParams,
    ) -> WgpuTensor {
        let (params, shape) = conv_params(x.shape, w.shape, p, bias.is_some());
        let b: &wgpu::Buffer = bias.map(|b| &**b.buf).unwrap_or(&self.dummy_in);
        self.conv_tiled(params, &[&x.buf, &w.buf, b], shape)
    }
    fn mean_pool2(&self, x: &WgpuTensor) -> WgpuTensor {
        let [n, c, h, w] = x.shape;
        self.map_kernel(
            "mean_pool2",
            Params::u(&[n * c, h, w]),
            &[&x.buf],
            [n, c, h / 2, w / 2],
        )
    }
    fn max_pool(&self, x: &WgpuTensor, k: usize, pad: usize) -> WgpuTensor {
        let [n, c, h, w] = x.shape;
        let ho = (h + 2 * pad + 1).saturating_sub(k);
        let wo = (w + 2 * pad + 1).saturating_sub(k);
        self.map_kernel(
            "max_pool",
            Params::u(&[n * c, h, w, 0, ho, wo, k, pad]),
            &[&x.buf],
            [n, c, ho, wo],
        )
    }
    fn instance_norm_plus(
        &self,
        x: &WgpuTensor,
        a: &WgpuTensor,
        g: &WgpuTensor,
        b: &WgpuTensor,
    ) -> WgpuTensor {
        self.inorm(x, a, g, b, false)
    }
    fn instance_norm_plus_elu(
        &self,
        x: &WgpuTensor,
        a: &WgpuTensor,
        g: &WgpuTensor,
        b: &WgpuTensor,
    ) -> WgpuTensor {
        self.inorm(x, a, g, b, true)
    }
    fn elu(&self, x: &WgpuTensor) -> WgpuTensor {
        self.map_kernel("elu", Params::u(&[x.len()]), &[&x.buf], x.shape)
    }
    fn resize_bilinear(&self, x: &WgpuTensor, ho: usize, wo: usize) -> WgpuTensor {
        let [n, c, h, w] = x.shape;
        self.map_kernel(
            "resize_bilinear",
            Params::u(&[n * c, h, w, 0, ho, wo]),
            &[&x.buf],
            [n, c, ho, wo],
        )
    }
    fn add(&self, a: &WgpuTensor, b: &WgpuTensor) -> WgpuTensor {
        self.map_kernel("add", Params::u(&[a.len()]), &[&a.buf, &b.buf], a.shape)
    }
    fn affine(&self, x: &WgpuTensor, scale: f32, shift: f32) -> WgpuTensor {
        let p = Params::u(&[x.len()]).f(&[scale, shift]);
        self.map_kernel("affine", p, &[&x.buf], x.shape)
    }
    fn conv2d_backward(
        &self,
        x: &WgpuTensor,
        w: &WgpuTensor,
        gout: &WgpuTensor,
        p: Conv2dParams,
    ) -> (WgpuTensor, WgpuTensor, WgpuTensor) {
        let gx = self.conv2d_backward_input(w, gout, x.shape, p);
        let (params, _) = conv_params(x.shape, w.shape, p, false);
        let gw = self.map_kernel("conv2d_bwd_weight", params, &[&x.buf, &gout.buf], w.shape);
        let gb = self.map_kernel(
            "conv2d_bwd_bias",
            params,
            &[&x.buf, &gout.buf],
            [1, w.shape[0], 1, 1],
        );
        (gx, gw, gb)
    }
    fn conv2d_backward_input(
        &self,
        w: &WgpuTensor,
        gout: &WgpuTensor,
        in_shape: [usize; 4],
        p: Conv2dParams,
    ) -> WgpuTensor {
        let [co, ci, kh, kw] = w.shape;
        let reach = p.dilation * (kh.max(1) - 1);
        if kh == kw && p.padding <= reach {
            // a forward convolution of the flipped, transposed kernel with padding d (k - 1) - p
            let wt = self.map_kernel(
                "flip_transpose",
                Params::u(&[co, ci, kh, kw]),
                &[&w.buf],
                [ci, co, kh, kw],
            );
            let q = Conv2dParams {
                padding: reach - p.padding,
                dilation: p.dilation,
            };
            let (params, shape) = conv_params(gout.shape, wt.shape, q, false);
            if shape == in_shape {
                return self.conv_tiled(params, &[&gout.buf, &wt.buf, &self.dummy_in], shape);
            }
        }
        let (params, _) = conv_params(in_shape, w.shape, p, false);
        self.map_kernel("conv2d_bwd_input", params, &[&w.buf, &gout.buf], in_shape)
    }
    fn mean_pool2_backward(&self, gout: &WgpuTensor, in_shape: [usize; 4]) -> WgpuTensor {
        let [n, c, h, w] = in_shape;
        self.map_kernel(
            "mean_pool2_bwd",
            Params::u(&[n * c, h, w]),
            &[&gout.buf],
            in_shape,
        )
    }
    fn max_pool_backward(
        &self,
        x: &WgpuTensor,
        gout: &WgpuTensor,
        k: usize,
        pad: usize,
    ) -> WgpuTensor {
        let [n, c, h, w] = x.shape;
        let [_, _, ho, wo] = gout.shape;
        self.map_kernel(
            "max_pool_bwd",
            Params::u(&[n * c, h, w, 0, ho, wo, k, pad]),
            &[&x.buf, &gout.buf],
            x.shape,
        )
    }
    fn elu_backward(&self, x: &WgpuTensor, gout: &WgpuTensor) -> WgpuTensor {
        self.map_kernel(
            "elu_bwd",
            Params::u(&[x.len()]),
            &[&x.buf, &gout.buf],
            x.shape,
        )
    }
    fn resize_bilinear_backward(&self, gout: &WgpuTensor, in_shape: [usize; 4]) -> WgpuTensor {
        let [n, c, h, w] = in_shape;
        let [_, _, ho, wo] = gout.shape;
        self.map_kernel(
            "resize_bilinear_bwd",
            Params::u(&[n * c, h, w, 0, ho, wo]),
            &[&gout.buf],
            in_shape,
        )
    }
    fn instance_norm_plus_backward(
        &self,
        x: &WgpuTensor,
        alpha: &WgpuTensor,
        gamma: &WgpuTensor,
        gout: &WgpuTensor,
    ) -> (WgpuTensor, WgpuTensor, WgpuTensor, WgpuTensor) {
        let [n, c, h, w] = x.shape;
        let p = Params::u(&[n, c, h * w]);
        let (planes, images) = self.plane_stats(x);
        let sums = self.map_kernel(
            "inorm_bwd_plane",
            p,
            &[
                &x.buf,
                &gout.buf,
                &planes.buf,
                &images.buf,
                &alpha.buf,
                &gamma.buf,
            ],
            [n * c, 3, 1, 1],
        );
        let g_mu = self.map_kernel(
            "inorm_bwd_mu",
            p,
            &[&planes.buf, &images.buf, &sums.buf],
            [n * c, 1, 1, 1],
        );
        let gx = self.map_kernel(
            "inorm_bwd_x",
            p,
            &[
                &x.buf,
                &gout.buf,
                &planes.buf,
                &gamma.buf,
                &sums.buf,
                &g_mu.buf,
            ],
            x.shape,
        );
        let params = self.tensor([3, c, 1, 1]);
        self.dispatch(
            "inorm_bwd_params",
            p,
            &[&planes.buf, &images.buf, &sums.buf, &alpha.buf, &gamma.buf],
            Some(&params.buf),
            None,
            c,
        );
        let one = [1, c, 1, 1];
        (
            gx,
            self.slice(&params, 0, one),
            self.slice(&params, c, one),
            self.slice(&params, 2 * c, one),
        )
    }
    fn axpby(&self, a: f32, x: &WgpuTensor, b: f32, y: &WgpuTensor) -> WgpuTensor {
        let p = Params::u(&[x.len()]).f(&[a, b]);
        self.map_kernel("axpby", p, &[&x.buf, &y.buf], x.shape)
    }
    fn mul(&self, x: &WgpuTensor, y: &WgpuTensor) -> WgpuTensor {
        let p = Params::u(&[x.len(), y.len().max(1)]);
        self.map_kernel("mul_b", p, &[&x.buf, &y.buf], x.shape)
    }
    fn div(&self, x: &WgpuTensor, y: &WgpuTensor) -> WgpuTensor {
        let p = Params::u(&[x.len(), y.len().max(1)]);
        self.map_kernel("div_b", p, &[&x.buf, &y.buf], x.shape)
    }
    fn mul_scalar(&self, x: &WgpuTensor, c: f32) -> WgpuTensor {
        let p = Params::u(&[x.len()]).f(&[c]);
        self.map_kernel("mul_s", p, &[&x.buf], x.shape)
    }
    fn div_scalar(&self, x: &WgpuTensor, c: f32) -> WgpuTensor {
        let p = Params::u(&[x.len()]).f(&[c]);
        self.map_kernel("div_s", p, &[&x.buf], x.shape)
    }
    fn clamp(&self, x: &WgpuTensor, lo: f32, hi: f32) -> WgpuTensor {
        let p = Params::u(&[x.len()]).f(&[lo, hi]);
        self.map_kernel("clamp_k", p, &[&x.buf], x.shape)
    }
    fn scale_by_inverse_norm(&self, x: &WgpuTensor, c: f32) -> WgpuTensor {
        let items = x.shape[0];
        let l = x.len() / items.max(1);
        let norms = self.map_kernel(
            "item_norm",
            Params::u(&[items, l]),
            &[&x.buf],
            [items, 1, 1, 1],
        );
        let p = Params::u(&[x.len(), l.max(1)]).f(&[c]);
        self.map_kernel("scale_inv_norm", p, &[&x.buf, &norms.buf], x.shape)
    }
    fn matmul(
        &self,
        x: &WgpuTensor,
        a: &WgpuTensor,
        transpose: bool,
        out_shape: [usize; 4],
    ) -> WgpuTensor {
        let (m, d) = (a.shape[2], a.shape[3]);
        let len: usize = out_shape.iter().product();
        let p = Params::u(&[len, m, d, transpose as usize]);
        self.map_kernel("matmul", p, &[&x.buf, &a.buf], out_shape)
    }
    fn gaussian_score(
        &self,
        z: &WgpuTensor,
        mean: Option<&WgpuTensor>,
        var: &WgpuTensor,
        a: f64,
        s: f64,
    ) -> WgpuTensor {
        let p = Params::u(&[z.len(), var.len().max(1), mean.is_some() as usize]).f(&[
            a as f32,
            (a * a) as f32,
            (s * s) as f32,
        ]);
        let m: &wgpu::Buffer = mean.map(|m| &**m.buf).unwrap_or(&self.dummy_in);
        self.map_kernel("gaussian_score", p, &[&z.buf, m, &var.buf], z.shape)
    }
    fn all_finite(&self, ts: &[&WgpuTensor]) -> Result<bool> {
        let flag = self.upload(&Tensor::zeros([1, 1, 1, 1]));
        for t in ts {
            self.dispatch(
                "finite",
                Params::u(&[t.len()]),
                &[&t.buf],
                None,
                Some(&flag.buf),
                t.len(),
            );
        }
        let v = self.read(&flag.buf, 1)?;
        Ok(v[0].to_bits() == 0)
    }
}
