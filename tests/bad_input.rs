//! Bad input gets a clear error naming the file and the problem, a nonzero exit,
//! no panic, and no partial build left behind.

mod common;

use common::*;

fn assert_clean_error(o: &std::process::Output, must_contain: &[&str]) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, got success; stderr: {err}");
    assert_eq!(o.status.code(), Some(1), "exit code; stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(err.starts_with("error: "), "error line: {err}");
    for s in must_contain {
        assert!(err.contains(s), "stderr should contain {s:?}: {err}");
    }
}

#[test]
fn truncated_and_corrupted_gguf() {
    let Some(src) = smollm2() else { return };
    let bytes = std::fs::read(&src).unwrap();
    let dir = tempdir("bad-gguf");
    // Cut inside the header, the metadata, the tensor infos and the data.
    for (cut, what) in [
        (3usize, "truncated"),
        (20, "truncated"),
        (5000, "claims 49152 entries"),
        (1_700_000, "truncated"),
        (bytes.len() - 100, "lies past the end of the file"),
    ] {
        let p = dir.join(format!("cut{cut}.gguf"));
        write(&p, &bytes[..cut]);
        let o = run(&["ir", "dump", p.to_str().unwrap()]);
        assert_clean_error(&o, &[p.to_str().unwrap(), what]);
    }
    let mut bad = bytes[..4096].to_vec();
    bad[..4].copy_from_slice(b"GGUX");
    let p = dir.join("magic.gguf");
    write(&p, &bad);
    assert_clean_error(
        &run(&["run", p.to_str().unwrap(), "--prompt", "hi"]),
        &[p.to_str().unwrap(), "not a GGUF file"],
    );
    // A huge metadata count in a 32-byte file must not allocate or hang.
    let mut tiny = b"GGUF".to_vec();
    tiny.extend(3u32.to_le_bytes());
    tiny.extend(0u64.to_le_bytes());
    tiny.extend(u64::MAX.to_le_bytes());
    tiny.extend([0u8; 8]);
    let p = dir.join("huge-count.gguf");
    write(&p, &tiny);
    assert_clean_error(&run(&["ir", "dump", p.to_str().unwrap()]), &[p.to_str().unwrap()]);
}

#[test]
fn pickle_checkpoints_are_refused() {
    let dir = tempdir("pickle");
    let p = dir.join("pytorch_model.bin");
    write(&p, b"\x80\x02not really a pickle");
    assert_clean_error(&run(&["ir", "dump", p.to_str().unwrap()]), &["safetensors"]);
}

#[test]
fn broken_hf_directories() {
    let dir = tempdir("hf");
    // config.json missing
    let d = dir.join("noconfig");
    std::fs::create_dir_all(&d).unwrap();
    assert_clean_error(&run(&["ir", "dump", d.to_str().unwrap()]), &["config.json"]);
    // config.json not JSON
    let d = dir.join("badjson");
    std::fs::create_dir_all(&d).unwrap();
    write(&d.join("config.json"), b"{\"model_type\": \"llama\", ");
    assert_clean_error(&run(&["ir", "dump", d.to_str().unwrap()]), &["config.json"]);
    // unsupported architecture
    let d = dir.join("arch");
    std::fs::create_dir_all(&d).unwrap();
    write(&d.join("config.json"), br#"{"model_type": "mamba"}"#);
    assert_clean_error(&run(&["ir", "dump", d.to_str().unwrap()]), &["config.json", "mamba"]);
    // truncated safetensors
    let d = dir.join("st");
    std::fs::create_dir_all(&d).unwrap();
    write(
        &d.join("config.json"),
        br#"{"model_type":"llama","num_hidden_layers":1,"hidden_size":64,"intermediate_size":128,"num_attention_heads":4,"vocab_size":100}"#,
    );
    write(&d.join("tokenizer.json"), b"{}");
    let header = br#"{"model.embed_tokens.weight":{"dtype":"F32","shape":[100,64],"data_offsets":[0,25600]}}"#;
    let mut st = (header.len() as u64).to_le_bytes().to_vec();
    st.extend_from_slice(header);
    st.extend(vec![0u8; 100]);
    write(&d.join("model.safetensors"), &st);
    assert_clean_error(&run(&["ir", "dump", d.to_str().unwrap()]), &["model.safetensors"]);
}

fn recipe_case(name: &str, text: &str, expect: &[&str]) {
    let dir = tempdir(&format!("recipe-{name}"));
    let r = dir.join(format!("{name}.yaml"));
    write(&r, text.as_bytes());
    let out = dir.join("build");
    let o = run(&["compile", "--recipe", r.to_str().unwrap(), "--device", "laptop", "--out", out.to_str().unwrap()]);
    let mut want = vec![r.to_str().unwrap()];
    want.extend_from_slice(expect);
    assert_clean_error(&o, &want);
    assert!(
        !out.exists() || std::fs::read_dir(&out).unwrap().next().is_none(),
        "partial build left in {}",
        out.display()
    );
}

#[test]
fn bad_recipes() {
    recipe_case("syntax", "name: x\nmodel: [unclosed\n", &["invalid recipe"]);
    recipe_case("unknown-field", "name: x\nmodel: m\nmodle: y\ndevices: {laptop: {backend: reference}}\n", &["modle"]);
    recipe_case(
        "device",
        "name: x\nmodel: m\ndevices: {toaster: {backend: reference}}\n",
        &["unknown device `toaster`"],
    );
    recipe_case("backend", "name: x\nmodel: m\ndevices: {laptop: {backend: tpu}}\n", &["unknown backend `tpu`"]);
    recipe_case(
        "pass",
        "name: x\nmodel: m\ndevices: {laptop: {backend: reference, passes: [quantise]}}\n",
        &["unknown pass `quantise`"],
    );
    recipe_case(
        "no-model",
        "name: x\nmodel: nothing-here.gguf\ndevices: {laptop: {backend: reference}}\n",
        &["nothing-here.gguf"],
    );
    recipe_case("no-device", "name: x\nmodel: m\ndevices: {phone: {backend: reference}}\n", &["no `laptop` device"]);
    recipe_case(
        "pass-options",
        "name: x\nmodel: m\ndevices: {laptop: {backend: reference, passes: [{dce: {x: 1}, y: 2}]}}\n",
        &["pass entry"],
    );
}

#[test]
fn corrupt_model_leaves_no_build() {
    let Some(src) = smollm2() else { return };
    let dir = tempdir("corrupt-build");
    let bytes = std::fs::read(&src).unwrap();
    let model = dir.join("cut.gguf");
    write(&model, &bytes[..bytes.len() / 2]);
    let r = dir.join("r.yaml");
    write(&r, b"name: cut\nmodel: cut.gguf\ndevices: {laptop: {backend: reference}}\n");
    let out = dir.join("build");
    let o = run(&["compile", "--recipe", r.to_str().unwrap(), "--device", "laptop", "--out", out.to_str().unwrap()]);
    assert_clean_error(&o, &["cut.gguf", "lies past the end of the file"]);
    assert!(!out.join("cut").join("laptop").exists(), "partial build left behind");
    let leftovers: Vec<_> =
        std::fs::read_dir(out.join("cut")).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn op_a_backend_lacks_is_named() {
    let Some(model) = smollm2() else { return };
    let dir = tempdir("unsupported-op");
    let out = dir.join("build");
    // A steering vector is an op the fixed-point backend does not run.
    let r = dir.join("steerwatch.yaml");
    let vector = root().join("recipes/steer/verbosity/verbosity.safetensors");
    write(
        &r,
        format!(
            "name: steerwatch\nmodel: {}\ndevices:\n  watch:\n    backend: fixed\n    passes: [dce, {{steer: {{vector: {}, layers: 10..12, strength: -4.0, mode: add, name: verbosity}}}}]\n",
            model.display(),
            vector.display()
        )
        .as_bytes(),
    );
    let o = run(&["compile", "--recipe", r.to_str().unwrap(), "--device", "watch", "--out", out.to_str().unwrap()]);
    assert_clean_error(&o, &["steerwatch.yaml", "backend `fixed` does not support", "steer"]);
    assert!(!out.exists());
}

#[test]
fn killed_build_leaves_previous_build_intact() {
    let Some(_) = smollm2() else { return };
    let dir = tempdir("kill9");
    let out = dir.join("build");
    let recipe = root().join("recipes/smollm2-135m.yaml");
    let args = ["compile", "--recipe", recipe.to_str().unwrap(), "--device", "laptop", "--out", out.to_str().unwrap()];
    assert!(run(&args).status.success());
    let build = out.join("smollm2-135m").join("laptop");
    let manifest = std::fs::read(build.join("manifest.json")).unwrap();
    // Kill -9 a rebuild at several points of its run; the previous build must stay whole.
    for delay_ms in [50u64, 300, 800, 1500] {
        let mut child = kiln().args(args).spawn().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        // The swap is one atomic exchange, so the build path always holds a whole build.
        assert!(build.exists(), "build vanished after kill at {delay_ms} ms");
        assert_eq!(std::fs::read(build.join("manifest.json")).unwrap(), manifest);
        let o = run(&["run", build.to_str().unwrap(), "--prompt", "Hi", "-n", "1"]);
        assert!(o.status.success(), "after kill at {delay_ms} ms: {}", stderr(&o));
    }
    // The next build cleans what killed builds left and completes.
    assert!(run(&args).status.success());
    let names: Vec<String> = std::fs::read_dir(out.join("smollm2-135m"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["laptop"], "leftovers after a clean rebuild");
}
