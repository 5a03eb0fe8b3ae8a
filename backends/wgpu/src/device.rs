//! The wgpu device behind the shared launch sequence (`kiln_ptx::Device`).
//!
//! Every allocation is its own `wgpu::Buffer` at an address of a flat virtual space, so the
//! session's pointer arithmetic (a row inside an activation buffer) works unchanged: a
//! pointer argument binds the whole buffer that holds it and passes the offset, in 4-byte
//! words, in the kernel's `Params` uniform.
//!
//! Launches are queued, not run: each gets a 256-byte slot of a parameter arena and a
//! (cached) bind group with a dynamic offset into it, and the queue is encoded into one
//! compute pass and submitted when the host needs a result (a download) or writes a buffer
//! (an upload, which must not overtake the launches queued before it). A decode step is
//! one submission.

use std::collections::{BTreeMap, HashMap};

use kiln_backends::BackendError;
use kiln_ptx::device::{AddressSpace, Device, GraphId, Recorder};
use kiln_ptx::emu::Arg as LaunchArg;

use crate::kernels::{Arg, Kernel};

const NAME: &str = "wgpu";

fn internal(msg: impl Into<String>) -> BackendError {
    BackendError::Internal { backend: NAME, msg: msg.into() }
}

/// Bytes of the parameter slot of one launch (the largest uniform offset alignment WebGPU allows).
const SLOT: u64 = 256;
/// Launches per submission before the queue is flushed early.
const ARENA_SLOTS: u64 = 4096;

struct Pipeline {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
    args: Vec<(&'static str, Arg)>,
}

struct Queued {
    kernel: usize,
    bind: usize,
    slot: u64,
    grid: [u32; 3],
}

/// A wgpu adapter and device with kiln's kernels compiled on it.
pub struct WgpuDevice {
    device: wgpu::Device,
    queue: wgpu::Queue,
    describe: String,
    pipelines: Vec<Pipeline>,
    by_name: HashMap<String, usize>,
    buffers: AddressSpace<wgpu::Buffer>,
    /// Bound for null pointers and ignored arguments.
    dummy: wgpu::Buffer,
    arena: wgpu::Buffer,
    arena_bytes: Vec<u8>,
    bind_groups: Vec<wgpu::BindGroup>,
    bind_cache: HashMap<(usize, Vec<usize>), usize>,
    queued: Vec<Queued>,
    staging: Option<(wgpu::Buffer, u64)>,
    max_binding: u64,
    max_groups: u32,
    rec: Recorder,
    /// `KILN_WGPU_PROFILE=1`: every launch is submitted alone and waited for, and the time
    /// per kernel is printed when the device is dropped.
    profile: Option<BTreeMap<String, (u32, f64)>>,
    /// Run matmuls with the row-per-thread variants (CPU adapters; `KILN_WGPU_MATMUL=rows|lanes` overrides).
    row_per_thread: bool,
}

/// The first adapter wgpu finds (a GPU when there is one; Mesa's lavapipe on a CPU-only
/// machine), and its device with the adapter's own limits.
pub fn open_device() -> Result<(wgpu::Device, wgpu::Queue, wgpu::AdapterInfo), BackendError> {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::PRIMARY);
    let instance = wgpu::Instance::new(desc);
    let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
        power_preference: wgpu::PowerPreference::HighPerformance,
        ..Default::default()
    }))
    .map_err(|e| BackendError::Unsupported {
        backend: NAME,
        what: format!(
            "running here: no GPU adapter ({e}); install a Vulkan driver (e.g. Mesa's lavapipe: `apt-get install mesa-vulkan-drivers`)"
        ),
    })?;
    let info = adapter.get_info();
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("kiln"),
        required_limits: adapter.limits(),
        ..Default::default()
    }))
    .map_err(|e| internal(format!("cannot open the {} device: {e}", info.name)))?;
    Ok((device, queue, info))
}

impl WgpuDevice {
    /// Opens the adapter and compiles `kernels` from their WGSL `sources` (by kernel name).
    pub fn new(kernels: &[Kernel], sources: &HashMap<String, String>) -> Result<Self, BackendError> {
        let (device, queue, info) = open_device()?;
        let limits = device.limits();
        let mut pipelines = Vec::new();
        let mut by_name = HashMap::new();
        for k in kernels {
            let src =
                sources.get(&k.name).ok_or_else(|| internal(format!("no WGSL source for kernel `{}`", k.name)))?;
            // A build's kernel source is input: check it with naga first, and catch what wgpu
            // reports (a source that does not match the kernel's bindings) as an error, not a panic.
            crate::lower::validate(&k.name, src).map_err(BackendError::BadInput)?;
            let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
            let desc = wgpu::ShaderModuleDescriptor {
                label: Some(&k.name),
                source: wgpu::ShaderSource::Wgsl(src.as_str().into()),
            };
            let module = device.create_shader_module(desc);
            let mut entries = vec![wgpu::BindGroupLayoutEntry {
                binding: 0,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Uniform,
                    has_dynamic_offset: true,
                    min_binding_size: None,
                },
                count: None,
            }];
            for (i, (_, a)) in k.args.iter().enumerate() {
                if a.is_buffer() {
                    entries.push(wgpu::BindGroupLayoutEntry {
                        binding: Kernel::binding(i),
                        visibility: wgpu::ShaderStages::COMPUTE,
                        ty: wgpu::BindingType::Buffer {
                            ty: wgpu::BufferBindingType::Storage { read_only: !matches!(a, Arg::Out | Arg::OutWords) },
                            has_dynamic_offset: false,
                            min_binding_size: None,
                        },
                        count: None,
                    });
                }
            }
            let layout = device
                .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor { label: Some(&k.name), entries: &entries });
            let pl = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(&k.name),
                bind_group_layouts: &[Some(&layout)],
                immediate_size: 0,
            });
            let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&k.name),
                layout: Some(&pl),
                module: &module,
                entry_point: Some("main"),
                compilation_options: Default::default(),
                cache: None,
            });
            if let Some(e) = pollster::block_on(scope.pop()) {
                return Err(BackendError::BadInput(format!(
                    "{}: the kernel does not fit its bindings: {e}",
                    crate::lower::file_name(&k.name)
                )));
            }
            by_name.insert(k.name.clone(), pipelines.len());
            pipelines.push(Pipeline { pipeline, layout, args: k.args.clone() });
        }
        let storage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC;
        let dummy = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("null"),
            size: 16,
            usage: storage,
            mapped_at_creation: false,
        });
        let arena = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("params"),
            size: SLOT * ARENA_SLOTS,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let describe = format!("{} ({:?}, {})", info.name, info.backend, info.driver_info);
        Ok(WgpuDevice {
            device,
            queue,
            describe,
            pipelines,
            by_name,
            buffers: AddressSpace::default(),
            dummy,
            arena,
            arena_bytes: Vec::new(),
            bind_groups: Vec::new(),
            bind_cache: HashMap::new(),
            queued: Vec::new(),
            staging: None,
            max_binding: limits.max_storage_buffer_binding_size.min(limits.max_buffer_size),
            max_groups: limits.max_compute_workgroups_per_dimension,
            rec: Recorder::default(),
            profile: std::env::var("KILN_WGPU_PROFILE").is_ok_and(|v| v == "1").then(BTreeMap::new),
            row_per_thread: match std::env::var("KILN_WGPU_MATMUL").as_deref() {
                Ok("rows") => true,
                Ok("lanes") => false,
                _ => info.device_type == wgpu::DeviceType::Cpu,
            },
        })
    }

    /// Encodes and submits the queued launches, then `then` (copies) in the same command buffer.
    fn submit(&mut self, then: impl FnOnce(&mut wgpu::CommandEncoder)) {
        let mut enc = self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("kiln") });
        if !self.queued.is_empty() {
            self.queue.write_buffer(&self.arena, 0, &self.arena_bytes);
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
            for q in &self.queued {
                pass.set_pipeline(&self.pipelines[q.kernel].pipeline);
                pass.set_bind_group(0, &self.bind_groups[q.bind], &[(q.slot * SLOT) as u32]);
                pass.dispatch_workgroups(q.grid[0], q.grid[1], q.grid[2]);
            }
        }
        then(&mut enc);
        self.queue.submit([enc.finish()]);
        self.queued.clear();
        self.arena_bytes.clear();
    }

    fn run(&mut self, name: &str, grid: [u32; 3], args: &[LaunchArg]) -> Result<(), BackendError> {
        let mut grid = grid;
        let mut kernel =
            *self.by_name.get(name).ok_or_else(|| internal(format!("kernel `{name}` is not in the module")))?;
        if self.row_per_thread
            && name.starts_with("matmul_")
            && let Some(&k) = self.by_name.get(&format!("{name}{}", crate::kernels::ROW_PER_THREAD))
            && let Some(LaunchArg::U32(rows)) = args.get(6)
        {
            kernel = k;
            grid = [rows.div_ceil(crate::kernels::BLOCK), grid[1], grid[2]];
        }
        let sig = self.pipelines[kernel].args.clone();
        if sig.len() != args.len() {
            return Err(internal(format!("kernel `{name}` takes {} arguments, got {}", sig.len(), args.len())));
        }
        if grid.iter().any(|&g| g > self.max_groups) {
            return Err(BackendError::Unsupported {
                backend: NAME,
                what: format!(
                    "a launch of `{name}` over {grid:?} workgroups (this device allows {} per dimension)",
                    self.max_groups
                ),
            });
        }
        if grid.contains(&0) {
            return Ok(());
        }
        if self.queued.len() as u64 == ARENA_SLOTS {
            self.submit(|_| {});
        }
        // The parameter slot and the buffers bound.
        let mut params = Vec::with_capacity(SLOT as usize);
        let mut bound = Vec::new();
        for (&(pname, kind), a) in sig.iter().zip(args) {
            match (kind, a) {
                (k, LaunchArg::Ptr(addr)) if k.is_pointer() => {
                    let (buf, off) = if *addr == 0 { (usize::MAX, 0) } else { self.buffers.resolve(*addr)? };
                    if off % 4 != 0 {
                        return Err(internal(format!("`{name}`: `{pname}` is not 4-byte aligned")));
                    }
                    params.extend_from_slice(&((off / 4) as u32).to_le_bytes());
                    if k.is_buffer() {
                        if buf == usize::MAX && k != Arg::InOpt {
                            return Err(internal(format!("`{name}`: `{pname}` is null")));
                        }
                        bound.push(buf);
                    }
                }
                (Arg::U32, LaunchArg::U32(v)) => params.extend_from_slice(&v.to_le_bytes()),
                (Arg::F32, LaunchArg::F32(v)) => params.extend_from_slice(&v.to_le_bytes()),
                _ => return Err(internal(format!("`{name}`: argument `{pname}` has the wrong kind"))),
            }
        }
        params.resize(SLOT as usize, 0);
        let key = (kernel, bound);
        let bind = match self.bind_cache.get(&key) {
            Some(&b) => b,
            None => {
                let mut entries = vec![wgpu::BindGroupEntry {
                    binding: 0,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: &self.arena,
                        offset: 0,
                        size: wgpu::BufferSize::new(SLOT),
                    }),
                }];
                let mut it = key.1.iter();
                for (i, (_, a)) in sig.iter().enumerate() {
                    if a.is_buffer() {
                        let b = *it.next().ok_or_else(|| internal("binding count"))?;
                        let buffer = if b == usize::MAX { &self.dummy } else { self.buffers.get(b).0 };
                        entries.push(wgpu::BindGroupEntry {
                            binding: Kernel::binding(i),
                            resource: buffer.as_entire_binding(),
                        });
                    }
                }
                let bg = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some(name),
                    layout: &self.pipelines[kernel].layout,
                    entries: &entries,
                });
                self.bind_groups.push(bg);
                self.bind_cache.insert(key, self.bind_groups.len() - 1);
                self.bind_groups.len() - 1
            }
        };
        let slot = self.queued.len() as u64;
        self.arena_bytes.extend_from_slice(&params);
        self.queued.push(Queued { kernel, bind, slot, grid });
        if self.profile.is_some() {
            let t0 = std::time::Instant::now();
            self.submit(|_| {});
            self.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| internal(format!("device lost: {e}")))?;
            let dt = t0.elapsed().as_secs_f64();
            if let Some(p) = &mut self.profile {
                let e = p.entry(name.to_string()).or_default();
                e.0 += 1;
                e.1 += dt;
            }
        }
        Ok(())
    }
}

impl Drop for WgpuDevice {
    fn drop(&mut self) {
        if let Some(p) = &self.profile {
            let total: f64 = p.values().map(|v| v.1).sum();
            eprintln!("kiln wgpu profile ({:.3} s in kernels):", total);
            let mut rows: Vec<_> = p.iter().collect();
            rows.sort_by(|a, b| b.1.1.total_cmp(&a.1.1));
            for (name, (n, s)) in rows {
                eprintln!("  {name:<28} {n:>7} launches {s:>9.3} s {:>6.1}%", 100.0 * s / total.max(1e-12));
            }
        }
    }
}

impl Device for WgpuDevice {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn alloc(&mut self, bytes: usize) -> Result<u64, BackendError> {
        let size = (bytes as u64).max(4).next_multiple_of(4);
        if size > self.max_binding {
            return Err(BackendError::Unsupported {
                backend: NAME,
                what: format!(
                    "a buffer of {size} bytes on {} (it binds at most {} bytes; a smaller model, context or weight type fits)",
                    self.describe, self.max_binding
                ),
            });
        }
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        Ok(self.buffers.insert(buffer, size))
    }

    fn upload(&mut self, dst: u64, bytes: &[u8]) -> Result<(), BackendError> {
        if self.rec.capturing() {
            return Err(internal("upload during a capture"));
        }
        if !self.queued.is_empty() {
            self.submit(|_| {});
        }
        let (b, off) = self.buffers.resolve(dst)?;
        let (buffer, size) = self.buffers.get(b);
        let buffer = buffer.clone();
        let padded = (bytes.len() as u64).next_multiple_of(4);
        if off % 4 != 0 || off + padded > size || (padded != bytes.len() as u64 && off + padded != size) {
            return Err(internal(format!("upload of {} bytes at {dst:#x} does not fit its buffer", bytes.len())));
        }
        if padded == bytes.len() as u64 {
            self.queue.write_buffer(&buffer, off, bytes);
        } else {
            let mut v = bytes.to_vec();
            v.resize(padded as usize, 0);
            self.queue.write_buffer(&buffer, off, &v);
        }
        Ok(())
    }

    fn download(&mut self, src: u64, out: &mut [u8]) -> Result<(), BackendError> {
        let (b, off) = self.buffers.resolve(src)?;
        let len = (out.len() as u64).next_multiple_of(4);
        if off % 4 != 0 || off + len > self.buffers.get(b).1 {
            return Err(internal(format!("download of {} bytes at {src:#x} is past its buffer", out.len())));
        }
        if self.staging.as_ref().is_none_or(|s| s.1 < len) {
            let size = len.next_power_of_two().max(256);
            let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("readback"),
                size,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            self.staging = Some((buf, size));
        }
        let staging = self.staging.as_ref().map(|s| s.0.clone()).ok_or_else(|| internal("no staging buffer"))?;
        let source = self.buffers.get(b).0.clone();
        self.submit(|enc| enc.copy_buffer_to_buffer(&source, off, &staging, 0, len));
        let slice = staging.slice(0..len);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| internal(format!("device lost: {e}")))?;
        rx.recv()
            .map_err(|_| internal("readback never completed"))?
            .map_err(|e| internal(format!("readback failed: {e}")))?;
        {
            let view = slice.get_mapped_range().map_err(|e| internal(format!("readback: {e:?}")))?;
            out.copy_from_slice(&view[..out.len()]);
        }
        staging.unmap();
        Ok(())
    }

    fn launch(&mut self, name: &str, grid: [u32; 3], args: &[LaunchArg]) -> Result<(), BackendError> {
        if !self.by_name.contains_key(name) {
            return Err(internal(format!("kernel `{name}` is not in the module")));
        }
        if self.rec.record(name, grid, args) {
            return Ok(());
        }
        self.run(name, grid, args)
    }

    fn begin_capture(&mut self) -> Result<(), BackendError> {
        self.rec.begin()
    }

    fn end_capture(&mut self) -> Result<GraphId, BackendError> {
        self.rec.end()
    }

    fn replay(&mut self, graph: GraphId) -> Result<(), BackendError> {
        let launches = self.rec.take(graph)?;
        let r = launches.iter().try_for_each(|(name, grid, args)| self.run(name, *grid, args));
        self.rec.restore(graph, launches);
        r
    }

    fn tensor_cores(&self) -> bool {
        false
    }
}
