//! Every kernel kiln has prints as MSL from a naga-validated module, with the buffer slots
//! the runtime binds (`[[buffer(0)]]` the parameters, `[[buffer(i + 1)]]` argument i).

use kiln_wgpu::kernels::{Kernel, ROW_PER_THREAD};

#[test]
fn every_kernel_prints_as_msl_with_its_buffer_slots() {
    let mut n = 0;
    for k in kiln_wgpu::lower::all_kernels().into_iter().filter(|k| !k.name.ends_with(ROW_PER_THREAD)) {
        let (msl, entry) = kiln_metal::msl::kernel_msl(&k).unwrap_or_else(|e| panic!("{e}"));
        assert!(msl.contains(&format!("kernel void {entry}(")), "{}: no entry point `{entry}`:\n{msl}", k.name);
        assert!(msl.contains("[[buffer(0)]]"), "{}: parameters not at buffer 0", k.name);
        for (i, (name, a)) in k.args.iter().enumerate() {
            if a.is_buffer() {
                let slot = format!("[[buffer({})]]", Kernel::binding(i));
                assert!(msl.contains(&slot), "{}: `{name}` not at {slot}:\n{msl}", k.name);
            }
        }
        assert!(
            msl.contains("[[threadgroup_position_in_grid]]") || msl.contains("threadgroup_position_in_grid"),
            "{}",
            k.name
        );
        n += 1;
    }
    assert!(n > 40, "only {n} kernels");
}

#[test]
#[ignore = "prints one kernel's MSL for inspection"]
fn print_rms_norm() {
    let k = kiln_wgpu::kernels::rms_norm(true);
    println!("{}", kiln_metal::msl::kernel_msl(&k).unwrap().0);
}
