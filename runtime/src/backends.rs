//! The backend registry: every backend a recipe or build may name, by name.
//! (It lives in the runtime, which depends on every backend crate; the
//! backends crate only defines the trait.)

use kiln_backends::{BACKEND_NAMES, Backend, BackendError};

/// The backend called `name`, or an error saying it is unknown or not available yet.
pub fn backend_by_name(name: &str) -> Result<Box<dyn Backend>, BackendError> {
    match name {
        "reference" => Ok(Box::new(kiln_backends::reference::ReferenceBackend::new())),
        "ptx" => Ok(Box::new(kiln_ptx::PtxBackend::from_env())),
        "cpu" => Ok(Box::new(kiln_cpu::CpuBackend::new())),
        "wgpu" => Ok(Box::new(kiln_wgpu::WgpuBackend::new())),
        "metal" => Ok(Box::new(kiln_metal::MetalBackend::new())),
        "fixed" => Ok(Box::new(kiln_fixed::FixedBackend::new())),
        _ => match BACKEND_NAMES.iter().find(|(n, _)| *n == name) {
            Some((n, what)) => Err(BackendError::NotAvailable { name: n, what }),
            None => Err(BackendError::UnknownBackend {
                name: name.to_string(),
                known: BACKEND_NAMES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", "),
            }),
        },
    }
}

/// Whether backend `name` can run on this machine with this build of kiln (a build that
/// lists several backends runs on the first available one). Metal needs an Apple target
/// and the `metal` feature; the others run everywhere (or say why not when prepared).
pub fn available_here(name: &str) -> bool {
    match name {
        "metal" => cfg!(all(feature = "metal", target_vendor = "apple")),
        _ => backend_by_name(name).is_ok(),
    }
}
