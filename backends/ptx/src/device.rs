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

type Launch = (String, [u32; 3], Vec<Arg>);

/// The emulator as a device: every kernel of the module, run on the CPU.
pub struct EmuDevice {
    mem: EmuMemory,
    kernels: HashMap<String, Kernel>,
    capturing: Option<Vec<Launch>>,
    graphs: Vec<Vec<Launch>>,
}

impl EmuDevice {
    pub fn new(kernels: &[Kernel]) -> Self {
        EmuDevice {
            mem: EmuMemory::new(),
            kernels: kernels.iter().map(|k| (k.name.clone(), k.clone())).collect(),
            capturing: None,
            graphs: Vec::new(),
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
        if self.capturing.is_some() {
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
        match &mut self.capturing {
            Some(rec) => {
                rec.push((name.to_string(), grid, args.to_vec()));
                Ok(())
            }
            None => self.run(name, grid, args),
        }
    }
    fn begin_capture(&mut self) -> Result<(), BackendError> {
        if self.capturing.is_some() {
            return Err(internal("capture already running"));
        }
        self.capturing = Some(Vec::new());
        Ok(())
    }
    fn end_capture(&mut self) -> Result<GraphId, BackendError> {
        let rec = self.capturing.take().ok_or_else(|| internal("no capture running"))?;
        self.graphs.push(rec);
        Ok(GraphId(self.graphs.len() - 1))
    }
    fn replay(&mut self, graph: GraphId) -> Result<(), BackendError> {
        let launches = self.graphs.get(graph.0).cloned().ok_or_else(|| internal("no such graph"))?;
        for (name, grid, args) in &launches {
            self.run(name, *grid, args)?;
        }
        Ok(())
    }
}
