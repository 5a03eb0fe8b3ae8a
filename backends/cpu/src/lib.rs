//! kiln's compiled CPU backend (`"cpu"`), for laptops.
//!
//! Decode on a CPU is bound by reading the packed weights once per token, so
//! the kernels read them packed: each quantized layout has its own fused
//! dequantize-dot kernel ([`kernels`]; AVX2 + FMA with runtime detection,
//! a portable scalar path otherwise), activations are quantized once per token
//! row to the layout's 8-bit dot type as llama.cpp does, and weight rows are
//! split in cache-sized blocks over a persistent worker pool ([`matmul`]).
//!
//! Numerics are llama.cpp's (`Numerics::Ggml`, whatever the options ask): the
//! 8-bit activations are what make integer SIMD dots possible, and with them
//! every matmul equals the reference interpreter's `Ggml` result bit for bit,
//! which is how this backend is tested.
//!
//! The graph walk, the KV cache and the row-wise ops (norms, RoPE, attention)
//! are the reference interpreter's, reached through
//! [`kiln_backends::reference::Kernels`]: they are a few percent of a
//! decode step (measured by `cargo xtask bench cpu`), and sharing them keeps one
//! definition of each op.

mod attention;
mod compressed;
mod hugebuf;
pub mod kernels;
#[cfg(target_arch = "x86_64")]
mod klanes;
#[cfg(target_arch = "x86_64")]
mod kq2x;
#[cfg(target_arch = "x86_64")]
mod lut4;
pub mod matmul;
#[cfg(target_arch = "x86_64")]
pub mod packed;
#[cfg(target_arch = "x86_64")]
mod q8lanes;
#[cfg(target_arch = "x86_64")]
mod vnni;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::sync::Arc;

use kiln_backends::reference::ReferenceSession;
use kiln_backends::{Backend, BackendError, Numerics, Session, SessionOptions, WeightSource};
use kiln_ir::{Op, VerifiedModule};

pub use kernels::Isa;
pub use matmul::CpuKernels;
#[cfg(target_arch = "x86_64")]
pub use packed::PackedWeights;

/// The compiled CPU backend.
#[derive(Clone, Copy, Debug)]
pub struct CpuBackend {
    isa: Isa,
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuBackend {
    /// The backend with the best instruction set this CPU has.
    pub fn new() -> Self {
        CpuBackend { isa: Isa::detect() }
    }

    /// The backend restricted to `isa`, or the best set below it this CPU has (tests
    /// compare the paths).
    pub fn with_isa(isa: Isa) -> Self {
        let order = [Isa::Avx512Vnni, Isa::Avx2, Isa::Scalar];
        let at = order.iter().position(|i| *i == isa).unwrap_or(2);
        CpuBackend { isa: order[at..].iter().copied().find(|i| i.available()).unwrap_or(Isa::Scalar) }
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    /// Every op of the IR (layouts without a SIMD kernel take the exact f32 dot).
    fn supports(&self, _module: &VerifiedModule, _op: &Op) -> bool {
        true
    }

    fn prepare(
        &self,
        module: Arc<VerifiedModule>,
        weights: Arc<dyn WeightSource>,
        options: &SessionOptions,
    ) -> Result<Box<dyn Session>, BackendError> {
        let options = SessionOptions { numerics: Numerics::Ggml, ..options.clone() };
        #[allow(unused_mut)]
        let (mut kernel, mut weights) = (CpuKernels::new(self.isa), weights);
        // The VNNI lane kernels read Q4_K weights repacked once here; the other matmul
        // weights of a mapped file are read from copies on huge pages.
        #[cfg(target_arch = "x86_64")]
        if self.isa == Isa::Avx512Vnni {
            let (packed, w) = PackedWeights::build(&module, weights);
            kernel.packed = Some(Arc::new(packed)).filter(|p| !p.is_empty());
            weights = w;
        }
        let kernel = Arc::new(kernel);
        Ok(Box::new(ReferenceSession::with_kernel(module, weights, &options, kernel)?))
    }
}
