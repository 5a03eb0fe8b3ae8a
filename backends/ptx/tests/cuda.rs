//! The common differential test body on a real NVIDIA GPU through the CUDA
//! driver (feature `cuda`). Without a driver or GPU it skips with a printed
//! reason, or fails under `KILN_REQUIRE_GPU=1`.

#![cfg(feature = "cuda")]

use kiln_ptx::{PtxBackend, Target, cuda};

#[test]
fn ptx_kernels_on_the_gpu_match_the_reference() {
    if !cuda::driver_present() {
        let msg = "no CUDA driver on this machine: the GPU differential test did not run";
        if std::env::var("KILN_REQUIRE_GPU").as_deref() == Ok("1") {
            panic!("{msg}");
        }
        eprintln!("SKIPPED: {msg}");
        return;
    }
    kiln_backends::conformance::check_backend(&PtxBackend { target: Target::Cuda });
}
