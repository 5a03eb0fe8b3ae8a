//! Fuzz target: the textual IR parser and verifier never panic; what parses re-prints identically.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data)
        && let Ok(m) = kiln_ir::parse(s)
    {
        let _ = kiln_ir::check(&m);
        let printed = kiln_ir::print(&m);
        let again = kiln_ir::parse(&printed).expect("printed IR parses");
        assert_eq!(kiln_ir::print(&again), printed);
    }
});
