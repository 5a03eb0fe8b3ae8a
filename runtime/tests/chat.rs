//! Chat template tests: SmolLM2, Qwen2.5 and Gemma 3 templates rendered by kiln must equal
//! Python jinja2's output under transformers' settings (`fixtures/chat_expected.json`).

use kiln_runtime::chat::{ChatError, ChatMessage, ChatTemplate};
use serde_json::Value;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn messages(v: &Value) -> Vec<ChatMessage> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect()
}

#[test]
fn templates_match_python_jinja2() {
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("chat_expected.json")).unwrap()).unwrap();
    let mut checked = 0;
    for case in expected["cases"].as_array().unwrap() {
        let file = case["template"].as_str().unwrap();
        let source = std::fs::read_to_string(fixtures().join(file)).unwrap();
        let tpl =
            ChatTemplate::new(&source, file, case["bos_token"].as_str().unwrap(), case["eos_token"].as_str().unwrap())
                .unwrap();
        let conv = case["conversation"].as_str().unwrap();
        let msgs = messages(&expected["conversations"][conv]);
        let agp = case["add_generation_prompt"].as_bool().unwrap();
        let got = tpl.render(&msgs, agp);
        match (case["text"].as_str(), case["error"].as_str(), got) {
            (Some(want), _, Ok(text)) => assert_eq!(text, want, "{file} / {conv} / agp={agp}"),
            (_, Some(want), Err(ChatError::Raised { message, origin })) => {
                assert_eq!(message, want, "{file} / {conv}");
                assert_eq!(origin, file);
            }
            (_, _, other) => panic!("{file} / {conv} / agp={agp}: unexpected {other:?}"),
        }
        checked += 1;
    }
    assert_eq!(checked, 24);
}
