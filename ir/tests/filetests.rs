//! Filetests: each `tests/filetests/*.kir` starts with `; expect: ok` or `; expect: <exact error>`;
//! the file is parsed and verified and the outcome compared. Line numbers count from the
//! first line of the file (the expect line is a comment, so it is line 1).

use std::path::Path;

#[test]
fn filetests() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/filetests");
    let mut n = 0;
    let mut failures = vec![];
    let mut entries: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for path in entries {
        if path.extension().and_then(|e| e.to_str()) != Some("kir") {
            continue;
        }
        n += 1;
        let text = std::fs::read_to_string(&path).unwrap();
        let first = text.lines().next().unwrap_or("");
        let expect = first.strip_prefix("; expect: ").expect("first line must be `; expect: ...`");
        let got = match kiln_ir::parse(&text).and_then(kiln_ir::verify) {
            Ok(m) => {
                // valid modules must also round-trip
                let printed = kiln_ir::print(&m);
                assert_eq!(kiln_ir::print(&kiln_ir::parse(&printed).unwrap()), printed);
                "ok".to_string()
            }
            Err(e) => e.to_string(),
        };
        if got != expect {
            failures.push(format!("{}:\n  expected: {expect}\n  got:      {got}", path.display()));
        }
    }
    assert!(n >= 10, "found only {n} filetests");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
