//! kiln's wgpu backend (`"wgpu"`, the phone build): verified IR lowered to WGSL compute
//! kernels at compile time, one `<kernel>.wgsl` file per kernel in the build, run through
//! wgpu on Vulkan, Metal, DX12 or (on a CPU-only machine) Mesa's lavapipe.
//!
//! - `kernels`: the kernels (signature + body) and the small printer of a WGSL module;
//! - `formats`: the fused weight decoders per layout;
//! - `kv`: the quantized KV-cache kernels (append with rotation and rounding, dequantize);
//! - `ds4`: DeepSeek-V4's kernels (hyper-connections, routing, experts, compressed attention);
//! - `lower`: which ops run and which kernels a module needs; naga validation;
//! - `device`: buffers, queued launches and submissions on a wgpu device.
//!
//! The launch sequence (buffers by value lifetime, the KV cache, attention splits, device
//! argmax/top-k) is the PTX backend's `PtxSession`, written once against its `Device`
//! trait: the WGSL kernels carry the PTX kernels' names, arguments and grids.

pub mod device;
pub mod ds4;
pub mod formats;
pub mod kernels;
pub mod kv;
pub mod lower;

use std::collections::HashMap;
use std::sync::Arc;

use kiln_backends::{Backend, BackendError, BuildFile, Session, SessionOptions, WeightSource};
use kiln_ir::{Op, VerifiedModule};

pub use device::WgpuDevice;

/// The wgpu backend.
#[derive(Clone, Copy, Debug, Default)]
pub struct WgpuBackend;

impl WgpuBackend {
    pub fn new() -> Self {
        WgpuBackend
    }
}

impl Backend for WgpuBackend {
    fn name(&self) -> &'static str {
        "wgpu"
    }

    fn supports(&self, module: &VerifiedModule, op: &Op) -> bool {
        lower::supports(module, op)
    }

    fn emit(&self, module: &VerifiedModule, _weights: &dyn WeightSource) -> Result<Vec<BuildFile>, BackendError> {
        lower::kernels_for(module)
            .into_iter()
            .map(|k| {
                let src = k.source();
                lower::validate(&k.name, &src).map_err(|e| BackendError::Internal {
                    backend: "wgpu",
                    msg: format!("emitted invalid WGSL: {e}"),
                })?;
                Ok(BuildFile { name: lower::file_name(&k.name), bytes: src.into_bytes() })
            })
            .collect()
    }

    fn prepare(
        &self,
        module: Arc<VerifiedModule>,
        weights: Arc<dyn WeightSource>,
        options: &SessionOptions,
    ) -> Result<Box<dyn Session>, BackendError> {
        kiln_backends::check_gpu_prepare(self, &module, options)?;
        let kernels = lower::kernels_for(&module);
        // The build's own kernels when there is a build; else print them now.
        let mut sources = HashMap::new();
        for k in &kernels {
            let file = lower::file_name(&k.name);
            let src = if options.files.is_empty() {
                k.source()
            } else {
                let f =
                    options.files.iter().find(|f| f.name == file).ok_or_else(|| {
                        BackendError::BadInput(format!("the build has no {file} (kernel `{}`)", k.name))
                    })?;
                String::from_utf8(f.bytes.clone())
                    .map_err(|_| BackendError::BadInput(format!("{file} of the build is not UTF-8 text")))?
            };
            sources.insert(k.name.clone(), src);
        }
        let dev = WgpuDevice::new(&kernels, &sources)?;
        Ok(Box::new(kiln_ptx::PtxSession::new(dev, module, weights, options)?))
    }
}
