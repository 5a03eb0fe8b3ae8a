//! Chat prompts: renders a model's Jinja chat template (GGUF `tokenizer.chat_template` or
//! Hugging Face `chat_template`) with minijinja, the way `transformers` does.
//!
//! The environment matches Hugging Face's: `trim_blocks` and `lstrip_blocks` on, Python
//! string methods (`strip`, `startswith`, ...) through minijinja-contrib's pycompat layer,
//! `raise_exception(msg)` failing the render with `msg`, and no loader, so templates cannot
//! read files. Variables: `messages`, `add_generation_prompt`, `bos_token`, `eos_token`.

use minijinja::{Environment, Error as JinjaError, ErrorKind, Value, syntax::SyntaxConfig};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// Errors from compiling or rendering a chat template; each names the template's origin.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The template does not parse.
    #[error("{origin}: chat template does not compile: {detail}")]
    Syntax {
        /// Where the template came from.
        origin: String,
        /// Parser message, with line information.
        detail: String,
    },
    /// The template called `raise_exception`.
    #[error("{origin}: chat template rejected the conversation: {message}")]
    Raised {
        /// Where the template came from.
        origin: String,
        /// The template's message.
        message: String,
    },
    /// Rendering failed for another reason.
    #[error("{origin}: chat template failed to render: {detail}")]
    Render {
        /// Where the template came from.
        origin: String,
        /// Renderer message, with line information.
        detail: String,
    },
}

const TEMPLATE_NAME: &str = "chat_template";
const RAISED_PREFIX: &str = "raise_exception: ";

/// A compiled chat template plus the special-token strings it may reference.
pub struct ChatTemplate {
    env: Environment<'static>,
    origin: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

fn describe(err: &JinjaError) -> String {
    let mut s = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(e) = source {
        s.push_str(": ");
        s.push_str(&e.to_string());
        source = e.source();
    }
    s
}

fn raise_exception(message: String) -> Result<Value, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, format!("{RAISED_PREFIX}{message}")))
}

impl ChatTemplate {
    /// Compiles `source`; `origin` names it in errors (e.g. `"model.gguf: tokenizer.chat_template"`).
    pub fn new(
        source: &str,
        origin: impl Into<String>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self, ChatError> {
        let origin = origin.into();
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()
            .map_err(|e| ChatError::Syntax { origin: origin.clone(), detail: describe(&e) })?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| ChatError::Syntax { origin: origin.clone(), detail: describe(&e) })?;
        Ok(Self { env, origin, bos_token: bos_token.into(), eos_token: eos_token.into() })
    }

    /// Renders the conversation; `add_generation_prompt` appends the assistant turn opener.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, ChatError> {
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from_pairs([
                    ("role", Value::from(m.role.as_str())),
                    ("content", Value::from(m.content.as_str())),
                ])
            })
            .collect();
        let ctx = Value::from_pairs([
            ("messages", Value::from(messages)),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            ("bos_token", Value::from(self.bos_token.as_str())),
            ("eos_token", Value::from(self.eos_token.as_str())),
        ]);
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ChatError::Render { origin: self.origin.clone(), detail: describe(&e) })?;
        template.render(ctx).map_err(|e| {
            let raised = std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source()).find_map(|e| {
                let text = e.to_string();
                text.find(RAISED_PREFIX).map(|p| text[p + RAISED_PREFIX.len()..].to_string())
            });
            match raised {
                Some(message) => {
                    // Drop minijinja's trailing location suffix, keep the template's words.
                    let message = message.split(" (in ").next().unwrap_or_default().to_string();
                    ChatError::Raised { origin: self.origin.clone(), message }
                }
                None => ChatError::Render { origin: self.origin.clone(), detail: describe(&e) },
            }
        })
    }

    /// Where the template came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }
}

/// Compiles and renders in one step with `add_generation_prompt = true`.
pub fn render_chat(
    source: &str,
    origin: &str,
    messages: &[ChatMessage],
    bos_token: &str,
    eos_token: &str,
) -> Result<String, ChatError> {
    ChatTemplate::new(source, origin, bos_token, eos_token)?.render(messages, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_with_python_methods_and_variables() {
        let t = ChatTemplate::new(
            "{{ bos_token }}{% for m in messages %}{{ m.role.upper() }}:{{ m['content'].strip() }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}",
            "inline",
            "<s>",
            "</s>",
        )
        .unwrap();
        let out = t.render(&[ChatMessage::new("user", "  hi  ")], true).unwrap();
        assert_eq!(out, "<s>USER:hi\nA:");
    }

    #[test]
    fn raise_exception_is_a_clean_error() {
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", "inline", "", "").unwrap();
        match t.render(&[], true) {
            Err(ChatError::Raised { message, origin }) => {
                assert_eq!(message, "roles must alternate");
                assert_eq!(origin, "inline");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn syntax_and_render_errors_name_origin() {
        let e = ChatTemplate::new("{% for %}", "model.gguf", "", "").unwrap_err().to_string();
        assert!(e.contains("model.gguf") && e.contains("compile"), "{e}");
        let t = ChatTemplate::new("{% include 'x.html' %}", "model.gguf", "", "").unwrap();
        let e = t.render(&[], true).unwrap_err().to_string();
        assert!(e.contains("model.gguf"), "{e}");
        let t = ChatTemplate::new("{{ messages[0].content + 1 }}", "m", "", "").unwrap();
        assert!(matches!(t.render(&[ChatMessage::new("u", "x")], true), Err(ChatError::Render { .. })));
    }
}
