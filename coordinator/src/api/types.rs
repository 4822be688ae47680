//! OpenAI request bodies as they arrive, and the checks of their shape (unknown and unsupported
//! fields, chat messages); [`super::validate`] turns them into requests the engine takes.

use serde::Deserialize;
use serde_json::Value;

use super::error::ApiError;

/// `prompt`: text or token ids, or an array of either (each prompt gets its own choices).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<i64>),
    Texts(Vec<String>),
    TokenLists(Vec<Vec<i64>>),
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
    /// Token id (as a string, as OpenAI sends it) to a bias in [-100, 100] added to its logit.
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    /// Extension (vLLM, TGI): transformers' repetition penalty over prompt and output (> 0).
    pub repetition_penalty: Option<f32>,
    /// Extension (vLLM): no end-of-sequence, stop token or stop string before this many tokens.
    pub min_tokens: Option<u32>,
    /// Extension (vLLM): tokens that end the completion (finish reason `stop`), not shown.
    pub stop_token_ids: Option<Vec<i64>>,
    /// OpenAI structured outputs: `{"type": "text" | "json_object" | "json_schema", ...}`.
    pub response_format: Option<Value>,
    /// Extensions (vLLM): a JSON schema (object or string), a regex, a list of choices, a Lark
    /// grammar; or all of them as vLLM's newer `structured_outputs` object.
    pub guided_json: Option<Value>,
    pub guided_regex: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    pub guided_grammar: Option<String>,
    pub structured_outputs: Option<serde_json::Map<String, Value>>,
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
    /// Sequences generated per prompt, of which the `n` most likely (by cumulative
    /// log-probability) are returned.
    pub best_of: Option<u32>,
    /// Extension (vLLM): name tokens `token_id:N` in `logprobs`.
    pub return_tokens_as_token_ids: Option<bool>,
    /// Extension (vLLM): each prompt token's log-probability and rank, with this many
    /// alternatives, in the choice's `prompt_logprobs`.
    pub prompt_logprobs: Option<u32>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    /// OpenAI chat messages, checked and normalised by [`chat_messages`].
    pub messages: Vec<Value>,
    /// Extension (vLLM): end the prompt with the opening of an assistant turn (default true).
    pub add_generation_prompt: Option<bool>,
    /// Extension (vLLM): leave the final assistant message open and continue it.
    pub continue_final_message: Option<bool>,
    /// Extension (vLLM): extra variables for the chat template.
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    /// Extension (vLLM): also add the tokenizer's special tokens (BOS) to the rendered text
    /// (default false: the template writes them).
    pub add_special_tokens: Option<bool>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u32>,
    /// Extension (vLLM): name tokens `token_id:N` in `logprobs`.
    pub return_tokens_as_token_ids: Option<bool>,
    /// Extension (vLLM): the prompt's log-probabilities, in the response's `prompt_logprobs`.
    pub prompt_logprobs: Option<u32>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// The top-level fields of a request body, as OpenAI treats them: a field OpenAI does not know
/// is a 400 ("Unrecognized request argument supplied"); one it knows but this server does not
/// implement is a 400 unless its value changes nothing (`tools: []`); and a few that only feed
/// OpenAI's own bookkeeping (`user`, `metadata`) are accepted and ignored.
pub trait RequestFields {
    /// Fields the request type reads (besides [`SAMPLING_FIELDS`]).
    const READ: &'static [&'static str];
    /// Fields of this endpoint not implemented here, each with a test for values that are no-ops.
    const UNSUPPORTED: &'static [Unsupported];
}

/// A field this server does not implement, and the test for values of it that are no-ops.
pub type Unsupported = (&'static str, fn(&Value) -> bool);

/// Read by [`SamplingFields`] on both endpoints.
pub const SAMPLING_FIELDS: &[&str] = &[
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "n",
    "ignore_eos",
    "logit_bias",
    "repetition_penalty",
    "min_tokens",
    "stop_token_ids",
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "structured_outputs",
];

/// OpenAI fields that change nothing about the generated tokens.
pub const IGNORED_FIELDS: &[&str] = &[
    "user",
    "metadata",
    "store",
    "service_tier",
    "parallel_tool_calls",
    "prompt_cache_key",
    "safety_identifier",
];

fn is_null(v: &Value) -> bool {
    v.is_null()
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

fn is_none_choice(v: &Value) -> bool {
    v.is_null() || v.as_str() == Some("none")
}

fn is_text_only(v: &Value) -> bool {
    v.is_null() || *v == serde_json::json!(["text"])
}

impl RequestFields for CompletionRequest {
    const READ: &'static [&'static str] = &[
        "model",
        "prompt",
        "max_tokens",
        "stream",
        "stream_options",
        "logprobs",
        "echo",
        "best_of",
        "return_tokens_as_token_ids",
        "prompt_logprobs",
    ];
    const UNSUPPORTED: &'static [Unsupported] = &[("logit_bias", is_empty), ("suffix", is_empty)];
}

impl RequestFields for ChatRequest {
    const READ: &'static [&'static str] = &[
        "model",
        "messages",
        "add_generation_prompt",
        "continue_final_message",
        "chat_template_kwargs",
        "add_special_tokens",
        "max_tokens",
        "max_completion_tokens",
        "stream",
        "stream_options",
        "logprobs",
        "top_logprobs",
        "return_tokens_as_token_ids",
        "prompt_logprobs",
    ];
    const UNSUPPORTED: &'static [Unsupported] = &[
        ("tools", is_empty),
        ("functions", is_empty),
        ("tool_choice", is_none_choice),
        ("function_call", is_none_choice),
        ("modalities", is_text_only),
        ("audio", is_null),
        ("prediction", is_null),
        ("web_search_options", is_null),
        ("reasoning_effort", is_null),
        ("verbosity", is_null),
        // vLLM's per-request template; the served one is chosen at start (--chat-template).
        ("chat_template", is_null),
    ];
}

/// Parses a JSON body into `T`: invalid UTF-8, invalid JSON, a body that is not an object, wrong
/// types and the fields [`RequestFields`] refuses are all 400s with a message saying which.
pub fn parse_body<T: serde::de::DeserializeOwned + RequestFields>(
    bytes: &[u8],
) -> Result<T, ApiError> {
    if std::str::from_utf8(bytes).is_err() {
        return Err(ApiError::bad_request(
            "The request body is not valid UTF-8.",
        ));
    }
    let body: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("Invalid request body: {e}")))?;
    let Value::Object(fields) = &body else {
        return Err(ApiError::bad_request(
            "Invalid request body: expected a JSON object",
        ));
    };
    for (name, value) in fields {
        let name = name.as_str();
        if T::READ.contains(&name)
            || SAMPLING_FIELDS.contains(&name)
            || IGNORED_FIELDS.contains(&name)
        {
            continue;
        }
        match T::UNSUPPORTED.iter().find(|(field, _)| *field == name) {
            Some((_, no_op)) if no_op(value) => {}
            Some(_) => {
                return Err(ApiError::invalid_param(
                    name,
                    format!("`{name}` is not supported by this server"),
                ))
            }
            None => {
                return Err(ApiError::invalid_param(
                    name,
                    format!("Unrecognized request argument supplied: {name}"),
                ))
            }
        }
    }
    serde_json::from_value(body)
        .map_err(|e| ApiError::bad_request(format!("Invalid request body: {e}")))
}

/// Checks OpenAI chat messages and normalises them for the chat template: each is an object with
/// a string `role`; `content` is a string, null, or an array of text parts, which are joined
/// with newlines (as vLLM does for templates that expect a string). Other fields (`name`,
/// `tool_calls`, ...) pass through to the template.
pub fn chat_messages(messages: &[Value]) -> Result<Vec<Value>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "messages must hold at least one message",
        ));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, message)| {
            let bad = |why: &str| ApiError::invalid_param("messages", format!("messages[{i}]: {why}"));
            let Value::Object(fields) = message else {
                return Err(bad("a message must be an object"));
            };
            if !fields.get("role").is_some_and(Value::is_string) {
                return Err(bad("`role` must be a string"));
            }
            let mut fields = fields.clone();
            match fields.get("content") {
                None | Some(Value::Null) | Some(Value::String(_)) => {}
                Some(Value::Array(parts)) => {
                    let texts = parts
                        .iter()
                        .map(|part| match (part.get("type"), part.get("text")) {
                            (Some(Value::String(kind)), Some(Value::String(text)))
                                if kind == "text" =>
                            {
                                Ok(text.as_str())
                            }
                            _ => Err(bad("only text content parts ({\"type\": \"text\", \"text\": ...}) are supported")),
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    fields.insert("content".into(), Value::String(texts.join("\n")));
                }
                Some(_) => return Err(bad("`content` must be a string or an array of text parts")),
            }
            Ok(Value::Object(fields))
        })
        .collect()
}
