//! Validation: a request body for either endpoint becomes one typed [`ValidRequest`] (as TGI's
//! `validation.rs` does): every sampling parameter complete as the workers apply it, each
//! choice's seed, and each prompt's [`StopCriteria`] as the output processor takes it. Nothing
//! after this module adds defaults or checks a client's value again.

use caravan_proto::SamplingParams;
use serde_json::Value;

use super::{
    error::ApiError,
    types::{
        chat_messages, parse_body, ChatRequest, CompletionRequest, Prompt, SamplingFields, Stop,
    },
    SharedState,
};
use crate::{chat_template::RenderOptions, output::StopCriteria, structured::ConstraintSpec};

/// Which endpoint a request came to: shapes the response's JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

pub const MAX_STOP_SEQUENCES: usize = 4;
pub const MAX_STOP_LENGTH: usize = 256;
pub const MAX_LOGPROBS: u32 = 5;
/// Most choices one request may ask for (`n`, `best_of`), as OpenAI's limit.
pub const MAX_CHOICES: u32 = 128;
/// Most `logit_bias` entries, as OpenAI's limit.
pub const MAX_LOGIT_BIAS: usize = 300;
/// A request ready for the engine: each prompt is generated `best_of` times (one sequence per
/// entry of `choices`), and the `n` most likely of those are returned.
#[derive(Debug)]
pub struct ValidRequest {
    pub endpoint: Endpoint,
    pub prompts: Vec<ValidPrompt>,
    /// Choices returned per prompt.
    pub n: usize,
    /// The parameters of each sequence generated per prompt (`best_of >= n` of them), complete:
    /// choice `j` samples with its own seed, and `min_tokens` bans what would end it early.
    pub choices: Vec<SamplingParams>,
    /// Structured outputs: what every completion must spell (the field it came from names it
    /// in errors).
    pub constraint: Option<(&'static str, ConstraintSpec)>,
    /// Log-probabilities wanted: `None`, or `Some(top alternatives)`.
    pub logprobs: Option<u32>,
    pub stream: bool,
    pub include_usage: bool,
    /// vLLM's `return_tokens_as_token_ids`.
    pub token_ids: bool,
    /// vLLM's `prompt_logprobs`: alternatives per prompt position.
    pub prompt_logprobs: Option<u32>,
}

impl ValidRequest {
    /// Sequences generated per prompt.
    pub fn best_of(&self) -> usize {
        self.choices.len()
    }
}

/// One prompt of a validated request.
#[derive(Debug)]
pub struct ValidPrompt {
    pub ids: Vec<i64>,
    /// When each of its completions ends.
    pub stop: StopCriteria,
    /// `echo`: the prompt's text, sent before each of its completions.
    pub echo: Option<String>,
}

/// The sampling fields both endpoints share, checked.
#[derive(Debug, Clone)]
pub struct ValidSampling {
    /// The first choice's parameters (`prompt_logprobs` still unset).
    pub params: SamplingParams,
    pub stop: Vec<String>,
    /// Tokens that end a completion, not shown: end-of-sequence (unless `ignore_eos`), then
    /// `stop_token_ids`.
    pub end_tokens: Vec<i64>,
    /// Choices per prompt.
    pub n: usize,
    /// Whether the client chose the seed: choice `j` then samples with `seed + j`, so each
    /// choice can be reproduced alone.
    pub user_seed: bool,
    pub constraint: Option<(&'static str, ConstraintSpec)>,
}

impl ValidSampling {
    /// The parameters of `count` sequences of one prompt: the first keeps the seed; the others
    /// take `seed + j` if the client chose it, or fresh random seeds.
    pub fn choices(&self, count: usize) -> Vec<SamplingParams> {
        (0..count)
            .map(|j| {
                let mut params = self.params.clone();
                if j > 0 {
                    params.seed = if self.user_seed {
                        params.seed.wrapping_add(j as u64)
                    } else {
                        rand::random()
                    };
                }
                params
            })
            .collect()
    }

    /// When a completion of at most `max_tokens` tokens ends.
    pub fn stop_criteria(&self, max_tokens: usize, max_context: usize) -> StopCriteria {
        StopCriteria {
            strings: self.stop.clone(),
            token_ids: self.end_tokens.clone(),
            max_tokens,
            max_context,
            min_tokens: self.params.min_tokens as usize,
        }
    }
}

impl SamplingFields {
    /// Checks the fields; token ids must be below `vocab_size`. `eos_token_ids` end a completion
    /// unless `ignore_eos`.
    pub fn validate(
        &self,
        top_logprobs: u32,
        vocab_size: usize,
        eos_token_ids: &[i64],
    ) -> Result<ValidSampling, ApiError> {
        let token = |field: &'static str, id: i64| {
            if (0..vocab_size as i64).contains(&id) {
                Ok(id)
            } else {
                Err(ApiError::invalid_param(
                    field,
                    format!("token id {id} is outside the vocabulary (0..{vocab_size})"),
                ))
            }
        };
        let n = self.n.unwrap_or(1);
        if !(1..=MAX_CHOICES).contains(&n) {
            return Err(ApiError::invalid_param(
                "n",
                format!("n must be between 1 and {MAX_CHOICES}"),
            ));
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
        let mut logit_bias = Vec::new();
        if let Some(biases) = &self.logit_bias {
            if biases.len() > MAX_LOGIT_BIAS {
                return Err(ApiError::invalid_param(
                    "logit_bias",
                    format!("at most {MAX_LOGIT_BIAS} logit_bias entries"),
                ));
            }
            for (key, value) in biases {
                let id = key.trim().parse::<i64>().map_err(|_| {
                    ApiError::invalid_param(
                        "logit_bias",
                        format!("logit_bias keys are token ids; {key:?} is not one"),
                    )
                })?;
                let bias = value
                    .as_f64()
                    .filter(|b| (-100.0..=100.0).contains(b))
                    .ok_or_else(|| {
                        ApiError::invalid_param(
                            "logit_bias",
                            format!("logit_bias values must be numbers in [-100, 100]; got {value} for {key}"),
                        )
                    })?;
                logit_bias.push(caravan_proto::TokenBias {
                    token_id: token("logit_bias", id)?,
                    bias: bias as f32,
                });
            }
            // The same order on every rank and in every step.
            logit_bias.sort_by_key(|b| b.token_id);
        }
        let repetition_penalty = self.repetition_penalty.unwrap_or(1.0);
        if !(repetition_penalty > 0.0 && repetition_penalty <= 100.0) {
            return Err(ApiError::invalid_param(
                "repetition_penalty",
                "repetition_penalty must be in (0, 100]; 1 disables it",
            ));
        }
        let stop_token_ids = self
            .stop_token_ids
            .iter()
            .flatten()
            .map(|&id| token("stop_token_ids", id))
            .collect::<Result<Vec<_>, _>>()?;
        let constraint = self.constraint()?;
        let ignore_eos = self.ignore_eos.unwrap_or(false);
        // End-of-sequence first, then the client's stop tokens.
        let end_tokens: Vec<i64> = eos_token_ids
            .iter()
            .filter(|_| !ignore_eos)
            .chain(&stop_token_ids)
            .copied()
            .collect();
        let min_tokens = self.min_tokens.unwrap_or(0);
        Ok(ValidSampling {
            params: caravan_proto::SamplingParams {
                temperature,
                top_p,
                top_k,
                seed: self.seed.unwrap_or_else(rand::random),
                presence_penalty: self.presence_penalty.unwrap_or(0.0),
                frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
                top_logprobs,
                // Set by the endpoint, which knows what else asks for the prompt's scores.
                prompt_logprobs: None,
                logit_bias,
                repetition_penalty,
                min_tokens,
                // The workers hold back whatever would end the completion early.
                min_tokens_banned: if min_tokens > 0 {
                    end_tokens.clone()
                } else {
                    Vec::new()
                },
            },
            stop,
            end_tokens,
            n: n as usize,
            user_seed: self.seed.is_some(),
            constraint,
        })
    }

    /// The structured-output constraint, from whichever field gives one (at most one may).
    fn constraint(&self) -> Result<Option<(&'static str, ConstraintSpec)>, ApiError> {
        let mut found: Vec<(&'static str, ConstraintSpec)> = Vec::new();
        if let Some(format) = &self.response_format {
            let bad = |why: &str| ApiError::invalid_param("response_format", why.to_string());
            match format.get("type").and_then(Value::as_str) {
                None if format.is_null() => {}
                Some("text") => {}
                Some("json_object") => found.push(("response_format", ConstraintSpec::JsonObject)),
                Some("json_schema") => {
                    let schema = format.pointer("/json_schema/schema").ok_or_else(|| {
                        bad("a json_schema response_format needs json_schema.schema")
                    })?;
                    found.push((
                        "response_format",
                        ConstraintSpec::JsonSchema(schema.clone()),
                    ));
                }
                _ => {
                    return Err(bad(
                        "response_format.type must be text, json_object or json_schema",
                    ))
                }
            }
        }
        let schema = |field: &'static str, v: &Value| match v {
            // vLLM takes the schema as JSON text too.
            Value::String(text) => serde_json::from_str(text).map_err(|e| {
                ApiError::invalid_param(field, format!("{field} is not a JSON schema: {e}"))
            }),
            other => Ok(other.clone()),
        };
        if let Some(v) = &self.guided_json {
            found.push((
                "guided_json",
                ConstraintSpec::JsonSchema(schema("guided_json", v)?),
            ));
        }
        if let Some(r) = &self.guided_regex {
            found.push(("guided_regex", ConstraintSpec::Regex(r.clone())));
        }
        if let Some(c) = &self.guided_choice {
            found.push(("guided_choice", ConstraintSpec::Choice(c.clone())));
        }
        if let Some(g) = &self.guided_grammar {
            found.push(("guided_grammar", ConstraintSpec::Lark(g.clone())));
        }
        if let Some(so) = &self.structured_outputs {
            const FIELD: &str = "structured_outputs";
            let text = |key: &str| match so.get(key) {
                Some(Value::String(s)) => Ok(Some(s.clone())),
                None | Some(Value::Null) => Ok(None),
                Some(_) => Err(ApiError::invalid_param(
                    FIELD,
                    format!("structured_outputs.{key} must be a string"),
                )),
            };
            for key in so.keys() {
                if !["json", "regex", "choice", "grammar", "json_object"].contains(&key.as_str()) {
                    return Err(ApiError::invalid_param(
                        FIELD,
                        format!("structured_outputs.{key} is not supported (json, regex, choice, grammar, json_object are)"),
                    ));
                }
            }
            if let Some(v) = so.get("json").filter(|v| !v.is_null()) {
                found.push((FIELD, ConstraintSpec::JsonSchema(schema(FIELD, v)?)));
            }
            if let Some(r) = text("regex")? {
                found.push((FIELD, ConstraintSpec::Regex(r)));
            }
            if let Some(g) = text("grammar")? {
                found.push((FIELD, ConstraintSpec::Lark(g)));
            }
            if let Some(c) = so.get("choice").filter(|v| !v.is_null()) {
                let choices = serde_json::from_value::<Vec<String>>(c.clone()).map_err(|_| {
                    ApiError::invalid_param(
                        FIELD,
                        "structured_outputs.choice must be a list of strings",
                    )
                })?;
                found.push((FIELD, ConstraintSpec::Choice(choices)));
            }
            if so.get("json_object").and_then(Value::as_bool) == Some(true) {
                found.push((FIELD, ConstraintSpec::JsonObject));
            }
        }
        if let Some((_, ConstraintSpec::Choice(choices))) = found.first() {
            if choices.is_empty() || choices.iter().any(String::is_empty) {
                return Err(ApiError::invalid_param(
                    found[0].0,
                    "choices must be a non-empty list of non-empty strings",
                ));
            }
        }
        match found.len() {
            0 | 1 => Ok(found.pop()),
            _ => Err(ApiError::invalid_param(
                found[1].0,
                format!(
                    "only one structured-output constraint per request; got {} and {}",
                    found[0].0, found[1].0
                ),
            )),
        }
    }
}
/// A `POST /v1/completions` body, validated.
pub fn completion(state: &SharedState, bytes: &[u8]) -> Result<ValidRequest, ApiError> {
    let req: CompletionRequest = parse_body(bytes)?;
    check_model(state, &req.model)?;
    let encode = |text: &str| {
        state
            .tokenizer
            .encode(text, true)
            .map_err(|e| ApiError::invalid_param("prompt", e.to_string()))
    };
    // Each prompt's ids, and its text as `echo` repeats it.
    let prompts: Vec<(Vec<i64>, Option<&str>)> = match &req.prompt {
        Prompt::Text(text) => vec![(encode(text)?, Some(text))],
        Prompt::Tokens(ids) => vec![(checked_ids(state, ids)?, None)],
        Prompt::Texts(texts) => texts
            .iter()
            .map(|t| Ok((encode(t)?, Some(t.as_str()))))
            .collect::<Result<_, ApiError>>()?,
        Prompt::TokenLists(lists) => lists
            .iter()
            .map(|ids| Ok((checked_ids(state, ids)?, None)))
            .collect::<Result<_, ApiError>>()?,
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid_param(
            "prompt",
            "prompt must hold at least one prompt",
        ));
    }
    let logprobs = req.logprobs;
    if logprobs.is_some_and(|n| n > MAX_LOGPROBS) {
        return Err(ApiError::invalid_param(
            "logprobs",
            format!("logprobs must be at most {MAX_LOGPROBS}"),
        ));
    }
    let mut sampling = req.sampling.validate(
        logprobs.unwrap_or(0),
        state.model.vocab_size,
        &state.model.eos_token_ids,
    )?;
    let n = sampling.n;
    let best_of = match req.best_of {
        None => n,
        Some(b) if b as usize >= n && b <= MAX_CHOICES => b as usize,
        Some(_) => {
            return Err(ApiError::invalid_param(
                "best_of",
                format!("best_of must be at least n ({n}) and at most {MAX_CHOICES}"),
            ))
        }
    };
    if best_of > n && req.stream {
        return Err(ApiError::invalid_param(
            "best_of",
            "best_of greater than n cannot be streamed: the best choices are known only at the end",
        ));
    }
    let echo = req.echo == Some(true);
    let prompt_logprobs = checked_prompt_logprobs(req.prompt_logprobs, req.stream)?;
    // With `echo`, the prompt's tokens get log-probabilities too, with as many alternatives;
    // the workers compute the most either field asks for.
    sampling.params.prompt_logprobs = logprobs.filter(|_| echo).max(prompt_logprobs);
    let prompts = prompts
        .into_iter()
        .map(|(ids, text)| {
            // OpenAI's default for completions.
            let max_tokens = budget(state, ids.len(), req.max_tokens, 16)?;
            check_min_tokens(&sampling, max_tokens)?;
            let echo = echo.then(|| match text {
                Some(text) => text.to_owned(),
                None => state.tokenizer.decode(&ids),
            });
            Ok(ValidPrompt {
                stop: sampling.stop_criteria(max_tokens, state.model.max_context),
                ids,
                echo,
            })
        })
        .collect::<Result<_, ApiError>>()?;
    Ok(ValidRequest {
        endpoint: Endpoint::Completions,
        prompts,
        n,
        choices: sampling.choices(best_of),
        constraint: sampling.constraint,
        logprobs,
        stream: req.stream,
        include_usage: include_usage(bytes),
        token_ids: req.return_tokens_as_token_ids == Some(true),
        prompt_logprobs,
    })
}

/// A `POST /v1/chat/completions` body, validated: the conversation rendered with the served
/// chat template and tokenized.
pub fn chat(state: &SharedState, bytes: &[u8]) -> Result<ValidRequest, ApiError> {
    let req: ChatRequest = parse_body(bytes)?;
    check_model(state, &req.model)?;
    let options = RenderOptions {
        add_generation_prompt: req.add_generation_prompt.unwrap_or(true),
        continue_final_message: req.continue_final_message.unwrap_or(false),
        kwargs: req.chat_template_kwargs.as_ref(),
    };
    let prompt = chat_prompt_ids(
        state,
        &req.messages,
        &options,
        req.add_special_tokens.unwrap_or(false),
    )?;
    let top = req.top_logprobs.unwrap_or(0);
    if top > MAX_LOGPROBS {
        return Err(ApiError::invalid_param(
            "top_logprobs",
            format!("top_logprobs must be at most {MAX_LOGPROBS}"),
        ));
    }
    let logprobs = (req.logprobs == Some(true)).then_some(top);
    let max_tokens = budget(
        state,
        prompt.len(),
        req.max_completion_tokens.or(req.max_tokens),
        usize::MAX,
    )?;
    let mut sampling =
        req.sampling
            .validate(top, state.model.vocab_size, &state.model.eos_token_ids)?;
    check_min_tokens(&sampling, max_tokens)?;
    let prompt_logprobs = checked_prompt_logprobs(req.prompt_logprobs, req.stream)?;
    sampling.params.prompt_logprobs = prompt_logprobs;
    Ok(ValidRequest {
        endpoint: Endpoint::Chat,
        prompts: vec![ValidPrompt {
            ids: prompt,
            stop: sampling.stop_criteria(max_tokens, state.model.max_context),
            echo: None,
        }],
        n: sampling.n,
        choices: sampling.choices(sampling.n),
        constraint: sampling.constraint,
        logprobs,
        stream: req.stream,
        include_usage: include_usage(bytes),
        token_ids: req.return_tokens_as_token_ids == Some(true),
        prompt_logprobs,
    })
}

/// A conversation's prompt ids: the messages checked, rendered with the served chat template,
/// and tokenized (with the tokenizer's special tokens only if `add_special_tokens`).
pub(super) fn chat_prompt_ids(
    state: &SharedState,
    messages: &[Value],
    options: &RenderOptions,
    add_special_tokens: bool,
) -> Result<Vec<i64>, ApiError> {
    let messages = chat_messages(messages)?;
    let text = state
        .chat_template
        .render(&messages, options)
        .map_err(|e| ApiError::invalid_param("messages", e.0))?;
    state
        .tokenizer
        .encode(&text, add_special_tokens)
        .map_err(|e| ApiError::invalid_param("messages", e.to_string()))
}

fn include_usage(bytes: &[u8]) -> bool {
    serde_json::from_slice::<Value>(bytes)
        .ok()
        .and_then(|v| {
            v.pointer("/stream_options/include_usage")
                .and_then(Value::as_bool)
        })
        .unwrap_or(false)
}

pub(super) fn check_model(state: &SharedState, model: &str) -> Result<(), ApiError> {
    if model != state.model.name {
        return Err(ApiError::model_not_found(model));
    }
    Ok(())
}

/// Checks the token budget: `prompt + max_tokens` must fit the context.
fn budget(
    state: &SharedState,
    prompt: usize,
    max_tokens: Option<u32>,
    default: usize,
) -> Result<usize, ApiError> {
    let context = state.model.max_context;
    if prompt == 0 {
        return Err(ApiError::invalid_param("prompt", "the prompt is empty"));
    }
    if prompt >= context {
        return Err(ApiError::context_length(format!(
            "This model's maximum context length is {context} tokens; the prompt has {prompt}."
        )));
    }
    let max_tokens = match max_tokens {
        Some(0) => {
            return Err(ApiError::invalid_param(
                "max_tokens",
                "max_tokens must be at least 1",
            ))
        }
        Some(n) => n as usize,
        None => default.min(context - prompt),
    };
    if prompt + max_tokens > context {
        return Err(ApiError::context_length(format!(
            "This model's maximum context length is {context} tokens; the prompt has {prompt} and \
             {max_tokens} were requested for the completion. Reduce the prompt or max_tokens."
        )));
    }
    Ok(max_tokens)
}

/// vLLM's `prompt_logprobs`, checked: at most [`MAX_LOGPROBS`] alternatives, and returned with
/// whole responses only.
fn checked_prompt_logprobs(n: Option<u32>, stream: bool) -> Result<Option<u32>, ApiError> {
    match n {
        Some(n) if n > MAX_LOGPROBS => Err(ApiError::invalid_param(
            "prompt_logprobs",
            format!("prompt_logprobs must be at most {MAX_LOGPROBS}"),
        )),
        Some(_) if stream => Err(ApiError::invalid_param(
            "prompt_logprobs",
            "prompt_logprobs is returned with non-streamed responses only",
        )),
        n => Ok(n),
    }
}

/// `min_tokens` cannot exceed the completion's length.
fn check_min_tokens(sampling: &ValidSampling, max_tokens: usize) -> Result<(), ApiError> {
    let min = sampling.params.min_tokens as usize;
    if min > max_tokens {
        return Err(ApiError::invalid_param(
            "min_tokens",
            format!("min_tokens ({min}) must not exceed max_tokens ({max_tokens})"),
        ));
    }
    Ok(())
}

/// Checks one token-id prompt against the vocabulary.
fn checked_ids(state: &SharedState, ids: &[i64]) -> Result<Vec<i64>, ApiError> {
    let vocab = state.model.vocab_size as i64;
    if let Some(bad) = ids.iter().find(|&&t| t < 0 || t >= vocab) {
        return Err(ApiError::invalid_param(
            "prompt",
            format!("token id {bad} is outside the vocabulary (0..{vocab})"),
        ));
    }
    Ok(ids.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EOS: &[i64] = &[2];

    fn fields(body: Value) -> SamplingFields {
        serde_json::from_value(body).unwrap()
    }

    #[test]
    fn a_clients_seed_gives_choice_j_seed_plus_j() {
        let v = fields(serde_json::json!({"seed": 7, "n": 2}))
            .validate(0, 100, EOS)
            .unwrap();
        let seeds: Vec<u64> = v.choices(4).iter().map(|p| p.seed).collect();
        assert_eq!(seeds, [7, 8, 9, 10]);
        let wrapped = fields(serde_json::json!({"seed": u64::MAX}))
            .validate(0, 100, EOS)
            .unwrap();
        assert_eq!(wrapped.choices(2)[1].seed, 0);
    }

    #[test]
    fn without_a_seed_each_choice_draws_its_own() {
        let v = fields(serde_json::json!({})).validate(0, 100, EOS).unwrap();
        let choices = v.choices(3);
        assert_eq!(choices[0].seed, v.params.seed);
        assert_ne!(choices[1].seed, choices[2].seed);
        // Everything but the seed is the same for every choice.
        for c in &choices[1..] {
            let mut c = c.clone();
            c.seed = v.params.seed;
            assert_eq!(c, v.params);
        }
    }

    #[test]
    fn the_parameters_are_complete_without_defaults_left_to_the_workers() {
        let v = fields(serde_json::json!({})).validate(3, 100, EOS).unwrap();
        let p = &v.params;
        assert_eq!(
            (p.temperature, p.top_p, p.top_k, p.repetition_penalty),
            (1.0, 1.0, 0, 1.0)
        );
        assert_eq!((p.presence_penalty, p.frequency_penalty), (0.0, 0.0));
        assert_eq!((p.top_logprobs, p.min_tokens), (3, 0));
        assert!(p.min_tokens_banned.is_empty() && p.logit_bias.is_empty());
        assert_eq!(v.n, 1);
    }

    #[test]
    fn end_tokens_are_eos_then_stop_tokens_and_min_tokens_bans_them() {
        let v = fields(serde_json::json!({"stop_token_ids": [5, 9], "min_tokens": 2}))
            .validate(0, 100, EOS)
            .unwrap();
        assert_eq!(v.end_tokens, [2, 5, 9]);
        assert_eq!(v.params.min_tokens_banned, [2, 5, 9]);
        let ignoring =
            fields(serde_json::json!({"stop_token_ids": [5], "min_tokens": 2, "ignore_eos": true}))
                .validate(0, 100, EOS)
                .unwrap();
        assert_eq!(ignoring.end_tokens, [5]);
        assert_eq!(ignoring.params.min_tokens_banned, [5]);
        // Nothing is banned when min_tokens does not hold anything back.
        let free = fields(serde_json::json!({"stop_token_ids": [5]}))
            .validate(0, 100, EOS)
            .unwrap();
        assert_eq!(free.end_tokens, [2, 5]);
        assert!(free.params.min_tokens_banned.is_empty());
    }

    #[test]
    fn stop_criteria_carry_what_the_client_asked() {
        let v = fields(
            serde_json::json!({"stop": ["END", "\n\n"], "stop_token_ids": [5], "min_tokens": 3}),
        )
        .validate(0, 100, EOS)
        .unwrap();
        let stop = v.stop_criteria(16, 2048);
        assert_eq!(stop.strings, ["END", "\n\n"]);
        assert_eq!(stop.token_ids, [2, 5]);
        assert_eq!(
            (stop.max_tokens, stop.max_context, stop.min_tokens),
            (16, 2048, 3)
        );
        let one = fields(serde_json::json!({"stop": "x"}))
            .validate(0, 100, EOS)
            .unwrap();
        assert_eq!(one.stop_criteria(1, 8).strings, ["x"]);
    }

    #[test]
    fn out_of_range_values_name_their_field() {
        for (body, field) in [
            (
                serde_json::json!({"stop_token_ids": [100]}),
                "stop_token_ids",
            ),
            (serde_json::json!({"logit_bias": {"100": 1}}), "logit_bias"),
            (serde_json::json!({"temperature": 2.5}), "temperature"),
            (serde_json::json!({"top_p": 0}), "top_p"),
            (serde_json::json!({"top_k": -2}), "top_k"),
            (serde_json::json!({"n": 0}), "n"),
            (
                serde_json::json!({"repetition_penalty": 0}),
                "repetition_penalty",
            ),
            (
                serde_json::json!({"stop": ["a", "b", "c", "d", "e"]}),
                "stop",
            ),
            (
                serde_json::json!({"guided_regex": "a", "guided_choice": ["b"]}),
                "guided_choice",
            ),
        ] {
            let e = fields(body.clone()).validate(0, 100, EOS).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(field), "{body}: {e:?}");
        }
    }
}
