//! Builds: `kiln compile` of the default recipe is byte-identical across runs,
//! runs and generates sensible text, and a tampered or truncated build is refused.

mod common;

use std::path::Path;

use common::*;

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect();
    v.sort();
    v
}

#[test]
fn default_recipe_builds_reproducibly_and_runs() {
    if smollm2().is_none() {
        return;
    }
    let dir = tempdir("builds");
    let recipe = root().join("recipes/smollm2-135m.yaml");
    let mut outs = vec![];
    for i in 0..2 {
        let out = dir.join(format!("out{i}"));
        let o = run(&[
            "compile",
            "--recipe",
            recipe.to_str().unwrap(),
            "--device",
            "laptop",
            "--out",
            out.to_str().unwrap(),
            "--json",
        ]);
        assert!(o.status.success(), "compile failed: {}", stderr(&o));
        let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("compile --json prints JSON");
        assert_eq!(v["builds"][0]["device"], "laptop");
        outs.push(out.join("smollm2-135m").join("laptop"));
    }
    let (a, b) = (files(&outs[0]), files(&outs[1]));
    // The laptop build runs on Metal on a Mac and on the CPU backend elsewhere: it carries
    // the Metal kernels (MSL and their manifest) beside the IR and weights.
    assert_eq!(
        a.iter().map(|f| &f.0).filter(|n| !n.ends_with(".metal") && *n != "metal.json").collect::<Vec<_>>(),
        ["chat_template.jinja", "manifest.json", "model.kir", "tokenizer.json", "tokenizer.kiln.json", "weights.bin"]
    );
    assert!(a.iter().any(|f| f.0 == "metal.json") && a.iter().any(|f| f.0 == "matmul_q4_1.metal"));
    for (fa, fb) in a.iter().zip(&b) {
        assert!(fa == fb, "{} differs between two builds", fa.0);
    }
    // Rebuilding into an existing directory replaces it atomically.
    let o = run(&[
        "compile",
        "--recipe",
        recipe.to_str().unwrap(),
        "--device",
        "laptop",
        "--out",
        dir.join("out0").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(files(&outs[0]), b);
    let manifest: serde_json::Value =
        serde_json::from_slice(&a.iter().find(|f| f.0 == "manifest.json").unwrap().1).unwrap();
    assert_eq!(manifest["recipe"]["name"], "smollm2-135m");
    assert_eq!(
        manifest["backends"],
        serde_json::json!(["metal", "cpu"]),
        "Metal on Apple targets, else the CPU backend"
    );
    assert_eq!(manifest["passes"][0]["pass"], "dce");
    assert_eq!(manifest["source"]["sha256"], "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53");

    let o = run(&["run", outs[0].to_str().unwrap(), "--prompt", "The capital of France is", "-n", "8", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let text = v["output"]["text"].as_str().unwrap();
    assert!(text.contains("Paris"), "generated: {text:?}");
    if !cfg!(target_vendor = "apple") {
        assert_eq!(v["backend"], "cpu", "off Apple targets the laptop build runs on the CPU backend");
    }

    // The build's tokenizer.json is a plain Hugging Face document other tools load.
    let tok = a.iter().find(|f| f.0 == "tokenizer.json").unwrap();
    let t = tokenizers::Tokenizer::from_bytes(&tok.1).expect("tokenizers loads the build's tokenizer.json");
    assert_eq!(t.encode("The capital of France is", false).unwrap().get_ids(), [504, 3575, 282, 4649, 314]);

    // Tampering with any byte of the weights is detected before running.
    let tampered = dir.join("tampered");
    std::fs::create_dir_all(&tampered).unwrap();
    for (name, bytes) in &a {
        std::fs::write(tampered.join(name), bytes).unwrap();
    }
    let mut w = a.iter().find(|f| f.0 == "weights.bin").unwrap().1.clone();
    w[1000] ^= 1;
    std::fs::write(tampered.join("weights.bin"), &w).unwrap();
    let o = run(&["run", tampered.to_str().unwrap(), "--prompt", "x"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("sha256 mismatch") && stderr(&o).contains("weights.bin"), "{}", stderr(&o));
    std::fs::write(tampered.join("weights.bin"), &w[..w.len() - 64]).unwrap();
    let o = run(&["run", tampered.to_str().unwrap(), "--prompt", "x"]);
    assert!(stderr(&o).contains("truncated or modified"), "{}", stderr(&o));
}

#[test]
fn ir_dump_of_smollm2_round_trips() {
    let Some(m) = smollm2() else { return };
    let o = run(&["ir", "dump", m.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    let module = kiln_ir::parse(&text).expect("dump parses");
    assert_eq!(kiln_ir::print(&module), text, "print(parse(dump)) differs from dump");
    let v = kiln_ir::verify(module).expect("dump verifies");
    assert_eq!(v.params.len(), 272);
    assert_eq!(v.meta_str("arch"), Some("llama"));
    // `kiln ir check` accepts it too.
    let dir = tempdir("irdump");
    let f = dir.join("smollm2.kir");
    std::fs::write(&f, &text).unwrap();
    let o = run(&["ir", "check", f.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    // And names the line and column of a hand-made mistake.
    let broken = text.replacen("%5 = matmul", "%5 = matmull", 1);
    std::fs::write(&f, broken).unwrap();
    let o = run(&["ir", "check", f.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("smollm2.kir: 285:6: unknown op `matmull`"), "{}", stderr(&o));
}

/// Every device of the default recipe (the laptop above; the GPU, phone and watch here,
/// with their kernels or C library) gives byte-identical builds twice.
#[test]
fn every_buildable_device_builds_reproducibly() {
    if smollm2().is_none() {
        return;
    }
    let dir = tempdir("builds-devices");
    let recipe = root().join("recipes/smollm2-135m.yaml");
    for device in ["gpu", "phone", "watch"] {
        let mut outs = vec![];
        for i in 0..2 {
            let out = dir.join(format!("{device}{i}"));
            let o = run(&[
                "compile",
                "--recipe",
                recipe.to_str().unwrap(),
                "--device",
                device,
                "--out",
                out.to_str().unwrap(),
            ]);
            assert!(o.status.success(), "{device}: {}", stderr(&o));
            outs.push(out.join("smollm2-135m").join(device));
        }
        if let [a, b] = &outs[..] {
            if device == "watch" {
                // The C weights are ~450 MB: the manifests' sha256 of every file stand for them.
                let (ma, mb) =
                    (std::fs::read(a.join("manifest.json")).unwrap(), std::fs::read(b.join("manifest.json")).unwrap());
                assert!(ma == mb, "watch: the two builds' manifests differ");
                assert!(String::from_utf8_lossy(&ma).contains("kiln_weights.c"), "watch: no C library");
                let _ = std::fs::remove_dir_all(dir.join("watch0"));
                let _ = std::fs::remove_dir_all(dir.join("watch1"));
                continue;
            }
            let (fa, fb) = (files(a), files(b));
            let kernels = if device == "gpu" { "kernels.ptx" } else { "matmul_q4_1.wgsl" };
            assert!(fa.iter().any(|f| f.0 == kernels), "{device}: no kernels");
            for (x, y) in fa.iter().zip(&fb) {
                assert!(x == y, "{device}: {} differs between two builds", x.0);
            }
        }
    }
}
