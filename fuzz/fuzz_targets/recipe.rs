//! Fuzz target: recipe YAML (parse + checks of devices, backends, passes and options)
//! gives an error naming the recipe, never a panic.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use kiln::recipe::LoadedRecipe;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    let p = PATH.get_or_init(|| kiln_fuzz::fresh_dir("recipe").join("recipe.yaml"));
    std::fs::write(p, data).unwrap();
    if let Ok(r) = LoadedRecipe::load(p) {
        for d in r.recipe.devices.keys() {
            let _ = r.device(d);
        }
    }
});
