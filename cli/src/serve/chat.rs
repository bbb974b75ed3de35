//! Chat prompts: the model folder's own chat template (Hugging Face's Jinja
//! `chat_template`, from `chat_template.jinja` or `tokenizer_config.json`), rendered with
//! minijinja as transformers' `apply_chat_template(..., add_generation_prompt=True)` renders
//! it; the documented plain template for models without one.

use std::path::Path;

use anyhow::{Context, Result};
use minijinja::{Environment, ErrorKind, Value};
use serde::Serialize;
use serde_json::Value as Json;

use super::api::ChatMessage;

/// How a model turns chat messages into its prompt.
pub enum ChatTemplate {
    /// `{role}: {content}\n` per message, then `assistant:`.
    Plain,
    /// The model's Jinja template, with the special tokens it refers to.
    Jinja {
        env: Box<Environment<'static>>,
        bos_token: String,
        eos_token: String,
    },
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'a str,
    content: &'a str,
}

impl ChatTemplate {
    /// The template of the model folder `dir` (`chat_template.jinja`, else
    /// `tokenizer_config.json`'s `chat_template`; of a list of named templates, `default`),
    /// or `Plain` when it has none.
    pub fn load(dir: &Path) -> Result<Self> {
        let config: Json = match std::fs::read_to_string(dir.join("tokenizer_config.json")) {
            Ok(s) => serde_json::from_str(&s).context("tokenizer_config.json is not JSON")?,
            Err(_) => Json::Null,
        };
        let source = match std::fs::read_to_string(dir.join("chat_template.jinja")) {
            Ok(s) => Some(s),
            Err(_) => match &config["chat_template"] {
                Json::String(s) => Some(s.clone()),
                Json::Array(named) => named
                    .iter()
                    .find(|t| t["name"] == "default")
                    .and_then(|t| t["template"].as_str())
                    .map(str::to_string),
                _ => None,
            },
        };
        let Some(source) = source else {
            return Ok(Self::Plain);
        };
        // A special token is a string or an AddedToken object ({"content": ...}).
        let token = |name: &str| match &config[name] {
            Json::String(s) => s.clone(),
            v => v["content"].as_str().unwrap_or("").to_string(),
        };
        Ok(Self::Jinja {
            env: Box::new(environment(source).context("the model's chat template")?),
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
        })
    }

    /// The prompt for `messages`, ending where the assistant's reply begins.
    pub fn render(&self, messages: &[ChatMessage]) -> std::result::Result<String, String> {
        match self {
            Self::Plain => Ok(super::api::plain_chat_prompt(messages)),
            Self::Jinja {
                env,
                bos_token,
                eos_token,
            } => {
                let messages: Vec<Message> = messages
                    .iter()
                    .map(|m| Message {
                        role: &m.role,
                        content: &m.content,
                    })
                    .collect();
                let t = env.get_template("chat").map_err(|e| e.to_string())?;
                t.render(minijinja::context! {
                    messages => messages,
                    add_generation_prompt => true,
                    bos_token => bos_token,
                    eos_token => eos_token,
                })
                .map_err(|e| match e.kind() {
                    // The template's own refusal, e.g. "Conversation roles must alternate".
                    ErrorKind::InvalidOperation => e.detail().unwrap_or("").to_string(),
                    _ => format!("the chat template failed: {e}"),
                })
            }
        }
    }

    pub fn is_plain(&self) -> bool {
        matches!(self, Self::Plain)
    }
}

/// A minijinja environment with `source` as template "chat", and what HF templates expect
/// of Jinja2: Python string and dict methods, `raise_exception`, whitespace as Jinja2 trims
/// it (transformers renders with `trim_blocks` and `lstrip_blocks`).
fn environment(source: String) -> Result<Environment<'static>> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<Value, _> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_template_owned("chat", source)?;
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn hf_templates_render_as_transformers_renders_them() {
        // Expected strings: transformers 5.24 `apply_chat_template(messages, tokenize=False,
        // add_generation_prompt=True)` on these templates (tests/py/chat_templates.py).
        let dir = tempfile::tempdir().unwrap();
        let chatml = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            serde_json::json!({"chat_template": chatml, "eos_token": {"content": "<|im_end|>"}})
                .to_string(),
        )
        .unwrap();
        let t = ChatTemplate::load(dir.path()).unwrap();
        let m = [msg("system", "Be brief."), msg("user", "Who is Macbeth?")];
        assert_eq!(
            t.render(&m).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWho is Macbeth?<|im_end|>\n<|im_start|>assistant\n"
        );
        // A LLaMA-2-style template: bos_token, .strip(), raise_exception; a file beside it
        // (chat_template.jinja) takes precedence over the config.
        let llama = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'].strip() + ' [/INST]' }}{% else %}{{ ' ' + message['content'].strip() + eos_token }}{% endif %}{% endfor %}";
        std::fs::write(dir.path().join("chat_template.jinja"), llama).unwrap();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"bos_token": "<s>", "eos_token": "</s>"}"#,
        )
        .unwrap();
        let t = ChatTemplate::load(dir.path()).unwrap();
        let m = [
            msg("user", " Hi "),
            msg("assistant", "Hail."),
            msg("user", "Why?"),
        ];
        assert_eq!(
            t.render(&m).unwrap(),
            "<s>[INST] Hi [/INST] Hail.</s>[INST] Why? [/INST]"
        );
        let e = t.render(&[msg("assistant", "x")]).unwrap_err();
        assert_eq!(
            e,
            "Conversation roles must alternate user/assistant/user/assistant/..."
        );
        assert!(
            ChatTemplate::load(&dir.path().join("none"))
                .unwrap()
                .is_plain()
        );
    }
}
