//! OpenAI request bodies, and their validation into [`Validated`] requests: the scheduler never
//! sees an unchecked request.

use serde::Deserialize;

use super::error::ApiError;
use crate::tokenizer::ChatMessage;

/// `prompt`: text or token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<i64>),
    /// Batches of prompts, accepted by OpenAI, refused here with a clear message.
    Batch(Vec<serde_json::Value>),
}

/// `stop`: one string or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// Sampling fields shared by both endpoints.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SamplingFields {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Extension (vLLM, TGI): keep the k most likely tokens.
    pub top_k: Option<i64>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub n: Option<u32>,
    /// Extension (vLLM): keep generating past end-of-sequence (for benchmarks).
    pub ignore_eos: Option<bool>,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Prompt,
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    pub logprobs: Option<u32>,
    pub echo: Option<bool>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u32>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

pub const MAX_STOP_SEQUENCES: usize = 4;
pub const MAX_STOP_LENGTH: usize = 256;
pub const MAX_LOGPROBS: u32 = 5;

/// Sampling parameters after validation.
#[derive(Debug, Clone)]
pub struct ValidSampling {
    pub params: caravan_proto::SamplingParams,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
}

impl SamplingFields {
    pub fn validate(&self, top_logprobs: u32) -> Result<ValidSampling, ApiError> {
        if let Some(n) = self.n {
            if n != 1 {
                return Err(ApiError::invalid_param("n", "only n = 1 is supported"));
            }
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid_param(
                "temperature",
                "temperature must be between 0 and 2",
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid_param("top_p", "top_p must be in (0, 1]"));
        }
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => k as u32,
            Some(_) => {
                return Err(ApiError::invalid_param(
                    "top_k",
                    "top_k must be positive, or -1/0 to disable",
                ))
            }
        };
        for (name, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if let Some(v) = value {
                if !(-2.0..=2.0).contains(&v) {
                    return Err(ApiError::invalid_param(
                        name,
                        format!("{name} must be between -2 and 2"),
                    ));
                }
            }
        }
        let stop = match &self.stop {
            None => vec![],
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > MAX_STOP_SEQUENCES {
            return Err(ApiError::invalid_param(
                "stop",
                format!("at most {MAX_STOP_SEQUENCES} stop sequences"),
            ));
        }
        if stop
            .iter()
            .any(|s| s.is_empty() || s.len() > MAX_STOP_LENGTH)
        {
            return Err(ApiError::invalid_param(
                "stop",
                format!("stop sequences must be 1 to {MAX_STOP_LENGTH} bytes"),
            ));
        }
        Ok(ValidSampling {
            params: caravan_proto::SamplingParams {
                temperature,
                top_p,
                top_k,
                seed: self.seed.unwrap_or_else(rand::random),
                presence_penalty: self.presence_penalty.unwrap_or(0.0),
                frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
                top_logprobs,
            },
            stop,
            ignore_eos: self.ignore_eos.unwrap_or(false),
        })
    }
}

/// Parses a JSON body into `T`, turning serde's message into a 400.
pub fn parse_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if std::str::from_utf8(bytes).is_err() {
        return Err(ApiError::bad_request(
            "The request body is not valid UTF-8.",
        ));
    }
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("Invalid request body: {e}")))
}
