//! The Metal device behind the shared launch sequence (`kiln_ptx::Device`), with
//! objc2-metal. Compiled only on Apple targets with feature `metal`; type-checked in CI
//! with `cargo check --target aarch64-apple-darwin --features metal`.
//!
//! Every allocation is its own `MTLBuffer` in shared (unified) memory at an address of a
//! flat virtual space, as in the wgpu device: a pointer argument binds the buffer that
//! holds it and passes its offset (in 4-byte words) in the kernel's parameters. Launches
//! go into one serial compute encoder (Metal orders dependent dispatches); the command
//! buffer is committed and waited for when the host reads or writes memory.

use std::collections::HashMap;
use std::ptr::NonNull;

use kiln_backends::BackendError;
use kiln_ptx::device::{AddressSpace, Device, GraphId, Recorder};
use kiln_ptx::emu::Arg as LaunchArg;
use kiln_wgpu::kernels::{Arg, BLOCK, Kernel};
use objc2::rc::Retained;
use objc2::runtime::ProtocolObject;
use objc2_foundation::NSString;
use objc2_metal::{
    MTLBuffer, MTLCommandBuffer, MTLCommandBufferStatus, MTLCommandEncoder, MTLCommandQueue, MTLComputeCommandEncoder,
    MTLComputePipelineState, MTLCreateSystemDefaultDevice, MTLDevice, MTLLibrary, MTLResourceOptions, MTLSize,
};

use crate::msl::SIZES_BUFFER;

const NAME: &str = "metal";

fn internal(msg: impl Into<String>) -> BackendError {
    BackendError::Internal { backend: NAME, msg: msg.into() }
}

type CommandBuffer = Retained<ProtocolObject<dyn MTLCommandBuffer>>;
type Encoder = Retained<ProtocolObject<dyn MTLComputeCommandEncoder>>;

struct Pipeline {
    state: Retained<ProtocolObject<dyn MTLComputePipelineState>>,
    args: Vec<(&'static str, Arg)>,
}

/// The system's default Metal device with kiln's kernels compiled on it.
pub struct MetalDevice {
    device: Retained<ProtocolObject<dyn MTLDevice>>,
    queue: Retained<ProtocolObject<dyn MTLCommandQueue>>,
    pipelines: HashMap<String, Pipeline>,
    buffers: AddressSpace<Retained<ProtocolObject<dyn MTLBuffer>>>,
    dummy: Retained<ProtocolObject<dyn MTLBuffer>>,
    /// The command buffer being encoded, and its compute encoder.
    open: Option<(CommandBuffer, Encoder)>,
    rec: Recorder,
}

// Metal objects are thread-safe reference-counted objects; the session owns the device
// and uses it from one thread at a time.
unsafe impl Send for MetalDevice {}

impl MetalDevice {
    /// Compiles `(kernel, MSL source, entry point)` on the default device.
    pub fn new(kernels: &[(Kernel, String, String)]) -> Result<Self, BackendError> {
        let device = MTLCreateSystemDefaultDevice()
            .ok_or_else(|| BackendError::Unsupported { backend: NAME, what: "running here: no Metal device".into() })?;
        let queue = device.newCommandQueue().ok_or_else(|| internal("cannot create a command queue"))?;
        let mut pipelines = HashMap::new();
        for (k, src, entry) in kernels {
            let library = device
                .newLibraryWithSource_options_error(&NSString::from_str(src), None)
                .map_err(|e| internal(format!("{}.metal does not compile: {e}", k.name)))?;
            let function = library
                .newFunctionWithName(&NSString::from_str(entry))
                .ok_or_else(|| internal(format!("{}.metal has no function `{entry}`", k.name)))?;
            let state = device
                .newComputePipelineStateWithFunction_error(&function)
                .map_err(|e| internal(format!("pipeline for `{}`: {e}", k.name)))?;
            pipelines.insert(k.name.clone(), Pipeline { state, args: k.args.clone() });
        }
        let dummy = device
            .newBufferWithLength_options(16, MTLResourceOptions::StorageModeShared)
            .ok_or_else(|| internal("cannot allocate"))?;
        Ok(MetalDevice {
            device,
            queue,
            pipelines,
            buffers: AddressSpace::default(),
            dummy,
            open: None,
            rec: Recorder::default(),
        })
    }

    /// Commits the open command buffer and waits for it.
    fn finish(&mut self) -> Result<(), BackendError> {
        if let Some((cmd, enc)) = self.open.take() {
            enc.endEncoding();
            cmd.commit();
            cmd.waitUntilCompleted();
            if cmd.status() == MTLCommandBufferStatus::Error {
                let msg = cmd.error().map(|e| e.to_string()).unwrap_or_default();
                return Err(internal(format!("command buffer failed: {msg}")));
            }
        }
        Ok(())
    }

    fn run(&mut self, name: &str, grid: [u32; 3], args: &[LaunchArg]) -> Result<(), BackendError> {
        let p = self.pipelines.get(name).ok_or_else(|| internal(format!("kernel `{name}` is not in the module")))?;
        if p.args.len() != args.len() {
            return Err(internal(format!("kernel `{name}` takes {} arguments, got {}", p.args.len(), args.len())));
        }
        if grid.contains(&0) {
            return Ok(());
        }
        let mut params: Vec<u8> = Vec::with_capacity(4 * args.len());
        let mut bound = Vec::new();
        let mut sizes: Vec<u8> = Vec::new();
        for (i, (&(pname, kind), a)) in p.args.iter().zip(args).enumerate() {
            match (kind, a) {
                (k, LaunchArg::Ptr(addr)) if k.is_pointer() => {
                    let (buf, off) = if *addr == 0 {
                        (None, 0)
                    } else {
                        let (b, o) = self.buffers.resolve(*addr)?;
                        (Some(b), o)
                    };
                    params.extend_from_slice(&((off / 4) as u32).to_le_bytes());
                    if k.is_buffer() {
                        let size = buf.map_or(16, |b| self.buffers.get(b).1);
                        sizes.extend_from_slice(&(size as u32).to_le_bytes());
                        bound.push((Kernel::binding(i), buf));
                    }
                }
                (Arg::U32, LaunchArg::U32(v)) => params.extend_from_slice(&v.to_le_bytes()),
                (Arg::F32, LaunchArg::F32(v)) => params.extend_from_slice(&v.to_le_bytes()),
                _ => return Err(internal(format!("`{name}`: argument `{pname}` has the wrong kind"))),
            }
        }
        if self.open.is_none() {
            let cmd = self.queue.commandBuffer().ok_or_else(|| internal("cannot create a command buffer"))?;
            let enc = cmd.computeCommandEncoder().ok_or_else(|| internal("cannot create a compute encoder"))?;
            self.open = Some((cmd, enc));
        }
        let (_, enc) = self.open.as_ref().ok_or_else(|| internal("no encoder"))?;
        let p = &self.pipelines[name];
        enc.setComputePipelineState(&p.state);
        sizes.resize(sizes.len().max(4), 0);
        // SAFETY: the byte slices outlive the calls (Metal copies them); every buffer bound is
        // owned by this device for its whole life; slots are below Metal's 31.
        unsafe {
            enc.setBytes_length_atIndex(NonNull::new_unchecked(params.as_mut_ptr().cast()), params.len(), 0);
            enc.setBytes_length_atIndex(
                NonNull::new_unchecked(sizes.as_mut_ptr().cast()),
                sizes.len(),
                SIZES_BUFFER as usize,
            );
            for (slot, b) in bound {
                let buffer = match b {
                    Some(b) => self.buffers.get(b).0,
                    None => &self.dummy,
                };
                enc.setBuffer_offset_atIndex(Some(buffer), 0, slot as usize);
            }
        }
        let groups = MTLSize { width: grid[0] as usize, height: grid[1] as usize, depth: grid[2] as usize };
        let threads = MTLSize { width: BLOCK as usize, height: 1, depth: 1 };
        enc.dispatchThreadgroups_threadsPerThreadgroup(groups, threads);
        Ok(())
    }
}

impl Device for MetalDevice {
    fn describe(&self) -> String {
        self.device.name().to_string()
    }

    fn alloc(&mut self, bytes: usize) -> Result<u64, BackendError> {
        let size = (bytes as u64).max(4).next_multiple_of(4);
        let buffer = self
            .device
            .newBufferWithLength_options(size as usize, MTLResourceOptions::StorageModeShared)
            .ok_or_else(|| BackendError::Unsupported { backend: NAME, what: format!("a buffer of {size} bytes") })?;
        // Fresh Metal buffers are not guaranteed zeroed; the session expects zeroed memory.
        // SAFETY: `contents` points at `size` bytes of shared memory no GPU work uses yet.
        unsafe { std::ptr::write_bytes(buffer.contents().as_ptr().cast::<u8>(), 0, size as usize) };
        Ok(self.buffers.insert(buffer, size))
    }

    fn upload(&mut self, dst: u64, bytes: &[u8]) -> Result<(), BackendError> {
        if self.rec.capturing() {
            return Err(internal("upload during a capture"));
        }
        self.finish()?;
        let (b, off) = self.buffers.resolve(dst)?;
        if off + bytes.len() as u64 > self.buffers.get(b).1 {
            return Err(internal(format!("upload of {} bytes at {dst:#x} does not fit its buffer", bytes.len())));
        }
        // SAFETY: in bounds (checked above); no GPU work is in flight (finished above).
        unsafe {
            let p = self.buffers.get(b).0.contents().as_ptr().cast::<u8>().add(off as usize);
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len());
        }
        Ok(())
    }

    fn download(&mut self, src: u64, out: &mut [u8]) -> Result<(), BackendError> {
        self.finish()?;
        let (b, off) = self.buffers.resolve(src)?;
        if off + out.len() as u64 > self.buffers.get(b).1 {
            return Err(internal(format!("download of {} bytes at {src:#x} is past its buffer", out.len())));
        }
        // SAFETY: in bounds (checked above); the GPU finished writing (finished above).
        unsafe {
            let p = self.buffers.get(b).0.contents().as_ptr().cast::<u8>().add(off as usize);
            std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), out.len());
        }
        Ok(())
    }

    fn launch(&mut self, name: &str, grid: [u32; 3], args: &[LaunchArg]) -> Result<(), BackendError> {
        if !self.pipelines.contains_key(name) {
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
