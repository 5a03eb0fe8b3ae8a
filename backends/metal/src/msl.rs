//! MSL from the wgpu backend's kernels: each WGSL kernel is parsed and validated by naga
//! (the same module the wgpu backend runs), then printed by naga's MSL back end, so a
//! fused kernel is written once and its math is checked on lavapipe through wgpu.
//!
//! Buffer slots: the `Params` uniform is `[[buffer(0)]]`, argument `i` of the kernel is
//! `[[buffer(i + 1)]]` (the WGSL binding numbers), the buffers' sizes `[[buffer(30)]]`. Indexing is unchecked, like the PTX
//! kernels: the launch sequence keeps every index inside its buffer.

use kiln_wgpu::kernels::Kernel;
use naga::back::msl;

/// Slot of the `u32` byte sizes of the bound storage buffers, in argument order (naga's
/// `_buffer_sizes`; the runtime sets it with each launch).
pub const SIZES_BUFFER: msl::Slot = 30;

/// Metal Shading Language version the kernels are printed for (Apple GPUs since 2020).
pub const LANG_VERSION: (u8, u8) = (2, 4);

/// The MSL source of `kernel` and the name of its entry point (naga renames `main`).
pub fn kernel_msl(kernel: &Kernel) -> Result<(String, String), String> {
    let src = kernel.source();
    let module =
        naga::front::wgsl::parse_str(&src).map_err(|e| format!("{}: {}", kernel.name, e.emit_to_string(&src)))?;
    let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::empty())
        .validate(&module)
        .map_err(|e| format!("{}: {}", kernel.name, e.emit_to_string(&src)))?;
    let mut resources = msl::BindingMap::default();
    let mut bind = |binding: u32, mutable: bool| {
        resources.insert(
            naga::ResourceBinding { group: 0, binding },
            msl::BindTarget { buffer: Some(binding as msl::Slot), mutable, ..Default::default() },
        );
    };
    bind(0, false);
    for (i, (_, a)) in kernel.args.iter().enumerate() {
        if a.is_buffer() {
            bind(Kernel::binding(i), matches!(a, kiln_wgpu::kernels::Arg::Out | kiln_wgpu::kernels::Arg::OutWords));
        }
    }
    let mut per_entry_point_map = msl::EntryPointResourceMap::default();
    per_entry_point_map.insert(
        "main".to_string(),
        msl::EntryPointResources { resources, sizes_buffer: Some(SIZES_BUFFER), ..Default::default() },
    );
    let options = msl::Options {
        lang_version: LANG_VERSION,
        per_entry_point_map,
        fake_missing_bindings: false,
        bounds_check_policies: naga::proc::BoundsCheckPolicies {
            index: naga::proc::BoundsCheckPolicy::Unchecked,
            buffer: naga::proc::BoundsCheckPolicy::Unchecked,
            image_load: naga::proc::BoundsCheckPolicy::Unchecked,
            binding_array: naga::proc::BoundsCheckPolicy::Unchecked,
        },
        zero_initialize_workgroup_memory: false,
        force_loop_bounding: false,
        emit_int_div_checks: false,
        ..Default::default()
    };
    let pipeline = msl::PipelineOptions {
        entry_point: Some((naga::ShaderStage::Compute, "main".to_string())),
        ..Default::default()
    };
    let (text, tinfo) =
        msl::write_string(&module, &info, &options, &pipeline).map_err(|e| format!("{}: MSL: {e}", kernel.name))?;
    let entry = tinfo
        .entry_point_names
        .into_iter()
        .next()
        .ok_or_else(|| format!("{}: no entry point", kernel.name))?
        .map_err(|e| format!("{}: MSL entry point: {e}", kernel.name))?;
    Ok((format!("// kiln kernel `{}` (from {}.wgsl by naga)\n{text}", kernel.name, kernel.name), entry))
}
