//! The CUDA driver as a [`Device`]: the PTX module is JIT-compiled by the
//! driver at load, buffers are plain `cuMemAlloc` allocations, launches are
//! queued on the default stream and only a download waits for them.
//!
//! The driver library is loaded at run time (cudarc's `dynamic-loading`), so
//! kiln builds and runs everywhere; without a driver, preparing a session
//! fails with a message instead.

use std::collections::HashMap;
use std::ffi::{CString, c_void};

use cudarc::driver::{result, sys};
use kiln_backends::BackendError;

use crate::device::{Device, GraphId, internal};
use crate::emu::Arg;

fn cu(what: &str, e: result::DriverError) -> BackendError {
    internal(format!("CUDA {what}: {e:?}"))
}

/// A CUDA device with one loaded PTX module.
pub struct CudaDevice {
    ctx: sys::CUcontext,
    dev: sys::CUdevice,
    module: sys::CUmodule,
    functions: HashMap<String, (sys::CUfunction, u32)>,
    allocations: Vec<sys::CUdeviceptr>,
    name: String,
    /// Every launch goes to this stream (blocking, so the null stream's
    /// synchronous copies order with it); it is what captures record.
    stream: sys::CUstream,
    graphs: Vec<(sys::CUgraph, sys::CUgraphExec)>,
}

// The context is made current on the thread that uses the device before every call.
unsafe impl Send for CudaDevice {}

/// Whether a CUDA driver library can be loaded on this machine.
pub fn driver_present() -> bool {
    // SAFETY: only tries to load the library.
    unsafe { sys::is_culib_present() }
}

impl CudaDevice {
    /// Opens GPU `ordinal` and loads the PTX module `ptx` (its kernels: name and threads per block).
    pub fn open(ordinal: i32, ptx: &str, kernels: &[(String, u32)]) -> Result<Self, BackendError> {
        if !driver_present() {
            return Err(BackendError::Unsupported {
                backend: "ptx",
                what: "running on this machine: no CUDA driver library (libcuda.so) was found".into(),
            });
        }
        result::init().map_err(|e| cu("init", e))?;
        let dev = result::device::get(ordinal).map_err(|e| cu("device", e))?;
        let name = result::device::get_name(dev).unwrap_or_else(|_| "CUDA device".into());
        // SAFETY: dev is a valid device; the primary context is retained until drop.
        let ctx = unsafe { result::primary_ctx::retain(dev) }.map_err(|e| cu("context", e))?;
        unsafe { result::ctx::set_current(ctx) }.map_err(|e| cu("context", e))?;
        let src = CString::new(ptx).map_err(|_| internal("PTX text holds a NUL byte"))?;
        // SAFETY: a NUL-terminated PTX image.
        let module = unsafe { result::module::load_data(src.as_ptr() as *const c_void) }
            .map_err(|e| cu("loading the PTX module (JIT)", e))?;
        let mut functions = HashMap::new();
        for (n, block) in kernels {
            let c = CString::new(n.as_str()).map_err(|_| internal("kernel name holds a NUL byte"))?;
            // SAFETY: module is loaded.
            let f = unsafe { result::module::get_function(module, c) }.map_err(|e| cu(&format!("kernel `{n}`"), e))?;
            functions.insert(n.clone(), (f, *block));
        }
        let stream = result::stream::create(result::stream::StreamKind::Default).map_err(|e| cu("stream", e))?;
        Ok(CudaDevice { ctx, dev, module, functions, allocations: Vec::new(), name, stream, graphs: Vec::new() })
    }

    fn current(&self) -> Result<(), BackendError> {
        // SAFETY: ctx is retained by self.
        unsafe { result::ctx::set_current(self.ctx) }.map_err(|e| cu("context", e))
    }

    /// Waits for every queued launch.
    pub fn synchronize(&self) -> Result<(), BackendError> {
        self.current()?;
        result::ctx::synchronize().map_err(|e| cu("synchronize", e))
    }
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        if self.current().is_ok() {
            let _ = result::ctx::synchronize();
            for &(g, e) in &self.graphs {
                // SAFETY: created by this device, destroyed once.
                let _ = unsafe { result::graph::exec_destroy(e) };
                let _ = unsafe { result::graph::destroy(g) };
            }
            let _ = unsafe { result::stream::destroy(self.stream) };
            for &p in &self.allocations {
                // SAFETY: allocated by this device, freed once.
                let _ = unsafe { result::free_sync(p) };
            }
            // SAFETY: loaded by this device.
            let _ = unsafe { result::module::unload(self.module) };
            let _ = unsafe { result::primary_ctx::release(self.dev) };
        }
    }
}

impl Device for CudaDevice {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn alloc(&mut self, bytes: usize) -> Result<u64, BackendError> {
        self.current()?;
        // SAFETY: plain device allocation, zeroed below, freed on drop.
        let p =
            unsafe { result::malloc_sync(bytes.max(4)) }.map_err(|e| cu(&format!("allocating {bytes} bytes"), e))?;
        self.allocations.push(p);
        unsafe { result::memset_d8_sync(p, 0, bytes.max(4)) }.map_err(|e| cu("memset", e))?;
        Ok(p)
    }

    fn upload(&mut self, dst: u64, bytes: &[u8]) -> Result<(), BackendError> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.current()?;
        // SAFETY: dst was allocated with at least this many bytes by the session.
        unsafe { result::memcpy_htod_sync(dst, bytes) }.map_err(|e| cu("upload", e))
    }

    fn download(&mut self, src: u64, out: &mut [u8]) -> Result<(), BackendError> {
        self.synchronize()?;
        // SAFETY: src holds at least out.len() bytes.
        unsafe { result::memcpy_dtoh_sync(out, src) }.map_err(|e| cu("download", e))
    }

    fn launch(&mut self, name: &str, grid: [u32; 3], args: &[Arg]) -> Result<(), BackendError> {
        let (f, block) =
            *self.functions.get(name).ok_or_else(|| internal(format!("kernel `{name}` is not in the module")))?;
        self.current()?;
        let mut vals: Vec<u64> = args
            .iter()
            .map(|a| match *a {
                Arg::Ptr(p) => p,
                Arg::U32(v) => v as u64,
                Arg::F32(v) => v.to_bits() as u64,
            })
            .collect();
        let mut ptrs: Vec<*mut c_void> = vals.iter_mut().map(|v| v as *mut u64 as *mut c_void).collect();
        // Each parameter is read at its own size from the start of its slot
        // (little-endian), so u32/f32 values in the low bytes of a u64 are right.
        // SAFETY: f is a kernel of the loaded module; args match its parameter list (the
        // session builds them from the same definitions the PTX was printed from).
        unsafe { result::launch_kernel(f, (grid[0], grid[1], grid[2]), (block, 1, 1), 0, self.stream, &mut ptrs) }
            .map_err(|e| cu(&format!("launching `{name}`"), e))
    }

    fn begin_capture(&mut self) -> Result<(), BackendError> {
        self.current()?;
        // SAFETY: our stream; relaxed mode, nothing else runs on this thread meanwhile.
        unsafe { result::stream::begin_capture(self.stream, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED) }
            .map_err(|e| cu("begin capture", e))
    }

    fn end_capture(&mut self) -> Result<GraphId, BackendError> {
        self.current()?;
        // SAFETY: capture begun on our stream.
        let g = unsafe { result::stream::end_capture(self.stream) }.map_err(|e| cu("end capture", e))?;
        // SAFETY: g is a captured graph.
        let e = unsafe { result::graph::instantiate(g, sys::CUgraphInstantiate_flags(0)) }
            .map_err(|e| cu("graph instantiate", e))?;
        self.graphs.push((g, e));
        Ok(GraphId(self.graphs.len() - 1))
    }

    fn replay(&mut self, graph: GraphId) -> Result<(), BackendError> {
        let &(_, e) = self.graphs.get(graph.0).ok_or_else(|| internal("no such graph"))?;
        self.current()?;
        // SAFETY: an instantiated graph of this context, on our stream.
        unsafe { result::graph::launch(e, self.stream) }.map_err(|e| cu("graph launch", e))
    }
}
