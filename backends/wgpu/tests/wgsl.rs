//! Every WGSL kernel the backend can emit parses and validates with naga.

#[test]
fn every_kernel_validates_with_naga() {
    let mut bad = Vec::new();
    for k in kiln_wgpu::lower::all_kernels() {
        if let Err(e) = kiln_wgpu::lower::validate(&k.name, &k.source()) {
            bad.push(e);
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n\n"));
}
