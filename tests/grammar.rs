//! Grammar-constrained decoding through the CLI (`kiln run --tools / --json-schema`): the
//! output is always a value the schema accepts, checked here independently of kiln's
//! matcher (serde_json plus the schema's own rules), on the CPU backend and on the
//! fixed-point (watch) backend; a tokenizer that cannot spell JSON gets a clear error.

mod common;

use common::*;
use serde_json::Value;

fn tools() -> Value {
    serde_json::from_slice(&std::fs::read(root().join("tests/fixtures/tools/watch-tools.json")).unwrap()).unwrap()
}

/// Checks `call` against the tool list: a known name, every required argument, no unknown
/// argument, each of the declared type (integers, strings within maxLength, enums).
fn check_call(call: &Value, tools: &Value) {
    let name = call["name"].as_str().expect("a name");
    let tool =
        tools.as_array().unwrap().iter().find(|t| t["name"] == name).unwrap_or_else(|| panic!("unknown tool {name}"));
    let params = &tool["parameters"];
    let args = call["arguments"].as_object().expect("arguments object");
    assert_eq!(call.as_object().unwrap().len(), 2, "{call}");
    for r in params["required"].as_array().unwrap() {
        assert!(args.contains_key(r.as_str().unwrap()), "{call}: missing {r}");
    }
    for (k, v) in args {
        let p = &params["properties"][k];
        assert!(!p.is_null(), "{call}: unknown argument {k}");
        match p["type"].as_str() {
            Some("integer") => assert!(v.is_i64(), "{call}: {k}"),
            Some("string") => {
                let s = v.as_str().unwrap_or_else(|| panic!("{call}: {k} not a string"));
                if let Some(m) = p["maxLength"].as_u64() {
                    assert!(s.chars().count() as u64 <= m, "{call}: {k} too long");
                }
            }
            _ => {}
        }
        if let Some(e) = p["enum"].as_array() {
            assert!(e.contains(v), "{call}: {k}={v} not in the enum");
        }
    }
}

fn run_tools(model: &str, backend: Option<&str>, request: &str) -> Value {
    let tools_file = root().join("tests/fixtures/tools/watch-tools.json");
    let prompt = format!("Reply with one JSON function call. Request: {request}");
    let mut args =
        vec!["run", model, "--chat", "-p", &prompt, "--tools", tools_file.to_str().unwrap(), "-n", "96", "--json"];
    if let Some(b) = backend {
        args.extend(["--backend", b]);
    }
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let doc: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(doc["output"]["stop_reason"], "complete", "{doc}");
    let text = doc["output"]["text"].as_str().unwrap();
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn function_calls_are_valid_on_cpu_and_on_the_watch_backend() {
    let Some(smol) = smollm2() else { return };
    let smol = smol.to_str().unwrap();
    let tools = tools();
    for (backend, request) in [
        (Some("cpu"), "Set a timer for 5 minutes for the tea."),
        (Some("cpu"), "Wake me up at 6:30 every weekday."),
        (Some("cpu"), "Tell Anna I will be late."),
        // The integer (watch) build's numerics, run by the fixed-point interpreter.
        (Some("fixed"), "Send a message to Anna saying I will be late."),
    ] {
        let call = run_tools(smol, backend, request);
        eprintln!("{backend:?} {request} -> {call}");
        check_call(&call, &tools);
    }
    // The watch numerics still pick the right tool and fill it from the request.
    let call = run_tools(smol, Some("fixed"), "Send a message to Anna saying I will be late.");
    assert_eq!(call["name"], "send_message", "{call}");
    assert!(call["arguments"]["to"].as_str().unwrap().contains("Anna"), "{call}");
}

#[test]
fn a_json_schema_constrains_plain_generation() {
    let Some(smol) = smollm2() else { return };
    let dir = tempdir("grammar-schema");
    let schema = dir.join("schema.json");
    write(
        &schema,
        br#"{"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}, "population_millions": {"type": "number"}, "capital": {"type": "boolean"}}, "required": ["city", "population_millions", "capital"]}"#,
    );
    let o = run(&[
        "run",
        smol.to_str().unwrap(),
        "--chat",
        "-p",
        "Describe Paris as JSON.",
        "--json-schema",
        schema.to_str().unwrap(),
        "-n",
        "64",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let doc: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let v: Value = serde_json::from_str(doc["output"]["text"].as_str().unwrap()).unwrap();
    let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), 3, "{v}");
    assert!(v["city"].is_string() && v["population_millions"].is_number() && v["capital"].is_boolean(), "{v}");
}

#[test]
fn bad_schemas_and_unspellable_grammars_are_clear_errors() {
    let dir = tempdir("grammar-bad");
    let schema = dir.join("bad.json");
    write(&schema, br#"{"type": "string", "pattern": "[a-z]+"}"#);
    let Some(smol) = smollm2() else { return };
    let o = run(&["run", smol.to_str().unwrap(), "-p", "x", "--json-schema", schema.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("bad.json") && stderr(&o).contains("`pattern`"), "{}", stderr(&o));
    // glassllm's alphabet has no ASCII double quote: no JSON string can be spelled.
    let Some(glass) = model("glassllm-en-hf") else { return };
    let tools_file = root().join("tests/fixtures/tools/watch-tools.json");
    let o = run(&["run", glass.to_str().unwrap(), "-p", "Set a timer.", "--tools", tools_file.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no token of the vocabulary continues the grammar"), "{}", stderr(&o));
}
