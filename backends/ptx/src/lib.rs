//! kiln's CUDA backend: verified IR lowered to PTX kernels printed directly
//! by kiln (no LLVM), stored in the build as `kernels.ptx`, JIT-compiled by
//! the CUDA driver at load and launched in one sequence per forward call.
//!
//! - `ptx`: the kernel builder (typed registers, a closed instruction set) and the PTX printer;
//! - `kernels`, `formats`, `formats_k`: the kernels, and the fused weight decoders per layout;
//! - `kernels_ds4`: DeepSeek-V4's kernels (hyper-connections, experts, compressed attention);
//! - `lower`: which ops run and which kernels a module needs;
//! - `emu`: a SIMT emulator that runs the same kernels on the CPU (tests, CI);
//! - `device`, `cuda`: where kernels run (the emulator, or the CUDA driver with feature `cuda`);
//! - `session`: buffers, the KV cache and the launch sequence, written once for both devices.

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod emu;
pub mod formats;
pub mod formats_k;
pub mod kernels;
pub mod kernels_ds4;
pub mod lower;
pub mod ptx;
pub mod session;

use std::sync::Arc;

use kiln_backends::{Backend, BackendError, BuildFile, Session, SessionOptions, WeightSource};
use kiln_ir::{Op, VerifiedModule};

pub use device::{Device, EmuDevice};
pub use session::PtxSession;

/// The file a PTX build carries its kernels in.
pub const PTX_FILE: &str = "kernels.ptx";

/// Where a PTX session runs its kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The CUDA driver, GPU 0 (needs the `cuda` feature and a GPU).
    Cuda,
    /// kiln's SIMT emulator on the CPU (slow; for tests and machines without a GPU).
    Emulator,
}

/// The PTX backend (`"ptx"`).
#[derive(Clone, Copy, Debug)]
pub struct PtxBackend {
    pub target: Target,
}

impl PtxBackend {
    /// The backend for `kiln run`: the emulator when `KILN_PTX_DEVICE=emulator`, else CUDA.
    pub fn from_env() -> Self {
        let emulate = std::env::var("KILN_PTX_DEVICE").is_ok_and(|v| v == "emulator");
        PtxBackend { target: if emulate { Target::Emulator } else { Target::Cuda } }
    }
}

impl Backend for PtxBackend {
    fn name(&self) -> &'static str {
        "ptx"
    }

    fn supports(&self, module: &VerifiedModule, op: &Op) -> bool {
        lower::supports(module, op)
    }

    fn unsupported_detail(&self, module: &VerifiedModule, op: &Op) -> Option<String> {
        lower::unsupported_detail(module, op)
    }

    fn emit(&self, module: &VerifiedModule, _weights: &dyn WeightSource) -> Result<Vec<BuildFile>, BackendError> {
        Ok(vec![BuildFile { name: PTX_FILE.into(), bytes: lower::module_ptx(module).into_bytes() }])
    }

    fn prepare(
        &self,
        module: Arc<VerifiedModule>,
        weights: Arc<dyn WeightSource>,
        options: &SessionOptions,
    ) -> Result<Box<dyn Session>, BackendError> {
        kiln_backends::check_gpu_prepare(self, &module, options)?;
        let kernels = lower::kernels_for(&module);
        match self.target {
            Target::Emulator => Ok(Box::new(PtxSession::new(EmuDevice::new(&kernels), module, weights, options)?)),
            Target::Cuda => prepare_cuda(&kernels, &module, weights, options),
        }
    }
}

#[cfg(feature = "cuda")]
fn prepare_cuda(
    kernels: &[ptx::Kernel],
    module: &Arc<VerifiedModule>,
    weights: Arc<dyn WeightSource>,
    options: &SessionOptions,
) -> Result<Box<dyn Session>, BackendError> {
    // The build's own kernels when there is a build; else print them now.
    let text = match options.files.iter().find(|f| f.name == PTX_FILE) {
        Some(f) => String::from_utf8(f.bytes.clone())
            .map_err(|_| BackendError::BadInput(format!("{PTX_FILE} of the build is not UTF-8 text")))?,
        None => ptx::print_module(kernels),
    };
    let names: Vec<(String, u32)> = kernels.iter().map(|k| (k.name.clone(), k.block)).collect();
    let dev = cuda::CudaDevice::open(0, &text, &names)?;
    Ok(Box::new(PtxSession::new(dev, module.clone(), weights, options)?))
}

#[cfg(not(feature = "cuda"))]
fn prepare_cuda(
    _kernels: &[ptx::Kernel],
    _module: &Arc<VerifiedModule>,
    _weights: Arc<dyn WeightSource>,
    _options: &SessionOptions,
) -> Result<Box<dyn Session>, BackendError> {
    Err(BackendError::Unsupported {
        backend: "ptx",
        what: "running on a GPU in this build of kiln (built without the `cuda` feature; \
               set KILN_PTX_DEVICE=emulator to run the kernels on the CPU emulator)"
            .into(),
    })
}
