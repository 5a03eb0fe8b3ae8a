//! The common differential test body (`kiln_backends::conformance`) on the wgpu backend,
//! run for real on whatever adapter wgpu finds (Mesa's lavapipe in CI).
//!
//! Without an adapter the test is skipped with a message, unless `KILN_REQUIRE_WGPU=1`
//! (set by `cargo xtask test`, so CI cannot pass without running it).

use kiln_backends::conformance;
use kiln_ir::DType;
use kiln_wgpu::WgpuBackend;

fn adapter() -> bool {
    match kiln_wgpu::device::open_device() {
        Ok((_, _, info)) => {
            eprintln!("wgpu adapter: {} ({:?})", info.name, info.backend);
            true
        }
        Err(e) => {
            assert!(std::env::var("KILN_REQUIRE_WGPU").as_deref() != Ok("1"), "KILN_REQUIRE_WGPU=1 but {e}");
            eprintln!("skipped: {e}");
            false
        }
    }
}

#[test]
fn wgpu_kernels_match_the_reference() {
    if !adapter() {
        return;
    }
    // Weight layouts the backend has no decoder for yet: their matmul cases must be
    // refused as unsupported (never wrong), and every other case must pass.
    let missing: Vec<DType> = DType::floats().filter(|d| !kiln_wgpu::formats::supported(*d)).collect();
    let outcomes = conformance::run_cases(&WgpuBackend, conformance::cases());
    let mut report = String::new();
    let mut ok = true;
    for o in &outcomes {
        let gap = missing.iter().any(|d| o.name.split([' ', ',']).any(|w| w == d.name()))
            && matches!(&o.result, Err(e) if e.starts_with("unsupported"));
        let pass = o.passed() || gap;
        ok &= pass;
        let line = match &o.result {
            Ok(e) => {
                format!("{:<70} rel err {e:.2e} (budget {:.0e}){}", o.name, o.budget, if pass { "" } else { "  FAIL" })
            }
            Err(e) if pass => format!("{:<70} not yet: {e}", o.name),
            Err(e) => format!("{:<70} FAIL: {e}", o.name),
        };
        report += &line;
        report += "\n";
    }
    eprintln!("differential test of backend `wgpu`:\n{report}");
    assert!(ok, "backend `wgpu` failed the differential test:\n{report}");
}
