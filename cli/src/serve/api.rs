//! The request bodies `stackwise serve` accepts and their checks: the original's `/generate`
//! and OpenAI's completions and chat completions. Every rejection names the field and, for a
//! limit, the numbers and the bound.

use serde::Deserialize;
use serde_json::{Value, json};
use stackwise_common::tokenizer::Tok;
use stackwise_worker::generate::SamplingConfig;

/// A rejected request: HTTP status, message and the field at fault (OpenAI's error shape).
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub param: Option<&'static str>,
}

impl ApiError {
    pub fn bad(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            param: Some(param),
        }
    }

    pub fn body(&self) -> Value {
        let kind = match self.status {
            404 => "not_found_error",
            429 => "rate_limit_error",
            s if s >= 500 => "server_error",
            _ => "invalid_request_error",
        };
        json!({"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}})
    }
}

/// Parse a JSON body: malformed JSON is a 400, a well-formed body of the wrong shape a 422,
/// each with serde's message (which names the field and the expected type).
pub fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError {
        status: if e.is_data() { 422 } else { 400 },
        message: format!("invalid request body: {e}"),
        param: None,
    })
}

/// `1234567` → `1,234,567`.
pub fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The server's token limits (`--max-input-tokens`, `--max-total-tokens`), each capped by the
/// model's context.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_input_tokens: usize,
    pub max_total_tokens: usize,
}

/// The original `/generate` body.
#[derive(Debug, Deserialize)]
pub struct GenerateBody {
    pub prompt: String,
    #[serde(default = "default_new_tokens")]
    pub max_new_tokens: usize,
    /// End of text is held back until this many tokens (as `stackwise generate`'s flag).
    #[serde(default)]
    pub min_new_tokens: usize,
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    pub top_p: Option<f64>,
    #[serde(default = "default_top_k")]
    pub top_k: usize,
    #[serde(default = "one")]
    pub repetition_penalty: f64,
    #[serde(default = "yes")]
    pub use_cache: bool,
    /// An adapter's name (`--adapter NAME=DIR`); none: the base.
    pub adapter: Option<String>,
    pub scaffold_weight: Option<f64>,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub stop: Vec<String>,
}

fn default_new_tokens() -> usize {
    100
}
fn default_temperature() -> f64 {
    0.8
}
fn default_top_k() -> usize {
    50
}
fn one() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}

/// A string or a list of strings (`prompt`, `stop`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The fields completions and chat completions share.
#[derive(Debug, Deserialize)]
pub struct OpenAiCommon {
    pub model: String,
    pub max_tokens: Option<usize>,
    /// The newer name of `max_tokens` in chat completions.
    pub max_completion_tokens: Option<usize>,
    #[serde(default = "one")]
    pub temperature: f64,
    pub top_p: Option<f64>,
    /// vLLM's: end of text is held back until this many tokens.
    #[serde(default)]
    pub min_tokens: usize,
    pub stop: Option<OneOrMany>,
    pub seed: Option<u64>,
    #[serde(default = "one_n")]
    pub n: usize,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// StackWise's own: a scaffold model's influence.
    pub scaffold_weight: Option<f64>,
}

fn one_n() -> usize {
    1
}

#[derive(Debug, Deserialize)]
pub struct CompletionBody {
    pub prompt: OneOrMany,
    #[serde(flatten)]
    pub common: OpenAiCommon,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Deserialize)]
pub struct ChatBody {
    pub messages: Vec<ChatMessage>,
    #[serde(flatten)]
    pub common: OpenAiCommon,
}

/// The plain chat template (models without one of their own): each message as
/// `{role}: {content}\n`, then `assistant:` for the reply.
pub fn plain_chat_prompt(messages: &[ChatMessage]) -> String {
    let mut s = String::new();
    for m in messages {
        s.push_str(&format!("{}: {}\n", m.role, m.content));
    }
    s.push_str("assistant:");
    s
}

/// What the sampling fields check to, with `max_tokens` resolved.
pub struct Sampling {
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub repetition_penalty: f64,
    pub max_tokens: usize,
    pub min_tokens: usize,
    pub seed: u64,
    pub use_cache: bool,
}

impl Sampling {
    pub fn check(&self) -> Result<(), ApiError> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(ApiError::bad(
                "temperature",
                format!("temperature must be >= 0, got {}", self.temperature),
            ));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(ApiError::bad(
                "top_p",
                format!("top_p must be in (0, 1], got {p}"),
            ));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(ApiError::bad(
                "repetition_penalty",
                "repetition_penalty must be > 0 (1 = off)",
            ));
        }
        if self.max_tokens == 0 {
            return Err(ApiError::bad("max_tokens", "max_tokens must be at least 1"));
        }
        if self.min_tokens > self.max_tokens {
            return Err(ApiError::bad(
                "min_tokens",
                format!(
                    "min_tokens ({}) must be <= max_tokens ({})",
                    self.min_tokens, self.max_tokens
                ),
            ));
        }
        Ok(())
    }

    pub fn config(&self, eos: Option<u32>, stop_on_repeat: Option<usize>) -> SamplingConfig {
        SamplingConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            no_repeat_ngram: None,
            stop_on_repeat_ngram: stop_on_repeat,
            min_new_tokens: self.min_tokens,
            max_new_tokens: self.max_tokens,
            seed: self.seed,
            use_cache: self.use_cache,
            eos_token_id: eos,
        }
    }
}

/// The prompt's ids, checked against the limits: `field` names it in errors.
pub fn encode_prompt(
    tok: &Tok,
    text: &str,
    max_tokens: usize,
    limits: Limits,
    field: &'static str,
) -> Result<Vec<u32>, ApiError> {
    if text.is_empty() {
        return Err(ApiError::bad(field, format!("{field} must not be empty")));
    }
    let ids = tok
        .encode(text, false)
        .map_err(|e| ApiError::bad(field, format!("{field} cannot be tokenized: {e}")))?;
    if ids.is_empty() {
        return Err(ApiError::bad(
            field,
            format!("{field} tokenizes to nothing; give some text"),
        ));
    }
    if ids.len() > limits.max_input_tokens {
        return Err(ApiError::bad(
            field,
            format!(
                "{field} ({} tokens) must be <= {} tokens (--max-input-tokens)",
                thousands(ids.len()),
                thousands(limits.max_input_tokens)
            ),
        ));
    }
    if ids.len() + max_tokens > limits.max_total_tokens {
        return Err(ApiError::bad(
            "max_tokens",
            format!(
                "{field} ({} tokens) + max_tokens ({}) must be <= {}",
                thousands(ids.len()),
                thousands(max_tokens),
                thousands(limits.max_total_tokens)
            ),
        ));
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_and_error_kinds() {
        assert_eq!(thousands(1200), "1,200");
        assert_eq!(thousands(2048), "2,048");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000_000), "1,000,000");
        let e = parse::<CompletionBody>(b"{not json").unwrap_err();
        assert_eq!(e.status, 400);
        let e = parse::<CompletionBody>(br#"{"model": "m", "prompt": 5}"#).unwrap_err();
        assert_eq!(e.status, 422);
        let e = parse::<CompletionBody>(br#"{"model": "m", "prompt": "x", "max_tokens": "a"}"#)
            .unwrap_err();
        assert!(e.message.contains("invalid type"), "{}", e.message);
    }
}
