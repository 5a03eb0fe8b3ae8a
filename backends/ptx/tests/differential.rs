//! The common differential test body (`kiln_backends::conformance`), run on
//! the PTX backend's kernels in the SIMT emulator: the same kernels and launch
//! sequence the GPU runs, checked against the reference interpreter.

use kiln_ptx::{PtxBackend, Target};

#[test]
fn ptx_kernels_in_the_emulator_match_the_reference() {
    kiln_backends::conformance::check_backend(&PtxBackend { target: Target::Emulator });
}
