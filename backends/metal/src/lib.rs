//! kiln's Metal backend (`"metal"`): for Apple laptops and phones.
//!
//! Kernels are the wgpu backend's (one shared lowering): each WGSL kernel is validated by
//! naga and printed as Metal Shading Language by naga's MSL back end (`msl`). A build
//! carries one `<kernel>.metal` per kernel and `metal.json` (entry point names, buffer
//! slots, threadgroup size), which the Metal runtime compiles at load
//! (`newLibraryWithSource`), or `xcrun metal` turns into a `.metallib` on a Mac.
//!
//! The runtime path (`device`, feature `metal`, Apple targets only) implements the PTX
//! backend's `Device` trait with objc2-metal, so the same launch sequence
//! (`kiln_ptx::PtxSession`) runs: buffers in shared (unified) memory, one command buffer
//! per forward call. Elsewhere `prepare` fails with a message saying so.

#[cfg(all(feature = "metal", target_vendor = "apple"))]
pub mod device;
pub mod msl;

use std::sync::Arc;

use kiln_backends::{Backend, BackendError, BuildFile, Session, SessionOptions, WeightSource};
use kiln_ir::{Op, VerifiedModule};
use kiln_wgpu::kernels::{Kernel, ROW_PER_THREAD};

/// The file listing a build's Metal kernels.
pub const MANIFEST: &str = "metal.json";

/// The Metal backend.
#[derive(Clone, Copy, Debug, Default)]
pub struct MetalBackend;

impl MetalBackend {
    pub fn new() -> Self {
        MetalBackend
    }
}

/// The kernels a module needs on Metal: the wgpu lowering's, without the variants for
/// CPU adapters.
pub fn kernels_for(module: &VerifiedModule) -> Vec<Kernel> {
    kiln_wgpu::lower::kernels_for(module).into_iter().filter(|k| !k.name.ends_with(ROW_PER_THREAD)).collect()
}

/// One kernel's MSL and its entry in `metal.json`.
pub fn emit_kernel(k: &Kernel) -> Result<(BuildFile, serde_json::Value), BackendError> {
    let (src, entry) = msl::kernel_msl(k)
        .map_err(|e| BackendError::Internal { backend: "metal", msg: format!("printing MSL: {e}") })?;
    let file = format!("{}.metal", k.name);
    let args: Vec<serde_json::Value> = k
        .args
        .iter()
        .enumerate()
        .map(|(i, (name, a))| {
            serde_json::json!({
                "name": name,
                "kind": format!("{a:?}"),
                "buffer": a.is_buffer().then(|| Kernel::binding(i)),
            })
        })
        .collect();
    let meta = serde_json::json!({
        "name": k.name,
        "file": file,
        "entry": entry,
        "params_buffer": 0,
        "sizes_buffer": msl::SIZES_BUFFER,
        "args": args,
    });
    Ok((BuildFile { name: file, bytes: src.into_bytes() }, meta))
}

impl Backend for MetalBackend {
    fn name(&self) -> &'static str {
        "metal"
    }

    fn supports(&self, module: &VerifiedModule, op: &Op) -> bool {
        kiln_wgpu::lower::supports(module, op)
    }

    fn emit(&self, module: &VerifiedModule, _weights: &dyn WeightSource) -> Result<Vec<BuildFile>, BackendError> {
        let mut files = Vec::new();
        let mut metas = Vec::new();
        for k in kernels_for(module) {
            let (f, m) = emit_kernel(&k)?;
            files.push(f);
            metas.push(m);
        }
        let manifest = serde_json::json!({
            "msl_version": format!("{}.{}", msl::LANG_VERSION.0, msl::LANG_VERSION.1),
            "threads_per_threadgroup": kiln_wgpu::kernels::BLOCK,
            "kernels": metas,
        });
        let text = serde_json::to_string_pretty(&manifest)
            .map_err(|e| BackendError::Internal { backend: "metal", msg: e.to_string() })?;
        files.push(BuildFile { name: MANIFEST.into(), bytes: (text + "\n").into_bytes() });
        Ok(files)
    }

    fn prepare(
        &self,
        module: Arc<VerifiedModule>,
        weights: Arc<dyn WeightSource>,
        options: &SessionOptions,
    ) -> Result<Box<dyn Session>, BackendError> {
        kiln_backends::check_gpu_prepare(self, &module, options)?;
        prepare_metal(module, weights, options)
    }
}

#[cfg(all(feature = "metal", target_vendor = "apple"))]
fn prepare_metal(
    module: Arc<VerifiedModule>,
    weights: Arc<dyn WeightSource>,
    options: &SessionOptions,
) -> Result<Box<dyn Session>, BackendError> {
    let kernels = kernels_for(&module);
    let mut sources = Vec::new();
    for k in &kernels {
        let file = format!("{}.metal", k.name);
        // The entry point name comes with the printed MSL; the build's own source is used when there is one.
        let (printed, entry) = msl::kernel_msl(k).map_err(|e| BackendError::Internal { backend: "metal", msg: e })?;
        let src = match options.files.iter().find(|f| f.name == file) {
            Some(f) => String::from_utf8(f.bytes.clone())
                .map_err(|_| BackendError::BadInput(format!("{file} of the build is not UTF-8 text")))?,
            None if options.files.is_empty() => printed,
            None => return Err(BackendError::BadInput(format!("the build has no {file} (kernel `{}`)", k.name))),
        };
        sources.push((k.clone(), src, entry));
    }
    let dev = device::MetalDevice::new(&sources)?;
    Ok(Box::new(kiln_ptx::PtxSession::new(dev, module, weights, options)?))
}

#[cfg(not(all(feature = "metal", target_vendor = "apple")))]
fn prepare_metal(
    _module: Arc<VerifiedModule>,
    _weights: Arc<dyn WeightSource>,
    _options: &SessionOptions,
) -> Result<Box<dyn Session>, BackendError> {
    Err(BackendError::Unsupported {
        backend: "metal",
        what: "running here: Metal runs on Apple targets with kiln built with `--features metal`; \
               run this build's `wgpu` kernels (the same lowering) elsewhere"
            .into(),
    })
}
