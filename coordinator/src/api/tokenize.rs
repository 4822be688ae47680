//! `POST /tokenize` and `POST /detokenize`, as vLLM serves them: a prompt's or a conversation's
//! token ids under the served tokenizer and chat template (what a request would be charged for),
//! and ids back to text.

use axum::{
    body::Body,
    extract::State,
    response::{IntoResponse, Response},
    Json,
};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::{
    completions::read_body,
    error::ApiError,
    validate::{chat_prompt_ids, check_model},
    SharedState,
};
use crate::chat_template::RenderOptions;

/// `/tokenize` with `prompt`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizePrompt {
    model: Option<String>,
    prompt: String,
    /// Add BOS as the tokenizer says (default true, as for a completion).
    add_special_tokens: Option<bool>,
    #[serde(default)]
    return_token_strs: bool,
}

/// `/tokenize` with `messages`: the fields of a chat request that shape its prompt.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizeChat {
    model: Option<String>,
    messages: Vec<Value>,
    add_generation_prompt: Option<bool>,
    continue_final_message: Option<bool>,
    chat_template_kwargs: Option<Map<String, Value>>,
    add_special_tokens: Option<bool>,
    #[serde(default)]
    return_token_strs: bool,
}

/// `/detokenize`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Detokenize {
    model: Option<String>,
    tokens: Vec<i64>,
}

fn parse<T: serde::de::DeserializeOwned>(body: Value) -> Result<T, ApiError> {
    serde_json::from_value(body)
        .map_err(|e| ApiError::bad_request(format!("Invalid request body: {e}")))
}

async fn json_object(body: Body) -> Result<Value, ApiError> {
    let bytes = read_body(body).await?;
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("Invalid request body: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::bad_request(
            "Invalid request body: expected a JSON object",
        ));
    }
    Ok(value)
}

fn check_optional_model(state: &SharedState, model: Option<&str>) -> Result<(), ApiError> {
    model.map_or(Ok(()), |m| check_model(state, m))
}

pub async fn tokenize(State(state): State<SharedState>, body: Body) -> Response {
    match tokenize_body(&state, body).await {
        Ok(answer) => Json(answer).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn tokenize_body(state: &SharedState, body: Body) -> Result<Value, ApiError> {
    let body = json_object(body).await?;
    let (tokens, return_token_strs) = if body.get("messages").is_some() {
        let req: TokenizeChat = parse(body)?;
        check_optional_model(state, req.model.as_deref())?;
        let options = RenderOptions {
            add_generation_prompt: req.add_generation_prompt.unwrap_or(true),
            continue_final_message: req.continue_final_message.unwrap_or(false),
            kwargs: req.chat_template_kwargs.as_ref(),
        };
        let ids = chat_prompt_ids(
            state,
            &req.messages,
            &options,
            req.add_special_tokens.unwrap_or(false),
        )?;
        (ids, req.return_token_strs)
    } else {
        let req: TokenizePrompt = parse(body)?;
        check_optional_model(state, req.model.as_deref())?;
        let ids = state
            .tokenizer
            .encode(&req.prompt, req.add_special_tokens.unwrap_or(true))
            .map_err(|e| ApiError::invalid_param("prompt", e.to_string()))?;
        (ids, req.return_token_strs)
    };
    let token_strs = return_token_strs.then(|| state.tokenizer.token_strings(&tokens));
    Ok(json!({
        "count": tokens.len(),
        "max_model_len": state.model.max_context,
        "tokens": tokens,
        "token_strs": token_strs,
    }))
}

pub async fn detokenize(State(state): State<SharedState>, body: Body) -> Response {
    let answer = async {
        let req: Detokenize = parse(json_object(body).await?)?;
        check_optional_model(&state, req.model.as_deref())?;
        let vocab = state.model.vocab_size as i64;
        if let Some(bad) = req.tokens.iter().find(|&&t| t < 0 || t >= vocab) {
            return Err(ApiError::invalid_param(
                "tokens",
                format!("token id {bad} is outside the vocabulary (0..{vocab})"),
            ));
        }
        Ok(json!({ "prompt": state.tokenizer.decode_all(&req.tokens) }))
    };
    match answer.await {
        Ok(answer) => Json(answer).into_response(),
        Err(e) => e.into_response(),
    }
}
