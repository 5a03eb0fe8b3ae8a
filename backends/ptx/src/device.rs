//! Where kernels run: the [`Device`] trait, the SIMT emulator behind it
//! ([`EmuDevice`]) and, with the `cuda` feature, the CUDA driver
//! ([`crate::cuda::CudaDevice`]). The session is written once against this
//! trait, so the emulator tests the same launch sequence a GPU runs.

use std::collections::HashMap;

use kiln_backends::BackendError;

use crate::emu::{self, Arg, EmuMemory};
use crate::ptx::Kernel;

pub(crate) const NAME: &str = "ptx";

pub(crate) fn internal(msg: impl Into<String>) -> BackendError {
    BackendError::Internal { backend: NAME, msg: msg.into() }
}

/// A device that holds buffers and runs the module's kernels, in order.
pub trait Device: Send {
    /// Human-readable description (GPU name, or "emulator").
    fn describe(&self) -> String;
    /// Allocates `bytes` zeroed bytes; returns the device address.
    fn alloc(&mut self, bytes: usize) -> Result<u64, BackendError>;
    fn upload(&mut self, dst: u64, bytes: &[u8]) -> Result<(), BackendError>;
    /// Waits for every launch before it, then copies `out.len()` bytes back.
    fn download(&mut self, src: u64, out: &mut [u8]) -> Result<(), BackendError>;
    /// Queues kernel `name` over `grid` blocks with `args` (or records it, while capturing).
    fn launch(&mut self, name: &str, grid: [u32; 3], args: &[Arg]) -> Result<(), BackendError>;
    /// Starts recording launches instead of running them (a CUDA graph).
    fn begin_capture(&mut self) -> Result<(), BackendError>;
    /// Stops recording; the launches since [`Device::begin_capture`] become a graph.
    fn end_capture(&mut self) -> Result<GraphId, BackendError>;
    /// Runs a recorded graph: its launches, with the arguments they were recorded with.
    fn replay(&mut self, graph: GraphId) -> Result<(), BackendError>;
    /// Whether the device has the tensor-core matmul kernels (`matmul_mma_*`): the session
    /// launches them for prefill batches when it does, the CUDA-core kernels otherwise.
    fn tensor_cores(&self) -> bool {
        true
    }
}

/// A recorded launch sequence of a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GraphId(pub usize);

/// One recorded launch: kernel name, grid, arguments.
pub type Launch = (String, [u32; 3], Vec<Arg>);

/// Capture and replay for devices without native graphs: while capturing, launches are
/// recorded instead of run; a graph is the list, replayed launch by launch.
#[derive(Default)]
pub struct Recorder {
    capturing: Option<Vec<Launch>>,
    graphs: Vec<Vec<Launch>>,
}

impl Recorder {
    pub fn capturing(&self) -> bool {
        self.capturing.is_some()
    }

    /// Records the launch if a capture is running (then returns true).
    pub fn record(&mut self, name: &str, grid: [u32; 3], args: &[Arg]) -> bool {
        match &mut self.capturing {
            Some(rec) => {
                rec.push((name.to_string(), grid, args.to_vec()));
                true
            }
            None => false,
        }
    }

    pub fn begin(&mut self) -> Result<(), BackendError> {
        if self.capturing.is_some() {
            return Err(internal("capture already running"));
        }
        self.capturing = Some(Vec::new());
        Ok(())
    }

    pub fn end(&mut self) -> Result<GraphId, BackendError> {
        let rec = self.capturing.take().ok_or_else(|| internal("no capture running"))?;
        self.graphs.push(rec);
        Ok(GraphId(self.graphs.len() - 1))
    }

    /// The launches of `graph`, taken out for a replay; give them back with [`Recorder::restore`].
    pub fn take(&mut self, graph: GraphId) -> Result<Vec<Launch>, BackendError> {
        Ok(std::mem::take(self.graphs.get_mut(graph.0).ok_or_else(|| internal("no such graph"))?))
    }

    pub fn restore(&mut self, graph: GraphId, launches: Vec<Launch>) {
        self.graphs[graph.0] = launches;
    }
}

/// A flat virtual address space over a device's separate buffers, so the session's pointer
/// arithmetic works on devices whose allocations are objects (wgpu, Metal): each buffer
/// gets a page-aligned address range; an address resolves to its buffer and offset.
pub struct AddressSpace<B> {
    buffers: Vec<(B, u64)>,
    bases: std::collections::BTreeMap<u64, usize>,
    next: u64,
}

impl<B> Default for AddressSpace<B> {
    fn default() -> Self {
        AddressSpace { buffers: Vec::new(), bases: Default::default(), next: 1 << 12 }
    }
}

impl<B> AddressSpace<B> {
    /// Adds a buffer of `size` bytes; returns its address (never 0, the null pointer).
    pub fn insert(&mut self, buffer: B, size: u64) -> u64 {
        let addr = self.next;
        self.next = (addr + size.max(1)).next_multiple_of(1 << 12);
        self.bases.insert(addr, self.buffers.len());
        self.buffers.push((buffer, size));
        addr
    }

    /// The index of the buffer holding `addr` and the byte offset of `addr` in it.
    pub fn resolve(&self, addr: u64) -> Result<(usize, u64), BackendError> {
        let (&base, &i) = self
            .bases
            .range(..=addr)
            .next_back()
            .ok_or_else(|| internal(format!("address {addr:#x} is not allocated")))?;
        let off = addr - base;
        if off > self.buffers[i].1 {
            return Err(internal(format!("address {addr:#x} is past its buffer")));
        }
        Ok((i, off))
    }

    /// Buffer `i` and its size in bytes.
    pub fn get(&self, i: usize) -> (&B, u64) {
        (&self.buffers[i].0, self.buffers[i].1)
    }
}

/// The emulator as a device: every kernel of the module, run on the CPU.
pub struct EmuDevice {
    mem: EmuMemory,
    kernels: HashMap<String, Kernel>,
    rec: Recorder,
}

impl EmuDevice {
    pub fn new(kernels: &[Kernel]) -> Self {
        EmuDevice {
            mem: EmuMemory::new(),
            kernels: kernels.iter().map(|k| (k.name.clone(), k.clone())).collect(),
            rec: Recorder::default(),
        }
    }

    fn run(&mut self, name: &str, grid: [u32; 3], args: &[Arg]) -> Result<(), BackendError> {
        let k = self.kernels.get(name).ok_or_else(|| internal(format!("kernel `{name}` is not in the module")))?;
        emu::launch(&mut self.mem, k, grid, args).map_err(internal)
    }
}

impl Device for EmuDevice {
    fn describe(&self) -> String {
        "kiln SIMT emulator (CPU)".into()
    }
    fn alloc(&mut self, bytes: usize) -> Result<u64, BackendError> {
        Ok(self.mem.alloc(bytes))
    }
    fn upload(&mut self, dst: u64, bytes: &[u8]) -> Result<(), BackendError> {
        if self.rec.capturing() {
            return Err(internal("upload during a capture"));
        }
        self.mem.write(dst, bytes).map_err(internal)
    }
    fn download(&mut self, src: u64, out: &mut [u8]) -> Result<(), BackendError> {
        self.mem.read(src, out).map_err(internal)
    }
    fn launch(&mut self, name: &str, grid: [u32; 3], args: &[Arg]) -> Result<(), BackendError> {
        if !self.kernels.contains_key(name) {
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
}
