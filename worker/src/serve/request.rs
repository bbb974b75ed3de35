//! What the engine serves and exchanges with the HTTP layer: the models, a generation
//! request, and the events a request's channel receives.

use stackwise_common::tokenizer::Tok;

use crate::generate::SamplingConfig;
use crate::models::Transformer;

/// A model the engine serves (the base, or the base with an adapter).
pub struct ServedModel {
    pub model: Transformer,
    pub tok: Tok,
}

/// Why a sequence ended (OpenAI's `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// End of text, or a stop string.
    Stop,
    /// `max_tokens` reached, or the model's context.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// What a request's channel receives.
#[derive(Debug, Clone)]
pub enum Event {
    /// The first token of a sequence (its prefill) and every later one, with the text it
    /// adds (decoded as part of the whole output, so multi-byte characters come whole).
    Token {
        id: u32,
        text: String,
    },
    Done {
        finish: Finish,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Error(String),
}

pub struct GenerationRequest {
    /// Index into the engine's models.
    pub model: usize,
    pub prompt: Vec<u32>,
    pub sampling: SamplingConfig,
    /// A scaffold model's influence (default: its trained one).
    pub scaffold_weight: Option<f64>,
    /// Stop strings: the output ends before the first one it contains.
    pub stop: Vec<String>,
    pub events: tokio::sync::mpsc::UnboundedSender<Event>,
}
